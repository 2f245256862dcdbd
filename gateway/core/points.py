"""Points earned on a sale (pure): base, tier, category/SKU, member day,
birthday (solar or lunar) and points-multiplier campaigns.

Every multiplier is percent (150 = 1.5x). A SKU multiplier replaces its
category's multiplier (the more specific rule wins); of several matching
member days the largest applies. How the sources compose is the chain's
choice (``earning.compose``, wire/RULESET.md "How multipliers compose"):

- ``add`` (v2, the default): each source adds ``(multiplier - 100)%`` of the
  line's base points: gold (150) on a member day (200) earns
  100 + 50 + 100 = 250% of base. A multiplier under 100 takes points away
  from its lines, down to zero for a line, never below.
- ``multiply``: the multipliers multiply: gold on a member day earns
  1.5 x 2 = 300% of base; a multiplier under 100 scales down, 0 zeroes.
- ``highest_of``: groups of sources (``tier``, ``item``, ``member_day``,
  ``birthday``, ``campaign``) of which only the highest applies to a line:
  with ``[["member_day", "birthday"]]`` a gold birthday on a member day
  earns 1.5 x 3 = 450% (multiply), not 1.5 x 2 x 3 = 900%.

The breakdown shows one row per source, in the order base, tier, item,
member day, birthday, campaigns; a row's points are what it added to the
running total.

Per-line points are computed in 1/10000 points (net fen x points_per_yuan x
multiplier%; with ``multiply``, in 1/(10000 x 100^k) points for k rows after
the base, so every product is exact) and floored once per transaction (RULESET.md "Rounding"). The
integer total is split back to lines, and to breakdown rows, by cumulative
floors: row k shows floor(sum of rows 1..k) - floor(sum of rows 1..k-1), so
the rows always add up to the total exactly and returns can reverse per line.

Lunar birthdays use ``lunardate`` (pure Python, table-driven for 1900-2099,
no native code, a few kB: installs and runs as is on a Raspberry Pi). A
birthday on the 30th of a lunar month counts on the 29th in years where that
month is short; a leap month (闰月) does not count as the birthday month.
"""

from __future__ import annotations

from datetime import date

from lunardate import LunarDate

from gateway.core.promotions import card_type_of

UNITS_PER_POINT = 10_000


def _lunar_today(today: date):
    try:
        return LunarDate.from_solar_date(today.year, today.month, today.day)
    except ValueError:  # outside the library's 1900-2099 table
        return None


def is_birthday(member: dict, period: str, today: date) -> bool:
    bday = member.get("birthday")
    if not bday:
        return False
    mm, dd = int(bday[:2]), int(bday[3:5])
    if member.get("birthday_calendar", "solar") == "lunar":
        lt = _lunar_today(today)
        if lt is None or lt.is_leap_month or lt.month != mm:
            return False
        if period == "month":
            return True
        if lt.day == dd:
            return True
        if dd == 30 and lt.day == 29:
            try:  # the 30th does not exist this year: celebrate on the 29th
                LunarDate(lt.year, mm, 30).to_solar_date()
            except ValueError:
                return True
        return False
    if today.month != mm:
        return False
    if period == "month":
        return True
    if today.day == dd:
        return True
    # 29 Feb birthdays count on 28 Feb in common years.
    return mm == 2 and dd == 29 and today.day == 28 and not _leap(today.year)


def _leap(y: int) -> bool:
    return y % 4 == 0 and (y % 100 != 0 or y % 400 == 0)


def member_day_multiplier(earning: dict, today: date) -> int:
    best = 100
    iso = today.isoformat()
    for md in earning.get("member_days") or []:
        if md.get("from") and iso < md["from"]:
            continue
        if md.get("to") and iso > md["to"]:
            continue
        wd, mdays = md.get("weekdays") or [], md.get("month_days") or []
        if (wd or mdays) and today.isoweekday() not in wd and today.day not in mdays:
            continue
        best = max(best, md["multiplier_percent"])
    return best


