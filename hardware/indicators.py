"""Counter feedback: green LED, red LED, buzzer per lane, and a status LED.

Used like a gpiozero device::

    with GpioIndicator(green=17, red=27, buzzer=22, status=23) as ind:
        ind.show("accept")        # returns at once; gpiozero blinks in its own thread

A new lane pattern (accept / deny / tap_again) cuts the previous one short.
Status patterns (offline / online / fault) drive only the status LED. A
fault outranks the link state: while it is set, online/offline are only
remembered, and clear_fault() puts the status LED back to the link state.

Patterns (times in seconds):

| pattern   | green              | red                | buzzer                 | status LED       |
|-----------|--------------------|--------------------|------------------------|------------------|
| accept    | on 1.0             |                    | one 0.1 beep           |                  |
| deny      |                    | 3x (0.2 on/0.2 off)| 3x (0.2 on/0.2 off)    |                  |
| tap_again | 2x (0.3 on/0.2 off)| with green         | 2x (0.05 on/0.45 off)  |                  |
| online    |                    |                    |                        | steady on        |
| offline   |                    |                    |                        | 0.5 on / 1.5 off |
| fault     |                    |                    |                        | 0.1 on / 0.1 off |

Wiring (BCM numbers, DEFAULT_PINS): each LED from its GPIO pin through a
330 Ω series resistor to the anode, cathode to GND (~5 mA at 3.3 V). The
active buzzer draws more than a GPIO pin may give (~16 mA): drive it through
an NPN transistor (2N2222, 1 kΩ base resistor from the GPIO pin, buzzer
between 5 V and the collector, emitter to GND, flyback diode across the
buzzer). See deploy/HARDWARE.md.

Pin backend: lgpio on every Pi (``pin_backend``). It drives the header
through the kernel's GPIO character device (/dev/gpiochip*), the one
interface every current Pi has (the Pi 5's BCM2712 puts the header on the
RP1 chip, which RPi.GPIO and gpiozero's register-level native driver do not
know) and the only one the systemd unit lets the gateway open
(``DeviceAllow=char-gpiochip``). gpiozero tries lgpio first anyway; what
this module adds is a clear error instead of a silent fall-back to a driver
that cannot work when lgpio is missing. ``GPIOZERO_PIN_FACTORY`` in the
environment still chooses another backend; tests pass a MockFactory.
"""

from __future__ import annotations

import enum
import os
import threading


class Pattern(str, enum.Enum):
    ACCEPT = "accept"        # card accepted
    DENY = "deny"            # card refused
    TAP_AGAIN = "tap_again"  # read failed, present the card again
    OFFLINE = "offline"      # HQ unreachable (status LED); the counter still works
    ONLINE = "online"        # HQ reachable (status LED steady)
    FAULT = "fault"          # gateway or reader fault (status LED)

    @classmethod
    def of(cls, value: "Pattern | str") -> "Pattern":
        try:
            return cls(value)
        except ValueError:
            allowed = ", ".join(p.value for p in cls)
            raise ValueError(f"unknown indicator pattern {value!r}; expected one of {allowed}") from None


LANE_PATTERNS = {Pattern.ACCEPT, Pattern.DENY, Pattern.TAP_AGAIN}
DEFAULT_PINS = {"green": 17, "red": 27, "buzzer": 22, "status": 23}


class Indicator:
    """Interface: show() is non-blocking; history records every pattern asked for."""

    def __init__(self) -> None:
        self.history: list[Pattern] = []
        self._closed = False
        self.link: Pattern | None = None  # the last online/offline asked for
        self.fault = False                # a fault is showing on the status LED

    def show(self, pattern: Pattern | str) -> None:
        p = Pattern.of(pattern)
        if self._closed:
            raise RuntimeError("indicator is closed")
        if p in (Pattern.ONLINE, Pattern.OFFLINE):
            self.link = p
            if not self.fault:  # a fault outranks the link state
                self._show(p)
        else:
            if p is Pattern.FAULT:
                self.fault = True
            self._show(p)
        self.history.append(p)

    def clear_fault(self) -> None:
        """The fault is over: the status LED shows the link state again."""
        if self._closed or not self.fault:
            return
        self.fault = False
        self._clear_status()
        if self.link is not None:
            self._show(self.link)

    def _show(self, pattern: Pattern) -> None:
        pass

    def _clear_status(self) -> None:
        pass

    def close(self) -> None:
        self._closed = True

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class SimulatedIndicator(Indicator):
    """The simulated twin: no GPIO, only the history."""


