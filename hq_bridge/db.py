"""HQ's database, one schema for SQLite (embedded default, the demo) and PostgreSQL (real chains).

SQLAlchemy Core metadata; the schema is created and moved on by the Alembic
migrations in hq_bridge/migrations/ (``hq_bridge.migrations.migrate(url)``), never by create_all
outside the tests.

Tables
------
The ledger's and the rule publisher's tables, exactly as hq_bridge/ledger.py
and hq_bridge/rules.py create them today (so both can move onto this metadata
without touching their data):

- ``transactions``, ``conflicts``, ``unsendable``, ``card_services``, ``stores``,
  ``rule_versions`` (ledger.py)
- ``rule_layers``, ``rule_snapshots``, ``rule_manifests``, ``deny_list``,
  ``deny_log``, ``retained_parts``, ``outbox`` (rules.py: what is stored but not sent yet)

HQ's accounts of record (hq_bridge/accounts.py applies records to them):

- ``members``          a person: masked name, phone hash (never the number), consent, birthday
- ``accounts``         balances: stored value (paid part, bonus part), points, tier, status
- ``cards``            card -> account; role primary | subsidiary (附属卡) | linked (group card)
- ``points_lots``      points by expiry date (one lot per account and expiry), what is left of each
- ``packages``         count packages (计次卡): uses left per account and package, and until when
- ``coupons``          single-use coupons held by an account: issued | used
- ``account_history``  every change of every balance, with the record that made it
- ``set_aside``        store records HQ could not apply, with the reason (never dropped)
- ``account_watermarks`` per store: the highest seq applied to the accounts (every seq
                       at or below it is applied or set aside) — the watermark a snapshot carries

Integers that can pass 2**31 (epoch ms, seqs, fen, points) are BIGINT on
PostgreSQL and INTEGER on SQLite (which stores 64-bit integers in INTEGER
columns; ``INTEGER PRIMARY KEY`` keeps its rowid meaning there).

``open_engine(url)``: ``sqlite:///path`` (WAL, synchronous=FULL, foreign keys
on, a write transaction begins with BEGIN IMMEDIATE so two writers wait for
each other instead of failing on upgrade) or ``postgresql+psycopg://...``
(psycopg 3).
"""

from __future__ import annotations

import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import orjson

from sqlalchemy import (BigInteger, Boolean, CheckConstraint, Column, Engine, ForeignKey, Index, Integer,
                        MetaData, PrimaryKeyConstraint, String, Table, Text, UniqueConstraint, and_, any_,
                        bindparam, create_engine, event, false, or_, select, text)
from sqlalchemy.engine import Connection, make_url

# 64-bit everywhere; plain INTEGER on SQLite, where it is 64-bit already and
# where the existing tables were created with it.
Int64 = BigInteger().with_variant(Integer(), "sqlite")

# Stable constraint names: migrations can refer to them on both engines.
metadata = MetaData(naming_convention={
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
})

# ---------------------------------------------------------------- the ledger (hq_bridge/ledger.py)

transactions = Table(
    "transactions", metadata,
    Column("store", Text, nullable=False),
    Column("seq", Int64, nullable=False),
    Column("tx_id", Text, nullable=False, unique=True),
    Column("type", Text, nullable=False),
    Column("ts", Int64, nullable=False),
    Column("body", Text, nullable=False),
    Column("received_at", Int64, nullable=False),
    PrimaryKeyConstraint("store", "seq"),
)

conflicts = Table(
    "conflicts", metadata,
    Column("store", Text, nullable=False),
    Column("seq", Int64, nullable=False),
    Column("tx_id", Text, primary_key=True),
    Column("type", Text, nullable=False),
    Column("ts", Int64, nullable=False),
    Column("body", Text, nullable=False),
    Column("received_at", Int64, nullable=False),
)

stores = Table(
    "stores", metadata,
    Column("store", Text, primary_key=True),
    Column("status", Text),
    Column("updated_at", Int64),
)

