"""Counter indicators on gpiozero's MockFactory: assert the pins' state history."""

import time

import pytest
from gpiozero.pins.mock import MockFactory

from hardware.indicators import GpioIndicator, Pattern, SimulatedIndicator


@pytest.fixture
def rig():
    factory = MockFactory()
    ind = GpioIndicator(green=17, red=27, buzzer=22, status=23, pin_factory=factory)
    pins = {name: factory.pin(n) for name, n in (("green", 17), ("red", 27), ("buzzer", 22), ("status", 23))}
    for pin in pins.values():
        pin.clear_states()
    yield ind, pins
    ind.close()
    factory.reset()


def values(pin):
    return [s.state for s in pin.states]


def wait_states(pin, expected, timeout=5.0):
    deadline = time.monotonic() + timeout
    while values(pin) != expected:
        if time.monotonic() > deadline:
            raise AssertionError(f"pin states {values(pin)} != {expected}")
        time.sleep(0.01)


def test_accept_is_green_and_one_beep(rig):
    ind, pins = rig
    ind.show(Pattern.ACCEPT)
    wait_states(pins["green"], [False, True, False], timeout=3)
    wait_states(pins["buzzer"], [False, True, False])
    on_time = pins["green"].states[2].timestamp
    assert 0.8 <= on_time <= 2.0, on_time                     # about 1 s
    assert pins["buzzer"].states[2].timestamp < 0.6            # a short beep
    assert True not in values(pins["red"])


def test_deny_blinks_red_three_times_with_the_buzzer(rig):
    ind, pins = rig
    ind.show("deny")
    wait_states(pins["red"], [False] + [True, False] * 3)
    wait_states(pins["buzzer"], [False] + [True, False] * 3)
    assert True not in values(pins["green"])


def test_new_tap_cuts_the_previous_pattern_short(rig):
    ind, pins = rig
    ind.show("deny")
    time.sleep(0.05)
    ind.show("accept")
    time.sleep(1.5)
    red = values(pins["red"])
    assert red.count(True) == 1 and red[-1] is False           # the deny blink stopped at once
    assert values(pins["green"]) == [False, True, False]


def test_status_patterns_only_touch_the_status_led(rig):
    ind, pins = rig
    ind.show("offline")
    time.sleep(0.2)
    assert pins["status"].state is True                         # blinking: on first
    ind.show("online")
    time.sleep(0.6)
    assert pins["status"].state is True and values(pins["status"])[-1] is True
    ind.show("fault")
    time.sleep(0.5)
    assert values(pins["status"]).count(True) >= 3              # fast blink
    for lane_pin in ("green", "red", "buzzer"):
        assert True not in values(pins[lane_pin])


def test_show_does_not_block(rig):
    ind, _pins = rig
    started = time.monotonic()
    for p in ("accept", "deny", "tap_again", "offline"):
        ind.show(p)
    assert time.monotonic() - started < 0.5


def test_unknown_pattern_is_refused_and_changes_nothing(rig):
    ind, pins = rig
    with pytest.raises(ValueError, match="unknown indicator pattern 'party'.*accept"):
        ind.show("party")
    assert all(values(p) in ([], [False]) for p in pins.values())
    assert ind.history == []


def test_close_turns_everything_off_and_refuses_more(rig):
    ind, pins = rig
    ind.show("accept")
    ind.show("offline")
    ind.close()
    assert all(p.state is False for p in pins.values())
    with pytest.raises(RuntimeError, match="closed"):
        ind.show("accept")


def test_without_buzzer_or_status():
    factory = MockFactory()
    with GpioIndicator(green=5, red=6, pin_factory=factory) as ind:
        ind.show("deny")
        ind.show("offline")
        assert ind.history == [Pattern.DENY, Pattern.OFFLINE]


def test_simulated_twin_records_history():
    ind = SimulatedIndicator()
    ind.show("accept")
    ind.show(Pattern.OFFLINE)
    assert ind.history == [Pattern.ACCEPT, Pattern.OFFLINE]


# -- timings, every pattern, cut short, fault over the link state -----------------
TOL = 0.15  # a shared 2-core machine: gpiozero's blink thread may wake late


def durations(pin):
    """Seconds each state change came after the previous one (MockPin timestamps are deltas)."""
    return [s.timestamp for s in pin.states[2:]]


def near(value, target, tol=TOL):
    return target - 0.05 <= value <= target + tol


