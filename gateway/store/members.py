"""The member snapshot, the deny list and the local deltas between snapshots.

Two implementations of one interface (``MemberLookup``, gateway/core/members.py;
DESIGN.md principle 2):

- ``MemberStore``: SQLite, for a real store (1,000,000 members and 100,000
  deny entries on a Raspberry Pi). ``<data_dir>/members.db`` holds the
  snapshot (tables ``members``, ``deny``, ``meta``); ``<data_dir>/
  member_deltas.db`` holds the local deltas and the deny deltas applied
  since (they outlive a snapshot switch).
- ``InMemoryMembers``: plain dicts, built from a rule set's inline
  ``members`` / ``deny`` tables; for small rule sets and the pure tests.

Why SQLite and not TinyDB (measured by ``python -m bench.rules``): TinyDB
keeps the whole table as JSON in memory and finds a record by scanning it,
so a lookup costs O(members) and memory grows with the snapshot; SQLite
looks a card up in a B-tree on disk with a small page cache.

A snapshot is replaced atomically: it is bulk-loaded into a new file next
to the old one (``members.db.loading-<pid>``), fsync'd, then renamed over
``members.db`` (``os.replace``) and the reading connection is swapped in one
assignment. Readers use the old snapshot until that moment; a crash at any
point before the rename leaves the old file untouched (the half-loaded file
is deleted at the next open), and after it the new one is complete.

Local deltas (wire/RULESET.md "Local debits between snapshots") are keyed by
journal sequence number, so recording one again (a retry) changes nothing.
A member's totals count only deltas with ``seq > store_seq`` of the running
snapshot; applying a snapshot drops the deltas it already reflects.

A live account from HQ (gateway/shell/live_accounts.py) carries its own
watermark: it includes this store's records up to ``store_seq`` of the
reply, so the member's balances are HQ's live account plus the deltas with
``seq`` greater than that (``local_totals(..., after=store_seq)``), each
record counted exactly once. ``LiveCache`` holds the last live answer per
card for a short time (``api.member_hold_s``), attached to the member store
as ``.live``, so validate.validate on a quote or sale sees the same account the
tap saw without asking HQ again.

Delta fields (all optional; the ``deltas`` of gateway/core/pricing.py's journal
records go in as they are): ``points`` (signed change of the point balance),
``points_earned``, ``points_redeemed`` (counts toward the daily offline
limit), ``stored_value_fen`` (signed change of the stored value: a payment is
negative), ``packages`` {id: signed change of remaining uses},
``promotion_uses`` {id: n}, ``coupons_used`` [codes]. The daily limits count
only debits (redeemed points > 0, stored-value payments < 0): a refund the
same day gives balance back but not the day's offline allowance.
"""

from __future__ import annotations

import glob
import logging
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Iterable

import orjson

from gateway.core.members import (DELTA_INTS, DELTA_MAPS, DenyDeltaGap, LiveCache, MemberSnapshot, add_deltas,
                                  check_deltas, empty_totals, expand_row, lifted_row, normalise_uid)
from gateway.store.durable import make_dirs, sync_dir
from wire.ruleset import check_deny_entry, member_checker

log = logging.getLogger("storegate.members")


_SNAPSHOT_DDL = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER) WITHOUT ROWID;
CREATE TABLE members (card_no TEXT PRIMARY KEY, uid TEXT, rec BLOB NOT NULL) WITHOUT ROWID;
CREATE TABLE deny (card_no TEXT PRIMARY KEY, rec BLOB NOT NULL) WITHOUT ROWID;
"""
_DELTAS_DDL = """
CREATE TABLE IF NOT EXISTS deltas (seq INTEGER PRIMARY KEY, member_id TEXT NOT NULL, day TEXT NOT NULL,
    points INTEGER NOT NULL, points_earned INTEGER NOT NULL, points_redeemed INTEGER NOT NULL,
    stored_value_fen INTEGER NOT NULL, extra BLOB);
