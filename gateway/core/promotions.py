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
   ``exclusive_group``, exactly one applies (gateway/core/exclusive.py).

Eligible lines: those whose category is in ``categories`` or SKU in ``skus``
(for member_price, the SKUs in ``prices_fen``); if both are empty, every
line. Then, less the promotion's own ``excluded_categories`` /
``excluded_skus`` (v3) if it names any; if it names none, a promotion with
empty ``categories`` and ``skus`` leaves out the lines excluded from
discounts (``discount_excluded_*``, the v2 rule) and one that names them
excludes nothing.

Quantities: a measured line (0.532 kg) counts as one item for nth_item, and
a member price is per unit of its measure (gateway/core/measure.py).

Everything that does not depend on the basket (parsed fields, the SKU and
category index, receipt labels) is a ``Catalog``, built once when a rule set
is applied (``with_catalog``) and carried by its promotions table.
"""

from __future__ import annotations

import abc
from operator import itemgetter
from typing import NamedTuple

from gateway.core.measure import line_amount
from gateway.core.money import allocate, half_up, percent_of
from gateway.core.texts import YuanTexts, name_of, saving_labels

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


# ---------------------------------------------------------------- the compiled rule set

class Rule:
    """A promotion's basket-independent fields, parsed once per rule set."""

    def __init__(self, pid: str, src: dict):
        self.id, self.src = pid, src
        self.kind = kind = src["kind"]
        self.key = (src.get("priority", 100), pid)  # order of application
        self.group = src.get("exclusive_group") or ""
        self.percent = src.get("percent", 0)
        self.member_only = src.get("member_only", True)
        self.tiers, self.stores, self.regions = src.get("tiers"), src.get("stores"), src.get("regions")
        self.frm, self.to = src.get("from") or None, src.get("to") or None
        self.weekdays = src.get("weekdays") or None
        self.limit = src.get("per_member_limit")
        self.prices = src.get("prices_fen") or {} if kind == "member_price" else None
        self.cats = () if kind == "member_price" else src.get("categories") or ()
        self.skus = tuple(self.prices) if kind == "member_price" else src.get("skus") or ()
        # v3: the promotion's own exclusions, or None: the v2 rule (the discount exclusions, when
        # it names no categories or SKUs).
        self.excluded = None
        if "excluded_categories" in src or "excluded_skus" in src:
            self.excluded = (frozenset(src.get("excluded_categories") or ()),
                             frozenset(src.get("excluded_skus") or ()))
        self.labels = saving_labels(name_of(src, pid))
        self.n = self.steps = None
        self.extra = 0
        self.error = None
        try:  # a malformed rule fails when it is first priced, as it always did
            if kind == "nth_item":
                self.n = src["n"]
            elif kind == "threshold":
                self.steps = sorted(((s["min_fen"], s["off_fen"]) for s in src["steps"]), reverse=True)
            elif kind == "points_multiplier":
                self.extra = src["multiplier_percent"] - 100
        except Exception as e:  # noqa: BLE001 - re-raised unchanged when the rule is used
            self.error = e

    def eligible(self, lines: list[dict], by_sku: dict[str, list[int]], by_cat: dict[str, list[int]],
                 discountable: list[int]) -> list[int]:
        """The lines (in order) the rule applies to: those of its categories
        and SKUs (every line if it names none), less its own exclusions; with
        no exclusions of its own, a rule naming no categories or SKUs
        applies to the lines not excluded from discounts."""
        if self.excluded is None:
            return self.lines_in(by_sku, by_cat) if self.cats or self.skus else discountable
        ex_cat, ex_sku = self.excluded
        idx = self.lines_in(by_sku, by_cat) if self.cats or self.skus else range(len(lines))
        return [i for i in idx if lines[i]["category"] not in ex_cat and lines[i]["sku"] not in ex_sku]

    def lines_in(self, by_sku: dict[str, list[int]], by_cat: dict[str, list[int]]) -> list[int]:
        """The lines (in order) of the rule's SKUs and categories, in a basket
        indexed by SKU and by category."""
        if not self.skus and len(self.cats) == 1:
            return by_cat.get(self.cats[0], [])
        if not self.cats and len(self.skus) == 1:
            return by_sku.get(self.skus[0], [])
        return sorted({i for c in self.cats for i in by_cat.get(c, ())}
                      | {i for s in self.skus for i in by_sku.get(s, ())})

    def in_scope(self, member: dict | None, store: str | None, region: str | None,
                 now_min: str, weekday: int) -> bool:
        """Every scope check but today's uses. Times compare as plain strings:
        both sides are "YYYY-MM-DD[THH:MM]" in store time."""
        if member is None and self.member_only:
            return False
        if self.tiers and (member is None or member.get("tier") not in self.tiers):
            return False
        if self.stores and store not in self.stores:
            return False
        if self.regions and region not in self.regions:
            return False
        if self.frm and now_min[:len(self.frm)] < self.frm:
            return False
        if self.to and now_min[:len(self.to)] > self.to:
            return False
        return not self.weekdays or weekday in self.weekdays


