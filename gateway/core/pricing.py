"""The pricing core: quotes, tenders, returns, top-ups, packages, card services.

Pure functions over plain data (DESIGN.md principle 1): no I/O, no clock
reads, deterministic. Money is integer fen, points are integers, no floats.
Sibling modules: ``money`` (rounding and splitting), ``promotions``
(member discount, promotions, stacking), ``exclusive`` (exclusive groups),
``points`` (earning, birthdays), ``measure`` (weighed goods, scale
barcodes), ``receipts`` (receipts rendered from finished records),
``texts`` (zh-CN/en texts).

Inputs
------
``policy``: the effective rule set (wire/RULESET.md v3) with defaults filled:
``tiers``, ``card_types``, ``discount_excluded_categories/_skus``, ``earning``,
``promotions``, ``redemption``, ``stored_value``, ``packages``, ``coupons``,
``fees``, ``max_age_s``. Optional ``version`` is copied into sale records.
The policy is treated as immutable: a compiled form of its promotions (index,
parsed fields, scope per store/region/tier, receipt labels) is kept by the
identity of the ``promotions`` table, so a changed rule set must come as a new
dict (as a new Rules does), never as an edit in place.

``member`` (the caller builds it from the snapshot and its local deltas)::

    {
      "member_id": "M1001", "card_no": "880000000013",
      "tier": "gold",                    # key into policy.tiers
      "card_type": "personal" | None,    # key into policy.card_types
      "birthday": "03-15" | None, "birthday_calendar": "solar" | "lunar",
      "points_available": 5230,          # snapshot points +/- local deltas since it
      "balance_available_fen": 20000,    # stored value, snapshot +/- local deltas
      "packages": {"car_wash10": 3},     # count packages: remaining uses
      "coupons": ["C2026-0001"],         # coupon codes held and not used (as far as known)
      "today": {                         # store-local calendar day, from the local deltas
        "points_redeemed": 0, "stored_value_paid_fen": 0,
        "promotion_uses": {"spend100": 1}, "coupons_used": [],
      },
      "limited": False,   # accepted offline without a snapshot entry, or rules stale:
                          # no stored value, no redemption, no coupons (points accrue)
      "blocked": False,   # HQ blocked the account for an overdraft (limited too): no package
                          # uses either; a top-up is allowed (it settles the debt)
      "hq_limited": False,  # HQ limited the account for an overdraft, seen offline (limited
                            # too): the same as blocked, by its own name
    }

Missing optional keys mean: no birthday, 0 points/balance, no packages or
coupons, nothing used today, not limited. A subsidiary card's context carries
its primary's balance and points (the caller resolves ``primary_card``).

``now``: an aware datetime *in the store's time zone* (promotion windows,
member days, birthdays and coupon dates are store-local). ``rules_age_s``:
now minus the rule set's issue time; ``sync_age_s``: now minus when HQ last
sent the balances (the older of the rule set and the member snapshot; None:
the same as ``rules_age_s``). The counter takes both from
``validate.offline_ages``, as the tap's verdict does.

Public functions and return shapes
----------------------------------
``quote(lines, member, policy, now, *, store, region, tender=None, rules_age_s=0, sync_age_s=None)``
  lines: ``[{"sku", "qty", "unit_price" (fen), "name"?, "category"?}]``, a measured
  line ``{"sku", "unit", "qty": "0.532", "unit_price" (per unit)}`` or a scale label
  ``{"barcode", "unit_price"?}`` (check_lines; the line then carries ``qty`` in
  steps with ``unit`` and ``scale``, in the answer and the record);
  tender: ``{"points": n, "stored_value_fen": x, "coupons": [codes]}`` or None.
  Returns::

    {"lines": [{"index", "sku", "name", "category", "qty", "unit_price", "amount",
                "discounts": [{"source", "kind", "name", "fen", "allocated"}],
                "discount", "net", "points_redeemed", "redeemed_fen",
                "stored_value_fen", "cash_fen", "points_earned"}],
     "subtotal", "discount", "total",           # total = after discounts and coupons
     "promotions": [{"source", "kind", "name", "fen"}],   # money savings, incl. tier/coupons
     "points": {"earned", "eligible_fen", "points_per_yuan", "reason",
                "breakdown": [{"source", "id", "name", "multiplier_percent", "points"}]},
     "available": {"points": {"max_points", "max_fen", "reason", ...limits},
                   "stored_value": {"max_fen", "balance_fen", "reason", ...limits},
                   "coupons": [codes usable now]},
     "tender": {"points", "points_fen", "stored_value_fen", "coupons", "cash_fen"},
     "balances_after": {"points", "stored_value_fen"} | None,
     "receipt": {"zh-CN": [str], "en": [str]},
     "record": <sale record body, below>}

  Sale record body (what the journal stores and HQ applies)::

    {"type": "sale", "v": 1, "at", "store", "region", "rules_version",
     "member": {"member_id", "card_no", "tier"} | None,
     "redemption_points_per_yuan",
     "lines": [{"sku", "name", "category", "qty", "unit_price", "amount",
                "discounts": [{"source", "fen", "allocated"}], "net",
                "points_redeemed", "redeemed_fen", "stored_value_fen", "cash_fen",
                "points_earned"}],
     "totals": {"subtotal", "discount", "total", "points_redeemed", "redeemed_fen",
                "stored_value_fen", "cash_fen", "points_earned"},
     "coupons": [codes], "promotions": [ids applied],
     "deltas": {"points", "points_earned", "points_redeemed", "stored_value_fen",
                "promotion_uses": {id: 1}, "coupons_used": [codes]}}

  Per line: ``amount = sum(discounts) + net`` and
  ``net = redeemed_fen + stored_value_fen + cash_fen``.

``return_quote(original_sale_body, return_lines, earlier_returns, policy, now)``
  return_lines: ``[{"line": index, "qty": n}]`` or ``[{"sku": s, "qty": n}]``
  (a SKU spreads over the sale's lines of that SKU in order); earlier_returns:
  the ``record`` bodies of earlier returns of the same sale. Returns
  ``{"lines", "totals", "deltas", "receipt", "record"}`` where record is
  ``{"type": "return", "v": 1, "at", "sale_at", "sale_id" (the sale's "id" if
  the caller put one in it), "member", "lines": [{"index", "sku", "name", "qty",
  "amount", "discount", "discounts": [{"source", "fen"}], "refund_fen",
  "redeemed_fen", "points_redeemed", "stored_value_fen", "cash_fen",
  "points_earned"}], "totals": {"refund_fen", "discount", "cash_fen",
  "stored_value_fen", "redeemed_fen", "points_redeemed", "points_earned"},
  "deltas": {"points", "points_earned", "points_redeemed", "stored_value_fen"}}``.
  Per returned line ``refund_fen = cash_fen + stored_value_fen + redeemed_fen``
  and ``amount = refund_fen + discount``.

``topup(policy, member, *, package_id=None, amount_fen=None, now=None)``
``consume_package(policy, member, package_id, uses, *, now=None)``
``card_operation(policy, kind, member=None, *, card_no=None, new_card_no=None, now=None, months=None, expires=None)``
``withdrawal(policy, member, *, amount_fen, paid_known_fen, withdrawn_today_fen, offline_left_fen=None, now=None)``
  each returns ``{"record": body with "deltas", "receipt": {...}}``.

Errors: ``PricingError`` (and its ``TenderError``, ``ReturnError``) with
``code`` (stable reason), ``field`` (what was wrong, e.g. ``tender.points``),
``params``, ``text`` ({zh-CN, en}) and a message ``"<field>: <en text>"``.

Decisions
---------
Rounding (RULESET.md): line discounts half-up per line; order-level amounts
(threshold, coupon, redemption, stored value) pro rata by net, floored per
line, remainder to the last eligible line, never below zero; points floored
once per transaction; redemption cash = floor(points x 100 / points_per_yuan).

Stacking: see ``gateway.promotions``. Coupons apply after promotions, in the
order given; then points redemption; then stored value; the rest is cash.

Points are earned on what the member paid in money (net less the part paid
with points); stored value counts as money. ``min_spend_fen`` is checked
against what was bought (eligible net before points).

Redemption needs ``min_points``, multiples of ``step_points``, at most
``max_share_percent`` of the total after discounts, and offline at most
``offline_max_points_per_tx`` and what is left of ``offline_max_points_per_day``;
refused when the rules are older than ``max_age_s``. Stored value: needs the
card type to allow it (a member without a card type is not restricted), at
most the amount due, the balance, ``offline_max_per_tx_fen`` and what is left
of ``offline_max_per_day_fen``; refused past ``max_sync_age_s`` (or
``max_age_s``). Limited members get neither, nor coupons; nor does anyone
when the rules are older than ``max_age_s``.

Age refusals (``too_old``) name the true reason and come before
``member_limited`` (a stale tap also marks the member limited): the rules
past ``max_age_s``, or past a section's ``max_sync_age_s``, are
``rules_stale``; fresh rules over balances older than ``max_sync_age_s``
are ``sync_stale``.

Refunds follow the original tender, line by line: for returned units
``r_before+1..r_after`` of a line sold ``qty``, the units' share of the line's
price, ``floor(amount*r_after/qty) - floor(amount*r_before/qty)``, is split over
what is left of the line's money parts and discounts (``return_quote``), and
points (redeemed, earned) are ``floor(v*r_after/qty) - floor(v*r_before/qty)``.
So a return is paid back in the same mix (cash as cash, stored value to the
balance, redeemed points back to points), its receipt rows add up to its
share of the price, earned points are taken back, and any set of partial
returns that covers the whole sale reverses it exactly. Discounts are reversed
pro rata too (no re-pricing of the rest: a customer keeps the share of a
满减 that belongs to the units kept). Coupons and promotion uses are not
given back (single use; HQ may reissue).
"""

