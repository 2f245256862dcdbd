"""Durable commit rate of the journal, against raw append+fsync and a TinyDB
outbox; and a day of large baskets, late against early.

    python -m bench.journal [--quick]

Metrics: commit_rate_1lane (baseline raw append+fdatasync on the same disk),
commit_rate_8lanes, commit_rate_1lane_50k_waiting (baseline: a TinyDB outbox
with 50,000 records waiting), bytes_written_per_tx; day_bytes_written_per_sale
and day_commit_rate (baseline: the same journal early in the same day).

Everything goes through the journal's real interface: each lane awaits
``journal.append(...)``, which returns only after its frame is durable.
The raw baselines write exactly as many bytes per record as the journal's
frame, on the same file system, with one sync per record:

- "raw append+fdatasync": O_APPEND to a growing regular file (the issue's
  baseline);
- "raw pwrite, synced, preallocated": the journal's own I/O per record
  (pwrite into a posix_fallocate'd file of zeroed blocks; O_DIRECT sector
  writes synced in the write, RWF_DSYNC, where allowed) without any journal
  logic. This is the stronger baseline: it
  isolates the journal's own overhead.

bytes_written_per_tx is this process's write_bytes (/proc/self/io) per
record, including the journal's zeroing ahead of its frames; metadata the
file system writes on its own behalf is not in it.

The machine is shared and noisy, so each round measures the baselines right
around the journal run and the ratio is computed per round; the reported
"ratio" is the median of those paired ratios (``ratio_of_medians`` too).

A day of large baskets (``day_*``): eight lanes sell 40-line baskets priced
by the real pricing core (a ~25 KB record and a ~23 KB stored answer per
sale: a ~48 KB frame) at the default 16 MB segments while HQ acks every
50 ms, 8,460 sales (2,500 with --quick): a busy store's day, whose keys
outgrow a segment after ~700 sales. Bytes written and the commit rate over
the last fifth of the sales are set against the first fifth (ratio ~1: flat
with the day's volume). Keys were once copied into a new segment at every
ack once they outgrew one; this run then measured 8,460 sales writing 12 GB
across 376 segments, 0.57 MB per sale in the first fifth and 1.9 MB in the
last, 340 and 130 sales/s (2,500 sales: 130 KB and 1.4 MB, ~900 and 75-150
sales/s). Carried once into key files: ~120 KB per sale early and late, 1 GB
across 25 segments and 24 key files.

The figures behind the journal's design choices (gateway/store/journal/),
measured on this machine (x86-64 VM, ext4) when each choice was made:

- Why not SQLite: SQLite WAL with synchronous=FULL made one lane 28 % of
  the disk's raw append+fdatasync rate and wrote ~33 KB per transaction
  (five 4 KiB b-tree pages per commit); the journal writes one frame
  (~0.6 KB for the bench record) and one sync per group of appends.
- Direct I/O: ~1.6 KB of device writes per lone record (the frame, its
  sector's rewrite and the zeroing ahead) and ~1.1 KB per record with 8
  lanes, against ~4.6 KB buffered; the 8-lane rate is higher too. Sector
  writes: ~1 KB per lone record instead of a 4 KiB page-cache page, no
  slower.
- Zeroing ahead (ZERO_AHEAD, 256 KiB steps): a group's fdatasync is then a
  data flush only, 211 us instead of 325 us of I/O per 8-record group, for
  one more write of each log byte (~0.6 KB per record); the one group that
  pays for a step takes ~13 ms on a 20 MB/s SD card. Buffered, zeroing
  ahead was no faster and the page cache wrote the zeroed pages again and
  again (77 KB per record by /proc/self/io instead of 4.6 KB), so it is
  done with direct I/O only.
- Preallocated segments: ~1.4x the raw append+fdatasync rate on ext4 (a
  sync need not commit a new file size).
- RWF_DSYNC (the sync in the write itself): one system call less per
  group, +1-7 % on 8 lanes in A/B runs.
- The "inline" writer: a thread hand-off costs ~70 us here, a third of an
  fdatasync, so the default writes on the event loop; "thread" is for media
  whose fdatasync stalls for tens of milliseconds (cheap SD cards).
- The 8-lane rate is CPU-bound, so an append is kept cheap: one future per
  append and no shield or done-callbacks; Appended is a NamedTuple (a frozen
  dataclass's __init__ cost ~1 us per append); CPython's _sha256 saves
  ~0.7 us per request hash over hashlib's; record ids come from urandom read
  in blocks (a getrandom() call per record showed in the profile).
- Reads: a drain batch is ~300 KB, so one read covers up to 1 MB.
"""

