"""HQ's accounts of record (hq_bridge/accounts.py, hq_bridge/db.py), on SQLite
and on a real PostgreSQL (tests/pg.py): migrations, real gateway records
applied exactly once in the ledger's transaction, gaps held in the ledger,
records set aside with their reason, card services (a lost card lifted, a
replacement carrying the account), snapshots with their watermark, imports;
and property tests of the pure core: every balance is the sum of its
history, and a record is applied at most once.
"""

from __future__ import annotations

import os
from datetime import datetime, timezone
from types import SimpleNamespace

import orjson
import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hq_bridge import db, migrations, policy
from hq_bridge.accounts import (OWED, Account, AccountPolicy, AccountStore, Book, Card, ImportError_, Lot, StoreRecord,
                                apply_record, audit, import_members, snapshot_rows)
from hq_bridge.rules import read_table_file
from tests.hq_support import sale_body
from tests.pg import hq_db_url, hq_engine, pg_server  # noqa: F401  (fixtures)
from tests.test_counter import DIAMOND, EXAMPLES, GOLD
from tests.test_records import NEW_CARD, REPLACEMENT, journal_records
from wire import records as rec
from wire.ruleset import check_member

NOW = datetime(2026, 11, 25, 7, 0, tzinfo=timezone.utc)


@pytest.fixture
def engine(hq_engine):
    return hq_engine


@pytest.fixture
def store(engine):
    return AccountStore(engine, clock=NOW.timestamp)


def demo_members():
    return list(read_table_file(EXAMPLES / "members.demo.jsonl"))


def commit(engine, store: AccountStore, name: str, records):
    """What the ledger's commit will do: insert the batch, apply the new records, one transaction."""
    with engine.begin() as conn:
        ins = db.ledger_insert(conn, name, records)
        return store.apply_batch(conn, name, ins.new)


def balances(engine, store: AccountStore, account_id: str) -> Account:
    with engine.begin() as conn:
        return store.load_accounts(conn, [account_id])[account_id]


def tx(seq: int, body: dict, id_: str | None = None):
    return SimpleNamespace(seq=seq, id=id_ or f"tx-{seq:08d}-{body['type']}", type=body["type"], ts=0, body=body)


# ---------------------------------------------------------------- schema

def test_migrations_make_the_metadata_on_both_engines(hq_db_url):
    migrations.migrate(hq_db_url)
    migrations.migrate(hq_db_url)  # again: nothing to do
    engine = db.open_engine(hq_db_url)
    try:
        with engine.connect() as conn:
            ctx = MigrationContext.configure(conn, opts={"compare_type": True})
            assert ctx.get_current_revision() == "0007"
            assert compare_metadata(ctx, db.metadata) == []
    finally:
        engine.dispose()


def _bare_account(conn, account_id: str, paid_fen: int = 0) -> None:
    """A member and its account written as SQL, for a database at an older revision."""
    conn.exec_driver_sql("INSERT INTO members (member_id, source, created_at, updated_at) "
                         f"VALUES ('{account_id}', 'import', 0, 0)")
    conn.exec_driver_sql("INSERT INTO accounts (account_id, owner_member_id, tier, paid_fen, created_at, updated_at) "
                         f"VALUES ('{account_id}', '{account_id}', 'normal', {paid_fen}, 0, 0)")


def test_the_tier_counts_of_entries_before_0003_are_filled_in_from_their_detail(hq_db_url):
    from hq_bridge.migrations import upgrade
    upgrade(hq_db_url, "0002")
    engine = db.open_engine(hq_db_url)
    try:
        with engine.begin() as conn:
            _bare_account(conn, "A1")
            for kind, detail in (("sale", {"spend": 5990, "earned": 59}), ("return", {"spend": -2995, "earned": 29}),
                                 ("topup", {"fee": 1}), ("sale", None)):
                conn.exec_driver_sql(
                    "INSERT INTO account_history (account_id, kind, d_paid_fen, d_bonus_fen, d_points, d_uses, "
                    "recorded_at, detail) VALUES ('A1', '%s', 0, 0, 0, 0, 1, %s)"
                    % (kind, "'" + orjson.dumps(detail).decode() + "'" if detail else "NULL"))
        upgrade(hq_db_url)
        with engine.connect() as conn:
            h = db.account_history
            got = conn.execute(sa.select(h.c.kind, h.c.d_spend_fen, h.c.d_earned).order_by(h.c.id)).all()
            assert [tuple(r) for r in got] == [("sale", 5990, 59), ("return", -2995, -29), ("topup", 0, 0),
                                               ("sale", 0, 0)]
            assert policy.window_totals(conn, ["A1"], 0) == {"A1": (2995, 30)}
    finally:
        engine.dispose()


