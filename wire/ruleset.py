"""The rule set HQ authors and the gateway decides by: schema and checks.

This is the walking-skeleton format (card programs, tiers, earning, member
snapshot, deny list); the rules-engine issue extends it. Money is integer fen,
percentages are integer percent. See deploy/examples/rules.demo.toml.

validate_ruleset() rejects a bad rule set with messages that name the field
(``tiers.gold.discount_percent: 120 is greater than the maximum of 100``) and
checks references the schema cannot (a member's tier must exist).
"""

from __future__ import annotations

from typing import Any

import jsonschema

from common.configfile import apply_defaults

_TEXT = {
    "type": "object",
    "required": ["zh-CN", "en"],
    "properties": {"zh-CN": {"type": "string"}, "en": {"type": "string"}},
    "additionalProperties": False,
}
_CARD_NO = {"type": "string", "pattern": "^[0-9]{6,19}$"}
_DATE = {"type": "string", "pattern": r"^\d{4}-\d{2}-\d{2}$"}
CARD_STATUSES = ["active", "not_activated", "lost", "frozen", "cancelled", "replaced", "expired"]

RULESET_SCHEMA = {
    "$id": "https://storegate.example/schemas/ruleset.json",
    "title": "storegate rule set (as authored by HQ)",
    "type": "object",
    "required": ["card_programs", "tiers", "earning"],
    "additionalProperties": False,
    "properties": {
        "chain": {"type": "string"},
        "max_age_s": {"type": "integer", "minimum": 60, "default": 604800},
        "card_programs": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "required": ["id", "prefix", "length"],
                "additionalProperties": False,
                "properties": {
                    "id": {"type": "string", "pattern": "^[a-z0-9_-]+$"},
                    "prefix": {"type": "string", "pattern": "^[0-9]{1,8}$"},
                    "length": {"type": "integer", "minimum": 6, "maximum": 19},
                    "check_digit": {"enum": ["none", "luhn"], "default": "none"},
                },
            },
        },
        "tiers": {
            "type": "object",
            "minProperties": 1,
            "additionalProperties": {
                "type": "object",
                "required": ["name", "rank"],
                "additionalProperties": False,
                "properties": {
                    "name": _TEXT,
                    "rank": {"type": "integer", "minimum": 0},
                    "discount_percent": {"type": "integer", "minimum": 0, "maximum": 100, "default": 0},
                    "points_multiplier_percent": {"type": "integer", "minimum": 0, "maximum": 1000, "default": 100},
                },
            },
        },
        "default_tier": {"type": "string"},
        "earning": {
            "type": "object",
            "required": ["points_per_yuan"],
            "additionalProperties": False,
            "properties": {
                "points_per_yuan": {"type": "integer", "minimum": 0, "maximum": 100},
                "excluded_categories": {"type": "array", "items": {"type": "string"}, "default": []},
            },
        },
        "discount_excluded_categories": {"type": "array", "items": {"type": "string"}, "default": []},
        "members": {
            "type": "object",
            "propertyNames": _CARD_NO,
            "additionalProperties": {
                "type": "object",
                "required": ["member_id", "tier"],
                "additionalProperties": False,
                "properties": {
                    "member_id": {"type": "string", "minLength": 1},
                    "name": {"type": "string", "description": "masked by HQ, e.g. 张*"},
                    "tier": {"type": "string"},
                    "status": {"enum": CARD_STATUSES, "default": "active"},
                    "expires": _DATE,
                    "nfc_uid": {"type": "string", "pattern": "^([0-9A-F]{8}|[0-9A-F]{14}|[0-9A-F]{20})$"},
                    "points": {"type": "integer", "minimum": 0},
                },
            },
            "default": {},
        },
        "deny": {
            "type": "object",
            "propertyNames": _CARD_NO,
            "additionalProperties": {
                "type": "object",
                "required": ["status"],
                "additionalProperties": False,
                "properties": {
                    "status": {"enum": [s for s in CARD_STATUSES if s != "active"]},
                    "since": _DATE,
                },
            },
            "default": {},
        },
    },
}


class RulesetError(ValueError):
    """A rule set that must not be applied; the message names rule and field."""


def _where(error: jsonschema.ValidationError) -> str:
    return ".".join(str(p) for p in error.absolute_path) or "(top level)"


def validate_ruleset(rules: Any) -> None:
    validator = jsonschema.Draft202012Validator(RULESET_SCHEMA)
    errors = sorted(validator.iter_errors(rules), key=lambda e: list(map(str, e.absolute_path)))
    if errors:
        raise RulesetError("; ".join(f"{_where(e)}: {e.message}" for e in errors[:10]))
    problems = []
    tiers = rules["tiers"]
    if "default_tier" in rules and rules["default_tier"] not in tiers:
        problems.append(f"default_tier: unknown tier {rules['default_tier']!r}")
    seen_ids = set()
    for i, prog in enumerate(rules["card_programs"]):
        if prog["id"] in seen_ids:
            problems.append(f"card_programs.{i}.id: duplicate program id {prog['id']!r}")
        seen_ids.add(prog["id"])
        if len(prog["prefix"]) >= prog["length"]:
            problems.append(f"card_programs.{i}.prefix: longer than the card number length {prog['length']}")
    uids: dict[str, str] = {}
    for card_no, member in rules.get("members", {}).items():
        if member["tier"] not in tiers:
            problems.append(f"members.{card_no}.tier: unknown tier {member['tier']!r}")
        uid = member.get("nfc_uid")
        if uid:
            if uid in uids:
                problems.append(f"members.{card_no}.nfc_uid: same UID as card {uids[uid]}")
            uids[uid] = card_no
    if problems:
        raise RulesetError("; ".join(problems[:10]))


def with_defaults(rules: dict) -> dict:
    """The rule set with schema defaults filled in (plain data, a copy)."""
    return apply_defaults(RULESET_SCHEMA, rules)
