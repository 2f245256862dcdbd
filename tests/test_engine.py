"""Card validation, and pricing through the counter's path (verdict -> member context -> quote),
with expected numbers written by hand."""

from datetime import datetime
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings, strategies as st

from gateway.core import validate as engine
from gateway.core import pricing
from hq_bridge.rules import _read_doc
from wire.ruleset import effective_ruleset
from tests.support import RULES_FILE
from wire.ruleset import RulesetError, validate_ruleset

NOW = datetime(2026, 11, 22, 10, 30, tzinfo=ZoneInfo("Asia/Shanghai"))
RAW_RULES = effective_ruleset([_read_doc(RULES_FILE)])
# Issued a day before NOW: fresh (max_age_s is a week; stale rules are tests/test_validate.py's).
RULES = engine.Rules.from_rule_set(RAW_RULES, version=7, issued_at=int(NOW.timestamp()) - 86400)


@pytest.mark.parametrize("source,raw,verdict,reason", [
    ("nfc", "04A1B2C3D4E5F6", "accept", "ok"),
    ("nfc", "04:a1:b2:c3:d4:e5:f6", "accept", "ok"),         # reader formats vary
    ("magstripe", "880000000021", "accept", "ok"),
    ("qr", " 880000000021 ", "accept", "ok"),
    ("nfc", "04FFFFFFFFFFFF", "deny", "unknown_nfc_card"),
    ("magstripe", "880000000022", "deny", "bad_check_digit"),
    ("magstripe", "770000000013", "deny", "unknown_card_format"),
    ("magstripe", "88000000001", "deny", "unknown_card_format"),   # too short
    ("qr", "hello", "deny", "unknown_card_format"),
    ("qr", "880000000054", "deny", "lost"),
    ("magstripe", "880000000039", "deny", "expired"),
    ("magstripe", "880000000047", "deny", "frozen"),
    ("qr", "880000000062", "accept_limited", "member_not_in_snapshot"),
])
def test_validate(source, raw, verdict, reason):
    v = engine.validate(source, raw, RULES, NOW)
    assert (v.verdict, v.reason) == (verdict, reason)
    public = v.public()
    assert public["text"]["zh-CN"] and public["text"]["en"]
    if v.card_no:
        assert v.card_no not in str(public)  # masked everywhere the POS sees


def test_no_rules_denies_with_reason():
    v = engine.validate("nfc", "04A1B2C3D4E5F6", None, NOW)
    assert (v.verdict, v.reason, v.pattern) == ("deny", "no_rules", "deny")


def test_expiry_is_inclusive_of_the_last_day():
    last_day = datetime(2027, 12, 31, 23, 59, tzinfo=ZoneInfo("Asia/Shanghai"))
    after = datetime(2028, 1, 1, 0, 1, tzinfo=ZoneInfo("Asia/Shanghai"))
    # rules issued the day before each moment (fresh), so only the expiry differs
    fresh = {t: engine.Rules.from_rule_set(RAW_RULES, version=7, issued_at=int(t.timestamp()) - 86400)
             for t in (last_day, after)}
    assert engine.validate("nfc", "04A1B2C3D4E5F6", fresh[last_day], last_day).verdict == "accept"
    assert engine.validate("nfc", "04A1B2C3D4E5F6", fresh[after], after).reason == "expired"


def _member(raw="04A1B2C3D4E5F6", source="nfc"):
    """The pricing core's member, from the tap's verdict, as the counter builds it."""
    return engine.member_context(engine.validate(source, raw, RULES, NOW))


def _quote(lines, member):
    return pricing.quote(lines, member, RULES.data, NOW, store="S001", region="east")


