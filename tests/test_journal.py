"""The journal on real files: durability, idempotency, group commit, recovery, caps."""

import asyncio

import pytest

from gateway.store.journal import (IdempotencyConflict, Journal, JournalFull, JournalIndex, encode_frame,
                                   read_index, scan_frames)


async def test_append_pending_ack_cycle(tmp_path):
    async with Journal(tmp_path / "j") as j:
        a = await j.append("sale", {"total": 100})
        b = await j.append("sale", {"total": 200})
        assert (a.seq, b.seq) == (1, 2) and a.id != b.id
        assert [r.seq for r in await j.pending()] == [1, 2]
        assert [r.seq for r in await j.pending(after_seq=1)] == [2]
        assert await j.mark_acked([1]) == 1
        assert await j.mark_acked([1]) == 0             # a duplicate ack frees nothing more
        assert [r.body for r in await j.pending()] == [{"total": 200}]
        assert (await j.backlog())["depth"] == 1


async def test_records_and_acks_survive_reopen_and_seq_never_reused(tmp_path):
    path = tmp_path / "j"
    async with Journal(path) as j:
        for i in range(5):
            await j.append("sale", {"i": i})
        await j.mark_acked([1, 2, 3])
        await j.append("sale", {"i": 5})               # the ack frame is on disk with this fsync
    async with Journal(path) as j:
        assert [r.body["i"] for r in await j.pending()] == [3, 4, 5]
        await j.mark_acked([4, 5, 6])
        await asyncio.sleep(0.05)
    async with Journal(path) as j:
        assert (await j.append("sale", {"i": 6})).seq == 7


async def test_seq_survives_compaction_of_everything(tmp_path):
    path = tmp_path / "j"
    async with Journal(path, segment_bytes=2048) as j:
        for i in range(40):
            await j.append("sale", {"i": i, "pad": "x" * 100})
        await j.mark_acked(list(range(1, 41)))
        segments_left = len(list(path.glob("*.log")))
    assert segments_left <= 2                            # compacted: acked segments deleted
    async with Journal(path) as j:
        assert await j.pending() == []
        assert (await j.append("sale", {})).seq == 41    # the segment header kept the high-water mark


async def test_idempotency(tmp_path):
    async with Journal(tmp_path / "j") as j:
        req = {"lines": [1]}
        first, again = await asyncio.gather(  # concurrent retries of one request: one record
            j.append("sale", {"x": 1}, idempotency_key="k-000001", request=req, response={"total": 5}),
            j.append("sale", {"x": 1}, idempotency_key="k-000001", request=req, response={"total": 5}))
        assert again.duplicate and again.seq == first.seq and again.response == first.response
        assert (await j.lookup("k-000001", req)).seq == first.seq
        assert await j.lookup("k-000002", req) is None
        with pytest.raises(IdempotencyConflict):
            await j.append("sale", {"x": 2}, idempotency_key="k-000001", request={"lines": [2]})
        assert len(await j.pending()) == 1
    async with Journal(tmp_path / "j") as j:              # keys survive a restart
        assert (await j.lookup("k-000001", req)).response["total"] == 5


async def test_concurrent_lanes_share_fsyncs(tmp_path):
    async with Journal(tmp_path / "j") as j:
        results = await asyncio.gather(*(j.append("sale", {"n": n}) for n in range(200)))
        assert sorted(r.seq for r in results) == list(range(1, 201))
        assert j.stats["appends"] == 200
        assert j.stats["groups"] < 100                  # group commit: far fewer fsyncs than records


