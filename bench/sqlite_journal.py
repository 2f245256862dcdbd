"""The SQLite (WAL, synchronous=FULL) journal the append-only log replaced,
kept here so bench.journal measures both side by side.

Every committed counter operation is a record with a store sequence number
(monotonic, never reused: AUTOINCREMENT) and a globally unique id. A record
is durable (fsync) before append() returns, so before the POS gets its OK.
It is deleted only when HQ's ack says HQ has committed it.

One writer thread owns the connection. Concurrent appends from several lanes
queue up and are committed together in one transaction (group commit), so
they share one fsync.

Idempotency: the POS supplies a key per operation; the key, a hash of the
request and the response are stored with the record in the same
transaction. A retry with the same key returns the first response; the same
key with a different request is refused.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import queue
import sqlite3
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable

from gateway.store.journal import Appended, IdempotencyConflict, JournalError, request_hash
from wire.messages import TxRecord

log = logging.getLogger("storegate.journal")

SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    type TEXT NOT NULL,
    ts INTEGER NOT NULL,
    body TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS idempotency (
    key TEXT PRIMARY KEY,
    request_hash TEXT NOT NULL,
    seq INTEGER NOT NULL,
    response TEXT NOT NULL,
    ts INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS idempotency_ts ON idempotency(ts);
"""
IDEMPOTENCY_RETENTION_S = 7 * 24 * 3600
GROUP_MAX = 256


