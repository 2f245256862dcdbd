"""Reconciliation's ``limit`` reaches every store at once, end to end on real
parts (real mosquitto, a real HQ bridge process, two real gateway processes
behind their own links: tests/test_e2e_accounts.py's Chain).

Both stores spend the same stored value offline; HQ finds the overdraft and,
under ``overdraft_policy = "limit"``, sends every active card of the account
to every store as ``limited`` in a signed deny delta (offline: identified,
accrues, nothing to spend; online: HQ's live answer decides), before any new
member snapshot. A store restarted keeps it. A 附属卡 issued at one store's
counter on the limited account goes to the other store ``limited`` too.
Settled (a top-up), every one of those cards is lifted at both stores.
"""

from __future__ import annotations

import pytest

import tests.test_e2e_accounts as e2e
from tests.support import wait_until
from tests.test_e2e_accounts import RECON, RICE, Chain, lines

NEWSUB = "880000000708"
NOTHING = {"stored_value": False, "redemption": False, "coupons": False}


@pytest.fixture
def chain(tmp_path, broker, monkeypatch):
    monkeypatch.setattr(e2e, "CHAIN", e2e.CHAIN.replace('overdraft_policy = "block"', 'overdraft_policy = "limit"'))
    c = Chain(tmp_path, broker, None)
    try:
        c.start()
        yield c
    finally:
        c.close()


def test_limit_and_its_lift_reach_every_store_at_once_new_cards_included(chain):
    a, b = chain.stores["S001"], chain.stores["S002"]
    assert a.tap(RECON)["balance_fen"] == b.tap(RECON)["balance_fen"] == 30000
    deny = {s.id: s.status()["deny_version"] for s in (a, b)}
    rules = {s.id: s.status()["rules_version"] for s in (a, b)}
    a.go_offline()
    b.go_offline()
    chain.sell(a, RECON, lines((RICE, 5)), sv=25000)             # each within its offline limits
    chain.sell(b, RECON, lines((RICE, 4)), sv=20000)
    a.proxy.restore()
    b.proxy.restore()
    a.go_online()
    b.go_online()

    account = chain.hq_view(RECON)
    assert [(o["kind"], o["amount"], o["action"]) for o in account["overdrafts"]] == [("stored_value", 15000, "limit")]
    # the limit went out at once as a signed deny delta, no new snapshot
    for st in (a, b):
        wait_until(lambda: st.status()["deny_version"] == deny[st.id] + 1, timeout=20, what=f"the limit at {st.id}")
        assert st.status()["rules_version"] == rules[st.id]

    # offline, on the snapshot from before the overdraft: identified, nothing to spend, the reason names it
    for st in (a, b):
        st.go_offline()
        v = st.verdict(RECON)
        assert (v["verdict"], v["reason"]) == ("accept_limited", "limited"), v
        assert v["member"]["source"] == "snapshot" and v["member"]["allowed"] == NOTHING
        assert v["text"]["zh-CN"] and "limited" in v["text"]["en"]
        status, refused = st.call("POST", "/lanes/1/quote", {"lines": lines((RICE, 1)),
                                                             "tender": {"stored_value_fen": 1000}})
        assert status >= 400 and refused["error"]["code"] == "member_limited", refused
    # a store restarted keeps it
    a.gw.stop()
    a.gw.start()
    assert a.verdict(RECON)["reason"] == "limited"
    a.go_online()
    b.go_online()

    # online: HQ's live answer decides (it holds the limited account's allowances back too)
    live = wait_until(lambda: (a.verdict(RECON)["member"] or {}).get("source") == "live" and a.verdict(RECON),
                      timeout=30, what="HQ answering S001's look-ups again")
    assert (live["verdict"], live["member"]["balance_fen"]) == ("accept", 0) and "limited" in live["member"]["limits"]

    # a 附属卡 issued at S001's counter on the limited account reaches S002 as limited at once
    status, issued = a.call("POST", "/cards/services", {"idempotency_key": "S001-sub-000001",
                                                        "kind": "issue_subsidiary", "card_no": RECON,
                                                        "new_card_no": NEWSUB}, role="service_desk")
    assert status == 201, issued
    a.drained()
    wait_until(lambda: b.status()["deny_version"] >= deny["S002"] + 2, timeout=20, what="the new card at S002")
    b.go_offline()
    v = b.verdict(NEWSUB)
    assert (v["verdict"], v["reason"]) == ("accept_limited", "limited"), v   # before: member_not_in_snapshot
    b.go_online()

    # settled by a top-up at S001: the account's cards, the new one too, are lifted at both stores
    after = {s.id: s.status()["deny_version"] for s in (a, b)}
    # (by the API, not chain.top_up: its live check would meet a known gap, see the report: HQ's live answer
    # for a limited account says 0, not the debt, so the top-up shows whole until HQ has applied it)
    a.verdict(RECON)
    status, top = a.call("POST", "/lanes/1/topups", {"idempotency_key": "S001-topup-000001", "amount_fen": 20000,
                                                     "payment": {"method": "cash"}})
    assert status == 201, top
    a.drained()
    for st in (a, b):
        wait_until(lambda: st.status()["deny_version"] == after[st.id] + 1, timeout=20, what=f"the lift at {st.id}")
    assert chain.hq_view(RECON)["overdrafts"] == []
    b.go_offline()
    lifted = b.verdict(RECON)
    assert (lifted["verdict"], lifted["member"]["source"]) == ("accept", "snapshot"), lifted
    assert lifted["member"]["allowed"]["stored_value"] is True
    assert b.verdict(NEWSUB)["reason"] == "member_not_in_snapshot"     # lifted: no longer limited