def test_0006_keeps_the_history_and_the_audit_finds_an_entry_without_its_account(hq_db_url):
    """0006 drops the history's foreign key (ingest no longer checks every
    entry against accounts): entries are kept, and audit() is what finds an
    entry whose account does not exist."""
    from hq_bridge.migrations import upgrade
    upgrade(hq_db_url, "0005")
    engine = db.open_engine(hq_db_url)
    try:
        with engine.begin() as conn:
            _bare_account(conn, "A1", paid_fen=500)
            conn.exec_driver_sql("INSERT INTO account_history (account_id, kind, d_paid_fen, d_bonus_fen, d_points, "
                                 "d_uses, recorded_at, ref_tx_id) VALUES ('A1', 'topup', 500, 0, 0, 0, 1, NULL)")
        upgrade(hq_db_url)
        with engine.begin() as conn:
            assert audit(conn) == []
            conn.exec_driver_sql("INSERT INTO account_history (account_id, kind, d_paid_fen, d_bonus_fen, d_points, "
                                 "d_uses, recorded_at) VALUES ('GHOST', 'topup', 100, 0, 0, 0, 2)")
            assert audit(conn) == ["account GHOST: 1 history entries, and no such account"]
            assert audit(conn, ["A1"]) == []
    finally:
        engine.dispose()


def test_reconciliations_read_of_the_last_days_has_an_index(hq_db_url):
    """0007: reconciliation reads the entries applied in the last days over all
    accounts; before, nothing but a scan of the whole history found them."""
    migrations.migrate(hq_db_url)
    engine = db.open_engine(hq_db_url)
    try:
        with engine.begin() as conn:
            query = "SELECT id FROM account_history WHERE recorded_at >= 1000 ORDER BY id"
            if db.is_postgres(conn):    # no statistics on an empty table: make a scan of it the dearest plan
                conn.exec_driver_sql("SET LOCAL enable_seqscan = off")
                plan = "\n".join(conn.exec_driver_sql(f"EXPLAIN {query}").scalars())
            else:    # no statistics on an empty table: ask for the index (an error where it cannot serve)
                query = query.replace("account_history", "account_history INDEXED BY ix_account_history_recorded_at")
                plan = "\n".join(str(r[-1]) for r in conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {query}"))
        assert "ix_account_history_recorded_at" in plan, plan
    finally:
        engine.dispose()


def test_an_hq_database_from_before_migrations_is_adopted(tmp_path):
    from hq_bridge.ledger import Ledger
    from hq_bridge.rules import Catalog

    path = tmp_path / "hq.db"
    ledger = Ledger(path)
    ledger.commit(SimpleNamespace(store="S001", records=[tx(1, {"type": "sale"})]))
    ledger.close()
    Catalog(path, tmp_path / "parts").close()
    migrations.migrate(f"sqlite:///{path}")
    engine = db.open_engine(f"sqlite:///{path}")
    with engine.begin() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(db.transactions)).scalar() == 1
        assert conn.execute(sa.select(sa.func.count()).select_from(db.accounts)).scalar() == 0
    engine.dispose()


# ---------------------------------------------------------------- real records, exactly once

