"""Idempotency keys and their stored first answers over a store's day: kept
for a day, carried out of a deleted segment once (into its key file), and
never at the expense of the records (invariants 7 and 8 of
gateway.store.journal)."""

import asyncio
import os
import shutil
from pathlib import Path

import pytest

from gateway.store.journal import IDEMPOTENCY_RETENTION_S, Journal, JournalFull, read_index

ANSWER = {"receipt": [{"line": i, "text": "收银小票 " + "x" * 60} for i in range(40)]}  # ~4 KB, as a large basket's


def written_bytes() -> int:
    """What this process has caused to be written to storage."""
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("write_bytes:"))


def segments_opened(path: Path) -> int:
    return max(int(p.stem) for p in path.glob("*.log"))


class Clock:
    def __init__(self, t: float = 1_790_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


async def sell(j: Journal, n: int, first: int = 0) -> list:
    """n sales, four lanes at a time, each with its key and stored answer."""
    done = []
    for at in range(first, first + n, 4):
        done += await asyncio.gather(*(j.append("sale", {"sale": i, "lines": ["6901234567892"] * 20},
                                                idempotency_key=f"pos-{i:06d}", request={"sale": i}, response=ANSWER)
                                       for i in range(at, min(at + 4, first + n))))
    return done


@pytest.mark.skipif(not os.path.exists("/proc/self/io"), reason="no /proc/self/io to count bytes written")
async def test_a_busy_day_writes_as_much_per_sale_late_as_early(tmp_path):
    """A busy store: every sale's stored answer is as large as a 40-line
    receipt, HQ acks as the sales go, and the day's keys soon outgrow a
    segment (here after ~15 sales). Carried out of a deleted segment once,
    they cost each sale the same late in the day as early: bytes written
    and segments opened per sale stay flat. (They once were copied into a
    new segment at every ack: writes per sale grew with the day's volume.)"""
    path = tmp_path / "j"
    marks = []
    async with Journal(path, segment_bytes=64 << 10) as j:
        for batch in range(40):
            done = await sell(j, 15, first=batch * 15)
            await j.mark_acked([r.seq for r in done])
            marks.append((written_bytes(), segments_opened(path)))
        assert (await j.lookup("pos-000003", {"sale": 3})).response["receipt"] == ANSWER["receipt"]
    quarter = len(marks) // 4
    early = [b - a for a, b in zip(marks[quarter], marks[2 * quarter])]  # 150 sales, once the first segments went
    late = [b - a for a, b in zip(marks[-1 - quarter], marks[-1])]        # the last 150 sales
    assert late[0] <= 1.5 * early[0], f"bytes written per sale grew from {early[0] / 150:.0f} to {late[0] / 150:.0f}"
    assert late[1] <= 1.5 * early[1] + 1, f"segments opened grew from {early[1]} to {late[1]} per 150 sales"


async def test_keys_outlive_their_segment_for_a_day_then_go(tmp_path):
    clock = Clock()
    path = tmp_path / "j"
    async with Journal(path, segment_bytes=16 << 10, clock=clock) as j:
        done = await sell(j, 12)
        await j.mark_acked([r.seq for r in done])
        key_files = sorted(p.name for p in path.glob("*.keys"))
        assert key_files and not set(path.glob("*.log")) & {path / f.replace(".keys", ".log") for f in key_files}
        clock.t += IDEMPOTENCY_RETENTION_S - 60
        later = await sell(j, 1, first=100)
        await j.mark_acked([later[0].seq])
        assert sorted(p.name for p in path.glob("*.keys"))[:len(key_files)] == key_files  # still within the day
        assert (await j.lookup("pos-000004", {"sale": 4})).seq == done[4].seq
    async with Journal(path, segment_bytes=16 << 10, clock=clock) as j:   # across a restart too
        again = await j.append("sale", {}, idempotency_key="pos-000004", request={"sale": 4})
        assert again.duplicate and again.seq == done[4].seq and again.response["receipt"] == ANSWER["receipt"]
        clock.t += 120                                                     # a day after the sales
        last = await sell(j, 1, first=200)
        await j.mark_acked([last[0].seq])
        assert not set(p.name for p in path.glob("*.keys")) & set(key_files)  # their key files are gone
        assert await j.lookup("pos-000004", {"sale": 4}) is None
        assert (await j.lookup("pos-000100", {"sale": 100})).seq == later[0].seq  # younger keys stay


async def test_a_crash_between_writing_the_keys_and_deleting_the_segment(tmp_path):
    """Both the segment and its key file are on disk: the keys answer, once,
    and the next compaction deletes the segment without copying them again."""
    path = tmp_path / "j"
    async with Journal(path, segment_bytes=16 << 10) as j:
        done = await sell(j, 12)
        await j.mark_acked([r.seq for r in done[:6]])
    stash = tmp_path / "stash"
    shutil.copytree(path, stash)
    async with Journal(path, segment_bytes=16 << 10) as j:
        await j.mark_acked([r.seq for r in done[6:]])
        gone = sorted(p.name for p in stash.glob("*.log") if not (path / p.name).exists())
        keyed = [p.name.replace(".keys", ".log") for p in path.glob("*.keys") if not (stash / p.name).exists()]
        assert keyed and set(keyed) <= set(gone)                           # written as their segments went
    for name in gone:                                                      # the crash: the unlink never happened
        shutil.copy(stash / name, path / name)
    before = {p.name: p.stat().st_mtime_ns for p in path.glob("*.keys")}
    async with Journal(path, segment_bytes=16 << 10) as j:
        assert j.faults == [] and await j.pending() == []
        assert len(j.index.idempotency) == 12
        assert (await j.lookup("pos-000007", {"sale": 7})).seq == done[7].seq
        await j.mark_acked([(await j.append("sale", {})).seq])
        assert not any((path / g).exists() for g in gone)
        assert {p.name: p.stat().st_mtime_ns for p in path.glob("*.keys")} == before  # not written again
    assert len(read_index(path).idempotency) == 12


async def test_records_come_first_keys_wait_in_memory_for_room(tmp_path):
    """At the cap, acked segments are deleted to make room for sales even
    when their keys find no room in a key file: the keys stay in memory (a
    retry still gets its first answer) until there is room for them."""
    path = tmp_path / "j"
    async with Journal(path, segment_bytes=16 << 10, max_bytes=64 << 10) as j:
        done = []
        with pytest.raises(JournalFull, match="cap"):
            for i in range(100):
                done += await sell(j, 1, first=i)
        await j.mark_acked([r.seq for r in done])
        waiting = set(j._keys_in_memory)
        assert waiting and not any((path / f"{n:08d}.keys").exists() for n in waiting)
        more = await sell(j, 2, first=500)                                 # the sales go on
        assert [(await j.lookup(f"pos-{i:06d}", {"sale": i})).seq for i in range(len(done))] == [r.seq for r in done]
        assert (await j.backlog())["bytes"] <= 64 << 10
        j._files.max_bytes = 1 << 30                                      # room at last (a larger cap)
        await j.mark_acked([r.seq for r in more])
        assert not j._keys_in_memory and all((path / f"{n:08d}.keys").exists() for n in waiting)
    async with Journal(path) as j:
        assert [(await j.lookup(f"pos-{i:06d}", {"sale": i})).seq for i in range(len(done))] == [r.seq for r in done]


async def test_an_expired_key_is_a_new_request(tmp_path):
    clock = Clock()
    async with Journal(tmp_path / "j", clock=clock) as j:
        first = (await sell(j, 1))[0]
        clock.t += IDEMPOTENCY_RETENTION_S + 1
        await j.mark_acked([first.seq])                                    # compaction forgets the day-old key
        again = (await sell(j, 1))[0]
        assert not again.duplicate and again.seq == first.seq + 1
