# Board entry point for an ESP32-class lane terminal running MicroPython:
# reads config.json, wires the RC522 reader, the LEDs and the HTTP client
# to LaneReader, and loops. See README.md for wiring and config.json.
#
# Importing this module has no side effects (the loop only starts from
# run()), so CPython tests can import it with fake `machine`/`mfrc522`.

import time

try:
    import json
except ImportError:  # pragma: no cover - MicroPython builds that only ship ujson
    import ujson as json

try:  # on the board the firmware files sit side by side at the top level
    from http_client import http_post, split_url
    from lane_reader import TICKS_PERIOD, LaneReader, check_lane, check_token
except ImportError:  # CPython, imported as the firmware package
    from firmware.http_client import http_post, split_url
    from firmware.lane_reader import TICKS_PERIOD, LaneReader, check_lane, check_token

try:
    from time import sleep_ms, ticks_ms
except ImportError:  # CPython: the same semantics, for running off-board
    def sleep_ms(ms):
        time.sleep(ms / 1000)

    def ticks_ms():
        return int(time.monotonic() * 1000) % TICKS_PERIOD

DEFAULTS = {"token": None, "timeout_s": 2.0, "poll_ms": 50}
REQUIRED = ("gateway", "lane", "pins")
RC522_PINS = ("sck", "mosi", "miso", "cs", "rst")


def _gpio(value, where):
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError("config %s: expected a GPIO number, got %r" % (where, value))
    return value


def check_config(config):
    """config.json's object with defaults filled in; ValueError naming the
    bad field (a typo'd key is an error, not silently ignored)."""
    if not isinstance(config, dict):
        raise ValueError("config: expected a JSON object")
    for key in REQUIRED:
        if key not in config:
            raise ValueError("config: %r is required" % key)
    for key in config:
        if key not in REQUIRED and key not in DEFAULTS:
            raise ValueError("config: unknown key %r (known: %s)" % (key, ", ".join(REQUIRED + tuple(DEFAULTS))))
    merged = dict(DEFAULTS)
    merged.update(config)
    for key, check in (("gateway", split_url), ("lane", check_lane)):
        try:
            check(merged[key])
        except ValueError as exc:
            raise ValueError("config %s: %s" % (key, exc))
    if merged["token"] is not None:
        try:
            check_token(merged["token"])
        except ValueError as exc:
            raise ValueError("config token: %s" % exc)
    timeout_s = merged["timeout_s"]
    if not isinstance(timeout_s, (int, float)) or isinstance(timeout_s, bool) or timeout_s <= 0:
        raise ValueError("config timeout_s: expected seconds > 0, got %r" % (timeout_s,))
    poll_ms = merged["poll_ms"]
    if not isinstance(poll_ms, int) or isinstance(poll_ms, bool) or poll_ms < 0:
        raise ValueError("config poll_ms: expected milliseconds >= 0, got %r" % (poll_ms,))
    pins = merged["pins"]
    if not isinstance(pins, dict):
        raise ValueError("config pins: expected an object")
    _gpio(pins.get("green"), "pins.green")
    _gpio(pins.get("red"), "pins.red")
    if pins.get("buzzer") is not None:
        _gpio(pins["buzzer"], "pins.buzzer")
    rc522 = pins.get("rc522")
    if not isinstance(rc522, dict):
        raise ValueError("config pins.rc522: expected an object with %s" % ", ".join(RC522_PINS))
    for name in RC522_PINS:
        _gpio(rc522.get(name), "pins.rc522." + name)
    return merged


def load_config(path="config.json"):
    try:
        with open(path) as f:
            config = json.load(f)
    except OSError as exc:
        raise ValueError("%s: cannot read it (%s); copy one to the board, see README.md" % (path, exc))
    except ValueError as exc:
        raise ValueError("%s: not valid JSON (%s)" % (path, exc))
    return check_config(config)


