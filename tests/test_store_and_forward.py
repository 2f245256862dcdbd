"""Fault injection on real parts. Each test asserts the invariant: HQ's ledger
holds exactly the set of sales the POS was told were committed — none lost,
none applied twice. Short versions run in the suite; `--long` runs the long ones."""

import json
import random
import sqlite3
import subprocess
import time

import pytest

from tests.support import (HQ, GatewayProc, PosLanes, RefusingProxyThread, assert_hq_holds_exactly, sale_body,
                           wait_until)


def _store(tmp_path, mqtt_port, broker_port=None, uplink=None):
    hq = HQ(tmp_path, broker_port or mqtt_port).start()
    gw = GatewayProc(tmp_path, mqtt_port, lanes=("1", "2", "3"), uplink=uplink).start()
    return hq, gw


def _sigkill_under_load(tmp_path, broker, kills: int):
    hq, gw = _store(tmp_path, broker.port)
    rng = random.Random(kills)
    pos = PosLanes(gw, lanes=("1", "2", "3")).start()
    try:
        for _ in range(kills):
            time.sleep(rng.uniform(0.05, 0.5))
            gw.kill()                                   # at a random moment under load
            gw.start()
        time.sleep(0.3)
        pos.stop()
        assert not pos.refused, pos.refused[:3]
        assert len(pos.told) > kills
        assert_hq_holds_exactly(hq, pos.told)
        wait_until(lambda: gw.journal_seqs() == [], what="the journal to drain")
    finally:
        pos.stop()
        gw.stop()
        hq.stop()


def test_sigkill_gateway_20_times_under_load(tmp_path, broker):
    _sigkill_under_load(tmp_path, broker, kills=20)


@pytest.mark.slow
def test_sigkill_gateway_200_times_under_load(tmp_path, broker):
    _sigkill_under_load(tmp_path, broker, kills=200)


def _restarted_during_a_drain(tmp_path, broker, selling_s: float, min_backlog: int) -> None:
    # Small batches and one batch in flight make the drain long enough to interrupt.
    hq, gw = _store(tmp_path, broker.port, uplink={"batch_max": 10, "window": 1})
    try:
        hq.stop()
        pos = PosLanes(gw, lanes=("1", "2", "3"), pause_s=0).start()
        time.sleep(selling_s)
        pos.stop()
        backlog = gw.status()["backlog"]
        assert backlog > min_backlog
        hq.start()
        wait_until(lambda: 0 < len(hq.rows()) < len(pos.told), what="the drain to begin")
        broker.kill()                                   # broker dies mid-drain
        time.sleep(1)
        broker.start()
        wait_until(lambda: len(hq.rows()) > 0 and gw.status()["backlog"] < backlog, what="drain resumed")
        hq.stop()                                       # HQ bridge restarts mid-drain
        time.sleep(0.5)
        hq.start()
        assert_hq_holds_exactly(hq, pos.told, timeout=90)
        wait_until(lambda: gw.status()["backlog"] == 0, what="backlog empty")
    finally:
        gw.stop()
        hq.stop()


def test_broker_and_hq_restarted_during_a_drain(tmp_path, broker):
    _restarted_during_a_drain(tmp_path, broker, selling_s=1, min_backlog=60)


@pytest.mark.slow
def test_broker_and_hq_restarted_during_a_long_drain(tmp_path, broker):
    _restarted_during_a_drain(tmp_path, broker, selling_s=3, min_backlog=200)


def test_link_latency_drop_and_stall(tmp_path, broker):
    proxy = RefusingProxyThread(broker.port, latency_s=0.025)   # 50 ms round trip
    hq, gw = _store(tmp_path, proxy.port, broker_port=broker.port)
    pos = PosLanes(gw, lanes=("1", "2")).start()
    try:
        wait_until(lambda: len(hq.rows()) >= 20, what="sales through the slow link")
        proxy.cut()                                     # drop: connections reset, new ones refused
        time.sleep(2)
        assert gw.status()["uplink"] == "offline"
        proxy.restore()
        wait_until(lambda: gw.status()["uplink"] == "online", timeout=40, what="reconnect after the drop")
        proxy.stall()                                   # stall: the link is up but nothing moves
        time.sleep(3)
        proxy.unstall()
        proxy.set_latency(0)
        pos.stop()
        assert not pos.refused
        assert_hq_holds_exactly(hq, pos.told)
        wait_until(lambda: gw.journal_seqs() == [], what="journal drained")
    finally:
        pos.stop()
        gw.stop()
        hq.stop()
        proxy.close()


