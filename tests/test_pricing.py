"""The pricing core: worked cases from a realistic store policy.

Every expected number and receipt line below is worked out by hand (the
arithmetic is in the comments), not produced by the code.
"""

from copy import deepcopy
from datetime import datetime
from zoneinfo import ZoneInfo

import pytest

from gateway.core import pricing
from gateway.core.pricing import PricingError, ReturnError, TenderError

TZ = ZoneInfo("Asia/Shanghai")
WED = datetime(2026, 11, 25, 10, 30, tzinfo=TZ)   # a Wednesday: member day
THU = datetime(2026, 11, 26, 11, 0, tzinfo=TZ)


def n(zh, en):
    return {"zh-CN": zh, "en": en}


# The effective rule set of store S001 (region east), every default written out.
POLICY = {
    "version": 42,
    "max_age_s": 604800,
    "default_tier": "normal",
    "tiers": {
        "normal": {"name": n("普通会员", "Member"), "rank": 1, "discount_percent": 0, "points_multiplier_percent": 100},
        "silver": {"name": n("银卡会员", "Silver"), "rank": 2, "discount_percent": 2, "points_multiplier_percent": 120},
        "gold": {"name": n("金卡会员", "Gold"), "rank": 3, "discount_percent": 5, "points_multiplier_percent": 150},
    },
    "card_types": {
        "personal": {"name": n("个人卡", "Personal card"), "kind": "personal", "earns_points": True,
                     "stored_value": True, "discount_percent": 0},
        "staff": {"name": n("员工折扣卡", "Staff card"), "kind": "discount", "earns_points": False,
                  "stored_value": False, "discount_percent": 10},
    },
    "discount_excluded_categories": ["tobacco", "infant_formula", "gift_card"],
    "discount_excluded_skus": [],
    "earning": {
        "points_per_yuan": 1, "min_spend_fen": 0,
        "excluded_categories": ["tobacco", "gift_card"], "excluded_skus": [],
        "category_multipliers_percent": {"fresh": 200},
        "sku_multipliers_percent": {"6901234567892": 300},
        "member_days": [{"weekdays": [3], "month_days": [], "from": "2026-01-01", "to": "2026-12-31",
                         "multiplier_percent": 200}],
        "birthday": {"period": "month", "multiplier_percent": 200},
    },
    "promotions": {
        "spend100": {"name": n("满100减20，满200减50", "Spend 100 save 20, 200 save 50"), "kind": "threshold",
                     "steps": [{"min_fen": 10000, "off_fen": 2000}, {"min_fen": 20000, "off_fen": 5000}],
                     "categories": [], "skus": [], "priority": 10, "exclusive_group": "", "tiers": [],
                     "member_only": True, "stores": [], "regions": [], "weekdays": [],
                     "from": "2026-11-01T00:00", "to": "2026-11-30T23:59"},
        "fresh10": {"name": n("生鲜9折", "Fresh 10% off"), "kind": "percent_off", "percent": 10,
                    "categories": ["fresh"], "skus": [], "priority": 5, "exclusive_group": "", "tiers": [],
                    "member_only": False, "stores": [], "regions": [], "weekdays": []},
        "milk_mp": {"name": n("会员价牛奶", "Member price milk"), "kind": "member_price",
                    "prices_fen": {"6900000000011": 990}, "categories": [], "skus": [], "priority": 1,
                    "exclusive_group": "", "tiers": [], "member_only": True, "stores": [], "regions": [],
                    "weekdays": []},
        "second_half": {"name": n("第二件半价", "Second at half price"), "kind": "nth_item", "n": 2, "percent": 50,
                        "categories": [], "skus": ["6900000000028"], "priority": 2, "exclusive_group": "",
                        "tiers": [], "member_only": False, "stores": [], "regions": [], "weekdays": []},
        "dairy15": {"name": n("乳品85折", "Dairy 15% off"), "kind": "percent_off", "percent": 15,
                    "categories": ["dairy"], "skus": [], "priority": 8, "exclusive_group": "dairy", "tiers": [],
                    "member_only": True, "stores": [], "regions": [], "weekdays": []},
        "dairy_spend": {"name": n("乳品满30减8", "Dairy: spend 30 save 8"), "kind": "threshold",
                        "steps": [{"min_fen": 3000, "off_fen": 800}], "categories": ["dairy"], "skus": [],
                        "priority": 8, "exclusive_group": "dairy", "tiers": [], "member_only": True,
                        "stores": [], "regions": [], "weekdays": []},
        "snack_pts": {"name": n("零食双倍积分", "Double points on snacks"), "kind": "points_multiplier",
                      "multiplier_percent": 200, "categories": ["snacks"], "skus": [], "priority": 20,
                      "exclusive_group": "", "tiers": [], "member_only": True, "stores": [], "regions": [],
                      "weekdays": []},
        # Scoped out in the worked cases unless the case says otherwise:
        "gold_s002": {"name": n("S002金卡专享", "S002 gold only"), "kind": "percent_off", "percent": 30,
                      "categories": ["snacks"], "skus": [], "priority": 3, "exclusive_group": "", "tiers": ["gold"],
                      "member_only": True, "stores": ["S002"], "regions": [], "weekdays": []},
        "weekend_snacks": {"name": n("周末零食8折", "Weekend snacks 20% off"), "kind": "percent_off", "percent": 20,
                           "categories": ["snacks"], "skus": [], "priority": 3, "exclusive_group": "", "tiers": [],
                           "member_only": True, "stores": [], "regions": ["east"], "weekdays": [6, 7]},
        "once_a_day": {"name": n("每日一次零食立减", "Snacks, once a day"), "kind": "percent_off", "percent": 5,
                       "categories": ["snacks"], "skus": [], "priority": 4, "exclusive_group": "", "tiers": [],
                       "member_only": True, "stores": [], "regions": [], "weekdays": [], "per_member_limit": 1},
    },
    "redemption": {"points_per_yuan": 100, "min_points": 500, "max_share_percent": 50, "step_points": 100,
                   "offline_max_points_per_tx": 10000, "offline_max_points_per_day": 20000},
    "stored_value": {
        "offline_max_per_tx_fen": 50000, "offline_max_per_day_fen": 100000, "max_sync_age_s": 86400,
        "topup_packages": {
            "p500": {"pay_fen": 50000, "bonus_fen": 5000, "name": n("充500送50", "Top up 500, get 50")},
            "p1000": {"pay_fen": 100000, "bonus_fen": 15000, "name": n("充1000送150", "Top up 1000, get 150")},
        },
    },
    "packages": {"car_wash10": {"name": n("洗车10次卡", "Car wash x10"), "skus": ["SVC-CARWASH"]}},
    "coupons": {
        "C2026-0001": {"member_id": "M1002", "value_fen": 1000, "min_spend_fen": 5000,
                       "from": "2026-11-01", "to": "2026-12-31"},
        "C2026-0002": {"member_id": "M1001", "value_fen": 500, "min_spend_fen": 0,
                       "from": "2026-11-01", "to": "2026-11-20"},
    },
    "fees": {"issue_fen": 1000, "replace_fen": 500, "annual_fen": 0},
}

