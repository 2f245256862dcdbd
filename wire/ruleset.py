"""The rule set HQ authors and the gateway decides by: schemas, layer merge, checks.

The format (v3) is described in wire/RULESET.md; this module is its executable
form, used by both HQ (before publishing) and the gateway (after receiving):

- ``RULESET_SCHEMA``: the effective rule set (what the gateway decides by),
  with defaults so ``with_defaults()`` fills them, ``additionalProperties:
  false`` everywhere so a misspelt key is named.
- ``LAYER_SCHEMA``: one layer document (chain / region / store), a partial
  rule set with a ``[layer]`` header and, for the chain layer, ``locked``.
- ``merge_layers(layers)``: pure; chain -> region -> store, later overrides.
  A v2 layer (no ``format``, or ``format = 2``) is migrated first
  (``migrate_layer``): v3 only adds rules, and what a v2 set meant stays.
- ``validate_ruleset(rules)``: schema plus the reference checks a schema
  cannot do; RulesetError names the rule and field
  (``promotions.spend100.steps[1].off_fen: ...``).
- ``MEMBER_SCHEMA`` / ``DENY_SCHEMA`` and ``check_member`` /
  ``check_deny_entry``: the snapshot parts, one record at a time (compiled
  with fastjsonschema: a 1,000,000-member part is checked in seconds).

Money is integer fen, points integers, percentages whole percent.
"""

from __future__ import annotations

import base64
import binascii
import copy
import difflib
from datetime import date, datetime
from typing import Any, Iterable

import fastjsonschema
import jsonschema

from common.configfile import apply_defaults

SCHEMA_BASE = "https://storegate.example/schemas/"
FORMAT_VERSION = 3
FORMATS = (2, 3)   # what a layer document may say it is; v2 is migrated (migrate_layer)

# blocked (欠款冻结): HQ blocked the account for an overdraft (reconciliation.overdraft_policy = "block"):
# identified, nothing to spend, top-ups to settle (wire/RULESET.md "Card status verdicts").
# limited (欠款限用): HQ limited the account for an overdraft (reconciliation.overdraft_policy = "limit"):
# identified, accrues, top-ups taken; offline nothing to spend (HQ's live answer decides online).
CARD_STATUSES = ["active", "not_activated", "lost", "frozen", "blocked", "limited", "cancelled", "replaced",
                 "expired"]
DENY_STATUSES = [s for s in CARD_STATUSES if s != "active"]
CARD_KINDS = ["personal", "subsidiary", "group", "stored_value", "points", "discount"]
# Sources of point multipliers a highest_of group may name (item: a category's or SKU's multiplier).
MULTIPLIER_SOURCES = ("tier", "item", "member_day", "birthday", "campaign")
PROMOTION_KINDS = ["threshold", "percent_off", "member_price", "nth_item", "points_multiplier"]
SOURCES = ["nfc", "magstripe", "qr"]
LEVELS = ["chain", "region", "store"]

MAX_FEN = 10_000_000_000          # 100 million yuan: far above any real amount, far below float trouble
MAX_POINTS = 10_000_000_000

# ---------------------------------------------------------------- building blocks

_TEXT = {
    "type": "object",
    "description": "user-visible text in both languages",
    "required": ["zh-CN", "en"],
    "properties": {"zh-CN": {"type": "string", "minLength": 1}, "en": {"type": "string", "minLength": 1}},
    "additionalProperties": False,
}
_KEY = {"type": "string", "pattern": r"^[A-Za-z0-9_.-]{1,64}$"}
CARD_NO_PATTERN = "^[0-9]{6,19}$"  # ASCII digits only: full-width or Arabic-Indic digits are not a card number
_CARD_NO = {"type": "string", "pattern": CARD_NO_PATTERN}


def is_card_no(value) -> bool:
    """A card number as every part of storegate means it: 6-19 ASCII digits."""
    return isinstance(value, str) and value.isascii() and value.isdigit() and 6 <= len(value) <= 19
_DATE = {"type": "string", "pattern": r"^\d{4}-\d{2}-\d{2}$", "description": "YYYY-MM-DD, store time"}
_DATETIME = {"type": "string", "pattern": r"^\d{4}-\d{2}-\d{2}(T\d{2}:\d{2})?$",
             "description": "YYYY-MM-DDTHH:MM (or a date), store time"}
_FEN = {"type": "integer", "minimum": 0, "maximum": MAX_FEN}
_POINTS = {"type": "integer", "minimum": 0, "maximum": MAX_POINTS}
_PERCENT = {"type": "integer", "minimum": 0, "maximum": 100}
_MULTIPLIER = {"type": "integer", "minimum": 0, "maximum": 10_000, "description": "percent: 150 = 1.5x"}
_STRINGS_NO_DEFAULT = {"type": "array", "items": {"type": "string", "minLength": 1}, "uniqueItems": True}
_STRINGS = {**_STRINGS_NO_DEFAULT, "default": []}
_HEX16 = {"type": "string", "pattern": "^[0-9A-Fa-f]{32}$", "description": "AES-128 key, hex"}
_UID = {"type": "string", "pattern": "^([0-9A-F]{8}|[0-9A-F]{14}|[0-9A-F]{20})$"}


def _obj(properties: dict, required=(), default=None, **kw) -> dict:
    out = {"type": "object", "additionalProperties": False, "properties": properties, **kw}
    if required:
        out["required"] = list(required)
    if default is not None:
        out["default"] = default
    return out


def _table(entry: dict, default=None, description: str | None = None) -> dict:
    """A keyed table: ``[section.<key>]`` entries."""
    out = {"type": "object", "propertyNames": _KEY, "additionalProperties": entry}
    if default is not None:
        out["default"] = default
    if description:
        out["description"] = description
    return out


CARD_PROGRAM = _obj({
    "name": _TEXT,
    "prefix": {"type": "string", "pattern": "^[0-9]{1,8}$"},
    "length": {"type": "integer", "minimum": 6, "maximum": 19},
    "check_digit": {"enum": ["none", "luhn"], "default": "none"},
    "card_type": {"type": "string", "description": "key into card_types"},
    "sources": {"type": "array", "items": {"enum": SOURCES}, "minItems": 1, "uniqueItems": True,
                "default": list(SOURCES)},
    "sun": _obj({"key_id": {"type": "string", "description": "key into keys.sun"},
                 "required": {"type": "boolean", "default": True}}, required=["key_id"]),
}, required=["prefix", "length", "card_type"])

SUN_KEY = _obj({
    "meta_read_key": _HEX16,
    "file_read_key": _HEX16,
    "diversify": {"enum": ["none", "uid"], "default": "uid"},
}, required=["meta_read_key", "file_read_key"])

MEMBER_QR = _obj({
    "issuer_public_keys": {"type": "object", "propertyNames": _KEY,
                           "additionalProperties": {"type": "string", "pattern": "^[A-Za-z0-9+/]{43}=$",
                                                    "description": "Ed25519 public key, base64"},
                           "default": {}},
    "step_s": {"type": "integer", "minimum": 5, "maximum": 300, "default": 30},
    "window_steps": {"type": "integer", "minimum": 0, "maximum": 10, "default": 1},
    "static_codes": {"type": "boolean", "default": True},
}, default={})

CARD_TYPE = _obj({
    "name": _TEXT,
    "kind": {"enum": CARD_KINDS},
    "earns_points": {"type": "boolean", "default": True},
    "stored_value": {"type": "boolean", "default": False},
    "discount_percent": {**_PERCENT, "default": 0},
}, required=["name", "kind"])

