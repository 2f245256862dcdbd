# storegate lane reader: the tap terminal at a checkout lane.
#
# Portable logic, run unchanged by MicroPython (ESP32-class boards) and by
# CPython (the tests): plain classes, no dataclasses/typing, and time is
# always an argument, so every function here is deterministic. The board
# entry point is main.py; the HTTP client is http_client.py.
#
# Protocol with the gateway: POST /lanes/<lane>/taps with
# {"source": "nfc", "raw": "<UID hex>"}; the 200 answer's "pattern" is shown
# on the lane's LEDs. A network error or any unusable answer shows "fault".

try:
    import json
except ImportError:  # pragma: no cover - MicroPython builds that only ship ujson
    import ujson as json

PATTERNS = ("accept", "deny", "tap_again", "offline", "fault")
UID_LENGTHS = (4, 7, 10)  # ISO/IEC 14443-3 single, double and triple size UIDs
LANE_MAX_LEN = 16  # the gateway's lane ids are ^[A-Za-z0-9_-]{1,16}$
_LANE_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-"
_HEX_DIGITS = "0123456789ABCDEF"

# MicroPython's time.ticks_ms() counts modulo 2**30 (TICKS_PERIOD), so it
# wraps about every 12.4 days; an uptime longer than that must not freeze
# the debouncer.
TICKS_PERIOD = 1 << 30


def ticks_diff(a, b):
    """a - b for tick values that wrap at TICKS_PERIOD, like MicroPython's
    time.ticks_diff: the signed distance, correct as long as the real
    interval is under TICKS_PERIOD / 2 (about 6 days)."""
    half = TICKS_PERIOD // 2
    return ((a - b + half) % TICKS_PERIOD) - half


def uid_to_hex(uid_bytes):
    """Card UID bytes from the reader -> uppercase hex, as the gateway expects."""
    if not isinstance(uid_bytes, (bytes, bytearray)):
        raise ValueError("card UID must be bytes, got " + type(uid_bytes).__name__)
    if len(uid_bytes) not in UID_LENGTHS:
        raise ValueError("card UID has %d bytes; ISO 14443 UIDs have 4, 7 or 10" % len(uid_bytes))
    return "".join("%02X" % b for b in uid_bytes)


class TapDebouncer:
    """Turns a stream of poll results into taps.

    A card held on the reader is one tap. The same card counts again only
    after it has been absent for at least release_ms, measured from the
    first poll that missed it: a single flaky read while the card is still
    held does not make a second tap. A different card is a new tap at once.
    """

    def __init__(self, release_ms=300):
        if not isinstance(release_ms, int) or release_ms < 0:
            raise ValueError("release_ms must be a non-negative integer, got %r" % (release_ms,))
        self.release_ms = release_ms
        self.current = None       # UID of the card taken as on the reader
        self.absent_since = None  # ticks of the first poll that missed it

    def seen(self, uid_hex, now_ms):
        """Feed one poll result (UID hex or None) at now_ms ticks; True
        exactly when a new tap should be sent."""
        if uid_hex is None:
            if self.current is not None:
                if self.absent_since is None:
                    self.absent_since = now_ms
                if ticks_diff(now_ms, self.absent_since) >= self.release_ms:
                    self.current = None
                    self.absent_since = None
            return False
        self.absent_since = None
        if uid_hex == self.current:
            return False
        self.current = uid_hex
        return True


def check_lane(lane):
    """The lane id, if it is one the gateway can have; ValueError otherwise."""
    if not isinstance(lane, str) or not 1 <= len(lane) <= LANE_MAX_LEN:
        raise ValueError("lane must be a string of 1-%d characters, got %r" % (LANE_MAX_LEN, lane))
    for ch in lane:
        if ch not in _LANE_CHARS:
            raise ValueError("lane %r: only letters, digits, '_' and '-' are allowed" % lane)
    return lane


def _check_uid_hex(uid_hex):
    if (not isinstance(uid_hex, str) or len(uid_hex) not in (8, 14, 20)
            or any(ch not in _HEX_DIGITS for ch in uid_hex)):
        raise ValueError("uid_hex must be 8, 14 or 20 uppercase hex digits (uid_to_hex output), got %r"
                         % (uid_hex,))


