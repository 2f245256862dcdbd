"""Counter operations: sales with tenders, returns, top-ups, count packages
sold, renewed and used, points for gifts, and card services, journaled
durably and applied to the store's local state.

This is shell around the pure pricing core (gateway/core/pricing.py): it finds the
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

The member lifecycle at the counter (this store's side of issue 12):
registration while offline (``register``: a new card usable here at once at
the base tier, from a local table the member look-up consults until HQ's
snapshot has the member), 补办 (the new card carries the account here at
once), 延期 (``extend``), 附属卡 (``issue_subsidiary``), 取款 (``withdraw``:
the paid part of stored value, as ``accounts.withdrawal`` allows), and
lifts: a service-desk ``unfreeze`` lifts a local freeze or loss report, and
HQ's deny delta saying ``active`` clears this store's local status of the
card (``deny_applied``, registered with the rules store).

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
import dataclasses
import hashlib
import logging
import re
import sqlite3
import weakref
from datetime import datetime, tzinfo
from pathlib import Path
from typing import Any, Callable, Protocol


from gateway.core import gifts, packages, pricing, validate
from gateway.core.clock import ClockCheck
from gateway.core.errors import DomainError, NoMember, QuoteChanged
from gateway.core.members import package_expiry_delta
from gateway.core.reasons import reason_text
from gateway.shell.lanes import Lane
from gateway.shell.terminals import Terminal
from gateway.store.archive import LOCAL_CALLER, CounterArchive, LocalMembers
from gateway.store.journal import Appended, Journal, RecordRefused
from gateway.store.rules import RulesStore
from wire import records
from wire.ruleset import is_card_no

log = logging.getLogger("storegate.counter")

RETURN_WINDOW_DAYS = 90
JOURNALED = ("sale", "return", "topup", "package_use", "card_op", "registration", "withdrawal", "package_sale",
             "gift_redemption")
OPERATOR = re.compile(r"^[A-Za-z0-9_.-]{1,32}$")   # the cashier's id (gateway/shell/api_schema.py OPERATOR)
PAYMENT_METHODS = records.PAYMENT_METHODS          # the record schema's, one list


class CounterError(DomainError, ValueError):
    """A counter request that cannot be done; ``code`` for the POS, ``status`` for HTTP."""

    def __init__(self, code: str, message: str, status: int = 400, text: dict | None = None) -> None:
        super().__init__(message, code=code, status=status, text=text)


def _operator(request: dict) -> str | None:
    """The cashier who did it (optional): an id of 1-32 ASCII letters, digits, ``_ . -``."""
    op = request.get("operator")
    if op is not None and not (isinstance(op, str) and OPERATOR.fullmatch(op)):
        raise validate.BasketError("operator: the cashier's id, 1-32 characters of A-Z a-z 0-9 _ . -")
    return op


def _key(request: dict, what: str, terminal: Terminal | None) -> str:
    """The request's idempotency key, scoped to the terminal that sent it:
    one terminal's key can neither replay nor block another's."""
    key = request.get("idempotency_key")
    if not isinstance(key, str) or not 8 <= len(key) <= 128:
        raise validate.BasketError(f"idempotency_key: required, a string of 8-128 characters unique per {what}")
    return f"{terminal.id if terminal else LOCAL_CALLER}/{key}"


def _payment(payment, methods: tuple[str, ...] = PAYMENT_METHODS) -> dict:
    """How a top-up (or a package) was paid: money in the till must match money on the card."""
    if not isinstance(payment, dict) or payment.get("method") not in methods:
        raise validate.BasketError(f"payment.method: required, one of {', '.join(methods)}")
    ref = payment.get("reference")
    if set(payment) - {"method", "reference"} or (ref is not None and not (
            isinstance(ref, str) and 1 <= len(ref) <= 64 and ref.isascii() and ref.isprintable())):
        raise validate.BasketError("payment: {method, reference?}; reference up to 64 printable ASCII characters")
    return {"method": payment["method"], **({"reference": ref} if ref is not None else {})}


def _pos_may_return(terminal: Terminal, original: dict) -> None:
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


def _account_of(member: validate.Verdict | None) -> str | None:
    """Whose balances an operation spends: the primary's for a 附属卡."""
    if member is None or member.member is None:
        return None
    return member.member.get("account_id") or member.member.get("member_id")


