"""Live account look-ups on real parts: a real mosquitto, HQ's database
(hq_bridge.db + accounts on SQLite) answered by hq_bridge.lookup's
LookupService, and two gateways in-process (stores S001 and S002).

- A top-up made in store A and committed at HQ is seen by a tap in store B
  a moment later (source "live") and is spendable there on the sale path.
- With HQ's look-up service stopped, a tap decides from the snapshot within
  the budget (measured).
- This store's records after the reply's store_seq are added exactly once:
  a sale HQ has applied is not counted again.
- Garbage and forged replies (another store's, a wrong id or card, bombs)
  are ignored; the tap goes on.
"""

from __future__ import annotations

import asyncio
import struct
import time
import zlib

import aiomqtt
import pytest

from gateway.shell import config as gw_config
from gateway.core import validate as engine
from gateway.core.members import InMemoryMembers, LiveCache
from gateway.store.members import MemberStore
from gateway.shell.service import Gateway
from hardware.readers import CardRead
from hq_bridge import db, migrations
from hq_bridge.accounts import AccountStore, import_members
from hq_bridge.lookup import LookupService
from hq_bridge.rules import _read_doc, read_table_file
from tests.pg import hq_db_url, pg_server  # noqa: F401  (fixtures)
from tests.support import install_rules, zlib_bomb
from tests.test_counter import CASH, EXAMPLES, GOLD, basket
from wire.messages import AccountQuery, AccountReply, WireError
from wire.topics import Topics

T = Topics()
BUDGET_S = 0.3


def gw_config_for(tmp_path, store: str, port: int, **uplink) -> dict:
    return gw_config.check({
        "store": {"id": store, "region": "east", "data_dir": str(tmp_path / store)},
        "mqtt": {"host": "127.0.0.1", "port": port, "keepalive": 5},
        "uplink": {"status_interval_s": 5, **uplink},
        "lanes": [{"id": "1", "reader": "terminal"}],
    })


def install(gw: Gateway) -> None:
    names = ["chain.toml", "region-east.toml"] + (["store-S001.toml"] if gw.store_id == "S001" else [])
    install_rules(gw, [_read_doc(EXAMPLES / n) for n in names], now=time.time() - 60, region="east",
                  members=list(read_table_file(EXAMPLES / "members.demo.jsonl")),
                  deny=list(read_table_file(EXAMPLES / "deny.demo.jsonl")))


async def tap(gw: Gateway, card: str = GOLD):
    return await gw.handle_read(CardRead("1", "magstripe", card, time.time()))


class HQ:
    """HQ's database with the demo members imported, and its look-up service."""

    def __init__(self, tmp_path, port: int) -> None:
        url = f"sqlite:///{tmp_path / 'hq.db'}"
        migrations.migrate(url)
        self.engine = db.open_engine(url)
        self.accounts = AccountStore(self.engine)
        with self.engine.begin() as conn:
            import_members(conn, list(read_table_file(EXAMPLES / "members.demo.jsonl")))
        self.settings = {"host": "127.0.0.1", "port": port, "keepalive": 5}
        self.service: LookupService | None = None
        self.task: asyncio.Task | None = None

    async def start(self) -> None:
        self.service = LookupService(self.settings, self.engine)
        self.task = asyncio.create_task(self.service.run())
        await asyncio.wait_for(self.service.connected.wait(), 10)
        await asyncio.sleep(0.1)   # the broker has the shared subscription in place

    async def stop(self) -> None:
        if self.task:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
            self.task = None

    async def commit(self, gw: Gateway) -> int:
        """What the ledger's commit does with a store's batch: insert and apply, one transaction."""
        records = await gw.journal.pending(0, 1000)
        with self.engine.begin() as conn:
            ins = db.ledger_insert(conn, gw.store_id, records)
            return self.accounts.apply_batch(conn, gw.store_id, ins.new).watermark

    def balance(self, account_id: str) -> tuple[int, int]:
        with self.engine.begin() as conn:
            a = self.accounts.load_accounts(conn, [account_id])[account_id]
        return a.stored_value_fen, a.points


async def online(*gws: Gateway) -> None:
    deadline = time.monotonic() + 10
    while not all(g.live.online for g in gws):
        assert time.monotonic() < deadline, "gateways did not connect"
        await asyncio.sleep(0.02)