async def test_torn_tail_is_cut_without_a_fault(tmp_path):
    path = tmp_path / "j"
    async with Journal(path) as j:
        for i in range(10):
            await j.append("sale", {"i": i})
    seg = sorted(path.glob("*.log"))[-1]
    frame = encode_frame({"k": "r", "seq": 11, "id": "x" * 32, "type": "sale", "ts": 1, "body": {}})
    with open(seg, "ab") as f:
        f.write(frame[: len(frame) // 2])                # power cut in the middle of a write
    async with Journal(path) as j:
        assert j.faults == []
        assert len(await j.pending(limit=100)) == 10
        assert (await j.append("sale", {})).seq == 11


async def test_damage_inside_a_segment_is_set_aside_and_the_rest_recovered(tmp_path):
    path = tmp_path / "j"
    async with Journal(path) as j:
        for i in range(50):
            await j.append("sale", {"i": i, "pad": "x" * 100})
    seg = sorted(path.glob("*.log"))[-1]
    data = bytearray(seg.read_bytes())
    at = data.index(b'"i":20,')
    data[at: at + 300] = b"\x00" * 300                   # wreck records 21-22 in the middle
    seg.write_bytes(bytes(data))
    async with Journal(path) as j:
        assert j.faults and "set aside" in j.faults[0]
        assert list(path.glob("*.damaged-*"))            # the damaged copy is never deleted
        recovered = [r.body["i"] for r in await j.pending(limit=100)]
        assert recovered[:20] == list(range(20)) and recovered[-1] == 49
        assert 45 <= len(recovered) < 50                 # everything intact, nothing invented
        assert (await j.append("sale", {})).seq == 51    # never reuses a sequence number


async def test_cap_refuses_appends_clearly_and_keeps_everything(tmp_path):
    async with Journal(tmp_path / "j", max_bytes=4096, segment_bytes=1024) as j:
        done = 0
        with pytest.raises(JournalFull, match="cap"):
            for i in range(100):
                await j.append("sale", {"i": i, "pad": "x" * 200})
                done += 1
        assert 5 < done < 20
        assert [r.body["i"] for r in await j.pending(limit=100)] == list(range(done))
        await j.mark_acked(list(range(1, done + 1)))
    async with Journal(tmp_path / "j", max_bytes=4096, segment_bytes=1024) as j:
        assert (await j.backlog())["depth"] == 0


async def test_disk_full_leaves_no_half_frame(tmp_path):
    """A real file-size limit (RLIMIT_FSIZE: EFBIG, like ENOSPC) hit when the
    next segment's space is allocated: a clear JournalFull, nothing half-written."""
    import resource
    import signal

    async with Journal(tmp_path / "j", segment_bytes=2048) as j:
        await j.append("sale", {"i": 0})
        old = resource.getrlimit(resource.RLIMIT_FSIZE)
        old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1000, old[1]))
        try:
            with pytest.raises(JournalFull, match="disk is full"):
                for i in range(1, 40):
                    await j.append("sale", {"i": i, "pad": "y" * 100})
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, old)
            signal.signal(signal.SIGXFSZ, old_handler)
        ok = await j.append("sale", {"i": "after"})
    index = read_index(tmp_path / "j")
    assert ok.seq in index.pending and len(index.pending) >= 2
    for p in (tmp_path / "j").glob("*.log"):             # every byte on disk is an intact frame or zero
        buf = p.read_bytes()
        end = sum(length for _o, length, _f in scan_frames(buf))
        assert not buf[end:].strip(b"\0")


def test_index_is_plain_data():
    idx = JournalIndex()
    for seq in (1, 2, 3, 5):
        idx.on_record({"seq": seq, "ts": 0}, 1, seq * 10, 10)
    assert idx.after(0, 10) == [1, 2, 3, 5] and idx.after(2, 1) == [3]
    assert idx.on_ack([[2, 3]]) == 2 and idx.after(0, 10) == [1, 5]
    assert idx.on_ack([[1, 100]]) == 2 and idx.next_seq == 6       # an ack never moves the next seq


async def test_compaction_carries_idempotency_keys_forward(tmp_path):
    path = tmp_path / "j"
    async with Journal(path, segment_bytes=1024) as j:
        for i in range(30):
            await j.append("sale", {"i": i, "pad": "z" * 60}, idempotency_key=f"key-{i:04d}", request={"i": i},
                           response={"total": i})
        record_segments = {loc[0] for loc in j.index.pending.values()}
        await j.mark_acked(list(range(1, 31)))
        left = {int(p.stem) for p in path.glob("*.log")}
        assert not (record_segments - {j._files.active}) & left  # acked segments are gone...
        assert (await j.lookup("key-0003", {"i": 3})).response["total"] == 3   # ...their keys are not
    async with Journal(path, segment_bytes=1024) as j:
        again = await j.append("sale", {}, idempotency_key="key-0005", request={"i": 5})
        assert again.duplicate and again.seq == 6
        assert (await j.append("sale", {})).seq == 31


