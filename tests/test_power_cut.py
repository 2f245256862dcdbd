"""Power cuts, proven: the gateway's whole data directory lives on the
power-cut file system (tests/powercut/), which keeps every write in memory
until it is synced and, on a cut, throws away everything that was not
(sometimes tearing the last write at a sector or byte). SIGKILL alone keeps
the kernel's page cache, so it never loses an unsynced write; this does.

Under a three-lane POS load, at random moments: the power fails (the file
system freezes; the gateway is SIGKILLed, before or after), everything not
durable is dropped, the file system is mounted afresh, the gateway restarts.
After every cut: every sale the POS was told was committed is in the journal
(at its seq, under its id) or already at HQ; the journal's frames are intact
up to a cut-off tail, no sequence number is reused, the journal's own index
(read_index) agrees with the frames, the new segment starts past every seq
ever handed out, and the gateway opens without reporting damage. At the end
HQ holds every committed sale exactly once. The run reports how much
unsynced data the cuts actually dropped, and fails if they dropped none.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections import Counter

import pytest

from tests.powercut import ROOT, PowerCutError, PowerCutFS, fuse_unavailable
from tests.powercut.journal_check import journal_api, read_journal
from tests.support import HQ, GatewayProc, PosLanes, Service, assert_hq_holds_exactly, wait_until

LANES = ("1", "2", "3")
TEARS = (None, "sector", "byte")


@pytest.fixture
def powercut_fs(tmp_path):
    """Start PowerCutFS instances at given paths; skip with the precise
    reason if FUSE cannot be mounted on this machine."""
    reason = fuse_unavailable()
    if reason:
        pytest.skip(f"power-cut file system unavailable: {reason}")
    started = []

    def start(path, **kw):
        fs = PowerCutFS(path, **kw)
        try:
            fs.start()
        except PowerCutError as exc:
            pytest.skip(f"cannot mount the power-cut FUSE file system here: {exc}")
        started.append(fs)
        return fs

    yield start
    for fs in started:
        fs.stop()


def _durable_mkdir(path) -> None:
    path.mkdir()
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _start(gw: GatewayProc) -> None:
    """Start the gateway. While it is down, the POS lanes keep connecting
    to its port, and now and then the kernel gives one of them that very port
    as its own (a TCP self-connect): then the port is taken for a moment, so
    try again."""
    for attempt in range(10):
        try:
            gw.start()
            return
        except AssertionError as exc:
            if "address already in use" not in str(exc) or attempt == 9:
                raise
            gw.kill()
            time.sleep(0.3)


def _told(pos: PosLanes) -> dict[str, int]:
    with pos._lock:
        return dict(pos.told)


def _segments_text(view) -> str:
    out = []
    for seg in view.segments:
        seqs = [fr["seq"] for _o, _l, fr in seg.frames if fr.get("k") == "r"]
        out.append(f"{seg.number:08d}: {len(seg.frames)} frames, seqs {min(seqs, default=None)}.."
                   f"{max(seqs, default=None)}, frames end at {seg.end}, {len(seg.tail)} bytes of tail")
    return "; ".join(out)


def _check_after_cut(gw: GatewayProc, hq: HQ, told: dict[str, int], high_water: int, n: int,
                     report: dict) -> tuple[int, dict]:
    """The journal as the cut left it (gateway dead, file system remounted):
    what was acknowledged is there or at HQ. Returns the highest seq handed
    out so far and the view."""
    jdir = gw.data_dir / "journal"
    view = read_journal(jdir)
    assert not view.problems, f"cut {n}: {view.problems[:5]}"
    # A tail torn by the cut (frames that do not check out) holds only what was never acknowledged.
    at_hq = {tx for _seq, tx, _t, _b in hq.rows()}
    missing = {tx: seq for tx, seq in told.items() if view.records.get(seq) != tx and tx not in at_hq}
    if missing:
        at_hq = {tx for _seq, tx, _t, _b in hq.rows()}   # (once more: HQ's database may have been busy)
        missing = {tx: seq for tx, seq in missing.items() if tx not in at_hq}
    assert not missing, (
        f"cut {n}: {len(missing)} sale(s) the POS was told were committed are neither in the journal nor at "
        f"HQ: {sorted(missing.items(), key=lambda kv: kv[1])[:5]}; HQ holds {len(at_hq)} sales; the journal: "
        f"{_segments_text(view)}; the cut: {json.dumps(report)[:3000]}")
    wrong = {seq: (tx, view.records[seq]) for tx, seq in told.items() if seq in view.records
             and view.records[seq] != tx}
    assert not wrong, f"cut {n}: a told seq holds another record in the journal: {list(wrong.items())[:5]}"
    # The journal's own reading agrees with the frames.
    index = journal_api().read_index(jdir)
    assert set(index.pending) == view.pending, (
        f"cut {n}: read_index pending differs from the frames: "
        f"only index {sorted(set(index.pending) - view.pending)[:5]}, only frames {sorted(view.pending - set(index.pending))[:5]}")
    assert index.next_seq == view.next_seq, f"cut {n}: read_index next_seq {index.next_seq} != frames {view.next_seq}"
    assert view.next_seq > max(told.values(), default=0), (
        f"cut {n}: the journal would hand out seq {view.next_seq} again, the POS holds up to {max(told.values())}")
    return max(high_water, view.next_seq - 1, max(told.values(), default=0)), view


def _check_after_restart(gw: GatewayProc, before: set[int], high_water: int, n: int) -> int:
    """The gateway reopened the journal: no damage reported for a cut, the
    tails of the segments it found are cut off, the new segment starts past
    every seq handed out. Returns how many torn tails it has logged cutting."""
    faults = gw.status().get("faults", [])
    journal_faults = [f for f in faults if "journal" in f.lower()]
    assert not journal_faults, f"cut {n}: the gateway reported damage after a power cut: {journal_faults}"
    view = read_journal(gw.data_dir / "journal")
    old = [s for s in view.segments if s.number in before]
    for seg in old:
        assert not seg.tail, (f"cut {n}: segment {seg.number:08d} still has {len(seg.tail)} bytes of garbage after "
                              f"its frames (at {seg.end}) after the gateway reopened it")
    newest = max((s for s in view.segments if s.number not in before), key=lambda s: s.number, default=None)
    assert newest is not None and newest.frames and newest.frames[0][2].get("k") == "h", (
        f"cut {n}: no new segment with a header after the restart")
    assert newest.frames[0][2]["next"] > high_water, (
        f"cut {n}: the new segment starts at seq {newest.frames[0][2]['next']}, seq {high_water} was already "
        "handed out (a sequence number would be reused)")
    return gw.log().count("cut a torn tail")


def _power_cuts(tmp_path, broker, start_fs, cuts: int, *, refuse_direct: bool, seed: int) -> dict:
    rng = random.Random(seed)
    fs = start_fs(tmp_path / "store", seed=seed, refuse_direct=refuse_direct)
    hq = HQ(tmp_path, broker.port).start()
    # 1 MiB segments: rotations (a new file and a directory fsync) happen under load too.
    gw = GatewayProc(tmp_path, broker.port, lanes=LANES, extra="[journal]\nsegment_mb = 1\n")
    assert gw.data_dir == fs.path
    _start(gw)   # the journal makes its own directory: test_a_new_journal_directory_survives_a_power_cut
    pos = PosLanes(gw, lanes=LANES).start()
    high_water, torn_tails, plans = 0, 0, []
    ways = ["kill first", "power now", "power during a journal write", "power during start-up"]
    if refuse_direct:   # only buffered appends fdatasync a journal segment after writing it
        ways.append("power before a journal fdatasync")
    started = time.monotonic()
    try:
        for n in range(1, cuts + 1):
            time.sleep(rng.uniform(0.05, 0.6))
            # Every way in turn, each with every kind of tear in turn; the moments are random.
            how = ways[(n - 1) % len(ways)]
            tear = TEARS[((n - 1) // len(ways)) % len(TEARS)]
            if how == "kill first":
                # SIGKILL (between system calls), then the power: what the kernel held unsynced is lost.
                gw.kill()
                report = fs.cut(tear)
            else:
                if how == "power now":   # whatever the gateway is doing: its I/O in flight never completes
                    fs.freeze()
                elif how == "power during a journal write":   # a tear keeps a prefix of that write
                    fs.freeze_at_write("/journal/*.log", skip=rng.randrange(4))
                elif how == "power before a journal fdatasync":   # the write is pending, then dropped
                    fs.freeze_at_write("/journal/*.log", skip=rng.randrange(4), kind="fsync")
                else:   # the gateway crashed; while it recovers its journal, the power fails
                    gw.kill()
                    Service.start(gw)
                    time.sleep(rng.uniform(0.0, 0.8))
                    fs.freeze()
                gw.proc.send_signal(signal.SIGKILL)
                report = fs.cut(tear)
                gw.proc.wait()
            plans.append((how, tear, report))
            fs.remount()
            told = _told(pos)
            high_water, view = _check_after_cut(gw, hq, told, high_water, n, report)
            before = {s.number for s in view.segments}
            _start(gw)
            torn_tails = _check_after_restart(gw, before, high_water, n)
        pos.stop()
        assert not pos.refused, pos.refused[:3]
        assert len(pos.told) > cuts
        assert len(set(pos.told.values())) == len(pos.told), "two committed sales share a seq"
        assert_hq_holds_exactly(hq, pos.told)
        wait_until(lambda: not journal_api().read_index(gw.data_dir / "journal").pending, timeout=30,
                   what="the journal to drain")
    finally:
        pos._stop.set()   # (a POS lane retries a sale until answered: no join while the gateway may be down)
        fs.release()      # a gateway waiting on a frozen file system gets EIO and can be stopped
        gw.stop()
        hq.stop()
    stats = fs.stats()
    summary = {
        "mode": "buffered (O_DIRECT refused)" if refuse_direct else "O_DIRECT + RWF_DSYNC",
        "cuts": cuts, "how": {h: sum(1 for p in plans if p[0] == h) for h in sorted({p[0] for p in plans})},
        "sales_committed": len(pos.told),
        "seconds": round(time.monotonic() - started, 1),
        "cuts_that_dropped_data": sum(1 for _f, _t, r in plans if r["bytes_dropped"] or r["size_changes_dropped"]
                                      or r["entries_undone"]),
        "cuts_that_dropped_journal_data": sum(1 for _f, _t, r in plans
                                              if any(k.startswith("/journal/") and (v["bytes"] or v["size"])
                                                     for k, v in r["files"].items())),
        "journal_bytes_dropped": sum(v["bytes"] for _f, _t, r in plans for k, v in r["files"].items()
                                     if k.startswith("/journal/")),
        "writes_in_flight_at_the_cut": sum(r["inflight_writes"] for _f, _t, r in plans),
        "tears_kept": sum(1 for _f, _t, r in plans if r["torn"] and r["torn"]["kept"]),
        "journal_tears_kept": sum(1 for _f, _t, r in plans
                                  if r["torn"] and r["torn"]["kept"] and r["torn"]["path"].startswith("/journal/")),
        "torn_tails_cut_by_the_journal": torn_tails,
        "entries_undone_by_kind": dict(Counter(f"{re.sub(r'[0-9]+', 'N', e)} {what}" for _h, _t, r in plans
                                               for e, what in r["entries"].items()).most_common()),
        "files_dropped_by_kind": dict(Counter(re.sub(r"[0-9]+", "N", f) for _h, _t, r in plans
                                              for f, v in r["files"].items() if v["bytes"] or v["size"]).most_common()),
        **stats["totals"], "kernel_sent": stats["seen"],
    }
    print(f"\npower-cut summary: {json.dumps(summary)}", file=sys.stderr)
    assert summary["cuts_that_dropped_data"] > 0, f"no cut dropped anything: the harness proved nothing {summary}"
    assert summary["bytes_dropped"] > 0, summary
    return summary


@pytest.mark.parametrize("refuse_direct", [False, True], ids=["o_direct", "buffered"])
def test_power_cuts_under_load(tmp_path, broker, powercut_fs, refuse_direct):
    """12 cuts on each of the journal's two write paths (24 in all)."""
    summary = _power_cuts(tmp_path, broker, powercut_fs, 12, refuse_direct=refuse_direct,
                          seed=1301 + refuse_direct)
    if refuse_direct:   # buffered: a pwrite then an fdatasync, and cuts fell between them
        assert summary["cuts_that_dropped_journal_data"] > 0, summary
    assert summary["writes_in_flight_at_the_cut"] > 0, summary