def _only(request: dict, allowed: set[str]) -> None:
    unknown = set(request) - allowed
    if unknown:
        raise validate.BasketError(f"unknown field(s) {', '.join(sorted(map(str, unknown)))}; "
                                 f"allowed: {', '.join(sorted(allowed))}")


class CounterHost(Protocol):
    """What the counter uses of its gateway (gateway/shell/service.py ``Gateway``)."""

    config: dict
    store_id: str
    tz: tzinfo
    clock: Callable[[], float]
    journal: Journal
    rules: RulesStore
    stats: dict

    def now(self) -> datetime: ...

    def clock_check(self) -> ClockCheck: ...

    def lane(self, lane_id: str) -> Lane: ...

    def current_member(self, lane: Lane) -> validate.Verdict | None: ...


class Counter:
    """The counter operations of one gateway."""

    def __init__(self, gw: CounterHost, archive_path: str | Path) -> None:
        self.gw = gw
        self.archive = CounterArchive(archive_path)
        self._locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()  # in use only
        # Journaled records whose local effects could not be written yet (disk
        # full): retried before every operation; while any is left, new
        # operations are refused, so balances and limits never miss one.
        self._unapplied: list[tuple] = []
        self.faults: list[str] = []
        # HQ's lift of a card (a deny delta entry "active") clears this store's
        # local status of it. The rules store calls back; it imports nothing of ours.
        listeners = getattr(getattr(gw, "rules", None), "deny_listeners", None)
        if listeners is not None:
            listeners.append(self.deny_applied)

    def close(self) -> None:
        listeners = getattr(getattr(self.gw, "rules", None), "deny_listeners", None)
        if listeners is not None and self.deny_applied in listeners:
            listeners.remove(self.deny_applied)
        self.archive.close()

    def deny_applied(self, version: int, issued_at_s: int, entries: dict) -> list[str]:
        """A deny delta was applied: every card it lifts (entry None: status
        "active") loses the status this counter gave it (lost, frozen,
        replaced), unless that was set after HQ issued the delta (a report
        made here since wins; HQ's next delta settles it). Returns the cards
        lifted here."""
        lifted = []
        before_ms = (int(issued_at_s) + 1) * 1000
        for card_no, entry in entries.items():
            if entry is None:
                try:
                    if self.archive.lift(card_no, before_ms):
                        lifted.append(card_no)
                except sqlite3.Error as exc:
                    log.error("deny delta v%d: could not lift card %s locally: %s", version,
                              validate.mask_card(card_no), exc)
        if lifted:
            log.info("deny delta v%d lifted %d card(s) reported here", version, len(lifted))
        return lifted

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
            deltas = {**deltas, **package_expiry_delta(type_, body)}   # a package sold here: its expiry too
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
                from gateway.store.journal import JournalFull
                raise JournalFull(f"local state cannot be written ({exc}); "
                                  f"{len(self._unapplied)} record(s) waiting") from None
            self._unapplied.pop(0)
        self.faults = []

    def _topup_within_caps(self, policy: dict, record: dict, terminal: Terminal | None) -> None:
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

    def members_view(self, own_uid: str | None = None) -> LocalMembers | None:
        rules = self.gw.rules.current
        return LocalMembers(rules.members, self.archive, own_uid) if rules is not None else None

    def local_member(self, card_no: str) -> dict | None:
        """The member row of a card registered or issued here that HQ's
        snapshot does not hold yet (None otherwise)."""
        rules = self.gw.rules.current
        if rules is None or rules.members.get(card_no) is not None:
            return None
        return self.members_view().get(card_no)

    def _validate_local(self, card_no: str, source: str | None = None, raw: str | None = None
                        ) -> validate.Verdict | None:
        """The engine's verdict with this store's own member data in view."""
        rules = self.gw.rules.current
        if rules is None:
            return None
        if source is None:  # the card's number, read as its programme reads it
            _pid, prog, reason = validate.program_for(card_no, rules)
            if reason:
                return None
            source = next((s for s in prog["sources"] if s != "nfc"), "nfc")
            raw = card_no
        view = dataclasses.replace(rules, members=self.members_view(own_uid=card_no if raw == card_no else None))
        return validate.validate(source, raw, view, self.gw.now(), clock=self.gw.clock_check())

    def validate(self, source: str, raw: str) -> validate.Verdict:
        """A card read decided as this counter must: the engine on HQ's rules
        and snapshot, then this store's own records (cards registered,
        replaced, issued or extended here; statuses set here)."""
        verdict = validate.validate(source, raw, self.gw.rules.current, self.gw.now(), clock=self.gw.clock_check())
        if source == "nfc" and verdict.reason == "unknown_nfc_card":
            card = self.archive.card_for_uid(raw)
            if card is not None:
                verdict = self._validate_local(card, source, raw) or verdict
        return self.local_status(verdict)

    def card_verdict(self, card_no: str) -> validate.Verdict:
        """A card given by number at the desk (a lost card cannot be tapped)."""
        rules = self.gw.rules.current
        if rules is None:
            return validate.Verdict("deny", "no_rules")
        _pid, prog, reason = validate.program_for(card_no, rules)
        if reason:
            return validate.Verdict("deny", reason, card_no)
        source = next((s for s in prog["sources"] if s != "nfc"), "nfc")
        return self.local_status(self._validate_local(card_no, source, card_no))

    def local_status(self, verdict: validate.Verdict) -> validate.Verdict:
        """A card reported lost, frozen or replaced at this counter is refused
        here at once, even before HQ's deny delta arrives; a card registered,
        issued or extended here is known here at once."""
        if verdict.card_no and verdict.reason in ("member_not_in_snapshot", "expired") \
                and self.archive.knows(verdict.card_no):
            verdict = self._validate_local(verdict.card_no) or verdict
        if not verdict.accepted or not verdict.card_no:
            return verdict
        local = self.archive.card_status(verdict.card_no)
        if local is None:
            return verdict
        status, replaced_by = local
        detail = {"last4": replaced_by[-4:]} if status == "replaced" and replaced_by else None
        return validate.Verdict("deny", status, verdict.card_no, detail=detail)

    def member(self, lane: Lane, request: dict, *, required: bool = False) -> validate.Verdict | None:
        """The lane's member, validated again now (a deny delta or a local
        sale since the tap changes what the member may do)."""
        use = request.get("member", True)
        if not isinstance(use, bool):
            raise validate.BasketError("member: must be true (the lane's member) or false (no member)")
        if not use:
            return None
        held = self.gw.current_member(lane)
        if held is None or lane.member_read is None:
            if required or request.get("member") is True:
                raise NoMember(f"no member card accepted on lane {lane.id} in the last "
                               f"{self.gw.config['api']['member_hold_s']} s")
            return None
        source, raw = lane.member_read
        fresh = self.validate(source, raw)
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
    async def _locked_member(self, lane: Lane, request: dict, *, required: bool = False):
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

    def _ages(self, now: datetime) -> dict:
        """The ages the offline limits go by: the same the tap's verdict used
        (stale while the clock is not trusted: gateway/core/clock.py)."""
        rules = self.gw.rules.current
        return validate.offline_ages(rules, now, self.gw.clock_check()) if rules else {}

    def _quote(self, lane: Lane, request: dict, member: validate.Verdict | None) -> dict:
        policy, rules = self._policy()
        now = self.gw.now()
        ages = self._ages(now)
        store_cfg = self.gw.config["store"]
        q = pricing.quote(request.get("lines"), validate.member_context(member), policy, now,
                          store=self.gw.store_id, region=store_cfg.get("region"),
                          tender=request.get("tender"), **ages)
        _within_sale_limits(policy.get("sale_limits", {}), q)
        return q

    def quote(self, lane_id: str, request: dict) -> dict:
        lane = self.gw.lane(lane_id)
        _only(request, {"lines", "member", "tender", "idempotency_key", "expected_total", "operator"})  # a sale body quotes too
        member = self.member(lane, request)
        q = self._quote(lane, request, member)
        q = {k: v for k, v in q.items() if k != "record"}
        return {"lane": lane.id, "member": member.public() if member else None, **q}

    # -- journaled operations -------------------------------------------------

    async def _journal(self, type_: str, key: str, idem: dict, body: dict, response: dict,
                       account: str | None, terminal: Terminal | None, operator: str | None = None) -> Appended:
        now = self.gw.now()
        body = {**body, "account_id": account, "day": now.date().isoformat(),
                "terminal": terminal.id if terminal else LOCAL_CALLER}
        if operator is not None:
            body["operator"] = operator
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

    async def sale(self, lane_id: str, request: dict, *, terminal: Terminal | None = None) -> Appended:
        lane = self.gw.lane(lane_id)
        _only(request, {"lines", "member", "tender", "idempotency_key", "expected_total", "operator"})
        key = _key(request, "sale", terminal)
        operator = _operator(request)
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
                raise QuoteChanged(f"expected_total {expected} but the sale prices at {q['total']}; quote again")
            body = {**q["record"], "lane": lane.id, "idempotency_key": key}
            response = {"lane": lane.id, "total": q["total"], "discount": q["discount"],
                        "tender": q["tender"], "points_earned": q["points"]["earned"],
                        "balances_after": q["balances_after"], "receipt": q["receipt"]}
            result = await self._journal("sale", key, idem, body, response, account, terminal, operator)
        if not result.duplicate:
            self.gw.stats["sales"] += 1
            lane.member = None  # the member's visit ends with the sale
            lane.publish({"type": "sale", "lane": lane.id, "seq": result.seq, "total": q["total"]})
        return result

    async def sale_return(self, request: dict, *, terminal: Terminal | None = None,
                          pos_return_max_fen: int | None = None) -> Appended:
        """A full or partial return referencing the original sale by its
        journal ``sale_seq`` or transaction ``sale_id`` (both on the receipt).
        A POS may return only sales made on its own lanes, up to
        ``pos_return_max_fen``; the service desk returns any sale."""
        _only(request, {"idempotency_key", "sale_seq", "sale_id", "lines", "operator"})
        key = _key(request, "return", terminal)
        operator = _operator(request)
        if ("sale_seq" in request) == ("sale_id" in request):
            raise validate.BasketError("give exactly one of sale_seq (the sale's number) or sale_id")
        ref = {"seq": request["sale_seq"]} if "sale_seq" in request else {"id": request["sale_id"]}
        if "seq" in ref and (type(ref["seq"]) is not int or ref["seq"] < 1):
            raise validate.BasketError("sale_seq: a whole number >= 1")
        if "id" in ref and not isinstance(ref["id"], str):
            raise validate.BasketError("sale_id: a string")
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
            return await self._journal("return", key, idem, body, response, account, terminal, operator)

    async def topup(self, lane_id: str, request: dict, *, terminal: Terminal | None = None) -> Appended:
        lane = self.gw.lane(lane_id)
        _only(request, {"idempotency_key", "package_id", "amount_fen", "payment", "operator"})
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
            return await self._member_op(lane, key, idem, "topup", build, terminal, _operator(request))

    async def use_package(self, lane_id: str, package_id: str, request: dict, *,
                          terminal: Terminal | None = None) -> Appended:
        lane = self.gw.lane(lane_id)
        _only(request, {"idempotency_key", "uses", "operator"})
        key = _key(request, "package use", terminal)
        uses = request.get("uses", 1)
        idem = {"package_id": package_id, "uses": uses, "lane": lane.id}
        return await self._member_op(lane, key, idem, "package_use", lambda policy, ctx: pricing.consume_package(
            policy, ctx, package_id, uses, now=self.gw.now()), terminal, _operator(request))

    async def sell_package(self, lane_id: str, request: dict, *, terminal: Terminal | None = None) -> Appended:
        """Sell a count package (计次卡) to the lane's member, or renew the one
        they hold (gateway/core/packages.py): priced by the rules, paid as a
        top-up is or from stored value where the package allows it. The uses
        count in the member's view at once (local deltas)."""
        lane = self.gw.lane(lane_id)
        _only(request, {"idempotency_key", "package_id", "payment", "operator"})
        key = _key(request, "package sale", terminal)
        payment = _payment(request.get("payment"), packages.METHODS)
        package_id = request.get("package_id")
        if not isinstance(package_id, str):
            raise validate.BasketError("package_id: required, a package of the rules")
        idem = {"package_id": package_id, "payment": payment, "lane": lane.id}

        def build(policy, ctx):
            now = self.gw.now()
            out = packages.sell_package(policy, ctx, package_id, payment_method=payment["method"], now=now,
                                        **self._ages(now))
            return {**out, "record": {**out["record"], "payment": payment}}
        return await self._member_op(lane, key, idem, "package_sale", build, terminal, _operator(request))

    async def redeem_gift(self, lane_id: str, request: dict, *, terminal: Terminal | None = None) -> Appended:
        """Points for a gift of the rules' catalogue (礼品兑换) for the lane's
        member (gateway/core/gifts.py), within the offline limits of points
        redemption; the points leave the member's view at once."""
        lane = self.gw.lane(lane_id)
        _only(request, {"idempotency_key", "gift_id", "qty", "operator"})
        key = _key(request, "gift redemption", terminal)
        gift_id, qty = request.get("gift_id"), request.get("qty", 1)
        if not isinstance(gift_id, str):
            raise validate.BasketError("gift_id: required, a gift of the rules' catalogue")
        idem = {"gift_id": gift_id, "qty": qty, "lane": lane.id}

        def build(policy, ctx):
            now = self.gw.now()
            return gifts.redeem_gift(policy, ctx, gift_id, qty, now=now, **self._ages(now))
        return await self._member_op(lane, key, idem, "gift_redemption", build, terminal, _operator(request))

    async def _member_op(self, lane: Lane, key: str, idem: dict, type_: str, build,
                         terminal: Terminal | None = None, operator: str | None = None) -> Appended:
        earlier = await self.gw.journal.lookup(key, idem)
        if earlier:
            return earlier
        async with self._locked_member(lane, {"member": True}, required=True) as member:
            earlier = await self.gw.journal.lookup(key, idem)
            if earlier:
                return earlier
            account = _account_of(member)
            policy, _rules = self._policy()
            out = build(policy, validate.member_context(member))
            body = {**out["record"], "lane": lane.id, "idempotency_key": key}
            response = {"lane": lane.id, "record": {k: v for k, v in out["record"].items() if k != "card_no"},
                        "receipt": out["receipt"]}
            return await self._journal(type_, key, idem, body, response, account, terminal, operator)

    def _card_free(self, card: str, rules, field: str) -> None:
        """A card about to be issued here (registration, 补办, 附属卡): a valid
        number of a card programme, not a member's already, not denied."""
        _pid, _prog, reason = validate.program_for(card, rules)
        if reason:
            raise CounterError("card_not_valid", f"{field}: {validate.mask_card(card)} is not a card of this "
                               f"chain's programmes ({reason})", 422,
                               {"zh-CN": "卡号无效，请核对新卡卡号", "en": "This card number is not valid; check the new card"})
        if rules.members.get(card) is not None or self.archive.local_member(card) is not None:
            raise CounterError("card_exists", f"{field}: card {validate.mask_card(card)} is already issued", 409,
                               {"zh-CN": "此卡已发行", "en": "This card has already been issued"})
        if rules.members.denied(card) or self.archive.card_status(card):
            raise CounterError("card_denied", f"{field}: card {validate.mask_card(card)} is on the deny list", 409,
                               {"zh-CN": "此卡已被停用，不能发放", "en": "This card is blocked and cannot be issued"})

    def _status_now(self, card: str, record: dict | None) -> str:
        """The card's status as this store sees it: set here, HQ's deny list, the snapshot."""
        local = self.archive.card_status(card)
        if local:
            return local[0]
        rules = self.gw.rules.current
        denied = rules.members.denied(card) if rules else None
        if denied:
            return denied["status"]
        return (record or {}).get("status") or "active"

    async def card_service(self, request: dict, *, terminal: Terminal | None = None) -> Appended:
        """Issue, report lost, freeze, unfreeze, replace, annual fee, extend
        (延期), issue_subsidiary (附属卡): at the service desk, by card number
        (a lost card cannot be tapped).

        ``unfreeze`` lifts a freeze or a loss report made here at once and
        records it (``status_before``); a card HQ's deny list holds stays
        refused until HQ lifts it chain-wide (``hq_decides`` in the answer).
        ``replace``: the new card carries the account here at once.
        ``issue_subsidiary``: ``card_no`` is the primary, ``new_card_no`` the
        附属卡, usable here at once on the primary's account."""
        _only(request, {"idempotency_key", "kind", "card_no", "new_card_no", "reason", "months", "operator"})
        key = _key(request, "card service", terminal)
        operator = _operator(request)
        kind, card, new_card = request.get("kind"), request.get("card_no"), request.get("new_card_no")
        if not is_card_no(card):
            raise validate.BasketError("card_no: required, the card's number (6-19 digits)")
        idem = {k: request.get(k) for k in ("kind", "card_no", "new_card_no", "reason")}
        if "months" in request:
            idem["months"] = request["months"]
        earlier = await self.gw.journal.lookup(key, idem)
        if earlier:
            return earlier
        self._settle()
        policy, rules = self._policy()
        view = self.members_view()
        record = view.get(card) if view is not None else None
        member = None
        if kind != "issue":
            if record is None:
                raise CounterError("card_not_found", f"card {validate.mask_card(card)} is not in this store's "
                                   "member list; do this at HQ", 404,
                                   {"zh-CN": "本店会员资料中没有此卡，请联系总部办理",
                                    "en": "This card is not in the store's member list; please contact HQ"})
            member = {"member_id": record["member_id"], "card_no": card}
        elif record is not None:
            raise CounterError("card_exists", f"card {validate.mask_card(card)} is already issued", 409,
                               {"zh-CN": "此卡已发行", "en": "This card has already been issued"})
        before = self._status_now(card, record)
        if kind == "unfreeze" and before == "blocked":
            # HQ's block of an overdrawn account: lifted by HQ alone, once the debt is settled (a top-up here does).
            raise CounterError("card_blocked", f"card {validate.mask_card(card)} is blocked by HQ for an overdraft: "
                               "a top-up settles it, and HQ lifts the block", 409, reason_text("blocked"))
        if kind == "unfreeze" and before == "limited":
            # HQ's limit of an overdrawn account: the same, HQ lifts it once settled.
            raise CounterError("card_limited", f"card {validate.mask_card(card)} is limited by HQ for an overdraft: "
                               "a top-up settles it, and HQ lifts the limit", 409, reason_text("limited"))
        account, extra = None, {}
        if kind in ("replace", "issue_subsidiary") and is_card_no(new_card) and new_card != card:
            if kind == "issue_subsidiary":
                self._card_free(new_card, rules, "new_card_no")
            elif rules.members.get(new_card) is not None or self.archive.local_member(new_card) is not None:
                raise CounterError("card_exists", f"new_card_no: card {validate.mask_card(new_card)} is already "
                                   "issued", 409, {"zh-CN": "新卡已发行，请换一张新卡",
                                                   "en": "The new card has already been issued; use another"})
        if kind == "issue_subsidiary":
            verdict = self.card_verdict(card)
            if not verdict.accepted:
                raise CounterError("member_refused", f"the primary card is refused: {verdict.reason}", 409,
                                   reason_text(verdict.reason, verdict.detail))
            if record.get("primary_card"):
                raise CounterError("not_a_primary_card", "card_no: a 附属卡 is issued on a primary card", 422,
                                   {"zh-CN": "附属卡须挂在主卡下办理", "en": "A subsidiary card needs the primary card"})
            account = _account_of(verdict) or record["member_id"]
            member = {"member_id": account, "card_no": card}
        elif kind == "extend":
            extra = {"months": request.get("months"), "expires": record.get("expires")}
        out = pricing.card_operation(policy, kind, member, card_no=card, new_card_no=new_card,
                                     now=self.gw.now(), **extra)
        body = {**out["record"], "reason": request.get("reason"), "idempotency_key": key}
        response = {"kind": kind, "card": validate.mask_card(card), "fee_fen": out["record"]["fee_fen"],
                    "status_after": out["record"]["status_after"], "receipt": out["receipt"]}
        if kind in ("unfreeze", "report_lost", "freeze"):
            body["status_before"] = before
            response["status_before"] = before
        if kind == "unfreeze":
            response["hq_decides"] = bool(rules and rules.members.denied(card))
        if new_card:
            response["new_card"] = validate.mask_card(new_card)
        if kind == "extend":
            response["expires"] = out["record"]["expires"]
        return await self._journal("card_op", key, idem, body, response, account, terminal, operator)

    # -- the member lifecycle: registration, withdrawal ------------------------

    def _new_member_id(self, card: str) -> str:
        """Unique chain-wide without asking HQ: the store and the new card (a
        card number is issued once in the chain)."""
        member_id = f"{self.gw.store_id}-{card}"
        if len(member_id) > 64:
            member_id = f"S{hashlib.sha256(member_id.encode()).hexdigest()[:40]}-{card}"
        return member_id

    async def register(self, request: dict, *, terminal: Terminal | None = None) -> Appended:
        """A new member with a new card, offline (办卡 at the desk or a lane):
        journaled as a ``registration`` record; the card is usable here at
        once at the base tier, with ``fees.issue_fen`` to pay. Minimal PII:
        the name is kept masked (张*), a birthday as MM-DD, the member's
        consent is required; a phone number is never taken here (bound at HQ
        or in the member app, where it can be verified)."""
        _only(request, {"idempotency_key", "card_no", "name", "birthday", "birthday_calendar", "consent",
                        "nfc_uid", "card_type", "lane", "operator"})
        key = _key(request, "registration", terminal)
        operator = _operator(request)
        card = request.get("card_no")
        if not is_card_no(card):
            raise validate.BasketError("card_no: required, the new card's number (6-19 digits)")
        consent = request.get("consent")
        if type(consent) is not bool:
            raise validate.BasketError("consent: required, true when the member agreed to the programme's terms")
        idem = {k: request.get(k) for k in ("card_no", "name", "birthday", "birthday_calendar", "consent",
                                             "nfc_uid", "card_type", "lane")}
        earlier = await self.gw.journal.lookup(key, idem)
        if earlier:
            return earlier
        lane = request.get("lane")
        if lane is not None:
            try:
                lane = self.gw.lane(lane).id
            except KeyError:
                raise CounterError("unknown_lane", f"lane: this store has no lane {lane}", 404) from None
            if terminal is not None and terminal.role != "service_desk" and not terminal.serves(lane):
                raise CounterError("forbidden", f"terminal {terminal.id} does not serve lane {lane}", 403)
        if not consent:
            raise CounterError("consent_required", "consent: a member must agree to the programme's terms; "
                               "without it sell an anonymous card (card service issue)", 422,
                               {"zh-CN": "会员须同意会员章程方可办卡；不同意可办理不记名卡",
                                "en": "The member must agree to the programme's terms; otherwise issue an "
                                      "anonymous card"})
        policy, rules = self._policy()
        if rules is None:
            raise CounterError("no_rules", "no rules from HQ yet: cannot register", 409)
        card_type = request.get("card_type")
        if card_type is not None and card_type not in policy.get("card_types", {}):
            raise CounterError("unknown_card_type", f"card_type: {card_type} is not a card type of the rules", 422,
                               {"zh-CN": "卡种不存在", "en": "No such card type"})
        uid = request.get("nfc_uid")
        uid = uid.upper() if isinstance(uid, str) else None
        async with self._lock(f"card:{card}"):
            earlier = await self.gw.journal.lookup(key, idem)
            if earlier:
                return earlier
            self._settle()
            self._card_free(card, rules, "card_no")
            if uid and (rules.members.card_for_uid(uid) or self.archive.card_for_uid(uid)):
                raise CounterError("card_exists", "nfc_uid: this chip belongs to another card", 409,
                                   {"zh-CN": "此芯片卡已绑定其他卡号", "en": "This chip is already another card's"})
            now = self.gw.now()
            member_id = self._new_member_id(card)
            fee = (policy.get("fees") or {}).get("issue_fen", 0)
            body = {"type": "registration", "v": 1, "at": now.isoformat(), "member_id": member_id,
                    "card_no": card, "consent": True, "fee_fen": fee, "idempotency_key": key}
            name = validate.mask_name(request.get("name"))
            optional = {"name": name[:64] if name else None, "birthday": request.get("birthday"),
                        "birthday_calendar": request.get("birthday_calendar"), "card_type": card_type,
                        "nfc_uid": uid, "lane": lane}
            body.update({k: v for k, v in optional.items() if v is not None})
            tier = validate._default_tier(rules)
            receipt = {}
            for lang in pricing.LANGS:
                rows = [f"{pricing._label('registration', lang)}  {validate.mask_card(card)}"]
                if fee:
                    rows.append(f"{pricing._label('fee', lang)}  {pricing.yuan(fee)}")
                receipt[lang] = rows
            response = {"member_id": member_id, "card": validate.mask_card(card), "tier": tier, "fee_fen": fee,
                        "receipt": receipt}
            return await self._journal("registration", key, idem, body, response, member_id, terminal, operator)

    async def withdraw(self, request: dict, *, terminal: Terminal | None = None) -> Appended:
        """取款 at the service desk: pay out part of the paid part (本金) of a
        member's stored value, as ``accounts.withdrawal`` (HQ's key) or
        ``stored_value.withdrawal`` allows (default ``"none"``). Offline the store pays out at most the paid part it can
        vouch for: the snapshot's ``paid_fen`` (when HQ sends it) plus this
        store's top-ups since the snapshot, less its withdrawals since; and at
        most the balance, the day's offline stored-value allowance and
        ``stored_value.withdrawal_offline_max_per_day_fen`` per account."""
        _only(request, {"idempotency_key", "card_no", "amount_fen", "payout", "reason", "operator"})
        key = _key(request, "withdrawal", terminal)
        operator = _operator(request)
        card = request.get("card_no")
        if not is_card_no(card):
            raise validate.BasketError("card_no: required, the card's number (6-19 digits)")
        payout = _payment(request.get("payout"))
        idem = {"card_no": card, "amount_fen": request.get("amount_fen"), "payout": payout,
                "reason": request.get("reason")}
        earlier = await self.gw.journal.lookup(key, idem)
        if earlier:
            return earlier

        def member_now() -> tuple[validate.Verdict, str]:
            verdict = self.card_verdict(card)
            if not verdict.accepted:
                raise CounterError("member_refused", f"the card is refused: {verdict.reason}", 409,
                                   reason_text(verdict.reason, verdict.detail))
            account = _account_of(verdict)
            if account is None:
                raise CounterError("card_not_found", f"card {validate.mask_card(card)} has no account in this "
                                   "store's member list; do this at HQ", 404,
                                   {"zh-CN": "本店会员资料中没有此卡账户，请联系总部办理",
                                    "en": "This card's account is not in the store's member list; please contact HQ"})
            if verdict.member.get("primary_card"):
                raise CounterError("not_a_primary_card", "card_no: stored value is paid out to the primary "
                                   "card's holder", 422, {"zh-CN": "储值取款须持主卡办理",
                                                          "en": "Stored value is paid out on the primary card"})
            return verdict, account

        _verdict, account = member_now()
        async with self._lock(f"account:{account}"):
            self._settle()
            earlier = await self.gw.journal.lookup(key, idem)
            if earlier:
                return earlier
            verdict, account2 = member_now()
            if account2 != account:
                raise CounterError("member_refused", "the card moved to another account; try again", 409)
            policy, rules = self._policy()
            m = verdict.member
            mode = (policy.get("stored_value") or {}).get("withdrawal",
                                                         (policy.get("accounts") or {}).get("withdrawal", "none"))
            if mode != "none" and not m["allowed"].get("stored_value"):
                raise CounterError("stored_value_offline_refused", "the member's stored value cannot be used "
                                   f"offline now ({', '.join(m.get('limits') or []) or 'card type'})", 422,
                                   {"zh-CN": "此卡储值暂不能离线使用，请联系总部办理",
                                    "en": "This card's stored value cannot be used offline now; please contact HQ"})
            row = self.members_view().get(card) or {}
            store_seq = rules.members.store_seq or 0
            paid_known = max(0, (row.get("paid_fen") or 0) + self.archive.paid_moves(account, store_seq))
            now = self.gw.now()
            out = pricing.withdrawal(policy, validate.member_context(verdict), amount_fen=request.get("amount_fen"),
                                     paid_known_fen=paid_known,
                                     withdrawn_today_fen=self.archive.withdrawn(account, now.date().isoformat()),
                                     offline_left_fen=m["offline_left"]["stored_value_fen"], now=now)
            body = {**out["record"], "payout": payout, "idempotency_key": key}
            if request.get("reason"):
                body["reason"] = request["reason"]
            rec = out["record"]
            response = {"card": validate.mask_card(card), "amount_fen": rec["amount_fen"], "paid_fen": rec["paid_fen"],
                        "balance_after_fen": rec["balance_after_fen"], "receipt": out["receipt"]}
            return await self._journal("withdrawal", key, idem, body, response, account, terminal, operator)
