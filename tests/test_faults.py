"""Faults on real parts: the broker dies, the gateway is SIGKILLed."""

import threading
import time

from tests.support import ledger_by_id, sale_body, start_shop, wait_until


def test_broker_killed_during_sales_nothing_lost_or_doubled(tmp_path, broker):
    hq, gw = start_shop(tmp_path, broker.port)
    told_committed: dict[str, int] = {}
    errors: list = []

    def lane(lane_id: str, n: int) -> None:
        for i in range(n):
            status, body = gw.call("POST", f"/lanes/{lane_id}/sales", sale_body(f"pos{lane_id}-{i:06d}", member=False))
            if status == 201:
                told_committed[body["tx_id"]] = body["seq"]
            else:
                errors.append((status, body))
            time.sleep(0.01)

    try:
        lanes = [threading.Thread(target=lane, args=(l, 40)) for l in ("1", "2")]
        for t in lanes:
            t.start()
        time.sleep(0.3)
        broker.kill()                                  # outage in the middle of the sales
        for t in lanes:
            t.join()
        assert not errors, errors                      # the counter never noticed
        assert len(told_committed) == 80
        assert gw.status()["uplink"] == "offline"
        time.sleep(1.0)
        broker.start()                                 # HQ reachable again
        wait_until(lambda: set(ledger_by_id(hq)) == set(told_committed), timeout=40, what="all sales at HQ")
        wait_until(lambda: gw.journal_seqs() == [], timeout=20, what="journal drained")
        counts = ledger_by_id(hq)
        assert all(n == 1 for n in counts.values())
        assert sorted(seq for seq, *_ in hq.rows()) == sorted(told_committed.values())
    finally:
        gw.stop()
        hq.stop()


def test_gateway_sigkilled_after_ok_sale_reaches_hq_once(tmp_path, broker):
    hq, gw = start_shop(tmp_path, broker.port)
    try:
        hq.stop()  # HQ away: the sale can only be in the gateway's journal
        status, sale = gw.call("POST", "/lanes/1/sales", sale_body("pos1-kill-01", member=False))
        assert status == 201
        gw.kill()                                      # SIGKILL right after the POS got its OK
        assert gw.journal_seqs() == [sale["seq"]]       # it was on disk before the OK
        hq.start()
        gw.start()
        wait_until(lambda: ledger_by_id(hq) == {sale["tx_id"]: 1}, timeout=30, what="the sale at HQ")
        wait_until(lambda: gw.journal_seqs() == [], what="journal drained")
        # a retry of the same sale after the restart is still the same sale
        status, again = gw.call("POST", "/lanes/1/sales", sale_body("pos1-kill-01", member=False))
        assert status == 200 and again["tx_id"] == sale["tx_id"]
        status, nxt = gw.call("POST", "/lanes/1/sales", sale_body("pos1-kill-02", member=False))
        assert status == 201 and nxt["seq"] == sale["seq"] + 1   # sequence numbers never reused
        wait_until(lambda: len(ledger_by_id(hq)) == 2, what="second sale at HQ")
        assert all(n == 1 for n in ledger_by_id(hq).values())
    finally:
        gw.stop()
        hq.stop()
