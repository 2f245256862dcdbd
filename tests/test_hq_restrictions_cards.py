"""HQ's hold on an overdrawn account (reconciliation ``block`` / ``limit``)
reaches every store with the cards issued on it: a replacement (补办) or a
附属卡, made at a store's counter (the records go through AccountStore with
reconcile_hook, as the ledger commits them) or at HQ (members.card_op), goes
out at once with the account's ``blocked`` / ``limited`` and is lifted with
the account. SQLite and PostgreSQL. Then the gateway side of ``limited``."""

from __future__ import annotations

import pytest

from hq_bridge.accounts import AccountStore
from hq_bridge.members import card_op, deny_entries
from hq_bridge.reconcile import reconcile_hook
from tests.hq_support import commit, topup_body, tx
from tests.pg import hq_db_url, hq_engine, pg_server  # noqa: F401  (fixtures)
from tests.test_reconcile import CARD, SUB, clock, rules, setup, snapshot, two_stores_spend

NEW, NEW2 = "880000000526", "880000000534"


@pytest.fixture
def engine(hq_engine):
    return hq_engine


def counter_op(seq: int, op: str, card: str, **kw) -> object:
    body = {"type": "card_op", "v": 1, "at": "2026-11-25T15:00:00+08:00", "member_id": "M500", "op": op,
            "card_no": card, "new_card_no": None, "fee_fen": 0, "status_after": "active", "deltas": {},
            "reason": None, "account_id": "M500", "day": "2026-11-25", "terminal": "desk",
            "idempotency_key": f"desk/op-{seq:05d}", **kw}
    return tx(seq, body)


@pytest.mark.parametrize("policy,held", [("block", "blocked"), ("limit", "limited")])
def test_cards_issued_at_a_counter_on_a_held_account_go_out_held_and_are_lifted_with_it(engine, policy, held):
    store = AccountStore(engine, clock=clock, hooks=[reconcile_hook(rules(policy), clock=clock)])
    setup(engine)
    _a, b = two_stores_spend(engine, store)
    assert {c[2] for c in b.hq_cards_changed} == {held}
    # S001's counter: a replacement of the primary card, then a 附属卡 on it
    res = commit(engine, store, "S001", [counter_op(2, "replace", CARD, new_card_no=NEW, status_after="replaced")])
    assert res.hq_cards_changed == [(NEW, None, held, None)]        # before the fix: [] (a plain member elsewhere)
    assert [(e["card_no"], e["status"]) for e in deny_entries(res.hq_cards_changed)] == [(NEW, held)]
    res = commit(engine, store, "S001", [counter_op(3, "issue_subsidiary", NEW2, primary_card_no=NEW)])
    assert res.hq_cards_changed == [(NEW2, None, held, None)]
    assert {no: r["status"] for no, r in snapshot(engine).items() if no in (CARD, SUB, NEW, NEW2)} == \
        {CARD: "replaced", SUB: held, NEW: held, NEW2: held}
    # settled: every active card of the account is lifted, the new ones too
    res = commit(engine, store, "S002", [tx(2, topup_body(SUB, "M500", 5000, key="t"))])
    assert sorted(res.hq_cards_changed) == [(SUB, held, "active", None), (NEW, held, "active", None),
                                            (NEW2, held, "active", None)]
    assert {e["status"] for e in deny_entries(res.hq_cards_changed)} == {"active"}


def test_a_counter_card_on_an_account_nobody_holds_is_not_broadcast(engine):
    store = AccountStore(engine, clock=clock, hooks=[reconcile_hook(rules("limit"), clock=clock)])
    setup(engine)
    res = commit(engine, store, "S001", [counter_op(1, "replace", CARD, new_card_no=NEW, status_after="replaced")])
    assert res.hq_cards_changed == []


@pytest.mark.parametrize("op,card,new", [("replace", CARD, NEW), ("issue_subsidiary", CARD, NEW2)])
def test_cards_issued_at_hq_on_a_limited_account_go_out_limited(engine, op, card, new):
    store = AccountStore(engine, clock=clock, hooks=[reconcile_hook(rules("limit"), clock=clock)])
    setup(engine)
    two_stores_spend(engine, store)
    with engine.begin() as conn:
        res = card_op(conn, op, card, new_card_no=new, clock=clock)
    assert (new, None, "limited", None) in res.cards_changed          # before the fix: "active"
    assert {e["card_no"]: e["status"] for e in deny_entries(res.cards_changed, "2026-11-25")}[new] == "limited"
    assert snapshot(engine)[new]["status"] == "limited"
    with engine.begin() as conn:
        frozen = card_op(conn, "freeze", SUB, clock=clock)
        thawed = card_op(conn, "unfreeze", SUB, clock=clock)
    assert frozen.cards_changed == [(SUB, "limited", "frozen", None)]
    assert deny_entries(thawed.cards_changed, "2026-11-25") == [{"card_no": SUB, "status": "limited",
                                                                 "since": "2026-11-25"}]   # not a lift


