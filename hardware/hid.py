"""Keyboard-wedge readers over evdev: magnetic-stripe swipe readers and
barcode/QR scanners that type what they read as USB HID key presses.

Used like the other readers::

    async with HidReader("1", HidSelector(usb="0c2e:0b61"), "scanner") as reader:
        async for event in reader.reads():
            if isinstance(event, ReadAgain):
                indicator.show(event.pattern)   # "tap_again": a bad swipe
            else:
                verdict = validate(event)       # a CardRead

Two layers
----------
- `WedgeDecoder` (pure): fed real `evdev.InputEvent`s, it tracks shift and
  caps lock, maps key codes to characters with our own US keymap (what the
  device sends are key positions; the desktop's layout is never consulted,
  so a German or French desktop setting cannot turn "Y" into "Z"), and cuts
  the typing into frames. A frame ends at Enter (either Enter key), or when
  no key came for `gap_s` (readers set up without a suffix key). Two frames
  typed back to back without Enter are told apart by the gap as well: a key
  arriving more than `gap_s` after the previous one starts a new frame
  (the gap is measured on the events' own kernel timestamps). A frame with
  a key outside the keymap, or longer than MAX_FRAME, is marked garbled.
  `interpret()` turns a frame into what the lane gets: for a magstripe
  reader, CardRead(source="magstripe", raw=<card number>) from
  cards.magstripe.parse (the track's end sentinel "?" is how a complete
  track is recognised; a frame that stops without one is a broken swipe),
  or SwipeAgain(reason) for a bad swipe; for a scanner,
  CardRead(source="qr", raw=<payload>). An empty frame (a lone Enter) is
  nothing.
- `HidReader` (the shell): finds the device by `/dev/input/by-id/...` path,
  device name, or USB vendor:product; waits until no key is held on it
  (grabbing while a key is down would leave that key stuck down for
  whoever had it, e.g. the console), grabs it exclusively (EVIOCGRAB, so
  the card number is not also typed into a shell or a desktop), reads it
  with loop.add_reader, and runs a timer for the inter-key gap. When the
  device goes away (OSError ENODEV on read, or it is not there), `state`
  becomes "absent" and it is looked for again after a delay that doubles
  from RETRY_MIN to RETRY_MAX seconds: no busy loop, back within RETRY_MAX
  of the device returning. A device it may not open (EACCES: see the udev
  rule in deploy/) or one that another program grabbed (EBUSY) is "fault",
  retried the same way.

Raw input (track data, QR payloads) is personal data: frames keep it out of
repr(), and nothing here logs it.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable, Iterable

from evdev import InputEvent, ecodes as e

from cards import magstripe
from hardware.readers import CardRead, CardReader, LatestReads, ReadAgain

log = logging.getLogger(__name__)

KINDS = ("magstripe", "scanner")
GAP_S = 0.1            # default inter-key timeout: readers type a key every 1-20 ms
MAX_FRAME = 1024       # characters; a dynamic member QR code is ~270
RETRY_MIN = 0.25       # seconds; doubles up to RETRY_MAX while the device is gone
RETRY_MAX = 2.0
KEYS_HELD_POLL = 0.02  # seconds between active_keys() checks before grabbing

KEY_UP, KEY_DOWN, KEY_HOLD = 0, 1, 2

# -- our US keymap: key code -> (plain, shifted) ----------------------------
_ROWS = [
    ("KEY_1", "1", "!"), ("KEY_2", "2", "@"), ("KEY_3", "3", "#"), ("KEY_4", "4", "$"), ("KEY_5", "5", "%"),
    ("KEY_6", "6", "^"), ("KEY_7", "7", "&"), ("KEY_8", "8", "*"), ("KEY_9", "9", "("), ("KEY_0", "0", ")"),
    ("KEY_MINUS", "-", "_"), ("KEY_EQUAL", "=", "+"), ("KEY_LEFTBRACE", "[", "{"), ("KEY_RIGHTBRACE", "]", "}"),
    ("KEY_BACKSLASH", "\\", "|"), ("KEY_SEMICOLON", ";", ":"), ("KEY_APOSTROPHE", "'", '"'),
    ("KEY_GRAVE", "`", "~"), ("KEY_COMMA", ",", "<"), ("KEY_DOT", ".", ">"), ("KEY_SLASH", "/", "?"),
    ("KEY_SPACE", " ", " "),
    # the keypad: some scanners type digits there; it does not shift
    ("KEY_KP0", "0", "0"), ("KEY_KP1", "1", "1"), ("KEY_KP2", "2", "2"), ("KEY_KP3", "3", "3"),
    ("KEY_KP4", "4", "4"), ("KEY_KP5", "5", "5"), ("KEY_KP6", "6", "6"), ("KEY_KP7", "7", "7"),
    ("KEY_KP8", "8", "8"), ("KEY_KP9", "9", "9"), ("KEY_KPMINUS", "-", "-"), ("KEY_KPPLUS", "+", "+"),
    ("KEY_KPASTERISK", "*", "*"), ("KEY_KPSLASH", "/", "/"), ("KEY_KPDOT", ".", "."),
]
KEYMAP: dict[int, tuple[str, str]] = {e.ecodes[name]: (plain, shifted) for name, plain, shifted in _ROWS}
for _letter in "ABCDEFGHIJKLMNOPQRSTUVWXYZ":
    KEYMAP[e.ecodes[f"KEY_{_letter}"]] = (_letter.lower(), _letter)
LETTERS = frozenset(e.ecodes[f"KEY_{c}"] for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZ")
SHIFT_KEYS = frozenset((e.KEY_LEFTSHIFT, e.KEY_RIGHTSHIFT))
ENTER_KEYS = frozenset((e.KEY_ENTER, e.KEY_KPENTER))
# Held without effect on what we decode (some scanners wrap codes in Ctrl/Alt sequences
# we do not support: those show as garbled through the keys they press with them).
IGNORED_KEYS = frozenset((e.KEY_LEFTCTRL, e.KEY_RIGHTCTRL, e.KEY_LEFTALT, e.KEY_RIGHTALT,
                          e.KEY_LEFTMETA, e.KEY_RIGHTMETA, e.KEY_NUMLOCK, e.KEY_SCROLLLOCK))


@dataclass(frozen=True)
class Frame:
    """What a device typed between two frame ends."""

    text: str = field(repr=False)   # personal data: never logged
    at: float                       # kernel timestamp of the frame's first key
    ended_by: str                   # "enter" | "gap" | "flush"
    garbled: bool = False           # a key outside the keymap, or too long


@dataclass(frozen=True)
class SwipeAgain(ReadAgain):
    """A bad swipe or scan: the one ReadAgain, with the magstripe source by default."""

    reason: str                     # a cards.magstripe reason code, or "unreadable_code" for a scanner
    source: str = "magstripe"


class WedgeDecoder:
    """Key events in, frames out. Pure: time comes from the events (their
    kernel timestamps) or as an argument."""

    def __init__(self, gap_s: float = GAP_S) -> None:
        if not gap_s > 0:
            raise ValueError(f"gap_s must be > 0, not {gap_s!r}")
        self.gap_s = gap_s
        self._chars: list[str] = []
        self._garbled = False
        self._first_at = 0.0
        self._last_at: float | None = None
        self._shift: set[int] = set()
        self._caps = False

    @property
    def pending(self) -> bool:
        """True while a frame is being typed (the shell's gap timer runs)."""
        return bool(self._chars) or self._garbled

    @property
    def last_key_at(self) -> float | None:
        return self._last_at

    def feed(self, event: InputEvent) -> list[Frame]:
        """One event; returns the frames it completed (usually none)."""
        if event.type != e.EV_KEY:
            return []  # EV_SYN, EV_MSC (scan codes), EV_LED: nothing to decode
        code, value = event.code, event.value
        if code in SHIFT_KEYS:  # modifier state follows up and down, whatever the timing
            (self._shift.add if value else self._shift.discard)(code)
            return []
        if value != KEY_DOWN:
            return []  # key up; autorepeat (a wedge never holds a key that long)
        out: list[Frame] = []
        at = event.timestamp()
        if self._last_at is not None and self.pending and at - self._last_at > self.gap_s:
            out.append(self._take("gap"))  # a pause between two frames typed without Enter
        self._last_at = at
        if code in ENTER_KEYS:
            out.append(self._take("enter", at))
            return out
        if code == e.KEY_CAPSLOCK:
            self._caps = not self._caps
            return out
        if code in IGNORED_KEYS:
            return out
        if not self._chars and not self._garbled:
            self._first_at = at
        chars = KEYMAP.get(code)
        if chars is None or len(self._chars) >= MAX_FRAME:
            self._garbled = True
            return out
        shifted = bool(self._shift)
        if self._caps and code in LETTERS:
            shifted = not shifted
        self._chars.append(chars[1] if shifted else chars[0])
        return out

    def feed_all(self, events: Iterable[InputEvent]) -> list[Frame]:
        out: list[Frame] = []
        for event in events:
            out.extend(self.feed(event))
        return out

    def expire(self, now: float) -> Frame | None:
        """The frame in progress if no key came for gap_s before `now`."""
        if self.pending and self._last_at is not None and now - self._last_at >= self.gap_s - 1e-6:
            return self._take("gap")
        return None

    def flush(self, ended_by: str = "flush") -> Frame | None:
        """The frame in progress, whatever the time (the shell's gap timer
        fired, or the device went away)."""
        return self._take(ended_by) if self.pending else None

    def reset(self) -> None:
        """Forget everything (a new device session: no key is held)."""
        self._chars.clear()
        self._garbled = False
        self._last_at = None
        self._shift.clear()
        self._caps = False

    def _take(self, ended_by: str, at: float | None = None) -> Frame:
        first = self._first_at if (self._chars or self._garbled) else (at or 0.0)
        frame = Frame("".join(self._chars), first, ended_by, self._garbled)
        self._chars.clear()
        self._garbled = False
        return frame


def interpret(frame: Frame, kind: str, lane: str) -> CardRead | SwipeAgain | None:
    """What one frame means for the lane; None for an empty frame."""
    if kind == "magstripe":
        if frame.garbled:
            return SwipeAgain(lane, frame.at, "no_track")
        if not frame.text.strip():
            return None
        try:
            swipe = magstripe.parse(frame.text)
        except magstripe.SwipeError as bad:
            return SwipeAgain(lane, frame.at, bad.reason)
        return CardRead(lane, "magstripe", swipe.pan, frame.at)
    if kind == "scanner":
        text = frame.text.strip()
        if frame.garbled:
            # A code we cannot type back faithfully must not pass as a shorter one.
            return SwipeAgain(lane, frame.at, "unreadable_code", "qr")
        return CardRead(lane, "qr", text, frame.at) if text else None
    raise ValueError(f"unknown HID reader kind {kind!r}; expected one of {KINDS}")


# -- the shell ------------------------------------------------------------
@dataclass(frozen=True)
class HidSelector:
    """Which input device: exactly one of a path (/dev/input/by-id/...), the
    device name as the kernel reports it, or USB "vendor:product" in hex."""

    device: str | None = None
    name: str | None = None
    usb: str | None = None

    def __post_init__(self) -> None:
        given = [k for k in ("device", "name", "usb") if getattr(self, k)]
        if len(given) != 1:
            raise ValueError("select an input device by exactly one of device, name or usb")
        if self.usb:
            vendor, _, product = self.usb.partition(":")
            try:
                if len(vendor) != 4 or len(product) != 4:
                    raise ValueError
                int(vendor, 16), int(product, 16)
            except ValueError:
                raise ValueError(f"usb: {self.usb!r} is not vendor:product in hex, e.g. \"0c2e:0b61\"") from None

    @classmethod
    def of(cls, cfg: dict) -> "HidSelector":
        return cls(cfg.get("device"), cfg.get("name"), cfg.get("usb"))

    def describe(self) -> str:
        if self.device:
            return f"device {self.device}"
        return f"name {self.name!r}" if self.name else f"usb {self.usb}"

    def matches(self, device) -> bool:
        """For devices found by scanning /dev/input (name or usb)."""
        if self.name:
            return device.name == self.name
        vendor, product = (int(x, 16) for x in self.usb.split(":"))
        return (device.info.vendor, device.info.product) == (vendor, product)


class DeviceGone(Exception):
    """No device matches (yet), or it cannot be used; `state` says which."""

    def __init__(self, state: str, why: str) -> None:
        super().__init__(why)
        self.state = state


def find_device(selector: HidSelector, input_dir: str = "/dev/input"):
    """Open the evdev.InputDevice the selector names, or raise DeviceGone."""
    import evdev

    try:
        if selector.device:
            if not os.path.exists(selector.device):
                raise DeviceGone("absent", f"{selector.device} is not there")
            return evdev.InputDevice(selector.device)
        for path in sorted(evdev.list_devices(input_dir)):
            try:
                device = evdev.InputDevice(path)
            except OSError:
                continue  # gone in between, or not ours to open
            # A scanner often has several interfaces with the same name and ids
            # (keyboard, mouse, consumer keys): take the one that types Enter.
            keys = device.capabilities().get(e.EV_KEY, [])
            if selector.matches(device) and e.KEY_ENTER in keys:
                return device
            device.close()
    except PermissionError as denied:
        raise DeviceGone("fault", f"no permission to open the input device ({denied.strerror}); "
                                  "see deploy/udev/99-storegate.rules") from None
    except OSError as exc:
        raise DeviceGone("absent", f"cannot open the input device ({exc.strerror})") from None
    raise DeviceGone("absent", f"no input device with {selector.describe()}")


class HidReader(CardReader):
    """One keyboard-wedge device (magstripe reader or scanner) for one lane.

    `finder` (for tests) replaces find_device: called with the selector, it
    returns a device object with fd, read(), active_keys(), grab(), ungrab(),
    close(), or raises DeviceGone.
    """

    kind = "hid"

    def __init__(self, lane: str, selector: HidSelector, input_kind: str, *, gap_s: float = GAP_S,
                 finder: Callable | None = None, queue_size: int = 64) -> None:
        super().__init__(lane)
        if input_kind not in KINDS:
            raise ValueError(f"unknown HID reader kind {input_kind!r}; expected one of {KINDS}")
        self.selector = selector
        self.input_kind = input_kind
        self.decoder = WedgeDecoder(gap_s)
        self.finder = finder or find_device
        self._reads = LatestReads(queue_size, f"lane {lane}: {input_kind}")
        self._task: asyncio.Task | None = None
        self._timer: asyncio.TimerHandle | None = None
        self.sessions = 0  # times the device was grabbed (1 + replugs)

    def __repr__(self) -> str:
        return (f"HidReader(lane={self.lane!r}, {self.selector.describe()}, kind={self.input_kind!r}, "
                f"state={self.state!r})")

    async def open(self) -> None:
        if self._task is not None:
            raise RuntimeError("reader is already open")
        self.state = "absent"
        self._task = asyncio.create_task(self._run(), name=f"hid-lane-{self.lane}-{self.input_kind}")
        await asyncio.sleep(0)  # let the first look happen, so `state` means something

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        self.state = "closed"
        self._reads.close()

    def reads(self) -> AsyncIterator[CardRead | SwipeAgain]:
        return aiter(self._reads)

    def _deliver(self, event) -> None:
        self._reads.put(event)

    def _set_state(self, state: str, why: str = "") -> None:
        if state != self.state:
            level = logging.WARNING if state == "fault" else logging.INFO
            log.log(level, "lane %s: %s reader (%s) %s%s", self.lane, self.input_kind,
                    self.selector.describe(), state, f" ({why})" if why else "")
        self.state = state

    async def _run(self) -> None:
        delay = RETRY_MIN
        while True:
            try:
                device = self.finder(self.selector)
            except DeviceGone as gone:
                self._set_state(gone.state, str(gone))
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX)
                continue
            try:
                why = await self._session(device)
            except DeviceGone as gone:
                self._set_state(gone.state, str(gone))
            else:
                self._set_state("absent", why)
            finally:
                self._cancel_timer()
                self._close_device(device)
            await asyncio.sleep(delay if self.state == "fault" else RETRY_MIN)
            delay = min(delay * 2, RETRY_MAX) if self.state == "fault" else RETRY_MIN

    async def _session(self, device) -> str:
        """Grab the device and decode it until it goes away; returns why."""
        try:
            while device.active_keys():  # never grab with a key held (it would stick down)
                await asyncio.sleep(KEYS_HELD_POLL)
            device.grab()
        except OSError as exc:
            if exc.errno == errno.EBUSY:
                raise DeviceGone("fault", "another program has grabbed the device") from None
            return f"lost before grabbing it ({exc.strerror})"
        self.decoder.reset()
        self.sessions += 1
        self._set_state("ready", getattr(device, "path", ""))
        loop = asyncio.get_running_loop()
        lost: asyncio.Future = loop.create_future()

        def readable() -> None:
            try:
                events = list(device.read())
            except BlockingIOError:
                return
            except OSError as exc:  # ENODEV: unplugged
                if not lost.done():
                    lost.set_result(f"device lost ({exc.strerror or exc})")
                return
            self._feed(events)

        loop.add_reader(device.fd, readable)
        try:
            return await lost
        finally:
            loop.remove_reader(device.fd)
            if self.decoder.flush() is not None:  # half a swipe when the cable came out
                log.info("lane %s: %s input cut short by the device going away", self.lane, self.input_kind)

    def _feed(self, events: Iterable[InputEvent]) -> None:
        for frame in self.decoder.feed_all(events):
            self._emit(frame)
        self._cancel_timer()
        if self.decoder.pending:
            self._timer = asyncio.get_running_loop().call_later(self.decoder.gap_s, self._on_gap)

    def _on_gap(self) -> None:
        self._timer = None
        # gap_s of loop time without a key: the frame is over, whatever the wall
        # clock (which stamps the kernel's events) did meanwhile.
        frame = self.decoder.flush("gap")
        if frame is not None:
            self._emit(frame)

    def _emit(self, frame: Frame) -> None:
        event = interpret(frame, self.input_kind, self.lane)
        if event is None:
            return
        if isinstance(event, SwipeAgain):
            log.info("lane %s: %s read refused: %s (ended by %s)", self.lane, self.input_kind,
                     event.reason, frame.ended_by)
        self._deliver(event)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _close_device(self, device) -> None:
        for step in (device.ungrab, device.close):
            try:
                step()
            except OSError:
                pass  # already gone


