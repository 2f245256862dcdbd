"""Rule-set format v2: schema, layer merge, reference checks. Every bad rule set
is rejected with a message naming the layer, rule and field."""

import copy
import json
import re
import tomllib
from pathlib import Path

import jsonschema
import pytest

from wire.ruleset import (LAYER_SCHEMA, RULESET_SCHEMA, RulesetError, check_deny_entry, check_member,
                          effective_ruleset, merge_layers, validate_ruleset, with_defaults)

EXAMPLES = Path(__file__).resolve().parent.parent / "deploy" / "examples"


def _load(name):
    return tomllib.loads((EXAMPLES / name).read_text())


CHAIN, REGION, STORE = _load("chain.toml"), _load("region-east.toml"), _load("store-S001.toml")
EFFECTIVE = effective_ruleset([CHAIN, REGION, STORE], store="S001", region="east")
NAME = {"zh-CN": "名", "en": "name"}


def test_examples_merge_and_validate():
    rules = with_defaults(EFFECTIVE)
    assert rules["layers"] == [{"level": "chain", "id": "demo-mart"}, {"level": "region", "id": "east"},
                               {"level": "store", "id": "S001"}]
    assert rules["chain"] == "demo-mart"
    # keyed tables: region replaced spend100 as a whole (3 steps), disabled open_day; store disabled second_half
    assert len(rules["promotions"]["spend100"]["steps"]) == 3
    assert "open_day" not in rules["promotions"] and "second_half" not in rules["promotions"]
    assert {"hairy_crab", "s001_bakery", "fresh10"} <= set(rules["promotions"])
    # settings key by key: region set min_spend_fen only; the chain's other earning keys stay
    assert rules["earning"]["min_spend_fen"] == 500 and rules["earning"]["points_per_yuan"] == 1
    assert rules["earning"]["category_multipliers_percent"] == {"fresh": 200, "household": 150}
    # caps tightened layer by layer
    sv = rules["stored_value"]
    assert (sv["offline_max_per_tx_fen"], sv["offline_max_per_day_fen"], sv["max_sync_age_s"]) == (30000, 80000, 43200)
    assert sorted(sv["topup_packages"]) == ["p1000", "p200", "p300", "p500"]
    assert rules["redemption"]["offline_max_points_per_tx"] == 5000
    # defaults filled
    assert rules["promotions"]["fresh10"]["member_only"] is True
    assert rules["card_programs"]["member"]["sources"] == ["nfc", "magstripe", "qr"]
    assert rules["members"] == {} and rules["deny"] == {}


def test_the_effective_rule_set_is_valid_under_the_published_schema():
    jsonschema.Draft202012Validator(RULESET_SCHEMA).validate(EFFECTIVE)
    jsonschema.Draft202012Validator(RULESET_SCHEMA).validate(with_defaults(EFFECTIVE))
    for layer in (CHAIN, REGION, STORE):
        jsonschema.Draft202012Validator(LAYER_SCHEMA).validate(layer)


def test_single_document_is_the_chain_layer():
    demo = _load("rules.demo.toml")
    assert "layer" not in demo
    rules = merge_layers([demo])
    validate_ruleset(rules)
    assert rules["layers"] == [{"level": "chain", "id": "demo-mart"}]
    with_header = {"layer": {"level": "chain", "id": "demo-mart"}, **{k: v for k, v in demo.items() if k != "chain"}}
    assert merge_layers([with_header]) == rules


# ---------------------------------------------------------------- merge semantics table

