"""Deny propagation: `card deny` at HQ until the card is refused at every store.

    python -m bench.deny_propagation [--quick] [--gateways 50] [--procs 5]

One real mosquitto; HQ's Publisher in this process, with a persistent MQTT
connection (as `storegate-hq run` holds one), so a round is timed from the
call that takes the next deny version, signs the delta and publishes it.

The gateways: ``--gateways`` instances spread over ``--procs`` processes.
Each instance is the gateway's rules side, not a whole gateway: its own MQTT
client and session loop (the uplink's: subscribe to the manifest and deny
topics, hand messages to gateway.shell.rules_sync.RulesSync), its own RulesStore
with a SQLite MemberStore in its own directory. It fetches its signed rule
set over MQTT first (real manifest and parts), then, for every deny delta,
runs the real path (signature check, MemberStore.apply_deny_delta) and
immediately asks gateway.core.validate.validate about the card: the time the card
is first refused is the sample.

Baseline in the same run: a plain QoS 1 message published to one topic that
the same instances subscribe to (broker fan-out with no signature, no
SQLite, no validation).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

from bench.common import emit, median, note
from bench.rules_apply import card
from common import eventloop

RULES_FILE = Path(__file__).resolve().parent.parent / "deploy" / "examples" / "rules.demo.toml"
PING = "bench/ping"


# -- gateway instances (child process) ---------------------------------------

async def instance(store: str, workdir: Path, port: int, public_key: str, cards: set[str],
                   refused: dict, pings: dict, ready: asyncio.Event) -> None:
    import aiomqtt

    from gateway.core import validate as engine
    from gateway.store.rules import RulesStore
    from gateway.shell.rules_sync import RulesSync
    from wire.topics import Topics

    tz = ZoneInfo("Asia/Shanghai")
    rules = RulesStore(workdir / store, store, None, public_keys=[public_key])
    topics = Topics()
    sync = RulesSync(rules, topics, store, part_timeout_s=60)
    worker = asyncio.create_task(sync.run())

    async def watch() -> None:
        while rules.current is None:
            await asyncio.sleep(0.05)
        ready.set()

    watcher = asyncio.create_task(watch())
    try:
        async with aiomqtt.Client("127.0.0.1", port, identifier=f"bench-{store}") as client:
            await client.subscribe([(t, 1) for t in sync.topics_to_subscribe()] + [(PING, 1)])
            sync.attach(client)
            async for m in client.messages:
                topic, payload = str(m.topic), m.payload
                if topic == PING:
                    pings.setdefault(payload.decode(), []).append(time.time())
                    continue
                await sync.handle(topic, payload)
                if topic == topics.deny() and rules.current is not None:
                    now = datetime.now(tz)
                    for c in cards:
                        if c not in refused[store] and \
                                engine.validate("magstripe", c, rules.current, now).verdict == "deny":
                            refused[store][c] = time.time()
    finally:
        worker.cancel()
        watcher.cancel()


async def child(spec: dict) -> None:
    import logging

    logging.basicConfig(level=logging.WARNING)
    refused: dict[str, dict] = {s: {} for s in spec["stores"]}
    pings: dict[str, list] = {}
    readies = []
    tasks = []
    for s in spec["stores"]:
        ev = asyncio.Event()
        readies.append(ev)
        tasks.append(asyncio.create_task(instance(s, Path(spec["dir"]), spec["port"], spec["public_key"],
                                                  set(spec["cards"]), refused, pings, ev)))
    await asyncio.wait_for(asyncio.gather(*(e.wait() for e in readies)), 120)
    print(json.dumps({"event": "ready"}), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)  # "done"
    for t in tasks:
        t.cancel()
    print(json.dumps({"event": "result", "refused": refused, "pings": pings}), flush=True)


# -- orchestrator -------------------------------------------------------------

def percentile(values, p):
    s = sorted(values)
    return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))]


async def run(n_gateways: int, n_procs: int, rounds: int, workdir: Path) -> None:
    import aiomqtt

    from common import mqtt
    from demo.testbed import MosquittoBroker
    from hq_bridge import keys as hq_keys
    from hq_bridge.ledger import Ledger
    from hq_bridge.rules import Catalog, Publisher

    broker = MosquittoBroker(workdir / "broker").start()
    procs = []
    try:
        stores = [f"G{i:03d}" for i in range(n_gateways)]
        key = workdir / "hq" / "hq.key"
        pub = hq_keys.generate(key)
        ledger = Ledger(workdir / "hq" / "ledger.sqlite3")
        mq = {"host": "127.0.0.1", "port": broker.port}
        hq = Publisher(mq, ledger, Catalog(workdir / "hq" / "ledger.sqlite3"), key, {s: {} for s in stores})
        await hq.publish_layer(RULES_FILE, all_=True)
        cards = [card(5000 + i) for i in range(rounds)]
        for k in range(n_procs):
            mine = stores[k::n_procs]
            spec = {"stores": mine, "dir": str(workdir / "gw"), "port": broker.port, "public_key": pub,
                    "cards": cards}
            procs.append(subprocess.Popen([sys.executable, "-m", "bench.deny_propagation", "--child",
                                           json.dumps(spec)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                          text=True))
        for p in procs:
            line = await asyncio.to_thread(p.stdout.readline)
            assert json.loads(line)["event"] == "ready", line
        note(f"{n_gateways} gateways in {n_procs} processes have their signed rules; {rounds} rounds")
        sent: dict[str, float] = {}
        ping_sent: dict[str, float] = {}
        async with mqtt.client(mq, identifier="storegate-hq-bench") as client, \
                aiomqtt.Client("127.0.0.1", broker.port, identifier="bench-pinger") as pinger:
            for r, c in enumerate(cards):
                sent[c] = time.time()
                await hq.card_action("deny", c, "bench", client=client)
                await asyncio.sleep(0.25)
                ping_sent[str(r)] = time.time()
                await pinger.publish(PING, str(r).encode(), qos=1)
                await asyncio.sleep(0.25)
            await asyncio.sleep(1.0)
        results = []
        for p in procs:
            p.stdin.write("done\n")
            p.stdin.flush()
            line = await asyncio.to_thread(p.stdout.readline)
            results.append(json.loads(line))
            p.wait(30)
        ledger.close()
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        broker.stop()
    lat, missing = [], 0
    for res in results:
        for store, got in res["refused"].items():
            for c in cards:
                if c in got:
                    lat.append((got[c] - sent[c]) * 1000)
                else:
                    missing += 1
    base = [(t - ping_sent[r]) * 1000 for res in results for r, ts in res["pings"].items() for t in ts]
    assert missing == 0, f"{missing} (gateway, card) pairs never refused the card"
    emit("deny_propagation_p99_ms", percentile(lat, 99), "ms",
         "plain QoS 1 message fan-out to the same instances (p99)", percentile(base, 99),
         gateways=n_gateways, processes=n_procs, rounds=rounds, samples=len(lat),
         median_ms=round(median(lat), 2), max_ms=round(max(lat), 2), target="<= 1000")


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        eventloop.run(child(json.loads(sys.argv[2])))
        return
    parser = argparse.ArgumentParser(description="deny propagation over 50 gateway instances")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--gateways", type=int, default=50)
    parser.add_argument("--procs", type=int, default=5)
    parser.add_argument("--dir", default=None)
    a = parser.parse_args()
    workdir = Path(a.dir or tempfile.mkdtemp(prefix="sg-bench-deny-"))
    eventloop.run(run(a.gateways, a.procs, 5 if a.quick else 20, workdir))


if __name__ == "__main__":
    main()
