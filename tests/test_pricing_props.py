"""Properties of the pricing core over random policies, baskets, members and tenders."""

from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

from hypothesis import HealthCheck, assume, given, settings, strategies as st

from gateway.core import pricing
from gateway.core.pricing import TenderError
from gateway.core import exclusive
from gateway.core.promotions import Pricer

TZ = ZoneInfo("Asia/Shanghai")
SKUS = {"A": "fresh", "B": "dairy", "C": "snacks", "D": "tobacco", "E": "dairy", "F": "household"}
CATS = sorted(set(SKUS.values()))
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _name(s):
    return {"zh-CN": s, "en": s}


@st.composite
def promotion(draw, groups=("", "", "g1", "g1", "g2", "g2")):
    kind = draw(st.sampled_from(["percent_off", "member_price", "nth_item", "threshold", "points_multiplier"]))
    p = {"name": _name(kind), "kind": kind, "priority": draw(st.integers(0, 20)),
         "exclusive_group": draw(st.sampled_from(groups)),
         "categories": draw(st.sampled_from([[], []]) | st.lists(st.sampled_from(CATS), max_size=2, unique=True)),
         "skus": draw(st.sampled_from([[], []]) | st.lists(st.sampled_from(sorted(SKUS)), max_size=2, unique=True)),
         "tiers": draw(st.sampled_from([[], [], [], ["gold"]])), "member_only": draw(st.booleans()),
         "stores": draw(st.sampled_from([[], [], [], ["S001"], ["S002"]])), "regions": [],
         "weekdays": draw(st.sampled_from([[], [], [], [3], [1, 2]]))}
    if kind == "percent_off":
        p["percent"] = draw(st.integers(0, 100))
    elif kind == "member_price":
        p["prices_fen"] = draw(st.dictionaries(st.sampled_from(sorted(SKUS)), st.integers(0, 20000), min_size=1))
    elif kind == "nth_item":
        p["n"], p["percent"] = draw(st.integers(1, 4)), draw(st.integers(0, 100))
    elif kind == "threshold":
        p["steps"] = draw(st.lists(st.fixed_dictionaries({"min_fen": st.integers(0, 30000),
                                                          "off_fen": st.integers(0, 12000)}),
                                   min_size=1, max_size=3, unique_by=lambda s: s["min_fen"]))
    else:
        p["multiplier_percent"] = draw(st.integers(0, 500))
    if draw(st.integers(0, 3)) == 0:
        p["per_member_limit"] = draw(st.integers(0, 2))
    return p


@st.composite
def policy(draw, groups=("", "", "g1", "g1", "g2", "g2")):
    return {
        "max_age_s": 604800,
        "tiers": {"normal": {"name": _name("normal"), "rank": 1, "discount_percent": 0, "points_multiplier_percent": 100},
                  "gold": {"name": _name("gold"), "rank": 2, "discount_percent": draw(st.integers(0, 30)),
                           "points_multiplier_percent": draw(st.integers(0, 300))}},
        "card_types": {"personal": {"name": _name("p"), "kind": "personal", "earns_points": True,
                                    "stored_value": True, "discount_percent": draw(st.integers(0, 20))}},
        "discount_excluded_categories": ["tobacco"], "discount_excluded_skus": [],
        "earning": {"points_per_yuan": draw(st.integers(0, 5)), "min_spend_fen": draw(st.sampled_from([0, 0, 5000])),
                    "excluded_categories": ["tobacco"], "excluded_skus": [],
                    "category_multipliers_percent": {"fresh": draw(st.integers(0, 300))},
                    "sku_multipliers_percent": {"B": draw(st.integers(0, 300))},
                    "member_days": [{"weekdays": [3], "month_days": [], "multiplier_percent": draw(st.integers(100, 300))}],
                    "birthday": {"period": "month", "multiplier_percent": 200}},
        "promotions": draw(st.dictionaries(st.from_regex(r"p[0-9]{1,2}", fullmatch=True), promotion(groups),
                                  min_size=1, max_size=12)),
        "redemption": {"points_per_yuan": draw(st.sampled_from([1, 10, 100, 100, 200])),
                       "min_points": draw(st.integers(0, 500)), "max_share_percent": draw(st.integers(0, 100)),
                       "step_points": draw(st.sampled_from([1, 10, 100])),
                       "offline_max_points_per_tx": draw(st.integers(0, 20000)),
                       "offline_max_points_per_day": draw(st.integers(5000, 40000))},
        "stored_value": {"offline_max_per_tx_fen": draw(st.integers(0, 60000)),
                         "offline_max_per_day_fen": draw(st.integers(5000, 100000)), "max_sync_age_s": 86400,
                         "topup_packages": {}},
        "packages": {}, "fees": {},
        "coupons": {"K1": {"member_id": "M1", "value_fen": draw(st.integers(0, 5000)), "min_spend_fen": 0},
                    "K2": {"member_id": "M1", "percent": draw(st.integers(0, 100)), "min_spend_fen": 0,
                           "categories": ["dairy"]}},
    }