async def test_real_gateway_records_move_the_accounts_exactly_once(tmp_path, engine, store):
    journaled = await journal_records(tmp_path)
    with engine.begin() as conn:
        imported = import_members(conn, demo_members(), clock=NOW.timestamp)
    assert (imported.accounts, imported.cards) == (10, 11)
    before = {a: balances(engine, store, a) for a in ("M1005", "M1001")}

    res = commit(engine, store, "S001", journaled[:7])
    res2 = commit(engine, store, "S001", journaled)          # a resend of the first part with the rest
    assert res.applied == list(range(1, 8)) and res2.applied == list(range(8, 16))
    assert res.set_aside == res2.set_aside == []
    again = commit(engine, store, "S001", journaled)          # everything again
    assert (again.applied, again.duplicates, again.watermark) == ([], 0, 15)
    with engine.begin() as conn:
        assert store.apply_batch(conn, "S001", journaled).duplicates == 15

    # M1005: a sale paid with 50.00 stored value and 1,000 points, returned in full in two parts.
    m1005 = balances(engine, store, "M1005")
    assert (m1005.stored_value_fen, m1005.points) == (before["M1005"].stored_value_fen, before["M1005"].points)
    # M1001: a coupon used, 400.00 topped up (with a package bonus), 2 car washes, its card replaced.
    m1001 = balances(engine, store, "M1001")
    topups = [r.body for r in journaled if r.type == "topup"]
    assert sum(t["pay_fen"] for t in topups) == 40000
    assert m1001.paid_fen == before["M1001"].paid_fen + 40000
    assert m1001.bonus_fen == sum(t["bonus_fen"] for t in topups) > 0     # a top-up package's bonus
    assert m1001.packages == {"car_wash10": 1}
    assert m1001.coupons == {"C2026-0001": "used"}
    sale2 = next(r.body for r in journaled if r.type == "sale" and r.body["totals"]["points_earned"]
                 and r.body["member"]["card_no"] == GOLD)
    assert m1001.points == before["M1001"].points + sale2["totals"]["points_earned"]
    with engine.begin() as conn:
        assert audit(conn) == []
        cards = {c: conn.execute(sa.select(db.cards).where(db.cards.c.card_no == c)).mappings().one()
                 for c in (GOLD, REPLACEMENT, NEW_CARD)}
        history = store.history(conn, "M1001")
    assert (cards[GOLD]["status"], cards[GOLD]["replaced_by"]) == ("replaced", REPLACEMENT)
    assert (cards[REPLACEMENT]["status"], cards[REPLACEMENT]["account_id"]) == ("active", "M1001")
    assert cards[NEW_CARD]["account_id"] == f"card-{NEW_CARD}"
    # Every entry names the record that made it.
    assert all(h.store == "S001" and h.seq and h.tx_id and h.terminal == "local" for h in history
               if h.kind != "import")
    ops = [h.detail["op"] for h in reversed(history) if h.kind == "card_op"]
    assert ops == ["report_lost", "unfreeze", "freeze", "unfreeze", "annual_fee", "replace"]


async def test_a_lost_card_is_lifted_and_a_replacement_carries_the_account(engine, store):
    with engine.begin() as conn:
        import_members(conn, demo_members(), clock=NOW.timestamp)
    base = {"v": 1, "at": "2026-11-25T15:00:00+08:00", "member_id": "M1001", "new_card_no": None, "fee_fen": 0,
            "deltas": {}, "reason": None, "account_id": None, "day": "2026-11-25", "terminal": "desk"}
    ops = [("report_lost", "lost", None), ("unfreeze", "active", None), ("replace", "replaced", REPLACEMENT)]
    batch = [tx(i, {**base, "type": "card_op", "op": op, "card_no": GOLD, "status_after": after,
                    "new_card_no": new, "idempotency_key": f"desk/op-{i:05d}"}) for i, (op, after, new) in
             enumerate(ops, 1)]
    res = commit(engine, store, "S001", batch[:1])
    assert res.cards_changed == [(GOLD, "active", "lost", None)]
    with engine.begin() as conn:
        assert {r["card_no"]: r["status"] for r in snapshot_rows(conn, "S001")}[GOLD] == "lost"
    res = commit(engine, store, "S001", batch[1:2])
    with engine.begin() as conn:
        assert {r["card_no"]: r["status"] for r in snapshot_rows(conn, "S001")}[GOLD] == "active"
    res = commit(engine, store, "S001", batch[2:])
    assert sorted(res.cards_changed) == [(GOLD, "active", "replaced", REPLACEMENT), (REPLACEMENT, None, "active", None)]
    topup = {"type": "topup", "v": 1, "at": "2026-11-25T16:00:00+08:00", "member_id": "M1001",
             "card_no": REPLACEMENT, "package_id": None, "pay_fen": 5000, "bonus_fen": 0, "credit_fen": 5000,
             "balance_before_fen": 0, "balance_after_fen": 5000, "deltas": {"stored_value_fen": 5000},
             "payment": {"method": "cash"}, "lane": "1", "idempotency_key": "pos/top-0001", "account_id": None,
             "day": "2026-11-25", "terminal": "pos-1"}
    res = commit(engine, store, "S002", [tx(1, topup, "tx-s002-1")])
    assert res.applied == [1]
    with engine.begin() as conn:
        rows = {r["card_no"]: r for r in snapshot_rows(conn, "S002")}
    assert rows[GOLD]["status"] == "replaced"
    assert rows[REPLACEMENT]["status"] == "active" and rows[REPLACEMENT]["member_id"] == "M1001"
    assert rows[REPLACEMENT]["balance_fen"] == 20000 + 5000 and rows[REPLACEMENT]["points"] == 5230


