"""HQ's ledger: every store transaction exactly once, and the accounts with it.

The database is SQLite (a path, or ``sqlite:///...``: the embedded default)
or PostgreSQL (``postgresql+psycopg://...``), on the SQLAlchemy metadata of
hq_bridge/db.py; opening the ledger runs the migrations (an SQLite ledger
made before them is adopted as it is).

A record is keyed by (store, seq) and by its globally unique id. A batch is
committed in one transaction, and HQ's accounts of record
(hq_bridge/accounts.py ``AccountStore.apply_batch``) are applied in that
same transaction: a crash keeps the records and their effect on the
balances, or neither, so exactly-once covers the balances too. Records
already there are duplicates (a resend) and are acked again without being
applied twice. A record whose (store, seq) is already taken by a
*different* id means the store's journal was reset: it is kept in
``conflicts`` for ops to resolve, and acked, so the store does not resend it
forever and nothing is lost.

On PostgreSQL several ingest workers may commit at once: a transaction that
fails on a serialization failure, a deadlock or a unique key another worker
took first is run again from the start (``db.run_in_transaction``); nothing
is acked until its transaction has committed.

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

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import Engine, func, select

from hq_bridge import db, migrations, policy, reconcile
from hq_bridge.accounts import AccountStore, BatchResult, policy_from_rules
from wire.messages import UNSENDABLE, TxBatch

log = logging.getLogger("storegate.hq")


@dataclass(frozen=True)
class Committed:
    seqs: list[int]      # every seq of the batch now safely in the ledger (ack all of them)
    applied: int         # new rows
    duplicates: int      # already there
    conflicts: int       # seq reused with another id: kept aside
    new_ids: frozenset = frozenset()  # tx ids applied by this commit (not duplicates)
    unsendable: tuple = ()  # (seq, original type, error) of placeholders new in this commit
    # What the accounts made of the new records (set aside, cards changed, ...); None: nothing new.
    accounts: BatchResult | None = field(default=None, compare=False)


class _Rows:
    def __init__(self, rows: list[tuple]) -> None:
        self._rows = rows

    def fetchone(self):
        return self._rows[0] if self._rows else None

    def fetchall(self) -> list[tuple]:
        return list(self._rows)


class _SQL:
    """A read-only ``execute(sql, params)`` in the driver's own SQL (``?`` on
    SQLite, ``%s`` on PostgreSQL), for ops scripts and tests."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def execute(self, sql: str, params=()) -> _Rows:
        with self._engine.connect() as conn:
            return _Rows([tuple(r) for r in conn.execution_options(readonly=True).exec_driver_sql(sql, params)])


class ChainRules:
    """The chain layer's rules as HQ's accounts use them (tiers, expiry,
    spending order, reconciliation policy), read from the database at most
    once every ``every_s`` so a published change applies within that."""

    def __init__(self, engine, every_s: float = 60.0, clock=time.monotonic) -> None:
        self.engine, self.every_s, self.clock = engine, every_s, clock
        self._rules: dict = {}
        self._policy = policy_from_rules({})
        self._read_at = -1e18

    def get(self) -> dict:
        if self.clock() - self._read_at >= self.every_s:
            self._read_at = self.clock()
            rules = db.read(self.engine, policy.chain_rules)
            try:
                self._policy = policy_from_rules(rules)
            except (TypeError, ValueError) as exc:  # the ingest goes on with the last good policy
                log.error("chain rules: accounts policy refused (%s); keeping the previous one", exc)
                return self._rules
            self._rules = rules
        return self._rules

    def policy(self):
        self.get()
        return self._policy


