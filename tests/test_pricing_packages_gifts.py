"""Count packages sold and renewed, points for gifts: the pure core
(gateway/core/packages.py, gifts.py) on tests/test_pricing.py's policy and
members, every number worked out by hand in the comments. The points and
stored-value checks are the sale's own (gateway/core/pricing.py), so the
refusals carry the same codes and texts."""

from copy import deepcopy
from datetime import datetime

import pytest

from gateway.core import gifts, packages, pricing
from gateway.core.pricing import PricingError, TenderError
from tests.test_pricing import GOLD, POLICY, SILVER, THU, TZ, WED, n
from wire.records import from_body, to_body, validate_body


def _policy():
    policy = deepcopy(POLICY)
    policy["packages"]["car_wash10"].update(uses=10, price_fen=30000, validity_months=12, stored_value=True)
    policy["packages"]["coffee20"] = {"name": n("咖啡20杯卡", "Coffee x20"), "skus": ["COF"], "uses": 20,
                                      "price_fen": 20000, "renewable": False, "to": "2026-11-25"}
    policy["packages"]["given"] = {"name": n("赠送卡", "Given"), "skus": ["X"]}   # no price: HQ hands it out
    policy["gifts"] = {
        "umbrella": {"name": n("雨伞", "Umbrella"), "points": 2000, "per_member_day_limit": 1},
        "mug": {"name": n("马克杯", "Mug"), "points": 800},
        "calendar": {"name": n("台历", "Desk calendar"), "points": 100, "from": "2026-12-01"},
    }
    return policy


P = _policy()


def _journal(record: dict, **more) -> dict:
    """The body as the counter journals it (what it adds to every record)."""
    body = {**record, "lane": "1", "idempotency_key": "pos1/key-00000001", "account_id": record["member_id"],
            "day": "2026-11-26", "terminal": "pos1", **more}
    assert to_body(from_body(body["type"], validate_body(body["type"], body))) == body
    return body


# ---------------------------------------------------------------- packages

def test_a_renewal_adds_the_uses_and_extends_the_validity():
    # GOLD holds 3 car washes; the rule: 10 uses for 300.00, valid 12 months.
    out = packages.sell_package(P, GOLD, "car_wash10", payment_method="cash", now=THU)
    rec = out["record"]
    assert (rec["renewal"], rec["remaining_before"], rec["remaining_after"]) == (True, 3, 13)
    assert (rec["price_fen"], rec["stored_value_fen"], rec["expires"]) == (30000, 0, "2027-11-26")
    assert rec["deltas"] == {"packages": {"car_wash10": 10}, "stored_value_fen": 0}
    assert out["receipt"]["zh-CN"] == ["续费次卡洗车10次卡 10次", "应付金额  300.00", "剩余次数  13",
                                       "有效期至 2027-11-26"]
    assert out["receipt"]["en"] == ["Car wash x10: renewed, 10 use(s) added", "Price  300.00", "Uses left  13",
                                    "Valid until 2027-11-26"]
    _journal(rec, payment={"method": "cash"})
    # Its expiry so far is later than today: 12 months from it (2027-03-31 -> 2028-03-31).
    later = packages.sell_package(P, GOLD, "car_wash10", payment_method="cash", now=THU, expires="2027-03-31")
    assert later["record"]["expires"] == "2028-03-31"
    # ... a past expiry counts from today; a new package ignores one.
    assert packages.sell_package(P, GOLD, "car_wash10", payment_method="cash", now=THU,
                                 expires="2026-01-31")["record"]["expires"] == "2027-11-26"


