"""The power-cut FUSE daemon: ``python -m tests.powercut.daemon MOUNTPOINT --control SOCKET``.

Serves tests/powercut/model.py at MOUNTPOINT through libfuse 3 (mfusepy, a
ctypes binding: nothing to compile) and takes orders on a Unix socket, one
JSON object a line, answered with one JSON object a line:

  {"cmd": "ping"}                  -> {"ok": true, "generation": N, "power": "on"}
  {"cmd": "freeze"}                -> the power fails: operations running finish, every later one
                                      waits (a write that waits is "in flight": a tear may keep part of it)
  {"cmd": "arm", "glob": G, "skip": K, "kind": "write"|"fsync"}
                                   -> the power fails at the (K+1)-th write (or fsync) of a file whose
                                      path matches G: that operation waits, not applied
  {"cmd": "wait_frozen", "timeout": S} -> {"frozen": bool, "at": path}
  {"cmd": "cut", "tear": T}        -> (freezes if needed) drop everything not durable; T: null,
                                      "sector" or "byte"; waiting operations then fail with EIO
  {"cmd": "release"}               -> if frozen: waiting operations fail with EIO (no cut)
  {"cmd": "remount"}               -> unmount and mount again (a fresh kernel page cache and
                                      dentry/inode caches), power back on
  {"cmd": "stats"}                 -> what was synced, dropped, and what the kernel sent
  {"cmd": "stop"}                  -> unmount and exit

Nothing the daemon dropped can come back from the kernel's caches: regular
files are opened with FOPEN_DIRECT_IO (every read and write goes to the
daemon; ``--page-cache`` turns that off, SQLite's ``-shm`` files keep the
page cache so they can be mmap'd), there is no writeback cache (every write
reaches the daemon before write(2) returns), attribute and entry timeouts
are 0, and every cut is followed by an unmount and a new mount.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fnmatch
import json
import logging
import os
import shutil
import socket
import stat
import subprocess
import sys
import threading
import time
import traceback

os.environ.setdefault("FUSE_LIBRARY_NAME", "fuse3")   # mfusepy: libfuse 3 even where libfuse 2 is installed
import mfusepy  # noqa: E402

from tests.powercut.model import Dir, File, Model, PendingWrite, fs_error  # noqa: E402

log = logging.getLogger("powercut")

FUSE_CAP_POSIX_LOCKS = 1 << 1
FUSE_CAP_FLOCK_LOCKS = 1 << 10
FUSE_CAP_WRITEBACK_CACHE = 1 << 16


class Power:
    """On, frozen (the cut's instant: nothing more reaches the disk) or off
    (after the cut, until the next mount)."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.state = "on"
        self.active = 0
        self.inflight: list[PendingWrite] = []   # writes that arrived after the freeze
        self.blocked = 0
        self.armed: tuple[str, int, str] | None = None  # (glob, matches to let through, "write"/"fsync")
        self.frozen_at: str | None = None          # the path whose write froze it

    def arm(self, glob: str, skip: int = 0, kind: str = "write") -> None:
        with self.cond:
            self.armed = (glob, skip, kind)
            self.frozen_at = None

    @contextlib.contextmanager
    def op(self, write: PendingWrite | None = None, path: str | None = None, kind: str | None = None):
        with self.cond:
            registered = False
            if (self.armed and kind == self.armed[2] and self.state == "on" and path
                    and fnmatch.fnmatchcase(path, self.armed[0])):
                glob, skip, kind = self.armed
                if skip:
                    self.armed = (glob, skip - 1, kind)
                else:   # the power fails during this very write (or sync)
                    self.armed = None
                    self.state = "frozen"
                    self.inflight = []
                    self.frozen_at = path
                    self.cond.notify_all()
            while self.state != "on":
                if self.state == "off":
                    raise fs_error(errno.EIO)
                if write is not None and not registered:
                    self.inflight.append(write)
                    registered = True
                self.blocked += 1
                self.cond.wait()
                self.blocked -= 1
            self.active += 1
        try:
            yield
        finally:
            with self.cond:
                self.active -= 1
                self.cond.notify_all()

    def freeze(self) -> None:
        with self.cond:
            self.armed = None
            if self.state == "on":
                self.state = "frozen"
                self.inflight = []
            while self.active:
                self.cond.wait()

    def off(self) -> None:
        with self.cond:
            self.state = "off"
            self.cond.notify_all()

    def on(self) -> None:
        with self.cond:
            self.state = "on"
            self.inflight = []
            self.cond.notify_all()


class Handle:
    __slots__ = ("ino", "flags", "path")

    def __init__(self, ino: int, flags: int, path: str) -> None:
        self.ino, self.flags, self.path = ino, flags, path


class PowerCutOps(mfusepy.Operations):
    use_ns = True

    def __init__(self, model: Model, power: Power, *, refuse_direct: bool, page_cache: bool) -> None:
        self.model = model
        self.power = power
        self.refuse_direct = refuse_direct
        self.page_cache = page_cache
        self.handles: dict[int, Handle] = {}
        self._next_fh = 1
        self.mounted = threading.Event()
        self.generation = 0
        # What the kernel sent: how O_DIRECT, O_DSYNC, RWF_DSYNC and fsync arrive on FUSE.
        self.seen = {"open_o_direct": 0, "open_o_dsync": 0, "open_o_sync": 0, "refused_o_direct": 0,
                     "write": 0, "write_flag_o_dsync": 0, "write_flag_o_sync": 0, "write_flag_o_direct": 0,
                     "fsync": 0, "fdatasync": 0, "fsyncdir": 0, "fallocate": 0, "truncate": 0}
        self._hlock = threading.Lock()

    # -- lifetime -------------------------------------------------------------

    def init_with_config(self, conn, config) -> None:
        config.entry_timeout = 0
        config.negative_timeout = 0
        config.attr_timeout = 0
        config.hard_remove = 1       # no .fuse_hidden files: an unlinked open file is reached by its handle
        config.nullpath_ok = 1
        config.kernel_cache = 0
        config.auto_cache = 0
        config.direct_io = 0         # chosen per file in open/create
        conn.want &= ~(FUSE_CAP_WRITEBACK_CACHE | FUSE_CAP_POSIX_LOCKS | FUSE_CAP_FLOCK_LOCKS)
        self.generation += 1
        self.power.on()
        self.mounted.set()

    # -- helpers ----------------------------------------------------------------

    def _node(self, path: str | None, fi=None):
        if fi is not None:
            h = self.handles.get(fi.fh)
            if h is not None:
                node = self.model.nodes.get(h.ino)
                if node is None:
                    raise fs_error(errno.ESTALE)
                return node
        if path is None:
            raise fs_error(errno.EBADF)
        return self.model.lookup(path)

    def _attrs(self, node) -> dict:
        if isinstance(node, File):
            size = node.size
            nlink = 1
        else:
            size = 4096
            nlink = 2 + sum(1 for i in node.cur.values() if isinstance(self.model.nodes.get(i), Dir))
        return {"st_mode": node.mode, "st_ino": node.ino, "st_nlink": nlink, "st_uid": node.uid,
                "st_gid": node.gid, "st_size": size, "st_blocks": (size + 511) // 512, "st_blksize": 4096,
                "st_atime": node.atime, "st_mtime": node.mtime, "st_ctime": node.ctime}

    def _open_handle(self, ino: int, fi, path: str) -> None:
        flags = fi.flags
        if flags & os.O_DIRECT:
            if self.refuse_direct:
                self.seen["refused_o_direct"] += 1
                raise fs_error(errno.EINVAL)     # like tmpfs: the journal falls back to buffered I/O
            self.seen["open_o_direct"] += 1
        if flags & os.O_SYNC == os.O_SYNC:
            self.seen["open_o_sync"] += 1
        elif flags & os.O_DSYNC:
            self.seen["open_o_dsync"] += 1
        with self._hlock:
            fh = self._next_fh
            self._next_fh += 1
            self.handles[fh] = Handle(ino, flags, path)
        fi.fh = fh
        fi.keep_cache = 0
        # SQLite mmaps its -shm files: the kernel refuses a shared mmap of a FOPEN_DIRECT_IO file.
        fi.direct_io = 0 if (self.page_cache or path.endswith("-shm")) else 1

    # -- namespace ----------------------------------------------------------------

    def getattr(self, path, fh=None):
        with self.power.op():
            with self.model.lock:
                return self._attrs(self._node(path, fh))

    def access(self, path, amode):
        with self.power.op():
            self.model.lookup(path)
            return 0

    def opendir(self, path):
        with self.power.op():
            node = self.model.lookup(path)
            if not isinstance(node, Dir):
                raise fs_error(errno.ENOTDIR)
            return node.ino

    def readdir(self, path, fh):
        with self.power.op():
            with self.model.lock:
                node = self.model.nodes.get(fh) if fh else self.model.lookup(path)
                if not isinstance(node, Dir):
                    raise fs_error(errno.ENOTDIR)
                return [".", "..", *node.cur]

    def releasedir(self, path, fh):
        return 0

    def fsyncdir(self, path, datasync, fh):
        with self.power.op():
            self.seen["fsyncdir"] += 1
            ino = fh or self.model.lookup(path).ino
            self.model.fsync(ino, bool(datasync))
            self._collect()
            return 0

    def mkdir(self, path, mode):
        with self.power.op():
            self.model.mkdir(path, mode)
            return 0

    def rmdir(self, path):
        with self.power.op():
            self.model.rmdir(path)
            return 0

    def unlink(self, path):
        with self.power.op():
            self.model.unlink(path)
            return 0

    def rename(self, old, new):
        with self.power.op():
            self.model.rename(old, new)
            return 0

    def chmod(self, path, mode):
        with self.power.op():
            with self.model.lock:
                node = self.model.lookup(path)
                node.mode = (node.mode & ~0o7777) | (mode & 0o7777)
            return 0

    def chown(self, path, uid, gid):
        with self.power.op():
            with self.model.lock:
                node = self.model.lookup(path)
                if uid != -1:
                    node.uid = uid
                if gid != -1:
                    node.gid = gid
            return 0

    def utimens(self, path, times=None):
        with self.power.op():
            with self.model.lock:
                node = self.model.lookup(path)
                now = time.time_ns()
                node.atime, node.mtime = times if times else (now, now)
            return 0

    def statfs(self, path):
        return {"f_bsize": 4096, "f_frsize": 4096, "f_blocks": 1 << 20, "f_bfree": 1 << 19,
                "f_bavail": 1 << 19, "f_files": 1 << 16, "f_ffree": 1 << 15, "f_namemax": 255}

    # -- files ----------------------------------------------------------------------

    def create(self, path, mode, fi):
        with self.power.op():
            if fi.flags & os.O_DIRECT and self.refuse_direct:
                self.seen["refused_o_direct"] += 1
                raise fs_error(errno.EINVAL)
            node = self.model.create(path, mode, exclusive=bool(fi.flags & os.O_EXCL))
            self._open_handle(node.ino, fi, path)
            if fi.flags & os.O_TRUNC:
                self.model.truncate(node.ino, 0)
            return 0

    def open(self, path, fi):
        with self.power.op():
            node = self.model.lookup(path)
            if not isinstance(node, File):
                raise fs_error(errno.EISDIR)
            self._open_handle(node.ino, fi, path)
            if fi.flags & os.O_TRUNC:
                self.seen["truncate"] += 1
                self.model.truncate(node.ino, 0)
            return 0

    def read(self, path, size, offset, fi):
        with self.power.op():
            return self.model.read(self._node(path, fi).ino, offset, size)

    def write(self, path, data, offset, fi):
        flags = fi.flags   # the write's own flags: O_DSYNC here is RWF_DSYNC or an O_DSYNC/O_SYNC open
        h = self.handles.get(fi.fh)
        ino = h.ino if h is not None else self._node(path, fi).ino
        with self.power.op(PendingWrite(ino, offset, bytes(data)), h.path if h is not None else path, "write"):
            self.seen["write"] += 1
            if flags & os.O_SYNC == os.O_SYNC:
                self.seen["write_flag_o_sync"] += 1
            elif flags & os.O_DSYNC:
                self.seen["write_flag_o_dsync"] += 1
            if flags & os.O_DIRECT:
                self.seen["write_flag_o_direct"] += 1
            return self.model.write(ino, offset, data, dsync=bool(flags & os.O_DSYNC))

    def truncate(self, path, length, fh=None):
        with self.power.op():
            self.seen["truncate"] += 1
            self.model.truncate(self._node(path, fh).ino, length)
            return 0

    def fallocate(self, path, mode, offset, size, fi):
        with self.power.op():
            self.seen["fallocate"] += 1
            self.model.fallocate(self._node(path, fi).ino, mode, offset, size)
            return 0

    def fsync(self, path, datasync, fi):
        h = self.handles.get(fi.fh)
        with self.power.op(path=h.path if h is not None else path, kind="fsync"):
            self.seen["fdatasync" if datasync else "fsync"] += 1
            self.model.fsync(self._node(path, fi).ino, bool(datasync))
            return 0

    def flush(self, path, fi):
        with self.power.op():
            return 0

    def release(self, path, fi):
        with self._hlock:
            self.handles.pop(fi.fh, None)
        self._collect()
        return 0

    def _collect(self) -> None:
        with self._hlock:
            open_inos = {h.ino for h in self.handles.values()}
        self.model.collect_garbage(open_inos)


class PowerCutFUSE(mfusepy.FUSE):
    """mfusepy drops the file handle of a truncate (ftruncate on libfuse 3,
    where the path is NULL with nullpath_ok): pass it on."""

    def truncate_fuse_3(self, path, length, fip):
        return self.operations.truncate(None if path is None else path.decode(self.encoding, self.errors), length,
                                        fip.contents if fip else None)


class Daemon:
    def __init__(self, mountpoint: str, control: str, *, seed: int, refuse_direct: bool, page_cache: bool) -> None:
        self.mountpoint = mountpoint
        self.control = control
        self.model = Model(seed)
        self.power = Power()
        self.ops = PowerCutOps(self.model, self.power, refuse_direct=refuse_direct, page_cache=page_cache)
        self.want_remount = False
        self.stopping = False
        self.cut_reports: list[dict] = []

    # -- FUSE in the main thread ------------------------------------------------

    def serve(self) -> int:
        threading.Thread(target=self._control_loop, name="control", daemon=True).start()
        while True:
            self.ops.mounted.clear()
            PowerCutFUSE(self.ops, self.mountpoint, foreground=True, raw_fi=True, nothreads=False,
                         fsname="powercut", subtype="powercut")
            if self.stopping or not self.want_remount:
                return 0
            self.want_remount = False

    def _unmount(self) -> None:
        cmds = [["fusermount3", "-u", self.mountpoint]] if shutil.which("fusermount3") else []
        cmds.append(["umount", self.mountpoint])
        deadline = time.monotonic() + 10
        while True:
            for cmd in cmds:
                if shutil.which(cmd[0]) and subprocess.run(cmd, capture_output=True).returncode == 0:
                    return
            if time.monotonic() > deadline:
                break
            time.sleep(0.05)
        log.warning("unmount of %s busy for 10 s: detaching it lazily", self.mountpoint)
        subprocess.run(["umount", "-l", self.mountpoint], capture_output=True)

    # -- orders -------------------------------------------------------------------

    def _control_loop(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.control)
        srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        srv.bind(self.control)
        srv.listen(4)
        while True:
            conn, _ = srv.accept()
            threading.Thread(target=self._serve_client, args=(conn,), daemon=True).start()

    def _serve_client(self, conn: socket.socket) -> None:
        f = conn.makefile("rwb")
        try:
            for line in f:
                try:
                    answer = self.handle(json.loads(line))
                except Exception as exc:  # noqa: BLE001 - the test gets the error, the daemon goes on
                    answer = {"ok": False, "error": f"{type(exc).__name__}: {exc}",
                              "trace": traceback.format_exc()}
                f.write(json.dumps(answer).encode() + b"\n")
                f.flush()
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                f.close()
                conn.close()

    def handle(self, req: dict) -> dict:
        cmd = req.get("cmd")
        if cmd == "ping":
            return {"ok": True, "generation": self.ops.generation, "power": self.power.state,
                    "mounted": self.ops.mounted.is_set()}
        if cmd == "freeze":
            self.power.freeze()
            return {"ok": True}
        if cmd == "arm":   # freeze at the (skip+1)-th write (or fsync) of a file whose path matches glob
            self.power.arm(req["glob"], int(req.get("skip", 0)), req.get("kind", "write"))
            return {"ok": True}
        if cmd == "wait_frozen":
            deadline = time.monotonic() + float(req.get("timeout", 5))
            with self.power.cond:
                while self.power.state == "on" and time.monotonic() < deadline:
                    self.power.cond.wait(max(0.0, deadline - time.monotonic()))
                return {"ok": True, "frozen": self.power.state != "on", "at": self.power.frozen_at}
        if cmd == "blocked":
            with self.power.cond:
                return {"ok": True, "blocked": self.power.blocked, "inflight": len(self.power.inflight)}
        if cmd == "cut":
            self.power.freeze()
            with self.power.cond:
                inflight = list(self.power.inflight)
            interrupted = inflight[0] if inflight else None
            report = self.model.cut(req.get("tear"), interrupted=interrupted)
            report["inflight_writes"] = len(inflight)
            self.power.off()
            with self.ops._hlock:
                self.ops.handles.clear()
            self.cut_reports.append(report)
            return {"ok": True, "report": report}
        if cmd == "release":
            if self.power.state == "frozen":
                self.power.off()
            return {"ok": True}
        if cmd == "remount":
            gen = self.ops.generation
            self.want_remount = True
            self.power.off()
            self._unmount()
            deadline = time.monotonic() + 20
            while self.ops.generation == gen or not self.ops.mounted.is_set():
                if time.monotonic() > deadline:
                    return {"ok": False, "error": "the file system did not mount again within 20 s"}
                time.sleep(0.01)
            return {"ok": True, "generation": self.ops.generation}
        if cmd == "stats":
            return {"ok": True, "totals": dict(self.model.totals), "syncs": dict(self.model.syncs),
                    "seen": dict(self.ops.seen), "pending_writes": len(self.model.pending),
                    "generation": self.ops.generation}
        if cmd == "durable":   # the durable tree: path -> size, for tests
            return {"ok": True, "tree": self._durable_tree()}
        if cmd == "stop":
            self.stopping = True
            self.power.off()
            threading.Thread(target=self._unmount, daemon=True).start()
            return {"ok": True}
        return {"ok": False, "error": f"unknown command {cmd!r}"}

    def _durable_tree(self) -> dict:
        out = {}
        with self.model.lock:
            todo = [(Model.ROOT, "")]
            while todo:
                ino, prefix = todo.pop()
                for name, child in self.model.nodes[ino].dur.items():
                    node = self.model.nodes.get(child)
                    if node is None:
                        continue
                    path = f"{prefix}/{name}"
                    if isinstance(node, Dir):
                        out[path + "/"] = None
                        todo.append((child, path))
                    else:
                        out[path] = node.dur_size
        return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("mountpoint")
    p.add_argument("--control", required=True, help="Unix socket for orders")
    p.add_argument("--seed", type=int, default=0, help="seed of the tears' random prefixes")
    p.add_argument("--refuse-direct", action="store_true", help="refuse O_DIRECT opens with EINVAL, as tmpfs does")
    p.add_argument("--page-cache", action="store_true", help="let the kernel cache file pages (no FOPEN_DIRECT_IO)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="powercut %(levelname)s %(message)s", stream=sys.stderr)
    if not stat.S_ISDIR(os.stat(args.mountpoint).st_mode):
        p.error(f"{args.mountpoint} is not a directory")
    return Daemon(args.mountpoint, args.control, seed=args.seed, refuse_direct=args.refuse_direct,
                  page_cache=args.page_cache).serve()


if __name__ == "__main__":
    sys.exit(main())
