"""Several HQ ingest workers on one PostgreSQL database (each with its own
connections, as several bridge processes would be): every store record is
applied to the accounts exactly once and in its store's seq order, whatever
worker gets which batch, in whatever order, as often as it comes.

The accounts of record are shared by the stores, so the workers meet on the
same account rows; the ledger's per-store watermark (locked FOR UPDATE)
keeps a store's records to one worker at a time.
"""

from __future__ import annotations

import random
import threading
import time

import pytest
from sqlalchemy import select

from hq_bridge import db, migrations
from hq_bridge.accounts import AccountStore, audit, import_members
from hq_bridge.ledger import Ledger
from tests.hq_support import NOW, sale_body, topup_body
from tests.pg import pg_server  # noqa: F401  (fixture)
from wire.messages import TxBatch, TxRecord

CARDS = {"880000000017": "M1", "880000000025": "M2", "880000000033": "M3"}


@pytest.fixture
def url(pg_server):  # noqa: F811
    url = pg_server.create_database()
    migrations.migrate(url)
    engine = db.open_engine(url)
    try:
        with engine.begin() as conn:
            import_members(conn, [{"card_no": c, "member_id": m, "tier": "normal", "balance_fen": 100_000}
                                  for c, m in CARDS.items()], clock=NOW.timestamp)
    finally:
        engine.dispose()
    return url


def store_records(store: str, n: int, rng: random.Random) -> list[TxRecord]:
    """A store's journal: top-ups and sales paid in stored value, on the shared cards."""
    out = []
    for seq in range(1, n + 1):
        card = rng.choice(sorted(CARDS))
        if rng.random() < 0.5:
            body = topup_body(card, CARDS[card], pay=rng.randint(1, 50) * 100, key=f"{store}-{seq}")
        else:
            body = sale_body(card, CARDS[card], sv=rng.randint(1, 30) * 100, earned=rng.randint(0, 20),
                             key=f"{store}-{seq}")
        out.append(TxRecord(seq, f"{store}-{seq:08d}", body["type"], 0, body))
    return out


def expected(records: list[TxRecord]) -> dict[str, tuple[int, int]]:
    """Stored value and points of each account once every record is applied (no bonus parts,
    no redemption: the same in any interleaving of the stores)."""
    out = {m: [100_000, 0] for m in CARDS.values()}
    for r in records:
        b = r.body
        if r.type == "topup":
            out[b["account_id"]][0] += b["pay_fen"]
        else:
            out[b["account_id"]][0] -= b["totals"]["stored_value_fen"]
            out[b["account_id"]][1] += b["totals"]["points_earned"]
    return {m: tuple(v) for m, v in out.items()}


def test_workers_given_every_batch_in_any_order_apply_each_record_once_in_seq_order(url):
    rng = random.Random(12)
    journals = {s: store_records(s, 60, rng) for s in ("S1", "S2", "S3")}
    batches = [TxBatch(s, rs[i:i + 10]) for s, rs in journals.items() for i in range(0, len(rs), 10)]
    # Three workers, each handed every batch (a redelivery), each in an order of its own:
    # most batches come past a gap to some worker, and every batch comes three times.
    orders = [rng.sample(batches, len(batches)) for _ in range(3)]
    applied, errors = [], []
    start = threading.Barrier(len(orders))

    def worker(order: list[TxBatch]) -> None:
        ledger = Ledger(url)
        try:
            start.wait()
            for b in order:
                c = ledger.commit(b)
                if c.accounts is not None:
                    applied.extend((b.store, s) for s in c.accounts.applied)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)
        finally:
            ledger.close()

    threads = [threading.Thread(target=worker, args=(o,)) for o in orders]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert errors == []
    all_records = [r for rs in journals.values() for r in rs]
    assert sorted(applied) == sorted((s, r.seq) for s, rs in journals.items() for r in rs)   # each once

    engine = db.open_engine(url)
    try:
        with engine.begin() as conn:
            assert audit(conn) == []
            assert AccountStore().watermarks(conn) == {"S1": 60, "S2": 60, "S3": 60}
            h = db.account_history
            for store in journals:
                seqs = conn.execute(select(h.c.seq).where(h.c.store == store).order_by(h.c.id)).scalars().all()
                assert seqs == list(range(1, 61)), store          # applied in seq order, each once
            got = {a.account_id: (a.stored_value_fen, a.points)
                   for a in AccountStore().load_accounts(conn, CARDS.values()).values()}
        assert got == expected(all_records)
    finally:
        engine.dispose()


