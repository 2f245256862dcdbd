"""Rule-set format v3 in the pricing core: point multipliers that compose as the
chain chooses, promotions with exclusions of their own, return receipts that add
up, weighed goods and scale barcodes. Every expected number is worked out by hand
in the comments, as in tests/test_pricing.py, whose policy and members these use.
"""

from copy import deepcopy
from datetime import datetime

import pytest

from gateway.core import pricing
from gateway.core.measure import ScaleFormats, ean13_check_digit, parse_quantity
from gateway.core.pricing import PricingError, ReturnError
from tests.test_pricing import BIG, GOLD, NORMAL, POLICY, RICE, THU, TZ, WED, n

# ---------------------------------------------------------------- how multipliers compose

# Gold (x1.5) with a birthday today, on a member day (x2), birthday x3 (day).
BIRTHDAY_GOLD = {**GOLD, "birthday": "11-25"}


def _earning(compose, highest_of=()):
    policy = deepcopy(POLICY)
    policy["earning"]["birthday"] = {"period": "day", "multiplier_percent": 300}
    policy["earning"]["compose"] = compose
    policy["earning"]["highest_of"] = [list(g) for g in highest_of]
    return policy


@pytest.mark.parametrize("compose,groups,earned,rows", [
    # 100.00 - gold 5% = 95.00 (spend100 needs 100.00). Base 95 points.
    # add: 100 + 50 + 100 + 200 = 450%: 142.5 -> 142 (+47), 237.5 -> 237 (+95), 427.5 -> 427 (+190).
    ("add", (), 427, [95, 47, 95, 190]),
    # multiply: 1.5 x 2 x 3 = 900%: 142.5 -> 142 (+47), x2 = 285 (+143), x3 = 855 (+570).
    ("multiply", (), 855, [95, 47, 143, 570]),
    # highest of member day and birthday: the birthday (x3) only: 1.5 x 3 = 450%: 427.5 -> 427 (+285).
    ("multiply", (("member_day", "birthday"),), 427, [95, 47, 285]),
    # add, highest only: 100 + 50 + 200 = 350%: 332.5 -> 332 (+190).
    ("add", (("member_day", "birthday"),), 332, [95, 47, 190]),
])
def test_multipliers_compose_as_the_chain_chooses(compose, groups, earned, rows):
    q = pricing.quote([BIG], BIRTHDAY_GOLD, _earning(compose, groups), WED)
    assert q["points"]["earned"] == earned
    assert [b["points"] for b in q["points"]["breakdown"]] == rows
    assert sum(l["points_earned"] for l in q["lines"]) == earned


def test_multiply_is_exact_and_a_multiplier_under_100_scales_down():
    policy = _earning("multiply")
    policy["tiers"]["gold"]["points_multiplier_percent"] = 50
    # 95 base; x0.5 = 47.5 (-48: 47 after the floor); x2 = 95 (+48); x3 = 285 (+190).
    q = pricing.quote([BIG], BIRTHDAY_GOLD, policy, WED)
    assert [b["points"] for b in q["points"]["breakdown"]] == [95, -48, 48, 190]
    assert q["points"]["earned"] == 285
    assert q["receipt"]["en"][-6:] == ["Points earned  285", "  Base (1 per yuan)  95", "  Gold 50%  -48",
                                       "  Member day 200%  +48", "  Birthday day 300%  +190",
                                       "Points balance  5515"]


def test_the_highest_of_a_group_is_chosen_per_line():
    # An item multiplier (fresh 200%) and a campaign (snacks 200%) in one group with the tier:
    # each line gets the highest of the three that apply to it, here gold's 150 on bread only.
    policy = _earning("multiply", [("tier", "item", "campaign")])
    policy["earning"]["member_days"] = []
    policy["earning"]["birthday"] = None
    del policy["earning"]["birthday"]
    apples = {"sku": "6900000000035", "name": "苹果", "category": "fresh", "qty": 1, "unit_price": 2000}
    bread = {"sku": "6900000000042", "name": "面包", "category": "bakery", "qty": 1, "unit_price": 2000}
    q = pricing.quote([apples, bread], GOLD, policy, THU)
    # Apples 20.00 - 5% - fresh10 = 17.10; bread 19.00. Base 36.1 -> 36; gold on bread only:
    # 19 x 0.5 = 9.5 (45.6 -> 45, +9); fresh on apples: x2, 17.1 more (62.7 -> 62, +17).
    assert [(b["source"], b["points"]) for b in q["points"]["breakdown"]] == [
        ("base", 36), ("tier", 9), ("category", 17)]
    assert [l["points_earned"] for l in q["lines"]] == [34, 28]   # 34.2 -> 34; 62 - 34


