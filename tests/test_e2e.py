"""End to end through a real mosquitto, the real HQ bridge and gateway processes."""

import json
import time

import pytest

from tests.support import GOLD_UID, LOST_CARD, running_shop, sale_body, wait_until


@pytest.fixture
def store(tmp_path, broker):
    with running_shop(tmp_path, broker.port) as shop:
        yield shop


def test_tap_quote_commit_reaches_hq_and_journal_empties(store):
    hq, gw = store
    status, verdict = gw.call("POST", "/lanes/1/taps", {"source": "nfc", "raw": GOLD_UID})
    assert status == 200
    assert verdict["verdict"] == "accept" and verdict["pattern"] == "accept"
    assert verdict["member"]["tier"]["code"] == "gold"
    assert verdict["card"] == "8800****0013"  # masked, never the full number
    assert verdict["text"]["zh-CN"] and verdict["text"]["en"]

    status, member = gw.call("GET", "/lanes/1/member")
    assert status == 200 and member["member"]["member"]["member_id"] == "M1001"

    status, quote = gw.call("POST", "/lanes/1/quote", sale_body("unused-key"))
    assert status == 200
    # 49.90 rice, gold 5% off: 249.5 fen -> 250 (half-up); 4740 fen; points 47.40 * 1 * 1.5 -> 71
    assert (quote["subtotal"], quote["discount"], quote["total"]) == (4990, 250, 4740)
    assert quote["points"]["earned"] == 71

    status, sale = gw.call("POST", "/lanes/1/sales", {**sale_body("pos1-000001"), "expected_total": 4740})
    assert status == 201, sale
    assert sale["total"] == 4740 and sale["seq"] == 1

    wait_until(lambda: len(hq.rows()) == 1, what="the sale at HQ")
    seq, tx_id, type_, body = hq.rows()[0]
    assert (seq, tx_id, type_) == (1, sale["tx_id"], "sale")
    body = json.loads(body)
    assert body["member"]["member_id"] == "M1001"
    assert body["totals"]["total"] == 4740 and body["totals"]["points_earned"] == 71
    wait_until(lambda: gw.journal_seqs() == [], what="the journal to empty after HQ's ack")
    assert gw.status()["backlog"] == 0

    # a deny-listed card is refused with its reason
    status, verdict = gw.call("POST", "/lanes/2/taps", {"source": "qr", "raw": LOST_CARD})
    assert verdict["verdict"] == "deny" and verdict["reason"] == "lost"
    assert "挂失" in verdict["text"]["zh-CN"]


def test_sale_retry_with_same_key_is_one_sale(store):
    hq, gw = store
    first = gw.call("POST", "/lanes/1/sales", sale_body("pos1-retry-01", member=False))
    again = gw.call("POST", "/lanes/1/sales", sale_body("pos1-retry-01", member=False))
    assert first[0] == 201 and again[0] == 200
    assert again[1]["tx_id"] == first[1]["tx_id"] and again[1]["duplicate"] is True
    other = gw.call("POST", "/lanes/1/sales", sale_body("pos1-retry-01", lines=[
        {"sku": "x1", "qty": 2, "unit_price": 100}], member=False))
    assert other[0] == 409 and other[1]["error"]["code"] == "idempotency_conflict"
    wait_until(lambda: len(hq.rows()) == 1 and gw.journal_seqs() == [], what="one sale at HQ")
    time.sleep(0.5)
    assert len(hq.rows()) == 1


def test_status_command_shows_backlog_and_rules(store):
    import subprocess

    from tests.support import BIN

    _hq, gw = store
    out = subprocess.run([str(BIN / "storegate"), "status", "--config", str(gw.config)],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert "rules version    1" in out.stdout and "backlog          0 record(s)" in out.stdout
    assert "uplink           online" in out.stdout


def test_gateway_refuses_to_start_with_a_bad_config_naming_the_key(tmp_path):
    import subprocess

    from tests.support import BIN

    bad = tmp_path / "gw.toml"
    bad.write_text('[store]\nid = "S001"\n[mqtt]\nhost = "h"\nport = "eighty"\n[[lanes]]\nid = "1"\nreader = "simulated"\n')
    out = subprocess.run([str(BIN / "storegate"), "run", "--config", str(bad)], capture_output=True, text=True,
                         timeout=30)
    assert out.returncode == 2
    assert "mqtt.port: 'eighty' is not of type 'integer'" in out.stderr


def test_demo_runs_the_whole_store_and_exits_0():
    import subprocess

    from tests.support import BIN, ROOT

    out = subprocess.run([str(BIN / "python"), "-m", "demo"], capture_output=True, text=True, timeout=120,
                         cwd=ROOT)   # the checkout: the demo rig (demo/) is not installed
    assert out.returncode == 0, out.stdout + out.stderr
    assert "OK: every committed sale is in HQ's database exactly once" in out.stdout


def test_demo_on_the_embedded_broker_when_mosquitto_is_missing(monkeypatch, capsys):
    import asyncio

    import demo.rig as demo

    monkeypatch.setattr(demo, "mosquitto_path", lambda: None)
    assert asyncio.run(demo.run_demo()) == 0
    out = capsys.readouterr().out
    assert "amqtt (embedded)" in out and "exactly once" in out
