"""Drain of a journal backlog to HQ through a link with 50 ms round-trip latency.

    python -m bench.drain [--quick]

Counted from connect until the last record is committed in HQ's ledger and
its ack has freed it at the gateway. Baseline in the same run: one MQTT
message per record with paho-mqtt's default in-flight window (20), counted
until the broker's last PUBACK (no HQ commit at all: generous to it).
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import paho.mqtt.client as paho

from bench.common import args, emit, median, note
from common import eventloop
from gateway.store.rules import RulesStore
from gateway.store.journal import Journal
from demo.testbed import LinkProxy, MosquittoBroker
from gateway.shell.uplink import Uplink, UplinkSettings
from hq_bridge.ledger import Ledger
from wire.messages import Status

RECORD = {"lane": "1", "member_id": "M1001", "card_no": "880000000013", "total": 4740, "points_earned": 71,
          "lines": [{"sku": "6901234567892", "qty": 1, "unit_price": 4990, "discount": 250, "net": 4740}]}
ONE_WAY_S = 0.025


async def fill(journal: Journal, n: int) -> None:
    for start in range(0, n, 2000):
        await asyncio.gather(*(journal.append("sale", RECORD) for _ in range(min(2000, n - start))))


async def drain_once(workdir: Path, broker_port: int, n: int) -> float:
    """Records/s from connect to the last ack, through a 50 ms RTT link."""
    proxy = await LinkProxy(broker_port, latency_s=ONE_WAY_S).start()
    # HQ runs as its own process, as it does in production.
    config = workdir / "hq.toml"
    config.write_text(f'[hq]\ndatabase = "{workdir / "ledger.sqlite3"}"\n'
                      f'[mqtt]\nhost = "127.0.0.1"\nport = {broker_port}\nclient_id = "hq-{workdir.name}"\n'
                      '[logging]\nlevel = "WARNING"\n')
    hq = subprocess.Popen([str(Path(sys.executable).parent / "storegate-hq"), "run", "--config", str(config)])
    await asyncio.sleep(1.0)
    async with Journal(workdir / "journal") as journal:
        await fill(journal, n)
        rules = RulesStore(workdir / "rules", "S001")

        async def status(state: str) -> Status:
            return Status("S001", state, int(time.time()))

        uplink = Uplink({"host": "127.0.0.1", "port": proxy.port, "keepalive": 30}, "S001", journal, rules,
                        status, UplinkSettings(status_interval_s=60))
        start = time.perf_counter()
        task = asyncio.create_task(uplink.run())
        while journal.index.pending:
            await asyncio.sleep(0.01)
        elapsed = time.perf_counter() - start
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    hq.terminate()
    hq.wait()
    ledger = Ledger(workdir / "ledger.sqlite3")
    assert ledger.counts()["transactions"] == n, ledger.counts()
    ledger.close()
    await proxy.stop()
    return n / elapsed


async def paho_baseline(broker_port: int, n: int) -> float:
    """One QoS 1 message per record, paho defaults (max_inflight_messages 20)."""
    proxy = await LinkProxy(broker_port, latency_s=ONE_WAY_S).start()
    done = threading.Event()
    acked = 0

    def on_publish(client, userdata, mid, reason_code, properties):
        nonlocal acked
        acked += 1
        if acked == n:
            done.set()

    client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="baseline")
    client.on_publish = on_publish
    payload = str(RECORD).encode()

    def run() -> float:
        client.connect("127.0.0.1", proxy.port)
        client.loop_start()
        start = time.perf_counter()
        for _ in range(n):
            client.publish("sg/v1/stores/S001/tx-baseline", payload, qos=1)
        done.wait(300)
        elapsed = time.perf_counter() - start
        client.loop_stop()
        client.disconnect()
        return n / elapsed

    rate = await asyncio.to_thread(run)
    await proxy.stop()
    return rate


async def main() -> None:
    opts = args(__doc__)
    n = 20_000 if opts.quick else 100_000
    n_base = 1_000 if opts.quick else 4_000
    rounds = 1 if opts.quick else 3
    base = Path(opts.dir or tempfile.mkdtemp(prefix="sg-bench-drain-"))
    ours, theirs = [], []
    with MosquittoBroker(base / "broker") as broker:
        for r in range(rounds):
            theirs.append(await paho_baseline(broker.port, n_base))
            workdir = base / f"run{r}"
            workdir.mkdir()
            ours.append(await drain_once(workdir, broker.port, n))
            note(f"round {r + 1}/{rounds}: {ours[-1]:.0f} vs {theirs[-1]:.0f} records/s")
    emit("drain_rate", median(ours), "records/s", "paho-mqtt, one message per record, in-flight 20",
         median(theirs), records=n, rtt_ms=2000 * ONE_WAY_S, target=10000)


if __name__ == "__main__":
    eventloop.run(main())  # the gateway's own loop (common/eventloop.py)
