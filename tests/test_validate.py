"""Card validation (engine.validate) per wire/RULESET.md: programs, sources,
every card status, expiry, staleness, subsidiary cards, the masked member
summary and what is allowed offline — on the example layers and parts, over
both member stores (in memory and SQLite)."""

import copy
import tomllib
from datetime import datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings, strategies as st

from gateway.core import validate as engine
from gateway.core.members import InMemoryMembers
from gateway.store.members import MemberStore, load_part_files
from wire.ruleset import effective_ruleset, with_defaults

EXAMPLES = Path(__file__).resolve().parent.parent / "deploy" / "examples"
TZ = ZoneInfo("Asia/Shanghai")
NOW = datetime(2026, 11, 24, 10, 30, tzinfo=TZ)           # a Tuesday
ISSUED = int(NOW.timestamp()) - 3600                       # rules an hour old
LAYERS = [tomllib.loads((EXAMPLES / f"{n}.toml").read_text()) for n in ("chain", "region-east", "store-S001")]
EFFECTIVE = effective_ruleset(LAYERS, store="S001", region="east")

GOLD, SILVER, EXPIRED, FROZEN = "880000000013", "880000000021", "880000000039", "880000000047"
DIAMOND, NOT_ACTIVATED, FAMILY, CORPORATE = "880000000070", "880000000088", "880200000011", "880300000010"
PREPAID, SECURE, STAFF = "8809000000000014", "880100000012", "8808000042"
LOST, REPLACED, CANCELLED, DENY_FROZEN = "880000000054", "880000000096", "880000000104", "880000000112"


def _rules(members, issued_at=ISSUED, effective=EFFECTIVE) -> engine.Rules:
    return engine.Rules.from_rule_set(effective, version=5, issued_at=issued_at, scope={"store": "S001"},
                                      members=members)


def _memory() -> InMemoryMembers:
    m = InMemoryMembers()
    load_part_files(m, EXAMPLES / "members.demo.jsonl", EXAMPLES / "deny.demo.jsonl")
    return m


@pytest.fixture(params=["memory", "sqlite"])
def members(request, tmp_path):
    if request.param == "memory":
        yield _memory()
    else:
        store = MemberStore(tmp_path, durable=False)
        load_part_files(store, EXAMPLES / "members.demo.jsonl", EXAMPLES / "deny.demo.jsonl",
                        rules=with_defaults(EFFECTIVE))
        yield store
        store.close()


@pytest.mark.parametrize("source,raw,verdict,reason", [
    # formats
    ("nfc", "04A1B2C3D4E5F6", "accept", "ok"),
    ("nfc", "04:a1:b2:c3:d4:e5:f6", "accept", "ok"),
    ("nfc", "04FFFFFFFFFFFF", "deny", "unknown_nfc_card"),
    ("magstripe", GOLD, "accept", "ok"),
    ("qr", f" {SILVER} ", "accept", "ok"),
    ("magstripe", "880000000022", "deny", "bad_check_digit"),
    ("magstripe", "770000000013", "deny", "unknown_card_format"),
    ("magstripe", "88000000001", "deny", "unknown_card_format"),       # one digit short
    ("magstripe", "8800000000130", "deny", "unknown_card_format"),     # one digit long
    ("qr", "hello", "deny", "unknown_card_format"),
    ("qr", "", "deny", "unknown_card_format"),
    ("magstripe", STAFF, "accept", "ok"),                              # 10 digits, no check digit
    ("magstripe", PREPAID, "accept", "ok"),                            # 16 digits
    # sources a program allows
    ("nfc", "04C0FFEE123456", "accept", "ok"),                         # secure program: NFC only
    ("qr", SECURE, "deny", "source_not_allowed"),
    ("magstripe", SECURE, "deny", "source_not_allowed"),
    ("qr", STAFF, "deny", "source_not_allowed"),                       # staff card: magstripe only
    ("magstripe", CORPORATE, "accept", "ok"),
    # every status: from the deny list ...
    ("qr", LOST, "deny", "lost"),
    ("qr", REPLACED, "deny", "replaced"),
    ("qr", CANCELLED, "deny", "cancelled"),
    ("qr", DENY_FROZEN, "deny", "frozen"),
    # ... and from the member record
    ("magstripe", FROZEN, "deny", "frozen"),
    ("magstripe", NOT_ACTIVATED, "deny", "not_activated"),
    ("magstripe", EXPIRED, "deny", "expired"),                         # expires in the past
    # a valid number HQ has not sent yet
    ("qr", "880000000062", "accept_limited", "member_not_in_snapshot"),
    # subsidiary: accepted, reports the primary
    ("magstripe", FAMILY, "accept", "ok"),
])
def test_verdict_table(members, source, raw, verdict, reason):
    v = engine.validate(source, raw, _rules(members), NOW)
    assert (v.verdict, v.reason) == (verdict, reason)
    public = v.public()
    assert public["text"]["zh-CN"] and public["text"]["en"]
    assert public["pattern"] == {"accept": "accept", "accept_limited": "accept", "deny": "deny"}[verdict]
    if v.card_no:
        assert v.card_no not in str(public)   # masked everywhere the POS sees


