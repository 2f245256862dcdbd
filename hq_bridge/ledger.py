"""HQ's ledger (SQLite by default): every store transaction exactly once.

A record is keyed by (store, seq) and by its globally unique id. A batch is
committed in one transaction; records already there are duplicates (a
resend) and are acked again without being applied twice. A record whose
(store, seq) is already taken by a *different* id means the store's journal
was reset: it is kept in ``conflicts`` for ops to resolve, and acked, so the
store does not resend it forever and nothing is lost.

A placeholder for a record the store could not send (type ``unsendable``,
wire.messages.unsendable_record; the store keeps the original aside) is
committed like any record, so every (store, seq) is accounted for and the
store's delivery goes on, and listed in ``unsendable`` for ops: what HQ is
missing and why.

Counter card services (report lost, freeze, replace, unfreeze) are recorded
in ``card_services`` with what HQ did about them, those needing a person
marked ``review``.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import orjson

from wire.messages import UNSENDABLE, TxBatch

SCHEMA = """
CREATE TABLE IF NOT EXISTS transactions (
    store TEXT NOT NULL,
    seq INTEGER NOT NULL,
    tx_id TEXT NOT NULL UNIQUE,
    type TEXT NOT NULL,
    ts INTEGER NOT NULL,
    body TEXT NOT NULL,
    received_at INTEGER NOT NULL,
    PRIMARY KEY (store, seq)
);
CREATE TABLE IF NOT EXISTS conflicts (
    store TEXT NOT NULL,
    seq INTEGER NOT NULL,
    tx_id TEXT NOT NULL,
    type TEXT NOT NULL,
    ts INTEGER NOT NULL,
    body TEXT NOT NULL,
    received_at INTEGER NOT NULL,
    PRIMARY KEY (tx_id)
);
CREATE TABLE IF NOT EXISTS unsendable (
    store TEXT NOT NULL,
    seq INTEGER NOT NULL,
    tx_id TEXT NOT NULL,
    original_type TEXT,
    ts INTEGER NOT NULL,
    error TEXT NOT NULL,
    received_at INTEGER NOT NULL,
    PRIMARY KEY (store, seq)
);
CREATE TABLE IF NOT EXISTS card_services (
    store TEXT NOT NULL,
    seq INTEGER NOT NULL,
    tx_id TEXT NOT NULL,
    op TEXT,
    card_no TEXT,
    new_card_no TEXT,
    outcome TEXT NOT NULL,
    review INTEGER NOT NULL DEFAULT 0,
    recorded_at INTEGER NOT NULL,
    PRIMARY KEY (store, seq)
);
CREATE TABLE IF NOT EXISTS stores (
    store TEXT PRIMARY KEY,
    status TEXT,
    updated_at INTEGER
);
CREATE TABLE IF NOT EXISTS rule_versions (
    scope TEXT PRIMARY KEY,
    version INTEGER NOT NULL,
    published_at INTEGER NOT NULL
);
"""


def open_schema(conn: sqlite3.Connection, schema: str) -> None:
    """WAL mode and the tables. The bridge and `storegate-hq rules publish`
    may open the HQ database at the same moment; switching to WAL takes a lock
    the busy timeout does not cover, so retry while it is locked."""
    for attempt in range(100):
        try:
            if conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                conn.execute("PRAGMA journal_mode=WAL")
            conn.executescript(schema)
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or attempt == 99:
                raise
            time.sleep(0.1)


@dataclass(frozen=True)
class Committed:
    seqs: list[int]      # every seq of the batch now safely in the ledger (ack all of them)
    applied: int         # new rows
    duplicates: int      # already there
    conflicts: int       # seq reused with another id: kept aside
    new_ids: frozenset = frozenset()  # tx ids applied by this commit (not duplicates)
    unsendable: tuple = ()  # (seq, original type, error) of placeholders new in this commit


class Ledger:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=10)
        open_schema(self._conn, SCHEMA)
        self._conn.execute("PRAGMA synchronous=FULL")

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def commit(self, batch: TxBatch) -> Committed:
        now = int(time.time() * 1000)
        applied = duplicates = conflicts = 0
        new_ids, unsendable = [], []
        with self._lock:
            conn = self._conn
            conn.execute("BEGIN IMMEDIATE")
            try:
                for r in batch.records:
                    body = orjson.dumps(r.body).decode()
                    cur = conn.execute(
                        "INSERT OR IGNORE INTO transactions(store, seq, tx_id, type, ts, body, received_at)"
                        " VALUES (?,?,?,?,?,?,?)", (batch.store, r.seq, r.id, r.type, r.ts, body, now))
                    if cur.rowcount == 1:
                        applied += 1
                        new_ids.append(r.id)
                        if r.type == UNSENDABLE:
                            original = r.body.get("type") if isinstance(r.body.get("type"), str) else None
                            error = str(r.body.get("error"))
                            conn.execute("INSERT OR IGNORE INTO unsendable(store, seq, tx_id, original_type, ts, error,"
                                         " received_at) VALUES (?,?,?,?,?,?,?)",
                                         (batch.store, r.seq, r.id, original, r.ts, error, now))
                            unsendable.append((r.seq, original, error))
                        continue
                    row = conn.execute("SELECT store, seq FROM transactions WHERE tx_id=?", (r.id,)).fetchone()
                    if row == (batch.store, r.seq):
                        duplicates += 1
                    else:
                        conn.execute("INSERT OR IGNORE INTO conflicts(store, seq, tx_id, type, ts, body, received_at)"
                                     " VALUES (?,?,?,?,?,?,?)", (batch.store, r.seq, r.id, r.type, r.ts, body, now))
                        conflicts += 1
                conn.execute("COMMIT")  # durable before the ack goes out
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        return Committed([r.seq for r in batch.records], applied, duplicates, conflicts, frozenset(new_ids),
                         tuple(unsendable))

    def unsendable(self, store: str | None = None) -> list[tuple]:
        """(store, seq, tx_id, original type, ts, error) of every placeholder held."""
        sql = "SELECT store, seq, tx_id, original_type, ts, error FROM unsendable"
        with self._lock:
            if store is None:
                return self._conn.execute(sql + " ORDER BY store, seq").fetchall()
            return self._conn.execute(sql + " WHERE store=? ORDER BY seq", (store,)).fetchall()

    def record_card_service(self, store: str, seq: int, tx_id: str, op, card_no, new_card_no, outcome: str,
                            review: bool = False) -> None:
        with self._lock:
            self._conn.execute(
                "INSERT OR REPLACE INTO card_services(store, seq, tx_id, op, card_no, new_card_no, outcome, review, "
                "recorded_at) VALUES (?,?,?,?,?,?,?,?,?)",
                (store, seq, tx_id, str(op), card_no if isinstance(card_no, str) else None,
                 new_card_no if isinstance(new_card_no, str) else None, outcome, int(review), int(time.time())))

    def card_services(self, *, review_only: bool = False) -> list[tuple]:
        """(store, seq, op, card_no, new_card_no, outcome, review) of counter card services."""
        sql = "SELECT store, seq, op, card_no, new_card_no, outcome, review FROM card_services"
        with self._lock:
            return self._conn.execute(sql + (" WHERE review=1" if review_only else "") + " ORDER BY store, seq"
                                      ).fetchall()

    def record_status(self, store: str, status_json: str) -> None:
        with self._lock:
            self._conn.execute("INSERT INTO stores(store, status, updated_at) VALUES (?,?,?) "
                               "ON CONFLICT(store) DO UPDATE SET status=excluded.status, updated_at=excluded.updated_at",
                               (store, status_json, int(time.time())))

    def next_rules_version(self, scope: str) -> int:
        """Reserve the next rule-set version for a scope (monotonic, durable)."""
        with self._lock:
            conn = self._conn
            conn.execute("BEGIN IMMEDIATE")
            row = conn.execute("SELECT version FROM rule_versions WHERE scope=?", (scope,)).fetchone()
            version = (row[0] if row else 0) + 1
            conn.execute("INSERT INTO rule_versions(scope, version, published_at) VALUES (?,?,?) "
                         "ON CONFLICT(scope) DO UPDATE SET version=excluded.version, published_at=excluded.published_at",
                         (scope, version, int(time.time())))
            conn.execute("COMMIT")
            return version

    def counts(self) -> dict:
        with self._lock:
            n = self._conn.execute("SELECT COUNT(*) FROM transactions").fetchone()[0]
            c = self._conn.execute("SELECT COUNT(*) FROM conflicts").fetchone()[0]
        return {"transactions": n, "conflicts": c}