BASE = {
    "layer": {"level": "chain", "id": "c"},
    "card_programs": {"m": {"prefix": "88", "length": 8, "card_type": "p"}},
    "card_types": {"p": {"name": NAME, "kind": "personal"}},
    "tiers": {"t1": {"name": NAME, "rank": 1}, "t2": {"name": NAME, "rank": 2, "discount_percent": 5}},
    "earning": {"points_per_yuan": 1, "excluded_categories": ["tobacco", "gift_card"], "min_spend_fen": 100},
    "promotions": {"a": {"kind": "percent_off", "percent": 10, "categories": ["fresh"]},
                   "b": {"kind": "percent_off", "percent": 5}},
    "stored_value": {"offline_max_per_tx_fen": 5000, "offline_max_per_day_fen": 10000,
                     "topup_packages": {"p1": {"name": NAME, "pay_fen": 100}}},
    "max_age_s": 3600,
}


def region(**kw):
    return {"layer": {"level": "region", "id": "east"}, **kw}


def store(**kw):
    return {"layer": {"level": "store", "id": "S1"}, **kw}


@pytest.mark.parametrize("later,path,expected", [
    # keyed table: an entry replaces the earlier one as a whole (no field-level merge)
    (region(promotions={"a": {"kind": "percent_off", "percent": 20}}), "promotions.a",
     {"kind": "percent_off", "percent": 20}),
    # keyed table: other keys stay, new keys are added
    (region(promotions={"c": {"kind": "points_multiplier", "multiplier_percent": 200}}), "promotions",
     ["a", "b", "c"]),
    # { disabled = true } removes a key
    (store(promotions={"b": {"disabled": True}}), "promotions", ["a"]),
    (store(tiers={"t2": {"disabled": True}}), "tiers", ["t1"]),
    # nested keyed table inside a settings object
    (store(stored_value={"topup_packages": {"p2": {"name": NAME, "pay_fen": 200}}}), "stored_value.topup_packages",
     ["p1", "p2"]),
    (store(stored_value={"topup_packages": {"p1": {"disabled": True}}}), "stored_value.topup_packages", []),
    # settings object: key by key
    (region(earning={"min_spend_fen": 0}), "earning",
     {"points_per_yuan": 1, "excluded_categories": ["tobacco", "gift_card"], "min_spend_fen": 0}),
    # lists are replaced, not appended
    (region(earning={"excluded_categories": ["lottery"]}), "earning.excluded_categories", ["lottery"]),
    # scalars are replaced
    (store(max_age_s=600), "max_age_s", 600),
    (store(default_tier="t2"), "default_tier", "t2"),
    # caps: tightening is fine
    (store(stored_value={"offline_max_per_tx_fen": 1000}), "stored_value.offline_max_per_tx_fen", 1000),
])
def test_merge_semantics(later, path, expected):
    out = merge_layers([copy.deepcopy(BASE), later])
    node = out
    for part in path.split("."):
        node = node[part]
    assert (sorted(node) if isinstance(expected, list) and isinstance(node, dict) else node) == expected
    validate_ruleset(out)
    assert later.get("layer") and BASE["promotions"]["b"]  # inputs untouched (pure)


def test_merge_is_pure():
    before = copy.deepcopy(BASE)
    layer = store(promotions={"b": {"disabled": True}})
    layer_before = copy.deepcopy(layer)
    out = merge_layers([BASE, layer])
    out["tiers"]["t1"]["rank"] = 99
    assert BASE == before and layer == layer_before


# ---------------------------------------------------------------- contradictory layers

@pytest.mark.parametrize("locked,later,message", [
    (["redemption.points_per_yuan"], store(redemption={"points_per_yuan": 50}),
     "store layer S1: redemption.points_per_yuan is locked by the chain layer c"),
    (["promotions"], region(promotions={"x": {"kind": "percent_off", "percent": 5}}),
     "region layer east: promotions.x is locked by the chain layer c"),
    (["promotions"], store(promotions={"a": {"disabled": True}}),  # removing is setting, too
     "store layer S1: promotions.a is locked by the chain layer c"),
    (["promotions.a.percent"], store(promotions={"a": {"kind": "percent_off", "percent": 50}}),
     "store layer S1: promotions.a is locked by the chain layer c"),
    (["earning"], region(earning={"min_spend_fen": 0}),
     "region layer east: earning.min_spend_fen is locked by the chain layer c"),
    (["max_age_s"], store(max_age_s=86400), "store layer S1: max_age_s is locked"),
])
def test_locked_keys_reject_the_rule_set(locked, later, message):
    with pytest.raises(RulesetError, match=re.escape(message)):
        merge_layers([{**BASE, "locked": locked}, later])