def test_every_status_has_its_verdict(members):
    statuses = {"lost": LOST, "cancelled": CANCELLED, "frozen": DENY_FROZEN, "replaced": REPLACED}
    for status, card in statuses.items():
        assert engine.validate("qr", card, _rules(members), NOW).reason == status
    # every deny-list status through a one-entry store
    for status in ("not_activated", "lost", "frozen", "cancelled", "replaced", "expired"):
        m = InMemoryMembers({GOLD: {"member_id": "M1", "tier": "gold"}}, {GOLD: {"status": status}})
        v = engine.validate("qr", GOLD, _rules(m), NOW)
        assert (v.verdict, v.reason) == ("deny", status)
        m = InMemoryMembers({GOLD: {"member_id": "M1", "tier": "gold", "status": status}})
        assert engine.validate("qr", GOLD, _rules(m), NOW).reason == status


def test_replaced_names_the_new_cards_last_four_digits(members):
    v = engine.validate("qr", REPLACED, _rules(members), NOW)
    text = v.public()["text"]
    assert "0070" in text["zh-CN"] and "ending 0070" in text["en"]
    assert "880000000070" not in str(v.public())
    # without replaced_by: the plain text
    m = InMemoryMembers({}, {GOLD: {"status": "replaced"}})
    assert engine.validate("qr", GOLD, _rules(m), NOW).public()["text"]["en"] == \
        "This card was replaced; please use the new card"


def test_member_summary_is_masked_and_complete(members):
    v = engine.validate("nfc", "04A1B2C3D4E5F6", _rules(members), NOW)
    m = v.member
    assert m["member_id"] == "M1001" and m["name"] == "王*"
    assert m["tier"] == {"code": "gold", "name": {"zh-CN": "金卡会员", "en": "Gold"}, "rank": 3,
                         "discount_percent": 5, "points_multiplier_percent": 150}
    assert m["card_type"]["code"] == "personal" and m["card_type"]["kind"] == "personal"
    assert (m["points"], m["balance_fen"], m["packages"], m["coupons"]) == (5230, 20000, {"car_wash10": 3}, ["C2026-0001"])
    assert m["allowed"] == {"stored_value": True, "redemption": True, "coupons": True}
    # store S001: 300 yuan per tx; balance 200 yuan is the lower bound. Redemption: 5000 per tx, 5230 points
    assert m["offline_left"] == {"stored_value_fen": 20000, "redemption_points": 5000}
    assert m["limits"] == []
    assert "phone" not in m and v.card_no not in str(v.public())


def test_subsidiary_reports_the_primary_and_uses_its_account(members):
    v = engine.validate("magstripe", FAMILY, _rules(members), NOW)
    m = v.member
    assert m["primary_card"] == "8800****0070" and m["account_id"] == "M1005"
    assert m["card_type"]["kind"] == "subsidiary"
    assert (m["points"], m["balance_fen"]) == (48200, 150000)   # the primary's
    ctx = engine.member_context(v)
    assert ctx["card_no"] == FAMILY and ctx["balance_available_fen"] == 150000 and ctx["limited"] is False


