"""A journal written before the journal became a package opens as it was.

tests/fixtures/journal_before_split/ was written by gateway/journal.py as of
commit 9aa8550 (segment_bytes=4096, a clock from 1_790_000_000 s, one
second a record): 24 sales with idempotency keys (seq 1-24), seqs 1-12
acked, so their segment was deleted and their keys carried forward as "i"
frames into the active segment; six returns without keys (25-30); seqs 14,
15 and 26 acked; then a second run: one more sale with a key (31), seq 16
acked. That version also left a segment holding only its header (6), opened
by a hand-over scheduled before it closed."""

import shutil
from pathlib import Path

import pytest

from gateway.store.journal import Journal, read_index

FIXTURE = Path(__file__).parent / "fixtures" / "journal_before_split"
PENDING = [13, 17, 18, 19, 20, 21, 22, 23, 24, 25, 27, 28, 29, 30, 31]
T0 = 1_790_000_000.0


@pytest.fixture
def old_journal(tmp_path):
    path = tmp_path / "journal"
    shutil.copytree(FIXTURE, path)
    return path


def sale_key(i: int) -> tuple[str, dict]:
    return f"fix-key-{i:03d}", {"i": i}


async def test_a_journal_written_before_the_split_opens_with_everything_in_it(old_journal):
    assert sorted(read_index(old_journal).pending) == PENDING
    async with Journal(old_journal, segment_bytes=4096, clock=lambda: T0 + 100) as j:
        assert j.faults == []
        records = await j.pending(limit=100)
        assert [r.seq for r in records] == PENDING
        assert [r.type for r in records] == ["sale"] * 9 + ["return"] * 5 + ["sale"]
        assert [r.body["i"] for r in records] == [s - 1 for s in PENDING]
        for i in range(24):                                   # every key: carried forward ("i") or in its record
            key, request = sale_key(i)
            again = await j.append("sale", {}, idempotency_key=key, request=request)
            assert again.duplicate and again.seq == i + 1
            assert again.response["total"] == 100 + i and again.response["receipt"] == ["line"] * 3
        key, request = sale_key(30)
        assert (await j.lookup(key, request)).response == {"total": 130, "seq": 31,
                                                           "tx_id": records[-1].id}
        assert (await j.append("sale", {"i": 31})).seq == 32  # never reuses a sequence number


async def test_acking_an_old_journal_carries_its_keys_once_and_keeps_them(old_journal):
    async with Journal(old_journal, segment_bytes=4096, clock=lambda: T0 + 100) as j:
        await j.mark_acked(PENDING)
        assert await j.pending() == [] and sorted(p.name for p in old_journal.glob("*.log")) == ["00000007.log"]
        assert sorted(p.name for p in old_journal.glob("*.keys")) == ["00000002.keys", "00000003.keys",
                                                                        "00000005.keys"]
    async with Journal(old_journal, segment_bytes=4096, clock=lambda: T0 + 200) as j:
        assert await j.pending() == []
        for i in (*range(24), 30):
            key, request = sale_key(i)
            assert (await j.lookup(key, request)).seq == i + 1
        assert (await j.append("sale", {})).seq == 32
