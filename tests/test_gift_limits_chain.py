"""A gift's ``per_member_day_limit`` chain-wide (wire/RULESET.md "Points for
gifts"), wherever HQ can know:

- online: HQ's live answer carries the account's gift counts of the day
  (``today.gifts``, next to the day's stored value and points), read from
  its history in the same transaction as the watermark, so a store adds only
  its own records after it: a member who took the day's umbrella at store A
  is refused a second one at store B a moment later, and neither store
  counts its own gifts twice (a real mosquitto, HQ's look-up service, two
  gateways in-process);
- offline the limit is per store; HQ reports the chain-wide overrun the way
  reconciliation reports a daily allowance's (``day_gifts``: recorded,
  settled as a report, never limits or blocks), and the gift's points count
  in the day's redeemed points there too;
- the wire: ``today.gifts`` is bounded in account_reply (a member snapshot
  row still has no such field).
"""

from __future__ import annotations

import copy
import time
from datetime import datetime, timezone

import pytest

from gateway.core import gifts as gift_core
from gateway.shell.service import Gateway
from hq_bridge.accounts import AccountStore, audit, import_members
from hq_bridge.lookup import LookupService
from hq_bridge.reconcile import reconcile
from hq_bridge.rules import _read_doc, read_table_file
from tests.hq_support import RULES, commit, tx
from tests.pg import hq_db_url, hq_engine, pg_server  # noqa: F401  (fixtures)
from tests.support import api_client, install_rules
from tests.test_counter import EXAMPLES, GOLD
from tests.test_live_accounts import hq  # noqa: F401  (fixture: HQ's ingest and look-ups on a broker)
from tests.test_live_accounts import gw_config_for, online, tap
from tests.test_pricing import TZ, n
from wire.messages import AccountQuery, AccountReply, WireError
from wire.ruleset import check_member

GIFTS = {
    "umbrella": {"name": n("雨伞", "Umbrella"), "points": 2000, "per_member_day_limit": 1},
    "mug": {"name": n("马克杯", "Mug"), "points": 800, "per_member_day_limit": 3},
}
DAY = "2026-11-25"
AT = datetime(2026, 11, 25, 15, 0, tzinfo=TZ)
NOW = datetime(2026, 11, 25, 7, 0, tzinfo=timezone.utc)
CARD, SUB, MEMBER = "880000000500", "880000000518", "M500"
POLICY = {"gifts": GIFTS, "card_types": {},
          "redemption": {"offline_max_points_per_tx": 10000, "offline_max_points_per_day": 20000}}


# ---------------------------------------------------------------- HQ's records, built as a counter builds them

def gift_tx(seq: int, gift_id: str, qty: int = 1, *, card: str = CARD, at: datetime = AT, key: str = ""):
    member = {"member_id": MEMBER, "card_no": card, "points_available": 50000, "balance_available_fen": 0,
              "packages": {}, "today": {}}
    out = gift_core.redeem_gift(POLICY, member, gift_id, qty, now=at)
    body = {**out["record"], "lane": "1", "idempotency_key": f"pos-1/gift-{seq:06d}{key}", "account_id": MEMBER,
            "day": at.date().isoformat(), "terminal": "pos-1"}
    return tx(seq, body)


def clock():
    return NOW.timestamp()


def setup(engine):
    with engine.begin() as conn:
        import_members(conn, [{"card_no": CARD, "member_id": MEMBER, "tier": "normal", "points": 30000},
                              {"card_no": SUB, "member_id": "M500-2", "tier": "normal", "primary_card": CARD}],
                       clock=clock)


def answer(engine, store: str, card: str) -> AccountReply:
    svc = LookupService({"host": "127.0.0.1"}, engine)
    return AccountReply.decode(svc.answer(store, AccountQuery(store, "abcdefgh", card, 1)).encode())


def test_hqs_live_answer_carries_the_days_gift_counts_from_every_store(hq_engine):  # noqa: F811
    store = AccountStore(hq_engine, clock=clock)
    setup(hq_engine)
    assert "gifts" not in (answer(hq_engine, "S002", CARD).account.get("today") or {})
    yesterday = datetime(2026, 11, 24, 18, 0, tzinfo=TZ)
    commit(hq_engine, store, "S001", [gift_tx(1, "umbrella", at=yesterday), gift_tx(2, "umbrella"),
                                      gift_tx(3, "mug", 2)])
    commit(hq_engine, store, "S002", [gift_tx(1, "mug", 1, card=SUB, key="b")])
    reply = answer(hq_engine, "S002", CARD)
    assert reply.store_seq == 1
    # the day's allowances as before, and the gifts of that day from both stores (yesterday's not)
    assert reply.account["today"] == {"day": DAY, "stored_value_paid_fen": 0, "points_redeemed": 2000 + 3 * 800,
                                      "gifts": {"umbrella": 1, "mug": 3}}
    # a 附属卡: its primary's row carries the account's day, gifts with it
    sub = answer(hq_engine, "S001", SUB)
    assert "today" not in sub.account and sub.primary["today"]["gifts"] == {"umbrella": 1, "mug": 3}
    assert sub.store_seq == 3


