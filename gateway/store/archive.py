"""The counter archive (``<data_dir>/counter.db``, SQLite): what the counter
operations journaled here leave behind locally, by journal seq.

- Sales kept for the return window (``RETURN_WINDOW_DAYS`` in
  gateway/shell/counter.py), so a later return can reference them and reverse
  them exactly, and the returns made against each sale.
- The card services done here: a card reported lost or frozen at this counter
  is refused here at once, before HQ's deny delta comes back; lifts; expiries
  extended here.
- Cards registered or issued here that HQ's snapshot may not hold yet
  (``LocalMembers`` puts them beside the snapshot).
- Top-ups per terminal and day, and moves of the paid part of stored value.

Invariants:

1. ``apply`` is idempotent by seq, and ``last_seq`` is the highest seq applied:
   every journal record after it is applied again on start-up, so a crash
   between the journal append and the archive write loses nothing.
2. The archive is written after the journal append (synchronous=NORMAL): a
   power cut may lose its last writes, which that replay restores.
"""

from __future__ import annotations

import logging
import sqlite3
import zlib
from pathlib import Path

import orjson

from gateway.core.members import LiveAnswers, MemberLookup

log = logging.getLogger("storegate.counter")

LOCAL_DENY = {"lost", "frozen", "replaced"}  # take effect here at once; HQ's deny delta takes them elsewhere
LIFTABLE = ("lost", "frozen")                 # what a service-desk unfreeze lifts here
# Never here: "blocked" / "limited" (HQ's block or limit of an overdrawn account, from its deny list or
# snapshot): only HQ lifts it.
LOCAL_CALLER = "local"  # the terminal of operations called in-process (demo, tools), not over the API

ARCHIVE_SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    seq INTEGER PRIMARY KEY,
    id TEXT NOT NULL,
    type TEXT NOT NULL,
    ts INTEGER NOT NULL,
    sale_seq INTEGER,
    body BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS records_sale ON records(sale_seq);