def test_subsidiary_of_a_frozen_or_missing_primary():
    base = {"member_id": "M1", "tier": "gold"}
    sub = {"member_id": "M1", "tier": "gold", "card_type": "subsidiary", "primary_card": GOLD}
    for primary_state in ({"status": "frozen"}, {"status": "cancelled"}, {"expires": "2026-01-01"}):
        m = InMemoryMembers({GOLD: {**base, **primary_state}, FAMILY: sub})
        assert engine.validate("qr", FAMILY, _rules(m), NOW).reason == "primary_inactive"
    m = InMemoryMembers({GOLD: base, FAMILY: sub}, {GOLD: {"status": "frozen"}})
    assert engine.validate("qr", FAMILY, _rules(m), NOW).reason == "primary_inactive"
    m = InMemoryMembers({GOLD: base, FAMILY: sub}, {GOLD: {"status": "lost"}})   # the primary's card lost: account fine
    assert engine.validate("qr", FAMILY, _rules(m), NOW).reason == "ok"
    m = InMemoryMembers({FAMILY: sub}).__class__({FAMILY: sub})                  # primary not in the snapshot
    v = engine.validate("qr", FAMILY, _rules(m), NOW)
    assert (v.verdict, v.reason) == ("accept_limited", "primary_not_in_snapshot")
    assert v.member["allowed"] == engine.NOT_OFFLINE


def _block(members, card: str, how: str) -> None:
    """HQ's block of an overdrawn account (reconciliation.overdraft_policy =
    "block"): a deny delta saying ``blocked``, or a snapshot built while the
    account was blocked (its rows say so)."""
    if how == "deny":
        members.apply_deny_delta(members.deny_version + 1, {card: {"status": "blocked", "since": "2026-11-20"}})
    else:
        rows = [{**members.get(no), "card_no": no, "status": "blocked" if no == card else members.get(no)["status"]}
                for no in (GOLD, DIAMOND, FAMILY)]
        members.replace_snapshot(rows, [], version=6, as_of=ISSUED, store_seq=0, rules=with_defaults(EFFECTIVE))


def test_what_an_overdrawn_account_owes_is_shown_so_the_desk_knows_the_top_up_that_settles_it(members):
    rows = [{**members.get(no), "card_no": no, "balance_fen": -15000 if no == GOLD else members.get(no)["balance_fen"],
             "status": "blocked" if no == GOLD else members.get(no)["status"]} for no in (GOLD, DIAMOND)]
    members.replace_snapshot(rows, [], version=6, as_of=ISSUED, store_seq=0, rules=with_defaults(EFFECTIVE))
    v = engine.validate("magstripe", GOLD, _rules(members), NOW)
    assert (v.reason, v.member["balance_fen"], v.member["owed_fen"]) == ("blocked", 0, 15000)
    assert "owed_fen" not in engine.validate("magstripe", DIAMOND, _rules(members), NOW).member   # owes nothing


@pytest.mark.parametrize("how", ["deny", "row"])
def test_a_blocked_card_is_identified_with_nothing_to_spend(members, how):
    """欠款冻结: the card is known (so the counter can take a top-up to settle)
    but nothing on it can be spent offline: no stored value, no redemption,
    no coupons (and, in pricing, no package uses); points accrue."""
    _block(members, GOLD, how)
    v = engine.validate("magstripe", GOLD, _rules(members), NOW)
    assert (v.verdict, v.reason) == ("accept_limited", "blocked")
    m = v.member
    assert m["member_id"] == "M1001" and m["account_id"] == "M1001" and m["points"] == 5230
    assert m["allowed"] == engine.NOT_OFFLINE and m["limits"] == ["blocked"]
    assert m["offline_left"] == {"stored_value_fen": 0, "redemption_points": 0}
    assert v.public()["text"] == {"zh-CN": "此卡有欠款未结清，仅可充值，请到服务台办理",
                                  "en": "This card owes the store money: top-ups only until it is settled; "
                                        "see the service desk"}
    assert v.public()["pattern"] == "accept"
    ctx = engine.member_context(v)
    assert ctx["limited"] is True and ctx["blocked"] is True and ctx["account_id"] == "M1001"
    # other members are untouched; a plain freeze still refuses
    assert engine.validate("magstripe", DIAMOND, _rules(members), NOW).reason == "ok"
    assert engine.member_context(engine.validate("magstripe", DIAMOND, _rules(members), NOW))["blocked"] is False


@pytest.mark.parametrize("how", ["deny", "row"])
def test_a_subsidiary_card_of_a_blocked_primary_is_blocked_too(members, how):
    _block(members, DIAMOND, how)
    v = engine.validate("magstripe", FAMILY, _rules(members), NOW)
    assert (v.verdict, v.reason) == ("accept_limited", "blocked")
    assert v.member["account_id"] == "M1005" and v.member["allowed"] == engine.NOT_OFFLINE
    assert engine.member_context(v)["blocked"] is True