GOLD = {"member_id": "M1001", "card_no": "880000000013", "tier": "gold", "card_type": "personal",
        "birthday": "03-15", "birthday_calendar": "solar", "points_available": 5230,
        "balance_available_fen": 20000, "packages": {"car_wash10": 3}, "coupons": ["C2026-0002"],
        "today": {"points_redeemed": 0, "stored_value_paid_fen": 0, "promotion_uses": {}, "coupons_used": []},
        "limited": False}
SILVER = {"member_id": "M1002", "card_no": "880000000021", "tier": "silver", "card_type": "personal",
          "birthday": "11-03", "birthday_calendar": "solar", "points_available": 3000,
          "balance_available_fen": 10000, "packages": {}, "coupons": ["C2026-0001"],
          "today": {"points_redeemed": 0, "stored_value_paid_fen": 0, "promotion_uses": {}, "coupons_used": []},
          "limited": False}
NORMAL = {"member_id": "M1003", "card_no": "880000000039", "tier": "normal", "card_type": "personal",
          "points_available": 0, "balance_available_fen": 0}

RICE = {"sku": "6901234567892", "name": "大米 5kg", "category": "staples", "qty": 1, "unit_price": 4990}
APPLES = {"sku": "6900000000035", "name": "苹果", "category": "fresh", "qty": 4, "unit_price": 1650}
CIGS = {"sku": "6901028075831", "name": "香烟", "category": "tobacco", "qty": 1, "unit_price": 2500}


def test_gold_member_day_with_threshold_and_fresh_discount():
    q = pricing.quote([RICE, APPLES, CIGS], GOLD, POLICY, WED, store="S001", region="east")
    # Gold 5%, half-up per line: rice 4990*5% = 249.5 -> 250 (net 4740); apples 6600*5% = 330 (6270);
    # cigarettes excluded. fresh10 (priority 5): 6270*10% = 627 (5643). spend100 (priority 10) over
    # rice+apples 4740+5643 = 10383 >= 10000: 20.00 off, pro rata floored: rice 2000*4740/10383 = 913.03
    # -> 913, apples 1086.97 -> 1086, remainder 1 to the last line -> 1087.
    assert [(l["discount"], l["net"]) for l in q["lines"]] == [(1163, 3827), (2044, 4556), (0, 2500)]
    assert (q["subtotal"], q["discount"], q["total"]) == (14090, 3207, 10883)
    # Points on 3827 + 4556 = 83.83 yuan (tobacco excluded), in running floors:
    #   base 100%: 83.83 -> 83; gold +50%: 125.745 -> 125 (+42); fresh +100% on 45.56: 171.305 -> 171 (+46);
    #   rice SKU 300% (+200% on 38.27): 247.845 -> 247 (+76); member day +100%: 331.675 -> 331 (+84).
    assert q["points"]["earned"] == 331
    assert [l["points_earned"] for l in q["lines"]] == [172, 159, 0]  # 3827*4.5 = 172.215; 331 - 172
    assert q["receipt"]["zh-CN"] == [
        "会员: 金卡会员",
        "大米 5kg x1  49.90",
        "  金卡会员折扣5%  -2.50",
        "  满100减20，满200减50（分摊）  -9.13",
        "苹果 x4  66.00",
        "  金卡会员折扣5%  -3.30",
        "  生鲜9折  -6.27",
        "  满100减20，满200减50（分摊）  -10.87",
        "香烟 x1  25.00",
        "商品合计  140.90",
        "优惠合计  -32.07",
        "  金卡会员折扣5%  -5.80",
        "  生鲜9折  -6.27",
        "  满100减20，满200减50  -20.00",
        "应付金额  108.83",
        "本次积分  331",
        "  基础积分（每元1分）  83",
        "  金卡会员 150%  +42",
        "  类别fresh 200%  +46",
        "  商品6901234567892 300%  +76",
        "  会员日 200%  +84",
        "积分余额  5561",
    ]
    assert q["receipt"]["en"] == [
        "Member: Gold",
        "大米 5kg x1  49.90",
        "  Gold discount 5%  -2.50",
        "  Spend 100 save 20, 200 save 50 (share)  -9.13",
        "苹果 x4  66.00",
        "  Gold discount 5%  -3.30",
        "  Fresh 10% off  -6.27",
        "  Spend 100 save 20, 200 save 50 (share)  -10.87",
        "香烟 x1  25.00",
        "Subtotal  140.90",
        "Discounts  -32.07",
        "  Gold discount 5%  -5.80",
        "  Fresh 10% off  -6.27",
        "  Spend 100 save 20, 200 save 50  -20.00",
        "Total  108.83",
        "Points earned  331",
        "  Base (1 per yuan)  83",
        "  Gold 150%  +42",
        "  Category fresh 200%  +46",
        "  Item 6901234567892 300%  +76",
        "  Member day 200%  +84",
        "Points balance  5561",
    ]
    d = q["record"]["deltas"]
    assert d == {"points": 331, "points_earned": 331, "points_redeemed": 0, "stored_value_fen": 0,
                 "promotion_uses": {"fresh10": 1, "spend100": 1}, "coupons_used": []}
    assert q["record"]["rules_version"] == 42
    # The threshold's second step: the same basket twice is 20766 after fresh10 -> 50.00 off.
    q2 = pricing.quote([RICE, APPLES, CIGS, RICE, APPLES], GOLD, POLICY, WED, store="S001")
    assert [p["fen"] for p in q2["promotions"] if p["source"] == "spend100"] == [5000]


