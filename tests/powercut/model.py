"""The power-cut file system's state, as plain data (no FUSE here).

Every file keeps two images: what the "disk" holds durably and what the
running system sees (the durable image plus everything written since).
Every directory keeps two tables of entries the same way. The rules are the
POSIX ones, read strictly, as a crash-consistency checker would:

- fsync / fdatasync of a file makes all of its data and its size durable
  (what the kernel turns ``fsync`` and ``fdatasync`` into on FUSE, and what
  it sends after a synchronous write through the page cache).
- A write that carries O_DSYNC or O_SYNC (the file was opened with it, or
  ``pwritev2(..., RWF_DSYNC)``: on FUSE both arrive as O_DSYNC in the
  write's flags) makes that write's bytes, and the size that reaches them,
  durable -- that range only, nothing else pending in the file.
- A directory entry (create, mknod, mkdir, rename, unlink, rmdir) is durable
  only once that directory is fsync'd; a renamed file needs both directories.
  fsync of the file itself does not make its name durable.
- fallocate and truncate change the size: pending, like a write.

``cut(tear=...)`` is the power cut: every image goes back to its durable one,
files and directories that no durable entry names any more are gone, and
optionally a prefix of the last write that was not durable (or of the write
the cut interrupted) is kept, torn at a 512-byte sector or at any byte.

Storage is sparse: 4 KiB blocks of immutable bytes, all-zero blocks not
stored, so a 16 MiB preallocated journal segment costs what it holds.
"""

from __future__ import annotations

import errno
import os
import random
import stat
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

BLOCK = 4096
ZERO = bytes(BLOCK)
SECTOR = 512
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
TEARS = (None, "sector", "byte")


def fs_error(code: int) -> OSError:
    return OSError(code, os.strerror(code))


def _splice(blocks: dict, off: int, data) -> None:
    """Write data at off into a sparse block map."""
    pos, end = off, off + len(data)
    src = memoryview(data)
    while pos < end:
        b, s = divmod(pos, BLOCK)
        n = min(BLOCK - s, end - pos)
        if n == BLOCK:
            new = bytes(src[pos - off:pos - off + n])
        else:
            old = blocks.get(b, ZERO)
            new = old[:s] + bytes(src[pos - off:pos - off + n]) + old[s + n:]
        if new == ZERO:
            blocks.pop(b, None)
        else:
            blocks[b] = new
        pos += n


def _read(blocks: dict, size: int, off: int, length: int) -> bytes:
    end = min(size, off + length)
    if off >= end:
        return b""
    out = bytearray()
    pos = off
    while pos < end:
        b, s = divmod(pos, BLOCK)
        n = min(BLOCK - s, end - pos)
        out += blocks.get(b, ZERO)[s:s + n]
        pos += n
    return bytes(out)


def _cut_blocks(blocks: dict, size: int) -> None:
    """Drop what lies at or past size (so bytes past the end read as zeros
    when the file grows again)."""
    last, s = divmod(size, BLOCK)
    for b in [b for b in blocks if b > last or (b == last and s == 0)]:
        del blocks[b]
    if s and last in blocks:
        new = blocks[last][:s] + bytes(BLOCK - s)
        if new == ZERO:
            del blocks[last]
        else:
            blocks[last] = new


class Node:
    def __init__(self, ino: int, mode: int) -> None:
        self.ino = ino
        self.mode = mode
        self.uid = os.getuid()
        self.gid = os.getgid()
        now = time.time_ns()
        self.atime = self.mtime = self.ctime = now