def test_a_blocked_card_on_stale_rules_names_both_limits(members):
    _block(members, GOLD, "deny")
    v = engine.validate("magstripe", GOLD, _rules(members, issued_at=int(NOW.timestamp()) - 700000), NOW)
    assert (v.verdict, v.reason, v.member["limits"]) == ("accept_limited", "blocked", ["blocked", "rules_stale"])


@pytest.mark.parametrize("how", ["deny", "row"])
def test_hqs_lift_of_a_block_makes_the_card_fully_usable(members, how):
    _block(members, GOLD, how)
    members.apply_deny_delta(members.deny_version + 1, {GOLD: None})     # HQ: {"status": "active"}
    v = engine.validate("magstripe", GOLD, _rules(members), NOW)
    assert (v.verdict, v.reason) == ("accept", "ok")
    assert v.member["allowed"] == {"stored_value": True, "redemption": True, "coupons": True}
    assert engine.member_context(v)["blocked"] is False


def test_not_in_snapshot_gets_the_default_tier_and_no_risky_operations(members):
    v = engine.validate("qr", "880000000062", _rules(members), NOW)
    assert v.member["tier"]["code"] == "normal" and v.member["member_id"] is None
    assert v.member["allowed"] == {"stored_value": False, "redemption": False, "coupons": False}
    ctx = engine.member_context(v)
    assert ctx["limited"] is True and ctx["tier"] == "normal"


@pytest.mark.parametrize("age_s,verdict,reason,allowed,limits", [
    (0, "accept", "ok", {"stored_value": True, "redemption": True, "coupons": True}, []),
    (43200, "accept", "ok", {"stored_value": True, "redemption": True, "coupons": True}, []),
    # past stored_value.max_sync_age_s (12 h in S001) but within max_age_s: no stored value
    (43201, "accept", "ok", {"stored_value": False, "redemption": True, "coupons": True}, ["sync_stale"]),
    (604800, "accept", "ok", {"stored_value": False, "redemption": True, "coupons": True}, ["sync_stale"]),
    # past max_age_s (a week): identify and accrue only
    (604801, "accept_limited", "rules_stale", {"stored_value": False, "redemption": False, "coupons": False},
     ["rules_stale"]),
])
def test_staleness(members, age_s, verdict, reason, allowed, limits):
    rules = _rules(members, issued_at=int(NOW.timestamp()) - age_s)
    if hasattr(members, "as_of"):
        members.as_of = int(NOW.timestamp()) - age_s  # snapshot cut with the rules
    v = engine.validate("magstripe", GOLD, rules, NOW)
    assert (v.verdict, v.reason, v.member["allowed"], v.member["limits"]) == (verdict, reason, allowed, limits)
    assert v.member["points"] == 5230       # identification and accrual go on
    # a denied card stays denied however old the rules are
    assert engine.validate("qr", LOST, rules, NOW).reason == "lost"


def test_stale_and_not_in_snapshot_both_limit(members):
    rules = _rules(members, issued_at=int(NOW.timestamp()) - 700000)
    v = engine.validate("qr", "880000000062", rules, NOW)
    assert (v.verdict, v.reason) == ("accept_limited", "member_not_in_snapshot")
    assert v.member["limits"] == ["member_not_in_snapshot", "rules_stale"]


def test_an_old_snapshot_limits_stored_value_even_with_fresh_rules(tmp_path):
    m = _memory()
    m.as_of = int(NOW.timestamp()) - 2 * 86400
    v = engine.validate("magstripe", GOLD, _rules(m), NOW)
    assert v.member["allowed"]["stored_value"] is False and "sync_stale" in v.member["limits"]


def test_expiry_is_inclusive_of_the_last_day(members):
    last = datetime(2027, 12, 31, 23, 59, tzinfo=TZ)
    after = last + timedelta(minutes=2)
    assert engine.validate("magstripe", GOLD, _rules(members, issued_at=int(last.timestamp())), last).reason == "ok"
    assert engine.validate("magstripe", GOLD, _rules(members, issued_at=int(after.timestamp())), after).reason == "expired"