_WINDOW_DAYS = {"type": "integer", "minimum": 1, "maximum": 3660, "default": 365}
TIER_UPGRADE = _obj({
    "spend_fen": {**_FEN, "minimum": 1, "description": "net spend (sales less returns) in the window"},
    "points_earned": {**_POINTS, "minimum": 1, "description": "points earned (less taken back) in the window"},
    "window_days": _WINDOW_DAYS,
}, description="HQ moves an account up to this tier (on ingest and nightly) when, over the last window_days, "
               "it meets any threshold named (accounts/policy at HQ, hq_bridge/policy.py)")
TIER_DOWNGRADE = _obj({
    "spend_fen": {**_FEN, "minimum": 1, "description": "keep the tier with at least this spend in the window"},
    "points_earned": {**_POINTS, "minimum": 1},
    "window_days": _WINDOW_DAYS,
    "to": {"type": "string", "description": "the tier it drops to (default: the best lower tier it qualifies "
                                            "for, else default_tier)"},
}, description="nightly at HQ: an account that has held this tier for window_days and meets none of the "
               "thresholds named over the last window_days moves down")

TIER = _obj({
    "name": _TEXT,
    "rank": {"type": "integer", "minimum": 0, "maximum": 1000},
    "discount_percent": {**_PERCENT, "default": 0},
    "points_multiplier_percent": {**_MULTIPLIER, "default": 100},
    "benefits": {"type": "array", "items": _TEXT, "default": []},
    "upgrade": TIER_UPGRADE,
    "downgrade": TIER_DOWNGRADE,
}, required=["name", "rank"])

MEMBER_DAY = _obj({
    "weekdays": {"type": "array", "items": {"type": "integer", "minimum": 1, "maximum": 7},
                 "uniqueItems": True, "default": []},
    "month_days": {"type": "array", "items": {"type": "integer", "minimum": 1, "maximum": 31},
                   "uniqueItems": True, "default": []},
    "from": _DATE,
    "to": _DATE,
    "multiplier_percent": _MULTIPLIER,
}, required=["multiplier_percent"])

EARNING = _obj({
    "points_per_yuan": {"type": "integer", "minimum": 0, "maximum": 100},
    "min_spend_fen": {**_FEN, "default": 0},
    "excluded_categories": _STRINGS,
    "excluded_skus": _STRINGS,
    "category_multipliers_percent": {"type": "object", "additionalProperties": _MULTIPLIER, "default": {}},
    "sku_multipliers_percent": {"type": "object", "additionalProperties": _MULTIPLIER, "default": {}},
    "member_days": {"type": "array", "items": MEMBER_DAY, "default": []},
    "birthday": _obj({"period": {"enum": ["day", "month"], "default": "month"},
                      "multiplier_percent": _MULTIPLIER}, required=["multiplier_percent"]),
    "compose": {"enum": ["add", "multiply"], "default": "add",
                "description": "how point multipliers compose: add (each adds multiplier - 100 %, v2) or multiply"},
    "highest_of": {"type": "array", "default": [], "maxItems": 5,
                   "items": {"type": "array", "items": {"enum": list(MULTIPLIER_SOURCES)}, "minItems": 2,
                             "uniqueItems": True},
                   "description": "groups of multiplier sources of which only the highest applies to a line"},
}, required=["points_per_yuan"])

STEP = _obj({"min_fen": {**_FEN, "minimum": 1}, "off_fen": {**_FEN, "minimum": 1}}, required=["min_fen", "off_fen"])

# Which fields each promotion kind needs / may carry (checked in code so the
# message says "not used by kind percent_off" instead of a oneOf dump).
PROMOTION_FIELDS = {
    "threshold": {"required": ["steps"], "only": ["steps"]},
    "percent_off": {"required": ["percent"], "only": ["percent"]},
    "member_price": {"required": ["prices_fen"], "only": ["prices_fen"]},
    "nth_item": {"required": ["n", "percent"], "only": ["n", "percent"]},
    "points_multiplier": {"required": ["multiplier_percent"], "only": ["multiplier_percent"]},
}
_KIND_FIELDS = {f for spec in PROMOTION_FIELDS.values() for f in spec["only"]}

PROMOTION = _obj({
    "name": _TEXT,
    "kind": {"enum": PROMOTION_KINDS},
    "steps": {"type": "array", "items": STEP, "minItems": 1, "maxItems": 20},
    "percent": {"type": "integer", "minimum": 1, "maximum": 100},
    "prices_fen": {"type": "object", "minProperties": 1, "additionalProperties": _FEN},
    "n": {"type": "integer", "minimum": 2, "maximum": 100},
    "multiplier_percent": _MULTIPLIER,
    "categories": _STRINGS,
    "skus": _STRINGS,
    "excluded_categories": {**_STRINGS_NO_DEFAULT,
                            "description": "v3: lines of these categories never get this promotion (with "
                                           "excluded_skus, instead of discount_excluded_*)"},
    "excluded_skus": {**_STRINGS_NO_DEFAULT, "description": "v3: SKUs that never get this promotion"},
    "priority": {"type": "integer", "minimum": 0, "maximum": 10_000, "default": 100,
                 "description": "lower runs first"},
    "exclusive_group": {"type": "string", "default": ""},
    "tiers": _STRINGS,
    "member_only": {"type": "boolean", "default": True},
    "stores": _STRINGS,
    "regions": _STRINGS,
    "from": _DATETIME,
    "to": _DATETIME,
    "weekdays": {"type": "array", "items": {"type": "integer", "minimum": 1, "maximum": 7},
                 "uniqueItems": True, "default": []},
    "per_member_limit": {"type": "integer", "minimum": 1, "maximum": 1000},
}, required=["kind"])

REDEMPTION = _obj({
    "points_per_yuan": {"type": "integer", "minimum": 1, "maximum": 100_000, "default": 100},
    "min_points": {**_POINTS, "default": 0},
    "max_share_percent": {**_PERCENT, "default": 50},
    "step_points": {"type": "integer", "minimum": 1, "maximum": 100_000, "default": 100},
    "offline_max_points_per_tx": {**_POINTS, "default": 0, "description": "0: no redemption offline"},
    "offline_max_points_per_day": {**_POINTS, "default": 0},
}, default={})

TOPUP_PACKAGE = _obj({
    "name": _TEXT,
    "pay_fen": {**_FEN, "minimum": 1},
    "bonus_fen": {**_FEN, "default": 0},
    "from": _DATE,
    "to": _DATE,
}, required=["name", "pay_fen"])

STORED_VALUE = _obj({
    "offline_max_per_tx_fen": {**_FEN, "default": 0, "description": "0: no stored-value payment offline"},
    "offline_max_per_day_fen": {**_FEN, "default": 0},
    "max_sync_age_s": {"type": "integer", "minimum": 0, "maximum": 31_536_000, "default": 86400},
    "topup_max_fen": {**_FEN, "minimum": 1, "default": 500_000,
                      "description": "largest single top-up (paid part), 5,000 yuan by default"},
    "topup_max_per_terminal_day_fen": {**_FEN, "minimum": 1, "default": 2_000_000,
                                       "description": "top-ups (paid part) one terminal may take in a day"},
    "topup_packages": _table(TOPUP_PACKAGE, default={}),
}, default={})