from __future__ import annotations

import calendar
from datetime import date, datetime
from typing import Any

from gateway.core import exclusive, points as pts
from gateway.core.errors import DomainError
from gateway.core.measure import (BarcodeError, QuantityError, ScaleFormats, format_quantity, line_amount,
                                  parse_quantity, scale_of)
from gateway.core.money import allocate, percent_of, prorate
from gateway.core.promotions import Pricer, card_type_of
from gateway.core.receipts import render_receipt, render_return_receipt
from gateway.core.texts import LANGS, PRICING_REASONS, label as _label, name_of as _name
from gateway.core.reasons import yuan
from wire.ruleset import is_card_no

MAX_LINES = 500
MAX_QTY = 9999
MAX_UNIT_PRICE = 100_000_000
MAX_TOPUP_FEN = 10_000_000  # 100,000 yuan: a sanity bound, HQ's policy may be lower


class PricingError(DomainError, ValueError):
    """A request that cannot be priced; names the field and carries zh-CN/en
    text. Malformed input (a code ending ``_invalid``) is a 400; a well-formed
    request the rules refuse, a 422."""

    def __init__(self, code: str, field: str, /, **params: Any):
        self.params = {k: v for k, v in params.items() if k != "_fen"}
        zh, en = PRICING_REASONS[code]
        fmt = {k: (yuan(v) if k in params.get("_fen", ()) else v) for k, v in params.items()}
        text = {"zh-CN": zh.format(**fmt), "en": en.format(**fmt)}
        super().__init__(f"{field}: {text['en']}", code=code, status=400 if code.endswith("_invalid") else 422,
                         text=text, field=field)


class TenderError(PricingError):
    """A tender (points, stored value, coupons) that exceeds a limit or is not allowed."""


class ReturnError(PricingError):
    """A return that does not match the original sale."""


# ---------------------------------------------------------------- input checks

_LINE_KEYS = frozenset({"sku", "name", "category", "qty", "unit_price", "unit", "barcode"})


def check_lines(lines: Any, policy: dict | None = None) -> list[dict]:
    """The basket's lines checked, each with its ``amount``; PricingError
    ``basket_invalid`` naming the field otherwise. A line is a count of
    units (``qty`` a whole number), a measured quantity (``unit``, a key of
    the rule set's ``units``, and ``qty`` a decimal string), or a scale
    barcode (``barcode``, read by the rule set's ``scale_barcodes``):
    gateway/core/measure.py."""
    def bad(field, detail):
        raise PricingError("basket_invalid", field, detail=f"{field}: {detail}")

    if not isinstance(lines, list) or not lines:
        bad("lines", "must be a non-empty list")
    if len(lines) > MAX_LINES:
        bad("lines", f"at most {MAX_LINES} lines")
    out = []
    for i, line in enumerate(lines):
        # The field's name is formatted only for an error: most baskets have none.
        if not isinstance(line, dict):
            bad(f"lines[{i}]", "must be an object")
        if not _LINE_KEYS.issuperset(line):
            unknown = set(line) - _LINE_KEYS
            bad(f"lines[{i}]", f"unknown field(s) {', '.join(sorted(map(str, unknown)))}")
        unit, scale = None, 1
        if "barcode" in line:
            sku, qty, unit, price = _scale_line(line, i, policy, bad)
            if unit is not None:
                scale = scale_of(policy["units"][unit]["decimals"])
        else:
            sku = line.get("sku")
            if not isinstance(sku, str) or not sku or len(sku) > 64:
                bad(f"lines[{i}].sku", "required, a string of 1-64 characters")
            qty = line.get("qty")
            if "unit" in line:
                unit, scale, qty = _measured_qty(line, i, policy, bad)
            elif type(qty) is not int or not 1 <= qty <= MAX_QTY:
                bad(f"lines[{i}].qty", f"required, a whole number from 1 to {MAX_QTY}")
            price = line.get("unit_price")
        if type(price) is not int or not 0 <= price <= MAX_UNIT_PRICE:
            bad(f"lines[{i}].unit_price", f"required, whole fen from 0 to {MAX_UNIT_PRICE}")
        name = line.get("name")
        if "name" in line and not isinstance(name, str):
            bad(f"lines[{i}].name", "must be a string")
        category = line.get("category", "")
        if not isinstance(category, str):
            bad(f"lines[{i}].category", "must be a string")
        amount = qty * price if scale == 1 else line_amount(qty, price, scale)
        out.append({"sku": sku, "name": name or sku, "category": category, "qty": qty, "unit_price": price,
                    "unit": unit, "scale": scale, "amount": amount})
    return out


