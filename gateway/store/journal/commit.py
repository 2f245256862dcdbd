"""Group commit (invariant 3 in gateway.store.journal): everything queued
in one turn of the event loop goes to disk with one write and one sync,
then the records in it are indexed and their callers woken.

Two writers: "inline" writes and syncs on the event loop at the end of the
turn (while the loop waits for the disk, new appends gather into the next
group); "thread" does it on a writer thread and keeps the loop free during
the sync, for media whose sync stalls for tens of milliseconds."""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from bisect import bisect_left
from typing import Callable

from gateway.store.journal.errors import JournalError
from gateway.store.journal.index import JournalIndex

log = logging.getLogger("storegate.journal")

GROUP_MAX = 512  # writes the writer thread takes into one group at most
WRITERS = ("inline", "thread")


class CommitStats:
    """What the group commit has done since the journal opened, for whoever
    watches (the shell's /metrics reads it; nothing here knows of it): groups
    written, records and bytes in them, failed writes, and two histograms as
    counts per bucket over fixed upper bounds: the seconds each group's write
    and sync took, and the frames in each group. Plain integers: one writer
    (the thread that writes groups) and readers that may see a scrape one
    group behind; every count only grows."""

    SECONDS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
    SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)

    def __init__(self) -> None:
        self.groups = 0
        self.frames = 0
        self.bytes = 0
        self.failures = 0
        self.seconds_sum = 0.0
        self.seconds_buckets = [0] * (len(self.SECONDS) + 1)  # the last: over every bound
        self.size_buckets = [0] * (len(self.SIZES) + 1)

    def group(self, frames: int, nbytes: int, seconds: float) -> None:
        self.seconds_buckets[bisect_left(self.SECONDS, seconds)] += 1
        self.size_buckets[bisect_left(self.SIZES, frames)] += 1
        self.seconds_sum += seconds
        self.frames += frames
        self.bytes += nbytes
        self.groups += 1


class Write:
    """One frame queued for the writer. A record's payload rides along so
    the writer can index it once it is on disk, whoever still waits for it."""

    __slots__ = ("data", "future", "frame", "key", "req_hash", "waiters")

    def __init__(self, data: bytes, future: asyncio.Future | None, frame: dict | None = None) -> None:
        self.data = data
        self.future = future  # None: nobody waits (an ack frame)
        self.frame = frame    # a record's payload, indexed once on disk
        self.key: str | None = None  # its idempotency key
        self.req_hash = ""
        self.waiters: list[asyncio.Future] | None = None  # retries of the same key, waiting on this one


class GroupCommit:
    """Queues frames, writes them a group at a time with `append(data,
    capped) -> (segment, offset)`, indexes the records written."""

    def __init__(self, index: JournalIndex, append: Callable[[bytes, bool], tuple[int, int]], writer: str) -> None:
        if writer not in WRITERS:
            raise ValueError(f"journal writer must be 'inline' or 'thread', not {writer!r}")
        self.index = index
        self._append = append
        self.writer = writer
        self.stats = {"appends": 0, "groups": 0, "bytes": 0}
        self.commit_stats = CommitStats()  # latency and group sizes (read by the shell's /metrics)
        self.inflight_keys: dict[str, Write] = {}  # key -> its record being written now
        self.on_append: Callable[[], None] | None = None  # called once records were indexed
        self.indexed_segment = 0  # the segment of the last group indexed: every record before it is indexed
        self._batch: list[Write] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._writes: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._running = False

    def start(self, loop: asyncio.AbstractEventLoop, active_segment: int) -> None:
        self._loop = loop
        self.indexed_segment = active_segment
        self._running = True
        if self.writer == "thread":
            self._thread = threading.Thread(target=self._writer_loop, name="journal-writer", daemon=True)
            self._thread.start()

    async def stop(self) -> None:
        self._running = False
        if self._batch:
            self._hand_over()  # frames queued in this turn (ack frames) still go to disk
        if self._thread:
            self._writes.put(None)
            await asyncio.to_thread(self._thread.join)
            self._thread = None

    def queue(self, write: Write) -> None:
        """Write at the end of this turn of the event loop, with whatever
        else is queued in it."""
        if not self._running:
            if write.future is not None:
                write.future.set_exception(JournalError("journal is not open"))
            return  # (an ack frame: its records are sent again)
        if not self._batch:
            self._loop.call_soon(self._hand_over)
        self._batch.append(write)

    def _hand_over(self) -> None:
        batch, self._batch = self._batch, []
        if not batch:  # handed over already, by stop()
            return
        if self.writer == "thread":
            self._writes.put(batch)
        else:
            self._finish(batch, *self._write_group(batch))

    def _writer_loop(self) -> None:
        while True:
            first = self._writes.get()
            if first is None:
                return
            group = list(first)
            while len(group) < GROUP_MAX:
                try:
                    more = self._writes.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    self._writes.put(None)
                    break
                group.extend(more)
            placed, error = self._write_group(group)
            # One wake-up of the event loop for the whole group.
            self._loop.call_soon_threadsafe(self._finish, group, placed, error)

    def _write_group(self, group: list[Write]) -> tuple[tuple[int, int] | None, JournalError | None]:
        """(segment, offset of the first frame), or the error. Touches no
        index state, so it may run on the writer thread."""
        data = group[0].data if len(group) == 1 else b"".join([w.data for w in group])
        started = time.perf_counter()
        try:
            placed = self._append(data, any(w.future is not None for w in group))
        except (JournalError, OSError) as exc:
            error = exc if isinstance(exc, JournalError) else JournalError(f"journal write failed: {exc}")
            log.error("journal: %s", error)
            self.commit_stats.failures += 1
            return None, error
        self.commit_stats.group(len(group), len(data), time.perf_counter() - started)
        self.stats["groups"] += 1
        self.stats["bytes"] += len(data)
        return placed, None

    def _finish(self, group: list[Write], placed: tuple[int, int] | None, error: JournalError | None) -> None:
        """On the event loop, after a group's write: index every record that is
        on disk (even if its caller was cancelled meanwhile, e.g. a POS that
        hung up: it is sent, and a retry with its key finds it), then wake the
        callers and any retries waiting on their keys."""
        inflight = self.inflight_keys
        records = 0
        if error is None:
            segment, offset = placed
            on_record = self.index.on_record
            for w in group:
                n = len(w.data)
                if w.frame is not None:
                    on_record(w.frame, segment, offset, n)
                    records += 1
                if w.key is not None and inflight.get(w.key) is w:
                    del inflight[w.key]
                fut = w.future
                if fut is not None and not fut.done():
                    fut.set_result(None)
                if w.waiters:
                    for waiter in w.waiters:
                        if not waiter.done():
                            waiter.set_result(None)
                offset += n
            self.indexed_segment = segment
        else:
            for w in group:
                if w.key is not None and inflight.get(w.key) is w:
                    del inflight[w.key]
                for fut in [w.future, *(w.waiters or ())]:
                    if fut is not None and not fut.done():
                        fut.set_exception(error)
        if records:
            self.stats["appends"] += records
            if self.on_append:
                self.on_append()
