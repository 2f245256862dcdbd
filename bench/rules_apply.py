"""Apply a signed rule set with a big member snapshot while the counter keeps tapping.

    python -m bench.rules_apply [--quick]

Real parts: mosquitto, HQ's Publisher (catalog, parts, signature) in this
process, and a gateway (gateway.shell.service.Gateway, one lane) in a child
process so its memory is its own. The gateway first runs a small rule set
(v1: 1,000 members); HQ then publishes v2 with 1,000,000 members and 100,000
deny entries (--quick: 100,000 / 10,000). Measured in the gateway:

- ``apply_s``: from the moment the v2 manifest is received to the switch
  (parts fetched over MQTT, hashed, cached, every record checked, SQLite
  bulk load, fsync, rename). Baseline in the same run: the raw sqlite bulk
  insert of the same rows (card_no, JSON record) in one transaction, no
  parsing or checks.
- ``tap_p99_during_apply_ms``: taps (gateway.handle_read: validate against
  the member store) every 5 ms (200/s, ~100x a busy store) on the event
  loop while v2 loads. Baseline:
  the same taps with no apply running.
- ``rss_mb``: the gateway process's peak resident memory (VmHWM) over the
  whole run. Baseline: its resident memory running v1, before v2 came.
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import orjson

from bench.common import args as bench_args, emit, median, note
from common import eventloop
from gateway.core.validate import luhn_check_digit

EX = Path(__file__).resolve().parent.parent / "deploy" / "examples"
TAP_EVERY_S = 0.005  # 200 taps/s on one gateway: some 100x a busy store's counters
TIERS = ("normal", "silver", "gold")


def card(i: int) -> str:
    body = f"8800{i:07d}"
    return body + luhn_check_digit(body)


def members(n: int):
    for i in range(n):
        row = {"card_no": card(i), "member_id": f"M{i:07d}", "name": "王*", "tier": TIERS[i % 3],
               "expires": "2028-12-31", "points": i % 20000, "balance_fen": (i * 37) % 100000}
        if i % 4 == 0:
            row["nfc_uid"] = f"04{i:012X}"
        yield row


def deny(n: int, members_n: int):
    step = max(1, members_n // n)
    for k in range(n):
        yield {"card_no": card(k * step + 1), "status": ("lost", "frozen", "cancelled")[k % 3], "since": "2026-10-01"}


# -- the gateway (child process) --------------------------------------------

async def child(cfg_path: str, tap_cards: list[str]) -> None:
    import logging

    from gateway.shell import config as gw_config
    from gateway.shell.service import Gateway
    from hardware.readers import CardRead

    logging.basicConfig(level=logging.WARNING)
    cfg = gw_config.load(cfg_path)
    out = sys.stdout

    def say(**kw):
        out.write(json.dumps(kw) + "\n")
        out.flush()

    def rss(field="VmRSS"):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
        return 0.0

    async with Gateway(cfg) as gw:
        while not (gw.rules.current and gw.rules.current.version == 1):
            await asyncio.sleep(0.05)

        async def taps(seconds: float | None, stop: asyncio.Event | None = None) -> list[float]:
            lat, i = [], 0
            t_end = time.monotonic() + (seconds or 1e9)
            while time.monotonic() < t_end and not (stop and stop.is_set()):
                c = tap_cards[i % len(tap_cards)]
                i += 1
                t0 = time.perf_counter()
                at = time.monotonic()
                await gw.handle_read(CardRead("1", "magstripe", c))
                lat.append((at, (time.perf_counter() - t0) * 1000))
                await asyncio.sleep(TAP_EVERY_S)
            return lat

        base = await taps(3.0)
        say(event="ready", rss_v1=rss(), taps_idle=[ms for _at, ms in base])
        done = asyncio.Event()

        async def watch():
            while not (gw.rules.current and gw.rules.current.version == 2):
                await asyncio.sleep(0.005)
            done.set()

        # taps start before the manifest comes and stop at the switch
        watcher = asyncio.create_task(watch())
        during = await taps(None, done)
        await watcher
        t = gw.uplink.sync.timings
        # only the taps after the manifest came count as "during the apply"
        during = [ms for at, ms in during if t["received"] <= at <= t["live"]]
        say(event="applied", apply_s=t["live"] - t["received"], fetch_s=t["fetched"] - t["received"],
            taps_during=during,
            rss_peak=rss("VmHWM"), rss_after=rss(), counts=gw.rules.members.count(),
            check=(await gw.handle_read(CardRead("1", "magstripe", card(1)))).reason)


def _percentile(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))]


# -- the orchestrator -----------------------------------------------------------

def raw_sqlite_baseline(path: Path, n_members: int, n_deny: int) -> float:
    """The same rows inserted with no parsing or checks: the floor."""
    rows_m = [(r["card_no"], orjson.dumps(r)) for r in members(n_members)]
    rows_d = [(r["card_no"], orjson.dumps(r)) for r in deny(n_deny, n_members)]
    t0 = time.perf_counter()
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=OFF")
    conn.execute("PRAGMA synchronous=OFF")
    conn.execute("CREATE TABLE members (card_no TEXT PRIMARY KEY, rec BLOB) WITHOUT ROWID")
    conn.execute("CREATE TABLE deny (card_no TEXT PRIMARY KEY, rec BLOB) WITHOUT ROWID")
    conn.execute("BEGIN")
    conn.executemany("INSERT INTO members VALUES (?, ?)", rows_m)
    conn.executemany("INSERT INTO deny VALUES (?, ?)", rows_d)
    conn.execute("COMMIT")
    conn.close()
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
    return time.perf_counter() - t0


async def run(quick: bool, workdir: Path) -> dict:
    from demo.testbed import MosquittoBroker
    from hq_bridge import keys as hq_keys
    from hq_bridge.ledger import Ledger
    from hq_bridge.rules import Catalog, Publisher

    n_members, n_deny = (100_000, 10_000) if quick else (1_000_000, 100_000)
    broker = MosquittoBroker(workdir / "broker").start()
    try:
        key = workdir / "hq" / "hq.key"
        pub = hq_keys.generate(key)
        ledger = Ledger(workdir / "hq" / "ledger.sqlite3")
        catalog = Catalog(workdir / "hq" / "ledger.sqlite3")
        mq = {"host": "127.0.0.1", "port": broker.port}
        hq = Publisher(mq, ledger, catalog, key, {"S001": {"region": "east"}})
        chain = workdir / "chain.json"
        doc = {k: v for k, v in __import__("tomllib").loads((EX / "chain.toml").read_text()).items()}
        chain.write_text(json.dumps(doc))
        # v1: a small snapshot
        catalog.set_snapshot("all", members(1000), int(time.time()))
        await hq.publish_layer(chain, all_=True)
        cfg = workdir / "gateway.toml"
        cfg.write_text(f'[store]\nid = "S001"\nregion = "east"\ndata_dir = "{workdir / "store"}"\n'
                       f'[mqtt]\nhost = "127.0.0.1"\nport = {broker.port}\n'
                       f'[uplink]\npart_timeout_s = 300\n[rules]\nhq_public_keys = ["{pub}"]\n'
                       '[logging]\nlevel = "WARNING"\n[[lanes]]\nid = "1"\nreader = "simulated"\n')
        tap_cards = [card(i) for i in range(0, 1000, 7)]
        proc = subprocess.Popen([sys.executable, "-m", "bench.rules_apply", "--child", str(cfg), *tap_cards],
                                stdout=subprocess.PIPE, text=True)
        ready = json.loads(proc.stdout.readline())
        # v2: the big snapshot, prepared at HQ (not timed), then published
        note(f"HQ: encoding {n_members} members and {n_deny} deny entries into parts ...")
        t0 = time.monotonic()
        catalog.set_snapshot("all", members(n_members), int(time.time()))
        catalog.replace_deny(deny(n_deny, n_members), "bench")
        note(f"HQ: parts ready in {time.monotonic() - t0:.1f} s; publishing v2")
        await hq.publish_stores(["S001"])
        applied = json.loads(proc.stdout.readline())
        proc.wait(60)
        ledger.close()
    finally:
        broker.stop()
    base_s = raw_sqlite_baseline(workdir / "raw.sqlite3", n_members, n_deny)
    assert applied["counts"] == [n_members, n_deny], applied["counts"]
    note(f"gateway: {applied['counts']} loaded; card(1) now -> {applied['check']}")
    lines = [
        emit("apply_s", applied["apply_s"], "s", "raw sqlite bulk insert of the same rows", base_s,
             members=n_members, deny=n_deny, fetch_s=round(applied["fetch_s"], 3),
             load_s=round(applied["apply_s"] - applied["fetch_s"], 3), target="<= 20"),
        emit("tap_p99_during_apply_ms", _percentile(applied["taps_during"], 99), "ms",
             "tap p99 with no apply running", _percentile(ready["taps_idle"], 99),
             taps=len(applied["taps_during"]), tap_median_ms=round(median(applied["taps_during"]), 3),
             tap_max_ms=round(max(applied["taps_during"]), 3), target="<= 10"),
        emit("rss_mb", applied["rss_peak"], "MB", "gateway RSS running v1 (1,000 members), before v2",
             ready["rss_v1"], rss_after_mb=round(applied["rss_after"], 1), target="<= 150"),
    ]
    return {line["metric"]: line for line in lines}


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        eventloop.run(child(sys.argv[2], sys.argv[3:]))
        return
    a = bench_args(__doc__.splitlines()[1])
    workdir = Path(a.dir or tempfile.mkdtemp(prefix="sg-bench-rules-"))
    workdir.mkdir(parents=True, exist_ok=True)
    eventloop.run(run(a.quick, workdir))


if __name__ == "__main__":
    main()
