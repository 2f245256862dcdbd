"""Policy that moves accounts over time (hq_bridge/policy.py) on SQLite and
PostgreSQL: tier upgrades on ingest and nightly, downgrades nightly, points
expiry (rolling and fixed date, oldest lots first), top-up refunds taking the
bonus back first, withdrawals — and every balance still the sum of its history."""

from __future__ import annotations

import argparse
import io
import json
from datetime import date

import pytest

from hq_bridge import db, policy as pol
from hq_bridge.accounts import AccountPolicy, AccountStore, audit, import_members, lot_expiry, policy_from_rules
from hq_bridge.members import account_view
from hq_bridge.policy import (PolicyError, decide_tier, expire_points, nightly, tier_hook,
                              topup_refund, withdraw)
from tests.hq_support import NOW, RULES, commit, sale_body, topup_body, tx
from tests.pg import hq_db_url, hq_engine, pg_server  # noqa: F401  (fixtures)
from wire.ruleset import RulesetError, effective_ruleset

CARD = "880000000017"


@pytest.fixture
def engine(hq_engine):
    return hq_engine


def at(days: float):
    return lambda: NOW.timestamp() + days * 86400


def clock():
    return NOW.timestamp()


def setup(engine, points=0, balance=0, tier="normal", policy=None):
    with engine.begin() as conn:
        import_members(conn, [{"card_no": CARD, "member_id": "M1", "tier": tier, "points": points,
                               "balance_fen": balance}], clock=clock, policy=policy)


def view(engine):
    with engine.begin() as conn:
        assert audit(conn) == []
        return account_view(conn, CARD, history=50)


# ---------------------------------------------------------------- the rule set

def test_rule_set_accepts_the_new_keys_and_names_mistakes():
    from tests.test_ruleset import BASE
    ok = {**BASE, "tiers": {"t1": {**BASE["tiers"]["t1"]},
                            "t2": {**BASE["tiers"]["t2"], "upgrade": {"spend_fen": 500000, "window_days": 365},
                                   "downgrade": {"points_earned": 100, "to": "t1"}}},
          "accounts": {"points_expiry_months": 24, "withdrawal": "paid_part"},
          "reconciliation": {"overdraft_policy": "block", "tolerance_fen": 100}}
    effective_ruleset([ok])
    for path, value, msg in [
        (("tiers", "t2", "upgrade"), {"window_days": 30}, "tiers.t2.upgrade: names neither spend_fen nor points_earned"),
        (("tiers", "t2", "downgrade"), {"spend_fen": 1, "to": "t3"}, "tiers.t2.downgrade.to: unknown tier 't3'"),
        (("tiers", "t1", "downgrade"), {"spend_fen": 1, "to": "t2"}, "tiers.t1.downgrade.to: tier 't2' is not below"),
        (("reconciliation",), {"overdraft_policy": "forgive"}, "reconciliation.overdraft_policy"),
        (("accounts",), {"points_expiry_months": 12, "points_expiry_date": "12-31"}, "not both"),
    ]:
        bad = json.loads(json.dumps(ok))
        cur = bad
        for k in path[:-1]:
            cur = cur[k]
        cur[path[-1]] = value
        with pytest.raises(RulesetError, match=msg.replace("(", r"\(").replace(")", r"\)")):
            effective_ruleset([bad])


def test_lot_expiry_rolling_and_fixed():
    assert lot_expiry(date(2026, 11, 25), AccountPolicy(points_expiry_months=12)) == "2027-11-30"
    fixed = AccountPolicy(points_expiry_date="12-31", points_expiry_years=1)
    assert lot_expiry(date(2026, 11, 25), fixed) == "2027-12-31"
    assert lot_expiry(date(2026, 12, 31), fixed) == "2027-12-31"
    same_year = AccountPolicy(points_expiry_date="06-30", points_expiry_years=0)
    assert lot_expiry(date(2026, 3, 1), same_year) == "2026-06-30"
    assert lot_expiry(date(2026, 7, 1), same_year) == "2027-06-30"      # past this year's date: next year's
    p = policy_from_rules({"default_tier": "normal", "accounts": {"points_expiry_date": "12-31", "withdrawal": "none"}})
    assert (p.points_expiry_date, p.points_expiry_years, p.default_tier) == ("12-31", 1, "normal")


