"""Count packages (计次卡) sold and renewed, and points for gifts (礼品兑换), at
the counter through the POS API (gateway/shell/counter.py, gateway/core/
packages.py and gifts.py): priced and bounded by the rules, journaled as
``package_sale`` / ``gift_redemption`` records, in the member's view at
once; then applied at HQ, whose account equals the store's view once the
records are acked and a new snapshot comes back.

The demo rules (chain, region east, store S001) with HQ unreachable and the
clock at Wednesday 2026-11-25 15:00 in Shanghai, as tests/test_counter.py;
the chain layer gains what v3 adds here: car_wash10 valid 12 months and
payable from stored value, coffee20 not renewable, and a gift catalogue.
"""

from __future__ import annotations

import copy
import json
from datetime import datetime, timezone

import pytest

from gateway.shell.service import Gateway
from hq_bridge.accounts import AccountStore, audit, import_members, snapshot_rows
from hq_bridge import db, migrations
from hq_bridge.rules import _read_doc, read_table_file
from tests.support import api_client, install_rules
from tests.test_counter import DIAMOND, EXAMPLES, GOLD, T0, config, tap

GIFTS = {
    "umbrella": {"name": {"zh-CN": "雨伞", "en": "Umbrella"}, "points": 2000, "per_member_day_limit": 1},
    "mug": {"name": {"zh-CN": "马克杯", "en": "Mug"}, "points": 800},
    "calendar": {"name": {"zh-CN": "台历", "en": "Desk calendar"}, "points": 100, "from": "2026-12-01"},
}


def layers() -> list[dict]:
    docs = [_read_doc(EXAMPLES / n) for n in ("chain.toml", "region-east.toml", "store-S001.toml")]
    chain = copy.deepcopy(docs[0])
    chain["packages"]["car_wash10"].update(validity_months=12, stored_value=True)
    chain["packages"]["coffee20"]["renewable"] = False
    chain["gifts"] = GIFTS
    return [chain, *docs[1:]]


def members() -> list[dict]:
    return list(read_table_file(EXAMPLES / "members.demo.jsonl"))


def install(gw: Gateway, **kw) -> None:
    install_rules(gw, layers(), now=T0 - 60, region="east", members=kw.pop("members", members()),
                  deny=list(read_table_file(EXAMPLES / "deny.demo.jsonl")), **kw)


@pytest.fixture
async def gw(tmp_path):
    async with Gateway(config(tmp_path), clock=lambda: T0) as gw:
        install(gw)
        yield gw


async def depth(gw: Gateway) -> int:
    return (await gw.journal.backlog())["depth"]


async def view(gw: Gateway, card: str) -> dict:
    v = await tap(gw, card)
    assert v.accepted, v.reason
    return v.member


def sale_of(package_id: str, key: str, method: str = "cash") -> dict:
    return {"idempotency_key": key, "package_id": package_id, "payment": {"method": method}}


# ---------------------------------------------------------------- hostile input first: 4xx naming the field, nothing written

HOSTILE = [
    ("/lanes/1/packages", {"idempotency_key": "pkg-bad-0001", "package_id": "gold_bar",
                           "payment": {"method": "cash"}}, 422, "package_not_sold", "package_id"),
    ("/lanes/1/packages", {"idempotency_key": "pkg-bad-0002", "package_id": "car_wash10",
                           "payment": {"method": "cash"}, "uses": 1000}, 400, "bad_request", "uses"),
    ("/lanes/1/packages", {"idempotency_key": "pkg-bad-0003", "package_id": "car_wash10",
                           "payment": {"method": "iou"}}, 400, "bad_request", "payment.method"),
    ("/lanes/1/packages", {"idempotency_key": "pkg-bad-0004", "package_id": "car wash",
                           "payment": {"method": "cash"}}, 400, "bad_request", "package_id"),
    ("/lanes/1/packages", {"idempotency_key": "pkg-bad-0005", "package_id": "car_wash10",
                           "payment": {"method": "cash"}, "price_fen": 1}, 400, "bad_request", "price_fen"),
    ("/lanes/1/packages", {"idempotency_key": "pkg-bad-0006", "package_id": "car_wash10"}, 400, "bad_request",
     "payment"),
    ("/lanes/1/gifts", {"idempotency_key": "gift-bad-001", "gift_id": "yacht"}, 422, "gift_unknown", "gift_id"),
    ("/lanes/1/gifts", {"idempotency_key": "gift-bad-002", "gift_id": "mug", "qty": -1}, 400, "gift_invalid", "qty"),
    ("/lanes/1/gifts", {"idempotency_key": "gift-bad-003", "gift_id": "mug", "qty": 10**12}, 400, "gift_invalid",
     "qty"),
    ("/lanes/1/gifts", {"idempotency_key": "gift-bad-004", "gift_id": "mug", "qty": 1.5}, 400, "gift_invalid",
     "qty"),
    ("/lanes/1/gifts", {"idempotency_key": "gift-bad-005", "gift_id": "mug", "points": 1}, 400, "bad_request",
     "points"),
    ("/lanes/1/gifts", {"idempotency_key": "gift-bad-006", "gift_id": "mug", "qty": 100}, 400, "gift_invalid", "qty"),
    ("/lanes/1/gifts", {"idempotency_key": "gift-bad-007", "gift_id": "calendar"}, 422, "gift_not_offered",
     "gift_id"),                                          # on offer from 2026-12-01
    ("/lanes/1/gifts", {"idempotency_key": "gift-bad-008", "gift_id": "mug", "qty": 7}, 422, "points_insufficient",
     "gift_id"),                                          # 5,600 points, GOLD holds 5,230
]