CREATE INDEX IF NOT EXISTS deltas_member ON deltas (member_id, seq);
CREATE TABLE IF NOT EXISTS deny_log (version INTEGER PRIMARY KEY, entries BLOB NOT NULL);
"""
_BATCH = 2_000  # rows per executemany: 2,000 keeps a 1M-member load near 90 MB peak RSS (20,000: ~160 MB), same speed


class MemberStore:
    """Member snapshot and deny list in SQLite; see the module docstring.

    Reads (``get``, ``card_for_uid``, ``denied``, ``local_totals``) come from
    the event loop; ``replace_snapshot`` may run in a worker thread
    (``asyncio.to_thread``) while they go on."""

    live: LiveCache | None = None   # HQ's live answers (gateway/shell/live_accounts.py), when online

    def __init__(self, data_dir: str | Path, *, durable: bool = True) -> None:
        self.dir = Path(data_dir)
        make_dirs(self.dir)
        self.path = self.dir / "members.db"
        self._write_lock = threading.Lock()       # deny deltas vs the snapshot switch
        self._load_lock = threading.Lock()        # one snapshot load at a time
        for stale in glob.glob(str(self.path) + ".loading-*"):
            os.unlink(stale)                      # a load that never finished
        self.fault: str | None = None
        if not self.path.exists():
            self._build(self.path, iter(()), iter(()), version=0, as_of=0, store_seq=0, deny_version=0)
        try:
            self._conn = self._open(self.path)
            self._read_meta()
            self._conn.execute("SELECT count(*) FROM (SELECT 1 FROM members LIMIT 1)").fetchone()
        except sqlite3.DatabaseError as exc:
            # A damaged snapshot: set aside (never deleted), start empty (cards are then
            # accepted as not in the snapshot, risky operations refused) until HQ resends it.
            aside = self.path.with_name(f"{self.path.name}.damaged-{int(time.time())}")
            os.replace(self.path, aside)
            self.fault = f"member snapshot unusable ({exc}); set aside as {aside.name}, waiting for HQ"
            log.error(self.fault)
            self._build(self.path, iter(()), iter(()), version=0, as_of=0, store_seq=0, deny_version=0)
            self._conn = self._open(self.path)
            self._read_meta()
        self._deltas = sqlite3.connect(self.dir / "member_deltas.db", check_same_thread=False,
                                       isolation_level=None)
        self._deltas.execute("PRAGMA journal_mode=WAL")
        # The deltas are the only record of what was spent here since the snapshot.
        self._deltas.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
        self._deltas.executescript(_DELTAS_DDL)
        self._refresh_with_deltas()
        # A deny delta is logged before it is applied: one that a crash cut off is applied now.
        for version, entries in self._deltas.execute(
                "SELECT version, entries FROM deny_log WHERE version > ? ORDER BY version", (self.deny_version,)).fetchall():
            if version == self.deny_version + 1:
                self._apply_deny_locked(version, orjson.loads(entries))

    def _refresh_with_deltas(self) -> None:
        # Most members have no local deltas: validate skips the query for them.
        self._with_deltas = {r[0] for r in self._deltas.execute(
            "SELECT DISTINCT member_id FROM deltas WHERE seq > ?", (self.store_seq,))}

    # -- opening and reading --------------------------------------------

    @staticmethod
    def _open(path: Path) -> sqlite3.Connection:
        conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        conn.execute("PRAGMA journal_mode=DELETE")   # never WAL: the file is replaced by rename
        conn.execute("PRAGMA cache_size=-8192")      # 8 MB: the B-trees' inner pages stay cached; leaves come from the OS
        conn.execute("PRAGMA mmap_size=0")
        return conn

    def _read_meta(self) -> None:
        meta = dict(self._conn.execute("SELECT key, value FROM meta"))
        self.version, self.as_of = meta.get("version", 0), meta.get("as_of", 0)
        self.store_seq, self.deny_version = meta.get("store_seq", 0), meta.get("deny_version", 0)

    def get(self, card_no: str) -> dict | None:
        row = self._conn.execute(_SELECT_MEMBER, (card_no,)).fetchone()
        return _expand(row) if row else None

    def card_for_uid(self, uid: str) -> str | None:
        row = self._conn.execute("SELECT card_no FROM members WHERE uid=?", (normalise_uid(uid),)).fetchone()
        return row[0] if row else None

    def denied(self, card_no: str) -> dict | None:
        row = self._conn.execute("SELECT rec FROM deny WHERE card_no=?", (card_no,)).fetchone()
        if row is None:
            return None
        rec = orjson.loads(row[0])
        rec["card_no"] = card_no
        return rec

    def count(self) -> tuple[int, int]:
        return (self._conn.execute("SELECT count(*) FROM members").fetchone()[0],
                self._conn.execute("SELECT count(*) FROM deny").fetchone()[0])

    # -- the snapshot -----------------------------------------------------

    @staticmethod
    def _build(path: Path, members: Iterable[dict], deny: Iterable[dict], *, version: int, as_of: int,
               store_seq: int, deny_version: int, check: bool = True, rules: dict | None = None) -> None:
        """Write a complete snapshot file at ``path`` (new), fsync'd."""
        conn = sqlite3.connect(path, isolation_level=None)
        try:
            # Nothing to protect in a file nobody reads yet: no journal, no syncs until the end.
            conn.execute("PRAGMA journal_mode=OFF")
            conn.execute("PRAGMA synchronous=OFF")
            conn.execute("PRAGMA cache_size=-16384")
            conn.executescript(_SNAPSHOT_DDL)
            conn.execute("BEGIN")
            conn.execute("CREATE TEMP TABLE load_m AS SELECT * FROM members WHERE 0")
            _load_members(conn, members, check, rules)
            try:
                conn.execute("CREATE UNIQUE INDEX members_uid ON members (uid) WHERE uid IS NOT NULL")
            except sqlite3.IntegrityError:
                uid, cards = conn.execute("SELECT uid, group_concat(card_no, ', ') FROM members WHERE uid IS NOT "
                                          "NULL GROUP BY uid HAVING count(*) > 1 LIMIT 1").fetchone()
                raise ValueError(f"members: cards {cards} have the same nfc_uid") from None

            def deny_rows():
                for rec in deny:
                    rec = check_deny_entry(rec) if check else dict(rec)
                    card_no = rec.pop("card_no")
                    yield card_no, orjson.dumps(rec)

            _insert_batched(conn, "INSERT OR REPLACE INTO deny VALUES (?, ?)", deny_rows())
            conn.executemany("INSERT INTO meta VALUES (?, ?)", [
                ("format", 1), ("version", version), ("as_of", as_of), ("store_seq", store_seq),
                ("deny_version", deny_version)])
            conn.execute("COMMIT")
        except BaseException:
            conn.close()
            raise
        conn.close()
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def replace_snapshot(self, members: Iterable[dict], deny: Iterable[dict], *, version: int, as_of: int,
                         store_seq: int, deny_version: int = 0, check: bool = True,
                         rules: dict | None = None) -> None:
        """Load a new snapshot and switch to it atomically (see the module
        docstring). ``check``: each record against MEMBER_SCHEMA / DENY_SCHEMA
        (and, with ``rules``, its tier/card type/package references);
        ValueError/RulesetError name the card and field, nothing changes."""
        with self._load_lock:
            tmp = self.path.with_name(f"{self.path.name}.loading-{os.getpid()}")
            if tmp.exists():
                tmp.unlink()
            try:
                self._build(tmp, members, deny, version=version, as_of=as_of, store_seq=store_seq,
                            deny_version=deny_version, check=check, rules=rules)
                with self._write_lock:
                    # Deny deltas applied while loading, newer than the snapshot's deny list.
                    log = [(v, orjson.loads(e)) for v, e in self._deltas.execute(
                        "SELECT version, entries FROM deny_log WHERE version > ? ORDER BY version",
                        (deny_version,))]
                    if log:
                        conn = sqlite3.connect(tmp, isolation_level=None)
                        conn.execute("BEGIN")
                        for v, entries in log:
                            _deny_apply_sql(conn, entries)
                        conn.execute("UPDATE meta SET value=? WHERE key='deny_version'", (log[-1][0],))
                        conn.execute("COMMIT")
                        conn.close()
                        fd = os.open(tmp, os.O_RDONLY)
                        os.fsync(fd)
                        os.close(fd)
                    old = self._conn
                    os.replace(tmp, self.path)           # the switch on disk
                    sync_dir(self.dir)
                    self._conn = self._open(self.path)   # the switch for readers: one assignment
                    self._read_meta()
                    # A reader on the event loop may be mid-query on the old connection:
                    # close it a little later (its unlinked file is freed then).
                    timer = threading.Timer(2.0, old.close)
                    timer.daemon = True
                    timer.start()
            except BaseException:
                if tmp.exists():
                    tmp.unlink()
                raise
        # Housekeeping; correctness does not depend on it (totals filter by store_seq).
        with self._deltas:
            self._deltas.execute("DELETE FROM deltas WHERE seq <= ?", (self.store_seq,))
            self._deltas.execute("DELETE FROM deny_log WHERE version <= ?", (deny_version,))
        self._refresh_with_deltas()

    # -- deny deltas ------------------------------------------------------

    def apply_deny_delta(self, version: int, entries: dict) -> bool:
        """Apply deny delta ``version`` ({card_no: entry, or None to lift}).
        False if already applied; DenyDeltaGap if a version was skipped
        (nothing changes: the caller asks HQ for a resync)."""
        checked = {no: (None if e is None else {k: v for k, v in check_deny_entry({"card_no": no, **e}).items()
                                               if k != "card_no"})
                   for no, e in entries.items()}
        with self._write_lock:
            if version <= self.deny_version:
                return False
            if version != self.deny_version + 1:
                raise DenyDeltaGap(self.deny_version, version)
            # Logged first: a snapshot loading now re-applies it before its switch,
            # and a crash before the next lines is repaired at the next open.
            self._deltas.execute("INSERT OR REPLACE INTO deny_log VALUES (?, ?)", (version, orjson.dumps(checked)))
            self._apply_deny_locked(version, checked)
            return True

    def _apply_deny_locked(self, version: int, entries: dict) -> None:
        conn = self._conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            _deny_apply_sql(conn, entries)
            conn.execute("INSERT OR REPLACE INTO meta VALUES ('deny_version', ?)", (version,))
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        self.deny_version = version

    # -- local deltas -----------------------------------------------------

    def record_deltas(self, seq: int, member_id: str, day: str, deltas: dict) -> None:
        """Record what journal record ``seq`` changed for the member (idempotent by seq)."""
        deltas = check_deltas(deltas)
        extra = {k: deltas[k] for k in (*DELTA_MAPS, "coupons_used", "package_expires") if deltas.get(k)}
        with self._deltas:
            self._deltas.execute("INSERT OR REPLACE INTO deltas VALUES (?, ?, ?, ?, ?, ?, ?, ?)", (
                seq, member_id, day, *(deltas.get(k, 0) for k in DELTA_INTS),
                orjson.dumps(extra) if extra else None))
        if seq > self.store_seq:
            self._with_deltas.add(member_id)

    def local_totals(self, member_id: str, day: str, after: int | None = None) -> dict:
        """The member's deltas journaled here after seq ``after`` (default:
        the snapshot's watermark; a live account's ``store_seq``). Deltas at
        or below the snapshot's watermark are gone: ``after`` below it counts
        from the watermark (the caller does not ask for that: validate.validate
        ignores a live answer older than the snapshot)."""
        after = self.store_seq if after is None else max(after, self.store_seq)
        totals = empty_totals()
        if member_id not in self._with_deltas:   # no delta after the watermark, so none after ``after``
            return totals
        for row_day, p, pe, pr, sv, extra in self._deltas.execute(
                "SELECT day, points, points_earned, points_redeemed, stored_value_fen, extra FROM deltas "
                "WHERE member_id=? AND seq>? ORDER BY seq", (member_id, after)):
            d = {"points": p, "points_earned": pe, "points_redeemed": pr, "stored_value_fen": sv}
            if extra:
                d.update(orjson.loads(extra))
            add_deltas(totals, row_day, day, d)
        return totals

    def close(self) -> None:
        self._conn.close()
        self._deltas.close()


