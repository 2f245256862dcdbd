"""The store-and-forward journal: an append-only log of checksummed frames.

Why not SQLite: measured on this machine (bench.journal), SQLite WAL with
synchronous=FULL made one lane 28 % of the disk's raw append+fdatasync rate
and wrote ~33 KB per transaction (five 4 KiB b-tree pages per commit); this
log writes one frame (~0.6 KB) and one fdatasync per group of appends.

Layout: a directory of segment files ``NNNNNNNN.log``. Each frame is

    b"SG" | u32 length | u32 crc32(payload) | payload (compact JSON)

with three kinds of payload: a segment header ``{"k":"h","next":N}`` (the
next sequence number when the segment was opened, so sequence numbers are
never reused even after every record is acked and compacted away), a record
``{"k":"r","seq","id","type","ts","body",...}`` and an ack
``{"k":"a","r":[[lo,hi],...]}``.

- Durable before the OK: append() returns only after its frame is written
  and fdatasync'd. Everything appended in one turn of the event loop (several
  lanes) is written with one write and one fdatasync (group commit).
- Direct I/O by default (``direct=True``): frames are written with O_DIRECT
  in 512-byte sectors: bench.journal counts ~1.6 KB of device writes per lone
  record (the frame, its sector's rewrite and the zeroing ahead) and ~1.1 KB
  per record with 8 lanes, against ~4.6 KB buffered, and the 8-lane rate is
  higher. Every read of a segment (the drain's pending(), recovery,
  read_index from another process) is O_DIRECT too: Linux does not keep buffered reads coherent with O_DIRECT
  writes to the same pages (open(2)), and a stale cached page reads as a torn
  tail (a drain once stalled on one when reads were buffered). Where the file
  system refuses O_DIRECT (tmpfs: EINVAL) both sides fall back to buffered
  I/O, which is coherent. A direct write carries its own sync (RWF_DSYNC,
  as durable as a write followed by fdatasync, in one call); a buffered
  write is followed by fdatasync.
  With direct I/O, blocks are zeroed ahead of the frames (ZERO_AHEAD), which
  costs one more write of each log byte (~0.6 KB per record) and spares every
  fdatasync a metadata commit. Buffered (``direct=False``), zeroing ahead
  measured no faster and the page cache wrote the zeroed pages again and
  again (77 KB per record by /proc/self/io instead of 4.6 KB), so it is only
  done with direct I/O.
- Cheap per append (the 8-lane rate is CPU-bound): one future per append,
  no shield or done-callbacks; the writer indexes the records it wrote and
  wakes their callers.
- Writer: "inline" (default) writes and syncs on the event loop at the end of
  the turn: a thread hand-off costs ~70 us here, a third of an fdatasync, and
  while the loop waits for the disk new requests gather into the next group.
  "thread" keeps the loop free during the sync, for media whose fdatasync
  stalls for tens of milliseconds (cheap SD cards); see bench.journal.
- Only what can be delivered is journaled: append() refuses (RecordRefused,
  nothing written, no sequence number taken) a record that could not go to
  HQ (not JSON, nested deeper than wire.messages.MAX_BODY_DEPTH, a frame
  over MAX_RECORD_BYTES, a type HQ does not take).
- Forget only on HQ's ack: mark_acked() appends an ack frame; records are
  dropped from the backlog, and a segment file is deleted once none of its
  records is pending and its idempotency keys have expired. An ack never
  moves the next sequence number.
- A record that cannot be sent anyway (written by an older version, or
  unreadable on disk) is copied aside (set_aside(): ``unsendable/``, never
  deleted) and reported as a fault; the uplink sends HQ a placeholder.
- Recovery on open: every frame's checksum is verified. A torn tail (a crash
  during a write: those frames were never acknowledged) is cut off. Damage
  inside a segment sets a copy aside (never deleted), keeps every intact
  frame, and is reported as a fault on the status topic and in the logs.
- Full: past ``max_bytes`` or on ENOSPC an append fails with JournalFull and
  nothing is half-written (the file is cut back to its previous length).

The index (what is pending, idempotency keys, the next sequence number) is
plain data rebuilt from the frames: see JournalIndex.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import errno
import hashlib
import logging
import mmap
import os
import queue
import re
import shutil
import struct
import threading
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, NamedTuple

import orjson

from wire.messages import (MAX_BODY_DEPTH, MAX_RECORD_BYTES, TOO_DEEP, TX_RECORD_SCHEMA, TooDeep, TxRecord,
                           WireError, dumps_within, normal_ranges, seqs_to_ranges)

log = logging.getLogger("storegate.journal")

MAGIC = b"SG"
HEADER = struct.Struct("<2sII")
MAX_FRAME = 16 * 1024 * 1024
SECTOR = 512  # O_DIRECT alignment: the logical sector size of SD cards and most disks
BLOCK = 4096
# Blocks are zeroed this far ahead of the frames: posix_fallocate leaves them
# "unwritten", and an fdatasync after writing into such a block must also
# commit the block's conversion (file-system metadata). Zeroed ahead in
# 256 KiB steps, a group's fdatasync is a data flush only: measured 211 us
# instead of 325 us of I/O per 8-record group here, for one extra write of
# each log byte (~0.6 KB per record). Small steps keep the one group that
# pays for a step fast (~13 ms on a 20 MB/s SD card).
ZERO_AHEAD = 256 << 10
SEGMENT_BYTES = 16 * 1024 * 1024
IDEMPOTENCY_RETENTION_S = 24 * 3600  # a POS retries within minutes; a day is generous
GROUP_MAX = 512
RWF_DSYNC = getattr(os, "RWF_DSYNC", 0)  # Linux 4.7+: a write that is durable when it returns
MEMORY_ONLY = -1  # the "segment" of idempotency keys not on disk (full disk)
UNSENDABLE_DIR = "unsendable"  # copies of records that could not be sent (set_aside)


class JournalError(RuntimeError):
    """The journal could not make an operation durable."""


class JournalFull(JournalError):
    """The journal's disk is full or the journal is at its configured cap."""