# ---------------------------------------------------------------- promotions with their own exclusions

FORMULA = {"sku": "6900000000103", "name": "奶粉", "category": "infant_formula", "qty": 1, "unit_price": 8000}
GIFT = {"sku": "6900000000110", "name": "礼品卡", "category": "gift_card", "qty": 1, "unit_price": 10000}


def test_a_threshold_with_exclusions_of_its_own():
    # v2: spend100 names no categories, so it skips what the tier discount skips (formula, gift cards):
    # rice 49.90 - 5% = 47.40 alone, below 100.00: no 满减.
    q = pricing.quote([RICE, FORMULA, GIFT], GOLD, POLICY, THU)
    assert [p["source"] for p in q["promotions"]] == ["tier:gold"]
    # v3: spend100 excludes gift cards and tobacco only: rice 4740 + formula 8000 = 12740 >= 10000:
    # 20.00 off, 2000 x 4740 / 12740 = 744.1 -> 744, the rest 1256 to formula. The gift card: nothing.
    policy = deepcopy(POLICY)
    policy["promotions"]["spend100"]["excluded_categories"] = ["gift_card", "tobacco"]
    q = pricing.quote([RICE, FORMULA, GIFT], GOLD, policy, THU)
    assert [(l["discount"], l["net"]) for l in q["lines"]] == [(250 + 744, 3996), (1256, 6744), (0, 10000)]
    # The tier discount still skips formula (discount_excluded_categories): only rice has 5%.
    assert [(p["source"], p["fen"]) for p in q["promotions"]] == [("tier:gold", 250), ("spend100", 2000)]


def test_included_categories_less_an_excluded_sku():
    policy = deepcopy(POLICY)
    policy["promotions"]["fresh10"]["excluded_skus"] = ["6900000000035"]   # apples
    pears = {"sku": "6900000000127", "name": "梨", "category": "fresh", "qty": 1, "unit_price": 1000}
    apples = {"sku": "6900000000035", "name": "苹果", "category": "fresh", "qty": 1, "unit_price": 1000}
    q = pricing.quote([pears, apples], None, policy, THU)
    assert [l["discount"] for l in q["lines"]] == [100, 0]


# ---------------------------------------------------------------- return receipts that add up

RICE2 = {**RICE, "qty": 2, "unit_price": 5990}


def test_a_return_of_one_of_two_rice_prints_its_price():
    sale = pricing.quote([RICE2], GOLD, POLICY, THU)["record"]
    # Sale: 119.80 - gold 5.99 = 113.81 >= 100.00: spend100 20.00 off: net 93.81, all cash.
    # One rice back: half the price, 59.90, over the parts: cash 9381 -> 4690.5 -> 4690, gold 599 ->
    # 299, spend100 2000 -> 1000: 5989, the remainder 1 to the last part with room (spend100, 1001).
    # Until v3 the receipt said 59.89: the sum of the floors.
    r1 = pricing.return_quote(sale, [{"line": 0, "qty": 1}], [], POLICY, THU)
    assert r1["receipt"]["zh-CN"][:5] == ["退货", "大米 5kg x1  59.90", "  冲回优惠  -13.00", "退款合计  46.90",
                                          "  退现金等  46.90"]
    assert r1["lines"][0]["discounts"] == [{"source": "tier:gold", "fen": 299}, {"source": "spend100", "fen": 1001}]
    # The other: what is left, 59.90 again: cash 4691, gold 300, spend100 999.
    r2 = pricing.return_quote(sale, [{"line": 0, "qty": 1}], [r1["record"]], POLICY, THU)
    assert r2["receipt"]["en"][1:4] == ["大米 5kg x1  59.90", "  Discounts reversed  -12.99", "Refund total  46.91"]
    assert r1["totals"]["refund_fen"] + r2["totals"]["refund_fen"] == 9381