CREATE INDEX IF NOT EXISTS records_id ON records(id);
CREATE TABLE IF NOT EXISTS card_status (
    card_no TEXT PRIMARY KEY,
    status TEXT NOT NULL,
    replaced_by TEXT,
    seq INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS topups (
    seq INTEGER PRIMARY KEY,
    day TEXT NOT NULL,
    terminal TEXT NOT NULL,
    pay_fen INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS topups_day ON topups(day, terminal);
-- Cards registered or issued here that HQ's snapshot may not hold yet: a
-- member row (registration), {"alias_of": old card} (a replacement card:
-- the old card's account) or {"subsidiary_of": primary} (附属卡).
CREATE TABLE IF NOT EXISTS local_members (
    card_no TEXT PRIMARY KEY,
    uid TEXT,
    rec BLOB NOT NULL,
    seq INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS local_members_uid ON local_members(uid);
CREATE TABLE IF NOT EXISTS card_expiry (card_no TEXT PRIMARY KEY, expires TEXT NOT NULL, seq INTEGER NOT NULL);
-- Moves of the paid part of stored value made here (top-ups +, withdrawals -).
CREATE TABLE IF NOT EXISTS sv_paid (
    seq INTEGER PRIMARY KEY,
    account TEXT NOT NULL,
    day TEXT NOT NULL,
    kind TEXT NOT NULL,
    fen INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS sv_paid_account ON sv_paid(account, day);
"""

class CounterArchive:
    """Sales (for returns), returns and local card services, by journal seq."""

    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        # NORMAL: a power cut may lose the last writes, which the journal replay restores.
        self._db.execute("PRAGMA synchronous=NORMAL")
        # Keep the WAL small: it shares the disk with the journal, and a full
        # disk must free up as soon as HQ has acked the backlog.
        self._db.execute("PRAGMA wal_autocheckpoint=64")
        self._db.execute("PRAGMA journal_size_limit=262144")
        self._db.executescript(ARCHIVE_SCHEMA)
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(card_status)")}
        if "ts" not in columns:  # an archive from before lifts: its statuses count as set long ago
            self._db.execute("ALTER TABLE card_status ADD COLUMN ts INTEGER NOT NULL DEFAULT 0")

    def relieve(self) -> None:
        """After a write failed for lack of space: fold the WAL back into the
        database and give its space back, so the retry can succeed."""
        try:
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.Error as exc:
            log.warning("archive checkpoint failed: %s", exc)

    def close(self) -> None:
        self._db.close()

    @property
    def last_seq(self) -> int:
        row = self._db.execute("SELECT v FROM meta WHERE k='last_seq'").fetchone()
        return row[0] if row else 0

    def apply(self, seq: int, tx_id: str, type_: str, ts_ms: int, body: dict) -> None:
        """Record what a journaled counter operation leaves behind (idempotent)."""
        db = self._db
        db.execute("BEGIN")
        try:
            if type_ in ("sale", "return"):
                db.execute("INSERT OR IGNORE INTO records(seq, id, type, ts, sale_seq, body) VALUES (?,?,?,?,?,?)",
                           (seq, tx_id, type_, ts_ms, body.get("sale_seq"), zlib.compress(orjson.dumps(body), 1)))
            elif type_ == "topup":
                db.execute("INSERT OR IGNORE INTO topups(seq, day, terminal, pay_fen) VALUES (?,?,?,?)",
                           (seq, body.get("day") or "", body.get("terminal") or LOCAL_CALLER,
                            body.get("pay_fen", 0)))
                if body.get("account_id"):
                    db.execute("INSERT OR IGNORE INTO sv_paid(seq, account, day, kind, fen) VALUES (?,?,?,?,?)",
                               (seq, body["account_id"], body.get("day") or "", "topup", body.get("pay_fen", 0)))
            elif type_ == "withdrawal":
                db.execute("INSERT OR IGNORE INTO sv_paid(seq, account, day, kind, fen) VALUES (?,?,?,?,?)",
                           (seq, body.get("account_id") or "", body.get("day") or "", "withdrawal",
                            -body.get("paid_fen", 0)))
            elif type_ == "registration":
                rec = {k: body[k] for k in ("member_id", "name", "birthday", "birthday_calendar", "card_type",
                                            "nfc_uid") if body.get(k) is not None}
                rec.update(tier=None, status="active", points=0, balance_fen=0)
                self._local_member(body["card_no"], rec, seq, body.get("nfc_uid"))
            elif type_ == "card_op":
                op, card = body.get("op"), body.get("card_no")
                if body.get("status_after") in LOCAL_DENY:
                    db.execute("INSERT OR REPLACE INTO card_status(card_no, status, replaced_by, seq, ts) "
                               "VALUES (?,?,?,?,?)", (card, body["status_after"], body.get("new_card_no"), seq, ts_ms))
                    if op == "replace" and body.get("new_card_no"):
                        self._local_member(body["new_card_no"], {"alias_of": card}, seq)
                elif op == "unfreeze":
                    db.execute(f"DELETE FROM card_status WHERE card_no=? AND status IN {LIFTABLE}", (card,))
                elif op == "extend" and body.get("expires"):
                    db.execute("INSERT OR REPLACE INTO card_expiry(card_no, expires, seq) VALUES (?,?,?)",
                               (card, body["expires"], seq))
                elif op == "issue_subsidiary" and body.get("primary_card_no"):
                    self._local_member(card, {"subsidiary_of": body["primary_card_no"]}, seq)
            db.execute("INSERT INTO meta(k, v) VALUES ('last_seq', ?) ON CONFLICT(k) DO UPDATE "
                       "SET v=max(v, excluded.v)", (seq,))
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:  # SQLite may have rolled back already (disk full)
                db.execute("ROLLBACK")
            raise

    def sale(self, ref: dict) -> tuple[int, str, dict] | None:
        """(seq, id, body) of a sale by ``{"seq": n}`` or ``{"id": tx id}``."""
        if "seq" in ref:
            row = self._db.execute("SELECT seq, id, body FROM records WHERE seq=? AND type='sale'",
                                   (ref["seq"],)).fetchone()
        else:
            row = self._db.execute("SELECT seq, id, body FROM records WHERE id=? AND type='sale'",
                                   (ref["id"],)).fetchone()
        return (row[0], row[1], orjson.loads(zlib.decompress(row[2]))) if row else None

    def returns_of(self, sale_seq: int) -> list[dict]:
        return [orjson.loads(zlib.decompress(b)) for (b,) in self._db.execute(
            "SELECT body FROM records WHERE sale_seq=? AND type='return' ORDER BY seq", (sale_seq,))]

    def topups_paid(self, day: str, terminal: str) -> int:
        """Fen one terminal took as top-ups on a day."""
        return self._db.execute("SELECT COALESCE(SUM(pay_fen), 0) FROM topups WHERE day=? AND terminal=?",
                                (day, terminal)).fetchone()[0]

    def _local_member(self, card_no: str, rec: dict, seq: int, uid: str | None = None) -> None:
        self._db.execute("INSERT OR IGNORE INTO local_members(card_no, uid, rec, seq) VALUES (?,?,?,?)",
                         (card_no, uid.upper() if uid else None, orjson.dumps(rec), seq))

    def local_member(self, card_no: str) -> dict | None:
        """A card registered or issued here (see ARCHIVE_SCHEMA), or None."""
        row = self._db.execute("SELECT rec FROM local_members WHERE card_no=?", (card_no,)).fetchone()
        return orjson.loads(row[0]) if row else None

    def card_for_uid(self, uid: str) -> str | None:
        row = self._db.execute("SELECT card_no FROM local_members WHERE uid=?",
                               ((uid or "").strip().upper(),)).fetchone()
        return row[0] if row else None

    def expiry(self, card_no: str) -> str | None:
        row = self._db.execute("SELECT expires FROM card_expiry WHERE card_no=?", (card_no,)).fetchone()
        return row[0] if row else None

    def knows(self, card_no: str) -> bool:
        """Whether this store holds local member data for the card."""
        return self._db.execute("SELECT 1 FROM local_members WHERE card_no=? UNION ALL "
                                "SELECT 1 FROM card_expiry WHERE card_no=?", (card_no, card_no)).fetchone() is not None

    def paid_moves(self, account: str, after_seq: int) -> int:
        """Fen the paid part of an account moved here after a seq (top-ups less withdrawals)."""
        return self._db.execute("SELECT COALESCE(SUM(fen), 0) FROM sv_paid WHERE account=? AND seq>?",
                                (account, after_seq)).fetchone()[0]

    def withdrawn(self, account: str, day: str) -> int:
        return -self._db.execute("SELECT COALESCE(SUM(fen), 0) FROM sv_paid WHERE account=? AND day=? "
                                 "AND kind='withdrawal'", (account, day)).fetchone()[0]

    def lift(self, card_no: str, set_before_ms: int) -> bool:
        """HQ lifted the card: forget this store's status of it, unless it
        was set here after HQ's decision (a new report wins)."""
        cur = self._db.execute("DELETE FROM card_status WHERE card_no=? AND ts<?", (card_no, set_before_ms))
        return cur.rowcount > 0

    def card_status(self, card_no: str) -> tuple[str, str | None] | None:
        row = self._db.execute("SELECT status, replaced_by FROM card_status WHERE card_no=?", (card_no,)).fetchone()
        return (row[0], row[1]) if row else None

    def prune(self, older_than_ms: int) -> int:
        """Forget sales (and their returns) past the return window."""
        cur = self._db.execute("DELETE FROM records WHERE ts < ? AND type='sale'", (older_than_ms,))
        self._db.execute("DELETE FROM records WHERE type='return' AND sale_seq NOT IN "
                         "(SELECT seq FROM records WHERE type='sale')")
        return cur.rowcount


class LocalMembers:
    """The member store (a ``MemberLookup``) as this counter sees it: HQ's snapshot first, then
    the cards registered or issued here that the snapshot does not hold yet,
    with expiries extended here. Everything else is the snapshot's."""

    def __init__(self, base: MemberLookup, archive: CounterArchive, own_uid: str | None = None) -> None:
        self._base, self._archive, self._own_uid = base, archive, own_uid

    def get(self, card_no: str, _depth: int = 0) -> dict | None:
        row = self._base.get(card_no)
        if row is None and _depth < 4:
            row = self._local(card_no, _depth)
        if row is not None:
            expires = self._archive.expiry(card_no)
            if expires and (not row.get("expires") or row["expires"] < expires):
                row = {**row, "expires": expires}
        return row

    def _local(self, card_no: str, depth: int) -> dict | None:
        rec = self._archive.local_member(card_no)
        if rec is None:
            return None
        if "alias_of" in rec:        # 补办: the new card carries the old card's account
            old = self.get(rec["alias_of"], depth + 1)
            if old is None:
                return None
            # HQ's block or limit of the account (the old card's row or deny entry) goes with it
            held = (self._base.denied(rec["alias_of"]) or {}).get("status")
            held = held if held in ("blocked", "limited") else old.get("status")
            return {**{k: v for k, v in old.items() if k != "nfc_uid"}, "card_no": card_no,
                    "status": held if held in ("blocked", "limited") else "active"}
        if "subsidiary_of" in rec:   # 附属卡: pays from and earns to the primary's account
            primary = self.get(rec["subsidiary_of"], depth + 1)
            if primary is None:
                return None
            return {"card_no": card_no, "member_id": primary["member_id"], "tier": primary["tier"],
                    "status": "active", "primary_card": rec["subsidiary_of"]}
        return {**rec, "card_no": card_no}

    def card_for_uid(self, uid: str) -> str | None:
        return self._base.card_for_uid(uid) or self._archive.card_for_uid(uid) or \
            (self._own_uid if uid == self._own_uid else None)

    # The rest of the MemberLookup interface is the snapshot's.
    @property
    def version(self) -> int:
        return self._base.version

    @property
    def as_of(self) -> int | None:
        return self._base.as_of

    @property
    def store_seq(self) -> int:
        return self._base.store_seq

    @property
    def live(self) -> "LiveAnswers | None":
        return self._base.live

    def denied(self, card_no: str) -> dict | None:
        return self._base.denied(card_no)

    def local_totals(self, member_id: str, day: str, after: int | None = None) -> dict:
        return self._base.local_totals(member_id, day, after)
