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
   each candidate is evaluated as if the whole pipeline ran with it
   (non-grouped promotions + groups already decided + the candidate) and the
   one saving the customer the most fen wins, then the most bonus points, then
   the smallest id. The evaluation recomputes only the lines whose net
   differs from the run without the candidate (exact: the property tests
   compare it with full runs).

Everything that does not depend on the basket (parsed fields, the SKU and
category index, the static scope checks per store, region and tier, receipt
labels) is computed once per promotions table, kept by identity: a rule set
is never edited in place.

Eligible lines: those whose category is in ``categories`` or SKU in ``skus``;
if both are empty, every line not excluded from discounts. For member_price,
the SKUs in ``prices_fen``.
"""

from __future__ import annotations

from bisect import bisect_left
from operator import itemgetter

from gateway.allocation import allocate

KINDS = ("percent_off", "member_price", "nth_item", "threshold", "points_multiplier")


def card_type_of(member: dict, policy: dict) -> dict | None:
    """The rule set's entry for the member's card type, or None (no or unknown type)."""
    return (policy.get("card_types") or {}).get(member.get("card_type") or "")


def base_discount(member: dict | None, policy: dict) -> tuple[str | None, int, dict | None]:
    """(source id, percent, name) of the member's own discount."""
    if member is None:
        return None, 0, None
    tier_code = member.get("tier") or ""
    tier = policy["tiers"].get(tier_code) or {}
    pct, src, name = tier.get("discount_percent", 0), f"tier:{tier_code}", tier.get("name")
    ctype = card_type_of(member, policy)
    if ctype and ctype.get("discount_percent", 0) > pct:
        pct, src, name = ctype["discount_percent"], f"card_type:{member.get('card_type') or ''}", ctype.get("name")
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


# Everything about a promotions table that does not depend on the basket:
# which promotions can touch a SKU or a category, each promotion's parsed
# fields, and (per store, region and member tier) which pass the static scope
# checks. A rule set is never changed in place (a new rule set is a new dict),
# so this is kept for the last few tables seen, by identity.
_INDEX_CACHE: list[tuple[dict, int, "_Table"]] = []


class _Rule:
    """A promotion's basket-independent fields, parsed once per table."""

    __slots__ = ("id", "src", "kind", "prio", "key", "group", "pct", "steps", "extra", "n", "prices",
                 "cats", "skus", "member_only", "tiers", "stores", "regions", "frm", "to", "weekdays",
                 "limit", "fast", "error", "proto", "rank")

    def __init__(self, pid: str, src: dict):
        self.id, self.src = pid, src
        self.kind = kind = src["kind"]
        self.prio = src.get("priority", 100)
        self.key = (self.prio, pid)
        self.group = src.get("exclusive_group") or ""
        self.pct = src.get("percent", 0)
        self.steps = self.n = None
        self.extra = 0
        self.error = None
        self.member_only = src.get("member_only", True)
        self.tiers, self.stores, self.regions = src.get("tiers"), src.get("stores"), src.get("regions")
        self.frm, self.to = src.get("from") or None, src.get("to") or None
        self.weekdays = src.get("weekdays") or None
        self.limit = src.get("per_member_limit")
        self.fast = _FAST[kind]
        if kind == "member_price":
            self.prices = src.get("prices_fen") or {}
            self.cats, self.skus = (), ()
        else:
            self.prices = None
            self.cats, self.skus = src.get("categories") or (), src.get("skus") or ()
        try:  # a malformed rule fails when it is first priced, as it always did
            if kind == "nth_item":
                self.n = src["n"]
            elif kind == "threshold":
                self.steps = sorted(((s["min_fen"], s["off_fen"]) for s in src["steps"]), reverse=True)
            elif kind == "points_multiplier":
                self.extra = src["multiplier_percent"] - 100
        except Exception as e:  # noqa: BLE001 - re-raised unchanged when the rule is used
            self.error = e
        # What every _Promo of this rule copies, in its slots' order (one unpacking per quote).
        self.proto = (pid, src, kind, self.prio, self.key, self.group, self.pct, self.steps, self.extra, self.fast,
                      kind == "threshold" or kind == "points_multiplier")

    def static_scope(self, member: dict | None, store: str | None, region: str | None) -> bool:
        """The checks of ``in_scope`` that depend neither on the time nor on today's uses."""
        if member is None and self.member_only:
            return False
        tiers = self.tiers
        if tiers and (member is None or member.get("tier") not in tiers):
            return False
        if self.stores and store not in self.stores:
            return False
        if self.regions and region not in self.regions:
            return False
        return True

    def timely(self, now_min: str, weekday: int) -> bool:
        """The time checks of ``in_scope``. Plain string comparison: both sides
        are "YYYY-MM-DD[THH:MM]" in store time."""
        frm, to = self.frm, self.to
        if frm and now_min[:len(frm)] < frm:
            return False
        if to and now_min[:len(to)] > to:
            return False
        return not self.weekdays or weekday in self.weekdays