PACKAGE = _obj({
    "name": _TEXT,
    "skus": {**_STRINGS, "minItems": 1},
    "uses": {"type": "integer", "minimum": 1, "maximum": 1000,
             "description": "uses a sale at the counter adds (with price_fen: the package is sold at the counter)"},
    "price_fen": {**_FEN, "description": "price when sold at the counter (without it, or without uses, the "
                                        "package is not sold at the counter: HQ hands it out)"},
    "validity_months": {"type": "integer", "minimum": 1, "maximum": 120,
                        "description": "v3: a sale makes the package valid this many months from the later of "
                                       "the sale day and its expiry so far; absent: no expiry (v2)"},
    "renewable": {"type": "boolean", "default": True,
                  "description": "v3: false: not sold to a member who still holds uses of it"},
    "stored_value": {"type": "boolean", "default": False,
                     "description": "v3: may be paid from stored value (within the stored-value offline limits)"},
    "from": {**_DATE, "description": "v3: on sale from (store time)"},
    "to": {**_DATE, "description": "v3: on sale until (inclusive)"},
}, required=["name", "skus"])

GIFT = _obj({
    "name": _TEXT,
    "points": {**_POINTS, "minimum": 1, "description": "points one gift costs"},
    "per_member_day_limit": {"type": "integer", "minimum": 1, "maximum": 1000,
                             "description": "at most this many of this gift per member (account) per store-local "
                                            "day; absent: no limit but the points"},
    "sku": {"type": "string", "minLength": 1, "maxLength": 64, "description": "the gift's item code (for stock)"},
    "from": _DATE,
    "to": _DATE,
}, required=["name", "points"], description="v3: a gift points are redeemed for at the counter (礼品兑换)")

COUPON = _obj({
    "name": _TEXT,
    "member_id": {"type": "string", "minLength": 1},
    "value_fen": {**_FEN, "minimum": 1},
    "percent": {"type": "integer", "minimum": 1, "maximum": 100},
    "min_spend_fen": {**_FEN, "default": 0},
    "from": _DATE,
    "to": _DATE,
}, required=["member_id"])

UNIT = _obj({
    "name": _TEXT,
    "symbol": {"type": "string", "minLength": 1, "maxLength": 8, "description": "on the receipt: 0.532kg"},
    "decimals": {"type": "integer", "minimum": 0, "maximum": 3,
                 "description": "precision of a quantity: 3 = 0.001 (a quantity is carried as a whole number "
                                "of these steps)"},
    "max": {"type": "integer", "minimum": 1, "maximum": 9_999_000,
            "description": "largest quantity of one line, in steps (kg, 3 decimals: 50000 = 50.000 kg); "
                           "default 9999 units"},
}, required=["name", "decimals"])

SCALE_BARCODE = _obj({
    "prefix": {"type": "string", "pattern": "^[0-9]{1,6}$", "description": "the EAN-13's leading digits, e.g. 21"},
    "item_digits": {"type": "integer", "minimum": 1, "maximum": 10,
                    "description": "the item code after the prefix; the line's SKU is prefix + item code"},
    "value": {"enum": ["weight", "price"], "description": "what the value digits carry"},
    "value_digits": {"type": "integer", "minimum": 1, "maximum": 10,
                     "description": "a weight in steps of unit, or a price in fen; then the EAN-13 check digit"},
    "unit": {"type": "string", "description": "weight: key into units"},
}, required=["prefix", "item_digits", "value", "value_digits"])

SALE_LIMITS = _obj({
    "max_line_fen": {**_FEN, "minimum": 1, "default": 5_000_000,
                     "description": "largest amount of one basket line, 50,000 yuan by default"},
    "max_sale_fen": {**_FEN, "minimum": 1, "default": 20_000_000,
                     "description": "largest sale (before discounts), 200,000 yuan by default"},
    "max_points_per_sale": {**_POINTS, "minimum": 1, "default": 1_000_000,
                            "description": "most points one sale may earn"},
}, default={})

ACCOUNTS = _obj({
    "spend_order": {"enum": ["proportional", "bonus_first", "paid_first"], "default": "proportional",
                    "description": "how a stored-value payment splits between the paid and the bonus part"},
    "points_expiry_months": {"type": "integer", "minimum": 1, "maximum": 120,
                             "description": "rolling: a lot expires at the end of the month N months after "
                                            "the month earned"},
    "points_expiry_date": {"type": "string", "pattern": r"^(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])$",
                           "description": "fixed: points earned in year Y expire on this MM-DD of year "
                                          "Y + points_expiry_years"},
    "points_expiry_years": {"type": "integer", "minimum": 0, "maximum": 10, "default": 1},
    "annual_fee_months": {"type": "integer", "minimum": 1, "maximum": 120, "default": 12},
    "card_valid_months": {"type": "integer", "minimum": 1, "maximum": 1200},
    "withdrawal": {"enum": ["none", "paid_part"], "default": "none",
                   "description": "取款: none, or the paid part of stored value may be paid out at HQ"},
    "withdrawal_bonus": {"enum": ["forfeit_proportional", "forfeit_all", "keep"],
                         "default": "forfeit_proportional",
                         "description": "what a withdrawal does to the bonus part"},
    "topup_refund_bonus": {"enum": ["take_back_first"], "default": "take_back_first",
                           "description": "a refunded top-up takes its bonus back first"},
    "subsidiary_fee_fen": {**_FEN, "default": 0, "description": "fee for issuing a 附属卡 at HQ"},
}, default={}, description="accounts of record at HQ (hq_bridge/accounts.py, hq_bridge/policy.py)")

RECONCILIATION = _obj({
    "overdraft_policy": {"enum": ["carry", "limit", "block"], "default": "carry",
                         "description": "carry: the negative balance is carried; limit: its cards are limited "
                                        "at every store until settled (identified, nothing to spend offline, "
                                        "HQ's live answer decides online); block: its cards are "
                                        "blocked at every store until settled (identified, nothing to "
                                        "spend, top-ups only)"},
    "tolerance_fen": {**_FEN, "default": 0, "description": "stored-value overdrafts up to this are carried"},
    "tolerance_points": {**_POINTS, "default": 0, "description": "points overdrafts up to this are carried"},
}, default={})

FEES = _obj({
    "issue_fen": {**_FEN, "default": 0},
    "replace_fen": {**_FEN, "default": 0},
    "annual_fen": {**_FEN, "default": 0},
}, default={})