class Catalog:
    """A promotions table compiled: the rules in order of application, and
    which of them can touch a SKU or a category (by rank in that order).
    It also keeps what the rule set's quotes reuse: the scope answers of the
    minute and the receipts' amount texts."""

    def __init__(self, promotions: dict):
        rules = [Rule(pid, src) for pid, src in promotions.items()
                 if not src.get("disabled") and src.get("kind") in KINDS]
        self.ordered = sorted(rules, key=lambda r: r.key)
        self.by_id = {r.id: r for r in rules}
        self.by_sku: dict[str, list[int]] = {}
        self.by_cat: dict[str, list[int]] = {}
        self.everywhere: list[int] = []
        for rank, rule in enumerate(self.ordered):
            if not rule.skus and not rule.cats:
                self.everywhere.append(rank)
            for sku in rule.skus:
                self.by_sku.setdefault(sku, []).append(rank)
            for cat in rule.cats:
                self.by_cat.setdefault(cat, []).append(rank)
        self.yuan = YuanTexts()  # the receipts' amounts as text
        # The scope answers of the current minute, per store, region and tier.
        self._minute: tuple[str, int] | None = None
        self._scoped: dict[tuple, list[Rule | None]] = {}

    def scoped(self, member: dict | None, store: str | None, region: str | None,
               now_min: str, weekday: int) -> list[Rule | None]:
        """By rank, the rules in scope for this member, store and minute (None for the others)."""
        if self._minute != (now_min, weekday):
            self._minute, self._scoped = (now_min, weekday), {}
        key = (store, region, member is None, (member or {}).get("tier"))
        if key not in self._scoped:
            self._scoped[key] = [r if r.in_scope(member, store, region, now_min, weekday) else None
                                 for r in self.ordered]
        return self._scoped[key]

    def relevant(self, skus, cats) -> list[int]:
        """Ranks, in order, of the rules that can touch lines of these SKUs and categories."""
        ranks = set(self.everywhere)
        for sku in skus:
            ranks.update(self.by_sku.get(sku, ()))
        for cat in cats:
            ranks.update(self.by_cat.get(cat, ()))
        return sorted(ranks)


class Promotions(dict):
    """A rule set's promotions table as applied: the table itself, carrying its Catalog."""

    def __init__(self, table: dict):
        super().__init__(table)
        self.catalog = Catalog(self)


def with_catalog(policy: dict) -> dict:
    """``policy`` with its promotions compiled, as a rule set is when it is
    applied (validate.Rules); quotes on it reuse the Catalog."""
    promotions = policy.get("promotions")
    if isinstance(promotions, Promotions):
        return policy
    return {**policy, "promotions": Promotions(promotions or {})}


def catalog_of(policy: dict) -> Catalog:
    promotions = policy.get("promotions")
    return promotions.catalog if isinstance(promotions, Promotions) else Catalog(promotions or {})


# ---------------------------------------------------------------- one implementation per kind