class IdempotencyConflict(ValueError):
    """The same idempotency key came with a different request."""


class RecordRefused(ValueError):
    """A record that could not be delivered to HQ; nothing was written."""


_RECORD_TYPE = re.compile(TX_RECORD_SCHEMA["properties"]["type"]["pattern"])


@dataclass(frozen=True)
class UnreadableRecord(TxRecord):
    """A pending record whose frame no longer reads back intact (pending()
    returns it in the record's place so delivery can go on past it)."""

    error: str = ""


class Appended(NamedTuple):  # immutable and cheap: a frozen dataclass's __init__ cost ~1 us per append
    seq: int
    id: str
    response: dict
    duplicate: bool  # True when this is the stored answer to an earlier request


try:  # CPython's own SHA-256: the same digest as hashlib's, ~0.7 us less for a short request
    from _sha256 import sha256 as _sha256
except ImportError:  # pragma: no cover - a build without it
    _sha256 = hashlib.sha256


def request_hash(request: Any) -> str:
    """128 bits of SHA-256 over the canonical request: plenty to tell a
    retry from a different request, and 32 bytes less in every frame."""
    return _sha256(orjson.dumps(request, option=orjson.OPT_SORT_KEYS)).hexdigest()[:32]


def same_request(stored: str, req_hash: str) -> bool:
    """Frames written before the hash was shortened carry all 64 hex digits."""
    return stored == req_hash or stored[:32] == req_hash


# -- frames (pure) ------------------------------------------------------------

_pack_header = HEADER.pack


def encode_frame(payload: dict) -> bytes:
    data = orjson.dumps(payload)
    return _pack_header(MAGIC, len(data), zlib.crc32(data)) + data


def _frame_at(buf, pos: int) -> tuple[int, dict] | None:
    """(length, payload) of the intact frame at pos in buf (bytes, mmap or
    memoryview), or None if there is none there."""
    if pos < 0 or pos + HEADER.size > len(buf):
        return None
    magic, length, crc = HEADER.unpack_from(buf, pos)
    end = pos + HEADER.size + length
    if magic != MAGIC or length > MAX_FRAME or end > len(buf):
        return None
    data = buf[pos + HEADER.size:end]
    if zlib.crc32(data) != crc:
        return None
    try:
        return end - pos, orjson.loads(data)
    except orjson.JSONDecodeError:
        return None


def scan_frames(buf: bytes, start: int = 0):
    """Yield (offset, length, payload dict) for each intact frame from start,
    and stop at the first bad one. The caller compares the end it reached
    with len(buf) to see whether anything was left unread."""
    pos = start
    while (found := _frame_at(buf, pos)) is not None:
        length, payload = found
        yield pos, length, payload
        pos += length


def frames_after_damage(buf: bytes, start: int):
    """Resynchronise after a damaged spot: every intact frame found by
    searching for the next magic that starts a valid frame."""
    pos = buf.find(MAGIC, start + 1)
    while pos != -1:
        frames = list(scan_frames(buf, pos))
        if frames:
            yield from frames
            last_off, last_len, _ = frames[-1]
            pos = buf.find(MAGIC, last_off + last_len + 1) if last_off + last_len < len(buf) else -1
            if pos != -1 and pos < last_off + last_len:
                pos = buf.find(MAGIC, last_off + last_len)
        else:
            pos = buf.find(MAGIC, pos + 1)


def decode_frame(buf, pos: int, length: int) -> dict | None:
    """The payload of the frame of `length` bytes at pos in buf (bytes, mmap
    or memoryview), or None if it is not an intact frame there."""
    found = _frame_at(buf, pos)
    return found[1] if found is not None and found[0] == length else None


# -- coherent reads --------------------------------------------------------------
#
# The writer appends with O_DIRECT. Linux does not keep buffered reads coherent
# with O_DIRECT writes to the same pages (open(2)): a page cached by a buffered
# read can stay stale, and it outlives the process (a restart would read it
# too). An O_DIRECT read never uses cached pages (it writes dirty ones back
# first), so it sees what the writer wrote whichever way it was written. Every
# read of a segment therefore goes through O_DIRECT where the file system
# allows it; where it does not (tmpfs: EINVAL), the writer is buffered too and
# buffered reads are coherent.