@pytest.fixture
async def hq(tmp_path, broker):
    hq = HQ(tmp_path, broker.port)
    await hq.start()
    yield hq
    await hq.stop()
    hq.engine.dispose()


async def test_a_top_up_in_store_a_is_spendable_in_store_b_and_counted_once(tmp_path, broker, hq):
    async with Gateway(gw_config_for(tmp_path, "S001", broker.port)) as a, \
            Gateway(gw_config_for(tmp_path, "S002", broker.port)) as b:
        install(a)
        install(b)
        await online(a, b)
        snap_b = await tap(b)
        assert snap_b.member["source"] == "live" and snap_b.member["balance_fen"] == 20000

        # Store A: 300.00 topped up, committed at HQ (the ledger's transaction applies it).
        v = await tap(a)
        assert v.member["source"] == "live"
        await a.counter.topup("1", {"idempotency_key": "top-a-000001", "amount_fen": 30000, "payment": CASH})
        assert await hq.commit(a) >= 1
        topped = hq.balance("M1001")[0]
        assert topped >= 50000       # 200.00 + 300.00 (+ a top-up bonus, if the rules give one)

        # Store B a moment later: HQ's live balance, not its snapshot's 200.00.
        v = await tap(b)
        assert v.accepted and v.member["source"] == "live"
        assert v.member["balance_fen"] == topped
        assert v.member["offline_left"]["stored_value_fen"] == 50000   # offline_max_per_tx_fen caps it
        # The quote and the sale re-validate the member and see the same live account.
        pay = min(b.quote("1", {"lines": basket(60000)})["total"], 45000)
        assert pay > 20000                   # more than B's snapshot says the member holds
        q = b.quote("1", {"lines": basket(60000), "tender": {"stored_value_fen": pay}})
        assert q["member"]["member"]["source"] == "live"
        sale = await b.counter.sale("1", {"idempotency_key": "sale-b-00001", "lines": basket(60000),
                                          "tender": {"stored_value_fen": pay}})
        earned = sale.response["points_earned"]
        # Before HQ applies B's sale: HQ's 500.00 + B's own record after the reply's store_seq.
        v = await tap(b)
        assert v.member["source"] == "live" and v.member["balance_fen"] == topped - pay
        _, hq_points = hq.balance("M1001")
        assert v.member["points"] == hq_points + earned

        # HQ applies B's sale: the next answer includes it (store_seq), and B adds nothing again.
        assert await hq.commit(b) == sale.seq
        assert hq.balance("M1001") == (topped - pay, hq_points + earned)
        v = await tap(b)
        assert v.member["source"] == "live"
        assert (v.member["balance_fen"], v.member["points"]) == (topped - pay, hq_points + earned)
        assert b.live.cache.get(GOLD, time.time()).store_seq == sale.seq

        # Store A sees B's spending too, with its own top-up counted once (HQ applied it).
        v = await tap(a)
        assert (v.member["source"], v.member["balance_fen"]) == ("live", topped - pay)


async def test_hq_lookup_service_stopped_tap_falls_back_to_the_snapshot_within_budget(tmp_path, broker, hq):
    async with Gateway(gw_config_for(tmp_path, "S002", broker.port)) as b:
        install(b)
        await online(b)
        assert (await tap(b)).member["source"] == "live"
        await hq.stop()       # the answer held from that tap is let go by the next tap that gets none
        elapsed = []
        for _ in range(5):
            t0 = time.perf_counter()
            v = await tap(b)
            elapsed.append(time.perf_counter() - t0)
            assert v.accepted and v.member["source"] == "snapshot" and v.member["balance_fen"] == 20000
        # The first taps wait out the budget, never more; then look-ups pause and taps are immediate.
        assert max(elapsed) < BUDGET_S + 0.1, elapsed
        assert min(elapsed[:3]) >= BUDGET_S - 0.01, elapsed
        assert max(elapsed[3:]) < 0.05, elapsed
        assert b.live.stats["timeouts"] == 3 and b.live.stats["skipped"] == 2
        # HQ back: after the pause, a probe gets through and taps are live again.
        await hq.start()
        b.live._quiet_until = 0.0
        v = await tap(b)
        assert v.member["source"] == "live"