def test_a_lock_does_not_cover_its_siblings():
    out = merge_layers([{**BASE, "locked": ["redemption.points_per_yuan"]},
                        store(redemption={"min_points": 1000})])
    assert out["redemption"]["min_points"] == 1000


@pytest.mark.parametrize("layers,message", [
    ([BASE, region(stored_value={"offline_max_per_tx_fen": 9000})],
     "region layer east: stored_value.offline_max_per_tx_fen: 9000 loosens the limit 5000 set by the chain layer c"),
    ([BASE, region(stored_value={"offline_max_per_tx_fen": 4000}), store(stored_value={"offline_max_per_tx_fen": 4500})],
     "store layer S1: stored_value.offline_max_per_tx_fen: 4500 loosens the limit 4000 set by the region layer east"),
    ([{**BASE, "redemption": {"offline_max_points_per_day": 100}}, store(redemption={"offline_max_points_per_day": 101})],
     "store layer S1: redemption.offline_max_points_per_day: 101 loosens"),
    ([{**BASE, "stored_value": {"max_sync_age_s": 3600}}, store(stored_value={"max_sync_age_s": 7200})],
     "store layer S1: stored_value.max_sync_age_s: 7200 loosens"),
])
def test_loosened_caps_are_rejected(layers, message):
    with pytest.raises(RulesetError, match=re.escape(message)):
        merge_layers(copy.deepcopy(layers))


@pytest.mark.parametrize("layers,kw,message", [
    ([BASE, store(), region()], {}, "store, at most one each"),
    ([BASE, region(), region()], {}, "at most one each"),
    ([store()], {}, "the first layer must be the chain layer"),
    ([BASE, {"max_age_s": 600}], {}, "a [layer] header with level and id is required"),
    ([BASE, store()], {"store": "S2"}, "store layer S1: layer.id 'S1' is not the target store 'S2'"),
    ([BASE, region()], {"region": "west"}, "not the store's region 'west'"),
    ([BASE, BASE, BASE, BASE], {}, "at most 3"),
    ([], {}, "at least the chain layer"),
    ([BASE, store(chain="other")], {}, "store layer S1: chain: may only be set by the chain layer"),
    ([BASE, store(promotions={"a": {"disabled": True, "percent": 5}})], {},
     "promotions.a: a disabled entry is exactly { disabled = true }"),
    ([BASE, store(promotions={"a": {"disabled": False}})], {}, "promotions.a"),
    ([BASE, store(layer={"level": "shop", "id": "S1"})], {}, "layer.level"),
    ([BASE, store(promotions={"z": {"kind": "percent_off", "percnt": 5}})], {},
     "store layer S1: promotions.z.percnt: unknown key (did you mean 'percent'?)"),
])
def test_bad_layer_stacks(layers, kw, message):
    with pytest.raises(RulesetError, match=re.escape(message)):
        merge_layers(copy.deepcopy(layers), **kw)


def test_a_removed_reference_is_caught_on_the_merged_whole():
    # the store disables a tier that the chain's default_tier names
    out = merge_layers([{**BASE, "default_tier": "t2"}, store(tiers={"t2": {"disabled": True}})])
    with pytest.raises(RulesetError, match=re.escape("default_tier: unknown tier 't2'")):
        validate_ruleset(out)


# ---------------------------------------------------------------- bad effective rule sets

def _with(path: str, value):
    rules = copy.deepcopy(EFFECTIVE)
    node = rules
    *parents, last = path.split(".")
    for p in parents:
        node = node.setdefault(p, {})
    if value is _DELETE:
        del node[last]
    else:
        node[last] = value
    return rules


