"""Receipts (pure): rendered from a finished sale or return, never while
computing one.

- ``render_receipt(q, policy, lang)``: the sale receipt of a finished quote
  (gateway/core/pricing.py ``quote`` without its ``receipt``): the member's
  tier, each line with its discounts (an allocated share marked as such),
  the totals with each saving in the order applied, the tender, the points
  earned with their breakdown, and the balances after. It reads the quote's
  lines, totals, tender, points and balances; the policy gives only names
  (tiers, card types, promotions) and the member discount's percent.
- ``render_return_receipt(record, lang)``: a return record's receipt. Its
  rows add up: each line's share of the price less the discounts reversed is
  the refund, paid back as the sale was paid.
"""

from __future__ import annotations

from gateway.core.measure import format_quantity
from gateway.core.promotions import Catalog, catalog_of
from gateway.core.reasons import yuan
from gateway.core.texts import LANGS, label, name_of, saving_labels


def qty_text(line: dict, policy: dict | None = None) -> str:
    """"x4" for a count line, "0.532kg" for a measured one (the unit's symbol)."""
    unit = line.get("unit")
    if unit is None:
        return f"x{line['qty']}"
    symbol = (((policy or {}).get("units") or {}).get(unit) or {}).get("symbol", unit)
    return f"{format_quantity(line['qty'], line['scale'])}{symbol}"


def _prefixes(q: dict, policy: dict, catalog: Catalog, lang: str) -> dict[str, tuple[str, str]]:
    """Per saving of the quote, (item row prefix, allocated share prefix) of its rows in ``lang``.
    Every source of a line's discount is a saving (a saving's total is the sum of its rows)."""
    k = LANGS.index(lang)
    by_id = catalog.by_id
    out = {}
    for p in q["promotions"]:
        source = p["source"]
        rule = by_id.get(source)
        if rule is not None:  # a promotion: its labels are compiled with the rules
            labels = rule.labels
        else:
            kind, _, key = source.partition(":")
            if kind in ("tier", "card_type"):
                entry = (policy.get("tiers" if kind == "tier" else "card_types") or {}).get(key) or {}
                names = name_of(entry, key)
                title = {lg: label("tier_discount", lg, name=names[lg], percent=entry.get("discount_percent", 0))
                         for lg in LANGS}
            elif kind == "coupon":
                title = {lg: label("coupon", lg, code=key) for lg in LANGS}
            else:  # a promotion no longer in the rules: its id
                title = name_of(None, source)
            labels = saving_labels(title)
        out[source] = (labels[0][k], labels[1][k])
    return out


def render_receipt(q: dict, policy: dict, lang: str) -> list[str]:
    """The sale receipt of the finished quote ``q`` in ``lang``."""
    catalog = catalog_of(policy)
    amount_text = catalog.yuan
    rows = []
    member = q["record"]["member"]
    if member:
        tier = member.get("tier") or ""
        rows.append(f"{label('member', lang)}: {name_of(policy['tiers'].get(tier), tier)[lang]}")
    prefixes = _prefixes(q, policy, catalog, lang)
    add = rows.append
    for line in q["lines"]:
        qty = f"x{line['qty']}" if line.get("unit") is None else qty_text(line, policy)
        add(f"{line['name']} {qty}  {amount_text[line['amount']]}")
        for d in line["discounts"]:
            add(prefixes[d["source"]][d["allocated"]] + amount_text[d["fen"]])
    add(f"{label('subtotal', lang)}  {yuan(q['subtotal'])}")
    if q["discount"]:
        add(f"{label('discount_total', lang)}  -{yuan(q['discount'])}")
        rows += [prefixes[p["source"]][0] + amount_text[p["fen"]] for p in q["promotions"]]
    rows.append(f"{label('total', lang)}  {yuan(q['total'])}")
    t = q["tender"]
    if t["points"]:
        rows.append(f"{label('points_redeemed', lang, points=t['points'])}  -{yuan(t['points_fen'])}")
    if t["stored_value_fen"]:
        rows.append(f"{label('stored_value_paid', lang)}  -{yuan(t['stored_value_fen'])}")
    if t["points"] or t["stored_value_fen"]:
        rows.append(f"{label('cash_due', lang)}  {yuan(t['cash_fen'])}")
    if t["stored_value_fen"]:
        rows.append(f"{label('stored_value_left', lang)}  {yuan(q['balances_after']['stored_value_fen'])}")
    if member:
        p = q["points"]
        rows.append(f"{label('points_earned', lang)}  {p['earned']}")
        if p["reason"] == "min_spend":
            rows.append("  " + label("pts_min_spend", lang, limit=yuan(policy["earning"]["min_spend_fen"])))
        for b in p["breakdown"]:
            sign = "+" if b["source"] != "base" and b["points"] >= 0 else ""  # bonuses read as additions
            rows.append(f"  {_points_label(b, policy, lang)}  {sign}{b['points']}")
        rows.append(f"{label('points_balance', lang)}  {q['balances_after']['points']}")
    return rows


def _points_label(b: dict, policy: dict, lang: str) -> str:
    src, m = b["source"], b["multiplier_percent"]
    if src == "base":
        return label("pts_base", lang, ppy=policy["earning"]["points_per_yuan"])
    if src == "tier":
        return label("pts_tier", lang, name=b["name"][lang], percent=m)
    if src in ("category", "sku"):
        return label(f"pts_{src}", lang, key=b["id"], percent=m)
    if src == "member_day":
        return label("pts_member_day", lang, percent=m)
    if src == "birthday":
        day = b["id"] == "day"
        return label("pts_birthday", lang, percent=m, period_zh="当日" if day else "月",
                     period_en="day" if day else "month")
    return label("pts_campaign", lang, name=b["name"][lang], percent=m)


def render_return_receipt(r: dict, lang: str) -> list[str]:
    """The receipt of the return record ``r`` in ``lang``."""
    t = r["totals"]
    rows = [label("return", lang)]
    for line in r["lines"]:
        rows.append(f"{line['name']} {qty_text(line)}  {yuan(line['amount'])}")
        if line["discount"]:
            rows.append(f"  {label('discount_reversed', lang)}  -{yuan(line['discount'])}")
    rows.append(f"{label('refund_total', lang)}  {yuan(t['refund_fen'])}")
    if t["redeemed_fen"] or t["points_redeemed"]:
        rows.append(f"  {label('refund_points', lang, points=t['points_redeemed'])}  {yuan(t['redeemed_fen'])}")
    if t["stored_value_fen"]:
        rows.append(f"  {label('refund_stored_value', lang)}  {yuan(t['stored_value_fen'])}")
    rows.append(f"  {label('refund_cash', lang)}  {yuan(t['cash_fen'])}")
    if r["member"] and t["points_earned"]:
        rows.append(f"{label('points_reversed', lang)}  -{t['points_earned']}")
    return rows
