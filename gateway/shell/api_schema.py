"""The POS API's contract: one JSON Schema per request and response body.

The same dicts do two jobs, so the documentation cannot drift from what is
enforced:

- ``parse_body(endpoint, raw)`` checks a request body at the door, before
  anything is hashed, looked up or journaled: a refused request writes
  nothing and takes no sequence number. It parses with orjson (which
  refuses bodies that are not UTF-8, lone surrogates, NaN and nesting past
  1,024), then bounds nesting, refuses duplicate keys and fractional
  numbers, and validates against the endpoint's schema (fastjsonschema,
  compiled once). Every refusal is one ``RequestInvalid`` naming the field
  the way the API's other errors do (``lines[3].unit_price``,
  ``tender.points``) with a short zh-CN/en text.
- ``openapi_document()`` is the OpenAPI 3.1 description of the whole POS API
  built from these schemas; ``python -m gateway.shell.api_schema`` writes it to
  ``gateway/shell/openapi.json`` (a test fails when that file drifts).

Request schemas are closed (``additionalProperties: false``) and every
string, number and list is bounded. Response schemas name what is always
there and leave room for more: clients must ignore fields they do not know.

Absolute caps, the same in every store. They are sanity bounds on what a
POS can send at all; the rule set's own limits are checked after them by the
counter and are lower (``sale_limits``: 50,000 yuan a line and 200,000 a
sale by default; top-up, stored-value and redemption caps):

=========================  =============================  =========================
field                      cap                            why
=========================  =============================  =========================
body                       1 MiB, nesting 16 levels       a 500-line basket is ~70 KB
                                                          and 3 levels deep
lines                      500 lines                      ``pricing.MAX_LINES``
lines[].qty                1..9,999                       ``pricing.MAX_QTY``
                           or "0.532" with ``unit``       the unit's decimals and max (rules)
lines[].unit_price         0..10,000,000 fen              100,000 yuan per unit
sum of qty x unit_price    100,000,000 fen                1,000,000 yuan per sale
expected_total             0..100,000,000 fen             a sale's total
tender.points              0..10,000,000,000              ``wire.ruleset.MAX_POINTS``
tender.stored_value_fen    0..100,000,000 fen             a sale's total
tender.coupons             20 codes                       a coupon is per basket
amount_fen (top-up)        1..10,000,000 fen              ``pricing.MAX_TOPUP_FEN``
uses (package)             1..9,999                       ``pricing.MAX_QTY``
qty (gift)                 1..99                          ``gifts.MAX_QTY``
sale_seq                   1..2^63-1                      SQLite's INTEGER
lines (return)             500 lines                      a sale's lines
name / category / reason   100 / 64 / 200 characters      receipt and journal space
operator (every POST)      ``[A-Za-z0-9_.-]{1,32}``       the cashier's id, journaled
member name (/members)     32 characters, kept masked     minimal PII; no phone field
amount_fen (withdrawal)    1..10,000,000 fen              ``pricing.MAX_TOPUP_FEN``
months (extend)            1..120                         ``pricing.MAX_EXTEND_MONTHS``
=========================  =============================  =========================

Identifiers are ASCII: card numbers ``[0-9]{6,19}`` (so full-width or
Arabic-Indic digits are refused), idempotency keys ``[A-Za-z0-9._:-]{8,128}``,
SKUs, coupon and package codes. Free text (names, categories, reasons) may be
any language but no control characters (C0, DEL, C1), no line or paragraph
separators and no bidirectional controls (U+061C, U+200E/F, U+202A-U+202E,
U+2066-U+2069), which would garble or disguise receipts.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

import fastjsonschema
import orjson

from gateway.core import gifts, packages, pricing
from gateway.core.errors import REQUEST_TEXT_NO_FIELD, REQUEST_TEXTS, DomainError
from gateway.shell.counter import PAYMENT_METHODS
from hardware.readers import SOURCES
from wire.ruleset import MAX_POINTS

API_VERSION = "1.0.0"
OPENAPI_PATH = Path(__file__).with_name("openapi.json")

# ---------------------------------------------------------------- absolute caps

MAX_BODY_BYTES = 1 << 20          # the HTTP layer's api.max_body_bytes (256 KiB by default) is usually lower
MAX_DEPTH = 16                    # the deepest valid body is 3 levels (body > lines > line)
MAX_LINES = pricing.MAX_LINES     # 500
MAX_QTY = pricing.MAX_QTY         # 9,999
MAX_UNIT_PRICE_FEN = 10_000_000   # 100,000 yuan per unit (the pricing core alone would take 1,000,000)
MAX_SALE_FEN = 100_000_000        # 1,000,000 yuan: a basket's qty x unit_price summed
MAX_TENDER_POINTS = MAX_POINTS    # 10,000,000,000: no balance can hold more
MAX_COUPONS = 20
MAX_TOPUP_FEN = pricing.MAX_TOPUP_FEN  # 100,000 yuan
MAX_GIFT_QTY = gifts.MAX_QTY      # 99 gifts of one kind at once
MAX_SEQ = (1 << 63) - 1           # journal sequence numbers are SQLite INTEGERs
MAX_NAME = 100
MAX_CATEGORY = 64
MAX_REASON = 200
MAX_RAW = 512                     # a card read: UID, track data or a member QR code (~272)
CARD_SERVICE_KINDS = tuple(pricing.CARD_OPS)

# ---------------------------------------------------------------- patterns

# Everything a receipt or journal must not carry: C0 controls, DEL, C1
# controls, Arabic letter mark, LRM/RLM, line/paragraph separators, bidi
# embeddings/overrides (U+202A-U+202E) and isolates (U+2066-U+2069), BOM.
# Written with \x/\u escapes that Python, ECMA-262 and Rust regexes all read.
# (Lone surrogates cannot reach a schema check: orjson refuses them.)
_UNSAFE = r"\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069\ufeff"
SAFE_TEXT = rf"^[^{_UNSAFE}]*$"
CARD_NO = r"^[0-9]{6,19}$"
IDEMPOTENCY_KEY = r"^[A-Za-z0-9._:-]{8,128}$"
SKU = r"^[A-Za-z0-9._:/+#-]{1,64}$"
CODE = r"^[A-Za-z0-9_.-]{1,64}$"          # coupon and package codes: the rule set's table keys
LANE_ID = r"^[A-Za-z0-9_-]{1,16}$"        # as gateway/shell/config.py allows lane ids
SALE_ID = r"^[A-Za-z0-9_-]{8,64}$"        # journal tx ids (32 hex digits)
PRINTABLE_ASCII = r"^[\x20-\x7e]+$"
CARD_READ = r"^ *[\x21-\x7e][\x20-\x7e]*$"  # printable ASCII, not blank
OPERATOR_ID = r"^[A-Za-z0-9_.-]{1,32}$"   # a cashier's id (gateway/shell/counter.py OPERATOR)
MMDD = r"^(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])$"
NFC_UID = r"^([0-9A-Fa-f]{8}|[0-9A-Fa-f]{14}|[0-9A-Fa-f]{20})$"
QUANTITY = r"^[0-9]{1,7}(\.[0-9]{1,3})?$"   # a measured line's quantity (gateway/core/measure.py)
EAN13 = r"^[0-9]{13}$"
MAX_MEMBER_NAME = 32
MAX_EXTEND_MONTHS = pricing.MAX_EXTEND_MONTHS

# How a pattern is described in an error message.
_PATTERN_HELP = {
    SAFE_TEXT: "text without control characters, line separators or bidirectional controls",
    CARD_NO: "the card number: 6 to 19 ASCII digits 0-9",
    IDEMPOTENCY_KEY: "8 to 128 characters of A-Z a-z 0-9 . _ : -",
    SKU: "1 to 64 characters of A-Z a-z 0-9 . _ : / + # -",
    CODE: "a code of 1 to 64 characters of A-Z a-z 0-9 _ . -",
    LANE_ID: "a lane id of 1 to 16 characters of A-Z a-z 0-9 _ -",
    SALE_ID: "the sale's transaction id (8 to 64 characters of A-Z a-z 0-9 _ -)",
    PRINTABLE_ASCII: "printable ASCII characters",
    CARD_READ: "the card's identifier in printable ASCII, not blank",
    OPERATOR_ID: "the cashier's id: 1 to 32 characters of A-Z a-z 0-9 _ . -",
    MMDD: "a birthday as MM-DD",
    NFC_UID: "the chip's UID: 8, 14 or 20 hex digits",
    QUANTITY: "a decimal quantity like 0.532 (no sign or exponent)",
    EAN13: "an EAN-13 scale barcode: 13 digits 0-9",
}


# ---------------------------------------------------------------- building blocks

def _int(lo: int, hi: int, description: str, **kw) -> dict:
    return {"type": "integer", "minimum": lo, "maximum": hi, "description": description, **kw}


def _str(pattern: str, description: str, *, min_len: int | None = None, max_len: int | None = None,
         **kw) -> dict:
    out: dict[str, Any] = {"type": "string", "pattern": pattern, "description": description, **kw}
    if min_len is not None:
        out["minLength"] = min_len
    if max_len is not None:
        out["maxLength"] = max_len
    return out


def _text(max_len: int, description: str, min_len: int = 0) -> dict:
    return _str(SAFE_TEXT, description, min_len=min_len, max_len=max_len)


def _obj(properties: dict, required=(), **kw) -> dict:
    out = {"type": "object", "additionalProperties": False, "properties": properties, **kw}
    if required:
        out["required"] = list(required)
    return out


def _exactly_one(*names: str) -> list[dict]:
    """``oneOf`` for "exactly one of these fields" (reported as such by parse_body)."""
    return [{"required": [n]} for n in names]


# ---------------------------------------------------------------- request bodies

IDEMPOTENCY = _str(IDEMPOTENCY_KEY, "unique per operation and terminal; a retry with the same key and "
                   "body gets the first answer (200) instead of doing it twice")
OPERATOR = _str(OPERATOR_ID, "the cashier who does it (journaled with the record; optional)")

LINE = _obj({
    "sku": _str(SKU, "the item's code (barcode or item number)"),
    "qty": {**_str(QUANTITY, "", max_len=12),
            **_int(1, MAX_QTY, "units sold; with unit, the quantity in that unit as a decimal string, "
                               "e.g. \"0.532\" (at most the unit's decimals: rule-set units)"),
            "type": ["integer", "string"]},
    "unit": _str(CODE, "a measured line's unit, a key of the rule set's units (e.g. kg)"),
    "barcode": _str(EAN13, "instead of sku and qty: a scale label (rule-set scale_barcodes) with its weight "
                           "or price"),
    "unit_price": _int(0, MAX_UNIT_PRICE_FEN, "price per unit (per whole unit of a measured line) in fen"),
    "name": _text(MAX_NAME, "the item's name on the receipt (default: the SKU)"),
    "category": _text(MAX_CATEGORY, "the item's category, as the rules' promotions name it"),
}, oneOf=_exactly_one("sku", "barcode"),
    description="a count line (sku, qty, unit_price), a measured one (sku, unit, qty, unit_price) or a scale "
                "label (barcode, unit_price for a weight label); gateway/core/measure.py")

LINES = {"type": "array", "minItems": 1, "maxItems": MAX_LINES, "items": LINE,
         "description": f"the basket; its qty x unit_price summed may not exceed {MAX_SALE_FEN} fen"}

TENDER = _obj({
    "points": _int(0, MAX_TENDER_POINTS, "points to redeem"),
    "stored_value_fen": _int(0, MAX_SALE_FEN, "fen to pay from the member's stored value"),
    "coupons": {"type": "array", "maxItems": MAX_COUPONS, "items": _str(CODE, "a coupon code"),
                "description": "coupon codes, applied in this order"},
}, description="how the member pays besides cash; the rest is cash")

_BASKET = {
    "lines": LINES,
    "member": {"type": "boolean",
               "description": "true: the member accepted on the lane (409 if none); false: no member; "
                              "absent: the lane's member if there is one"},
    "tender": TENDER,
    "expected_total": _int(0, MAX_SALE_FEN, "the total the POS showed; 409 quote_changed if it differs"),
}

QUOTE_REQUEST = _obj({**_BASKET, "idempotency_key": IDEMPOTENCY}, required=["lines"],
                     description="price a basket (a sale's body may be quoted as is)")

SALE_REQUEST = _obj({**_BASKET, "idempotency_key": IDEMPOTENCY}, required=["idempotency_key", "lines"],
                    description="commit a sale: journaled and synced before the answer")

TAP_REQUEST = _obj({
    "source": {"enum": list(SOURCES), "description": "how the card was read"},
    "raw": _str(CARD_READ, "what the reader read: NFC UID, track data or QR code", max_len=MAX_RAW),
}, required=["source", "raw"], description="a card read from a lane terminal")

PAYMENT = _obj({
    "method": {"enum": list(PAYMENT_METHODS), "description": "how the customer paid for the top-up"},
    "reference": _str(PRINTABLE_ASCII, "the payment's reference (terminal slip, wallet transaction id)",
                      max_len=64),
}, required=["method"], description="how the top-up was paid: money in the till must match money on the card")

TOPUP_REQUEST = _obj({
    "idempotency_key": IDEMPOTENCY,
    "package_id": _str(CODE, "a top-up package of the rules (充值赠送): pays its price, adds its bonus"),
    "amount_fen": _int(1, MAX_TOPUP_FEN, "a free amount in fen (earns the bonus of the largest package it reaches)"),
    "payment": PAYMENT,
}, required=["idempotency_key", "payment"], oneOf=_exactly_one("package_id", "amount_fen"),
    description="stored-value top-up for the lane's member: exactly one of package_id, amount_fen")

PACKAGE_USE_REQUEST = _obj({
    "idempotency_key": IDEMPOTENCY,
    "uses": _int(1, MAX_QTY, "uses to take from the count package (计次卡)", default=1),
}, required=["idempotency_key"], description="use a count package of the lane's member")

PACKAGE_SALE_REQUEST = _obj({
    "idempotency_key": IDEMPOTENCY,
    "package_id": _str(CODE, "a count package of the rules sold at the counter (it has uses and price_fen); "
                             "a member who holds it renews it"),
    "payment": _obj({
        "method": {"enum": list(packages.METHODS),
                   "description": "how the package was paid; stored_value only where the package's rule allows it "
                                  "(within the stored-value offline limits)"},
        "reference": _str(PRINTABLE_ASCII, "the payment's reference (terminal slip, wallet transaction id)",
                          max_len=64),
    }, required=["method"], description="how the package was paid"),
}, required=["idempotency_key", "package_id", "payment"],
    description="sell a count package (计次卡) to the lane's member, or renew theirs, at the rules' price")

GIFT_REQUEST = _obj({
    "idempotency_key": IDEMPOTENCY,
    "gift_id": _str(CODE, "a gift of the rules' catalogue (gifts)"),
    "qty": _int(1, MAX_GIFT_QTY, "how many of the gift", default=1),
}, required=["idempotency_key", "gift_id"],
    description="redeem the lane's member's points for a gift (礼品兑换), within the offline limits of redemption")

RETURN_LINE = _obj({
    "line": _int(0, MAX_LINES - 1, "the sale's line index (from 0)"),
    "sku": _str(SKU, "or the SKU: spread over the sale's lines of that SKU in order"),
    "qty": {**_str(QUANTITY, "", max_len=12),
            **_int(1, MAX_QTY, "units returned; of a measured line, the quantity in its unit as a decimal "
                               "string, e.g. \"0.200\""),
            "type": ["integer", "string"]},
}, required=["qty"], oneOf=_exactly_one("line", "sku"))

RETURN_REQUEST = _obj({
    "idempotency_key": IDEMPOTENCY,
    "sale_seq": _int(1, MAX_SEQ, "the original sale's number (on the receipt)"),
    "sale_id": _str(SALE_ID, "or the original sale's transaction id"),
    "lines": {"type": "array", "minItems": 1, "maxItems": MAX_LINES, "items": RETURN_LINE,
              "description": "what comes back; refunded in the sale's own tender mix"},
}, required=["idempotency_key", "lines"], oneOf=_exactly_one("sale_seq", "sale_id"),
    description="a full or partial return against the original sale: exactly one of sale_seq, sale_id")

CARD_SERVICE_REQUEST = _obj({
    "idempotency_key": IDEMPOTENCY,
    "kind": {"enum": list(CARD_SERVICE_KINDS), "description": "the service"},
    "card_no": _str(CARD_NO, "the card's number (for issue: the new card's; for issue_subsidiary: the primary's)"),
    "new_card_no": _str(CARD_NO, "replace: the replacement card's number; issue_subsidiary: the 附属卡's"),
    "months": _int(1, MAX_EXTEND_MONTHS, "extend (延期): months to extend the card by (default 12)"),
    "reason": _text(MAX_REASON, "why, in the staff's words (kept in the journal)"),
}, required=["idempotency_key", "kind", "card_no"],
    **{"if": {"properties": {"kind": {"enum": ["replace", "issue_subsidiary"]}}, "required": ["kind"]},
       "then": {"required": ["new_card_no"]}},
    description="a service-desk card operation; replace and issue_subsidiary need new_card_no; unfreeze lifts "
                "a freeze or a loss report made here (a card on HQ's deny list stays refused until HQ lifts it)")

MEMBER_REGISTRATION_REQUEST = _obj({
    "idempotency_key": IDEMPOTENCY,
    "card_no": _str(CARD_NO, "the new card's number (a card of the chain's programmes, never issued)"),
    "consent": {"type": "boolean", "description": "the member agreed to the programme's terms and the use of "
                "their data (required; false is refused: sell an anonymous card instead)"},
    "name": _text(MAX_MEMBER_NAME, "the member's name; kept masked (张*), never in full", min_len=1),
    "birthday": _str(MMDD, "MM-DD, for birthday offers (no year is kept)"),
    "birthday_calendar": {"enum": ["solar", "lunar"], "description": "the birthday's calendar (default solar)"},
    "card_type": _str(CODE, "a card type of the rules (default: the card programme's)"),
    "nfc_uid": _str(NFC_UID, "the new card's chip UID, so it can be tapped at once"),
    "lane": _str(LANE_ID, "the lane registering (a POS may name only its own lanes)"),
    "operator": OPERATOR,
}, required=["idempotency_key", "card_no", "consent"],
    description="办卡: a new member with a new card, usable at once at the base tier; no phone number is taken "
                "at the store (bound at HQ or in the member app, where it can be verified)")

WITHDRAWAL_REQUEST = _obj({
    "idempotency_key": IDEMPOTENCY,
    "card_no": _str(CARD_NO, "the member's primary card"),
    "amount_fen": _int(1, MAX_TOPUP_FEN, "fen to pay out of the paid part of the stored value"),
    "payout": _obj({
        "method": {"enum": list(PAYMENT_METHODS), "description": "how the money goes back to the member"},
        "reference": _str(PRINTABLE_ASCII, "the payout's reference", min_len=1, max_len=64),
    }, required=["method"], description="how the member was paid"),
    "reason": _text(MAX_REASON, "why, in the staff's words (kept in the journal)"),
    "operator": OPERATOR,
}, required=["idempotency_key", "card_no", "amount_fen", "payout"],
    description="取款: the paid part of stored value paid out, as the rules' accounts.withdrawal allows")

REQUESTS: dict[str, dict] = {
    "taps": TAP_REQUEST,
    "quote": QUOTE_REQUEST,
    "sales": SALE_REQUEST,
    "topups": TOPUP_REQUEST,
    "package_uses": PACKAGE_USE_REQUEST,
    "package_sales": PACKAGE_SALE_REQUEST,
    "gifts": GIFT_REQUEST,
    "returns": RETURN_REQUEST,
    "card_services": CARD_SERVICE_REQUEST,
    "members": MEMBER_REGISTRATION_REQUEST,
    "withdrawals": WITHDRAWAL_REQUEST,
}
for _schema in REQUESTS.values():  # every POST body may say which cashier did it
    _schema["properties"].setdefault("operator", OPERATOR)

PATH_PARAMS: dict[str, dict] = {
    "lane": _str(LANE_ID, "the lane (checkout) id"),
    "package_id": _str(CODE, "the count package's code in the rules"),
}

# ---------------------------------------------------------------- responses (open: may gain fields)

def _open(properties: dict, required=(), **kw) -> dict:
    out = {"type": "object", "properties": properties, **kw}
    if required:
        out["required"] = list(required)
    return out


_INT = {"type": "integer"}
_STR = {"type": "string"}
TEXT = _open({"zh-CN": _STR, "en": _STR}, ["zh-CN", "en"], description="text for people, in both languages")
RECEIPT = _open({"zh-CN": {"type": "array", "items": _STR}, "en": {"type": "array", "items": _STR}},
                ["zh-CN", "en"], description="receipt lines in both languages")

ERROR = _open({
    "error": _open({
        "code": _str(r"^[a-z0-9_]{1,64}$", "stable machine-readable reason"),
        "message": {"type": "string", "description": "for developers and logs (English)"},
        "text": TEXT,
        "field": {"type": "string", "description": "the request field at fault, e.g. lines[3].unit_price"},
    }, ["code", "message", "text"]),
}, ["error"], description="every error answer")

VERDICT = _open({
    "verdict": {"enum": ["accept", "accept_limited", "deny", "retry"]},
    "reason": _STR,
    "text": TEXT,
    "pattern": _STR,
    "card": {"type": ["string", "null"], "description": "the card number masked"},
    "member": {"type": ["object", "null"]},
}, ["verdict", "reason", "text", "pattern"], description="a card read's verdict")

HEALTH = _open({
    "status": _STR, "store": _STR, "rules_version": {"type": ["integer", "null"]},
    "backlog": _INT, "uplink": {"enum": ["online", "offline"]},
}, ["status", "store", "rules_version", "backlog", "uplink"])

STATUS = _open({
    "store": _STR, "uplink": {"enum": ["online", "offline"]}, "backlog": _INT,
    "last_seq": {"type": ["integer", "null"], "description": "the journal's last sequence number"},
    "rules_version": {"type": ["integer", "null"]}, "lanes": {"type": "object"},
    "faults": {"type": "array", "items": _STR}, "stats": {"type": "object"},
}, ["store", "uplink", "backlog", "last_seq", "rules_version", "lanes", "faults"])

LANES = _open({"lanes": {"type": "array", "items": _open({"id": _STR, "reader": _STR}, ["id", "reader"])}},
              ["lanes"])

LANE_MEMBER = _open({"lane": _STR, "member": {"anyOf": [VERDICT, {"type": "null"}]}}, ["lane", "member"])

QUOTE = _open({
    "lane": _STR, "member": {"anyOf": [VERDICT, {"type": "null"}]},
    "lines": {"type": "array", "items": {"type": "object"}},
    "subtotal": _INT, "discount": _INT, "total": _INT,
    "promotions": {"type": "array", "items": {"type": "object"}},
    "points": {"type": "object"}, "available": {"type": "object"}, "tender": {"type": "object"},
    "balances_after": {"type": ["object", "null"]}, "receipt": RECEIPT,
}, ["lane", "member", "lines", "subtotal", "discount", "total", "tender", "receipt"])

_JOURNALED = {
    "seq": _int(1, MAX_SEQ, "the journal's sequence number of the operation (on the receipt)"),
    "tx_id": _STR,
    "duplicate": {"type": "boolean", "description": "true: the stored answer to an earlier identical request"},
}
SALE = _open({"lane": _STR, "total": _INT, "discount": _INT, "tender": {"type": "object"}, "points_earned": _INT,
              "balances_after": {"type": ["object", "null"]}, "receipt": RECEIPT, **_JOURNALED},
             ["lane", "total", "receipt", "seq", "tx_id", "duplicate"])
MEMBER_OPERATION = _open({"lane": _STR, "record": {"type": "object"}, "receipt": RECEIPT, **_JOURNALED},
                         ["lane", "record", "receipt", "seq", "tx_id", "duplicate"])
RETURN = _open({"sale_seq": _INT, "totals": {"type": "object"}, "receipt": RECEIPT, **_JOURNALED},
               ["sale_seq", "totals", "receipt", "seq", "tx_id", "duplicate"])
CARD_SERVICE = _open({"kind": {"enum": list(CARD_SERVICE_KINDS)}, "card": _STR, "fee_fen": _INT,
                      "status_after": _STR, "receipt": RECEIPT, **_JOURNALED},
                     ["kind", "card", "fee_fen", "status_after", "receipt", "seq", "tx_id", "duplicate"])

REGISTRATION = _open({"member_id": _STR, "card": _STR, "tier": _STR, "fee_fen": _INT, "receipt": RECEIPT,
                      **_JOURNALED}, ["member_id", "card", "tier", "fee_fen", "receipt", "seq", "tx_id", "duplicate"])
WITHDRAWAL = _open({"card": _STR, "amount_fen": _INT, "paid_fen": _INT, "balance_after_fen": _INT,
                    "receipt": RECEIPT, **_JOURNALED},
                   ["card", "amount_fen", "paid_fen", "receipt", "seq", "tx_id", "duplicate"])

# Component name -> schema, as the OpenAPI document lists them.
COMPONENTS: dict[str, dict] = {
    "TapRequest": TAP_REQUEST, "QuoteRequest": QUOTE_REQUEST, "SaleRequest": SALE_REQUEST,
    "TopupRequest": TOPUP_REQUEST, "PackageUseRequest": PACKAGE_USE_REQUEST,
    "PackageSaleRequest": PACKAGE_SALE_REQUEST, "GiftRequest": GIFT_REQUEST, "ReturnRequest": RETURN_REQUEST,
    "CardServiceRequest": CARD_SERVICE_REQUEST, "MemberRegistrationRequest": MEMBER_REGISTRATION_REQUEST,
    "WithdrawalRequest": WITHDRAWAL_REQUEST,
    "Error": ERROR, "Health": HEALTH, "Status": STATUS, "Lanes": LANES, "LaneMember": LANE_MEMBER,
    "Verdict": VERDICT, "Quote": QUOTE, "Sale": SALE, "MemberOperation": MEMBER_OPERATION, "Return": RETURN,
    "CardService": CARD_SERVICE, "Registration": REGISTRATION, "Withdrawal": WITHDRAWAL,
}

# ---------------------------------------------------------------- endpoints

# name: (method, path, summary, request component, {status: response component}, error statuses, auth)
_OPEN_ERRORS = (403, 421, 503)  # what the door itself may answer (Origin, Host, too many connections)
_READ_ERRORS = (*_OPEN_ERRORS, 401, 429)
_POST_ERRORS = (*_READ_ERRORS, 400, 404, 409, 413, 415, 422)
ENDPOINTS: dict[str, tuple] = {
    "health": ("get", "/health", "liveness, rules version, backlog", None, {200: "Health"}, _OPEN_ERRORS, False),
    "status": ("get", "/status", "what `storegate status` shows", None, {200: "Status"}, _READ_ERRORS, True),
    "lanes": ("get", "/lanes", "the lanes and their readers", None, {200: "Lanes"}, _READ_ERRORS, True),
    "member": ("get", "/lanes/{lane}/member", "the member accepted on the lane (or null)", None,
               {200: "LaneMember"}, (*_READ_ERRORS, 404), True),
    "events": ("get", "/lanes/{lane}/events", "server-sent events of the lane: taps and sales", None,
               {200: None}, (*_READ_ERRORS, 404), True),
    "taps": ("post", "/lanes/{lane}/taps", "a card read from a lane terminal", "TapRequest",
             {200: "Verdict"}, _POST_ERRORS, True),
    "quote": ("post", "/lanes/{lane}/quote", "price a basket, with the tender if given", "QuoteRequest",
              {200: "Quote"}, _POST_ERRORS, True),
    "sales": ("post", "/lanes/{lane}/sales", "commit a sale (201 after fsync; 200 on a retry)", "SaleRequest",
              {200: "Sale", 201: "Sale"}, (*_POST_ERRORS, 507), True),
    "topups": ("post", "/lanes/{lane}/topups", "stored-value top-up for the lane's member", "TopupRequest",
               {200: "MemberOperation", 201: "MemberOperation"}, (*_POST_ERRORS, 507), True),
    "package_uses": ("post", "/lanes/{lane}/packages/{package_id}/uses", "use a count package (计次卡)",
                     "PackageUseRequest", {200: "MemberOperation", 201: "MemberOperation"},
                     (*_POST_ERRORS, 507), True),
    "package_sales": ("post", "/lanes/{lane}/packages", "sell or renew a count package (计次卡) for the lane's "
                      "member", "PackageSaleRequest", {200: "MemberOperation", 201: "MemberOperation"},
                      (*_POST_ERRORS, 507), True),
    "gifts": ("post", "/lanes/{lane}/gifts", "points for a gift (礼品兑换) for the lane's member", "GiftRequest",
              {200: "MemberOperation", 201: "MemberOperation"}, (*_POST_ERRORS, 507), True),
    "returns": ("post", "/returns", "full or partial return against the original sale", "ReturnRequest",
                {200: "Return", 201: "Return"}, (*_POST_ERRORS, 507), True),
    "card_services": ("post", "/cards/services", "service desk: issue, report lost, freeze, unfreeze (also "
                      "lifts a loss report), replace, annual fee, extend (延期), issue_subsidiary (附属卡)",
                      "CardServiceRequest", {200: "CardService", 201: "CardService"}, (*_POST_ERRORS, 507), True),
    "members": ("post", "/members", "register a member with a new card (办卡), offline: usable at once at the "
                "base tier", "MemberRegistrationRequest", {200: "Registration", 201: "Registration"},
                (*_POST_ERRORS, 507), True),
    "withdrawals": ("post", "/withdrawals", "service desk: pay out the paid part of stored value (取款)",
                    "WithdrawalRequest", {200: "Withdrawal", 201: "Withdrawal"}, (*_POST_ERRORS, 507), True),
    "openapi": ("get", "/openapi.json", "this document", None, {200: None}, _OPEN_ERRORS, False),
}

_ERROR_MEANING = {
    400: "malformed request (the body does not follow the schema; code bad_request, or the pricing core's "
         "basket_invalid, tender_invalid, topup_invalid, return_invalid, card_op_invalid, package_invalid_uses, "
         "package_payment_invalid, gift_invalid for its fields); nothing was written",
    401: "missing or wrong 'Authorization: Bearer <terminal-id>.<secret>'",
    403: "this terminal's role or lanes do not allow it, or a browser of another origin called",
    404: "unknown lane, sale or card",
    409: "no member on the lane, member refused, prices changed, or idempotency key used for another request",
    413: "request body too large",
    415: "the body must be application/json",
    421: "the Host header does not name this gateway (DNS rebinding guard)",
    422: "well-formed, but the store's rules refuse it (an offline limit, an unknown coupon, ...)",
    429: "too many failed sign-ins from this address: wait a minute (Retry-After)",
    503: "too many connections at once: retry shortly",
    507: "the journal cannot take it (storage full or failing): nothing was recorded",
}

# ---------------------------------------------------------------- the error

# Short texts for the POS screen, one per kind of refusal: REQUEST_TEXTS in gateway/core/errors.py.
class RequestInvalid(DomainError, ValueError):
    """A request refused at the door: ``field`` is its JSON path (None for
    the body as a whole), ``kind`` one of REQUEST_TEXTS, ``status`` 400 (413
    when too large). ``str()`` is the English message, ``text`` the POS's."""

    code = "bad_request"

    def __init__(self, field: str | None, message: str, kind: str = "invalid", status: int = 400) -> None:
        zh, en = REQUEST_TEXTS[kind]
        if "{field}" in zh and field is None:
            zh, en = REQUEST_TEXT_NO_FIELD
        super().__init__(message, code="too_large" if status == 413 else None, status=status, field=field,
                         text={"zh-CN": zh.format(field=field), "en": en.format(field=field)})
        self.kind = kind


