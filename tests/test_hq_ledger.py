"""HQ's ledger and rule catalog on their database of record, on SQLite and on
a real PostgreSQL (tests/pg.py ``hq_db_url``): exactly once with the
accounts in the same transaction, conflicts, placeholders, card services,
statuses, rule versions, concurrent ingest workers; the catalog's layers,
deny list and manifests; member parts built from HQ's accounts with each
store's watermark; an SQLite ledger from before migrations adopted; the
config's database setting.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from types import SimpleNamespace

import pytest

from hq_bridge import config as hq_config
from hq_bridge import db
from hq_bridge.accounts import AccountStore, audit, import_members, snapshot_rows
from hq_bridge.ledger import Ledger
from hq_bridge.members import MemberError, deny_list_action
from hq_bridge.rules import Catalog, Publisher, card_entries, read_table_file
from tests.hq_support import sale_body, tx
from tests.pg import hq_db_url, pg_server  # noqa: F401  (fixtures)
from tests.support import ROOT
from wire.messages import TxBatch, TxRecord, unsendable_record

EX = ROOT / "deploy" / "examples"
GOLD = "880000000013"          # M1001: 200.00 stored value, 5230 points (members.demo.jsonl)


@pytest.fixture
def ledger(hq_db_url):
    ledger = Ledger(hq_db_url)
    yield ledger
    ledger.close()


@pytest.fixture
def catalog(ledger, tmp_path):
    return Catalog(parts_dir=tmp_path / "parts", engine=ledger.engine)


def imported(ledger: Ledger) -> None:
    with ledger.engine.begin() as conn:
        import_members(conn, read_table_file(EX / "members.demo.jsonl"))


def account(ledger: Ledger, card: str = GOLD):
    with ledger.engine.connect() as conn:
        return ledger.accounts.account_of_card(conn, card)


def batch(store: str, *records) -> TxBatch:
    return SimpleNamespace(store=store, records=list(records))


def test_commit_exactly_once_with_conflicts_and_versions(ledger):
    b = TxBatch("S001", [TxRecord(1, "id-00000001", "sale", 1, {}), TxRecord(2, "id-00000002", "sale", 2, {})])
    first, again = ledger.commit(b), ledger.commit(b)
    assert (first.seqs, first.applied, first.duplicates, first.conflicts) == ([1, 2], 2, 0, 0)
    assert first.new_ids == {"id-00000001", "id-00000002"}
    assert (again.applied, again.duplicates, again.new_ids) == (0, 2, frozenset())
    reused = ledger.commit(TxBatch("S001", [TxRecord(1, "id-99999999", "sale", 1, {})]))
    assert (reused.applied, reused.conflicts, reused.seqs) == (0, 1, [1])
    assert ledger.counts() == {"transactions": 2, "conflicts": 1}
    assert ledger.commit(TxBatch("S002", [TxRecord(1, "id-00000003", "sale", 1, {})])).applied == 1
    assert [ledger.next_rules_version("store:S001") for _ in range(3)] == [1, 2, 3]
    assert ledger.next_rules_version("store:S002") == 1


def test_placeholders_card_services_and_statuses(ledger):
    held = unsendable_record(2, "id-00000002", "sale", 5, "nested deeper than 32 levels")
    c = ledger.commit(TxBatch("S001", [TxRecord(1, "id-00000001", "sale", 1, {}), held]))
    assert c.unsendable == ((2, "sale", "nested deeper than 32 levels"),)
    assert ledger.commit(TxBatch("S001", [held])).unsendable == ()          # a resend: listed once
    assert [(s, q, t, o) for s, q, t, o, _ts, _e in ledger.unsendable()] == [("S001", 2, "id-00000002", "sale")]
    assert ledger.unsendable("S002") == []
    ledger.record_card_service("S001", 7, "id-7", "replace", "880000000021", "880000000054", "recorded", True)
    ledger.record_card_service("S001", 8, "id-8", "report_lost", GOLD, None, "broadcast as deny delta v1")
    ledger.record_card_service("S001", 8, "id-8", "report_lost", GOLD, None, "broadcast as deny delta v2")
    assert ledger.card_services(review_only=True) == [
        ("S001", 7, "replace", "880000000021", "880000000054", "recorded", 1)]
    assert ledger.card_services()[-1][5] == "broadcast as deny delta v2"
    ledger.record_status("S001", '{"state": "online"}')
    ledger.record_status("S001", '{"state": "offline"}')
    assert json.loads(ledger.store_status("S001")) == {"state": "offline"}
    assert ledger._conn.execute("SELECT COUNT(*) FROM stores").fetchone() == (1,)


def test_accounts_move_in_the_ledgers_transaction_exactly_once(ledger):
    imported(ledger)
    before = account(ledger)
    sale = tx(1, sale_body(GOLD, "M1001", sv=12000, red=1000, earned=198))
    c = ledger.commit(batch("S001", sale))
    assert c.applied == 1 and c.accounts.applied == [1] and c.accounts.watermark == 1
    after = account(ledger)
    assert (after.stored_value_fen, after.points) == (before.stored_value_fen - 12000, before.points - 1000 + 198)
    again = ledger.commit(batch("S001", sale))                 # a resend: acked, never applied twice
    assert (again.applied, again.duplicates, again.accounts) == (0, 1, None)
    assert (account(ledger).stored_value_fen, account(ledger).points) == (after.stored_value_fen, after.points)


def test_a_failure_in_the_accounts_keeps_nothing_of_the_batch(ledger, monkeypatch):
    imported(ledger)
    before = account(ledger)

    def boom(conn, store, records):
        raise RuntimeError("disk on fire")
    monkeypatch.setattr(ledger.accounts, "apply_batch", boom)
    with pytest.raises(RuntimeError):
        ledger.commit(batch("S001", tx(1, sale_body(GOLD, "M1001", sv=500))))
    assert ledger.counts()["transactions"] == 0                 # not acked, not in the ledger
    monkeypatch.undo()
    assert ledger.commit(batch("S001", tx(1, sale_body(GOLD, "M1001", sv=500)))).applied == 1
    assert account(ledger).stored_value_fen == before.stored_value_fen - 500


def test_records_past_a_gap_wait_and_unknown_cards_are_set_aside(ledger):
    imported(ledger)
    before = account(ledger).stored_value_fen
    late = ledger.commit(batch("S001", tx(2, sale_body(GOLD, "M1001", sv=300, key="b"))))
    assert late.accounts.held == 1 and account(ledger).stored_value_fen == before
    first = ledger.commit(batch("S001", tx(1, sale_body(GOLD, "M1001", sv=200, key="a"))))
    assert first.accounts.applied == [1, 2] and account(ledger).stored_value_fen == before - 500
    odd = ledger.commit(batch("S001", tx(3, sale_body("880000009999", "M404", sv=100))))
    assert odd.applied == 1 and [s for s, _why in odd.accounts.set_aside] == [3]


def test_concurrent_workers_commit_each_record_once(ledger):
    """Several ingest workers given the same batches at once (a shared
    subscription redelivering): every record once in the ledger and once in
    the balances; a worker that loses a race retries and sees duplicates."""
    imported(ledger)
    before = account(ledger).stored_value_fen
    records = [tx(i, sale_body(GOLD, "M1001", sv=100, key=f"w{i}")) for i in range(1, 21)]
    results, errors = [], []

    def work(chunk):
        try:
            for i in range(0, len(chunk), 5):
                results.append(ledger.commit(batch("S001", *chunk[i:i + 5])))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)
    threads = [threading.Thread(target=work, args=(records,)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    assert sum(r.applied for r in results) == 20 and sum(r.duplicates for r in results) == 60
    assert ledger.counts()["transactions"] == 20
    assert account(ledger).stored_value_fen == before - 2000


def test_catalog_layers_deny_list_manifests_and_retained_parts(catalog, tmp_path):
    assert catalog.layer("chain") is None and catalog.deny_version() == 0 and catalog.latest_delta() is None
    catalog.set_layer("chain", {"layer": {"level": "chain", "id": "c"}, "x": 1})
    catalog.set_layer("chain", {"layer": {"level": "chain", "id": "c"}, "x": 2})
    assert catalog.layer("chain")["x"] == 2
    catalog.delete_layer("chain")
    assert catalog.layer("chain") is None
    assert catalog.replace_deny([{"card_no": "880000000054", "status": "lost", "since": "2026-11-01"}], "s") == 1
    assert catalog.replace_deny([{"card_no": "880000000054", "status": "lost", "since": "2026-11-01"}], "s") == 1
    sign = lambda doc: {**doc, "key_id": "0" * 16, "sig": "x" * 86}  # noqa: E731
    d = catalog.record_delta(card_entries("freeze", GOLD, today="2026-11-25"), "phone", sign)
    assert d.version == 2 and catalog.deny_status(GOLD) == "frozen" and catalog.latest_delta().version == 2
    catalog.record_delta(card_entries("unfreeze", GOLD), "found", sign)
    assert catalog.deny_status(GOLD) is None and catalog.deny_entries() == {"880000000054": "lost"}
    v, sha, size = catalog.deny_part()
    assert v == 3 and catalog.part_bytes(sha) and catalog.deny_part() == (v, sha, size)
    catalog.mark_retained("t/1", sha, True)
    catalog.mark_retained("t/2", sha, True)
    catalog.mark_retained("t/1", "", False)
    assert catalog.retained() == {"t/2": sha}


def test_member_parts_come_from_the_accounts_with_each_stores_watermark(ledger, catalog, tmp_path):
    from hq_bridge import keys as hq_keys

    key = tmp_path / "k" / "hq.key"
    hq_keys.generate(key)
    pub = Publisher({"host": "127.0.0.1", "port": 1}, ledger, catalog, key,
                    {"S001": {"region": "east"}, "S002": {"region": "east"}})
    assert pub.member_snapshot(["S001"]) is None                      # no account yet: no members part
    imported(ledger)
    ledger.commit(batch("S001", tx(1, sale_body(GOLD, "M1001", sv=12000, key="a")),
                        tx(2, sale_body(GOLD, "M1001", sv=100, key="b"))))
    ledger.commit(batch("S002", tx(1, sale_body(GOLD, "M1001", sv=900, key="c"))))
    ledger.commit(batch("S002", tx(3, sale_body(GOLD, "M1001", sv=50, key="d"))))     # past a gap: held
    snap = pub.member_snapshot(["S001", "S002", "S009"])
    assert snap.watermarks == {"S001": 2, "S002": 1, "S009": 0}
    rows = [json.loads(line) for line in __import__("zlib").decompress(catalog.part_bytes(snap.parts[0][0]))
            .decode().splitlines() if line.strip()]
    gold = next(r for r in rows if r["card_no"] == GOLD)
    assert gold["balance_fen"] == 20000 - 12000 - 100 - 900
    with ledger.engine.connect() as conn:
        assert sum(1 for _ in snapshot_rows(conn, "S001")) == snap.rows
    assert pub.member_snapshot(["S001"]).parts == snap.parts               # the same rows: the same parts


def test_the_deny_lists_card_command_is_the_card_service_on_a_card_hq_holds(ledger):
    """``storegate-hq card deny|freeze|unfreeze|replace`` and ``members card``
    are one card service on HQ's card of record; a card HQ does not hold is
    left to the deny list."""
    imported(ledger)
    with ledger.engine.begin() as conn:
        lost = deny_list_action(conn, "deny", GOLD, status="lost", reason="phone")
        assert lost.cards_changed == [(GOLD, "active", "lost", None)]
        assert deny_list_action(conn, "deny", GOLD, status="lost", reason="again") is None   # already lost
        assert deny_list_action(conn, "deny", "880000000999", reason="not ours") is None
        with pytest.raises(MemberError, match="members card"):
            deny_list_action(conn, "deny", GOLD, status="expired", reason="by hand")
    with ledger.engine.connect() as conn:
        assert conn.execute(db.cards.select().where(db.cards.c.card_no == GOLD)).mappings().one()["status"] == "lost"
    with ledger.engine.begin() as conn, pytest.raises(MemberError, match="at HQ already"):
        deny_list_action(conn, "replace", GOLD, new_card_no="880000000021", reason="onto another member's card")
    with ledger.engine.begin() as conn:
        deny_list_action(conn, "unfreeze", GOLD, reason="found")
        rep = deny_list_action(conn, "replace", GOLD, new_card_no="880000000997", reason="worn")
    assert rep.cards_changed == [(GOLD, "active", "replaced", "880000000997"), ("880000000997", None, "active", None)]
    with ledger.engine.connect() as conn:
        new = conn.execute(db.cards.select().where(db.cards.c.card_no == "880000000997")).mappings().one()
        old = conn.execute(db.cards.select().where(db.cards.c.card_no == GOLD)).mappings().one()
        kinds = [h.detail.get("op") for h in AccountStore().history(conn, old["account_id"]) if h.kind == "card_op"]
    assert (old["status"], old["replaced_by"]) == ("replaced", "880000000997")
    assert (new["status"], new["account_id"]) == ("active", old["account_id"])
    assert sorted(kinds) == ["replace", "report_lost", "unfreeze"]
    assert account(ledger, "880000000997").stored_value_fen == account(ledger, GOLD).stored_value_fen
    with ledger.engine.connect() as conn:
        assert audit(conn) == []                      # no balance moved; every change has its entry


OLD_SCHEMA = """
CREATE TABLE transactions (store TEXT NOT NULL, seq INTEGER NOT NULL, tx_id TEXT NOT NULL UNIQUE,
    type TEXT NOT NULL, ts INTEGER NOT NULL, body TEXT NOT NULL, received_at INTEGER NOT NULL,
    PRIMARY KEY (store, seq));
