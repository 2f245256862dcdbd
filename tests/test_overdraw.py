"""One account, many lanes: concurrent spending never overdraws a balance or
passes a daily offline limit; the offline limits use the age that matters
(rules for everything, the member snapshot for stored value) and refuse with
the true reason.

The gateway runs in-process on the demo's layered rules (chain, region east,
store S001: points at most 5,000 per sale and 20,000 per day, stored value at
most 300.00 per payment and 800.00 per day, stored value only while HQ's
balances are at most 12 h old) with HQ unreachable and a fixed clock:
Wednesday 2026-11-25 15:00 in Shanghai. Sales run concurrently on six lanes,
as asyncio tasks on one loop, the way the POS API runs them.
"""

from __future__ import annotations

import asyncio
import tomllib
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from gateway.shell import config as gw_config
from gateway.core import pricing
from gateway.core.pricing import TenderError
from gateway.shell.service import Gateway
from demo.testbed import free_port
from hardware.readers import CardRead
from hq_bridge.rules import _read_doc, read_table_file
from tests.support import ROOT, install_rules
from wire.ruleset import effective_ruleset, with_defaults

EXAMPLES = ROOT / "deploy" / "examples"
T0 = datetime(2026, 11, 25, 15, 0, tzinfo=ZoneInfo("Asia/Shanghai")).timestamp()
DIAMOND = "880000000070"   # M1005: 48,200 points, 1,500.00 yuan stored value
FAMILY = "880200000011"    # 附属卡 of DIAMOND: pays from and earns to M1005's account
GOLD = "880000000013"      # M1001: 5,230 points, 200.00 yuan, car_wash10 x3
LANES = [str(n) for n in range(1, 7)]
POINTS_PER_DAY, SV_PER_DAY = 20000, 80000   # S001's effective offline limits per day


def config(tmp_path: Path) -> dict:
    return gw_config.check({
        "store": {"id": "S001", "region": "east", "data_dir": str(tmp_path / "store")},
        "mqtt": {"host": "127.0.0.1", "port": free_port()},  # nobody listens: HQ unreachable
        "lanes": [{"id": lane, "reader": "terminal"} for lane in LANES],
    })


def install(gw: Gateway, *, issued_at: float = T0 - 60, as_of: int = 0) -> None:
    docs = [_read_doc(EXAMPLES / n) for n in ("chain.toml", "region-east.toml", "store-S001.toml")]
    install_rules(gw, docs, now=issued_at, region="east", as_of=as_of,
                  members=list(read_table_file(EXAMPLES / "members.demo.jsonl")),
                  deny=list(read_table_file(EXAMPLES / "deny.demo.jsonl")))


@pytest.fixture
async def gw(tmp_path):
    async with Gateway(config(tmp_path), clock=lambda: T0) as gw:
        install(gw)
        yield gw


async def tap(gw: Gateway, card: str, lane: str = "1"):
    return await gw.handle_read(CardRead(lane, "magstripe", card, T0))


def basket(fen: int) -> list[dict]:
    return [{"sku": "HH-001", "name": "household", "category": "household", "qty": 1, "unit_price": fen}]


async def account(gw: Gateway, card: str) -> dict:
    """What the member's account holds now (a tap on a lane no test sale uses)."""
    v = await gw.handle_read(CardRead("6", "magstripe", card, T0))
    assert v.accepted, v.reason
    return {"points": v.member["points"], "balance_fen": v.member["balance_fen"], "today": v.member["today"]}


async def journal_depth(gw: Gateway) -> int:
    return (await gw.journal.backlog())["depth"]


async def concurrent_sales(gw: Gateway, cards: dict[str, str], tender: dict, tag: str, fen: int = 50000):
    """Tap ``cards`` ({lane: card}), then sell on all those lanes at once.
    Returns (accepted sales' responses, refused tenders)."""
    for lane, card in cards.items():
        assert (await tap(gw, card, lane)).accepted
    results = await asyncio.gather(*(
        gw.counter.sale(lane, {"idempotency_key": f"{tag}-lane-{lane}", "lines": basket(fen), "tender": tender})
        for lane in cards), return_exceptions=True)
    accepted, refused = [], []
    for r in results:
        if isinstance(r, TenderError):
            refused.append(r)
        elif isinstance(r, BaseException):
            raise r
        else:
            accepted.append(r.response)
    return accepted, refused


