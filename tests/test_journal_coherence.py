"""Reads of the journal are coherent with its O_DIRECT appends: every
committed record reads back identical while lanes keep appending to the same
sectors, through the journal's own pending() and through read_index() from
another process (as tests/support.py does against a running gateway)."""

import asyncio
import json
import mmap
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

from gateway.store.journal import Journal, read_index

LANES = 8
PER_LANE = 300
WATERMARK = struct.Struct("<qq")  # (every seq up to this one is committed, stop flag)


def body(lane: int, k: int) -> dict:
    # Sizes vary so frames straddle 512-byte sectors and 4 KiB pages at many offsets.
    return {"lane": lane, "k": k, "pad": f"{lane}-{k}-" + "x" * ((lane * 131 + k * 37) % 700)}


class Committed:
    """Seqs whose append() returned, and the highest seq below which none is missing."""

    def __init__(self) -> None:
        self.seqs: set[int] = set()
        self.upto = 0

    def add(self, seq: int) -> None:
        self.seqs.add(seq)
        while self.upto + 1 in self.seqs:
            self.upto += 1


async def append_lanes(j: Journal, committed: Committed, on_commit=None) -> None:
    async def lane(i: int) -> None:
        for k in range(PER_LANE):
            result = await j.append("sale", body(i, k))
            committed.add(result.seq)
            if on_commit:
                on_commit()
    await asyncio.gather(*(lane(i) for i in range(LANES)))


def direct_or_skip(j: Journal) -> None:
    if not j.direct_io:
        pytest.skip("this file system refuses O_DIRECT: reads and writes are both buffered")


@pytest.mark.parametrize("writer", ["inline", "thread"])
async def test_pending_reads_back_every_committed_record_during_direct_appends(tmp_path, writer):
    committed = Committed()
    checked = reads = 0
    async with Journal(tmp_path / "j", direct=True, writer=writer, segment_bytes=256 << 10) as j:
        direct_or_skip(j)
        appenders = asyncio.create_task(append_lanes(j, committed))
        while not appenders.done() or reads < 50:
            upto = committed.upto
            # The tail, where the writer is rewriting the partial last sector; now and then everything.
            after = 0 if reads % 10 == 0 else max(0, upto - 40)
            records = await j.pending(after, 500)
            reads += 1
            seqs = [r.seq for r in records]
            assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
            expected = [s for s in range(after + 1, upto + 1)][:len(records)]
            assert seqs[:len(expected)] == expected, "a committed record is missing"
            for r in records:
                assert r.type == "sale" and r.body == body(r.body["lane"], r.body["k"])
                checked += 1
            await asyncio.sleep(0)
        await appenders
        assert committed.upto == LANES * PER_LANE
        everything = await j.pending(0, LANES * PER_LANE + 1)
        assert sorted((r.body["lane"], r.body["k"]) for r in everything) == \
            [(i, k) for i in range(LANES) for k in range(PER_LANE)]
    assert reads >= 50 and checked > LANES * PER_LANE


CHILD = textwrap.dedent("""
    import json, mmap, struct, sys
    from gateway.store.journal import decode_frame, read_index, read_segment

    directory, shared = sys.argv[1], sys.argv[2]
    mark = struct.Struct("<qq")
    with open(shared, "r+b") as f:
        m = mmap.mmap(f.fileno(), mark.size)
    passes = checked = 0
    problems = []
    while True:
        upto, stop = mark.unpack_from(m, 0)
        index = read_index(directory)
        missing = [s for s in range(1, upto + 1) if s not in index.pending]
        if missing:
            problems.append(f"pass {passes}: {len(missing)} committed record(s) missing, first {missing[0]}")
        segments = {}
        for seq, (segment, offset, length, _ts) in sorted(index.pending.items()):
            if seq > upto:
                continue
            if segment not in segments:
                segments[segment] = read_segment(f"{directory}/{segment:08d}.log")
            frame = decode_frame(segments[segment], offset, length)
            b = frame and frame["body"]
            if not b or frame["seq"] != seq or b["pad"] != f"{b['lane']}-{b['k']}-" + "x" * ((b["lane"] * 131 + b["k"] * 37) % 700):
                problems.append(f"pass {passes}: record {seq} reads back wrong")
            checked += 1
        passes += 1
        if stop or len(problems) > 20:
            break
    print(json.dumps({"passes": passes, "checked": checked, "problems": problems}))
""")