class GpioUnavailable(RuntimeError):
    """The GPIO pins cannot be driven on this box; says what to install."""


def pin_backend():
    """The pin factory for real pins: None when one is chosen already
    (``Device.pin_factory`` set, or ``GPIOZERO_PIN_FACTORY`` in the
    environment: gpiozero's own choice), otherwise lgpio's, made the
    default for every device of this process."""
    from gpiozero import Device

    if Device.pin_factory is not None or os.environ.get("GPIOZERO_PIN_FACTORY"):
        return None
    try:
        from gpiozero.pins.lgpio import LGPIOFactory
        import lgpio  # noqa: F401  (gpiozero imports it lazily; a missing one should say so here)
    except ImportError:
        raise GpioUnavailable(
            "indicator = \"gpio\" needs the lgpio library (the pin backend for every Pi, and the only one "
            "for a Raspberry Pi 5): in the venv `pip install lgpio` (wheels for aarch64 and x86_64, the "
            "storegate[gpio] extra), or on Raspberry Pi OS `apt-get install python3-lgpio` (the gateway's venv "
            "sees system packages). deploy/HARDWARE.md, \"Which Pi\".") from None
    try:
        Device.pin_factory = LGPIOFactory()
    except Exception as exc:  # lgpio.error, OSError: no gpiochip, or not allowed to open it
        raise GpioUnavailable(f"cannot open the GPIO chip with lgpio ({exc}): is this a Raspberry Pi, and is the "
                              f"user in the group that owns /dev/gpiochip* (gpio on Raspberry Pi OS)?") from None
    return None


class GpioIndicator(Indicator):
    def __init__(self, *, green, red, buzzer=None, status=None, pin_factory=None, active_high: bool = True) -> None:
        from gpiozero import LED, Buzzer  # imported here: the simulated twin needs no gpiozero

        super().__init__()
        if pin_factory is None:
            pin_factory = pin_backend()   # lgpio, once per process (None: gpiozero's default device factory)
        kw = {"pin_factory": pin_factory, "active_high": active_high}
        self.green = LED(green, **kw)
        self.red = LED(red, **kw)
        self.buzzer = Buzzer(buzzer, **kw) if buzzer is not None else None
        self.status = LED(status, **kw) if status is not None else None
        self._lock = threading.Lock()

    def _lane_devices(self):
        return [d for d in (self.green, self.red, self.buzzer) if d is not None]

    def _show(self, pattern: Pattern) -> None:
        with self._lock:
            if pattern in LANE_PATTERNS:
                for dev in self._lane_devices():
                    dev.off()  # stops a running blink: the new tap cuts the old pattern short
                if pattern is Pattern.ACCEPT:
                    self.green.blink(on_time=1.0, off_time=0, n=1, background=True)
                    self._beep(on=0.1, off=0, n=1)
                elif pattern is Pattern.DENY:
                    self.red.blink(on_time=0.2, off_time=0.2, n=3, background=True)
                    self._beep(on=0.2, off=0.2, n=3)
                else:  # TAP_AGAIN
                    self.green.blink(on_time=0.3, off_time=0.2, n=2, background=True)
                    self.red.blink(on_time=0.3, off_time=0.2, n=2, background=True)
                    self._beep(on=0.05, off=0.45, n=2)
            elif self.status is not None:
                if pattern is Pattern.OFFLINE:
                    self.status.blink(on_time=0.5, off_time=1.5, background=True)
                elif pattern is Pattern.ONLINE:
                    self.status.on()
                else:  # FAULT
                    self.status.blink(on_time=0.1, off_time=0.1, background=True)

    def _clear_status(self) -> None:
        with self._lock:
            if self.status is not None:
                self.status.off()

    def _beep(self, *, on: float, off: float, n: int) -> None:
        if self.buzzer is not None:
            self.buzzer.beep(on_time=on, off_time=off, n=n, background=True)

    def close(self) -> None:
        if self._closed:
            return
        super().close()
        with self._lock:
            for dev in (self.green, self.red, self.buzzer, self.status):
                if dev is not None:
                    dev.off()
                    dev.close()
