"""The gateway's footprint on a store box: memory, CPU, disk writes, start-up.

    python -m bench.footprint [--quick] [--dir DIR]

A real ``storegate run`` (a child process, measured from outside through
/proc/<pid>: its memory, CPU and I/O are its own) with 1,000,000 members
already applied (--quick: 100,000, and every line says so), eight lane
terminals and no broker (HQ away: every sale stays in the journal). Its log
(INFO, what journald would keep) goes to a pipe that this process counts.

- ``ready_s``: from the exec to ``READY=1`` on ``NOTIFY_SOCKET`` (what
  systemd waits for: the journal open and the POS API bound, with the member
  store opened). Target <= 5 s.
- ``footprint_rss_mb``: the larger of the resident memory at idle (after
  start-up, before any call) and the peak under load (VmHWM). Target <= 150 MB.
  Both are in the line (``idle_rss_mb``, ``loaded_rss_mb``).
- load: eight POS terminals (in this process) back to back, one round per
  customer: a member's card tapped on the lane (each round a member of its
  own), a quote and a sale of 40 lines, as bench.pos_api does.
- ``cpu_s_per_1000_sales``: the gateway's user + system CPU over the load,
  per 1,000 rounds (a round is a tap, a quote and a sale).
- ``bytes_per_sale``: what the gateway wrote to storage over the load
  (/proc/<pid>/io write_bytes: journal, counter archive, anything else), per
  round; ``bytes_per_day``: at a busy store's 5,000 sales of 40 lines, plus
  what it writes idle over the rest of the day (measured over the idle
  window), with the log bytes per sale beside it (written by journald, not by
  the gateway). HQ away: no ack frames and no key files (invariant 8 of
  gateway/store/journal: a segment's keys are written once when HQ's acks
  free it, roughly the keys and first answers once more).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench.common import args, emit, note

ROOT = Path(__file__).resolve().parent.parent
LANES = 8
LINES = 40
SALES_PER_DAY = 5000
IDLE_S = 5.0


# -- /proc of the gateway ----------------------------------------------------------------

def proc_status(pid: int, field: str) -> float:
    """A memory field of /proc/<pid>/status (``VmRSS``, ``VmHWM``), in MB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return 0.0


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of the process (all its threads)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def write_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/io") as f:
        for line in f:
            if line.startswith("write_bytes:"):
                return int(line.split()[1])
    return 0


# -- the store ------------------------------------------------------------------------

def member_rows(n: int):
    """n members; every fourth has an NFC card (bench.rules_apply's rows)."""
    from bench.rules_apply import members

    return members(n)


def member_uid(k: int) -> str:
    """The NFC UID of the k-th member with one (bench.rules_apply.members: every fourth)."""
    return f"04{4 * k:012X}"


def basket() -> list[dict]:
    cats = ["fresh", "dairy", "snacks", "drinks", "household", "staples", "frozen", "bakery"]
    return [{"sku": f"690{i:010d}", "name": f"商品{i}", "category": cats[i % len(cats)], "qty": 1 + i % 3,
             "unit_price": 190 + (i * 733) % 3800} for i in range(LINES)]


def prepare(base: Path, n_members: int) -> tuple[Path, dict[str, str], int]:
    """A data dir with the demo rules and n members applied, terminal
    credentials, a config; (config, role -> Authorization, API port)."""
    import tomllib

    from bench.pos_api import credentials
    from demo.testbed import free_port
    from gateway.store.rules import RulesStore
    from tests.support import RULES_FILE, install_rules, test_hq_public_key

    data_dir = base / "store"
    key = test_hq_public_key()
    doc = tomllib.loads(RULES_FILE.read_text(encoding="utf-8"))
    doc.pop("members", None)
    t0 = time.monotonic()
    store = RulesStore(data_dir / "rules", "S001", public_keys=[key])
    install_rules(store, [doc], members=member_rows(n_members))
    assert store.members.count()[0] == n_members, store.members.count()
    note(f"bench.footprint: {n_members:,} members applied in {time.monotonic() - t0:.1f} s (not timed)")
    auth = credentials(data_dir / "terminals.json")
    port = free_port()
    lanes = "".join(f'[[lanes]]\nid = "{n}"\nreader = "terminal"\n' for n in range(1, LANES + 1))
    config = base / "gateway.toml"
    config.write_text(f'[store]\nid = "S001"\ndata_dir = "{data_dir}"\n'
                      f'[mqtt]\nhost = "127.0.0.1"\nport = {free_port()}\n'
                      f'[api]\nhost = "127.0.0.1"\nport = {port}\n'
                      f'[rules]\nhq_public_keys = ["{key}"]\n{lanes}')
    return config, auth, port


def journal_frame_bytes(port: int, auth: dict) -> float:
    """Frame bytes the journal's group commits wrote, from the gateway's /metrics."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    request = urllib.request.Request(f"http://127.0.0.1:{port}/metrics", headers={"Authorization": auth["manager"]})
    with urllib.request.urlopen(request, timeout=10) as answer:
        text = answer.read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "storegate_journal_written_bytes_total":
                return sample.value
    return 0.0


class LogCounter(threading.Thread):
    """Reads the gateway's log from its pipe and counts the bytes."""

    def __init__(self, stream) -> None:
        super().__init__(daemon=True)
        self.stream, self.bytes, self.tail = stream, 0, b""

    def run(self) -> None:
        while chunk := self.stream.read1(65536):
            self.bytes += len(chunk)
            self.tail = (self.tail + chunk)[-4000:]


