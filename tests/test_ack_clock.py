"""HQ's acks carry HQ's time; the gateway checks its clock against it while
online (gateway/core/clock.py, gateway/shell/clock_watch.py,
gateway/shell/uplink.py, hq_bridge/bridge.py), and `storegate-hq fleet`
shows each store's drift (hq_bridge/cli.py).

The store got its rules at T0 - 60 (tests.test_counter.install) and runs an
hour later. Its board's clock and HQ's are set by each test; the broker is a
real mosquitto, HQ a real bridge over a real ledger.
"""

from __future__ import annotations

import asyncio
import time

import orjson
import pytest

from gateway.core import clock
from gateway.shell import config as gw_config
from gateway.shell.service import Gateway
from hardware.readers import CardRead
from hq_bridge.bridge import Bridge
from hq_bridge.cli import render_fleet, store_problems
from hq_bridge.ledger import Ledger
from tests.test_clock import Clock, no_timesyncd
from tests.test_counter import DIAMOND, T0, install, tap
from tests.test_hostile_wire import publish
from tests.test_rules_distribution import until
from wire.messages import MAX_EPOCH_MS, Ack, Status, WireError
from wire.topics import Topics

TOPICS = Topics("sg/v1")
RUNNING = T0 + 3600           # the board's clock when it is right: rules an hour old, fresh
MIN = 60


def config(tmp_path, broker) -> dict:
    return gw_config.check({
        "store": {"id": "S001", "region": "east", "data_dir": str(tmp_path / "store")},
        "mqtt": {"host": "127.0.0.1", "port": broker.port, "keepalive": 5},
        "uplink": {"status_interval_s": 1, "live_lookup_ms": 0},
        "lanes": [{"id": "1", "reader": "terminal"}, {"id": "2", "reader": "terminal"}],
    })


class HQBridge:
    """HQ's bridge on the test's broker, its clock set by the test."""

    def __init__(self, tmp_path, broker, hq_clock) -> None:
        self.bridge = Bridge({"host": "127.0.0.1", "port": broker.port}, Ledger(tmp_path / "hq" / "ledger.sqlite3"),
                             clock=hq_clock)

    async def __aenter__(self) -> Bridge:
        self.task = asyncio.create_task(self.bridge.run())
        await asyncio.wait_for(self.bridge.connected.wait(), 10)
        return self.bridge

    async def __aexit__(self, *exc) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)
        self.bridge.ledger.close()


async def sell_and_wait_for_the_ack(gw: Gateway, n: int = 1) -> None:
    before = gw.uplink.state.acked_records
    for i in range(n):
        await gw.journal.append("sale", {"i": i})
    await until(lambda: gw.uplink.state.acked_records >= before + n, timeout=15, what="HQ's ack")


# -- online: the next ack catches a clock that drifted --------------------------------

async def test_a_gateway_ten_minutes_behind_hq_distrusts_its_clock_on_the_next_ack(tmp_path, broker):
    board = Clock(RUNNING)
    async with Gateway(config(tmp_path, broker), clock=board) as gw:
        no_timesyncd(gw)
        install(gw)
        await until(lambda: gw.uplink.state.connected, what="the uplink")
        assert (await tap(gw, DIAMOND)).reason == "ok"
        async with HQBridge(tmp_path, broker, lambda: RUNNING + 10 * MIN):
            await sell_and_wait_for_the_ack(gw)
            check = gw.clock_check()
            assert not check.sane and check.source == "hq", check
            assert 10 * MIN - 5 <= check.behind_s <= 10 * MIN
            faults = [f for f in gw.faults() if f.startswith("clock not trusted")]
            assert faults and "HQ's time in its last ack" in faults[0], gw.faults()
            # the same distrust as any other evidence: rules stale, dynamic QR codes refused
            assert (await tap(gw, DIAMOND)).reason == "rules_stale"
            qr = await gw.handle_read(CardRead("1", "qr", "SGQ1.AAAA", RUNNING))
            assert (qr.verdict, qr.reason) == ("deny", "qr_clock_untrusted")
            # the measured offset, in GET /status and in the status HQ gets
            status = await gw.status()
            assert 10 * MIN * 1000 - 5000 <= status["clock"]["offset_ms"] <= 10 * MIN * 1000
            message = await gw.status_message("online")
            assert message.clock_offset_ms == status["clock"]["offset_ms"]
            assert faults[0] in message.faults
            assert Status.decode(message.encode()).clock_offset_ms == message.clock_offset_ms
            # chrony puts the board right: trusted at once (HQ's time advances with the monotonic clock)
            board.t = RUNNING + 10 * MIN + 1
            assert gw.clock_check().sane and not any(f.startswith("clock") for f in gw.faults())
            assert (await tap(gw, DIAMOND)).reason == "ok"


