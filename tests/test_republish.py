"""The republish money bug, end to end on real mosquitto with the real HQ and
gateway processes.

As a new user found it: after a sale paid from stored value was acked by
HQ, an ordinary ``rules publish`` of a promotion change set the member back
from 8000 fen / 4428 points / 120.00 paid today to 20000 fen / 5230 points /
0 paid today: HQ stamped the manifest with the highest seq in its ledger
while sending the unchanged external snapshot, and the gateway dropped its
local changes up to that seq. Now every publish builds the member parts
from HQ's accounts with the store's watermark read in the same transaction:
whatever HQ publishes (a promotion change, a key rotation, a resync), the
member's balance and points at the store are what the receipts say.
"""

from __future__ import annotations

import asyncio

import pytest

from tests.pg import pg_server  # noqa: F401  (fixture)
from tests.support import GOLD_UID, HQ, RULES_FILE, running_shop, wait_until
from wire.messages import ResyncRequest
from wire.topics import Topics

GOLD_CARD = "880000000013"
START_FEN, START_POINTS = 20000, 5230        # rules.demo.toml's inline member, imported into HQ's accounts

PROMOTION = """
[promotions.rice_week]
name = { "zh-CN" = "大米周满100减10", en = "Rice week: spend 100 save 10" }
kind = "threshold"
steps = [ { min_fen = 10000, off_fen = 1000 } ]
priority = 50
"""


@pytest.fixture(params=["sqlite", "postgresql"])
def shop(request, tmp_path, broker):
    database = request.getfixturevalue("pg_server").create_database() if request.param == "postgresql" else None
    with running_shop(tmp_path, broker.port, database=database) as shop:
        yield shop


def member_view(gw) -> dict:
    status, verdict = gw.call("POST", "/lanes/1/taps", {"source": "nfc", "raw": GOLD_UID})
    assert status == 200 and verdict["verdict"].startswith("accept"), verdict
    status, body = gw.call("GET", "/lanes/1/member")
    assert status == 200, body
    return body["member"]["member"]


def stored_value_sale(gw) -> dict:
    """A sale of 300.00 paid with 120.00 of stored value and 1,000 points: the receipt."""
    member_view(gw)
    body = {"idempotency_key": "pos1-sv-000001",
            "lines": [{"sku": "6901234567892", "name": "大米 5kg", "category": "staples", "qty": 6,
                       "unit_price": 5000}],
            "tender": {"stored_value_fen": 12000, "points": 1000}}
    status, quote = gw.call("POST", "/lanes/1/quote", body)
    assert status == 200, quote
    status, sale = gw.call("POST", "/lanes/1/sales", {**body, "expected_total": quote["total"]})
    assert status == 201, sale
    return sale


def expected(sale: dict) -> tuple[int, int, int]:
    """(balance fen, points, stored value paid today) as the receipt says."""
    sv = sale["tender"]["stored_value_fen"]
    return START_FEN - sv, START_POINTS - sale["tender"]["points"] + sale["points_earned"], sv


def seen(gw) -> tuple[int, int, int]:
    m = member_view(gw)
    return m["balance_fen"], m["points"], m["today"]["stored_value_paid_fen"]


def hq_account(hq: HQ) -> tuple[int, int]:
    """HQ's account of record for the gold card: (stored value fen, points)."""
    from hq_bridge import db
    from hq_bridge.accounts import AccountStore

    engine = db.open_engine(hq.url)
    try:
        with engine.connect() as conn:
            a = AccountStore(engine).account_of_card(conn, GOLD_CARD)
            return a.stored_value_fen, a.points
    finally:
        engine.dispose()


def acked(gw) -> None:
    wait_until(lambda: gw.journal_seqs() == [], timeout=30, what="HQ's ack of the sale")


def republished(gw, version: int) -> None:
    wait_until(lambda: gw.status()["rules_version"] >= version, timeout=30, what=f"rules v{version} at the gateway")