line_st = st.builds(lambda sku, qty, price: {"sku": sku, "name": sku, "category": SKUS[sku], "qty": qty,
                                               "unit_price": price},
                    st.sampled_from(sorted(SKUS)), st.integers(1, 6), st.integers(0, 20000))
member_st = st.builds(
    lambda anon, tier, pts, bal, used_pts, used_sv, uses, limited: None if anon else {
        "member_id": "M1", "card_no": "880000000013", "tier": tier, "card_type": "personal",
        "birthday": "11-03", "birthday_calendar": "solar", "points_available": pts, "balance_available_fen": bal,
        "coupons": ["K1", "K2"], "limited": limited,
        "today": {"points_redeemed": used_pts, "stored_value_paid_fen": used_sv, "promotion_uses": uses}},
    st.sampled_from([False, False, False, False, True]), st.sampled_from(["normal", "gold"]), st.integers(0, 50000),
    st.integers(0, 100000), st.integers(0, 5000), st.integers(0, 20000),
    st.dictionaries(st.from_regex(r"p[0-9]", fullmatch=True), st.integers(0, 3), max_size=3),
    st.sampled_from([False, False, False, False, False, True]))
when_st = st.builds(lambda d, m: datetime(2026, 11, 23, tzinfo=TZ) + timedelta(days=d, minutes=m),
                    st.integers(0, 6), st.integers(0, 1439))
tender_st = st.fixed_dictionaries({"points": st.integers(0, 30000), "stored_value_fen": st.integers(0, 80000),
                                   "coupons": st.lists(st.sampled_from(["K1", "K2"]), max_size=2, unique=True)})


def _check_sale(q, member, pol):
    lines, rec = q["lines"], q["record"]
    for l in lines:
        assert all(type(l[k]) is int for k in ("amount", "discount", "net", "redeemed_fen", "stored_value_fen",
                                               "cash_fen", "points_redeemed", "points_earned"))
        assert all(d["fen"] > 0 for d in l["discounts"])                     # every discount is a saving
        assert l["amount"] == sum(d["fen"] for d in l["discounts"]) + l["net"]
        assert l["net"] >= 0 and min(l["redeemed_fen"], l["stored_value_fen"], l["cash_fen"]) >= 0
        assert l["net"] == l["redeemed_fen"] + l["stored_value_fen"] + l["cash_fen"]
        assert l["points_earned"] >= 0 and l["points_redeemed"] >= 0
    assert q["total"] >= 0 and q["total"] == sum(l["net"] for l in lines) == q["subtotal"] - q["discount"]
    t = q["tender"]
    assert t["cash_fen"] >= 0 and t["cash_fen"] == q["total"] - t["points_fen"] - t["stored_value_fen"]
    # allocations add up exactly
    by_source = {}
    for l in lines:
        for d in l["discounts"]:
            by_source[d["source"]] = by_source.get(d["source"], 0) + d["fen"]
    assert by_source == {p["source"]: p["fen"] for p in q["promotions"]}
    assert sum(l["redeemed_fen"] for l in lines) == t["points_fen"]
    assert sum(l["points_redeemed"] for l in lines) == t["points"]
    assert sum(l["stored_value_fen"] for l in lines) == t["stored_value_fen"]
    assert sum(l["points_earned"] for l in lines) == q["points"]["earned"] == rec["totals"]["points_earned"]
    assert sum(b["points"] for b in q["points"]["breakdown"]) == q["points"]["earned"]
    if member is None:
        assert q["points"]["earned"] == 0 and t["points"] == t["stored_value_fen"] == 0
    d = rec["deltas"]
    assert d["points"] == q["points"]["earned"] - t["points"] and d["stored_value_fen"] == -t["stored_value_fen"]