CREATE TABLE conflicts (store TEXT NOT NULL, seq INTEGER NOT NULL, tx_id TEXT NOT NULL, type TEXT NOT NULL,
    ts INTEGER NOT NULL, body TEXT NOT NULL, received_at INTEGER NOT NULL, PRIMARY KEY (tx_id));
CREATE TABLE unsendable (store TEXT NOT NULL, seq INTEGER NOT NULL, tx_id TEXT NOT NULL, original_type TEXT,
    ts INTEGER NOT NULL, error TEXT NOT NULL, received_at INTEGER NOT NULL, PRIMARY KEY (store, seq));
CREATE TABLE card_services (store TEXT NOT NULL, seq INTEGER NOT NULL, tx_id TEXT NOT NULL, op TEXT,
    card_no TEXT, new_card_no TEXT, outcome TEXT NOT NULL, review INTEGER NOT NULL DEFAULT 0,
    recorded_at INTEGER NOT NULL, PRIMARY KEY (store, seq));
CREATE TABLE stores (store TEXT PRIMARY KEY, status TEXT, updated_at INTEGER);
CREATE TABLE rule_versions (scope TEXT PRIMARY KEY, version INTEGER NOT NULL, published_at INTEGER NOT NULL);
CREATE TABLE rule_layers (scope TEXT PRIMARY KEY, doc TEXT NOT NULL, updated_at INTEGER NOT NULL);
CREATE TABLE deny_list (card_no TEXT PRIMARY KEY, status TEXT NOT NULL, since TEXT, replaced_by TEXT,
    version INTEGER NOT NULL, reason TEXT, updated_at INTEGER NOT NULL);