from __future__ import annotations

import asyncio
import contextlib
import mmap
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import orjson

from bench.common import args, bytes_written, emit, median, note, rss_mb
from bench.sqlite_journal import Journal as SqliteJournal
from common import eventloop
from common import runtime
from gateway.store.journal import RWF_DSYNC, SEGMENT_BYTES, Journal

BODY = {"lane": "1", "member_id": "M1001", "card_no": "880000000013", "tier": "gold", "rules_version": 7,
        "lines": [{"sku": "6901234567892", "name": "大米 5kg", "category": "staples", "qty": 1,
                   "unit_price": 4990, "amount": 4990, "discount": 250, "net": 4740, "promotion": "tier:gold"}],
        "subtotal": 4990, "discount": 250, "total": 4740, "points_earned": 71}
RESPONSE = {"total": 4740}
DAY_SALES, DAY_SALES_QUICK = 8_460, 2_500
DAY_LANES = 8
DAY_ACK_EVERY_S = 0.05


async def frame_bytes(path: Path) -> int:
    """Bytes the journal writes for one bench record (so the raw baselines
    write the same amount)."""
    async with Journal(path) as j:
        before = j.stats["bytes"]
        await j.append("sale", BODY, idempotency_key="bench-0-1-0", request={"k": 1}, response=RESPONSE)
        return j.stats["bytes"] - before


