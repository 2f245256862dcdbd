"""Lane-reader firmware (firmware/): its logic under CPython, the same probe
under the real MicroPython interpreter (WebAssembly port, run by
tests/micropython_runner.mjs), the HTTP client against a real server, and
the loop against a real gateway process."""

import http.server
import json
import random
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from firmware import http_client, lane_reader as lr, main as board
from tests.support import GOLD_UID, HQ, GatewayProc, wait_until

ROOT = Path(__file__).resolve().parent.parent
FIRMWARE = ROOT / "firmware"
RUNNER = Path(__file__).parent / "micropython_runner.mjs"
MPY_PACKAGE = ROOT / ".cache/micropython/node_modules/@micropython/micropython-webassembly-pyscript"
P = lr.TICKS_PERIOD
UID7 = b"\x04\xa1\xb2\xc3\xd4\xe5\xf6"


# --- the pure logic, under CPython ------------------------------------------

@pytest.mark.parametrize("uid, expected", [
    (b"\x01\x02\x03\x04", "01020304"),
    (UID7, "04A1B2C3D4E5F6"),
    (bytearray(range(0xF6, 0x100)), "F6F7F8F9FAFBFCFDFEFF"),
])
def test_uid_to_hex(uid, expected):
    assert lr.uid_to_hex(uid) == expected


@pytest.mark.parametrize("uid, message", [
    (b"", "has 0 bytes; ISO 14443 UIDs have 4, 7 or 10"),
    (b"\x01\x02\x03\x04\x05", "has 5 bytes"),
    (b"\x00" * 11, "has 11 bytes"),
    ("04A1B2C3", "must be bytes, got str"),
    (None, "must be bytes, got NoneType"),
])
def test_uid_to_hex_rejects(uid, message):
    with pytest.raises(ValueError, match=message):
        lr.uid_to_hex(uid)


