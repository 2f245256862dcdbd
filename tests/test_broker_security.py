"""The HQ broker's security, on a real mosquitto running the shipped
deploy/mosquitto/hq-broker.conf and deploy/mosquitto/acl (paths and port
rewritten for the test), with a test CA, an HQ client certificate and
per-store client certificates generated here with `cryptography`."""

from __future__ import annotations

import asyncio
import getpass
import json
import re
import ssl
import time
from pathlib import Path

import aiomqtt
import pytest

from common import mqtt
from gateway.shell import config as gw_config
from gateway.shell.service import Gateway
from demo.testbed import MosquittoBroker, free_port, make_test_pki
from hardware.readers import CardRead
from hq_bridge import keys as hq_keys, migrations
from hq_bridge.bridge import Bridge
from hq_bridge.ledger import Ledger
from hq_bridge.rules import Catalog, Publisher
from wire.messages import Manifest, Status, TxBatch, TxRecord
from wire.signing import sign
from wire.topics import Topics

DEPLOY = Path(__file__).resolve().parent.parent / "deploy" / "mosquitto"
EX = Path(__file__).resolve().parent.parent / "deploy" / "examples"
T = Topics()


class ShippedBroker(MosquittoBroker):
    """mosquitto with deploy/mosquitto/hq-broker.conf, rewritten for a test."""

    def __init__(self, workdir: Path, pki) -> None:
        super().__init__(workdir)
        text = (DEPLOY / "hq-broker.conf").read_text()
        subs = {
            r"^listener 8883$": f"listener {self.port} 127.0.0.1",
            r"^cafile .*$": f"cafile {pki.ca}",
            r"^certfile .*$": f"certfile {pki.server_cert}",
            r"^keyfile .*$": f"keyfile {pki.server_key}",
            r"^acl_file .*$": f"acl_file {DEPLOY / 'acl'}",
            r"^persistence_location .*$": f"persistence_location {self.workdir}/",
            r"^log_dest syslog$": f"log_dest file {self.workdir}/mosquitto.log",
            # run as whoever runs the tests (as root, mosquitto would switch to the
            # 'mosquitto' user, who cannot read the test's key files)
            r"^per_listener_settings false$": f"per_listener_settings false\nuser {getpass.getuser()}",
        }
        for pattern, repl in subs.items():
            text, n = re.subn(pattern, repl, text, flags=re.M)
            assert n == 1, f"hq-broker.conf: {pattern} not found once"
        self.conf.write_text(text)


@pytest.fixture
def secure(tmp_path):
    pki = make_test_pki(tmp_path / "pki", ["hq", "S001", "S002"])
    broker = ShippedBroker(tmp_path / "broker", pki).start()
    yield broker, pki
    broker.stop()


def settings(broker, pki, who: str | None) -> dict:
    return {"host": "127.0.0.1", "port": broker.port, "keepalive": 5, "tls": pki.mqtt_tls(who)}


def client(broker, pki, who, ident=None):
    return mqtt.client(settings(broker, pki, who), identifier=ident or f"{who}-{time.monotonic_ns()}")


async def collect(c: aiomqtt.Client, seconds: float) -> list[tuple[str, bytes]]:
    got = []
    try:
        async with asyncio.timeout(seconds):
            async for m in c.messages:
                got.append((str(m.topic), m.payload))
    except TimeoutError:
        pass
    return got


async def test_no_client_certificate_no_connection(secure):
    broker, pki = secure
    c = client(broker, pki, None)
    # The broker refuses at once (TLS 1.3 alert "certificate required"), but aiomqtt 2.5
    # ignores a disconnect before CONNACK and waits out its timeout, 10 s by default. A
    # CONNACK on loopback takes milliseconds: 2 s still fails the test if one comes.
    c.timeout = 2
    with pytest.raises((aiomqtt.MqttError, ssl.SSLError, OSError)):
        async with c:
            pass


async def test_a_store_cannot_publish_as_another_store(secure):
    broker, pki = secure
    batch = TxBatch("S002", [TxRecord(1, "id-forged-0001", "sale", 1, {"total": 1})]).encode()
    forbidden = [
        (T.tx("S002"), batch, False),                                     # as S002
        (T.status("S002"), Status("S002", "offline", 1).encode(), True),
        (T.resync("S002"), b'{"store": "S002", "reason": "x"}', False),
        (T.rules("S001"), b'{"version": 999}', True),                     # stores never publish rules
        (T.store_part("S001", "0" * 64), b"{}", True),
        (T.deny(), b'{"version": 999}', True),
        (T.ack("S001"), b'{"store": "S001", "acked": [[1, 99]]}', False),  # nor acks for themselves
    ]
    async with client(broker, pki, "hq") as hq:
        await hq.subscribe("sg/v1/#", qos=1)
        for topic, payload, retain in forbidden:
            # mosquitto 2.0 drops the message and then the connection: a new one each time
            try:
                async with client(broker, pki, "S001") as s1:
                    await s1.publish(topic, payload, qos=1, retain=retain, timeout=2)
                    await asyncio.sleep(0.1)
            except aiomqtt.MqttError:
                pass
        async with client(broker, pki, "S001") as s1:
            await s1.publish(T.status("S001"), Status("S001", "online", 1).encode(), qos=1)  # its own: fine
        got = await collect(hq, 1.0)
    topics = [t for t, _ in got]
    assert topics == [T.status("S001")], topics


