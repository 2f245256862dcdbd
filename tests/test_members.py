"""Members at HQ (hq_bridge/members.py) on SQLite and PostgreSQL: registration,
bulk import from CSV and XLSX (every bad row named by row and column, nothing
half-imported), look-up, and HQ's card services with their deny deltas."""

from __future__ import annotations

import argparse
import io
import json

import pytest
import sqlalchemy as sa

from hq_bridge import db, members
from hq_bridge.accounts import AccountStore, audit
from hq_bridge.members import MemberError, MemberImportError, account_view, add_member, card_op, deny_entries, import_file
from tests.hq_support import NOW, RULES, commit, topup_body, tx
from tests.pg import hq_db_url, hq_engine, pg_server  # noqa: F401  (fixtures)

HEADER = "card_no,member_id,name,tier,consent,birthday,points,balance_fen\n"
GOOD = [
    "880000000017,M1,张三,gold,yes,03-15,1200,50000",
    "880000000025,M2,李四,normal,no,,0,0",
    "880000000033,M3,John Smith,silver,1,1990-07-04,10,100",
    "880000000041,M4,,normal,,,,",
    "880000000058,M5,王五,normal,是,12-31,5,0",
    "880000000066,M6,赵六,normal,否,,0,2500",
]


@pytest.fixture
def engine(hq_engine):
    return hq_engine


def clock():
    return NOW.timestamp()


def write_csv(tmp_path, rows, header=HEADER, name="members.csv"):
    path = tmp_path / name
    path.write_text(header + "".join(r + "\n" for r in rows), encoding="utf-8")
    return path


def count(engine, table) -> int:
    with engine.begin() as conn:
        return conn.execute(sa.select(sa.func.count()).select_from(table)).scalar()


def cli(engine, argv, capsys):
    parser = argparse.ArgumentParser(prog="storegate-hq")
    sub = parser.add_subparsers(dest="command", required=True)
    members.register(sub)
    args = parser.parse_args(argv)
    out = io.StringIO()
    rc = members.run(args, engine, out=out)
    return rc, out.getvalue(), capsys.readouterr().err


def test_import_csv_then_show(tmp_path, engine, capsys):
    path = write_csv(tmp_path, GOOD)
    with engine.begin() as conn:
        res = import_file(conn, path, rules=RULES, clock=clock)
    assert (res.rows, res.members, res.cards, res.points, res.balance_fen) == (6, 6, 6, 1215, 52600)
    assert res.with_consent == 3 and res.tiers == {"gold": 1, "normal": 4, "silver": 1}
    with engine.begin() as conn:
        assert audit(conn) == []
        v = account_view(conn, "880000000017")
        m3 = conn.execute(sa.select(db.members).where(db.members.c.member_id == "M3")).mappings().one()
    assert (v["points"], v["stored_value_fen"], v["tier"], v["status"]) == (1200, 50000, "gold", "active")
    assert (v["paid_fen"], v["bonus_fen"], v["name"], v["consent"], v["birthday"]) == (50000, 0, "张*", True, "03-15")
    assert [c["card_no"] for c in v["cards"]] == ["880000000017"]
    assert v["history"][0]["kind"] == "import" and v["lots"][0]["remaining"] == 1200
    assert (m3["name_masked"], m3["birthday"], m3["phone_hash"]) == ("J*", "07-04", None)   # no full name, no year
    rc, out, _ = cli(engine, ["members", "show", "--config", "x", "880000000017", "--json"], capsys)
    doc = json.loads(out)
    assert rc == 0 and {"points", "stored_value_fen", "tier", "status", "cards", "paid_fen", "bonus_fen", "lots",
                        "packages", "coupons", "history"} <= set(doc)
    rc, out, _ = cli(engine, ["members", "show", "--config", "x", "880000000017"], capsys)
    assert rc == 0 and "stored value 500.00" in out and "tier gold" in out
    rc, _out, err = cli(engine, ["members", "show", "--config", "x", "880000009999"], capsys)
    assert rc == 2 and "not known at HQ" in err


def test_import_xlsx_read_only(tmp_path, engine):
    from openpyxl import Workbook
    wb = Workbook()
    ws = wb.active
    ws.append(["Card_No", "tier", "member_id", "points", "balance_fen", "consent"])
    ws.append([880000000017, "gold", "M1", 100, 2000, True])        # a card number typed as a number
    ws.append(["880000000025", "normal", "M2", None, None, None])
    ws.append([None, None, None, None, None, None])                 # a blank line is skipped
    ws.append(["6212345678901234567", "normal", "M3", 0, 0, "no"])  # 19 digits, as text
    path = tmp_path / "members.xlsx"
    wb.save(path)
    with engine.begin() as conn:
        res = import_file(conn, path, rules=RULES, clock=clock)
        assert audit(conn) == []
        assert account_view(conn, "880000000017")["stored_value_fen"] == 2000
    assert (res.rows, res.cards, res.with_consent) == (3, 3, 1)