# The snapshot parts (one record each); inline tables omit card_no (it is the key).
_MEMBER_PROPS = {
    "card_no": _CARD_NO,
    "member_id": {"type": "string", "minLength": 1, "maxLength": 64},
    "name": {"type": "string", "maxLength": 64, "description": "masked by HQ, e.g. 张*"},
    "tier": {"type": "string", "minLength": 1},
    "status": {"enum": CARD_STATUSES, "default": "active"},
    "card_type": {"type": "string", "description": "key into card_types; default: the program's"},
    "expires": _DATE,
    "birthday": {"type": "string", "pattern": r"^(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])$"},
    "birthday_calendar": {"enum": ["solar", "lunar"], "default": "solar"},
    "nfc_uid": _UID,
    # Below zero: the account owes (an offline overdraft HQ carries); a store adds its own
    # records after the watermark to the debt and spends nothing until the sum is above zero.
    "points": {"type": "integer", "minimum": -MAX_POINTS, "maximum": MAX_POINTS, "default": 0},
    "balance_fen": {"type": "integer", "minimum": -MAX_FEN, "maximum": MAX_FEN, "default": 0},
    "packages": {"type": "object", "propertyNames": _KEY,
                 "additionalProperties": {"type": "integer", "minimum": 0, "maximum": 100_000}, "default": {}},
    "package_expires": {"type": "object", "propertyNames": _KEY, "additionalProperties": _DATE,
                        "description": "a package's last day of use (store time); a package not named: no expiry"},
    "primary_card": {**_CARD_NO, "description": "a subsidiary card's primary card"},
    "group_id": {"type": "string", "maxLength": 64},
    "coupons": {"type": "array", "items": _KEY, "uniqueItems": True, "default": []},
    "today": _obj({"day": _DATE, "stored_value_paid_fen": _FEN, "points_redeemed": _POINTS}, required=["day"],
                  description="the account's use of the day's offline allowances at every store, as HQ "
                              "has it (a store adds its own records after the snapshot's watermark)"),
}
MEMBER_SCHEMA = {
    "$id": SCHEMA_BASE + "member.json",
    "title": "storegate member snapshot record (one line of a members part)",
    **_obj(_MEMBER_PROPS, required=["card_no", "member_id", "tier"]),
}
_INLINE_MEMBER = _obj({k: v for k, v in _MEMBER_PROPS.items() if k != "card_no"}, required=["member_id", "tier"])

_DENY_PROPS = {
    "card_no": _CARD_NO,
    "status": {"enum": DENY_STATUSES},
    "since": _DATE,
    "replaced_by": _CARD_NO,
}
DENY_SCHEMA = {
    "$id": SCHEMA_BASE + "deny.json",
    "title": "storegate deny-list entry (one line of a deny part or delta)",
    **_obj(_DENY_PROPS, required=["card_no", "status"]),
}
_INLINE_DENY = _obj({k: v for k, v in _DENY_PROPS.items() if k != "card_no"}, required=["status"])

# Sections by merge behaviour.
KEYED_TABLES = ["card_programs", "card_types", "tiers", "promotions", "coupons", "packages", "members", "deny",
                "units", "scale_barcodes", "gifts"]
NESTED_KEYED = {"stored_value": ["topup_packages"], "keys": ["sun"]}
SETTINGS = ["earning", "redemption", "stored_value", "fees", "member_qr", "keys", "sale_limits", "accounts",
            "reconciliation"]
CAPS = ["stored_value.offline_max_per_tx_fen", "stored_value.offline_max_per_day_fen",
        "stored_value.max_sync_age_s", "redemption.offline_max_points_per_tx",
        "redemption.offline_max_points_per_day", "sale_limits.max_line_fen", "sale_limits.max_sale_fen",
        "sale_limits.max_points_per_sale"]

_SECTIONS = {
    "chain": {"type": "string", "minLength": 1},
    "format": {"const": FORMAT_VERSION, "default": FORMAT_VERSION,
               "description": "the effective rule set's format; layers of v2 are migrated when merged"},
    "layers": {"type": "array", "description": "the layers this effective rule set was merged from",
               "items": _obj({"level": {"enum": LEVELS}, "id": {"type": "string"}}, required=["level", "id"]),
               "default": []},
    "max_age_s": {"type": "integer", "minimum": 60, "maximum": 31_536_000, "default": 604800},
    "default_tier": {"type": "string"},
    "card_programs": {**_table(CARD_PROGRAM), "minProperties": 1},
    "keys": _obj({"sun": _table(SUN_KEY, default={})}, default={}),
    "member_qr": MEMBER_QR,
    "card_types": {**_table(CARD_TYPE), "minProperties": 1},
    "tiers": {**_table(TIER), "minProperties": 1},
    "discount_excluded_categories": _STRINGS,
    "discount_excluded_skus": _STRINGS,
    "earning": EARNING,
    "promotions": _table(PROMOTION, default={}),
    "redemption": REDEMPTION,
    "stored_value": STORED_VALUE,
    "packages": _table(PACKAGE, default={}),
    "gifts": _table(GIFT, default={}, description="v3: the gift catalogue (礼品兑换): points for gifts at the counter"),
    "coupons": _table(COUPON, default={}),
    "fees": FEES,
    "sale_limits": SALE_LIMITS,
    "units": _table(UNIT, default={}, description="v3: units of weighed and measured goods"),
    "scale_barcodes": _table(SCALE_BARCODE, default={},
                             description="v3: EAN-13 scale barcode formats, with embedded weight or price"),
    "accounts": ACCOUNTS,
    "reconciliation": RECONCILIATION,
    "members": {"type": "object", "propertyNames": _CARD_NO, "additionalProperties": _INLINE_MEMBER, "default": {},
                "description": "inline member snapshot: small stores and tests; large snapshots go as parts"},
    "deny": {"type": "object", "propertyNames": _CARD_NO, "additionalProperties": _INLINE_DENY, "default": {},
             "description": "inline deny list: small stores and tests; large lists go as parts"},
}

RULESET_SCHEMA = {
    "$id": SCHEMA_BASE + "ruleset.json",
    "title": "storegate effective rule set (format v3, see wire/RULESET.md)",
    **_obj(_SECTIONS, required=["card_programs", "card_types", "tiers", "earning"]),
}


def _strip(schema: Any, drop_required: bool) -> Any:
    """A copy without defaults (a layer must not set what it does not name)
    and, for the top level and settings objects, without ``required``."""
    if isinstance(schema, dict):
        out = {k: _strip(v, False) for k, v in schema.items() if k != "default"}
        if drop_required:
            out.pop("required", None)
        return out
    if isinstance(schema, list):
        return [_strip(v, False) for v in schema]
    return schema


_DISABLED = _obj({"disabled": {"const": True}}, required=["disabled"])


def _layer_schema(with_disabled: bool) -> dict:
    props = {}
    for name, sub in _SECTIONS.items():
        if name == "layers":
            continue
        sub = _strip(sub, drop_required=name in SETTINGS)
        if name in SETTINGS:
            sub["properties"] = {k: _strip(v, drop_required=False) for k, v in sub["properties"].items()}
        props[name] = sub
    for name in KEYED_TABLES:
        props[name].pop("minProperties", None)  # a layer may name no entries; the merged whole is checked
    if with_disabled:  # a keyed entry may be { disabled = true } to remove the key
        for name in KEYED_TABLES:
            props[name]["additionalProperties"] = {"anyOf": [_DISABLED, props[name]["additionalProperties"]]}
        for name, subs in NESTED_KEYED.items():
            for s in subs:
                t = props[name]["properties"][s]
                t["additionalProperties"] = {"anyOf": [_DISABLED, t["additionalProperties"]]}
    props["layer"] = _obj({"level": {"enum": LEVELS}, "id": {"type": "string", "minLength": 1}},
                          required=["level", "id"])
    props["format"] = {"enum": list(FORMATS), "description": "the layer's format; absent: 2 (migrated)"}
    props["locked"] = {"type": "array", "items": {"type": "string", "pattern": r"^[A-Za-z0-9_.-]+$"},
                       "uniqueItems": True, "description": "dotted keys later layers may not set"}
    return {"$id": SCHEMA_BASE + "layer.json",
            "title": "storegate rule-set layer document (chain / region / store)",
            **_obj(props)}