@pytest.mark.parametrize("path,body,status,code,field", HOSTILE, ids=[h[1]["idempotency_key"] for h in HOSTILE])
async def test_bad_requests_are_refused_naming_the_field_and_write_nothing(gw, path, body, status, code, field):
    client = api_client(gw)
    before = await depth(gw)
    m0 = await view(gw, GOLD)
    res = await client.post(path, body=body)
    assert res.status_code == status, res.json
    assert (res.json["error"]["code"], res.json["error"]["field"]) == (code, field), res.json
    assert res.json["error"]["text"]["zh-CN"] and res.json["error"]["text"]["en"]
    assert await depth(gw) == before
    m1 = await view(gw, GOLD)
    assert (m1["points"], m1["balance_fen"], m1["packages"]) == (m0["points"], m0["balance_fen"], m0["packages"])


async def test_a_lane_terminal_may_not_sell_packages_or_gifts(gw):
    client = api_client(gw)
    await tap(gw, GOLD)
    for path, body in (("/lanes/1/packages", sale_of("car_wash10", "pkg-tap-0001")),
                       ("/lanes/1/gifts", {"idempotency_key": "gift-tap-001", "gift_id": "mug"})):
        res = await client.post(path, body=body, headers={"Authorization": f"Bearer {client.tokens['lane_terminal']}"})
        assert res.status_code == 403, res.json


async def test_without_a_member_on_the_lane_nothing_is_sold(gw):
    client = api_client(gw)
    res = await client.post("/lanes/2/packages", body=sale_of("car_wash10", "pkg-nomem-01"))
    assert res.status_code == 409 and res.json["error"]["code"] == "no_member", res.json
    res = await client.post("/lanes/2/gifts", body={"idempotency_key": "gift-nomem-1", "gift_id": "mug"})
    assert res.status_code == 409, res.json


# ---------------------------------------------------------------- packages

async def test_a_package_renewed_for_cash_adds_its_uses_at_once(gw):
    client = api_client(gw)
    assert (await view(gw, GOLD))["packages"]["car_wash10"] == 3
    await tap(gw, GOLD)
    res = await client.post("/lanes/1/packages", body=sale_of("car_wash10", "pkg-sale-0001"))
    assert res.status_code == 201, res.json
    rec = res.json["record"]
    assert (rec["uses"], rec["price_fen"], rec["renewal"], rec["remaining_after"]) == (10, 30000, True, 13)
    assert rec["expires"] == "2027-11-25"                 # 12 months from the sale day
    assert res.json["receipt"]["zh-CN"] == ["续费次卡洗车10次卡 10次", "应付金额  300.00", "剩余次数  13",
                                            "有效期至 2027-11-25"]
    assert res.json["receipt"]["en"][0] == "Car wash x10: renewed, 10 use(s) added"
    assert (await view(gw, GOLD))["packages"]["car_wash10"] == 13     # the member view, at once
    # a retry answers the first answer and sells nothing more
    again = await client.post("/lanes/1/packages", body=sale_of("car_wash10", "pkg-sale-0001"))
    assert again.status_code == 200 and again.json["seq"] == res.json["seq"]
    assert (await view(gw, GOLD))["packages"]["car_wash10"] == 13
    # ... and the uses can be used at once
    await tap(gw, GOLD)
    used = await client.post("/lanes/1/packages/car_wash10/uses", body={"idempotency_key": "pkg-use-0001",
                                                                         "uses": 12})
    assert used.status_code == 201 and used.json["record"]["remaining_after"] == 1


