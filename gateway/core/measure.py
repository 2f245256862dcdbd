"""Weighed and measured goods (pure): quantities in a unit, and EAN-13 scale
barcodes (wire/RULESET.md "units", "scale_barcodes").

A measured quantity is carried as a whole number of the unit's smallest
step: with ``units.kg.decimals = 3``, 0.532 kg is ``qty = 532`` with
``scale = 1000``. No floats anywhere: the POS sends the quantity as a decimal
string (``"0.532"``) or a whole number of units (``2``); a JSON number with
decimals is refused, so is a string with more decimals than the unit has.

The line's amount is ``money.half_up(qty * unit_price, scale)``: the price
per whole unit times the quantity, rounded half-up to the fen, once per line
(``line_amount``). A count line is the case ``scale = 1``, where nothing is
rounded.

A scale barcode is an EAN-13 whose leading digits name a format of the rule
set: ``prefix``, then ``item_digits`` of item code, then ``value_digits`` of
value (a weight in the unit's smallest steps, or a price in fen), then the
EAN-13 check digit, which is verified. ``ScaleFormats`` is built once per rule
set; ``read`` parses one code.
"""

from __future__ import annotations

from typing import NamedTuple

from gateway.core.money import half_up

MAX_DECIMALS = 3   # the finest unit step: 0.001 (g of a kg, ml of a litre)


class QuantityError(ValueError):
    """A quantity that is not one; the message says what is wrong (no field: the caller names it)."""


class BarcodeError(ValueError):
    """A scale barcode that is not one of the rule set's, or is damaged."""


def scale_of(decimals: int) -> int:
    return 10 ** decimals


def parse_quantity(value, scale: int, most: int) -> int:
    """``value`` (a decimal string, or a whole number of units) in smallest
    steps of ``1/scale``, from 1 to ``most``; QuantityError otherwise."""
    decimals = len(str(scale)) - 1
    if type(value) is int:
        steps = value * scale
    elif isinstance(value, str) and 0 < len(value) <= 20:
        whole, dot, frac = value.partition(".")
        if not (whole.isascii() and whole.isdigit()) or (dot and not (frac.isascii() and frac.isdigit())):
            raise QuantityError(f"{value!r} is not a decimal number like 0.532")
        if len(frac) > decimals:
            raise QuantityError(f"{value!r} has {len(frac)} decimals; this unit has {decimals}")
        steps = int(whole) * scale + int((frac or "0").ljust(decimals, "0") or "0")
    else:
        raise QuantityError("a decimal string like \"0.532\" or a whole number (no JSON decimals)")
    if not 1 <= steps <= most:
        raise QuantityError(f"{format_quantity(steps, scale) if steps >= 0 else value} is outside "
                            f"{format_quantity(1, scale)} to {format_quantity(most, scale)}")
    return steps


def format_quantity(steps: int, scale: int) -> str:
    """532, 1000 -> "0.532"; 5, 1 -> "5"."""
    if scale == 1:
        return str(steps)
    decimals = len(str(scale)) - 1
    return f"{steps // scale}.{steps % scale:0{decimals}d}"


def line_amount(qty: int, unit_price: int, scale: int) -> int:
    """The fen of ``qty`` steps of ``1/scale`` unit at ``unit_price`` fen a unit, half-up."""
    return half_up(qty * unit_price, scale)


def ean13_check_digit(first12: str) -> str:
    odd = sum(int(c) for c in first12[0::2])
    even = sum(int(c) for c in first12[1::2])
    return str((10 - (odd + 3 * even) % 10) % 10)


class ScaleRead(NamedTuple):
    sku: str         # prefix + item code
    kind: str        # "weight" | "price"
    value: int       # smallest unit steps (weight) or fen (price)
    unit: str | None  # weight: key into units


class ScaleFormats:
    """The rule set's ``scale_barcodes``, longest prefix first."""

    def __init__(self, formats: dict):
        self.formats = sorted(((f["prefix"], f) for f in formats.values() if not f.get("disabled")),
                              key=lambda pf: -len(pf[0]))

    def read(self, code) -> ScaleRead:
        if not isinstance(code, str) or len(code) != 13 or not (code.isascii() and code.isdigit()):
            raise BarcodeError("an EAN-13 scale barcode is 13 digits")
        for prefix, f in self.formats:
            if code.startswith(prefix):
                break
        else:
            raise BarcodeError(f"{code[:2]}... is not a scale barcode prefix of these rules")
        if ean13_check_digit(code[:12]) != code[12]:
            raise BarcodeError(f"check digit {code[12]} is wrong (expected {ean13_check_digit(code[:12])})")
        start = len(prefix) + f["item_digits"]
        value = int(code[start:start + f["value_digits"]])
        if value <= 0:
            raise BarcodeError(f"the {f['value']} in the barcode is 0")
        return ScaleRead(code[:start], f["value"], value, f.get("unit"))
