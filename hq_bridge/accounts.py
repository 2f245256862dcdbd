"""HQ's accounts of record: every store record applied to the members' accounts, exactly once.

Invariants
----------
1. **Every balance is the sum of its history.** For every account,
   ``paid_fen``, ``bonus_fen`` and ``points`` are the sums of ``d_paid_fen``,
   ``d_bonus_fen`` and ``d_points`` over its ``account_history`` entries; a
   package's ``uses_left`` is the sum of its ``d_uses``; ``points`` is also
   the sum of its lots' ``remaining`` less ``points_owed``, and every lot's
   remaining is the sum of that lot's changes in the entries' ``detail``.
   Nothing moves a balance without an entry: not a store record, not an
   import, not an operation at HQ.
2. **When a record is applied.** In the same database transaction that
   commits it to the ledger (the ledger's commit calls ``apply_batch`` on its
   connection), so a crash keeps both or neither. Per store, records are
   applied in seq order without gaps: a record that arrives past a gap stays
   in the ledger and is applied when the gap fills.
3. **Exactly once.** Per store, the watermark is the highest seq applied or
   set aside; every seq at or below it is done and is never applied again,
   however often it arrives. ``apply_record`` refuses it as a duplicate.
4. **Nothing silently dropped, nothing half-applied.** A record HQ cannot
   apply (it fails its schema, names a card or account HQ does not know,
   returns a sale HQ never applied, ...) changes no balance and is kept in
   ``set_aside`` with the reason; it counts as done for the watermark, so the
   store's later records are not held up behind it.
5. **No money from nowhere.** A record moves exactly what it says: a sale
   takes what was paid from stored value and points and gives the points
   earned; a return gives back at most what its sale took and takes back at
   most what it gave, split the way the sale was. Stored value and points
   spent offline beyond the balance (two stores spending the same balance)
   are applied, not refused — the goods have left the store — leaving the
   paid part below zero or points owed, and are reported as problems for
   reconciliation.
6. **The snapshot's watermark.** A member snapshot is read in one
   transaction with each store's watermark: it includes exactly that
   store's records up to that seq, so the store keeps what it journaled
   after it, and nothing is handed back.

Decisions
---------
- An account is keyed by its owner's member_id (the key stores use for
  their local deltas, gateway/core/validate.py ``account_id``). A card belongs to
  one account: ``primary``, ``subsidiary`` (附属卡, another holder) or
  ``linked`` (a group card sharing the account).
- Stored value has a paid part (本金) and a bonus part (赠送). A payment takes
  from them by ``AccountPolicy.spend_order``: ``proportional`` (default: the
  bonus share is floor(amount x bonus / (paid + bonus)), the paid part the
  rest), ``bonus_first`` or ``paid_first``. Beyond the balance, the rest comes
  from the paid part, which goes below zero. A return gives back to each part
  what the sale took from it, pro rata by the returned amount, floored on the
  bonus part over the cumulative returns, so returns that cover the whole
  sale give back exactly what it took.
- Points live in lots, one per account and expiry date (with rolling expiry,
  at the end of the month ``points_expiry_months`` after the month earned;
  ``9999-12-31`` when points do not expire). Redemption takes from the
  earliest-expiring lot first; beyond the lots, the rest is ``points_owed``,
  which the next points earned pay off first. A return gives redeemed points
  back to the lots they came from (last taken, first given back) and takes
  earned points back from the lot they went to first.
- Coupons are single use: a sale marks them used; a coupon used that the
  account did not hold (or used already) is recorded as used and reported.
- Card services: report_lost -> lost, freeze -> frozen, unfreeze lifts lost
  or frozen (so a card reported lost at a counter can be lifted),
  replace -> the old card ``replaced`` (replaced_by the new) and the new card
  on the same account, role and expiry; annual_fee extends the card by
  ``annual_fee_months``; issue without a member opens an anonymous account
  for the card (``card-<card_no>``). Fees are paid at the counter, not from
  stored value: recorded in the entry's detail, no balance moves.
- Registration opens member, account (base tier) and primary card.
- A count package sold at a counter (``package_sale``) adds its uses to the
  account's package (a new one when it held none), taking the price from
  stored value (paid and bonus parts, as a sale) when it was paid so; the
  validity the store worked out (``expires``) becomes the package's
  (``packages.expires``, as it is: HQ does not work it out again) and is in
  the entry's detail. A use after it is applied and reported. Points
  for a gift (``gift_redemption``) are taken as a sale's redemption takes
  them (``take_points``: earliest-expiring lot first, the rest owed). Neither
  earns points nor counts as spend for the tier rules.
- Spend for the tier rules (hq_bridge/policy.py): a sale entry's detail has
  ``spend`` (``total - redeemed_fen``: paid in cash and stored value), a
  return's ``spend`` is minus what it gave back in cash and stored value. A
  member sale (or return) that moves no balance still gets an entry with no
  deltas, so its spend counts (when HQ knows the card).
- ``AccountStore(hooks=[...])``: called as ``hook(conn, store, result)`` at
  the end of ``apply_batch`` in its transaction when accounts changed
  (policy.tier_hook: upgrades; reconcile.reconcile_hook: overdrafts found and
  settled at once, block/lift cards added to ``result.hq_cards_changed``).
- ``overdrafts`` (defined here on db.metadata, migration 0002): what
  reconciliation found; an account with an open overdraft under the
  ``limit`` policy shows nothing to spend in snapshots (``limited_accounts``).
- Several ingest workers (PostgreSQL): a store's watermark row, locked FOR
  UPDATE for the transaction (and made first for a store's first batch),
  keeps each store to one worker at a time, so invariants 2 and 3 hold
  whichever worker gets which batch. The accounts a chunk reads are locked
  in account order, and the cards too when card operations may change them
  (in card order, before the accounts): workers wait for each other, and
  never deadlock on them.

Functional core (pure, no I/O, no clock): ``apply_record`` (a new book)
and ``record_change`` (only what a record changed, which the shell takes
into its working book), ``checked`` (a body's schema, checked once),
``keys_of``, ``sale_effect``. Imperative shell: ``AccountStore``
(SQLAlchemy Core on the metadata of hq_bridge/db.py), ``snapshot_rows``,
``import_members``.
"""

from __future__ import annotations

import calendar
import time
from dataclasses import dataclass, field, fields
from datetime import date, datetime, timezone
from functools import lru_cache
from types import MappingProxyType
from typing import Any, Iterable, Iterator, Mapping, NamedTuple

import orjson
from sqlalchemy import (CheckConstraint, Column, ForeignKey, Index, PrimaryKeyConstraint, String, Table, Text,
                        and_, func, select)
from sqlalchemy.engine import Connection, Engine

from hq_bridge import db
from wire.records import RecordError, validate_body

NEVER = db.NEVER

# Overdrafts found by reconciliation (hq_bridge/reconcile.py), created by migration
# 0002_reconcile. Defined here on db.metadata (accounts.py is imported wherever the
# accounts are), to move into hq_bridge/db.py as it is, with "overdrafts" in ACCOUNT_TABLES.
overdrafts = Table(
    "overdrafts", db.metadata,
    Column("account_id", String(db.ID), ForeignKey("accounts.account_id"), nullable=False),
    Column("kind", String(24), nullable=False),       # stored_value | points | package | coupon | day_stored_value | day_points
    Column("ref", String(db.ID), nullable=False),     # package id, coupon code, day (YYYY-MM-DD); "" for balances
    Column("amount", db.Int64, nullable=False),       # fen, points, uses beyond what was held (or the day's cap)
    Column("state", String(8), nullable=False),       # open | settled
    Column("action", String(8), nullable=False),      # carry | limit | block: the policy applied while open
    Column("detail", Text),                           # JSON: the records that spent it (store, seq, tx), value
    Column("detected_at", db.Int64, nullable=False),  # epoch ms, HQ's clock
    Column("settled_at", db.Int64),
    Column("settled_by", String(64)),                 # "hq:<user>" or "auto" (balance back at or above zero)
    Column("updated_at", db.Int64, nullable=False),
    PrimaryKeyConstraint("account_id", "kind", "ref"),
    CheckConstraint("state IN ('open', 'settled')", name="state"),
    CheckConstraint("action IN ('carry', 'limit', 'block')", name="action"),
    Index(None, "state"),
)
OWED = "owed"      # the pseudo-lot of points spent beyond the lots
GIFT_ENTRY = "gift_redemption"   # the history entry of a gift redemption (detail: gift_id, qty, points)
EMPTY: Mapping = MappingProxyType({})   # no packages, coupons, ...: shared, read-only
SPEND_ORDERS = ("proportional", "bonus_first", "paid_first")


# ================================================================ plain data
# Values (named tuples: a record's change makes new ones with ``_replace``), and the book of them.

@dataclass(frozen=True)
class AccountPolicy:
    """What the chain decides about accounts (to come from the rule set).

    ``points_expiry_months``: None, points never expire; N, a lot expires at
    the end of the month N months after the month it was earned in.
    ``points_expiry_date`` ("MM-DD", instead of months): points earned in
    year Y expire on that day of year Y + ``points_expiry_years`` (the next
    such day when that is not after the day earned).
    ``card_valid_months``: a new card's validity (None: no expiry)."""
    default_tier: str = "normal"
    spend_order: str = "proportional"
    points_expiry_months: int | None = None
    annual_fee_months: int = 12
    card_valid_months: int | None = None
    points_expiry_date: str | None = None
    points_expiry_years: int = 1
    withdrawal_bonus: str = "forfeit_proportional"

    def __post_init__(self) -> None:
        if self.spend_order not in SPEND_ORDERS:
            raise ValueError(f"spend_order: one of {', '.join(SPEND_ORDERS)}")


def policy_from_rules(rules: Mapping | None, **overrides) -> AccountPolicy:
    """An AccountPolicy from an effective rule set (wire/RULESET.md): its
    ``default_tier``; the optional ``accounts`` section may set the other
    fields once the rule-set schema carries it."""
    rules = rules or {}
    known = {f.name for f in fields(AccountPolicy)}
    section = {k: v for k, v in (rules.get("accounts") or {}).items() if k in known}
    if rules.get("default_tier"):
        section.setdefault("default_tier", rules["default_tier"])
    section.update(overrides)
    return AccountPolicy(**section)


class Lot(NamedTuple):
    expires: str          # YYYY-MM-DD, NEVER for points that do not expire
    earned_at: int        # epoch ms of the first points in it
    points: int           # earned into it in all
    remaining: int