unsendable = Table(
    "unsendable", metadata,
    Column("store", Text, nullable=False),
    Column("seq", Int64, nullable=False),
    Column("tx_id", Text, nullable=False),
    Column("original_type", Text),
    Column("ts", Int64, nullable=False),
    Column("error", Text, nullable=False),
    Column("received_at", Int64, nullable=False),
    PrimaryKeyConstraint("store", "seq"),
)

card_services = Table(
    "card_services", metadata,
    Column("store", Text, nullable=False),
    Column("seq", Int64, nullable=False),
    Column("tx_id", Text, nullable=False),
    Column("op", Text),
    Column("card_no", Text),
    Column("new_card_no", Text),
    Column("outcome", Text, nullable=False),
    Column("review", Integer, nullable=False, server_default="0"),
    Column("recorded_at", Int64, nullable=False),
    PrimaryKeyConstraint("store", "seq"),
)

rule_versions = Table(
    "rule_versions", metadata,
    Column("scope", Text, primary_key=True),
    Column("version", Int64, nullable=False),
    Column("published_at", Int64, nullable=False),
)

# ---------------------------------------------------------------- the rule publisher (hq_bridge/rules.py)

rule_layers = Table(
    "rule_layers", metadata,
    Column("scope", Text, primary_key=True),
    Column("doc", Text, nullable=False),
    Column("updated_at", Int64, nullable=False),
)

rule_snapshots = Table(
    "rule_snapshots", metadata,
    Column("scope", Text, primary_key=True),
    Column("parts", Text, nullable=False),
    Column("as_of", Int64, nullable=False),
    Column("rows", Int64, nullable=False),
    Column("updated_at", Int64, nullable=False),
)

rule_manifests = Table(
    "rule_manifests", metadata,
    Column("store", Text, primary_key=True),
    Column("version", Int64, nullable=False),
    Column("doc", Text, nullable=False),
    Column("published_at", Int64, nullable=False),
)

deny_list = Table(
    "deny_list", metadata,
    Column("card_no", Text, primary_key=True),
    Column("status", Text, nullable=False),
    Column("since", Text),
    Column("replaced_by", Text),
    Column("version", Int64, nullable=False),
    Column("reason", Text),
    Column("updated_at", Int64, nullable=False),
)

deny_log = Table(
    "deny_log", metadata,
    Column("version", Int64, primary_key=True, autoincrement=False),
    Column("issued_at", Int64, nullable=False),
    Column("doc", Text, nullable=False),
    Column("reason", Text),
)

retained_parts = Table(
    "retained_parts", metadata,
    Column("topic", Text, primary_key=True),
    Column("sha256", Text, nullable=False),
    Column("published_at", Int64, nullable=False),
)

# What HQ stored but could not send yet (the broker was down). The command that
# queued an item sends it itself; if it cannot, it releases the item, and the bridge
# (hq_bridge/bridge.py) sends released items on connecting and every minute, and any
# item whose command died without a word once it is OUTBOX_ORPHANED_S old. An item
# leaves once something built after it was queued has gone out.
outbox = Table(
    "outbox", metadata,
    Column("item", String(80), primary_key=True),     # "store:S001": its rule set; "deny": the latest deny delta
    Column("reason", String(200), nullable=False),    # the command that queued it
    Column("queued_at", Int64, nullable=False),       # epoch ms
    Column("released_at", Int64),                     # epoch ms: its command gave up; the bridge sends it
)

LEDGER_TABLES = ("transactions", "conflicts", "unsendable", "card_services", "stores", "rule_versions")
RULES_TABLES = ("rule_layers", "rule_snapshots", "rule_manifests", "deny_list", "deny_log", "retained_parts")

# ---------------------------------------------------------------- accounts of record

ID = 64          # member, account, package, coupon ids (wire/ruleset.py _KEY)
CARD = 19        # card numbers: 6-19 digits
DAY = 10         # YYYY-MM-DD
NEVER = "9999-12-31"   # the expiry of points lots that do not expire