def check_round(before: dict, after: dict, accepted: list[dict], refused: list[TenderError], tender: dict) -> None:
    """Nothing overdrawn, every accepted sale counted, every refusal real."""
    for sale in accepted:   # each sale priced against the balance as it stood when it committed
        assert sale["balances_after"]["points"] >= 0 and sale["balances_after"]["stored_value_fen"] >= 0, sale
        assert sale["tender"]["points"] == tender.get("points", 0)
        assert sale["tender"]["stored_value_fen"] == tender.get("stored_value_fen", 0)
    redeemed = sum(s["tender"]["points"] for s in accepted)
    paid = sum(s["tender"]["stored_value_fen"] for s in accepted)
    earned = sum(s["points_earned"] for s in accepted)
    # No lost update: the account moved by exactly the accepted sales.
    assert after["points"] == before["points"] - redeemed + earned
    assert after["balance_fen"] == before["balance_fen"] - paid
    assert after["today"]["points_redeemed"] == before["today"]["points_redeemed"] + redeemed
    assert after["today"]["stored_value_paid_fen"] == before["today"]["stored_value_paid_fen"] + paid
    # Nothing beyond the balance or the day's offline allowance.
    assert after["points"] >= 0 and after["balance_fen"] >= 0
    assert after["today"]["points_redeemed"] <= POINTS_PER_DAY
    assert after["today"]["stored_value_paid_fen"] <= SV_PER_DAY
    # And the limits are met exactly: a sale was refused only if it did not fit
    # (what is left only shrinks during a round, so it did not fit at the end either).
    points_left = min(after["points"], POINTS_PER_DAY - after["today"]["points_redeemed"])
    sv_left = min(after["balance_fen"], SV_PER_DAY - after["today"]["stored_value_paid_fen"])
    for e in refused:
        if e.field == "tender.points":
            assert tender["points"] > points_left, (e.code, points_left)
        else:
            assert e.field == "tender.stored_value_fen", e
            assert tender["stored_value_fen"] > sv_left, (e.code, sv_left)


def serial_fits(before: dict, tender: dict, earned: int, lanes: int) -> int:
    """How many of ``lanes`` equal sales fit one after another."""
    points, balance = before["points"], before["balance_fen"]
    redeemed, paid = before["today"]["points_redeemed"], before["today"]["stored_value_paid_fen"]
    asked_pts, asked_sv = tender.get("points", 0), tender.get("stored_value_fen", 0)
    n = 0
    while n < lanes and asked_pts <= min(points, POINTS_PER_DAY - redeemed) and \
            asked_sv <= min(balance, SV_PER_DAY - paid):
        points, balance = points - asked_pts + earned, balance - asked_sv
        redeemed, paid, n = redeemed + asked_pts, paid + asked_sv, n + 1
    return n


async def test_concurrent_sales_on_one_card_never_overdraw_the_balance(gw):
    # GOLD holds 5,230 points and 200.00: of four sales paying 1,500 points and
    # 60.00 each, three fit; top-ups between rounds bring the balance back
    # until the points run out.
    tender = {"points": 1500, "stored_value_fen": 6000}
    await tap(gw, GOLD)
    earned = gw.counter.quote("1", {"lines": basket(20000), "tender": tender})["points"]["earned"]
    fitted = []
    for rnd in range(4):
        before = await account(gw, GOLD)
        accepted, refused = await concurrent_sales(gw, {lane: GOLD for lane in LANES[:4]}, tender, f"gold-{rnd}",
                                                   fen=20000)
        after = await account(gw, GOLD)
        check_round(before, after, accepted, refused, tender)
        assert len(accepted) == serial_fits(before, tender, earned, 4), (rnd, before, after, refused)
        fitted.append(len(accepted))
        await tap(gw, GOLD)
        await gw.counter.topup("1", {"idempotency_key": f"gold-topup-{rnd}", "amount_fen": 20000,
                                     "payment": {"method": "cash"}})
    assert fitted[0] == 3 and fitted[-1] < 4 and sum(fitted) > 3


async def test_primary_and_linked_cards_never_pass_the_daily_limits_together(gw):
    # M1005's account through DIAMOND on lanes 1-3 and its 附属卡 on lanes 4-6, all at once.
    cards = {lane: DIAMOND if int(lane) <= 3 else FAMILY for lane in LANES}
    rounds = [
        ({"points": 2000, "stored_value_fen": 10000}, 6),   # 12,000 points, 600.00: all fit
        ({"points": 2000, "stored_value_fen": 6000}, 3),    # 200.00 left today: three fit
        ({"points": 500}, 4),                               # 2,000 points left today: four fit
        ({"stored_value_fen": 1000}, 2),                    # 20.00 left today: two fit
        ({"points": 500, "stored_value_fen": 1000}, 0),     # the day's allowance is used up
    ]
    for rnd, (tender, fits) in enumerate(rounds):
        before = await account(gw, DIAMOND)
        accepted, refused = await concurrent_sales(gw, cards, tender, f"m1005-{rnd}")
        after = await account(gw, DIAMOND)
        check_round(before, after, accepted, refused, tender)
        assert len(accepted) == fits, (rnd, before, after, [e.code for e in refused])
        assert await account(gw, FAMILY) == after        # one account, whichever card shows it
    assert (after["today"]["points_redeemed"], after["today"]["stored_value_paid_fen"]) == (POINTS_PER_DAY, SV_PER_DAY)