def test_today_gifts_is_bounded_on_the_wire_and_only_in_a_live_answer():
    row = {"card_no": GOLD, "member_id": "M1001", "tier": "gold",
           "today": {"day": DAY, "points_redeemed": 800, "gifts": {"mug": 1}}}
    assert AccountReply.decode(AccountReply("S002", "abcdefgh", GOLD, True, row, 0, 1).encode()) \
        .account["today"]["gifts"] == {"mug": 1}
    for bad in ({"mug": 0}, {"mug": -1}, {"mug": 10**9}, {"mug": "1"}, {"a b": 1},
                {f"g{i}": 1 for i in range(65)}):
        with pytest.raises(WireError, match="account"):
            AccountReply("S002", "abcdefgh", GOLD, True, {**row, "today": {**row["today"], "gifts": bad}}, 0, 1)\
                .encode()
    import orjson   # the gateway's side: a reply as it comes off the wire
    raw = orjson.dumps({"store": "S002", "id": "abcdefgh", "card_no": GOLD, "found": True, "store_seq": 0,
                        "as_of": 1, "account": {**row, "today": {**row["today"], "gifts": {"mug": 10**6}}}})
    with pytest.raises(WireError, match="account"):
        AccountReply.decode(raw)
    with pytest.raises(ValueError):   # the snapshot's member row: HQ does not send gift counts there
        check_member(row)


# ---------------------------------------------------------------- two stores online, one HQ

def layers(store: str) -> list[dict]:
    names = ["chain.toml", "region-east.toml"] + (["store-S001.toml"] if store == "S001" else [])
    docs = [_read_doc(EXAMPLES / name) for name in names]
    chain = copy.deepcopy(docs[0])
    chain["gifts"] = GIFTS
    return [chain, *docs[1:]]


def install(gw: Gateway) -> None:
    install_rules(gw, layers(gw.store_id), now=time.time() - 60, region="east",
                  members=list(read_table_file(EXAMPLES / "members.demo.jsonl")),
                  deny=list(read_table_file(EXAMPLES / "deny.demo.jsonl")))


async def redeem(gw: Gateway, gift_id: str, key: str, qty: int = 1):
    await tap(gw)
    return await api_client(gw).post("/lanes/1/gifts", body={"idempotency_key": key, "gift_id": gift_id,
                                                             "qty": qty})


async def test_the_days_umbrella_at_store_a_is_refused_at_store_b_online_and_counted_once(tmp_path, broker, hq):
    async with Gateway(gw_config_for(tmp_path, "S001", broker.port)) as a, \
            Gateway(gw_config_for(tmp_path, "S002", broker.port)) as b:
        install(a)
        install(b)
        await online(a, b)
        res = await redeem(a, "umbrella", "gift-a-000001")
        assert res.status_code == 201, res.json
        assert (await redeem(a, "mug", "gift-a-000002", 2)).status_code == 201
        v = await tap(a)
        assert v.member["source"] == "live" and v.member["today"]["gifts"] == {"umbrella": 1, "mug": 2}

        # HQ applies A's gifts: A counts them once (HQ's count includes them up to the watermark).
        await hq.commit(a)
        v = await tap(a)
        assert v.member["source"] == "live" and v.member["today"]["gifts"] == {"umbrella": 1, "mug": 2}
        assert a.live.cache.get(GOLD, time.time()).row["today"]["gifts"] == {"umbrella": 1, "mug": 2}

        # Store B a moment later: the day's umbrella is taken, one mug of three is left.
        v = await tap(b)
        assert v.member["source"] == "live" and v.member["today"]["gifts"] == {"umbrella": 1, "mug": 2}
        res = await redeem(b, "umbrella", "gift-b-000001")
        assert res.status_code == 422 and res.json["error"]["code"] == "gift_day_limit", res.json
        res = await redeem(b, "mug", "gift-b-000002", 2)
        assert res.status_code == 422 and res.json["error"]["code"] == "gift_day_limit", res.json
        assert (await redeem(b, "mug", "gift-b-000003")).status_code == 201
        v = await tap(b)          # HQ's 2 + B's own 1 after its watermark
        assert v.member["today"]["gifts"] == {"umbrella": 1, "mug": 3}
        await hq.commit(b)
        v = await tap(b)          # HQ's 3, B's own not again
        assert v.member["source"] == "live" and v.member["today"]["gifts"] == {"umbrella": 1, "mug": 3}

        # Offline (HQ's look-ups stopped) the limit is per store: B has given no umbrella today.
        await hq.stop()
        res = await redeem(b, "umbrella", "gift-b-000004")
        assert res.status_code == 201, res.json
        assert (await tap(b)).member["source"] == "snapshot"
        await hq.commit(b)
        # ... and HQ reports the chain-wide overrun (never limits or blocks).
        with hq.engine.begin() as conn:
            rep = reconcile(conn, {**RULES, "gifts": GIFTS})
            assert audit(conn) == []
        [od] = [o for o in rep.overdrafts if o.kind == "day_gifts"]
        umbrellas = [r for r in od.records if r["gift_id"] == "umbrella"]
        assert (od.account_id, od.amount, od.action, od.state) == ("M1001", 1, "carry", "settled")
        assert [r["store"] for r in umbrellas] == ["S001", "S002"]