# A member is its record as sent (JSON), plus the two keys it is found by. Encoding
# the record once is the bulk load's cheapest option (measured: per-field
# columns cost more in SQLite's binding than orjson costs).
_SELECT_MEMBER = "SELECT rec FROM members WHERE card_no=?"
_INSERT = "INSERT INTO {} VALUES (?, ?, ?)"


def _row(rec: dict) -> tuple:
    uid = rec.get("nfc_uid")
    return rec["card_no"], normalise_uid(uid) if uid else None, orjson.dumps(rec)


def _expand(row: tuple) -> dict:
    return expand_row(orjson.loads(row[0]))


def _load_members(conn: sqlite3.Connection, members: Iterable[dict], check: bool, rules: dict | None) -> None:
    """Rows go straight into the clustered table while they arrive in card
    order (HQ writes parts sorted; appending to a B-tree is the fastest
    load); from the first row out of order on, into a temporary table that is
    inserted sorted at the end."""
    direct, spill = [], []
    last = ""
    in_order = True
    checker = member_checker(rules, fill_defaults=False)
    try:
        for rec in members:
            rec = checker(rec) if check else rec
            card_no = rec["card_no"]
            row = _row(rec)
            if in_order and card_no > last:
                last = card_no
                direct.append(row)
                if len(direct) >= _BATCH:
                    conn.executemany(_INSERT.format("members"), direct)
                    direct.clear()
            else:
                in_order = False
                spill.append(row)
                if len(spill) >= _BATCH:
                    conn.executemany(_INSERT.format("load_m"), spill)
                    spill.clear()
        conn.executemany(_INSERT.format("members"), direct)
        conn.executemany(_INSERT.format("load_m"), spill)
        conn.execute("INSERT INTO members SELECT * FROM load_m ORDER BY card_no")
    except sqlite3.IntegrityError:
        dup = conn.execute("SELECT card_no FROM load_m GROUP BY card_no HAVING count(*) > 1 UNION ALL "
                           "SELECT card_no FROM load_m WHERE card_no IN (SELECT card_no FROM members) "
                           "LIMIT 1").fetchone()
        dup = dup[0] if dup else (direct[-1][0] if direct else "?")
        raise ValueError(f"members.{dup}: the card appears twice in the snapshot") from None
    conn.execute("DROP TABLE load_m")