def test_a_return_without_discounts_refunds_the_price():
    # Two rice at 49.90 (99.80: no 满减), 30.01 of it from stored value. One back: 49.90 over stored value
    # 3001 -> 1500 and cash 6979 -> 3489: 4989, the remainder to cash (no discounts): 3490.
    sale = pricing.quote([{**RICE, "qty": 2}], {**NORMAL, "balance_available_fen": 10000}, POLICY, THU,
                         tender={"stored_value_fen": 3001})["record"]
    r = pricing.return_quote(sale, [{"line": 0, "qty": 1}], [], POLICY, THU)
    assert (r["totals"]["refund_fen"], r["totals"]["discount"]) == (4990, 0)
    assert r["receipt"]["en"][:5] == ["Return", "大米 5kg x1  49.90", "Refund total  49.90",
                                      "  Refund to stored value  15.00", "  Refund (cash/other)  34.90"]


# ---------------------------------------------------------------- weighed goods and scale barcodes

def _weighed_policy():
    policy = deepcopy(POLICY)
    policy["units"] = {"kg": {"name": n("千克", "kg"), "symbol": "kg", "decimals": 3, "max": 50000}}
    policy["scale_barcodes"] = {
        "w21": {"prefix": "21", "item_digits": 5, "value": "weight", "value_digits": 5, "unit": "kg"},
        "p22": {"prefix": "22", "item_digits": 5, "value": "price", "value_digits": 5},
    }
    return policy


APPLES_KG = {"sku": "2100035", "name": "苹果", "category": "fresh", "unit": "kg", "qty": "0.532", "unit_price": 1298}


def test_a_weighed_line_is_priced_per_unit_and_rounded_half_up_once():
    q = pricing.quote([APPLES_KG, {**APPLES_KG, "qty": "0.250"}], None, _weighed_policy(), THU)
    # 0.532 kg x 12.98 = 6.90536 -> 6.91; 0.250 kg x 12.98 = 3.245 -> 3.25 (half-up to the fen).
    # fresh10: 69.1 -> 69 and 32.5 -> 33.
    assert [(l["qty"], l["scale"], l["amount"], l["net"]) for l in q["lines"]] == [
        (532, 1000, 691, 622), (250, 1000, 325, 292)]
    assert q["receipt"]["en"][:4] == ["苹果 0.532kg  6.91", "  Fresh 10% off  -0.69", "苹果 0.250kg  3.25",
                                      "  Fresh 10% off  -0.33"]
    body = q["record"]["lines"][0]
    assert (body["qty"], body["unit"], body["scale"], body["unit_price"]) == (532, "kg", 1000, 1298)


def test_a_member_price_is_per_unit_and_a_weighed_line_is_one_item():
    policy = _weighed_policy()
    policy["promotions"]["milk_mp"]["prices_fen"] = {"2100035": 999}
    q = pricing.quote([APPLES_KG], NORMAL, policy, THU)
    # The member price (priority 1) first: 0.532 x 9.99 = 5.31468 -> 5.31; then fresh10: 53.1 -> 53: 478.
    assert q["lines"][0]["net"] == 478
    policy["promotions"]["second_half"]["skus"] = ["2100035"]
    q = pricing.quote([APPLES_KG, APPLES_KG], None, policy, THU)
    # Two bags: the second is the 2nd item, half price (priority 2): 345.5 -> 346 off, 345; then
    # fresh10: 69.1 -> 69 (622) and 34.5 -> 35 (310).
    assert [l["net"] for l in q["lines"]] == [622, 310]


def test_a_weighed_line_returned_in_part():
    sale = pricing.quote([APPLES_KG], None, _weighed_policy(), THU)["record"]
    r = pricing.return_quote(sale, [{"line": 0, "qty": "0.200"}], [], POLICY, THU)
    # 200 of 532 g: 691 x 200 / 532 = 259.77 -> 259: cash 622 -> 233.8 -> 233, fresh10 69 -> 25.9 -> 25,
    # 258, the remainder 1 to fresh10.
    assert (r["lines"][0]["qty"], r["lines"][0]["amount"], r["totals"]["refund_fen"]) == (200, 259, 233)
    assert r["receipt"]["en"][1] == "苹果 0.200kg  2.59"
    with pytest.raises(ReturnError) as e:
        pricing.return_quote(sale, [{"line": 0, "qty": "0.2001"}], [], POLICY, THU)
    assert e.value.field == "return_lines[0].qty"
    with pytest.raises(ReturnError) as e:
        pricing.return_quote(sale, [{"line": 0, "qty": "0.533"}], [], POLICY, THU)
    assert e.value.code == "return_invalid"


def _code(body12: str) -> str:
    return body12 + ean13_check_digit(body12)