members = Table(
    "members", metadata,
    Column("member_id", String(ID), primary_key=True),
    Column("name_masked", String(64)),                 # 张*; the full name is not kept
    Column("phone_hash", String(64)),                  # hex HMAC-SHA256 of the number, or none
    Column("consent", Boolean, nullable=False, server_default=false()),
    Column("birthday", String(5)),                     # MM-DD
    Column("birthday_calendar", String(5), nullable=False, server_default="solar"),
    Column("source", String(80), nullable=False),      # "import", "hq", "store:S001/1234"
    Column("created_at", Int64, nullable=False),       # epoch ms, HQ's clock
    Column("updated_at", Int64, nullable=False),
    CheckConstraint("birthday_calendar IN ('solar', 'lunar')", name="calendar"),
)

accounts = Table(
    "accounts", metadata,
    Column("account_id", String(ID), primary_key=True),    # the owner's member_id (what stores key deltas by)
    Column("owner_member_id", String(ID), ForeignKey("members.member_id"), nullable=False),
    Column("tier", String(ID), nullable=False),
    Column("status", String(16), nullable=False, server_default="active"),
    Column("card_type", String(ID)),
    Column("paid_fen", Int64, nullable=False, server_default="0"),       # may go below 0 (offline overdraft)
    Column("bonus_fen", Int64, nullable=False, server_default="0"),      # never below 0
    Column("points", Int64, nullable=False, server_default="0"),         # sum of lots' remaining - points_owed
    Column("points_owed", Int64, nullable=False, server_default="0"),    # points spent beyond the lots (overdraft)
    # The store-local day the offline allowances below count (the latest day seen).
    Column("day", String(DAY)),
    Column("day_stored_value_paid_fen", Int64, nullable=False, server_default="0"),
    Column("day_points_redeemed", Int64, nullable=False, server_default="0"),
    Column("created_at", Int64, nullable=False),
    Column("updated_at", Int64, nullable=False),
    CheckConstraint("bonus_fen >= 0", name="bonus"),
    CheckConstraint("points_owed >= 0", name="owed"),
    CheckConstraint("status IN ('active', 'frozen', 'blocked', 'cancelled', 'expired')", name="status"),
)

cards = Table(
    "cards", metadata,
    Column("card_no", String(CARD), primary_key=True),
    Column("account_id", String(ID), ForeignKey("accounts.account_id"), nullable=False),
    Column("member_id", String(ID), ForeignKey("members.member_id"), nullable=False),   # who holds it
    Column("role", String(12), nullable=False),
    Column("status", String(16), nullable=False),
    Column("replaced_by", String(CARD)),
    Column("card_type", String(ID)),
    Column("nfc_uid", String(20)),
    Column("issued_at", Int64, nullable=False),        # epoch ms
    Column("expires", String(DAY)),
    Column("updated_at", Int64, nullable=False),
    CheckConstraint("role IN ('primary', 'subsidiary', 'linked')", name="role"),
    CheckConstraint("status IN ('active', 'not_activated', 'lost', 'frozen', 'cancelled', 'replaced', 'expired')",
                    name="status"),
    Index(None, "account_id"),
)

points_lots = Table(
    "points_lots", metadata,
    Column("account_id", String(ID), ForeignKey("accounts.account_id"), nullable=False),
    Column("expires", String(DAY), nullable=False),     # NEVER for points that do not expire
    Column("earned_at", Int64, nullable=False),         # epoch ms of the first points in the lot
    Column("points", Int64, nullable=False),            # earned into the lot in all
    Column("remaining", Int64, nullable=False),
    PrimaryKeyConstraint("account_id", "expires"),
    CheckConstraint("remaining >= 0", name="remaining"),
)

