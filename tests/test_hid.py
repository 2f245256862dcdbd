"""Keyboard-wedge readers (hardware/hid.py): the pure decoder on real
evdev.InputEvent streams, the reader shell on the simulated device (a pipe
read by python-evdev's own reader), a gateway lane fed by them, and a uinput
test where the kernel allows one."""

import asyncio
import logging
import os
import time

import pytest
from evdev import InputEvent, ecodes as e

from hardware import hid
from hardware.hid import (DeviceGone, HidReader, HidSelector, SimulatedInputDevice, SwipeAgain, WedgeDecoder,
                          interpret, key_events)
from hardware.readers import CardRead

PAN = "880000000013"
NAME = "WANG/XIAOMING"
SWIPE = f"%B{PAN}^{NAME}^27121010000000?;{PAN}=27121010000?"


def key(code, value, t=0.0):
    return InputEvent(int(t), int((t - int(t)) * 1e6), e.EV_KEY, code, value)


def press(code, t=0.0):
    return [key(code, 1, t), InputEvent(int(t), 0, e.EV_SYN, e.SYN_REPORT, 0), key(code, 0, t)]


# -- the pure decoder -----------------------------------------------------------
def test_shift_and_enter_with_our_us_keymap():
    frames = WedgeDecoder().feed_all(key_events("%B8800^Ab?", start=100.0))
    assert [(f.text, f.ended_by, f.garbled) for f in frames] == [("%B8800^Ab?", "enter", False)]
    assert frames[0].at == pytest.approx(100.0)


def test_right_shift_caps_lock_and_keypad():
    events = key_events("q", shift_key=e.KEY_RIGHTSHIFT, enter=False) + [key(e.KEY_RIGHTSHIFT, 1)]
    events += press(e.KEY_SEMICOLON) + [key(e.KEY_RIGHTSHIFT, 0)]              # shifted: ":"
    events += press(e.KEY_CAPSLOCK) + press(e.KEY_A) + press(e.KEY_1)         # caps lock shifts letters only
    events += press(e.KEY_CAPSLOCK) + press(e.KEY_KP7) + press(e.KEY_KPDOT) + press(e.KEY_KPENTER)
    assert [f.text for f in WedgeDecoder().feed_all(events)] == ["q:A17."]


def test_every_printable_ascii_character_round_trips():
    text = "".join(chr(c) for c in range(32, 127))
    assert [f.text for f in WedgeDecoder().feed_all(key_events(text))] == [text]


def test_a_gap_between_keys_splits_frames_typed_without_enter():
    first = key_events(";1111=?", start=10.0, enter=False)
    second = key_events(";2222=?", start=10.5, enter=False)   # 0.5 s later: another swipe
    decoder = WedgeDecoder(gap_s=0.1)
    frames = decoder.feed_all(first + second)
    assert [(f.text, f.ended_by) for f in frames] == [(";1111=?", "gap")]
    assert decoder.expire(10.55) is None                       # still typing, as far as we know
    last = decoder.expire(10.7)
    assert (last.text, last.ended_by) == (";2222=?", "gap")
    assert decoder.expire(20.0) is None and not decoder.pending


def test_lone_enter_key_up_autorepeat_and_other_event_types_are_nothing():
    decoder = WedgeDecoder()
    events = press(e.KEY_ENTER) + [key(e.KEY_A, 2), key(e.KEY_A, 0),
                                   InputEvent(0, 0, e.EV_LED, e.LED_NUML, 1),
                                   InputEvent(0, 0, e.EV_MSC, e.MSC_SCAN, 458756)]
    frames = decoder.feed_all(events)
    assert [f.text for f in frames] == [""] and interpret(frames[0], "magstripe", "1") is None
    assert interpret(frames[0], "scanner", "1") is None and not decoder.pending


