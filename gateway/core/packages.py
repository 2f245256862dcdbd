"""Count packages (计次卡) sold and renewed at the counter. Pure.

``sell_package(policy, member, package_id, *, payment_method, now, rules_age_s=0, sync_age_s=None, expires=None)``
returns ``{"record": <package_sale body>, "receipt": {lang: [rows]}}`` or
raises PricingError naming the field. The rule is ``packages.<id>``
(wire/RULESET.md "Count packages sold at the counter"):

- sold only with both ``uses`` and ``price_fen``, inside its optional
  ``from``/``to`` dates (store time): otherwise ``package_not_sold``;
- a member who holds uses of it renews it (``renewal``): the uses are added
  to what is left; with ``renewable = false`` that is refused until they are
  used up (``package_not_renewable``); at most ``MAX_PACKAGE_USES`` in all;
- with ``validity_months`` the package is valid until that many months after
  the later of the sale day and its expiry so far (``expires``, by default
  the member's ``package_expires``: HQ's snapshot and the sales here since);
  without it, it does not expire (``expires`` None). A renewal of an expired
  package counts from the sale day and makes the uses left usable again;
- paid as a top-up is (cash, bank card, wallets: ``payment.method``), or
  from stored value (``stored_value``) when the rule says
  ``stored_value = true``: the price then goes through the very checks of a
  stored-value tender (gateway/core/pricing.py ``stored_value_payable``: the
  card type, the balance, the offline limits per transaction and per day,
  the balances' age);
- no points are earned on it and it is not spend for the tier rules (it is
  paid in advance, like a top-up); its uses are not spend either.
"""

from __future__ import annotations

from datetime import date, datetime

from gateway.core.pricing import (PricingError, _add_months, _member_base, check_stored_value,
                                  stored_value_payable)
from gateway.core.reasons import yuan
from gateway.core.texts import LANGS, label, name_of
from wire.records import MAX_PACKAGE_USES, PAYMENT_METHODS

STORED_VALUE = "stored_value"
METHODS = (*PAYMENT_METHODS, STORED_VALUE)   # how a package may be paid


def on_sale(pkg: dict | None, today: str) -> bool:
    """A package of the rules sold at the counter today (``YYYY-MM-DD``)."""
    return bool(pkg) and not pkg.get("disabled") and "uses" in pkg and "price_fen" in pkg \
        and (not pkg.get("from") or pkg["from"] <= today) and (not pkg.get("to") or today <= pkg["to"])


def sell_package(policy: dict, member: dict | None, package_id: str, *, payment_method: str, now: datetime,
                 rules_age_s: int = 0, sync_age_s: int | None = None, expires: str | None = None) -> dict:
    if not isinstance(member, dict):
        raise PricingError("member_required", "member")
    if member.get("limited"):
        raise PricingError("member_limited", "member")
    if payment_method not in METHODS:
        raise PricingError("package_payment_invalid", "payment.method",
                           detail=f"payment.method: one of {', '.join(METHODS)}")
    today = now.date()
    pkg = (policy.get("packages") or {}).get(package_id)
    if not on_sale(pkg, today.isoformat()):
        raise PricingError("package_not_sold", "package_id", code=package_id)
    uses, price = pkg["uses"], pkg["price_fen"]
    held = max((member.get("packages") or {}).get(package_id) or 0, 0)
    if held and not pkg.get("renewable", True):
        raise PricingError("package_not_renewable", "package_id", code=package_id, limit=held)
    if held + uses > MAX_PACKAGE_USES:
        raise PricingError("package_over_limit", "package_id", limit=MAX_PACKAGE_USES)

    sv = 0
    if payment_method == STORED_VALUE:
        if not pkg.get("stored_value", False):
            raise PricingError("package_stored_value_not_allowed", "payment.method", code=package_id)
        check_stored_value(price, stored_value_payable(member, policy, price, rules_age_s, sync_age_s),
                           "package_stored_value")
        sv = price

    if expires is None:
        expires = (member.get("package_expires") or {}).get(package_id)
    valid_until = None
    if pkg.get("validity_months"):
        start = max(today, date.fromisoformat(expires)) if held and expires else today
        valid_until = _add_months(start, pkg["validity_months"]).isoformat()
    record = {"type": "package_sale", "v": 1, "at": now.isoformat(), **_member_base(member),
              "package_id": package_id, "uses": uses, "price_fen": price, "stored_value_fen": sv,
              "renewal": held > 0, "remaining_before": held, "remaining_after": held + uses,
              "expires": valid_until,
              "deltas": {"packages": {package_id: uses}, "stored_value_fen": -sv}}
    name = name_of(pkg, package_id)
    balance = member.get("balance_available_fen", 0)
    receipt = {}
    for lang in LANGS:
        rows = [label("package_renewal" if held else "package_sale", lang, name=name[lang], uses=uses),
                f"{label('package_price', lang)}  {yuan(price)}"]
        if sv:
            rows += [f"{label('stored_value_paid', lang)}  {yuan(sv)}",
                     f"{label('stored_value_left', lang)}  {yuan(balance - sv)}"]
        rows.append(f"{label('package_left', lang)}  {held + uses}")
        if valid_until:
            rows.append(label("package_expires", lang, date=valid_until))
        receipt[lang] = rows
    return {"record": record, "receipt": receipt}