# ---------------------------------------------------------------- gaps, set aside

def _topup(seq: int, card: str = DIAMOND, account: str | None = "M1005", pay: int = 1000) -> SimpleNamespace:
    return tx(seq, {"type": "topup", "v": 1, "at": "2026-11-25T15:00:00+08:00", "member_id": account,
                    "card_no": card, "package_id": None, "pay_fen": pay, "bonus_fen": 0, "credit_fen": pay,
                    "balance_before_fen": 0, "balance_after_fen": pay, "deltas": {"stored_value_fen": pay},
                    "payment": {"method": "cash"}, "lane": "1", "idempotency_key": f"pos/top-{seq:06d}",
                    "account_id": account, "day": "2026-11-25", "terminal": "pos-1"})


def test_records_past_a_gap_wait_in_the_ledger(engine, store):
    with engine.begin() as conn:
        import_members(conn, demo_members(), clock=NOW.timestamp)
    before = balances(engine, store, "M1005").paid_fen
    batch = [_topup(s) for s in range(1, 7)]
    late = commit(engine, store, "S009", batch[3:])
    assert (late.applied, late.held, late.watermark) == ([], 3, 0)
    assert balances(engine, store, "M1005").paid_fen == before
    res = commit(engine, store, "S009", batch[:3])
    assert (res.applied, res.held, res.watermark) == ([1, 2, 3, 4, 5, 6], 0, 6)
    assert balances(engine, store, "M1005").paid_fen == before + 6000
    with engine.begin() as conn:
        assert conn.execute(sa.select(db.account_watermarks.c.held_above)).scalar() == 0
        assert audit(conn) == []


def test_records_that_cannot_be_applied_are_set_aside_with_the_reason(engine, store):
    with engine.begin() as conn:
        import_members(conn, demo_members(), clock=NOW.timestamp)
    bad_schema = _topup(2)
    bad_schema.body = {**bad_schema.body, "pay_fen": -5}
    batch = [_topup(1, card="880000009999", account=None), bad_schema,
             SimpleNamespace(seq=3, id="unsendable-3", type="unsendable", ts=0, body={"error": "too deep"}),
             _topup(4)]
    res = commit(engine, store, "S001", batch)
    assert res.applied == [4] and res.watermark == 4
    assert [(s, e.split(":")[0]) for s, e in res.set_aside] == [(1, "unknown_card"), (2, "schema"),
                                                                 (3, "unknown_type")]
    assert "pay_fen" in res.set_aside[1][1]
    with engine.begin() as conn:
        kept = conn.execute(sa.select(db.set_aside.c.seq, db.set_aside.c.error).order_by(db.set_aside.c.seq)).all()
    assert [s for s, _ in kept] == [1, 2, 3]
    with engine.begin() as conn:                                   # and not set aside twice
        assert store.apply_batch(conn, "S001", batch).duplicates == 4
        assert conn.execute(sa.select(sa.func.count()).select_from(db.set_aside)).scalar() == 3