@pytest.mark.parametrize("writer", ["inline", "thread"])
async def test_read_index_from_another_process_sees_every_committed_record(tmp_path, writer):
    shared = tmp_path / "watermark"
    shared.write_bytes(bytes(WATERMARK.size))
    with open(shared, "r+b") as f:
        mark = mmap.mmap(f.fileno(), WATERMARK.size)
    committed = Committed()
    async with Journal(tmp_path / "j", direct=True, writer=writer, segment_bytes=256 << 10) as j:
        direct_or_skip(j)
        child = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path / "j"), str(shared)],
                                 stdout=subprocess.PIPE, cwd=Path(__file__).resolve().parent.parent)
        try:
            await append_lanes(j, committed, lambda: WATERMARK.pack_into(mark, 0, committed.upto, 0))
            # A few more passes over the whole journal once the appends have stopped.
            await asyncio.sleep(0.3)
        finally:
            WATERMARK.pack_into(mark, 0, committed.upto, 1)
            out, _ = await asyncio.to_thread(child.communicate, timeout=60)
    assert child.returncode == 0
    result = json.loads(out)
    assert result["problems"] == []
    assert result["passes"] >= 3 and result["checked"] > 0


async def test_a_backlog_is_read_in_few_large_reads(tmp_path, monkeypatch):
    """The drain asks for up to 500 records at a time: consecutive frames come
    in with one read, not one per record."""
    import gateway.store.journal.segments as journal_module

    async with Journal(tmp_path / "j") as j:
        await asyncio.gather(*(j.append("sale", body(0, k)) for k in range(500)))
        await j.mark_acked(list(range(1, 500, 7)))  # ack frames and holes between the pending records
        calls = []
        real_preadv, real_pread = journal_module.os.preadv, journal_module.os.pread
        monkeypatch.setattr(journal_module.os, "preadv", lambda *a: calls.append(a) or real_preadv(*a))
        monkeypatch.setattr(journal_module.os, "pread", lambda *a: calls.append(a) or real_pread(*a))
        records = await j.pending(0, 500)
        assert len(records) == 500 - len(range(1, 500, 7))
        assert all(r.body == body(0, r.body["k"]) for r in records)
        assert len(calls) == 1


@pytest.mark.parametrize("refuse", ["unaligned to 4 KiB", "always"])
async def test_reads_fall_back_when_o_direct_is_refused(tmp_path, monkeypatch, refuse):
    """A device with 4 KiB logical sectors refuses 512-byte O_DIRECT reads,
    some file systems refuse O_DIRECT reads altogether (EINVAL): reads then
    use 4 KiB alignment, or go buffered, and still return every record."""
    import gateway.store.journal.segments as journal_module

    path = tmp_path / "j"
    async with Journal(path) as j:
        expected = [body(1, k) for k in range(40)]
        for b in expected:
            await j.append("sale", b)
        real_preadv = journal_module.os.preadv

        def preadv(fd, buffers, offset):
            if refuse == "always" or offset % 4096 or sum(len(b) for b in buffers) % 4096:
                raise OSError(22, "Invalid argument")
            return real_preadv(fd, buffers, offset)
        monkeypatch.setattr(journal_module.os, "preadv", preadv)
        for after in (0, 3, 17, 39):
            assert [r.body for r in await j.pending(after, 100)] == expected[after:]
        assert {f.align for f in j._files.reader.files.values()} == {0 if refuse == "always" else 4096}
        assert sorted(read_index(path).pending) == list(range(1, 41))
    async with Journal(path) as j:  # recovery reads the same way
        assert [r.body for r in await j.pending(0, 100)] == expected


async def test_tmpfs_journal_reads_and_writes(tmp_path):
    """tmpfs: O_DIRECT is refused before Linux 6.6 (both sides go buffered), a no-op since."""
    shm = Path("/dev/shm")
    if not shm.is_dir() or not os.access(shm, os.W_OK):
        pytest.skip("no writable /dev/shm")
    path = Path(tempfile.mkdtemp(prefix="sg-journal-", dir=shm))
    try:
        async with Journal(path, direct=True, segment_bytes=1 << 20) as j:
            results = await asyncio.gather(*(j.append("sale", body(2, k)) for k in range(50)))
            assert [r.body for r in await j.pending(0, 100)] == [body(2, k) for k in range(50)]
            assert sorted(read_index(path).pending) == [r.seq for r in results]
    finally:
        shutil.rmtree(path, ignore_errors=True)