class File(Node):
    def __init__(self, ino: int, mode: int) -> None:
        super().__init__(ino, stat.S_IFREG | (mode & 0o7777))
        self.cur: dict[int, bytes] = {}   # block -> bytes: what the running system reads
        self.dur: dict[int, bytes] = {}   # block -> bytes: what survives a cut
        self.size = 0
        self.dur_size = 0
        self.dirty: set[int] = set()      # blocks where cur may differ from dur

    # -- what the running system does ---------------------------------------------

    def read(self, off: int, length: int) -> bytes:
        return _read(self.cur, self.size, off, length)

    def write(self, off: int, data: bytes) -> None:
        _splice(self.cur, off, data)
        if data:
            self.dirty.update(range(off // BLOCK, (off + len(data) - 1) // BLOCK + 1))
        self.size = max(self.size, off + len(data))
        self.mtime = self.ctime = time.time_ns()

    def truncate(self, size: int) -> None:
        if size < self.size:
            first = size // BLOCK
            self.dirty.update(b for b in (*self.cur, *self.dur) if b >= first)
            _cut_blocks(self.cur, size)
        self.size = size
        self.mtime = self.ctime = time.time_ns()

    def punch(self, off: int, length: int) -> None:
        end = min(self.size, off + length)
        if off < end:
            _splice(self.cur, off, bytes(end - off))
            self.dirty.update(range(off // BLOCK, (end - 1) // BLOCK + 1))

    # -- durability ---------------------------------------------------------------

    def sync(self) -> None:
        for b in self.dirty:
            if b in self.cur:
                self.dur[b] = self.cur[b]
            else:
                self.dur.pop(b, None)
        self.dirty.clear()
        self.dur_size = self.size
        _cut_blocks(self.dur, self.dur_size)

    def sync_range(self, off: int, length: int) -> None:
        """O_DSYNC: this write's bytes and the size that reaches them."""
        if length:
            _splice(self.dur, off, self.read(off, length))
            self.dur_size = max(self.dur_size, min(self.size, off + length))

    def keep_torn(self, off: int, data: bytes) -> None:
        """A cut in the middle of a write: these bytes reached the disk."""
        if data:
            _splice(self.dur, off, data)
            self.dur_size = max(self.dur_size, off + len(data))

    def unsynced(self) -> tuple[int, int]:
        """(bytes that differ from the durable image, size change)."""
        differ = 0
        for b in self.dirty:
            a, d = self.cur.get(b, ZERO), self.dur.get(b, ZERO)
            if a != d:
                differ += sum(1 for x, y in zip(a, d) if x != y)
        return differ, self.size - self.dur_size

    def revert(self) -> None:
        self.cur = dict(self.dur)
        self.size = self.dur_size
        self.dirty.clear()


class Dir(Node):
    def __init__(self, ino: int, mode: int) -> None:
        super().__init__(ino, stat.S_IFDIR | (mode & 0o7777))
        self.cur: dict[str, int] = {}
        self.dur: dict[str, int] = {}

    def sync(self) -> None:
        self.dur = dict(self.cur)

    def undone(self) -> dict[str, str]:
        """Entries a cut would change: name -> what is undone."""
        out = {}
        for k in set(self.cur) | set(self.dur):
            now, then = self.cur.get(k), self.dur.get(k)
            if now != then:
                out[k] = "create" if then is None else "unlink" if now is None else "rename over"
        return out

    def revert(self) -> None:
        self.cur = dict(self.dur)


@dataclass
class PendingWrite:
    ino: int
    off: int
    data: bytes
    # The parts of [off, off + len(data)) no later durable write has replaced (None: all of it).
    # A tear can only bring back these: on a disk, as in a page cache, a write that completed
    # before a later write to the same bytes cannot land after it.
    live: list | None = None

    def ranges(self) -> list[tuple[int, int]]:
        return [(self.off, self.off + len(self.data))] if self.live is None else self.live

    def replaced(self, a: int, b: int) -> bool:
        """A later write made [a, b) durable: those bytes are not ours to
        bring back. True when nothing of ours is left."""
        left = []
        for x, y in self.ranges():
            if y <= a or b <= x:
                left.append((x, y))
                continue
            if x < a:
                left.append((x, a))
            if b < y:
                left.append((b, y))
        self.live = left
        return not left


class Model:
    """The whole file system. Thread-safe: one lock around every operation."""

    ROOT = 1

    def __init__(self, seed: int | None = None) -> None:
        self.lock = threading.RLock()
        self.rng = random.Random(seed)
        self.nodes: dict[int, Node] = {self.ROOT: Dir(self.ROOT, 0o755)}
        self._next_ino = 2
        self._next_write = 0
        # Writes not yet durable, oldest first: id -> PendingWrite (for the count and the tear).
        self.pending: OrderedDict[int, PendingWrite] = OrderedDict()
        self._pending_of: dict[int, list[int]] = {}   # ino -> ids in self.pending
        self.syncs = {"fsync": 0, "fdatasync": 0, "dsync_write": 0, "fsyncdir": 0}
        self.totals = {"cuts": 0, "writes_dropped": 0, "bytes_dropped": 0, "size_changes_dropped": 0,
                       "entries_undone": 0, "torn": 0, "torn_bytes_kept": 0}

    # -- names ----------------------------------------------------------------

    @staticmethod
    def split(path: str) -> list[str]:
        return [p for p in path.split("/") if p]

    def lookup(self, path: str) -> Node:
        node = self.nodes[self.ROOT]
        for name in self.split(path):
            if not isinstance(node, Dir):
                raise fs_error(errno.ENOTDIR)
            ino = node.cur.get(name)
            if ino is None:
                raise fs_error(errno.ENOENT)
            node = self.nodes[ino]
        return node

    def parent(self, path: str) -> tuple[Dir, str]:
        parts = self.split(path)
        if not parts:
            raise fs_error(errno.EEXIST)
        d = self.lookup("/" + "/".join(parts[:-1]))
        if not isinstance(d, Dir):
            raise fs_error(errno.ENOTDIR)
        return d, parts[-1]

    def _new(self, cls, mode: int) -> Node:
        node = cls(self._next_ino, mode)
        self.nodes[node.ino] = node
        self._next_ino += 1
        return node

    # -- namespace operations (pending until the directory is fsync'd) ------------

    def create(self, path: str, mode: int, exclusive: bool = False) -> File:
        with self.lock:
            d, name = self.parent(path)
            if name in d.cur:
                node = self.nodes[d.cur[name]]
                if exclusive:
                    raise fs_error(errno.EEXIST)
                if isinstance(node, Dir):
                    raise fs_error(errno.EISDIR)
                return node
            node = self._new(File, mode)
            d.cur[name] = node.ino
            d.mtime = d.ctime = time.time_ns()
            return node

    def mkdir(self, path: str, mode: int) -> Dir:
        with self.lock:
            d, name = self.parent(path)
            if name in d.cur:
                raise fs_error(errno.EEXIST)
            node = self._new(Dir, mode)
            d.cur[name] = node.ino
            d.mtime = d.ctime = time.time_ns()
            return node

    def unlink(self, path: str) -> None:
        with self.lock:
            d, name = self.parent(path)
            ino = d.cur.get(name)
            if ino is None:
                raise fs_error(errno.ENOENT)
            if isinstance(self.nodes[ino], Dir):
                raise fs_error(errno.EISDIR)
            del d.cur[name]
            d.mtime = d.ctime = time.time_ns()

    def rmdir(self, path: str) -> None:
        with self.lock:
            d, name = self.parent(path)
            ino = d.cur.get(name)
            if ino is None:
                raise fs_error(errno.ENOENT)
            node = self.nodes[ino]
            if not isinstance(node, Dir):
                raise fs_error(errno.ENOTDIR)
            if node.cur:
                raise fs_error(errno.ENOTEMPTY)
            del d.cur[name]

    def rename(self, old: str, new: str) -> None:
        with self.lock:
            od, oname = self.parent(old)
            nd, nname = self.parent(new)
            ino = od.cur.get(oname)
            if ino is None:
                raise fs_error(errno.ENOENT)
            target = nd.cur.get(nname)
            if target == ino:
                return
            if target is not None:
                tnode, node = self.nodes[target], self.nodes[ino]
                if isinstance(tnode, Dir):
                    if not isinstance(node, Dir):
                        raise fs_error(errno.EISDIR)
                    if tnode.cur:
                        raise fs_error(errno.ENOTEMPTY)
                elif isinstance(node, Dir):
                    raise fs_error(errno.ENOTDIR)
            del od.cur[oname]
            nd.cur[nname] = ino
            now = time.time_ns()
            od.mtime = od.ctime = nd.mtime = nd.ctime = now

    def listdir(self, path: str) -> list[str]:
        with self.lock:
            d = self.lookup(path)
            if not isinstance(d, Dir):
                raise fs_error(errno.ENOTDIR)
            return list(d.cur)

    # -- data -----------------------------------------------------------------------

    def file(self, ino: int) -> File:
        node = self.nodes.get(ino)
        if node is None:
            raise fs_error(errno.ESTALE)
        if not isinstance(node, File):
            raise fs_error(errno.EISDIR)
        return node

    def read(self, ino: int, off: int, length: int) -> bytes:
        with self.lock:
            return self.file(ino).read(off, length)

    def write(self, ino: int, off: int, data: bytes, dsync: bool = False) -> int:
        with self.lock:
            f = self.file(ino)
            f.write(off, data)
            if dsync:
                f.sync_range(off, len(data))
                self.syncs["dsync_write"] += 1
                self._forget_range(ino, off, len(data))
            elif data:
                wid = self._next_write
                self._next_write += 1
                self.pending[wid] = PendingWrite(ino, off, bytes(data))
                self._pending_of.setdefault(ino, []).append(wid)
            return len(data)

    def truncate(self, ino: int, size: int) -> None:
        with self.lock:
            self.file(ino).truncate(size)

    def fallocate(self, ino: int, mode: int, off: int, length: int) -> None:
        with self.lock:
            f = self.file(ino)
            if mode & FALLOC_FL_PUNCH_HOLE:
                f.punch(off, length)
            elif mode & ~FALLOC_FL_KEEP_SIZE:
                raise fs_error(errno.EOPNOTSUPP)
            elif not mode & FALLOC_FL_KEEP_SIZE and off + length > f.size:
                f.truncate(off + length)   # zeros, like a preallocated extent reads

    def fsync(self, ino: int, datasync: bool) -> None:
        """fsync/fdatasync of a file, or fsync of a directory (its entries)."""
        with self.lock:
            node = self.nodes.get(ino)
            if node is None:
                raise fs_error(errno.ESTALE)
            if isinstance(node, Dir):
                node.sync()
                self.syncs["fsyncdir"] += 1
                return
            node.sync()
            self.syncs["fdatasync" if datasync else "fsync"] += 1
            for wid in self._pending_of.pop(ino, ()):
                self.pending.pop(wid, None)

    def _forget_range(self, ino: int, off: int, length: int) -> None:
        ids = self._pending_of.get(ino)
        if not ids:
            return
        keep = []
        for wid in ids:
            w = self.pending.get(wid)
            if w is None:
                continue
            if w.replaced(off, off + length):
                del self.pending[wid]
            else:
                keep.append(wid)
        self._pending_of[ino] = keep

    # -- the power cut ----------------------------------------------------------------

    def paths(self) -> dict[int, str]:
        """ino -> a path that names it now (or durably), for reports."""
        out: dict[int, str] = {self.ROOT: "/"}
        todo = [(self.ROOT, "")]
        while todo:
            ino, prefix = todo.pop()
            d = self.nodes[ino]
            for table in (d.cur, d.dur):
                for name, child in table.items():
                    if child in out or child not in self.nodes:
                        continue
                    out[child] = f"{prefix}/{name}"
                    if isinstance(self.nodes[child], Dir):
                        todo.append((child, out[child]))
        return out

    def cut(self, tear: str | None = None, interrupted: PendingWrite | None = None) -> dict:
        """Lose everything that is not durable. ``tear``: keep a prefix of the
        write the cut interrupted (``interrupted``), else of the last write
        that was not durable, cut at a sector ("sector") or any byte ("byte")."""
        if tear not in TEARS:
            raise ValueError(f"tear must be one of {TEARS}")
        with self.lock:
            names = self.paths()
            report = {"writes_dropped": len(self.pending), "bytes_dropped": 0, "size_changes_dropped": 0,
                      "entries_undone": 0, "files": {}, "entries": {}, "torn": None}
            for node in self.nodes.values():
                if isinstance(node, File):
                    differ, grew = node.unsynced()
                    if differ or grew:
                        report["bytes_dropped"] += differ
                        report["size_changes_dropped"] += 1 if grew else 0
                        report["files"][names.get(node.ino, f"#{node.ino}")] = {"bytes": differ, "size": grew}
                else:
                    undone = node.undone()
                    report["entries_undone"] += len(undone)
                    prefix = names.get(node.ino, f"#{node.ino}").rstrip("/")
                    for name, what in sorted(undone.items()):
                        report["entries"][f"{prefix}/{name}"] = what
            files_writes: dict[str, int] = {}
            for w in self.pending.values():
                key = names.get(w.ino, f"#{w.ino}")
                files_writes[key] = files_writes.get(key, 0) + 1
            for path, n in files_writes.items():
                report["files"].setdefault(path, {"bytes": 0, "size": 0})["writes"] = n
            if tear:
                victim = interrupted
                if victim is None:
                    for w in reversed(self.pending.values()):
                        if w.ino in self.nodes:
                            victim = w
                            break
                if victim is not None and victim.ino in self.nodes and len(victim.data) > 1:
                    end = victim.off + len(victim.data)
                    if tear == "sector":
                        cuts = range(victim.off - victim.off % SECTOR + SECTOR, end, SECTOR)
                        keep = (self.rng.choice(cuts) - victim.off) if len(cuts) else 0
                    else:
                        keep = self.rng.randrange(1, len(victim.data))
                    node = self.nodes[victim.ino]
                    for a, b in victim.ranges():   # the prefix, less what later durable writes replaced
                        b = min(b, victim.off + keep)
                        if a < b:
                            node.keep_torn(a, victim.data[a - victim.off:b - victim.off])
                    report["torn"] = {"path": names.get(victim.ino, f"#{victim.ino}"), "offset": victim.off,
                                      "length": len(victim.data), "kept": keep, "at": tear,
                                      "interrupted": interrupted is not None}
            for node in self.nodes.values():
                node.revert()
            self._collect()
            self.pending.clear()
            self._pending_of.clear()
            t = self.totals
            t["cuts"] += 1
            t["writes_dropped"] += report["writes_dropped"]
            t["bytes_dropped"] += report["bytes_dropped"]
            t["size_changes_dropped"] += report["size_changes_dropped"]
            t["entries_undone"] += report["entries_undone"]
            if report["torn"] and report["torn"]["kept"]:
                t["torn"] += 1
                t["torn_bytes_kept"] += report["torn"]["kept"]
            return report

    def _collect(self) -> None:
        """Forget nodes no durable entry reaches (after a cut, nothing is open)."""
        seen = {self.ROOT}
        todo = [self.ROOT]
        while todo:
            d = self.nodes[todo.pop()]
            for child in d.cur.values():
                if child not in seen and child in self.nodes:
                    seen.add(child)
                    if isinstance(self.nodes[child], Dir):
                        todo.append(child)
        for ino in [i for i in self.nodes if i not in seen]:
            del self.nodes[ino]

    def collect_garbage(self, open_inos: set[int]) -> None:
        """Forget nodes neither the current nor the durable tables name and
        nobody holds open (an unlinked file whose unlink is durable)."""
        with self.lock:
            seen = {self.ROOT} | {i for i in open_inos if i in self.nodes}
            todo = [self.ROOT]
            while todo:
                d = self.nodes[todo.pop()]
                for child in (*d.cur.values(), *d.dur.values()):
                    if child not in seen and child in self.nodes:
                        seen.add(child)
                        if isinstance(self.nodes[child], Dir):
                            todo.append(child)
            for ino in [i for i in self.nodes if i not in seen]:
                del self.nodes[ino]
                for wid in self._pending_of.pop(ino, ()):
                    self.pending.pop(wid, None)