packages = Table(
    "packages", metadata,
    Column("account_id", String(ID), ForeignKey("accounts.account_id"), nullable=False),
    Column("package_id", String(ID), nullable=False),
    Column("uses_left", Int64, nullable=False),         # may go below 0 (offline overdraft)
    Column("updated_at", Int64, nullable=False),
    Column("expires", String(DAY)),                     # last day of use (store time); NULL: no expiry (0005)
    PrimaryKeyConstraint("account_id", "package_id"),
)

coupons = Table(
    "coupons", metadata,
    Column("account_id", String(ID), ForeignKey("accounts.account_id"), nullable=False),
    Column("code", String(ID), nullable=False),
    Column("state", String(8), nullable=False),         # issued | used
    Column("used_tx", String(64)),
    Column("updated_at", Int64, nullable=False),
    PrimaryKeyConstraint("account_id", "code"),
    CheckConstraint("state IN ('issued', 'used')", name="state"),
)

account_history = Table(
    "account_history", metadata,
    Column("id", Int64, primary_key=True, autoincrement=True),
    # No foreign key (0006): written only beside its account, never orphaned; audit() checks it.
    Column("account_id", String(ID), nullable=False),
    Column("kind", String(24), nullable=False),         # sale, return, topup, package_use, card_op, registration, import, ...
    Column("d_paid_fen", Int64, nullable=False, server_default="0"),
    Column("d_bonus_fen", Int64, nullable=False, server_default="0"),
    Column("d_points", Int64, nullable=False, server_default="0"),
    Column("package_id", String(ID)),
    Column("d_uses", Int64, nullable=False, server_default="0"),
    Column("card_no", String(CARD)),
    Column("store", String(64)),                        # the source record: store, seq, tx id (none: HQ itself)
    Column("seq", Int64),
    Column("tx_id", String(64)),
    Column("ref_tx_id", String(64)),                    # a return's sale
    Column("terminal", String(64)),
    Column("operator", String(64)),
    Column("at", String(40)),                           # when it happened (the record's store time)
    Column("recorded_at", Int64, nullable=False),       # when HQ applied it (epoch ms)
    Column("detail", Text),                             # JSON: lots, coupons, fee, status change
    # What a sale or return counts in the tier windows (a return's are negative), summed by SQL
    # (hq_bridge/policy.py window_totals); taken from the detail when the entry is written.
    Column("d_spend_fen", Int64, nullable=False, server_default="0"),
    Column("d_earned", Int64, nullable=False, server_default="0"),
    Index(None, "account_id", "id"),
    Index(None, "tx_id"),
    Index(None, "ref_tx_id", postgresql_where=text("ref_tx_id IS NOT NULL"),   # returns and refunds only
          sqlite_where=text("ref_tx_id IS NOT NULL")),
    # The last days' entries, for reconciliation (0007).
    Index(None, "recorded_at"),
)

set_aside = Table(
    "set_aside", metadata,
    Column("id", Int64, primary_key=True, autoincrement=True),
    Column("store", String(64), nullable=False),
    Column("seq", Int64, nullable=False),
    Column("tx_id", Text, nullable=False),
    Column("type", Text, nullable=False),
    Column("body", Text, nullable=False),
    Column("error", Text, nullable=False),               # "<code>: <what>"
    Column("at", Int64, nullable=False),                 # epoch ms, HQ's clock
    Column("resolved_at", Int64),                        # set by whoever resolves it
    UniqueConstraint("store", "seq"),
)

account_watermarks = Table(
    "account_watermarks", metadata,
    Column("store", String(64), primary_key=True),
    Column("seq", Int64, nullable=False),                # every seq <= this is applied or set aside
    Column("held_above", Int64, nullable=False, server_default="0"),   # highest seq committed past a gap
    Column("updated_at", Int64, nullable=False),
)

ACCOUNT_TABLES = ("members", "accounts", "cards", "points_lots", "packages", "coupons", "account_history",
                  "set_aside", "account_watermarks")


# ---------------------------------------------------------------- engines