# The error code of a refused field: the code the pricing core has always
# given a malformed value of that field (codes are stable: POS software keys
# on them), else bad_request. (endpoint, first part of the field) -> code.
FIELD_CODES = {
    ("quote", "lines"): "basket_invalid", ("sales", "lines"): "basket_invalid",
    ("quote", "tender"): "tender_invalid", ("sales", "tender"): "tender_invalid",
    ("topups", "package_id"): "topup_invalid", ("topups", "amount_fen"): "topup_invalid",
    ("package_uses", "uses"): "package_invalid_uses",
    ("gifts", "qty"): "gift_invalid",
    ("returns", "lines"): "return_invalid",
    ("card_services", "kind"): "card_op_invalid", ("card_services", "new_card_no"): "card_op_invalid",
    ("card_services", "months"): "card_op_invalid",
    ("withdrawals", "amount_fen"): "withdrawal_invalid",
}


def _code_for(endpoint: str, field: str | None) -> str:
    head = re.split(r"[.\[]", field, maxsplit=1)[0] if field else ""
    return FIELD_CODES.get((endpoint, head), "bad_request")


def _bad(field: str | None, detail: str, kind: str = "invalid", status: int = 400) -> RequestInvalid:
    return RequestInvalid(field, f"{field}: {detail}" if field else detail, kind, status)