async def test_concurrent_package_uses_never_go_below_zero(gw):
    for lane in LANES[:3]:
        await tap(gw, GOLD, lane)
    results = await asyncio.gather(*(
        gw.counter.use_package(lane, "car_wash10", {"idempotency_key": f"pkg-{lane}-0001", "uses": 2})
        for lane in LANES[:3]), return_exceptions=True)
    used = [r for r in results if not isinstance(r, BaseException)]
    assert len(used) == 1 and used[0].response["record"]["remaining_after"] == 1
    assert all(getattr(r, "code", None) == "package_insufficient" for r in results if r not in used)
    assert (await tap(gw, GOLD)).member["packages"]["car_wash10"] == 1


async def test_a_sale_whose_local_write_is_held_still_counts_for_the_lane_waiting(gw, monkeypatch):
    """The local deltas of a durable sale may fail to write (disk full) and
    be held for retry: the lane waiting on the account applies them before it
    reads the balance, so it cannot spend the same money."""
    members = gw.rules.members
    real, calls = members.record_deltas, {"n": 0}

    def flaky(*args):
        calls["n"] += 1
        if calls["n"] == 1:
            raise OSError(28, "No space left on device")
        return real(*args)

    monkeypatch.setattr(members, "record_deltas", flaky)
    tender = {"stored_value_fen": 15000}          # GOLD holds 200.00: one fits, not two
    before = await account(gw, GOLD)
    accepted, refused = await concurrent_sales(gw, {"1": GOLD, "2": GOLD}, tender, "held", fen=20000)
    after = await account(gw, GOLD)
    assert [e.code for e in refused] == ["stored_value_insufficient"]
    check_round(before, after, accepted, refused, tender)
    assert after["balance_fen"] == 5000
    assert calls["n"] == 2 and not gw.counter.faults            # held once, then written


# -- the age that matters ------------------------------------------------------

async def test_a_days_old_member_snapshot_refuses_stored_value_even_with_fresh_rules(tmp_path):
    async with Gateway(config(tmp_path), clock=lambda: T0) as gw:
        install(gw, as_of=int(T0) - 3 * 86400)       # rules a minute old, balances three days old
        v = await tap(gw, DIAMOND)
        assert v.member["allowed"]["stored_value"] is False and "sync_stale" in v.member["limits"]
        q = gw.counter.quote("1", {"lines": basket(50000)})
        sv = q["available"]["stored_value"]
        assert (sv["reason"], sv["max_fen"], sv["age_s"], sv["limit_s"]) == ("sync_stale", 0, 3 * 86400, 43200)
        depth = await journal_depth(gw)
        with pytest.raises(TenderError) as refused:
            await gw.counter.sale("1", {"idempotency_key": "stale-sv-01", "lines": basket(50000),
                                        "tender": {"stored_value_fen": 10000}})
        assert (refused.value.code, refused.value.field) == ("sync_stale", "tender.stored_value_fen")
        assert refused.value.text == {
            "zh-CN": "会员余额已259200秒未与总部同步（上限43200秒），暂不能储值支付",
            "en": "The member balances were last synced with HQ 259200 s ago (limit 43200 s): "
                  "stored-value payment refused"}
        assert await journal_depth(gw) == depth                  # nothing written
        assert (await account(gw, DIAMOND))["balance_fen"] == 150000
        # What the rules allow on an old snapshot still goes: redemption, up to max_age_s.
        await tap(gw, DIAMOND)
        sale = await gw.counter.sale("1", {"idempotency_key": "stale-pts-01", "lines": basket(50000),
                                           "tender": {"points": 1000}})
        assert sale.response["tender"]["points"] == 1000


