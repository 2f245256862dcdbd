"""`python -m demo` (`make demo`): a whole store on this machine, and a scripted day.

A broker (mosquitto if installed, else amqtt in-process), the HQ bridge with
its SQLite ledger, and the gateway with three lanes of simulated readers and
gpiozero indicators on MockFactory. Members tap (NFC, magstripe, QR), one
card is on the deny list, the POS quotes and commits sales over the real HTTP
API, the link to HQ drops and comes back. Exit 0 only when every sale the POS
was told is committed is in HQ's database exactly once.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import shutil
import sqlite3
import tempfile
import time
import uuid
from pathlib import Path

from gateway.shell import config as gw_config
from gateway.shell.api import create_app
from gateway.shell.http_server import PosServer
from gateway.shell.service import Gateway
from demo.testbed import (EmbeddedBroker, LinkProxy, MosquittoBroker, free_port, http_json, mosquitto_path,
                             provision_terminals)
from hq_bridge.bridge import Bridge
from hq_bridge.ledger import Ledger
from hq_bridge.lookup import LookupService
from hq_bridge import keys as hq_keys
from hq_bridge.rules import Catalog, Publisher

RULES_FILE = Path(__file__).resolve().parent.parent / "deploy" / "examples" / "rules.demo.toml"
STORE = "S001"

BASKETS = {
    "groceries": [
        {"sku": "6901234567892", "name": "大米 5kg", "category": "staples", "qty": 1, "unit_price": 4990},
        {"sku": "6920202888883", "name": "酸奶", "category": "dairy", "qty": 4, "unit_price": 650},
        {"sku": "6901028075831", "name": "香烟", "category": "tobacco", "qty": 1, "unit_price": 2500},
    ],
    "snacks": [
        {"sku": "6924743915015", "name": "薯片", "category": "snacks", "qty": 2, "unit_price": 890},
        {"sku": "6902083880781", "name": "矿泉水", "category": "drinks", "qty": 6, "unit_price": 200},
    ],
    "fruit": [
        {"sku": "2000000000015", "name": "苹果", "category": "fresh", "qty": 3, "unit_price": 1280},
    ],
}

# (lane, source, raw card read, basket or None, what happens)
MORNING = [
    ("1", "nfc", "04A1B2C3D4E5F6", "groceries", "gold member taps an NFC card"),
    ("2", "magstripe", "880000000021", "snacks", "silver member swipes"),
    ("3", "qr", "880000000054", None, "a card reported lost is shown"),
    ("3", None, None, "fruit", "the same customer pays without membership"),
    ("1", "magstripe", "880000000039", None, "an expired card is swiped"),
]
OFFLINE = [
    ("2", "nfc", "04112233445566", "groceries", "silver member taps while HQ is unreachable"),
    ("1", "qr", "880000000062", "snacks", "a card issued today, not yet in the store's list"),
    ("3", "nfc", "04A1B2C3D4E5F6", "fruit", "gold member again, still offline"),
    ("2", "magstripe", "880000000047", None, "a frozen card is swiped"),
]


def _say(text: str) -> None:
    print(f"  {text}", flush=True)


async def _start_broker(workdir: Path):
    if mosquitto_path():
        broker = MosquittoBroker(workdir / "broker")
        (workdir / "broker").mkdir(exist_ok=True)
        await asyncio.to_thread(broker.start)
        return broker, "mosquitto", broker.stop
    broker = await EmbeddedBroker().start()
    return broker, "amqtt (embedded)", None


async def run_demo(keep: bool = False) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    workdir = Path(tempfile.mkdtemp(prefix="storegate-demo-"))
    print(f"storegate demo — working directory {workdir}")
    broker, broker_name, stop_broker = None, "", None
    tasks: list[asyncio.Task] = []
    try:
        broker, broker_name, stop_broker = await _start_broker(workdir)
        proxy = await LinkProxy(broker.port).start()
        print(f"broker: {broker_name} on port {broker.port}; the store reaches it through a link proxy on {proxy.port}")

        ledger = Ledger(workdir / "hq" / "ledger.sqlite3")
        hq_mqtt = {"host": "127.0.0.1", "port": broker.port}
        # A throwaway HQ signing key for the demo (mode 0600); the gateway trusts its public half.
        hq_public_key = hq_keys.generate(workdir / "hq" / "keys" / "hq.key")
        publisher = Publisher(hq_mqtt, ledger, Catalog(parts_dir=workdir / "hq" / "parts", engine=ledger.engine),
                              workdir / "hq" / "keys" / "hq.key", {STORE: {"region": "east"}})
        bridge = Bridge(hq_mqtt, ledger, publisher=publisher)
        tasks.append(asyncio.create_task(bridge.run()))
        # HQ answers the store's live account look-ups (amqtt: no shared subscriptions).
        embedded = broker_name.startswith("amqtt")
        tasks.append(asyncio.create_task(LookupService(hq_mqtt, ledger.engine,
                                                       share_group=None if embedded else "hq").run()))
        await asyncio.wait_for(bridge.connected.wait(), 10)
        msg = (await publisher.publish_layer(RULES_FILE, all_=True))[0]
        print(f"HQ: bridge up, signed and published rules v{msg.version} to store {STORE}")

        api_port = free_port()
        cfg = gw_config.check({
            "store": {"id": STORE, "region": "east", "data_dir": str(workdir / "store")},
            "mqtt": {"host": "127.0.0.1", "port": proxy.port, "keepalive": 5},
            "rules": {"hq_public_keys": [hq_public_key]},
            "api": {"host": "127.0.0.1", "port": api_port,
                    "terminals_file": str(workdir / "store" / "terminals.json")},
            "uplink": {"resend_after_s": 3, "status_interval_s": 2},
            "lanes": [{"id": lane, "reader": "simulated", "indicator": "gpio",
                       "gpio": {"green": 17, "red": 27, "buzzer": 22, "status": 23, "mock": True}}
                      for lane in ("1", "2", "3")],
        }, "demo config")
        # The store's terminals: one credential per role (a real store: `storegate terminals add`).
        tokens = provision_terminals(workdir / "store" / "terminals.json")
        pos_call = functools.partial(http_json, token=tokens["pos"])
        async with Gateway(cfg) as gw:
            app = create_app(gw)
            async with PosServer.from_config(app, cfg["api"]):  # gateway/shell/http_server.py
                await _until(lambda: gw.rules.current is not None, 15, "the gateway to receive its rules")
                print(f"gateway: store {STORE}, 3 lanes, rules v{gw.rules.current.version}, "
                      f"POS API on port {api_port}\n")

                committed: dict[str, int] = {}  # tx_id -> seq the POS was told
                print("morning, HQ reachable:")
                await _visits(gw, api_port, MORNING, committed, pos_call)
                await _until(lambda: gw.uplink.state.acked_records >= len(committed), 15,
                             "HQ to ack the morning's sales")

                print("\nthe store's internet link drops:")
                proxy.cut()
                await _until(lambda: not gw.uplink.state.connected, 20, "the gateway to notice the outage")
                await _visits(gw, api_port, OFFLINE, committed, pos_call)
                backlog = (await gw.journal.backlog())["depth"]
                _say(f"backlog while offline: {backlog} sale(s) journaled, waiting for HQ")

                print("\nthe link comes back:")
                proxy.restore()
                await _until(lambda: gw.uplink.state.connected, 40, "the gateway to reconnect")
                drained_at = time.monotonic()
                await _until_async(lambda: _backlog_empty(gw), 40, "the backlog to drain")
                _say(f"backlog drained in {time.monotonic() - drained_at:.1f} s")
                status = await gw.status()
                indicator_counts = _pattern_counts(gw)
        await proxy.stop()

        ok = _summary(committed, status, ledger, indicator_counts)
        ledger.close()
        return 0 if ok else 1
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if stop_broker:
            stop_broker()
        elif broker is not None:
            await broker.stop()
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)


async def _visits(gw: Gateway, port: int, visits, committed: dict[str, int], http_json) -> None:
    for lane, source, raw, basket, what in visits:
        if source:
            events: asyncio.Queue = asyncio.Queue()
            gw.lanes[lane].listeners.add(events)  # what the lane's POS sees on /lanes/<lane>/events
            try:
                gw.sim_reader(lane).present(raw, source)
                tap = await asyncio.wait_for(events.get(), 5)
            finally:
                gw.lanes[lane].listeners.discard(events)
            text = f"{tap['text']['zh-CN']} / {tap['text']['en']}"
            if tap["member"]:
                tier = tap["member"]["tier"]["name"]
                text = f"{tier['zh-CN']} / {tier['en']} ({tap['card']})"
            _say(f"lane {lane}: {what}: {tap['verdict']} — {text}")
        if basket:
            use_member = source is not None
            status, quote = await asyncio.to_thread(
                http_json, port, "POST", f"/lanes/{lane}/quote", {"lines": BASKETS[basket], "member": use_member})
            if status != 200 and use_member:  # a refused card: sell without membership
                status, quote = await asyncio.to_thread(
                    http_json, port, "POST", f"/lanes/{lane}/quote", {"lines": BASKETS[basket], "member": False})
                use_member = False
            if status != 200:
                raise RuntimeError(f"quote failed: {status} {quote}")
            sale = {"idempotency_key": f"pos{lane}-{uuid.uuid4().hex[:12]}", "lines": BASKETS[basket],
                    "member": use_member, "expected_total": quote["total"]}
            status, result = await asyncio.to_thread(http_json, port, "POST", f"/lanes/{lane}/sales", sale)
            if status != 201:
                raise RuntimeError(f"sale failed: {status} {result}")
            committed[result["tx_id"]] = result["seq"]
            _say(f"lane {lane}: sale #{result['seq']} committed: total ¥{result['total'] / 100:.2f}, "
                 f"discount ¥{result['discount'] / 100:.2f}, points +{result['points_earned']}")


def _backlog_empty(gw: Gateway):
    async def check():
        return (await gw.journal.backlog())["depth"] == 0
    return check()


async def _until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.05)


async def _until_async(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not await predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.1)


def _pattern_counts(gw: Gateway) -> dict[str, int]:
    counts: dict[str, int] = {}
    for lane in gw.lanes.values():
        for p in lane.indicator.history:
            name = getattr(p, "value", p)
            counts[name] = counts.get(name, 0) + 1
    return counts


def _summary(committed: dict[str, int], status: dict, ledger: Ledger, patterns: dict[str, int]) -> bool:
    conn = sqlite3.connect(ledger.path)
    rows = conn.execute("SELECT tx_id, COUNT(*) FROM transactions WHERE store=? GROUP BY tx_id", (STORE,)).fetchall()
    conn.close()
    at_hq = dict(rows)
    missing = [t for t in committed if t not in at_hq]
    twice = [t for t, n in at_hq.items() if n != 1]
    unexpected = [t for t in at_hq if t not in committed]
    stats = status["stats"]
    print("\nsummary")
    print(f"  taps                 {stats['taps']} ({stats['accepted']} accepted, {stats['denied']} denied)")
    print("  indicator patterns   " + ", ".join(f"{k} {v}" for k, v in sorted(patterns.items())))
    print(f"  sales committed      {len(committed)} (POS got OK after fsync)")
    print(f"  journaled            {status['last_seq']} record(s), sequence 1..{status['last_seq']}")
    print(f"  delivered            {status['acked_records']} acked by HQ")
    print(f"  rows in HQ database  {sum(at_hq.values())}")
    print(f"  left in backlog      {status['backlog']}")
    ok = not missing and not twice and not unexpected and status["backlog"] == 0
    if ok:
        print("  result               OK: every committed sale is in HQ's database exactly once")
    else:
        print(f"  result               FAILED: missing {len(missing)}, applied twice {len(twice)}, "
              f"unexpected {len(unexpected)}, backlog {status['backlog']}")
    return ok