def raw_fsync_rate(path: Path, seconds: float, record_bytes: int, preallocated: bool = False) -> float:
    """The disk's own limit: write one record-sized chunk and fdatasync, repeatedly.
    preallocated=True does the journal's own I/O without any journal logic:
    pwrite into a posix_fallocate'd file of zeroed blocks, with O_DIRECT
    sector writes (the partial last sector rewritten) made durable by the
    write itself (RWF_DSYNC) where the file system allows them."""
    line = (repr(BODY) * (record_bytes // len(repr(BODY)) + 1)).encode()[:record_bytes - 1] + b"\n"
    direct_fd = None
    if preallocated:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.posix_fallocate(fd, 0, SEGMENT_BYTES)
        zeros = bytes(1 << 20)  # written blocks, as the journal's zeroing ahead leaves them
        for pos in range(0, SEGMENT_BYTES, len(zeros)):
            os.pwrite(fd, zeros, pos)
        os.fsync(fd)
        with contextlib.suppress(OSError, AttributeError):
            direct_fd = os.open(path, os.O_WRONLY | os.O_DIRECT)
        buf = mmap.mmap(-1, 1 << 16)  # page-aligned, as O_DIRECT needs
    else:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o600)
    n, offset, start = 0, 0, time.perf_counter()
    try:
        while time.perf_counter() - start < seconds:
            if preallocated:
                if offset + len(line) > SEGMENT_BYTES:
                    break
                if direct_fd is not None:
                    head = offset % 512
                    end = head + len(line)
                    buf[head:end] = line
                    size = (end + 511) & -512
                    buf[end:size] = bytes(size - end)
                    # Durable in the write itself, as the journal's direct appends are (RWF_DSYNC).
                    os.pwritev(direct_fd, [memoryview(buf)[:size]], offset - head, RWF_DSYNC)
                    tail = end % 512
                    buf[:tail] = buf[end - tail:end]  # the partial sector, rewritten with the next record
                    if not RWF_DSYNC:
                        os.fdatasync(fd)
                else:
                    os.pwrite(fd, line, offset)
                    os.fdatasync(fd)
                offset += len(line)
            else:
                os.write(fd, line)
                os.fdatasync(fd)
            n += 1
    finally:
        if direct_fd is not None:
            os.close(direct_fd)
        os.close(fd)
        os.unlink(path)
    return n / (time.perf_counter() - start)


async def journal_rate(path: Path, lanes: int, seconds: float, waiting: int = 0,
                       journal=None) -> tuple[float, float]:
    """Appends/s with `lanes` concurrent appenders, each awaiting its own
    durable append; bytes written to storage per append."""
    j = journal or Journal(path)
    async with j:
        if waiting:
            await _fill(j, waiting)
        count = 0
        stop = time.perf_counter() + seconds

        async def lane(i: int) -> None:
            nonlocal count
            k = 0
            while time.perf_counter() < stop:
                k += 1
                await j.append("sale", BODY, idempotency_key=f"bench-{i}-{k}-{count}", request={"k": k},
                               response=RESPONSE)
                count += 1

        before_bytes = bytes_written()
        start = time.perf_counter()
        await asyncio.gather(*(lane(i) for i in range(lanes)))
        elapsed = time.perf_counter() - start
        written = bytes_written() - before_bytes
    return count / elapsed, written / max(count, 1)


async def _fill(j: Journal, n: int) -> None:
    batch = 1000
    for start in range(0, n, batch):
        await asyncio.gather(*(j.append("sale", BODY) for _ in range(min(batch, n - start))))


def tinydb_rate(path: Path, waiting: int, seconds: float) -> float:
    """A TinyDB outbox (rewrites its whole JSON file on every insert) with fsync."""
    from tinydb import TinyDB
    from tinydb.storages import JSONStorage

    class FsyncStorage(JSONStorage):
        def write(self, data):
            super().write(data)
            self._handle.flush()
            os.fsync(self._handle.fileno())

    db = TinyDB(path, storage=FsyncStorage)
    db.storage.write({"_default": {str(i + 1): {"seq": i + 1, "body": BODY} for i in range(waiting)}})
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or n < 2:
        db.insert({"seq": waiting + n + 1, "body": BODY})
        n += 1
    db.close()
    return n / (time.perf_counter() - start)


def large_basket() -> tuple[dict, dict]:
    """A 40-line sale as the counter journals it: the record priced by the
    real pricing core, and the answer stored with its idempotency key."""
    from bench.quote_workload import MEMBER, NOW, bench_basket, bench_policy
    from gateway.core import pricing

    q = pricing.quote(bench_basket(40), MEMBER, bench_policy(200), NOW, store="S001", region="east")
    answer = {"lane": "1", "total": q["total"], "discount": q["discount"], "tender": q["tender"],
              "points_earned": q["points"]["earned"], "balances_after": q["balances_after"], "receipt": q["receipt"]}
    return q["record"], answer


async def day_of_large_baskets(path: Path, sales: int, lanes: int = DAY_LANES) -> dict:
    """`sales` 40-line sales from `lanes` lanes with HQ acking as they go;
    bytes written and commit rate in the first and the last fifth."""
    body, answer = large_basket()
    answer_json = orjson.dumps(answer)
    marks = []  # (sales done, time, bytes written, RSS MB)
    committed: list[int] = []
    done = 0
    async with Journal(path) as j:
        async def lane(i: int) -> None:
            nonlocal done
            k = 0
            while done < sales:
                k += 1
                # Each sale's answer its own objects, as the counter's are (the index keeps them for a day).
                r = await j.append("sale", body, idempotency_key=f"day-{i}-{k}", request={"lane": i, "k": k},
                                   response=orjson.loads(answer_json))
                committed.append(r.seq)
                done += 1
                if done % 100 == 0:
                    marks.append((done, time.perf_counter(), bytes_written(), rss_mb()))

        async def hq() -> None:  # HQ commits and acks what the uplink sent
            while True:
                await asyncio.sleep(DAY_ACK_EVERY_S)
                if committed:
                    seqs = committed[:]
                    committed.clear()
                    await j.mark_acked(seqs)

        acks = asyncio.create_task(hq())
        marks.append((0, time.perf_counter(), bytes_written(), rss_mb()))
        await asyncio.gather(*(lane(i) for i in range(lanes)))
        acks.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await acks
        segments = max(int(p.stem) for p in path.glob("*.log"))
        key_files = len(list(path.glob("*.keys")))
        on_disk = sum(p.stat().st_blocks * 512 for p in path.iterdir() if p.is_file())

    def window(lo: int, hi: int) -> tuple[float, float, float]:
        """Sales/s (the median over its 100-sale steps: a noisy machine's
        hiccups do not decide it), bytes written per sale, RSS at its end."""
        steps = [(a, b) for a, b in zip(marks, marks[1:]) if lo <= a[0] and b[0] <= hi]
        rate = statistics.median((b[0] - a[0]) / (b[1] - a[1]) for a, b in steps)
        first, last = steps[0][0], steps[-1][1]
        return rate, (last[2] - first[2]) / (last[0] - first[0]), last[3]

    fifth = sales // 5
    (early_rate, early_bytes, early_rss), (late_rate, late_bytes, late_rss) = window(0, fifth), \
        window(sales - fifth, sales)
    return {"early_rate": early_rate, "late_rate": late_rate, "early_bytes": early_bytes, "late_bytes": late_bytes,
            "early_rss_mb": early_rss, "late_rss_mb": late_rss, "segments_opened": segments, "key_files": key_files,
            "on_disk_mb": on_disk / 1e6, "total_written_mb": (marks[-1][2] - marks[0][2]) / 1e6,
            "record_bytes": len(orjson.dumps(body)), "answer_bytes": len(answer_json)}


def paired(values, baselines) -> float:
    return statistics.median(v / b for v, b in zip(values, baselines))


async def main() -> None:
    opts = args(__doc__)
    runtime.tune_gc()  # the collector set up as the gateway's process has it (common/runtime.py)
    secs = 1.0 if opts.quick else 2.0
    waiting = 50_000
    rounds = 3 if opts.quick else 7
    base = Path(opts.dir or tempfile.mkdtemp(prefix="sg-bench-journal-", dir=os.environ.get("BENCH_DIR")))
    base.mkdir(parents=True, exist_ok=True)
    try:
        await run(opts, base, secs, waiting, rounds)
    finally:
        if not opts.dir:
            shutil.rmtree(base, ignore_errors=True)  # preallocated segments: ~16 MB each


async def run(opts, base: Path, secs: float, waiting: int, rounds: int) -> None:
    record = await frame_bytes(base / "frame")
    m: dict[str, list[float]] = {k: [] for k in (
        "raw", "prealloc", "one", "eight", "eight_groups", "per_tx", "per_tx8", "at50k", "tiny", "threaded",
        "sqlite1", "sqlite_bytes", "eight_nosync")}
    for r in range(rounds):  # interleaved so the noisy machine hits every side alike
        # Baselines straight around the journal runs: each round's ratio is a fair pair.
        raw_before = raw_fsync_rate(base / f"raw-{r}.log", secs / 2, record)
        pre_before = raw_fsync_rate(base / f"pre-{r}.log", secs / 2, record, preallocated=True)
        rate, written = await journal_rate(base / f"j1-{r}", 1, secs)
        m["one"].append(rate)
        m["per_tx"].append(written)
        j8 = Journal(base / f"j8-{r}")
        rate, written = await journal_rate(base / f"j8-{r}", 8, secs, journal=j8)
        m["eight"].append(rate)
        m["per_tx8"].append(written)
        m["eight_groups"].append(j8.stats["appends"] / max(j8.stats["groups"], 1))
        pre_after = raw_fsync_rate(base / f"pre-{r}.log", secs / 2, record, preallocated=True)
        raw_after = raw_fsync_rate(base / f"raw-{r}.log", secs / 2, record)
        m["raw"].append((raw_before + raw_after) / 2)
        m["prealloc"].append((pre_before + pre_after) / 2)
        m["eight_nosync"].append((await journal_rate(base / f"j8n-{r}", 8, secs / 2,
                                                     journal=Journal(base / f"j8n-{r}", fsync=False, direct=False)))[0])
        if r < 3 or opts.quick:  # the slow anchors: three rounds are enough to show orders of magnitude
            m["at50k"].append((await journal_rate(base / f"j50k-{r}", 1, secs, waiting))[0])
            m["tiny"].append(tinydb_rate(base / f"tiny-{r}.json", waiting, secs))
            m["threaded"].append((await journal_rate(base / f"jt-{r}", 1, secs,
                                                     journal=Journal(base / f"jt-{r}", writer="thread")))[0])
            rate, written = await journal_rate(base / f"sq-{r}", 1, secs,
                                               journal=SqliteJournal(base / f"sq-{r}.sqlite3"))
            m["sqlite1"].append(rate)
            m["sqlite_bytes"].append(written)
        note(f"round {r + 1}/{rounds}: raw {m['raw'][-1]:.0f}/s, preallocated {m['prealloc'][-1]:.0f}/s, "
             f"1 lane {m['one'][-1]:.0f}/s, 8 lanes {m['eight'][-1]:.0f}/s")
    n_slow = len(m["at50k"])
    common = {"record_bytes": record, "rounds": rounds}
    for metric, key in (("commit_rate_1lane", "one"), ("commit_rate_8lanes", "eight")):
        extra = {"target": 20000} if key == "eight" else {"target_ratio": 0.8}
        if key == "eight":
            extra["records_per_fsync"] = round(median(m["eight_groups"]), 2)
        emit(metric, median(m[key]), "records/s", "raw append+fdatasync", median(m["raw"]),
             ratio_paired=round(paired(m[key], m["raw"]), 3), **extra, **common)
        emit(metric + "_vs_preallocated", median(m[key]), "records/s",
             "raw pwrite synced (RWF_DSYNC or fdatasync) into a preallocated, zeroed file: the same I/O as the journal",
             median(m["prealloc"]),
             ratio_paired=round(paired(m[key], m["prealloc"]), 3), **common)
    emit("commit_rate_8lanes_no_fsync", median(m["eight_nosync"]), "records/s",
         note="NOT durable: the journal's CPU ceiling with fdatasync switched off, for diagnosis only")
    emit("commit_rate_1lane_50k_waiting", median(m["at50k"]), "records/s", "TinyDB outbox, 50k waiting",
         median(m["tiny"]), ratio_paired=round(paired(m["at50k"], m["tiny"]), 1), rounds=n_slow)
    emit("bytes_written_per_tx", median(m["per_tx"]), "bytes", "SQLite WAL synchronous=FULL journal",
         median(m["sqlite_bytes"]), lanes=1, rounds=n_slow)
    emit("bytes_written_per_tx_8lanes", median(m["per_tx8"]), "bytes", "SQLite WAL synchronous=FULL journal, 1 lane",
         median(m["sqlite_bytes"]), lanes=8)
    emit("commit_rate_1lane_vs_sqlite", median(m["one"]), "records/s", "SQLite WAL synchronous=FULL journal",
         median(m["sqlite1"]), rounds=n_slow)
    emit("commit_rate_1lane_thread_writer", median(m["threaded"]), "records/s", "raw append+fdatasync",
         median(m["raw"]), rounds=n_slow)
    await run_day(base / "day", DAY_SALES_QUICK if opts.quick else DAY_SALES)


async def run_day(path: Path, sales: int) -> None:
    note(f"a day of large baskets: {sales} sales")
    day = await day_of_large_baskets(path, sales)
    extra = {"sales": sales, "lanes": DAY_LANES, "segment_bytes": SEGMENT_BYTES, "record_bytes": day["record_bytes"],
             "answer_bytes": day["answer_bytes"], "segments_opened": day["segments_opened"],
             "key_files": day["key_files"], "written_mb": round(day["total_written_mb"], 1),
             "on_disk_mb": round(day["on_disk_mb"], 1)}
    emit("day_bytes_written_per_sale", day["late_bytes"], "bytes", "the same day's first fifth of sales",
         day["early_bytes"], window="last fifth of the sales", **extra)
    emit("day_commit_rate", day["late_rate"], "sales/s", "the same day's first fifth of sales", day["early_rate"],
         window="last fifth of the sales", lanes=DAY_LANES)
    emit("day_rss_mb", day["late_rss_mb"], "MB", "after the first fifth of the sales", day["early_rss_mb"],
         note="the index holds every key's stored answer for a day")


if __name__ == "__main__":
    eventloop.run(main())  # the gateway's own loop (common/eventloop.py)
