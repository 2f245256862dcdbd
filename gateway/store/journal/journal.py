"""The Journal: appends, idempotency, the backlog for HQ, acks, compaction
(invariants 7 and 8 in gateway.store.journal), records set aside."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, NamedTuple

import orjson

from gateway.store.journal.commit import GroupCommit, Write
from gateway.store.journal.errors import IdempotencyConflict, JournalError, JournalFull, RecordRefused
from gateway.store.journal.format import (ACK, RECORD, RECORD_TYPE, encode_frame, encode_record, frame, key_frame,
                                          request_hash, same_request, scan_frames)
from gateway.store.journal.index import JournalIndex
from gateway.store.durable import make_dirs
from gateway.store.journal.segments import (SEGMENT_BYTES, Segments, file_path, journal_files, read_segment,
                                            write_whole)
from wire.messages import TxRecord, normal_ranges, seqs_to_ranges

log = logging.getLogger("storegate.journal")

IDEMPOTENCY_RETENTION_S = 24 * 3600  # a POS retries within minutes; a day is generous
UNSENDABLE_DIR = "unsendable"  # copies of records that could not be sent (set_aside)


@dataclass(frozen=True)
class UnreadableRecord(TxRecord):
    """A pending record whose frame no longer reads back intact (pending()
    returns it in the record's place so delivery can go on past it)."""

    error: str = ""


class Appended(NamedTuple):  # a NamedTuple: built once per append, and cheaply
    seq: int
    id: str
    response: dict
    duplicate: bool  # True when this is the stored answer to an earlier request


class Journal:
    """Use as ``async with Journal(directory) as journal:``."""

    def __init__(self, directory: str | Path, *, max_bytes: int = 1 << 30, fsync: bool = True,
                 clock: Callable[[], float] = time.time, segment_bytes: int = SEGMENT_BYTES,
                 writer: str = "inline", direct: bool = True) -> None:
        self.dir = Path(directory)
        self.index = JournalIndex()
        self.faults: list[str] = []
        self._clock = clock
        self._files = Segments(self.dir, segment_bytes=segment_bytes, max_bytes=max_bytes, fsync=fsync,
                               direct=direct, next_seq=lambda: self.index.next_seq)
        self._commit = GroupCommit(self.index, self._files.append, writer)
        self.stats = self._commit.stats
        self.commit_stats = self._commit.commit_stats  # group commit latency and sizes (commit.CommitStats)
        self._aside_fault: int | None = None  # where in faults the records set aside are reported
        self._keys_in_memory: set[int] = set()  # segments deleted whose keys found no room on disk (invariant 8)
        self._compacting = asyncio.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._rand = b""
        self._rand_pos = 0
        self._open = False

    @property
    def on_append(self) -> Callable[[], None] | None:
        """Called (on the event loop) after records were made durable: the uplink's wake-up."""
        return self._commit.on_append

    @on_append.setter
    def on_append(self, callback: Callable[[], None] | None) -> None:
        self._commit.on_append = callback

    @property
    def direct_io(self) -> bool:
        """True while appends go to disk with O_DIRECT."""
        return self._files.direct_io

    # -- lifetime -----------------------------------------------------------

    async def __aenter__(self) -> "Journal":
        await self.open()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def open(self) -> None:
        self._loop = asyncio.get_running_loop()
        await asyncio.to_thread(self._recover)
        self._open = True
        self._commit.start(self._loop, self._files.active)

    async def close(self) -> None:
        self._open = False
        await self._commit.stop()
        self._files.close()

    def _recover(self) -> None:
        self.faults += self._files.recover(self.index.apply, self._clock())
        if any((self.dir / UNSENDABLE_DIR).glob("*.frame")):
            self._report_aside()
        try:
            self._files.open_next()  # a fresh segment per start: old ones are never appended to again
        except JournalFull as exc:
            # Start anyway: taps, quotes and the drain to HQ work without new records.
            fault = f"journal cannot take new records at start-up: {exc}"
            log.error(fault)
            self.faults.append(fault)

    # -- appends and idempotency ---------------------------------------------

    def _stored(self, key: str, req_hash: str) -> Appended | None:
        entry = self.index.idempotency.get(key)
        if entry is None:
            return None
        if not same_request(entry[0], req_hash):
            raise IdempotencyConflict(f"idempotency key {key!r} was already used for a different request")
        answer = orjson.loads(entry[2])
        return Appended(entry[1], answer["tx_id"], answer, True)

    async def lookup(self, idempotency_key: str, request: Any, *, req_hash: str | None = None) -> Appended | None:
        """The stored answer for a key already used, None for a new key;
        IdempotencyConflict when the key came with a different request."""
        req_hash = req_hash or request_hash(request)
        inflight = self._commit.inflight_keys.get(idempotency_key)
        if inflight is not None:  # the first request with this key is being written now
            if not same_request(inflight.req_hash, req_hash):
                raise IdempotencyConflict(f"idempotency key {idempotency_key!r} was already used for a "
                                          "different request")
            # Our own future: the first caller being cancelled must not cancel us.
            waiter = self._loop.create_future()
            if inflight.waiters is None:
                inflight.waiters = []
            inflight.waiters.append(waiter)
            await waiter  # the first one's error, if it failed
        return self._stored(idempotency_key, req_hash)

    async def append(self, type_: str, body: dict, *, idempotency_key: str | None = None,
                     request: Any = None, response: dict | None = None) -> Appended:
        """Make a record durable: returns once its frame is written and
        synced (invariant 3). With an idempotency key, a repeat of the same
        request returns the first answer instead of a new record."""
        if idempotency_key:
            req_hash = request_hash(request)
            if idempotency_key in self._commit.inflight_keys or idempotency_key in self.index.idempotency:
                earlier = await self.lookup(idempotency_key, request, req_hash=req_hash)
                if earlier:
                    return earlier
        if not self._open:
            raise JournalError("journal is not open")
        if not isinstance(type_, str) or not RECORD_TYPE.match(type_) or not isinstance(body, dict):
            raise RecordRefused(f"a record needs a type matching {RECORD_TYPE.pattern} and a JSON object body")
        index = self.index
        seq = index.next_seq
        tx_id = self._new_id()
        ts = int(self._clock() * 1000)
        full = {**response, "seq": seq, "tx_id": tx_id} if response else {"seq": seq, "tx_id": tx_id}
        if idempotency_key:
            payload = {"k": RECORD, "seq": seq, "id": tx_id, "type": type_, "ts": ts, "body": body,
                       "key": idempotency_key, "rh": req_hash, "resp": response or {}}
        else:
            payload = {"k": RECORD, "seq": seq, "id": tx_id, "type": type_, "ts": ts, "body": body}
        data = encode_record(payload)
        index.next_seq = seq + 1  # taken even if the write fails: never reused (invariant 5)
        fut = self._loop.create_future()
        write = Write(frame(data), fut, payload)
        if idempotency_key:
            # On disk the stored answer leaves out seq and tx_id (the frame has
            # them; on_record puts them back); the index keeps the whole answer.
            payload["resp"] = full
            write.key, write.req_hash = idempotency_key, req_hash
            self._commit.inflight_keys[idempotency_key] = write
        self._commit.queue(write)
        # Not shielded: a cancelled caller cancels only this future; the
        # record is still indexed when it reaches the disk.
        await fut
        return Appended(seq, tx_id, full, False)

    def _new_id(self) -> str:
        """128 random bits as hex, like uuid4; urandom is read in blocks
        rather than once per record."""
        pos = self._rand_pos
        if pos >= len(self._rand):
            self._rand, pos = os.urandom(16 * 256), 0
        self._rand_pos = pos + 16
        return self._rand[pos:pos + 16].hex()

    # -- the backlog for HQ ----------------------------------------------------

    async def pending(self, after_seq: int = 0, limit: int = 500) -> list[TxRecord]:
        seqs = self.index.after(after_seq, limit)
        locs = [(s, self.index.pending[s]) for s in seqs]
        return await asyncio.to_thread(self._read_records, locs)

    def _read_records(self, locs) -> list[TxRecord]:
        """Read records back, coherently with the O_DIRECT writer (invariant 11)."""
        payloads = self._files.reader.frames([loc[:3] for _seq, loc in locs])
        out = []
        for (seq, (segment, offset, _length, ts)), p in zip(locs, payloads):
            if p is not None and p.get("seq") == seq:
                out.append(TxRecord(p["seq"], p["id"], p["type"], p["ts"], p["body"]))
            else:
                log.error("journal: record %d unreadable at segment %d offset %d", seq, segment, offset)
                out.append(UnreadableRecord(seq, "", "", ts, None,
                                            f"unreadable in journal segment {segment} at offset {offset}"))
        return out

    async def backlog(self) -> dict:
        """Depth of the backlog and the age of its oldest record."""
        oldest = self.index.oldest_pending_ts()
        now_ms = int(self._clock() * 1000)
        return {"depth": len(self.index.pending), "oldest_age_s": (now_ms - oldest) / 1000 if oldest else None,
                "last_seq": self.index.next_seq - 1, "bytes": self._files.total}

    async def set_aside(self, seq: int, error: str) -> str:
        """Copy a pending record that cannot be sent to ``unsendable/`` (kept,
        never deleted: the original of the placeholder HQ gets) and report it
        as a fault. Idempotent. Returns the copy's path relative to the journal."""
        name = f"{UNSENDABLE_DIR}/{seq:012d}.frame"
        loc = self.index.pending.get(seq)
        if loc is None or (self.dir / name).exists():
            return name
        try:
            await asyncio.to_thread(self._copy_aside, loc, self.dir / name)
        except OSError as exc:  # not sent without its copy: HQ's ack would free the only one
            fault = f"record {seq} cannot be sent to HQ ({error}) nor kept aside ({exc}); it waits"
            if fault not in self.faults:
                self.faults.append(fault)
            raise JournalError(fault) from None
        log.error("journal: record %d cannot be sent to HQ (%s); kept as %s, HQ gets a placeholder", seq, error,
                  name)
        self._report_aside(f"seq {seq}: {error}")
        return name

    def _copy_aside(self, loc: tuple, dest: Path) -> None:
        raw = self._files.reader.raw(*loc[:3])
        make_dirs(dest.parent)
        write_whole(dest, raw)

    def _report_aside(self, last: str | None = None) -> None:
        """One fault line for every record set aside, kept up to date."""
        kept = len(list((self.dir / UNSENDABLE_DIR).glob("*.frame")))
        fault = (f"{kept} journaled record(s) could not be sent to HQ and are kept in "
                 f"{self.dir / UNSENDABLE_DIR} (HQ holds a placeholder for each)" + (f"; last: {last}" if last else ""))
        if self._aside_fault is None:
            self._aside_fault = len(self.faults)
            self.faults.append(fault)
        else:
            self.faults[self._aside_fault] = fault

    # -- acks and compaction ---------------------------------------------------

    async def mark_acked(self, seqs: list[int]) -> int:
        """HQ committed these seqs: forget them. Returns how many were pending."""
        return await self.mark_acked_ranges(seqs_to_ranges(seqs))

    async def mark_acked_ranges(self, ranges) -> int:
        """HQ committed these [lo, hi] ranges (checked by the caller against
        what was sent): forget them. Returns how many were pending. Only
        ranges of records this journal wrote reach the ack frame."""
        last = self.index.next_seq - 1
        ranges = [[max(lo, 1), min(hi, last)] for lo, hi in normal_ranges(ranges) if lo <= last and hi >= 1]
        freed = self.index.on_ack(ranges)
        if freed and self._open:
            # Not awaited: losing this frame in a crash only means a resend,
            # which HQ acks again. It goes with the next sync.
            self._commit.queue(Write(encode_frame({"k": ACK, "r": ranges}), None))
            await self._compact()
        return freed

    async def _compact(self) -> None:
        """Delete what invariant 7 lets go: segments with nothing pending
        (their keys carried once into a key file, invariant 8), key files
        with no key left within retention."""
        async with self._compacting:
            index, files = self.index, self._files
            index.expire_keys(int((self._clock() - IDEMPOTENCY_RETENTION_S) * 1000))
            for n in sorted(self._keys_in_memory):  # written now if there is room
                if not await self._keep_keys(n, freed_segment=None):
                    break
                self._keys_in_memory.discard(n)
            indexed = self._commit.indexed_segment
            for n in files.segments():
                if n >= indexed or index.live.get(n, 0) > 0:
                    continue
                if not await self._keep_keys(n, freed_segment=n):
                    self._keys_in_memory.add(n)
                files.delete_segment(n)
                index.live.pop(n, None)
                if not index.keys_at.get(n):
                    index.keys_at.pop(n, None)
            for n in [n for n in files.key_files if not index.keys_at.get(n)]:
                files.delete_keys(n)
                index.keys_at.pop(n, None)

    async def _keep_keys(self, n: int, freed_segment: int | None) -> bool:
        """Make the keys located at segment n durable in its key file; False
        if there is no room for them (they stay in memory only)."""
        keys = self.index.keys_in(n)
        if not keys or n in self._files.key_files:
            return True  # none, or on disk already (a compaction interrupted after writing them)

        def write() -> bool:  # off the event loop: a segment's keys are megabytes
            data = b"".join(key_frame(k, v) for k, v in keys)
            if not self._files.room_for_keys(len(data), freed_segment):
                return False
            self._files.write_keys(n, data)
            return True

        try:
            if await asyncio.to_thread(write):
                return True
        except OSError as exc:
            log.warning("journal: idempotency keys of segment %d not written (%s)", n, exc)
        log.warning("journal: no room for %d idempotency key(s) of segment %d: kept in memory only", len(keys), n)
        return False


def read_index(directory: str | Path) -> JournalIndex:
    """The index of a journal directory, read-only (for tools and tests; a
    running gateway's journal may be mid-write: read like the journal reads,
    past the page cache)."""
    directory = Path(directory)
    index = JournalIndex()
    for n, suffix in journal_files(directory):
        try:
            buf = read_segment(file_path(directory, n, suffix))
        except FileNotFoundError:  # deleted since listed: nothing in it was pending (invariant 7)
            continue
        for offset, length, payload in scan_frames(buf):
            index.apply(payload, n, offset, length)
    return index
