"""The records a store journals, one definition: dataclasses, their JSON Schema, validation.

    python -m wire.records        # writes wire/schemas/records.json

Every counter operation the gateway journals is one record body, sent to HQ
as the ``body`` of a TxRecord (wire/messages.py) whose ``type`` is the body's
``type``. The body shapes are defined here once, as dataclasses; the JSON
Schema is derived from them (``schema_of``), so the two cannot drift:

==============  ===============================================================
``sale``        gateway/core/pricing.py ``quote()["record"]`` + what the counter adds
``return``      ``return_quote()["record"]`` + ``sale_seq``, ``sale_id``
``topup``       ``topup()["record"]`` + ``payment`` {method, reference?}
``package_use`` ``consume_package()["record"]``
``card_op``     ``card_operation()["record"]`` + ``reason``
``registration`` a member registered at the counter, offline, with a new card
                (minimal PII: masked name, consent flag, birthday; never a
                phone number), ``Counter.register`` (``POST /members``)
``withdrawal``  取款: the paid part of stored value paid out
                (``Counter.withdraw``, ``POST /withdrawals``)
``package_sale`` a count package (计次卡) sold or renewed:
                gateway/core/packages.py ``sell_package()["record"]`` + ``payment``
                (``Counter.sell_package``, ``POST /lanes/{lane}/packages``)
``gift_redemption`` points for a gift (礼品兑换):
                gateway/core/gifts.py ``redeem_gift()["record"]``
                (``Counter.redeem_gift``, ``POST /lanes/{lane}/gifts``)
==============  ===============================================================

What gateway/shell/counter.py adds to every body: ``account_id`` (whose balances,
None when the member is not in the snapshot; on ``card_op`` None except
for ``issue_subsidiary``, the primary's account; on ``registration`` the new
member_id),
``day`` (store-local YYYY-MM-DD), ``terminal``, ``idempotency_key``; ``lane``
on sale, topup, package_use, package_sale and gift_redemption; ``operator`` (the cashier's id, ASCII up to 32
characters) whenever the POS sent one (every POST body takes it).

Bounds: every string has a maxLength, every integer a range (money in integer
fen, points integers), every array a maxItems, and no object takes properties
it does not define. Money and points ranges are those of wire/ruleset.py.

``validate_body(type_, body)`` checks a body against its type's schema
(compiled once: with jsonschema-rs where it is installed, at HQ; with
fastjsonschema otherwise, as on the store box) and returns it;
``RecordError`` names the field. ``RECORD_BODY_SCHEMA`` is the published form: a ``oneOf`` discriminated
by ``type`` (the validator dispatches on ``type`` directly, so its message
names the field rather than "not valid under any of the given schemas").
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import fastjsonschema

try:  # HQ validates every record it ingests: the compiled Rust validator where installed (the hq extra)
    import jsonschema_rs
except ImportError:  # the store box: fastjsonschema, the same schema
    jsonschema_rs = None

SCHEMA_BASE = "https://storegate.example/schemas/wire/"
RECORD_VERSION = 1

MAX_FEN = 10_000_000_000          # wire/ruleset.py MAX_FEN
MAX_POINTS = 10_000_000_000       # wire/ruleset.py MAX_POINTS
MAX_LINES = 500                   # gateway/core/pricing.py MAX_LINES
MAX_QTY = 9999                    # gateway/core/pricing.py MAX_QTY
MAX_MEASURED = 9_999_000          # wire/ruleset.py units max: a measured line's qty in steps (9999.000 kg)
MAX_UNIT_PRICE = 100_000_000      # gateway/core/pricing.py MAX_UNIT_PRICE
MAX_TOPUP_FEN = 10_000_000        # gateway/core/pricing.py MAX_TOPUP_FEN
MAX_PACKAGE_USES = 100_000        # wire/ruleset.py member packages
MAX_GIFT_QTY = 99                 # gateway/core/gifts.py MAX_QTY: gifts of one kind at once
SEQ_MAX = 2 ** 53 - 1             # wire/messages.py SEQ_MAX

CARD_OPS = ("issue", "report_lost", "freeze", "unfreeze", "replace", "annual_fee", "extend",
            "issue_subsidiary")                                                  # gateway/core/pricing.py CARD_OPS
CARD_STATUSES = ("active", "not_activated", "lost", "frozen", "blocked", "limited", "cancelled", "replaced",
                 "expired")
PAYMENT_METHODS = ("cash", "bank_card", "wechat", "alipay", "unionpay", "other")     # gateway/shell/counter.py, api_schema.py

_KEY = r"^[A-Za-z0-9_.-]{1,64}$"               # ids of packages, coupons, promotions (wire/ruleset.py _KEY)
_CARD = r"^[0-9]{6,19}$"
_DAY = r"^\d{4}-\d{2}-\d{2}$"
_MMDD = r"^(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])$"
_AT = r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}(:\d{2}(\.\d{1,6})?)?(Z|[+-]\d{2}:\d{2})?$"   # datetime.isoformat()


class RecordError(ValueError):
    """A record body that does not follow its schema: ``type_``, ``field``
    (e.g. ``lines[0].qty``, ``(top level)``) and what is wrong."""

    def __init__(self, type_: str, field_: str, problem: str) -> None:
        self.type_, self.field, self.problem = type_, field_, problem
        super().__init__(f"{type_} record: {field_}: {problem}")


# ---------------------------------------------------------------- field helpers

def f(**schema: Any) -> Any:
    """A required field; ``schema``: its JSON Schema constraints."""
    return field(metadata={"schema": schema})


def opt(**schema: Any) -> Any:
    """An optional field (absent from the body when None)."""
    return field(default=None, metadata={"schema": schema, "optional": True})


def const(value: Any) -> Any:
    return field(default=value, metadata={"schema": {}, "const": value})


def money(lo: int = 0, hi: int = MAX_FEN) -> Any:
    return f(minimum=lo, maximum=hi)


def pts(lo: int = 0) -> Any:
    return f(minimum=lo, maximum=MAX_POINTS)


def text(hi: int, lo: int = 0, **kw) -> Any:
    return f(minLength=lo, maxLength=hi, **kw)


def key() -> Any:
    return f(pattern=_KEY)


def card() -> Any:
    return f(pattern=_CARD)


# ---------------------------------------------------------------- shared parts

_OPERATOR = r"^[A-Za-z0-9_.-]{1,32}$"    # the cashier's id, as gateway/shell/api_schema.py OPERATOR takes it


@dataclass(frozen=True, kw_only=True)
class CounterRecord:
    """What every journaled body carries: its ``type`` (each record sets it),
    the format version ``v``, when it happened (``at``), and the fields
    gateway/shell/counter.py adds (see the module docstring)."""
    type: str = f()
    v: Literal[1] = const(RECORD_VERSION)
    at: str = f(pattern=_AT, maxLength=40)
    idempotency_key: str = text(200, 1)      # "<terminal id>/<the POS's key of 8-128 characters>"
    account_id: str | None = f(minLength=1, maxLength=64)   # the primary's member_id (gateway/core/validate.py),
    #                                                         None when not in the snapshot
    day: str = f(pattern=_DAY)               # store-local
    terminal: str = text(64, 1)
    operator: str | None = opt(pattern=_OPERATOR, maxLength=32)


@dataclass(frozen=True, kw_only=True)
class LaneRecord(CounterRecord):
    """A counter record made at a lane (sale, topup, package_use, package_sale, gift_redemption)."""
    lane: str = text(32, 1)


@dataclass(frozen=True, kw_only=True)
class MemberRef:
    """Who a sale was for, as the counter saw it (member_id and tier are None
    for a card accepted without a snapshot entry)."""
    member_id: str | None = f(minLength=1, maxLength=64)
    card_no: str | None = card()
    tier: str | None = text(64, 1)


@dataclass(frozen=True, kw_only=True)
class Discount:
    source: str = text(200, 1)      # "tier:gold", a promotion id, "coupon:<code>"
    fen: int = money()
    allocated: bool = f()


@dataclass(frozen=True, kw_only=True)
class ReturnedDiscount:
    source: str = text(200, 1)
    fen: int = money()


@dataclass(frozen=True, kw_only=True)
class Tender:
    """How a line or a whole sale (or return) was paid, and the points it earned."""
    points_redeemed: int = pts()
    redeemed_fen: int = money()
    stored_value_fen: int = money()
    cash_fen: int = money()
    points_earned: int = pts()


# ---------------------------------------------------------------- sale

@dataclass(frozen=True, kw_only=True)
class SaleLine(Tender):
    sku: str = text(64, 1)
    name: str = text(1000)          # the POS's text: check_lines bounds neither name nor category
    category: str = text(256)
    qty: int = f(minimum=1, maximum=MAX_MEASURED)   # units; with unit, steps of 1/scale unit (532 = 0.532 kg)
    unit: str | None = opt(pattern=_KEY)            # a measured line's unit (rule-set units), else absent
    scale: int | None = opt(minimum=1, maximum=1000)   # with unit: steps per unit (10^decimals: 1..1000)
    unit_price: int = money(0, MAX_UNIT_PRICE)      # per (whole) unit
    amount: int = money()
    discounts: list[Discount] = f(maxItems=256)
    net: int = money()


@dataclass(frozen=True, kw_only=True)
class SaleTotals(Tender):
    subtotal: int = money()
    discount: int = money()
    total: int = money()


@dataclass(frozen=True, kw_only=True)
class SaleDeltas:
    points: int = pts(-MAX_POINTS)                  # earned - redeemed
    points_earned: int = pts()
    points_redeemed: int = pts()
    stored_value_fen: int = money(-MAX_FEN, 0)           # minus what was paid from stored value
    promotion_uses: dict[str, int] = f(maxProperties=1000, keys={"pattern": _KEY},
                                       values={"minimum": 0, "maximum": MAX_QTY})
    coupons_used: list[str] = f(maxItems=64, uniqueItems=True, items={"pattern": _KEY})


@dataclass(frozen=True, kw_only=True)
class Sale(LaneRecord):
    """A sale (gateway/core/pricing.py quote()["record"], journaled by Counter.sale)."""
    type: Literal["sale"] = const("sale")
    store: str | None = f(pattern=_KEY)
    region: str | None = f(pattern=_KEY)
    rules_version: int | None = f(minimum=0, maximum=SEQ_MAX)
    member: MemberRef | None = f()
    redemption_points_per_yuan: int = f(minimum=0, maximum=1_000_000)
    lines: list[SaleLine] = f(minItems=1, maxItems=MAX_LINES)
    totals: SaleTotals = f()
    coupons: list[str] = f(maxItems=64, uniqueItems=True, items={"pattern": _KEY})
    promotions: list[str] = f(maxItems=1000, items={"minLength": 1, "maxLength": 200})
    deltas: SaleDeltas = f()


# ---------------------------------------------------------------- return

@dataclass(frozen=True, kw_only=True)
class ReturnLine(Tender):
    index: int = f(minimum=0, maximum=MAX_LINES - 1)
    sku: str = text(64, 1)
    name: str = text(1000)
    qty: int = f(minimum=1, maximum=MAX_MEASURED)   # as the sale line's qty
    unit: str | None = opt(pattern=_KEY)
    scale: int | None = opt(minimum=1, maximum=1000)
    discounts: list[ReturnedDiscount] = f(maxItems=256)
    discount: int = money()
    refund_fen: int = money()
    amount: int = money()


@dataclass(frozen=True, kw_only=True)
class ReturnTotals(Tender):
    refund_fen: int = money()
    discount: int = money()


@dataclass(frozen=True, kw_only=True)
class ReturnDeltas:
    points: int = pts(-MAX_POINTS)                  # redeemed given back - earned taken back
    points_earned: int = pts(-MAX_POINTS)           # <= 0
    points_redeemed: int = pts(-MAX_POINTS)         # <= 0
    stored_value_fen: int = money()                      # given back to stored value


@dataclass(frozen=True, kw_only=True)
class Return(CounterRecord):
    """A full or partial return of one sale, in the sale's tender mix
    (gateway/core/pricing.py return_quote()["record"], journaled by Counter.sale_return)."""
    type: Literal["return"] = const("return")
    sale_at: str | None = f(pattern=_AT, maxLength=40)
    sale_id: str | None = text(64, 8)                  # the sale's tx id
    sale_seq: int = f(minimum=1, maximum=SEQ_MAX)      # the sale's journal seq (same store)
    member: MemberRef | None = f()
    lines: list[ReturnLine] = f(minItems=1, maxItems=MAX_LINES)
    totals: ReturnTotals = f()
    deltas: ReturnDeltas = f()


# ---------------------------------------------------------------- top-up

@dataclass(frozen=True, kw_only=True)
class Payment:
    method: Literal[PAYMENT_METHODS] = f()
    reference: str | None = opt(minLength=1, maxLength=64, pattern=r"^[\x20-\x7e]+$")


@dataclass(frozen=True, kw_only=True)
class StoredValueDelta:
    stored_value_fen: int = money()


@dataclass(frozen=True, kw_only=True)
class Topup(LaneRecord):
    """Stored value bought: ``pay_fen`` paid (the paid part), ``bonus_fen``
    given by a top-up package (the bonus part)."""
    type: Literal["topup"] = const("topup")
    member_id: str | None = f(minLength=1, maxLength=64)
    card_no: str | None = card()
    package_id: str | None = f(pattern=_KEY)
    pay_fen: int = money(1, MAX_TOPUP_FEN)
    bonus_fen: int = money()
    credit_fen: int = money()
    balance_before_fen: int = money(-MAX_FEN)            # the store's view, for the receipt
    balance_after_fen: int = money(-MAX_FEN)
    deltas: StoredValueDelta = f()
    payment: Payment = f()


# ---------------------------------------------------------------- package use

@dataclass(frozen=True, kw_only=True)
class PackageDeltas:
    packages: dict[str, int] = f(minProperties=1, maxProperties=1, keys={"pattern": _KEY},
                                 values={"minimum": -MAX_QTY, "maximum": -1})


@dataclass(frozen=True, kw_only=True)
class PackageUse(LaneRecord):
    """Uses of a count package (计次卡)."""
    type: Literal["package_use"] = const("package_use")
    member_id: str | None = f(minLength=1, maxLength=64)
    card_no: str | None = card()
    package_id: str = key()
    uses: int = f(minimum=1, maximum=MAX_QTY)
    remaining_before: int = f(minimum=0, maximum=MAX_PACKAGE_USES)
    remaining_after: int = f(minimum=0, maximum=MAX_PACKAGE_USES)
    deltas: PackageDeltas = f()


# ---------------------------------------------------------------- card services

@dataclass(frozen=True, kw_only=True)
class NoDeltas:
    pass


@dataclass(frozen=True, kw_only=True)
class CardOp(CounterRecord):
    """A counter card service (issue, report_lost, freeze, unfreeze, replace,
    annual_fee, extend, issue_subsidiary); ``status_after`` is the card's (for
    replace: the old card's). ``unfreeze`` lifts a freeze or a loss report
    (``status_before`` says which, as this store saw it). ``extend`` (延期)
    moves the card's expiry to ``expires`` (``months`` past the later of today
    and the old expiry). ``issue_subsidiary`` (附属卡): ``card_no`` is the NEW
    card, ``primary_card_no`` the primary it pays from and earns to,
    ``member_id``/``account_id`` the primary's account."""
    type: Literal["card_op"] = const("card_op")
    op: Literal["issue", "report_lost", "freeze", "unfreeze", "replace", "annual_fee", "extend",
                "issue_subsidiary"] = f()
    member_id: str | None = f(minLength=1, maxLength=64)
    card_no: str = card()
    new_card_no: str | None = card()
    fee_fen: int = money()
    status_after: Literal["active", "not_activated", "lost", "frozen", "cancelled", "replaced", "expired"] = f()
    deltas: NoDeltas = f()
    reason: str | None = text(500)
    status_before: Literal["active", "not_activated", "lost", "frozen", "blocked", "limited", "cancelled",
                           "replaced", "expired"] | None = opt()
    primary_card_no: str | None = opt(pattern=_CARD)
    months: int | None = opt(minimum=1, maximum=120)
    expires: str | None = opt(pattern=_DAY)