LAYER_SCHEMA = _layer_schema(with_disabled=True)
_LAYER_CHECK_SCHEMA = _layer_schema(with_disabled=False)  # after disabled entries are taken out


class RulesetError(ValueError):
    """A rule set that must not be applied; the message names rule and field."""


# ---------------------------------------------------------------- messages

def _path(parts: Iterable) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "(top level)"


def _describe(error: jsonschema.ValidationError, prefix: str = "") -> str:
    where = _path(error.absolute_path)
    if prefix:
        where = prefix if where == "(top level)" else f"{prefix}.{where}"
    if error.validator == "required":
        missing = error.message.split("'")[1] if "'" in error.message else error.message
        return f"{where}.{missing}: required, missing" if where != "(top level)" else f"{missing}: required, missing"
    if error.validator == "additionalProperties" and isinstance(error.instance, dict):
        known = list(error.schema.get("properties", {}))
        out = []
        for k in sorted(set(error.instance) - set(known)):
            hint = difflib.get_close_matches(k, known, n=1)
            name = k if where == "(top level)" else f"{where}.{k}"
            out.append(f"{name}: unknown key" + (f" (did you mean {hint[0]!r}?)" if hint else ""))
        return "; ".join(out)
    return f"{where}: {error.message}"


def _schema_errors(validator: jsonschema.Draft202012Validator, data: Any, prefix: str = "") -> list[str]:
    errors = sorted(validator.iter_errors(data), key=lambda e: [str(p) for p in e.absolute_path])
    return [_describe(e, prefix) for e in errors]


def _raise(problems: list[str], prefix: str = "") -> None:
    if problems:
        more = f"; and {len(problems) - 10} more" if len(problems) > 10 else ""
        raise RulesetError(prefix + "; ".join(problems[:10]) + more)


_RULESET_VALIDATOR = jsonschema.Draft202012Validator(RULESET_SCHEMA)
_LAYER_VALIDATOR = jsonschema.Draft202012Validator(_LAYER_CHECK_SCHEMA)

# ---------------------------------------------------------------- layers


def _layer_name(layer: dict, index: int) -> str:
    head = layer.get("layer")
    if isinstance(head, dict) and head.get("level") in LEVELS:
        return f"{head['level']} layer {head.get('id', '?')}"
    return "chain layer" if index == 0 else f"layer {index}"


def _without_disabled(layer: dict) -> tuple[dict, list[str]]:
    """The layer with ``{disabled = true}`` entries taken out, and their paths."""
    out = dict(layer)
    removed = []

    def strip(table: Any, path: str) -> Any:
        if not isinstance(table, dict):
            return table
        kept = {}
        for key, entry in table.items():
            if isinstance(entry, dict) and "disabled" in entry:
                removed.append(f"{path}.{key}")
                if entry != {"disabled": True}:
                    raise RulesetError(f"{path}.{key}: a disabled entry is exactly {{ disabled = true }}")
            else:
                kept[key] = entry
        return kept

    for name in KEYED_TABLES:
        if name in out:
            out[name] = strip(out[name], name)
    for name, subs in NESTED_KEYED.items():
        if isinstance(out.get(name), dict):
            out[name] = dict(out[name])
            for s in subs:
                if s in out[name]:
                    out[name][s] = strip(out[name][s], f"{name}.{s}")
    return out, removed


def _replaced_units(layer: dict) -> list[str]:
    """Dotted paths of everything a layer replaces as a whole (for locks)."""
    units = []
    for name, value in layer.items():
        if name in ("layer", "locked"):
            continue
        if name in KEYED_TABLES and isinstance(value, dict):
            units += [f"{name}.{k}" for k in value] or [name]
        elif name in SETTINGS and isinstance(value, dict):
            for k, v in value.items():
                if k in NESTED_KEYED.get(name, ()) and isinstance(v, dict):
                    units += [f"{name}.{k}.{kk}" for kk in v] or [f"{name}.{k}"]
                else:
                    units.append(f"{name}.{k}")
        else:
            units.append(name)
    return units


def _get(data: dict, dotted: str) -> Any:
    cur: Any = data
    for part in dotted.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return None
        cur = cur[part]
    return cur


def merge_layers(layers: list[dict], store: str | None = None, region: str | None = None) -> dict:
    """The effective rule set of chain -> region -> store layer documents.

    Pure. Keyed tables merge by key (an entry replaces the earlier one as a
    whole; ``{disabled = true}`` removes the key); settings objects merge key
    by key (one level: objects inside them are replaced whole, except the
    keyed ``stored_value.topup_packages`` and ``keys.sun``); lists and
    scalars are replaced. A later layer may not set a key an earlier layer
    locked, nor loosen an offline cap (CAPS) an earlier layer set. The result
    is not yet validated as a whole: call validate_ruleset() on it.
    """
    if not isinstance(layers, list) or not layers:
        raise RulesetError("layers: at least the chain layer is needed")
    if len(layers) > 3:
        raise RulesetError(f"layers: at most 3 (chain, region, store), got {len(layers)}")
    effective: dict = {}
    locks: dict[str, str] = {}   # dotted key -> name of the layer that locked it
    caps_set: dict[str, tuple[int, str]] = {}
    last_level = -1
    names = []
    for i, raw in enumerate(layers):
        name = _layer_name(raw, i) if isinstance(raw, dict) else f"layer {i}"
        if not isinstance(raw, dict):
            raise RulesetError(f"{name}: must be a table/object")
        layer, removed = _without_disabled(migrate_layer(raw))
        _raise(_schema_errors(_LAYER_VALIDATOR, layer) + _float_problems(layer), f"{name}: ")
        head = layer.get("layer") or ({"level": "chain", "id": layer.get("chain", "chain")} if i == 0 else None)
        if head is None:
            raise RulesetError(f"{name}: a [layer] header with level and id is required after the chain layer")
        level = LEVELS.index(head["level"])
        if i == 0 and level != 0:
            raise RulesetError(f"{name}: the first layer must be the chain layer")
        if level <= last_level:
            raise RulesetError(f"{name}: layers must be in the order chain, region, store, at most one each")
        last_level = level
        if head["level"] == "store" and store is not None and head["id"] != store:
            raise RulesetError(f"{name}: layer.id {head['id']!r} is not the target store {store!r}")
        if head["level"] == "region" and region is not None and head["id"] != region:
            raise RulesetError(f"{name}: layer.id {head['id']!r} is not the store's region {region!r}")
        if head["level"] == "chain" and "chain" in layer and layer["chain"] != head["id"]:
            raise RulesetError(f"{name}: chain {layer['chain']!r} differs from layer.id {head['id']!r}")
        if i > 0 and "chain" in layer and layer["chain"] != effective.get("chain"):
            raise RulesetError(f"{name}: chain: may only be set by the chain layer")
        names.append(name)

        problems = []
        for unit in _replaced_units(layer) + removed:
            for lock, by in locks.items():
                if unit == lock or unit.startswith(lock + ".") or lock.startswith(unit + "."):
                    problems.append(f"{name}: {unit} is locked by the {by}")
                    break
        for cap in CAPS:
            new = _get(layer, cap)
            if new is not None and cap in caps_set and new > caps_set[cap][0]:
                old, by = caps_set[cap]
                problems.append(f"{name}: {cap}: {new} loosens the limit {old} set by the {by}; "
                                f"a later layer may only tighten it")
        _raise(problems)
        for cap in CAPS:
            if _get(layer, cap) is not None:
                caps_set[cap] = (_get(layer, cap), name)
        for lock in layer.get("locked", []):
            locks.setdefault(lock, name)

        layer.pop("format", None)
        _merge_into(effective, layer, removed)
        if head["level"] == "chain":
            effective.setdefault("chain", head["id"])
        effective.setdefault("layers", []).append({"level": head["level"], "id": head["id"]})
    effective["format"] = FORMAT_VERSION
    return effective