_DELETE = object()


@pytest.mark.parametrize("path,value,message", [
    # schema violations name the field
    ("tiers.gold.discount_percent", 120, "tiers.gold.discount_percent: 120 is greater than the maximum of 100"),
    ("tiers.gold.rnak", 3, "tiers.gold.rnak: unknown key (did you mean 'rank'?)"),
    ("earning.points_per_yuan", 1.5, "earning.points_per_yuan: 1.5 is not of type 'integer'"),
    ("promotions.spend100.steps", [{"min_fen": 10000, "off_fen": 2000}, {"min_fen": 20000, "off_fen": -1}],
     "promotions.spend100.steps[1].off_fen: -1 is less than the minimum of 1"),
    ("promotions.fresh10.kind", "bogo", "promotions.fresh10.kind: 'bogo' is not one of"),
    ("card_programs.member.sources", ["nfc", "bluetooth"], "card_programs.member.sources[1]: 'bluetooth' is not one of"),
    ("stored_value.topup_packages.p500.pay_fen", 0, "stored_value.topup_packages.p500.pay_fen: 0 is less than"),
    ("keys.sun.sun-2026.meta_read_key", "xyz", "keys.sun.sun-2026.meta_read_key: 'xyz' does not match"),
    ("fees.issue_fen", 10.0, "fees.issue_fen: 10.0 is a decimal; money (fen), points and percentages are whole"),
    ("tiers", {}, "tiers: {} should be non-empty"),
    ("earning", _DELETE, "earning: required, missing"),
    ("promotions.fresh10.name", {"zh-CN": "生鲜"}, "promotions.fresh10.name.en: required, missing"),
    ("coupons.C2026-0001.value_fen", "10", "coupons.C2026-0001.value_fen: '10' is not of type 'integer'"),
    # unknown references
    ("default_tier", "platinum", "default_tier: unknown tier 'platinum'"),
    ("card_programs.member.card_type", "vip", "card_programs.member.card_type: unknown card type 'vip'"),
    ("card_programs.secure.sun", {"key_id": "sun-2030"}, "card_programs.secure.sun.key_id: unknown key 'sun-2030'"),
    ("promotions.gold_spend300.tiers", ["gold", "platinum"], "promotions.gold_spend300.tiers: unknown tier 'platinum'"),
    ("members", {"880000000013": {"member_id": "M1", "tier": "gold", "packages": {"gym": 3}}},
     "members.880000000013.packages: unknown package 'gym'"),
    ("members", {"880000000013": {"member_id": "M1", "tier": "gold", "card_type": "vip"}},
     "members.880000000013.card_type: unknown card type 'vip'"),
    ("members", {"880000000013": {"member_id": "M1", "tier": "gold", "primary_card": "880000000021"}},
     "members.880000000013.primary_card: card 880000000021 is not in the member snapshot"),
    ("members", {"770000000013": {"member_id": "M1", "tier": "gold"}},
     "members.770000000013: card number matches no card program"),
    # contradictions inside the effective set
    ("tiers.diamond.rank", 3, "tiers.diamond.rank: 3 is also the rank of tier 'gold'"),
    ("promotions.spend100.steps", [{"min_fen": 20000, "off_fen": 5000}, {"min_fen": 10000, "off_fen": 6000}],
     "promotions.spend100.steps[1].min_fen: 10000 is not above the previous step's 20000"),
    ("promotions.spend100.steps", [{"min_fen": 10000, "off_fen": 2000}, {"min_fen": 20000, "off_fen": 2000}],
     "promotions.spend100.steps[1].off_fen: 2000 is not above the previous step's 2000"),
    ("promotions.spend100.steps", [{"min_fen": 10000, "off_fen": 10000}],
     "promotions.spend100.steps[0].off_fen: 10000 is not less than min_fen 10000"),
    ("promotions.fresh10.steps", [{"min_fen": 100, "off_fen": 10}], "promotions.fresh10.steps: not used by kind percent_off"),
    ("promotions.fresh10.percent", _DELETE, "promotions.fresh10.percent: required for kind percent_off, missing"),
    ("promotions.fresh10.to", "2026-02-30T10:00", "promotions.fresh10.to: '2026-02-30T10:00' is not a valid date"),
    ("promotions.spend100.to", "2026-10-01T00:00", "promotions.spend100.to: '2026-10-01T00:00' is before from"),
    ("promotions.s001_bakery.tiers", ["gold"], "promotions.s001_bakery.member_only: false contradicts tiers"),
    ("card_programs.copy", {"prefix": "8800", "length": 12, "card_type": "personal"},
     "card_programs.copy: same prefix '8800' and length 12 as card program 'member'"),
    ("card_programs.short", {"prefix": "123456", "length": 6, "card_type": "personal"},
     "card_programs.short.prefix: '123456' leaves no digits of a 6-digit number"),
    ("card_programs.secure.sources", ["qr"], "card_programs.secure.sun: SUN messages need nfc in sources"),
    ("coupons.C2026-0001.percent", 10, "coupons.C2026-0001: exactly one of value_fen and percent"),
    ("stored_value.offline_max_per_tx_fen", 900000,
     "stored_value.offline_max_per_tx_fen: 900000 is above offline_max_per_day_fen"),
    ("member_qr.issuer_public_keys", {"k": "c2hvcnQ="}, "member_qr.issuer_public_keys.k: 'c2hvcnQ=' does not match"),
    ("earning.member_days", [{"multiplier_percent": 200}], "earning.member_days[0]: names no weekdays"),
    ("deny", {"880000000054": {"status": "lost", "replaced_by": "880000000013"}},
     "deny.880000000054.replaced_by: only for status replaced"),
    ("deny", {"880000000054": {"status": "active"}}, "deny.880000000054.status: 'active' is not one of"),
])
def test_bad_rule_sets_are_rejected_naming_rule_and_field(path, value, message):
    with pytest.raises(RulesetError, match=re.escape(message)):
        validate_ruleset(_with(path, value))