def test_damaged_journal_between_runs_is_recovered_and_reported(tmp_path, broker):
    # The store is offline while it sells, so the records exist only in its
    # journal (with the link up, copies already at the broker would reach HQ).
    proxy = RefusingProxyThread(broker.port)
    hq, gw = _store(tmp_path, proxy.port, broker_port=broker.port, uplink={"status_interval_s": 1})
    try:
        hq.stop()
        proxy.cut()
        told = {}
        for i in range(60):
            status, sale = gw.call("POST", "/lanes/1/sales", sale_body(f"pos1-dmg-{i:04d}", member=False))
            assert status == 201
            told[sale["tx_id"]] = sale["seq"]
        gw.stop()
        segment = next(p for p in (gw.data_dir / "journal").glob("*.log") if b"pos1-dmg-0030" in p.read_bytes())
        data = bytearray(segment.read_bytes())
        at = data.index(b"pos1-dmg-0030")
        data[at: at + 400] = b"\xa5" * 400               # bit rot in the middle of the segment
        segment.write_bytes(bytes(data))
        gw.start()
        faults = gw.status()["faults"]
        assert faults and "damaged" in faults[0] and "set aside" in faults[0]
        assert list((gw.data_dir / "journal").glob("*.damaged-*"))
        proxy.restore()
        hq.start()
        # the fault reaches HQ on the retained status topic
        def reported():
            conn = sqlite3.connect(hq.db)
            try:
                row = conn.execute("SELECT status FROM stores WHERE store='S001'").fetchone()
            except sqlite3.OperationalError:
                return False
            finally:
                conn.close()
            return row and any("damaged" in f for f in json.loads(row[0]).get("faults", []))
        wait_until(reported, what="the damage reported on the status topic")
        wait_until(lambda: gw.status()["backlog"] == 0, what="intact records delivered")
        at_hq = {tx_id for _s, tx_id, _t, _b in hq.rows()}
        assert at_hq <= set(told)                        # nothing invented
        assert len(told) - 3 <= len(at_hq) < len(told)   # all but the records in the wrecked bytes
    finally:
        gw.stop()
        hq.stop()
        proxy.close()


def test_disk_fills_while_committing(tmp_path, broker):
    """A real full file system: a 3 MB tmpfs under the journal (needs root)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)]).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root): the journal cap test covers the logic")
    try:
        hq = HQ(tmp_path, broker.port).start()
        gw = GatewayProc(tmp_path, broker.port, extra="[journal]\nsegment_mb = 1\n")
        gw.data_dir = mnt / "store"
        gw.config.write_text(gw.config.read_text().replace(str(tmp_path / "store"), str(gw.data_dir)))
        gw.start()
        hq.stop()                                        # nothing can be freed: the disk fills
        told, full = {}, None
        for i in range(20000):
            status, answer = gw.call("POST", "/lanes/1/sales", sale_body(f"pos1-full-{i:05d}", member=False))
            if status == 201:
                told[answer["tx_id"]] = answer["seq"]
            else:
                full = (status, answer)
                break
        assert full is not None, "the disk never filled"
        status, answer = full
        assert status == 507 and answer["error"]["code"] == "journal_full"
        assert "满" in answer["error"]["text"]["zh-CN"] and "full" in answer["error"]["text"]["en"]
        assert gw.call("POST", "/lanes/1/quote", {"lines": sale_body("q")["lines"]})[0] == 200  # still quoting
        hq.start()
        assert_hq_holds_exactly(hq, told)                # nothing acknowledged was lost
        wait_until(lambda: gw.call("POST", "/lanes/1/sales",
                                   sale_body(f"pos1-after-{time.time()}", member=False))[0] == 201,
                   timeout=30, what="sales to work again once HQ has acked and the journal compacted")
    finally:
        for svc in ("gw", "hq"):
            if svc in locals():
                locals()[svc].stop()
        subprocess.run(["umount", "-l", str(mnt)])
