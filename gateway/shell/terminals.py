"""Who may call the POS API: one credential per terminal, a role, its lanes.

A terminal is a POS, a lane terminal (firmware/), the service desk or the
store manager. Each has its own token ``<terminal id>.<secret>``, sent as
``Authorization: Bearer <token>``; the gateway keeps only the SHA-256 of the
secret (a 256-bit random secret needs no slow hash: there is nothing to
guess) in a small JSON file managed by ``storegate terminals add|list|revoke``
(``api.terminals_file``, default ``<data_dir>/terminals.json``, mode 0600).
The running gateway re-reads the file when it changes, so a revoke takes
effect within a second, without a restart.

What each role may do (``PERMISSIONS``):

=============  ==========================================================
lane_terminal  post card reads (taps) for its lanes
pos            quote, sell, top up, use packages on its lanes; see its
               lanes' member and events; return sales made on its lanes up
               to ``api.pos_return_max_fen``; register new members (办卡)
service_desk   what a POS may on its lanes, card services (incl. lifting
               a loss report, 延期, 附属卡), 取款 (withdrawals), and
               returns of any sale of this store, of any amount
manager        read-only: status, lanes, every lane's member and events
=============  ==========================================================

The ``storegate`` CLI on the box (status, watch) uses a manager credential
the running gateway writes for it to ``<data_dir>/cli.token`` (0600) at
start; it is not in the terminals file and does not count as configured.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from gateway.core.errors import DomainError

log = logging.getLogger("storegate.terminals")

ROLES = ("lane_terminal", "pos", "service_desk", "manager")
ALL_LANES = "*"
TERMINAL_ID = re.compile(r"^[A-Za-z0-9_-]{1,32}$")
_TOKEN = re.compile(r"^([A-Za-z0-9_-]{1,32})\.([A-Za-z0-9_-]{32,64})$")
CLI_TERMINAL = "local-cli"

# action -> roles that may do it. Lane-scoped actions also need the lane.
PERMISSIONS: dict[str, frozenset[str]] = {
    "read": frozenset({"pos", "service_desk", "manager"}),          # status, lanes
    "lane_read": frozenset({"pos", "service_desk", "manager"}),     # a lane's member and events
    "tap": frozenset({"lane_terminal"}),
    "quote": frozenset({"pos", "service_desk"}),
    "sale": frozenset({"pos", "service_desk"}),
    "topup": frozenset({"pos", "service_desk"}),
    "package_use": frozenset({"pos", "service_desk"}),
    "return": frozenset({"pos", "service_desk"}),
    "card_service": frozenset({"service_desk"}),
    "register": frozenset({"pos", "service_desk"}),                 # 办卡: at a lane (收银台办卡) or the desk
    "withdrawal": frozenset({"service_desk"}),                      # 取款: money out of stored value
}
# Roles that see every lane, whatever lanes their credential lists.
ALL_LANE_ROLES = frozenset({"manager"})


class TerminalsError(DomainError, ValueError):
    """A terminals file or command that cannot be used; names what is wrong."""

    code, status = "terminals_invalid", 400


@dataclass(frozen=True)
class Terminal:
    id: str
    role: str
    lanes: tuple[str, ...]  # ("*",): every lane
    secret_sha256: str = ""
    created_at: int = 0
    revoked_at: int | None = None

    def may(self, action: str, lane: str | None = None) -> bool:
        if self.role not in PERMISSIONS.get(action, ()):
            return False
        return lane is None or self.serves(lane)

    def serves(self, lane: str) -> bool:
        return self.role in ALL_LANE_ROLES or ALL_LANES in self.lanes or lane in self.lanes

    def public(self) -> dict:
        return {"id": self.id, "role": self.role, "lanes": list(self.lanes), "created_at": self.created_at,
                "revoked_at": self.revoked_at}


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def new_secret() -> str:
    return secrets.token_urlsafe(32)  # 256 bits, 43 characters


def split_token(token: str) -> tuple[str, str] | None:
    match = _TOKEN.match(token)
    return (match.group(1), match.group(2)) if match else None


# -- the file (read by the gateway, written by the CLI) ----------------------------

def read_file(path: Path) -> dict[str, Terminal]:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise TerminalsError(f"terminals file {path}: cannot be read: {exc}") from None
    out: dict[str, Terminal] = {}
    for i, row in enumerate(doc.get("terminals", []) if isinstance(doc, dict) else []):
        try:
            t = Terminal(row["id"], row["role"], tuple(row["lanes"]), row["secret_sha256"],
                         int(row.get("created_at", 0)), row.get("revoked_at"))
        except (KeyError, TypeError, ValueError) as exc:
            raise TerminalsError(f"terminals file {path}: terminals[{i}]: {exc!r}") from None
        if not TERMINAL_ID.match(t.id) or t.role not in ROLES or not re.fullmatch(r"[0-9a-f]{64}", t.secret_sha256):
            raise TerminalsError(f"terminals file {path}: terminals[{i}]: bad id, role or hash")
        out[t.id] = t
    return out


def write_file(path: Path, terminals: dict[str, Terminal]) -> None:
    """Atomically, mode 0600 (the hashes are not secrets, but who may do
    what is nobody else's business)."""
    rows = [{**t.public(), "secret_sha256": t.secret_sha256} for t in terminals.values()]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump({"terminals": rows}, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def add(path: Path, terminal_id: str, role: str, lanes: list[str], *, now: float | None = None) -> str:
    """Add a terminal (or give a revoked id a new credential); returns its
    token, which is shown once and never stored."""
    if not TERMINAL_ID.match(terminal_id):
        raise TerminalsError(f"terminal id {terminal_id!r}: 1-32 letters, digits, '_' or '-'")
    if role not in ROLES:
        raise TerminalsError(f"--role {role!r}: one of {', '.join(ROLES)}")
    if not lanes:
        raise TerminalsError("--lanes: give the lanes this terminal acts for (e.g. 1,2) or '*' for all")
    terminals = read_file(path)
    if terminal_id in terminals and terminals[terminal_id].revoked_at is None:
        raise TerminalsError(f"terminal {terminal_id!r} exists; revoke it first to issue a new credential")
    secret = new_secret()
    terminals[terminal_id] = Terminal(terminal_id, role, tuple(lanes), digest(secret),
                                      int(now if now is not None else time.time()))
    write_file(path, terminals)
    return f"{terminal_id}.{secret}"


def revoke(path: Path, terminal_id: str, *, now: float | None = None) -> Terminal:
    terminals = read_file(path)
    t = terminals.get(terminal_id)
    if t is None:
        raise TerminalsError(f"no terminal {terminal_id!r} in {path}")
    if t.revoked_at is None:
        t = terminals[terminal_id] = Terminal(t.id, t.role, t.lanes, t.secret_sha256, t.created_at,
                                              int(now if now is not None else time.time()))
        write_file(path, terminals)
    return t


# -- the gateway's view -------------------------------------------------------------

class Terminals:
    """The credentials the API checks: the terminals file (re-read when it
    changes, at most once a second) plus any added in memory (the CLI's)."""

    def __init__(self, path: str | Path | None = None, *, clock=time.monotonic) -> None:
        self.path = Path(path) if path else None
        self._clock = clock
        self._from_file: dict[str, Terminal] = {}
        self._extra: dict[str, Terminal] = {}
        self._stamp: tuple | None = None
        self._checked = -1e9
        self.reload()

    def reload(self) -> None:
        if self.path is None:
            return
        try:
            st = self.path.stat()
            stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        except FileNotFoundError:
            stamp = None
        if stamp != self._stamp:
            try:
                self._from_file = read_file(self.path) if stamp else {}
                self._stamp = stamp
            except TerminalsError as exc:  # keep the last good set: a half-edited file must not lock the POS out
                log.error("%s; keeping the %d terminal(s) read before", exc, len(self._from_file))

    def add_in_memory(self, terminal_id: str, role: str, lanes=(ALL_LANES,)) -> str:
        secret = new_secret()
        self._extra[terminal_id] = Terminal(terminal_id, role, tuple(lanes), digest(secret))
        return f"{terminal_id}.{secret}"

    def configured(self) -> list[Terminal]:
        """The active terminals of the file (the CLI's does not count)."""
        return [t for t in self._from_file.values() if t.revoked_at is None]

    def authenticate(self, authorization: str | None) -> Terminal | None:
        """The terminal a ``Bearer`` header belongs to, or None."""
        now = self._clock()
        if now - self._checked >= 1.0:
            self._checked = now
            self.reload()
        if not authorization or not authorization.startswith("Bearer "):
            return None
        parts = split_token(authorization[7:].strip())
        if parts is None:
            return None
        terminal_id, secret = parts
        t = self._extra.get(terminal_id) or self._from_file.get(terminal_id)
        expected = t.secret_sha256 if t is not None else "0" * 64
        ok = hmac.compare_digest(digest(secret), expected)  # compared even for an unknown id: same timing
        if not ok or t is None or t.revoked_at is not None:
            return None
        return t


def default_path(config: dict) -> Path:
    return Path(config["api"].get("terminals_file") or Path(config["store"]["data_dir"]) / "terminals.json")


def cli_token_path(config: dict) -> Path:
    return Path(config["store"]["data_dir"]) / "cli.token"


def write_cli_token(config: dict, terminals: Terminals) -> Path:
    """A fresh manager credential for the `storegate` CLI on this box."""
    token = terminals.add_in_memory(CLI_TERMINAL, "manager")
    path = cli_token_path(config)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    os.replace(tmp, path)
    return path


def read_cli_token(config: dict) -> str | None:
    try:
        return cli_token_path(config).read_text().strip() or None
    except OSError:
        return None


class FailedLogins:
    """Failed authentications per client address in a sliding minute; past
    the limit the address is refused (429) until the minute has passed."""

    def __init__(self, per_minute: int, *, clock=time.monotonic) -> None:
        self.per_minute = per_minute
        self._clock = clock
        self._seen: dict[str, list[float]] = {}

    def _recent(self, addr: str) -> list[float]:
        cutoff = self._clock() - 60.0
        times = [t for t in self._seen.get(addr, ()) if t > cutoff]
        if times:
            self._seen[addr] = times
        else:
            self._seen.pop(addr, None)
        return times

    def blocked(self, addr: str) -> bool:
        return len(self._recent(addr)) >= self.per_minute

    def failed(self, addr: str) -> int:
        times = self._recent(addr)
        times.append(self._clock())
        self._seen[addr] = times
        if len(self._seen) > 10_000:  # a flood from many addresses: forget the oldest
            for stale in list(self._seen)[:5_000]:
                del self._seen[stale]
        return len(times)