async def test_a_new_package_paid_from_stored_value_within_its_limits(gw):
    client = api_client(gw)
    m0 = await view(gw, DIAMOND)
    assert "car_wash10" not in m0["packages"]
    await tap(gw, DIAMOND)
    res = await client.post("/lanes/1/packages", body=sale_of("car_wash10", "pkg-sv-00001", "stored_value"))
    assert res.status_code == 201, res.json
    assert (res.json["record"]["renewal"], res.json["record"]["stored_value_fen"]) == (False, 30000)
    assert res.json["receipt"]["zh-CN"][0] == "购买次卡洗车10次卡 10次"
    m1 = await view(gw, DIAMOND)
    assert m1["packages"]["car_wash10"] == 10
    assert m1["balance_fen"] == m0["balance_fen"] - 30000
    # S001: 300.00 per payment, 800.00 a day: the same day's allowance as a sale's stored-value tender
    assert m1["today"]["stored_value_paid_fen"] == 30000
    # coffee20 may not be paid from stored value
    await tap(gw, GOLD)
    before = await depth(gw)
    res = await client.post("/lanes/1/packages", body=sale_of("coffee20", "pkg-sv-00002", "stored_value"))
    assert res.status_code == 422 and res.json["error"]["code"] == "package_stored_value_not_allowed"
    assert res.json["error"]["field"] == "payment.method" and await depth(gw) == before


async def test_stored_value_for_a_package_stops_at_the_offline_day_limit(gw):
    client = api_client(gw)
    await tap(gw, DIAMOND)
    sale = await gw.counter.sale("1", {"idempotency_key": "sv-sale-0001", "tender": {"stored_value_fen": 30000},
                                       "lines": [{"sku": "HH-1", "name": "x", "category": "household", "qty": 1,
                                                  "unit_price": 60000}]})
    assert sale.response["tender"]["stored_value_fen"] == 30000
    await tap(gw, DIAMOND)
    assert (await client.post("/lanes/1/packages", body=sale_of("car_wash10", "pkg-sv-lim-1", "stored_value"))
            ).status_code == 201
    await tap(gw, DIAMOND)
    before = await depth(gw)                              # 800.00 - 600.00: 200.00 left today, the package is 300.00
    res = await client.post("/lanes/1/packages", body=sale_of("car_wash10", "pkg-sv-lim-2", "stored_value"))
    assert res.status_code == 422, res.json
    assert (res.json["error"]["code"], res.json["error"]["field"]) == ("stored_value_offline_day_limit",
                                                                       "payment.method")
    assert await depth(gw) == before


async def test_a_package_not_renewable_is_sold_again_only_when_used_up(gw):
    client = api_client(gw)
    await tap(gw, DIAMOND)                                # M1005 holds coffee20 x12
    res = await client.post("/lanes/1/packages", body=sale_of("coffee20", "pkg-nr-00002"))
    assert res.status_code == 422 and res.json["error"]["code"] == "package_not_renewable", res.json
    assert "12" in res.json["error"]["text"]["zh-CN"]
    await tap(gw, DIAMOND)
    assert (await client.post("/lanes/1/packages/coffee20/uses", body={"idempotency_key": "pkg-nr-use-1",
                                                                        "uses": 12})).status_code == 201
    await tap(gw, DIAMOND)
    res = await client.post("/lanes/1/packages", body=sale_of("coffee20", "pkg-nr-00003"))
    assert res.status_code == 201 and res.json["record"]["renewal"] is False, res.json


# ---------------------------------------------------------------- gifts

