# Board entry point for an ESP32-class lane terminal running MicroPython.
#
# config.json on the board:
#   {"gateway": "http://192.168.1.10:8080", "lane": "1", "token": null,
#    "pins": {"green": 25, "red": 26, "buzzer": 27}}
#
# The NFC front end (PN532 or RC522 over SPI/I2C) needs its MicroPython
# driver copied to the board as nfc_driver.py exposing read_uid() -> bytes or
# None. Without it the terminal refuses to start with a clear message.

import time

from http_client import http_post
from lane_reader import LaneReader

try:
    import json
except ImportError:
    import ujson as json


class DriverReader:
    """Adapter from the board's NFC driver module to LaneReader's nfc.poll()."""

    def __init__(self):
        try:
            import nfc_driver
        except ImportError:
            raise RuntimeError("no NFC driver: copy a PN532/RC522 driver to the board as nfc_driver.py "
                               "with read_uid() -> bytes or None")
        self.driver = nfc_driver

    def poll(self):
        return self.driver.read_uid()


class PinLeds:
    """Lane LEDs and buzzer on machine.Pin; patterns played synchronously
    (the terminal has nothing else to do while showing one)."""

    STEPS = {  # (green, red, buzzer, ms) steps
        "accept": ((1, 0, 1, 100), (1, 0, 0, 900)),
        "deny": ((0, 1, 1, 200), (0, 0, 0, 200)) * 3,
        "tap_again": ((1, 1, 1, 50), (1, 1, 0, 250), (0, 0, 0, 200)) * 2,
        "offline": ((0, 1, 0, 100),),
        "fault": ((0, 1, 0, 50), (0, 0, 0, 50)) * 5,
    }

    def __init__(self, pins):
        from machine import Pin
        self.green = Pin(pins["green"], Pin.OUT)
        self.red = Pin(pins["red"], Pin.OUT)
        self.buzzer = Pin(pins["buzzer"], Pin.OUT) if pins.get("buzzer") is not None else None

    def show(self, pattern):
        for g, r, b, ms in self.STEPS.get(pattern, self.STEPS["fault"]):
            self.green.value(g)
            self.red.value(r)
            if self.buzzer:
                self.buzzer.value(b)
            time.sleep_ms(ms)
        self.green.value(0)
        self.red.value(0)
        if self.buzzer:
            self.buzzer.value(0)


def run(config_path="config.json"):
    with open(config_path) as f:
        config = json.load(f)
    base = config["gateway"]

    def post(path, headers, body):
        return http_post(base, path, headers, body, config.get("timeout_s", 2.0))

    reader = LaneReader(config["lane"], DriverReader(), post, PinLeds(config["pins"]),
                        time.ticks_ms, token=config.get("token"))
    while True:
        reader.step()
        time.sleep_ms(50)


if __name__ == "__main__":
    run()
