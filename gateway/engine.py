"""The pure core: card validation and pricing over plain data.

No I/O and no clock reads: time is an argument. Money is integer fen, points
are integers. Rounding (DESIGN.md principle 3):
- tier discount per line = amount * percent / 100, rounded half-up to the fen;
- points = eligible fen * points_per_yuan * multiplier% / (100 * 100),
  rounded down once per transaction.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any

from gateway.texts import RECEIPT, reason_text, yuan
from wire.messages import RulesMessage
from wire.ruleset import validate_ruleset, with_defaults

# Which indicator pattern each verdict shows at the counter.
PATTERN_FOR_VERDICT = {"accept": "accept", "accept_limited": "accept", "deny": "deny", "retry": "tap_again"}
MAX_LINES = 500
MAX_QTY = 9999
MAX_UNIT_PRICE = 100_000_000  # one million yuan in fen


@dataclass(frozen=True)
class Rules:
    """A validated rule set with its lookup indexes, ready to decide by."""

    version: int
    issued_at: int
    scope: dict
    data: dict
    uid_index: dict = field(repr=False)

    @classmethod
    def from_message(cls, msg: RulesMessage) -> "Rules":
        validate_ruleset(msg.rules)  # raises RulesetError naming the field
        data = with_defaults(msg.rules)
        uid_index = {m["nfc_uid"]: no for no, m in data["members"].items() if m.get("nfc_uid")}
        return cls(msg.version, msg.issued_at, msg.scope, data, uid_index)


@dataclass(frozen=True)
class Verdict:
    verdict: str  # accept | accept_limited | deny | retry
    reason: str
    card_no: str | None = field(default=None, repr=False)  # never logged or shown in full
    member: dict | None = None

    @property
    def accepted(self) -> bool:
        return self.verdict in ("accept", "accept_limited")

    @property
    def pattern(self) -> str:
        return PATTERN_FOR_VERDICT[self.verdict]

    def public(self) -> dict:
        """What the POS and lane terminals receive: no full card number."""
        return {
            "verdict": self.verdict,
            "reason": self.reason,
            "text": reason_text(self.reason),
            "pattern": self.pattern,
            "card": mask_card(self.card_no) if self.card_no else None,
            "member": self.member,
        }


class BasketError(ValueError):
    """A basket the POS sent that cannot be priced; names the line and field."""


def mask_card(card_no: str) -> str:
    if len(card_no) <= 8:
        return "*" * (len(card_no) - 2) + card_no[-2:]
    return card_no[:4] + "*" * (len(card_no) - 8) + card_no[-4:]


def luhn_ok(number: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(number)):
        d = int(ch)
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


_DIGITS = re.compile(r"^[0-9]+$")


def card_number_of(source: str, raw: str, rules: Rules) -> tuple[str | None, str | None]:
    """(card number, None) or (None, reason). NFC cards are looked up by UID
    in the member snapshot; magstripe and QR carry the card number itself."""
    if source == "nfc":
        uid = raw.strip().upper().replace(":", "")
        card_no = rules.uid_index.get(uid)
        return (card_no, None) if card_no else (None, "unknown_nfc_card")
    card_no = raw.strip()
    if not _DIGITS.match(card_no):
        return None, "unknown_card_format"
    return card_no, None


def _program_for(card_no: str, rules: Rules) -> tuple[dict | None, str | None]:
    for prog in rules.data["card_programs"]:
        if len(card_no) == prog["length"] and card_no.startswith(prog["prefix"]):
            if prog["check_digit"] == "luhn" and not luhn_ok(card_no):
                return None, "bad_check_digit"
            return prog, None
    return None, "unknown_card_format"


def _tier_summary(tier_code: str, rules: Rules) -> dict:
    tier = rules.data["tiers"][tier_code]
    return {"code": tier_code, "name": tier["name"], "discount_percent": tier["discount_percent"]}


def _default_tier(rules: Rules) -> str:
    tiers = rules.data["tiers"]
    return rules.data.get("default_tier") or min(tiers, key=lambda t: tiers[t]["rank"])


def validate(source: str, raw: str, rules: Rules | None, now: datetime) -> Verdict:
    """Decide whether a card read identifies a member in good standing."""
    if rules is None:
        return Verdict("deny", "no_rules")
    card_no, reason = card_number_of(source, raw, rules)
    if card_no is None:
        return Verdict("deny", reason)
    _prog, reason = _program_for(card_no, rules)
    if reason:
        return Verdict("deny", reason)
    denied = rules.data["deny"].get(card_no)
    if denied:
        return Verdict("deny", denied["status"], card_no)
    member = rules.data["members"].get(card_no)
    if member is None:
        # A valid card number HQ has not sent us yet (issued elsewhere today):
        # identify as a basic member, points accrue, HQ reconciles.
        tier = _default_tier(rules)
        return Verdict("accept_limited", "member_not_in_snapshot", card_no,
                       {"member_id": None, "name": None, "tier": _tier_summary(tier, rules)})
    if member["status"] != "active":
        return Verdict("deny", member["status"], card_no)
    if "expires" in member and date.fromisoformat(member["expires"]) < now.date():
        return Verdict("deny", "expired", card_no)
    return Verdict("accept", "ok", card_no, {
        "member_id": member["member_id"],
        "name": member.get("name"),
        "tier": _tier_summary(member["tier"], rules),
        "points": member.get("points"),
    })


def check_basket(lines: Any) -> list[dict]:
    """The basket's lines as plain dicts, or BasketError naming the bad field."""
    if not isinstance(lines, list) or not lines:
        raise BasketError("lines: must be a non-empty list")
    if len(lines) > MAX_LINES:
        raise BasketError(f"lines: at most {MAX_LINES} lines per basket")
    out = []
    for i, line in enumerate(lines):
        where = f"lines[{i}]"
        if not isinstance(line, dict):
            raise BasketError(f"{where}: must be an object")
        unknown = set(line) - {"sku", "name", "category", "qty", "unit_price"}
        if unknown:
            raise BasketError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}")
        sku = line.get("sku")
        if not isinstance(sku, str) or not sku or len(sku) > 64:
            raise BasketError(f"{where}.sku: required, a string of 1-64 characters")
        qty = line.get("qty")
        if type(qty) is not int or not 1 <= qty <= MAX_QTY:
            raise BasketError(f"{where}.qty: required, a whole number from 1 to {MAX_QTY}")
        price = line.get("unit_price")
        if type(price) is not int or not 0 <= price <= MAX_UNIT_PRICE:
            raise BasketError(f"{where}.unit_price: required, whole fen from 0 to {MAX_UNIT_PRICE}")
        for key in ("name", "category"):
            if key in line and not isinstance(line[key], str):
                raise BasketError(f"{where}.{key}: must be a string")
        out.append({"sku": sku, "name": line.get("name", sku), "category": line.get("category", ""),
                    "qty": qty, "unit_price": price})
    return out