# -- the simulated twin ---------------------------------------------------
_TYPING = {}
for _code, (_plain, _shifted) in KEYMAP.items():
    if _code in (e.KEY_KP0, e.KEY_KP1, e.KEY_KP2, e.KEY_KP3, e.KEY_KP4, e.KEY_KP5, e.KEY_KP6, e.KEY_KP7,
                 e.KEY_KP8, e.KEY_KP9, e.KEY_KPMINUS, e.KEY_KPPLUS, e.KEY_KPASTERISK, e.KEY_KPSLASH, e.KEY_KPDOT):
        continue  # type with the main keys, as most wedges do
    _TYPING.setdefault(_plain, (_code, False))
    _TYPING.setdefault(_shifted, (_code, True))


def key_events(text: str, start: float = 0.0, interval: float = 0.004, *, enter: bool = True,
               shift_key: int = e.KEY_LEFTSHIFT) -> list[InputEvent]:
    """The evdev events a US-layout keyboard wedge sends to type `text`
    (then Enter): shift down/up around shifted characters, key down, key up,
    each report closed by EV_SYN, one character every `interval` seconds."""
    events: list[InputEvent] = []
    t = start

    def at(type_: int, code: int, value: int) -> None:
        sec = int(t)
        events.append(InputEvent(sec, int(round((t - sec) * 1e6)), type_, code, value))

    def report(code: int, value: int) -> None:
        at(e.EV_MSC, e.MSC_SCAN, code)   # real keyboards send the scan code first
        at(e.EV_KEY, code, value)
        at(e.EV_SYN, e.SYN_REPORT, 0)

    keys = [(_TYPING[ch] if ch in _TYPING else _unknown(ch)) for ch in text]
    if enter:
        keys.append((e.KEY_ENTER, False))
    for code, shifted in keys:
        if shifted:
            report(shift_key, KEY_DOWN)
        report(code, KEY_DOWN)
        t += interval / 2
        report(code, KEY_UP)
        if shifted:
            report(shift_key, KEY_UP)
        t += interval / 2
    return events


