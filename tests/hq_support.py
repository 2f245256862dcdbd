"""Shared helpers of the HQ member tests (test_members, test_reconcile, test_policy):
store records built with wire/records.py, committed the way the ledger does."""

from __future__ import annotations

from datetime import datetime, timezone
from types import SimpleNamespace

from hq_bridge import db
from hq_bridge.accounts import AccountStore
from wire import records as rec

NOW = datetime(2026, 11, 25, 7, 0, tzinfo=timezone.utc)

RULES = {
    "default_tier": "normal",
    "tiers": {"normal": {"name": {"zh-CN": "普通", "en": "Normal"}, "rank": 1},
              "silver": {"name": {"zh-CN": "银卡", "en": "Silver"}, "rank": 2,
                         "upgrade": {"spend_fen": 100000, "window_days": 365}},
              "gold": {"name": {"zh-CN": "金卡", "en": "Gold"}, "rank": 3,
                       "upgrade": {"spend_fen": 500000, "window_days": 365},
                       "downgrade": {"spend_fen": 200000, "window_days": 365}}},
    "card_types": {"personal": {"name": {"zh-CN": "个人卡", "en": "Personal"}, "kind": "personal"}},
    "stored_value": {"offline_max_per_tx_fen": 50000, "offline_max_per_day_fen": 100000},
    "redemption": {"offline_max_points_per_day": 20000},
}


def tx(seq: int, body: dict, id_: str | None = None):
    return SimpleNamespace(seq=seq, id=id_ or f"tx-{seq:08d}-{body['type']}-{body['idempotency_key'][-12:]}",
                           type=body["type"], ts=0, body=body)


def commit(engine, store: AccountStore, name: str, records):
    """What the ledger's commit does: insert the batch, apply the new records, one transaction."""
    with engine.begin() as conn:
        ins = db.ledger_insert(conn, name, records)
        return store.apply_batch(conn, name, ins.new)


def sale_body(card: str, account: str | None, *, sv: int = 0, red: int = 0, earned: int = 0,
              coupons: tuple = (), day: str = "2026-11-25", net: int | None = None, key: str = "") -> dict:
    net = net if net is not None else sv + red + 1000
    line = rec.SaleLine(sku="SKU-1", name="item", category="general", qty=1, unit_price=net, amount=net,
                        discounts=[], net=net, points_redeemed=red, redeemed_fen=red, stored_value_fen=sv,
                        cash_fen=net - sv - red, points_earned=earned)
    return rec.to_body(rec.Sale(
        at=f"{day}T15:00:00+08:00", store="S001", region="east", rules_version=1,
        member=rec.MemberRef(member_id=account, card_no=card, tier="normal"), redemption_points_per_yuan=100,
        lines=[line], totals=rec.SaleTotals(subtotal=net, discount=0, total=net, points_redeemed=red,
                                            redeemed_fen=red, stored_value_fen=sv, cash_fen=net - sv - red,
                                            points_earned=earned),
        coupons=list(coupons), promotions=[],
        deltas=rec.SaleDeltas(points=earned - red, points_earned=earned, points_redeemed=red,
                              stored_value_fen=-sv, promotion_uses={}, coupons_used=list(coupons)),
        lane="1", idempotency_key=f"pos/{card}-{sv}-{red}-{earned}-{net}{key}", account_id=account, day=day,
        terminal="pos-1"))


def topup_body(card: str, account: str | None, pay: int, bonus: int = 0, key: str = "1",
               day: str = "2026-11-25") -> dict:
    return {"type": "topup", "v": 1, "at": f"{day}T16:00:00+08:00", "member_id": account, "card_no": card,
            "package_id": "p500" if bonus else None, "pay_fen": pay, "bonus_fen": bonus, "credit_fen": pay + bonus,
            "balance_before_fen": 0, "balance_after_fen": pay + bonus, "deltas": {"stored_value_fen": pay + bonus},
            "payment": {"method": "cash"}, "lane": "1", "idempotency_key": f"pos/top-{key}", "account_id": account,
            "day": day, "terminal": "pos-1"}