async def test_a_gift_takes_its_points_at_once_and_counts_against_the_day(gw):
    client = api_client(gw)
    m0 = await view(gw, DIAMOND)
    await tap(gw, DIAMOND)
    res = await client.post("/lanes/1/gifts", body={"idempotency_key": "gift-0000001", "gift_id": "mug", "qty": 3})
    assert res.status_code == 201, res.json
    assert (res.json["record"]["points"], res.json["record"]["points_after"]) == (2400, m0["points"] - 2400)
    assert res.json["receipt"]["zh-CN"] == ["礼品兑换 马克杯 x3", "使用积分  -2400", f"积分余额  {m0['points'] - 2400}"]
    m1 = await view(gw, DIAMOND)
    assert m1["points"] == m0["points"] - 2400
    assert m1["today"]["points_redeemed"] == 2400 and m1["today"]["gifts"] == {"mug": 3}
    # S001 allows 5,000 points per transaction offline: 7 mugs (5,600) are one too many
    await tap(gw, DIAMOND)
    before = await depth(gw)
    res = await client.post("/lanes/1/gifts", body={"idempotency_key": "gift-0000002", "gift_id": "mug", "qty": 7})
    assert res.status_code == 422 and res.json["error"]["code"] == "points_offline_tx_limit", res.json
    assert res.json["error"]["field"] == "gift_id" and await depth(gw) == before


async def test_a_gift_limited_per_member_and_day(gw):
    client = api_client(gw)
    await tap(gw, DIAMOND)
    assert (await client.post("/lanes/1/gifts", body={"idempotency_key": "gift-umb-001",
                                                      "gift_id": "umbrella"})).status_code == 201
    await tap(gw, DIAMOND)
    res = await client.post("/lanes/1/gifts", body={"idempotency_key": "gift-umb-002", "gift_id": "umbrella"})
    assert res.status_code == 422 and res.json["error"]["code"] == "gift_day_limit", res.json
    assert res.json["error"]["field"] == "qty"


async def test_gifts_and_a_sales_redemption_share_the_days_offline_points(gw):
    # 20,000 points a day offline (chain), 5,000 a transaction (S001)
    client = api_client(gw)
    for i in range(3):
        await tap(gw, DIAMOND)
        sale = await gw.counter.sale("1", {"idempotency_key": f"red-sale-{i:04d}", "tender": {"points": 5000},
                                           "lines": [{"sku": "HH-1", "name": "x", "category": "household",
                                                      "qty": 1, "unit_price": 20000}]})
        assert sale.response["tender"]["points"] == 5000
    await tap(gw, DIAMOND)
    assert (await client.post("/lanes/1/gifts", body={"idempotency_key": "gift-day-001", "gift_id": "mug",
                                                      "qty": 6})).status_code == 201          # 4,800: 19,800
    await tap(gw, DIAMOND)
    res = await client.post("/lanes/1/gifts", body={"idempotency_key": "gift-day-002", "gift_id": "mug"})
    assert res.status_code == 422 and res.json["error"]["code"] == "points_offline_day_limit", res.json


# ---------------------------------------------------------------- HQ's account equals the store's view

NOW = datetime(2026, 11, 25, 7, 0, tzinfo=timezone.utc)


async def test_hq_applies_them_and_its_snapshot_gives_the_same_view(tmp_path):
    async with Gateway(config(tmp_path / "a"), clock=lambda: T0) as gw:
        install(gw)
        client = api_client(gw)
        await tap(gw, GOLD)
        assert (await client.post("/lanes/1/packages", body=sale_of("car_wash10", "e2e-pkg-0001"))).status_code == 201
        await tap(gw, DIAMOND)
        assert (await client.post("/lanes/1/packages", body=sale_of("car_wash10", "e2e-pkg-0002", "stored_value"))
                ).status_code == 201
        await tap(gw, DIAMOND)
        assert (await client.post("/lanes/1/gifts", body={"idempotency_key": "e2e-gift-001", "gift_id": "mug",
                                                          "qty": 2})).status_code == 201
        await tap(gw, GOLD)
        assert (await client.post("/lanes/1/gifts", body={"idempotency_key": "e2e-gift-002",
                                                          "gift_id": "umbrella"})).status_code == 201
        store_view = {c: await view(gw, c) for c in (GOLD, DIAMOND)}
        journaled = await gw.journal.pending(0, 100)
        assert [r.type for r in journaled] == ["package_sale", "package_sale", "gift_redemption", "gift_redemption"]

        url = f"sqlite:///{tmp_path / 'hq.db'}"
        migrations.migrate(url)
        engine = db.open_engine(url)
        try:
            accounts = AccountStore(engine, clock=NOW.timestamp)
            with engine.begin() as conn:
                import_members(conn, members(), clock=NOW.timestamp)
            with engine.begin() as conn:
                ins = db.ledger_insert(conn, "S001", journaled)
                res = accounts.apply_batch(conn, "S001", ins.new)
            assert res.applied == [1, 2, 3, 4] and res.set_aside == [] and res.problems == []
            with engine.begin() as conn:
                assert audit(conn) == []
                history = accounts.history(conn, "M1005")
                snap = snapshot_rows(conn, "S001")
                rows = list(snap)
            kinds = {h.kind: h for h in history}
            assert kinds["package_sale"].d_uses == 10 and kinds["package_sale"].detail["sv"] == 30000
            assert kinds["package_sale"].d_paid_fen + kinds["package_sale"].d_bonus_fen == -30000
            assert kinds["gift_redemption"].d_points == -1600 and kinds["gift_redemption"].detail["taken"]
        finally:
            engine.dispose()

        # The records are acked; the next rule set brings HQ's snapshot with its watermark.
        await gw.journal.mark_acked_ranges([(1, snap.watermark)])
        assert await depth(gw) == 0
        install(gw, version=2, members=rows, store_seq=snap.watermark, as_of=int(T0))
        for card in (GOLD, DIAMOND):
            hq = await view(gw, card)
            mine = store_view[card]
            assert (hq["points"], hq["balance_fen"], hq["packages"], hq["package_expires"]) == \
                (mine["points"], mine["balance_fen"], mine["packages"], mine["package_expires"]), card
        assert json.dumps(store_view[GOLD]["packages"]) == json.dumps({"car_wash10": 13})
        assert store_view[GOLD]["package_expires"] == {"car_wash10": "2027-11-25"}    # HQ's snapshot says it too