def migrate_layer(layer: Any) -> Any:
    """A v2 layer document as v3 (pure; a v3 one as it is). v3 only adds
    rules, each with a default that is what v2 did: point multipliers
    compose by ``add`` (``earning.compose``) with no ``highest_of`` groups; a
    promotion without ``excluded_categories``/``_skus`` keeps the v2
    eligibility; no ``units`` or ``scale_barcodes`` (count goods only);
    a package without ``validity_months`` does not expire, is renewable
    and paid in money only; no ``gifts``. So
    the migration changes no rule: it says the document is v3. Anything
    malformed is left for the schema to name."""
    if not isinstance(layer, dict) or layer.get("format", 2) != 2:
        return layer
    return {**layer, "format": FORMAT_VERSION}


def _merge_into(effective: dict, layer: dict, removed: list[str]) -> None:
    for name, value in layer.items():
        if name in ("layer", "locked"):
            continue
        if name in KEYED_TABLES:
            effective.setdefault(name, {}).update(copy.deepcopy(value))
        elif name in SETTINGS:
            target = effective.setdefault(name, {})
            for k, v in value.items():
                if k in NESTED_KEYED.get(name, ()):
                    target.setdefault(k, {}).update(copy.deepcopy(v))
                else:
                    target[k] = copy.deepcopy(v)
        else:
            effective[name] = copy.deepcopy(value)
    for path in removed:
        *table, key = path.split(".")
        parent = effective
        for part in table:
            parent = parent.setdefault(part, {})
        parent.pop(key, None)


# ---------------------------------------------------------------- the effective rule set

def _date_ok(text: str) -> bool:
    try:
        (datetime.fromisoformat if "T" in text else date.fromisoformat)(text)
        return True
    except ValueError:
        return False


def _check_range(problems: list, where: str, entry: dict) -> None:
    for k in ("from", "to"):
        if k in entry and not _date_ok(entry[k]):
            problems.append(f"{where}.{k}: {entry[k]!r} is not a valid date")
    if "from" in entry and "to" in entry and _date_ok(entry["from"]) and _date_ok(entry["to"]) \
            and entry["from"] > entry["to"]:
        problems.append(f"{where}.to: {entry['to']!r} is before from {entry['from']!r}")


def _float_problems(data: Any, path: tuple = ()) -> list[str]:
    """JSON Schema counts 10.0 as an integer; money, points and percentages
    must be whole numbers in the document too (TOML 10.0 is a float)."""
    if isinstance(data, float):
        return [f"{_path(path)}: {data!r} is a decimal; money (fen), points and percentages are whole numbers"]
    if isinstance(data, dict):
        return [p for k, v in data.items() for p in _float_problems(v, (*path, k))]
    if isinstance(data, list):
        return [p for i, v in enumerate(data) for p in _float_problems(v, (*path, i))]
    return []


def _reference_problems(rules: dict) -> list[str]:
    p: list[str] = []
    tiers = rules["tiers"]
    card_types = rules["card_types"]
    sun_keys = rules.get("keys", {}).get("sun", {})
    packages = rules.get("packages", {})

    if "default_tier" in rules and rules["default_tier"] not in tiers:
        p.append(f"default_tier: unknown tier {rules['default_tier']!r}")
    ranks: dict[int, str] = {}
    for code, tier in tiers.items():
        if tier["rank"] in ranks:
            p.append(f"tiers.{code}.rank: {tier['rank']} is also the rank of tier {ranks[tier['rank']]!r}")
        ranks.setdefault(tier["rank"], code)
        for rule in ("upgrade", "downgrade"):
            r = tier.get(rule)
            if r is not None and "spend_fen" not in r and "points_earned" not in r:
                p.append(f"tiers.{code}.{rule}: names neither spend_fen nor points_earned")
        down = tier.get("downgrade") or {}
        if "to" in down:
            if down["to"] not in tiers:
                p.append(f"tiers.{code}.downgrade.to: unknown tier {down['to']!r}")
            elif tiers[down["to"]]["rank"] >= tier["rank"]:
                p.append(f"tiers.{code}.downgrade.to: tier {down['to']!r} is not below {code!r}")
    acc = rules.get("accounts", {})
    if "points_expiry_months" in acc and "points_expiry_date" in acc:
        p.append("accounts.points_expiry_date: set either points_expiry_months (rolling) or "
                 "points_expiry_date (fixed), not both")

    seen_programs: dict[tuple, str] = {}
    for pid, prog in rules["card_programs"].items():
        where = f"card_programs.{pid}"
        if len(prog["prefix"]) >= prog["length"]:
            p.append(f"{where}.prefix: {prog['prefix']!r} leaves no digits of a {prog['length']}-digit number")
        if prog["card_type"] not in card_types:
            p.append(f"{where}.card_type: unknown card type {prog['card_type']!r}")
        key = (prog["prefix"], prog["length"])
        if key in seen_programs:
            p.append(f"{where}: same prefix {prog['prefix']!r} and length {prog['length']} as card program "
                     f"{seen_programs[key]!r}")
        seen_programs.setdefault(key, pid)
        if "sun" in prog:
            if prog["sun"]["key_id"] not in sun_keys:
                p.append(f"{where}.sun.key_id: unknown key {prog['sun']['key_id']!r} (not in keys.sun)")
            if "nfc" not in prog.get("sources", SOURCES):
                p.append(f"{where}.sun: SUN messages need nfc in sources")

    earning = rules["earning"]
    for i, day in enumerate(earning.get("member_days", [])):
        where = f"earning.member_days[{i}]"
        if not day.get("weekdays") and not day.get("month_days") and not ("from" in day or "to" in day):
            p.append(f"{where}: names no weekdays, month_days or date range")
        _check_range(p, where, day)

    for j, group in enumerate(earning.get("highest_of", [])):
        for src in group:
            if any(src in other for other in earning["highest_of"][:j]):
                p.append(f"earning.highest_of[{j}]: {src} is already in an earlier group")

    units = rules.get("units", {})
    prefixes: dict[str, str] = {}
    for fid, fmt in rules.get("scale_barcodes", {}).items():
        where = f"scale_barcodes.{fid}"
        length = len(fmt["prefix"]) + fmt["item_digits"] + fmt["value_digits"] + 1
        if length != 13:
            p.append(f"{where}: prefix ({len(fmt['prefix'])}) + item_digits ({fmt['item_digits']}) + value_digits "
                     f"({fmt['value_digits']}) + 1 check digit is {length} digits, not the 13 of an EAN-13")
        if fmt["value"] == "weight" and fmt.get("unit") not in units:
            p.append(f"{where}.unit: a weight barcode needs a unit of units, got {fmt.get('unit')!r}")
        if fmt["value"] == "price" and "unit" in fmt:
            p.append(f"{where}.unit: a price barcode carries fen, not a quantity")
        if fmt["prefix"] in prefixes:
            p.append(f"{where}.prefix: {fmt['prefix']!r} is also the prefix of {prefixes[fmt['prefix']]!r}")
        prefixes.setdefault(fmt["prefix"], fid)

    for pid, promo in rules.get("promotions", {}).items():
        where = f"promotions.{pid}"
        spec = PROMOTION_FIELDS[promo["kind"]]
        for f in spec["required"]:
            if f not in promo:
                p.append(f"{where}.{f}: required for kind {promo['kind']}, missing")
        for f in sorted(_KIND_FIELDS & set(promo) - set(spec["only"])):
            p.append(f"{where}.{f}: not used by kind {promo['kind']}")
        steps = promo.get("steps", []) if promo["kind"] == "threshold" else []
        for j, step in enumerate(steps):
            if step["off_fen"] >= step["min_fen"]:
                p.append(f"{where}.steps[{j}].off_fen: {step['off_fen']} is not less than min_fen {step['min_fen']}")
            if j and step["min_fen"] <= steps[j - 1]["min_fen"]:
                p.append(f"{where}.steps[{j}].min_fen: {step['min_fen']} is not above the previous step's "
                         f"{steps[j - 1]['min_fen']} (steps must increase)")
            if j and step["off_fen"] <= steps[j - 1]["off_fen"]:
                p.append(f"{where}.steps[{j}].off_fen: {step['off_fen']} is not above the previous step's "
                         f"{steps[j - 1]['off_fen']} (a higher step must save more)")
        for t in promo.get("tiers", []):
            if t not in tiers:
                p.append(f"{where}.tiers: unknown tier {t!r}")
        if promo.get("tiers") and promo.get("member_only") is False:
            p.append(f"{where}.member_only: false contradicts tiers {promo['tiers']}")
        _check_range(p, where, promo)

    for code, pkg in rules.get("stored_value", {}).get("topup_packages", {}).items():
        _check_range(p, f"stored_value.topup_packages.{code}", pkg)
    for code, pkg in packages.items():
        _check_range(p, f"packages.{code}", pkg)
    for code, gift in rules.get("gifts", {}).items():
        _check_range(p, f"gifts.{code}", gift)
    sv = rules.get("stored_value", {})
    if sv.get("offline_max_per_tx_fen", 0) > sv.get("offline_max_per_day_fen", 0):
        p.append(f"stored_value.offline_max_per_tx_fen: {sv['offline_max_per_tx_fen']} is above "
                 f"offline_max_per_day_fen {sv.get('offline_max_per_day_fen', 0)}")
    red = rules.get("redemption", {})
    if red.get("offline_max_points_per_tx", 0) > red.get("offline_max_points_per_day", 0):
        p.append(f"redemption.offline_max_points_per_tx: {red['offline_max_points_per_tx']} is above "
                 f"offline_max_points_per_day {red.get('offline_max_points_per_day', 0)}")

    for code, coupon in rules.get("coupons", {}).items():
        where = f"coupons.{code}"
        if ("value_fen" in coupon) == ("percent" in coupon):
            p.append(f"{where}: exactly one of value_fen and percent")
        _check_range(p, where, coupon)

    for kid, key in rules.get("member_qr", {}).get("issuer_public_keys", {}).items():
        try:
            if len(base64.b64decode(key, validate=True)) != 32:
                raise ValueError
        except (ValueError, binascii.Error):
            p.append(f"member_qr.issuer_public_keys.{kid}: not a base64 Ed25519 public key (32 bytes)")

    uids: dict[str, str] = {}
    members = rules.get("members", {})
    for card_no, m in members.items():
        p += _member_refs(rules, card_no, m, packages)
        uid = m.get("nfc_uid")
        if uid:
            if uid in uids:
                p.append(f"members.{card_no}.nfc_uid: same UID as card {uids[uid]}")
            uids.setdefault(uid, card_no)
        primary = m.get("primary_card")
        if primary and primary not in members:
            p.append(f"members.{card_no}.primary_card: card {primary} is not in the member snapshot")
    for card_no, d in rules.get("deny", {}).items():
        if "replaced_by" in d and d["status"] != "replaced":
            p.append(f"deny.{card_no}.replaced_by: only for status replaced")
    return p