def _unknown(ch: str):
    raise ValueError(f"{ch!r} cannot be typed on a US keyboard")


class SimulatedInputDevice:
    """The twin of an evdev.InputDevice for HidReader(finder=...): events go
    through a pipe as the kernel's struct input_event and are read back by
    python-evdev's own reader, so HidReader runs its real read path.
    `unplug()` makes the next read fail with ENODEV, like a pulled cable."""

    def __init__(self, name: str = "Simulated wedge", path: str = "/dev/input/event-sim") -> None:
        import struct

        self._struct = struct.Struct("llHHi")
        self.name, self.path = name, path
        self._r, self._w = os.pipe()
        os.set_blocking(self._r, False)
        self.held: list[int] = []      # what active_keys() reports
        self.grabbed = False
        self.unplugged = False
        self.closed = False

    @property
    def fd(self) -> int:
        return self._r

    def send(self, events: Iterable[InputEvent]) -> None:
        """Write events (timestamps as given) for the reader to pick up."""
        os.write(self._w, b"".join(self._struct.pack(ev.sec, ev.usec, ev.type, ev.code, ev.value)
                                   for ev in events))

    def type(self, text: str, *, enter: bool = True, interval: float = 0.002) -> None:
        self.send(key_events(text, time.time(), interval, enter=enter))

    def read(self):
        if self.unplugged:
            raise OSError(errno.ENODEV, os.strerror(errno.ENODEV))
        from evdev import _input

        return [InputEvent(*raw) for raw in _input.device_read_many(self._r)]

    def active_keys(self) -> list[int]:
        if self.unplugged:
            raise OSError(errno.ENODEV, os.strerror(errno.ENODEV))
        return list(self.held)

    def grab(self) -> None:
        if self.unplugged:
            raise OSError(errno.ENODEV, os.strerror(errno.ENODEV))
        self.grabbed = True

    def ungrab(self) -> None:
        self.grabbed = False

    def unplug(self) -> None:
        self.unplugged = True
        os.write(self._w, b"\0")  # wake the reader, whose read then fails

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            os.close(self._r)
            os.close(self._w)

