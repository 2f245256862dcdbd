"""Rule-set v3 keys for count packages sold at the counter and the gift
catalogue (wire/ruleset.py): defaults that keep every v2 rule set as it was,
keyed-table merging like every table, and bad entries named."""

import copy

import pytest

from tests.test_ruleset import CHAIN, EFFECTIVE, NAME, REGION, STORE
from wire.ruleset import RulesetError, effective_ruleset, validate_ruleset, with_defaults

MUG = {"name": NAME, "points": 800}


def test_v2_packages_keep_their_meaning_and_there_are_no_gifts():
    rules = with_defaults(EFFECTIVE)
    assert rules["gifts"] == {}
    for pkg in rules["packages"].values():
        assert (pkg["renewable"], pkg["stored_value"]) == (True, False)
        assert "validity_months" not in pkg and "from" not in pkg


def test_gifts_and_package_keys_merge_as_keyed_tables():
    chain = {**copy.deepcopy(CHAIN), "format": 3, "gifts": {"mug": MUG, "umbrella": {**MUG, "points": 2000}}}
    region = {**copy.deepcopy(REGION), "gifts": {"umbrella": {"disabled": True}, "pen": {**MUG, "points": 100}}}
    rules = effective_ruleset([chain, region, STORE], store="S001", region="east")
    assert set(rules["gifts"]) == {"mug", "pen"}
    locked = {**chain, "locked": [*chain.get("locked", []), "gifts"]}
    with pytest.raises(RulesetError, match=r"gifts\.pen is locked by the chain layer"):
        effective_ruleset([locked, region, STORE], store="S001", region="east")


@pytest.mark.parametrize("change,message", [
    ({"gifts": {"mug": {**MUG, "points": 0}}}, r"gifts\.mug\.points: 0 is less than the minimum of 1"),
    ({"gifts": {"mug": {"name": NAME}}}, r"gifts\.mug\.points: required, missing"),
    ({"gifts": {"mug": {**MUG, "colour": "red"}}}, r"gifts\.mug\.colour: unknown key"),
    ({"gifts": {"mug": {**MUG, "from": "2026-12-31", "to": "2026-12-01"}}}, r"gifts\.mug\.to: '2026-12-01' is before"),
    ({"gifts": {"mug": {**MUG, "per_member_day_limit": 0}}}, r"gifts\.mug\.per_member_day_limit: 0 is less"),
    ({"packages": {"p": {"name": NAME, "skus": ["X"], "validity_months": 121}}},
     r"packages\.p\.validity_months: 121 is greater than the maximum of 120"),
    ({"packages": {"p": {"name": NAME, "skus": ["X"], "from": "2026-02-30"}}},
     r"packages\.p\.from: '2026-02-30' is not a valid date"),
    ({"packages": {"p": {"name": NAME, "skus": ["X"], "renewable": "no"}}}, r"packages\.p\.renewable: 'no' is not"),
])
def test_bad_entries_are_named(change, message):
    rules = copy.deepcopy(EFFECTIVE)
    for table, entries in change.items():
        rules.setdefault(table, {}).update(entries)
    with pytest.raises(RulesetError, match=message):
        validate_ruleset(rules)


def test_a_member_row_may_carry_its_packages_expiry():
    from wire.ruleset import RulesetError, check_member
    row = {"card_no": "880000000013", "member_id": "M1001", "tier": "gold", "packages": {"car_wash10": 3},
           "package_expires": {"car_wash10": "2027-11-25"}}
    assert check_member(row)["package_expires"] == {"car_wash10": "2027-11-25"}
    for bad in ({"car_wash10": "2027-11"}, {"car_wash10": 20271125}, {"car wash": "2027-11-25"}):
        with pytest.raises(RulesetError, match="package_expires"):
            check_member({**row, "package_expires": bad})