async def test_a_store_cannot_read_another_stores_rules_or_parts(secure, tmp_path):
    broker, pki = secure
    key = tmp_path / "hq.key"
    hq_keys.generate(key)
    ledger = Ledger(tmp_path / "hq" / "l.db")
    pub = Publisher(settings(broker, pki, "hq"), ledger, Catalog(tmp_path / "hq" / "l.db"), key,
                    {"S001": {"region": "east"}, "S002": {"region": "east"}})
    await pub.publish_layer(EX / "chain.toml", all_=True, members_file=EX / "members.demo.jsonl")
    await pub.publish_layer(EX / "store-S001.toml", store="S001")
    m1 = pub.catalog.manifest("S001")
    store_part = next(p for p in m1.parts if p.name == "layer:store:S001")
    chain_part = next(p for p in m1.parts if p.name == "layer:chain")
    async with client(broker, pki, "S002") as s2, client(broker, pki, "S001") as s1:
        for c in (s1, s2):
            await c.subscribe([(T.rules("S001"), 1), (store_part.topic, 1), (chain_part.topic, 1),
                               (T.ack("S001"), 1), (T.tx("S001"), 1)])
        await s2.subscribe("sg/v1/stores/#", qos=1)                       # a wildcard does not help
        got2, got1 = await asyncio.gather(collect(s2, 1.5), collect(s1, 1.5))
    topics2 = {t for t, _ in got2}
    assert not [t for t in topics2 if "/S001/" in t], topics2     # nothing of S001's
    assert topics2 == {chain_part.topic, T.rules("S002")}, topics2  # chain-wide parts and its own manifest
    topics1 = {t for t, _ in got1}
    assert {T.rules("S001"), store_part.topic, chain_part.topic} <= topics1
    ledger.close()


async def test_forged_or_unsigned_rule_set_from_anyone_with_access_is_refused_by_every_gateway(secure, tmp_path):
    broker, pki = secure
    key = tmp_path / "hq.key"
    hq_public = hq_keys.generate(key)
    ledger = Ledger(tmp_path / "hq" / "l.db")
    pub = Publisher(settings(broker, pki, "hq"), ledger, Catalog(tmp_path / "hq" / "l.db"), key,
                    {"S001": {"region": "east"}, "S002": {"region": "east"}})
    await pub.publish_layer(EX / "chain.toml", all_=True, members_file=EX / "members.demo.jsonl")

    def cfg(store):
        return gw_config.check({
            "store": {"id": store, "region": "east", "data_dir": str(tmp_path / store)},
            "mqtt": settings(broker, pki, store), "uplink": {"status_interval_s": 1},
            "rules": {"hq_public_keys": [hq_public]}, "lanes": [{"id": "1", "reader": "simulated"}]})

    async with Gateway(cfg("S001")) as g1, Gateway(cfg("S002")) as g2:
        deadline = time.monotonic() + 10
        while not (g1.rules.current and g2.rules.current):
            assert time.monotonic() < deadline, "rules over TLS"
            await asyncio.sleep(0.02)
        running = {g.store_id: g.rules.current for g in (g1, g2)}
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
        intruder = Ed25519PrivateKey.generate()
        # someone holding the HQ broker credentials (or the broker itself) publishes rules
        async with client(broker, pki, "hq") as hq:
            for store in ("S001", "S002"):
                doc = dict(pub.catalog.manifest(store).doc, version=50, max_age_s=10 ** 8)
                unsigned = {k: v for k, v in doc.items() if k not in ("sig", "key_id")}
                await hq.publish(T.rules(store), json.dumps(unsigned).encode(), qos=1, retain=True)
            await asyncio.sleep(0.5)
            for g in (g1, g2):
                assert g.rules.current is running[g.store_id] and "malformed" in g.rules.last_rejection
            for store in ("S001", "S002"):
                doc = dict(pub.catalog.manifest(store).doc, version=51, max_age_s=10 ** 8)
                await hq.publish(T.rules(store), Manifest(sign(doc, intruder)).encode(), qos=1, retain=True)
            await asyncio.sleep(0.5)
        for g in (g1, g2):
            assert g.rules.current is running[g.store_id]
            assert "does not trust" in g.rules.last_rejection
            v = await g.handle_read(CardRead("1", "nfc", "04A1B2C3D4E5F6"))
            assert v.verdict == "accept"
    ledger.close()