def test_limited_is_not_set_by_hand():
    from hq_bridge.rules import PublishError, card_entries

    with pytest.raises(PublishError, match="reconciliation"):
        card_entries("deny", CARD, status="limited")


# -- the gateway: what "limited" means at a store (in-process, offline) -------------------------------------------

async def test_a_limited_card_offline_accrues_and_tops_up_but_spends_nothing_and_only_hq_lifts_it(gw):
    from gateway.core.pricing import PricingError
    from gateway.shell.counter import CounterError
    from tests.test_counter import CASH, GOLD, basket, hq_delta, tap

    assert gw.rules.apply_deny(hq_delta(gw, [{"card_no": GOLD, "status": "limited", "since": "2026-11-20"}]))
    v = await tap(gw, GOLD)
    assert (v.verdict, v.reason) == ("accept_limited", "limited")
    assert v.public()["text"]["zh-CN"] and "limited" in v.public()["text"]["en"]
    with pytest.raises(PricingError) as refused:
        await gw.counter.sale("1", {"idempotency_key": "limited-spend-1", "lines": basket(5000),
                                    "tender": {"stored_value_fen": 1000}})
    assert refused.value.code == "member_limited"
    await tap(gw, GOLD)
    with pytest.raises(PricingError) as refused:
        await gw.counter.use_package("1", "car_wash10", {"idempotency_key": "limited-pkg-01"})
    assert refused.value.code == "member_limited"
    await tap(gw, GOLD)
    sale = await gw.counter.sale("1", {"idempotency_key": "limited-cash-01", "lines": basket(5000)})
    assert sale.response["points_earned"] > 0                                # accrues
    await tap(gw, GOLD)
    top = await gw.counter.topup("1", {"idempotency_key": "limited-top-01", "amount_fen": 5000, "payment": CASH})
    assert top.response["record"]["credit_fen"] == 5000
    with pytest.raises(CounterError) as refused:
        await gw.counter.card_service({"idempotency_key": "limited-unfrz-1", "kind": "unfreeze", "card_no": GOLD})
    assert (refused.value.code, refused.value.status) == ("card_limited", 409)
    assert gw.rules.apply_deny(hq_delta(gw, [{"card_no": GOLD, "status": "active"}]))   # HQ: settled, lifted
    assert (await tap(gw, GOLD)).verdict == "accept"


def test_a_subsidiary_of_a_limited_primary_is_limited_and_a_live_answer_decides():
    from datetime import datetime, timezone

    from gateway.core import validate as engine
    from gateway.core.members import InMemoryMembers, LiveCache
    from hq_bridge.rules import _read_doc
    from tests.support import RULES_FILE

    prim = {"card_no": "880000000013", "member_id": "M1", "tier": "normal", "balance_fen": 20000, "points": 500}
    sub = {"card_no": "880000000021", "member_id": "M2", "tier": "normal", "primary_card": "880000000013"}
    members = InMemoryMembers([prim, sub], version=1, store_seq=0)
    members.apply_deny_delta(1, {"880000000013": {"status": "limited", "since": "2026-11-20"}})
    now = datetime.now(timezone.utc)
    rules = engine.Rules.from_rule_set(_read_doc(RULES_FILE), version=2, issued_at=int(now.timestamp()),
                                       members=members)
    assert engine.validate("magstripe", "880000000021", rules, now).reason == "limited"
    # online: HQ's live answer says the account is active again (its lift still on its way): it decides
    members.live = LiveCache(60)
    members.live.put("880000000013", {**prim, "status": "active"}, None, 0, 0, now.timestamp())
    v = engine.validate("magstripe", "880000000013", rules, now)
    assert (v.verdict, v.member["source"], v.member["balance_fen"]) == ("accept", "live", 20000)


@pytest.fixture
async def gw(tmp_path):
    from gateway.shell.service import Gateway
    from tests.test_counter import T0, config, install

    async with Gateway(config(tmp_path), clock=lambda: T0) as g:
        install(g)
        yield g