def test_decide_tier_is_pure():
    t = {365: (120000, 0)}
    assert decide_tier("normal", t, 0, RULES, nightly=False) == ("silver", "upgrade", 365)
    assert decide_tier("normal", {365: (600000, 0)}, 0, RULES, nightly=False) == ("gold", "upgrade", 365)
    assert decide_tier("gold", {365: (0, 0)}, 400, RULES, nightly=False) is None          # never down on ingest
    assert decide_tier("gold", {365: (0, 0)}, 300, RULES, nightly=True) is None           # held < window
    assert decide_tier("gold", {365: (0, 0)}, 400, RULES, nightly=True) == ("normal", "downgrade", 365)
    assert decide_tier("gold", {365: (150000, 0)}, 400, RULES, nightly=True) == ("silver", "downgrade", 365)
    assert decide_tier("gold", {365: (200000, 0)}, 400, RULES, nightly=True) is None      # kept
    assert decide_tier("unknown", {365: (10 ** 9, 0)}, 0, RULES, nightly=True) is None


# ---------------------------------------------------------------- tiers

def test_tiers_move_up_on_ingest_and_down_nightly(engine):
    setup(engine)
    store = AccountStore(engine, clock=clock, hooks=[tier_hook(RULES, clock=clock)])
    res = commit(engine, store, "S001", [tx(1, sale_body(CARD, "M1", net=60000, key="a"))])   # cash, no points
    assert res.tier_moves == [] and view(engine)["tier"] == "normal"
    res = commit(engine, store, "S001", [tx(2, sale_body(CARD, "M1", net=60000, earned=600, key="b"))])
    assert [(m.before, m.after, m.rule, m.spend_fen) for m in res.tier_moves] == [("normal", "silver", "upgrade",
                                                                                   120000)]
    res = commit(engine, store, "S002", [tx(1, sale_body(CARD, "M1", net=400000, key="c"))])
    assert [(m.after, m.spend_fen) for m in res.tier_moves] == [("gold", 520000)]
    v = view(engine)
    assert v["tier"] == "gold"
    moves = [h["detail"]["tier"] for h in v["history"] if h["kind"] == "tier"]
    assert moves == [["silver", "gold"], ["normal", "silver"]]
    assert all(h["operator"] == "hq:policy" for h in v["history"] if h["kind"] == "tier")
    # Nightly within the year: gold is kept; a year and more without spend: down to normal.
    assert nightly(engine, rules=RULES, clock=at(100)).tier_moves == []
    out = nightly(engine, rules=RULES, clock=at(400))
    assert [(m.before, m.after, m.rule, m.spend_fen) for m in out.tier_moves] == [("gold", "normal", "downgrade", 0)]
    assert view(engine)["tier"] == "normal"




# ---------------------------------------------------------------- expiry

def test_points_expire_oldest_lots_first_as_history(engine):
    policy = AccountPolicy(points_expiry_months=1)
    setup(engine, points=500, policy=policy)                       # imported: lot 2026-12-31
    store = AccountStore(engine, clock=clock, policy=policy)
    commit(engine, store, "S001", [tx(1, sale_body(CARD, "M1", earned=300, day="2026-10-20", key="a")),
                                   tx(2, sale_body(CARD, "M1", earned=200, day="2026-11-25", key="b"))])
    v = view(engine)
    assert [(l["expires"], l["remaining"]) for l in v["lots"]] == [("2026-11-30", 300), ("2026-12-31", 700)]
    assert v["points"] == 1000
    with engine.begin() as conn:
        assert expire_points(conn, date(2026, 11, 30), clock=clock).points == 0      # valid through its day
        r = expire_points(conn, date(2026, 12, 1), clock=clock)
    assert (r.lots, r.accounts, r.points) == (1, 1, 300)
    v = view(engine)
    assert v["points"] == 700 and [l["expires"] for l in v["lots"]] == ["2026-12-31"]
    exp = [h for h in v["history"] if h["kind"] == "expiry"]
    assert [(h["d_points"], h["detail"]["lots"]) for h in exp] == [(-300, {"2026-11-30": -300})]
    out = nightly(engine, rules=RULES, day=date(2027, 1, 1), clock=at(40))
    assert out.expiry.points == 700 and view(engine)["points"] == 0


