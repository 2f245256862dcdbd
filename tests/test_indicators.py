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