def test_gold_quote_worked_case():
    q = _quote([
        {"sku": "6901234567892", "name": "大米 5kg", "category": "staples", "qty": 1, "unit_price": 4990},
        {"sku": "6920202888883", "name": "酸奶", "category": "dairy", "qty": 4, "unit_price": 650},
        {"sku": "6901028075831", "name": "香烟", "category": "tobacco", "qty": 1, "unit_price": 2500},
    ], _member())
    # Worked by hand: gold 5% off eligible lines, half-up per line:
    #   rice 4990 * 5% = 249.5 -> 250; yogurt 2600 * 5% = 130; tobacco excluded from discounts.
    assert [l["discount"] for l in q["lines"]] == [250, 130, 0]
    assert (q["subtotal"], q["discount"], q["total"]) == (10090, 380, 9710)
    # Points: tobacco excluded; (4740 + 2470) fen = 72.10 yuan * 1 pt * 150% = 108.15 -> 108
    assert q["points"]["earned"] == 108
    assert q["receipt"]["zh-CN"][:11] == [
        "会员: 金卡会员",
        "大米 5kg x1  49.90",
        "  金卡会员折扣5%  -2.50",
        "酸奶 x4  26.00",
        "  金卡会员折扣5%  -1.30",
        "香烟 x1  25.00",
        "商品合计  100.90",
        "优惠合计  -3.80",
        "  金卡会员折扣5%  -3.80",
        "应付金额  97.10",
        "本次积分  108",
    ]
    assert q["receipt"]["en"][-6:-3] == ["  Gold discount 5%  -3.80", "Total  97.10", "Points earned  108"]


def test_anonymous_quote_has_no_discount_or_points():
    q = _quote([{"sku": "a", "qty": 3, "unit_price": 333}], None)
    assert (q["total"], q["discount"], q["points"]["earned"]) == (999, 0, 0)
    assert q["receipt"]["en"] == ["a x3  9.99", "Subtotal  9.99", "Total  9.99"]


line_st = st.fixed_dictionaries({
    "sku": st.text(min_size=1, max_size=8), "qty": st.integers(1, 50),
    "unit_price": st.integers(0, 1_000_000), "category": st.sampled_from(["", "dairy", "tobacco", "gift_card"]),
})


@settings(max_examples=200, deadline=None)
@given(st.lists(line_st, min_size=1, max_size=30), st.sampled_from([None, "04A1B2C3D4E5F6", "04112233445566"]))
def test_quote_properties(lines, uid):
    member = _member(uid) if uid else None
    q = _quote(lines, member)
    assert q == _quote(lines, member)                                   # deterministic
    assert q["total"] >= 0 and q["points"]["earned"] >= 0
    assert all(0 <= l["discount"] <= l["amount"] and l["net"] >= 0 for l in q["lines"])
    assert q["total"] == sum(l["net"] for l in q["lines"]) == q["subtotal"] - q["discount"]
    assert all(isinstance(v, int) for l in q["lines"] for k, v in l.items() if k in ("amount", "discount", "net"))


def test_bad_rule_sets_name_the_field():
    bad = {**RAW_RULES, "tiers": {**RAW_RULES["tiers"], "gold": {**RAW_RULES["tiers"]["gold"], "discount_percent": 120}}}
    with pytest.raises(RulesetError, match=r"tiers\.gold\.discount_percent"):
        validate_ruleset(bad)
    bad = {**RAW_RULES, "members": {"880000000013": {"member_id": "M1", "tier": "platinum"}}}
    with pytest.raises(RulesetError, match=r"members\.880000000013\.tier: unknown tier 'platinum'"):
        validate_ruleset(bad)
    bad = {**RAW_RULES, "card_programs": {"x": {"prefix": "12345678", "length": 8, "card_type": "personal"}}}
    with pytest.raises(RulesetError, match=r"card_programs\.x\.prefix"):
        validate_ruleset(bad)
    bad = {**RAW_RULES, "members": {
        "880000000013": {"member_id": "M1", "tier": "gold", "nfc_uid": "04A1B2C3D4E5F6"},
        "880000000021": {"member_id": "M2", "tier": "gold", "nfc_uid": "04A1B2C3D4E5F6"}}}
    with pytest.raises(RulesetError, match=r"nfc_uid: same UID"):
        validate_ruleset(bad)
    with pytest.raises(RulesetError, match=r"earning"):
        validate_ruleset({k: v for k, v in RAW_RULES.items() if k != "earning"})