async def test_a_cancelled_caller_does_not_lose_or_double_its_record(tmp_path):
    """The POS hung up while its sale was being written: the record is still
    indexed (and sent), and the POS's retry with the same key finds it."""
    async with Journal(tmp_path / "j") as j:
        task = asyncio.create_task(j.append("sale", {"x": 1}, idempotency_key="k-cancel-1", request={"a": 1},
                                            response={"total": 1}))
        await asyncio.sleep(0)        # queued for the writer
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        retry = await j.append("sale", {"x": 1}, idempotency_key="k-cancel-1", request={"a": 1})
        assert retry.duplicate and retry.seq == 1
        assert [r.seq for r in await j.pending()] == [1]


@pytest.mark.parametrize("direct,zero_ahead", [(True, 1 << 20), (False, 1 << 20), (True, 4096), (False, 8192)])
async def test_sector_writes_keep_every_frame_intact(tmp_path, monkeypatch, direct, zero_ahead):
    """Groups of every size, crossing 512-byte sectors, 4 KiB pages and the
    zeroed-ahead horizon: with O_DIRECT the partial last sector is rewritten
    on each group, zeros go ahead of the frames; nothing already written may
    change, and everything reads back after a restart."""
    import gateway.store.journal.segments as journal_module

    monkeypatch.setattr(journal_module, "ZERO_AHEAD", zero_ahead)
    path = tmp_path / "j"
    bodies = []
    async with Journal(path, direct=direct) as j:
        if direct and not j.direct_io:
            pytest.skip("this file system refuses O_DIRECT")
        n = 0
        for group in (1, 3, 1, 8, 2, 17, 1, 5):
            batch = [{"n": n + i, "pad": "q" * ((n + i) * 37 % 900)} for i in range(group)]
            n += group
            before = {p: p.read_bytes() for p in path.glob("*.log")}
            await asyncio.gather(*(j.append("sale", b) for b in batch))
            bodies += batch
            for p, old in before.items():                 # what was on disk is unchanged
                end = sum(length for _o, length, _f in scan_frames(old))
                assert p.read_bytes()[:end] == old[:end]
    async with Journal(path, direct=direct) as j:
        assert [r.body for r in await j.pending(limit=1000)] == bodies
    for p in path.glob("*.log"):
        buf = p.read_bytes()
        end = sum(length for _o, length, _f in scan_frames(buf))
        assert not buf[end:].strip(b"\0")                # past the frames only zeros


async def test_a_refused_direct_write_falls_back_to_buffered_writes(tmp_path, monkeypatch):
    """Some file systems accept O_DIRECT at open and refuse the write (EINVAL):
    the record still goes to disk, buffered, and nothing is lost or torn."""
    import gateway.store.journal.segments as journal_module

    async with Journal(tmp_path / "j", direct=True) as j:
        if not j.direct_io:
            pytest.skip("this file system refuses O_DIRECT at open already")
        first = await j.append("sale", {"i": 0})

        def refuse(*_a, **_k):
            raise OSError(22, "Invalid argument")
        monkeypatch.setattr(journal_module.os, "pwritev", refuse)
        rest = await asyncio.gather(*(j.append("sale", {"i": i}) for i in range(1, 4)))
        assert not j.direct_io
        last = await j.append("sale", {"i": 4})
    monkeypatch.undo()
    async with Journal(tmp_path / "j") as j:
        assert [r.seq for r in await j.pending()] == [first.seq] + [r.seq for r in rest] + [last.seq]


@pytest.mark.parametrize("writer", ["inline", "thread"])
async def test_both_writers_group_index_and_recover_the_same_way(tmp_path, writer):
    async with Journal(tmp_path / "j", writer=writer) as j:
        results = await asyncio.gather(*(j.append("sale", {"n": n}, idempotency_key=f"key-{n:04d}", request={"n": n})
                                         for n in range(50)))
        again = await j.append("sale", {"n": 7}, idempotency_key="key-0007", request={"n": 7})
        assert again.duplicate and again.seq == results[7].seq
        assert j.stats["appends"] == 50 and j.stats["groups"] < 50
        await j.mark_acked([r.seq for r in results[:10]])
    async with Journal(tmp_path / "j", writer=writer) as j:
        assert [r.body["n"] for r in await j.pending(limit=100)] == list(range(10, 50))
        assert (await j.lookup("key-0003", {"n": 3})).seq == results[3].seq