def money_after_sale(shop):
    hq, gw = shop
    sale = stored_value_sale(gw)
    want = expected(sale)
    assert want[0] == 8000 and want[1] < START_POINTS
    assert sale["balances_after"].get("points") == want[1]           # the receipt's own figure
    assert seen(gw)[:2] == want[:2]                       # the store's own records, before the ack
    acked(gw)
    return hq, gw, sale, want


def publish_promotion(hq: HQ, tmp_path) -> None:
    changed = tmp_path / "rules-promo.toml"
    changed.write_text(RULES_FILE.read_text(encoding="utf-8") + PROMOTION, encoding="utf-8")
    out = hq.publish_rules(rules_file=changed)
    assert out.returncode == 0, out.stderr


def test_a_promotion_publish_after_an_acked_stored_value_sale_hands_nothing_back(shop, tmp_path):
    hq, gw, sale, want = money_after_sale(shop)
    publish_promotion(hq, tmp_path)
    republished(gw, 2)
    balance, points, _today = seen(gw)
    assert (balance, points) == want[:2] == (8000, want[1])     # before the fix: (20000, 5230)
    assert hq_account(hq) == want[:2]                           # HQ's account of record, from the ledger


@pytest.mark.parametrize("shop", ["sqlite"], indirect=True)
def test_a_promotion_publish_keeps_the_days_offline_allowance_used(shop, tmp_path):
    hq, gw, sale, want = money_after_sale(shop)
    assert seen(gw)[2] == 12000
    publish_promotion(hq, tmp_path)
    republished(gw, 2)
    assert seen(gw) == want == (8000, want[1], 12000)


def test_a_key_rotation_and_a_resync_hand_nothing_back(shop, broker):
    hq, gw, sale, want = money_after_sale(shop)
    rotated = hq.cli("keys", "rotate")
    assert rotated.returncode == 0, rotated.stderr
    republished(gw, 2)
    assert seen(gw)[:2] == want[:2]

    # the deny list moves on (HQ reports another card lost), then the store asks for a resync:
    # HQ answers with a new manifest built from its accounts
    denied = hq.cli("card", "deny", "880000000021", "--reason", "reported by phone")
    assert denied.returncode == 0, denied.stderr
    version = gw.status()["rules_version"]

    async def ask() -> None:
        from common import mqtt
        async with mqtt.client({"host": "127.0.0.1", "port": broker.port}, identifier="test-resync") as c:
            await c.publish(Topics("sg/v1").resync("S001"),
                            ResyncRequest("S001", "test", version, None).encode(), qos=1)
    asyncio.run(ask())
    republished(gw, version + 1)
    assert seen(gw)[:2] == want[:2]
    assert hq_account(hq) == want[:2]


@pytest.mark.parametrize("shop", ["sqlite"], indirect=True)
def test_a_card_unfrozen_at_hq_reaches_the_store_as_active(shop):
    """A card reported lost at the counter: HQ's ``card unfreeze`` lifts it
    everywhere: the deny list, HQ's card of record, and the next snapshot."""
    hq, gw = shop
    status, body = gw.call("POST", "/cards/services",
                           {"idempotency_key": "desk-lost-000001", "kind": "report_lost", "card_no": GOLD_CARD},
                           )
    if status == 404:
        pytest.skip("no counter card service endpoint")
    assert status in (200, 201), body
    acked(gw)
    status, verdict = gw.call("POST", "/lanes/1/taps", {"source": "nfc", "raw": GOLD_UID})
    assert verdict["verdict"] == "deny"
    lifted = hq.cli("card", "unfreeze", GOLD_CARD, "--reason", "found by the member")
    assert lifted.returncode == 0, lifted.stderr
    from hq_bridge import db
    engine = db.open_engine(hq.url)
    with engine.connect() as conn:
        assert conn.execute(db.cards.select().where(db.cards.c.card_no == GOLD_CARD)).mappings().one()[
            "status"] == "active"
    engine.dispose()
    out = hq.cli("rules", "snapshot", "--all")
    assert out.returncode == 0, out.stderr
    republished(gw, 2)
    wait_until(lambda: gw.call("POST", "/lanes/1/taps", {"source": "nfc", "raw": GOLD_UID})[1]["verdict"]
               .startswith("accept"), timeout=20, what="the card accepted again at the store")