def test_xlsx_card_numbers_that_lost_digits_are_refused(tmp_path, engine):
    from openpyxl import Workbook
    wb = Workbook()
    ws = wb.active
    ws.append(["card_no", "tier"])
    ws.append([6212345678901234567.0, "normal"])
    path = tmp_path / "lossy.xlsx"
    wb.save(path)
    with pytest.raises(MemberImportError, match="row 2, column card_no: .*lost digits"):
        with engine.begin() as conn:
            import_file(conn, path, rules=RULES, clock=clock)
    assert count(engine, db.members) == 0


BAD = [
    ("unknown column", "card_no,tier,balance\n", ["880000000017,gold,100"],
     "row 1, column balance: unknown column"),
    ("missing column", "card_no,member_id\n", ["880000000017,M1"], "row 1, column tier: required column is missing"),
    ("bad card number", HEADER, GOOD[:5] + ["88000000001X,M9,,normal,,,,"],
     "row 7, column card_no: 88000000001X is not 6-19 digits"),
    ("short card number", HEADER, ["12345,M9,,normal,,,,"], "row 2, column card_no: 12345 is not 6-19 digits"),
    ("duplicate card", HEADER, GOOD[:3] + ["880000000025,M9,,normal,,,,"],
     "row 5, column card_no: 880000000025 is also in row 3"),
    ("duplicate member", HEADER, GOOD[:2] + ["880000000090,M1,,normal,,,,"],
     "row 4, column member_id: M1 is also in row 2"),
    ("unknown tier", HEADER, ["880000000017,M1,,platinum,,,,"], "row 2, column tier: platinum is not a tier"),
    ("bad points", HEADER, ["880000000017,M1,,gold,,,-5,"], "row 2, column points: -5 is not a whole number"),
    ("bad birthday", HEADER, ["880000000017,M1,,gold,,13-40,,"], "row 2, column birthday: 13-40 is not MM-DD"),
    ("bad consent", HEADER, ["880000000017,M1,,gold,maybe,,,"], "row 2, column consent: maybe is not yes/no"),
]


@pytest.mark.parametrize("case", BAD, ids=[b[0] for b in BAD])
def test_bad_imports_are_refused_naming_row_and_column(tmp_path, engine, case):
    _name, header, rows, message = case
    path = write_csv(tmp_path, rows, header)
    with pytest.raises(MemberImportError) as exc:
        with engine.begin() as conn:
            import_file(conn, path, rules=RULES, clock=clock)
    assert message in str(exc.value)
    assert str(exc.value).startswith("nothing imported")
    for table in (db.members, db.accounts, db.cards, db.account_history):
        assert count(engine, table) == 0


def test_every_bad_row_is_named_and_duplicates_against_hq_refused(tmp_path, engine, capsys):
    with engine.begin() as conn:
        add_member(conn, card_no="880000000025", tier="normal", member_id="M2", rules=RULES, clock=clock)
    path = write_csv(tmp_path, GOOD[:1] + ["88000000001X,M7,,normal,,,,", "880000000033,M7,,normal,,,x,"] + GOOD[1:3])
    with pytest.raises(MemberImportError) as exc:
        with engine.begin() as conn:
            import_file(conn, path, rules=RULES, clock=clock)
    text = [str(p) for p in exc.value.problems]
    assert "row 3, column card_no: 88000000001X is not 6-19 digits" in text
    assert "row 4, column points: x is not a whole number from 0 to 10000000000" in text
    path = write_csv(tmp_path, GOOD[:3], name="again.csv")
    rc, out, err = cli(engine, ["members", "import", "--config", "x", str(path)], capsys)
    assert rc == 2 and "row 3, column card_no: 880000000025 is at HQ already" in err
    assert "row 3, column member_id: M2 is at HQ already" in err
    assert count(engine, db.members) == 1                       # only the member added before
    rc, out, err = cli(engine, ["members", "import", "--config", "x", str(write_csv(tmp_path, GOOD[2:], name="ok.csv"))],
                       capsys)
    assert rc == 0 and out.startswith("imported 4 rows: 4 members, 4 accounts, 4 cards"), err


def test_members_add_with_minimal_pii(engine, monkeypatch, capsys):
    with engine.begin() as conn:
        with pytest.raises(MemberError, match="STOREGATE_PHONE_KEY"):
            add_member(conn, card_no="880000000017", tier="gold", phone="13800138000", rules=RULES, clock=clock)
    monkeypatch.setenv("STOREGATE_PHONE_KEY", "00" * 32)
    rc, out, err = cli(engine, ["members", "add", "--config", "x", "--user", "alice", "--card", "880000000017",
                                "--name", "张三丰", "--consent", "--birthday", "03-15", "--phone", "138 0013 8000",
                                "--json"], capsys)
    assert rc == 0, err
    v = json.loads(out)
    assert (v["member_id"], v["tier"], v["name"], v["consent"], v["points"]) == ("H880000000017", "normal", "张*",
                                                                                  True, 0)
    assert v["history"][0]["operator"] == "hq:alice" and v["history"][0]["kind"] == "registration"
    with engine.begin() as conn:
        ph = conn.execute(sa.select(db.members.c.phone_hash)).scalar()
        assert len(ph) == 64 and "13800138000" not in ph
        for bad, msg in ((dict(card_no="880000000017"), "at HQ already"), (dict(card_no="12"), "not 6-19 digits"),
                         (dict(card_no="880000000025", tier="platinum"), "unknown tier")):
            with pytest.raises(MemberError, match=msg):
                add_member(conn, rules=RULES, clock=clock, **bad)