def check_token(token):
    """The terminal token, if it can go into a Bearer header line (a space,
    CR or LF would break the request); ValueError otherwise."""
    if not isinstance(token, str) or any(not "!" <= ch <= "~" for ch in token):
        raise ValueError("token must be a string of printable ASCII without spaces")
    return token


def build_tap_request(lane, uid_hex, token=None):
    """(path, headers, body bytes) of the tap request to the gateway.
    An empty or None token sends no Authorization header."""
    path = "/lanes/" + check_lane(lane) + "/taps"
    _check_uid_hex(uid_hex)
    headers = {"Content-Type": "application/json"}
    if token:
        check_token(token)
        headers["Authorization"] = "Bearer " + token
    # Written out rather than json.dumps'd so the bytes are identical on
    # MicroPython and CPython (key order and separators); uid_hex is
    # validated hex, so nothing needs escaping.
    body = ('{"source": "nfc", "raw": "%s"}' % uid_hex).encode()
    return path, headers, body


def pattern_for_response(status_code, body_bytes):
    """The pattern to show for the gateway's answer: its "pattern" when the
    answer is a 200 JSON verdict with a known pattern, else "fault"."""
    if status_code != 200:
        return "fault"
    try:
        answer = json.loads(body_bytes)
    except (ValueError, TypeError):  # not JSON (CPython's UnicodeDecodeError is a ValueError)
        return "fault"
    pattern = answer.get("pattern") if isinstance(answer, dict) else None
    return pattern if pattern in PATTERNS else "fault"


class LaneReader:
    """One step of the lane terminal's loop: poll, debounce, ask, show.

    nfc.poll() -> UID bytes or None; post(path, headers, body) -> (status,
    body bytes), raising OSError on network errors; leds.show(pattern);
    clock_ms() -> ticks (time.ticks_ms on the board).

    step() never raises for a reader or gateway problem: the lane must keep
    working after a glitch. Diagnostics: taps (requests sent), bad_reads
    (UIDs of a wrong length), errors (exceptions from the reader or the
    network), faults ("fault" shown), last_error (text of the latest error).
    """

    def __init__(self, lane, nfc, post, leds, clock_ms, token=None, release_ms=300):
        check_lane(lane)
        if token:
            check_token(token)
        self.lane = lane
        self.nfc = nfc
        self.post = post
        self.leds = leds
        self.clock_ms = clock_ms
        self.token = token
        self.debouncer = TapDebouncer(release_ms)
        self.taps = 0
        self.bad_reads = 0
        self.errors = 0
        self.faults = 0
        self.last_error = None

    def _error(self, where, exc):
        self.errors += 1
        self.last_error = "%s: %s: %s" % (where, type(exc).__name__, exc)

    def step(self):
        """Poll once; returns the pattern shown, or None when nothing was."""
        try:
            uid = self.nfc.poll()
        except Exception as exc:  # e.g. an SPI glitch; the next poll may work
            self._error("reader", exc)
            return None
        now = self.clock_ms()
        if uid is None:
            self.debouncer.seen(None, now)
            return None
        try:
            uid_hex = uid_to_hex(uid)
        except ValueError:
            # A garbled read (e.g. card pulled away mid-anticollision). It
            # says nothing about which card is there, so the debouncer is
            # not fed.
            self.bad_reads += 1
            return self._show("tap_again")
        if not self.debouncer.seen(uid_hex, now):
            return None
        self.taps += 1
        path, headers, body = build_tap_request(self.lane, uid_hex, self.token)
        try:
            status, answer = self.post(path, headers, body)
        except Exception as exc:
            # OSError: unreachable, refused, timed out. Anything else is a
            # transport bug, which must not take the lane down either.
            self._error("gateway", exc)
            return self._show("fault")
        return self._show(pattern_for_response(status, answer))

    def _show(self, pattern):
        if pattern == "fault":
            self.faults += 1
        self.leds.show(pattern)
        return pattern