def _measured_qty(line: dict, i: int, policy: dict | None, bad) -> tuple[str, int, int]:
    """(unit, scale, qty in smallest steps) of a line sold by ``unit``."""
    unit = line["unit"]
    spec = ((policy or {}).get("units") or {}).get(unit) if isinstance(unit, str) else None
    if spec is None:
        bad(f"lines[{i}].unit", f"{unit!r} is not a unit of these rules")
    scale = scale_of(spec["decimals"])
    try:
        return unit, scale, parse_quantity(line.get("qty"), scale, spec.get("max", MAX_QTY * scale))
    except QuantityError as e:
        bad(f"lines[{i}].qty", str(e))


def _scale_line(line: dict, i: int, policy: dict | None, bad) -> tuple[str, int, str | None, Any]:
    """(sku, qty, unit, unit_price) of a line given by its scale barcode: a
    weight label is ``qty`` steps of its unit at the line's ``unit_price``
    (per whole unit); a price label is one unit at the price it carries."""
    for key in ("sku", "qty", "unit"):
        if key in line:
            bad(f"lines[{i}].{key}", "not with a barcode: the scale barcode carries it")
    try:
        read = ScaleFormats((policy or {}).get("scale_barcodes") or {}).read(line["barcode"])
    except BarcodeError as e:
        bad(f"lines[{i}].barcode", str(e))
    if read.kind == "price":
        if "unit_price" in line:
            bad(f"lines[{i}].unit_price", "not with a price label: the barcode carries the price")
        return read.sku, 1, None, read.value
    spec = policy["units"][read.unit]
    most = spec.get("max", MAX_QTY * scale_of(spec["decimals"]))
    if read.value > most:
        bad(f"lines[{i}].barcode", f"the weight {format_quantity(read.value, scale_of(spec['decimals']))} "
                                   f"is above {format_quantity(most, scale_of(spec['decimals']))}")
    return read.sku, read.value, read.unit, line.get("unit_price")


def check_tender(tender: Any) -> dict:
    def bad(field, detail):
        raise TenderError("tender_invalid", field, detail=f"{field}: {detail}")

    if tender is None:
        return {"points": 0, "stored_value_fen": 0, "coupons": []}
    if not isinstance(tender, dict):
        bad("tender", "must be an object")
    unknown = set(tender) - {"points", "stored_value_fen", "coupons"}
    if unknown:
        bad("tender", f"unknown field(s) {', '.join(sorted(map(str, unknown)))}")
    out = {}
    for key in ("points", "stored_value_fen"):
        v = tender.get(key, 0)
        if type(v) is not int or v < 0:
            bad(f"tender.{key}", "a whole number >= 0")
        out[key] = v
    coupons = tender.get("coupons", [])
    if not isinstance(coupons, list) or not all(isinstance(c, str) and c for c in coupons):
        bad("tender.coupons", "a list of coupon codes")
    for i, c in enumerate(coupons):
        if c in coupons[:i]:
            raise TenderError("coupon_duplicate", f"tender.coupons[{i}]", code=c)
    out["coupons"] = list(coupons)
    return out


def _today(member: dict) -> dict:
    return member.get("today") or {}


# ---------------------------------------------------------------- availability

# The tender's field and texts of an age refusal, per operation.
_AGE_WHAT = {"redemption": ("tender.points", "积分抵现", "points redemption"),
             "stored_value": ("tender.stored_value_fen", "储值支付", "stored-value payment"),
             "coupons": ("tender.coupons", "使用优惠券", "coupon use"),
             "gift": ("gift_id", "积分兑换礼品", "gift redemption"),
             "package_stored_value": ("payment.method", "储值购买次卡", "paying a package with stored value")}
# Sections whose max_sync_age_s limits them, with its default (wire/ruleset.py).
_SYNC_LIMITED = {"stored_value": 86400, "redemption": None}


def too_old(policy: dict, what: str, rules_age_s: int, sync_age_s: int | None = None) -> dict | None:
    """Why ``what`` (redemption, stored_value, coupons) is refused offline
    for age, or None: ``{"reason", "age_s", "limit_s"}``.

    ``rules_stale``: the rule set is past ``max_age_s`` (then nothing risky
    goes), or, for an operation whose section sets ``max_sync_age_s``, past
    that. ``sync_stale``: the rules are fresh enough but HQ's balances (the
    member snapshot, ``sync_age_s``) are past ``max_sync_age_s``: other
    stores may have spent them since. ``sync_age_s`` None: only the rules'
    age is known (the snapshot came with them)."""
    sync_age_s = rules_age_s if sync_age_s is None else max(sync_age_s, rules_age_s)
    sync_limit = None
    if what in _SYNC_LIMITED:
        sync_limit = (policy.get(what) or {}).get("max_sync_age_s", _SYNC_LIMITED[what])
    max_age_s = policy.get("max_age_s", 604800)
    if rules_age_s > max_age_s:
        return {"reason": "rules_stale", "age_s": rules_age_s, "limit_s": max_age_s}
    if sync_limit is not None and rules_age_s > sync_limit:
        return {"reason": "rules_stale", "age_s": rules_age_s, "limit_s": sync_limit}
    if sync_limit is not None and sync_age_s > sync_limit:
        return {"reason": "sync_stale", "age_s": sync_age_s, "limit_s": sync_limit}
    return None


def _refuse_too_old(old: dict, what: str) -> None:
    field, zh, en = _AGE_WHAT[what]
    raise TenderError(old["reason"], field, age_s=old["age_s"], limit_s=old["limit_s"], what_zh=zh, what_en=en)


def _points_refusal(member: dict | None, policy: dict, rules_age_s: int, sync_age_s: int | None) -> dict | None:
    """Why the member may spend no points at all offline now, or None."""
    if member is None:
        return {"reason": "member_required"}
    # The store's own staleness first: it refuses every member, and a stale
    # tap also marks the member limited, which would hide it.
    old = too_old(policy, "redemption", rules_age_s, sync_age_s)
    if old:
        return old
    if member.get("limited"):
        return {"reason": "member_limited"}
    return None


def _points_caps(member: dict, red: dict, max_share: int | None = None) -> dict:
    """The caps on the points a member may spend offline now, in the order
    their refusals are named: what they hold (snapshot and local deltas),
    the share of the bill (a sale's redemption only), and the offline limits
    of ``redemption`` per transaction and per store-local day (what the
    day's records spent already counts, whatever it was spent on)."""
    caps = {"points_insufficient": max(member.get("points_available", 0), 0)}
    if max_share is not None:
        caps["points_max_share"] = max_share
    caps["points_offline_tx_limit"] = red.get("offline_max_points_per_tx", 0)
    caps["points_offline_day_limit"] = max(red.get("offline_max_points_per_day", 0)
                                           - _today(member).get("points_redeemed", 0), 0)
    return caps


def points_spendable(member: dict | None, policy: dict, rules_age_s: int, sync_age_s: int | None = None) -> dict:
    """The most points the member may spend offline now on something other
    than a bill (a gift): as ``redeemable`` without the bill's share, its
    minimum or its steps. ``{"max_points", "reason", "limits"?, ...}``; check
    an amount with ``check_points``."""
    out = {"max_points": 0, "reason": None, "min_points": 0, "step_points": 1}
    refusal = _points_refusal(member, policy, rules_age_s, sync_age_s)
    if refusal:
        out.update(refusal)
        return out
    caps = _points_caps(member, policy.get("redemption") or {})
    binding = min(caps, key=lambda k: caps[k])
    out.update(max_points=max(caps[binding], 0), limits=dict(caps))
    if caps[binding] <= 0:
        out["reason"] = binding
    return out