async def test_stored_answers_are_whole_after_a_restart_in_both_frame_formats(tmp_path):
    """New frames keep the stored answer without seq and tx_id (the frame has
    them) and a 128-bit request hash; frames written before that carry the
    whole answer and a 256-bit hash. Both answer retries the same way."""
    import hashlib

    import orjson

    path = tmp_path / "j"
    async with Journal(path) as j:
        first = await j.append("sale", {"x": 1}, idempotency_key="k-new-0001", request={"r": 1},
                               response={"total": 5})
    seg = sorted(path.glob("*.log"))[-1]
    stored = [f for _o, _l, f in scan_frames(seg.read_bytes()) if f.get("k") == "r"][0]
    assert stored["resp"] == {"total": 5} and len(stored["rh"]) == 32
    old_hash = hashlib.sha256(orjson.dumps({"r": 2}, option=orjson.OPT_SORT_KEYS)).hexdigest()
    old = encode_frame({"k": "r", "seq": 2, "id": "b" * 32, "type": "sale", "ts": 1, "body": {},
                        "key": "k-old-0001", "rh": old_hash, "resp": {"total": 7, "seq": 2, "tx_id": "b" * 32}})
    end = sum(length for _o, length, _f in scan_frames(seg.read_bytes()))
    with open(seg, "r+b") as f:
        f.seek(end)
        f.write(old)
    async with Journal(path) as j:
        again = await j.append("sale", {"x": 1}, idempotency_key="k-new-0001", request={"r": 1})
        assert again.duplicate and again.response == first.response == {"total": 5, "seq": 1, "tx_id": first.id}
        legacy = await j.lookup("k-old-0001", {"r": 2})
        assert legacy.response == {"total": 7, "seq": 2, "tx_id": "b" * 32}
        with pytest.raises(IdempotencyConflict):
            await j.lookup("k-old-0001", {"r": 3})


async def test_direct_appends_sync_in_the_write_or_fall_back_to_fdatasync(tmp_path, monkeypatch):
    """A direct append is made durable by its own write (RWF_DSYNC) with no
    separate fdatasync; a kernel that refuses the flag gets the fdatasync."""
    import os

    import gateway.store.journal.segments as journal_module

    if not journal_module.RWF_DSYNC:
        pytest.skip("no RWF_DSYNC on this platform")
    syncs, flags_seen = [], []
    real_fdatasync, real_pwritev = os.fdatasync, os.pwritev

    def counting_fdatasync(fd):
        syncs.append(fd)
        real_fdatasync(fd)

    def recording_pwritev(fd, buffers, offset, *flags):
        flags_seen.append(flags[0] if flags else 0)
        return real_pwritev(fd, buffers, offset, *flags)

    async with Journal(tmp_path / "j") as j:
        if not j.direct_io:
            pytest.skip("this file system refuses O_DIRECT")
        monkeypatch.setattr(journal_module.os, "fdatasync", counting_fdatasync)
        monkeypatch.setattr(journal_module.os, "pwritev", recording_pwritev)
        await asyncio.gather(*(j.append("sale", {"i": i}) for i in range(5)))
        assert syncs == [] and journal_module.RWF_DSYNC in flags_seen

        def refusing_pwritev(fd, buffers, offset, *flags):
            if flags:
                raise OSError(95, "Operation not supported")
            return real_pwritev(fd, buffers, offset)
        monkeypatch.setattr(journal_module.os, "pwritev", refusing_pwritev)
        await j.append("sale", {"i": 5})
        assert len(syncs) == 1 and not j._files.rwf_dsync
        await j.append("sale", {"i": 6})
        assert len(syncs) == 2
    monkeypatch.undo()
    async with Journal(tmp_path / "j") as j:
        assert [r.body["i"] for r in await j.pending()] == list(range(7))


async def test_a_new_journal_directory_is_made_durable_in_its_parent(tmp_path, monkeypatch):
    """A power cut right after the first sale must not lose the directory
    entry of a journal that made its directory itself (tests/test_power_cut.py
    cuts the power to show it; here, which directories get synced)."""
    import gateway.store.durable as durable
    import gateway.store.journal.segments as segments

    synced = []
    real = durable.sync_dir
    for module in (durable, segments):
        monkeypatch.setattr(module, "sync_dir", lambda d: synced.append(d) or real(d))
    async with Journal(tmp_path / "data" / "journal") as j:
        await j.append("sale", {})
        await j.set_aside(1, "a test")
    assert tmp_path in synced and tmp_path / "data" in synced          # each new directory's entry
    assert tmp_path / "data" / "journal" in synced                     # the unsendable/ entry, the segment's