def test_local_deltas_reduce_what_is_available_offline(members):
    rules = _rules(members)
    day = NOW.date().isoformat()
    members.record_deltas(1, "M1001", day, {"points": -3000, "points_redeemed": 3000, "stored_value_fen": -15000,
                                            "packages": {"car_wash10": -1}, "coupons_used": ["C2026-0001"],
                                            "promotion_uses": {"spend100": 1}})
    members.record_deltas(2, "M1001", "2026-11-23", {"points": 40, "points_earned": 40})   # yesterday: not today's
    m = engine.validate("magstripe", GOLD, rules, NOW).member
    assert (m["points"], m["balance_fen"], m["packages"], m["coupons"]) == (2270, 5000, {"car_wash10": 2}, [])
    assert m["today"] == {"points_redeemed": 3000, "stored_value_paid_fen": 15000,
                          "promotion_uses": {"spend100": 1}, "coupons_used": ["C2026-0001"]}
    # per tx 300 yuan, per day 800 yuan - 150 paid, balance 50 yuan: 50 yuan left
    # redemption: per day 20000 - 3000, per tx 5000, points 2270 -> 2200 (multiples of 100)
    assert m["offline_left"] == {"stored_value_fen": 5000, "redemption_points": 2200}
    members.record_deltas(3, "M1001", day, {"points": -2000, "points_redeemed": 2000})
    m = engine.validate("magstripe", GOLD, rules, NOW).member
    assert m["points"] == 270 and m["offline_left"]["redemption_points"] == 0   # below min_points 500


def test_validate_is_pure_and_deterministic(members):
    rules = _rules(members)
    before = copy.deepcopy(rules.data)
    a = engine.validate("nfc", "04A1B2C3D4E5F6", rules, NOW)
    b = engine.validate("nfc", "04A1B2C3D4E5F6", rules, NOW)
    assert a == b and rules.data == before


def test_inline_members_still_work_from_a_single_document():
    rules = engine.Rules.from_rule_set(tomllib.loads((EXAMPLES / "rules.demo.toml").read_text()),
                                       version=1, issued_at=ISSUED)
    assert "members" not in rules.data and "deny" not in rules.data
    assert rules.members.count() == (4, 1)
    assert engine.validate("nfc", "04A1B2C3D4E5F6", rules, NOW).member["member_id"] == "M1001"
    assert rules.uid_index.get("04A1B2C3D4E5F6") == GOLD and rules.uid_index.get("00") is None


# ---------------------------------------------------------------- properties

RULES_MEM = _rules(_memory())


def _luhn_complete(body: str) -> str:
    for d in "0123456789":
        if engine.luhn_ok(body + d):
            return body + d
    raise AssertionError


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(["nfc", "magstripe", "qr"]), st.text(max_size=24))
def test_any_read_gets_a_verdict_with_texts(source, raw):
    v = engine.validate(source, raw, RULES_MEM, NOW)
    assert v.verdict in ("accept", "accept_limited", "deny")
    assert set(v.public()["text"]) == {"zh-CN", "en"}


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 10**7 - 1))
def test_unknown_valid_numbers_are_limited_and_bad_check_digits_denied(n):
    card = _luhn_complete(f"8800{n:07d}")
    v = engine.validate("qr", card, RULES_MEM, NOW)
    if RULES_MEM.members.get(card) is None and RULES_MEM.members.denied(card) is None:
        assert (v.verdict, v.reason) == ("accept_limited", "member_not_in_snapshot")
        assert not any(v.member["allowed"].values())
    wrong = card[:-1] + str((int(card[-1]) + 1) % 10)
    assert engine.validate("qr", wrong, RULES_MEM, NOW).reason == "bad_check_digit"


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 2 * 604800), st.sampled_from([GOLD, SILVER, DIAMOND, FAMILY, CORPORATE, "880000000062"]))
def test_risky_operations_never_allowed_on_stale_rules(age_s, card):
    rules = _rules(_memory(), issued_at=int(NOW.timestamp()) - age_s)
    v = engine.validate("qr", card, rules, NOW)
    assert v.accepted
    if age_s > EFFECTIVE["max_age_s"]:
        assert not any(v.member["allowed"].values()) and v.verdict == "accept_limited"
    left = v.member["offline_left"]
    assert left["stored_value_fen"] <= 30000 and left["redemption_points"] <= 5000
    assert left["stored_value_fen"] <= (v.member["balance_fen"] or 0)