def test_a_new_package_paid_from_stored_value_goes_through_the_tender_checks():
    # SILVER holds none; 100.00 stored value, the package is 300.00.
    with pytest.raises(TenderError) as short:
        packages.sell_package(P, SILVER, "car_wash10", payment_method="stored_value", now=THU)
    assert (short.value.code, short.value.field) == ("stored_value_insufficient", "payment.method")
    assert short.value.text["en"] == "Stored-value balance is 100.00; asked 300.00"
    rich = {**SILVER, "balance_available_fen": 80000}
    out = packages.sell_package(P, rich, "car_wash10", payment_method="stored_value", now=THU)
    rec = out["record"]
    assert (rec["renewal"], rec["remaining_after"], rec["stored_value_fen"]) == (False, 10, 30000)
    assert rec["deltas"] == {"packages": {"car_wash10": 10}, "stored_value_fen": -30000}
    assert out["receipt"]["zh-CN"][:4] == ["购买次卡洗车10次卡 10次", "应付金额  300.00", "储值支付  300.00",
                                           "储值余额  500.00"]
    _journal(rec, payment={"method": "stored_value"})
    # the day's offline allowance: 1,000.00 a day, 800.00 used: 200.00 left
    spent = {**rich, "today": {**rich["today"], "stored_value_paid_fen": 80000}}
    with pytest.raises(TenderError) as day:
        packages.sell_package(P, spent, "car_wash10", payment_method="stored_value", now=THU)
    assert (day.value.code, day.value.params["limit"]) == ("stored_value_offline_day_limit", 20000)
    # balances older than max_sync_age_s (86,400 s): refused for age, as a tender is
    with pytest.raises(TenderError) as stale:
        packages.sell_package(P, rich, "car_wash10", payment_method="stored_value", now=THU, rules_age_s=60,
                              sync_age_s=90000)
    assert (stale.value.code, stale.value.field) == ("sync_stale", "payment.method")
    assert "paying a package with stored value" in stale.value.text["en"]
    # a card type without stored value (staff card)
    with pytest.raises(TenderError) as staff:
        packages.sell_package(P, {**rich, "card_type": "staff"}, "car_wash10", payment_method="stored_value",
                              now=THU)
    assert staff.value.code == "stored_value_not_allowed"


@pytest.mark.parametrize("member,package,method,when,code,field", [
    (GOLD, "gold_bar", "cash", THU, "package_not_sold", "package_id"),
    (GOLD, "given", "cash", THU, "package_not_sold", "package_id"),             # no price_fen, no uses
    (GOLD, "coffee20", "cash", THU, "package_not_sold", "package_id"),          # on sale until 2026-11-25
    (GOLD, "coffee20", "stored_value", WED, "package_stored_value_not_allowed", "payment.method"),
    ({**GOLD, "packages": {"coffee20": 1}}, "coffee20", "cash", WED, "package_not_renewable", "package_id"),
    ({**GOLD, "packages": {"car_wash10": 99_991}}, "car_wash10", "cash", THU, "package_over_limit", "package_id"),
    ({**GOLD, "limited": True}, "car_wash10", "cash", THU, "member_limited", "member"),
    (None, "car_wash10", "cash", THU, "member_required", "member"),
    (GOLD, "car_wash10", "iou", THU, "package_payment_invalid", "payment.method"),
])
def test_package_sales_refused(member, package, method, when, code, field):
    with pytest.raises(PricingError) as e:
        packages.sell_package(P, member, package, payment_method=method, now=when)
    assert (e.value.code, e.value.field) == (code, field)
    assert e.value.text["zh-CN"] and e.value.text["en"]


def test_a_used_up_package_not_renewable_is_sold_again():
    out = packages.sell_package(P, {**GOLD, "packages": {"coffee20": 0}}, "coffee20", payment_method="wechat",
                                now=WED)
    assert (out["record"]["renewal"], out["record"]["remaining_after"], out["record"]["expires"]) == (False, 20, None)


# ---------------------------------------------------------------- gifts

def test_a_gift_spends_points_as_a_redemption_does():
    out = gifts.redeem_gift(P, GOLD, "mug", 3, now=THU)
    rec = out["record"]
    # 3 x 800 = 2,400 of 5,230
    assert (rec["points_each"], rec["points"], rec["points_before"], rec["points_after"]) == (800, 2400, 5230, 2830)
    assert rec["deltas"] == {"points": -2400, "points_redeemed": 2400, "gifts": {"mug": 3}}
    assert out["receipt"] == {"zh-CN": ["礼品兑换 马克杯 x3", "使用积分  -2400", "积分余额  2830"],
                              "en": ["Gift Mug x3", "Points used  -2400", "Points balance  2830"]}
    _journal(rec)


