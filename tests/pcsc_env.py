"""A private pcscd with the vpcd virtual reader, for the NFC tests.

pcscd 1.9.9 always puts its socket at /run/pcscd/pcscd.comm; only the client
library (libpcsclite, which pyscard uses) reads PCSCLITE_CSOCK_NAME. So each
pcscd here runs in its own mount namespace (unshare) where /run/pcscd is a
bind mount of a private directory: the daemon writes its socket and pid file
there, the tests' client finds it through PCSCLITE_CSOCK_NAME, and a system
pcscd (or another test run) is neither seen nor disturbed. Its reader
configuration is private too (pcscd --config), with vpcd on free ports
instead of the packaged 0x8C7B = 35963, which a system pcscd may hold.

libpcsclite reads PCSCLITE_CSOCK_NAME once per process, at the first PC/SC
call, hence `use_private_socket()` for the whole test session and one fixed
socket path that every daemon of the session serves in turn.
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

VPCD_DRIVER = Path("/usr/lib/pcsc/drivers/serial/libifdvpcd.so")
INSTALL_HINT = "run `make test`, which installs the Debian packages pcscd and vsmartcard-vpcd"
READER_NAME = "Virtual PCD 00 00"   # vpcd slot 0; slot 1 is "Virtual PCD 00 01" on port + 1

_socket_dir: Path | None = None


def use_private_socket() -> Path:
    """Point this process's PC/SC client at a private pcscd socket (once per process)."""
    global _socket_dir
    if _socket_dir is None:
        _socket_dir = Path(tempfile.mkdtemp(prefix="storegate-pcscd-"))
        atexit.register(shutil.rmtree, _socket_dir, ignore_errors=True)
        os.environ["PCSCLITE_CSOCK_NAME"] = str(_socket_dir / "pcscd.comm")
    return _socket_dir


def check_installed() -> str:
    """The pcscd binary; raises with an install hint when the stack is missing."""
    problems = []
    pcscd = shutil.which("pcscd") or next((p for p in ("/usr/sbin/pcscd", "/sbin/pcscd") if os.access(p, os.X_OK)), None)
    if pcscd is None:
        problems.append("pcscd is not installed")
    if not VPCD_DRIVER.exists():
        problems.append(f"the vpcd driver ({VPCD_DRIVER}) is not installed")
    if shutil.which("unshare") is None:
        problems.append("unshare (util-linux) is not installed")
    if problems:
        raise RuntimeError("; ".join(problems) + f": {INSTALL_HINT}")
    return pcscd


def free_port_pair() -> int:
    """A port p with p and p + 1 free: vpcd listens on one port per slot."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("0.0.0.0", 0))
            port = s.getsockname()[1]
        if port < 65535 and all(_bindable(p) for p in (port, port + 1)):
            return port
    raise RuntimeError("no two consecutive free TCP ports for vpcd")


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("0.0.0.0", port))
            return True
        except OSError:
            return False


# Runs inside the new mount namespace: a fresh /run (so nothing of the host's
# /run is touched, and /run/pcscd need not exist), our directory as /run/pcscd.
_NAMESPACE_SCRIPT = 'mount -t tmpfs tmpfs /run && mkdir /run/pcscd && mount --bind "$1" /run/pcscd && shift && exec "$@"'


def wait_for_no_card(reader: str = READER_NAME, timeout: float = 15.0) -> None:
    """Block until pcscd reports the reader empty: it has polled the slot
    since the card left, so a card presented again is a new insertion. (A
    wait on the event itself, instead of sleeping past pcscd's 400 ms poll.)"""
    from smartcard import scard

    def code(hresult: int) -> int:
        return hresult & 0xFFFFFFFF  # pyscard may hand back a signed LONG

    hr, context = scard.SCardEstablishContext(scard.SCARD_SCOPE_USER)
    if code(hr) != scard.SCARD_S_SUCCESS:
        raise AssertionError(f"no PC/SC context: {scard.SCardGetErrorMessage(hr)}")
    try:
        known = scard.SCARD_STATE_UNAWARE
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"pcscd still sees a card on {reader!r} after {timeout} s")
            hr, states = scard.SCardGetStatusChange(context, int(min(left, 1.0) * 1000), [(reader, known)])
            if code(hr) == code(scard.SCARD_E_TIMEOUT):
                continue
            if code(hr) != scard.SCARD_S_SUCCESS:
                raise AssertionError(f"waiting for {reader!r} to be empty: {scard.SCardGetErrorMessage(hr)}")
            _, state, _atr = states[0]
            if state & scard.SCARD_STATE_EMPTY:
                return
            known = state & ~scard.SCARD_STATE_CHANGED
    finally:
        scard.SCardReleaseContext(context)