def test_scale_barcodes_with_weight_and_price():
    policy = _weighed_policy()
    weight = _code("211234500532")                     # item 12345, 0.532 kg
    price = _code("221234501580")                      # item 12345, 15.80
    assert (weight, price) == ("2112345005324", "2212345015801")
    q = pricing.quote([{"barcode": weight, "unit_price": 2980, "name": "牛肉", "category": "fresh"},
                       {"barcode": price, "name": "熟食"}], None, policy, THU)
    # 0.532 x 29.80 = 15.8536 -> 15.85; the price label: one at 15.80.
    assert [(l["sku"], l["qty"], l.get("unit"), l["amount"]) for l in q["lines"]] == [
        ("2112345", 532, "kg", 1585), ("2212345", 1, None, 1580)]


@pytest.mark.parametrize("line,field,says", [
    ({"barcode": "2112345005325", "unit_price": 2980}, "lines[0].barcode", "check digit 5 is wrong"),
    ({"barcode": "211234500532", "unit_price": 2980}, "lines[0].barcode", "13 digits"),
    ({"barcode": "21123450053a4", "unit_price": 2980}, "lines[0].barcode", "13 digits"),
    ({"barcode": "２112345005324", "unit_price": 2980}, "lines[0].barcode", "13 digits"),   # full-width digit
    ({"barcode": 2112345005324, "unit_price": 2980}, "lines[0].barcode", "13 digits"),
    ({"barcode": _code("291234500532"), "unit_price": 2980}, "lines[0].barcode", "not a scale barcode prefix"),
    ({"barcode": _code("211234500000"), "unit_price": 2980}, "lines[0].barcode", "is 0"),
    ({"barcode": _code("211234599999"), "unit_price": 2980}, "lines[0].barcode", "99.999 is above 50.000"),
    ({"barcode": "2112345005324"}, "lines[0].unit_price", "required"),
    ({"barcode": "2112345005324", "unit_price": 2980, "qty": 1}, "lines[0].qty", "the scale barcode carries it"),
    ({"barcode": "2212345015801", "unit_price": 100}, "lines[0].unit_price", "the barcode carries the price"),
    ({**APPLES_KG, "qty": "0.5321"}, "lines[0].qty", "has 4 decimals; this unit has 3"),
    ({**APPLES_KG, "qty": 0.532}, "lines[0].qty", "no JSON decimals"),
    ({**APPLES_KG, "qty": "1e3"}, "lines[0].qty", "not a decimal number"),
    ({**APPLES_KG, "qty": "-0.5"}, "lines[0].qty", "not a decimal number"),
    ({**APPLES_KG, "qty": "0.000"}, "lines[0].qty", "outside 0.001 to 50.000"),
    ({**APPLES_KG, "qty": "50.001"}, "lines[0].qty", "outside 0.001 to 50.000"),
    ({**APPLES_KG, "qty": 10**30}, "lines[0].qty", "outside"),
    ({**APPLES_KG, "qty": "9" * 30}, "lines[0].qty", "no JSON decimals"),
    ({**APPLES_KG, "unit": "lb"}, "lines[0].unit", "'lb' is not a unit of these rules"),
    ({**APPLES_KG, "unit": ["kg"]}, "lines[0].unit", "is not a unit"),
])
def test_hostile_weighed_lines_are_refused_naming_the_field(line, field, says):
    with pytest.raises(PricingError) as e:
        pricing.quote([line], None, _weighed_policy(), THU)
    assert (e.value.code, e.value.field) == ("basket_invalid", field)
    assert says in str(e.value)


def test_count_lines_keep_working_and_weighed_lines_need_units_in_the_rules():
    q = pricing.quote([RICE], None, _weighed_policy(), THU)
    assert "unit" not in q["record"]["lines"][0] and q["lines"][0]["amount"] == 4990
    with pytest.raises(PricingError) as e:
        pricing.quote([APPLES_KG], None, POLICY, THU)       # a v2 rule set has no units
    assert e.value.field == "lines[0].unit"
    with pytest.raises(PricingError) as e:
        pricing.quote([{"barcode": "2112345005324", "unit_price": 1}], None, POLICY, THU)
    assert e.value.field == "lines[0].barcode"


def test_quantities_are_whole_steps():
    assert parse_quantity("2", 1000, 50000) == 2000
    assert parse_quantity(2, 1000, 50000) == 2000
    assert parse_quantity("0.5", 1000, 50000) == 500
    assert parse_quantity("3", 1, 9999) == 3
    formats = ScaleFormats(_weighed_policy()["scale_barcodes"])
    assert formats.read("2112345005324") == ("2112345", "weight", 532, "kg")