async def test_offline_tap_does_not_wait(tmp_path, broker):
    async with Gateway(gw_config_for(tmp_path, "S002", broker.port)) as b:
        install(b)
        await online(b)
        broker.kill()
        deadline = time.monotonic() + 10
        while b.live.online:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        t0 = time.perf_counter()
        v = await tap(b)
        assert time.perf_counter() - t0 < 0.05 and v.member["source"] == "snapshot"
        broker.start()


def bomb(declared: int = 1 << 20) -> bytes:
    return struct.pack(">4sI", b"SGZ1", declared) + zlib_bomb(declared, b"[")


async def test_garbage_and_forged_replies_are_ignored(tmp_path, broker, hq):
    """HQ's service is stopped; a forger (any client on an open broker; the
    production ACL stops stores from publishing replies at all) answers
    every query of S002 with what it likes."""
    await hq.stop()
    async with Gateway(gw_config_for(tmp_path, "S002", broker.port)) as b:
        b.live.budget_s = 0.5   # uplink.live_lookup_ms = 500 (once gateway/shell/config.py has the key)
        install(b)
        await online(b)
        good = {"card_no": GOLD, "member_id": "M1001", "tier": "gold", "balance_fen": 99_999_00}
        forgeries = []

        def forged(q: AccountQuery) -> list[bytes]:
            return [
                AccountReply("S001", q.id, q.card_no, True, {**good}, 0, 1).encode(),       # another store's
                AccountReply("S002", "wrong-id-0000", q.card_no, True, {**good}, 0, 1).encode(),  # no such query
                AccountReply("S002", q.id, "880000000021",                                   # another card
                             True, {**good, "card_no": "880000000021"}, 0, 1).encode(),
                bomb(),                                                                      # inflates past the cap
                zlib.compress(b'{"a":' * 100_000),                                           # bare zlib, too big
                b"\x00" * (300 * 1024),                                                      # over the size cap
                b"not json",
                b'{"store": "S002", "id": "%s", "card_no": "%s", "found": true, "account": null, '
                b'"store_seq": 0, "as_of": 1}' % (q.id.encode(), q.card_no.encode()),       # found without account
            ]

        async with aiomqtt.Client("127.0.0.1", broker.port, identifier="forger") as forger:
            await forger.subscribe(T.account_query("S002"), qos=0)

            async def answer():
                async for m in forger.messages:
                    q = AccountQuery.decode(m.payload)
                    for payload in forged(q):
                        await forger.publish(T.account_reply("S002"), payload, qos=0)
                    forgeries.append(q)

            task = asyncio.create_task(answer())
            try:
                await asyncio.sleep(0.2)
                v = await tap(b)
                assert v.accepted and v.member["source"] == "snapshot" and v.member["balance_fen"] == 20000
                assert forgeries and b.live.stats["ignored_replies"] == 8
                assert b.live.stats["answered"] == 0 and b.live.cache.get(GOLD, time.time()) is None
            finally:
                task.cancel()
        # The uplink lived through it all and HQ's real answers are used again.
        await hq.start()
        b.live._misses = 0
        v = await tap(b)
        assert v.member["source"] == "live" and v.member["balance_fen"] == 20000


def test_reply_decode_refuses_bombs_and_mismatches():
    with pytest.raises(WireError, match="declares"):
        AccountReply.decode(bomb(1 << 30))
    with pytest.raises(WireError, match="inflates"):
        AccountReply.decode(struct.pack(">4sI", b"SGZ1", 1000) + zlib.compress(b"x" * 5000))
    row = {"card_no": GOLD, "member_id": "M1001", "tier": "gold"}
    with pytest.raises(WireError, match="card asked for"):
        AccountReply.decode(AccountReply("S002", "abcdefgh", "880000000021", True, row, 0, 1).encode())
    with pytest.raises(WireError, match="primary"):
        AccountReply.decode(AccountReply("S002", "abcdefgh", GOLD, True, row, 0, 1, primary=row).encode())
    with pytest.raises(WireError, match="sent_at"):
        AccountQuery.decode(b'{"store": "S002", "id": "abcdefgh", "card_no": "880000000013", "sent_at": -1}')


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
def test_local_totals_after_any_watermark(tmp_path, kind):
    store = InMemoryMembers() if kind == "memory" else MemberStore(tmp_path / "m")
    rows = [{"card_no": GOLD, "member_id": "M1001", "tier": "gold", "balance_fen": 100}]
    store.replace_snapshot(rows, [], version=1, as_of=1, store_seq=2)
    for seq in (3, 4, 5):
        store.record_deltas(seq, "M1001", "2026-12-05", {"stored_value_fen": -10 * seq, "points": seq})
    assert store.local_totals("M1001", "2026-12-05")["stored_value_fen"] == -120
    assert store.local_totals("M1001", "2026-12-05", after=4)["stored_value_fen"] == -50
    assert store.local_totals("M1001", "2026-12-05", after=5)["stored_value_fen"] == 0
    assert store.local_totals("M1001", "2026-12-05", after=1)["stored_value_fen"] == -120  # never below the snapshot's
    store.close()