def test_a_layer_document_is_not_an_effective_rule_set():
    with pytest.raises(RulesetError, match="merge it with merge_layers"):
        validate_ruleset(CHAIN)


def test_many_problems_are_reported_together_but_bounded():
    rules = copy.deepcopy(EFFECTIVE)
    rules["promotions"] = {f"p{i}": {"kind": "percent_off", "percent": 10, "tiers": ["nope"]} for i in range(30)}
    with pytest.raises(RulesetError) as err:
        validate_ruleset(rules)
    assert str(err.value).count("unknown tier 'nope'") == 10 and "and 20 more" in str(err.value)


# ---------------------------------------------------------------- snapshot records

def test_member_and_deny_records():
    rules = with_defaults(EFFECTIVE)
    rec = check_member({"card_no": "880000000013", "member_id": "M1", "tier": "gold"}, rules)
    assert rec["status"] == "active" and rec["points"] == 0 and rec["balance_fen"] == 0 and rec["coupons"] == []
    for record, message in [
        ({"card_no": "880000000013", "member_id": "M1", "tier": "gold", "points": -10**10 - 1},
         "members.880000000013.points"),
        ({"card_no": "880000000013", "member_id": "M1"}, "members.880000000013"),
        ({"card_no": "88", "member_id": "M1", "tier": "gold"}, "members.88.card_no"),
        ({"card_no": "880000000013", "member_id": "M1", "tier": "gold", "birthday": "13-01"},
         "members.880000000013.birthday"),
        ({"card_no": "880000000013", "member_id": "M1", "tier": "gold", "phone": "138"}, "members.880000000013"),
        ({"card_no": "880000000013", "member_id": "M1", "tier": "platinum"}, "members.880000000013.tier: unknown tier"),
        ({"card_no": "770000000013", "member_id": "M1", "tier": "gold"}, "members.770000000013: card number matches no"),
        ({"card_no": "880000000013", "member_id": "M1", "tier": "gold", "packages": {"gym": 1}},
         "members.880000000013.packages: unknown package 'gym'"),
        ({"card_no": "880000000013", "member_id": "M1", "tier": "gold", "card_type": "vip"},
         "members.880000000013.card_type: unknown card type 'vip'"),
        ({"card_no": "880000000013", "member_id": "M1", "tier": "gold", "expires": "2027-02-30"},
         "members.880000000013.expires: '2027-02-30' is not a valid date"),
    ]:
        with pytest.raises(RulesetError, match=re.escape(message)):
            check_member(record, rules)
    owed = check_member({"card_no": "880000000013", "member_id": "M1", "tier": "gold", "points": -40,
                         "balance_fen": -2000}, rules)                  # an account that owes: carried as it is
    assert (owed["points"], owed["balance_fen"]) == (-40, -2000)
    assert check_deny_entry({"card_no": "880000000054", "status": "lost"})["status"] == "lost"
    with pytest.raises(RulesetError, match=r"deny\.880000000054\.status"):
        check_deny_entry({"card_no": "880000000054", "status": "gone"})
    with pytest.raises(RulesetError, match=r"deny\.880000000054\.replaced_by: only for status replaced"):
        check_deny_entry({"card_no": "880000000054", "status": "lost", "replaced_by": "880000000013"})