class Account(NamedTuple):
    account_id: str
    owner_member_id: str
    tier: str
    status: str = "active"
    card_type: str | None = None
    paid_fen: int = 0
    bonus_fen: int = 0
    points_owed: int = 0
    day: str | None = None
    day_stored_value_paid_fen: int = 0
    day_points_redeemed: int = 0
    created_at: int = 0
    # what it holds in tables of their own
    lots: tuple[Lot, ...] = ()                         # by expiry
    packages: Mapping[str, int] = EMPTY
    coupons: Mapping[str, str] = EMPTY                 # code -> issued | used
    package_expires: Mapping[str, str] = EMPTY         # package id -> last day of use; absent: no expiry

    @property
    def points(self) -> int:
        return sum(l.remaining for l in self.lots) - self.points_owed

    @property
    def stored_value_fen(self) -> int:
        return self.paid_fen + self.bonus_fen

    @property
    def overdrawn(self) -> bool:
        """Spent beyond what it held (offline at several stores): paid part,
        points or a package's uses below zero. Reconciliation looks at it."""
        return self.paid_fen < 0 or self.points_owed > 0 or any(n < 0 for n in self.packages.values())


class Card(NamedTuple):
    card_no: str
    account_id: str
    member_id: str
    role: str = "primary"          # primary | subsidiary | linked
    status: str = "active"
    replaced_by: str | None = None
    card_type: str | None = None
    nfc_uid: str | None = None
    issued_at: int = 0
    expires: str | None = None


class Member(NamedTuple):
    member_id: str
    name_masked: str | None = None
    phone_hash: str | None = None
    consent: bool = False
    birthday: str | None = None
    birthday_calendar: str = "solar"
    source: str = "hq"
    created_at: int = 0


class SaleEffect(NamedTuple):
    """What a sale did to its account, and what its returns gave back so far."""
    account_id: str
    sv: int = 0                  # stored value taken
    bonus: int = 0               # of which from the bonus part
    redeemed: int = 0
    taken: tuple = ()            # ((lot expiry or OWED, points), ...) in the order taken
    earned: int = 0
    earned_lot: str | None = None
    returned_sv: int = 0
    returned_bonus: int = 0
    returned_redeemed: int = 0
    returned_earned: int = 0
    restored: Mapping[str, int] = EMPTY               # lot -> points given back


@dataclass(frozen=True)
class Book:
    """HQ's accounts, or the part of them a record touches."""
    accounts: Mapping[str, Account] = field(default_factory=dict)
    cards: Mapping[str, Card] = field(default_factory=dict)
    members: Mapping[str, Member] = field(default_factory=dict)
    watermarks: Mapping[str, int] = field(default_factory=dict)   # store -> highest seq done
    sales: Mapping[str, SaleEffect] = field(default_factory=dict)  # sale tx id -> its effect

    def changed(self, change: "Change") -> "Book":
        """This book with a record's change (a new book; this one as it was)."""
        if change.done is None:
            return self
        store, seq = change.done
        return Book({**self.accounts, **change.accounts} if change.accounts else self.accounts,
                    {**self.cards, **change.cards} if change.cards else self.cards,
                    {**self.members, **change.members} if change.members else self.members,
                    {**self.watermarks, store: seq},
                    {**self.sales, **change.sales} if change.sales else self.sales)


class StoreRecord(NamedTuple):
    """A record as the ledger holds it: (store, seq) and the tx id identify it.
    ``valid``: its body passed its type's schema already (``checked``), and
    is not checked again."""
    store: str
    seq: int
    tx_id: str
    type: str
    body: Any
    ts: int = 0
    valid: bool = False


class HistoryEntry(NamedTuple):
    account_id: str
    kind: str
    d_paid_fen: int = 0
    d_bonus_fen: int = 0
    d_points: int = 0
    package_id: str | None = None
    d_uses: int = 0
    card_no: str | None = None
    store: str | None = None
    seq: int | None = None
    tx_id: str | None = None
    ref_tx_id: str | None = None
    terminal: str | None = None
    operator: str | None = None
    at: str | None = None
    detail: Mapping | None = None


@dataclass(frozen=True)
class Problem:
    """Why a record was not applied (``set_aside``: kept aside; otherwise it
    was not applied because it is a duplicate or past a gap), or something
    reconciliation must see about a record that was applied."""
    code: str
    message: str
    set_aside: bool = False
    applied: bool = False


@dataclass(frozen=True)
class Change:
    """What one record does to a book: the new value of everything it
    changed (accounts, cards, members, sale effects), the history entries
    that explain every balance it moved, and its problems. ``done``: the
    (store, seq) it moves the watermark to; None when it is refused (a
    duplicate, or past a gap), which changes nothing."""
    done: tuple[str, int] | None
    accounts: Mapping[str, Account] = field(default_factory=dict)
    cards: Mapping[str, Card] = field(default_factory=dict)
    members: Mapping[str, Member] = field(default_factory=dict)
    sales: Mapping[str, SaleEffect] = field(default_factory=dict)
    entries: list[HistoryEntry] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)


class Keys(NamedTuple):
    cards: frozenset
    accounts: frozenset
    sales: frozenset
    members: frozenset


# ================================================================ functional core

def keys_of(record: StoreRecord) -> Keys:
    """What a record reads: card numbers, account ids, its sale, member ids
    (from the body as sent, before validation)."""
    return keys_of_all([record])


def keys_of_all(records: Iterable[StoreRecord]) -> Keys:
    """What the records read, all of them together (``keys_of``): a return's
    sale only when the sale is not among them (applied before it, in order)."""
    cards, accounts, sales, members = set(), set(), set(), set()
    records = list(records)
    for record in records:
        b = record.body if isinstance(record.body, dict) else {}
        member = b.get("member")
        for v in (member.get("card_no") if isinstance(member, dict) else None, b.get("card_no"),
                  b.get("new_card_no"), b.get("primary_card_no")):
            if _text(v):
                cards.add(v)
        if _text(b.get("account_id")):
            accounts.add(b["account_id"])
        if record.type == "return" and _text(b.get("sale_id")):
            sales.add(b["sale_id"])
        if record.type in ("card_op", "registration") and _text(b.get("member_id")):
            members.add(b["member_id"])
            accounts.add(b["member_id"])
        if record.type == "card_op" and _text(b.get("card_no")):
            accounts.add(f"card-{b['card_no']}")
    sales.difference_update(r.tx_id for r in records if r.type == "sale")
    return Keys(frozenset(cards), frozenset(accounts), frozenset(sales), frozenset(members))


def _text(v: Any) -> bool:
    return isinstance(v, str) and v != ""