class Promo(abc.ABC):
    """A rule in scope for this basket, bound to the lines it applies to.
    One subclass per kind (``bind`` picks it), each with its ``apply``."""

    __slots__ = ("rule", "id", "kind", "key", "group", "lines", "line_set", "snap")

    def __init__(self, rule: Rule, lines: list[int], basket: list[dict]):
        self.rule, self.lines = rule, lines
        self.id, self.kind, self.key, self.group = rule.id, rule.kind, rule.key, rule.group
        self.line_set = frozenset(lines)
        # Whether the incremental group evaluation keeps the nets before this
        # promotion (gateway/core/exclusive.py); the Pricer sets it for more.
        self.snap = False

    @staticmethod
    def bind(rule: Rule, lines: list[int], basket: list[dict]) -> "Promo":
        if rule.error is not None:
            raise rule.error
        return _KIND[rule.kind](rule, lines, basket)

    @abc.abstractmethod
    def apply(self, nets: list[int], record: list | None = None) -> int:
        """Apply to ``nets`` in place and return the fen saved; with
        ``record`` (a list per line) also note each line's adjustment as
        (promotion id, fen, allocated)."""

    def take(self, nets: list[int], record: list | None, i: int, fen: int, allocated: bool = False) -> None:
        """``fen`` off line ``i``, noted in ``record`` when there is one."""
        nets[i] -= fen
        if record is not None:
            record[i].append((self.id, fen, allocated))


class PercentOff(Promo):
    __slots__ = ()

    def apply(self, nets: list[int], record: list | None = None) -> int:
        saved, percent = 0, self.rule.percent
        for i in self.lines:
            d = percent_of(nets[i], percent)
            if d:
                self.take(nets, record, i, d)
                saved += d
        return saved


class MemberPrice(Promo):
    __slots__ = ("targets",)

    def __init__(self, rule: Rule, lines: list[int], basket: list[dict]):
        super().__init__(rule, lines, basket)
        self.targets = [(i, line_amount(basket[i]["qty"], rule.prices[basket[i]["sku"]], basket[i]["scale"]))
                        for i in lines]

    def apply(self, nets: list[int], record: list | None = None) -> int:
        saved = 0
        for i, target in self.targets:
            d = nets[i] - target
            if d > 0:
                self.take(nets, record, i, d)
                saved += d
        return saved


class NthItem(Promo):
    __slots__ = ("shares",)

    def __init__(self, rule: Rule, lines: list[int], basket: list[dict]):
        super().__init__(rule, lines, basket)
        # Per line with n-th units: (line, percent x its n-th units, 100 x its
        # qty), the fraction of the line net that is off (percent off the n-th
        # units' share); which units are every n-th depends on quantities only.
        self.shares = []
        seen: dict[str, int] = {}
        for i in lines:
            # A measured line (0.532 kg of apples) is one item.
            sku, qty = basket[i]["sku"], basket[i]["qty"] if basket[i]["scale"] == 1 else 1
            before = seen.get(sku, 0)
            seen[sku] = before + qty
            nth_units = (before + qty) // rule.n - before // rule.n
            if nth_units:
                self.shares.append((i, nth_units * rule.percent, 100 * qty))

    def apply(self, nets: list[int], record: list | None = None) -> int:
        saved = 0
        for i, numerator, denominator in self.shares:
            d = half_up(nets[i] * numerator, denominator)
            if d:
                self.take(nets, record, i, d)
                saved += d
        return saved


def _nets_getter(lines: list[int]):
    """nets -> the tuple of the nets of ``lines``."""
    return itemgetter(*lines) if len(lines) > 1 else lambda nets, i=lines[0]: (nets[i],)


class Threshold(Promo):
    __slots__ = ("nets_of",)

    def __init__(self, rule: Rule, lines: list[int], basket: list[dict]):
        super().__init__(rule, lines, basket)
        self.snap = True
        self.nets_of = _nets_getter(lines)

    def apply(self, nets: list[int], record: list | None = None) -> int:
        weights = self.nets_of(nets)
        base = sum(weights)
        for min_fen, off in self.rule.steps:  # the highest step reached: at most ``base`` off
            if base >= min_fen:
                off = min(off, base)
                break
        else:
            return 0
        if off <= 0:
            return 0
        for i, d in zip(self.lines, allocate(off, weights)):
            if d:
                self.take(nets, record, i, d, allocated=True)
        return off