CREATE TABLE deny_log (version INTEGER PRIMARY KEY, issued_at INTEGER NOT NULL, doc TEXT NOT NULL, reason TEXT);
INSERT INTO transactions VALUES ('S001', 1, 'old-1', 'sale', 1, '{}', 1);
INSERT INTO unsendable VALUES ('S001', 2, 'old-2', 'sale', 1, 'too deep', 1);
INSERT INTO card_services VALUES ('S001', 3, 'old-3', 'freeze', '880000000013', NULL, 'recorded', 1, 1);
INSERT INTO rule_versions VALUES ('store:S001', 7, 1);
INSERT INTO deny_list VALUES ('880000000054', 'lost', NULL, NULL, 4, 'x', 1);
INSERT INTO deny_log VALUES (4, 1, '{"snapshot": 1}', 'x');
"""


def test_an_sqlite_ledger_from_before_migrations_is_adopted(tmp_path):
    path = tmp_path / "hq" / "ledger.sqlite3"
    path.parent.mkdir()
    with sqlite3.connect(path) as conn:
        conn.executescript(OLD_SCHEMA)
    ledger = Ledger(path)                       # a path, as hq.toml always had it
    try:
        assert ledger.counts() == {"transactions": 1, "conflicts": 0}
        assert ledger.unsendable()[0][:3] == ("S001", 2, "old-2")
        assert ledger.card_services(review_only=True)[0][:3] == ("S001", 3, "freeze")
        assert ledger.next_rules_version("store:S001") == 8
        catalog = Catalog(path)
        assert catalog.deny_version() == 4 and catalog.deny_status("880000000054") == "lost"
        assert catalog.parts_dir == path.parent / "parts"
        assert ledger.commit(TxBatch("S001", [TxRecord(1, "old-1", "sale", 1, {})])).duplicates == 1
    finally:
        ledger.close()


def test_the_database_setting_takes_a_path_or_a_url(tmp_path):
    base = {"mqtt": {"host": "127.0.0.1"}}
    cfg = hq_config.check({"hq": {"database": str(tmp_path / "l.db")}, **base})
    assert hq_config.database_url(cfg) == f"sqlite:///{tmp_path / 'l.db'}"
    cfg = hq_config.check({"hq": {"database": "postgresql+psycopg://hq@db/hq", "parts_dir": "/p"}, **base})
    assert hq_config.database_url(cfg) == "postgresql+psycopg://hq@db/hq"
    with pytest.raises(hq_config.ConfigError, match="hq.parts_dir"):
        hq_config.check({"hq": {"database": "postgresql+psycopg://hq@db/hq"}, **base})
    with pytest.raises(hq_config.ConfigError, match="mysql"):
        hq_config.check({"hq": {"database": "mysql://hq@db/hq"}, **base})


def test_tiers_move_and_overdrafts_block_on_ingest_with_the_chains_rules(tmp_path):
    """The ledger's commit evaluates the chain's policy in the batch's
    transaction: a member's spend moves the tier up; two stores spending the
    same stored value offline block the account under the 'block' policy."""
    import orjson

    from tests.hq_support import RULES, sale_body, tx
    from wire.messages import TxBatch, TxRecord

    ledger = Ledger(tmp_path / "hq.sqlite3")
    chain = {**RULES, "reconciliation": {"overdraft_policy": "block"}}
    with ledger.engine.begin() as conn:
        conn.execute(db.rule_layers.insert().values(scope="chain", doc=orjson.dumps(chain).decode(), updated_at=0))
        import_members(conn, [{"card_no": "880000000017", "member_id": "M1", "tier": "normal", "balance_fen": 10000}])

    def batch(store, records):
        return TxBatch(store, [TxRecord(r.seq, r.id, r.type, r.ts, r.body) for r in records])

    spent = ledger.commit(batch("S001", [tx(1, sale_body("880000000017", "M1", sv=8000, net=150000, key="a"))]))
    assert [(m.before, m.after) for m in spent.accounts.tier_moves] == [("normal", "silver")]
    over = ledger.commit(batch("S002", [tx(1, sale_body("880000000017", "M1", sv=7000, key="b"))]))
    assert [(o.kind, o.amount, o.action) for o in over.accounts.overdrafts] == [("stored_value", 5000, "block")]
    assert [c[:3] for c in over.accounts.hq_cards_changed] == [("880000000017", "active", "blocked")]  # -> a deny delta
    ledger.close()