class _Table:
    """The rules in order of application, (priority, id): a rule's rank is its
    place in that order, and the index maps SKUs and categories to ranks, so a
    basket's promotions come out in order by sorting small integers."""

    __slots__ = ("by_sku", "by_cat", "everywhere", "rules", "ordered", "scopes", "labels")

    def __init__(self, promotions: dict):
        by_sku: dict[str, list[int]] = {}
        by_cat: dict[str, list[int]] = {}
        everywhere: list[int] = []
        rules: dict[str, _Rule] = {}
        for pid, src in promotions.items():
            if src.get("disabled") or src.get("kind") not in KINDS:
                continue
            rules[pid] = _Rule(pid, src)
        ordered = sorted(rules.values(), key=lambda r: r.key)
        for rank, rule in enumerate(ordered):
            rule.rank = rank
            skus = list(rule.prices) if rule.kind == "member_price" else rule.skus
            cats = rule.cats
            if not skus and not cats:
                everywhere.append(rank)
            for sku in skus:
                by_sku.setdefault(sku, []).append(rank)
            for cat in cats:
                by_cat.setdefault(cat, []).append(rank)
        self.by_sku, self.by_cat, self.everywhere, self.rules = by_sku, by_cat, everywhere, rules
        self.ordered = ordered
        self.scopes: dict[tuple, list[_Rule | None]] = {}
        self.labels: dict = {}  # receipt labels, filled by gateway.pricing

    def scoped(self, member: dict | None, store: str | None, region: str | None,
               now_min: str, weekday: int) -> list[_Rule | None]:
        """By rank, the rules that pass the scope checks that depend neither on
        the basket nor on today's uses (None for the others): store, region,
        member tier, and the time (so the answer is kept per minute)."""
        key = (store, region, now_min, weekday) if member is None else \
            (store, region, now_min, weekday, True, member.get("tier"))
        ok = self.scopes.get(key)
        if ok is None:
            if len(self.scopes) >= 64:
                self.scopes.clear()
            ok = self.scopes[key] = [r if r.static_scope(member, store, region) and r.timely(now_min, weekday)
                                     else None for r in self.ordered]
        return ok


def table(promotions: dict) -> _Table:
    """The compiled form of a promotions table; pure but memoised by identity."""
    for ref, n, t in _INDEX_CACHE:
        if ref is promotions and n == len(promotions):
            return t
    t = _Table(promotions)
    _INDEX_CACHE.insert(0, (promotions, len(promotions), t))
    del _INDEX_CACHE[4:]
    return t


# Application without recording adjustments or totals: what the exclusive-group
# evaluation runs hundreds of times per quote. Same arithmetic as _Promo.apply;
# the one-line forms skip the loop (most SKU-scoped promotions touch one line).
# Half-up of n x pct / 100 is (n * pct + 50) // 100, allocation.half_up(n * pct, 100)
# with the factor 2 cancelled (an nth item's denominator, 100 x qty, is even too);
# what is left of n, n - (n * pct + 50) // 100, is (n * (100 - pct) + 49) // 100
# (n - floor(x / 100) = ceil((100 n - x) / 100)): one operation less.
def _fast_percent_off(p: "_Promo", nets: list[int]) -> None:
    keep = 100 - p.pct
    for i in p.elig:
        nets[i] = (nets[i] * keep + 49) // 100