def test_example_parts_are_valid_records():
    rules = with_defaults(EFFECTIVE)
    lines = (EXAMPLES / "members.demo.jsonl").read_text().splitlines()
    assert json.loads(lines[0])["part"] == "members"
    for line in lines[1:]:
        check_member(json.loads(line), rules)
    lines = (EXAMPLES / "deny.demo.jsonl").read_text().splitlines()
    for line in lines[1:]:
        check_deny_entry(json.loads(line))


# The fast member check (a million records per snapshot) must agree with the schema.
from hypothesis import given, settings, strategies as st  # noqa: E402

from wire.ruleset import MEMBER_SCHEMA, _fast_member_problem  # noqa: E402

_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-2, 10**11), st.floats(allow_nan=False, max_value=1e6),
                    st.sampled_from(["", "880000000013", "gold", "active", "lost", "solar", "lunar", "02-29",
                                     "13-01", "2027-12-31", "04A1B2C3D4E5F6", "04a1b2c3d4e5f6", "x" * 70,
                                     "880000000013\n", "C-1"]),
                    st.lists(st.sampled_from(["C1", "C2", "bad key!"]), max_size=3),
                    st.dictionaries(st.sampled_from(["car_wash10", "bad key!"]), st.integers(-1, 100_001), max_size=2))
_FIELDS = ["card_no", "member_id", "name", "tier", "status", "card_type", "expires", "birthday", "birthday_calendar",
           "nfc_uid", "points", "balance_fen", "packages", "primary_card", "group_id", "coupons", "phone"]


@settings(max_examples=600, deadline=None)
@given(st.dictionaries(st.sampled_from(_FIELDS), _VALUES, max_size=8))
def test_fast_member_check_agrees_with_the_schema(extra):
    rec = {"card_no": "880000000013", "member_id": "M1", "tier": "gold", **extra}
    schema_ok = jsonschema.Draft202012Validator(MEMBER_SCHEMA).is_valid(rec)
    has_decimal = any(isinstance(v, float) for v in rec.values())
    trailing_newline = any(isinstance(v, str) and v.endswith("\n") for v in rec.values())
    fast_ok = _fast_member_problem(rec) is None
    if fast_ok:
        assert schema_ok
    elif schema_ok:
        assert has_decimal or trailing_newline     # stricter on purpose: whole numbers, no "\n" tails