def test_overdrafts_are_applied_and_reported(engine, store):
    with engine.begin() as conn:
        import_members(conn, [{"card_no": "880000000500", "member_id": "M500", "tier": "normal",
                               "balance_fen": 1000, "points": 100}], clock=NOW.timestamp)
    body = sale_body("880000000500", "M500", sv=3000, red=300, earned=50)
    res = commit(engine, store, "S001", [tx(1, body)])
    assert res.applied == [1]
    assert {p.code for _s, p in res.problems} == {"stored_value_overdraft", "points_overdraft"}
    a = balances(engine, store, "M500")
    assert (a.paid_fen, a.bonus_fen, a.points, a.points_owed) == (-2000, 0, -150, 150)
    with engine.begin() as conn:
        assert audit(conn) == []
        row = {r["card_no"]: r for r in snapshot_rows(conn, "S001")}["880000000500"]
    assert (row["balance_fen"], row["points"]) == (-2000, -150)  # the debt, as it is: nothing to spend offline


# ---------------------------------------------------------------- snapshots, import

async def test_snapshot_rows_are_member_parts_with_the_stores_watermark(tmp_path, engine, store):
    journaled = await journal_records(tmp_path)
    with engine.begin() as conn:
        import_members(conn, demo_members(), clock=NOW.timestamp)
    commit(engine, store, "S001", journaled[:5])
    commit(engine, store, "S002", [_topup(1)])
    with engine.begin() as conn:
        snap = snapshot_rows(conn, "S001")
        rows = list(snap)
        other = snapshot_rows(conn, "S002").watermark
        never = snapshot_rows(conn, "S777").watermark
    assert (snap.watermark, other, never) == (5, 1, 0)
    assert snap.header()["store_seq"] == 5 and snap.header()["part"] == "members"
    for r in rows:
        assert check_member(dict(r))
    by_card = {r["card_no"]: r for r in rows}
    assert set(by_card) >= {m["card_no"] for m in demo_members()}
    sub = next(m for m in demo_members() if m.get("primary_card"))
    assert by_card[sub["card_no"]]["primary_card"] == sub["primary_card"]
    assert "balance_fen" not in by_card[sub["card_no"]]


def test_import_refuses_bad_rows_naming_them_and_imports_nothing(engine, store):
    rows = demo_members()
    bad = [
        (rows[:3] + [{**rows[0], "member_id": "X1"}], "row 4: card_no"),
        (rows[:2] + [{"card_no": "12", "member_id": "Z", "tier": "gold"}], "row 3"),
        (rows[:2] + [{"card_no": "880000000999", "member_id": "Z", "tier": "gold", "points": "many"}], "row 3"),
        ([{"card_no": "880000000998", "member_id": "Z", "tier": "gold", "primary_card": "880000000990"}],
         "row 1: primary_card"),
    ]
    for case, where in bad:
        with pytest.raises(ImportError_, match=where):
            with engine.begin() as conn:
                import_members(conn, case, clock=NOW.timestamp)
        with engine.begin() as conn:
            assert conn.execute(sa.select(sa.func.count()).select_from(db.members)).scalar() == 0
    with engine.begin() as conn:
        first = import_members(conn, rows, clock=NOW.timestamp)
    with engine.begin() as conn:
        again = import_members(conn, rows, clock=NOW.timestamp)   # nothing handed back
        assert audit(conn) == []
    assert first.cards == len(rows) and again.cards == 0 and len(again.skipped) == len(rows)


def test_import_starts_the_accounts_after_the_ledger(engine, store):
    with engine.begin() as conn:
        db.ledger_insert(conn, "S001", [_topup(s) for s in range(1, 4)])
        result = import_members(conn, demo_members(), clock=NOW.timestamp)
    assert result.watermarks == {"S001": 3}
    before = balances(engine, store, "M1005").paid_fen
    res = commit(engine, store, "S001", [_topup(s) for s in range(1, 5)])
    assert res.applied == [4] and balances(engine, store, "M1005").paid_fen == before + 1000