READ_ALIGNMENTS = (SECTOR, BLOCK)  # tried in turn: 4 KiB-sector devices refuse 512-byte O_DIRECT
READ_MAX = 1 << 20  # one read covers up to this much of a segment (a drain batch is ~300 KB)
READ_GAP = 64 << 10  # records this close together are read in one call (acks and keys between them)


class _ReadFile:
    """A segment open for reading, and the O_DIRECT alignment that works for
    it (0: buffered)."""

    __slots__ = ("path", "fd", "align")

    def __init__(self, path: str | Path) -> None:
        self.path = path
        self.fd, self.align = -1, 0
        if hasattr(os, "O_DIRECT"):
            try:
                self.fd, self.align = os.open(path, os.O_RDONLY | os.O_DIRECT), READ_ALIGNMENTS[0]
            except OSError as exc:
                if exc.errno != errno.EINVAL:  # EINVAL: no O_DIRECT on this file system
                    raise
        if self.fd < 0:
            self.fd = os.open(path, os.O_RDONLY)

    def refused(self) -> None:
        """O_DIRECT refused this alignment: try the next, then buffered."""
        later = [a for a in READ_ALIGNMENTS if a > self.align]
        if later:
            self.align = later[0]
            return
        fd = os.open(self.path, os.O_RDONLY)
        os.close(self.fd)
        self.fd, self.align = fd, 0

    def close(self) -> None:
        os.close(self.fd)


class _Reader:
    """Reads byte ranges into one reusable page-aligned buffer (O_DIRECT
    needs aligned memory, offsets and lengths). Not thread-safe: the caller
    serialises its use; a returned view is valid until the next read."""

    def __init__(self) -> None:
        self._buf: mmap.mmap | None = None

    def read(self, f: _ReadFile, offset: int, length: int):
        """Up to `length` bytes at offset (fewer at the end of the file), as
        a memoryview into the buffer, or bytes when read buffered."""
        while f.align:
            align = f.align
            start = offset - offset % align
            size = (offset + length - start + align - 1) & -align
            buf = self._buf
            if buf is None or len(buf) < size:
                buf = self._buf = mmap.mmap(-1, (size + mmap.PAGESIZE - 1) & -mmap.PAGESIZE)
            view = memoryview(buf)
            got = 0
            try:
                while got < size:
                    n = os.preadv(f.fd, [view[got:size]], start + got)
                    got += n
                    if n == 0 or n % align:  # the end of the file
                        break
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                f.refused()
                continue
            head = offset - start
            return view[head:max(head, min(got, head + length))]
        return os.pread(f.fd, length, offset)


def read_segment(path: str | Path) -> bytes:
    """A whole segment file, read coherently with an O_DIRECT writer."""
    f = _ReadFile(path)
    try:
        size = os.fstat(f.fd).st_size
        return bytes(_Reader().read(f, 0, size)) if size else b""
    finally:
        f.close()


# -- the index: plain data rebuilt from frames (pure) -------------------------

@dataclass
class JournalIndex:
    next_seq: int = 1
    pending: dict = field(default_factory=dict)        # seq -> (segment no, offset, length, ts ms)
    order: list = field(default_factory=list)          # pending seqs in ascending order (may hold acked ones)
    idempotency: dict = field(default_factory=dict)    # key -> (request hash, seq, response, ts ms, segment)
    live: dict = field(default_factory=dict)           # segment no -> pending records in it

    def on_header(self, next_seq: int) -> None:
        self.next_seq = max(self.next_seq, next_seq)

    def on_record(self, frame: dict, segment: int, offset: int, length: int) -> None:
        seq = frame["seq"]
        if seq >= self.next_seq:
            self.next_seq = seq + 1
        pending = self.pending
        if seq not in pending:
            pending[seq] = (segment, offset, length, frame["ts"])
            order = self.order
            if order and seq < order[-1]:
                bisect.insort(order, seq)
            else:
                order.append(seq)
            live = self.live
            live[segment] = live.get(segment, 0) + 1
        key = frame.get("key")
        if key:
            resp = frame["resp"]
            if resp.get("tx_id") != frame["id"]:  # as on disk: the answer without the frame's seq and id
                resp = {**resp, "seq": seq, "tx_id": frame["id"]}
            self.idempotency[key] = (frame["rh"], seq, resp, frame["ts"], segment)

    def on_ack(self, ranges) -> int:
        """Forget the pending records in these ranges; how many there were.
        The work is bounded by the records in the ranges, however wide they
        are (ack frames of older versions were not checked against what was
        sent), and the next sequence number never moves."""
        freed = 0
        pending, order, live = self.pending, self.order, self.live
        for lo, hi in normal_ranges(ranges):
            for k in range(bisect.bisect_left(order, lo), bisect.bisect_right(order, hi)):
                loc = pending.pop(order[k], None)
                if loc is not None:
                    live[loc[0]] -= 1
                    freed += 1
        if len(order) > 2 * len(pending) + 1024:
            self.order = [s for s in order if s in pending]
        return freed

    def any_pending(self, lo: int, hi: int) -> bool:
        order, pending = self.order, self.pending
        return any(order[k] in pending
                   for k in range(bisect.bisect_left(order, lo), bisect.bisect_right(order, hi)))

    def after(self, cursor: int, limit: int) -> list[int]:
        i = bisect.bisect_right(self.order, cursor)
        out = []
        while i < len(self.order) and len(out) < limit:
            seq = self.order[i]
            if seq in self.pending:
                out.append(seq)
            i += 1
        return out

    def expire_keys(self, older_than_ms: int) -> None:
        for key in [k for k, v in self.idempotency.items() if v[3] < older_than_ms]:
            del self.idempotency[key]

    def on_key(self, frame: dict, segment: int) -> None:
        """An idempotency key carried forward out of a compacted segment."""
        self.idempotency[frame["key"]] = (frame["rh"], frame["seq"], frame["resp"], frame["ts"], segment)
        self.next_seq = max(self.next_seq, frame["seq"] + 1)

    def keys_in(self, segment: int) -> list:
        return [(k, v) for k, v in self.idempotency.items() if v[4] == segment]


