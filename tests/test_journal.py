"""The journal on a real SQLite file: durability, idempotency, group commit, recovery."""

import asyncio
import sqlite3

import pytest

from gateway.journal import IdempotencyConflict, Journal


async def test_append_pending_ack_cycle(tmp_path):
    async with Journal(tmp_path / "j.sqlite3") as j:
        a = await j.append("sale", {"total": 100})
        b = await j.append("sale", {"total": 200})
        assert (a.seq, b.seq) == (1, 2) and a.id != b.id
        assert [r.seq for r in await j.pending()] == [1, 2]
        assert [r.seq for r in await j.pending(after_seq=1)] == [2]
        assert await j.mark_acked([1]) == 1
        assert await j.mark_acked([1]) == 0             # a duplicate ack frees nothing more
        assert [r.body for r in await j.pending()] == [{"total": 200}]
        assert (await j.backlog())["depth"] == 1


async def test_records_survive_reopen_and_seq_never_reused(tmp_path):
    path = tmp_path / "j.sqlite3"
    async with Journal(path) as j:
        for i in range(3):
            await j.append("sale", {"i": i})
        await j.mark_acked([1, 2, 3])
    async with Journal(path) as j:
        assert await j.pending() == []
        assert (await j.append("sale", {"i": 3})).seq == 4


async def test_idempotency(tmp_path):
    async with Journal(tmp_path / "j.sqlite3") as j:
        req = {"lines": [1]}
        first = await j.append("sale", {"x": 1}, idempotency_key="k-000001", request=req, response={"total": 5})
        again = await j.append("sale", {"x": 1}, idempotency_key="k-000001", request=req, response={"total": 5})
        assert again.duplicate and again.seq == first.seq and again.response == first.response
        assert (await j.lookup("k-000001", req)).seq == first.seq
        assert await j.lookup("k-000002", req) is None
        with pytest.raises(IdempotencyConflict):
            await j.append("sale", {"x": 2}, idempotency_key="k-000001", request={"lines": [2]})
        assert len(await j.pending()) == 1


async def test_concurrent_lanes_share_commits(tmp_path):
    async with Journal(tmp_path / "j.sqlite3") as j:
        results = await asyncio.gather(*(j.append("sale", {"n": n}) for n in range(200)))
        assert sorted(r.seq for r in results) == list(range(1, 201))
        assert j.stats["commits"] == 200
        assert j.stats["groups"] < 200                  # group commit: fewer fsyncs than records


async def test_damaged_journal_is_set_aside_and_intact_records_recovered(tmp_path):
    path = tmp_path / "j.sqlite3"
    async with Journal(path) as j:
        for i in range(50):
            await j.append("sale", {"i": i, "pad": "x" * 200})
        await j.mark_acked(list(range(1, 11)))
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    data = bytearray(path.read_bytes())
    page = 4096
    at = data.index(b'"i":30,') // page * page
    data[at + 8: at + page] = b"\xff" * (page - 8)           # wreck the leaf page holding record 31
    path.write_bytes(bytes(data))
    async with Journal(path) as j:
        assert j.faults and "set aside" in j.faults[0]
        assert list(tmp_path.glob("j.sqlite3.damaged-*"))     # never deleted
        recovered = [r.body["i"] for r in await j.pending(limit=100)]
        assert 0 < len(recovered) < 40                          # the intact ones, not the wrecked page
        assert all(isinstance(i, int) and 10 <= i < 50 for i in recovered)
        nxt = await j.append("sale", {"i": "after"})
        assert nxt.seq > 50                                     # never reuses a sequence number


async def test_corrupt_file_that_is_not_a_database(tmp_path):
    path = tmp_path / "j.sqlite3"
    path.write_bytes(b"this is not a database" * 100)
    async with Journal(path) as j:
        assert j.faults
        assert (await j.append("sale", {})).seq == 1
    assert (tmp_path.glob("j.sqlite3.damaged-*"))
