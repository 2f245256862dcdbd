"""A power-cut harness in the manner of Jepsen's LazyFS: a small FUSE file
system of ours (tests/powercut/daemon.py over tests/powercut/model.py) that
holds every write in memory until it is synced and, on a cut, throws away
everything that was not (optionally tearing the last write), so a test can
prove that what a process acknowledged survives losing power.

    with PowerCutFS(tmp_path / "mnt") as fs:
        ...                        # run the system under test with its data in fs.path
        fs.freeze()                # the instant the power fails
        proc.kill()                # (SIGKILL the system; its waiting I/O fails with EIO after the cut)
        report = fs.cut(tear="sector")
        proc.wait()
        fs.remount()               # fresh kernel caches; the power is back
        ...                        # restart the system and check what it kept

``fuse_unavailable()`` says precisely why FUSE cannot be mounted here, or
None when it can.
"""

from __future__ import annotations

import contextlib
import ctypes.util
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent


def _cap_sys_admin() -> bool:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) & (1 << 21))
    except OSError:
        pass
    return os.geteuid() == 0


def fuse_unavailable() -> str | None:
    """Why a FUSE file system cannot be mounted on this machine, or None."""
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse on this machine (the fuse kernel module is not loaded or not exposed)"
    if not os.access("/dev/fuse", os.R_OK | os.W_OK):
        return "/dev/fuse is not readable and writable by this user"
    if not ctypes.util.find_library("fuse3"):
        return "libfuse3 is not installed (Debian: apt-get install fuse3, which brings libfuse3-3)"
    try:
        import mfusepy  # noqa: F401
    except ImportError:
        return "the mfusepy binding is not installed (pip install -e '.[test]')"
    except (OSError, AttributeError) as exc:
        return f"mfusepy cannot load libfuse3: {exc}"
    if not _cap_sys_admin() and not shutil.which("fusermount3"):
        return "neither CAP_SYS_ADMIN (to mount directly) nor fusermount3 (setuid mount helper, Debian package fuse3)"
    return None


class PowerCutError(RuntimeError):
    pass


class PowerCutFS:
    """The daemon as a child process, mounted at ``path``, steered over its control socket."""

    def __init__(self, path: str | Path, *, seed: int = 0, refuse_direct: bool = False, page_cache: bool = False,
                 log_path: str | Path | None = None) -> None:
        self.path = Path(path)
        self.seed = seed
        self.refuse_direct = refuse_direct
        self.page_cache = page_cache
        self.control = self.path.parent / f".{self.path.name}.powercut.sock"
        self.log_path = Path(log_path) if log_path else self.path.parent / f"{self.path.name}.powercut.log"
        self.proc: subprocess.Popen | None = None
        self._sock: socket.socket | None = None
        self._file = None
        self.reports: list[dict] = []

    # -- lifetime -------------------------------------------------------------

    def start(self, timeout: float = 20.0) -> "PowerCutFS":
        reason = fuse_unavailable()
        if reason:
            raise PowerCutError(reason)
        self.path.mkdir(parents=True, exist_ok=True)
        argv = [sys.executable, "-m", "tests.powercut.daemon", str(self.path), "--control", str(self.control),
                "--seed", str(self.seed)]
        if self.refuse_direct:
            argv.append("--refuse-direct")
        if self.page_cache:
            argv.append("--page-cache")
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                         env={**os.environ, "PYTHONUNBUFFERED": "1"})
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise PowerCutError(f"the FUSE daemon exited with {self.proc.returncode}: {self.log()[-2000:]}")
            if self.control.exists():
                with contextlib.suppress(OSError):
                    if self._call({"cmd": "ping"}).get("mounted") and self._mounted():
                        return self
            if time.monotonic() > deadline:
                self.stop()
                raise PowerCutError(f"the FUSE file system did not mount within {timeout} s: {self.log()[-2000:]}")
            time.sleep(0.02)

    def _mounted(self) -> bool:
        target = str(self.path.resolve())
        with open("/proc/self/mountinfo") as f:
            return any(line.split()[4] == target and line.split(" - ", 1)[1].startswith("fuse") for line in f)

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            with contextlib.suppress(OSError, PowerCutError):
                self._call({"cmd": "stop"})
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._close()
        if self._mounted():   # a daemon that died leaves "transport endpoint is not connected" behind
            for cmd in (["fusermount3", "-uz", str(self.path)], ["umount", "-l", str(self.path)]):
                if shutil.which(cmd[0]) and subprocess.run(cmd, capture_output=True).returncode == 0:
                    break
        self.proc = None

    def __enter__(self) -> "PowerCutFS":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    # -- the control socket ----------------------------------------------------------

    def _close(self) -> None:
        with contextlib.suppress(OSError):
            if self._file:
                self._file.close()
            if self._sock:
                self._sock.close()
        self._sock = self._file = None

    def _call(self, req: dict, timeout: float = 60.0) -> dict:
        if self._sock is None:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self._sock.settimeout(timeout)
            try:
                self._sock.connect(str(self.control))
            except OSError:
                self._close()
                raise
            self._file = self._sock.makefile("rwb")
        self._file.write(json.dumps(req).encode() + b"\n")
        self._file.flush()
        line = self._file.readline()
        if not line:
            self._close()
            raise PowerCutError(f"the FUSE daemon hung up on {req}: {self.log()[-2000:]}")
        return json.loads(line)

    def call(self, cmd: str, **kw) -> dict:
        answer = self._call({"cmd": cmd, **kw})
        if not answer.get("ok"):
            raise PowerCutError(f"{cmd}: {answer.get('error')}\n{answer.get('trace', '')}")
        return answer

    # -- the power ------------------------------------------------------------------

    def freeze(self) -> None:
        """The instant the power fails: nothing more reaches the disk."""
        self.call("freeze")

    def freeze_at_write(self, glob: str, skip: int = 0, timeout: float = 5.0, kind: str = "write") -> str | None:
        """The power fails during the (skip+1)-th write to a file whose path
        in the file system (e.g. "/journal/*.log") matches glob: that write is
        in flight, not applied (a tear may keep part of it). ``kind="fsync"``:
        at its fsync/fdatasync instead (what was written before is pending).
        Freezes anyway after timeout s. Returns the path it froze at, None on
        the timeout."""
        self.call("arm", glob=glob, skip=skip, kind=kind)
        answer = self.call("wait_frozen", timeout=timeout)
        if not answer["frozen"]:
            self.freeze()
            return None
        return answer["at"]

    def cut(self, tear: str | None = None) -> dict:
        """Drop everything not durable (freezing first if needed); waiting
        operations fail with EIO. Returns what was dropped."""
        report = self.call("cut", tear=tear)["report"]
        self.reports.append(report)
        return report

    def release(self) -> None:
        """If the power is out (frozen), operations waiting on it fail with EIO
        from now on, without a cut (for cleaning up after a failed test)."""
        with contextlib.suppress(OSError, PowerCutError):
            self.call("release")

    def remount(self) -> None:
        """Unmount and mount again: the power is back, the kernel's caches are new."""
        self.call("remount")

    def power_cut(self, tear: str | None = None) -> dict:
        """freeze + cut + remount, for a test with no process in the way."""
        report = self.cut(tear)
        self.remount()
        return report

    def stats(self) -> dict:
        return self.call("stats")

    def durable_tree(self) -> dict:
        return self.call("durable")["tree"]


__all__ = ["PowerCutFS", "PowerCutError", "fuse_unavailable"]
