"""The gateway's clock, checked against what it knows (gateway/core/clock.py,
gateway/store/clock_mark.py, gateway/shell/clock_watch.py).

A Raspberry Pi has no clock battery. The store in these tests got its rule
set from HQ nine days ago (max_age_s is a week: the rules are stale), lost
power, and came back offline with the clock at whatever the board says.
"""

from __future__ import annotations

from datetime import datetime
from zoneinfo import ZoneInfo

import pytest

from gateway.core import clock
from gateway.shell.service import Gateway
from gateway.store.clock_mark import ClockMark
from hardware.readers import CardRead
from tests.test_counter import DIAMOND, basket, config, install, tap

DAY = 86400
T0 = datetime(2026, 11, 25, 15, 0, tzinfo=ZoneInfo("Asia/Shanghai")).timestamp()
ISSUED = T0 - 60        # tests.test_counter.install: the rules' issued_at
NINE_DAYS_LATER = ISSUED + 9 * DAY


class Clock:
    """The board's clock, set by the test."""

    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


async def provisioned(tmp_path) -> None:
    """The store got its rules at T0 and ran for a while (clock right)."""
    async with Gateway(config(tmp_path), clock=lambda: T0) as gw:
        install(gw)


def no_timesyncd(gw: Gateway) -> Gateway:
    gw.clockwatch._synchronized = lambda: None   # this test machine's timesyncd says nothing about the test's clock
    return gw


# -- the story at the counter -------------------------------------------------

async def test_with_the_right_clock_nine_day_old_rules_are_stale(tmp_path):
    await provisioned(tmp_path)
    async with Gateway(config(tmp_path), clock=lambda: NINE_DAYS_LATER) as gw:
        v = await tap(gw, DIAMOND)
        assert v.reason == "rules_stale" and not v.member["allowed"]["stored_value"]
        assert not any("clock" in f for f in gw.faults())


async def test_a_clock_before_the_rules_issue_time_does_not_make_stale_rules_fresh(tmp_path):
    """The reproduction: the board came up at 1 Nov 2026 (the image's date),
    before the rules' issue time. Before the fix the rules' age was negative
    (-24 days), so nine-day-old rules counted as fresh: stored value and
    redemption went offline on balances nobody could vouch for, and nothing
    said the clock was wrong."""
    await provisioned(tmp_path)
    board = ISSUED - 24 * DAY
    async with Gateway(config(tmp_path), clock=lambda: board) as gw:
        no_timesyncd(gw)
        v = await tap(gw, DIAMOND)
        assert v.accepted                                   # identification and points go on
        assert v.reason == "rules_stale", v.reason          # was "ok"
        assert not v.member["allowed"]["stored_value"] and not v.member["allowed"]["redemption"]
        q = gw.quote("1", {"lines": basket(10000), "member": True})
        sv = q["available"]["stored_value"]
        assert sv["max_fen"] == 0 and sv["reason"] == "rules_stale" and sv["age_s"] > 604800
        faults = [f for f in gw.faults() if f.startswith("clock not trusted")]
        assert faults and "2026-11-01T06:59:00Z is 24 d 0 h before" in faults[0], gw.faults()
        status = await gw.status()
        # the latest time it knows: the previous run's mark (T0), a minute after the rules' issue time
        assert status["clock"]["sane"] is False and status["clock"]["source"] == "mark"
        assert status["clock"]["behind_s"] == 24 * DAY + 60
        assert faults[0] in (await gw.status_message("online")).faults    # HQ sees it too


async def test_a_clock_that_went_backwards_since_the_last_run_is_caught_by_the_mark(tmp_path):
    """Rules issued at T0; the last run saw T0 + 3 days and left its mark; the
    box comes back with its clock at T0 + 1 day: after the rules' issue time,
    but before a time the gateway already saw."""
    await provisioned(tmp_path)
    async with Gateway(config(tmp_path), clock=lambda: T0 + 3 * DAY) as gw:
        no_timesyncd(gw)
    assert ClockMark(tmp_path / "store" / "clock.json").value == int(T0 + 3 * DAY)   # left at the clean stop
    async with Gateway(config(tmp_path), clock=lambda: T0 + DAY) as gw:
        no_timesyncd(gw)
        check = gw.clock_check()
        assert not check.sane and check.source == "mark" and check.behind_s == 2 * DAY
        v = await tap(gw, DIAMOND)
        assert v.reason == "rules_stale"   # one day old by the board, but the board is wrong