# ---------------------------------------------------------------- registration

@dataclass(frozen=True, kw_only=True)
class Registration(CounterRecord):
    """A new member registered at the counter (offline too) with a new card,
    usable at once at the base tier. Minimal PII: a masked name, a birthday
    (MM-DD) and the member's consent to the programme's terms; no phone
    number reaches the store box. ``member_id`` is made by the store (unique
    chain-wide, e.g. prefixed by the store id); HQ opens the account under it."""
    type: Literal["registration"] = const("registration")
    member_id: str = text(64, 1)
    card_no: str = card()
    consent: bool = f()
    name: str | None = opt(maxLength=64)               # masked, e.g. 张*
    birthday: str | None = opt(pattern=_MMDD)
    birthday_calendar: Literal["solar", "lunar"] | None = opt()
    card_type: str | None = opt(pattern=_KEY)
    nfc_uid: str | None = opt(pattern=r"^([0-9A-F]{8}|[0-9A-F]{14}|[0-9A-F]{20})$")
    fee_fen: int | None = opt(minimum=0, maximum=MAX_FEN)
    lane: str | None = opt(minLength=1, maxLength=32)
    account_id: str | None = opt(minLength=1, maxLength=64)     # the new member_id


# ---------------------------------------------------------------- withdrawal

@dataclass(frozen=True, kw_only=True)
class StoredValueDebit:
    stored_value_fen: int = money(-MAX_TOPUP_FEN, -1)