async def test_stale_rules_are_the_reason_the_cashier_sees(tmp_path):
    async with Gateway(config(tmp_path), clock=lambda: T0) as gw:
        install(gw, issued_at=T0 - 8 * 86400)       # past max_age_s (a week)
        v = await tap(gw, DIAMOND)
        assert (v.verdict, v.reason) == ("accept_limited", "rules_stale")
        assert v.public()["text"]["en"].startswith("Card accepted; the store's member rules are out of date")
        q = gw.counter.quote("1", {"lines": basket(50000)})
        assert q["member"]["reason"] == "rules_stale"
        assert q["available"]["points"]["reason"] == q["available"]["stored_value"]["reason"] == "rules_stale"
        depth = await journal_depth(gw)
        for tender, field, what in [({"stored_value_fen": 1000}, "tender.stored_value_fen", "stored-value payment"),
                                    ({"points": 1000}, "tender.points", "points redemption"),
                                    ({"coupons": ["C2026-0001"]}, "tender.coupons", "coupon use")]:
            await tap(gw, DIAMOND)
            with pytest.raises(TenderError) as refused:
                await gw.counter.sale("1", {"idempotency_key": f"stale-{field}", "lines": basket(50000),
                                            "tender": tender})
            assert (refused.value.code, refused.value.field) == ("rules_stale", field)
            assert refused.value.text["en"] == (f"The store's rules are too old (691200 s, limit 604800 s): "
                                                f"{what} refused")
            assert refused.value.text["zh-CN"].startswith("门店规则已过期（691200秒，上限604800秒）")
        assert await journal_depth(gw) == depth
        # Identification and accrual go on.
        await tap(gw, DIAMOND)
        sale = await gw.counter.sale("1", {"idempotency_key": "stale-cash-1", "lines": basket(50000)})
        assert sale.response["points_earned"] > 0


# -- the same precedence in the pure pricing core -------------------------------

def _policy() -> dict:
    layers = [tomllib.loads((EXAMPLES / f"{n}.toml").read_text()) for n in ("chain", "region-east", "store-S001")]
    return with_defaults(effective_ruleset(layers, store="S001", region="east"))


M1005 = {"member_id": "M1005", "account_id": "M1005", "card_no": DIAMOND, "tier": "diamond",
         "card_type": "personal", "points_available": 48200, "balance_available_fen": 150000,
         "coupons": [], "today": {}, "limited": False}
NOW = datetime.fromtimestamp(T0, ZoneInfo("Asia/Shanghai"))


@pytest.mark.parametrize("limited", [False, True])
def test_pricing_names_stale_rules_before_a_limited_member(limited):
    member, policy = {**M1005, "limited": limited}, _policy()
    q = pricing.quote(basket(50000), member, policy, NOW, store="S001", rules_age_s=604801, sync_age_s=604801)
    assert q["available"]["points"]["reason"] == q["available"]["stored_value"]["reason"] == "rules_stale"
    for tender, field in [({"points": 1000}, "tender.points"), ({"stored_value_fen": 1000}, "tender.stored_value_fen"),
                         ({"coupons": ["C2026-0001"]}, "tender.coupons")]:
        with pytest.raises(TenderError) as e:
            pricing.quote(basket(50000), member, policy, NOW, store="S001", tender=tender,
                          rules_age_s=604801, sync_age_s=604801)
        assert (e.value.code, e.value.field, e.value.params["limit_s"]) == ("rules_stale", field, 604800)
    # Fresh rules: a limited member is refused as limited.
    q = pricing.quote(basket(50000), member, policy, NOW, store="S001", rules_age_s=60, sync_age_s=60)
    assert q["available"]["stored_value"]["reason"] == ("member_limited" if limited else None)


def test_pricing_refuses_only_stored_value_on_old_balances():
    policy = _policy()
    kw = dict(store="S001", rules_age_s=60, sync_age_s=43201)   # S001: max_sync_age_s 12 h
    q = pricing.quote(basket(50000), M1005, policy, NOW, **kw)
    assert q["available"]["stored_value"]["reason"] == "sync_stale"
    assert q["available"]["points"]["max_points"] == 5000                  # redemption: up to max_age_s
    with pytest.raises(TenderError) as e:
        pricing.quote(basket(50000), M1005, policy, NOW, tender={"stored_value_fen": 100}, **kw)
    assert (e.value.code, e.value.params["age_s"], e.value.params["limit_s"]) == ("sync_stale", 43201, 43200)
    # Rules themselves past the sync limit: that is the reason (as before, with the rules' age only).
    with pytest.raises(TenderError) as e:
        pricing.quote(basket(50000), M1005, policy, NOW, store="S001", tender={"stored_value_fen": 100},
                      rules_age_s=43201)
    assert (e.value.code, e.value.params["limit_s"]) == ("rules_stale", 43200)