def _check_limits(q, member, pol, rules_age_s):
    """Offline limits are never exceeded by a tender that was accepted."""
    t = q["tender"]
    red, sv = pol["redemption"], pol["stored_value"]
    today = (member or {}).get("today", {})
    if t["points"]:
        assert not member["limited"] and rules_age_s <= pol["max_age_s"]
        assert t["points"] <= member["points_available"]
        assert t["points"] <= red["offline_max_points_per_tx"]
        assert t["points"] + today["points_redeemed"] <= red["offline_max_points_per_day"]
        assert t["points"] >= red["min_points"] and t["points"] % red["step_points"] == 0
        assert t["points_fen"] * 100 <= q["total"] * red["max_share_percent"]
        assert t["points_fen"] == t["points"] * 100 // red["points_per_yuan"]
    if t["stored_value_fen"]:
        assert not member["limited"] and rules_age_s <= sv["max_sync_age_s"]
        assert t["stored_value_fen"] <= member["balance_available_fen"]
        assert t["stored_value_fen"] <= sv["offline_max_per_tx_fen"]
        assert t["stored_value_fen"] + today["stored_value_paid_fen"] <= sv["offline_max_per_day_fen"]
    if t["coupons"]:
        assert not member["limited"] and rules_age_s <= pol["max_age_s"]


