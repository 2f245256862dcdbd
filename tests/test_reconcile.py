"""Reconciliation (hq_bridge/reconcile.py) on SQLite and PostgreSQL: two stores
spend the same balance offline, the records go through AccountStore.apply_batch
as the ledger commits them, HQ reports the exact overdraft per member, applies
the chain's policy (carry, limit, block) and lifts it when settled."""

from __future__ import annotations

import argparse
import io
import json

import pytest
import sqlalchemy as sa

from hq_bridge import db, reconcile as rc_mod
from hq_bridge.accounts import AccountStore, audit, import_members, snapshot_rows
from hq_bridge.members import deny_entries
from hq_bridge.reconcile import reconcile, reconcile_hook, settle
from tests.hq_support import NOW, RULES, commit, sale_body, topup_body, tx
from tests.pg import hq_db_url, hq_engine, pg_server  # noqa: F401  (fixtures)

CARD, SUB = "880000000500", "880000000518"


@pytest.fixture
def engine(hq_engine):
    return hq_engine


def clock():
    return NOW.timestamp()


def rules(policy: str, **kw) -> dict:
    return {**RULES, "reconciliation": {"overdraft_policy": policy, **kw}}


def setup(engine, coupons=()):
    with engine.begin() as conn:
        import_members(conn, [{"card_no": CARD, "member_id": "M500", "tier": "normal", "balance_fen": 10000,
                               "points": 3000, "coupons": list(coupons)},
                              {"card_no": SUB, "member_id": "M500-2", "tier": "normal", "primary_card": CARD},
                              {"card_no": "880000000609", "member_id": "M600", "tier": "normal",
                               "balance_fen": 50000}], clock=clock)


def two_stores_spend(engine, store, sv=(8000, 7000), red=(0, 0), coupons=()):
    """S001 and S002, both offline from the same snapshot, each spend from M500."""
    a = commit(engine, store, "S001", [tx(1, sale_body(CARD, "M500", sv=sv[0], red=red[0], coupons=coupons,
                                                       key="a"))])
    b = commit(engine, store, "S002", [tx(1, sale_body(SUB, "M500", sv=sv[1], red=red[1], coupons=coupons,
                                                       key="b"))])
    assert a.applied == [1] and b.applied == [1]
    return a, b


def snapshot(engine, store="S001"):
    with engine.begin() as conn:
        return {r["card_no"]: r for r in snapshot_rows(conn, store)}


def test_two_stores_spend_the_same_stored_value_block_until_settled(engine):
    store = AccountStore(engine, clock=clock)
    setup(engine)
    two_stores_spend(engine, store)
    with engine.begin() as conn:
        res = reconcile(conn, rules("block"), clock=clock)
        assert audit(conn) == []
    [od] = res.overdrafts
    assert (od.account_id, od.kind, od.amount, od.action, od.state, od.new) == ("M500", "stored_value", 5000, "block",
                                                                               "open", True)
    assert [(r["store"], r["seq"], r["amount"]) for r in od.records] == [("S001", 1, 8000), ("S002", 1, 7000)]
    assert od.card_no == CARD
    # block: the account's cards are blocked (欠款冻结) at every store
    assert sorted(res.cards_changed) == [(CARD, "active", "blocked", None), (SUB, "active", "blocked", None)]
    assert {e["status"] for e in deny_entries(res.cards_changed)} == {"blocked"}
    snap = snapshot(engine)
    assert snap[CARD]["status"] == snap[SUB]["status"] == "blocked" and snap[CARD]["balance_fen"] == -5000   # owed
    assert snap["880000000609"]["status"] == "active"
    with engine.begin() as conn:    # reconciling again finds nothing new and changes nothing
        again = reconcile(conn, rules("block"), clock=clock)
    assert [(o.amount, o.new) for o in again.overdrafts] == [(5000, False)] and again.cards_changed == []

    # A top-up of less than the overdraft pays part of it: still blocked, the amount follows.
    commit(engine, store, "S001", [tx(2, topup_body(CARD, "M500", 3000, key="t1"))])
    with engine.begin() as conn:
        res = reconcile(conn, rules("block"), clock=clock)
    assert [(o.amount, o.state) for o in res.overdrafts] == [(2000, "open")] and res.cards_changed == []
    # Settled: the rest topped up lifts the block.
    commit(engine, store, "S002", [tx(2, topup_body(SUB, "M500", 2000, key="t2"))])
    with engine.begin() as conn:
        res = reconcile(conn, rules("block"), clock=clock)
        row = conn.execute(sa.select(rc_mod.overdrafts)).mappings().one()
        assert audit(conn) == []
    assert res.overdrafts == [] and [(o.kind, o.state) for o in res.settled] == [("stored_value", "settled")]
    assert sorted(res.cards_changed) == [(CARD, "blocked", "active", None), (SUB, "blocked", "active", None)]
    assert deny_entries(res.cards_changed)[0]["status"] == "active"
    assert (row["state"], row["settled_by"]) == ("settled", "auto")
    assert snapshot(engine)[CARD]["status"] == "active"