def test_ticks_diff_is_micropythons_wrapping_difference():
    rng = random.Random(7)
    for _ in range(10_000):
        b = rng.randrange(P)
        d = rng.randrange(-P // 2, P // 2)
        assert lr.ticks_diff((b + d) % P, b) == d
    assert lr.ticks_diff(5, P - 5) == 10
    assert lr.ticks_diff(P - 5, 5) == -10


def feed(debouncer, timeline):
    return [debouncer.seen(uid, t) for uid, t in timeline]


def test_debouncer_counts_a_held_card_once_and_again_after_release():
    d = lr.TapDebouncer()
    assert d.release_ms == 300
    assert feed(d, [("AA", 0), ("AA", 50), (None, 100), ("AA", 150),  # one flaky miss while held
                    (None, 200), (None, 450), ("AA", 460),            # gone only 260 ms: same tap
                    (None, 500), (None, 800), ("AA", 810),            # gone 300 ms: a new tap
                    ("BB", 820), ("AA", 830)]) == [                   # another card is a new tap at once
        True, False, False, False, False, False, False, False, False, True, True, True]


def test_debouncer_survives_tick_wrap_around():
    d = lr.TapDebouncer(release_ms=300)
    t0 = P - 100
    assert feed(d, [("CC", t0), (None, P - 50), (None, 100), ("CC", 120),  # 150 ms, across the wrap
                    (None, 200), (None, 499), (None, 500), ("CC", 510)]) == [
        True, False, False, False, False, False, False, True]


def test_debouncer_never_retaps_a_card_held_with_flaky_reads():
    d = lr.TapDebouncer(release_ms=300)
    rng = random.Random(1)
    t, taps, misses = P - 5_000, 0, 0  # straddles the wrap too
    for _ in range(2_000):
        # Up to 6 misses in a row at 50 ms: at most 250 ms without the card.
        misses = misses + 1 if misses < 6 and rng.random() < 0.4 else 0
        taps += d.seen(None if misses else "AA", t % P)
        t += 50
    assert taps == 1


def test_debouncer_release_zero_and_bad_release():
    d = lr.TapDebouncer(release_ms=0)
    assert feed(d, [("AA", 0), (None, 10), ("AA", 20)]) == [True, False, True]
    for bad in (-1, 0.5, "300"):
        with pytest.raises(ValueError, match="release_ms must be a non-negative integer"):
            lr.TapDebouncer(bad)


def test_build_tap_request():
    path, headers, body = lr.build_tap_request("lane-2_B", "04A1B2C3D4E5F6", token="s3cr3t.tok3n")
    assert path == "/lanes/lane-2_B/taps"
    assert headers == {"Content-Type": "application/json", "Authorization": "Bearer s3cr3t.tok3n"}
    assert json.loads(body) == {"source": "nfc", "raw": "04A1B2C3D4E5F6"}
    assert lr.build_tap_request("1", "01020304")[1] == {"Content-Type": "application/json"}
    assert lr.build_tap_request("1", "01020304", token="")[1] == {"Content-Type": "application/json"}


@pytest.mark.parametrize("args, message", [
    (("", "01020304"), "lane must be a string of 1-16 characters"),
    (("x" * 17, "01020304"), "lane must be a string of 1-16"),
    ((1, "01020304"), "lane must be a string"),
    (("1/../admin", "01020304"), "lane '1/../admin': only letters, digits"),
    (("1", "0102030"), "uid_hex must be 8, 14 or 20 uppercase hex digits"),
    (("1", "04a1b2c3"), "uid_hex must be 8, 14 or 20 uppercase hex digits"),
    (("1", b"01020304"), "uid_hex must be"),
    (("1", "01020304", "two words"), "token must be a string of printable ASCII without spaces"),
    (("1", "01020304", "tok\r\nX-Evil: 1"), "token must be"),
])
def test_build_tap_request_rejects(args, message):
    with pytest.raises(ValueError, match=message):
        lr.build_tap_request(*args)


@pytest.mark.parametrize("status, body, pattern", [
    (200, b'{"verdict": "accept", "pattern": "accept", "member": {"tier": "gold"}}', "accept"),
    (200, b'{"verdict": "accept_limited", "pattern": "accept"}', "accept"),
    (200, b'{"verdict": "deny", "reason": "card_lost", "pattern": "deny"}', "deny"),
    (200, '{"pattern": "tap_again", "text": {"zh-CN": "请重新刷卡"}}'.encode(), "tap_again"),
    (200, b'{"pattern": "offline"}', "offline"),
    (200, b'{"pattern": "fault"}', "fault"),
    (200, b'{"pattern": "disco"}', "fault"),       # unknown pattern
    (200, b'{"pattern": null}', "fault"),
    (200, b'{"verdict": "accept"}', "fault"),       # no pattern at all
    (200, b'["accept"]', "fault"),
    (200, b"<html>oops</html>", "fault"),
    (200, b"\xff\xfe", "fault"),                    # not even UTF-8
    (200, b"", "fault"),
    (404, b'{"error": {"code": "unknown_lane", "message": "unknown lane \'9\'"}}', "fault"),
    (500, b'{"pattern": "accept"}', "fault"),       # a non-200 is never a verdict
])
def test_pattern_for_response(status, body, pattern):
    assert lr.pattern_for_response(status, body) == pattern


class FakeNfc:
    def __init__(self, reads):
        self.reads = list(reads)

    def poll(self):
        read = self.reads.pop(0) if self.reads else None
        if isinstance(read, Exception):
            raise read
        return read


class FakeLeds:
    def __init__(self):
        self.shown = []

    def show(self, pattern):
        self.shown.append(pattern)


def test_lane_reader_step():
    answers = [(200, b'{"verdict": "accept", "pattern": "accept"}'), OSError(113, "EHOSTUNREACH"),
               (503, b'{"error": {"code": "journal_unavailable"}}'), (200, b'{"pattern": "deny"}')]
    requests = []

    def post(path, headers, body):
        requests.append((path, headers, body))
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    clock = iter(range(0, 100_000, 100))
    reads = [UID7, UID7, None, UID7,           # tap, held, one flaky miss, still held
             None, None, None, None, UID7,     # released (300 ms), tap again: network error
             b"\x01\x02", None, None, None, None,  # garbled read; released
             UID7,                             # tap: the gateway answers 503
             OSError(5, "EIO"),                # the reader glitches
             b"\x01\x02\x03\x04"]              # another card: deny
    leds = FakeLeds()
    reader = lr.LaneReader("1", FakeNfc(reads), post, leds, lambda: next(clock), token="t")
    results = [reader.step() for _ in range(len(reads))]
    assert [r for r in results if r] == ["accept", "fault", "tap_again", "fault", "deny"]
    assert results.index("fault") == 8 and results[1:4] == [None, None, None]
    assert leds.shown == ["accept", "fault", "tap_again", "fault", "deny"]
    assert requests[0] == ("/lanes/1/taps", {"Content-Type": "application/json", "Authorization": "Bearer t"},
                           b'{"source": "nfc", "raw": "04A1B2C3D4E5F6"}')
    assert [json.loads(r[2])["raw"] for r in requests] == ["04A1B2C3D4E5F6"] * 3 + ["01020304"]
    assert (reader.taps, reader.bad_reads, reader.errors, reader.faults) == (4, 1, 2, 2)
    assert reader.last_error == "reader: OSError: [Errno 5] EIO"


def test_lane_reader_survives_a_broken_transport():
    leds = FakeLeds()
    reader = lr.LaneReader("1", FakeNfc([UID7]), lambda *a: None, leds, lambda: 0)  # returns no tuple
    assert reader.step() == "fault"
    assert reader.last_error.startswith("gateway: TypeError")


def test_lane_reader_rejects_bad_settings():
    with pytest.raises(ValueError, match="lane 'a b'"):
        lr.LaneReader("a b", FakeNfc([]), None, FakeLeds(), lambda: 0)
    with pytest.raises(ValueError, match="token must be"):
        lr.LaneReader("1", FakeNfc([]), None, FakeLeds(), lambda: 0, token="a\nb")


# --- main.py's board glue, under CPython --------------------------------------

RC522 = {"sck": 18, "mosi": 23, "miso": 19, "cs": 5, "rst": 22}
CONFIG = {"gateway": "http://192.168.1.10:8080", "lane": "1", "token": None,
          "pins": {"green": 25, "red": 26, "buzzer": 27, "rc522": RC522}}


def test_check_config_fills_defaults():
    assert board.check_config(CONFIG) == dict(CONFIG, timeout_s=2.0, poll_ms=50)


DROP = object()  # removes the key


@pytest.mark.parametrize("change, message", [
    ({"gateway": DROP}, "config: 'gateway' is required"),
    ({"gateway": "https://gw"}, "config gateway: gateway URL must start with http://"),
    ({"gateway": "http://gw:80x"}, "port '80x' must be a number"),
    ({"lane": "1 2"}, "config lane: lane '1 2'"),
    ({"token": "a b"}, "config token: token must be"),
    ({"timeout_s": 0}, "config timeout_s: expected seconds > 0, got 0"),
    ({"poll_ms": -1}, "config poll_ms"),
    ({"gatway": "http://gw"}, "config: unknown key 'gatway'"),
    ({"pins": {"green": 25}}, "config pins.red: expected a GPIO number, got None"),
    ({"pins": {"green": 25, "red": "26", "rc522": RC522}}, "pins.red: expected a GPIO number, got '26'"),
    ({"pins": {"green": 25, "red": 26}}, "config pins.rc522: expected an object with sck, mosi"),
    ({"pins": {"green": 25, "red": 26, "rc522": dict(RC522, rst=None)}}, "pins.rc522.rst"),
])
def test_check_config_names_the_bad_field(change, message):
    config = {k: v for k, v in dict(CONFIG, **change).items() if v is not DROP}
    with pytest.raises(ValueError, match=re.escape(message)):
        board.check_config(config)


def test_load_config_errors(tmp_path):
    with pytest.raises(ValueError, match="cannot read it"):
        board.load_config(str(tmp_path / "missing.json"))
    (tmp_path / "bad.json").write_text("{gateway: 1}")
    with pytest.raises(ValueError, match="bad.json: not valid JSON"):
        board.load_config(str(tmp_path / "bad.json"))


def test_rc522_reader_refuses_to_start_without_its_driver(monkeypatch):
    monkeypatch.setitem(sys.modules, "mfrc522", None)  # makes `import mfrc522` fail
    with pytest.raises(RuntimeError, match="no RC522 driver on the board: copy mfrc522.py"):
        board.Rc522Reader(RC522)


def test_main_is_importable_without_side_effects():
    out = subprocess.run([sys.executable, "-c", "import firmware.main as m; print(m.run.__name__)"],
                         cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert (out.returncode, out.stdout, out.stderr) == (0, "run\n", "")


# --- the probe: the same code under MicroPython (and CPython, for parity) ----
#
# PROBE only exercises the firmware and prints "label = value" lines;
# EXPECTED judges them. Runs unchanged on both interpreters, so: no
# f-strings, no dict-order-dependent output, fake modules as plain objects
# (MicroPython cannot instantiate module objects).

PROBE = r'''
import sys
import time

print("impl =", repr(sys.implementation.name))


def out(label, value):
    print("%s = %r" % (label, value))


def split_request(raw):
    """(request line, sorted header lines, body): header order is dict order, which differs."""
    head, body = raw.split(b"\r\n\r\n", 1)
    lines = head.split(b"\r\n")
    return lines[0], sorted(lines[1:]), body


def error_of(fn, *args):
    try:
        fn(*args)
    except Exception as exc:
        return "%s: %s" % (type(exc).__name__, exc)
    return "no error"


# Fakes installed before the firmware imports them: the WebAssembly port has
# no socket and no machine module.
class FakeConn:
    def __init__(self, net, family, kind, proto):
        self.net = net
        net.conns.append(self)
        self.sent = b""
        self.closed = False

    def settimeout(self, s):
        self.net.timeouts.append(s)

    def connect(self, addr):
        self.net.connected.append(addr)

    def sendall(self, data):
        self.sent += data

    def recv(self, n):
        if self.net.chunks:
            chunk = self.net.chunks.pop(0)
            if isinstance(chunk, Exception):
                raise chunk
            return chunk[:n]
        if self.net.keep_open:
            raise OSError("recv after the complete response: the client would hang")
        return b""

    def close(self):
        self.closed = True


class FakeSocketModule:
    SOCK_STREAM = 1

    def __init__(self):
        self.conns, self.timeouts, self.connected = [], [], []
        self.chunks, self.keep_open, self.resolvable = [], False, True

    def getaddrinfo(self, host, port, af=0, kind=0, proto=0, flags=0):
        return [(2, 1, 6, "", (host, port))] if self.resolvable else []

    def socket(self, family=2, kind=1, proto=0):
        return FakeConn(self, family, kind, proto)

    def answer(self, raw, size=1024, keep_open=False):
        self.chunks = [raw[i:i + size] for i in range(0, len(raw), size)]
        self.keep_open = keep_open


class FakePin:
    OUT = 1
    log = []

    def __init__(self, number, mode):
        self.number = number

    def value(self, v):
        FakePin.log.append((self.number, v))


class FakeMachine:
    Pin = FakePin


class FakeRc522:
    OK, ERR, REQIDL = 0, 2, 0x26

    def __init__(self, **pins):
        self.pins = pins
        self.requests = []  # scripted request() statuses
        self.selects = []   # scripted SelectTagSN() answers

    def request(self, mode):
        return (self.requests.pop(0) if self.requests else self.ERR), 16

    def SelectTagSN(self):
        return self.selects.pop(0)


class FakeMfrc522Module:
    MFRC522 = FakeRc522


net = FakeSocketModule()
sys.modules["socket"] = net
sys.modules["machine"] = FakeMachine()
sys.modules["mfrc522"] = FakeMfrc522Module()

import lane_reader as lr
import http_client
import main

P = lr.TICKS_PERIOD

# uid_to_hex
out("uid 4", lr.uid_to_hex(b"\x01\x02\x03\x04"))
out("uid 7", lr.uid_to_hex(b"\x04\xa1\xb2\xc3\xd4\xe5\xf6"))
out("uid 10 bytearray", lr.uid_to_hex(bytearray(range(0xF6, 0x100))))
out("uid 5", error_of(lr.uid_to_hex, b"\x01\x02\x03\x04\x05"))
out("uid str", error_of(lr.uid_to_hex, "04A1B2C3"))

# ticks_diff, and against MicroPython's own time.ticks_diff where it exists
pairs = [(5, P - 5), (P - 5, 5), (0, 0), (P // 2 - 1, 0), (100, 200), (P - 1, 0)]
out("ticks_diff", [lr.ticks_diff(a, b) for a, b in pairs])
if hasattr(time, "ticks_diff"):
    assert [lr.ticks_diff(a, b) for a, b in pairs] == [time.ticks_diff(a, b) for a, b in pairs]
    assert time.ticks_add(P - 1, 1) == 0, "this port's ticks do not wrap at 2**30"
    print("native ticks_diff agrees")


def feed(d, timeline):
    return [d.seen(uid, t) for uid, t in timeline]


out("debounce", feed(lr.TapDebouncer(), [
    ("AA", 0), ("AA", 50), (None, 100), ("AA", 150), (None, 200), (None, 450), ("AA", 460),
    (None, 500), (None, 800), ("AA", 810), ("BB", 820), ("AA", 830)]))
out("debounce wrap", feed(lr.TapDebouncer(300), [
    ("CC", P - 100), (None, P - 50), (None, 100), ("CC", 120), (None, 200), (None, 499), (None, 500),
    ("CC", 510)]))
out("debounce bad", error_of(lr.TapDebouncer, -1))

# build_tap_request
path, headers, body = lr.build_tap_request("lane-2_B", "04A1B2C3D4E5F6", "tok")
out("request", (path, sorted(headers.items()), body))
out("request no token", sorted(lr.build_tap_request("1", "01020304")[1].items()))
out("request bad lane", error_of(lr.build_tap_request, "1/../x", "01020304"))
out("request long lane", error_of(lr.build_tap_request, "x" * 17, "01020304"))
out("request bad uid", error_of(lr.build_tap_request, "1", "04a1"))
out("request bad token", error_of(lr.build_tap_request, "1", "01020304", "a b"))

# pattern_for_response
answers = [(200, b'{"verdict": "accept", "pattern": "accept"}'), (200, b'{"pattern": "deny"}'),
           (200, b'{"pattern": "tap_again"}'), (200, b'{"pattern": "offline"}'),
           (200, b'{"pattern": "fault"}'), (200, b'{"pattern": "disco"}'), (200, b'{"verdict": "accept"}'),
           (200, b'["accept"]'), (200, b"<html>"), (200, b"\xff"), (200, b""),
           (404, b'{"error": {"code": "unknown_lane"}}'), (500, b'{"pattern": "accept"}')]
out("patterns", [lr.pattern_for_response(s, b) for s, b in answers])


# LaneReader.step with fakes
class Nfc:
    def __init__(self, reads):
        self.reads = reads

    def poll(self):
        read = self.reads.pop(0) if self.reads else None
        if isinstance(read, Exception):
            raise read
        return read


class Leds:
    def __init__(self):
        self.shown = []

    def show(self, pattern):
        self.shown.append(pattern)


sent = []
gateway_answers = [(200, b'{"verdict": "accept", "pattern": "accept"}'), OSError(113),
                   (503, b'{"error": {"code": "journal_unavailable"}}'), (200, b'{"pattern": "deny"}')]


def post(path, headers, body):
    sent.append(body)
    answer = gateway_answers.pop(0)
    if isinstance(answer, Exception):
        raise answer
    return answer


uid = b"\x04\xa1\xb2\xc3\xd4\xe5\xf6"
ticks = [P - 300]  # the run crosses the tick wrap


def clock():
    ticks[0] = (ticks[0] + 100) % P
    return ticks[0]


leds = Leds()
reader = lr.LaneReader("1", Nfc([uid, uid, None, uid, None, None, None, None, uid, b"\x01\x02", None, None,
                                 None, None, uid, OSError(5), b"\x01\x02\x03\x04"]),
                       post, leds, clock, token="t")
out("steps", [reader.step() for _ in range(17)])
out("shown", leds.shown)
out("sent", sent)
out("counters", (reader.taps, reader.bad_reads, reader.errors, reader.faults))

# http_client over the fake socket
ok = b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\nContent-Length: 21\r\n\r\n{\"pattern\": \"accept\"}"
net.answer(ok)
out("http ok", http_client.http_post("http://10.0.0.5:8080", "/lanes/1/taps", {"X-A": "1"}, b"{}", 1.5))
conn = net.conns[-1]
out("http request", split_request(conn.sent))
out("http socket", (net.connected[-1], net.timeouts[-1], conn.closed))
net.answer(ok, size=7)
out("http small chunks", http_client.http_post("http://gw", "/x", {}, b""))
net.answer(ok, keep_open=True)
out("http kept open", http_client.http_post("http://gw", "/x", {}, b""))
net.answer(b"HTTP/1.1 404 Not Found\r\n\r\n{\"error\": {\"code\": \"unknown_lane\"}}")
out("http 404 to eof", http_client.http_post("http://gw/", "/x", {}, b""))
net.answer(b"")
out("http empty answer", error_of(http_client.http_post, "http://gw:81/store/", "/lanes/1/taps", {}, b""))
out("http prefix", net.conns[-1].sent.split(b"\r\n")[:2])
net.answer(b"SSH-2.0-OpenSSH\r\n\r\n")
out("http not http", error_of(http_client.http_post, "http://gw", "/x", {}, b""))
net.answer(b"HTTP/1.0 200 OK\r\nContent-Length: 10\r\n\r\n{}")
out("http truncated", error_of(http_client.http_post, "http://gw", "/x", {}, b""))
net.answer(b"HTTP/1.0 200 OK\r\n\r\n" + b"x" * 20000)
out("http oversized", error_of(http_client.http_post, "http://gw", "/x", {}, b""))
net.chunks = [OSError(110)]
out("http timeout", error_of(http_client.http_post, "http://gw", "/x", {}, b""))
out("http timeout closed", net.conns[-1].closed)
net.resolvable = False
out("http unresolvable", error_of(http_client.http_post, "http://nowhere", "/x", {}, b""))
net.resolvable = True
out("http bad url", error_of(http_client.http_post, "https://gw", "/x", {}, b""))
out("http bad port", error_of(http_client.http_post, "http://gw:0", "/x", {}, b""))
out("http bad path", error_of(http_client.http_post, "http://gw", "x", {}, b""))
out("http bad header", error_of(http_client.http_post, "http://gw", "/x", {"A": "1\r\nB: 2"}, b""))

# main.py: config, the RC522 adapter, the LEDs, and run() end to end
rdr = FakeRc522()
nfc = main.Rc522Reader({}, driver=rdr)
rdr.requests = [rdr.ERR, rdr.ERR]
out("rc522 no card", nfc.poll())
rdr.requests = [rdr.ERR, rdr.OK]  # a held card ignores one REQA
rdr.selects = [(rdr.OK, [0x04, 0xA1, 0xB2, 0xC3, 0xD4, 0xE5, 0xF6])]
out("rc522 held card", nfc.poll())
rdr.requests = [rdr.OK]
rdr.selects = [(rdr.ERR, [])]
out("rc522 failed select", nfc.poll())

config = {"gateway": "http://10.0.0.5:8080", "lane": "3", "token": "tok", "timeout_s": 1, "poll_ms": 7,
          "pins": {"green": 25, "red": 26, "buzzer": 27,
                   "rc522": {"sck": 18, "mosi": 23, "miso": 19, "cs": 5, "rst": 22}}}
import json
with open("probe_config.json", "w") as f:
    json.dump(config, f)
out("config bad", error_of(main.check_config, {"gateway": "http://gw", "lane": "1", "pins": {"green": 1}}))


class StopLoop(Exception):
    pass


sleeps = []


def fake_sleep_ms(ms):
    sleeps.append(ms)
    if ms == 7 and sleeps.count(7) == 3:  # three poll intervals: enough for this test
        raise StopLoop()


main.sleep_ms = fake_sleep_ms
drivers = []


class RecordingRc522(FakeRc522):
    def __init__(self, **pins):
        FakeRc522.__init__(self, **pins)
        self.requests = [self.OK, self.OK]
        self.selects = [(self.OK, [1, 2, 3, 4]), (self.OK, [1, 2, 3, 4])]
        drivers.append(self)


FakeMfrc522Module.MFRC522 = RecordingRc522
net.answer(ok)
FakePin.log = []
out("run", error_of(main.run, "probe_config.json"))
out("run driver pins", sorted(drivers[0].pins.items()))
out("run request", split_request(net.conns[-1].sent))
out("run pins", FakePin.log[:8])
out("run sleeps", sleeps)

del sys.modules["mfrc522"]
FakePin.log = []
out("run without driver", error_of(main.run, "probe_config.json"))
out("run without driver leds", FakePin.log[3:6])
print("probe done")
'''

REQUEST = (b"POST /lanes/1/taps HTTP/1.0",
           sorted([b"Host: 10.0.0.5:8080", b"Content-Length: 2", b"Connection: close", b"X-A: 1"]), b"{}")
EXPECTED = {
    "uid 4": "'01020304'",
    "uid 7": "'04A1B2C3D4E5F6'",
    "uid 10 bytearray": "'F6F7F8F9FAFBFCFDFEFF'",
    "uid 5": "'ValueError: card UID has 5 bytes; ISO 14443 UIDs have 4, 7 or 10'",
    "uid str": "'ValueError: card UID must be bytes, got str'",
    "ticks_diff": repr([10, -10, 0, P // 2 - 1, -100, -1]),
    "debounce": repr([True, False, False, False, False, False, False, False, False, True, True, True]),
    "debounce wrap": repr([True, False, False, False, False, False, False, True]),
    "debounce bad": "'ValueError: release_ms must be a non-negative integer, got -1'",
    "request": repr(("/lanes/lane-2_B/taps", [("Authorization", "Bearer tok"), ("Content-Type", "application/json")],
                     b'{"source": "nfc", "raw": "04A1B2C3D4E5F6"}')),
    "request no token": repr([("Content-Type", "application/json")]),
    "request bad lane": repr("ValueError: lane '1/../x': only letters, digits, '_' and '-' are allowed"),
    "request long lane": repr("ValueError: lane must be a string of 1-16 characters, got '%s'" % ("x" * 17)),
    "request bad uid": repr("ValueError: uid_hex must be 8, 14 or 20 uppercase hex digits (uid_to_hex output), "
                            "got '04a1'"),
    "request bad token": "'ValueError: token must be a string of printable ASCII without spaces'",
    "patterns": repr(["accept", "deny", "tap_again", "offline", "fault", "fault", "fault", "fault", "fault",
                      "fault", "fault", "fault", "fault"]),
    # tap, held, flaky miss, held, released after 300 ms, tap -> network error, garbled read, released,
    # tap -> 503, reader glitch, another card -> deny
    "steps": repr(["accept", None, None, None, None, None, None, None, "fault", "tap_again", None, None, None,
                   None, "fault", None, "deny"]),
    "shown": repr(["accept", "fault", "tap_again", "fault", "deny"]),
    "sent": repr([b'{"source": "nfc", "raw": "04A1B2C3D4E5F6"}'] * 3 + [b'{"source": "nfc", "raw": "01020304"}']),
    "counters": repr((4, 1, 2, 2)),
    "http ok": repr((200, b'{"pattern": "accept"}')),
    "http request": repr(REQUEST),
    "http socket": repr((("10.0.0.5", 8080), 1.5, True)),
    "http small chunks": repr((200, b'{"pattern": "accept"}')),
    "http kept open": repr((200, b'{"pattern": "accept"}')),
    "http 404 to eof": repr((404, b'{"error": {"code": "unknown_lane"}}')),
    "http empty answer": "'OSError: gateway response has no end of headers (0 bytes received)'",
    "http prefix": repr([b"POST /store/lanes/1/taps HTTP/1.0", b"Host: gw:81"]),
    "http not http": "\"OSError: gateway sent a malformed status line: b'SSH-2.0-OpenSSH'\"",
    "http truncated": "'OSError: gateway closed the connection after 41 of 49 bytes'",
    "http oversized": "'OSError: gateway response is over 16384 bytes'",
    "http timeout closed": "True",
    "http unresolvable": "\"OSError: cannot resolve gateway host 'nowhere'\"",
    "http bad url": "\"ValueError: gateway URL must start with http:// (got 'https://gw')\"",
    "http bad port": "\"ValueError: gateway URL 'http://gw:0': port '0' must be a number from 1 to 65535\"",
    "http bad path": "\"ValueError: path must start with '/', got 'x'\"",
    "http bad header": "\"ValueError: header 'A' contains a line break\"",
    "rc522 no card": "None",
    "rc522 held card": repr(b"\x04\xa1\xb2\xc3\xd4\xe5\xf6"),
    "rc522 failed select": "None",
    "config bad": "'ValueError: config pins.red: expected a GPIO number, got None'",
    "run": "'StopLoop: '",
    "run driver pins": repr([("cs", 5), ("miso", 19), ("mosi", 23), ("rst", 22), ("sck", 18)]),
    "run request": repr((b"POST /lanes/3/taps HTTP/1.0",
                         sorted([b"Host: 10.0.0.5:8080", b"Content-Length: 36", b"Connection: close",
                                 b"Content-Type: application/json", b"Authorization: Bearer tok"]),
                         b'{"source": "nfc", "raw": "01020304"}')),
    # LEDs off at start, then accept: green + buzzer, green alone
    "run pins": repr([(25, 0), (26, 0), (27, 0), (25, 1), (26, 0), (27, 1), (25, 1), (26, 0)]),
    "run sleeps": repr([100, 900, 7, 7, 7]),
    "run without driver": "'RuntimeError: no RC522 driver on the board: copy mfrc522.py from " +
                          "github.com/danjperron/micropython-mfrc522 next to main.py'",
    "run without driver leds": repr([(25, 0), (26, 1), (27, 1)]),  # the fault pattern starts
}


def parse_probe(stdout: str) -> dict:
    return dict(line.split(" = ", 1) for line in stdout.splitlines() if " = " in line)


def run_micropython(script: Path) -> subprocess.CompletedProcess:
    node = shutil.which("node")
    if not node:
        pytest.fail("node is not installed: run `make test` (installs nodejs), then `make micropython`")
    if not (MPY_PACKAGE / "micropython.mjs").exists():
        pytest.fail(f"the MicroPython interpreter is not installed in {MPY_PACKAGE}: "
                    "run `make micropython` (`make test` does it)")
    out = subprocess.run([node, str(RUNNER), str(script)], capture_output=True, text=True, timeout=60)
    if out.returncode == 2:
        pytest.fail(f"the MicroPython runner could not start: {out.stderr.strip()}")
    return out


@pytest.fixture
def probe(tmp_path) -> Path:
    path = tmp_path / "probe.py"
    path.write_text(PROBE)
    return path


def check_probe_output(out: subprocess.CompletedProcess, impl: str) -> None:
    assert out.returncode == 0, f"probe failed under {impl}:\n{out.stdout}\n{out.stderr}"
    results = parse_probe(out.stdout)
    assert results.pop("impl") == repr(impl)
    assert results.pop("http timeout").startswith("'OSError: ")  # the errno text differs by interpreter
    assert results == EXPECTED
    assert out.stdout.rstrip().endswith("probe done")


def test_probe_under_real_micropython(probe):
    started = time.monotonic()
    out = run_micropython(probe)
    check_probe_output(out, "micropython")
    assert "native ticks_diff agrees" in out.stdout  # lr.ticks_diff == MicroPython's time.ticks_diff
    assert time.monotonic() - started < 30


def test_probe_under_cpython_gives_the_same_results(probe, tmp_path):
    out = subprocess.run([sys.executable, str(probe)], capture_output=True, text=True, timeout=60, cwd=tmp_path,
                         env={"PYTHONPATH": str(FIRMWARE), "PATH": "/usr/bin:/bin"})
    check_probe_output(out, "cpython")


def test_every_firmware_file_compiles_under_micropython(tmp_path):
    names = sorted(p.name for p in FIRMWARE.glob("*.py") if p.name != "__init__.py")
    assert {"lane_reader.py", "http_client.py", "main.py"} <= set(names)
    script = tmp_path / "compile_all.py"
    script.write_text(
        "for name in %r:\n"
        "    with open('/lib/' + name) as f:\n"
        "        compile(f.read(), name, 'exec')\n"
        "    print('compiled', name)\n" % names)
    out = run_micropython(script)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.split("\n")[:-1] == [f"compiled {n}" for n in names]


def test_a_missing_interpreter_fails_and_says_how_to_install_it(monkeypatch, tmp_path):
    monkeypatch.setattr(sys.modules[__name__], "MPY_PACKAGE", tmp_path / "not-installed")
    with pytest.raises(pytest.fail.Exception, match="run `make micropython`"):
        run_micropython(tmp_path / "probe.py")


def test_the_runner_fails_when_the_script_raises(tmp_path):
    script = tmp_path / "bad.py"
    script.write_text("import lane_reader\n\nassert lane_reader.uid_to_hex(b'\\x01\\x02\\x03\\x04') == 'nope'\n")
    out = run_micropython(script)
    assert out.returncode == 1
    assert 'File "/tests/bad.py", line 3' in out.stderr and "AssertionError" in out.stderr


# --- http_client against a real HTTP server (CPython) ------------------------

class _Handler(http.server.BaseHTTPRequestHandler):
    received = []

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.received.append((self.path, dict(self.headers), body))
        if self.path == "/slow":
            time.sleep(1.5)
        status = {"/ok": 200, "/lanes/9/taps": 404}.get(self.path, 500)
        payload = (b'{"echo": ' + body + b"}" if status == 200
                   else b'{"error": {"code": "unknown_lane", "message": "unknown lane \'9\'"}}')
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (the timeout test)

    def log_message(self, *args):
        pass


@pytest.fixture
def http_server():
    _Handler.received = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_http_post_success(http_server):
    status, body = http_client.http_post(http_server, "/ok", {"Content-Type": "application/json",
                                                              "Authorization": "Bearer t"}, b'{"a":1}')
    assert (status, body) == (200, b'{"echo": {"a":1}}')
    path, headers, sent = _Handler.received[0]
    assert (path, sent, headers["Authorization"], headers["Content-Type"]) == ("/ok", b'{"a":1}', "Bearer t",
                                                                               "application/json")


def test_http_post_4xx_comes_back_with_its_body(http_server):
    status, body = http_client.http_post(http_server, "/lanes/9/taps", {}, b"{}")
    assert status == 404
    assert json.loads(body)["error"]["code"] == "unknown_lane"
    assert lr.pattern_for_response(status, body) == "fault"


def test_http_post_connection_refused_is_oserror():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]  # bound, never listening: refused
    with pytest.raises(OSError):
        http_client.http_post(f"http://127.0.0.1:{closed_port}", "/ok", {}, b"1")


def test_http_post_timeout_is_oserror(http_server):
    started = time.monotonic()
    with pytest.raises(OSError):
        http_client.http_post(http_server, "/slow", {}, b"1", timeout_s=0.3)
    assert time.monotonic() - started < 1.2


def test_http_post_unresolvable_host_is_oserror():
    with pytest.raises(OSError):
        http_client.http_post("http://no-such-host.invalid", "/ok", {}, b"1", timeout_s=2)


# --- the loop against a real gateway process (CPython) ------------------------

def test_lane_reader_against_a_real_gateway(tmp_path, broker):
    """The firmware's loop with a fake NFC front end, posting to a gateway process."""
    hq = HQ(tmp_path, broker.port).start()
    assert hq.publish_rules().returncode == 0
    gw = GatewayProc(tmp_path, broker.port).start()
    try:
        wait_until(lambda: gw.status()["rules_version"] == 1, what="rules applied")
        base = f"http://127.0.0.1:{gw.api_port}"
        reads = [bytes.fromhex(GOLD_UID), None, None, None, None, bytes.fromhex("04FFFFFFFFFFFF")]
        leds = FakeLeds()
        ticks = iter(range(0, 10_000, 100))
        reader = lr.LaneReader("1", FakeNfc(reads), lambda p, h, b: http_client.http_post(base, p, h, b), leds,
                               lambda: next(ticks), token=gw.tokens["lane_terminal"])
        for _ in range(6):
            reader.step()
        assert leds.shown == ["accept", "deny"]
        assert gw.status()["lanes"]["1"]["taps"] == 2        # held card: one tap; the second card: one
        assert gw.call("GET", "/lanes/1/member")[1]["member"] is None  # the refused card ended the member's visit
        status, body = http_client.http_post(base, "/lanes/9/taps", {"Content-Type": "application/json",
                                                                     "Authorization": f"Bearer {gw.tokens['lane_terminal']}"},
                                             b'{"source": "nfc", "raw": "01020304"}')
        assert status == 404 and json.loads(body)["error"]["code"] == "unknown_lane"
    finally:
        gw.stop()
        hq.stop()