def _sqlite_wal(cur) -> None:
    """WAL mode. The bridge starting and a `storegate-hq rules publish` may
    open a new database at the same moment; switching to WAL takes a lock
    the busy timeout does not cover, so retry while it is locked."""
    for attempt in range(100):
        try:
            if cur.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                cur.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or attempt == 99:
                raise
            time.sleep(0.1)


def open_engine(url: str, **kw) -> Engine:
    """An engine for ``sqlite:///path`` or ``postgresql+psycopg://user@host/db``."""
    u = make_url(url)
    if u.get_backend_name() == "sqlite":
        if u.database not in (None, "", ":memory:"):
            kw.setdefault("connect_args", {"check_same_thread": False})
        engine = create_engine(u, **kw)

        @event.listens_for(engine, "connect")
        def _sqlite_connect(dbapi_conn, _record):
            # Transactions are begun by the "begin" hook below, not by the driver.
            dbapi_conn.isolation_level = None
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA busy_timeout=10000")
            if u.database not in (None, "", ":memory:"):
                _sqlite_wal(cur)
            cur.execute("PRAGMA synchronous=FULL")   # durable before the ack goes out
            cur.execute("PRAGMA foreign_keys=ON")     # as PostgreSQL enforces them
            cur.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin(conn):
            # A read (``execution_options(readonly=True)``) begins deferred: under WAL it
            # reads one consistent snapshot without holding the write lock.
            conn.exec_driver_sql("BEGIN" if conn.get_execution_options().get("readonly") else "BEGIN IMMEDIATE")

        return engine
    if u.get_backend_name() == "postgresql":
        if u.drivername == "postgresql":
            u = u.set(drivername="postgresql+psycopg")
        engine = create_engine(u, **{"pool_pre_ping": True, **kw})

        @event.listens_for(engine, "connect")
        def _pg_connect(dbapi_conn, _record):
            # List parameters (``= ANY(:array)``, ``unnest`` in insert_rows) go in
            # PostgreSQL's binary array format, which psycopg dumps without running
            # every item through the quoting regex of the text format.
            from psycopg.types.array import ListBinaryDumper
            dbapi_conn.adapters.register_dumper(list, ListBinaryDumper)

        return engine
    raise ValueError(f"database url: {url!r} is neither sqlite:/// nor postgresql+psycopg://")


def database_url(database: str | Path) -> str:
    """hq.database as written in hq.toml: a path (SQLite, as before) or a URL
    (``sqlite:///...``, ``postgresql+psycopg://user:pass@host/db``)."""
    text = str(database)
    if "://" in text:
        return text
    path = Path(text).expanduser().resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"


def sqlite_path(url: str) -> Path | None:
    """The file of a ``sqlite:///`` URL (None: another engine or in memory)."""
    u = make_url(url)
    return Path(u.database) if u.get_backend_name() == "sqlite" and u.database not in (None, "", ":memory:") \
        else None


_RETRY_SQLSTATES = {"40001", "40P01"}   # serialization failure, deadlock detected


def retryable(exc: BaseException) -> bool:
    """A transaction that failed only because another ran at the same time:
    run it again (PostgreSQL serialization failure or deadlock, a unique key
    another worker took first; SQLite busy)."""
    orig = getattr(exc, "orig", None) or exc    # a raw driver error too (COPY goes to psycopg directly)
    state = getattr(orig, "sqlstate", None)
    if state in _RETRY_SQLSTATES:
        return True
    if state == "23505":      # unique violation: a concurrent worker committed the same records first
        return True
    text = str(orig).lower()
    return "database is locked" in text or "database table is locked" in text


def engine_for(database, engine: Engine | None, who: str) -> tuple[Engine, bool]:
    """``engine`` if given (shared, not ours to dispose), else one opened on
    ``database`` (a path or URL; ours): (engine, owned)."""
    if engine is not None:
        return engine, False
    if database is None:
        raise ValueError(f"{who}: give a database path or URL, or an engine")
    return open_engine(database_url(database)), True