def test_anonymous_customer_gets_only_promotions_open_to_everyone():
    cola = {"sku": "6900000000028", "name": "可乐", "category": "drinks", "qty": 3, "unit_price": 350}
    apples = {**APPLES, "qty": 2}
    q = pricing.quote([cola, apples], None, POLICY, THU, store="S001", region="east")
    # second_half: 3 units -> the 2nd is half price: 1050 * 1 * 50% / 3 = 175.0 -> 175.
    # fresh10: 3300 * 10% = 330. spend100 and member prices are for members only.
    assert [(l["discount"], l["net"]) for l in q["lines"]] == [(175, 875), (330, 2970)]
    assert q["receipt"]["en"] == [
        "可乐 x3  10.50",
        "  Second at half price  -1.75",
        "苹果 x2  33.00",
        "  Fresh 10% off  -3.30",
        "Subtotal  43.50",
        "Discounts  -5.05",
        "  Second at half price  -1.75",
        "  Fresh 10% off  -3.30",
        "Total  38.45",
    ]
    assert q["points"]["earned"] == 0 and q["balances_after"] is None
    assert q["record"]["member"] is None


MILK = {"sku": "6900000000011", "name": "牛奶", "category": "dairy", "qty": 2, "unit_price": 1290}
BREAD = {"sku": "6900000000042", "name": "面包", "category": "bakery", "qty": 1, "unit_price": 1500}
SOAP = {"sku": "6900000000059", "name": "洗衣液", "category": "household", "qty": 1, "unit_price": 5800}
TENDER_C = {"points": 2000, "stored_value_fen": 3000, "coupons": ["C2026-0001"]}


def _silver_sale():
    return pricing.quote([MILK, BREAD, SOAP], SILVER, POLICY, THU, store="S001", region="east", tender=TENDER_C)