@dataclass(frozen=True, kw_only=True)
class Withdrawal(CounterRecord):
    """取款: the paid part (本金) of stored value paid out to the member at the
    service desk, as the chain's policy allows (``accounts.withdrawal`` =
    ``paid_part``). ``paid_fen`` is what leaves the paid part (all of
    ``amount_fen``: the bonus part is never paid out); ``paid_known_fen`` the
    paid part this store could vouch for (snapshot ``paid_fen`` + its own
    top-ups since - its withdrawals since), for HQ's reconciliation."""
    type: Literal["withdrawal"] = const("withdrawal")
    member_id: str | None = f(minLength=1, maxLength=64)
    card_no: str = card()
    amount_fen: int = money(1, MAX_TOPUP_FEN)
    paid_fen: int = money(1, MAX_TOPUP_FEN)
    paid_known_fen: int = money()
    balance_before_fen: int = money(-MAX_FEN)
    balance_after_fen: int = money(-MAX_FEN)
    deltas: StoredValueDebit = f()
    payout: Payment = f()
    reason: str | None = opt(maxLength=500)


# ---------------------------------------------------------------- package sale

@dataclass(frozen=True, kw_only=True)
class PackagePayment(Payment):
    """How a package was paid: as a top-up is, or from stored value when the
    package's rule allows it (``stored_value_fen`` is then its price)."""
    method: Literal[(*PAYMENT_METHODS, "stored_value")] = f()