def writer_lock(engine: Engine) -> threading.Lock | None:
    """SQLite has one writer at a time anyway: waiting on a lock in this
    process is cheaper than on SQLite's (None: PostgreSQL, no need)."""
    return threading.Lock() if engine.dialect.name == "sqlite" else None


def write(engine: Engine, fn, lock: threading.Lock | None = None):
    """``fn(conn)`` in one write transaction (retried: run_in_transaction)."""
    if lock is None:
        return run_in_transaction(engine, fn)
    with lock:
        return run_in_transaction(engine, fn)


def read(engine: Engine, fn):
    """``fn(conn)`` in one read-only transaction (SQLite: no write lock taken)."""
    with engine.connect() as conn:
        conn = conn.execution_options(readonly=True)
        with conn.begin():
            return fn(conn)


def run_in_transaction(engine: Engine, fn, *, attempts: int = 8, isolation_level: str | None = None):
    """``fn(conn)`` in one transaction, committed; run again from the start on a
    retryable failure (``retryable``), at most ``attempts`` times."""
    delay = 0.01
    for attempt in range(attempts):
        try:
            with engine.connect() as conn:
                if isolation_level and is_postgres(conn):
                    conn = conn.execution_options(isolation_level=isolation_level)
                with conn.begin():
                    return fn(conn)
        except Exception as exc:
            if attempt == attempts - 1 or not retryable(exc):
                raise
            time.sleep(delay)
            delay = min(delay * 2, 0.5)


def analyze(conn: Connection, tables: Iterable[Table]) -> None:
    """Refresh the planner's statistics of ``tables`` (after a bulk load), in the caller's transaction."""
    q = conn.dialect.identifier_preparer.quote
    names = [q(t.name) for t in tables]
    if is_postgres(conn):
        conn.exec_driver_sql(f"ANALYZE {', '.join(names)}")
    else:
        for name in names:
            conn.exec_driver_sql(f"ANALYZE {name}")


def is_postgres(conn: Connection | Engine) -> bool:
    return conn.dialect.name == "postgresql"


def dialect_insert(conn: Connection, table: Table):
    """INSERT with ON CONFLICT support for the connection's engine."""
    if is_postgres(conn):
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    return insert(table)


def in_(conn: Connection, column, values: Iterable):
    """``column IN values``; on PostgreSQL ``column = ANY(:array)``: one
    parameter instead of one per value, planned once."""
    values = list(values)
    if is_postgres(conn):
        from sqlalchemy.dialects.postgresql import ARRAY
        return column == any_(bindparam(None, values, type_=ARRAY(column.type)))
    return column.in_(values)


def insert_rows(conn: Connection, table: Table, rows: list[dict], *, keys: Iterable[str] | None = None,
                update: bool = False, returning: str | None = None):
    """INSERT ``rows`` (all with the same columns) in one go. ``keys`` with
    ``update``: upsert on them; ``keys`` without: skip rows whose keys exist
    (``keys=()``: any unique constraint). ``returning``: a column of the
    inserted rows, returned as a list.

    PostgreSQL gets COPY for plain inserts and one statement for all rows
    otherwise (INSERT .. SELECT FROM unnest(one array per column)): a row per
    statement in a pipeline costs more than the insert itself there. SQLite
    gets executemany, a C loop."""
    if not rows:
        return [] if returning else None
    cols = list(rows[0])
    keys = None if keys is None else list(keys)
    if is_postgres(conn) and keys is None and not returning:
        # COPY: the cheapest way into PostgreSQL, large text (ledger bodies) too.
        q = conn.dialect.identifier_preparer.quote
        cursor = conn.connection.dbapi_connection.cursor()
        with cursor.copy(f"COPY {q(table.name)} ({', '.join(map(q, cols))}) FROM STDIN") as copy:
            for r in rows:
                copy.write_row([r[c] for c in cols])
        return None
    if is_postgres(conn):
        q = conn.dialect.identifier_preparer.quote
        casts = ", ".join(f"%(c{i})s::{table.c[c].type.compile(dialect=conn.dialect)}[]" for i, c in enumerate(cols))
        sql = f"INSERT INTO {q(table.name)} ({', '.join(map(q, cols))}) SELECT * FROM unnest({casts})"
        if keys is not None:
            target = f" ({', '.join(map(q, keys))})" if keys else ""
            sets = [c for c in cols if c not in keys]
            sql += (f" ON CONFLICT{target} DO UPDATE SET " + ", ".join(f"{q(c)} = EXCLUDED.{q(c)}" for c in sets)
                    if update and sets else f" ON CONFLICT{target} DO NOTHING")
        if returning:
            sql += f" RETURNING {q(returning)}"
        result = conn.exec_driver_sql(sql, {f"c{i}": [r[c] for r in rows] for i, c in enumerate(cols)})
        return [r[0] for r in result] if returning else None
    stmt = dialect_insert(conn, table)
    if keys is not None:
        sets = [c for c in cols if c not in keys]
        stmt = stmt.on_conflict_do_update(index_elements=keys, set_={c: stmt.excluded[c] for c in sets}) \
            if update and sets else stmt.on_conflict_do_nothing(index_elements=keys or None)
    if returning:
        return [r[0] for r in conn.execute(stmt.returning(table.c[returning]), rows)]
    conn.execute(stmt, rows)
    return None