class Journal:
    """Use as ``async with Journal(path) as journal:``."""

    def __init__(self, path: str | Path, *, clock: Callable[[], float] = time.time) -> None:
        self.path = Path(path)
        self._clock = clock
        self._ops: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._conn: sqlite3.Connection | None = None
        self.faults: list[str] = []
        self.on_append: Callable[[], None] | None = None  # the uplink's wake-up
        self.stats = {"commits": 0, "groups": 0}

    # -- lifetime -----------------------------------------------------------

    async def __aenter__(self) -> "Journal":
        await self.open()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        ready: asyncio.Future = asyncio.get_running_loop().create_future()
        loop = asyncio.get_running_loop()

        def run() -> None:
            try:
                self._conn = self._connect()
            except BaseException as exc:  # report to the opener, end the thread
                loop.call_soon_threadsafe(ready.set_exception, exc)
                return
            loop.call_soon_threadsafe(ready.set_result, None)
            self._writer_loop()

        self._thread = threading.Thread(target=run, name="journal-writer", daemon=True)
        self._thread.start()
        await ready

    async def close(self) -> None:
        if self._thread:
            self._ops.put(None)
            await asyncio.to_thread(self._thread.join)
            self._thread = None

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            ok = conn.execute("PRAGMA quick_check").fetchone()[0]
            if ok != "ok":
                raise sqlite3.DatabaseError(f"quick_check: {ok}")
            conn.executescript(SCHEMA)
        except sqlite3.DatabaseError as exc:
            conn.close()
            return self._set_aside_and_recover(exc)
        return conn

    def _set_aside_and_recover(self, exc: Exception) -> sqlite3.Connection:
        """A damaged journal is renamed (never deleted); every record that can
        still be read is copied into a fresh journal."""
        aside = self.path.with_name(f"{self.path.name}.damaged-{int(self._clock())}")
        for suffix in ("", "-wal", "-shm"):
            src = Path(str(self.path) + suffix)
            if src.exists():
                os.replace(src, Path(str(aside) + suffix))
        salvaged, high_water = _salvage(aside)
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.executescript(SCHEMA)
        conn.execute("BEGIN")
        conn.executemany("INSERT OR IGNORE INTO records(seq, id, type, ts, body) VALUES (?,?,?,?,?)", salvaged)
        # Sequence numbers are never reused, even for records acked and gone.
        high_water = max([high_water] + [r[0] for r in salvaged])
        conn.execute("DELETE FROM sqlite_sequence WHERE name='records'")
        conn.execute("INSERT INTO sqlite_sequence(name, seq) VALUES ('records', ?)", (high_water,))
        conn.execute("COMMIT")
        recovered = conn.execute("SELECT COUNT(*) FROM records").fetchone()[0]
        fault = f"journal damaged ({exc}); set aside as {aside.name}; recovered {recovered} records"
        log.error(fault)
        self.faults.append(fault)
        return conn

    # -- the writer thread --------------------------------------------------

    def _writer_loop(self) -> None:
        conn = self._conn
        assert conn is not None
        while True:
            first = self._ops.get()
            if first is None:
                conn.close()
                return
            group = [first]
            while len(group) < GROUP_MAX:
                try:
                    op = self._ops.get_nowait()
                except queue.Empty:
                    break
                if op is None:
                    self._ops.put(None)  # close after this group
                    break
                group.append(op)
            self._run_group(conn, group)

    def _run_group(self, conn: sqlite3.Connection, group: list) -> None:
        results = []
        try:
            conn.execute("BEGIN IMMEDIATE")
            for fn, _fut, _loop in group:
                conn.execute("SAVEPOINT op")
                try:
                    results.append((True, fn(conn)))
                    conn.execute("RELEASE op")
                except sqlite3.Error:
                    raise
                except Exception as exc:  # an error of this op alone
                    conn.execute("ROLLBACK TO op")
                    conn.execute("RELEASE op")
                    results.append((False, exc))
            conn.execute("COMMIT")  # synchronous=FULL: fsync before this returns
            self.stats["groups"] += 1
            self.stats["commits"] += len(group)
        except sqlite3.Error as exc:
            try:
                conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            log.error("journal commit failed: %s", exc)
            error = JournalError(_explain(exc))
            results = [(False, error)] * len(group)
        for (ok, value), (_fn, fut, loop) in zip(results, group):
            loop.call_soon_threadsafe(_settle, fut, ok, value)

    async def _run(self, fn: Callable[[sqlite3.Connection], Any]) -> Any:
        if self._thread is None:
            raise JournalError("journal is not open")
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._ops.put((fn, fut, loop))
        return await fut

    # -- operations ---------------------------------------------------------

    async def append(self, type_: str, body: dict, *, idempotency_key: str | None = None,
                     request: Any = None, response: dict | None = None) -> Appended:
        """Make a record durable. With an idempotency key, a repeat of the
        same request returns the first answer instead of a new record."""
        tx_id = uuid.uuid4().hex
        now_ms = int(self._clock() * 1000)
        body_json = json.dumps(body, ensure_ascii=False, separators=(",", ":"))
        req_hash = request_hash(request) if idempotency_key else ""
        response = response or {}

        def op(conn: sqlite3.Connection) -> Appended:
            if idempotency_key:
                row = conn.execute("SELECT request_hash, seq, response FROM idempotency WHERE key=?",
                                   (idempotency_key,)).fetchone()
                if row:
                    if row[0] != req_hash:
                        raise IdempotencyConflict(
                            f"idempotency key {idempotency_key!r} was already used for a different request")
                    stored = json.loads(row[2])
                    return Appended(row[1], stored["tx_id"], stored, True)
            cur = conn.execute("INSERT INTO records(id, type, ts, body) VALUES (?,?,?,?)",
                               (tx_id, type_, now_ms, body_json))
            seq = cur.lastrowid
            full = {**response, "seq": seq, "tx_id": tx_id}
            if idempotency_key:
                conn.execute("INSERT INTO idempotency(key, request_hash, seq, response, ts) VALUES (?,?,?,?,?)",
                             (idempotency_key, req_hash, seq, json.dumps(full, ensure_ascii=False), now_ms))
            return Appended(seq, tx_id, full, False)

        result = await self._run(op)
        if not result.duplicate and self.on_append:
            self.on_append()
        return result

    async def lookup(self, idempotency_key: str, request: Any) -> Appended | None:
        """The stored answer for a key already used, None for a new key;
        IdempotencyConflict when the key came with a different request."""
        req_hash = request_hash(request)

        def op(conn):
            row = conn.execute("SELECT request_hash, seq, response FROM idempotency WHERE key=?",
                               (idempotency_key,)).fetchone()
            return row
        row = await self._run(op)
        if row is None:
            return None
        if row[0] != req_hash:
            raise IdempotencyConflict(f"idempotency key {idempotency_key!r} was already used for a different request")
        stored = json.loads(row[2])
        return Appended(row[1], stored["tx_id"], stored, True)

    async def pending(self, after_seq: int = 0, limit: int = 500) -> list[TxRecord]:
        def op(conn):
            rows = conn.execute("SELECT seq, id, type, ts, body FROM records WHERE seq > ? ORDER BY seq LIMIT ?",
                                (after_seq, limit)).fetchall()
            return [TxRecord(s, i, t, ts, json.loads(b)) for s, i, t, ts, b in rows]
        return await self._run(op)

    async def mark_acked(self, seqs: list[int]) -> int:
        """HQ committed these: forget them. Returns how many were still here."""
        cutoff = int(self._clock() * 1000) - IDEMPOTENCY_RETENTION_S * 1000

        def op(conn):
            cur = conn.executemany("DELETE FROM records WHERE seq = ?", [(s,) for s in seqs])
            conn.execute("DELETE FROM idempotency WHERE ts < ?", (cutoff,))
            return cur.rowcount
        return await self._run(op)

    async def backlog(self) -> dict:
        """Depth of the backlog and the age of its oldest record."""
        now_ms = int(self._clock() * 1000)

        def op(conn):
            n, oldest, last = conn.execute("SELECT COUNT(*), MIN(ts), MAX(seq) FROM records").fetchone()
            seq = conn.execute("SELECT seq FROM sqlite_sequence WHERE name='records'").fetchone()
            return {"depth": n, "oldest_age_s": (now_ms - oldest) / 1000 if oldest else None,
                    "last_seq": seq[0] if seq else 0}
        return await self._run(op)


