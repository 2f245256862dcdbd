"""Line prices after member discounts and promotions (pure).

Order of application (RULESET.md "promotions"):

1. The member's base discount: the larger of the tier's and the card type's
   ``discount_percent``, on lines not in ``discount_excluded_categories`` /
   ``_skus``, half-up per line. Members only.
2. Promotions in scope (member_only, tiers, stores, regions, from/to in store
   time, weekdays, per_member_limit against today's uses), in order of
   ``(priority, id)``; each works on the line nets the earlier ones left:
   - percent_off: ``percent`` of each eligible line's net, half-up per line;
   - member_price: the line's net becomes at most ``price x qty`` (a member
     price never raises a price the tier discount already made lower);
   - nth_item: every n-th unit of the same SKU (counted over the basket's
     eligible lines in order) gets ``percent`` off its share of the line net,
     half-up per line;
   - threshold (满减): the highest step whose ``min_fen`` the eligible nets
     reach; ``off_fen`` (at most those nets) allocated to the lines pro rata,
     floored, remainder to the last eligible line;
   - points_multiplier: no money, feeds the points breakdown.
3. Exclusive groups: of the promotions in scope sharing a non-empty
   ``exclusive_group``, exactly one applies. Groups are decided in name order;
   each candidate is evaluated by running the whole pipeline (non-grouped
   promotions + groups already decided + the candidate) and the one saving the
   customer the most fen wins, then the most bonus points, then the smallest id.

Eligible lines: those whose category is in ``categories`` or SKU in ``skus``;
if both are empty, every line not excluded from discounts. For member_price,
the SKUs in ``prices_fen``.
"""

from __future__ import annotations

from gateway.allocation import allocate

KINDS = ("percent_off", "member_price", "nth_item", "threshold", "points_multiplier")


def base_discount(member: dict | None, policy: dict) -> tuple[str | None, int, dict | None]:
    """(source id, percent, name) of the member's own discount."""
    if member is None:
        return None, 0, None
    tier_code = member.get("tier") or ""
    tier = policy["tiers"].get(tier_code) or {}
    pct, src, name = tier.get("discount_percent", 0), f"tier:{tier_code}", tier.get("name")
    ctype_code = member.get("card_type") or ""
    ctype = (policy.get("card_types") or {}).get(ctype_code)
    if ctype and ctype.get("discount_percent", 0) > pct:
        pct, src, name = ctype["discount_percent"], f"card_type:{ctype_code}", ctype.get("name")
    return (src, pct, name) if pct else (None, 0, None)


def in_scope(pid: str, p: dict, member: dict | None, store: str | None, region: str | None,
             now_min: str, weekday: int, uses: dict) -> bool:
    if p.get("disabled"):
        return False
    if member is None and p.get("member_only", True):
        return False
    tiers = p.get("tiers")
    if tiers and (member is None or member.get("tier") not in tiers):
        return False
    stores = p.get("stores")
    if stores and store not in stores:
        return False
    regions = p.get("regions")
    if regions and region not in regions:
        return False
    frm, to = p.get("from"), p.get("to")
    # Plain string comparison: both sides are "YYYY-MM-DD[THH:MM]" in store time.
    if frm and now_min[:len(frm)] < frm:
        return False
    if to and now_min[:len(to)] > to:
        return False
    wds = p.get("weekdays")
    if wds and weekday not in wds:
        return False
    limit = p.get("per_member_limit")
    if limit is not None and member is not None and uses.get(pid, 0) >= limit:
        return False
    return True


class _Promo:
    __slots__ = ("id", "kind", "prio", "group", "elig", "src")

    def __init__(self, pid, src, elig):
        self.id, self.src, self.elig = pid, src, elig
        self.kind = src["kind"]
        self.prio = src.get("priority", 100)
        self.group = src.get("exclusive_group") or ""