def _fast_percent_off_1(p: "_Promo", nets: list[int]) -> None:
    i = p.one
    nets[i] = (nets[i] * (100 - p.pct) + 49) // 100


def _fast_member_price(p: "_Promo", nets: list[int]) -> None:
    for i, target in p.targets:
        if nets[i] > target:
            nets[i] = target


def _fast_member_price_1(p: "_Promo", nets: list[int]) -> None:
    i, target = p.targets[0]
    if nets[i] > target:
        nets[i] = target


def _fast_nth_item(p: "_Promo", nets: list[int]) -> None:
    for i, num, half, den in p.nth:
        n = nets[i]
        nets[i] = n - (n * num + half) // den


def _fast_threshold(p: "_Promo", nets: list[int]) -> None:
    # allocation.allocate inlined (capped; tot <= base here): the hottest call of a
    # quote. After the pro-rata shares, a line's net is what it can still take
    # of the remainder, so the remainder loop reads nets directly.
    elig = p.elig
    weights = p.get(nets)
    base = sum(weights)
    for min_fen, off in p.steps:
        if base >= min_fen:
            tot = off if off < base else base
            break
    else:
        return
    if tot <= 0:
        return
    rest = tot
    for i, n in zip(elig, weights):
        d = tot * n // base
        nets[i] = n - d
        rest -= d
    j = len(elig) - 1
    while rest and j >= 0:
        i = elig[j]
        n = nets[i]
        if n > 0:
            take = n if n < rest else rest
            nets[i] = n - take
            rest -= take
        j -= 1


def _fast_none(p: "_Promo", nets: list[int]) -> None:
    pass


_FAST = {"percent_off": _fast_percent_off, "member_price": _fast_member_price, "nth_item": _fast_nth_item,
         "threshold": _fast_threshold, "points_multiplier": _fast_none}


class _Promo:
    """A promotion in scope for this basket, with what it needs precomputed."""

    # targets: member_price only; nth: nth_item only; get (the nets of its
    # lines, as a tuple): threshold and points_multiplier only. snap: whether
    # the group evaluation reads the snapshot before it (see Pricer.__init__).
    __slots__ = ("id", "src", "kind", "prio", "key", "group", "pct", "steps", "extra", "fast", "snap",
                 "elig", "eligset", "one", "targets", "nth", "get")

    def __init__(self, rule: _Rule, elig: list[int], lines: list[dict]):
        if rule.error is not None:
            raise rule.error
        (self.id, self.src, self.kind, self.prio, self.key, self.group, self.pct, self.steps, self.extra,
         self.fast, self.snap) = rule.proto
        kind = self.kind
        self.elig = elig
        self.one = elig[0]
        self.eligset = frozenset(elig) if len(elig) > 1 else None  # one line: test ``one`` instead
        if kind == "threshold" or kind == "points_multiplier":
            self.get = itemgetter(*elig) if len(elig) > 1 else lambda nets, i=elig[0]: (nets[i],)
        elif kind == "member_price":
            prices = rule.prices
            self.targets = [(i, prices[lines[i]["sku"]] * lines[i]["qty"]) for i in elig]
            if len(elig) == 1:
                self.fast = _fast_member_price_1
        elif kind == "percent_off":
            if len(elig) == 1:
                self.fast = _fast_percent_off_1
        elif kind == "nth_item":
            n, seen, nth = rule.n, {}, []
            pct = self.pct
            for i in elig:  # which units are every n-th depends on quantities only
                sku, q = lines[i]["sku"], lines[i]["qty"]
                c = seen.get(sku, 0)
                k = (c + q) // n - c // n
                seen[sku] = c + q
                if k:
                    nth.append((i, k * pct, q * 50, q * 100))  # num, den / 2, den
            self.nth = nth

    def apply(self, nets: list[int], adj: list | None) -> int:
        """Apply to ``nets`` in place; the fen saved (0 for points multipliers)."""
        kind, tot = self.kind, 0
        if kind == "percent_off":
            pct = self.pct
            for i in self.elig:
                n = nets[i]
                d = (n * pct + 50) // 100
                if d:
                    nets[i] = n - d
                    tot += d
                    if adj is not None:
                        adj[i].append((self.id, d, False))
        elif kind == "member_price":
            for i, target in self.targets:
                d = nets[i] - target
                if d > 0:
                    nets[i] = target
                    tot += d
                    if adj is not None:
                        adj[i].append((self.id, d, False))
        elif kind == "nth_item":
            for i, num, half, den in self.nth:
                d = (nets[i] * num + half) // den
                if d:
                    nets[i] -= d
                    tot += d
                    if adj is not None:
                        adj[i].append((self.id, d, False))
        elif kind == "threshold":
            weights = self.get(nets)
            base = sum(weights)
            for min_fen, off in self.steps:
                if base >= min_fen:
                    tot = min(off, base)
                    break
            if tot > 0:
                for i, d in zip(self.elig, allocate(tot, weights)):
                    if d:
                        nets[i] -= d
                        if adj is not None:
                            adj[i].append((self.id, d, True))
        return tot

    def bonus(self, nets: list[int]) -> int:
        """Points-multiplier campaigns: extra percent-fen, to compare candidates."""
        return sum(self.get(nets)) * self.extra