class PcscDaemon:
    """pcscd in the foreground with vpcd slots on `port` and `port + 1`."""

    def __init__(self, workdir: Path, port: int | None = None) -> None:
        self.pcscd = check_installed()
        self.socket_dir = use_private_socket()
        self.workdir = workdir
        self.port = port or free_port_pair()
        self.config_dir = workdir / "reader.conf.d"
        self.config_dir.mkdir(parents=True, exist_ok=True)
        # DEVICENAME /dev/null:<port> makes vpcd the listening side; the card connects.
        (self.config_dir / "vpcd").write_text(
            'FRIENDLYNAME "Virtual PCD"\n'
            f"DEVICENAME   /dev/null:0x{self.port:X}\n"
            f"LIBPATH      {VPCD_DRIVER}\n"
            f"CHANNELID    0x{self.port:X}\n")
        self.log_path = workdir / "pcscd.log"
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def _argv(self) -> list[str]:
        namespace = ["unshare", "--mount", "--propagation", "private"]
        if os.geteuid() != 0:
            namespace[1:1] = ["--user", "--map-root-user"]  # an unprivileged user gets mount rights there
        return [*namespace, "sh", "-c", _NAMESPACE_SCRIPT, "pcscd-ns", str(self.socket_dir),
                # --auto-exit: a daemon orphaned by a killed test run ends itself after 60 s without clients.
                self.pcscd, "--foreground", "--info", "--auto-exit", "--config", str(self.config_dir)]

    def start(self, timeout: float = 20.0) -> "PcscDaemon":
        if self.running:
            raise RuntimeError("pcscd is already running")
        for leftover in ("pcscd.comm", "pcscd.pid"):  # from a killed daemon: pcscd would refuse to start
            (self.socket_dir / leftover).unlink(missing_ok=True)
        with open(self.log_path, "ab") as log:
            log.write(f"--- start {self.starts + 1}\n".encode())
            log.flush()
            # unshare and sh exec in turn, so this pid is pcscd's own.
            self.proc = subprocess.Popen(self._argv(), stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL)
        self.starts += 1
        self._wait_ready(timeout)
        return self

    def _wait_ready(self, timeout: float) -> None:
        from smartcard import scard

        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"pcscd exited with {self.proc.returncode} at start; log:\n{self.log_tail()}")
            if (self.socket_dir / "pcscd.comm").exists():
                hr, ctx = scard.SCardEstablishContext(scard.SCARD_SCOPE_USER)
                if hr == scard.SCARD_S_SUCCESS:
                    hr, names = scard.SCardListReaders(ctx, [])
                    scard.SCardReleaseContext(ctx)
                    if hr == scard.SCARD_S_SUCCESS and READER_NAME in names:
                        return
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"pcscd did not offer {READER_NAME!r} within {timeout} s; log:\n{self.log_tail()}")
            time.sleep(0.1)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL, as a crash: no clean-up by pcscd."""
        self._signal(signal.SIGKILL)

    def stop(self) -> None:
        self._signal(signal.SIGTERM)

    def _signal(self, sig: int) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def restart(self) -> None:
        self.kill()
        self.start()

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"