def test_spent_points_do_not_expire_and_owed_points_stay_owed(engine):
    policy = AccountPolicy(points_expiry_months=1)
    setup(engine, points=500, policy=policy)
    store = AccountStore(engine, clock=clock, policy=policy)
    commit(engine, store, "S001", [tx(1, sale_body(CARD, "M1", red=800, key="a"))])   # 300 beyond: owed
    with engine.begin() as conn:
        r = expire_points(conn, date(2027, 6, 1), clock=clock)
    assert r.points == 0
    v = view(engine)
    assert (v["points"], v["points_owed"]) == (-300, 300)


# ---------------------------------------------------------------- stored value out

def test_topup_refund_takes_the_bonus_back_first(engine):
    setup(engine)
    store = AccountStore(engine, clock=clock)
    commit(engine, store, "S001", [tx(1, topup_body(CARD, "M1", 50000, 5000, key="p500"), "top-0001"),
                                   tx(2, sale_body(CARD, "M1", sv=8000, key="a"))])
    v = view(engine)
    assert (v["paid_fen"], v["bonus_fen"]) == (50000 - 7273, 5000 - 727)       # proportional spend
    with engine.begin() as conn:
        p = topup_refund(conn, "top-0001", user="alice", clock=clock)
        with pytest.raises(PolicyError, match="refunded already"):
            topup_refund(conn, "top-0001", clock=clock)
    # bonus 50.00 taken back: 42.73 from the bonus part, 7.27 (spent) from the paid part; 420.00 paid out
    assert (p.paid_out_fen, p.bonus_taken_fen, p.detail["bonus_spent_charged_fen"]) == (42000, 4273, 727)
    v = view(engine)
    assert (v["paid_fen"], v["bonus_fen"]) == (0, 0)
    assert v["history"][0]["kind"] == "topup_refund" and v["history"][0]["operator"] == "hq:alice"


def test_withdraw_pays_out_the_paid_part_as_the_chain_allows(engine):
    setup(engine)
    store = AccountStore(engine, clock=clock)
    commit(engine, store, "S001", [tx(1, topup_body(CARD, "M1", 10000, 1000, key="t"))])
    with engine.begin() as conn:
        with pytest.raises(PolicyError, match="do not allow"):
            withdraw(conn, CARD, 5000, rules=RULES, clock=clock)
        allow = {**RULES, "accounts": {"withdrawal": "paid_part"}}
        with pytest.raises(PolicyError, match="holds 10000"):
            withdraw(conn, CARD, 20000, rules=allow, clock=clock)
        p = withdraw(conn, CARD, 5000, rules=allow, user="bob", clock=clock)
    assert (p.paid_out_fen, p.bonus_taken_fen) == (5000, 500)
    v = view(engine)
    assert (v["paid_fen"], v["bonus_fen"]) == (5000, 500)
    assert v["history"][0]["kind"] == "withdrawal" and v["history"][0]["operator"] == "hq:bob"


def test_nightly_cli(engine):
    setup(engine, tier="gold")
    with engine.begin() as conn:
        conn.execute(db.rule_layers.insert().values(scope="chain", doc=json.dumps(RULES), updated_at=0))
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    pol.register(sub)
    out = io.StringIO()
    assert pol.run(parser.parse_args(["nightly", "--config", "x", "--json"]), engine, out=out) == 0
    doc = json.loads(out.getvalue())
    assert doc["tier_moves"] == [] and doc["expired"]["points"] == 0
