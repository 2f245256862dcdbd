"""Quote of a 50-line basket against 200 active promotions (target p99 <= 5 ms).

    python -m bench.quote_workload [--quick]

The promotions are of every kind, scoped the way a chain's are: most on a
few SKUs or a category, two store-wide thresholds, five exclusive
groups of four candidates each (every candidate is evaluated), a few
per-member limits, and some out of scope (other stores, other tiers, other
days) that must be filtered out. The member is gold, on a member day, with a
tender using points and stored value. About 115 of the promotions end up
applying to the one basket: a stress case. Baseline in the same run: the same
quote with no promotions (the fixed cost of lines, points, tender, receipts).
Also printed: the same promotions with the SKU-scoped ones spread over a
2,000-SKU catalogue (``quote_catalog2000_p99_ms``), closer to a real store.

The process's GC is set up as the gateway's is (``common.runtime.tune_gc``
after the rules load): without it a full collection every ~70 quotes adds
~3 ms to those quotes, which is the p99.

``run_quote_bench(quick)`` returns {"p50_ms", "p99_ms", "n", "cpu_p50_ms",
"cpu_p99_ms"}; bench.rules imports it.
"""

from __future__ import annotations

import time
from datetime import datetime
from zoneinfo import ZoneInfo

from common import runtime
from gateway.core import pricing
from gateway.core.promotions import with_catalog

NOW = datetime(2026, 11, 25, 19, 5, tzinfo=ZoneInfo("Asia/Shanghai"))  # a Wednesday
CATEGORIES = ["fresh", "dairy", "snacks", "drinks", "household", "staples", "frozen", "bakery", "tobacco", "baby"]


def _name(text: str) -> dict:
    return {"zh-CN": text, "en": text}


def bench_basket(n: int = 50) -> list[dict]:
    return [{"sku": f"69{i:011d}", "name": f"item {i}", "category": CATEGORIES[i % len(CATEGORIES)],
             "qty": 1 + i % 4, "unit_price": 150 + (i * 397) % 4800} for i in range(n)]