def _program_of(rules: dict, card_no: str) -> str | None:
    best = None
    for pid, prog in rules["card_programs"].items():
        if len(card_no) == prog["length"] and card_no.startswith(prog["prefix"]):
            if best is None or len(prog["prefix"]) > len(rules["card_programs"][best]["prefix"]):
                best = pid
    return best


def _member_refs(rules: dict, card_no: str, m: dict, packages: dict, where: str | None = None) -> list[str]:
    where = where or f"members.{card_no}"
    p = []
    if m["tier"] not in rules["tiers"]:
        p.append(f"{where}.tier: unknown tier {m['tier']!r}")
    if "card_type" in m and m["card_type"] not in rules["card_types"]:
        p.append(f"{where}.card_type: unknown card type {m['card_type']!r}")
    for pkg in m.get("packages", {}):
        if pkg not in packages:
            p.append(f"{where}.packages: unknown package {pkg!r}")
    if _program_of(rules, card_no) is None:
        p.append(f"{where}: card number matches no card program")
    for k in ("expires",):
        if k in m and not _date_ok(m[k]):
            p.append(f"{where}.{k}: {m[k]!r} is not a valid date")
    for pkg, day in m.get("package_expires", {}).items():
        if not _date_ok(day):
            p.append(f"{where}.package_expires.{pkg}: {day!r} is not a valid date")
    if m.get("primary_card") == card_no:
        p.append(f"{where}.primary_card: a card cannot be its own primary")
    return p


def validate_ruleset(rules: Any) -> None:
    """Raise RulesetError unless ``rules`` is a valid effective rule set."""
    if not isinstance(rules, dict):
        raise RulesetError("(top level): a rule set is a table/object")
    if "layer" in rules or "locked" in rules:
        raise RulesetError("layer: this is a layer document; merge it with merge_layers() first")
    _raise(_schema_errors(_RULESET_VALIDATOR, rules) + _float_problems(rules))
    _raise(_reference_problems(rules))


def with_defaults(rules: dict) -> dict:
    """The rule set with schema defaults filled in (plain data, a copy)."""
    return apply_defaults(RULESET_SCHEMA, rules)


def effective_ruleset(layers: list[dict], store: str | None = None, region: str | None = None) -> dict:
    """merge_layers + validate_ruleset: what HQ publishes and the gateway runs."""
    rules = merge_layers(layers, store=store, region=region)
    validate_ruleset(rules)
    return rules


# ---------------------------------------------------------------- snapshot parts

_member_check = fastjsonschema.compile(MEMBER_SCHEMA, use_default=True)
_deny_check = fastjsonschema.compile(DENY_SCHEMA, use_default=True)


def _fast_message(exc: fastjsonschema.JsonSchemaValueException, where: str) -> str:
    field = ".".join(str(p) for p in (exc.path or [])[1:])
    msg = exc.message
    if msg.startswith("data"):
        msg = msg.split(" ", 1)[1] if " " in msg else msg
    return f"{where}.{field}: {msg}" if field else f"{where}: {msg}"


def check_member(record: Any, rules: dict | None = None) -> dict:
    """One member snapshot record with defaults filled, or RulesetError naming
    the card and field. With ``rules`` (the effective rule set, defaults
    filled) its references are checked too (tier, card_type, packages,
    card program). For many records use ``member_checker(rules)``."""
    return member_checker(rules)(record)


import re as _re  # noqa: E402  (the fast path below)