async def test_gateway_drains_its_journal_to_hq_over_tls_with_its_client_certificate(secure, tmp_path):
    broker, pki = secure
    ledger = Ledger(tmp_path / "hq" / "l.db")
    bridge = Bridge(settings(broker, pki, "hq"), ledger, client_id="storegate-hq-tls")
    task = asyncio.create_task(bridge.run())
    try:
        await asyncio.wait_for(bridge.connected.wait(), 10)
        api_port = free_port()
        cfg = gw_config.check({
            "store": {"id": "S001", "data_dir": str(tmp_path / "S001")},
            "mqtt": settings(broker, pki, "S001"), "api": {"host": "127.0.0.1", "port": api_port},
            "uplink": {"status_interval_s": 1}, "lanes": [{"id": "1", "reader": "simulated"}]})
        async with Gateway(cfg) as gw:
            for i in range(25):
                await gw.journal.append("sale", {"lane": "1", "total": 100 + i}, idempotency_key=f"tls-sale-{i:04d}",
                                        request={"i": i}, response={"ok": True})
            deadline = time.monotonic() + 15
            while (await gw.journal.backlog())["depth"]:
                assert time.monotonic() < deadline, "the journal did not drain over TLS"
                await asyncio.sleep(0.05)
            assert gw.uplink.state.connected and gw.uplink.state.acked_records == 25
        assert ledger.counts()["transactions"] == 25
    finally:
        task.cancel()
        ledger.close()


async def test_live_account_lookups_reach_only_the_asking_store(secure, tmp_path):
    """A store asks on its own query topic and reads only its own replies;
    HQ's look-up service reads every store's queries through the shared
    subscription ($share/hq/...) under the shipped ACL."""
    from hq_bridge import db
    from hq_bridge.accounts import import_members
    from hq_bridge.lookup import LookupService
    from hq_bridge.rules import read_table_file
    from wire.messages import AccountQuery, AccountReply

    broker, pki = secure
    url = f"sqlite:///{tmp_path / 'hq.db'}"
    migrations.migrate(url)
    engine = db.open_engine(url)
    with engine.begin() as conn:
        import_members(conn, list(read_table_file(EX / "members.demo.jsonl")))
    svc = LookupService(settings(broker, pki, "hq"), engine)
    task = asyncio.create_task(svc.run())
    try:
        await asyncio.wait_for(svc.connected.wait(), 10)
        async with client(broker, pki, "S001") as s1, client(broker, pki, "S002") as s2:
            await s1.subscribe(T.account_reply("S001"), qos=0)
            await s2.subscribe([(T.account_reply("S001"), 0), (T.account_query("S001"), 0)])
            await s2.subscribe("sg/v1/stores/#", qos=0)                   # a wildcard does not help
            await asyncio.sleep(0.2)
            q = AccountQuery("S001", "query-s1-0001", "880000000013", 1)
            await s1.publish(T.account_query("S001"), q.encode(), qos=0)
            got1, got2 = await asyncio.gather(collect(s1, 1.0), collect(s2, 1.0))
        replies = [AccountReply.decode(p) for t, p in got1 if t == T.account_reply("S001")]
        assert len(replies) == 1 and replies[0].found and replies[0].id == q.id
        assert replies[0].account["balance_fen"] == 20000
        assert not [t for t, _ in got2 if "/S001/" in t], got2           # nothing of S001's
        assert svc.stats["queries"] == 1

        # A store cannot ask as another store, nor publish replies (to anyone).
        forbidden = [
            (T.account_query("S002"), AccountQuery("S002", "query-s2-0001", "880000000013", 1).encode()),
            (T.account_reply("S001"), replies[0].encode()),
            (T.account_reply("S002"), replies[0].encode()),
        ]
        async with client(broker, pki, "S002") as s2:
            await s2.subscribe(T.account_reply("S002"), qos=0)
            for topic, payload in forbidden:
                try:
                    async with client(broker, pki, "S001") as s1:
                        await s1.publish(topic, payload, qos=0)
                        await asyncio.sleep(0.1)
                except aiomqtt.MqttError:
                    pass
            got = await collect(s2, 0.5)
        assert got == [] and svc.stats["queries"] == 1
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        engine.dispose()