def quote(lines: list[dict], member: dict | None, rules: Rules | None, now: datetime) -> dict:
    """Price a checked basket for a member (or an anonymous customer)."""
    data = rules.data if rules else {"tiers": {}, "earning": {"points_per_yuan": 0, "excluded_categories": []},
                                      "discount_excluded_categories": []}
    tier_code = member["tier"]["code"] if member else None
    tier = data["tiers"].get(tier_code) if tier_code else None
    pct = tier["discount_percent"] if tier else 0
    no_discount = set(data["discount_excluded_categories"])
    priced = []
    for line in lines:
        amount = line["qty"] * line["unit_price"]
        discount = (amount * pct + 50) // 100 if pct and line["category"] not in no_discount else 0
        priced.append({**line, "amount": amount, "discount": discount, "net": amount - discount,
                       "promotion": f"tier:{tier_code}" if discount else None})
    subtotal = sum(p["amount"] for p in priced)
    discount_total = sum(p["discount"] for p in priced)
    total = subtotal - discount_total

    earning = data["earning"]
    excluded = set(earning["excluded_categories"])
    eligible = sum(p["net"] for p in priced if p["category"] not in excluded) if member else 0
    multiplier = tier["points_multiplier_percent"] if tier else 100
    points = eligible * earning["points_per_yuan"] * multiplier // 10_000

    receipt = _receipt(priced, subtotal, discount_total, total, points, member)
    return {
        "rules_version": rules.version if rules else None,
        "lines": priced,
        "subtotal": subtotal,
        "discount": discount_total,
        "total": total,
        "points": {"earned": points, "eligible_fen": eligible,
                   "points_per_yuan": earning["points_per_yuan"], "multiplier_percent": multiplier},
        "receipt": receipt,
    }


def _receipt(priced, subtotal, discount_total, total, points, member) -> dict[str, list[str]]:
    out = {}
    for lang_i, lang in enumerate(("zh-CN", "en")):
        text = {k: v[lang_i] for k, v in RECEIPT.items()}
        rows = []
        if member:
            rows.append(f"{text['member']}: {member['tier']['name'][lang]}")
        for p in priced:
            rows.append(f"{p['name']} x{p['qty']}  {yuan(p['amount'])}")
            if p["discount"]:
                tier_name = member["tier"]["name"][lang]
                rows.append(f"  {text['tier_discount'].format(tier=tier_name)}  -{yuan(p['discount'])}")
        rows.append(f"{text['subtotal']}  {yuan(subtotal)}")
        if discount_total:
            rows.append(f"{text['discount_total']}  -{yuan(discount_total)}")
        rows.append(f"{text['total']}  {yuan(total)}")
        if member:
            rows.append(f"{text['points_earned']}  {points}")
        out[lang] = rows
    return out
