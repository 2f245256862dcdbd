"""Integer money arithmetic (pure, no floats): every rounding and splitting
rule of pricing and returns, written once (RULESET.md "Rounding").

- ``half_up(n, d)``: n / d rounded half-up, for non-negative n and positive d.
- ``percent_of(amount, percent)``: a line discount, half-up per line.
- ``allocate(total, weights)``: an order-level amount split over lines pro rata
  by weight (the lines' net), rounded down per line, the remainder to the last
  line with weight; no share ever exceeds its weight, so no line goes below zero.
- ``prorate(value, done_before, done_after, qty)``: the part of a per-line
  value that belongs to units ``done_before+1 .. done_after`` of ``qty``, by
  cumulative floors, so any sequence of partial returns adds up to ``value``
  exactly and every part is non-negative.
"""

from __future__ import annotations


def half_up(n: int, d: int) -> int:
    return (2 * n + d) // (2 * d)


def percent_of(amount: int, percent: int) -> int:
    """``percent``% of ``amount`` fen, half-up."""
    return half_up(amount * percent, 100)


def allocate(total: int, weights: list[int], capped: bool = True) -> list[int]:
    """``capped=False`` splits a quantity that is not bounded by the weights
    (points redeemed, when a point is worth less than a fen): the whole
    remainder then goes to the last line with weight."""
    base = sum(weights)
    if total <= 0 or base <= 0:
        return [0] * len(weights)
    if total > base and capped:
        total = base  # callers cap first; this keeps the "never below zero" promise regardless
    shares = [total * w // base for w in weights]
    rest = total - sum(shares)
    if not capped:
        last = max(i for i, w in enumerate(weights) if w > 0)
        shares[last] += rest
        return shares
    i = len(weights) - 1
    while rest and i >= 0:
        # Remainder to the last line with room; spills backwards only when a
        # tiny last line cannot take it all.
        room = weights[i] - shares[i]
        if room > 0:
            take = room if room < rest else rest
            shares[i] += take
            rest -= take
        i -= 1
    return shares


def prorate(value: int, done_before: int, done_after: int, qty: int) -> int:
    return value * done_after // qty - value * done_before // qty