@dataclass(frozen=True, kw_only=True)
class PackageSaleDeltas:
    packages: dict[str, int] = f(minProperties=1, maxProperties=1, keys={"pattern": _KEY},
                                 values={"minimum": 1, "maximum": MAX_PACKAGE_USES})
    stored_value_fen: int = money(-MAX_FEN, 0)           # minus what was paid from stored value


@dataclass(frozen=True, kw_only=True)
class PackageSale(LaneRecord):
    """A count package (计次卡) sold to a member, or renewed (``renewal``: the
    member held uses of it): ``uses`` added for ``price_fen``, valid until
    ``expires`` (None: the package does not expire). No points are earned."""
    type: Literal["package_sale"] = const("package_sale")
    member_id: str | None = f(minLength=1, maxLength=64)
    card_no: str | None = card()
    package_id: str = key()
    uses: int = f(minimum=1, maximum=MAX_QTY)
    price_fen: int = money()
    stored_value_fen: int = money()                      # of price_fen: 0, or all of it
    renewal: bool = f()
    remaining_before: int = f(minimum=0, maximum=MAX_PACKAGE_USES)   # the store's view, for the receipt
    remaining_after: int = f(minimum=1, maximum=MAX_PACKAGE_USES)
    expires: str | None = f(pattern=_DAY)
    deltas: PackageSaleDeltas = f()
    payment: PackagePayment = f()


