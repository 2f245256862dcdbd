"""Counter operations: sales with tenders, returns, top-ups, package uses and
card services, journaled durably and applied to the store's local state.

This is shell around the pure pricing core (gateway/pricing.py): it finds the
member, asks pricing for the record, makes the record durable in the journal
(the POS's OK comes after fdatasync), and then applies what the record
changes locally:

- the member's local deltas (points, stored value, package uses, coupons,
  promotion uses) in the member store, so the next tap and quote see them and
  the offline limits count them (wire/RULESET.md "Local debits between
  snapshots");
- the counter archive (``<data_dir>/counter.db``, SQLite): sales kept for
  ``RETURN_WINDOW_DAYS`` so a later return can reference them and reverse
  them exactly, the returns made against each sale, and the card services done
  here (a card reported lost or frozen at this counter is refused here at once,
  before HQ's deny delta comes back).

Crash safety: both are written right after the journal append, in the same
turn of the event loop. On start-up every journal record after the archive's
last sequence number is applied again (both writes are idempotent by seq), so
a crash between the journal and the local state loses nothing.

Operations on one member account, and returns of one sale, run one at a time
(an asyncio lock per account / per sale), so two lanes cannot both spend the
same daily offline allowance or return the same item twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import weakref
import zlib
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from gateway import engine, pricing
from gateway.journal import Appended, RecordRefused
from gateway.texts import reason_text
from wire import records
from wire.ruleset import is_card_no

if TYPE_CHECKING:
    from gateway.service import Gateway, Lane
    from gateway.terminals import Terminal

log = logging.getLogger("storegate.counter")

RETURN_WINDOW_DAYS = 90
JOURNALED = ("sale", "return", "topup", "package_use", "card_op")
LOCAL_DENY = {"lost", "frozen", "replaced"}  # take effect here at once; unfreeze waits for HQ
LOCAL_CALLER = "local"  # the terminal of operations called in-process (demo, tools), not over the API
PAYMENT_METHODS = ("cash", "bank_card", "wechat", "alipay", "unionpay", "other")

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
"""


class CounterError(ValueError):
    """A counter request that cannot be done; ``code`` for the POS, ``status`` for HTTP."""

    def __init__(self, code: str, message: str, status: int = 400, text: dict | None = None) -> None:
        super().__init__(message)
        self.code, self.status, self.text = code, status, text


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
            elif type_ == "card_op":
                op, card = body.get("op"), body.get("card_no")
                if body.get("status_after") in LOCAL_DENY:
                    db.execute("INSERT OR REPLACE INTO card_status VALUES (?,?,?,?)",
                               (card, body["status_after"], body.get("new_card_no"), seq))
                elif op == "unfreeze":
                    db.execute("DELETE FROM card_status WHERE card_no=? AND status='frozen'", (card,))
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

    def card_status(self, card_no: str) -> tuple[str, str | None] | None:
        row = self._db.execute("SELECT status, replaced_by FROM card_status WHERE card_no=?", (card_no,)).fetchone()
        return (row[0], row[1]) if row else None

    def prune(self, older_than_ms: int) -> int:
        """Forget sales (and their returns) past the return window."""
        cur = self._db.execute("DELETE FROM records WHERE ts < ? AND type='sale'", (older_than_ms,))
        self._db.execute("DELETE FROM records WHERE type='return' AND sale_seq NOT IN "
                         "(SELECT seq FROM records WHERE type='sale')")
        return cur.rowcount


def _key(request: dict, what: str, terminal: "Terminal | None") -> str:
    """The request's idempotency key, scoped to the terminal that sent it:
    one terminal's key can neither replay nor block another's."""
    key = request.get("idempotency_key")
    if not isinstance(key, str) or not 8 <= len(key) <= 128:
        raise engine.BasketError(f"idempotency_key: required, a string of 8-128 characters unique per {what}")
    return f"{terminal.id if terminal else LOCAL_CALLER}/{key}"