# ---------------------------------------------------------------- parse_body

# use_default=False: a body is checked, never changed (a filled-in "member": true would turn a
# non-member sale on a lane without a member into a 409).
_VALIDATORS = {name: fastjsonschema.compile(schema, use_default=False)
               for name, schema in {**REQUESTS, **PATH_PARAMS}.items()}
_SAFE_KEY = re.compile(r"[A-Za-z0-9_-]{1,64}")
_INT64 = (-(1 << 63), (1 << 63) - 1)


def _join(path: str, key: Any) -> str:
    """``lines`` + 3 -> ``lines[3]``; + ``qty`` -> ``lines[3].qty``. A key the
    API does not use is shown as ``?`` when it is not plain ASCII: field
    names end up in logs and on the POS screen."""
    if isinstance(key, int):
        return f"{path}[{key}]"
    key = key if _SAFE_KEY.fullmatch(key) else "?"
    return f"{path}.{key}" if path else key


def parse_body(endpoint: str, raw: bytes | bytearray | memoryview | str | None,
               path_params: dict[str, str] | None = None) -> dict:
    """The request body of ``endpoint`` (a key of REQUESTS) as a dict, or
    RequestInvalid. Nothing about the body is trusted before this returns.
    ``path_params`` (e.g. ``{"package_id": ...}``) are checked too."""
    schema_check = _VALIDATORS[endpoint]  # KeyError: a caller's bug, not the client's
    try:
        return _parse(endpoint, schema_check, raw, path_params)
    except RequestInvalid as exc:
        if exc.status == 400:
            exc.code = _code_for(endpoint, exc.field)
        raise


