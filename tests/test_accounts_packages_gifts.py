"""Count packages sold at a counter and points for gifts at HQ (hq_bridge/
accounts.py ``_package_sale``, ``_gift_redemption``), on SQLite and on a
real PostgreSQL: uses up with the money in the history entry, stored value
split into its paid and bonus parts as a sale's is, gift points taken from
the earliest-expiring lot first through the sale's own path, offline
overdrafts applied and reported, inconsistent records set aside, and every
balance still the sum of its history."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest

from gateway.core import gifts, packages
from hq_bridge.accounts import AccountPolicy, AccountStore, audit, import_members, snapshot_rows
from tests.pg import hq_db_url, hq_engine, pg_server  # noqa: F401  (fixtures)
from tests.test_accounts import balances, commit, tx
from tests.test_pricing import TZ, n

NOW = datetime(2026, 11, 25, 7, 0, tzinfo=timezone.utc)
AT = datetime(2026, 11, 25, 15, 0, tzinfo=TZ)
CARD, MEMBER = "880000000500", "M500"
POLICY = {
    "packages": {"car_wash10": {"name": n("洗车10次卡", "Car wash x10"), "skus": ["W"], "uses": 10,
                                "price_fen": 30000, "validity_months": 12, "stored_value": True}},
    "gifts": {"mug": {"name": n("马克杯", "Mug"), "points": 800}},
    "card_types": {}, "stored_value": {"offline_max_per_tx_fen": 50000, "offline_max_per_day_fen": 100000},
    "redemption": {"offline_max_points_per_tx": 10000, "offline_max_points_per_day": 20000},
}


@pytest.fixture
def store(hq_engine):
    return AccountStore(hq_engine, AccountPolicy(points_expiry_months=24), clock=NOW.timestamp)


def member(points: int = 5000, balance: int = 50000, held: dict | None = None) -> dict:
    return {"member_id": MEMBER, "card_no": CARD, "points_available": points, "balance_available_fen": balance,
            "packages": held or {}, "today": {}}


def journaled(out: dict, seq: int, **more) -> dict:
    return {**out["record"], "lane": "1", "idempotency_key": f"pos-1/key-{seq:06d}", "account_id": MEMBER,
            "day": "2026-11-25", "terminal": "pos-1", **more}


def package_sale(seq: int, method: str = "cash", **kw) -> object:
    out = packages.sell_package(POLICY, member(**kw), "car_wash10", payment_method=method, now=AT)
    return tx(seq, journaled(out, seq, payment={"method": method}))


def gift(seq: int, qty: int = 1, **kw) -> object:
    return tx(seq, journaled(gifts.redeem_gift(POLICY, member(**kw), "mug", qty, now=AT), seq))


def open_account(engine, store, *, points=0, paid=0, imported_on=datetime(2025, 6, 1, tzinfo=timezone.utc)):
    with engine.begin() as conn:
        import_members(conn, [{"card_no": CARD, "member_id": MEMBER, "tier": "normal", "points": points,
                               "balance_fen": paid}], policy=store.policy, clock=imported_on.timestamp)


def test_a_package_sold_for_cash_adds_uses_with_the_money_in_the_entry(hq_engine, store):
    open_account(hq_engine, store)
    res = commit(hq_engine, store, "S001", [package_sale(1), package_sale(2, held={"car_wash10": 10})])
    assert (res.applied, res.set_aside, res.problems) == ([1, 2], [], [])
    a = balances(hq_engine, store, MEMBER)
    assert (a.packages, a.paid_fen, a.bonus_fen) == ({"car_wash10": 20}, 0, 0)
    with hq_engine.begin() as conn:
        assert audit(conn) == []
        entries = [h for h in store.history(conn, MEMBER) if h.kind == "package_sale"]
        row = {r["card_no"]: r for r in snapshot_rows(conn, "S001")}[CARD]
    assert sorted(h.d_uses for h in entries) == [10, 10]
    assert {h.detail["price_fen"] for h in entries} == {30000}
    assert {h.detail["payment"] for h in entries} == {"cash"}
    assert sorted(h.detail["renewal"] for h in entries) == [False, True]
    assert {h.detail["expires"] for h in entries} == {"2027-11-25"}
    assert row["packages"] == {"car_wash10": 20}                     # what the stores get next


def test_a_package_paid_from_stored_value_spends_it_as_a_sale_does(hq_engine, store):
    open_account(hq_engine, store, paid=40000)
    res = commit(hq_engine, store, "S001", [package_sale(1, "stored_value", balance=40000)])
    assert (res.applied, res.problems) == ([1], [])
    a = balances(hq_engine, store, MEMBER)
    assert (a.paid_fen, a.packages, a.day_stored_value_paid_fen) == (10000, {"car_wash10": 10}, 30000)
    # offline, against an older view: more than HQ holds is applied and reported
    res = commit(hq_engine, store, "S001", [package_sale(2, "stored_value", balance=40000)])
    assert [p.code for _s, p in res.problems] == ["stored_value_overdraft"]
    a = balances(hq_engine, store, MEMBER)
    assert (a.paid_fen, a.packages["car_wash10"]) == (-20000, 20)
    with hq_engine.begin() as conn:
        assert audit(conn) == []


def test_gift_points_come_from_the_earliest_expiring_lot_first(hq_engine, store):
    # 1,000 points imported on 2025-06-01 (lot 2027-06-30), then a sale earns 2,000 on 2026-11-25 (lot 2028-11-30)
    open_account(hq_engine, store, points=1000)
    from tests.hq_support import sale_body
    commit(hq_engine, store, "S001", [tx(1, sale_body(CARD, MEMBER, sv=0, red=0, earned=2000))])
    res = commit(hq_engine, store, "S001", [gift(2, qty=2)])           # 1,600 points
    assert (res.applied, res.problems) == ([2], [])
    a = balances(hq_engine, store, MEMBER)
    assert a.points == 1400 and a.day_points_redeemed == 1600
    assert [(l.expires, l.remaining) for l in a.lots] == [("2027-06-30", 0), ("2028-11-30", 1400)]
    with hq_engine.begin() as conn:
        assert audit(conn) == []
        entry = next(h for h in store.history(conn, MEMBER) if h.kind == "gift_redemption")
    assert entry.d_points == -1600
    assert entry.detail["taken"] == [["2027-06-30", 1000], ["2028-11-30", 600]]
    assert entry.detail["gift_id"] == "mug" and entry.detail["qty"] == 2
    # beyond the lots: owed, and reported
    res = commit(hq_engine, store, "S001", [gift(3, qty=2, points=5000)])
    assert [p.code for _s, p in res.problems] == ["points_overdraft"]
    a = balances(hq_engine, store, MEMBER)
    assert (a.points, a.points_owed) == (-200, 200)
    with hq_engine.begin() as conn:
        assert audit(conn) == []


def test_inconsistent_records_are_set_aside_and_change_nothing(hq_engine, store):
    open_account(hq_engine, store, points=5000, paid=50000)
    forged = package_sale(1)
    forged.body["deltas"] = {"packages": {"car_wash10": 100}, "stored_value_fen": 0}
    free = package_sale(2, "stored_value")
    free.body["stored_value_fen"], free.body["deltas"]["stored_value_fen"] = 0, 0   # paid "from stored value": 0
    cheap = gift(3)
    cheap.body["points"], cheap.body["deltas"]["points"], cheap.body["deltas"]["points_redeemed"] = 1, -1, 1
    before = balances(hq_engine, store, MEMBER)
    res = commit(hq_engine, store, "S001", [forged, free, cheap])
    assert [code.split(":")[0] for _s, code in res.set_aside] == ["inconsistent"] * 3
    after = balances(hq_engine, store, MEMBER)
    assert (after.points, after.paid_fen, after.packages) == (before.points, before.paid_fen, before.packages)


# ---------------------------------------------------------------- a package's expiry, kept with the package

def _sale_until(seq: int, held: dict, until: dict) -> object:
    view = {**member(held=held), "package_expires": until}
    out = packages.sell_package(POLICY, view, "car_wash10", payment_method="cash", now=AT)
    return tx(seq, journaled(out, seq, payment={"method": "cash"}))


def _package_row(engine, store):
    with engine.begin() as conn:
        assert audit(conn) == []
        return {r["card_no"]: r for r in snapshot_rows(conn, "S001")}[CARD]


def test_a_sale_sets_the_packages_expiry_and_a_renewal_extends_it_from_there(hq_engine, store):
    open_account(hq_engine, store)
    commit(hq_engine, store, "S001", [package_sale(1)])                        # 2026-11-25 + 12 months
    a = balances(hq_engine, store, MEMBER)
    assert (a.packages, a.package_expires) == ({"car_wash10": 10}, {"car_wash10": "2027-11-25"})
    row = _package_row(hq_engine, store)
    assert (row["packages"], row["package_expires"]) == ({"car_wash10": 10}, {"car_wash10": "2027-11-25"})
    # The store renews from the expiry its view holds (HQ's snapshot): 2027-11-25 + 12 months.
    # HQ takes the record's expiry as it is: the store's view and HQ's account agree.
    res = commit(hq_engine, store, "S001", [_sale_until(2, row["packages"], row["package_expires"])])
    assert (res.applied, res.problems) == ([2], [])
    row = _package_row(hq_engine, store)
    assert (row["packages"], row["package_expires"]) == ({"car_wash10": 20}, {"car_wash10": "2028-11-25"})


def test_a_package_given_without_validity_does_not_expire_and_a_late_use_is_reported(hq_engine, store):
    with hq_engine.begin() as conn:                     # imported: no package_expires, no expiry
        import_members(conn, [{"card_no": CARD, "member_id": MEMBER, "tier": "normal", "packages": {"car_wash10": 2}},
                              {"card_no": "880000000501", "member_id": "M501", "tier": "normal",
                               "packages": {"car_wash10": 4}, "package_expires": {"car_wash10": "2026-11-24"}}],
                       policy=store.policy, clock=NOW.timestamp)
        rows = {r["card_no"]: r for r in snapshot_rows(conn, "S001")}
    assert "package_expires" not in rows[CARD]
    assert rows["880000000501"]["package_expires"] == {"car_wash10": "2026-11-24"}
    # a store that did not know of the expiry used it on 2026-11-25: applied (the wash was given), reported
    from gateway.core import pricing
    late = {"member_id": "M501", "card_no": "880000000501", "packages": {"car_wash10": 4}}
    body = {**pricing.consume_package(POLICY, late, "car_wash10", 1, now=AT)["record"], "lane": "1",
            "idempotency_key": "pos-1/key-000001", "account_id": "M501", "day": "2026-11-25", "terminal": "pos-1"}
    res = commit(hq_engine, store, "S001", [tx(1, body)])
    assert res.applied == [1] and [p.code for _s, p in res.problems] == ["package_expired_use"]
    assert balances(hq_engine, store, "M501").packages == {"car_wash10": 3}