async def test_a_gateway_ten_minutes_ahead_of_hq_raises_a_fault_and_leaves_no_mark(tmp_path, broker):
    board = Clock(RUNNING + 10 * MIN)
    async with Gateway(config(tmp_path, broker), clock=board) as gw:
        no_timesyncd(gw)
        install(gw)
        async with HQBridge(tmp_path, broker, lambda: RUNNING):
            await sell_and_wait_for_the_ack(gw)
            check = gw.clock_check()
            assert check.sane and 10 * MIN - 5 <= check.ahead_s <= 10 * MIN, check
            faults = [f for f in gw.faults() if f.startswith("clock ahead")]
            assert faults and "after HQ's time" in faults[0], gw.faults()
            assert (await tap(gw, DIAMOND)).reason == "ok"         # rules look older: the safe side already
            assert -10 * MIN * 1000 <= (await gw.status())["clock"]["offset_ms"] <= -10 * MIN * 1000 + 5000
            mark_before = gw.clockwatch.mark.value                  # the one the start-up left
            board.t += 11 * MIN                                     # a mark is due, but not from a future clock
            gw.clockwatch.keep_mark()
            assert gw.clockwatch.mark.value == mark_before and (gw.clockwatch.seen or 0) < board.t
            board.t = RUNNING + 30                                  # put right
            assert not any(f.startswith("clock") for f in gw.faults())


async def test_a_right_clock_stays_trusted_and_reports_its_offset(tmp_path, broker):
    async with Gateway(config(tmp_path, broker), clock=time.time) as gw:
        no_timesyncd(gw)
        async with HQBridge(tmp_path, broker, time.time):
            await sell_and_wait_for_the_ack(gw, 3)
            check = gw.clock_check()
            assert check.sane and check.ahead_s == 0 and not any(f.startswith("clock") for f in gw.faults())
            assert abs((await gw.status())["clock"]["offset_ms"]) < 5000


# -- the wire: optional both ways, bounded, refused naming the field ----------------

def test_acks_with_and_without_hq_time_are_read():
    plain = Ack("S001", [[1, 3]]).encode()
    assert b"hq_time_ms" not in plain                       # what an older gateway reads
    assert Ack.decode(plain).hq_time_ms is None
    timed = Ack("S001", [[1, 3]], hq_time_ms=1_790_000_000_123)
    assert Ack.decode(timed.encode()) == timed
    assert all(a.hq_time_ms == 7 for a in Ack.for_seqs("S001", range(1, 5000, 2), hq_time_ms=7))
    as_float = Ack.decode(b'{"store": "S001", "acked": [[1, 1]], "hq_time_ms": 1790000000000.0}')
    assert as_float.hq_time_ms == 1_790_000_000_000 and type(as_float.hq_time_ms) is int


@pytest.mark.parametrize("bad", [-1, MAX_EPOCH_MS + 1, "1790000000000", 1.5e12 + 0.5, None, True])
def test_an_ack_with_a_bad_time_is_refused_naming_the_field(bad):
    with pytest.raises(WireError, match="hq_time_ms"):
        Ack.decode(orjson.dumps({"store": "S001", "acked": [[1, 1]], "hq_time_ms": bad}))


@pytest.mark.parametrize("bad", [MAX_EPOCH_MS + 1, -MAX_EPOCH_MS - 1, "600000", 1.5])
def test_a_status_with_a_bad_offset_is_refused_naming_the_field(bad):
    with pytest.raises(WireError, match="clock_offset_ms"):
        Status.decode(orjson.dumps({"store": "S001", "state": "online", "ts": 1, "clock_offset_ms": bad}))
    old = Status.decode(orjson.dumps({"store": "S001", "state": "online", "ts": 1}))   # an older gateway's
    assert old.clock_offset_ms is None