def _parse(endpoint: str, schema_check, raw, path_params: dict[str, str] | None) -> dict:
    for name, value in (path_params or {}).items():
        try:
            _VALIDATORS[name](value)
        except fastjsonschema.JsonSchemaValueException:
            raise _bad(name, f"must be {_PATTERN_HELP[PATH_PARAMS[name]['pattern']]}") from None
    if isinstance(raw, str):
        raw = raw.encode("utf-8", "surrogatepass")  # a lone surrogate stays one, for orjson to refuse
    raw = bytes(raw or b"")
    if len(raw) > MAX_BODY_BYTES:
        raise _bad(None, f"request body over {MAX_BODY_BYTES} bytes", "too_large", 413)
    if not raw.strip():
        raise _bad(None, "request body is empty: a JSON object is required", "not_json")
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise _unparsable(raw, exc) from None
    if not isinstance(doc, dict):
        raise _bad(None, "request body must be a JSON object", "not_object")
    fraction = _check_shape(doc, raw)
    _check_duplicates(raw)
    try:
        schema_check(doc)
    except fastjsonschema.JsonSchemaValueException as exc:
        raise _schema_error(exc) from None
    if fraction is not None:  # the schema's "integer" takes 1.0 (JSON Schema does); money does not
        raise _bad(fraction, "must be a whole number, written without a fraction or exponent")
    if "lines" in doc and endpoint in ("quote", "sales"):
        # Count lines only: measured and scale lines are priced by the rules (their amounts capped by
        # the rules' sale_limits at the counter).
        subtotal = sum(line["qty"] * line["unit_price"] for line in doc["lines"]
                       if type(line.get("qty")) is int and "unit" not in line and "unit_price" in line)
        if subtotal > MAX_SALE_FEN:
            raise _bad("lines", f"the basket comes to {subtotal} fen, above the cap of {MAX_SALE_FEN} fen "
                       "for one sale", "out_of_range")
    return doc