def start(config: Path, base: Path) -> tuple[subprocess.Popen, float, LogCounter]:
    """The gateway, and the seconds from exec to READY=1."""
    path = str(base / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(60)
    env = {**os.environ, "NOTIFY_SOCKET": path, "PYTHONUNBUFFERED": "1"}
    env.pop("WATCHDOG_USEC", None)
    t0 = time.perf_counter()
    proc = subprocess.Popen([str(Path(sys.executable).parent / "storegate"), "run", "--config", str(config)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    logs = LogCounter(proc.stdout)
    logs.start()
    try:
        while True:
            message = sock.recv(4096)
            if b"READY=1" in message.split(b"\n"):
                return proc, time.perf_counter() - t0, logs
    except TimeoutError:
        proc.kill()
        raise RuntimeError(f"the gateway never said READY=1; its log:\n{logs.tail.decode(errors='replace')}")
    finally:
        sock.close()


async def load(port: int, auth: dict, rounds: int) -> int:
    """Eight terminals back to back; the rounds done."""
    from bench.pos_api import _call

    lines = basket()

    async def lane(n: int) -> int:
        for r in range(rounds):
            k = (n - 1) * rounds + r
            status, tap = await _call(port, "POST", f"/lanes/{n}/taps", {"source": "nfc", "raw": member_uid(k)},
                                      auth["lane_terminal"])
            assert status == 200 and tap["verdict"] == "accept", (status, tap)
            status, quote = await _call(port, "POST", f"/lanes/{n}/quote", {"lines": lines, "member": True},
                                        auth["pos"])
            assert status == 200, quote
            status, sale = await _call(port, "POST", f"/lanes/{n}/sales",
                                       {"idempotency_key": f"footprint-{n}-{r}", "lines": lines, "member": True,
                                        "expected_total": quote["total"]}, auth["pos"])
            assert status == 201, sale
        return rounds

    return sum(await asyncio.gather(*(lane(n) for n in range(1, LANES + 1))))


def main() -> None:
    opts = args(__doc__.splitlines()[0])
    n_members = 100_000 if opts.quick else 1_000_000
    rounds = 50 if opts.quick else 250                   # per lane
    base = Path(opts.dir or tempfile.mkdtemp(prefix="sg-bench-footprint-", dir=os.environ.get("BENCH_DIR")))
    base.mkdir(parents=True, exist_ok=True)
    scale = {"members": n_members, "quick": opts.quick}
    if opts.quick:
        note("bench.footprint --quick: 100,000 members, not the 1,000,000 of the targets")
    proc = None
    try:
        config, auth, port = prepare(base, n_members)
        proc, ready_s, logs = start(config, base)
        pid = proc.pid
        time.sleep(IDLE_S)                                 # idle: start-up settled, nothing asked
        idle_rss = proc_status(pid, "VmRSS")
        w0, c0, l0, t0 = write_bytes(pid), cpu_s(pid), logs.bytes, time.perf_counter()
        time.sleep(IDLE_S)
        idle_writes_per_s = (write_bytes(pid) - w0) / (time.perf_counter() - t0)
        idle_cpu_per_s = (cpu_s(pid) - c0) / (time.perf_counter() - t0)

        frames0 = journal_frame_bytes(port, auth)
        w0, c0, l0, t0 = write_bytes(pid), cpu_s(pid), logs.bytes, time.perf_counter()
        sales = asyncio.run(load(port, auth, rounds))
        elapsed = time.perf_counter() - t0
        frames = journal_frame_bytes(port, auth) - frames0
        wrote, cpu, logged = write_bytes(pid) - w0, cpu_s(pid) - c0, logs.bytes - l0
        loaded_rss = proc_status(pid, "VmHWM")
        busy_s_per_day = elapsed / sales * SALES_PER_DAY
        per_sale = wrote / sales

        emit("ready_s", ready_s, "s", target="<= 5", **scale)
        emit("footprint_rss_mb", max(idle_rss, loaded_rss), "MB", idle_rss_mb=round(idle_rss, 1),
             loaded_rss_mb=round(loaded_rss, 1), lanes=LANES, target="<= 150", **scale)
        emit("cpu_s_per_1000_sales", cpu / sales * 1000, "s", sales=sales, lines=LINES,
             sales_per_s=round(sales / elapsed, 1), idle_cpu_percent=round(idle_cpu_per_s * 100, 2),
             round="tap + quote + sale", **scale)
        # The journal's frames (the records as encoded) are part of it; the rest is how they reach the disk
        # (whole blocks with O_DIRECT), the counter archive's and the member deltas' SQLite WAL and checkpoints.
        emit("bytes_per_sale", per_sale, "B", sales=sales, lines=LINES, journal_frame_bytes_per_sale=round(frames / sales),
             log_bytes_per_sale=round(logged / sales),
             hq="away (no acks, no key files)", **scale)
        emit("bytes_per_day", per_sale * SALES_PER_DAY + idle_writes_per_s * (86400 - busy_s_per_day), "B",
             sales_per_day=SALES_PER_DAY, lines=LINES, idle_bytes_per_s=round(idle_writes_per_s, 1),
             log_bytes_per_day=round(logged / sales * SALES_PER_DAY), **scale)
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
        if not opts.dir:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