def test_silver_birthday_month_with_coupon_points_and_stored_value():
    q = _silver_sale()
    # Silver 2%: milk 2580 -> 51.6 -> 52 (2528); bread 30 (1470); soap 116 (5684).
    # Member price milk 9.90 x 2 = 1980: 2528 - 1980 = 548 off.
    # Dairy group: dairy15 1980 * 15% = 297 vs dairy_spend (1980 < 3000) 0 -> dairy15 (1683).
    # spend100 not reached (1683 + 1470 + 5684 = 8837 < 10000).
    assert [d["source"] for d in q["lines"][0]["discounts"]] == ["tier:silver", "milk_mp", "dairy15",
                                                                  "coupon:C2026-0001"]
    # After dairy15: milk 1683. Coupon 10.00 over 1683 + 1470 + 5684 = 8837 (>= 50.00):
    #   1000*1683/8837 = 190.44 -> 190; 1470 -> 166.34 -> 166; 5684 -> 643.20 -> 643; remainder 1 -> soap 644.
    assert [l["net"] for l in q["lines"]] == [1493, 1304, 5040]
    assert (q["subtotal"], q["discount"], q["total"]) == (9880, 2043, 7837)
    # Redemption 2000 points = 20.00 (100 points per yuan); cap 50% of 78.37 = 3918 points, have 3000.
    #   2000*1493/7837 = 381.0 -> 381; 1304 -> 332.78 -> 332; 5040 -> 1286.20 -> 1286; remainder 1 -> 1287.
    # Stored value 30.00 over what is left 1112 + 972 + 3753 = 5837:
    #   3000*1112/5837 = 571.5 -> 571; 972 -> 499.57 -> 499; 3753 -> 1928.9 -> 1928; remainder 2 -> 1930.
    assert [(l["redeemed_fen"], l["stored_value_fen"], l["cash_fen"]) for l in q["lines"]] == [
        (381, 571, 541), (332, 499, 473), (1287, 1930, 1823)]
    # Points on money paid 1112 + 972 + 3753 = 58.37 yuan: base 58; silver +20% = 70.044 -> 70 (+12);
    # birthday month (November) +100%: 128.414 -> 128 (+58). Thursday: no member day.
    assert q["points"]["earned"] == 128
    assert [l["points_earned"] for l in q["lines"]] == [24, 21, 83]  # 1112*2.2 = 24.46; 45.85 -> 45; 128
    assert q["receipt"]["zh-CN"] == [
        "会员: 银卡会员",
        "牛奶 x2  25.80",
        "  银卡会员折扣2%  -0.52",
        "  会员价牛奶  -5.48",
        "  乳品85折  -2.97",
        "  优惠券C2026-0001（分摊）  -1.90",
        "面包 x1  15.00",
        "  银卡会员折扣2%  -0.30",
        "  优惠券C2026-0001（分摊）  -1.66",
        "洗衣液 x1  58.00",
        "  银卡会员折扣2%  -1.16",
        "  优惠券C2026-0001（分摊）  -6.44",
        "商品合计  98.80",
        "优惠合计  -20.43",
        "  银卡会员折扣2%  -1.98",
        "  会员价牛奶  -5.48",
        "  乳品85折  -2.97",
        "  优惠券C2026-0001  -10.00",
        "应付金额  78.37",
        "积分抵现 2000分  -20.00",
        "储值支付  -30.00",
        "现金等应付  28.37",
        "储值余额  70.00",
        "本次积分  128",
        "  基础积分（每元1分）  58",
        "  银卡会员 120%  +12",
        "  生日月 200%  +58",
        "积分余额  1128",
    ]
    assert q["receipt"]["en"][-10:] == [
        "Total  78.37",
        "Points redeemed 2000  -20.00",
        "Stored value paid  -30.00",
        "To pay (cash/other)  28.37",
        "Stored value balance  70.00",
        "Points earned  128",
        "  Base (1 per yuan)  58",
        "  Silver 120%  +12",
        "  Birthday month 200%  +58",
        "Points balance  1128",
    ]
    assert q["record"]["deltas"] == {"points": -1872, "points_earned": 128, "points_redeemed": 2000,
                                     "stored_value_fen": -3000,
                                     "promotion_uses": {"milk_mp": 1, "dairy15": 1},
                                     "coupons_used": ["C2026-0001"]}
    assert q["tender"] == {"points": 2000, "points_fen": 2000, "stored_value_fen": 3000,
                           "coupons": ["C2026-0001"], "cash_fen": 2837}


def test_partial_returns_reverse_the_silver_sale_exactly():
    sale = _silver_sale()["record"]
    # First: one of the two milks, half of its 25.80: 12.90, split over the line's parts pro rata,
    # floored (each is v*1/2 here): redeemed 381 -> 190, stored value 571 -> 285, cash 541 -> 270;
    # discounts 52 -> 26, 548 -> 274, 297 -> 148, 190 -> 95; 1288 in all, the remainder 2 to the last
    # part with room, the coupon's share: 97 (545 of discounts reversed). Points: 381 -> 190, earned 24 -> 12.
    # The receipt's rows add up: 12.90 - 5.45 = 7.45 refunded (until this release it printed the
    # milk at 12.88 and 5.43 of discounts: the floors of the parts, not half the price).
    r1 = pricing.return_quote(sale, [{"line": 0, "qty": 1}], [], POLICY, THU)
    assert r1["totals"] == {"refund_fen": 745, "discount": 545, "cash_fen": 270, "stored_value_fen": 285,
                            "redeemed_fen": 190, "points_redeemed": 190, "points_earned": 12}
    assert r1["deltas"] == {"points": 178, "points_earned": -12, "points_redeemed": -190, "stored_value_fen": 285}
    assert r1["receipt"]["zh-CN"] == [
        "退货",
        "牛奶 x1  12.90",
        "  冲回优惠  -5.45",
        "退款合计  7.45",
        "  退回抵现积分 190分  1.90",
        "  退回储值  2.85",
        "  退现金等  2.70",
        "扣回积分  -12",
    ]
    assert r1["receipt"]["en"][-4:] == ["  Redeemed points returned 190  1.90", "  Refund to stored value  2.85",
                                        "  Refund (cash/other)  2.70", "Points taken back  -12"]
    # Second: the other milk (by SKU) and the rest: milk gets v - floor(v/2), the others all of theirs.
    r2 = pricing.return_quote(sale, [{"sku": "6900000000011", "qty": 1}, {"line": 1, "qty": 1},
                                     {"line": 2, "qty": 1}], [r1["record"]], POLICY, THU)
    t = r2["totals"]
    assert (t["cash_fen"], t["stored_value_fen"], t["redeemed_fen"], t["points_earned"]) == (
        271 + 473 + 1823, 286 + 499 + 1930, 191 + 332 + 1287, 12 + 21 + 83)
    # Together: the sale's 30.00 stored value, 2000 points redeemed and 128 earned, exactly.
    assert r1["deltas"]["stored_value_fen"] + r2["deltas"]["stored_value_fen"] == 3000
    assert r1["deltas"]["points"] + r2["deltas"]["points"] == 2000 - 128
    with pytest.raises(ReturnError, match=r"return_lines\[0\]\.qty: Cannot return more than the 0 left") as e:
        pricing.return_quote(sale, [{"line": 0, "qty": 1}], [r1["record"], r2["record"]], POLICY, THU)
    assert e.value.code == "return_qty_exceeds"
    assert e.value.text["zh-CN"] == "退货数量超出可退数量0（本次1）"
    with pytest.raises(ReturnError, match=r"return_lines\[0\]\.sku"):
        pricing.return_quote(sale, [{"sku": "nope", "qty": 1}], [], POLICY, THU)
    with pytest.raises(ReturnError, match=r"return_lines\[0\]\.qty: Cannot return more than the 2 left"):
        pricing.return_quote(sale, [{"line": 0, "qty": 3}], [], POLICY, THU)