class _SetAside(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


def apply_record(state: Book, record: StoreRecord, policy: AccountPolicy,
                 now: datetime) -> tuple[Book, list[HistoryEntry], list[Problem]]:
    """Apply one store record to ``state``: the new state, the history
    entries that explain every balance it moved, and its problems
    (``record_change`` says what they are; ``state`` itself when refused)."""
    change = record_change(state, record, policy, now)
    return state.changed(change), change.entries, change.problems


def record_change(state: Book, record: StoreRecord, policy: AccountPolicy, now: datetime) -> Change:
    """What one store record does to ``state``.

    Refused (nothing changes, no entries): a seq at or below the store's
    watermark (``duplicate``) or past the next one (``gap``). Set aside (only
    the watermark moves): a record that cannot be applied. ``now``: HQ's
    clock, an aware datetime (issue times of new cards)."""
    store, seq = record.store, record.seq
    done = state.watermarks.get(store, 0)
    if seq <= done:
        return Change(None, problems=[Problem("duplicate", f"store {store} seq {seq}: applied already "
                                                           f"(watermark {done})")])
    if seq != done + 1:
        return Change(None, problems=[Problem("gap", f"store {store} seq {seq}: seq {done + 1} is not applied yet")])
    handler = _HANDLERS.get(record.type)
    try:
        if handler is None:
            raise _SetAside("unknown_type", f"HQ does not apply records of type {str(record.type)[:64]!r}")
        if not record.valid:
            try:
                validate_body(record.type, record.body)
            except RecordError as exc:
                raise _SetAside("schema", str(exc)) from None
        body = record.body
        ctx = _Apply(state, record, body, policy, now)
        handler(ctx, body)
    except _SetAside as exc:
        return Change((store, seq), problems=[Problem(exc.code, exc.message, set_aside=True)])
    return Change((store, seq), ctx.accounts, ctx.cards, ctx.members, ctx.sales, ctx.entries, ctx.problems)


def checked(record: StoreRecord) -> StoreRecord:
    """The record marked ``valid`` if its body passes its type's schema (as it
    is otherwise: ``record_change`` sets it aside, saying why)."""
    if record.valid or record.type not in _HANDLERS:
        return record
    try:
        validate_body(record.type, record.body)
    except RecordError:
        return record
    return record._replace(valid=True)


def sale_effect(account_id: str, entries: Iterable[HistoryEntry]) -> SaleEffect:
    """Fold a sale's history entry and its returns' into what it did and
    what was given back (the shell loads them from ``account_history``)."""
    e = SaleEffect(account_id)
    for h in entries:
        d = h.detail or {}
        if h.kind == "sale":
            e = e._replace(account_id=h.account_id, sv=d.get("sv", 0), bonus=d.get("bonus", 0),
                           redeemed=d.get("redeemed", 0), taken=tuple(tuple(t) for t in d.get("taken", ())),
                           earned=d.get("earned", 0), earned_lot=d.get("earned_lot"))
        elif h.kind == "return":
            restored = dict(e.restored)
            for lot, n in d.get("restored", ()):
                restored[lot] = restored.get(lot, 0) + n
            e = e._replace(returned_sv=e.returned_sv + d.get("sv", 0),
                           returned_bonus=e.returned_bonus + d.get("bonus", 0),
                           returned_redeemed=e.returned_redeemed + d.get("redeemed", 0),
                           returned_earned=e.returned_earned + d.get("earned", 0), restored=restored)
    return e


@lru_cache(maxsize=4096)
def lot_expiry(earned_on: date, policy: AccountPolicy) -> str:
    """The lot points earned on ``earned_on`` go to."""
    if policy.points_expiry_date:
        mm, dd = (int(x) for x in policy.points_expiry_date.split("-"))
        y = earned_on.year + policy.points_expiry_years
        for year in (y, y + 1):
            day = date(year, mm, min(dd, calendar.monthrange(year, mm)[1]))
            if day > earned_on:
                return day.isoformat()
    n = policy.points_expiry_months
    if n is None:
        return NEVER
    month = earned_on.month - 1 + n
    y, m = earned_on.year + month // 12, month % 12 + 1
    return date(y, m, calendar.monthrange(y, m)[1]).isoformat()


def add_months(day: date, n: int) -> date:
    month = day.month - 1 + n
    y, m = day.year + month // 12, month % 12 + 1
    return date(y, m, min(day.day, calendar.monthrange(y, m)[1]))


def _ms(dt: datetime) -> int:
    return int(dt.timestamp() * 1000)


class _Apply:
    """One record's application: reads the state, collects the changes."""

    def __init__(self, state: Book, record: StoreRecord, body: dict, policy: AccountPolicy, now: datetime):
        self.state, self.record, self.body, self.policy, self.now = state, record, body, policy, now
        self.accounts: dict[str, Account] = {}
        self.cards: dict[str, Card] = {}
        self.members: dict[str, Member] = {}
        self.sales: dict[str, SaleEffect] = {}
        self.entries: list[HistoryEntry] = []
        self.problems: list[Problem] = []
        self.at = datetime.fromisoformat(body["at"])

    # -- reading and writing the state
    def account(self, account_id: str) -> Account | None:
        return self.accounts.get(account_id) or self.state.accounts.get(account_id)

    def card(self, card_no: str | None) -> Card | None:
        return (self.cards.get(card_no) or self.state.cards.get(card_no)) if card_no else None

    def member(self, member_id: str | None) -> Member | None:
        return (self.members.get(member_id) or self.state.members.get(member_id)) if member_id else None

    def note(self, code: str, message: str) -> None:
        self.problems.append(Problem(code, message, applied=True))

    def entry(self, account_id: str, kind: str, **kw) -> None:
        b, r = self.body, self.record
        self.entries.append(HistoryEntry(account_id, kind, store=r.store, seq=r.seq, tx_id=r.tx_id,
                                         terminal=b.get("terminal"), operator=b.get("operator"),
                                         at=b.get("at"), **kw))

    def resolve(self, card_no: str | None, account_id: str | None) -> Account:
        """The account a record spends from: its card's at HQ, else the account it names."""
        card = self.card(card_no)
        if card is not None:
            acct = self.account(card.account_id)
            if account_id and account_id != card.account_id:
                self.note("account_mismatch", f"card {_mask(card_no)} is on account {card.account_id} at HQ; "
                                              f"the store said {account_id}")
            return acct
        acct = self.account(account_id) if account_id else None
        if acct is None:
            raise _SetAside("unknown_card", f"card {_mask(card_no)} / account {account_id}: not known at HQ")
        return acct

    # -- stored value
    def spend(self, acct: Account, amount: int) -> tuple[Account, int, int]:
        """Take ``amount`` fen: (account, from paid, from bonus)."""
        avail_p, avail_b = max(acct.paid_fen, 0), acct.bonus_fen
        order = self.policy.spend_order
        if amount >= avail_p + avail_b:
            bonus = avail_b
            if amount > avail_p + avail_b:
                self.note("stored_value_overdraft", f"account {acct.account_id}: {amount} fen spent, "
                                                    f"{avail_p + avail_b} fen held")
        elif order == "bonus_first":
            bonus = min(amount, avail_b)
        elif order == "paid_first":
            bonus = max(0, amount - avail_p)
        else:
            bonus = amount * avail_b // (avail_p + avail_b)
        paid = amount - bonus
        return acct._replace(paid_fen=acct.paid_fen - paid, bonus_fen=acct.bonus_fen - bonus), paid, bonus

    # -- points
    def take_points(self, acct: Account, n: int, first: str | None = None
                    ) -> tuple[Account, list[list], dict[str, int]]:
        """Take ``n`` points: from lot ``first``, then the earliest-expiring
        lots, the rest owed. (account, [[lot, points], ...] in the order
        taken, {lot: -points})."""
        lots = {l.expires: l for l in acct.lots}
        order = ([first] if first in lots else []) + [e for e in sorted(lots) if e != first]
        taken, deltas, left = [], {}, n
        for e in order:
            if not left:
                break
            k = min(left, lots[e].remaining)
            if k:
                lots[e] = lots[e]._replace(remaining=lots[e].remaining - k)
                taken.append([e, k])
                deltas[e] = -k
                left -= k
        owed = acct.points_owed
        if left:
            taken.append([OWED, left])
            deltas[OWED] = left
            owed += left
            self.note("points_overdraft", f"account {acct.account_id}: {n} points taken, {n - left} held")
        return acct._replace(lots=_sorted(lots), points_owed=owed), taken, deltas

    def earn_points(self, acct: Account, n: int, expires: str) -> tuple[Account, dict[str, int]]:
        """Add ``n`` points to the lot ``expires``, paying points owed first."""
        deltas = {}
        pay = min(acct.points_owed, n)
        if pay:
            deltas[OWED] = -pay
        add = n - pay
        lots = {l.expires: l for l in acct.lots}
        if add:
            old = lots.get(expires)
            at = _ms(self.at)
            lots[expires] = Lot(expires, min(old.earned_at, at) if old else at, (old.points if old else 0) + add,
                                (old.remaining if old else 0) + add)
            deltas[expires] = add
        return acct._replace(lots=_sorted(lots), points_owed=acct.points_owed - pay), deltas

    def give_back_points(self, acct: Account, lot: str, n: int) -> tuple[Account, dict[str, int]]:
        """Give ``n`` points back to where they were taken from (a lot, or
        points owed: what is no longer owed goes to a lot of today's expiry)."""
        if lot == OWED:
            pay = min(acct.points_owed, n)
            acct = acct._replace(points_owed=acct.points_owed - pay)
            deltas = {OWED: -pay} if pay else {}
            if n - pay:
                acct, more = self.earn_points(acct, n - pay, lot_expiry(self.at.date(), self.policy))
                _merge(deltas, more)
            return acct, deltas
        lots = {l.expires: l for l in acct.lots}
        old = lots.get(lot)
        lots[lot] = old._replace(remaining=old.remaining + n) if old else Lot(lot, _ms(self.at), n, n)
        return acct._replace(lots=_sorted(lots)), {lot: n}

    def count_today(self, acct: Account, sv: int, points: int) -> Account:
        """The offline allowances counted for the store-local day of the record."""
        day = self.body.get("day")
        if not day or (acct.day and day < acct.day) or not (sv or points):
            return acct
        if day != acct.day:
            return acct._replace(day=day, day_stored_value_paid_fen=sv, day_points_redeemed=points)
        return acct._replace(day_stored_value_paid_fen=acct.day_stored_value_paid_fen + sv,
                             day_points_redeemed=acct.day_points_redeemed + points)


def _sorted(lots: dict[str, Lot]) -> tuple[Lot, ...]:
    return tuple(lots[e] for e in sorted(lots))


def _merge(into: dict, more: dict) -> dict:
    for k, v in more.items():
        into[k] = into.get(k, 0) + v
        if not into[k]:
            del into[k]
    return into


def _mask(card_no: str | None) -> str:
    return f"****{card_no[-4:]}" if card_no else "none"


def _points_delta(deltas: Mapping[str, int]) -> int:
    return sum(v for k, v in deltas.items() if k != OWED) - deltas.get(OWED, 0)


# -- record handlers ----------------------------------------------------------------

def _sale(c: _Apply, b: dict) -> None:
    t, d = b["totals"], b["deltas"]
    sv, red, earned, coupons = t["stored_value_fen"], t["points_redeemed"], t["points_earned"], b["coupons"]
    if (d["stored_value_fen"], d["points_redeemed"], d["points_earned"], d["points"]) != \
            (-sv, red, earned, earned - red):
        raise _SetAside("inconsistent", "sale: deltas do not match totals")
    if b["member"] is None:
        if sv or red or earned or coupons:
            raise _SetAside("unknown_card", "sale without a member moves stored value, points or coupons")
        return
    card_no = b["member"]["card_no"]
    spend = max(0, t["total"] - t["redeemed_fen"])     # paid in cash and stored value (tier rules count it)
    if not (sv or red or earned or coupons):
        # A member sale paid in cash that earned nothing: no balance moves; a zero entry
        # keeps its spend for the tier rules (hq_bridge/policy.py), when HQ knows the card.
        card = c.card(card_no)
        if spend and card is not None:
            c.entry(card.account_id, "sale", card_no=card_no, detail={"spend": spend})
            c.sales[c.record.tx_id] = SaleEffect(card.account_id)
        return
    acct = c.resolve(card_no, b["account_id"])
    acct, paid, bonus = c.spend(acct, sv) if sv else (acct, 0, 0)
    lots: dict[str, int] = {}
    taken: list = []
    if red:
        acct, taken, took = c.take_points(acct, red)
        _merge(lots, took)
    earned_lot = None
    if earned:
        earned_lot = lot_expiry(c.at.date(), c.policy)
        acct, gave = c.earn_points(acct, earned, earned_lot)
        _merge(lots, gave)
    if coupons:
        held = dict(acct.coupons)
        for code in coupons:
            if held.get(code) != "issued":
                c.note("coupon_not_held", f"account {acct.account_id}: coupon {code} "
                                          f"{'used already' if held.get(code) else 'not held'}")
            held[code] = "used"
        acct = acct._replace(coupons=held)
    acct = c.count_today(acct, sv, red)
    c.accounts[acct.account_id] = acct
    c.entry(acct.account_id, "sale", d_paid_fen=-paid, d_bonus_fen=-bonus, d_points=earned - red, card_no=card_no,
            detail={"sv": sv, "paid": paid, "bonus": bonus, "redeemed": red, "taken": taken, "earned": earned,
                    "earned_lot": earned_lot, "lots": lots, "spend": spend,
                    **({"coupons": coupons} if coupons else {})})
    c.sales[c.record.tx_id] = SaleEffect(acct.account_id, sv, bonus, red, tuple(tuple(x) for x in taken),
                                         earned, earned_lot)


def _return(c: _Apply, b: dict) -> None:
    t, d = b["totals"], b["deltas"]
    sv, red, earned = t["stored_value_fen"], t["points_redeemed"], t["points_earned"]
    if (d["stored_value_fen"], d["points_redeemed"], d["points_earned"], d["points"]) != \
            (sv, -red, -earned, red - earned):
        raise _SetAside("inconsistent", "return: deltas do not match totals")
    unspend = t["cash_fen"] + sv                     # spend given back (tier rules)
    if not (sv or red or earned):
        # Paid back in cash only: no balance moves; a zero entry takes the spend back.
        sale = c.state.sales.get(b["sale_id"]) if b["sale_id"] else None
        if unspend and sale is not None:
            c.entry(sale.account_id, "return", card_no=(b["member"] or {}).get("card_no"), ref_tx_id=b["sale_id"],
                    detail={"spend": -unspend})
        return
    sale = c.state.sales.get(b["sale_id"]) if b["sale_id"] else None
    if sale is None:
        raise _SetAside("sale_not_applied", f"return of sale {b['sale_id']} (seq {b['sale_seq']}), "
                                            "which HQ has not applied to an account")
    if sale.returned_sv + sv > sale.sv or sale.returned_redeemed + red > sale.redeemed \
            or sale.returned_earned + earned > sale.earned:
        raise _SetAside("return_exceeds_sale", f"return of sale {b['sale_id']} gives back more than it took: "
                                               f"stored value {sale.returned_sv}+{sv}/{sale.sv}, "
                                               f"points {sale.returned_redeemed}+{red}/{sale.redeemed}, "
                                               f"earned {sale.returned_earned}+{earned}/{sale.earned}")
    acct = c.account(sale.account_id)
    bonus = 0
    if sv:
        r0, r1 = sale.returned_sv, sale.returned_sv + sv
        bonus = sale.bonus * r1 // sale.sv - sale.bonus * r0 // sale.sv
    paid = sv - bonus
    acct = acct._replace(paid_fen=acct.paid_fen + paid, bonus_fen=acct.bonus_fen + bonus)
    lots: dict[str, int] = {}
    restored_now: list = []
    restored = dict(sale.restored)
    left = red
    for lot, n in reversed(sale.taken):          # last taken, first given back
        if not left:
            break
        k = min(left, n - restored.get(lot, 0))
        if k > 0:
            acct, gave = c.give_back_points(acct, lot, k)
            _merge(lots, gave)
            restored[lot] = restored.get(lot, 0) + k
            restored_now.append([lot, k])
            left -= k
    taken: list = []
    if earned:
        acct, taken, took = c.take_points(acct, earned, first=sale.earned_lot)
        _merge(lots, took)
    c.accounts[acct.account_id] = acct
    c.entry(acct.account_id, "return", d_paid_fen=paid, d_bonus_fen=bonus, d_points=red - earned,
            card_no=(b["member"] or {}).get("card_no"), ref_tx_id=b["sale_id"],
            detail={"sv": sv, "paid": paid, "bonus": bonus, "redeemed": red, "restored": restored_now,
                    "earned": earned, "taken": taken, "lots": lots, "spend": -unspend})
    c.sales[b["sale_id"]] = sale._replace(returned_sv=sale.returned_sv + sv,
                                          returned_bonus=sale.returned_bonus + bonus,
                                          returned_redeemed=sale.returned_redeemed + red,
                                          returned_earned=sale.returned_earned + earned, restored=restored)


def _topup(c: _Apply, b: dict) -> None:
    pay, bonus = b["pay_fen"], b["bonus_fen"]
    if b["credit_fen"] != pay + bonus or b["deltas"]["stored_value_fen"] != pay + bonus:
        raise _SetAside("inconsistent", "topup: credit_fen is not pay_fen + bonus_fen")
    acct = c.resolve(b["card_no"], b["account_id"])
    acct = acct._replace(paid_fen=acct.paid_fen + pay, bonus_fen=acct.bonus_fen + bonus)
    c.accounts[acct.account_id] = acct
    c.entry(acct.account_id, "topup", d_paid_fen=pay, d_bonus_fen=bonus, card_no=b["card_no"],
            detail={"package_id": b["package_id"], "payment": b["payment"]["method"]})


def _package_use(c: _Apply, b: dict) -> None:
    pid, uses = b["package_id"], b["uses"]
    if b["deltas"]["packages"] != {pid: -uses}:
        raise _SetAside("inconsistent", "package_use: deltas do not match uses")
    acct = c.resolve(b["card_no"], b["account_id"])
    left = acct.packages.get(pid)
    if left is None:
        raise _SetAside("package_unknown", f"account {acct.account_id} holds no package {pid} at HQ")
    if uses > left:
        c.note("package_overdraft", f"account {acct.account_id}: {uses} uses of {pid}, {left} left")
    expires = acct.package_expires.get(pid)
    if expires and b["at"][:10] > expires:   # a store that did not know yet: applied (the service is given), seen
        c.note("package_expired_use", f"account {acct.account_id}: {uses} uses of {pid} on {b['at'][:10]}, "
                                      f"expired {expires}")
    acct = acct._replace(packages={**acct.packages, pid: left - uses})
    c.accounts[acct.account_id] = acct
    c.entry(acct.account_id, "package_use", package_id=pid, d_uses=-uses, card_no=b["card_no"])


def _package_sale(c: _Apply, b: dict) -> None:
    """A count package sold or renewed at a counter: its uses added to what the
    account holds (a new package row when it held none), the price taken from
    stored value when it was paid so (as a sale's stored value is). The
    validity the store worked out (``expires``: from the later of the sale
    day and the expiry it knew) becomes the package's, as it is (None: no
    expiry), so HQ's snapshot says what the store's view said; it is kept
    in the entry too."""
    pid, uses, price, sv = b["package_id"], b["uses"], b["price_fen"], b["stored_value_fen"]
    by_sv = b["payment"]["method"] == "stored_value"
    if b["deltas"] != {"packages": {pid: uses}, "stored_value_fen": -sv} or sv != (price if by_sv else 0):
        raise _SetAside("inconsistent", "package_sale: deltas do not match uses and payment")
    acct = c.resolve(b["card_no"], b["account_id"])
    acct, paid, bonus = c.spend(acct, sv) if sv else (acct, 0, 0)
    left = acct.packages.get(pid, 0)
    expires = {k: v for k, v in acct.package_expires.items() if k != pid}
    if b.get("expires"):
        expires[pid] = b["expires"]
    acct = c.count_today(acct._replace(packages={**acct.packages, pid: left + uses}, package_expires=expires), sv, 0)
    c.accounts[acct.account_id] = acct
    c.entry(acct.account_id, "package_sale", d_paid_fen=-paid, d_bonus_fen=-bonus, package_id=pid, d_uses=uses,
            card_no=b["card_no"],
            detail={"price_fen": price, "payment": b["payment"]["method"], "sv": sv, "paid": paid, "bonus": bonus,
                    "renewal": left > 0, "uses_before": left, "expires": b["expires"]})


def _gift_redemption(c: _Apply, b: dict) -> None:
    """Points for a gift: taken from the lots oldest-expiring first, the rest
    owed (an offline overdraft), as a sale's redemption takes them; they count
    against the day's offline redemption allowance."""
    n, gid, qty = b["points"], b["gift_id"], b["qty"]
    if n != b["points_each"] * qty or b["deltas"] != {"points": -n, "points_redeemed": n, "gifts": {gid: qty}}:
        raise _SetAside("inconsistent", "gift_redemption: points or deltas do not match the gifts")
    acct = c.resolve(b["card_no"], b["account_id"])
    acct, taken, lots = c.take_points(acct, n)
    acct = c.count_today(acct, 0, n)
    c.accounts[acct.account_id] = acct
    c.entry(acct.account_id, GIFT_ENTRY, d_points=-n, card_no=b["card_no"],
            detail={"gift_id": gid, "qty": qty, "points": n, "taken": taken, "lots": lots})


_OP_STATUS = {"report_lost": "lost", "freeze": "frozen"}


def _card_op(c: _Apply, b: dict) -> None:
    op, card_no = b["op"], b["card_no"]
    card = c.card(card_no)
    detail = {"op": op, "fee_fen": b["fee_fen"], **({"reason": b["reason"]} if b["reason"] else {})}
    now_ms = _ms(c.now)
    if op == "issue_subsidiary":
        _issue_subsidiary(c, b, detail, now_ms)
        return
    if op == "issue":
        if card is not None:
            raise _SetAside("card_exists", f"issue: card {_mask(card_no)} exists at HQ")
        owner = c.account(b["member_id"]) if b["member_id"] else None
        if b["member_id"] and owner is None:
            raise _SetAside("unknown_member", f"issue: member {b['member_id']} has no account at HQ")
        if owner is None:   # a card sold without a member: an account of its own
            account_id = f"card-{card_no}"
            if c.account(account_id) is not None:
                raise _SetAside("account_exists", f"issue: account {account_id} exists at HQ")
            c.members[account_id] = Member(account_id, source=f"store:{c.record.store}/{c.record.seq}",
                                           created_at=now_ms)
            owner = Account(account_id, account_id, c.policy.default_tier, created_at=now_ms)
            c.accounts[account_id] = owner
            role, holder = "primary", account_id
        else:
            role, holder = "subsidiary", b["member_id"]
        expires = add_months(c.at.date(), c.policy.card_valid_months).isoformat() \
            if c.policy.card_valid_months else None
        c.cards[card_no] = Card(card_no, owner.account_id, holder, role, "active", issued_at=now_ms, expires=expires)
        c.entry(owner.account_id, "card_op", card_no=card_no, detail={**detail, "status": [None, "active"]})
        return
    if card is None:
        raise _SetAside("unknown_card", f"{op}: card {_mask(card_no)} is not known at HQ")
    before = card.status
    if op in _OP_STATUS:
        after = _OP_STATUS[op] if before in ("active", "lost", "frozen") else before
    elif op == "unfreeze":
        after = "active" if before in ("lost", "frozen") else before
        if b.get("status_before"):
            detail["status_before_at_store"] = b["status_before"]
    elif op == "annual_fee":
        after = "active" if before == "expired" else before
        start = max(c.at.date().isoformat(), card.expires or "")
        card = card._replace(expires=add_months(date.fromisoformat(start), c.policy.annual_fee_months).isoformat())
        detail["expires"] = card.expires
    elif op == "extend":  # 延期: the store worked out the new expiry from the card it saw
        after = "active" if before == "expired" else before
        card = card._replace(expires=b["expires"])
        detail.update(expires=b["expires"], months=b["months"])
    elif op != "replace":
        raise _SetAside("unknown_op", f"HQ does not apply card operation {op!r}")
    else:
        new_no = b["new_card_no"]
        if not new_no or new_no == card_no:
            raise _SetAside("schema", "replace: needs new_card_no, another card")
        if c.card(new_no) is not None:
            raise _SetAside("card_exists", f"replace: the new card {_mask(new_no)} exists at HQ")
        if before in ("replaced", "cancelled"):
            raise _SetAside("card_not_replaceable", f"replace: card {_mask(card_no)} is {before}")
        after = "replaced"
        c.cards[new_no] = card._replace(card_no=new_no, status="active", replaced_by=None, issued_at=now_ms,
                                        nfc_uid=None)
        card = card._replace(replaced_by=new_no)
        detail["new_card_no"] = new_no
    if after == before and op not in ("annual_fee", "extend"):
        c.note("card_status_unchanged", f"{op}: card {_mask(card_no)} is {before}")
    c.cards[card_no] = card._replace(status=after)
    c.entry(card.account_id, "card_op", card_no=card_no, detail={**detail, "status": [before, after]})


def _issue_subsidiary(c: _Apply, b: dict, detail: dict, now_ms: int) -> None:
    """附属卡: a new card paying from and earning to its primary's account."""
    card_no, primary_no = b["card_no"], b.get("primary_card_no")
    primary = c.card(primary_no)
    if primary is None:
        raise _SetAside("unknown_card", f"issue_subsidiary: primary card {_mask(primary_no)} is not known at HQ")
    if c.card(card_no) is not None:
        raise _SetAside("card_exists", f"issue_subsidiary: card {_mask(card_no)} exists at HQ")
    expires = add_months(c.at.date(), c.policy.card_valid_months).isoformat() if c.policy.card_valid_months else None
    c.cards[card_no] = Card(card_no, primary.account_id, primary.member_id, "subsidiary", "active",
                            issued_at=now_ms, expires=expires)
    c.entry(primary.account_id, "card_op", card_no=card_no,
            detail={**detail, "primary_card_no": primary_no, "status": [None, "active"]})


def withdrawal_forfeit(bonus_fen: int, paid_out_fen: int, paid_fen: int, rule: str) -> int:
    """The bonus part given up when ``paid_out_fen`` of a paid part of
    ``paid_fen`` is paid out (取款): all of it, a proportional share, or none."""
    if rule == "forfeit_all":
        return max(bonus_fen, 0)
    if rule == "forfeit_proportional" and paid_fen > 0:
        return max(bonus_fen, 0) * min(paid_out_fen, paid_fen) // paid_fen
    return 0


def _withdrawal(c: _Apply, b: dict) -> None:
    """取款 at a counter: the paid part leaves the account; the bonus part is
    forfeited as the chain's rule says. Paying out more than HQ's paid part
    (offline, against an older view) is applied and reported."""
    acct = c.resolve(b["card_no"], b["account_id"])
    out = b["paid_fen"]
    if out > acct.paid_fen:
        c.note("withdrawal_overdraft", f"account {acct.account_id}: {out} fen paid out, "
                                       f"{acct.paid_fen} fen paid part at HQ")
    forfeit = withdrawal_forfeit(acct.bonus_fen, out, acct.paid_fen, c.policy.withdrawal_bonus)
    c.accounts[acct.account_id] = acct._replace(paid_fen=acct.paid_fen - out, bonus_fen=acct.bonus_fen - forfeit)
    c.entry(acct.account_id, "withdrawal", d_paid_fen=-out, d_bonus_fen=-forfeit, card_no=b["card_no"],
            detail={"paid_out_fen": out, "bonus_forfeited_fen": forfeit, "payout": b["payout"]["method"],
                    "paid_known_fen": b["paid_known_fen"]})


def _registration(c: _Apply, b: dict) -> None:
    member_id, card_no = b["member_id"], b["card_no"]
    account_id = b.get("account_id") or member_id
    if account_id != member_id:
        raise _SetAside("schema", "registration: account_id must be the new member's member_id")
    if c.member(member_id) is not None or c.account(account_id) is not None:
        raise _SetAside("member_exists", f"registration: member {member_id} exists at HQ")
    if c.card(card_no) is not None:
        raise _SetAside("card_exists", f"registration: card {_mask(card_no)} exists at HQ")
    now_ms = _ms(c.now)
    c.members[member_id] = Member(member_id, b.get("name"), None, b["consent"], b.get("birthday"),
                                  b.get("birthday_calendar") or "solar",
                                  f"store:{c.record.store}/{c.record.seq}", now_ms)
    c.accounts[account_id] = Account(account_id, member_id, c.policy.default_tier, card_type=b.get("card_type"),
                                     created_at=now_ms)
    expires = add_months(c.at.date(), c.policy.card_valid_months).isoformat() if c.policy.card_valid_months else None
    c.cards[card_no] = Card(card_no, account_id, member_id, "primary", "active", card_type=b.get("card_type"),
                            nfc_uid=b.get("nfc_uid"), issued_at=now_ms, expires=expires)
    c.entry(account_id, "registration", card_no=card_no,
            detail={"fee_fen": b.get("fee_fen") or 0, "consent": b["consent"]})


_HANDLERS = {"sale": _sale, "return": _return, "topup": _topup, "package_use": _package_use,
             "card_op": _card_op, "registration": _registration, "withdrawal": _withdrawal,
             "package_sale": _package_sale, "gift_redemption": _gift_redemption}


# ================================================================ imperative shell

@dataclass
class BatchResult:
    applied: list[int] = field(default_factory=list)          # seqs applied (in order)
    set_aside: list[tuple[int, str]] = field(default_factory=list)   # (seq, "code: reason")
    duplicates: int = 0                                       # at or below the watermark
    held: int = 0                                             # past a gap, waiting in the ledger
    problems: list[tuple[int, Problem]] = field(default_factory=list)  # applied, for reconciliation
    watermark: int = 0
    # Cards whose status the batch's records changed, (card_no, before or None, after,
    # replaced_by): what every store must know at once goes out as a deny delta.
    cards_changed: list[tuple[str, str | None, str, str | None]] = field(default_factory=list)
    # Cards HQ's own policy moved on ingest (reconcile_hook: block, and the lift once settled):
    # HQ's decisions, so a lift goes out too, which a store's record never makes.
    hq_cards_changed: list[tuple[str, str | None, str, str | None]] = field(default_factory=list)
    accounts_changed: set[str] = field(default_factory=set)   # for live look-ups / caches
    # Accounts whose tier windows grew (a sale's spend or points earned): the only ones a batch can move up.
    tier_window_grew: set[str] = field(default_factory=set)
    # Every account the batch read, as the batch left it (the hooks read tiers and overdrafts here).
    accounts_after: dict[str, Account] = field(default_factory=dict)
    # Accounts a record was applied to with a problem for reconciliation (a coupon not held, an
    # overdraft), and accounts that redeemed a gift: reconcile_hook looks at them on ingest.
    flagged: set[str] = field(default_factory=set)
    gifted: set[str] = field(default_factory=set)
    tier_moves: list = field(default_factory=list)            # hq_bridge/policy.py tier_hook
    overdrafts: list = field(default_factory=list)            # hq_bridge/reconcile.py reconcile_hook


# Card statuses that go to the stores as denies (a lift is a card back to active).
DENY = ("not_activated", "lost", "frozen", "blocked", "limited", "cancelled", "replaced", "expired")


def deny_entries(cards_changed: Iterable[tuple], today: str | None = None, *, lifts: bool = True,
                 skip: Iterable[str] = ()) -> list[dict]:
    """The deny-delta entries (wire/schemas/deny_delta.json) of cards whose
    status changed, but those in ``skip``: denied statuses go out as denies,
    a card back to ``active`` from a denied status (or new) as a lift, unless
    ``lifts`` is False (what a store's records did: lifting is HQ's decision)."""
    since = today or time.strftime("%Y-%m-%d")
    skip = set(skip)
    out = []
    for card_no, before, after, replaced_by in cards_changed:
        if card_no in skip or before == after:
            continue
        if after in DENY:
            e = {"card_no": card_no, "status": after, "since": since}
            if after == "replaced" and replaced_by:
                e["replaced_by"] = replaced_by
            out.append(e)
        elif after == "active" and lifts:
            out.append({"card_no": card_no, "status": "active"})
    return out


_CHUNK = 2000   # records loaded and written together


def _coerce(record: Any, store: str) -> StoreRecord:
    if isinstance(record, StoreRecord):
        return record
    body = record.body
    if isinstance(body, (str, bytes)):
        body = orjson.loads(body)
    return StoreRecord(store, record.seq, record.id, record.type, body, getattr(record, "ts", 0))


class AccountStore:
    """HQ's accounts in the database: the shell around ``apply_record``.

    Every method takes the caller's connection and runs inside the caller's
    transaction (``with engine.begin() as conn: ...``), so the ledger insert
    and the account changes commit together."""

    def __init__(self, engine: Engine | None = None, policy: AccountPolicy | None = None, clock=time.time,
                 hooks: Iterable[Any] = ()):
        self.engine = engine
        self.policy = policy or AccountPolicy()
        self.clock = clock
        # Called as hook(conn, store, result) at the end of apply_batch, in its transaction, when
        # accounts changed (hq_bridge/policy.py on_ingest: tier upgrades; hq_bridge/reconcile.py
        # on_ingest: overdrafts settled). A hook may add to result.hq_cards_changed.
        self.hooks: list = list(hooks)

    # -- ingest
    def apply_batch(self, conn: Connection, store: str, records: Iterable[Any]) -> BatchResult:
        """Apply a store's records (those the ledger just committed: TxRecord
        or StoreRecord) after the store's watermark, in seq order; records
        past a gap wait in the ledger, and are applied from it here once the
        gap is filled. Set-aside records go to ``set_aside``."""
        now = datetime.fromtimestamp(self.clock(), timezone.utc)
        out = BatchResult()
        w = db.account_watermarks
        q = select(w.c.seq, w.c.held_above).where(w.c.store == store)
        if db.is_postgres(conn):
            q = q.with_for_update()      # one worker at a time per store
            row = conn.execute(q).first()
            if row is None:
                # A store's first batch: its row first, so that a worker holding another batch of
                # the store waits for this one instead of writing a watermark over it.
                db.insert_rows(conn, w, [{"store": store, "seq": 0, "held_above": 0, "updated_at": _ms(now)}],
                               keys=())
                row = conn.execute(q).first()
        else:                            # SQLite: one writer at a time anyway
            row = conn.execute(q).first()
        done, held_above = (row[0], row[1]) if row else (0, 0)
        pending: dict[int, StoreRecord] = {}
        for r in records:
            r = _coerce(r, store)
            if r.seq <= done:
                out.duplicates += 1
            else:
                pending[r.seq] = r
        run: list[StoreRecord] = []
        nxt = done + 1
        while True:
            while nxt in pending:
                run.append(pending.pop(nxt))
                nxt += 1
            if held_above >= nxt:   # committed earlier past a gap: in the ledger
                got = self._from_ledger(conn, store, nxt, min(held_above, nxt + 10 * _CHUNK))
                if got and got[0].seq == nxt:
                    pending.update((r.seq, r) for r in got)
                    continue
            break
        out.held = len(pending)
        for i in range(0, len(run), _CHUNK):
            done = self._apply_chunk(conn, store, run[i:i + _CHUNK], done, now, out)
        held_above = max([held_above, *pending]) if (pending or held_above > done) else 0
        if held_above <= done:
            held_above = 0
        if run or row is None or (row[1] != held_above):
            db.upsert(conn, w, [{"store": store, "seq": done, "held_above": held_above, "updated_at": _ms(now)}],
                      ["store"])
        out.watermark = done
        if out.accounts_changed:
            for hook in self.hooks:
                hook(conn, store, out)
        return out

    def _from_ledger(self, conn: Connection, store: str, first: int, last: int) -> list[StoreRecord]:
        t = db.transactions
        rows = conn.execute(select(t.c.seq, t.c.tx_id, t.c.type, t.c.body, t.c.ts).where(
            t.c.store == store, t.c.seq >= first, t.c.seq <= last).order_by(t.c.seq)).all()
        out = []
        for seq, tx_id, type_, body, ts in rows:
            if out and seq != out[-1].seq + 1:
                break
            out.append(StoreRecord(store, seq, tx_id, type_, orjson.loads(body), ts))
        return out

    def _apply_chunk(self, conn: Connection, store: str, run: list[StoreRecord], done: int, now: datetime,
                     out: BatchResult) -> int:
        run = [checked(r) for r in run]    # before the accounts are locked: a lock is held for less
        book, loaded = self._load(conn, keys_of_all(run), lock_cards=any(r.type == "card_op" for r in run))
        # The chunk's working book: every record reads it and its change goes into it, in seq order.
        work = Book(book.accounts, book.cards, book.members, {store: done}, book.sales)
        entries: list[HistoryEntry] = []
        aside = []
        for r in run:
            change = record_change(work, r, self.policy, now)
            for p in change.problems:
                if p.set_aside:
                    aside.append({"store": store, "seq": r.seq, "tx_id": r.tx_id, "type": str(r.type)[:64],
                                  "body": _json(r.body), "error": f"{p.code}: {p.message}", "at": _ms(now)})
                    out.set_aside.append((r.seq, f"{p.code}: {p.message}"))
                elif p.applied:
                    out.problems.append((r.seq, p))
                    out.flagged.update(change.accounts)
                else:   # duplicate or gap: cannot happen in a contiguous run
                    raise RuntimeError(f"store {store} seq {r.seq}: {p.message}")
            if not any(p.set_aside for p in change.problems):
                out.applied.append(r.seq)
            work.accounts.update(change.accounts)
            work.cards.update(change.cards)
            work.members.update(change.members)
            work.sales.update(change.sales)
            work.watermarks[store] = r.seq
            entries.extend(change.entries)
        self._write(conn, loaded, work, entries, aside, _ms(now))
        old_cards, old_accounts = loaded["cards"], loaded["accounts"]
        for no, card in work.cards.items():
            old = old_cards.get(no)
            if old is not card and (old is None or (old.status, old.replaced_by) != (card.status, card.replaced_by)):
                out.cards_changed.append((no, old.status if old else None, card.status, card.replaced_by))
        out.accounts_changed.update(a for a, acct in work.accounts.items() if old_accounts.get(a) is not acct)
        out.accounts_changed.update(e.account_id for e in entries)   # zero entries too (spend for tier rules)
        out.tier_window_grew.update(e.account_id for e in entries if any(n > 0 for n in tier_counts(e.kind, e.detail)))
        out.accounts_after.update(work.accounts)
        out.gifted.update(e.account_id for e in entries if e.kind == GIFT_ENTRY)
        return run[-1].seq if run else done

    # -- loading: one query per table for the whole chunk
    def _load(self, conn: Connection, keys: Keys, lock_cards: bool) -> tuple[Book, dict]:
        """The chunk's part of the accounts, locked for the transaction on
        PostgreSQL: the accounts always, the cards when ``lock_cards`` (card
        operations change them; other records only read a card's account)."""
        card_nos, account_ids, sale_ids, member_ids = keys
        pg = db.is_postgres(conn)
        cards: dict[str, Card] = {}
        if card_nos:
            q = select(*_columns(db.cards, Card)).where(db.in_(conn, db.cards.c.card_no, card_nos))
            if pg and lock_cards:
                # In card order, then the accounts in account order: two workers never deadlock on them.
                q = q.order_by(db.cards.c.card_no).with_for_update()
            for r in conn.execute(q).all():
                cards[r.card_no] = Card._make(r)
        sales: dict[str, SaleEffect] = {}
        if sale_ids:
            h = db.account_history
            cols = _columns(h, HistoryEntry)
            by_sale: dict[str, list] = {}
            rows = conn.execute(select(h.c.id, *cols).where(h.c.kind == "sale", db.in_(conn, h.c.tx_id, sale_ids))
                                .union_all(select(h.c.id, *cols).where(h.c.kind == "return",
                                                                       db.in_(conn, h.c.ref_tx_id, sale_ids)))
                                .order_by("id")).all()
            for _id, *r in rows:
                e = _entry_of(r)
                by_sale.setdefault(e.tx_id if e.kind == "sale" else e.ref_tx_id, []).append(e)
            for sid, hs in by_sale.items():
                if hs[0].kind == "sale":
                    sales[sid] = sale_effect(hs[0].account_id, hs)
        ids = account_ids | {c.account_id for c in cards.values()} | {e.account_id for e in sales.values()}
        accounts = self.load_accounts(conn, ids, lock=True)
        members: dict[str, Member] = {}
        if member_ids:
            q = select(*_columns(db.members, Member)).where(db.in_(conn, db.members.c.member_id, member_ids))
            for r in conn.execute(q).all():
                members[r.member_id] = Member._make(r)
        book = Book(accounts, cards, members, {}, sales)   # fresh dicts: the caller's working book
        return book, {"accounts": dict(accounts), "cards": dict(cards), "members": dict(members)}

    def load_accounts(self, conn: Connection, ids: Iterable[str], lock: bool = False) -> dict[str, Account]:
        """Accounts with their lots, packages and coupons (``lock``: FOR UPDATE
        on PostgreSQL, in account order so two workers cannot deadlock on them)."""
        ids = sorted(set(ids))
        if not ids:
            return {}
        a, l, p, c = db.accounts, db.points_lots, db.packages, db.coupons
        q = select(*_columns(a, Account)).where(db.in_(conn, a.c.account_id, ids)).order_by(a.c.account_id)
        if lock and db.is_postgres(conn):
            q = q.with_for_update()
        rows = conn.execute(q).all()        # the account's own columns, in field order
        if not rows:
            return {}
        found = [r.account_id for r in rows]
        lots: dict[str, list[Lot]] = {}
        for aid, *lot in conn.execute(select(l.c.account_id, *_columns(l, Lot)).where(
                db.in_(conn, l.c.account_id, found)).order_by(l.c.account_id, l.c.expires)).all():
            lots.setdefault(aid, []).append(Lot(*lot))
        pkgs: dict[str, dict] = {}
        pkg_expires: dict[str, dict] = {}
        for aid, pid, left, expires in conn.execute(select(p.c.account_id, p.c.package_id, p.c.uses_left,
                                                           p.c.expires).where(
                db.in_(conn, p.c.account_id, found))).all():
            pkgs.setdefault(aid, {})[pid] = left
            if expires:
                pkg_expires.setdefault(aid, {})[pid] = expires
        cps: dict[str, dict] = {}
        for aid, code, state in conn.execute(select(c.c.account_id, c.c.code, c.c.state).where(
                db.in_(conn, c.c.account_id, found))).all():
            cps.setdefault(aid, {})[code] = state
        return {r.account_id: Account(*r, tuple(lots.get(r.account_id, ())), pkgs.get(r.account_id, EMPTY),
                                      cps.get(r.account_id, EMPTY), pkg_expires.get(r.account_id, EMPTY))
                for r in rows}

    # -- writing: one statement per table for the whole chunk
    def _write(self, conn: Connection, loaded: dict, work: Book, entries: list[HistoryEntry], aside: list[dict],
               now_ms: int) -> None:
        old_members = loaded["members"]
        new_members = [m for mid, m in work.members.items() if mid not in old_members]
        if new_members:
            db.insert_rows(conn, db.members, [_member_row(m, now_ms) for m in new_members])
        old_acc = loaded["accounts"]
        changed = [a for aid, a in work.accounts.items() if old_acc.get(aid) is not a]
        if changed:
            db.upsert(conn, db.accounts, [_account_row(a, now_ms) for a in changed], ["account_id"])
            lot_rows, pkg_rows, cp_rows = [], [], []
            for a in changed:
                before = old_acc.get(a.account_id)
                old_lots = {l.expires: l for l in before.lots} if before else {}
                lot_rows += [{"account_id": a.account_id, "expires": l.expires, "earned_at": l.earned_at,
                              "points": l.points, "remaining": l.remaining}
                             for l in a.lots if old_lots.get(l.expires) != l]
                old_p = before.packages if before else {}
                old_e = before.package_expires if before else {}
                pkg_rows += [{"account_id": a.account_id, "package_id": p, "uses_left": n, "updated_at": now_ms,
                              "expires": a.package_expires.get(p)}
                             for p, n in a.packages.items()
                             if old_p.get(p) != n or old_e.get(p) != a.package_expires.get(p)]
                old_c = before.coupons if before else {}
                cp_rows += [{"account_id": a.account_id, "code": code, "state": s, "used_tx": None,
                             "updated_at": now_ms} for code, s in a.coupons.items() if old_c.get(code) != s]
            db.upsert(conn, db.points_lots, lot_rows, ["account_id", "expires"])
            db.upsert(conn, db.packages, pkg_rows, ["account_id", "package_id"])
            db.upsert(conn, db.coupons, cp_rows, ["account_id", "code"])
        old_cards = loaded["cards"]
        changed_cards = [c for no, c in work.cards.items() if old_cards.get(no) is not c]
        if changed_cards:
            db.upsert(conn, db.cards, [_card_row(c, now_ms) for c in changed_cards], ["card_no"])
        if entries:
            db.insert_rows(conn, db.account_history, [_entry_row(e, now_ms) for e in entries])
        if aside:
            db.insert_rows(conn, db.set_aside, aside, keys=("store", "seq"))

    # -- starting the accounts on an existing ledger
    def start_watermarks(self, conn: Connection) -> dict[str, int]:
        """Accounts begin now: every store in the ledger without a watermark
        gets its highest seq (its records so far are in the balances imported,
        not to be applied again). Call it in the transaction of the import."""
        t, w = db.transactions, db.account_watermarks
        have = set(conn.execute(select(w.c.store)).scalars())
        out = {s: m for s, m in conn.execute(select(t.c.store, func.max(t.c.seq)).group_by(t.c.store))
               if s not in have}
        if out:
            now = int(self.clock() * 1000)
            conn.execute(w.insert(), [{"store": s, "seq": m, "held_above": 0, "updated_at": now}
                                      for s, m in out.items()])
        return out

    def watermarks(self, conn: Connection) -> dict[str, int]:
        w = db.account_watermarks
        return dict(conn.execute(select(w.c.store, w.c.seq)).all())

    # -- look-ups
    def account_of_card(self, conn: Connection, card_no: str) -> Account | None:
        aid = conn.execute(select(db.cards.c.account_id).where(db.cards.c.card_no == card_no)).scalar()
        return self.load_accounts(conn, [aid]).get(aid) if aid else None

    def history(self, conn: Connection, account_id: str, limit: int = 50) -> list[HistoryEntry]:
        h = db.account_history
        rows = conn.execute(select(*_columns(h, HistoryEntry)).where(h.c.account_id == account_id)
                            .order_by(h.c.id.desc()).limit(limit))
        return [_entry_of(r) for r in rows]

    def snapshot_rows(self, conn: Connection, store: str) -> "MemberSnapshot":
        return snapshot_rows(conn, store)

    def import_members(self, conn: Connection, rows: Iterable[dict], **kw) -> "ImportResult":
        return import_members(conn, rows, policy=self.policy, clock=self.clock, **kw)


# -- rows <-> plain data

def _json(obj: Any) -> str:
    try:
        return orjson.dumps(obj).decode()
    except TypeError:
        return orjson.dumps(repr(obj)).decode()


def _columns(table: Table, kind) -> list:
    """The table's columns for the fields of ``kind`` (a named tuple) that it
    has, in field order (Card, Member, Lot, HistoryEntry: all of them)."""
    return [table.c[f] for f in kind._fields if f in table.c]


def _entry_of(row) -> HistoryEntry:
    """A history entry from its ``_columns`` (detail as stored: JSON)."""
    e = HistoryEntry._make(row)
    return e._replace(detail=orjson.loads(e.detail)) if e.detail else e


def _account_row(a: Account, now_ms: int) -> dict:
    return {"account_id": a.account_id, "owner_member_id": a.owner_member_id, "tier": a.tier, "status": a.status,
            "card_type": a.card_type, "paid_fen": a.paid_fen, "bonus_fen": a.bonus_fen, "points": a.points,
            "points_owed": a.points_owed, "day": a.day, "day_stored_value_paid_fen": a.day_stored_value_paid_fen,
            "day_points_redeemed": a.day_points_redeemed, "created_at": a.created_at or now_ms,
            "updated_at": now_ms}


def _card_row(c: Card, now_ms: int) -> dict:
    return {"card_no": c.card_no, "account_id": c.account_id, "member_id": c.member_id, "role": c.role,
            "status": c.status, "replaced_by": c.replaced_by, "card_type": c.card_type, "nfc_uid": c.nfc_uid,
            "issued_at": c.issued_at or now_ms, "expires": c.expires, "updated_at": now_ms}


def _member_row(m: Member, now_ms: int) -> dict:
    return {"member_id": m.member_id, "name_masked": m.name_masked, "phone_hash": m.phone_hash,
            "consent": m.consent, "birthday": m.birthday, "birthday_calendar": m.birthday_calendar,
            "source": m.source[:80], "created_at": m.created_at or now_ms, "updated_at": now_ms}


def tier_counts(kind: str, detail: Mapping | None) -> tuple[int, int]:
    """(spend, points earned) an entry counts in the tier windows: a sale's,
    and a return's taken back (negative); nothing for other entries."""
    if not detail or kind not in ("sale", "return"):
        return 0, 0
    earned = detail.get("earned", 0)
    return detail.get("spend", 0), earned if kind == "sale" else -earned


def _entry_row(e: HistoryEntry, now_ms: int) -> dict:
    spend, earned = tier_counts(e.kind, e.detail)
    return {"account_id": e.account_id, "kind": e.kind, "d_paid_fen": e.d_paid_fen, "d_bonus_fen": e.d_bonus_fen,
            "d_points": e.d_points, "package_id": e.package_id, "d_uses": e.d_uses, "card_no": e.card_no,
            "store": e.store, "seq": e.seq, "tx_id": e.tx_id, "ref_tx_id": e.ref_tx_id, "terminal": e.terminal,
            "operator": e.operator, "at": e.at, "recorded_at": now_ms,
            "detail": orjson.dumps(e.detail).decode() if e.detail else None,
            "d_spend_fen": spend, "d_earned": earned}


# ================================================================ member snapshot

# blocked: reconciliation's block of an overdrawn account (hq_bridge/reconcile.py): its active cards say "blocked"
_DENYING_ACCOUNT = {"frozen": "frozen", "blocked": "blocked", "cancelled": "cancelled", "expired": "expired"}
_FETCH = 10_000


@dataclass
class MemberSnapshot:
    """Member snapshot rows (wire/schemas/member.json, one per card) from
    HQ's accounts, and the store's watermark read in the same transaction:
    the snapshot includes that store's records up to ``watermark`` exactly.
    Iterate while the transaction is open."""
    store: str
    watermark: int
    as_of: int               # epoch s
    rows: Iterator[dict]

    def __iter__(self) -> Iterator[dict]:
        return self.rows

    def header(self) -> dict:
        """The part's header line (deploy/examples/members.demo.jsonl)."""
        return {"part": "members", "as_of": self.as_of, "store_seq": self.watermark}


def snapshot_rows(conn: Connection, store: str, *, as_of: int | None = None) -> MemberSnapshot:
    """The member part for ``store``: every card of every account, with
    balances (never below 0: an overdraft shows as nothing to spend), tier,
    status, packages and coupons; a subsidiary or linked card names its
    account's primary card. On PostgreSQL run it in a REPEATABLE READ
    transaction (``conn.execution_options(isolation_level="REPEATABLE
    READ")``) so rows and watermark are one snapshot; SQLite's read
    transactions are."""
    w = db.account_watermarks
    mark = conn.execute(select(w.c.seq).where(w.c.store == store)).scalar() or 0
    return MemberSnapshot(store, mark, int(time.time()) if as_of is None else as_of, _snapshot_iter(conn))


def limited_accounts(conn: Connection, account_ids: Iterable[str] | None = None) -> set[str]:
    """Accounts with an open overdraft under the ``limit`` policy: nothing to
    spend offline (``account_ids``: only among those; None: all of them)."""
    o = overdrafts
    q = select(o.c.account_id).where(o.c.state == "open", o.c.action == "limit").distinct()
    if account_ids is not None:
        q = q.where(db.in_(conn, o.c.account_id, sorted(set(account_ids))))
    return set(conn.execute(q).scalars())


def member_rows_query():
    """What account_rows reads: one row per card with its account and holder
    (the snapshot and the live look-up narrow it with a where clause)."""
    a, c, m = db.accounts, db.cards, db.members
    holder = m.alias("holder")
    return (select(a.c.account_id, a.c.tier, a.c.status.label("a_status"), a.c.card_type.label("a_type"),
                   a.c.paid_fen, a.c.bonus_fen, a.c.points, c.c.card_no, c.c.member_id, c.c.role, c.c.status,
                   c.c.card_type, c.c.nfc_uid, c.c.expires, holder.c.name_masked, holder.c.birthday,
                   holder.c.birthday_calendar, a.c.day, a.c.day_stored_value_paid_fen, a.c.day_points_redeemed)
            .select_from(a.join(c, c.c.account_id == a.c.account_id)
                         .join(holder, holder.c.member_id == c.c.member_id)))


def _snapshot_iter(conn: Connection) -> Iterator[dict]:
    a, c = db.accounts, db.cards
    q = member_rows_query().order_by(a.c.account_id, c.c.card_no)
    pkg = select(db.packages.c.account_id, db.packages.c.package_id, db.packages.c.uses_left,
                 db.packages.c.expires).order_by(db.packages.c.account_id, db.packages.c.package_id)
    cp = select(db.coupons.c.account_id, db.coupons.c.code).where(db.coupons.c.state == "issued") \
        .order_by(db.coupons.c.account_id, db.coupons.c.code)
    if db.is_postgres(conn):   # merged in Python: the database must order ids as Python compares them
        q, pkg, cp = (x.order_by(None).order_by(*(col.collate("C") for col in cols))
                      for x, cols in ((q, (a.c.account_id, c.c.card_no)),
                                      (pkg, (db.packages.c.account_id, db.packages.c.package_id)),
                                      (cp, (db.coupons.c.account_id, db.coupons.c.code))))
    limited = limited_accounts(conn)
    streamed = conn.execution_options(yield_per=_FETCH)
    packages = Grouped(streamed.execute(pkg))
    coupons = Grouped(streamed.execute(cp))
    rows = streamed.execute(q)
    group: list = []
    for r in rows:
        if group and r[0] != group[0][0]:
            yield from account_rows(group, packages, coupons, limited)
            group = []
        group.append(r)
    if group:
        yield from account_rows(group, packages, coupons, limited)


class Grouped:
    """Rows (account_id, key, value...) ordered by account, taken one account at a time."""

    def __init__(self, result) -> None:
        self._it = iter(result)
        self._head = next(self._it, None)

    def take(self, account_id: str) -> list:
        out = []
        while self._head is not None and self._head[0] <= account_id:
            if self._head[0] == account_id:
                out.append(self._head)
            self._head = next(self._it, None)
        return out


def account_rows(group: list, packages: Grouped, coupons: Grouped, limited: set = frozenset()) -> Iterator[dict]:
    aid, tier, a_status, a_type, paid, bonus, points = group[0][:7]
    primaries = [r for r in group if r[9] == "primary"]
    main = next((r for r in primaries if r[10] == "active"), primaries[-1] if primaries else group[0])
    held = packages.take(aid)     # (account_id, package_id, uses_left, expires?)
    pk = {r[1]: max(0, min(r[2], 100_000)) for r in held}
    pk_expires = {r[1]: r[3] for r in held if len(r) > 3 and r[3]}
    codes = [code for _a, code in coupons.take(aid)]
    if aid in limited:   # reconciliation's "limit": nothing to spend until settled; a debt goes as it is,
        # so a top-up at a store counts from it (as under "carry"), never from 0
        paid, bonus, points, pk, codes = min(paid + bonus, 0), 0, min(points, 0), {p: 0 for p in pk}, []
    deny = _DENYING_ACCOUNT.get(a_status)
    if deny is None and aid in limited:
        deny = "limited"            # its active cards say so, as the deny delta did (hq_bridge/reconcile.py)
    balance = paid + bonus          # below zero: what the account owes goes to the stores as it is
    for r in group:
        (_aid, _t, _s, _ct, _p, _b, _pts, card_no, member_id, role, status, card_type, nfc_uid, expires, name,
         birthday, calendar_, day, day_sv, day_points) = r
        row = {"card_no": card_no, "member_id": member_id, "tier": tier,
               "status": deny if (deny and status == "active") else status}
        if name:
            row["name"] = name
        if card_type or a_type:
            row["card_type"] = card_type or a_type
        if expires:
            row["expires"] = expires
        if birthday:
            row["birthday"] = birthday
            row["birthday_calendar"] = calendar_
        if nfc_uid:
            row["nfc_uid"] = nfc_uid
        if role == "primary" or r is main:
            # The account's balances; a primary card's member_id is the account's (the stores' delta key).
            row["member_id"] = aid
            row["points"] = points
            row["balance_fen"] = balance
            if day and (day_sv or day_points):
                # What the account used of the day's offline allowances, at every store:
                # a store counts it with its own records after the snapshot's watermark.
                row["today"] = {"day": day, "stored_value_paid_fen": max(0, day_sv),
                                "points_redeemed": max(0, day_points)}
            if pk:
                row["packages"] = pk
            if pk_expires:
                row["package_expires"] = pk_expires
            if codes:
                row["coupons"] = codes
        else:
            row["primary_card"] = main[7]
            if role == "linked":
                row["group_id"] = aid
        yield row


# ================================================================ import of an external member base

class ImportError_(ValueError):
    """A member row that cannot be imported: names the row and the field."""


@dataclass
class ImportResult:
    members: int = 0
    accounts: int = 0
    cards: int = 0
    skipped: list[str] = field(default_factory=list)     # card numbers already at HQ
    watermarks: dict = field(default_factory=dict)       # stores whose accounts begin now


ANALYZE_AFTER_ROWS = 1000   # an import at least this large refreshes the planner's statistics


def import_members(conn: Connection, rows: Iterable[dict], *, policy: AccountPolicy | None = None,
                   consent: bool = False, source: str = "import", clock=time.time,
                   start_watermarks: bool = True) -> ImportResult:
    """Import an existing member base in the members.jsonl format
    (wire/schemas/member.json) into HQ's accounts, in the caller's
    transaction: a bad row raises ImportError_ naming it, and the caller's
    rollback leaves nothing half-imported.

    An import, not the source of truth: cards HQ has already are skipped
    (never overwritten: that would hand spent money back). Balances come in
    as ``import`` history entries, stored value as the paid part (the format
    has no bonus part), points as one lot of the import date's expiry. A row
    with ``primary_card`` is a subsidiary card (``group_id``: a linked card)
    on that card's account. ``start_watermarks``: the ledger's records so
    far are taken to be in the imported balances (AccountStore.start_watermarks)."""
    from wire.ruleset import RulesetError, check_member

    policy = policy or AccountPolicy()
    now_ms = int(clock() * 1000)
    today = datetime.fromtimestamp(clock(), timezone.utc).date()
    expiry = lot_expiry(today, policy)
    out = ImportResult()
    seen_cards: dict[str, int] = {}
    seen_members: dict[str, int] = {}
    later: list[tuple[int, dict]] = []
    batch: list[tuple[int, dict]] = []

    def flush() -> None:
        if batch:
            _import_primary(conn, batch, out, consent, source, now_ms, expiry)
            batch.clear()

    for n, row in enumerate(rows, 1):
        try:
            row = check_member(dict(row) if isinstance(row, dict) else row)
        except RulesetError as exc:
            raise ImportError_(f"row {n}: {exc}") from None
        card_no = row["card_no"]
        if card_no in seen_cards:
            raise ImportError_(f"row {n}: card_no {card_no} is also in row {seen_cards[card_no]}")
        seen_cards[card_no] = n
        if row.get("primary_card"):
            if row.get("points") or row.get("balance_fen") or row.get("packages") or row.get("coupons"):
                raise ImportError_(f"row {n}: a card with primary_card keeps no balances of its own "
                                   "(points, balance_fen, packages, coupons are its primary's)")
            later.append((n, row))
            continue
        if row["member_id"] in seen_members:
            raise ImportError_(f"row {n}: member_id {row['member_id']} also has a primary card in row "
                               f"{seen_members[row['member_id']]} (a second card names it as primary_card)")
        seen_members[row["member_id"]] = n
        batch.append((n, row))
        if len(batch) >= 5000:
            flush()
    flush()
    for i in range(0, len(later), 5000):
        _import_secondary(conn, later[i:i + 5000], out, consent, source, now_ms)
    if start_watermarks:
        out.watermarks = AccountStore(policy=policy, clock=clock).start_watermarks(conn)
    if out.cards >= ANALYZE_AFTER_ROWS:
        # A bulk load leaves the planner's statistics behind until autovacuum comes by: meanwhile the
        # ingest's look-ups by account (ANY of 500 ids) were planned as scans of the whole table.
        db.analyze(conn, [db.members, db.accounts, db.cards, db.points_lots, db.packages, db.coupons,
                          db.account_history])
    return out


def _import_primary(conn: Connection, batch: list, out: ImportResult, consent: bool, source: str, now_ms: int,
                    expiry: str) -> None:
    cards_have = set(conn.execute(select(db.cards.c.card_no).where(
        db.in_(conn, db.cards.c.card_no, [r["card_no"] for _n, r in batch]))).scalars())
    mids = [r["member_id"] for _n, r in batch if r["card_no"] not in cards_have]
    members_have = set(conn.execute(select(db.members.c.member_id).where(
        db.in_(conn, db.members.c.member_id, mids))).scalars()) if mids else set()
    m_rows, a_rows, c_rows, l_rows, p_rows, cp_rows, h_rows = [], [], [], [], [], [], []
    for n, r in batch:
        if r["card_no"] in cards_have:
            out.skipped.append(r["card_no"])
            continue
        mid = r["member_id"]
        if mid in members_have:
            raise ImportError_(f"row {n}: member_id {mid} is at HQ already with another card")
        m_rows.append({"member_id": mid, "name_masked": r.get("name"), "phone_hash": None, "consent": consent,
                       "birthday": r.get("birthday"), "birthday_calendar": r.get("birthday_calendar", "solar"),
                       "source": source, "created_at": now_ms, "updated_at": now_ms})
        bal, pts = r.get("balance_fen", 0), r.get("points", 0)
        a_rows.append({"account_id": mid, "owner_member_id": mid, "tier": r["tier"], "status": "active",
                       "card_type": r.get("card_type"), "paid_fen": bal, "bonus_fen": 0, "points": pts,
                       "points_owed": 0, "day": None, "day_stored_value_paid_fen": 0, "day_points_redeemed": 0,
                       "created_at": now_ms, "updated_at": now_ms})
        c_rows.append({"card_no": r["card_no"], "account_id": mid, "member_id": mid, "role": "primary",
                       "status": r.get("status", "active"), "replaced_by": None, "card_type": r.get("card_type"),
                       "nfc_uid": r.get("nfc_uid"), "issued_at": now_ms, "expires": r.get("expires"),
                       "updated_at": now_ms})
        detail: dict = {}
        if pts:
            l_rows.append({"account_id": mid, "expires": expiry, "earned_at": now_ms, "points": pts,
                           "remaining": pts})
            detail["lots"] = {expiry: pts}
        if r.get("coupons"):
            cp_rows += [{"account_id": mid, "code": code, "state": "issued", "used_tx": None, "updated_at": now_ms}
                        for code in r["coupons"]]
            detail["coupons"] = r["coupons"]
        base = {"account_id": mid, "d_paid_fen": 0, "d_bonus_fen": 0, "d_points": 0, "package_id": None,
                "d_uses": 0, "card_no": r["card_no"], "store": None, "seq": None, "tx_id": None, "ref_tx_id": None,
                "terminal": None, "operator": None, "at": None, "recorded_at": now_ms, "detail": None}
        h_rows.append({**base, "kind": "import", "d_paid_fen": bal, "d_points": pts,
                       "detail": orjson.dumps({"source": source, **detail}).decode()})
        for pid, uses in (r.get("packages") or {}).items():   # without package_expires: no expiry
            p_rows.append({"account_id": mid, "package_id": pid, "uses_left": uses, "updated_at": now_ms,
                           "expires": (r.get("package_expires") or {}).get(pid)})
            h_rows.append({**base, "kind": "import", "package_id": pid, "d_uses": uses})
        out.members += 1
        out.accounts += 1
        out.cards += 1
    for table, rows in ((db.members, m_rows), (db.accounts, a_rows), (db.cards, c_rows), (db.points_lots, l_rows),
                        (db.packages, p_rows), (db.coupons, cp_rows), (db.account_history, h_rows)):
        db.insert_rows(conn, table, rows)


def _import_secondary(conn: Connection, batch: list, out: ImportResult, consent: bool, source: str,
                      now_ms: int) -> None:
    nos = [r["card_no"] for _n, r in batch] + [r["primary_card"] for _n, r in batch]
    have = {no: aid for no, aid in conn.execute(select(db.cards.c.card_no, db.cards.c.account_id)
                                                .where(db.in_(conn, db.cards.c.card_no, nos)))}
    mids = {r["member_id"] for _n, r in batch}
    members_have = set(conn.execute(select(db.members.c.member_id).where(
        db.in_(conn, db.members.c.member_id, mids))).scalars())
    m_rows, c_rows, h_rows = {}, [], []
    for n, r in batch:
        if r["card_no"] in have:
            out.skipped.append(r["card_no"])
            continue
        aid = have.get(r["primary_card"])
        if aid is None:
            raise ImportError_(f"row {n}: primary_card {r['primary_card']} is neither at HQ nor a primary card "
                               "in this import")
        mid = r["member_id"]
        if mid not in members_have and mid not in m_rows:
            m_rows[mid] = {"member_id": mid, "name_masked": r.get("name"), "phone_hash": None, "consent": consent,
                           "birthday": r.get("birthday"), "birthday_calendar": r.get("birthday_calendar", "solar"),
                           "source": source, "created_at": now_ms, "updated_at": now_ms}
            out.members += 1
        c_rows.append({"card_no": r["card_no"], "account_id": aid, "member_id": mid,
                       "role": "linked" if r.get("group_id") else "subsidiary", "status": r.get("status", "active"),
                       "replaced_by": None, "card_type": r.get("card_type"), "nfc_uid": r.get("nfc_uid"),
                       "issued_at": now_ms, "expires": r.get("expires"), "updated_at": now_ms})
        h_rows.append({"account_id": aid, "kind": "import", "d_paid_fen": 0, "d_bonus_fen": 0, "d_points": 0,
                       "package_id": None, "d_uses": 0, "card_no": r["card_no"], "store": None, "seq": None,
                       "tx_id": None, "ref_tx_id": None, "terminal": None, "operator": None, "at": None,
                       "recorded_at": now_ms, "detail": orjson.dumps({"source": source, "card": "added"}).decode()})
        out.cards += 1
    db.insert_rows(conn, db.members, list(m_rows.values()))
    db.insert_rows(conn, db.cards, c_rows)
    db.insert_rows(conn, db.account_history, h_rows)


# ================================================================ audit

def audit(conn: Connection, account_ids: Iterable[str] | None = None) -> list[str]:
    """Invariant 1 checked in the database: every balance equals the sum of
    its history entries, points equal the lots less points owed, and every
    entry belongs to an account (no foreign key checks that on ingest). The
    discrepancies found (none: an empty list)."""
    a, h, l, p = db.accounts, db.account_history, db.points_lots, db.packages
    sums = select(h.c.account_id, func.sum(h.c.d_paid_fen).label("paid"), func.sum(h.c.d_bonus_fen).label("bonus"),
                  func.sum(h.c.d_points).label("points")).group_by(h.c.account_id).subquery()
    lots = select(l.c.account_id, func.sum(l.c.remaining).label("remaining")).group_by(l.c.account_id).subquery()
    q = (select(a.c.account_id, a.c.paid_fen, a.c.bonus_fen, a.c.points, a.c.points_owed,
                func.coalesce(sums.c.paid, 0), func.coalesce(sums.c.bonus, 0), func.coalesce(sums.c.points, 0),
                func.coalesce(lots.c.remaining, 0))
         .select_from(a.outerjoin(sums, sums.c.account_id == a.c.account_id)
                      .outerjoin(lots, lots.c.account_id == a.c.account_id)))
    uses = select(h.c.account_id, h.c.package_id, func.sum(h.c.d_uses).label("uses")) \
        .where(h.c.package_id.is_not(None)).group_by(h.c.account_id, h.c.package_id).subquery()
    pq = select(p.c.account_id, p.c.package_id, p.c.uses_left, func.coalesce(uses.c.uses, 0)).select_from(
        p.outerjoin(uses, and_(uses.c.account_id == p.c.account_id, uses.c.package_id == p.c.package_id)))
    if account_ids is not None:
        ids = list(account_ids)
        q = q.where(a.c.account_id.in_(ids))
        pq = pq.where(p.c.account_id.in_(ids))
    out = []
    for aid, paid, bonus, points, owed, s_paid, s_bonus, s_points, remaining in conn.execute(q):
        if (paid, bonus, points) != (s_paid, s_bonus, s_points):
            out.append(f"account {aid}: paid/bonus/points {paid}/{bonus}/{points}, "
                       f"history says {s_paid}/{s_bonus}/{s_points}")
        if points != remaining - owed:
            out.append(f"account {aid}: points {points}, lots {remaining} less owed {owed}")
    for aid, pid, left, s_uses in conn.execute(pq):
        if left != s_uses:
            out.append(f"account {aid}: package {pid} has {left} uses left, history says {s_uses}")
    orphans = select(h.c.account_id, func.count()).where(
        ~select(a.c.account_id).where(a.c.account_id == h.c.account_id).exists()).group_by(h.c.account_id)
    if account_ids is not None:
        orphans = orphans.where(h.c.account_id.in_(ids))
    for aid, n in conn.execute(orphans):
        out.append(f"account {aid}: {n} history entries, and no such account")
    return out