async def test_a_forged_ack_with_a_bad_time_changes_nothing(tmp_path, broker):
    board = Clock(RUNNING)
    cfg = config(tmp_path, broker)
    cfg["uplink"].update(batch_max=5, window=1, resend_after_s=60)
    async with Gateway(cfg, clock=board) as gw:
        no_timesyncd(gw)
        for i in range(3):
            await gw.journal.append("sale", {"i": i})
        await until(lambda: gw.uplink.state.sent_batches >= 1, what="the batch in flight")
        await publish(broker, TOPICS.ack("S001"),
                      orjson.dumps({"store": "S001", "acked": [[1, 3]], "hq_time_ms": -5}))
        await until(lambda: gw.uplink.state.rejected_acks == 1, what="the ack refused")
        assert sorted(gw.journal.index.pending) == [1, 2, 3] and gw.uplink.state.acked_records == 0
        assert any("hq_time_ms" in f for f in gw.uplink.state.faults), gw.uplink.state.faults
        assert gw.clock_check().sane and (await gw.status())["clock"]["offset_ms"] is None
        # the same ack from a clock far ahead, well-formed: frees the records and is believed
        await publish(broker, TOPICS.ack("S001"), Ack("S001", [[1, 3]], hq_time_ms=int(RUNNING + 3600) * 1000).encode())
        await until(lambda: gw.uplink.state.acked_records == 3, what="the ack")
        assert not gw.clock_check().sane and gw.clock_check().source == "hq"


# -- the rule, pure -------------------------------------------------------------

def test_hq_time_is_a_lower_bound_and_the_round_trip_an_upper_one():
    # acked 2 s after the batch went out; read 30 s ago
    lo, hi = clock.hq_bounds(1_000_000_000, since_s=30, rtt_s=2)
    assert (lo, hi) == (1_000_030, 1_000_032)
    assert clock.hq_bounds(1_000_000_999, since_s=0, rtt_s=None) == (1_000_000, None)   # unknown round trip


@pytest.mark.parametrize("now, sane, ahead", [
    (1000, True, 0),
    (1000 - 300, True, 0),           # within the tolerance
    (1000 - 301, False, 0),          # behind HQ's lower bound
    (1010 + 300, True, 0),           # within the tolerance of the upper bound
    (1010 + 301, True, 301),         # ahead: a fault, but the rules just look older
])
def test_behind_is_distrust_ahead_is_a_fault(now, sane, ahead):
    c = clock.check(now, {"hq": 1000}, hq_upper=1010, offset_ms=0)
    assert (c.sane, c.ahead_s) == (sane, ahead)
    assert (c.fault is None) == (sane and not ahead)
    if ahead:
        assert c.fault.startswith("clock ahead") and not clock.mark_due(c, None, 600)
    assert clock.check(now, {"hq": 1000}, synchronized=True).sane == (now >= 700)   # HQ's time always counts


def test_a_clock_hq_confirms_outranks_the_marks_a_wrong_clock_left():
    """A box that ran an hour ahead left its mark there; put right, HQ's
    bounds vouch for it, as a synchronized clock's would (rule 2)."""
    c = clock.check(1000, {"hq": 995, "mark": 4600, "seen": 4600}, hq_upper=1002)
    assert c.sane and c.confirmed and c.source == "hq"
    assert clock.mark_due(c, 4600, 600)                                   # the mark moves back
    lower_only = clock.check(1000, {"hq": 995, "mark": 4600})           # no round trip: no confirmation
    assert not lower_only.sane and not lower_only.confirmed


# -- fleet ------------------------------------------------------------------------

def _status(**kw) -> dict:
    return {"store": "S001", "state": "online", "ts": 1_800_000_000 - 30, "backlog": 0, "rules_version": 4,
            "deny_version": 7, "readers": {"1": "ready"}, "faults": [], **kw}


def test_fleet_shows_each_stores_drift_and_flags_it_beyond_the_tolerance():
    ok = _status(clock_offset_ms=1_200)
    behind = _status(store="S002", clock_offset_ms=600_000)
    ahead = _status(store="S003", clock_offset_ms=-3_600_000)
    old = _status(store="S004")                                # an older gateway: no offset
    assert store_problems(ok, 4, 7) == [] and store_problems(old, 4, 7) == []
    assert store_problems(behind, 4, 7) == ["clock 10m behind HQ's"]
    assert store_problems(ahead, 4, 7) == ["clock 1h ahead of HQ's"]
    out = render_fleet({"S001": ok, "S002": behind, "S003": ahead, "S004": old}, {s: 4 for s in
                       ("S001", "S002", "S003", "S004")}, 1_800_000_000, hq_deny=7).splitlines()
    assert "clock" in out[0]
    rows = {line.split()[0]: line for line in out[1:]}
    assert "+1s" in rows["S001"] and "+10m" in rows["S002"] and "-1h" in rows["S003"]
    assert rows["S002"].endswith("clock 10m behind HQ's") and rows["S003"].endswith("clock 1h ahead of HQ's")
    # the gateway's own clock fault already says it: not twice
    told = _status(clock_offset_ms=600_000, faults=["clock not trusted: ... before HQ's time in its last ack"])
    assert store_problems(told, 4, 7) == told["faults"]
