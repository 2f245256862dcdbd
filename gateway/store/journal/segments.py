"""The journal's files: appends to the active segment (direct I/O, zeroing
ahead, one write and one sync per group, nothing half-written), coherent
reads, recovery of a file on open (torn tail or damage), key files.
Invariants 2, 4, 10 and 11 in gateway.store.journal."""

from __future__ import annotations

import errno
import logging
import mmap
import os
import shutil
import threading
from pathlib import Path
from typing import Callable

from gateway.store.journal.errors import JournalError, JournalFull
from gateway.store.journal.format import SEGMENT_HEADER, decode_frame, encode_frame, frames_after_damage, scan_frames
from gateway.store.durable import make_dirs, sync_dir

log = logging.getLogger("storegate.journal")

SEGMENT_BYTES = 16 * 1024 * 1024
SECTOR = 512  # O_DIRECT alignment: the logical sector size of SD cards and most disks
BLOCK = 4096
# How far ahead of the frames blocks are zeroed (direct I/O only). A block
# posix_fallocate left "unwritten" makes the fdatasync after a write into it
# commit file-system metadata too; written zeros spare every group that.
# Small steps keep the one group that pays for a step short.
ZERO_AHEAD = 256 << 10
RWF_DSYNC = getattr(os, "RWF_DSYNC", 0)  # Linux 4.7+: a write that is durable when it returns
READ_ALIGNMENTS = (SECTOR, BLOCK)  # tried in turn: 4 KiB-sector devices refuse 512-byte O_DIRECT
READ_MAX = 1 << 20  # one read covers up to this much of a segment
READ_GAP = 64 << 10  # records this close together are read in one call (acks between them)

WRITE_STEP = 1 << 20  # write_whole syncs after each step

LOG = ".log"    # a segment
KEYS = ".keys"  # the idempotency keys of a deleted segment of the same number
TMP = ".tmp"    # a replacement being written (write_whole)
DISK_FULL = (errno.ENOSPC, errno.EFBIG)
NO_FALLOCATE = (errno.EOPNOTSUPP, errno.EINVAL)


def file_path(directory: Path, n: int, suffix: str) -> Path:
    return directory / f"{n:08d}{suffix}"


def journal_files(directory: Path) -> list[tuple[int, str]]:
    """(number, LOG or KEYS) of the journal's files, in the order they are
    read: by number, a segment before its key file."""
    found = []
    for suffix in (LOG, KEYS):
        found += [(int(p.stem), suffix) for p in directory.glob(f"*{suffix}") if p.stem.isdigit()]
    return sorted(found, key=lambda f: (f[0], f[1] == KEYS))


def write_whole(path: Path, data: bytes) -> None:
    """Put a file in place whole or not at all: written and synced under a
    temporary name, renamed, the directory synced. Written in steps, each
    synced, so that the lanes' appends reach the device between them rather
    than wait behind a segment's worth of keys."""
    tmp = path.with_name(path.name + TMP)
    view = memoryview(data)
    try:
        with open(tmp, "wb") as f:
            for at in range(0, len(data), WRITE_STEP):
                f.write(view[at:at + WRITE_STEP])
                f.flush()
                os.fdatasync(f.fileno())
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    sync_dir(path.parent)


# -- coherent reads (invariant 11) ----------------------------------------------

class ReadFile:
    """A file open for reading, and the O_DIRECT alignment that works for it
    (0: buffered)."""

    __slots__ = ("path", "fd", "align")

    def __init__(self, path: str | Path) -> None:
        self.path = path
        self.fd, self.align = -1, 0
        if hasattr(os, "O_DIRECT"):
            try:
                self.fd, self.align = os.open(path, os.O_RDONLY | os.O_DIRECT), READ_ALIGNMENTS[0]
            except OSError as exc:
                if exc.errno != errno.EINVAL:  # no O_DIRECT on this file system
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


class Reader:
    """Reads byte ranges into one reusable page-aligned buffer (O_DIRECT
    needs aligned memory, offsets and lengths). Not thread-safe: the caller
    serialises its use; a returned view is valid until the next read."""

    def __init__(self) -> None:
        self._buf: mmap.mmap | None = None

    def read(self, f: ReadFile, offset: int, length: int):
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
    """A whole journal file, read coherently with an O_DIRECT writer."""
    f = ReadFile(path)
    try:
        size = os.fstat(f.fd).st_size
        return bytes(Reader().read(f, 0, size)) if size else b""
    finally:
        f.close()