def earn(lines: list[dict], nets: list[int], member: dict | None, policy: dict, today: date,
         campaigns: list[tuple[str, dict, int, list[int]]], spend: list[int] | None = None) -> dict:
    """Points for one sale.

    ``nets``: per line, the fen that earns points (net after discounts and
    coupons, less what was paid with points); ``spend``: per line, what the
    member bought (net before points), for ``min_spend_fen``. ``campaigns``: applied
    points-multiplier promotions as (id, name, multiplier_percent, line indexes).
    """
    earning = policy["earning"]
    ppy = earning["points_per_yuan"]
    n = len(lines)
    result = {"earned": 0, "eligible_fen": 0, "points_per_yuan": ppy, "breakdown": [],
              "line_points": [0] * n, "line_units": [0] * n, "reason": None}
    if member is None:
        result["reason"] = "anonymous"
        return result
    ctype = card_type_of(member, policy)
    if ctype is not None and not ctype.get("earns_points", True):
        result["reason"] = "card_type_no_points"
        return result
    ex_cat = set(earning.get("excluded_categories") or ())
    ex_sku = set(earning.get("excluded_skus") or ())
    eligible = [i for i, l in enumerate(lines) if l["category"] not in ex_cat and l["sku"] not in ex_sku]
    eligible_fen = sum(nets[i] for i in eligible)
    result["eligible_fen"] = eligible_fen
    if eligible_fen <= 0 or ppy <= 0:
        return result
    if sum((spend or nets)[i] for i in eligible) < earning.get("min_spend_fen", 0):
        result["reason"] = "min_spend"
        return result

    # rows: (source, id, name, multiplier_percent, lines), in the order of the breakdown.
    rows: list[tuple[str, str | None, dict | None, int, list[int]]] = [("base", None, None, 100, eligible)]
    tier = policy["tiers"].get(member.get("tier") or "")
    if tier and tier.get("points_multiplier_percent", 100) != 100:
        m = tier["points_multiplier_percent"]
        rows.append(("tier", member["tier"], tier["name"], m, eligible))
    cat_m = earning.get("category_multipliers_percent") or {}
    sku_m = earning.get("sku_multipliers_percent") or {}
    by_key: dict[tuple[str, str], list[int]] = {}
    for i in eligible:
        sku, cat = lines[i]["sku"], lines[i]["category"]
        if sku in sku_m:
            by_key.setdefault(("sku", sku), []).append(i)
        elif cat in cat_m:
            by_key.setdefault(("category", cat), []).append(i)
    for (src, key) in sorted(by_key):
        m = (sku_m if src == "sku" else cat_m)[key]
        rows.append((src, key, None, m, by_key[(src, key)]))
    md = member_day_multiplier(earning, today)
    if md != 100:
        rows.append(("member_day", None, None, md, eligible))
    bday = earning.get("birthday")
    if bday and is_birthday(member, bday.get("period", "month"), today):
        m = bday["multiplier_percent"]
        rows.append(("birthday", bday.get("period", "month"), None, m, eligible))
    elig_set = set(eligible)
    for pid, name, m, idxs in campaigns:
        share = [i for i in idxs if i in elig_set]
        if share:
            rows.append(("campaign", pid, name, m, share))

    rows = _highest_only(rows, earning.get("highest_of") or ())
    multiply = earning.get("compose", "add") == "multiply"
    # A line's weight after each row: add: percent, each row adds its multiplier - 100, never below 0;
    # multiply: percent x 100^depth, each row multiplies it by multiplier / 100, exactly (each row
    # divides by 100 once, and there are depth of them). Row points are the weight's growth x net x ppy.
    depth = len(rows) - 1 if multiply else 0
    one = 100 * 100 ** depth
    unit = UNITS_PER_POINT * 100 ** depth
    weight = [0] * n
    line_units = [0] * n
    cum = 0
    prev_pts = 0
    for src, key, name, m, share in rows:
        units = 0
        for i in share:
            w = weight[i]
            if src == "base":
                nw = one
            elif multiply:
                nw = w * m // 100
            else:
                nw = w + m - 100 if w + m > 100 else 0
            u = nets[i] * ppy * (nw - w)
            weight[i] = nw
            units += u
            line_units[i] += u
        cum += units
        pts = cum // unit
        result["breakdown"].append({"source": src, "id": key, "name": name, "multiplier_percent": m,
                                    "points": pts - prev_pts})
        prev_pts = pts
    total = cum // unit
    acc = 0
    line_points = []
    for u in line_units:
        before = acc // unit
        acc += u
        line_points.append(acc // unit - before)
    result.update(earned=total, line_points=line_points, line_units=line_units)
    return result


# The sources a ``highest_of`` group may name; "item" is a line's category or SKU multiplier.
GROUPABLE = ("tier", "item", "member_day", "birthday", "campaign")


def _highest_only(rows: list[tuple], groups) -> list[tuple]:
    """``rows`` with, for each group of sources in ``highest_of``, only the
    highest multiplier of the group on each line (the first of equals): the
    others' rows lose that line, and a row left with no line goes."""
    if not groups:
        return rows
    shares = [list(r[4]) for r in rows]
    for group in groups:
        members = [k for k, r in enumerate(rows) if ("item" if r[0] in ("category", "sku") else r[0]) in group]
        best: dict[int, int] = {}   # line -> row
        for k in members:
            for i in shares[k]:
                if i not in best or rows[k][3] > rows[best[i]][3]:
                    best[i] = k
        for k in members:
            shares[k] = [i for i in shares[k] if best[i] == k]
    return [(*r[:4], share) for r, share in zip(rows, shares) if share or r[0] == "base"]
