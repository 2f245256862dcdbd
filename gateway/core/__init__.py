"""The pure core of the store box: pricing, promotions, points and money.

No I/O, no clock reads (time is an argument), deterministic; imports only
``wire/`` and itself (and ``gateway.core.reasons`` for the shared yuan format).

- ``money``: integer fen arithmetic, each rule written once: percent of an
  amount (half-up), allocation of an order-level amount over lines,
  proration of a line's value over returned units.
- ``promotions``: the compiled promotions of a rule set (``Catalog``, built
  when the rules are applied) and one implementation per promotion kind.
- ``exclusive``: which promotion of each exclusive group applies: a plain
  reference, and the incremental evaluator the quote uses (its oracle is the
  reference, in tests/test_pricing_props.py).
- ``points``: points earned on a sale.
- ``pricing``: quote (a pipeline of named steps), tenders, returns, top-ups,
  packages, card services.
- ``packages``: count packages sold and renewed at the counter; ``gifts``:
  points for gifts (both spend through pricing's tender checks).
- ``receipts``: sale and return receipts, rendered from the finished record.
- ``measure``: weighed and measured quantities, EAN-13 scale barcodes.
- ``texts``: zh-CN / en reasons and receipt labels of the pricing core.
"""