YOGURT = {"sku": "6900000000066", "name": "酸奶", "category": "dairy", "qty": 4, "unit_price": 650}
CHEESE = {"sku": "6900000000073", "name": "奶酪", "category": "dairy", "qty": 1, "unit_price": 1200}


def test_exclusive_group_picks_the_best_for_the_customer():
    # dairy15: 2600*15% = 390 + 1200*15% = 180 -> 570; dairy_spend: 3800 >= 3000 -> 800. 800 wins.
    q = pricing.quote([YOGURT, CHEESE], NORMAL, POLICY, THU, store="S001", region="east")
    # 800 over 2600 + 1200: 2600 -> 547.37 -> 547, remainder to cheese 253.
    assert q["receipt"]["zh-CN"] == [
        "会员: 普通会员",
        "酸奶 x4  26.00",
        "  乳品满30减8（分摊）  -5.47",
        "奶酪 x1  12.00",
        "  乳品满30减8（分摊）  -2.53",
        "商品合计  38.00",
        "优惠合计  -8.00",
        "  乳品满30减8  -8.00",
        "应付金额  30.00",
        "本次积分  30",
        "  基础积分（每元1分）  30",
        "积分余额  30",
    ]
    # Yogurt alone does not reach 30.00: dairy_spend saves nothing, dairy15 saves 390.
    q = pricing.quote([YOGURT], NORMAL, POLICY, THU, store="S001")
    assert [(p["source"], p["fen"]) for p in q["promotions"]] == [("dairy15", 390)]
    # A tie (same 15%) goes to the smaller id.
    tie = deepcopy(POLICY)
    tie["promotions"]["dairy14b"] = {**tie["promotions"]["dairy15"], "name": n("乙", "B")}
    tie["promotions"]["dairy_spend"]["disabled"] = True
    q = pricing.quote([YOGURT], NORMAL, tie, THU, store="S001")
    assert [p["source"] for p in q["promotions"]] == ["dairy14b"]


CHIPS = {"sku": "6900000000080", "name": "薯片", "category": "snacks", "qty": 2, "unit_price": 800}


@pytest.mark.parametrize("member,when,store,region,uses,applied,points", [
    # Thursday in S001: once_a_day 5% (1600 -> 80 off, 1520), snack_pts +100%: 15 + 15 = 30 points.
    (NORMAL, THU, "S001", "east", {}, [("once_a_day", 80)], 30),
    # already used today: no 5%; 16 + 16 = 32 points.
    (NORMAL, THU, "S001", "east", {"once_a_day": 1}, [], 32),
    # Saturday in region east: weekend 20% (priority 3) then 5%: 1600 -> 1280 -> 64 off -> 1216;
    # points 12 + 12 = 24.
    (NORMAL, datetime(2026, 11, 28, 9, 0, tzinfo=TZ), "S001", "east", {},
     [("weekend_snacks", 320), ("once_a_day", 64)], 24),
    # Saturday, another region: only the 5%.
    (NORMAL, datetime(2026, 11, 28, 9, 0, tzinfo=TZ), "S005", "west", {}, [("once_a_day", 80)], 30),
    # Gold in S002 on Thursday: gold 5% 80 (1520), S002 gold-only 30%: 456 (1064), 5%: 53.2 -> 53 (1011);
    # points: 10.11 base 10, gold +50% 15.165 -> 15 (+5), snacks +100% 25.275 -> 25 (+10).
    ({**GOLD, "birthday": None}, THU, "S002", "east", {},
     [("tier:gold", 80), ("gold_s002", 456), ("once_a_day", 53)], 25),
])
def test_promotion_scope(member, when, store, region, uses, applied, points):
    m = {**member, "today": {"promotion_uses": uses}}
    q = pricing.quote([CHIPS], m, POLICY, when, store=store, region=region)
    assert [(p["source"], p["fen"]) for p in q["promotions"]] == applied
    assert q["points"]["earned"] == points


def test_promotion_time_window_is_inclusive_to_the_minute():
    rice2 = {**RICE, "qty": 3}  # 14970, gold 5%: 748.5 -> 749 -> 14221 >= 10000
    last = datetime(2026, 11, 30, 23, 59, 59, tzinfo=TZ)
    after = datetime(2026, 12, 1, 0, 0, tzinfo=TZ)
    assert any(p["source"] == "spend100" for p in pricing.quote([rice2], GOLD, POLICY, last)["promotions"])
    assert not any(p["source"] == "spend100" for p in pricing.quote([rice2], GOLD, POLICY, after)["promotions"])


def test_staff_card_discount_replaces_a_smaller_tier_discount_and_earns_no_points():
    staff = {**NORMAL, "card_type": "staff"}
    q = pricing.quote([BREAD], staff, POLICY, THU)
    # 10% of 1500 = 150; the card earns no points and cannot pay with stored value.
    assert [(p["source"], p["fen"]) for p in q["promotions"]] == [("card_type:staff", 150)]
    assert q["receipt"]["zh-CN"][2] == "  员工折扣卡折扣10%  -1.50"
    assert q["points"]["earned"] == 0 and q["points"]["reason"] == "card_type_no_points"
    assert q["available"]["stored_value"]["reason"] == "stored_value_not_allowed"