def _settle(fut: asyncio.Future, ok: bool, value: Any) -> None:
    if fut.done():
        return
    if ok:
        fut.set_result(value)
    else:
        fut.set_exception(value)


def _explain(exc: sqlite3.Error) -> str:
    text = str(exc)
    if "full" in text:
        return "the journal disk is full; the operation was not recorded"
    return f"the journal could not record the operation ({text})"


def _plausible(row: tuple) -> bool:
    seq, tx_id, type_, ts, body = row
    if not (isinstance(seq, int) and seq > 0 and isinstance(tx_id, str) and len(tx_id) == 32
            and isinstance(type_, str) and isinstance(ts, int) and isinstance(body, str)):
        return False
    try:
        return isinstance(json.loads(body), dict)
    except ValueError:
        return False


def _salvage(path: Path) -> tuple[list[tuple], int]:
    """The records that can still be read from a damaged journal file, and
    its sequence high-water mark (0 when unreadable)."""
    rows: list[tuple] = []
    high_water = 0
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    except sqlite3.Error:
        return rows, high_water
    try:
        try:
            found = conn.execute("SELECT seq FROM sqlite_sequence WHERE name='records'").fetchone()
            high_water = found[0] if found else 0
        except sqlite3.Error:
            pass
        # Walk the records in seq order; at a damaged spot, skip ahead in
        # growing steps until the b-tree reads again (bounded work).
        start, skip, failures = 1, 1, 0
        while failures < 64:
            try:
                for row in conn.execute("SELECT seq, id, type, ts, body FROM records WHERE seq >= ? ORDER BY seq",
                                        (start,)):
                    if _plausible(row):  # a damaged page can yield garbage cells
                        rows.append(row)
                    start, skip = max(start, row[0] + 1), 1
                break
            except sqlite3.Error:
                failures += 1
                start += skip
                skip *= 2
    finally:
        conn.close()
    return rows, high_water