def _payment(payment) -> dict:
    """How a top-up was paid: money in the till must match money on the card."""
    if not isinstance(payment, dict) or payment.get("method") not in PAYMENT_METHODS:
        raise engine.BasketError(f"payment.method: required, one of {', '.join(PAYMENT_METHODS)}")
    ref = payment.get("reference")
    if set(payment) - {"method", "reference"} or (ref is not None and not (
            isinstance(ref, str) and 1 <= len(ref) <= 64 and ref.isascii() and ref.isprintable())):
        raise engine.BasketError("payment: {method, reference?}; reference up to 64 printable ASCII characters")
    return {"method": payment["method"], **({"reference": ref} if ref is not None else {})}


def _pos_may_return(terminal: "Terminal", original: dict) -> None:
    """A POS returns only its own lanes' sales..."""
    if not terminal.serves(str(original.get("lane"))):
        raise CounterError("return_other_lane", f"sale was made on lane {original.get('lane')}; terminal "
                           f"{terminal.id} serves lanes {', '.join(terminal.lanes)}: use the service desk", 403,
                           {"zh-CN": "此笔销售不是在本收银台完成的，请到服务台办理退货",
                            "en": "This sale was made at another lane; please handle the return at the service desk"})


def _pos_may_refund(record: dict, limit: int | None) -> None:
    """...and only small ones."""
    refund = record["totals"]["refund_fen"]
    if limit is not None and refund > limit:
        raise CounterError("return_needs_service_desk", f"refund {refund} fen is over the POS limit of {limit} "
                           "fen (api.pos_return_max_fen): use the service desk", 403,
                           {"zh-CN": "退款金额超出收银台权限，请到服务台办理",
                            "en": "This refund is above the lane's limit; please handle it at the service desk"})


def _within_sale_limits(limits: dict, q: dict) -> None:
    """The rules' sanity caps on a line, a sale and its points: a mistyped
    price (or a forged one) must not become a sale of billions."""
    def over(code: str, field: str, value: int, cap: int, key: str, zh: str, en: str):
        return CounterError(code, f"{field}: {value} is over the store's limit of {cap} (sale_limits.{key})", 422,
                            {"zh-CN": zh, "en": en})
    line_max = limits.get("max_line_fen", 5_000_000)
    for i, line in enumerate(q["lines"]):
        if line["amount"] > line_max:
            raise over("line_over_limit", f"lines[{i}]", line["amount"], line_max, "max_line_fen",
                       "单行商品金额超出上限，请核对数量和价格", "A line's amount is above the limit; check quantity and price")
    sale_max = limits.get("max_sale_fen", 20_000_000)
    if q["subtotal"] > sale_max:
        raise over("sale_over_limit", "lines", q["subtotal"], sale_max, "max_sale_fen",
                   "整单金额超出上限，请核对商品", "The sale is above the limit; check the basket")
    points_max = limits.get("max_points_per_sale", 1_000_000)
    if q["points"]["earned"] > points_max:
        raise over("points_over_limit", "lines", q["points"]["earned"], points_max, "max_points_per_sale",
                   "本单积分超出上限，请联系店长", "The points this sale earns are above the limit; call the manager")


def _account_of(member: engine.Verdict | None) -> str | None:
    """Whose balances an operation spends: the primary's for a 附属卡."""
    if member is None or member.member is None:
        return None
    return member.member.get("account_id") or member.member.get("member_id")


def _only(request: dict, allowed: set[str]) -> None:
    unknown = set(request) - allowed
    if unknown:
        raise engine.BasketError(f"unknown field(s) {', '.join(sorted(map(str, unknown)))}; "
                                 f"allowed: {', '.join(sorted(allowed))}")