def test_live_cache_holds_for_a_while_and_is_bounded():
    cache = LiveCache(hold_s=10, max_cards=2)
    row = {"card_no": GOLD, "member_id": "M1001", "tier": "gold"}
    cache.put(GOLD, row, None, 5, 1, now=100.0)
    assert cache.get(GOLD, 105.0).store_seq == 5 and cache.get(GOLD, 105.0).row["balance_fen"] == 0
    assert cache.get(GOLD, 111.0) is None
    for n in ("1", "2", "3"):
        cache.put(n, {**row, "card_no": n}, None, 1, 1, now=100.0)
    assert len(cache) == 2 and cache.get("1", 100.0) is None


async def test_a_subsidiary_card_gets_its_primarys_live_account(tmp_path, broker, hq):
    """A 附属卡's reply carries its primary card's row: the account's balances."""
    sub, primary = "880200000011", "880000000070"
    async with Gateway(gw_config_for(tmp_path, "S002", broker.port)) as b:
        install(b)
        await online(b)
        v = await tap(b, sub)
        held = b.live.cache.get(sub, time.time())
        assert held.row["primary_card"] == primary and held.primary["card_no"] == primary
        assert v.accepted and v.member["source"] == "live" and v.member["account_id"] == "M1005"
        assert (v.member["balance_fen"], v.member["points"]) == hq.balance("M1005")
        # A live row naming a primary the reply did not carry is not mixed with the snapshot's.
        b.live.cache.put(sub, held.row, None, held.store_seq, held.as_of, time.time())
        v2 = engine.validate("magstripe", sub, b.rules.current, b.now())
        assert v2.accepted and v2.member["source"] == "snapshot"


def test_hq_answers_the_snapshot_row_with_the_watermark_on_both_engines(hq_db_url):  # noqa: F811
    """HQ's answer is the member part's row for the card, field by field, and
    the asking store's watermark, on SQLite and PostgreSQL."""
    from hq_bridge.accounts import snapshot_rows

    migrations.migrate(hq_db_url)
    engine_ = db.open_engine(hq_db_url)
    try:
        with engine_.begin() as conn:
            import_members(conn, list(read_table_file(EXAMPLES / "members.demo.jsonl")))
            db.upsert(conn, db.account_watermarks, [{"store": "S002", "seq": 7, "held_above": 0, "updated_at": 0}],
                      ["store"])
        with engine_.begin() as conn:
            snap = {r["card_no"]: r for r in snapshot_rows(conn, "S002")}
        svc = LookupService({"host": "127.0.0.1"}, engine_)
        for card, row in snap.items():
            reply = AccountReply.decode(svc.answer("S002", AccountQuery("S002", "abcdefgh", card, 1)).encode())
            assert reply.found and reply.store_seq == 7
            assert {k: v for k, v in reply.account.items() if k in row} == row
            if row.get("primary_card"):
                assert {k: v for k, v in reply.primary.items() if k in snap[row["primary_card"]]} == \
                    snap[row["primary_card"]]
        missing = svc.answer("S002", AccountQuery("S002", "abcdefgh", "880000000999", 1))
        assert (missing.found, missing.account, missing.store_seq) == (False, None, 7)
        assert svc.answer("S777", AccountQuery("S777", "abcdefgh", "880000000013", 1)).store_seq == 0
    finally:
        engine_.dispose()