@pytest.mark.slow
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("refuse_direct", [False, True], ids=["o_direct", "buffered"])
def test_power_cuts_under_load_long(tmp_path, broker, powercut_fs, refuse_direct):
    """200 cuts on each write path."""
    summary = _power_cuts(tmp_path, broker, powercut_fs, 200, refuse_direct=refuse_direct,
                          seed=20013 + refuse_direct)
    assert summary["cuts_that_dropped_journal_data"] > 0 or not refuse_direct, summary
    assert summary["torn_tails_cut_by_the_journal"] > 0, summary


# -- the journal alone on the power-cut file system ------------------------------------

JOURNAL_CHILD = r"""
import asyncio, sys
from tests.powercut.journal_check import journal_api

async def main(directory, n):
    journal = journal_api().Journal(directory)
    await journal.open()
    for i in range(n):
        done = await journal.append("sale", {"n": i}, idempotency_key=f"key-{i}", request={"n": i}, response={})
        print(done.seq, done.id, flush=True)     # acknowledged: durable, the journal says
    await asyncio.sleep(3600)

asyncio.run(main(sys.argv[1], int(sys.argv[2])))
"""


def _acknowledge_then_cut(fs: PowerCutFS, directory, n: int = 5, tear: str | None = None) -> dict[int, str]:
    """A process appends n records to a journal at directory; once all are
    acknowledged the power fails. Returns seq -> id of what was acknowledged."""
    child = subprocess.Popen([sys.executable, "-c", JOURNAL_CHILD, str(directory), str(n)], cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    acked: dict[int, str] = {}
    try:
        for line in child.stdout:
            seq, tx = line.split()
            acked[int(seq)] = tx
            if len(acked) == n:
                break
        assert len(acked) == n, f"the journal process ended early: {child.stderr.read()[-2000:]}"
        fs.freeze()
        child.send_signal(signal.SIGKILL)
        fs.cut(tear)
        child.wait(10)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    fs.remount()
    return acked


@pytest.mark.parametrize("tear", [None, "byte"])
def test_acknowledged_journal_records_survive_a_power_cut(tmp_path, powercut_fs, tear):
    fs = powercut_fs(tmp_path / "mnt")
    _durable_mkdir(fs.path / "journal")
    acked = _acknowledge_then_cut(fs, fs.path / "journal", tear=tear)
    view = read_journal(fs.path / "journal")
    assert not view.problems
    assert {seq: view.records.get(seq) for seq in acked} == acked
    assert set(acked) <= set(journal_api().read_index(fs.path / "journal").pending)


def test_a_new_journal_directory_survives_a_power_cut(tmp_path, powercut_fs):
    """Found by this harness: the journal used to create its directory and
    fsync only that directory, never its parent, so the new directory's own
    entry was not durable and a power cut before something else fsynced the
    data directory lost the whole journal, acknowledged records and all."""
    fs = powercut_fs(tmp_path / "mnt")
    acked = _acknowledge_then_cut(fs, fs.path / "journal")   # the journal makes its directory itself
    view = read_journal(fs.path / "journal")
    assert {seq: view.records.get(seq) for seq in acked} == acked, (
        f"acknowledged records lost; the durable tree after the cut: {fs.durable_tree()}")