BIG = {"sku": "6900000000097", "name": "电饭煲", "category": "appliances", "qty": 1, "unit_price": 10000}


@pytest.mark.parametrize("birthday,calendar,period,when,points", [
    # Spring Festival 2027 is 6 Feb 2027 (lunar 01-01), a Saturday; member days ran to 2026-12-31.
    ("01-01", "lunar", "day", datetime(2027, 2, 6, 12, 0, tzinfo=TZ), 300),   # 100 + 200
    ("01-01", "lunar", "day", datetime(2027, 2, 5, 12, 0, tzinfo=TZ), 100),
    # Mid-Autumn 2026 (lunar 08-15) is 25 Sep 2026, a Friday: in the lunar 8th month.
    ("08-15", "lunar", "month", datetime(2026, 9, 25, 12, 0, tzinfo=TZ), 300),
    ("08-15", "lunar", "month", datetime(2026, 9, 1, 12, 0, tzinfo=TZ), 100),   # still the 7th month
    ("03-15", "solar", "day", datetime(2027, 3, 15, 12, 0, tzinfo=TZ), 300),
    ("02-29", "solar", "day", datetime(2027, 2, 28, 12, 0, tzinfo=TZ), 300),    # no 29 Feb in 2027
    ("03-15", "solar", "month", datetime(2027, 3, 1, 12, 0, tzinfo=TZ), 300),
])
def test_birthday_bonus_solar_and_lunar(birthday, calendar, period, when, points):
    policy = deepcopy(POLICY)
    policy["earning"]["birthday"] = {"period": period, "multiplier_percent": 300}
    m = {**NORMAL, "birthday": birthday, "birthday_calendar": calendar}
    q = pricing.quote([BIG], m, policy, when)   # 100 yuan: base 100 points
    assert q["points"]["earned"] == points


def test_min_spend_and_excluded_lines_earn_nothing():
    policy = deepcopy(POLICY)
    policy["earning"]["min_spend_fen"] = 2000
    q = pricing.quote([BREAD, CIGS], NORMAL, policy, THU)  # eligible 15.00 < 20.00; tobacco excluded
    assert q["points"]["earned"] == 0
    assert q["receipt"]["zh-CN"][-3:] == ["本次积分  0", "  未满20.00元，不积分", "积分余额  0"]
    assert q["receipt"]["en"][-2] == "  Below 20.00: no points"


def test_availability_offline():
    member = {**GOLD, "points_available": 15000, "today": {"points_redeemed": 12000, "stored_value_paid_fen": 90000}}
    q = pricing.quote([{**BIG, "qty": 5}], member, POLICY, THU, rules_age_s=3600)
    # Bill 50000 - gold 5% 2500 - spend100 step 2 5000 = 42500; 50% share = 21250 points;
    # per tx 10000; left today 20000 - 12000 = 8000 -> 8000 (step 100).
    pts = q["available"]["points"]
    assert (pts["max_points"], pts["max_fen"], pts["reason"]) == (8000, 8000, None)
    sv = q["available"]["stored_value"]
    assert (sv["max_fen"], sv["balance_fen"]) == (10000, 20000)  # 100000 - 90000 left today
    stale = pricing.quote([BIG], member, POLICY, THU, rules_age_s=86401)
    assert stale["available"]["stored_value"]["reason"] == "rules_stale"
    assert stale["available"]["points"]["reason"] is None  # redemption allows up to max_age_s
    assert pricing.quote([BIG], {**member, "limited": True}, POLICY, THU)["available"]["points"]["reason"] == \
        "member_limited"
    assert pricing.quote([BIG], GOLD, POLICY, THU)["available"]["coupons"] == []  # C2026-0002 ran to 11-20