# ---------------------------------------------------------------- gift redemption

@dataclass(frozen=True, kw_only=True)
class GiftDeltas:
    points: int = f(minimum=-MAX_POINTS, maximum=-1)
    points_redeemed: int = f(minimum=1, maximum=MAX_POINTS)
    gifts: dict[str, int] = f(minProperties=1, maxProperties=1, keys={"pattern": _KEY},
                              values={"minimum": 1, "maximum": MAX_GIFT_QTY})


@dataclass(frozen=True, kw_only=True)
class GiftRedemption(LaneRecord):
    """Points redeemed for a gift of the rule set's catalogue (礼品兑换):
    ``qty`` gifts of ``points_each``, ``points`` in all, within the offline
    limits of points redemption."""
    type: Literal["gift_redemption"] = const("gift_redemption")
    member_id: str | None = f(minLength=1, maxLength=64)
    card_no: str | None = card()
    gift_id: str = key()
    qty: int = f(minimum=1, maximum=MAX_GIFT_QTY)
    points_each: int = f(minimum=1, maximum=MAX_POINTS)
    points: int = f(minimum=1, maximum=MAX_POINTS)
    points_before: int = pts(-MAX_POINTS)                # the store's view, for the receipt
    points_after: int = pts(-MAX_POINTS)
    deltas: GiftDeltas = f()