async def test_a_clock_that_steps_back_while_running_is_caught_and_recovers(tmp_path):
    await provisioned(tmp_path)
    board = Clock(T0 + DAY)
    async with Gateway(config(tmp_path), clock=board) as gw:
        no_timesyncd(gw)
        assert (await tap(gw, DIAMOND)).reason == "ok"
        board.t = T0 + DAY - 3600                       # someone set it an hour back
        assert (await tap(gw, DIAMOND)).reason == "rules_stale"
        assert any(f.startswith("clock not trusted") for f in gw.faults())
        board.t = T0 + DAY + 60                         # chrony puts it right
        assert (await tap(gw, DIAMOND)).reason == "ok"
        assert not any(f.startswith("clock not trusted") for f in gw.faults())


async def test_the_rules_alone_catch_a_clock_before_their_issue_time(tmp_path):
    """No mark, an empty journal (a fresh box, rules provisioned from a file):
    HQ's signed issue time is the evidence."""
    async with Gateway(config(tmp_path), clock=lambda: ISSUED - 24 * DAY) as gw:
        no_timesyncd(gw)
        install(gw)
        check = gw.clock_check()
        assert not check.sane and check.source == "rules" and check.behind_s == 24 * DAY
        assert "the running rules' issue time" in check.fault
        assert (await tap(gw, DIAMOND)).reason == "rules_stale"


async def test_dynamic_member_qr_codes_wait_for_a_trusted_clock(tmp_path):
    await provisioned(tmp_path)
    async with Gateway(config(tmp_path), clock=lambda: ISSUED - DAY) as gw:
        no_timesyncd(gw)
        v = await gw.handle_read(CardRead("1", "qr", "SGQ1.AAAA", ISSUED - DAY))
        assert (v.verdict, v.reason) == ("deny", "qr_clock_untrusted")
        assert "会员卡" in v.public()["text"]["zh-CN"] and "card" in v.public()["text"]["en"]
        static = await gw.handle_read(CardRead("1", "qr", DIAMOND, ISSUED - DAY))
        assert static.accepted and static.reason == "rules_stale"      # a static code is a card number


# -- the rule, pure -----------------------------------------------------------

@pytest.mark.parametrize("now, evidence, synced, sane, source", [
    (1000, {}, None, True, None),                                          # nothing known: believe it
    (1000, {"rules": 900, "journal": 950}, None, True, "journal"),
    (1000, {"rules": 1200}, None, True, "rules"),                          # within the tolerance
    (1000, {"rules": 1400}, None, False, "rules"),                         # HQ signed a later time
    (1000, {"mark": 5000, "rules": 900}, None, False, "mark"),
    (1000, {"mark": 5000, "journal": 4000, "rules": 900}, True, True, "rules"),   # synchronized: local marks lose
    (1000, {"mark": 5000, "rules": 9000}, True, False, "rules"),           # ... HQ's signed times never do
    (1000, {"rules": None, "seen": None}, None, True, None),
])
def test_sane_or_not(now, evidence, synced, sane, source):
    c = clock.check(now, evidence, synchronized=synced)
    assert (c.sane, c.source) == (sane, source)
    assert (c.fault is None) == sane


def test_untrusted_ages_are_stale_and_never_negative():
    c = clock.check(1000, {"rules": 100_000})
    ages = clock.untrusted_ages({"rules_age_s": -99_000, "sync_age_s": -99_000}, c,
                                issued_at=100_000, as_of=100_000, max_age_s=604800)
    assert ages == {"rules_age_s": 604801, "sync_age_s": 604801}
    later = clock.check(1000, {"rules": 100_000, "mark": 2_000_000})
    ages = clock.untrusted_ages({}, later, issued_at=100_000, as_of=50_000, max_age_s=604800)
    assert ages == {"rules_age_s": 1_900_000, "sync_age_s": 1_950_000}      # what the mark proves, at least


def test_the_mark_is_written_rarely_and_only_from_a_sane_clock():
    sane = clock.check(10_000, {"mark": 9_500})
    assert not clock.mark_due(sane, 9_500, 600) and clock.mark_due(clock.check(10_100, {}), 9_500, 600)
    assert not clock.mark_due(clock.check(10_000, {"mark": 90_000}), 90_000, 600)
    assert clock.mark_due(clock.check(10_000, {"mark": 90_000}, synchronized=True), 90_000, 600)  # moved back
    assert clock.mark_due(clock.check(10_000, {}), None, 600)


def test_a_damaged_mark_is_no_evidence(tmp_path):
    (tmp_path / "clock.json").write_bytes(b'{"mark": "yesterday"}')
    assert ClockMark(tmp_path / "clock.json").value is None
    (tmp_path / "clock.json").write_bytes(b"\x00\x00")
    mark = ClockMark(tmp_path / "clock.json")
    assert mark.value is None
    mark.write(1234)
    assert ClockMark(tmp_path / "clock.json").value == 1234
    assert (tmp_path / "clock.json").stat().st_mode & 0o077 == 0