# ---------------------------------------------------------------- HQ: the chain-wide overrun reported

def rules(policy: str = "block", gifts=GIFTS) -> dict:
    return {**RULES, "gifts": gifts, "reconciliation": {"overdraft_policy": policy}}


def test_gifts_past_the_day_limit_at_two_stores_are_reported_never_blocked(hq_engine):  # noqa: F811
    store = AccountStore(hq_engine, clock=clock)
    setup(hq_engine)
    commit(hq_engine, store, "S001", [gift_tx(1, "umbrella"), gift_tx(2, "mug", 3)])
    with hq_engine.begin() as conn:   # one store keeps its own limit: nothing to report
        assert [o for o in reconcile(conn, rules(), clock=clock).overdrafts if o.kind == "day_gifts"] == []
    commit(hq_engine, store, "S002", [gift_tx(1, "umbrella", card=SUB, key="b"), gift_tx(2, "mug", 2, key="b"),
                                      gift_tx(3, "umbrella", at=datetime(2026, 11, 26, 10, 0, tzinfo=TZ),
                                              key="c")])
    with hq_engine.begin() as conn:
        res = reconcile(conn, rules(), clock=clock)
        assert audit(conn) == []
    got = {(o.kind, o.ref): o for o in res.overdrafts}
    od = got[("day_gifts", DAY)]
    # umbrella 2 of 1, mug 5 of 3: 3 gifts over the day's limits, reported; the next day's umbrella is alone
    assert (od.account_id, od.amount, od.action, od.state, od.new) == (MEMBER, 3, "carry", "settled", True)
    assert [(r["store"], r["seq"], r["gift_id"], r["amount"]) for r in od.records] == [
        ("S001", 1, "umbrella", 1), ("S001", 2, "mug", 3), ("S002", 1, "umbrella", 1), ("S002", 2, "mug", 2)]
    assert ("day_gifts", "2026-11-26") not in got
    assert res.cards_changed == [] and res.limited == []
    assert res.as_json()["totals"]["day_gifts"] == 0      # settled at once: nothing open
    with hq_engine.begin() as conn:   # reported once
        again = reconcile(conn, rules(), clock=clock)
        hist = [h.detail for h in store.history(conn, MEMBER) if h.kind == "reconcile"]
    assert not any(o.kind == "day_gifts" for o in again.overdrafts)
    assert [d["overdraft"] for d in hist if d.get("overdraft") == "day_gifts"] == ["day_gifts"]
    # without a limit in the rules, nothing is over
    with hq_engine.begin() as conn:
        free = {g: {k: v for k, v in x.items() if k != "per_member_day_limit"} for g, x in GIFTS.items()}
        assert not any(o.kind == "day_gifts" for o in find(conn, rules(gifts=free)))


def test_gifts_past_the_day_limit_are_found_on_ingest(hq_engine):  # noqa: F811
    from hq_bridge.reconcile import reconcile_hook
    store = AccountStore(hq_engine, clock=clock, hooks=[reconcile_hook(rules(), clock=clock)])
    setup(hq_engine)
    a = commit(hq_engine, store, "S001", [gift_tx(1, "umbrella")])
    b = commit(hq_engine, store, "S002", [gift_tx(1, "umbrella", card=SUB, key="b")])
    assert a.overdrafts == [] and b.hq_cards_changed == []
    assert [(o.kind, o.ref, o.amount, o.state) for o in b.overdrafts] == [("day_gifts", DAY, 1, "settled")]


def find(conn, r):
    from hq_bridge.reconcile import find_overdrafts
    return find_overdrafts(conn, r)


def test_gift_points_count_in_the_days_redeemed_points_at_reconciliation(hq_engine):  # noqa: F811
    store = AccountStore(hq_engine, clock=clock)
    setup(hq_engine)
    commit(hq_engine, store, "S001", [gift_tx(1, "mug", 3)])                       # 2,400
    commit(hq_engine, store, "S002", [gift_tx(1, "mug", 2, card=SUB, key="b")])   # 1,600
    tight = rules()
    tight["redemption"] = {"offline_max_points_per_day": 3000}
    with hq_engine.begin() as conn:
        got = {(o.kind, o.ref): o for o in find(conn, tight)}
    assert got[("day_points", DAY)].amount == 1000
    assert [r["amount"] for r in got[("day_points", DAY)].records] == [2400, 1600]