class Counter:
    """The counter operations of one gateway."""

    def __init__(self, gw: "Gateway", archive_path: str | Path) -> None:
        self.gw = gw
        self.archive = CounterArchive(archive_path)
        self._locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()  # in use only
        # Journaled records whose local effects could not be written yet (disk
        # full): retried before every operation; while any is left, new
        # operations are refused, so balances and limits never miss one.
        self._unapplied: list[tuple] = []
        self.faults: list[str] = []

    def close(self) -> None:
        self.archive.close()

    # -- start-up: re-apply what the journal holds and the local state may miss --

    async def catch_up(self) -> int:
        applied, after = 0, self.archive.last_seq
        while True:
            records = await self.gw.journal.pending(after, 1000)
            if not records:
                return applied
            for r in records:
                if r.type in JOURNALED:
                    self._apply_local(r.seq, r.id, r.type, r.ts, r.body)
                    applied += 1
            after = records[-1].seq

    def _apply_local(self, seq: int, tx_id: str, type_: str, ts_ms: int, body: dict) -> None:
        deltas = body.get("deltas")
        account = body.get("account_id")
        members = self.gw.rules.members
        if deltas and account and members is not None:
            members.record_deltas(seq, account, body.get("day") or self._day(ts_ms), deltas)
        self.archive.apply(seq, tx_id, type_, ts_ms, body)

    def _apply_or_hold(self, *record) -> None:
        try:
            self._apply_local(*record)
        except (sqlite3.Error, OSError) as exc:
            log.error("local state write failed for seq %d (%s); kept to retry, new operations refused",
                      record[0], exc)
            self._unapplied.append(record)
            self.faults = [f"local state behind the journal by {len(self._unapplied)} record(s): {exc}"]

    def _settle(self) -> None:
        """Apply what is held, or refuse the operation (nothing is written)."""
        while self._unapplied:
            try:
                try:
                    self._apply_local(*self._unapplied[0])
                except (sqlite3.Error, OSError):
                    self.archive.relieve()
                    self._apply_local(*self._unapplied[0])
            except (sqlite3.Error, OSError) as exc:
                from gateway.journal import JournalFull
                raise JournalFull(f"local state cannot be written ({exc}); "
                                  f"{len(self._unapplied)} record(s) waiting") from None
            self._unapplied.pop(0)
        self.faults = []

    def _topup_within_caps(self, policy: dict, record: dict, terminal: "Terminal | None") -> None:
        """The rules' caps on one top-up and on one terminal's top-ups a day."""
        sv = policy.get("stored_value", {})
        pay = record["pay_fen"]
        one_max = sv.get("topup_max_fen", 500_000)
        if pay > one_max:
            raise CounterError("topup_over_limit", f"top-up of {pay} fen is over the limit of {one_max} fen "
                               "(stored_value.topup_max_fen)", 422,
                               {"zh-CN": "单笔充值金额超出上限", "en": "This top-up is above the limit for one top-up"})
        who = terminal.id if terminal else LOCAL_CALLER
        day_max = sv.get("topup_max_per_terminal_day_fen", 2_000_000)
        taken = self.archive.topups_paid(self.gw.now().date().isoformat(), who)
        if taken + pay > day_max:
            raise CounterError("topup_terminal_day_limit", f"terminal {who} took {taken} fen of top-ups today; "
                               f"{pay} more is over its daily limit of {day_max} fen "
                               "(stored_value.topup_max_per_terminal_day_fen)", 422,
                               {"zh-CN": "本收银台今日充值总额已达上限，请联系店长",
                                "en": "This till has reached today's top-up limit; please call the manager"})

    def _day(self, ts_ms: int) -> str:
        return datetime.fromtimestamp(ts_ms / 1000, self.gw.tz).date().isoformat()

    # -- members ------------------------------------------------------------

    def local_status(self, verdict: engine.Verdict) -> engine.Verdict:
        """A card reported lost, frozen or replaced at this counter is refused
        here at once, even before HQ's deny delta arrives."""
        if not verdict.accepted or not verdict.card_no:
            return verdict
        local = self.archive.card_status(verdict.card_no)
        if local is None:
            return verdict
        status, replaced_by = local
        detail = {"last4": replaced_by[-4:]} if status == "replaced" and replaced_by else None
        return engine.Verdict("deny", status, verdict.card_no, detail=detail)

    def member(self, lane: "Lane", request: dict, *, required: bool = False) -> engine.Verdict | None:
        """The lane's member, validated again now (a deny delta or a local
        sale since the tap changes what the member may do)."""
        use = request.get("member", True)
        if not isinstance(use, bool):
            raise engine.BasketError("member: must be true (the lane's member) or false (no member)")
        if not use:
            return None
        held = self.gw.current_member(lane)
        if held is None or lane.member_read is None:
            if required or request.get("member") is True:
                from gateway.service import NoMember
                raise NoMember(f"no member card accepted on lane {lane.id} in the last "
                               f"{self.gw.config['api']['member_hold_s']} s")
            return None
        source, raw = lane.member_read
        fresh = self.local_status(engine.validate(source, raw, self.gw.rules.current, self.gw.now()))
        if not fresh.accepted:
            lane.member = None
            raise CounterError("member_refused", f"the lane's member card is now refused: {fresh.reason}",
                               409, reason_text(fresh.reason))
        return fresh

    def _lock(self, name: str) -> asyncio.Lock:
        """The lock of one account, sale or terminal; kept while anyone holds
        or waits for it, so the table stays as small as the work in flight."""
        lock = self._locks.get(name)
        if lock is None:
            lock = asyncio.Lock()
            self._locks[name] = lock
        return lock

    @contextlib.asynccontextmanager
    async def _locked_member(self, lane: "Lane", request: dict, *, required: bool = False):
        """The lane's member, read and validated while its account's lock is
        held; the caller prices and journals before the lock is let go.

        Balances, daily usage and card status must be read inside the lock:
        a read taken before waiting misses what the lane ahead just spent, so
        two lanes could both spend the same balance or daily allowance. The
        lock is the account's, so a primary card and its 附属卡 share it. A
        member without an account (not in the snapshot) can spend nothing
        and is not locked."""
        while True:
            account = _account_of(self.member(lane, request, required=required))  # which lock to wait for
            if account is None:
                self._settle()
                yield self.member(lane, request, required=required)
                return
            async with self._lock(f"account:{account}"):
                self._settle()  # the local writes of the operation ahead must count before we read
                member = self.member(lane, request, required=required)
                if _account_of(member) == account:
                    yield member
                    return
            # A new snapshot moved the card to another account while we waited: lock that one.

    # -- pricing context ----------------------------------------------------------

    def _policy(self) -> tuple[dict, Any]:
        rules = self.gw.rules.current
        if rules is None:
            return {"tiers": {}, "card_types": {}, "promotions": {}, "coupons": {}, "packages": {},
                    "earning": {"points_per_yuan": 0}, "redemption": {}, "stored_value": {}, "fees": {}}, None
        return {**rules.data, "version": rules.version}, rules

    def _quote(self, lane: "Lane", request: dict, member: engine.Verdict | None) -> dict:
        policy, rules = self._policy()
        now = self.gw.now()
        ages = engine.offline_ages(rules, now) if rules else {}  # the same ages the tap's verdict used
        store_cfg = self.gw.config["store"]
        q = pricing.quote(request.get("lines"), engine.member_context(member), policy, now,
                          store=self.gw.store_id, region=store_cfg.get("region"),
                          tender=request.get("tender"), **ages)
        _within_sale_limits(policy.get("sale_limits", {}), q)
        return q

    def quote(self, lane_id: str, request: dict) -> dict:
        lane = self.gw.lane(lane_id)
        _only(request, {"lines", "member", "tender", "idempotency_key", "expected_total"})  # a sale body quotes too
        member = self.member(lane, request)
        q = self._quote(lane, request, member)
        q = {k: v for k, v in q.items() if k != "record"}
        return {"lane": lane.id, "member": member.public() if member else None, **q}

    # -- journaled operations -------------------------------------------------

    async def _journal(self, type_: str, key: str, idem: dict, body: dict, response: dict,
                       account: str | None, terminal: "Terminal | None") -> Appended:
        now = self.gw.now()
        body = {**body, "account_id": account, "day": now.date().isoformat(),
                "terminal": terminal.id if terminal else LOCAL_CALLER}
        try:  # only what the contract's record schema allows goes into the journal: HQ can apply all of it
            records.validate_body(type_, body)
        except records.RecordError as exc:
            raise RecordRefused(str(exc)) from None
        result = await self.gw.journal.append(type_, body, idempotency_key=key, request=idem, response=response)
        if not result.duplicate:
            # Same loop turn as the append's completion: nothing else sees the
            # record before its local effects are in place. The record is
            # durable already: a failure here holds it for retry, never fails it.
            self._apply_or_hold(result.seq, result.id, type_, int(self.gw.clock() * 1000), body)
        return result

    async def sale(self, lane_id: str, request: dict, *, terminal: "Terminal | None" = None) -> Appended:
        lane = self.gw.lane(lane_id)
        _only(request, {"lines", "member", "tender", "idempotency_key", "expected_total"})
        key = _key(request, "sale", terminal)
        idem = {k: request.get(k) for k in ("lines", "member", "tender", "expected_total")} | {"lane": lane.id}
        earlier = await self.gw.journal.lookup(key, idem)
        if earlier:
            return earlier  # a retry: the first answer, whatever changed since
        async with self._locked_member(lane, request) as member:
            earlier = await self.gw.journal.lookup(key, idem)
            if earlier:
                return earlier
            account = member.member.get("account_id") if member else None
            q = self._quote(lane, request, member)
            expected = request.get("expected_total")
            if expected is not None and expected != q["total"]:
                from gateway.service import QuoteChanged
                raise QuoteChanged(f"expected_total {expected} but the sale prices at {q['total']}; quote again")
            body = {**q["record"], "lane": lane.id, "idempotency_key": key}
            response = {"lane": lane.id, "total": q["total"], "discount": q["discount"],
                        "tender": q["tender"], "points_earned": q["points"]["earned"],
                        "balances_after": q["balances_after"], "receipt": q["receipt"]}
            result = await self._journal("sale", key, idem, body, response, account, terminal)
        if not result.duplicate:
            self.gw.stats["sales"] += 1
            lane.member = None  # the member's visit ends with the sale
            lane.publish({"type": "sale", "lane": lane.id, "seq": result.seq, "total": q["total"]})
        return result

    async def sale_return(self, request: dict, *, terminal: "Terminal | None" = None,
                          pos_return_max_fen: int | None = None) -> Appended:
        """A full or partial return referencing the original sale by its
        journal ``sale_seq`` or transaction ``sale_id`` (both on the receipt).
        A POS may return only sales made on its own lanes, up to
        ``pos_return_max_fen``; the service desk returns any sale."""
        _only(request, {"idempotency_key", "sale_seq", "sale_id", "lines"})
        key = _key(request, "return", terminal)
        if ("sale_seq" in request) == ("sale_id" in request):
            raise engine.BasketError("give exactly one of sale_seq (the sale's number) or sale_id")
        ref = {"seq": request["sale_seq"]} if "sale_seq" in request else {"id": request["sale_id"]}
        if "seq" in ref and (type(ref["seq"]) is not int or ref["seq"] < 1):
            raise engine.BasketError("sale_seq: a whole number >= 1")
        if "id" in ref and not isinstance(ref["id"], str):
            raise engine.BasketError("sale_id: a string")
        idem = {"ref": ref, "lines": request.get("lines")}
        earlier = await self.gw.journal.lookup(key, idem)
        if earlier:
            return earlier
        self._settle()
        found = self.archive.sale(ref)
        if found is None:
            raise CounterError("sale_not_found", f"no sale {ref} in this store's last {RETURN_WINDOW_DAYS} days; "
                               "return it at the service desk against HQ's records", 404,
                               {"zh-CN": "未找到原销售记录，请到服务台办理退货", "en":
                                "Original sale not found here; please handle the return at the service desk"})
        sale_seq, sale_id, original = found
        account = original.get("account_id")
        # The sale's lock, then its account's (a return gives back points a
        # concurrent redemption may be spending); sales take only the latter.
        async with self._lock(f"sale:{sale_seq}"), \
                (self._lock(f"account:{account}") if account else contextlib.nullcontext()):
            earlier = await self.gw.journal.lookup(key, idem)
            if earlier:
                return earlier
            policy, _rules = self._policy()
            pos = terminal is not None and terminal.role != "service_desk"
            if pos:
                _pos_may_return(terminal, original)
            r = pricing.return_quote(original, request.get("lines"), self.archive.returns_of(sale_seq),
                                     policy, self.gw.now())
            if pos:
                _pos_may_refund(r["record"], pos_return_max_fen)
            body = {**r["record"], "sale_seq": sale_seq, "sale_id": sale_id, "idempotency_key": key}
            response = {"sale_seq": sale_seq, "totals": r["totals"], "receipt": r["receipt"]}
            return await self._journal("return", key, idem, body, response, account, terminal)

    async def topup(self, lane_id: str, request: dict, *, terminal: "Terminal | None" = None) -> Appended:
        lane = self.gw.lane(lane_id)
        _only(request, {"idempotency_key", "package_id", "amount_fen", "payment"})
        key = _key(request, "top-up", terminal)
        idem = {k: request.get(k) for k in ("package_id", "amount_fen")} | {"lane": lane.id}
        payment = _payment(request.get("payment"))
        idem["payment"] = payment

        def build(policy, ctx):
            out = pricing.topup(policy, ctx, package_id=request.get("package_id"),
                                amount_fen=request.get("amount_fen"), now=self.gw.now())
            self._topup_within_caps(policy, out["record"], terminal)
            return {**out, "record": {**out["record"], "payment": payment}}
        # One terminal's top-ups one at a time: its daily cap is checked and
        # the top-up journaled before the next is checked.
        async with self._lock(f"terminal:{terminal.id if terminal else LOCAL_CALLER}"):
            return await self._member_op(lane, key, idem, "topup", build, terminal)

    async def use_package(self, lane_id: str, package_id: str, request: dict, *,
                          terminal: "Terminal | None" = None) -> Appended:
        lane = self.gw.lane(lane_id)
        _only(request, {"idempotency_key", "uses"})
        key = _key(request, "package use", terminal)
        uses = request.get("uses", 1)
        idem = {"package_id": package_id, "uses": uses, "lane": lane.id}
        return await self._member_op(lane, key, idem, "package_use", lambda policy, ctx: pricing.consume_package(
            policy, ctx, package_id, uses, now=self.gw.now()), terminal)

    async def _member_op(self, lane: "Lane", key: str, idem: dict, type_: str, build,
                         terminal: "Terminal | None" = None) -> Appended:
        earlier = await self.gw.journal.lookup(key, idem)
        if earlier:
            return earlier
        async with self._locked_member(lane, {"member": True}, required=True) as member:
            earlier = await self.gw.journal.lookup(key, idem)
            if earlier:
                return earlier
            account = _account_of(member)
            policy, _rules = self._policy()
            out = build(policy, engine.member_context(member))
            body = {**out["record"], "lane": lane.id, "idempotency_key": key}
            response = {"lane": lane.id, "record": {k: v for k, v in out["record"].items() if k != "card_no"},
                        "receipt": out["receipt"]}
            return await self._journal(type_, key, idem, body, response, account, terminal)

    async def card_service(self, request: dict, *, terminal: "Terminal | None" = None) -> Appended:
        """Issue, report lost, freeze, unfreeze, replace, annual fee: at the
        service desk, by card number (a lost card cannot be tapped)."""
        _only(request, {"idempotency_key", "kind", "card_no", "new_card_no", "reason"})
        key = _key(request, "card service", terminal)
        kind, card = request.get("kind"), request.get("card_no")
        if not is_card_no(card):
            raise engine.BasketError("card_no: required, the card's number (6-19 digits)")
        idem = {k: request.get(k) for k in ("kind", "card_no", "new_card_no", "reason")}
        earlier = await self.gw.journal.lookup(key, idem)
        if earlier:
            return earlier
        self._settle()
        policy, rules = self._policy()
        record = rules.members.get(card) if rules else None
        member = None
        if kind != "issue":
            if record is None:
                raise CounterError("card_not_found", f"card {engine.mask_card(card)} is not in this store's "
                                   "member list; do this at HQ", 404,
                                   {"zh-CN": "本店会员资料中没有此卡，请联系总部办理",
                                    "en": "This card is not in the store's member list; please contact HQ"})
            member = {"member_id": record["member_id"], "card_no": card}
        elif record is not None:
            raise CounterError("card_exists", f"card {engine.mask_card(card)} is already issued", 409,
                               {"zh-CN": "此卡已发行", "en": "This card has already been issued"})
        out = pricing.card_operation(policy, kind, member, card_no=card, new_card_no=request.get("new_card_no"),
                                     now=self.gw.now())
        body = {**out["record"], "reason": request.get("reason"), "idempotency_key": key}
        response = {"kind": kind, "card": engine.mask_card(card), "fee_fen": out["record"]["fee_fen"],
                    "status_after": out["record"]["status_after"], "receipt": out["receipt"]}
        return await self._journal("card_op", key, idem, body, response, None, terminal)