def _near(data, offered, step=1):
    """A tender amount at, just over, under, or anywhere around what is offered."""
    return data.draw(st.sampled_from([0, 0, offered, offered, offered + step, offered // 2 // step * step])
                     | st.integers(0, 2 * offered + 100), label="amount")


@SETTINGS
@given(policy(), st.lists(line_st, min_size=1, max_size=10), member_st, when_st,
       st.sampled_from(["S001", "S002"]), st.sampled_from([0, 3600, 90000]), st.data())
def test_quote_invariants_and_limits(pol, lines, member, now, store, age, data):
    kw = dict(store=store, region="east", rules_age_s=age)
    q0 = pricing.quote(lines, member, pol, now, **kw)
    _check_sale(q0, member, pol)
    tender = {"points": _near(data, q0["available"]["points"]["max_points"], pol["redemption"]["step_points"]),
              "stored_value_fen": _near(data, q0["available"]["stored_value"]["max_fen"]),
              "coupons": data.draw(st.sampled_from([[], []]) | st.lists(st.sampled_from(["K1", "K2"]), max_size=2,
                                                                           unique=True))}
    if member is None:
        tender = None
    try:
        q = pricing.quote(lines, member, pol, now, tender=tender, **kw)
    except TenderError as e:
        assert e.field.startswith("tender") and e.text["zh-CN"] and e.text["en"]
        assert str(e).startswith(e.field + ": ")
        return
    _check_sale(q, member, pol)
    _check_limits(q, member, pol, age)
    # deterministic, whatever order the promotions come in
    again = dict(reversed(list(pol["promotions"].items())))
    assert pricing.quote(lines, member, {**pol, "promotions": again}, now, tender=tender, **kw) == q


@SETTINGS
@given(policy(), st.lists(line_st, min_size=1, max_size=10), member_st, when_st)
def test_offered_maximum_is_accepted(pol, lines, member, now):
    """What the quote offers as redeemable / payable is itself an acceptable tender."""
    q = pricing.quote(lines, member, pol, now, store="S001", rules_age_s=60)
    pts = q["available"]["points"]["max_points"]
    q2 = pricing.quote(lines, member, pol, now, store="S001", rules_age_s=60, tender={"points": pts})
    sv = q2["available"]["stored_value"]["max_fen"]
    q3 = pricing.quote(lines, member, pol, now, store="S001", rules_age_s=60,
                       tender={"points": pts, "stored_value_fen": sv})
    _check_sale(q3, member, pol)
    _check_limits(q3, member, pol, 60)


@st.composite
def sale_and_returns(draw):
    pol = draw(policy())
    member = draw(member_st.filter(lambda m: m is not None))
    member = {**member, "limited": False}
    lines = draw(st.lists(line_st, min_size=1, max_size=8))
    now = draw(when_st)
    q = pricing.quote(lines, member, pol, now, store="S001")
    avail_p = q["available"]["points"]["max_points"]
    pts = draw(st.integers(0, avail_p)) if avail_p else 0
    step = pol["redemption"]["step_points"]
    pts = pts // step * step
    if pts < pol["redemption"]["min_points"]:
        pts = 0
    q = pricing.quote(lines, member, pol, now, store="S001", tender={"points": pts})
    sv_max = q["available"]["stored_value"]["max_fen"]
    sv = draw(st.integers(0, sv_max))
    sale = pricing.quote(lines, member, pol, now, store="S001", tender={"points": pts, "stored_value_fen": sv})
    # Split every line's quantity into random chunks, then into returns of random lines.
    chunks = []
    for i, l in enumerate(lines):
        left = l["qty"]
        while left:
            c = draw(st.integers(1, left))
            chunks.append({"line": i, "qty": c})
            left -= c
    order = draw(st.permutations(chunks))
    returns, cur = [], []
    for c in order:
        cur.append(c)
        if draw(st.booleans()):
            returns.append(cur)
            cur = []
    if cur:
        returns.append(cur)
    return pol, member, sale, returns


@SETTINGS
@given(sale_and_returns())
def test_full_return_in_any_partial_returns_restores_points_and_balance(case):
    pol, member, sale, returns = case
    rec = sale["record"]
    done = []
    for rl in returns:
        r = pricing.return_quote(rec, rl, [d["record"] for d in done], pol, datetime(2026, 12, 1, tzinfo=TZ))
        for l in r["lines"]:
            assert all(l[k] >= 0 for k in ("cash_fen", "stored_value_fen", "redeemed_fen", "points_redeemed",
                                           "points_earned", "discount", "refund_fen"))
        done.append(r)
    points = member["points_available"] + rec["deltas"]["points"] + sum(r["deltas"]["points"] for r in done)
    balance = member["balance_available_fen"] + rec["deltas"]["stored_value_fen"] + \
        sum(r["deltas"]["stored_value_fen"] for r in done)
    assert (points, balance) == (member["points_available"], member["balance_available_fen"])
    assert sum(r["totals"]["cash_fen"] for r in done) == rec["totals"]["cash_fen"]
    assert sum(r["totals"]["refund_fen"] for r in done) == rec["totals"]["total"]
    assert sum(r["totals"]["discount"] for r in done) == rec["totals"]["discount"]
    # nothing is left to return
    for i, l in enumerate(rec["lines"]):
        try:
            pricing.return_quote(rec, [{"line": i, "qty": 1}], [d["record"] for d in done], pol, datetime.now(TZ))
        except pricing.ReturnError as e:
            assert e.code == "return_qty_exceeds"
        else:
            raise AssertionError("returned more than was sold")


@SETTINGS
@given(policy(groups=("", "g1", "g2", "g3")), st.lists(line_st, min_size=1, max_size=10), member_st, when_st)
def test_best_for_customer_among_exclusive_promotions(pol, lines, member, now):
    """Each exclusive group's pick saves the most (then earns the most bonus, then has the
    smallest id) among its candidates, each evaluated by a full pipeline run over the
    promotions decided before it: the incremental evaluation is exact."""
    checked = pricing.check_lines(lines)
    pr = Pricer(checked, member, pol, store="S001", region="east", now_min=now.strftime("%Y-%m-%dT%H:%M"),
                weekday=now.isoweekday())
    chosen = exclusive.choose(pr)
    groups = {}
    for p in pr.promos:
        if p.group:
            groups.setdefault(p.group, []).append(p)
    assume(groups)
    plain = [p for p in pr.promos if not p.group]
    for k, g in enumerate(sorted(groups)):
        base = plain + chosen[:k]
        scores = {c.id: pr.saving(base + [c]) for c in groups[g]}
        best = max(scores.values())
        assert scores[chosen[k].id] == best
        assert chosen[k].id == min(cid for cid, s in scores.items() if s == best)
    assert chosen == exclusive.choose_reference(pr)
    # and the quote's own total is that of a full run with the picks
    saving, _ = pr.saving(plain + chosen)
    q = pricing.quote(lines, member, pol, now, store="S001", region="east")
    assert sum(pr.start) - saving == q["total"]


@SETTINGS
@given(st.lists(st.integers(0, 10**7), min_size=1, max_size=20), st.integers(0, 10**8))
def test_allocation_sums_exactly_and_never_exceeds_a_line(weights, total):
    from gateway.core.money import allocate
    shares = allocate(total, weights)
    assert sum(shares) == min(total, sum(weights))
    assert all(0 <= s <= w for s, w in zip(shares, weights))
    if sum(weights):  # points are split whole, even beyond the weights
        assert sum(allocate(total, weights, capped=False)) == total


def test_bench_workload_is_priced_consistently():
    """The benchmark's 50 lines x 200 promotions: invariants, exact group picks, deterministic."""
    from bench.quote_workload import MEMBER, NOW, TENDER, bench_basket, bench_policy
    pol, basket = bench_policy(), bench_basket()
    q = pricing.quote(basket, MEMBER, pol, NOW, store="S001", region="east", tender=TENDER, rules_age_s=600)
    _check_sale(q, MEMBER, pol)
    _check_limits(q, {"limited": False, **MEMBER, "today": {"points_redeemed": 0, "stored_value_paid_fen": 0}},
                  pol, 600)
    assert (q["tender"]["points"], q["tender"]["stored_value_fen"]) == (2000, 10000)
    assert q == pricing.quote(basket, MEMBER, pol, NOW, store="S001", region="east", tender=TENDER,
                              rules_age_s=600)
    pr = Pricer(pricing.check_lines(basket), MEMBER, pol, store="S001", region="east",
                now_min=NOW.strftime("%Y-%m-%dT%H:%M"), weekday=NOW.isoweekday())
    chosen = exclusive.choose(pr)
    assert chosen == exclusive.choose_reference(pr)
    plain = [p for p in pr.promos if not p.group]
    groups = sorted({p.group for p in pr.promos if p.group})
    assert len(groups) == 5
    for k, g in enumerate(groups):
        scores = {c.id: pr.saving(plain + chosen[:k] + [c]) for c in pr.promos if c.group == g}
        assert scores[chosen[k].id] == max(scores.values())


def _candidate_matches_full_runs(pr: Pricer) -> int:
    """Every candidate's incremental (saving, bonus), and the base it builds
    for the next group, equal those of full runs (the reference's).
    -> candidates checked."""
    plain = [p for p in pr.promos if not p.group]
    active = sorted(plain, key=lambda p: p.key)
    checked = 0
    for g in sorted({p.group for p in pr.promos if p.group}):
        base = exclusive.Base(pr, active)
        for c in (p for p in pr.promos if p.group == g):
            assert base.score(c) == pr.saving(active + [c])
            with_c = base.plus(c)
            fresh = exclusive.Base(pr, sorted(active + [c], key=lambda p: p.key))
            assert (with_c.active, with_c.snaps, with_c.final, with_c.bonus) == \
                (fresh.active, fresh.snaps, fresh.final, fresh.bonus)
            _, final, snaps_from_c = base.with_candidate(c, keep=True)
            before_c = len(base.active) + 1 - len(snaps_from_c)
            assert (final, base.snaps[:before_c] + snaps_from_c) == (fresh.final, fresh.snaps)
            checked += 1
        best = max((p for p in pr.promos if p.group == g), key=lambda p: pr.saving(active + [p]))
        active = sorted(active + [best], key=lambda p: p.key)
    return checked


@SETTINGS
@given(policy(groups=("", "g1", "g2", "g3")), st.lists(line_st, min_size=1, max_size=10), member_st, when_st)
def test_each_candidate_is_evaluated_exactly(pol, lines, member, now):
    """The incremental evaluation of every candidate (in both of its modes: tracking
    the lines that differ, and carrying every line once most differ) equals a full
    run, and so does the base it rebuilds for the next group."""
    pr = Pricer(pricing.check_lines(lines), member, pol, store="S001", region="east",
                now_min=now.strftime("%Y-%m-%dT%H:%M"), weekday=now.isoweekday())
    assume(any(p.group for p in pr.promos))
    _candidate_matches_full_runs(pr)


def test_bench_candidates_are_evaluated_exactly():
    from bench.quote_workload import MEMBER, NOW, bench_basket, bench_policy
    for catalog in (60, 2000):
        pr = Pricer(pricing.check_lines(bench_basket()), MEMBER, bench_policy(catalog=catalog), store="S001",
                    region="east", now_min=NOW.strftime("%Y-%m-%dT%H:%M"), weekday=NOW.isoweekday())
        assert _candidate_matches_full_runs(pr) >= 10