RECORD_TYPES: dict[str, type] = {
    "sale": Sale,
    "return": Return,
    "topup": Topup,
    "package_use": PackageUse,
    "card_op": CardOp,
    "registration": Registration,
    "withdrawal": Withdrawal,
    "package_sale": PackageSale,
    "gift_redemption": GiftRedemption,
}


# ---------------------------------------------------------------- dataclass -> JSON Schema

_PRIMITIVE = {str: "string", int: "integer", bool: "boolean"}


def _type_schema(tp: Any, meta: dict) -> dict:
    """The schema of a type annotation with the field's constraints."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        inner = _type_schema(args[0], meta)
        if "enum" in inner:
            return {**inner, "enum": [*inner["enum"], None]}
        if isinstance(inner.get("type"), str):  # constraints of the other types ignore a null
            return {**inner, "type": [inner["type"], "null"]}
        return {"anyOf": [{"type": "null"}, inner]}
    if origin is Literal:
        values = list(typing.get_args(tp))
        return {"const": values[0]} if len(values) == 1 else {"enum": values}
    if origin is list:
        (item,) = typing.get_args(tp)
        out = {"type": "array", "items": {**_type_schema(item, {}), **meta.get("items", {})}}
        out.update({k: v for k, v in meta.items() if k in ("minItems", "maxItems", "uniqueItems")})
        return out
    if origin is dict:
        _k, v = typing.get_args(tp)
        out = {"type": "object", "propertyNames": {"type": "string", **meta.get("keys", {})},
               "additionalProperties": {**_type_schema(v, {}), **meta.get("values", {})}}
        out.update({k: v for k, v in meta.items() if k in ("minProperties", "maxProperties")})
        return out
    if dataclasses.is_dataclass(tp):
        return schema_of(tp)
    if tp in _PRIMITIVE:
        return {"type": _PRIMITIVE[tp], **{k: v for k, v in meta.items()
                                           if k not in ("items", "keys", "values")}}
    raise TypeError(f"no schema for {tp!r}")


@lru_cache(maxsize=None)
def schema_of(cls: type) -> dict:
    """The JSON Schema of a record dataclass: every field with its bounds,
    required unless declared ``opt()``, nothing else allowed."""
    hints = typing.get_type_hints(cls)
    props, required = {}, []
    for fl in dataclasses.fields(cls):
        meta = fl.metadata.get("schema", {})
        if "const" in fl.metadata:
            props[fl.name] = {"const": fl.metadata["const"]}
        else:
            props[fl.name] = _type_schema(hints[fl.name], meta)
        if not fl.metadata.get("optional"):
            required.append(fl.name)
    out = {"type": "object", "additionalProperties": False, "properties": props}
    if required:
        out["required"] = required
    if cls.__doc__ and cls in RECORD_TYPES.values():
        out["title"] = " ".join(cls.__doc__.split())
    return out


BODY_SCHEMAS: dict[str, dict] = {t: schema_of(cls) for t, cls in RECORD_TYPES.items()}

RECORD_BODY_SCHEMA = {
    "$id": SCHEMA_BASE + "records.json",
    "title": "storegate journal record body (the body of a tx record; its type is the record's type)",
    "oneOf": [{"$ref": f"#/definitions/{t}"} for t in RECORD_TYPES],
    "definitions": BODY_SCHEMAS,
}


class _Invalid(Exception):
    def __init__(self, where: str, problem: str) -> None:
        self.where, self.problem = where, problem


def _path(parts) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "(top level)"


@lru_cache(maxsize=None)
def _fast_validator(type_: str):
    check = fastjsonschema.compile(BODY_SCHEMAS[type_])

    def validate(body):
        try:
            check(body)
        except fastjsonschema.JsonSchemaValueException as exc:
            where = exc.name.replace("data", "", 1).lstrip(".") or "(top level)"
            problem = exc.message.replace(exc.name + " ", "", 1) if exc.message.startswith(exc.name) else exc.message
            raise _Invalid(where, problem) from None
    return validate


@lru_cache(maxsize=None)
def _rs_validator(type_: str):
    check = jsonschema_rs.validator_for(BODY_SCHEMAS[type_])

    def validate(body):
        try:
            check.validate(body)
        except jsonschema_rs.ValidationError as exc:
            raise _Invalid(_path(exc.instance_path), exc.message) from None
    return validate


def _validator(type_: str):
    """The compiled check of a type's body (compiled once)."""
    return _rs_validator(type_) if jsonschema_rs is not None else _fast_validator(type_)