class Pricer:
    """Prices one basket; built once per quote."""

    def __init__(self, lines: list[dict], member: dict | None, policy: dict, *,
                 store: str | None, region: str | None, now_min: str, weekday: int):
        self.lines = lines
        self.member = member
        ex_cat = set(policy.get("discount_excluded_categories") or ())
        ex_sku = set(policy.get("discount_excluded_skus") or ())
        self.discountable = [i for i, l in enumerate(lines)
                             if l["category"] not in ex_cat and l["sku"] not in ex_sku]
        by_sku: dict[str, list[int]] = {}
        by_cat: dict[str, list[int]] = {}
        for i, l in enumerate(lines):
            by_sku.setdefault(l["sku"], []).append(i)
            by_cat.setdefault(l["category"], []).append(i)
        self.base_src, self.base_pct, self.base_name = base_discount(member, policy)
        self.start = []
        self.base_adj = []
        disc = set(self.discountable)
        for i, l in enumerate(lines):
            amount = l["qty"] * l["unit_price"]
            d = (2 * amount * self.base_pct + 100) // 200 if self.base_pct and i in disc else 0
            self.start.append(amount - d)
            self.base_adj.append(d)
        uses = (member or {}).get("today", {}).get("promotion_uses", {}) if member else {}
        promos = []
        for pid, src in (policy.get("promotions") or {}).items():
            if src.get("disabled") or src.get("kind") not in KINDS:
                continue
            if not in_scope(pid, src, member, store, region, now_min, weekday, uses):
                continue
            if src["kind"] == "member_price":
                idx = sorted({i for s in src.get("prices_fen") or {} for i in by_sku.get(s, ())})
            else:
                cats, skus = src.get("categories") or (), src.get("skus") or ()
                if cats or skus:
                    idx = sorted({i for c in cats for i in by_cat.get(c, ())}
                                 | {i for s in skus for i in by_sku.get(s, ())})
                else:
                    idx = self.discountable
            if idx:
                promos.append(_Promo(pid, src, idx))
        promos.sort(key=lambda p: (p.prio, p.id))
        self.promos = promos

    def _run(self, active: list[_Promo], record: bool):
        lines = self.lines
        nets = list(self.start)
        adj = [[] for _ in lines] if record else None
        applied: list[tuple[_Promo, int]] = []
        bonus_units = 0
        for p in active:
            src, kind, elig = p.src, p.kind, p.elig
            tot = 0
            if kind == "percent_off":
                pct = src["percent"]
                for i in elig:
                    n = nets[i]
                    d = (2 * n * pct + 100) // 200
                    if d:
                        nets[i] = n - d
                        tot += d
                        if record:
                            adj[i].append((p.id, d, False))
            elif kind == "member_price":
                prices = src["prices_fen"]
                for i in elig:
                    d = nets[i] - prices[lines[i]["sku"]] * lines[i]["qty"]
                    if d > 0:
                        nets[i] -= d
                        tot += d
                        if record:
                            adj[i].append((p.id, d, False))
            elif kind == "nth_item":
                nth, pct = src["n"], src["percent"]
                seen: dict[str, int] = {}
                for i in elig:
                    sku, q = lines[i]["sku"], lines[i]["qty"]
                    c = seen.get(sku, 0)
                    k = (c + q) // nth - c // nth
                    seen[sku] = c + q
                    if k:
                        d = (2 * nets[i] * k * pct + q * 100) // (q * 200)
                        if d:
                            nets[i] -= d
                            tot += d
                            if record:
                                adj[i].append((p.id, d, False))
            elif kind == "threshold":
                weights = [nets[i] for i in elig]
                base = sum(weights)
                best = None
                for step in src["steps"]:
                    if base >= step["min_fen"] and (best is None or step["min_fen"] > best["min_fen"]):
                        best = step
                off = min(best["off_fen"], base) if best else 0
                if off > 0:
                    for i, d in zip(elig, allocate(off, weights)):
                        if d:
                            nets[i] -= d
                            if record:
                                adj[i].append((p.id, d, True))
                    tot = off
                else:
                    continue
            else:  # points_multiplier
                units = sum(nets[i] for i in elig) * (src["multiplier_percent"] - 100)
                if not units:
                    continue
                bonus_units += units
                applied.append((p, 0))
                continue
            if tot:
                applied.append((p, tot))
        return nets, adj, applied, bonus_units

    def price(self):
        """(nets, per-line adjustments [(id, fen, allocated)], applied [(promo, fen)])."""
        plain = [p for p in self.promos if not p.group]
        groups: dict[str, list[_Promo]] = {}
        for p in self.promos:
            if p.group:
                groups.setdefault(p.group, []).append(p)
        chosen: list[_Promo] = []
        for g in sorted(groups):
            cands = sorted(groups[g], key=lambda p: p.id)
            if len(cands) == 1:
                chosen.append(cands[0])
                continue
            best, best_key = None, None
            for c in cands:
                active = sorted(plain + chosen + [c], key=lambda p: (p.prio, p.id))
                nets, _, _, bonus = self._run(active, False)
                key = (sum(self.start) - sum(nets), bonus)
                if best_key is None or key > best_key:
                    best, best_key = c, key
            chosen.append(best)
        active = sorted(plain + chosen, key=lambda p: (p.prio, p.id))
        nets, adj, applied, _ = self._run(active, True)
        for i, d in enumerate(self.base_adj):
            if d:
                adj[i].insert(0, (self.base_src, d, False))
        return nets, adj, applied