# -- the journal (I/O) ----------------------------------------------------------

class _Write:
    """One frame queued for the writer. A record's frame dict rides along so
    the writer can index it once it is on disk, whoever still waits for it."""

    __slots__ = ("data", "future", "frame", "key", "req_hash", "waiters")

    def __init__(self, data: bytes, future: asyncio.Future | None, frame: dict | None = None,
                 key: str | None = None, req_hash: str = "") -> None:
        self.data = data
        self.future = future
        self.frame = frame
        self.key = key
        self.req_hash = req_hash
        self.waiters: list[asyncio.Future] | None = None  # retries of the same key, waiting on this one


class Journal:
    """Use as ``async with Journal(directory) as journal:``."""

    def __init__(self, directory: str | Path, *, max_bytes: int = 1 << 30, fsync: bool = True,
                 clock: Callable[[], float] = time.time, segment_bytes: int = SEGMENT_BYTES,
                 writer: str = "inline", direct: bool = True) -> None:
        if writer not in ("inline", "thread"):
            raise ValueError(f"journal writer must be 'inline' or 'thread', not {writer!r}")
        self.dir = Path(directory)
        self.writer = writer
        self.max_bytes = max_bytes
        self.fsync = fsync
        self.segment_bytes = segment_bytes
        self.direct = direct  # O_DIRECT appends where the file system allows them
        self._rwf_dsync = bool(RWF_DSYNC)  # direct appends sync in the write itself (see _pwrite)
        self._clock = clock
        self.index = JournalIndex()
        self.faults: list[str] = []
        self._aside_fault: int | None = None  # where in faults the records set aside are reported
        self.on_append: Callable[[], None] | None = None  # the uplink's wake-up
        self.stats = {"appends": 0, "groups": 0, "bytes": 0}
        self._writes: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._inflight_keys: dict[str, _Write] = {}  # key -> its record being written now
        self._loop: asyncio.AbstractEventLoop | None = None
        self._rand = b""
        self._rand_pos = 0
        self._batch: list[_Write] = []
        self._open = False
        self._segment = 0            # number of the segment being written
        self._fd: int | None = None
        self._size = 0               # bytes in the active segment
        self._direct_fd: int | None = None  # the active segment opened with O_DIRECT, if allowed
        self._tail = b""             # direct I/O: the bytes of the partial last sector on disk
        self._zeroed = 0             # the active segment's blocks before this offset are written (initialised)
        self._zeros: mmap.mmap | None = None  # an aligned buffer of zeros for ZERO_AHEAD
        self._buf: mmap.mmap | None = None  # direct I/O: an aligned buffer for one group
        self._total = 0              # bytes in all segments
        self._readers: dict[int, _ReadFile] = {}
        self._readers_lock = threading.Lock()  # guards _readers and _reader (reads run in worker threads)
        self._reader = _Reader()
        self._segments: set[int] = set()  # segment files on disk
        self._logical: dict[int, int] = {}  # segment -> bytes of frames in it

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
        if self.writer == "thread":
            self._thread = threading.Thread(target=self._writer_loop, name="journal-writer", daemon=True)
            self._thread.start()

    async def close(self) -> None:
        if self._batch:
            self._hand_over()  # frames queued in this turn (ack frames) still go to disk
        self._open = False
        if self._thread:
            self._writes.put(None)
            await asyncio.to_thread(self._thread.join)
            self._thread = None
        with self._readers_lock:
            for f in self._readers.values():
                f.close()
            self._readers.clear()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._direct_fd is not None:
            os.close(self._direct_fd)
            self._direct_fd = None

    # -- recovery -----------------------------------------------------------

    def _segment_path(self, n: int) -> Path:
        return self.dir / f"{n:08d}.log"

    def _recover(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        segments = sorted(int(p.stem) for p in self.dir.glob("*.log") if p.stem.isdigit())
        self._segments = set(segments)
        for n in segments:
            self._load_segment(n, last=(n == segments[-1]))
        self._total = sum(self._logical.values())
        if any((self.dir / UNSENDABLE_DIR).glob("*.frame")):
            self._report_aside()
        self._segment = segments[-1] if segments else 0
        try:
            self._open_new_segment()  # a fresh segment per start: old ones are never appended to again
        except JournalFull as exc:
            # Start anyway: taps, quotes and the drain to HQ work without new records.
            fault = f"journal cannot take new records at start-up: {exc}"
            log.error(fault)
            self.faults.append(fault)
        self._sync_dir()

    def _load_segment(self, n: int, last: bool) -> None:
        path = self._segment_path(n)
        # Read past the page cache too: a page left stale by an earlier run's
        # O_DIRECT writes would look like a torn tail and be cut off.
        buf = read_segment(path)
        good_end = 0
        for offset, length, frame in scan_frames(buf):
            self._index_frame(frame, n, offset, length)
            good_end = offset + length
        self._logical[n] = good_end
        if good_end == len(buf) or not buf[good_end:].strip(b"\0"):
            return  # the end of the frames; the rest is preallocated space
        rescued = list(frames_after_damage(buf, good_end))
        if not rescued and last:
            # A crash during a write: frames never fsync'd, never acknowledged.
            log.warning("journal %s: cut a torn tail of %d bytes (an interrupted write)", path.name,
                        len(buf) - good_end)
            with open(path, "r+b") as f:
                f.truncate(good_end)
                os.fsync(f.fileno())
            return
        aside = path.with_name(f"{path.name}.damaged-{int(self._clock())}")
        with open(aside, "wb") as f:  # what we read, not a possibly stale cached copy
            f.write(buf)
            f.flush()
            os.fsync(f.fileno())
        shutil.copystat(path, aside)
        # Keep the intact frames: rewrite the segment from them, atomically.
        kept = buf[:good_end] + b"".join(buf[o:o + l] for o, l, _ in rescued)
        tmp = path.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            f.write(kept)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        base = good_end
        for offset, length, frame in rescued:
            self._index_frame(frame, n, base, length)
            base += length
        self._logical[n] = base
        lost = len(buf) - len(kept)
        fault = (f"journal segment {path.name} damaged: {lost} bytes unreadable, copy set aside as "
                 f"{aside.name}; {len(rescued)} frames after the damage recovered")
        log.error(fault)
        self.faults.append(fault)

    def _index_frame(self, frame: dict, segment: int, offset: int, length: int) -> None:
        kind = frame.get("k")
        if kind == "r":
            self.index.on_record(frame, segment, offset, length)
        elif kind == "a":
            self.index.on_ack(frame["r"])
        elif kind == "h":
            self.index.on_header(frame["next"])
        elif kind == "i":
            self.index.on_key(frame, segment)

    def _open_new_segment(self) -> None:
        """Start the next segment, its space allocated up front: an fdatasync
        then need not commit a new file size each time (measured ~1.4x the
        raw append+fdatasync rate on ext4), and a full disk shows here, at
        rotation, never in the middle of a frame."""
        n = self._segment + 1
        path = self._segment_path(n)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        header = encode_frame({"k": "h", "next": self.index.next_seq})
        try:
            try:
                os.posix_fallocate(fd, 0, max(self.segment_bytes, len(header)))
            except OSError as exc:
                if exc.errno not in (95, 22):  # EOPNOTSUPP/EINVAL: a file system without fallocate
                    raise
            os.pwrite(fd, header, 0)
            os.fsync(fd)
        except OSError as exc:
            os.close(fd)
            path.unlink(missing_ok=True)
            if exc.errno in (28, 27):  # ENOSPC, EFBIG
                raise JournalFull("the journal disk is full") from None
            raise
        if self._fd is not None:
            os.close(self._fd)
        if self._direct_fd is not None:
            os.close(self._direct_fd)
            self._direct_fd = None
        if self.direct and hasattr(os, "O_DIRECT"):
            try:
                self._direct_fd = os.open(path, os.O_WRONLY | os.O_DIRECT)
            except OSError:  # tmpfs and some other file systems: buffered writes
                self._direct_fd = None
        self._fd, self._segment = fd, n
        self._segments.add(n)
        self._size = len(header)
        self._tail = header[len(header) - len(header) % SECTOR:]
        self._zeroed = BLOCK  # the header's block was written and fsync'd above
        self._logical[n] = len(header)
        self._total += len(header)

    def _sync_dir(self) -> None:
        fd = os.open(self.dir, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    # -- the writer: one write and one fdatasync per group ---------------------

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

    def _write_group(self, group: list[_Write]) -> tuple[tuple[int, int] | None, JournalError | None]:
        """Write and fdatasync a group of frames with one pwrite: (segment,
        offset of the first frame), or the error. Touches no index state, so
        it may run on the writer thread."""
        data = group[0].data if len(group) == 1 else b"".join([w.data for w in group])
        try:
            if self._fd is None or (self._size + len(data) > self.segment_bytes and self._size > 0):
                self._open_new_segment()
                self._sync_dir()
            if self._total + len(data) > self.max_bytes and any(w.future for w in group):
                raise JournalFull(f"the journal is at its cap of {self.max_bytes} bytes")
            start, tail = self._size, self._tail
            try:
                if self._direct_fd is not None and start + len(data) + BLOCK > self._zeroed:
                    self._zero_ahead(start + len(data) + BLOCK)
                if not self._pwrite(data, start, sync=self.fsync) and self.fsync:
                    os.fdatasync(self._fd)
            except OSError as exc:
                # Nothing half-written stays in the log: zero what was written.
                self._tail = tail
                with contextlib.suppress(OSError):
                    self._pwrite(b"\0" * len(data), start)
                    os.fdatasync(self._fd)
                self._tail = tail
                if exc.errno in (28, 27):
                    raise JournalFull("the journal disk is full") from None
                raise JournalError(f"journal write failed: {exc.strerror or exc}") from None
            self._size += len(data)
            self._logical[self._segment] = self._size
            self._total += len(data)
            self.stats["groups"] += 1
            self.stats["bytes"] += len(data)
            return (self._segment, start), None
        except (JournalError, OSError) as exc:
            error = exc if isinstance(exc, JournalError) else JournalError(f"journal write failed: {exc}")
            log.error("journal: %s", error)
            return None, error

    def _zero_ahead(self, needed: int) -> None:
        """Write zeros from the zeroed horizon (always past the last frame, so
        no frame is touched) to ZERO_AHEAD beyond `needed`; the group's own
        fdatasync makes them durable with it."""
        limit = self.segment_bytes - self.segment_bytes % BLOCK
        end = min(limit, max(needed, self._zeroed) + ZERO_AHEAD)
        end -= end % BLOCK
        if end <= self._zeroed:
            return
        if self._zeros is None:
            self._zeros = mmap.mmap(-1, ZERO_AHEAD)  # anonymous memory reads as zeros; never written
        pos = self._zeroed
        while pos < end:
            n = min(end - pos, ZERO_AHEAD)
            written = None
            if self._direct_fd is not None:
                try:
                    written = os.pwritev(self._direct_fd, [memoryview(self._zeros)[:n]], pos)
                except OSError as exc:
                    if exc.errno != 22:  # EINVAL: O_DIRECT refused; buffered from here on
                        raise
                    os.close(self._direct_fd)
                    self._direct_fd = None
            if written is None:
                written = os.pwrite(self._fd, memoryview(self._zeros)[:n], pos)
            if written != n:
                raise OSError(28, "short write")
            pos += n
        self._zeroed = end

    def _pwrite(self, data: bytes, start: int, sync: bool = False) -> bool:
        """Write data at start, the end of the frames. With O_DIRECT only the
        512-byte sectors touched go to the device (the partial last sector is
        rewritten with the same bytes in front): ~1 KB per lone record
        instead of a 4 KiB page-cache page, and no slower here (bench.journal).
        sync: make it durable too. A direct write does it in the same call
        (RWF_DSYNC: the kernel then syncs as fdatasync would, flushing the
        device's write cache; one system call less per group, +1-7% on 8
        lanes in A/B runs here) and returns True; otherwise the caller must
        fdatasync."""
        if self._direct_fd is not None:
            head = len(self._tail)
            n = head + len(data)
            size = (n + SECTOR - 1) & -SECTOR
            buf = self._buf
            if buf is None or len(buf) < size:
                buf = self._buf = mmap.mmap(-1, (size + mmap.PAGESIZE - 1) & -mmap.PAGESIZE)  # page-aligned
            buf[:head] = self._tail
            buf[head:n] = data
            buf[n:size] = bytes(size - n)  # zeros past the end read as unused space on recovery
            flags = (RWF_DSYNC,) if sync and self._rwf_dsync else ()
            try:
                written = os.pwritev(self._direct_fd, [memoryview(buf)[:size]], start - head, *flags)
            except OSError as exc:
                if flags and exc.errno == errno.EOPNOTSUPP:  # a kernel without per-write sync
                    self._rwf_dsync = False
                    return self._pwrite(data, start, sync)  # (nothing written: the tail is as it was)
                if exc.errno != errno.EINVAL:  # this file system refuses the alignment; go buffered
                    raise
                os.close(self._direct_fd)
                self._direct_fd = None
            else:
                if written != size:
                    raise OSError(28, "short write")
                end = start + len(data)
                self._tail = bytes(buf[n - end % SECTOR:n]) if end % SECTOR else b""
                return bool(flags)
        written = os.pwrite(self._fd, data, start)  # (the tail is not needed: never direct again in this segment)
        if written != len(data):
            raise OSError(28, "short write")
        return False

    def _finish(self, group: list[_Write], placed: tuple[int, int] | None, error: JournalError | None) -> None:
        """On the event loop, after a group's write: index every record that is
        on disk (even if its caller was cancelled meanwhile, e.g. a POS that
        hung up: it is sent, and a retry with its key finds it), then wake the
        callers and any retries waiting on their keys."""
        inflight = self._inflight_keys
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
                    # A record's caller needs no location; _submit's callers do.
                    fut.set_result(None if w.frame is not None else (segment, offset, n))
                if w.waiters:
                    for waiter in w.waiters:
                        if not waiter.done():
                            waiter.set_result(None)
                offset += n
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

    def _submit(self, data: bytes) -> asyncio.Future:
        """Queue frames that are not records (carried-forward keys)."""
        if not self._open:
            raise JournalError("journal is not open")
        fut = asyncio.get_running_loop().create_future()
        self._queue_frame(_Write(data, fut))
        return fut

    def _queue_frame(self, write: _Write) -> None:
        """Everything queued in one turn of the event loop goes to the writer
        together (at the end of the turn), so concurrent lanes share one
        fdatasync."""
        if not self._batch:
            self._loop.call_soon(self._hand_over)
        self._batch.append(write)

    def _hand_over(self) -> None:
        batch, self._batch = self._batch, []
        if self.writer == "thread":
            self._writes.put(batch)
        else:
            self._finish(batch, *self._write_group(batch))

    # -- operations (called on the event loop) --------------------------------

    def _stored(self, key: str, req_hash: str) -> Appended | None:
        entry = self.index.idempotency.get(key)
        if entry is None:
            return None
        if not same_request(entry[0], req_hash):
            raise IdempotencyConflict(f"idempotency key {key!r} was already used for a different request")
        return Appended(entry[1], entry[2]["tx_id"], entry[2], True)

    async def lookup(self, idempotency_key: str, request: Any, *, req_hash: str | None = None) -> Appended | None:
        """The stored answer for a key already used, None for a new key;
        IdempotencyConflict when the key came with a different request."""
        req_hash = req_hash or request_hash(request)
        inflight = self._inflight_keys.get(idempotency_key)
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
        fdatasync'd. With an idempotency key, a repeat of the same request
        returns the first answer instead of a new record."""
        if idempotency_key:
            req_hash = request_hash(request)
            if idempotency_key in self._inflight_keys or idempotency_key in self.index.idempotency:
                earlier = await self.lookup(idempotency_key, request, req_hash=req_hash)
                if earlier:
                    return earlier
        if not self._open:
            raise JournalError("journal is not open")
        if not isinstance(type_, str) or not _RECORD_TYPE.match(type_) or not isinstance(body, dict):
            raise RecordRefused(f"a record needs a type matching {_RECORD_TYPE.pattern} and a JSON object body")
        index = self.index
        seq = index.next_seq
        tx_id = self._new_id()
        ts = int(self._clock() * 1000)
        full = {**response, "seq": seq, "tx_id": tx_id} if response else {"seq": seq, "tx_id": tx_id}
        if idempotency_key:
            frame = {"k": "r", "seq": seq, "id": tx_id, "type": type_, "ts": ts, "body": body,
                     "key": idempotency_key, "rh": req_hash, "resp": response or {}}
        else:
            frame = {"k": "r", "seq": seq, "id": tx_id, "type": type_, "ts": ts, "body": body}
        data = self._encode_record(frame)
        index.next_seq = seq + 1  # taken even if the write fails: never reused
        if idempotency_key:
            # On disk the stored answer leaves out seq and tx_id (the frame has
            # them; on_record puts them back); the index keeps the full answer.
            frame["resp"] = full
        fut = self._loop.create_future()
        write = _Write(_pack_header(MAGIC, len(data), zlib.crc32(data)) + data, fut, frame)
        if idempotency_key:
            write.key, write.req_hash = idempotency_key, req_hash
            self._inflight_keys[idempotency_key] = write
        if not self._batch:
            self._loop.call_soon(self._hand_over)
        self._batch.append(write)
        # Not shielded: a cancelled caller cancels only this future; _finish
        # still indexes the record when it reaches the disk.
        await fut
        return Appended(seq, tx_id, full, False)

    @staticmethod
    def _encode_record(frame: dict) -> bytes:
        """The frame of a record, or RecordRefused if the record could not
        be delivered to HQ (the frame holds the record and more, so a frame
        within the bounds is a record within them)."""
        try:
            data = dumps_within(frame, MAX_BODY_DEPTH + 1)
        except TooDeep:
            raise RecordRefused(f"record not journaled: {TOO_DEEP}") from None
        except WireError as exc:
            raise RecordRefused(f"record not journaled: {exc}") from None
        if len(data) > MAX_RECORD_BYTES:
            raise RecordRefused(f"record not journaled: {len(data)} bytes, more than the {MAX_RECORD_BYTES} "
                                "a record may hold")
        return data

    def _new_id(self) -> str:
        """128 random bits as hex, like uuid4; urandom is read in blocks
        because a getrandom() call per record shows in the profile."""
        pos = self._rand_pos
        if pos >= len(self._rand):
            self._rand, pos = os.urandom(16 * 256), 0
        self._rand_pos = pos + 16
        return self._rand[pos:pos + 16].hex()

    async def pending(self, after_seq: int = 0, limit: int = 500) -> list[TxRecord]:
        seqs = self.index.after(after_seq, limit)
        locs = [(s, self.index.pending[s]) for s in seqs]
        return await asyncio.to_thread(self._read_records, locs)

    def _read_records(self, locs) -> list[TxRecord]:
        """Read records (ascending seq) coherently with the O_DIRECT writer:
        records lying close together in one segment (the usual case: a
        backlog is mostly consecutive frames) come in with one read."""
        out = []
        n = len(locs)
        with self._readers_lock:
            i = 0
            while i < n:
                segment, first, length, _ts = locs[i][1]
                end = first + length
                j = i + 1
                while j < n:
                    seg, offset, length, _ts = locs[j][1]
                    if seg != segment or not end <= offset <= end + READ_GAP or offset + length - first > READ_MAX:
                        break
                    end = offset + length
                    j += 1
                f = self._readers.get(segment)
                if f is None:
                    f = self._readers[segment] = _ReadFile(self._segment_path(segment))
                buf = self._reader.read(f, first, end - first)
                bad = []
                for seq, (_seg, offset, length, ts) in locs[i:j]:
                    frame = decode_frame(buf, offset - first, length)
                    if frame is None or frame.get("seq") != seq:
                        bad.append((len(out), seq, offset, length, ts))
                        out.append(None)
                    else:
                        out.append(TxRecord(frame["seq"], frame["id"], frame["type"], frame["ts"], frame["body"]))
                del buf  # the view pins the reader's buffer
                for at, seq, offset, length, ts in bad:  # read once more on its own before giving up on it
                    frame = decode_frame(self._reader.read(f, offset, length), 0, length)
                    if frame is not None and frame.get("seq") == seq:
                        out[at] = TxRecord(frame["seq"], frame["id"], frame["type"], frame["ts"], frame["body"])
                    else:
                        log.error("journal: record %d unreadable at segment %d offset %d", seq, segment, offset)
                        out[at] = UnreadableRecord(seq, "", "", ts, None,
                                                   f"unreadable in journal segment {segment} at offset {offset}")
                i = j
        return out

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
        segment, offset, length, _ts = loc
        with self._readers_lock:
            f = self._readers.get(segment)
            if f is None:
                f = self._readers[segment] = _ReadFile(self._segment_path(segment))
            raw = bytes(self._reader.read(f, offset, length))
        dest.parent.mkdir(exist_ok=True)
        tmp = dest.with_suffix(".tmp")
        with open(tmp, "wb") as out:
            out.write(raw)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, dest)
        fd = os.open(dest.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

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
        if freed:
            # Not awaited: losing this frame in a crash only means a resend,
            # which HQ acks again. It rides along with the next fsync.
            self._queue_frame(_Write(encode_frame({"k": "a", "r": ranges}), None))
            await self._compact()
        return freed

    async def _compact(self) -> None:
        """Delete segments with nothing pending. Idempotency keys still within
        their retention are first carried forward into the active segment.
        On a full disk they are kept in memory only (and carried forward by a
        later compaction): freeing the space matters more than keeping a
        retry's answer across a crash during the full-disk episode."""
        self.index.expire_keys(int((self._clock() - IDEMPOTENCY_RETENTION_S) * 1000))
        for n in [MEMORY_ONLY] + sorted(self._segments):
            if n != MEMORY_ONLY and (n >= self._segment or self.index.live.get(n, 0) > 0):
                continue
            keys = self.index.keys_in(n)
            if keys:
                frames = b"".join(encode_frame({"k": "i", "key": k, "rh": v[0], "seq": v[1], "resp": v[2],
                                                "ts": v[3]}) for k, v in keys)
                try:
                    segment, _offset, _length = await self._submit(frames)
                except JournalError:
                    segment = MEMORY_ONLY
                    if n == MEMORY_ONLY:
                        return
                    log.warning("journal full: %d idempotency key(s) kept in memory only", len(keys))
                for k, v in keys:
                    if self.index.idempotency.get(k) == v:
                        self.index.idempotency[k] = (*v[:4], segment)
            if n == MEMORY_ONLY:
                continue
            path = self._segment_path(n)
            with self._readers_lock:
                f = self._readers.pop(n, None)
                if f is not None:
                    f.close()
            path.unlink(missing_ok=True)
            self._total -= self._logical.pop(n, 0)
            self._segments.discard(n)
            self.index.live.pop(n, None)

    async def backlog(self) -> dict:
        """Depth of the backlog and the age of its oldest record."""
        pending = self.index.pending
        oldest = None
        for seq in self.index.order:
            if seq in pending:
                oldest = pending[seq][3]
                break
        now_ms = int(self._clock() * 1000)
        return {"depth": len(pending), "oldest_age_s": (now_ms - oldest) / 1000 if oldest else None,
                "last_seq": self.index.next_seq - 1, "bytes": self._total}


def read_index(directory: str | Path) -> JournalIndex:
    """The index of a journal directory, read-only (for tools and tests;
    a running gateway's journal may be mid-write: read like the journal
    reads, past the page cache)."""
    index = JournalIndex()
    for path in sorted(Path(directory).glob("*.log")):
        if not path.stem.isdigit():
            continue
        for offset, length, frame in scan_frames(read_segment(path)):
            kind = frame.get("k")
            if kind == "r":
                index.on_record(frame, int(path.stem), offset, length)
            elif kind == "a":
                index.on_ack(frame["r"])
            elif kind == "h":
                index.on_header(frame["next"])
            elif kind == "i":
                index.on_key(frame, int(path.stem))
    return index