# ---------------------------------------------------------------- a package's expiry (HQ's snapshot, sales here)

def members_with(card: str, **more) -> list[dict]:
    return [{**m, **more} if m["card_no"] == card else m for m in members()]


async def test_an_expired_package_is_shown_apart_refused_by_name_and_renewed_from_today(tmp_path):
    async with Gateway(config(tmp_path), clock=lambda: T0) as gw:       # 2026-11-25
        install(gw, members=members_with(GOLD, package_expires={"car_wash10": "2026-11-24"}))
        client = api_client(gw)
        m = await view(gw, GOLD)
        assert "car_wash10" not in m["packages"]
        assert m["packages_expired"] == {"car_wash10": {"uses": 3, "expires": "2026-11-24"}}
        await tap(gw, GOLD)
        before = await depth(gw)
        res = await client.post("/lanes/1/packages/car_wash10/uses", body={"idempotency_key": "pkg-exp-use1"})
        assert res.status_code == 422, res.json
        assert (res.json["error"]["code"], res.json["error"]["field"]) == ("package_expired", "package_id")
        assert res.json["error"]["text"]["zh-CN"] == "次卡洗车10次卡已于2026-11-24到期，续费后可继续使用"
        assert await depth(gw) == before
        # renewed: 12 months from today (its expiry is past), the 3 left usable again with the 10 bought
        await tap(gw, GOLD)
        res = await client.post("/lanes/1/packages", body=sale_of("car_wash10", "pkg-exp-sale1"))
        assert res.status_code == 201, res.json
        assert (res.json["record"]["expires"], res.json["record"]["remaining_after"]) == ("2027-11-25", 13)
        m = await view(gw, GOLD)
        assert (m["packages"], m["package_expires"], m["packages_expired"]) == \
            ({"car_wash10": 13}, {"car_wash10": "2027-11-25"}, {})
        await tap(gw, GOLD)
        assert (await client.post("/lanes/1/packages/car_wash10/uses",
                                  body={"idempotency_key": "pkg-exp-use2"})).status_code == 201


async def test_a_renewal_at_the_counter_extends_from_the_snapshots_expiry(tmp_path):
    async with Gateway(config(tmp_path), clock=lambda: T0) as gw:
        install(gw, members=members_with(GOLD, package_expires={"car_wash10": "2027-03-31"}))
        client = api_client(gw)
        assert (await view(gw, GOLD))["package_expires"] == {"car_wash10": "2027-03-31"}
        await tap(gw, GOLD)
        res = await client.post("/lanes/1/packages", body=sale_of("car_wash10", "pkg-ext-0001"))
        assert res.status_code == 201 and res.json["record"]["expires"] == "2028-03-31", res.json
        assert res.json["receipt"]["zh-CN"][-1] == "有效期至 2028-03-31"
        # the sale here is the view's expiry at once (local deltas), and again after a restart
        assert (await view(gw, GOLD))["package_expires"] == {"car_wash10": "2028-03-31"}
    async with Gateway(config(tmp_path), clock=lambda: T0) as gw:
        assert (await view(gw, GOLD))["package_expires"] == {"car_wash10": "2028-03-31"}