@pytest.mark.parametrize("member,tender,age,code,field,en,zh", [
    ({**GOLD, "points_available": 15000}, {"points": 12000}, 0, "points_offline_tx_limit", "tender.points",
     "Offline limit per transaction is 10000 points; asked 12000", "离线每笔最多抵现10000分，本次12000分"),
    (GOLD, {"points": 550}, 0, "points_step", "tender.points",
     "Points are redeemed in multiples of 100; asked 550", "积分需按100分的整数倍使用，本次550分"),
    (GOLD, {"points": 400}, 0, "points_min", "tender.points",
     "At least 500 points must be redeemed; asked 400", "积分抵现至少500分，本次400分"),
    (GOLD, {"points": 6000}, 0, "points_insufficient", "tender.points",
     "Only 5230 points available; asked 6000", "可用积分5230分，不足6000分"),
    ({**GOLD, "points_available": 9000}, {"points": 5100}, 0, "points_max_share", "tender.points",
     "At most 4750 points (50% of the bill); asked 5100", "积分抵现最多4750分（不超过应付50%），本次5100分"),
    ({**GOLD, "today": {"stored_value_paid_fen": 90000}}, {"stored_value_fen": 15000}, 0,
     "stored_value_offline_day_limit", "tender.stored_value_fen",
     "Offline stored-value limit left today is 100.00; asked 150.00", "离线储值今日还可用100.00元，本次150.00元"),
    ({**GOLD, "balance_available_fen": 10000}, {"stored_value_fen": 10001}, 0, "stored_value_insufficient",
     "tender.stored_value_fen", "Stored-value balance is 100.00; asked 100.01", "储值余额100.00元，不足100.01元"),
    (GOLD, {"stored_value_fen": 17001}, 0, "stored_value_exceeds_due", "tender.stored_value_fen",
     "Stored-value payment 170.01 exceeds the amount due 170.00", "储值支付170.01元超过应付170.00元"),
    (GOLD, {"stored_value_fen": 1000}, 86401, "rules_stale", "tender.stored_value_fen",
     "The store's rules are too old (86401 s, limit 86400 s): stored-value payment refused",
     "门店规则已过期（86401秒，上限86400秒），暂不能储值支付"),
    ({**GOLD, "limited": True}, {"points": 500}, 0, "member_limited", "tender.points",
     "Limited offline member: no stored value, points redemption or coupons", "离线受限会员，不能使用储值、积分或优惠券"),
    (GOLD, {"coupons": ["C2026-0001"]}, 0, "coupon_not_member", "tender.coupons[0]",
     "Coupon C2026-0001 belongs to another member", "优惠券C2026-0001不属于此会员"),
    (GOLD, {"coupons": ["C2026-0002"]}, 0, "coupon_expired", "tender.coupons[0]",
     "Coupon C2026-0002 expired on 2026-11-20", "优惠券C2026-0002已于2026-11-20过期"),
    ({**SILVER, "today": {"coupons_used": ["C2026-0001"]}}, {"coupons": ["C2026-0001"]}, 0, "coupon_used",
     "tender.coupons[0]", "Coupon C2026-0001 has already been used", "优惠券C2026-0001已使用"),
    (GOLD, {"coupons": ["NOPE", "NOPE"]}, 0, "coupon_duplicate", "tender.coupons[1]",
     "Coupon NOPE is given twice", "优惠券NOPE重复使用"),
    (None, {"points": 500}, 0, "member_required", "tender.points", "A member card is needed for this", "需先识别会员"),
    (GOLD, {"points": -1}, 0, "tender_invalid", "tender.points",
     "The tender is not valid: tender.points: a whole number >= 0", "支付方式有误：tender.points: a whole number >= 0"),
])
def test_tender_errors_name_the_field_and_limit(member, tender, age, code, field, en, zh):
    # Gold on Thursday: 2 x 100.00 - 5% = 190.00 -> spend100 20.00 off -> 170.00 due (share cap 8500
    # points); the max-share case uses one: 95.00 (spend100 not reached), 50% = 4750 points.
    basket = [BIG] if code == "points_max_share" else [{**BIG, "qty": 2}]
    with pytest.raises(TenderError) as e:
        pricing.quote(basket, member, POLICY, THU, store="S001", tender=tender, rules_age_s=age)
    assert (e.value.code, e.value.field) == (code, field)
    assert str(e.value) == f"{field}: {en}"
    assert e.value.text == {"zh-CN": zh, "en": en}


@pytest.mark.parametrize("lines,field", [
    ([], "lines"),
    ([{"sku": "a", "qty": 0, "unit_price": 100}], "lines[0].qty"),
    ([{"sku": "a", "qty": 1, "unit_price": 100}, {"sku": "b", "qty": 1, "unit_price": -1}], "lines[1].unit_price"),
    ([{"sku": "a", "qty": 1, "unit_price": 1.5}], "lines[0].unit_price"),
    ([{"sku": "", "qty": 1, "unit_price": 1}], "lines[0].sku"),
    ([{"sku": "a", "qty": 1, "unit_price": 1, "colour": "red"}], "lines[0]"),
    ([{"sku": "a", "qty": 1, "unit_price": 1, "category": 7}], "lines[0].category"),
])
def test_bad_baskets_name_the_field(lines, field):
    with pytest.raises(PricingError) as e:
        pricing.quote(lines, GOLD, POLICY, THU)
    assert (e.value.code, e.value.field) == ("basket_invalid", field)
    assert str(e.value).startswith(f"{field}: The basket is not valid: {field}: ")
    assert e.value.text["zh-CN"].startswith("商品明细有误：")


def test_topup_with_bonus():
    t = pricing.topup(POLICY, GOLD, package_id="p500", now=THU)
    assert t["receipt"]["zh-CN"] == ["储值充值  500.00", "  赠送 (充500送50)  50.00", "到账  550.00", "储值余额  750.00"]
    assert t["receipt"]["en"] == ["Stored-value top-up  500.00", "  Bonus (Top up 500, get 50)  50.00",
                                  "Credited  550.00", "Stored value balance  750.00"]
    assert t["record"]["deltas"] == {"stored_value_fen": 55000}
    # A free amount gets the bonus of the largest package it reaches: 800.00 -> p500's 50.00.
    t = pricing.topup(POLICY, GOLD, amount_fen=80000)
    assert (t["record"]["package_id"], t["record"]["bonus_fen"], t["record"]["credit_fen"]) == ("p500", 5000, 85000)
    t = pricing.topup(POLICY, GOLD, amount_fen=30000)
    assert (t["record"]["bonus_fen"], t["receipt"]["en"]) == (0, ["Stored-value top-up  300.00", "Credited  300.00",
                                                                  "Stored value balance  500.00"])
    with pytest.raises(PricingError, match=r"^package_id: Top-up package p9 is unknown$"):
        pricing.topup(POLICY, GOLD, package_id="p9")
    with pytest.raises(PricingError, match=r"^amount_fen: "):
        pricing.topup(POLICY, GOLD, amount_fen=0)
    with pytest.raises(PricingError, match=r"^member.card_type: This card cannot pay with stored value$"):
        pricing.topup(POLICY, {**NORMAL, "card_type": "staff"}, amount_fen=100)
    # A package outside its dates is not offered, by id or as a bonus.
    dated = deepcopy(POLICY)
    dated["stored_value"]["topup_packages"]["p500"].update({"from": "2026-12-01", "to": "2026-12-31"})
    with pytest.raises(PricingError, match=r"^package_id: Top-up package p500 is unknown$"):
        pricing.topup(dated, GOLD, package_id="p500", now=THU)
    assert pricing.topup(dated, GOLD, amount_fen=80000, now=THU)["record"]["bonus_fen"] == 0
    assert pricing.topup(dated, GOLD, amount_fen=80000, now=datetime(2026, 12, 31, 21, 0, tzinfo=TZ)
                         )["record"]["bonus_fen"] == 5000