def upsert(conn: Connection, table: Table, rows: list[dict], keys: Iterable[str]) -> None:
    """Insert ``rows`` (all with the same columns), updating the other columns where ``keys`` exist."""
    insert_rows(conn, table, rows, keys=keys, update=True)


# ---------------------------------------------------------------- ledger insert (for ledger.py on this metadata)

@dataclass(frozen=True)
class LedgerInsert:
    new: list          # the records now in the ledger for the first time (apply these to the accounts)
    duplicates: int    # already there with the same (store, seq, tx_id): a resend
    conflicts: int     # (store, seq) or tx_id taken by another record: kept in ``conflicts``


def ledger_insert(conn: Connection, store: str, records: list, received_at: int | None = None) -> LedgerInsert:
    """What hq_bridge/ledger.py's ``commit`` does, on this metadata and
    inside the caller's transaction: insert every record of a batch exactly
    once; tell resends from conflicts. ``records``: objects with ``seq, id,
    type, ts, body`` (wire.messages.TxRecord) — bodies as dicts; stored as JSON.
    Two workers inserting the same records at once: one of them fails on
    the unique keys and its transaction rolls back (its batch is not acked;
    the store sends it again)."""
    now = int(time.time() * 1000) if received_at is None else received_at
    if not records:
        return LedgerInsert([], 0, 0)
    t = transactions
    # What the ledger holds already at the batch's seqs or under its ids: one query.
    held = conn.execute(select(t.c.store, t.c.seq, t.c.tx_id).where(or_(
        and_(t.c.store == store, in_(conn, t.c.seq, {r.seq for r in records})),
        in_(conn, t.c.tx_id, {r.id for r in records})))).all()
    by_seq = {q: i for s, q, i in held if s == store}
    by_id = {i: (s, q) for s, q, i in held}
    new, rows, clash, dup = [], [], [], 0
    for r in records:
        if r.seq not in by_seq and r.id not in by_id:
            by_seq[r.seq], by_id[r.id] = r.id, (store, r.seq)
            new.append(r)
            rows.append({"store": store, "seq": r.seq, "tx_id": r.id, "type": r.type, "ts": r.ts,
                         "body": orjson.dumps(r.body).decode(), "received_at": now})
        elif by_id.get(r.id) == (store, r.seq):
            dup += 1
        else:
            clash.append({"store": store, "seq": r.seq, "tx_id": r.id, "type": r.type, "ts": r.ts,
                          "body": orjson.dumps(r.body).decode(), "received_at": now})
    insert_rows(conn, t, rows)
    if clash:
        insert_rows(conn, conflicts, clash, keys=())
    return LedgerInsert(new, dup, len(clash))
