"""Counter operations through the gateway (gateway/shell/counter.py): stored-value
and points tenders with their offline limits, returns that reverse a sale
exactly, top-ups, count packages, card services, idempotent retries, and the
local state rebuilt from the journal after a crash.

The gateway runs in-process on the demo's layered rules (chain, region east,
store S001) and member snapshot, with HQ unreachable (offline is the normal
case) and a fixed clock: Wednesday 2026-11-25 15:00 in Shanghai.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from gateway.shell import config as gw_config
from gateway.shell.counter import CounterError
from gateway.core.pricing import PricingError
from gateway.shell.service import Gateway
from demo.testbed import free_port
from hardware.readers import CardRead
from hq_bridge.rules import _read_doc, read_table_file
from tests.support import ROOT, api_client, install_rules

CASH = {"method": "cash"}  # how a top-up was paid

EXAMPLES = ROOT / "deploy" / "examples"
T0 = datetime(2026, 11, 25, 15, 0, tzinfo=ZoneInfo("Asia/Shanghai")).timestamp()
DIAMOND = "880000000070"   # M1005: 48,200 points, 1,500.00 yuan stored value
GOLD = "880000000013"      # M1001: 5,230 points, 200.00 yuan, car_wash10 x3


def config(tmp_path: Path) -> dict:
    return gw_config.check({
        "store": {"id": "S001", "region": "east", "data_dir": str(tmp_path / "store")},
        "mqtt": {"host": "127.0.0.1", "port": free_port()},  # nobody listens: HQ unreachable
        "lanes": [{"id": "1", "reader": "terminal"}, {"id": "2", "reader": "terminal"}],
    })


def install(gw: Gateway) -> None:
    docs = [_read_doc(EXAMPLES / n) for n in ("chain.toml", "region-east.toml", "store-S001.toml")]
    install_rules(gw, docs, now=T0 - 60, region="east",
                  members=list(read_table_file(EXAMPLES / "members.demo.jsonl")),
                  deny=list(read_table_file(EXAMPLES / "deny.demo.jsonl")))


@pytest.fixture
async def gw(tmp_path):
    async with Gateway(config(tmp_path), clock=lambda: T0) as gw:
        install(gw)
        yield gw


async def tap(gw: Gateway, card: str, lane: str = "1"):
    return await gw.handle_read(CardRead(lane, "magstripe", card, T0))


def basket(fen: int, sku: str = "HH-001") -> list[dict]:
    return [{"sku": sku, "name": "household", "category": "household", "qty": 1, "unit_price": fen}]


async def balances(gw: Gateway, card: str) -> tuple[int, int]:
    v = await tap(gw, card)
    assert v.accepted, v.reason
    return v.member["points"], v.member["balance_fen"]


async def journal_depth(gw: Gateway) -> int:
    return (await gw.journal.backlog())["depth"]


async def test_stored_value_payments_stop_at_the_daily_offline_limit(gw):
    # S001: at most 300.00 per payment (store layer), 800.00 per card per day (region east).
    points0, balance0 = await balances(gw, DIAMOND)
    paid = 0
    for i in range(2):
        await tap(gw, DIAMOND)
        sale = await gw.counter.sale("1", {"idempotency_key": f"sv-pay-{i:04d}", "lines": basket(60000),
                                           "tender": {"stored_value_fen": 30000}})
        assert sale.response["tender"]["stored_value_fen"] == 30000
        paid += 30000
    assert (await balances(gw, DIAMOND))[1] == balance0 - paid

    depth = await journal_depth(gw)
    await tap(gw, DIAMOND)
    with pytest.raises(PricingError) as refused:   # 200.00 of today's allowance is left
        await gw.counter.sale("1", {"idempotency_key": "sv-pay-over", "lines": basket(60000),
                                    "tender": {"stored_value_fen": 30000}})
    assert refused.value.field == "tender.stored_value_fen"
    assert refused.value.text["zh-CN"] and refused.value.text["en"]
    assert await journal_depth(gw) == depth                        # nothing written
    assert (await balances(gw, DIAMOND))[1] == balance0 - paid

    await tap(gw, DIAMOND)
    await gw.counter.sale("1", {"idempotency_key": "sv-pay-last", "lines": basket(60000),
                                "tender": {"stored_value_fen": 20000}})
    assert (await balances(gw, DIAMOND))[1] == balance0 - 80000    # exactly the day's limit
    assert (await tap(gw, DIAMOND)).accepted
    q = gw.counter.quote("1", {"lines": basket(60000)})
    assert q["available"]["stored_value"]["max_fen"] == 0


async def test_partial_returns_restore_points_and_balance_exactly(gw):
    points0, balance0 = await balances(gw, DIAMOND)
    lines = [{"sku": "HH-001", "name": "detergent", "category": "household", "qty": 3, "unit_price": 3333},
             {"sku": "FR-002", "name": "apples", "category": "fresh", "qty": 2, "unit_price": 1999},
             {"sku": "DR-003", "name": "juice", "category": "drinks", "qty": 5, "unit_price": 850}]
    await tap(gw, DIAMOND)
    sale = await gw.counter.sale("1", {"idempotency_key": "ret-sale-1", "lines": lines,
                                       "tender": {"points": 1000, "stored_value_fen": 5000}})
    points1, balance1 = await balances(gw, DIAMOND)
    assert balance1 == balance0 - 5000
    assert points1 == points0 - 1000 + sale.response["points_earned"]

    r1 = await gw.counter.sale_return({"idempotency_key": "ret-1-aaaa", "sale_seq": sale.seq,
                                       "lines": [{"line": 0, "qty": 1}, {"line": 2, "qty": 2}]})
    r2 = await gw.counter.sale_return({"idempotency_key": "ret-2-bbbb", "sale_id": sale.id,
                                       "lines": [{"line": 0, "qty": 2}, {"line": 1, "qty": 2},
                                                 {"line": 2, "qty": 3}]})
    assert r1.response["receipt"]["zh-CN"] and r2.response["receipt"]["en"]
    assert await balances(gw, DIAMOND) == (points0, balance0)      # as before the sale, to the point and fen

    depth = await journal_depth(gw)
    with pytest.raises(PricingError) as over:                      # everything is back already
        await gw.counter.sale_return({"idempotency_key": "ret-3-cccc", "sale_seq": sale.seq,
                                      "lines": [{"line": 1, "qty": 1}]})
    assert over.value.field.startswith("return_lines")
    assert await journal_depth(gw) == depth
    with pytest.raises(CounterError) as missing:
        await gw.counter.sale_return({"idempotency_key": "ret-4-dddd", "sale_seq": 99999,
                                      "lines": [{"line": 0, "qty": 1}]})
    assert missing.value.status == 404 and missing.value.text["zh-CN"]


async def test_a_retried_operation_answers_once_and_counts_once(gw):
    _p0, balance0 = await balances(gw, GOLD)
    await tap(gw, GOLD)
    first = await gw.counter.topup("1", {"idempotency_key": "topup-0001", "package_id": "p500", "payment": CASH})
    again = await gw.counter.topup("1", {"idempotency_key": "topup-0001", "package_id": "p500", "payment": CASH})
    assert not first.duplicate and again.duplicate and again.seq == first.seq
    assert first.response["record"]["credit_fen"] == 55000          # 充500送50
    assert (await balances(gw, GOLD))[1] == balance0 + 55000        # credited once


async def test_count_package_uses_never_go_below_zero(gw):
    await tap(gw, GOLD)
    used = await gw.counter.use_package("1", "car_wash10", {"idempotency_key": "pkg-use-01", "uses": 2})
    assert used.response["record"]["remaining_after"] == 1
    await tap(gw, GOLD)
    with pytest.raises(PricingError) as short:
        await gw.counter.use_package("1", "car_wash10", {"idempotency_key": "pkg-use-02", "uses": 2})
    assert short.value.code == "package_insufficient"
    assert (await tap(gw, GOLD)).member["packages"]["car_wash10"] == 1


async def test_a_card_reported_lost_here_is_refused_here_at_once(gw):
    assert (await tap(gw, GOLD)).accepted
    done = await gw.counter.card_service({"idempotency_key": "lost-0001", "kind": "report_lost",
                                          "card_no": GOLD, "reason": "member called"})
    assert done.response["status_after"] == "lost" and done.response["card"] == "8800****0013"
    verdict = await tap(gw, GOLD)
    assert verdict.verdict == "deny" and verdict.reason == "lost"

    replaced = await gw.counter.card_service({"idempotency_key": "repl-0001", "kind": "replace",
                                              "card_no": "880000000021", "new_card_no": "880000000120"})
    assert replaced.response["fee_fen"] == 500
    verdict = await tap(gw, "880000000021")
    assert verdict.reason == "replaced" and verdict.public()["text"]["en"]
    with pytest.raises(CounterError) as exists:
        await gw.counter.card_service({"idempotency_key": "issue-0001", "kind": "issue", "card_no": DIAMOND})
    assert exists.value.status == 409


async def test_a_member_refused_after_the_tap_cannot_pay(gw):
    await tap(gw, DIAMOND)
    gw.rules.members.apply_deny_delta(gw.rules.deny_version + 1, {DIAMOND: {"status": "frozen"}})
    depth = await journal_depth(gw)
    with pytest.raises(CounterError) as refused:
        await gw.counter.sale("1", {"idempotency_key": "frozen-0001", "lines": basket(5000),
                                    "tender": {"stored_value_fen": 5000}})
    assert refused.value.code == "member_refused" and refused.value.status == 409
    assert await journal_depth(gw) == depth


async def test_local_state_is_rebuilt_from_the_journal_after_a_crash(tmp_path):
    cfg = config(tmp_path)
    async with Gateway(cfg, clock=lambda: T0) as gw:
        install(gw)
        _p0, balance0 = await balances(gw, DIAMOND)
        await tap(gw, DIAMOND)
        sale = await gw.counter.sale("1", {"idempotency_key": "crash-0001", "lines": basket(20000),
                                           "tender": {"stored_value_fen": 10000}})
    # A crash after the journal's fsync but before the local state was written:
    # lose the archive and the local deltas entirely.
    store = Path(cfg["store"]["data_dir"])
    for f in list(store.rglob("counter.db*")) + list(store.rglob("member_deltas.db*")):
        f.unlink()
    async with Gateway(cfg, clock=lambda: T0) as gw:
        assert (await balances(gw, DIAMOND))[1] == balance0 - 10000
        back = await gw.counter.sale_return({"idempotency_key": "crash-ret-1", "sale_seq": sale.seq,
                                             "lines": [{"line": 0, "qty": 1}]})
        assert back.response["totals"]["stored_value_fen"] == 10000
        assert (await balances(gw, DIAMOND))[1] == balance0


async def test_pos_api_errors_name_the_field_and_write_nothing(gw):
    client = api_client(gw)
    await tap(gw, DIAMOND)
    depth = await journal_depth(gw)
    cases = [
        ("/lanes/1/sales", {"idempotency_key": "api-0001", "lines": basket(1000), "tender": {"points": -5}},
         400, "tender_invalid"),
        ("/lanes/1/sales", {"idempotency_key": "api-0002", "lines": basket(1000), "tender": {"points": 150}},
         422, None),                                                  # under min_points / not a step
        ("/lanes/1/sales", {"idempotency_key": "api-0003", "lines": basket(1000), "tip": 5}, 400, "bad_request"),
        ("/lanes/1/topups", {"idempotency_key": "api-0004", "package_id": "p9999", "payment": CASH}, 422, "topup_unknown_package"),
        ("/returns", {"idempotency_key": "api-0005", "lines": [{"line": 0, "qty": 1}]}, 400, "bad_request"),
        ("/cards/services", {"idempotency_key": "api-0006", "kind": "explode", "card_no": GOLD}, 400,
         "card_op_invalid"),
        ("/cards/services", {"idempotency_key": "api-0007", "kind": "freeze", "card_no": "880000009999"},
         404, "card_not_found"),
    ]
    for path, body, status, code in cases:
        res = await client.post(path, body=body)
        assert res.status_code == status, (path, body, res.json)
        err = res.json["error"]
        assert err["message"]
        if code:
            assert err["code"] == code, (path, err)
        if status == 422:
            assert err["field"] and err["text"]["zh-CN"] and err["text"]["en"]
    assert await journal_depth(gw) == depth

    ok = await client.post("/lanes/1/sales", body={"idempotency_key": "api-0100", "lines": basket(1000),
                                                   "tender": {"stored_value_fen": 500}})
    assert ok.status_code == 201 and ok.json["seq"] and ok.json["tx_id"]
    assert json.dumps(ok.json, ensure_ascii=False).count(DIAMOND) == 0   # the full card number stays inside


async def test_a_local_state_failure_never_fails_a_durable_sale(gw, monkeypatch):
    """The record is in the journal before the local state is written: a disk
    that fills in between holds the local write for retry, and new operations
    are refused until it succeeds, so no balance or limit misses a sale."""
    import sqlite3

    real_apply, calls = gw.counter.archive.apply, {"n": 0}

    def flaky_apply(*args):
        calls["n"] += 1
        if calls["n"] <= 3:  # the sale, then both tries (before and after relieving the WAL) of the next op
            raise sqlite3.OperationalError("database or disk is full")
        return real_apply(*args)

    monkeypatch.setattr(gw.counter.archive, "apply", flaky_apply)
    await tap(gw, DIAMOND)
    sale = await gw.counter.sale("1", {"idempotency_key": "held-0001", "lines": basket(60000),
                                       "tender": {"stored_value_fen": 10000}})
    assert not sale.duplicate and gw.counter.faults                 # the POS got its OK; the fault shows
    from gateway.store.journal import JournalFull
    await tap(gw, DIAMOND)
    with pytest.raises(JournalFull):                                  # second failure: refused, nothing written
        await gw.counter.sale("1", {"idempotency_key": "held-0002", "lines": basket(1000)})
    await tap(gw, DIAMOND)
    await gw.counter.sale("1", {"idempotency_key": "held-0003", "lines": basket(1000)})
    assert not gw.counter.faults
    assert gw.counter.archive.sale({"seq": sale.seq}) is not None     # the held sale is archived after all


# ---------------------------------------------------------------- a card HQ blocked for an overdraft (欠款冻结)

def hq_delta(gw: Gateway, entries: list[dict]) -> bytes:
    """A deny delta as HQ signs it (reconcile's block, and its lift)."""
    from tests.support import test_hq_key
    from wire.messages import DenyDelta
    from wire.signing import sign
    doc = {"version": gw.rules.deny_version + 1, "issued_at": int(T0), "entries": entries}
    return DenyDelta(sign(doc, test_hq_key())).encode()


def hq_block(gw: Gateway, card: str) -> None:
    assert gw.rules.apply_deny(hq_delta(gw, [{"card_no": card, "status": "blocked", "since": "2026-11-20"}]))


async def test_a_blocked_card_buys_and_tops_up_but_spends_nothing(gw):
    hq_block(gw, GOLD)                       # GOLD: 5,230 points, 200.00 yuan, coupon C2026-0001, car_wash10 x3
    v = await tap(gw, GOLD)
    assert (v.verdict, v.reason) == ("accept_limited", "blocked")
    depth = await journal_depth(gw)
    for n, (tender, field) in enumerate([({"stored_value_fen": 1000}, "tender.stored_value_fen"),
                                         ({"points": 500}, "tender.points"),
                                         ({"coupons": ["C2026-0001"]}, "tender.coupons")]):
        await tap(gw, GOLD)
        with pytest.raises(PricingError) as refused:
            await gw.counter.sale("1", {"idempotency_key": f"blocked-spend-{n}", "lines": basket(5000),
                                        "tender": tender})
        assert (refused.value.code, refused.value.field) == ("member_limited", field)
    await tap(gw, GOLD)
    with pytest.raises(PricingError) as refused:
        await gw.counter.use_package("1", "car_wash10", {"idempotency_key": "blocked-pkg-01"})
    assert refused.value.code == "member_blocked" and refused.value.text["en"]
    assert await journal_depth(gw) == depth                                 # nothing written
    q = gw.counter.quote("1", {"lines": basket(5000)})
    assert q["available"]["stored_value"]["max_fen"] == 0 and q["member"]["reason"] == "blocked"

    sale = await gw.counter.sale("1", {"idempotency_key": "blocked-cash-01", "lines": basket(5000)})
    assert sale.response["tender"]["stored_value_fen"] == 0 and sale.response["points_earned"] > 0  # accrues

    await tap(gw, GOLD)                                                      # a top-up to settle
    top = await gw.counter.topup("1", {"idempotency_key": "blocked-top-01", "amount_fen": 5000, "payment": CASH})
    assert top.response["record"]["credit_fen"] == 5000
    v = await tap(gw, GOLD)
    assert v.reason == "blocked" and v.member["balance_fen"] == 25000      # still HQ's to lift


async def test_a_counter_unfreeze_does_not_lift_hqs_block(gw):
    hq_block(gw, GOLD)
    depth = await journal_depth(gw)
    with pytest.raises(CounterError) as refused:
        await gw.counter.card_service({"idempotency_key": "blocked-unfrz-1", "kind": "unfreeze", "card_no": GOLD})
    assert (refused.value.code, refused.value.status) == ("card_blocked", 409)
    assert refused.value.text["zh-CN"] and refused.value.text["en"]
    assert await journal_depth(gw) == depth
    assert (await tap(gw, GOLD)).reason == "blocked"
    # a freeze made here on top of the block: the desk lifts its own freeze, the block stays
    frozen = await gw.counter.card_service({"idempotency_key": "blocked-frz-01", "kind": "freeze", "card_no": GOLD})
    assert frozen.response["status_before"] == "blocked"
    assert (await tap(gw, GOLD)).reason == "frozen"
    done = await gw.counter.card_service({"idempotency_key": "blocked-unfrz-2", "kind": "unfreeze", "card_no": GOLD})
    assert done.response["status_before"] == "frozen" and done.response["hq_decides"] is True
    assert (await tap(gw, GOLD)).reason == "blocked"


async def test_hqs_lift_of_a_block_makes_the_card_fully_usable(gw):
    hq_block(gw, GOLD)
    assert (await tap(gw, GOLD)).reason == "blocked"
    assert gw.rules.apply_deny(hq_delta(gw, [{"card_no": GOLD, "status": "active"}]))   # settled at HQ
    v = await tap(gw, GOLD)
    assert (v.verdict, v.reason) == ("accept", "ok")
    sale = await gw.counter.sale("1", {"idempotency_key": "lifted-sale-01", "lines": basket(10000),
                                       "tender": {"stored_value_fen": 3000, "points": 500}})
    assert sale.response["tender"]["stored_value_fen"] == 3000
    await tap(gw, GOLD)
    used = await gw.counter.use_package("1", "car_wash10", {"idempotency_key": "lifted-pkg-01"})
    assert used.response["record"]["remaining_after"] == 2