# ---------------------------------------------------------------- the pure core: properties

def return_body(sale: dict, sale_id: str, sale_seq: int, *, sv: int, red: int, earned: int) -> dict:
    return rec.to_body(rec.Return(
        at="2026-11-26T10:00:00+08:00", sale_at=sale["at"], sale_id=sale_id, sale_seq=sale_seq,
        member=rec.MemberRef(**sale["member"]),
        lines=[rec.ReturnLine(index=0, sku="SKU-1", name="item", qty=1, cash_fen=0, stored_value_fen=sv,
                              redeemed_fen=red, points_redeemed=red, points_earned=earned, discounts=[],
                              discount=0, refund_fen=sv + red, amount=sv + red)],
        totals=rec.ReturnTotals(refund_fen=sv + red, discount=0, cash_fen=0, stored_value_fen=sv, redeemed_fen=red,
                                points_redeemed=red, points_earned=earned),
        deltas=rec.ReturnDeltas(points=red - earned, points_earned=-earned, points_redeemed=-red,
                                stored_value_fen=sv),
        idempotency_key=f"pos/ret-{sale_id}-{sv}-{red}-{earned}", account_id=sale["account_id"],
        day="2026-11-26", terminal="pos-1"))


def topup_body(card: str, pay: int, bonus: int) -> dict:
    return rec.to_body(rec.Topup(
        at="2026-11-25T15:00:00+08:00", member_id=None, card_no=card, package_id="p" if bonus else None,
        pay_fen=pay, bonus_fen=bonus, credit_fen=pay + bonus, balance_before_fen=0, balance_after_fen=pay + bonus,
        deltas=rec.StoredValueDelta(stored_value_fen=pay + bonus), payment=rec.Payment(method="cash"), lane="1",
        idempotency_key=f"pos/top-{card}-{pay}", account_id=None, day="2026-11-25", terminal="pos-1"))


CARDS = ["880000000100", "880000000200", "880000000300"]


def initial_book(points, paid, bonus, expiry) -> Book:
    accounts, cards = {}, {}
    for i, card in enumerate(CARDS):
        aid = f"A{i}"
        lots = (Lot(expiry[i], 0, points[i], points[i]),) if points[i] else ()
        accounts[aid] = Account(aid, aid, "normal", paid_fen=paid[i], bonus_fen=bonus[i], lots=lots,
                                packages={"wash": 3}, coupons={"C1": "issued"})
        cards[card] = Card(card, aid, aid)
    return Book(accounts, cards)


# A store's operation: ("sale", card, sv, red, earned) | ("return", nth sale of the store, fraction) |
# ("topup", card, pay, bonus) | ("package", card) | ("coupon", card) | ("replace", card)
op = st.one_of(
    st.tuples(st.just("sale"), st.sampled_from(CARDS), st.integers(0, 30_000), st.integers(0, 3_000),
              st.integers(0, 500)),
    st.tuples(st.just("return"), st.integers(0, 20), st.sampled_from([(1, 1), (1, 2), (1, 3), (2, 3)])),
    st.tuples(st.just("topup"), st.sampled_from(CARDS), st.integers(1, 50_000), st.integers(0, 5_000)),
    st.tuples(st.just("package"), st.sampled_from(CARDS)),
    st.tuples(st.just("coupon"), st.sampled_from(CARDS)),
)