class PointsMultiplier(Promo):
    __slots__ = ("nets_of",)

    def __init__(self, rule: Rule, lines: list[int], basket: list[dict]):
        super().__init__(rule, lines, basket)
        self.snap = True
        self.nets_of = _nets_getter(lines)

    def apply(self, nets: list[int], record: list | None = None) -> int:
        return 0  # no money: see bonus

    def bonus(self, nets: list[int]) -> int:
        """Extra percent-fen of the campaign, to compare candidates."""
        return sum(self.nets_of(nets)) * self.rule.extra


_KIND = {"percent_off": PercentOff, "member_price": MemberPrice, "nth_item": NthItem,
         "threshold": Threshold, "points_multiplier": PointsMultiplier}


class Run(NamedTuple):
    nets: list[int]
    adjustments: list[list[tuple]] | None  # per line, (source, fen, allocated), when recorded
    applied: list[tuple[Promo, int]]       # (promotion, fen saved), points campaigns that earn included
    bonus: int                             # points campaigns' extra percent-fen


class Pricer:
    """One basket's promotions in scope, and runs of the pipeline over them."""

    def __init__(self, lines: list[dict], member: dict | None, policy: dict, *,
                 store: str | None, region: str | None, now_min: str, weekday: int):
        self.lines = lines
        ex_cat = policy.get("discount_excluded_categories") or ()
        ex_sku = policy.get("discount_excluded_skus") or ()
        by_sku: dict[str, list[int]] = {}
        by_cat: dict[str, list[int]] = {}
        for i, l in enumerate(lines):
            by_sku.setdefault(l["sku"], []).append(i)
            by_cat.setdefault(l["category"], []).append(i)
        self.discountable = [i for i, l in enumerate(lines) if l["category"] not in ex_cat and l["sku"] not in ex_sku]
        self.base_src, self.base_pct, self.base_name = base_discount(member, policy)
        discounted = set(self.discountable) if self.base_pct else ()
        amounts = [l["amount"] for l in lines]
        self.base_adj = [percent_of(a, self.base_pct) if i in discounted else 0 for i, a in enumerate(amounts)]
        self.start = [a - d for a, d in zip(amounts, self.base_adj)]

        uses = ((member or {}).get("today") or {}).get("promotion_uses") or {}
        self.catalog = catalog = catalog_of(policy)
        scoped = catalog.scoped(member, store, region, now_min, weekday)
        self.promos: list[Promo] = []
        for rank in catalog.relevant(by_sku, by_cat):
            rule = scoped[rank]
            if rule is None or (rule.limit is not None and member is not None and uses.get(rule.id, 0) >= rule.limit):
                continue
            idx = rule.eligible(lines, by_sku, by_cat, self.discountable)
            if idx:
                self.promos.append(Promo.bind(rule, idx, lines))
        for before, p in zip(self.promos, self.promos[1:]):
            if before.kind == "threshold" or before.group:
                p.snap = True

    def run(self, active: list[Promo], record: bool = False, snapshots: list | None = None) -> Run:
        """Apply ``active`` (in order of application) from the member-discounted
        start. ``snapshots`` gets the nets before each promotion flagged
        ``snap`` (None before the others)."""
        nets = list(self.start)
        adj = [[] for _ in self.lines] if record else None
        applied: list[tuple[Promo, int]] = []
        bonus = 0
        for p in active:
            if snapshots is not None:
                snapshots.append(nets[:] if p.snap else None)
            if p.kind == "points_multiplier":
                b = p.bonus(nets)
                if b:
                    bonus += b
                    applied.append((p, 0))
            else:
                saved = p.apply(nets, adj)
                if saved:
                    applied.append((p, saved))
        return Run(nets, adj, applied, bonus)

    def saving(self, active: list[Promo]) -> tuple[int, int]:
        """(fen saved, bonus) of a full run of ``active``, in any order."""
        run = self.run(sorted(active, key=lambda p: p.key))
        return sum(self.start) - sum(run.nets), run.bonus

    def price(self, chosen: list[Promo]) -> Run:
        """The recorded run with the exclusive groups' picks ``chosen``, the
        member's base discount first on each line."""
        picked = set(chosen)
        run = self.run([p for p in self.promos if not p.group or p in picked], record=True)
        for i, d in enumerate(self.base_adj):
            if d:
                run.adjustments[i].insert(0, (self.base_src, d, False))
        return run
