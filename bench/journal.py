"""Durable commit rate of the journal, against raw append+fsync and a TinyDB outbox.

    python -m bench.journal [--quick]

Metrics: commit_rate_1lane (baseline raw append+fsync on the same disk),
commit_rate_8lanes, commit_rate_1lane_50k_waiting (baseline: a TinyDB outbox
with 50,000 records waiting), bytes_written_per_tx.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
from pathlib import Path

from bench.common import args, bytes_written, emit, median, note
from bench.sqlite_journal import Journal as SqliteJournal
from gateway.journal import Journal

BODY = {"lane": "1", "member_id": "M1001", "card_no": "880000000013", "tier": "gold", "rules_version": 7,
        "lines": [{"sku": "6901234567892", "name": "大米 5kg", "category": "staples", "qty": 1,
                   "unit_price": 4990, "amount": 4990, "discount": 250, "net": 4740, "promotion": "tier:gold"}],
        "subtotal": 4990, "discount": 250, "total": 4740, "points_earned": 71}


def raw_fsync_rate(path: Path, seconds: float) -> float:
    """The disk's own limit: append one record-sized line and fdatasync, repeatedly."""
    line = (str(BODY) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    n, start = 0, time.perf_counter()
    try:
        while time.perf_counter() - start < seconds:
            os.write(fd, line)
            os.fdatasync(fd)
            n += 1
    finally:
        os.close(fd)
    return n / (time.perf_counter() - start)


async def journal_rate(path: Path, lanes: int, seconds: float, waiting: int = 0,
                       journal=None) -> tuple[float, float]:
    """Appends/s with `lanes` concurrent appenders; bytes written per append."""
    async with (journal or Journal(path)) as j:
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
                               response={"total": 4740})
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


async def main() -> None:
    opts = args(__doc__)
    secs = 1.5 if opts.quick else 5.0
    waiting = 50_000
    rounds = 1 if opts.quick else 3
    base = Path(opts.dir or tempfile.mkdtemp(prefix="sg-bench-journal-", dir=os.environ.get("BENCH_DIR")))
    base.mkdir(parents=True, exist_ok=True)
    raw, one, eight, per_tx, at50k, tiny, threaded, sqlite1, sqlite_bytes = [], [], [], [], [], [], [], [], []
    for r in range(rounds):  # interleaved so the noisy machine hits both sides alike
        raw.append(raw_fsync_rate(base / f"raw-{r}.log", secs))
        rate, written = await journal_rate(base / f"j1-{r}.sqlite3", 1, secs)
        one.append(rate)
        per_tx.append(written)
        eight.append((await journal_rate(base / f"j8-{r}.sqlite3", 8, secs))[0])
        at50k.append((await journal_rate(base / f"j50k-{r}.sqlite3", 1, secs, waiting))[0])
        tiny.append(tinydb_rate(base / f"tiny-{r}.json", waiting, secs))
        threaded.append((await journal_rate(base / f"jt-{r}", 1, secs,
                                            journal=Journal(base / f"jt-{r}", writer="thread")))[0])
        rate, written = await journal_rate(base / f"sq-{r}", 1, secs, journal=SqliteJournal(base / f"sq-{r}.sqlite3"))
        sqlite1.append(rate)
        sqlite_bytes.append(written)
        note(f"round {r + 1}/{rounds} done")
    emit("commit_rate_1lane", median(one), "records/s", "raw append+fdatasync", median(raw))
    emit("commit_rate_8lanes", median(eight), "records/s", "raw append+fdatasync", median(raw), target=20000)
    emit("commit_rate_1lane_50k_waiting", median(at50k), "records/s", "TinyDB outbox, 50k waiting", median(tiny))
    emit("bytes_written_per_tx", median(per_tx), "bytes", "SQLite WAL synchronous=FULL journal", median(sqlite_bytes))
    emit("commit_rate_1lane_vs_sqlite", median(one), "records/s", "SQLite WAL synchronous=FULL journal", median(sqlite1))
    emit("commit_rate_1lane_thread_writer", median(threaded), "records/s", "raw append+fdatasync", median(raw))


if __name__ == "__main__":
    asyncio.run(main())