def test_limit_holds_the_offline_balances_until_settled_and_sends_the_debt(engine):
    store = AccountStore(engine, clock=clock)
    setup(engine, coupons=["C1"])
    two_stores_spend(engine, store, sv=(6000, 6000), red=(1000, 1000))
    with engine.begin() as conn:
        res = reconcile(conn, rules("limit", tolerance_points=0), clock=clock)
    assert {(o.kind, o.amount, o.action) for o in res.overdrafts} == {("stored_value", 2000, "limit")}
    # limit: the account's cards go to every store at once as "limited" (欠款限用), the snapshot rows agree
    assert res.limited == ["M500"]
    assert sorted(res.cards_changed) == [(CARD, "active", "limited", None), (SUB, "active", "limited", None)]
    assert {e["status"] for e in deny_entries(res.cards_changed)} == {"limited"}
    row = snapshot(engine)[CARD]
    # nothing to spend; the debt goes as it is, so a top-up at a store counts from it
    assert (row["status"], row["balance_fen"], row["points"], row.get("coupons")) == ("limited", -2000, 0, None)
    assert snapshot(engine)[SUB]["status"] == "limited"
    with engine.begin() as conn:    # still limited: nothing told again
        assert reconcile(conn, rules("limit", tolerance_points=0), clock=clock).cards_changed == []
    commit(engine, store, "S001", [tx(2, topup_body(CARD, "M500", 5000, key="t"))])
    with engine.begin() as conn:
        res = reconcile(conn, rules("limit"), clock=clock)
    assert res.unlimited == ["M500"] and res.overdrafts == []
    assert sorted(res.cards_changed) == [(CARD, "limited", "active", None), (SUB, "limited", "active", None)]
    assert [e["status"] for e in deny_entries(res.cards_changed)] == ["active", "active"]    # lifted
    row = snapshot(engine)[CARD]
    assert (row["status"], row["balance_fen"], row["points"], row["coupons"]) == ("active", 3000, 1000, ["C1"])