def test_card_services_at_hq_record_history_and_deny_deltas(engine, capsys):
    store = AccountStore(engine, clock=clock)
    with engine.begin() as conn:
        add_member(conn, card_no="880000000017", tier="gold", member_id="M1", rules=RULES, clock=clock)
    commit(engine, store, "S001", [tx(1, topup_body("880000000017", "M1", 10000))])
    with engine.begin() as conn:
        lost = card_op(conn, "report_lost", "880000000017", user="alice", clock=clock)
        assert deny_entries(lost.cards_changed, "2026-11-25") == [
            {"card_no": "880000000017", "status": "lost", "since": "2026-11-25"}]
        lifted = card_op(conn, "cancel_lost", "880000000017", user="alice", clock=clock)
        assert deny_entries(lifted.cards_changed) == [{"card_no": "880000000017", "status": "active"}]
        with pytest.raises(MemberError, match="not lost"):
            card_op(conn, "cancel_lost", "880000000017", user="alice", clock=clock)
        card_op(conn, "freeze", "880000000017", user="alice", clock=clock)
        card_op(conn, "unfreeze", "880000000017", user="alice", clock=clock)
        ext = card_op(conn, "extend", "880000000017", user="alice", months=6, clock=clock)
        assert ext.detail["expires"] == "2027-05-25" and ext.cards_changed == []
        sub = card_op(conn, "issue_subsidiary", "880000000017", new_card_no="880000000090", member_id="M1-kid",
                      user="alice", rules={"accounts": {"subsidiary_fee_fen": 1000}}, clock=clock)
        assert sub.detail["fee_fen"] == 1000 and sub.cards_changed == [("880000000090", None, "active", None)]
        rep = card_op(conn, "replace", "880000000017", new_card_no="880000000108", user="alice",
                      rules={"fees": {"replace_fen": 500}}, clock=clock)
        assert deny_entries(rep.cards_changed, "2026-11-25") == [
            {"card_no": "880000000017", "status": "replaced", "since": "2026-11-25", "replaced_by": "880000000108"},
            {"card_no": "880000000108", "status": "active"}]
    with engine.begin() as conn:
        v = account_view(conn, "880000000108")
        old = account_view(conn, "880000000017")
        kid = account_view(conn, "880000000090")
        assert audit(conn) == []
    assert (v["stored_value_fen"], v["status"], v["tier"]) == (10000, "active", "gold")   # the account came along
    assert old["status"] == "replaced" and kid["account_id"] == "M1" and kid["stored_value_fen"] == 10000
    ops = [(h["detail"]["op"], h["operator"]) for h in reversed(v["history"]) if h["kind"] == "card_op"]
    assert [o for o, _ in ops] == ["report_lost", "cancel_lost", "freeze", "unfreeze", "extend", "issue_subsidiary",
                                   "replace"]
    assert {u for _, u in ops} == {"hq:alice"}
    rc, out, err = cli(engine, ["members", "card", "--config", "x", "report_lost", "880000000108", "--json"], capsys)
    assert rc == 0 and json.loads(out)["deny"][0]["status"] == "lost"


def analyzed(engine) -> set[str]:
    """Tables whose planner statistics were gathered by an ANALYZE (not autovacuum's)."""
    with engine.begin() as conn:
        if db.is_postgres(conn):
            return set(conn.exec_driver_sql(
                "SELECT relname FROM pg_stat_user_tables WHERE last_analyze IS NOT NULL").scalars())
        if not conn.exec_driver_sql("SELECT 1 FROM sqlite_master WHERE name = 'sqlite_stat1'").first():
            return set()
        return set(conn.exec_driver_sql("SELECT tbl FROM sqlite_stat1").scalars())


def test_a_bulk_import_refreshes_the_planners_statistics(engine):
    """Right after a bulk load the planner's statistics are those of the
    empty tables until autovacuum comes by, and the ingest's look-ups by
    account (ANY of 500 ids, FOR UPDATE) were planned as scans of the whole
    table (measured in bench.hq_ingest). A small import leaves it to autovacuum."""
    from hq_bridge.accounts import ANALYZE_AFTER_ROWS, import_members
    few = [{"card_no": f"87{i:010d}", "member_id": f"F{i}", "tier": "normal"} for i in range(10)]
    with engine.begin() as conn:
        import_members(conn, few, clock=clock)
    assert "accounts" not in analyzed(engine)
    many = [{"card_no": f"88{i:010d}", "member_id": f"M{i}", "tier": "normal", "points": 1}
            for i in range(ANALYZE_AFTER_ROWS)]
    with engine.begin() as conn:
        import_members(conn, many, clock=clock)
    assert {"accounts", "cards", "members", "account_history"} <= analyzed(engine)