def test_a_key_outside_the_keymap_garbles_the_frame():
    frames = WedgeDecoder().feed_all(key_events(";123", enter=False) + press(e.KEY_F5) + press(e.KEY_ENTER))
    assert frames[0].garbled
    assert interpret(frames[0], "magstripe", "1") == SwipeAgain("1", frames[0].at, "no_track")
    again = interpret(frames[0], "scanner", "1")
    assert (again.source, again.reason) == ("qr", "unreadable_code")


def test_an_endless_frame_is_cut_and_garbled():
    frames = WedgeDecoder().feed_all(key_events("1" * (hid.MAX_FRAME + 5)))
    assert frames[0].garbled and len(frames[0].text) == hid.MAX_FRAME


@pytest.mark.parametrize("typed, expected", [
    (SWIPE, ("magstripe", PAN)),
    ("%E?;E?", ("retry", "error_track")),
    ("%E?;E?+E?", ("retry", "error_track")),
    (f";{PAN}=2712", ("retry", "no_track")),          # no end sentinel: the swipe stopped short
    ("hello", ("retry", "no_track")),                 # junk
    (f";{PAN}A=2712?", ("retry", "bad_track")),
])
def test_magstripe_frames(typed, expected):
    frames = WedgeDecoder().feed_all(key_events(typed, start=5.0))
    out = interpret(frames[0], "magstripe", "2")
    if isinstance(out, SwipeAgain):
        assert ("retry", out.reason) == expected and out.pattern.value == "tap_again"
    else:
        assert (out.source, out.raw, out.lane) == (*expected, "2")


def test_scanner_frames_carry_the_payload():
    frames = WedgeDecoder().feed_all(key_events(" SGQ1.AbC-_x9 "))
    assert interpret(frames[0], "scanner", "1") == CardRead("1", "qr", "SGQ1.AbC-_x9", frames[0].at)
    with pytest.raises(ValueError):
        interpret(frames[0], "keyboard", "1")


def test_frames_keep_the_typed_text_out_of_repr():
    frame = WedgeDecoder().feed_all(key_events(SWIPE))[0]
    assert PAN not in repr(frame) and NAME not in repr(frame)
    assert PAN not in repr(interpret(frame, "magstripe", "1"))


def test_selector_needs_exactly_one_way_and_a_hex_usb_id():
    assert HidSelector(usb="0C2E:0b61").describe() == "usb 0C2E:0b61"
    for bad in ({}, {"name": "x", "usb": "0c2e:0b61"}, {"usb": "0c2e-0b61"}, {"usb": "zzzz:0001"}):
        with pytest.raises(ValueError):
            HidSelector(**bad)
    with pytest.raises(ValueError):
        HidReader("1", HidSelector(name="x"), "keyboard")


# -- the reader shell ----------------------------------------------------------
class Plug:
    """A USB socket for the simulated device: the finder sees what is plugged in."""

    def __init__(self):
        self.device: SimulatedInputDevice | None = None
        self.looks = 0

    def plug(self, **kw) -> SimulatedInputDevice:
        self.device = SimulatedInputDevice(**kw)
        return self.device

    def pull(self) -> None:
        self.device.unplug()
        self.device = None

    def finder(self, selector):
        self.looks += 1
        if self.device is None:
            raise DeviceGone("absent", f"no input device with {selector.describe()}")
        return self.device