def _check_shape(doc: dict, raw: bytes) -> str | None:
    """Nesting within MAX_DEPTH (iteratively: no recursion to blow up); the
    path of the first float, if any (refused after the schema has had its
    say, so a float where a string belongs is reported as such). Paths are
    worked out only when something is wrong: most bodies are fine."""
    has_float = False
    stack: list[tuple[Any, int]] = [(doc, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_DEPTH:
            found = _locate(raw.decode("utf-8"), "deep")
            raise _bad(found[0] if found else None, f"nested deeper than {MAX_DEPTH} levels", "too_deep")
        for item in (value.values() if type(value) is dict else value):
            kind = type(item)
            if kind is dict or kind is list:
                stack.append((item, depth + 1))
            elif kind is float:
                has_float = True
    return _first_float(doc) if has_float else None


def _first_float(doc: dict) -> str | None:
    stack: list[tuple[Any, str]] = [(doc, "")]
    while stack:
        value, path = stack.pop()
        if type(value) is float:
            return path
        if type(value) is dict:
            stack.extend((v, _join(path, k)) for k, v in reversed(value.items()))
        elif type(value) is list:
            stack.extend((v, _join(path, i)) for i, v in reversed(list(enumerate(value))))
    return None


class _Duplicate(Exception):
    pass


def _check_duplicates(raw: bytes) -> None:
    """orjson keeps the last of duplicate keys silently; two parsers (or two
    readers of the journal) could disagree on which one counts, so they are
    refused. Only reached with a body orjson took, so the stdlib parser here
    meets no deep nesting, huge numbers or bad UTF-8."""
    def pairs(items):
        out = dict(items)
        if len(out) != len(items):
            raise _Duplicate
        return out

    try:
        json.loads(raw, object_pairs_hook=pairs)
    except _Duplicate:
        found = _locate(raw.decode("utf-8"), "duplicate")
        raise _bad(found[0] if found else None, "given more than once", "duplicate_key") from None


def _unparsable(raw: bytes, exc: orjson.JSONDecodeError) -> RequestInvalid:
    """Why orjson refused the body, naming the field where it can be found."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as bad:
        return _bad(None, f"request body is not UTF-8 (byte {bad.start})", "not_utf8")
    reason = str(exc)
    found = None
    if "depth" in reason or "recursion" in reason:
        found = _locate(text, "deep")
    elif "number" in reason:
        found = _locate(text, "number")
    elif "surrogate" in reason:
        found = _locate(text, "surrogate")
    if found:
        path, kind = found
        detail = {"too_deep": f"nested deeper than {MAX_DEPTH} levels",
                  "out_of_range": "a number outside the 64-bit integer range",
                  "bad_text": "a lone UTF-16 surrogate (\\ud800-\\udfff without its pair)"}[kind]
        return _bad(path or None, detail, kind)
    return _bad(None, f"request body is not valid JSON: {reason}", "not_json")


# Tokens of a JSON text: strings, punctuation, and bare words (numbers, literals).
_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{}:,]|[^\s\[\]{}:,"]+', re.S)
_LOCATE_MAX_TOKENS = 20_000  # a 500-line basket is ~11,000; naming the field of a refusal stays cheap
_SURROGATE = re.compile("[\ud800-\udfff]")


def _locate(text: str, what: str) -> tuple[str, str] | None:
    """(path, kind) of the first thing in a JSON ``text`` that is ``what``:
    "deep" (a container past MAX_DEPTH), "number" (an integer outside 64
    bits, a float that overflows), "surrogate" (a string with a lone
    surrogate) or "duplicate" (a key given twice). Only called for a body
    already refused, to name the field; stops at the first find, never
    recurses."""
    stack: list[list] = []  # per open container: [is_object, key or index, expecting a key, keys seen]

    def path() -> str:
        out = ""
        for _obj, key, _ek, _seen in stack:
            out = _join(out, key) if key is not None else out
        return out

    for count, m in enumerate(_TOKEN.finditer(text)):
        if count > _LOCATE_MAX_TOKENS:
            return None  # refused all the same, without the field's name
        tok = m.group()
        top = stack[-1] if stack else None
        if tok in ("{", "["):
            if what == "deep" and len(stack) >= MAX_DEPTH:
                return path(), "too_deep"
            stack.append([tok == "{", None if tok == "{" else 0, tok == "{", set()])
        elif tok in ("}", "]"):
            if stack:
                stack.pop()
        elif tok == ",":
            if top is not None:
                if top[0]:
                    top[2] = True
                else:
                    top[1] += 1
        elif tok == ":":
            if top is not None:
                top[2] = False
        elif top is not None and top[0] and top[2]:  # an object's key
            try:
                key = json.loads(tok)
            except ValueError:
                return None
            if what == "duplicate" and key in top[3]:
                top[1] = key
                return path(), "duplicate_key"
            top[3].add(key)
            top[1] = key
        elif what == "surrogate" and tok.startswith('"'):
            try:
                if _SURROGATE.search(json.loads(tok)):
                    return path(), "bad_text"
            except ValueError:
                return None
        elif what == "number" and tok[:1] in "-0123456789":
            if any(c in tok for c in ".eE"):
                try:
                    if float(tok) in (float("inf"), float("-inf")):
                        return path(), "out_of_range"
                except ValueError:
                    return None
            elif len(tok.lstrip("-")) > 19 or not _INT64[0] <= int(tok) <= _INT64[1]:
                return path(), "out_of_range"
    return None


def _schema_error(exc: fastjsonschema.JsonSchemaValueException) -> RequestInvalid:
    """A schema violation as RequestInvalid: the field it is about and, for
    people, what the field must be (values are not echoed: they may be huge
    or carry the very characters that were refused)."""
    where = exc.name.replace("data", "", 1).lstrip(".")
    rule, rd, value, definition = exc.rule, exc.rule_definition, exc.value, exc.definition or {}
    if rule == "required":
        missing = [k for k in rd if k not in value]
        return _bad(_join(where, missing[0]), "required", "missing_field")
    if rule == "additionalProperties":
        allowed = set(definition.get("properties", ()))
        unknown = sorted(map(str, set(value) - allowed))
        shown = ", ".join(k if _SAFE_KEY.fullmatch(k) else "?" for k in unknown)
        return _bad(_join(where, unknown[0]), f"unknown field(s) {shown}; allowed: {', '.join(sorted(allowed))}",
                    "unknown_field")
    if rule == "oneOf" and all(list(b) == ["required"] and len(b["required"]) == 1 for b in rd):
        names = [b["required"][0] for b in rd]
        return _bad(_join(where, names[0]), f"give exactly one of {', '.join(names)}", "invalid")
    if rule == "type":
        kinds = [rd] if isinstance(rd, str) else list(rd)
        human = {"integer": "a whole number", "string": "a string", "boolean": "true or false",
                 "object": "an object", "array": "a list", "null": "null", "number": "a number"}
        return _bad(where, f"must be {' or '.join(human.get(k, k) for k in kinds)}")
    if rule in ("minimum", "maximum"):
        lo, hi = definition.get("minimum"), definition.get("maximum")
        return _bad(where, f"must be a whole number from {lo} to {hi}", "out_of_range")
    if rule == "maxLength":
        return _bad(where, f"at most {rd} characters", "too_long")
    if rule == "minLength":
        return _bad(where, f"at least {rd} character{'s' if rd != 1 else ''}")
    if rule == "pattern":
        if rd == SAFE_TEXT:
            return _bad(where, f"must be {_PATTERN_HELP[rd]}", "bad_text")
        return _bad(where, f"must be {_PATTERN_HELP.get(rd, 'in the documented format')}")
    if rule == "enum":
        return _bad(where, f"must be one of {', '.join(map(str, rd))}")
    if rule == "maxItems":
        return _bad(where, f"at most {rd} items", "too_many")
    if rule == "minItems":
        return _bad(where, f"at least {rd} item{'s' if rd != 1 else ''}")
    return _bad(where or None, f"is not valid ({rule})")


# ---------------------------------------------------------------- OpenAPI

def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def openapi_document() -> dict:
    """The OpenAPI 3.1 document of the POS API, from the schemas above."""
    paths: dict[str, dict] = {}
    for name, (method, path, summary, request, responses, errors, secured) in ENDPOINTS.items():
        op: dict[str, Any] = {"operationId": name, "summary": summary, "tags": [_tag(path)]}
        params = [{"name": p, "in": "path", "required": True, "schema": PATH_PARAMS[p]}
                  for p in re.findall(r"{(\w+)}", path)]
        if name == "events":
            params.append({"name": "Last-Event-ID", "in": "header", "required": False,
                           "description": "the id of the last event seen: on reconnect, the lane's events "
                                          "after it come first, so none is missed or seen twice",
                           "schema": {"type": "string", "maxLength": 64}})
        if params:
            op["parameters"] = params
        if request:
            op["requestBody"] = {"required": True, "content": {"application/json": {"schema": _ref(request)}}}
        out: dict[str, Any] = {}
        for status, component in responses.items():
            if name == "events":
                out[str(status)] = {"description": "one event per tap (event: tap) and sale (event: sale), "
                                                   "each with an id; comments keep the connection alive",
                                    "content": {"text/event-stream": {"schema": {"type": "string"}}}}
            elif component is None:
                out[str(status)] = {"description": "the OpenAPI document",
                                    "content": {"application/json": {"schema": {"type": "object"}}}}
            else:
                what = {200: "OK", 201: "done: journaled and synced to disk"}[status]
                if status == 200 and 201 in responses:
                    what = "the first answer to an earlier request with the same idempotency key"
                out[str(status)] = {"description": what,
                                    "content": {"application/json": {"schema": _ref(component)}}}
        for status in errors:
            resp: dict[str, Any] = {"description": _ERROR_MEANING[status],
                                    "content": {"application/json": {"schema": _ref("Error")}}}
            if status == 401:
                resp["headers"] = {"WWW-Authenticate": {"schema": {"type": "string"}}}
            if status == 429:
                resp["headers"] = {"Retry-After": {"schema": {"type": "string"}}}
            out[str(status)] = resp
        op["responses"] = out
        op["security"] = [{"terminal": []}] if secured else []
        paths.setdefault(path, {})[method] = op
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "storegate POS API",
            "version": API_VERSION,
            "description": (
                "The store gateway's HTTP/JSON API for POS terminals, lane terminals and the service desk "
                "on the store LAN. Every call but /health and /openapi.json needs a terminal credential; "
                "the terminal's role and lanes decide what it may do. Money is integer fen. Request "
                "bodies are closed: unknown fields are refused. Responses may gain fields: ignore those "
                "you do not know. Absolute caps (the rules may set lower ones): "
                f"{MAX_LINES} lines, qty up to {MAX_QTY}, unit_price up to {MAX_UNIT_PRICE_FEN} fen, "
                f"a basket up to {MAX_SALE_FEN} fen, a top-up up to {MAX_TOPUP_FEN} fen, "
                f"bodies up to {MAX_BODY_BYTES} bytes and {MAX_DEPTH} levels deep."),
        },
        "tags": [{"name": "status"}, {"name": "lanes"}, {"name": "counter"}, {"name": "service desk"}],
        "paths": paths,
        "components": {
            "schemas": COMPONENTS,
            "securitySchemes": {"terminal": {
                "type": "http", "scheme": "bearer", "bearerFormat": "<terminal-id>.<secret>",
                "description": "Authorization: Bearer <terminal-id>.<secret>, issued with "
                               "`storegate terminals add`"}},
        },
        "security": [{"terminal": []}],
    }


def _tag(path: str) -> str:
    if path.startswith("/lanes/{lane}/") and not path.endswith(("/member", "/events")):
        return "counter"
    if path.startswith(("/returns", "/cards", "/members", "/withdrawals")):
        return "service desk"
    return "lanes" if path.startswith("/lanes") else "status"


def openapi_text() -> str:
    """The document as committed in gateway/shell/openapi.json."""
    return json.dumps(openapi_document(), sort_keys=True, indent=2, ensure_ascii=False) + "\n"


def main() -> int:
    OPENAPI_PATH.write_text(openapi_text(), encoding="utf-8")
    print(f"wrote {OPENAPI_PATH}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