class Rc522Reader:
    """LaneReader's nfc (poll() -> UID bytes or None) over an RC522 (NXP
    MFRC522) module on SPI.

    Hardware driver to plug in: mfrc522.py from
    github.com/danjperron/micropython-mfrc522, copied to the board next to
    main.py. Its SelectTagSN() runs every anticollision cascade level, so
    7- and 10-byte UIDs come back whole; the older wendlers/micropython-mfrc522
    returns only the first cascade level (4 bytes) and would send the wrong
    UID for most cards. For a PN532, write a class with the same poll()
    around its driver's passive-target read and use it in run().

    Without the driver module this raises at start-up: the terminal must
    not look alive while it cannot read cards.
    """

    def __init__(self, pins, driver=None):
        if driver is None:
            try:
                from mfrc522 import MFRC522
            except ImportError:
                raise RuntimeError("no RC522 driver on the board: copy mfrc522.py from "
                                   "github.com/danjperron/micropython-mfrc522 next to main.py")
            driver = MFRC522(sck=pins["sck"], mosi=pins["mosi"], miso=pins["miso"], cs=pins["cs"],
                             rst=pins["rst"])
        self.driver = driver

    def poll(self):
        rdr = self.driver
        # A card still selected by the previous poll ignores one REQA and
        # drops back to idle (ISO 14443-3), so ask twice: otherwise a held
        # card would read as present/absent on alternate polls.
        if rdr.request(rdr.REQIDL)[0] != rdr.OK and rdr.request(rdr.REQIDL)[0] != rdr.OK:
            return None
        status, uid = rdr.SelectTagSN()
        # A failed select is usually the card leaving mid-read: report "no
        # card" rather than a bad read, or every lift would flash tap_again.
        return bytes(uid) if status == rdr.OK else None


class PinLeds:
    """The lane's green and red LEDs and optional buzzer on machine.Pin.

    A pattern plays synchronously: the terminal has nothing else to do
    meanwhile, and the debouncer copes with the pause. Lane patterns
    match the gateway's own GPIO indicator (hardware/indicators.py).
    """

    STEPS = {  # (green, red, buzzer, ms) steps
        "accept": ((1, 0, 1, 100), (1, 0, 0, 900)),
        "deny": ((0, 1, 1, 200), (0, 0, 0, 200)) * 3,
        "tap_again": ((1, 1, 1, 50), (1, 1, 0, 250), (0, 0, 0, 200)) * 2,
        "offline": ((0, 1, 0, 500), (0, 0, 0, 500)) * 2,  # slow red, like the gateway's status LED
        "fault": ((0, 1, 1, 50), (0, 0, 0, 50)) + ((0, 1, 0, 50), (0, 0, 0, 50)) * 9,  # fast red
    }

    def __init__(self, pins):
        from machine import Pin  # here, not at the top: CPython tests import this module
        self.green = Pin(pins["green"], Pin.OUT)
        self.red = Pin(pins["red"], Pin.OUT)
        self.buzzer = Pin(pins["buzzer"], Pin.OUT) if pins.get("buzzer") is not None else None
        self._set(0, 0, 0)

    def _set(self, green, red, buzzer):
        self.green.value(green)
        self.red.value(red)
        if self.buzzer is not None:
            self.buzzer.value(buzzer)

    def show(self, pattern):
        for green, red, buzzer, ms in self.STEPS.get(pattern, self.STEPS["fault"]):
            self._set(green, red, buzzer)
            sleep_ms(ms)
        self._set(0, 0, 0)


def run(config_path="config.json"):
    """The terminal's main loop; never returns."""
    config = load_config(config_path)
    leds = PinLeds(config["pins"])
    try:
        nfc = Rc522Reader(config["pins"]["rc522"])
    except Exception:
        leds.show("fault")  # visible at the lane, not only on a serial console
        raise
    gateway, timeout_s = config["gateway"], config["timeout_s"]

    def post(path, headers, body):
        return http_post(gateway, path, headers, body, timeout_s)

    reader = LaneReader(config["lane"], nfc, post, leds, ticks_ms, token=config["token"])
    while True:
        reader.step()
        sleep_ms(config["poll_ms"])


if __name__ == "__main__":
    run()