def _insert_batched(conn: sqlite3.Connection, sql: str, rows: Iterable[tuple]) -> None:
    batch = []
    for row in rows:
        batch.append(row)
        if len(batch) >= _BATCH:
            conn.executemany(sql, batch)
            batch.clear()
    if batch:
        conn.executemany(sql, batch)


def _deny_apply_sql(conn: sqlite3.Connection, entries: dict) -> None:
    for card_no, entry in entries.items():
        if entry is None:
            conn.execute("DELETE FROM deny WHERE card_no=?", (card_no,))
            got = conn.execute(_SELECT_MEMBER, (card_no,)).fetchone()
            if got is not None:
                row = orjson.loads(got[0])
                if lifted_row(row) is not row:
                    conn.execute("UPDATE members SET rec=? WHERE card_no=?",
                                 (orjson.dumps(lifted_row(row)), card_no))
        else:
            rec = {k: v for k, v in entry.items() if k != "card_no"}
            conn.execute("INSERT OR REPLACE INTO deny VALUES (?, ?)", (card_no, orjson.dumps(rec)))


def read_part_lines(lines: Iterable[str | bytes]) -> tuple[dict, Iterable[dict]]:
    """A JSON-lines part (members.*.jsonl / deny.*.jsonl): the first line is
    the header (``{"part": "members", "as_of", "store_seq"}`` or ``{"part":
    "deny", "version"}``), then one record per line. Returns (header,
    records) — records lazily, so a million lines are never all in memory."""
    it = iter(lines)
    try:
        header = orjson.loads(next(it))
    except StopIteration:
        raise ValueError("part: empty (no header line)") from None
    if not isinstance(header, dict) or header.get("part") not in ("members", "deny"):
        raise ValueError("part: the first line must be a header {\"part\": \"members\" | \"deny\", ...}")

    def records():
        for n, line in enumerate(it, start=2):
            if line.strip():
                try:
                    yield orjson.loads(line)
                except orjson.JSONDecodeError as exc:
                    raise ValueError(f"part line {n}: not JSON: {exc}") from None
    return header, records()


def load_part_files(store: MemberSnapshot, members_path: str | Path, deny_path: str | Path | None = None, *,
                    version: int = 1, rules: dict | None = None) -> None:
    """Load members/deny JSON-lines part files into a store (tests, demo, bench)."""
    with open(members_path, "rb") as mf:
        header, members = read_part_lines(mf)
        if deny_path:
            df = open(deny_path, "rb")
            dheader, deny = read_part_lines(df)
        else:
            df, dheader, deny = None, {}, iter(())
        try:
            store.replace_snapshot(members, deny, version=version, as_of=header.get("as_of", 0),
                                   store_seq=header.get("store_seq", 0),
                                   deny_version=dheader.get("version", 0), rules=rules)
        finally:
            if df:
                df.close()