def redeemable(member: dict | None, policy: dict, total_fen: int, rules_age_s: int,
               sync_age_s: int | None = None) -> dict:
    """The most points the member may redeem on a bill of ``total_fen`` offline."""
    red = policy.get("redemption") or {}
    out = {"max_points": 0, "max_fen": 0, "reason": None}
    refusal = _points_refusal(member, policy, rules_age_s, sync_age_s)
    if refusal:
        out.update(refusal)
        return out
    ppy = red.get("points_per_yuan", 100)  # defaults as in wire/ruleset.py: offline caps default to 0
    if ppy <= 0:
        out["reason"] = "redemption_disabled"
        return out
    step = max(red.get("step_points", 100), 1)
    caps = _points_caps(member, red, total_fen * red.get("max_share_percent", 50) // 100 * ppy // 100)
    binding = min(caps, key=lambda k: caps[k])  # dict order breaks ties deterministically
    most = caps[binding] // step * step
    out.update(min_points=red.get("min_points", 0), step_points=step, points_per_yuan=ppy,
               max_share_percent=red.get("max_share_percent", 50),
               limits=dict(caps))
    if most < red.get("min_points", 0) or most <= 0:
        out["reason"] = "points_min" if caps[binding] > 0 else binding
        return out
    out.update(max_points=most, max_fen=most * 100 // ppy)
    return out


def stored_value_payable(member: dict | None, policy: dict, due_fen: int, rules_age_s: int,
                         sync_age_s: int | None = None) -> dict:
    """The most stored value the member may pay on ``due_fen`` offline."""
    sv = policy.get("stored_value") or {}
    out = {"max_fen": 0, "balance_fen": 0, "reason": None}
    if member is None:
        out["reason"] = "member_required"
        return out
    out["balance_fen"] = max(member.get("balance_available_fen", 0), 0)
    ctype = card_type_of(member, policy)
    if ctype is not None and not ctype.get("stored_value", False):
        out["reason"] = "stored_value_not_allowed"  # never, however fresh the data
        return out
    old = too_old(policy, "stored_value", rules_age_s, sync_age_s)  # before limited: see redeemable
    if old:
        out.update(old)
        return out
    if member.get("limited"):
        out["reason"] = "member_limited"
        return out
    caps = {
        "stored_value_exceeds_due": max(due_fen, 0),
        "stored_value_insufficient": out["balance_fen"],
        "stored_value_offline_tx_limit": sv.get("offline_max_per_tx_fen", 0),
        "stored_value_offline_day_limit": max(sv.get("offline_max_per_day_fen", 0)
                                              - _today(member).get("stored_value_paid_fen", 0), 0),
    }
    binding = min(caps, key=lambda k: caps[k])
    out.update(max_fen=caps[binding], limits=dict(caps))
    if caps[binding] <= 0:
        out["reason"] = binding
    return out


def check_points(asked: int, avail: dict, policy: dict, what: str = "redemption") -> None:
    """Refuse ``asked`` points unless ``avail`` (``redeemable`` or
    ``points_spendable``) allows them; the refusal names the field of
    ``what`` (``redemption``: tender.points; ``gift``: gift_id)."""
    field = _AGE_WHAT[what][0]
    reason = avail["reason"]
    if reason in ("member_required", "member_limited", "redemption_disabled"):
        raise TenderError(reason, field)
    if reason in ("rules_stale", "sync_stale"):
        _refuse_too_old(avail, what)
    red = policy.get("redemption") or {}
    step = avail["step_points"]
    if asked % step:
        raise TenderError("points_step", field, asked=asked, limit=step)
    if asked < avail["min_points"]:
        raise TenderError("points_min", field, asked=asked, limit=avail["min_points"])
    for code in ("points_insufficient", "points_offline_tx_limit", "points_offline_day_limit", "points_max_share"):
        limit = avail["limits"].get(code)
        if limit is not None and asked > limit:
            raise TenderError(code, field, asked=asked, limit=limit,
                              percent=red.get("max_share_percent", 50))


def check_stored_value(asked: int, avail: dict, what: str = "stored_value") -> None:
    """Refuse ``asked`` fen of stored value unless ``avail``
    (``stored_value_payable``) allows them; the refusal names the field of
    ``what`` (``stored_value``: tender.stored_value_fen;
    ``package_stored_value``: payment.method)."""
    field = _AGE_WHAT[what][0]
    reason = avail["reason"]
    if reason in ("member_required", "member_limited", "stored_value_not_allowed"):
        raise TenderError(reason, field)
    if reason in ("rules_stale", "sync_stale"):
        _refuse_too_old(avail, what)
    for code in ("stored_value_exceeds_due", "stored_value_insufficient",
                 "stored_value_offline_tx_limit", "stored_value_offline_day_limit"):
        limit = avail["limits"][code] if code in avail["limits"] else None
        if limit is not None and asked > limit:
            raise TenderError(code, field, asked=asked, limit=limit, _fen=("asked", "limit"))


def _coupon_lines(coupon: dict, lines: list[dict], discountable: list[int]) -> list[int]:
    cats, skus = set(coupon.get("categories") or ()), set(coupon.get("skus") or ())
    if cats or skus:
        return [i for i, l in enumerate(lines) if l["category"] in cats or l["sku"] in skus]
    return discountable


def _coupon_problem(code: str, member: dict, policy: dict, today_iso: str) -> tuple[str, dict] | None:
    coupon = (policy.get("coupons") or {}).get(code)
    if coupon is None or coupon.get("disabled"):
        return "coupon_unknown", {}
    if coupon.get("member_id") and coupon["member_id"] != member.get("member_id"):
        return "coupon_not_member", {}
    held = member.get("coupons")
    if code in (_today(member).get("coupons_used") or ()) or (held is not None and code not in held):
        return "coupon_used", {}
    if coupon.get("from") and today_iso < coupon["from"]:
        return "coupon_not_yet_valid", {"date": coupon["from"]}
    if coupon.get("to") and today_iso > coupon["to"]:
        return "coupon_expired", {"date": coupon["to"]}
    return None


# ---------------------------------------------------------------- quote: a pipeline of named steps

class _Sale:
    """A quote being worked out. Each step of ``quote`` reads what the steps
    before it left here and adds its own part; nothing is rendered until the
    record is finished."""

    __slots__ = ("lines", "member", "policy", "now", "today", "store", "region", "tender", "rules_age_s",
                 "sync_age_s", "pricer", "nets", "adj", "applied", "coupons_used", "coupons_too_old",
                 "total", "avail_pts", "avail_sv", "points_fen", "red_pts", "red_fen", "sv_line", "cash",
                 "earned")

    def __init__(self, lines: list[dict], member: dict | None, policy: dict, now: datetime, store: str | None,
                 region: str | None, tender: dict, rules_age_s: int, sync_age_s: int | None):
        self.lines, self.member, self.policy, self.now, self.today = lines, member, policy, now, now.date()
        self.store, self.region, self.tender = store, region, tender
        self.rules_age_s, self.sync_age_s = rules_age_s, sync_age_s


def quote(lines: Any, member: dict | None, policy: dict, now: datetime, *,
          store: str | None = None, region: str | None = None, tender: Any = None,
          rules_age_s: int = 0, sync_age_s: int | None = None) -> dict:
    """Price a basket; with a tender, apply coupons, redemption and stored value.

    A pipeline of named steps over one ``_Sale``: check the lines and the
    tender; the member's discount and the promotions (``_promotions``);
    coupons (``_coupons``); redemption, stored value and cash (``_tender``);
    points earned (``_points``); the finished record and answer
    (``_finish``). The receipt is rendered from the finished answer alone
    (gateway/core/receipts.py)."""
    if not isinstance(now, datetime) or now.tzinfo is None:
        raise ValueError("now: an aware datetime in the store's time zone")
    sale = _Sale(check_lines(lines, policy), member, policy, now, store, region, check_tender(tender),
                 rules_age_s, sync_age_s)
    _promotions(sale)
    _coupons(sale)
    _tender(sale)
    _points(sale)
    q = _finish(sale)
    q["receipt"] = {lang: render_receipt(q, policy, lang) for lang in LANGS}
    return q


def _promotions(s: _Sale) -> None:
    """The member's base discount, then the promotions in scope with each
    exclusive group's pick (gateway/core/promotions.py, exclusive.py)."""
    s.pricer = Pricer(s.lines, s.member, s.policy, store=s.store, region=s.region,
                      now_min=s.now.strftime("%Y-%m-%dT%H:%M"), weekday=s.today.isoweekday())
    s.nets, s.adj, s.applied, _ = s.pricer.price(exclusive.choose(s.pricer))


def _coupons(s: _Sale) -> None:
    """Coupons: order-level, after promotions, in the order given."""
    coupons, member, nets = s.tender["coupons"], s.member, s.nets
    s.coupons_used = []
    s.coupons_too_old = too_old(s.policy, "coupons", s.rules_age_s, s.sync_age_s)
    if coupons and member is None:
        raise TenderError("member_required", "tender.coupons")
    if coupons and s.coupons_too_old:  # before limited: see redeemable
        _refuse_too_old(s.coupons_too_old, "coupons")
    if coupons and member.get("limited"):
        raise TenderError("member_limited", "tender.coupons")
    today_iso = s.today.isoformat()
    for k, code in enumerate(coupons):
        field = f"tender.coupons[{k}]"
        problem = _coupon_problem(code, member, s.policy, today_iso)
        if problem:
            raise TenderError(problem[0], field, code=code, **problem[1])
        coupon = s.policy["coupons"][code]
        idx = _coupon_lines(coupon, s.lines, s.pricer.discountable)
        weights = [nets[i] for i in idx]
        base = sum(weights)
        need = coupon.get("min_spend_fen", 0)
        if base < need or base <= 0:
            raise TenderError("coupon_min_spend", field, code=code, limit=need, asked=base,
                              _fen=("limit", "asked"))
        off = coupon["value_fen"] if "value_fen" in coupon else percent_of(base, coupon.get("percent", 0))
        off = min(off, base)
        for i, d in zip(idx, allocate(off, weights)):
            if d:
                nets[i] -= d
                s.adj[i].append((f"coupon:{code}", d, True))
        s.coupons_used.append((code, off))


def _tender(s: _Sale) -> None:
    """Redemption, then stored value, both allocated to lines by what is left
    to pay; the rest is cash."""
    n, nets = len(s.lines), s.nets
    s.total = sum(nets)
    ppy = (s.policy.get("redemption") or {}).get("points_per_yuan", 100)
    s.avail_pts = redeemable(s.member, s.policy, s.total, s.rules_age_s, s.sync_age_s)
    s.red_pts, s.red_fen, s.points_fen = [0] * n, [0] * n, 0
    asked_pts = s.tender["points"]
    if asked_pts:
        check_points(asked_pts, s.avail_pts, s.policy)
        s.points_fen = asked_pts * 100 // ppy
        s.red_fen = allocate(s.points_fen, nets)
        s.red_pts = allocate(asked_pts, nets, capped=False)
    s.avail_sv = stored_value_payable(s.member, s.policy, s.total - s.points_fen, s.rules_age_s, s.sync_age_s)
    s.sv_line = [0] * n
    asked_sv = s.tender["stored_value_fen"]
    if asked_sv:
        check_stored_value(asked_sv, s.avail_sv)
        s.sv_line = allocate(asked_sv, [nets[i] - s.red_fen[i] for i in range(n)])
    s.cash = [nets[i] - s.red_fen[i] - s.sv_line[i] for i in range(n)]


def _points(s: _Sale) -> None:
    """Points on what was paid in money (gateway/core/points.py)."""
    campaigns = [(p.id, _name(p.rule.src, p.id), p.rule.src["multiplier_percent"], p.lines)
                 for p, _ in s.applied if p.kind == "points_multiplier"]
    s.earned = pts.earn(s.lines, [s.nets[i] - s.red_fen[i] for i in range(len(s.lines))], s.member, s.policy,
                        s.today, campaigns, spend=s.nets)


def _savings(s: _Sale) -> list[tuple[str, int, str, dict]]:
    """Every saving in the order applied (member discount, promotions,
    coupons): (source, fen saved in all, kind, name). A saving's total is the
    sum of its line rows: discounts are whole, and shares of an amount no
    larger than the lines' nets add up to it exactly."""
    out = []
    pricer = s.pricer
    if pricer.base_src:
        out.append((pricer.base_src, sum(pricer.base_adj), pricer.base_src.split(":")[0], pricer.base_name))
    for p, fen in s.applied:
        out.append((p.id, fen, p.kind, _name(p.rule.src, p.id)))
    for code, off in s.coupons_used:
        out.append((f"coupon:{code}", off, "coupon", _name(s.policy["coupons"][code], code)))
    return out


def _finish(s: _Sale) -> dict:
    """The sale record (what the journal stores and HQ applies) and the
    quote's answer around it."""
    member, earned, nets = s.member, s.earned, s.nets
    savings = _savings(s)
    shown = {src: (kind, name) for src, _, kind, name in savings}
    out_lines, body_lines = [], []
    line_points = earned["line_points"]
    for i, l in enumerate(s.lines):
        disc, shown_disc = [], []
        for src, d, a in s.adj[i]:
            row = {"source": src, "fen": d, "allocated": a}
            disc.append(row)
            row = row.copy()
            row["kind"], row["name"] = shown[src]
            shown_disc.append(row)
        row = {"sku": l["sku"], "name": l["name"], "category": l["category"], "qty": l["qty"]}
        if l["unit"] is not None:
            row["unit"], row["scale"] = l["unit"], l["scale"]
        row.update(unit_price=l["unit_price"], amount=l["amount"], discounts=disc, net=nets[i],
                   points_redeemed=s.red_pts[i], redeemed_fen=s.red_fen[i], stored_value_fen=s.sv_line[i],
                   cash_fen=s.cash[i], points_earned=line_points[i])
        body_lines.append(row)
        out_lines.append({"index": i, **row, "discount": l["amount"] - nets[i], "discounts": shown_disc})
    subtotal, total = sum(l["amount"] for l in s.lines), s.total
    asked_pts, asked_sv, cash = s.tender["points"], s.tender["stored_value_fen"], sum(s.cash)
    coupons = [c for c, _ in s.coupons_used]
    uses = {p.id: 1 for p, _ in s.applied}
    deltas = {"points": earned["earned"] - asked_pts, "points_earned": earned["earned"],
              "points_redeemed": asked_pts, "stored_value_fen": -asked_sv,
              "promotion_uses": uses, "coupons_used": coupons}
    totals = {"subtotal": subtotal, "discount": subtotal - total, "total": total,
              "points_redeemed": asked_pts, "redeemed_fen": s.points_fen, "stored_value_fen": asked_sv,
              "cash_fen": cash, "points_earned": earned["earned"]}
    record = {
        "type": "sale", "v": 1, "at": s.now.isoformat(), "store": s.store, "region": s.region,
        "rules_version": s.policy.get("version"),
        "member": ({"member_id": member.get("member_id"), "card_no": member.get("card_no"),
                    "tier": member.get("tier")} if member else None),
        "redemption_points_per_yuan": (s.policy.get("redemption") or {}).get("points_per_yuan", 100),
        "lines": body_lines, "totals": totals, "coupons": coupons, "promotions": list(uses),
        "deltas": deltas,
    }
    balances = None
    if member is not None:
        balances = {"points": member.get("points_available", 0) + deltas["points"],
                    "stored_value_fen": member.get("balance_available_fen", 0) - asked_sv}
    usable = []
    if member is not None and not member.get("limited") and not s.coupons_too_old:
        today_iso = s.today.isoformat()
        usable = [c for c in member.get("coupons") or ()
                  if _coupon_problem(c, member, s.policy, today_iso) is None and c not in s.tender["coupons"]]
    return {
        "lines": out_lines, "subtotal": subtotal, "discount": subtotal - total, "total": total,
        "promotions": [{"source": src, "kind": kind, "name": name, "fen": fen}
                       for src, fen, kind, name in savings if fen],
        "points": {k: earned[k] for k in ("earned", "eligible_fen", "points_per_yuan", "breakdown", "reason")},
        "available": {"points": s.avail_pts, "stored_value": s.avail_sv, "coupons": usable},
        "tender": {"points": asked_pts, "points_fen": s.points_fen, "stored_value_fen": asked_sv,
                   "coupons": coupons, "cash_fen": cash},
        "balances_after": balances,
        "record": record,
    }


# ---------------------------------------------------------------- returns

_LINE_VALUES = ("cash_fen", "stored_value_fen", "redeemed_fen", "points_redeemed", "points_earned")
_MONEY_PARTS = ("redeemed_fen", "stored_value_fen", "cash_fen")


def return_quote(original: dict, return_lines: Any, earlier_returns: list[dict] | None,
                 policy: dict, now: datetime) -> dict:
    """Reverse part or all of a sale, in the sale's own tender mix.

    Per returned line, units ``before+1..after`` of the ``qty`` sold:
    the returned units' share of the line's price is
    ``prorate(amount, before, after, qty)`` (cumulative floors). It is split
    over what is left of the line's money parts (redeemed points' fen, stored
    value, cash) and then its discounts, pro rata, floored, the remainder to
    the last part with room (money.allocate): the discounts reversed take it,
    or cash when the line had none. The last return of a line takes all that
    is left. So a return's line rows add up to its share of the price, its
    refund is that share less the discounts reversed, every part is at least
    zero, and returns that cover the sale reverse it exactly. Points
    (redeemed and earned) are prorated by cumulative floors."""
    sold = original["lines"]
    done: dict[int, int] = {}
    taken: dict[int, dict[str, int]] = {}   # line -> part -> fen returned before
    for k, r in enumerate(earlier_returns or ()):
        if original.get("id") is not None and r.get("sale_id") not in (None, original["id"]):
            raise ReturnError("return_invalid", f"earlier_returns[{k}]",
                              detail=f"earlier_returns[{k}]: a return of another sale")
        for rl in r["lines"]:
            i = rl["index"]
            done[i] = done.get(i, 0) + rl["qty"]
            parts = taken.setdefault(i, {})
            for key in _MONEY_PARTS:
                parts[key] = parts.get(key, 0) + rl[key]
            for d in rl["discounts"]:
                parts[d["source"]] = parts.get(d["source"], 0) + d["fen"]
    asked = _returned_units(sold, return_lines, done)

    out_lines = []
    totals = {"refund_fen": 0, "discount": 0, **{k: 0 for k in _LINE_VALUES}}
    for i in sorted(asked):
        l = sold[i]
        before, after = done.get(i, 0), done.get(i, 0) + asked[i]
        row = {"index": i, "sku": l["sku"], "name": l["name"], "qty": asked[i]}
        if "unit" in l:
            row["unit"], row["scale"] = l["unit"], l["scale"]
        parts = _returned_parts(l, before, after, taken.get(i, {}))
        for k in _LINE_VALUES:
            row[k] = parts[k] if k in parts else prorate(l[k], before, after, l["qty"])
        row["discounts"] = [{"source": d["source"], "fen": parts[d["source"]]} for d in l["discounts"]
                            if parts[d["source"]]]
        row["discount"] = sum(d["fen"] for d in row["discounts"])
        row["refund_fen"] = row["cash_fen"] + row["stored_value_fen"] + row["redeemed_fen"]
        row["amount"] = row["refund_fen"] + row["discount"]
        out_lines.append(row)
        for k in totals:
            totals[k] += row[k]
    deltas = {"points": totals["points_redeemed"] - totals["points_earned"],
              "points_earned": -totals["points_earned"], "points_redeemed": -totals["points_redeemed"],
              "stored_value_fen": totals["stored_value_fen"]}
    record = {"type": "return", "v": 1, "at": now.isoformat(), "sale_at": original.get("at"),
              "sale_id": original.get("id"), "member": original.get("member"),
              "lines": out_lines, "totals": totals, "deltas": deltas}
    receipt = {lang: render_return_receipt(record, lang) for lang in LANGS}
    return {"lines": out_lines, "totals": totals, "deltas": deltas, "receipt": receipt, "record": record}


def _returned_parts(line: dict, before: int, after: int, taken: dict[str, int]) -> dict[str, int]:
    """The fen of each money part and discount source of ``line`` that units
    ``before+1..after`` give back (see return_quote)."""
    keys = [*_MONEY_PARTS, *(d["source"] for d in line["discounts"])]
    full = dict.fromkeys(keys, 0)
    for key in _MONEY_PARTS:
        full[key] = line[key]
    for d in line["discounts"]:
        full[d["source"]] += d["fen"]
    left = [max(full[k] - taken.get(k, 0), 0) for k in keys]
    if after >= line["qty"]:
        return dict(zip(keys, left))
    return dict(zip(keys, allocate(prorate(line["amount"], before, after, line["qty"]), left)))


def _returned_units(sold: list[dict], return_lines: Any, done: dict[int, int]) -> dict[int, int]:
    """Line index -> units asked back (a SKU spreads over the sale's lines of
    that SKU in order); ReturnError naming the field otherwise."""
    if not isinstance(return_lines, list) or not return_lines:
        raise ReturnError("return_invalid", "return_lines", detail="return_lines: must be a non-empty list")
    asked: dict[int, int] = {}

    def left(i):
        return sold[i]["qty"] - done.get(i, 0) - asked.get(i, 0)

    for k, rl in enumerate(return_lines):
        where = f"return_lines[{k}]"
        if not isinstance(rl, dict) or set(rl) - {"line", "sku", "qty"} or ("line" in rl) == ("sku" in rl):
            raise ReturnError("return_invalid", where, detail=f"{where}: an object with qty and one of line, sku")
        if "line" in rl:
            i = rl["line"]
            if type(i) is not int or not 0 <= i < len(sold):
                raise ReturnError("return_unknown_line", f"{where}.line", detail=f"line {i!r}")
            qty = _returned_qty(rl.get("qty"), sold[i], f"{where}.qty")
            if qty > left(i):
                raise ReturnError("return_qty_exceeds", f"{where}.qty", limit=left(i), asked=qty)
            asked[i] = asked.get(i, 0) + qty
        else:
            idx = [i for i, l in enumerate(sold) if l["sku"] == rl["sku"]]
            if not idx:
                raise ReturnError("return_unknown_line", f"{where}.sku", detail=f"sku {rl['sku']!r}")
            qty = _returned_qty(rl.get("qty"), sold[idx[0]], f"{where}.qty")
            avail = sum(left(i) for i in idx)
            if qty > avail:
                raise ReturnError("return_qty_exceeds", f"{where}.qty", limit=avail, asked=qty)
            for i in idx:
                take = min(left(i), qty)
                if take:
                    asked[i] = asked.get(i, 0) + take
                    qty -= take
    return asked


def _returned_qty(qty: Any, line: dict, field: str) -> int:
    """A returned quantity in the sold line's own terms: whole units, or for
    a measured line its unit's decimals (as sold), in smallest units."""
    if "unit" in line:
        try:
            return parse_quantity(qty, line["scale"], line["qty"])
        except QuantityError as e:
            raise ReturnError("return_invalid", field, detail=f"{field}: {e}") from None
    if type(qty) is not int or qty < 1:
        raise ReturnError("return_invalid", field, detail=f"{field}: a whole number >= 1")
    return qty


# ---------------------------------------------------------------- stored value, packages, card services

def _member_base(member: dict) -> dict:
    return {"member_id": member.get("member_id"), "card_no": member.get("card_no")}


def topup(policy: dict, member: dict, *, package_id: str | None = None, amount_fen: int | None = None,
          now: datetime | None = None) -> dict:
    """Top up stored value. A package pays its ``pay_fen`` and adds its
    ``bonus_fen``; a free amount earns the bonus of the largest package whose
    ``pay_fen`` it reaches (充值赠送 by threshold). Packages outside their
    from/to dates are not offered (checked when ``now`` is given)."""
    if not isinstance(member, dict):
        raise PricingError("member_required", "member")
    if member.get("limited") and not ((member.get("blocked") or member.get("hq_limited")) and member.get("account_id")):
        raise PricingError("member_limited", "member")   # a blocked or limited card may top up: that settles its debt
    ctype = card_type_of(member, policy)
    if ctype is not None and not ctype.get("stored_value", False):
        raise PricingError("stored_value_not_allowed", "member.card_type")
    packages = (policy.get("stored_value") or {}).get("topup_packages") or {}
    if (package_id is None) == (amount_fen is None):
        raise PricingError("topup_invalid", "package_id", detail="give exactly one of package_id, amount_fen")
    today = now.date().isoformat() if now is not None else None

    def offered(pkg: dict) -> bool:  # a package's optional from/to dates (store time), inclusive
        return not pkg.get("disabled") and (today is None or (
            (not pkg.get("from") or pkg["from"] <= today) and (not pkg.get("to") or today <= pkg["to"])))

    if package_id is not None:
        pkg = packages.get(package_id)
        if pkg is None or not offered(pkg):
            raise PricingError("topup_unknown_package", "package_id", code=package_id)
        pay, bonus = pkg["pay_fen"], pkg.get("bonus_fen", 0)
    else:
        if type(amount_fen) is not int or not 1 <= amount_fen <= MAX_TOPUP_FEN:
            raise PricingError("topup_invalid", "amount_fen",
                               detail=f"amount_fen: whole fen from 1 to {MAX_TOPUP_FEN}")
        pay, bonus = amount_fen, 0
        best = None
        for pid in sorted(packages):
            pkg = packages[pid]
            if offered(pkg) and pkg["pay_fen"] <= amount_fen and (
                    best is None or pkg["pay_fen"] > packages[best]["pay_fen"]):
                best = pid
        if best is not None:
            package_id, bonus = best, packages[best].get("bonus_fen", 0)
    before = member.get("balance_available_fen", 0)
    credit = pay + bonus
    record = {"type": "topup", "v": 1, "at": now.isoformat() if now else None, **_member_base(member),
              "package_id": package_id, "pay_fen": pay, "bonus_fen": bonus, "credit_fen": credit,
              "balance_before_fen": before, "balance_after_fen": before + credit,
              "deltas": {"stored_value_fen": credit}}
    receipt = {}
    for lang in LANGS:
        rows = [f"{_label('topup', lang)}  {yuan(pay)}"]
        if bonus:
            name = _name(packages.get(package_id), package_id)[lang]
            rows.append(f"  {_label('topup_bonus', lang)} ({name})  {yuan(bonus)}")
        rows.append(f"{_label('credited', lang)}  {yuan(credit)}")
        rows.append(f"{_label('stored_value_left', lang)}  {yuan(before + credit)}")
        receipt[lang] = rows
    return {"record": record, "receipt": receipt}


def consume_package(policy: dict, member: dict, package_id: str, uses: int, *,
                    now: datetime | None = None) -> dict:
    """Use a count package (计次卡); remaining uses never go below zero. Past
    its last day (``member["package_expires"]``, store time, valid through
    that day) a use is refused ``package_expired`` naming the package; a
    renewal makes its uses usable again."""
    if not isinstance(member, dict):
        raise PricingError("member_required", "member")
    if member.get("blocked"):
        raise PricingError("member_blocked", "member")
    if member.get("hq_limited"):
        raise PricingError("member_limited", "member")
    pkg = (policy.get("packages") or {}).get(package_id)
    remaining = (member.get("packages") or {}).get(package_id)
    if pkg is None or remaining is None:
        raise PricingError("package_unknown", "package_id", code=package_id)
    until = (member.get("package_expires") or {}).get(package_id)
    if until and now is not None and now.date().isoformat() > until:
        names = _name(pkg, package_id)
        raise PricingError("package_expired", "package_id", code=package_id, date=until,
                           name_zh=names["zh-CN"], name_en=names["en"])
    if type(uses) is not int or not 1 <= uses <= MAX_QTY:
        raise PricingError("package_invalid_uses", "uses", limit=MAX_QTY)
    if uses > remaining:
        raise PricingError("package_insufficient", "uses", limit=remaining, asked=uses)
    record = {"type": "package_use", "v": 1, "at": now.isoformat() if now else None, **_member_base(member),
              "package_id": package_id, "uses": uses, "remaining_before": remaining,
              "remaining_after": remaining - uses, "deltas": {"packages": {package_id: -uses}}}
    receipt = {lang: [_label("package_use", lang, name=_name(pkg, package_id)[lang], uses=uses),
                      f"{_label('package_left', lang)}  {remaining - uses}"] for lang in LANGS}
    return {"record": record, "receipt": receipt}


CARD_OPS = {  # kind -> (fee key in policy.fees, card status afterwards)
    "issue": ("issue_fen", "active"),
    "report_lost": (None, "lost"),
    "freeze": (None, "frozen"),
    "unfreeze": (None, "active"),          # lifts a freeze or a loss report
    "replace": ("replace_fen", "replaced"),
    "annual_fee": ("annual_fen", "active"),
    "extend": ("extend_fen", "active"),    # 延期: the card's expiry moves on by ``months``
    "issue_subsidiary": ("subsidiary_fen", "active"),  # 附属卡 on the primary's account
}
EXTEND_MONTHS = 12       # 延期 by default
MAX_EXTEND_MONTHS = 120


def _add_months(day: date, n: int) -> date:
    """The same day ``n`` months on (the month's last day when it has fewer)."""
    y, m = divmod(day.month - 1 + n, 12)
    year, month = day.year + y, m + 1
    return date(year, month, min(day.day, calendar.monthrange(year, month)[1]))


def card_operation(policy: dict, kind: str, member: dict | None = None, *, card_no: str | None = None,
                   new_card_no: str | None = None, now: datetime | None = None, months: int | None = None,
                   expires: str | None = None) -> dict:
    """A counter card service with its fee from ``policy.fees``. ``issue``
    takes the new card's ``card_no`` (member may be None); ``replace`` needs
    ``new_card_no``; the record says the card's status afterwards (for
    ``replace``: the old card's). ``extend`` (延期) moves the card's expiry
    ``months`` (default 12) past the later of today and ``expires`` (the
    card's expiry now, if any), fee ``fees.extend_fen``. ``issue_subsidiary``
    issues ``new_card_no`` as a 附属卡 of the member's card ``card_no``
    (fee ``fees.subsidiary_fen``, else HQ's ``accounts.subsidiary_fee_fen``,
    else ``fees.issue_fen``); its record's
    ``card_no`` is the new card, ``primary_card_no`` the primary."""
    if kind not in CARD_OPS:
        raise PricingError("card_op_invalid", "kind", detail=f"kind: one of {', '.join(CARD_OPS)}")
    card = card_no or (member or {}).get("card_no")
    if not is_card_no(card):
        raise PricingError("card_op_invalid", "card_no", detail="card_no: the card's number (6-19 digits)")
    if kind != "issue" and not isinstance(member, dict):
        raise PricingError("member_required", "member")
    if kind in ("replace", "issue_subsidiary") and not (is_card_no(new_card_no) and new_card_no != card):
        raise PricingError("card_op_invalid", "new_card_no", detail="new_card_no: the new card's number (6-19 digits)")
    fee_key, status = CARD_OPS[kind]
    fees = policy.get("fees") or {}
    fee = fees.get(fee_key, 0) if fee_key else 0
    if kind == "issue_subsidiary" and fee_key not in fees:  # HQ's accounts.subsidiary_fee_fen, else the issue fee
        fee = (policy.get("accounts") or {}).get("subsidiary_fee_fen", fees.get("issue_fen", 0))
    record = {"type": "card_op", "v": 1, "op": kind, "at": now.isoformat() if now else None,
              "member_id": (member or {}).get("member_id"), "card_no": card, "new_card_no": new_card_no,
              "fee_fen": fee, "status_after": status, "deltas": {}}
    extra_rows: list[tuple[str, dict]] = []
    if kind == "extend":
        months = EXTEND_MONTHS if months is None else months
        if type(months) is not int or not 1 <= months <= MAX_EXTEND_MONTHS:
            raise PricingError("card_op_invalid", "months", detail=f"months: 1 to {MAX_EXTEND_MONTHS}")
        if now is None:
            raise ValueError("card_operation: extending a card needs now (the core has no clock)")
        today = now.date()
        start = today
        if expires:
            start = max(today, date.fromisoformat(expires))
        record["months"] = months
        record["expires"] = _add_months(start, months).isoformat()
        extra_rows.append(("card_expires", {"date": record["expires"]}))
    elif kind == "issue_subsidiary":
        record["card_no"], record["new_card_no"], record["primary_card_no"] = new_card_no, None, card
        extra_rows.append(("card_primary", {"card": _mask_card(card)}))
    receipt = {}
    for lang in LANGS:
        rows = [_label(f"card_{kind}", lang)]
        rows += [_label(label, lang, **kw) for label, kw in extra_rows]
        if fee:
            rows.append(f"{_label('fee', lang)}  {yuan(fee)}")
        receipt[lang] = rows
    return {"record": record, "receipt": receipt}


def _mask_card(card_no: str) -> str:
    return card_no[:4] + "*" * max(0, len(card_no) - 8) + card_no[-4:] if len(card_no) > 8 else card_no


WITHDRAWAL_MODES = ("none", "paid_part")
WITHDRAWAL_OFFLINE_MAX_PER_DAY_FEN = 50_000   # 500 yuan per account and day, unless the rules say otherwise


def withdrawal(policy: dict, member: dict, *, amount_fen: int, paid_known_fen: int, withdrawn_today_fen: int,
               offline_left_fen: int | None = None, now: datetime | None = None) -> dict:
    """取款: pay out ``amount_fen`` of the paid part of the member's stored
    value, as the chain's policy allows (``stored_value.withdrawal``, else
    ``accounts.withdrawal``, HQ's key; ``"none"``, the default:
    never at a store; ``"paid_part"``: up to the paid part this store can
    vouch for, ``paid_known_fen``, the balance, and what is left of
    ``stored_value.withdrawal_offline_max_per_day_fen`` (default 500 yuan)
    for the account today, and ``offline_left_fen``, what is left of the
    day's offline stored-value allowance). The bonus part (赠送) is never paid out."""
    if not isinstance(member, dict):
        raise PricingError("member_required", "member")
    if member.get("limited"):
        raise PricingError("member_limited", "member")
    sv = policy.get("stored_value") or {}
    mode = sv.get("withdrawal", (policy.get("accounts") or {}).get("withdrawal", "none"))
    if mode not in WITHDRAWAL_MODES or mode == "none":
        raise PricingError("withdrawal_not_allowed", "card_no")
    if type(amount_fen) is not int or not 1 <= amount_fen <= MAX_TOPUP_FEN:
        raise PricingError("withdrawal_invalid", "amount_fen", detail=f"amount_fen: whole fen from 1 to {MAX_TOPUP_FEN}")
    balance = member.get("balance_available_fen", 0)
    day_max = sv.get("withdrawal_offline_max_per_day_fen", WITHDRAWAL_OFFLINE_MAX_PER_DAY_FEN)
    limit = max(0, min(paid_known_fen, balance, day_max - withdrawn_today_fen,
                       offline_left_fen if offline_left_fen is not None else balance))
    if amount_fen > limit:
        raise PricingError("withdrawal_over_limit", "amount_fen", max=limit, paid=paid_known_fen,
                           balance=balance, _fen=("max", "paid", "balance"))
    record = {"type": "withdrawal", "v": 1, "at": now.isoformat() if now else None, **_member_base(member),
              "amount_fen": amount_fen, "paid_fen": amount_fen, "paid_known_fen": max(0, paid_known_fen),
              "balance_before_fen": balance, "balance_after_fen": balance - amount_fen,
              "deltas": {"stored_value_fen": -amount_fen}}
    receipt = {}
    for lang in LANGS:
        receipt[lang] = [f"{_label('withdrawal', lang)}  {yuan(amount_fen)}",
                         f"{_label('stored_value_left', lang)}  {yuan(balance - amount_fen)}"]
    return {"record": record, "receipt": receipt}