def validate_body(type_: str, body: Any) -> dict:
    """``body`` if it is a valid record of ``type_``; RecordError naming the field otherwise."""
    if type_ not in BODY_SCHEMAS:
        raise RecordError(str(type_)[:64], "type", f"not a record type (one of {', '.join(RECORD_TYPES)})")
    if not isinstance(body, dict):
        raise RecordError(type_, "(top level)", "must be an object")
    if body.get("type") != type_:
        raise RecordError(type_, "type", f"the body says {str(body.get('type'))[:64]!r}")
    try:
        _validator(type_)(body)
    except _Invalid as exc:
        raise RecordError(type_, exc.where, exc.problem) from None
    return body


# ---------------------------------------------------------------- dataclass <-> body

def _build(tp: Any, value: Any) -> Any:
    origin = typing.get_origin(tp)
    if value is None:
        return None
    if origin in (typing.Union, types.UnionType):
        return _build(next(a for a in typing.get_args(tp) if a is not type(None)), value)
    if origin is list:
        (item,) = typing.get_args(tp)
        return [_build(item, v) for v in value]
    if dataclasses.is_dataclass(tp):
        hints = _hints(tp)
        return tp(**{k: _build(hints[k], v) for k, v in value.items()})
    return value


@lru_cache(maxsize=None)
def _hints(cls: type) -> dict:
    return typing.get_type_hints(cls)


def from_body(type_: str, body: dict) -> Any:
    """The record as its dataclass (after ``validate_body``)."""
    return _build(RECORD_TYPES[type_], validate_body(type_, body))


def to_body(record: Any) -> dict:
    """The body a record dataclass journals as (optional fields left out when None)."""
    def conv(obj):
        if dataclasses.is_dataclass(obj):
            out = {}
            for fl in dataclasses.fields(obj):
                v = getattr(obj, fl.name)
                if v is None and fl.metadata.get("optional"):
                    continue
                out[fl.name] = conv(v)
            return out
        if isinstance(obj, list):
            return [conv(v) for v in obj]
        if isinstance(obj, dict):
            return {k: conv(v) for k, v in obj.items()}
        return obj
    return conv(record)


# ---------------------------------------------------------------- schema file

OUT = Path(__file__).parent / "schemas" / "records.json"


def render() -> str:
    return json.dumps({"$schema": "http://json-schema.org/draft-07/schema#", **RECORD_BODY_SCHEMA},
                      indent=2, ensure_ascii=False) + "\n"


def main() -> None:
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text(render())
    print(OUT)


if __name__ == "__main__":
    main()