def test_a_new_stores_watermark_is_never_set_back_by_a_worker_holding_a_later_batch(url):
    """Two workers take a store's first two batches at the same moment. The
    one with seqs 11-20 must wait for the one applying seqs 1-10 (then apply
    its own), not find no watermark yet, hold its records past the gap and
    write a watermark of 0 over the other's: seqs 1-10 would be applied a
    second time with the next batch, and held records lost."""
    rng = random.Random(3)
    records = store_records("S9", 30, rng)
    first, second, third = (TxBatch("S9", records[i:i + 10]) for i in (0, 10, 20))
    a, b = Ledger(url), Ledger(url)
    store = a.accounts
    engine = a.engine
    try:
        later, done = None, []
        with engine.begin() as conn:        # worker A: seqs 1-10, not committed yet
            ins = db.ledger_insert(conn, "S9", first.records)
            assert store.apply_batch(conn, "S9", ins.new).applied == list(range(1, 11))
            later = threading.Thread(target=lambda: done.append(b.commit(second)))
            later.start()                   # worker B: seqs 11-20
            time.sleep(1.0)
            assert done == []               # waiting for A
        later.join(30)
        assert done and done[0].accounts.applied == list(range(11, 21))
        with engine.begin() as conn:
            assert conn.execute(select(db.account_watermarks.c.seq, db.account_watermarks.c.held_above)
                                .where(db.account_watermarks.c.store == "S9")).one() == (20, 0)
        again = a.commit(TxBatch("S9", records))
        assert again.accounts.applied == list(range(21, 31)) and again.duplicates == 20
        with engine.begin() as conn:
            assert audit(conn) == []
            got = {x.account_id: (x.stored_value_fen, x.points)
                   for x in store.load_accounts(conn, CARDS.values()).values()}
        assert got == expected(records)
    finally:
        a.close()
        b.close()


async def test_two_bridges_in_a_share_group_divide_the_stores_batches_and_apply_each_record_once(url, broker):
    """Two bridge processes' worth (two Bridges, each its own ledger
    connections and client id) in one share group on a real mosquitto: each
    store batch reaches one of them, both get work, and the accounts end as
    if one bridge had applied every record once, in seq order."""
    import asyncio

    import aiomqtt

    from hq_bridge.bridge import Bridge
    from wire.messages import Ack
    from wire.topics import Topics

    rng = random.Random(5)
    journals = {s: store_records(s, 40, rng) for s in ("S1", "S2", "S3", "S4")}
    settings = {"host": "127.0.0.1", "port": broker.port}
    ledgers = [Ledger(url), Ledger(url)]
    bridges = [Bridge(settings, ledger, client_id=f"hq-ingest-{i}", share_group="ingest")
               for i, ledger in enumerate(ledgers)]
    tasks = [asyncio.create_task(b.run()) for b in bridges]
    topics, acked = Topics(), {s: set() for s in journals}
    try:
        for b in bridges:
            await asyncio.wait_for(b.connected.wait(), 10)
        async with aiomqtt.Client("127.0.0.1", broker.port, identifier="stores") as client:
            for s in journals:
                await client.subscribe(topics.ack(s), qos=1)
            for i in range(0, 40, 5):                   # every store's batches, interleaved
                for s, records in journals.items():
                    await client.publish(topics.tx(s), TxBatch(s, records[i:i + 5]).encode(), qos=1)
            async with asyncio.timeout(60):
                async for message in client.messages:
                    ack = Ack.decode(message.payload)
                    acked[ack.store].update(seq for lo, hi in ack.acked for seq in range(lo, hi + 1))
                    if all(len(v) == 40 for v in acked.values()):
                        break
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for ledger in ledgers:
            ledger.close()
    assert all(b.stats["batches"] > 0 for b in bridges), [b.stats for b in bridges]   # both took work
    assert sum(b.stats["batches"] for b in bridges) == 32 and sum(b.stats["duplicates"] for b in bridges) == 0
    engine = db.open_engine(url)
    try:
        with engine.begin() as conn:
            assert audit(conn) == []
            assert AccountStore().watermarks(conn) == {s: 40 for s in journals}
            got = {a.account_id: (a.stored_value_fen, a.points)
                   for a in AccountStore().load_accounts(conn, CARDS.values()).values()}
        assert got == expected([r for rs in journals.values() for r in rs])
    finally:
        engine.dispose()