def test_count_package():
    u = pricing.consume_package(POLICY, GOLD, "car_wash10", 2, now=THU)
    assert u["receipt"]["zh-CN"] == ["次卡洗车10次卡使用2次", "剩余次数  1"]
    assert u["receipt"]["en"] == ["Car wash x10: 2 use(s)", "Uses left  1"]
    assert u["record"]["deltas"] == {"packages": {"car_wash10": -2}}
    with pytest.raises(PricingError, match=r"^uses: Only 3 uses left on the package; asked 4$") as e:
        pricing.consume_package(POLICY, GOLD, "car_wash10", 4)
    assert e.value.text["zh-CN"] == "次卡剩余3次，不足4次"
    with pytest.raises(PricingError, match=r"^package_id: "):
        pricing.consume_package(POLICY, SILVER, "car_wash10", 1)
    with pytest.raises(PricingError, match=r"^uses: "):
        pricing.consume_package(POLICY, GOLD, "car_wash10", 0)


def test_card_operations_and_fees():
    op = pricing.card_operation(POLICY, "issue", card_no="880000000070", now=THU)
    assert (op["record"]["fee_fen"], op["record"]["status_after"]) == (1000, "active")
    assert op["receipt"] == {"zh-CN": ["办卡", "手续费  10.00"], "en": ["Card issued", "Fee  10.00"]}
    op = pricing.card_operation(POLICY, "replace", GOLD, new_card_no="880000000088")
    assert (op["record"]["fee_fen"], op["record"]["new_card_no"]) == (500, "880000000088")
    assert op["receipt"]["zh-CN"] == ["补换新卡", "手续费  5.00"]
    op = pricing.card_operation(POLICY, "report_lost", GOLD)
    assert (op["record"]["fee_fen"], op["record"]["status_after"], op["receipt"]["en"]) == (0, "lost",
                                                                                            ["Card reported lost"])
    with pytest.raises(PricingError, match=r"^new_card_no: "):
        pricing.card_operation(POLICY, "replace", GOLD)
    with pytest.raises(PricingError, match=r"^kind: "):
        pricing.card_operation(POLICY, "melt", GOLD)


def test_min_spend_counts_what_was_bought_not_what_was_paid_in_money():
    policy = deepcopy(POLICY)
    policy["earning"]["min_spend_fen"] = 5000
    m = {**NORMAL, "points_available": 1000}
    # 60.00 of household goods, 5.00 of it paid with 500 points: bought 60.00 >= 50.00, so points
    # are earned, on the 55.00 paid in money: 55.
    q = pricing.quote([{**SOAP, "unit_price": 6000}], m, policy, THU, tender={"points": 500})
    assert (q["points"]["earned"], q["points"]["reason"]) == (55, None)


def test_offline_limits_default_to_none_allowed():
    # wire/ruleset.py's defaults: offline redemption and stored value are 0 unless HQ sets them.
    policy = deepcopy(POLICY)
    policy["redemption"] = {"points_per_yuan": 100, "min_points": 0, "max_share_percent": 50, "step_points": 100}
    del policy["stored_value"]["offline_max_per_tx_fen"]
    q = pricing.quote([BIG], GOLD, policy, THU)
    assert (q["available"]["points"]["max_points"], q["available"]["points"]["reason"]) == (
        0, "points_offline_tx_limit")
    assert (q["available"]["stored_value"]["max_fen"], q["available"]["stored_value"]["reason"]) == (
        0, "stored_value_offline_tx_limit")


def test_stale_rules_refuse_coupons():
    with pytest.raises(TenderError, match=r"^tender\.coupons: The store's rules are too old \(604801 s, "
                                          r"limit 604800 s\): coupon use refused$"):
        pricing.quote([MILK, BREAD, SOAP], SILVER, POLICY, THU, tender={"coupons": ["C2026-0001"]},
                      rules_age_s=604801)


def test_a_multiplier_under_100_takes_a_line_to_zero_not_below():
    policy = deepcopy(POLICY)
    policy["tiers"]["normal"]["points_multiplier_percent"] = 50
    policy["earning"]["category_multipliers_percent"] = {"fresh": 0}
    # apples 66.00 - fresh10 6.60 = 59.40: base 59.40; normal 50%: -29.70 (29.70 left); fresh 0%
    # would take 59.40 more, only 29.70 is left: the line earns 0. Bread 15.00: 15 - 7.50 = 7.50 -> 7.
    q = pricing.quote([APPLES, BREAD], NORMAL, policy, THU)
    assert q["points"]["earned"] == 7
    assert [l["points_earned"] for l in q["lines"]] == [0, 7]
    assert q["receipt"]["en"][-5:] == ["Points earned  7", "  Base (1 per yuan)  74", "  Member 50%  -37",
                                       "  Category fresh 0%  -30", "Points balance  7"]