_RX_CARD = _re.compile(r"[0-9]{6,19}")
_RX_DATE = _re.compile(r"\d{4}-\d{2}-\d{2}")
_RX_BIRTHDAY = _re.compile(r"(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])")
_RX_UID = _re.compile(r"[0-9A-F]{8}|[0-9A-F]{14}|[0-9A-F]{20}")
_RX_KEY = _re.compile(r"[A-Za-z0-9_.-]{1,64}")
_STATUSES = frozenset(CARD_STATUSES)


def _is_int(v: Any, hi: int) -> bool:
    return type(v) is int and 0 <= v <= hi


def _str(v: Any, lo: int = 0, hi: int = 10**6) -> bool:
    return type(v) is str and lo <= len(v) <= hi


_FIELD_OK = {
    "card_no": lambda v: type(v) is str and _RX_CARD.fullmatch(v) is not None,
    "member_id": lambda v: _str(v, 1, 64),
    "name": lambda v: _str(v, 0, 64),
    "tier": lambda v: _str(v, 1),
    "status": lambda v: v in _STATUSES if type(v) is str else False,
    "card_type": lambda v: type(v) is str,
    "expires": lambda v: type(v) is str and _RX_DATE.fullmatch(v) is not None,
    "birthday": lambda v: type(v) is str and _RX_BIRTHDAY.fullmatch(v) is not None,
    "birthday_calendar": lambda v: v in ("solar", "lunar"),
    "nfc_uid": lambda v: type(v) is str and _RX_UID.fullmatch(v) is not None,
    "points": lambda v: _is_int(v, MAX_POINTS),
    "balance_fen": lambda v: _is_int(v, MAX_FEN),
    "packages": lambda v: type(v) is dict and all(type(k) is str and _RX_KEY.fullmatch(k) and _is_int(n, 100_000)
                                                  for k, n in v.items()),
    "package_expires": lambda v: type(v) is dict and all(type(k) is str and _RX_KEY.fullmatch(k) and type(d) is str
                                                         and _RX_DATE.fullmatch(d) for k, d in v.items()),
    "primary_card": lambda v: type(v) is str and _RX_CARD.fullmatch(v) is not None,
    "group_id": lambda v: _str(v, 0, 64),
    "coupons": lambda v: type(v) is list and all(type(c) is str and _RX_KEY.fullmatch(c) for c in v)
    and len(set(v)) == len(v),
    "today": lambda v: type(v) is dict and set(v) <= {"day", "stored_value_paid_fen", "points_redeemed"}
    and type(v.get("day")) is str and _RX_DATE.fullmatch(v["day"]) is not None
    and _is_int(v.get("stored_value_paid_fen", 0), MAX_FEN) and _is_int(v.get("points_redeemed", 0), MAX_POINTS),
}


_KNOWN_FIELDS = frozenset(_FIELD_OK)
_REQUIRED = ("card_no", "member_id", "tier")
_INLINE = frozenset(("card_no", "member_id", "tier", "name", "points", "balance_fen"))


def _fast_member_problem(rec: Any) -> str | None:
    """None if the record is valid under MEMBER_SCHEMA (and has no decimals):
    the fast path for a million records; a problem goes on to the schema for
    its message. The common fields are checked inline (the per-record cost
    of a snapshot load), the rest through _FIELD_OK."""
    if type(rec) is not dict:
        return "must be an object"
    if not _KNOWN_FIELDS.issuperset(rec):
        return f"{sorted(set(rec) - _KNOWN_FIELDS)[0]}: unknown key"
    card_no, member_id, tier = rec.get("card_no"), rec.get("member_id"), rec.get("tier")
    if type(card_no) is not str or _RX_CARD.fullmatch(card_no) is None:
        return "card_no: required, 6-19 digits"
    if type(member_id) is not str or not 0 < len(member_id) <= 64:
        return "member_id: required, a string of 1-64 characters"
    if type(tier) is not str or not tier:
        return "tier: required, a tier key"
    name = rec.get("name", "")
    if type(name) is not str or len(name) > 64:
        return "name: a string of at most 64 characters"
    points, balance = rec.get("points", 0), rec.get("balance_fen", 0)
    if type(points) is not int or not -MAX_POINTS <= points <= MAX_POINTS:
        return f"points: {points!r} is not whole points"
    if type(balance) is not int or not -MAX_FEN <= balance <= MAX_FEN:
        return f"balance_fen: {balance!r} is not whole fen"
    for k in rec.keys() - _INLINE:
        if not _FIELD_OK[k](rec[k]):
            return f"{k}: {rec[k]!r} is not valid"
    return None


def member_checker(rules: dict | None = None, fill_defaults: bool = True):
    """A function checking one member record (see check_member), with the
    rule set's references prepared once. ``fill_defaults=False`` returns the
    record itself (checked, unchanged): the bulk loader stores it compact."""
    if rules is not None:
        tiers, card_types = set(rules["tiers"]), set(rules["card_types"])
        packages = rules.get("packages", {})
        prefixes: dict[int, tuple] = {}   # length -> prefixes: one startswith() per record
        for p in rules["card_programs"].values():
            prefixes[p["length"]] = prefixes.get(p["length"], ()) + (p["prefix"],)
        any_type = next(iter(card_types))

    def check(record: Any) -> dict:
        problem = _fast_member_problem(record)
        where = f"members.{record.get('card_no', '?')}" if isinstance(record, dict) else "members"
        if problem is not None:
            try:
                _member_check(dict(record) if isinstance(record, dict) else record)
            except fastjsonschema.JsonSchemaValueException as exc:
                raise RulesetError(_fast_message(exc, where)) from None
            raise RulesetError(f"{where}.{problem}")
        if rules is not None:
            card_no = record["card_no"]
            ok = (record["tier"] in tiers and record.get("card_type", any_type) in card_types
                  and ("packages" not in record or all(p in packages for p in record["packages"]))
                  and card_no.startswith(prefixes.get(len(card_no), ("-",)))
                  and record.get("primary_card") != card_no
                  and ("expires" not in record or _date_ok(record["expires"]))
                  and all(_date_ok(d) for d in record.get("package_expires", {}).values()))
            if not ok:
                _raise(_member_refs(rules, card_no, record, packages, where))
        if not fill_defaults:
            return record
        out = {"status": "active", "birthday_calendar": "solar", "points": 0, "balance_fen": 0, **record}
        out.setdefault("packages", {})
        out.setdefault("coupons", [])
        return out
    return check


def check_deny_entry(entry: Any) -> dict:
    """One deny entry (``{card_no, status, since?, replaced_by?}``) or RulesetError."""
    where = f"deny.{entry.get('card_no', '?')}" if isinstance(entry, dict) else "deny"
    try:
        out = _deny_check(dict(entry) if isinstance(entry, dict) else entry)
    except fastjsonschema.JsonSchemaValueException as exc:
        raise RulesetError(_fast_message(exc, where)) from None
    if "replaced_by" in out and out["status"] != "replaced":
        raise RulesetError(f"{where}.replaced_by: only for status replaced")
    return out


def inline_records(rules: dict) -> tuple[list[dict], list[dict]]:
    """The inline ``members`` / ``deny`` tables as part records (with card_no)."""
    members = [{"card_no": no, **m} for no, m in rules.get("members", {}).items()]
    deny = [{"card_no": no, **d} for no, d in rules.get("deny", {}).items()]
    return members, deny
