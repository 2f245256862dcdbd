"""PC/SC NFC readers: ACR122U, ACR1252U, any PC/SC contactless reader.

Used like the other readers::

    async with PcscReader("1", "ACR122U", read_pages=(4, 15)) as reader:
        async for event in reader.reads():
            if isinstance(event, ReadAgain):
                indicator.show(event.pattern)      # "tap_again": the read failed
            else:
                verdict = validate(event)          # an NfcRead, a CardRead

reads() yields NfcRead (a CardRead: source "nfc", raw = the UID as uppercase
hex, plus the pages read and the SUN check) for a completed read, and
TapAgain (the one hardware.readers.ReadAgain of every reader, source "nfc")
when the card left the field, or would not answer, before the read was
complete. The gateway shows the "tap_again" pattern for it.

What counts as a tap
--------------------
A tap is a card arriving on the reader: the reader reads it once, however
long it is held there. Taking it away and presenting it again is a new tap,
also when that happens between two polls (pcsc-lite counts insertions in
the upper 16 bits of the reader state, and that count is compared as well).
A card already lying on the reader when the reader starts, or when it comes
back after pcscd or the reader was gone, is not a tap: nobody presented it
just now, and reading it would bill whoever left it there. It has to be
taken away and presented again.

Why a polling thread and not pyscard's CardMonitor
--------------------------------------------------
CardMonitor is one process-wide singleton watching every reader, so it can
not be pointed at the one reader of a lane; it tells cards apart by reader
and ATR only, and every NTAG21x has the same PC/SC part 3 ATR, so a quick
swap of two cards is not seen; and when pcscd goes away its thread gets
SCARD_E_NO_SERVICE and stops for good (pyscard 2.3), so it never recovers
from a pcscd restart. Instead each PcscReader runs one thread with its own
PC/SC context, blocked in SCardGetStatusChange on its own reader (close()
wakes it with SCardCancel). On any loss, pcscd gone (SCARD_E_NO_SERVICE) or
the reader unplugged (SCARD_STATE_UNAVAILABLE, SCARD_E_UNKNOWN_READER), it
sets `state` to "absent", releases the context, and tries again with a new
context and a new search for the reader after a delay that doubles from
RETRY_MIN to RETRY_MAX seconds: never a busy loop, and back within RETRY_MAX
of the reader or pcscd returning. Events cross to asyncio with
loop.call_soon_threadsafe into an asyncio.Queue.

`state`: "absent" while no matching reader is reachable, "ready" while
watching it, "fault" after an unexpected error in the thread (it retries the
same way), "closed" after close().

Reading a card
--------------
- UID: FF CA 00 00 00 (PC/SC part 3 get data), SW 90 00 expected.
- With `read_pages=(first, last)` (NTAG21x page numbers, inclusive; user
  memory of an NTAG215 is pages 4..129): FF B0 00 <page> 10 reads 16 bytes,
  four pages at a time; NfcRead.data holds exactly the pages asked for.
  A card that refuses a page (another card type, a smaller NTAG) is read
  with data None; the gateway decides what a card without data means.
- With `sun_verifier` (cards.ntag424.SunVerifier): the NDEF file of an
  NTAG 424 DNA is read with ISO 7816-4 commands (select application
  D2760000850101, select file E104, read binary) and its SUN URL verified.
  NfcRead.sun is "ok" (raw is then the UID authenticated by the message,
  which is the card's real UID even when it sends a random ID), a SunError
  reason ("bad_format", "bad_mac", "replayed"), or "missing" when the card
  has no NDEF file; the gateway must refuse anything but "ok" on such lanes.
- With `read_ndef` (and no sun_verifier) the NDEF URL is read the same way
  but not verified: NfcRead.sun_url carries it to the gateway, which picks
  the keys by the card's programme (gateway/shell/secure_nfc.py).
- Transport failure, an empty answer or SW 63 00 (the reader's "card did
  not answer") at any step means the card left the field: TapAgain
  ("removed"). A card that answers but will not give its UID, or will not
  be connected: TapAgain ("unreadable").

The UID and the page data are personal data: they are kept out of repr()
and never logged.
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
import time
from dataclasses import dataclass, field
from typing import AsyncIterator

from hardware.readers import CardRead, CardReader, LatestReads, ReadAgain

log = logging.getLogger(__name__)

UID_APDU = bytes.fromhex("FFCA000000")
SW_OK = b"\x90\x00"
SW_NO_ANSWER = b"\x63\x00"           # ACR122U and friends: the card did not answer
NDEF_AID = bytes.fromhex("D2760000850101")
NDEF_FILE_ID = bytes.fromhex("E104")
NDEF_MAX_LENGTH = 1024               # an NTAG 424 DNA NDEF file has 256 bytes
READ_BINARY_CHUNK = 0x80             # fits the short APDU buffers of common readers
URI_PREFIXES = {0x00: "", 0x01: "http://www.", 0x02: "https://www.", 0x03: "http://", 0x04: "https://"}

RETRY_MIN = 0.25                     # seconds; doubles up to RETRY_MAX while the reader is gone
RETRY_MAX = 2.0
WAIT_MS = 2000                       # SCardGetStatusChange timeout; close() cancels it sooner
OPEN_WAIT = 5.0                      # open() waits this long for the first look at the reader


@dataclass(frozen=True)
class NfcRead(CardRead):
    """A completed NFC read."""

    data: bytes | None = field(default=None, repr=False)  # the pages of read_pages; personal data
    sun: str | None = None        # None: not checked; "ok", "missing" or a SunError reason
    counter: int | None = None    # SDMReadCtr of a SUN message that checked out
    # With read_ndef: the NDEF URL as read, unverified (None: the card has none);
    # the gateway verifies it with the keys of the card's programme (gateway/shell/secure_nfc.py).
    sun_url: str | None = field(default=None, repr=False)


@dataclass(frozen=True)
class TapAgain(ReadAgain):
    """A read that failed: the one ReadAgain, with the NFC source."""

    reason: str = "removed"       # removed | unreadable
    source: str = "nfc"


class _ReaderLost(Exception):
    """pcscd or the reader went away: start over with a new context."""


class _CardGone(Exception):
    """The card stopped answering mid-read."""

    def __init__(self, reason: str = "removed") -> None:
        super().__init__(reason)
        self.reason = reason


def _scard():
    from smartcard import scard  # imported here: the simulated twins need no libpcsclite

    return scard


def _code(hresult: int) -> int:
    return hresult & 0xFFFFFFFF  # pyscard may hand back a signed LONG


class PcscReader(CardReader):
    """One PC/SC reader for one lane, picked by `name_pattern`.

    `name_pattern` is a regular expression searched in the PC/SC reader names,
    case-insensitive ("ACR122U", r"ACR1252.*PICC"); a pattern that is not a
    valid expression is taken literally. The first matching name, in the
    order pcscd lists them, is used.
    """

    kind = "pcsc"

    def __init__(self, lane: str, name_pattern: str, *, read_pages: tuple[int, int] | None = None,
                 sun_verifier=None, read_ndef=False, queue_size: int = 64) -> None:
        super().__init__(lane)
        self.name_pattern = name_pattern
        try:
            self._pattern = re.compile(name_pattern, re.IGNORECASE)
        except re.error:
            self._pattern = re.compile(re.escape(name_pattern), re.IGNORECASE)
        if read_pages is not None:
            first, last = read_pages
            if not 0 <= first <= last <= 0xFF:
                raise ValueError("read_pages must be (first, last) page numbers with "
                                 f"0 <= first <= last <= 255, not {read_pages!r}")
        self.read_pages = read_pages
        self.sun_verifier = sun_verifier
        # bool, or a callable asked at each tap (the gateway: "do the rules have SUN keys?")
        self.read_ndef = read_ndef
        self.reader_name: str | None = None   # the PC/SC name in use, for status pages
        self._queue_size = queue_size
        self._reads: LatestReads | None = None    # made at open(): a reader may be opened again
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._first_look = threading.Event()
        self._context: int | None = None
        self._context_lock = threading.Lock()
        self._was_ready = False

    def __repr__(self) -> str:
        return f"PcscReader(lane={self.lane!r}, name_pattern={self.name_pattern!r}, state={self.state!r})"

    # -- asyncio side --------------------------------------------------------
    async def open(self) -> None:
        if self._thread is not None:
            raise RuntimeError("reader is already open")
        _scard()  # fail here, not in the thread, when pyscard or libpcsclite is missing
        self._loop = asyncio.get_running_loop()
        self._reads = LatestReads(self._queue_size, f"lane {self.lane}: nfc")
        self._stop.clear()
        self._first_look.clear()
        self._thread = threading.Thread(target=self._run, name=f"pcsc-lane-{self.lane}", daemon=True)
        self._thread.start()
        # So that `state` right after open() says whether the reader is there.
        await asyncio.to_thread(self._first_look.wait, OPEN_WAIT)
        if self.state == "closed":
            self.state = "absent"  # pcscd did not even answer yet

    async def close(self) -> None:
        thread, self._thread = self._thread, None
        self._stop.set()
        self._cancel_wait()
        if thread is not None:
            await asyncio.to_thread(thread.join, 10)
            if thread.is_alive():
                log.warning("lane %s: PC/SC thread did not stop", self.lane)
        self.state = "closed"
        if self._reads is not None:
            self._reads.close()

    def reads(self) -> AsyncIterator[NfcRead | TapAgain]:
        if self._reads is None:
            raise RuntimeError("open() the reader before reads()")
        return aiter(self._reads)

    def _deliver(self, event) -> None:
        """On the event loop (from the reader thread: call_soon_threadsafe)."""
        self._reads.put(event)

    def _emit(self, event) -> None:
        """From the reader thread."""
        try:
            self._loop.call_soon_threadsafe(self._deliver, event)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            self._stop.set()

    # -- reader thread -------------------------------------------------------
    def _set_state(self, state: str, why: str = "") -> None:
        if state != self.state:
            log.info("lane %s: NFC reader %s%s", self.lane, state, f" ({why})" if why else "")
        self.state = state

    def _cancel_wait(self) -> None:
        with self._context_lock:
            if self._context is not None:
                _scard().SCardCancel(self._context)

    def _run(self) -> None:
        delay = RETRY_MIN
        while not self._stop.is_set():
            try:
                self._session()
            except _ReaderLost as lost:
                self._set_state("absent", str(lost))
            except Exception:
                log.exception("lane %s: unexpected error in the PC/SC reader thread", self.lane)
                self._set_state("fault", "unexpected error")
            finally:
                self._first_look.set()
            if self._stop.is_set():
                break
            if self._was_ready:
                delay = RETRY_MIN  # lost after working: the first retry comes soon
            self._stop.wait(delay)
            delay = min(delay * 2, RETRY_MAX)

    def _session(self) -> None:
        """One PC/SC context: find the reader, watch it until it or pcscd is lost."""
        scard = _scard()
        self._was_ready = False
        hr, context = scard.SCardEstablishContext(scard.SCARD_SCOPE_USER)
        if _code(hr) != scard.SCARD_S_SUCCESS:
            raise _ReaderLost(f"no PC/SC service: {scard.SCardGetErrorMessage(hr)}")
        with self._context_lock:
            self._context = context
        try:
            name = self._find_reader(context)
            self.reader_name = name
            self._set_state("ready", name)
            self._was_ready = True
            self._first_look.set()
            self._watch(context, name)
        finally:
            with self._context_lock:
                self._context = None
            scard.SCardReleaseContext(context)

    def _find_reader(self, context: int) -> str:
        scard = _scard()
        hr, names = scard.SCardListReaders(context, [])
        if _code(hr) == scard.SCARD_E_NO_READERS_AVAILABLE:
            names = []
        elif _code(hr) != scard.SCARD_S_SUCCESS:
            raise _ReaderLost(f"cannot list readers: {scard.SCardGetErrorMessage(hr)}")
        for name in names:
            if self._pattern.search(name):
                return name
        raise _ReaderLost(f"no reader matches {self.name_pattern!r}")

    def _watch(self, context: int, name: str) -> None:
        scard = _scard()
        known = scard.SCARD_STATE_UNAWARE
        handled: int | None = None   # insertion count of the card on the reader already dealt with
        first_look = True
        while not self._stop.is_set():
            hr, states = scard.SCardGetStatusChange(context, WAIT_MS, [(name, known)])
            hr = _code(hr)
            if hr in (scard.SCARD_E_TIMEOUT, scard.SCARD_E_CANCELLED):
                continue
            if hr != scard.SCARD_S_SUCCESS:
                raise _ReaderLost(scard.SCardGetErrorMessage(hr))
            _, event_state, _atr = states[0]
            if event_state & (scard.SCARD_STATE_UNKNOWN | scard.SCARD_STATE_UNAVAILABLE):
                raise _ReaderLost("reader unplugged")
            known = event_state & ~scard.SCARD_STATE_CHANGED
            insertions = event_state >> 16
            if not event_state & scard.SCARD_STATE_PRESENT:
                handled = None
            elif handled is None or insertions != handled:
                handled = insertions
                if not first_look:
                    self._emit(self._read_card(context, name))
            first_look = False

    # -- one tap ---------------------------------------------------------------
    def _read_card(self, context: int, name: str) -> NfcRead | TapAgain:
        scard = _scard()
        at = time.time()
        hr, card, protocol = scard.SCardConnect(context, name, scard.SCARD_SHARE_SHARED,
                                                scard.SCARD_PROTOCOL_T0 | scard.SCARD_PROTOCOL_T1)
        hr = _code(hr)
        if hr != scard.SCARD_S_SUCCESS:
            gone = hr in (scard.SCARD_E_NO_SMARTCARD, scard.SCARD_W_REMOVED_CARD)
            return TapAgain(self.lane, at, "removed" if gone else "unreadable")
        try:
            return self._read_connected(card, protocol, at)
        except _CardGone as gone:
            return TapAgain(self.lane, at, gone.reason)
        finally:
            scard.SCardDisconnect(card, scard.SCARD_LEAVE_CARD)

    def _read_connected(self, card: int, protocol: int, at: float) -> NfcRead | TapAgain:
        uid, sw = self._transmit(card, protocol, UID_APDU)
        if sw != SW_OK or not uid:
            raise _CardGone("unreadable")
        raw = uid.hex().upper()
        data = self._read_pages(card, protocol) if self.read_pages is not None else None
        sun = counter = None
        if self.sun_verifier is not None:
            from cards.ntag424 import SunError

            url = self._read_ndef_url(card, protocol)
            if url is None:
                sun = "missing"
            else:
                try:
                    message = self.sun_verifier.verify(url)
                except SunError as refused:
                    sun = refused.reason
                else:
                    sun, counter, raw = "ok", message.counter, message.uid_hex
        sun_url = None
        if self.sun_verifier is None and (self.read_ndef() if callable(self.read_ndef) else self.read_ndef):
            sun_url = self._read_ndef_url(card, protocol)
        return NfcRead(self.lane, "nfc", raw, at, data=data, sun=sun, counter=counter, sun_url=sun_url)

    def _transmit(self, card: int, protocol: int, apdu: bytes) -> tuple[bytes, bytes]:
        """(data, SW) of one APDU; _CardGone when the card no longer answers."""
        scard = _scard()
        hr, response = scard.SCardTransmit(card, protocol, list(apdu))
        if _code(hr) != scard.SCARD_S_SUCCESS or len(response) < 2:
            raise _CardGone("removed")
        response = bytes(response)
        if response[-2:] == SW_NO_ANSWER:
            raise _CardGone("removed")
        return response[:-2], response[-2:]

    def _read_pages(self, card: int, protocol: int) -> bytes | None:
        first, last = self.read_pages
        data = b""
        for page in range(first, last + 1, 4):
            chunk, sw = self._transmit(card, protocol, bytes([0xFF, 0xB0, 0x00, page, 0x10]))
            if sw != SW_OK or len(chunk) != 16:
                return None  # the card has no such pages
            data += chunk
        return data[: (last - first + 1) * 4]

    def _read_ndef_url(self, card: int, protocol: int) -> str | None:
        """The URI of the NDEF file of a Type 4 tag, or None when there is none."""
        select_app = bytes([0x00, 0xA4, 0x04, 0x00, len(NDEF_AID)]) + NDEF_AID + b"\x00"
        select_file = bytes([0x00, 0xA4, 0x00, 0x0C, len(NDEF_FILE_ID)]) + NDEF_FILE_ID
        for apdu in (select_app, select_file):
            if self._transmit(card, protocol, apdu)[1] != SW_OK:
                return None
        head, sw = self._transmit(card, protocol, bytes.fromhex("00B0000002"))
        if sw != SW_OK or len(head) != 2:
            return None
        length = int.from_bytes(head, "big")
        if not 0 < length <= NDEF_MAX_LENGTH:
            return None
        message = b""
        while len(message) < length:
            offset = 2 + len(message)
            want = min(READ_BINARY_CHUNK, length - len(message))
            chunk, sw = self._transmit(card, protocol, bytes([0x00, 0xB0, offset >> 8, offset & 0xFF, want]))
            if sw != SW_OK or not chunk:
                return None
            message += chunk
        return ndef_uri(message[:length])


def ndef_uri(message: bytes) -> str | None:
    """The first URI record of an NDEF message (NFC Forum RTD URI), or None."""
    pos = 0
    while pos < len(message):
        header = message[pos]
        short, has_id, tnf = header & 0x10, header & 0x08, header & 0x07
        try:
            type_length = message[pos + 1]
            pos += 2
            if short:
                payload_length = message[pos]
                pos += 1
            else:
                payload_length = int.from_bytes(message[pos:pos + 4], "big")
                pos += 4
            id_length = message[pos] if has_id else 0
            pos += 1 if has_id else 0
        except IndexError:
            return None
        record_type = message[pos:pos + type_length]
        pos += type_length + id_length
        payload = message[pos:pos + payload_length]
        pos += payload_length
        if len(payload) != payload_length:
            return None
        if tnf == 0x01 and record_type == b"U" and payload:
            prefix = URI_PREFIXES.get(payload[0], "")
            try:
                return prefix + payload[1:].decode("utf-8")
            except UnicodeDecodeError:
                return None
        if header & 0x40:  # ME: last record
            break
    return None
