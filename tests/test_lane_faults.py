"""The gateway shows "fault" on a lane's status LED while its reader is gone
or the journal reports damage, clears it when the reader is back, and
reports reader state on the status topic and in /status.

Real parts: pcscd + vpcd (tests/pcsc_env.py), mosquitto, gpiozero MockFactory.
"""

from __future__ import annotations

import pytest
from gpiozero.pins.mock import MockFactory

from gateway.shell import config as gw_config
from gateway.shell.service import Gateway
from gateway.store.journal import Journal
from tests import pcsc_env
from tests.test_nfc import READER, until

STATUS_PIN = 23


def lane_cfg(tmp_path, broker, reader: dict) -> dict:
    return gw_config.check({
        "store": {"id": "S001", "data_dir": str(tmp_path / "store")},
        "mqtt": {"host": "127.0.0.1", "port": broker.port},
        "lanes": [{"id": "1", **reader, "indicator": "gpio",
                   "gpio": {"green": 17, "red": 27, "buzzer": 22, "status": STATUS_PIN}}],
    })


def fast_blinking(pin, seconds: float = 0.6) -> bool:
    import time

    before = len(pin.states)
    time.sleep(seconds)
    return len(pin.states) - before >= 4  # 0.1 s on / 0.1 s off


async def test_reader_absent_shows_fault_until_it_comes_back(tmp_path, broker):
    try:
        daemon = pcsc_env.PcscDaemon(tmp_path / "pcscd")
    except RuntimeError as missing:
        pytest.fail(f"PC/SC test stack unavailable: {missing}", pytrace=False)
    factory = MockFactory()
    cfg = lane_cfg(tmp_path, broker, {"reader": "pcsc", "pcsc_reader": READER})
    try:
        async with Gateway(cfg, pin_factory=factory) as gw:
            lane = gw.lanes["1"]
            status_pin = factory.pin(STATUS_PIN)
            assert lane.reader.state == "absent"                  # no pcscd yet
            await until(lambda: lane.indicator.fault, 5, "the fault pattern")
            assert fast_blinking(status_pin)
            message = await gw.status_message("online")
            assert message.readers == {"1": "absent"}
            assert (await gw.status())["lanes"]["1"]["state"] == "absent"

            daemon.start()
            await until(lambda: lane.reader.state == "ready", 15, "the reader")
            await until(lambda: not lane.indicator.fault, 5, "the fault to clear")
            assert (await gw.status_message("online")).readers == {"1": "ready"}
            await until(lambda: gw.uplink.state.connected, 15, "the uplink")
            await until(lambda: status_pin.state is True, 5, "the status LED")
            assert not fast_blinking(status_pin)                  # steady: online, no fault

            daemon.kill()                                          # pcscd crashes: the fault is back
            await until(lambda: lane.reader.state == "absent", 15, "absent after pcscd died")
            await until(lambda: lane.indicator.fault, 5, "the fault pattern again")
            assert [p.value for p in lane.indicator.history].count("fault") == 2
    finally:
        daemon.stop()


async def test_journal_damage_shows_fault_on_every_lane(tmp_path, broker):
    journal_dir = tmp_path / "store" / "journal"
    async with Journal(journal_dir) as j:
        for i in range(30):
            await j.append("sale", {"i": i, "pad": "x" * 100})
    seg = sorted(journal_dir.glob("*.log"))[-1]
    data = bytearray(seg.read_bytes())
    at = data.index(b'"i":10,')
    data[at: at + 200] = b"\x00" * 200
    seg.write_bytes(bytes(data))

    factory = MockFactory()
    cfg = lane_cfg(tmp_path, broker, {"reader": "simulated"})
    async with Gateway(cfg, pin_factory=factory) as gw:
        assert gw.journal.faults
        await until(lambda: gw.lanes["1"].indicator.fault, 5, "the fault pattern")
        assert fast_blinking(factory.pin(STATUS_PIN))
        await until(lambda: gw.uplink.state.connected, 15, "the uplink")
        assert gw.lanes["1"].indicator.fault                     # online does not hide the fault
        assert fast_blinking(factory.pin(STATUS_PIN))


async def test_healthy_lane_shows_no_fault(tmp_path, broker):
    factory = MockFactory()
    async with Gateway(lane_cfg(tmp_path, broker, {"reader": "simulated"}), pin_factory=factory) as gw:
        await until(lambda: gw.uplink.state.connected, 15, "the uplink")
        await until(lambda: factory.pin(STATUS_PIN).state is True, 5, "online")
        assert "fault" not in [p.value for p in gw.lanes["1"].indicator.history]
        assert (await gw.status_message("online")).readers == {"1": "ready"}


def test_storegate_status_shows_a_reader_that_needs_a_look():
    from gateway.shell.cli import render_status

    text = render_status({"store": "S001", "uplink": "online", "last_hq_contact": None, "rules_version": 1,
                          "backlog": 0, "oldest_unsent_age_s": None, "acked_records": 0, "last_seq": 0,
                          "lanes": {"1": {"reader": "pcsc", "taps": 2, "state": "absent"},
                                    "2": {"reader": "pcsc", "taps": 5, "state": "ready"}}}, now=0)
    assert "1 (pcsc absent, 2 taps), 2 (pcsc, 5 taps)" in text