def build_store_records(store: str, ops: list) -> list[StoreRecord]:
    """Bodies like the gateway's; a return reverses part of one of the store's earlier sales."""
    out, sales = [], []
    for o in ops:
        if o[0] == "return" and not sales:
            continue
        seq = len(out) + 1
        tx_id = f"{store}-{seq:06d}"
        if o[0] == "sale":
            body = sale_body(o[1], None, sv=o[2], red=o[3], earned=o[4])
            sales.append([body, tx_id, seq, 0, 0, 0])
        elif o[0] == "return":
            s = sales[o[1] % len(sales)]
            sale, (num, den) = s[0], o[2]
            t = sale["totals"]
            left = (t["stored_value_fen"] - s[3], t["points_redeemed"] - s[4], t["points_earned"] - s[5])
            part = [v * num // den for v in left]
            s[3], s[4], s[5] = s[3] + part[0], s[4] + part[1], s[5] + part[2]
            body = return_body(sale, s[1], s[2], sv=part[0], red=part[1], earned=part[2])
        elif o[0] == "topup":
            body = topup_body(o[1], o[2], o[3])
        elif o[0] == "package":
            body = rec.to_body(rec.PackageUse(
                at="2026-11-25T15:00:00+08:00", member_id=None, card_no=o[1], package_id="wash", uses=1,
                remaining_before=1, remaining_after=0, deltas=rec.PackageDeltas(packages={"wash": -1}), lane="1",
                idempotency_key=f"pos/pkg-{seq}", account_id=None, day="2026-11-25", terminal="pos-1"))
        else:   # a coupon used (a second use is an offline overdraft, reported)
            body = sale_body(o[1], None, coupons=("C1",))
        out.append(StoreRecord(store, seq, tx_id, body["type"], body))
    return out


def totals(book: Book) -> dict:
    return {aid: (a.stored_value_fen, a.points, dict(a.packages)) for aid, a in book.accounts.items()}


def apply_all(book: Book, order: list[StoreRecord], policy: AccountPolicy):
    history = []
    for r in order:
        book, entries, problems = apply_record(book, r, policy, NOW)
        assert not any(p.set_aside for p in problems), problems
        history += entries
    return book, history


policies = st.builds(AccountPolicy, spend_order=st.sampled_from(["proportional", "bonus_first", "paid_first"]),
                     points_expiry_months=st.sampled_from([None, 12, 24]))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops_a=st.lists(op, max_size=25), ops_b=st.lists(op, max_size=25),
       interleave=st.lists(st.booleans(), max_size=60),
       points=st.lists(st.integers(0, 5_000), min_size=3, max_size=3),
       paid=st.lists(st.integers(0, 50_000), min_size=3, max_size=3),
       bonus=st.lists(st.integers(0, 10_000), min_size=3, max_size=3),
       expiry=st.lists(st.sampled_from(["2026-12-31", "2027-06-30", "9999-12-31"]), min_size=3, max_size=3),
       policy=policies)
def test_any_interleaving_keeps_every_balance_the_sum_of_its_history(ops_a, ops_b, interleave, points, paid, bonus,
                                                                     expiry, policy):
    start = initial_book(points, paid, bonus, expiry)
    a, b = build_store_records("SA", ops_a), build_store_records("SB", ops_b)
    order, ia, ib = [], 0, 0
    for pick_a in interleave + [True] * len(a) + [False] * len(b):   # in seq order per store
        if pick_a and ia < len(a):
            order.append(a[ia])
            ia += 1
        elif not pick_a and ib < len(b):
            order.append(b[ib])
            ib += 1
    assert len(order) == len(a) + len(b)
    book, history = apply_all(start, order, policy)

    for aid, acct in book.accounts.items():
        first = start.accounts[aid]
        mine = [h for h in history if h.account_id == aid]
        assert acct.paid_fen == first.paid_fen + sum(h.d_paid_fen for h in mine)
        assert acct.bonus_fen == first.bonus_fen + sum(h.d_bonus_fen for h in mine)
        assert acct.points == first.points + sum(h.d_points for h in mine)
        assert acct.packages["wash"] == 3 + sum(h.d_uses for h in mine)
        assert acct.bonus_fen >= 0 and acct.points_owed >= 0 and all(l.remaining >= 0 for l in acct.lots)
        # every lot is explained by the lot changes the entries record
        lots = {l.expires: l.remaining for l in first.lots}
        owed = first.points_owed
        for h in mine:
            for k, v in (h.detail or {}).get("lots", {}).items():
                if k == OWED:
                    owed += v
                else:
                    lots[k] = lots.get(k, 0) + v
        assert {k: v for k, v in lots.items() if v} == {l.expires: l.remaining for l in acct.lots if l.remaining}
        assert owed == acct.points_owed

    # Totals do not depend on the interleaving (only the paid/bonus split may).
    canonical, _ = apply_all(start, a + b, policy)
    assert totals(book) == totals(canonical)

    # Applying any record again is refused and changes nothing.
    for r in order:
        again, entries, problems = apply_record(book, r, policy, NOW)
        assert again is book and entries == [] and [p.code for p in problems] == ["duplicate"]