async def until(predicate, timeout=5.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


async def next_read(reader, timeout=5.0):
    return await asyncio.wait_for(reader.reads().__anext__(), timeout)


async def test_reader_decodes_swipes_and_bad_swipes(caplog):
    caplog.set_level(logging.DEBUG)
    plug = Plug()
    device = plug.plug()
    async with HidReader("1", HidSelector(usb="0c2e:0b61"), "magstripe", finder=plug.finder) as reader:
        await until(lambda: reader.state == "ready", what="ready")
        assert device.grabbed
        device.type(SWIPE)
        read = await next_read(reader)
        assert (read.lane, read.source, read.raw) == ("1", "magstripe", PAN)
        device.type("%E?;E?")
        again = await next_read(reader)
        assert isinstance(again, SwipeAgain) and again.reason == "error_track"
        device.type(f";{PAN}=2712101?", enter=False)        # a reader set up without Enter: the gap ends it
        read = await next_read(reader)
        assert read.raw == PAN
    assert reader.state == "closed" and device.closed
    assert PAN not in caplog.text and NAME not in caplog.text and "2712" not in caplog.text


async def test_reader_waits_for_held_keys_before_grabbing():
    plug = Plug()
    device = plug.plug()
    device.held = [e.KEY_LEFTSHIFT]
    async with HidReader("1", HidSelector(name="wedge"), "scanner", finder=plug.finder) as reader:
        await asyncio.sleep(0.15)
        assert not device.grabbed and reader.state != "ready"
        device.held = []
        await until(lambda: device.grabbed and reader.state == "ready", what="the grab")


async def test_unplugged_device_is_dropped_and_picked_up_again_without_busy_looping(caplog):
    caplog.set_level(logging.INFO)
    plug = Plug()
    first = plug.plug()
    async with HidReader("1", HidSelector(device="/dev/input/by-id/usb-x-event-kbd"), "scanner",
                         finder=plug.finder) as reader:
        await until(lambda: reader.state == "ready", what="ready")
        first.type(f"{PAN[:6]}", enter=False)                 # half a code, then the cable comes out
        await asyncio.sleep(0.01)
        plug.pull()
        await until(lambda: reader.state == "absent", what="absent")
        looks = plug.looks
        await asyncio.sleep(1.0)
        assert plug.looks - looks <= 4                         # 0.25 s doubling to 2 s: no busy loop
        second = plug.plug()
        await until(lambda: reader.state == "ready", timeout=hid.RETRY_MAX + 2, what="back")
        assert reader.sessions == 2 and second.grabbed
        second.type(PAN)
        read = await next_read(reader)
        assert (read.source, read.raw) == ("qr", PAN)         # nothing of the half code before the unplug
    assert "absent" in caplog.text and PAN not in caplog.text


async def test_a_device_grabbed_by_another_program_is_a_fault_and_retried():
    plug = Plug()
    device = plug.plug()
    calls = []

    def busy():
        calls.append(1)
        if len(calls) == 1:
            raise OSError(16, "Device or resource busy")
        device.grabbed = True

    device.grab = busy
    async with HidReader("1", HidSelector(name="wedge"), "scanner", finder=plug.finder) as reader:
        await until(lambda: reader.state == "fault", what="fault")
        await until(lambda: reader.state == "ready", what="ready after the retry")


async def test_default_finder_without_input_devices_reports_absent(tmp_path):
    with pytest.raises(DeviceGone) as gone:
        hid.find_device(HidSelector(name="no such wedge"), str(tmp_path))
    assert gone.value.state == "absent"
    with pytest.raises(DeviceGone):
        hid.find_device(HidSelector(device=str(tmp_path / "event9")))


# -- a gateway lane fed by HID readers ------------------------------------------------
async def test_gateway_lane_with_a_magstripe_reader_and_a_scanner(tmp_path, broker, caplog):
    from gateway.shell import config as gw_config
    from gateway.shell.service import Gateway
    from tests.support import install_rules

    caplog.set_level(logging.DEBUG)
    cfg = gw_config.check({
        "store": {"id": "S001", "data_dir": str(tmp_path / "store")},
        "mqtt": {"host": "127.0.0.1", "port": broker.port},
        "lanes": [{"id": "1", "reader": "terminal",
                   "hid": [{"kind": "magstripe", "usb": "0801:0001"},
                           {"kind": "scanner", "name": "Honeywell 1900", "gap_ms": 50}]}],
    })
    swiper, scanner = Plug(), Plug()
    gw = Gateway(cfg)
    msr, qr = gw.lanes["1"].inputs
    msr.finder, qr.finder = swiper.finder, scanner.finder
    card_reader, code_scanner = swiper.plug(), scanner.plug()
    async with gw:
        install_rules(gw)  # issued now: fresh
        taps: asyncio.Queue = asyncio.Queue()
        gw.lanes["1"].listeners.add(taps)
        await until(lambda: msr.state == qr.state == "ready", what="both inputs")

        card_reader.type(SWIPE)
        tap = await asyncio.wait_for(taps.get(), 5)
        assert (tap["source"], tap["verdict"], tap["member"]["member_id"], tap["card"]) == \
            ("magstripe", "accept", "M1001", "8800****0013")
        assert gw.lanes["1"].indicator.history[-1].value == "accept"

        card_reader.type("%E?;E?")
        tap = await asyncio.wait_for(taps.get(), 5)
        assert (tap["verdict"], tap["reason"], tap["pattern"], tap["source"]) == \
            ("retry", "swipe_again", "tap_again", "magstripe")
        assert "重新刷卡" in tap["text"]["zh-CN"]

        code_scanner.type("880000000054")                 # a static member code: the lost card
        tap = await asyncio.wait_for(taps.get(), 5)
        assert (tap["source"], tap["verdict"], tap["reason"]) == ("qr", "deny", "lost")
        assert gw.current_member(gw.lanes["1"]) is None

        status = await gw.status_message("online")
        assert status.readers == {"1": "terminal", "1.magstripe0": "ready", "1.scanner1": "ready"}
        swiper.pull()
        await until(lambda: msr.state == "absent", what="the swipe reader to go")
        assert (await gw.status_message("online")).readers["1.magstripe0"] == "absent"
    assert PAN not in caplog.text and NAME not in caplog.text and "880000000054" not in caplog.text


# -- the real kernel path, where there is one -----------------------------------------------
UINPUT = "/dev/uinput"


@pytest.mark.skipif(not os.access(UINPUT, os.W_OK),
                    reason=f"{UINPUT} is missing or not writable here (no uinput module in this container); "
                           "this test creates a virtual keyboard through the kernel where it exists")
async def test_uinput_keyboard_wedge_through_the_kernel():
    from evdev import UInput

    name = f"storegate-test-wedge-{os.getpid()}"
    keys = sorted(set(hid.KEYMAP) | hid.SHIFT_KEYS | hid.ENTER_KEYS)
    with UInput({e.EV_KEY: keys}, name=name, vendor=0x0801, product=0x0001) as ui:
        await asyncio.sleep(0.5)  # udev creates the device node
        async with HidReader("1", HidSelector(name=name), "magstripe") as reader:
            await until(lambda: reader.state == "ready", timeout=5, what="the uinput device")
            for ev in key_events(SWIPE):
                if ev.type == e.EV_KEY:
                    ui.write(e.EV_KEY, ev.code, ev.value)
                    ui.syn()
            read = await next_read(reader)
            assert (read.source, read.raw) == ("magstripe", PAN)


@pytest.mark.parametrize("hid_cfg, message", [
    ({"kind": "scanner"}, "lanes[0].hid[0]: select the input device with exactly one of device, name or usb"),
    ({"kind": "scanner", "name": "a", "usb": "0c2e:0b61"}, "lanes[0].hid[0]: select the input device"),
    ({"kind": "keyboard", "name": "a"}, "lanes.0.hid.0.kind"),
    ({"kind": "magstripe", "usb": "0c2e-0b61"}, "lanes.0.hid.0.usb"),
    ({"kind": "magstripe", "device": "event3"}, "lanes.0.hid.0.device"),
    ({"kind": "magstripe", "name": "a", "gap_ms": 0}, "lanes.0.hid.0.gap_ms"),
    ({"kind": "magstripe", "name": "a", "port": 1}, "lanes.0.hid.0"),
])
def test_bad_hid_config_names_the_key(hid_cfg, message):
    from common.configfile import ConfigError
    from gateway.shell import config as gw_config

    with pytest.raises(ConfigError) as bad:
        gw_config.check({"store": {"id": "S001"}, "mqtt": {"host": "h"},
                         "lanes": [{"id": "1", "reader": "terminal", "hid": [hid_cfg]}]})
    assert message in str(bad.value)