def test_deny_timings(rig):
    ind, pins = rig
    ind.show("deny")
    wait_states(pins["red"], [False] + [True, False] * 3)
    assert all(near(d, 0.2) for d in durations(pins["red"])), durations(pins["red"])


def test_tap_again_blinks_both_leds_twice_with_two_short_beeps(rig):
    ind, pins = rig
    ind.show("tap_again")
    for led in ("green", "red"):
        wait_states(pins[led], [False] + [True, False] * 2)
        on1, off1, on2 = durations(pins[led])[:3]
        assert near(on1, 0.3) and near(off1, 0.2) and near(on2, 0.3), durations(pins[led])
    wait_states(pins["buzzer"], [False] + [True, False] * 2)
    beep, gap, beep2 = durations(pins["buzzer"])[:3]
    assert beep < 0.05 + TOL and near(gap, 0.45) and beep2 < 0.05 + TOL


def test_accept_cut_short_by_deny(rig):
    ind, pins = rig
    ind.show("accept")
    time.sleep(0.3)
    ind.show("deny")
    wait_states(pins["red"], [False] + [True, False] * 3)
    green = pins["green"].states
    assert values(pins["green"]) == [False, True, False]
    assert green[2].timestamp < 0.3 + TOL                        # green went off at the deny, not after 1 s
    # The accept beep, then deny's three (the buzzer may end a moment after the red LED).
    wait_states(pins["buzzer"], [False] + [True, False] * 4)


def test_tap_again_cut_short_by_accept(rig):
    ind, pins = rig
    ind.show("tap_again")
    time.sleep(0.1)
    ind.show("accept")
    time.sleep(1.3)
    assert values(pins["red"]) == [False, True, False]           # one blink begun, then stopped
    assert values(pins["green"])[-1] is False and values(pins["green"]).count(True) == 2  # tap_again's, then accept's
    assert pins["red"].states[2].timestamp < 0.1 + TOL


def test_offline_blinks_the_status_led_slowly(rig):
    ind, pins = rig
    ind.show("offline")
    wait_states(pins["status"], [False, True, False, True], timeout=5)
    on, off = durations(pins["status"])[:2]
    assert near(on, 0.5) and near(off, 1.5), durations(pins["status"])


def test_fault_outranks_the_link_state_until_cleared(rig):
    ind, pins = rig
    ind.show("offline")
    ind.show("fault")
    assert ind.fault
    ind.show("online")                                          # HQ is back; the fault still shows
    time.sleep(0.6)
    assert values(pins["status"]).count(True) >= 3              # fast blink, not steady
    fast = durations(pins["status"])[-4:]
    assert all(near(d, 0.1) for d in fast), fast
    ind.clear_fault()
    assert not ind.fault and ind.link.value == "online"
    time.sleep(0.3)
    assert pins["status"].state is True
    settled = len(pins["status"].states)
    time.sleep(0.5)
    assert len(pins["status"].states) == settled                # steady on: online
    for lane_pin in ("green", "red", "buzzer"):
        assert True not in values(pins[lane_pin])


def test_cleared_fault_goes_back_to_offline(rig):
    ind, pins = rig
    ind.show("fault")
    ind.show("offline")
    time.sleep(0.3)
    ind.clear_fault()
    pins["status"].clear_states()
    time.sleep(2.2)
    on_off = values(pins["status"])
    assert on_off[:3] in ([True, False, True], [False, True, False]), on_off  # slow: ~2 changes in 2 s
    assert len(on_off) <= 4


def test_clear_fault_without_a_fault_changes_nothing(rig):
    ind, pins = rig
    ind.show("online")
    time.sleep(0.1)
    before = values(pins["status"])
    ind.clear_fault()
    time.sleep(0.2)
    assert values(pins["status"]) == before


def test_taps_keep_working_during_a_fault(rig):
    ind, pins = rig
    ind.show("fault")
    ind.show("accept")
    wait_states(pins["green"], [False, True, False], timeout=3)
    assert ind.fault


def test_fault_and_clear_without_a_status_led():
    with GpioIndicator(green=5, red=6, pin_factory=MockFactory()) as ind:
        ind.show("fault")
        ind.clear_fault()
        assert not ind.fault


def test_simulated_twin_tracks_fault_and_link():
    ind = SimulatedIndicator()
    ind.show("online")
    ind.show("fault")
    ind.show("offline")
    assert ind.fault and ind.link is Pattern.OFFLINE
    ind.clear_fault()
    assert not ind.fault
    assert ind.history == [Pattern.ONLINE, Pattern.FAULT, Pattern.OFFLINE]


