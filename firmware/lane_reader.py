# storegate lane reader: the tap terminal at a checkout lane.
#
# Portable logic for MicroPython (ESP32-class boards) and CPython: no
# dataclasses, no typing, time is an argument. The board entry point is
# main.py; the HTTP client is http_client.py.
#
# Protocol with the gateway: POST /lanes/<lane>/taps with
# {"source": "nfc", "raw": "<UID hex>"}; the answer's "pattern" is shown on
# the lane's LEDs. Any network error or unexpected answer shows "fault".

try:
    import json
except ImportError:  # pragma: no cover - very old MicroPython
    import ujson as json

PATTERNS = ("accept", "deny", "tap_again", "offline", "fault")
TICKS_PERIOD = 1 << 30  # MicroPython's ticks_ms() wraps at 2**30 on most ports
UID_LENGTHS = (4, 7, 10)  # ISO/IEC 14443-3 single, double, triple size UIDs
_LANE_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-"


def ticks_diff(a, b):
    """a - b for wrapping millisecond ticks, as time.ticks_diff does."""
    half = TICKS_PERIOD // 2
    return ((a - b + half) % TICKS_PERIOD) - half


def uid_to_hex(uid):
    """UID bytes from the reader -> uppercase hex, as the gateway expects."""
    if not isinstance(uid, (bytes, bytearray)):
        raise ValueError("card UID must be bytes, got " + type(uid).__name__)
    if len(uid) not in UID_LENGTHS:
        raise ValueError("card UID has %d bytes; ISO 14443 UIDs have 4, 7 or 10" % len(uid))
    return "".join("%02X" % b for b in uid)


class TapDebouncer:
    """The same card held on the reader is one tap. It counts again only
    after the reader has seen no card for release_ms."""

    def __init__(self, release_ms=300):
        self.release_ms = release_ms
        self.current = None     # UID on the reader, as far as we know
        self.last_seen = 0      # ticks when it was last seen

    def seen(self, uid_hex, now_ms):
        """Feed one poll result (UID or None); True when a new tap begins."""
        if uid_hex is None:
            if self.current is not None and ticks_diff(now_ms, self.last_seen) >= self.release_ms:
                self.current = None
            return False
        is_new = uid_hex != self.current
        self.current = uid_hex
        self.last_seen = now_ms
        return is_new


def check_lane(lane):
    if not isinstance(lane, str) or not 1 <= len(lane) <= 16:
        raise ValueError("lane must be a string of 1-16 characters")
    for ch in lane:
        if ch not in _LANE_CHARS:
            raise ValueError("lane %r: only letters, digits, '_' and '-' are allowed" % lane)
    return lane


def build_tap_request(lane, uid_hex, token=None):
    """(path, headers, body) of the tap request to the gateway."""
    path = "/lanes/" + check_lane(lane) + "/taps"
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = "Bearer " + token
    body = json.dumps({"source": "nfc", "raw": uid_hex}).encode()
    return path, headers, body


def pattern_for_response(status, body):
    """The pattern to show for the gateway's answer; "fault" when the answer
    is not a usable verdict."""
    if status != 200:
        return "fault"
    try:
        answer = json.loads(body)
    except (ValueError, TypeError):
        return "fault"
    pattern = answer.get("pattern") if isinstance(answer, dict) else None
    return pattern if pattern in PATTERNS else "fault"


class LaneReader:
    """One step of the lane terminal's loop: poll, debounce, ask, show.

    nfc.poll() -> UID bytes or None; post(path, headers, body) -> (status,
    body bytes), may raise OSError; leds.show(pattern); clock_ms() -> ticks.
    """

    def __init__(self, lane, nfc, post, leds, clock_ms, token=None, release_ms=300):
        check_lane(lane)
        self.lane = lane
        self.nfc = nfc
        self.post = post
        self.leds = leds
        self.clock_ms = clock_ms
        self.token = token
        self.debouncer = TapDebouncer(release_ms)
        self.taps = 0
        self.bad_reads = 0
        self.network_errors = 0

    def step(self):
        uid = self.nfc.poll()
        now = self.clock_ms()
        if uid is None:
            self.debouncer.seen(None, now)
            return None
        try:
            uid_hex = uid_to_hex(uid)
        except ValueError:
            self.bad_reads += 1
            self.leds.show("tap_again")
            return "tap_again"
        if not self.debouncer.seen(uid_hex, now):
            return None
        self.taps += 1
        path, headers, body = build_tap_request(self.lane, uid_hex, self.token)
        try:
            status, answer = self.post(path, headers, body)
        except OSError:
            self.network_errors += 1
            pattern = "fault"
        else:
            pattern = pattern_for_response(status, answer)
        self.leds.show(pattern)
        return pattern