class Ledger:
    """``database``: a path (SQLite) or a database URL; ``engine``: an engine
    opened already (shared with the Catalog)."""

    def __init__(self, database: str | Path | None = None, *, engine: Engine | None = None,
                 accounts: AccountStore | None = None, migrate: bool = True) -> None:
        engine, self._own_engine = db.engine_for(database, engine, "Ledger")
        self.engine = engine
        self.url = engine.url.render_as_string(hide_password=False)
        self.path = db.sqlite_path(self.url)   # None on PostgreSQL
        if migrate:
            migrations.migrate_once(engine)
        self.chain = ChainRules(engine)
        # On ingest, in the batch's transaction: tiers move up, overdrafts are
        # found and settled (hq_bridge/policy.py, hq_bridge/reconcile.py).
        self.accounts = accounts or AccountStore(
            engine, hooks=[policy.tier_hook(self.chain.get), reconcile.reconcile_hook(self.chain.get)])
        self._conn = _SQL(engine)
        self._write_lock = db.writer_lock(engine)

    def close(self) -> None:
        if self._own_engine:
            self.engine.dispose()

    def _write(self, fn):
        return db.write(self.engine, fn, self._write_lock)

    def _read(self, fn):
        return db.read(self.engine, fn)

    def commit(self, batch: TxBatch) -> Committed:
        """Insert the batch's records exactly once and apply the new ones to
        the accounts, in one transaction, durable before this returns (ack then)."""
        self.accounts.policy = self.chain.policy()
        now = int(time.time() * 1000)

        def work(conn):
            ins = db.ledger_insert(conn, batch.store, batch.records, now)
            res = self.accounts.apply_batch(conn, batch.store, ins.new)
            held = []
            for r in ins.new:
                if r.type == UNSENDABLE:
                    original = r.body.get("type") if isinstance(r.body.get("type"), str) else None
                    held.append({"store": batch.store, "seq": r.seq, "tx_id": r.id, "original_type": original,
                                 "ts": r.ts, "error": str(r.body.get("error")), "received_at": now})
            if held:
                db.insert_rows(conn, db.unsendable, held, keys=())
            return ins, res, held

        ins, res, held = self._write(work)
        return Committed([r.seq for r in batch.records], len(ins.new), ins.duplicates, ins.conflicts,
                         frozenset(r.id for r in ins.new),
                         tuple((h["seq"], h["original_type"], h["error"]) for h in held),
                         res if ins.new else None)

    def unsendable(self, store: str | None = None) -> list[tuple]:
        """(store, seq, tx_id, original type, ts, error) of every placeholder held."""
        u = db.unsendable
        q = select(u.c.store, u.c.seq, u.c.tx_id, u.c.original_type, u.c.ts, u.c.error)
        q = q.order_by(u.c.store, u.c.seq) if store is None else q.where(u.c.store == store).order_by(u.c.seq)
        return self._read(lambda c: [tuple(r) for r in c.execute(q)])

    def record_card_service(self, store: str, seq: int, tx_id: str, op, card_no, new_card_no, outcome: str,
                            review: bool = False) -> None:
        row = {"store": store, "seq": seq, "tx_id": tx_id, "op": str(op),
               "card_no": card_no if isinstance(card_no, str) else None,
               "new_card_no": new_card_no if isinstance(new_card_no, str) else None,
               "outcome": outcome, "review": int(review), "recorded_at": int(time.time())}
        self._write(lambda c: db.upsert(c, db.card_services, [row], ["store", "seq"]))

    def card_services(self, *, review_only: bool = False) -> list[tuple]:
        """(store, seq, op, card_no, new_card_no, outcome, review) of counter card services."""
        t = db.card_services
        q = select(t.c.store, t.c.seq, t.c.op, t.c.card_no, t.c.new_card_no, t.c.outcome, t.c.review)
        if review_only:
            q = q.where(t.c.review == 1)
        return self._read(lambda c: [tuple(r) for r in c.execute(q.order_by(t.c.store, t.c.seq))])

    def record_status(self, store: str, status_json: str) -> None:
        row = {"store": store, "status": status_json, "updated_at": int(time.time())}
        self._write(lambda c: db.upsert(c, db.stores, [row], ["store"]))

    def store_status(self, store: str) -> str | None:
        """The store's last status message as HQ keeps it (JSON), or None."""
        s = db.stores
        return self._read(lambda c: c.execute(select(s.c.status).where(s.c.store == store)).scalar())

    def store_statuses(self) -> dict[str, str]:
        """Every store's last status message as HQ keeps it (JSON)."""
        s = db.stores
        return self._read(lambda c: dict(c.execute(select(s.c.store, s.c.status).where(s.c.status.is_not(None)))
                                         .all()))

    def next_rules_version(self, scope: str) -> int:
        """Reserve the next rule-set version for a scope (monotonic, durable)."""
        v = db.rule_versions

        def work(conn):
            q = select(v.c.version).where(v.c.scope == scope)
            if db.is_postgres(conn):
                q = q.with_for_update()
            version = (conn.execute(q).scalar() or 0) + 1
            db.upsert(conn, v, [{"scope": scope, "version": version, "published_at": int(time.time())}], ["scope"])
            return version
        return self._write(work)

    def counts(self) -> dict:
        def work(conn):
            return {"transactions": conn.execute(select(func.count()).select_from(db.transactions)).scalar(),
                    "conflicts": conn.execute(select(func.count()).select_from(db.conflicts)).scalar()}
        return self._read(work)
