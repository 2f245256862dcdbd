"""Points for gifts (礼品兑换) at the counter. Pure.

``redeem_gift(policy, member, gift_id, qty=1, *, now, rules_age_s=0, sync_age_s=None)``
returns ``{"record": <gift_redemption body>, "receipt": {lang: [rows]}}`` or
raises PricingError (TenderError for the points) naming the field. The rule
is ``gifts.<id>`` (wire/RULESET.md "Points for gifts"):

- the gift must be in the catalogue (``gift_unknown``) and inside its
  optional ``from``/``to`` dates, store time (``gift_not_offered``);
- ``per_member_day_limit``: at most that many of it per account and
  store-local day (``gift_day_limit``), counted in the ``gifts`` of the
  member's ``today`` (gateway/core/validate.py): online, HQ's live answer's
  gifts of the day at every store plus this store's own records after its
  ``store_seq``, so the limit is chain-wide; offline (or past the look-up's
  wait) this store's records of the day alone, so a member visiting two
  stores in a day gets it at each, and HQ's reconciliation reports the
  overrun (``day_gifts``, hq_bridge/reconcile.py);
- the points (``points`` x ``qty``) are spent the way a sale's redemption
  spends them, through the same checks (gateway/core/pricing.py
  ``points_spendable``/``check_points``): the member's points, the
  ``redemption`` offline limits per transaction and per day (a gift and a
  sale's redemption count against the same day), the rules' age, limited
  members. There is no share of a bill, minimum or step for a gift.

A gift is not returned at the counter: the record has no reversal (see
wire/RULESET.md).
"""

from __future__ import annotations

from datetime import datetime

from gateway.core.pricing import PricingError, _member_base, check_points, points_spendable
from gateway.core.texts import LANGS, label, name_of
from wire.records import MAX_GIFT_QTY

MAX_QTY = MAX_GIFT_QTY   # gifts of one kind in one redemption


def redeem_gift(policy: dict, member: dict | None, gift_id: str, qty: int = 1, *, now: datetime,
                rules_age_s: int = 0, sync_age_s: int | None = None) -> dict:
    if not isinstance(member, dict):
        raise PricingError("member_required", "member")
    if type(qty) is not int or not 1 <= qty <= MAX_QTY:
        raise PricingError("gift_invalid", "qty", detail=f"qty: a whole number from 1 to {MAX_QTY}")
    gift = (policy.get("gifts") or {}).get(gift_id)
    if not gift or gift.get("disabled"):
        raise PricingError("gift_unknown", "gift_id", code=gift_id)
    today = now.date().isoformat()
    if (gift.get("from") and today < gift["from"]) or (gift.get("to") and today > gift["to"]):
        raise PricingError("gift_not_offered", "gift_id", code=gift_id, start=gift.get("from", "-"),
                           end=gift.get("to", "-"))
    limit = gift.get("per_member_day_limit")
    used = ((member.get("today") or {}).get("gifts") or {}).get(gift_id, 0)
    if limit is not None and used + qty > limit:
        raise PricingError("gift_day_limit", "qty", code=gift_id, limit=limit, used=used)
    points = gift["points"] * qty
    check_points(points, points_spendable(member, policy, rules_age_s, sync_age_s), policy, "gift")

    before = member.get("points_available", 0)
    record = {"type": "gift_redemption", "v": 1, "at": now.isoformat(), **_member_base(member),
              "gift_id": gift_id, "qty": qty, "points_each": gift["points"], "points": points,
              "points_before": before, "points_after": before - points,
              "deltas": {"points": -points, "points_redeemed": points, "gifts": {gift_id: qty}}}
    name = name_of(gift, gift_id)
    receipt = {lang: [label("gift", lang, name=name[lang], qty=qty),
                      f"{label('gift_points', lang)}  -{points}",
                      f"{label('points_balance', lang)}  {before - points}"] for lang in LANGS}
    return {"record": record, "receipt": receipt}