@settings(max_examples=100, deadline=None)
@given(ops=st.lists(op, min_size=1, max_size=30), policy=policies,
       paid=st.integers(0, 50_000), bonus=st.integers(0, 10_000), points=st.integers(0, 5_000))
def test_returns_covering_whole_sales_reverse_them_exactly(ops, policy, paid, bonus, points):
    start = initial_book([points] * 3, [paid] * 3, [bonus] * 3, ["9999-12-31"] * 3)
    sales = [o for o in ops if o[0] == "sale"]
    recs = build_store_records("S1", sales)
    n = len(recs)
    # every sale returned in full, in two parts, newest first
    for i, r in reversed(list(enumerate(recs))):
        t = r.body["totals"]
        half = [t["stored_value_fen"] // 2, t["points_redeemed"] // 2, t["points_earned"] // 2]
        rest = [t["stored_value_fen"] - half[0], t["points_redeemed"] - half[1], t["points_earned"] - half[2]]
        for part in (half, rest):
            n += 1
            body = return_body(r.body, r.tx_id, r.seq, sv=part[0], red=part[1], earned=part[2])
            recs.append(StoreRecord("S1", n, f"S1-{n:06d}", "return", body))
    book, _ = apply_all(start, recs, policy)
    for aid, acct in book.accounts.items():
        first = start.accounts[aid]
        assert (acct.paid_fen, acct.bonus_fen, acct.points) == (first.paid_fen, first.bonus_fen, first.points)


def test_gaps_and_unknown_records_in_the_core():
    book = initial_book([0] * 3, [0] * 3, [0] * 3, ["9999-12-31"] * 3)
    topup = topup_body(CARDS[0], 100, 0)
    same, entries, problems = apply_record(book, StoreRecord("S", 2, "t2", "topup", topup), AccountPolicy(), NOW)
    assert same is book and [p.code for p in problems] == ["gap"]
    new, entries, problems = apply_record(book, StoreRecord("S", 1, "t1", "mystery", {}), AccountPolicy(), NOW)
    assert new.watermarks == {"S": 1} and entries == [] and problems[0].set_aside
    assert new.accounts == book.accounts
    unknown = StoreRecord("S", 2, "t2", "topup", topup_body("880000000999", 100, 0))
    new2, entries, problems = apply_record(new, unknown, AccountPolicy(), NOW)
    assert [p.code for p in problems] == ["unknown_card"] and new2.watermarks == {"S": 2}


@pytest.mark.skipif(os.environ.get("SG_SKIP_PG") == "1", reason="SG_SKIP_PG=1")
def test_two_workers_on_postgresql_never_lose_an_update(pg_server):  # noqa: F811
    """Two ingest workers (two connections) apply batches of two stores that
    touch the same account at once: row locks serialize them."""
    import threading

    url = pg_server.create_database()
    migrations.migrate(url)
    engine = db.open_engine(url, pool_size=4)
    try:
        st_ = AccountStore(engine, clock=NOW.timestamp)
        with engine.begin() as conn:
            import_members(conn, [{"card_no": "880000000500", "member_id": "M500", "tier": "normal"}],
                           clock=NOW.timestamp)
        errors = []

        def worker(store_id: str) -> None:
            try:
                for start in range(1, 201, 20):
                    batch = [_topup(s, card="880000000500", account="M500", pay=100) for s in range(start, start + 20)]
                    for r in batch:
                        r.id = f"{store_id}-{r.seq}"
                    commit(engine, st_, store_id, batch)
            except Exception as exc:  # pragma: no cover - reported below
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(s,)) for s in ("S1", "S2")]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        assert balances(engine, st_, "M500").paid_fen == 2 * 200 * 100
        with engine.begin() as conn:
            assert audit(conn) == []
    finally:
        engine.dispose()