class Pricer:
    """Prices one basket; built once per quote."""

    def __init__(self, lines: list[dict], member: dict | None, policy: dict, *,
                 store: str | None, region: str | None, now_min: str, weekday: int):
        self.lines = lines
        self.member = member
        ex_cat = policy.get("discount_excluded_categories") or ()
        ex_sku = policy.get("discount_excluded_skus") or ()
        by_sku: dict[str, list[int]] = {}
        by_cat: dict[str, list[int]] = {}
        discountable = []
        for i, l in enumerate(lines):
            sku, cat = l["sku"], l["category"]
            by_sku.setdefault(sku, []).append(i)
            by_cat.setdefault(cat, []).append(i)
            if cat not in ex_cat and sku not in ex_sku:
                discountable.append(i)
        self.discountable = discountable
        self.base_src, self.base_pct, self.base_name = base_discount(member, policy)
        pct = self.base_pct
        self.start = start = []
        self.base_adj = base_adj = []
        disc = set(discountable) if pct else ()
        for i, l in enumerate(lines):
            amount = l["qty"] * l["unit_price"]
            d = (amount * pct + 50) // 100 if i in disc else 0
            start.append(amount - d)
            base_adj.append(d)
        uses = ((member or {}).get("today") or {}).get("promotion_uses") or {}
        t = table(policy.get("promotions") or {})
        self.table = t
        scoped = t.scoped(member, store, region, now_min, weekday)
        relevant = set(t.everywhere)  # only promotions that can touch this basket's lines
        p_sku, p_cat = t.by_sku, t.by_cat
        for sku in by_sku:
            relevant.update(p_sku.get(sku, ()))
        for cat in by_cat:
            relevant.update(p_cat.get(cat, ()))
        promos = []
        # The group evaluation reads a run's snapshot (the nets before a
        # promotion) only before a threshold or points campaign, right after a
        # threshold, and where a candidate goes in: after a promotion of a group.
        # So the runs keep just those (None for the others), flagged ``snap``.
        after_coupling = False
        for rank in sorted(relevant):  # in order of application
            r = scoped[rank]
            if r is None:
                continue
            if r.limit is not None and member is not None and uses.get(r.id, 0) >= r.limit:
                continue
            if r.kind == "member_price":
                prices = r.prices
                if len(prices) == 1:
                    idx = by_sku.get(next(iter(prices)), ())
                else:
                    idx = sorted({i for s in prices for i in by_sku.get(s, ())})
            else:
                cats, skus = r.cats, r.skus
                if len(cats) + len(skus) == 1:  # the common case: lists are already in line order
                    idx = by_cat.get(cats[0], ()) if cats else by_sku.get(skus[0], ())
                elif cats or skus:
                    idx = sorted({i for c in cats for i in by_cat.get(c, ())}
                                 | {i for s in skus for i in by_sku.get(s, ())})
                else:
                    idx = discountable
            if idx:
                p = _Promo(r, idx, lines)
                if after_coupling:
                    p.snap = True
                after_coupling = p.kind == "threshold" or p.group != ""
                promos.append(p)
        self.promos = promos

    def run(self, active: list[_Promo], record: bool = False, snapshots: list | None = None):
        """Apply ``active`` (sorted) from the member-discounted start.
        -> (nets, adjustments or None, [(promo, fen)], bonus)."""
        nets = list(self.start)
        adj = [[] for _ in self.lines] if record else None
        applied: list[tuple[_Promo, int]] = []
        bonus = 0
        for p in active:
            if snapshots is not None:
                snapshots.append(list(nets))
            if p.kind == "points_multiplier":
                b = p.bonus(nets)
                if b:
                    bonus += b
                    applied.append((p, 0))
                continue
            tot = p.apply(nets, adj)
            if tot:
                applied.append((p, tot))
        return nets, adj, applied, bonus

    def _run_fast(self, active: list[_Promo], snapshots: list) -> tuple[list[int], int]:
        """``run`` without adjustments: (nets, bonus), a snapshot before each
        promotion flagged ``snap`` (None before the others)."""
        nets = list(self.start)
        bonus = 0
        add = snapshots.append
        for p in active:
            add(nets[:] if p.snap else None)
            if p.extra:  # points multipliers only: the others have extra 0
                bonus += p.bonus(nets)
            else:
                p.fast(p, nets)
        return nets, bonus

    def _candidate(self, c: _Promo, active: list[_Promo], keys: list, snaps: list, final: list[int],
                   saving: int, bonus: int, rebase: bool = False):
        """(saving, bonus) of ``active`` plus candidate ``c``, exactly as a full
        run would give, recomputing only the lines whose net differs from the
        base run's at that point ("dirty" lines). A line changes only where a
        promotion applies to it; per-line kinds keep clean lines clean, and a
        threshold (whose allocation couples its lines) is recomputed when one
        of its lines is dirty, after which each of its lines is dirty or clean
        again by comparison with the base run. Lines that are not dirty hold
        stale values in ``state``: they are read from the snapshots instead.

        With ``rebase``, also returns (active', snaps', final') for ``active``
        with ``c`` in it: the base for the next group, without a full run."""
        pos = bisect_left(keys, c.key)
        n_act = len(active)
        before = snaps[pos] if pos < n_act else final
        state = before[:]
        new_snaps = [state[:] if c.snap else None] if rebase else None  # before c, as in a run with it
        if c.kind == "points_multiplier":
            bonus += c.bonus(state)
            dirty = set()
        else:
            c.fast(c, state)
            dirty = {i for i in c.elig if state[i] != before[i]}
        n_lines = len(state)
        whole_from = n_act  # where every line is carried (most are dirty), if that happens
        for k in range(pos, n_act):
            p = active[k]
            if rebase:
                snap = snaps[k]
                if snap is not None:
                    snap = snap[:]
                    for i in dirty:
                        snap[i] = state[i]
                new_snaps.append(snap)
            elif not dirty:
                break  # every line is as in the base run: so is the rest
            es = p.eligset
            if p.one not in dirty if es is None else es.isdisjoint(dirty):
                continue  # every line of p is as in the base run: so is its result
            kind = p.kind
            if kind == "threshold":
                snap = snaps[k]
                for i in p.elig:
                    if i not in dirty:
                        state[i] = snap[i]
                p.fast(p, state)
                after = snaps[k + 1] if k + 1 < n_act else final
                for i in p.elig:
                    if state[i] != after[i]:
                        dirty.add(i)
                    else:
                        dirty.discard(i)
                if 2 * len(dirty) >= n_lines:
                    # Most lines now differ from the base run (a basket-wide
                    # threshold's shares moved): carrying every line through a
                    # plain run is cheaper than tracking which ones differ.
                    for i in range(n_lines):
                        if i not in dirty:
                            state[i] = after[i]
                    whole_from = k + 1
                    break
            elif kind == "points_multiplier":
                snap = snaps[k]
                bonus += sum([state[i] - snap[i] for i in p.elig if i in dirty]) * p.extra
            else:
                p.fast(p, state)  # clean lines of p get stale values: never read
        if whole_from == n_act:
            saving += sum([final[i] - state[i] for i in dirty])
            if not rebase:
                return saving, bonus
            new_final = final[:]
            for i in dirty:
                new_final[i] = state[i]
        else:
            for k in range(whole_from, n_act):
                p = active[k]
                if rebase:
                    new_snaps.append(state[:] if p.snap else None)
                if p.extra:
                    snap = snaps[k]
                    bonus += (sum(p.get(state)) - sum(p.get(snap))) * p.extra
                else:
                    p.fast(p, state)
            saving += sum(final) - sum(state)
            if not rebase:
                return saving, bonus
            new_final = state
        return (saving, bonus), active[:pos] + [c] + active[pos:], snaps[:pos] + new_snaps, new_final

    def price(self):
        """(nets, per-line adjustments [(id, fen, allocated)], applied [(promo, fen)])."""
        plain = [p for p in self.promos if not p.group]
        groups: dict[str, list[_Promo]] = {}
        for p in self.promos:
            if p.group:
                groups.setdefault(p.group, []).append(p)
        order = sorted(groups)
        # Is there a choice to make in this group or a later one? Past the last
        # real choice, groups have one candidate each and need no evaluation.
        choice_ahead = [False] * (len(order) + 1)
        for j in range(len(order) - 1, -1, -1):
            choice_ahead[j] = choice_ahead[j + 1] or len(groups[order[j]]) > 1
        chosen = []
        if choice_ahead[0]:
            total_start = sum(self.start)
            active = plain
            keys = [p.key for p in active]  # kept beside active, a new list for each base
            snaps: list = []
            final, bonus = self._run_fast(active, snaps)
        for j, g in enumerate(order):
            # Groups in name order, each against the promotions decided so far.
            cands = sorted(groups[g], key=lambda p: p.id)
            best = cands[0]
            if len(cands) > 1:
                saving = total_start - sum(final)
                best_key = None
                for c in cands:
                    key = self._candidate(c, active, keys, snaps, final, saving, bonus)
                    if best_key is None or key > best_key:
                        best, best_key = c, key
            chosen.append(best)
            if choice_ahead[j + 1]:
                pos = bisect_left(keys, best.key)
                if pos * 3 < len(active):  # a plain run is cheaper than patching most snapshots
                    active = active[:pos] + [best] + active[pos:]
                    snaps = []
                    final, bonus = self._run_fast(active, snaps)
                else:
                    (_, bonus), active, snaps, final = self._candidate(
                        best, active, keys, snaps, final, 0, bonus, rebase=True)
                keys = keys[:pos] + [best.key] + keys[pos:]
        self.chosen = chosen
        picked = set(chosen)
        nets, adj, applied, _ = self.run([p for p in self.promos if not p.group or p in picked], record=True)
        for i, d in enumerate(self.base_adj):
            if d:
                adj[i].insert(0, (self.base_src, d, False))
        return nets, adj, applied

    def full_saving(self, active: list[_Promo]) -> tuple[int, int]:
        """(saving, bonus) by a full run: the reference the tests check _candidate against."""
        nets, _, _, bonus = self.run(sorted(active, key=lambda p: p.key))
        return sum(self.start) - sum(nets), bonus