def test_points_coupon_and_daily_allowance_overdrafts(engine):
    store = AccountStore(engine, clock=clock)
    setup(engine, coupons=["C1"])
    two_stores_spend(engine, store, sv=(60000 // 10, 0), red=(2000, 2000), coupons=("C1",))
    commit(engine, store, "S001", [tx(2, sale_body("880000000609", "M600", sv=30000, key="c"))])
    commit(engine, store, "S002", [tx(2, sale_body("880000000609", "M600", sv=15000, key="d"))])
    with engine.begin() as conn:
        res = reconcile(conn, rules("carry"), clock=clock)
        assert audit(conn) == []
    got = {(o.account_id, o.kind, o.ref): (o.amount, o.action, o.state) for o in res.overdrafts}
    assert got[("M500", "points", "")] == (1000, "carry", "open")          # 3000 held, 4000 redeemed at two stores
    assert got[("M500", "coupon", "C1")] == (1, "carry", "open")           # used twice
    assert ("M500", "stored_value", "") not in got                         # 6000 of 10000: fine
    # M600: 450.00 at two stores in one day, 1000.00 allowed: not over; tighten the cap to 400.00
    assert not any(k[1] == "day_stored_value" for k in got)
    tight = rules("block")
    tight["stored_value"] = {**RULES["stored_value"], "offline_max_per_day_fen": 40000}
    with engine.begin() as conn:
        res = reconcile(conn, tight, clock=clock)
    got = {(o.account_id, o.kind, o.ref): o for o in res.overdrafts}
    day = got[("M600", "day_stored_value", "2026-11-25")]
    assert (day.amount, day.action, day.state) == (5000, "carry", "settled")   # reported, never blocks
    assert got[("M500", "coupon", "C1")].action == "block"
    assert sorted(c[0] for c in res.cards_changed) == [CARD, SUB]
    # A coupon is settled by hand (its value paid at the desk); points settle when earned back.
    with engine.begin() as conn:
        out = settle(conn, "M500", "coupon", "C1", user="alice", clock=clock)
    assert out.cards_changed == []                                          # the points overdraft is still open
    commit(engine, store, "S001", [tx(3, sale_body(CARD, "M500", earned=1000, key="e"))])
    with engine.begin() as conn:
        res = reconcile(conn, tight, clock=clock)
        hist = [h.detail for h in AccountStore().history(conn, "M500") if h.kind == "reconcile"]
        assert audit(conn) == []
    assert sorted(c[:3] for c in res.cards_changed) == [(CARD, "blocked", "active"), (SUB, "blocked", "active")]
    assert any(d.get("settled") == "coupon" for d in hist) and any(d.get("overdraft") == "points" for d in hist)


def test_on_ingest_hook_finds_coupons_and_daily_allowances_without_a_balance_overdraft(engine):
    """Before, the hook looked only at accounts overdrawn: a coupon used at two
    stores, or a day's allowance overrun at two, waited for ``reconcile``."""
    tight = rules("block")
    tight["stored_value"] = {**RULES["stored_value"], "offline_max_per_day_fen": 40000}
    store = AccountStore(engine, clock=clock, hooks=[reconcile_hook(tight, clock=clock)])
    setup(engine, coupons=["C1"])
    a, b = two_stores_spend(engine, store, sv=(1000, 1000), coupons=("C1",))
    assert a.overdrafts == [] and [(o.kind, o.ref, o.amount, o.action) for o in b.overdrafts] == [
        ("coupon", "C1", 1, "block")]
    assert sorted(b.hq_cards_changed) == [(CARD, "active", "blocked", None), (SUB, "active", "blocked", None)]
    c = commit(engine, store, "S001", [tx(2, sale_body("880000000609", "M600", sv=30000, key="c"))])
    d = commit(engine, store, "S002", [tx(2, sale_body("880000000609", "M600", sv=15000, key="d"))])
    assert c.overdrafts == [] and d.hq_cards_changed == []      # reported, never blocks
    assert [(o.account_id, o.kind, o.ref, o.amount, o.state) for o in d.overdrafts] == [
        ("M600", "day_stored_value", "2026-11-25", 5000, "settled")]
    with engine.begin() as conn:
        kept = {(r.account_id, r.kind) for r in conn.execute(sa.select(rc_mod.overdrafts))}
        assert audit(conn) == []
    assert kept == {("M500", "coupon"), ("M600", "day_stored_value")}


def test_on_ingest_hook_blocks_and_lifts_at_once(engine):
    store = AccountStore(engine, clock=clock, hooks=[reconcile_hook(rules("block"), clock=clock)])
    setup(engine)
    a, b = two_stores_spend(engine, store)
    assert a.hq_cards_changed == [] and b.cards_changed == []      # HQ's decision, not the store's records
    assert sorted(b.hq_cards_changed) == [(CARD, "active", "blocked", None), (SUB, "active", "blocked", None)]
    assert [(o.kind, o.amount) for o in b.overdrafts] == [("stored_value", 5000)]
    res = commit(engine, store, "S001", [tx(2, topup_body(CARD, "M500", 5000, key="t"))])
    assert sorted(res.hq_cards_changed) == [(CARD, "blocked", "active", None), (SUB, "blocked", "active", None)]
    assert [e["status"] for e in deny_entries(res.hq_cards_changed)] == ["active", "active"]   # lifts go out
    with engine.begin() as conn:
        assert audit(conn) == []


def test_reconcile_cli_table_and_json(engine, capsys):
    store = AccountStore(engine, clock=clock)
    setup(engine)
    two_stores_spend(engine, store)
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    rc_mod.register(sub)
    out = io.StringIO()
    assert rc_mod.run(parser.parse_args(["reconcile", "--config", "x", "--json"]), engine, out=out) == 0
    doc = json.loads(out.getvalue())
    assert doc["totals"]["stored_value"] == 5000 and doc["overdrafts"][0]["account_id"] == "M500"
    out = io.StringIO()
    published = []
    assert rc_mod.run(parser.parse_args(["reconcile", "--config", "x"]), engine, out=out,
                      publish=lambda e, why: published.append(e)) == 0
    assert "M500" in out.getvalue() and "50.00" in out.getvalue() and "S001/1, S002/1" in out.getvalue()
    assert published == []          # carry (no rules stored): nothing to deny


def test_hqs_card_services_never_lift_a_block_only_settling_does(engine):
    """A blocked account's cards (欠款冻结) stay ``blocked`` at the stores
    through HQ's own card services: ``card unfreeze`` on its active card is
    refused (the deny list's ``active`` would lift the block everywhere), a
    freeze lifted again, and a replacement card, go out as ``blocked``; a
    block is not set by hand either. Settling lifts what is active."""
    from hq_bridge.members import MemberError, card_op, deny_list_action
    from hq_bridge.rules import PublishError, card_entries

    store = AccountStore(engine, clock=clock)
    setup(engine)
    two_stores_spend(engine, store)
    with engine.begin() as conn:
        reconcile(conn, rules("block"), clock=clock)
    for unfreeze in (lambda c: card_op(c, "unfreeze", CARD, clock=clock),
                     lambda c: deny_list_action(c, "unfreeze", CARD, reason="member asked", clock=clock)):
        with engine.begin() as conn, pytest.raises(MemberError, match="blocked for an overdraft"):
            unfreeze(conn)
    with pytest.raises(PublishError, match="reconciliation"):
        card_entries("deny", CARD, status="blocked")
    with engine.begin() as conn:
        frozen = card_op(conn, "freeze", CARD, clock=clock)
        thawed = card_op(conn, "unfreeze", CARD, clock=clock)
        new = card_op(conn, "replace", SUB, new_card_no="880000000526", clock=clock)
    assert frozen.cards_changed == [(CARD, "blocked", "frozen", None)]
    assert deny_entries(thawed.cards_changed, "2026-11-25") == [{"card_no": CARD, "status": "blocked",
                                                                 "since": "2026-11-25"}]   # not a lift
    assert sorted((e["card_no"], e["status"]) for e in deny_entries(new.cards_changed)) == \
        [(SUB, "replaced"), ("880000000526", "blocked")]
    assert snapshot(engine)["880000000526"]["status"] == "blocked"

    commit(engine, store, "S001", [tx(2, topup_body(CARD, "M500", 5000, key="t"))])    # settled
    with engine.begin() as conn:
        res = reconcile(conn, rules("block"), clock=clock)
    assert sorted(res.cards_changed) == [(CARD, "blocked", "active", None),
                                         ("880000000526", "blocked", "active", None)]
    assert {r["status"] for r in snapshot(engine).values()} == {"active", "replaced"}