@pytest.mark.parametrize("member,gift,qty,age,code,field,en", [
    (GOLD, "mug", 7, 0, "points_insufficient", "gift_id", "Only 5230 points available; asked 5600"),
    ({**GOLD, "points_available": 50000}, "mug", 13, 0, "points_offline_tx_limit", "gift_id",
     "Offline limit per transaction is 10000 points; asked 10400"),
    ({**GOLD, "points_available": 50000, "today": {"points_redeemed": 19500}}, "mug", 1, 0,
     "points_offline_day_limit", "gift_id", "Offline limit left today is 500 points; asked 800"),
    (GOLD, "mug", 1, 700_000, "rules_stale", "gift_id", None),
    ({**GOLD, "limited": True}, "mug", 1, 0, "member_limited", "gift_id", None),
    (None, "mug", 1, 0, "member_required", "member", None),
    (GOLD, "yacht", 1, 0, "gift_unknown", "gift_id", "Gift yacht is not in the gift catalogue"),
    (GOLD, "calendar", 1, 0, "gift_not_offered", "gift_id", "Gift calendar can be redeemed from 2026-12-01 to -"),
    (GOLD, "umbrella", 2, 0, "gift_day_limit", "qty", "Gift umbrella: at most 1 per member a day; 0 redeemed today"),
    ({**GOLD, "today": {"gifts": {"umbrella": 1}}}, "umbrella", 1, 0, "gift_day_limit", "qty", None),
    (GOLD, "mug", 0, 0, "gift_invalid", "qty", None),
    (GOLD, "mug", 100, 0, "gift_invalid", "qty", None),
    (GOLD, "mug", True, 0, "gift_invalid", "qty", None),
])
def test_gifts_refused(member, gift, qty, age, code, field, en):
    with pytest.raises(PricingError) as e:
        gifts.redeem_gift(P, member, gift, qty, now=THU, rules_age_s=age)
    assert (e.value.code, e.value.field) == (code, field)
    if en:
        assert e.value.text["en"] == en


def test_gift_and_sale_share_one_points_availability():
    """The caps a gift checks are redeemable()'s, without the bill's share,
    minimum and steps: one implementation (pricing._points_caps)."""
    member = {**GOLD, "points_available": 7777, "today": {"points_redeemed": 15000}}
    spend = pricing.points_spendable(member, P, 0)
    red = pricing.redeemable(member, P, 10**9, 0)
    assert spend["limits"] == {k: v for k, v in red["limits"].items() if k != "points_max_share"}
    assert spend["max_points"] == 5000                    # 20,000 - 15,000 left today
    assert red["max_points"] == 5000                      # in steps of 100: the same here
    assert pricing.points_spendable(None, P, 0)["reason"] == "member_required"


# ---------------------------------------------------------------- a package's expiry

def test_a_use_after_the_package_expired_is_refused_naming_it():
    # GOLD's 3 car washes were valid through 2026-11-25 (WED): used that day, refused the next (THU).
    held = {**GOLD, "package_expires": {"car_wash10": "2026-11-25"}}
    assert pricing.consume_package(P, held, "car_wash10", 1, now=WED)["record"]["remaining_after"] == 2
    with pytest.raises(PricingError) as late:
        pricing.consume_package(P, held, "car_wash10", 1, now=THU)
    assert (late.value.code, late.value.field, late.value.status) == ("package_expired", "package_id", 422)
    assert late.value.text == {"zh-CN": "次卡洗车10次卡已于2026-11-25到期，续费后可继续使用",
                               "en": "Package Car wash x10 expired on 2026-11-25; renew it to use it again"}
    # a package without an expiry never expires
    assert pricing.consume_package(P, GOLD, "car_wash10", 1, now=THU)["record"]["remaining_after"] == 2


def test_a_renewal_counts_from_the_expiry_the_member_view_carries():
    # The counter passes no ``expires``: the member's view says 2027-03-31 -> 12 months on, 2028-03-31.
    held = {**GOLD, "package_expires": {"car_wash10": "2027-03-31"}}
    assert packages.sell_package(P, held, "car_wash10", payment_method="cash", now=THU)["record"]["expires"] \
        == "2028-03-31"
    # expired on 2026-11-25: from the sale day, and the 3 uses left come back with the 10 bought
    lapsed = {**GOLD, "package_expires": {"car_wash10": "2026-11-25"}}
    rec = packages.sell_package(P, lapsed, "car_wash10", payment_method="cash", now=THU)["record"]
    assert (rec["expires"], rec["remaining_before"], rec["remaining_after"]) == ("2027-11-26", 3, 13)