def _promo(i: int, catalog: int = 60) -> dict:
    """Promotion i of 200: a deterministic mix of kinds and scopes. SKU-scoped
    ones name SKUs of a ``catalog`` of that many (the basket holds the first 50)."""
    sku = f"69{(i * 7) % catalog:011d}"
    cat = CATEGORIES[i % len(CATEGORIES)]
    base = {"name": _name(f"promo {i}"), "priority": 10 + i % 7, "exclusive_group": "",
            "member_only": True, "tiers": [], "stores": [], "regions": [], "weekdays": [],
            "categories": [], "skus": [], "from": "2026-11-01T00:00", "to": "2026-11-30T23:59"}
    k = i % 10
    if k in (0, 1, 2):
        p = {**base, "kind": "percent_off", "percent": 5 + i % 20, "skus": [sku]}
    elif k == 3:
        p = {**base, "kind": "percent_off", "percent": 3 + i % 5, "categories": [cat]}
    elif k in (4, 5):
        p = {**base, "kind": "member_price", "prices_fen": {sku: 100 + i}}
    elif k == 6:
        p = {**base, "kind": "nth_item", "n": 2 + i % 2, "percent": 50, "skus": [sku]}
    elif k == 7:
        p = {**base, "kind": "threshold", "categories": [] if i % 100 == 7 else [cat],
             "steps": [{"min_fen": 5000, "off_fen": 500 + i}, {"min_fen": 20000, "off_fen": 2500 + i}]}
    elif k == 8:
        p = {**base, "kind": "points_multiplier", "multiplier_percent": 150 + i % 3 * 50, "categories": [cat]}
    else:  # out of scope one way or another, or limited per member
        p = {**base, "kind": "percent_off", "percent": 10, "categories": [cat]}
        p.update([({"stores": ["S999"]}), ({"tiers": ["vip"]}), ({"weekdays": [1]}),
                  ({"per_member_limit": 1})][(i // 10) % 4])
    if i < 20:  # five exclusive groups of four
        p["exclusive_group"] = f"g{i % 5}"
    return p


def bench_policy(n_promotions: int = 200, catalog: int = 60) -> dict:
    return {
        "version": 1, "max_age_s": 604800, "default_tier": "normal",
        "tiers": {
            "normal": {"name": _name("Member"), "rank": 1, "discount_percent": 0, "points_multiplier_percent": 100},
            "gold": {"name": {"zh-CN": "金卡会员", "en": "Gold"}, "rank": 3, "discount_percent": 5,
                     "points_multiplier_percent": 150},
        },
        "card_types": {"personal": {"name": _name("Personal"), "kind": "personal", "earns_points": True,
                                    "stored_value": True, "discount_percent": 0}},
        "discount_excluded_categories": ["tobacco", "baby"], "discount_excluded_skus": [],
        "earning": {"points_per_yuan": 1, "min_spend_fen": 0, "excluded_categories": ["tobacco"],
                    "excluded_skus": [], "category_multipliers_percent": {"fresh": 200},
                    "sku_multipliers_percent": {"6900000000007": 300},
                    "member_days": [{"weekdays": [3], "month_days": [], "multiplier_percent": 200}],
                    "birthday": {"period": "month", "multiplier_percent": 200}},
        "promotions": {f"p{i:03d}": _promo(i, catalog) for i in range(n_promotions)},
        "redemption": {"points_per_yuan": 100, "min_points": 500, "max_share_percent": 50, "step_points": 100,
                       "offline_max_points_per_tx": 10000, "offline_max_points_per_day": 20000},
        "stored_value": {"offline_max_per_tx_fen": 50000, "offline_max_per_day_fen": 100000,
                         "max_sync_age_s": 86400, "topup_packages": {}},
        "packages": {}, "coupons": {}, "fees": {"issue_fen": 1000, "replace_fen": 500, "annual_fen": 0},
    }


MEMBER = {"member_id": "M1001", "card_no": "880000000013", "tier": "gold", "card_type": "personal",
          "birthday": "10-12", "birthday_calendar": "lunar", "points_available": 8000,
          "balance_available_fen": 30000, "today": {"promotion_uses": {"p039": 1}}}
TENDER = {"points": 2000, "stored_value_fen": 10000}


def _time(policy: dict, basket: list[dict], n: int) -> tuple[list[float], list[float]]:
    wall, cpu = [], []
    for _ in range(n):
        t, c = time.perf_counter(), time.thread_time()
        pricing.quote(basket, MEMBER, policy, NOW, store="S001", region="east", tender=TENDER, rules_age_s=600)
        cpu.append((time.thread_time() - c) * 1000)
        wall.append((time.perf_counter() - t) * 1000)
    return wall, cpu


def _pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(len(s) * p))]


def run_quote_bench(quick: bool = False, n_promotions: int = 200, catalog: int = 60) -> dict:
    """Wall-clock p50/p99 of one quote (the target); ``cpu_p99_ms`` is this
    thread's CPU time, which shows how much of a bad p99 is a busy machine."""
    policy, basket = with_catalog(bench_policy(n_promotions, catalog)), bench_basket()  # as validate.Rules applies it
    runtime.tune_gc()  # as the gateway does once its rules are loaded
    n = 300 if quick else 2000
    _time(policy, basket, 30)  # warm-up
    wall, cpu = _time(policy, basket, n)
    return {"p50_ms": _pct(wall, 0.5), "p99_ms": _pct(wall, 0.99), "n": n,
            "cpu_p50_ms": _pct(cpu, 0.5), "cpu_p99_ms": _pct(cpu, 0.99)}


def main() -> None:
    from bench.common import args, emit

    quick = args(__doc__.splitlines()[0]).quick
    base = run_quote_bench(quick, n_promotions=0)
    res = run_quote_bench(quick)
    emit("quote_p99_ms", res["p99_ms"], "ms", baseline="quote_0_promotions_p99_ms",
         baseline_value=base["p99_ms"], n=res["n"], target_ms=5, cpu_p99_ms=round(res["cpu_p99_ms"], 3))
    emit("quote_p50_ms", res["p50_ms"], "ms", baseline="quote_0_promotions_p50_ms",
         baseline_value=base["p50_ms"], n=res["n"])
    # For comparison: the same promotions with SKU-scoped ones spread over a
    # 2,000-SKU catalogue, as a store's are (far fewer of them hit one basket).
    spread = run_quote_bench(quick, catalog=2000)
    emit("quote_catalog2000_p99_ms", spread["p99_ms"], "ms", baseline="quote_0_promotions_p99_ms",
         baseline_value=base["p99_ms"], n=spread["n"], p50_ms=round(spread["p50_ms"], 3),
         cpu_p99_ms=round(spread["cpu_p99_ms"], 3))


if __name__ == "__main__":
    main()