class SegmentReader:
    """Frames read back from the segments while the journal runs (the
    drain's pending(), set_aside). Thread-safe: reads run in worker threads."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.files: dict[int, ReadFile] = {}
        self._reader = Reader()
        self._lock = threading.Lock()

    def _file(self, segment: int) -> ReadFile:
        f = self.files.get(segment)
        if f is None:
            f = self.files[segment] = ReadFile(file_path(self.dir, segment, LOG))
        return f

    def frames(self, locs: list[tuple[int, int, int]]) -> list[dict | None]:
        """The payload of the frame at each (segment, offset, length), in
        ascending order, or None where no valid frame of that length reads
        back. Frames lying close together in one segment (the usual case: a
        backlog is mostly consecutive frames) come in with one read."""
        out: list[dict | None] = []
        n = len(locs)
        with self._lock:
            i = 0
            while i < n:
                segment, first, length = locs[i]
                end = first + length
                j = i + 1
                while j < n:
                    seg, offset, length = locs[j]
                    if seg != segment or not end <= offset <= end + READ_GAP or offset + length - first > READ_MAX:
                        break
                    end = offset + length
                    j += 1
                f = self._file(segment)
                buf = self._reader.read(f, first, end - first)
                bad = []
                for k in range(i, j):
                    payload = decode_frame(buf, locs[k][1] - first, locs[k][2])
                    if payload is None:
                        bad.append(k)
                    out.append(payload)
                del buf  # the view pins the reader's buffer
                for k in bad:  # read once more on its own before giving up on it
                    _segment, offset, length = locs[k]
                    out[k] = decode_frame(self._reader.read(f, offset, length), 0, length)
                i = j
        return out

    def raw(self, segment: int, offset: int, length: int) -> bytes:
        with self._lock:
            return bytes(self._reader.read(self._file(segment), offset, length))

    def forget(self, segment: int) -> None:
        with self._lock:
            f = self.files.pop(segment, None)
            if f is not None:
                f.close()

    def close(self) -> None:
        with self._lock:
            for f in self.files.values():
                f.close()
            self.files.clear()


# -- recovery of one file on open (invariant 4) ----------------------------------

def recover_file(path: Path, may_be_torn: bool, now: float) -> tuple[list[tuple[int, int, dict]], str | None]:
    """The valid frames of a file as they lie in it once recovered, and the
    fault to report if it was damaged. may_be_torn: the last segment, the
    only file a crash can leave with a half-written tail."""
    # Read past the page cache too: a page left stale by an earlier run's
    # O_DIRECT writes would look like a torn tail and be cut off.
    buf = read_segment(path)
    frames = list(scan_frames(buf))
    good_end = frames[-1][0] + frames[-1][1] if frames else 0
    if good_end == len(buf) or not buf[good_end:].strip(b"\0"):
        return frames, None  # the end of the frames; the rest is allocated space
    rescued = list(frames_after_damage(buf, good_end))
    if not rescued and may_be_torn:
        log.warning("journal %s: cut a torn tail of %d bytes (an interrupted write)", path.name, len(buf) - good_end)
        with open(path, "r+b") as f:
            f.truncate(good_end)
            os.fsync(f.fileno())
        return frames, None
    aside = path.with_name(f"{path.name}.damaged-{int(now)}")
    with open(aside, "wb") as f:  # what we read, not a possibly stale cached copy
        f.write(buf)
        f.flush()
        os.fsync(f.fileno())
    shutil.copystat(path, aside)
    write_whole(path, buf[:good_end] + b"".join(buf[o:o + n] for o, n, _ in rescued))
    base = good_end
    for offset, length, payload in rescued:
        frames.append((base, length, payload))
        base += length
    fault = (f"journal segment {path.name} damaged: {len(buf) - base} bytes unreadable, copy set aside as "
             f"{aside.name}; {len(rescued)} frames after the damage recovered")
    return frames, fault


# -- the files and the active segment --------------------------------------------

class Segments:
    """The journal's files on disk: the active segment's appends, the size
    of every file (what counts against the cap), deletion, key files.

    append() may run on the writer thread while the event loop deletes
    files: the sizes are changed under a lock."""

    def __init__(self, directory: Path, *, segment_bytes: int, max_bytes: int, fsync: bool, direct: bool,
                 next_seq: Callable[[], int]) -> None:
        self.dir = directory
        self.segment_bytes = segment_bytes
        self.max_bytes = max_bytes
        self.fsync = fsync
        self.direct = direct  # O_DIRECT appends where the file system allows them
        self._next_seq = next_seq  # for the header of each new segment (invariant 5)
        self.reader = SegmentReader(directory)
        self.sizes: dict[int, int] = {}      # segment on disk -> bytes of frames in it
        self.key_files: dict[int, int] = {}  # key file on disk -> its bytes
        self.total = 0                       # bytes of frames in every file
        self._lock = threading.Lock()
        self.active = 0                      # the number of the segment being appended to
        self.rwf_dsync = bool(RWF_DSYNC)     # direct appends sync in the write itself (see _pwrite)
        self._fd: int | None = None
        self._direct_fd: int | None = None   # the active segment opened with O_DIRECT, if allowed
        self._size = 0                       # bytes of frames in the active segment
        self._tail = b""                     # direct I/O: the bytes of the partial last sector on disk
        self._zeroed = 0                     # blocks of the active segment before this offset are written
        self._zeros: mmap.mmap | None = None  # ZERO_AHEAD bytes of zeros, page-aligned
        self._buf: mmap.mmap | None = None   # direct I/O: an aligned buffer for one group

    @property
    def direct_io(self) -> bool:
        """True while appends go to the active segment with O_DIRECT."""
        return self._direct_fd is not None

    # -- open and close -------------------------------------------------------

    def recover(self, apply: Callable[[dict, int, int, int], None], now: float) -> list[str]:
        """Recover every file (invariant 4) and feed its frames to apply(frame,
        number, offset, length) in file order; the faults to report."""
        make_dirs(self.dir)
        for tmp in self.dir.glob(f"[0-9]*{TMP}"):  # a replacement never put in place: the original is whole
            tmp.unlink()
        files = journal_files(self.dir)
        last = max((n for n, suffix in files if suffix == LOG), default=0)
        faults = []
        for n, suffix in files:
            frames, fault = recover_file(file_path(self.dir, n, suffix), suffix == LOG and n == last, now)
            for offset, length, payload in frames:
                apply(payload, n, offset, length)
            end = frames[-1][0] + frames[-1][1] if frames else 0
            (self.sizes if suffix == LOG else self.key_files)[n] = end
            if fault:
                log.error(fault)
                faults.append(fault)
        self.total = sum(self.sizes.values()) + sum(self.key_files.values())
        self.active = max((n for n, _suffix in files), default=0)  # numbers are never reused
        return faults

    def close(self) -> None:
        self.reader.close()
        self.close_active()

    def open_next(self) -> None:
        """Make a new segment the active one, its space allocated up front:
        a full disk shows here, at rotation, never in the middle of a frame,
        and a sync need not commit a new file size each time."""
        n = self.active + 1
        path = file_path(self.dir, n, LOG)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        header = encode_frame({"k": SEGMENT_HEADER, "next": self._next_seq()})
        try:
            try:
                os.posix_fallocate(fd, 0, max(self.segment_bytes, len(header)))
            except OSError as exc:
                if exc.errno not in NO_FALLOCATE:
                    raise
            os.pwrite(fd, header, 0)
            os.fsync(fd)
        except OSError as exc:
            os.close(fd)
            path.unlink(missing_ok=True)
            if exc.errno in DISK_FULL:
                raise JournalFull("the journal disk is full") from None
            raise
        self.close_active()
        if self.direct and hasattr(os, "O_DIRECT"):
            try:
                self._direct_fd = os.open(path, os.O_WRONLY | os.O_DIRECT)
            except OSError:  # tmpfs and some other file systems: buffered writes
                self._direct_fd = None
        self._fd, self.active = fd, n
        self._size = len(header)
        self._tail = header[len(header) - len(header) % SECTOR:]
        self._zeroed = BLOCK  # the header's block was written and synced above
        with self._lock:
            self.sizes[n] = len(header)
            self.total += len(header)
        sync_dir(self.dir)

    def close_active(self) -> None:
        for fd in (self._fd, self._direct_fd):
            if fd is not None:
                os.close(fd)
        self._fd = self._direct_fd = None

    # -- appends ----------------------------------------------------------------

    def append(self, data: bytes, capped: bool = True) -> tuple[int, int]:
        """Write and sync frames with one write: (segment, offset of the
        first). JournalFull past the cap (unless not capped: ack frames) or
        on a full disk, JournalError otherwise; either way nothing of the
        frames stays on disk (invariant 10)."""
        if self._fd is None or (self._size + len(data) > self.segment_bytes and self._size > 0):
            self.open_next()
        if capped and self.total + len(data) > self.max_bytes:
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
            try:
                self._pwrite(bytes(len(data)), start)
                os.fdatasync(self._fd)
            except OSError:
                pass
            self._tail = tail
            if exc.errno in DISK_FULL:
                raise JournalFull("the journal disk is full") from None
            raise JournalError(f"journal write failed: {exc.strerror or exc}") from None
        self._size += len(data)
        with self._lock:
            self.sizes[self.active] = self._size
            self.total += len(data)
        return self.active, start

    def _zero_ahead(self, needed: int) -> None:
        """Write zeros from the zeroed horizon (always past the last frame, so
        no frame is touched) to ZERO_AHEAD beyond `needed`; the group's own
        sync makes them durable with it."""
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
                    if exc.errno != errno.EINVAL:  # O_DIRECT refused: buffered from here on
                        raise
                    os.close(self._direct_fd)
                    self._direct_fd = None
            if written is None:
                written = os.pwrite(self._fd, memoryview(self._zeros)[:n], pos)
            if written != n:
                raise OSError(errno.ENOSPC, "short write")
            pos += n
        self._zeroed = end

    def _pwrite(self, data: bytes, start: int, sync: bool = False) -> bool:
        """Write data at start, the end of the frames. With O_DIRECT only the
        512-byte sectors touched go to the device, the partial last sector
        rewritten with the same bytes in front (invariant 2). sync: make it
        durable too; a direct write does it in the same call (RWF_DSYNC, as
        fdatasync would) and returns True, otherwise the caller must
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
            flags = (RWF_DSYNC,) if sync and self.rwf_dsync else ()
            try:
                written = os.pwritev(self._direct_fd, [memoryview(buf)[:size]], start - head, *flags)
            except OSError as exc:
                if flags and exc.errno == errno.EOPNOTSUPP:  # a kernel without per-write sync
                    self.rwf_dsync = False
                    return self._pwrite(data, start, sync)  # (nothing written: the tail is as it was)
                if exc.errno != errno.EINVAL:  # this file system refuses the alignment; go buffered
                    raise
                os.close(self._direct_fd)
                self._direct_fd = None
            else:
                if written != size:
                    raise OSError(errno.ENOSPC, "short write")
                end = start + len(data)
                self._tail = bytes(buf[n - end % SECTOR:n]) if end % SECTOR else b""
                return bool(flags)
        written = os.pwrite(self._fd, data, start)  # (the tail is not needed: never direct again in this segment)
        if written != len(data):
            raise OSError(errno.ENOSPC, "short write")
        return False

    # -- deletion and key files (invariants 7 and 8) -----------------------------

    def segments(self) -> list[int]:
        with self._lock:
            return sorted(self.sizes)

    def delete_segment(self, n: int) -> None:
        self.reader.forget(n)
        file_path(self.dir, n, LOG).unlink(missing_ok=True)
        with self._lock:
            self.total -= self.sizes.pop(n, 0)

    def write_keys(self, n: int, data: bytes) -> None:
        """Put the key file of segment n in place, whole (OSError if not)."""
        write_whole(file_path(self.dir, n, KEYS), data)
        with self._lock:
            self.total += len(data) - self.key_files.get(n, 0)
            self.key_files[n] = len(data)

    def delete_keys(self, n: int) -> None:
        file_path(self.dir, n, KEYS).unlink(missing_ok=True)
        with self._lock:
            self.total -= self.key_files.pop(n, 0)

    def room_for_keys(self, nbytes: int, freed_segment: int | None = None) -> bool:
        """Whether a key file of nbytes (written as freed_segment is deleted)
        leaves room for a whole new segment under the cap and on the disk."""
        freed_bytes = freed_disk = 0
        if freed_segment is not None:
            freed_bytes = self.sizes.get(freed_segment, 0)
            try:
                freed_disk = os.stat(file_path(self.dir, freed_segment, LOG)).st_blocks * 512
            except OSError:
                pass
        if self.total - freed_bytes + nbytes + self.segment_bytes > self.max_bytes:
            return False
        try:
            fs = os.statvfs(self.dir)
        except OSError:
            return True
        return fs.f_bavail * fs.f_frsize + freed_disk - nbytes >= self.segment_bytes