# -- the pin backend: lgpio on every Pi (hardware/indicators.py ``pin_backend``) --

@pytest.fixture
def no_backend(monkeypatch):
    """A process that has chosen no pin factory yet, and no GPIOZERO_PIN_FACTORY."""
    from gpiozero import Device

    monkeypatch.delenv("GPIOZERO_PIN_FACTORY", raising=False)
    saved = Device.pin_factory
    Device.pin_factory = None
    yield Device
    if Device.pin_factory is not None and Device.pin_factory is not saved:
        Device.pin_factory.close()
    Device.pin_factory = saved


def test_without_lgpio_real_pins_say_what_to_install(no_backend, monkeypatch):
    import sys

    from hardware.indicators import GpioUnavailable

    monkeypatch.setitem(sys.modules, "lgpio", None)      # not installed (as on this CI machine, x86-64)
    with pytest.raises(GpioUnavailable, match="lgpio") as err:
        GpioIndicator(green=17, red=27)
    assert "python3-lgpio" in str(err.value) and "Raspberry Pi 5" in str(err.value)
    assert no_backend.pin_factory is None                # no silent fall-back to RPi.GPIO or native


def test_lgpio_that_cannot_open_the_gpio_chip_names_the_device(no_backend, monkeypatch):
    import sys
    import types

    from hardware.indicators import GpioUnavailable

    opened = []
    fake = types.ModuleType("lgpio")
    fake.__getattr__ = lambda name: 0                    # the library's constants

    def gpiochip_open(chip):
        opened.append(chip)
        raise OSError(13, "Permission denied", f"/dev/gpiochip{chip}")

    fake.gpiochip_open = gpiochip_open
    monkeypatch.setitem(sys.modules, "lgpio", fake)
    monkeypatch.delitem(sys.modules, "gpiozero.pins.lgpio", raising=False)
    from gpiozero.pins.lgpio import LGPIOFactory

    monkeypatch.setattr(LGPIOFactory, "_get_revision", lambda self: 0xC04170)   # a Raspberry Pi 5 4GB
    with pytest.raises(GpioUnavailable, match="Permission denied.*/dev/gpiochip"):
        GpioIndicator(green=17, red=27)
    assert opened == [0]        # this machine has no /dev/gpiochip4: gpiozero opens chip 0 (newer Pi 5 kernels)
    monkeypatch.delitem(sys.modules, "gpiozero.pins.lgpio")


def test_a_factory_chosen_for_the_process_or_in_the_environment_is_kept(no_backend, monkeypatch):
    no_backend.pin_factory = MockFactory()              # how tests and tools select one once
    with GpioIndicator(green=17, red=27, buzzer=22) as ind:
        ind.show("accept")
        assert ind.green.pin_factory is no_backend.pin_factory
    no_backend.pin_factory.close()
    no_backend.pin_factory = None
    monkeypatch.setenv("GPIOZERO_PIN_FACTORY", "mock")  # an operator's explicit choice: gpiozero's own
    with GpioIndicator(green=17, red=27) as ind:
        assert type(ind.green.pin_factory).__name__ == "MockFactory"


# The wiring in deploy/HARDWARE.md (BCM -> header pin), checked against gpiozero's board data
# for a Raspberry Pi 5 (BCM2712) and a Pi 4 B (BCM2711): the same header, the same places.
HARDWARE_MD_PINS = {17: 11, 27: 13, 22: 15, 23: 16, 5: 29, 6: 31, 13: 33, 19: 35}


@pytest.mark.parametrize("revision, soc", [("c04170", "BCM2712"), ("c03111", "BCM2711")])
def test_the_documented_pin_map_matches_the_header_of_each_pi(revision, soc):
    factory = MockFactory(revision=revision)
    try:
        assert factory.board_info.soc == soc
        for bcm, header_pin in HARDWARE_MD_PINS.items():
            [(header, pin)] = factory.board_info.find_pin(f"GPIO{bcm}")
            assert (header.name, pin.number) == ("J8", header_pin)
        with GpioIndicator(green=17, red=27, buzzer=22, status=23, pin_factory=factory) as ind:
            ind.show("online")
            assert factory.pin(23).state                 # the status LED of this board's pin 16
    finally:
        factory.close()
