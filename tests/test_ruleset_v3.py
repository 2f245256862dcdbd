"""Rule-set format v3: v2 layers are migrated, the new rules merge by the same
layer rules (keyed tables, settings key by key, locks) and every bad one is
rejected naming the layer, rule and field."""

import copy

import pytest

from wire.ruleset import (FORMAT_VERSION, RulesetError, effective_ruleset, merge_layers, migrate_layer,
                          validate_ruleset, with_defaults)
from tests.test_ruleset import BASE, CHAIN, EFFECTIVE, NAME, REGION, STORE, region, store

KG = {"name": NAME, "symbol": "kg", "decimals": 3, "max": 50000}
W21 = {"prefix": "21", "item_digits": 5, "value": "weight", "value_digits": 5, "unit": "kg"}
P22 = {"prefix": "22", "item_digits": 5, "value": "price", "value_digits": 5}


def chain(**kw):
    out = copy.deepcopy(BASE)
    out.update(kw)
    return out


def test_v2_layers_are_migrated_and_mean_what_they_meant():
    assert EFFECTIVE["format"] == FORMAT_VERSION == 3
    assert "format" not in CHAIN                       # the example layers are v2 documents
    assert migrate_layer(CHAIN) == {**CHAIN, "format": 3}
    assert migrate_layer({**CHAIN, "format": 3}) == {**CHAIN, "format": 3}
    rules = with_defaults(EFFECTIVE)
    assert (rules["earning"]["compose"], rules["earning"]["highest_of"]) == ("add", [])
    assert (rules["units"], rules["scale_barcodes"]) == ({}, {})
    assert "excluded_categories" not in rules["promotions"]["fresh10"]   # v2 eligibility
    # a v2 and a v3 layer merge alike
    v3 = [{**CHAIN, "format": 3}, {**REGION, "format": 3}, STORE]
    assert effective_ruleset(v3, store="S001", region="east") == EFFECTIVE
    with pytest.raises(RulesetError, match=r"^chain layer demo-mart: format: 4 is not one of \[2, 3\]"):
        merge_layers([{**CHAIN, "format": 4}])


def test_v3_rules_merge_by_the_layer_rules():
    c = chain(format=3, units={"kg": KG}, scale_barcodes={"w21": W21, "p22": P22},
              earning={**BASE["earning"], "compose": "multiply", "highest_of": [["member_day", "birthday"]]},
              locked=["earning.compose"])
    out = merge_layers([c, store(scale_barcodes={"p22": {"disabled": True}},
                                 promotions={"b": {"kind": "percent_off", "percent": 5,
                                                   "excluded_categories": ["gift_card"]}})])
    validate_ruleset(out)
    assert sorted(out["scale_barcodes"]) == ["w21"] and out["earning"]["compose"] == "multiply"
    assert out["promotions"]["b"]["excluded_categories"] == ["gift_card"]
    with pytest.raises(RulesetError, match=r"^store layer S1: earning.compose is locked by the chain layer c"):
        merge_layers([c, store(earning={"compose": "add"})])


@pytest.mark.parametrize("change,message", [
    ({"scale_barcodes": {"w": {**W21, "value_digits": 4}}},
     "scale_barcodes.w: prefix (2) + item_digits (5) + value_digits (4) + 1 check digit is 12 digits, "
     "not the 13 of an EAN-13"),
    ({"scale_barcodes": {"w": {**W21, "unit": "lb"}}}, "scale_barcodes.w.unit: a weight barcode needs a unit"),
    ({"scale_barcodes": {"p": {**P22, "unit": "kg"}}}, "scale_barcodes.p.unit: a price barcode carries fen"),
    ({"scale_barcodes": {"a": W21, "b": {**W21}}}, "scale_barcodes.b.prefix: '21' is also the prefix of 'a'"),
    ({"scale_barcodes": {"w": {**W21, "prefix": "2a"}}}, "scale_barcodes.w.prefix: '2a' does not match"),
    ({"units": {"kg": {**KG, "decimals": 4}}}, "units.kg.decimals: 4 is greater than the maximum of 3"),
    ({"units": {"kg": {**KG, "max": 0}}}, "units.kg.max: 0 is less than the minimum of 1"),
    ({"earning": {**BASE["earning"], "compose": "stack"}}, "earning.compose: 'stack' is not one of"),
    ({"earning": {**BASE["earning"], "highest_of": [["birthday"]]}}, "earning.highest_of[0]: ['birthday'] is too short"),
    ({"earning": {**BASE["earning"], "highest_of": [["birthday", "base"]]}}, "earning.highest_of[0][1]: 'base'"),
    ({"earning": {**BASE["earning"], "highest_of": [["birthday", "tier"], ["tier", "item"]]}},
     "earning.highest_of[1]: tier is already in an earlier group"),
    ({"promotions": {"a": {"kind": "percent_off", "percent": 10, "excluded_skus": "x"}}},
     "promotions.a.excluded_skus: 'x' is not of type 'array'"),
])
def test_bad_v3_rules_are_named(change, message):
    c = chain(format=3, **{"units": {"kg": KG}, **change})
    with pytest.raises(RulesetError) as e:
        validate_ruleset(merge_layers([c]))
    assert message in str(e.value)
