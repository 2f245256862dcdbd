# Checks of the lane-reader logic, run both under CPython and under the real
# MicroPython interpreter (so only MicroPython-compatible Python here).
import sys

import lane_reader as lr

print("impl", sys.implementation.name)


def raises(fn, *args):
    try:
        fn(*args)
    except ValueError as exc:
        return str(exc)
    raise AssertionError("no ValueError from %r" % (args,))


assert lr.uid_to_hex(b"\x04\xa1\xb2\xc3\xd4\xe5\xf6") == "04A1B2C3D4E5F6"
assert lr.uid_to_hex(bytearray(b"\x01\x02\x03\x04")) == "01020304"
assert "5 bytes" in raises(lr.uid_to_hex, b"\x01\x02\x03\x04\x05")
assert "bytes" in raises(lr.uid_to_hex, "04A1")

# ticks wrap-around
assert lr.ticks_diff(5, lr.TICKS_PERIOD - 5) == 10
assert lr.ticks_diff(lr.TICKS_PERIOD - 5, 5) == -10

d = lr.TapDebouncer(release_ms=300)
assert d.seen("AA", 0) is True
assert d.seen("AA", 50) is False          # held on the reader: one tap
assert d.seen(None, 100) is False
assert d.seen("AA", 150) is False         # lifted only 50 ms: still the same tap
assert d.seen(None, 200) is False
assert d.seen(None, 460) is False         # 310 ms without the card: released
assert d.seen("AA", 470) is True          # a new tap of the same card
assert d.seen("BB", 480) is True          # another card
near_wrap = lr.TICKS_PERIOD - 100
d2 = lr.TapDebouncer(release_ms=300)
assert d2.seen("CC", near_wrap) is True
assert d2.seen(None, 50) is False         # only 150 ms later across the wrap
assert d2.seen("CC", 60) is False
assert d2.seen(None, 400) is False        # 340 ms after the last sighting
assert d2.seen("CC", 410) is True

path, headers, body = lr.build_tap_request("1", "04A1B2C3D4E5F6", token="t0k3n")
assert path == "/lanes/1/taps"
assert headers["Authorization"] == "Bearer t0k3n"
assert b'"raw": "04A1B2C3D4E5F6"' in body or b'"raw":"04A1B2C3D4E5F6"' in body
assert "only letters" in raises(lr.build_tap_request, "1/../x", "AA")
assert "1-16" in raises(lr.build_tap_request, "", "AA")

assert lr.pattern_for_response(200, b'{"pattern": "accept"}') == "accept"
assert lr.pattern_for_response(200, b'{"pattern": "deny"}') == "deny"
assert lr.pattern_for_response(200, b'{"pattern": "disco"}') == "fault"
assert lr.pattern_for_response(200, b"<html>") == "fault"
assert lr.pattern_for_response(404, b'{"pattern": "accept"}') == "fault"


class Nfc:
    def __init__(self, reads):
        self.reads = list(reads)

    def poll(self):
        return self.reads.pop(0) if self.reads else None


class Leds:
    def __init__(self):
        self.shown = []

    def show(self, p):
        self.shown.append(p)


class Clock:
    def __init__(self):
        self.t = 0

    def __call__(self):
        self.t += 100
        return self.t


sent = []


def post(path, headers, body):
    sent.append(body)
    if len(sent) == 2:
        raise OSError("gateway unreachable")
    return 200, b'{"verdict": "accept", "pattern": "accept"}'


uid = b"\x04\xa1\xb2\xc3\xd4\xe5\xf6"
leds = Leds()
reader = lr.LaneReader("1", Nfc([uid, uid, None, None, None, None, uid, b"\x01\x02", uid]), post, leds, Clock())
results = [reader.step() for _ in range(9)]
# tap, held, lifted x4 (400 ms: released), tap again -> network error, bad read, held after bad read
assert results == ["accept", None, None, None, None, None, "fault", "tap_again", None], results
assert leds.shown == ["accept", "fault", "tap_again"]
assert (reader.taps, reader.network_errors, reader.bad_reads) == (2, 1, 1)
print("firmware checks ok")
