"""Rules from HQ: signed manifests, content-addressed parts, deny deltas,
resync, staleness, key rotation — on a real mosquitto, the real HQ publisher
and the real gateway (in-process), and the pure checks of the rules store."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import time
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import aiomqtt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gateway.shell import config as gw_config
from gateway.core import validate as engine
from gateway.store.rules import RulesRejected, RulesStore
from gateway.shell.service import Gateway
from hardware.readers import CardRead
from hq_bridge import keys as hq_keys
from hq_bridge.bridge import Bridge
from hq_bridge.ledger import Ledger
from hq_bridge.rules import Catalog, Publisher, _read_doc, offline_rule_set
from tests.support import RULES_FILE
from wire.messages import Manifest, Status
from wire.signing import public_key_b64, sign
from wire.topics import Topics

EX = Path(__file__).resolve().parent.parent / "deploy" / "examples"
CHAIN, EAST, S001 = (_read_doc(EX / n) for n in ("chain.toml", "region-east.toml", "store-S001.toml"))
KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(1, 33)))
PUB = public_key_b64(KEY)
NOW = int(time.time())
GOLD_CARD, SILVER_CARD, LOST_CARD = "880000000013", "880000000021", "880000000054"
TOPICS = Topics()


# -- the pure checks: every rejection leaves the running rules untouched -----

def rule_set(version=1, *, store="S001", region="east", layers=None, key=KEY, **kw):
    layers = layers if layers is not None else [CHAIN, EAST, S001]
    return offline_rule_set(layers, store=store, region=region, version=version, issued_at=kw.pop("now", NOW),
                            key=key, members=kw.pop("members", None) or _members(), deny=kw.pop("deny", None) or [
                                {"card_no": LOST_CARD, "status": "lost", "since": "2026-11-01"}], **kw)


def _members():
    return [json.loads(line) for line in (EX / "members.demo.jsonl").read_text().splitlines()[1:] if line.strip()]


def resign(payload: bytes, change, key=KEY) -> bytes:
    doc = json.loads(payload)
    change(doc)
    return Manifest(sign(doc, key)).encode()


@pytest.fixture
def running(tmp_path):
    store = RulesStore(tmp_path / "rules", "S001", "east", public_keys=[PUB])
    payload, parts = rule_set(5)
    store.install(payload, parts)
    assert store.current.version == 5 and store.last_rejection is None
    return store, payload, parts


def _tampered_part(payload, parts):
    doc = json.loads(payload)
    store_part = next(p for p in doc["parts"] if p["name"] == "layer:store:S001")
    return parts[store_part["sha256"]].replace(b'"percent":20', b'"percent":90'), store_part["sha256"]


def rejection_cases():
    other = Ed25519PrivateKey.generate()
    v6, p6 = rule_set(6)

    forged_payload = json.loads(v6)
    forged_payload["max_age_s"] = 10 ** 9
    yield "forged signature", json.dumps(forged_payload).encode(), p6, "bad signature"
    yield "wrong key", rule_set(6, key=other)[0], rule_set(6, key=other)[1], "does not trust"
    unsigned = json.loads(v6)
    del unsigned["sig"]
    yield "unsigned", json.dumps(unsigned).encode(), p6, "malformed manifest"
    yield "older version", rule_set(4)[0], rule_set(4)[1], "not newer than the running v5"
    yield "same version, other content", rule_set(5, now=NOW - 60)[0], p6, "not newer than the running v5"
    yield "wrong store", rule_set(6, store="S002", layers=[CHAIN, EAST])[0], p6, "not for store 'S001'"
    west = dict(EAST, layer={"level": "region", "id": "west"})
    yield "wrong region", rule_set(6, region="west", layers=[CHAIN, west])[0], p6, "region 'west'"
    s001b = dict(S001, fees={"issue_fen": 900})   # a new store part the gateway does not hold yet
    v6b, p6b = rule_set(6, layers=[CHAIN, EAST, s001b])
    yield "missing part", v6b, {k: v for k, v in p6b.items() if b"S001" not in v}, "incomplete"
    bad, sha = _tampered_part(v6b, p6b)
    yield "part hash mismatch", v6b, {**p6b, sha: bad}, "does not match the manifest"
    bad_tier = dict(CHAIN, tiers={**CHAIN["tiers"], "gold": {**CHAIN["tiers"]["gold"], "discount_percent": 120}})
    yield "schema violation", *_unchecked_rule_set(6, [bad_tier, EAST, S001]), "discount_percent"
    sneaky = dict(S001, redemption={"points_per_yuan": 1})
    yield "contradictory layers", *_unchecked_rule_set(6, [CHAIN, EAST, sneaky]), "locked by the chain layer"
    bad_member = _members() + [{"card_no": "880000000088", "member_id": "M9", "tier": "platinum"}]
    yield "member with unknown tier", *rule_set(6, members=bad_member), "platinum"


def _unchecked_rule_set(version, layers):
    """What a compromised or buggy publisher could send: skip HQ's merge check."""
    import hq_bridge.rules as hr

    real = hr.effective_rules
    hr.effective_rules = lambda layers, **kw: {"max_age_s": CHAIN["max_age_s"]}
    try:
        return rule_set(version, layers=layers)
    finally:
        hr.effective_rules = real


@pytest.mark.parametrize("case", list(rejection_cases()), ids=lambda c: c[0])
def test_every_rejection_leaves_the_running_rules_untouched(running, case):
    store, _payload, _parts = running
    name, payload, parts, words = case
    before = store.current
    members_before = store.members.count()
    with pytest.raises(RulesRejected, match=words):
        store.install(payload, parts)
    assert store.current is before and store.manifest.version == 5, name
    assert store.members.count() == members_before and store.members.version == 5
    assert words.split()[0] in store.last_rejection
    assert "880000000088" not in store.last_rejection           # card numbers masked in reasons
    # and the same gateway still takes the next good rule set
    good, good_parts = rule_set(7)
    assert store.install(good, good_parts).version == 7 and store.last_rejection is None


def test_retained_copy_of_the_running_manifest_is_not_a_rejection(running):
    store, payload, parts = running
    before = store.current
    assert store.install(payload, parts) is before
    assert store.last_rejection is None


def test_reboot_comes_up_with_the_last_good_rules(running, tmp_path):
    store, _p, _parts = running
    store.members.close()
    again = RulesStore(tmp_path / "rules", "S001", "east", public_keys=[PUB])
    again.load()
    assert again.current.version == 5 and again.last_rejection is None
    v = engine.validate("magstripe", LOST_CARD, again.current, datetime.now(ZoneInfo("Asia/Shanghai")))
    assert (v.verdict, v.reason) == ("deny", "lost")
    v = engine.validate("nfc", "04A1B2C3D4E5F6", again.current, datetime.now(ZoneInfo("Asia/Shanghai")))
    assert v.verdict == "accept" and v.member["member_id"] == "M1001"


def test_tampered_manifest_on_disk_is_set_aside_at_boot(running, tmp_path):
    store, _p, _parts = running
    store.members.close()
    path = tmp_path / "rules" / "manifest.json"
    doc = json.loads(path.read_bytes())
    doc["max_age_s"] = 10 ** 9
    path.write_text(json.dumps(doc))
    again = RulesStore(tmp_path / "rules", "S001", "east", public_keys=[PUB])
    again.load()
    assert again.current is None and "set aside" in again.last_rejection


def test_rules_carry_issued_at_and_max_age_to_the_engine_staleness(tmp_path):
    store = RulesStore(tmp_path / "rules", "S001", "east", public_keys=[PUB])
    week = CHAIN["max_age_s"]
    payload, parts = rule_set(1, now=NOW - week - 3600)   # issued over a week ago
    rules = store.install(payload, parts)
    assert rules.issued_at == NOW - week - 3600 and rules.data["max_age_s"] == week
    now = datetime.now(ZoneInfo("Asia/Shanghai"))
    v = engine.validate("nfc", "04A1B2C3D4E5F6", rules, now)
    assert v.verdict == "accept_limited" and v.reason == "rules_stale"      # identify and accrue only
    v = engine.validate("magstripe", LOST_CARD, rules, now)
    assert v.reason == "lost"                                               # the deny list still holds


# -- over the broker -------------------------------------------------------

STORES = {"S001": {"region": "east"}, "S002": {"region": "east"}, "S003": {"region": "west"}}


@pytest.fixture
def hq(tmp_path, broker):
    key = tmp_path / "hq" / "keys" / "hq.key"
    pub = hq_keys.generate(key)
    ledger = Ledger(tmp_path / "hq" / "ledger.sqlite3")
    publisher = Publisher({"host": "127.0.0.1", "port": broker.port}, ledger,
                          Catalog(tmp_path / "hq" / "ledger.sqlite3"), key, STORES)
    publisher.public_key = pub
    yield publisher
    publisher.catalog.close()
    ledger.close()


def gw_config_for(tmp_path, broker, store="S001", region="east", keys=(), port=None, **uplink):
    return gw_config.check({
        "store": {"id": store, "region": region, "data_dir": str(tmp_path / f"gw-{store}")},
        "mqtt": {"host": "127.0.0.1", "port": port or broker.port, "keepalive": 5},
        "uplink": {"status_interval_s": 1, "part_timeout_s": 3, **uplink},
        "rules": {"hq_public_keys": list(keys)},
        "lanes": [{"id": "1", "reader": "simulated"}],
    }, "test config")


async def until(pred, timeout=10.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


async def tap(gw, raw, source="qr"):
    return await gw.handle_read(CardRead("1", source, raw))


async def publish_all(hq):
    await hq.publish_layer(EX / "chain.toml", all_=True, members_file=EX / "members.demo.jsonl",
                           deny_file=EX / "deny.demo.jsonl")
    await hq.publish_layer(EX / "region-east.toml", region="east")
    return await hq.publish_layer(EX / "store-S001.toml", store="S001")


async def raw_publish(broker, topic, payload, retain=True):
    async with aiomqtt.Client("127.0.0.1", broker.port, identifier=f"intruder-{time.monotonic_ns()}") as c:
        await c.publish(topic, payload, qos=1, retain=retain)


async def statuses(broker, store, pred, timeout=10.0) -> Status:
    async with aiomqtt.Client("127.0.0.1", broker.port, identifier=f"watch-{time.monotonic_ns()}") as c:
        await c.subscribe(TOPICS.status(store), qos=1)
        async with asyncio.timeout(timeout):
            async for m in c.messages:
                st = Status.decode(m.payload)
                if pred(st):
                    return st


async def test_layers_merged_per_store_and_a_held_part_is_not_fetched_again(tmp_path, broker, hq):
    await publish_all(hq)
    async with Gateway(gw_config_for(tmp_path, broker, keys=[hq.public_key])) as gw:
        await until(lambda: gw.rules.current and gw.rules.current.version == 3, what="v3 at the gateway")
        assert gw.rules.current.data["promotions"].get("s001_bakery")              # the store layer
        assert gw.rules.current.data["redemption"]["offline_max_points_per_tx"] == 5000
        fetched = gw.rules.counters["parts_fetched"]
        # a region-layer change: only the new region part comes; chain, store, members, deny are held
        east2 = dict(EAST, promotions={**EAST.get("promotions", {}), "east_tea": {
            "name": {"zh-CN": "茶叶9折", "en": "Tea 10% off"}, "kind": "percent_off", "percent": 10,
            "categories": ["tea"], "priority": 30}})
        (tmp_path / "east2.json").write_text(json.dumps(east2))
        await hq.publish_layer(tmp_path / "east2.json", region="east")
        await until(lambda: gw.rules.current.version == 4, what="v4")
        assert gw.rules.counters["parts_fetched"] == fetched + 1
        assert "east_tea" in gw.rules.current.data["promotions"]
        st = await statuses(broker, "S001", lambda s: s.rules_version == 4)
        assert st.deny_version == 1 and st.rules_rejection is None


async def test_forged_rule_set_from_anyone_on_the_broker_is_refused_and_reported(tmp_path, broker, hq):
    await publish_all(hq)
    async with Gateway(gw_config_for(tmp_path, broker, keys=[hq.public_key])) as gw:
        await until(lambda: gw.rules.current and gw.rules.current.version == 3)
        running = gw.rules.current
        real = hq.catalog.manifest("S001").doc
        # an intruder takes the real manifest, raises the version and swaps a part
        evil_layer = json.dumps({"layer": {"level": "store", "id": "S001"},
                                 "tiers": {"normal": {"discount_percent": 90}}}).encode()
        sha = hashlib.sha256(evil_layer).hexdigest()
        await raw_publish(broker, TOPICS.store_part("S001", sha), evil_layer)
        forged = dict(real, version=99, parts=[p for p in real["parts"] if p["name"] != "layer:store:S001"] + [
            {"name": "layer:store:S001", "sha256": sha, "size": len(evil_layer), "topic": TOPICS.store_part(
                "S001", sha), "encoding": "json"}])
        await raw_publish(broker, TOPICS.rules("S001"), json.dumps(forged).encode())
        st = await statuses(broker, "S001", lambda s: s.rules_rejection is not None)
        assert "bad signature" in st.rules_rejection and st.rules_version == 3
        assert gw.rules.current is running
        # signed by a key of the intruder's own
        mine = Ed25519PrivateKey.generate()
        await raw_publish(broker, TOPICS.rules("S001"), Manifest(sign(dict(forged), mine)).encode())
        st = await statuses(broker, "S001", lambda s: "does not trust" in (s.rules_rejection or ""))
        assert st.rules_version == 3 and gw.rules.current is running
        # unsigned: refused as malformed
        unsigned = {k: v for k, v in forged.items() if k not in ("sig", "key_id")}
        await raw_publish(broker, TOPICS.rules("S001"), json.dumps(unsigned).encode())
        st = await statuses(broker, "S001", lambda s: "malformed" in (s.rules_rejection or ""))
        assert gw.rules.current is running
        # a forged deny delta changes nothing either
        delta = {"version": 2, "issued_at": NOW, "entries": [{"card_no": GOLD_CARD, "status": "lost"}]}
        await raw_publish(broker, TOPICS.deny(), json.dumps(sign(delta, mine)).encode())
        st = await statuses(broker, "S001", lambda s: "deny delta refused" in (s.rules_rejection or ""))
        assert (await tap(gw, "04A1B2C3D4E5F6", "nfc")).verdict == "accept"


async def test_replayed_older_manifest_is_refused(tmp_path, broker, hq):
    await publish_all(hq)
    old = hq.catalog.manifest("S001")
    await hq.publish_stores(["S001"])
    async with Gateway(gw_config_for(tmp_path, broker, keys=[hq.public_key])) as gw:
        await until(lambda: gw.rules.current and gw.rules.current.version == 4)
        await raw_publish(broker, TOPICS.rules("S001"), old.encode())   # a captured, genuinely signed v3
        st = await statuses(broker, "S001", lambda s: s.rules_rejection is not None)
        assert "not newer than the running v4" in st.rules_rejection and gw.rules.current.version == 4


async def test_incomplete_rule_set_is_rejected_after_the_part_timeout(tmp_path, broker, hq):
    await publish_all(hq)
    async with Gateway(gw_config_for(tmp_path, broker, keys=[hq.public_key])) as gw:
        await until(lambda: gw.rules.current and gw.rules.current.version == 3)
        real = hq.catalog.manifest("S001").doc
        ghost = "ab" * 32
        doc = dict(real, version=4, parts=real["parts"] + [
            {"name": "layer:store:S001", "sha256": ghost, "size": 10, "topic": TOPICS.store_part("S001", ghost),
             "encoding": "json"}])
        await raw_publish(broker, TOPICS.rules("S001"), Manifest(hq.sign(doc)).encode())
        st = await statuses(broker, "S001", lambda s: s.rules_rejection is not None, timeout=15)
        assert "incomplete" in st.rules_rejection and st.rules_version == 3


async def test_deny_delta_end_to_end_under_a_second_in_every_store(tmp_path, broker, hq):
    await publish_all(hq)
    async with Gateway(gw_config_for(tmp_path, broker, keys=[hq.public_key])) as gw1, \
            Gateway(gw_config_for(tmp_path, broker, store="S003", region="west", keys=[hq.public_key])) as gw3:
        await until(lambda: gw1.rules.current and gw3.rules.current, what="rules in both stores")
        assert (await tap(gw1, SILVER_CARD)).verdict == "accept"
        t0 = time.monotonic()
        delta = await hq.card_action("deny", SILVER_CARD, "reported lost by phone")
        for gw in (gw1, gw3):
            while (await tap(gw, SILVER_CARD)).verdict != "deny":
                await asyncio.sleep(0.005)
                assert time.monotonic() - t0 < 1.0, "deny delta took a second or more"
        took = time.monotonic() - t0
        assert (await tap(gw3, SILVER_CARD)).reason == "lost" and took < 1.0
        assert gw1.rules.deny_version == delta.version == 2
        # unfreeze lifts, replace names the new card
        await hq.card_action("freeze", GOLD_CARD, "dispute")
        await until(lambda: gw1.rules.deny_version == 3)
        assert (await tap(gw1, GOLD_CARD, "magstripe")).reason == "frozen"
        await hq.card_action("unfreeze", GOLD_CARD, "resolved")
        await until(lambda: gw1.rules.deny_version == 4)
        assert (await tap(gw1, GOLD_CARD, "magstripe")).verdict == "accept"
        await hq.card_action("replace", GOLD_CARD, "worn out", new_card="880000000997")   # a card HQ has not issued
        await until(lambda: gw3.rules.deny_version == 5)
        assert (await tap(gw3, GOLD_CARD, "magstripe")).reason == "replaced"


async def test_gap_in_deny_deltas_triggers_a_resync(tmp_path, broker, hq):
    await publish_all(hq)
    bridge = Bridge(hq.mqtt_settings, hq.ledger, publisher=hq, resync_min_interval_s=0.5)
    task = asyncio.create_task(bridge.run())
    try:
        await asyncio.wait_for(bridge.connected.wait(), 10)
        cfg = gw_config_for(tmp_path, broker, keys=[hq.public_key])
        async with Gateway(cfg) as gw:
            await until(lambda: gw.rules.current and gw.rules.current.version == 3)
        # the store is closed for the night; HQ reports three cards meanwhile
        for card in (SILVER_CARD, GOLD_CARD, "880000000039"):
            await hq.card_action("deny", card, "lost")
        async with Gateway(cfg) as gw:
            assert gw.rules.current.version == 3 and gw.rules.deny_version == 1   # came up from disk
            # the retained latest delta is v4: v2 and v3 are missing -> resync -> new manifest + deny part
            await until(lambda: gw.rules.current.version == 4 and gw.rules.deny_version == 4, 15, "the resync")
            assert bridge.stats["resyncs"] == 1
            for card in (SILVER_CARD, GOLD_CARD):
                assert (await tap(gw, card, "magstripe")).reason == "lost"
    finally:
        task.cancel()


async def test_reboot_without_broker_runs_the_last_good_rules(tmp_path, broker, hq):
    await publish_all(hq)
    cfg = gw_config_for(tmp_path, broker, keys=[hq.public_key])
    async with Gateway(cfg) as gw:
        await until(lambda: gw.rules.current and gw.rules.current.version == 3)
        await hq.card_action("deny", SILVER_CARD, "lost")
        await until(lambda: gw.rules.deny_version == 2)
    broker.stop()
    async with Gateway(cfg) as gw:
        assert gw.rules.current.version == 3 and gw.rules.deny_version == 2
        assert (await tap(gw, "04A1B2C3D4E5F6", "nfc")).verdict == "accept"
        assert (await tap(gw, SILVER_CARD)).reason == "lost"
        assert not gw.uplink.state.connected
    broker.start()


async def test_key_rotation(tmp_path, broker, hq):
    await publish_all(hq)
    old_key = hq_keys.load_private(hq.key_path)
    async with Gateway(gw_config_for(tmp_path, broker, keys=[hq.public_key])) as gw:
        await until(lambda: gw.rules.current and gw.rules.current.version == 3)
        new_pub = hq_keys.rotate(hq.key_path)                     # announce
        await hq.publish_stores(["S001"])
        await until(lambda: gw.rules.current.version == 4)
        assert gw.rules.manifest.next_key == new_pub
        assert new_pub in json.loads((tmp_path / "gw-S001" / "rules" / "trust.json").read_text())["keys"]
        hq_keys.promote(hq.key_path)                               # sign with the new key
        await hq.publish_stores(["S001"])
        await until(lambda: gw.rules.current.version == 5)
        assert gw.rules.keyring.public_keys() == [new_pub]         # the old key is no longer trusted
        # something signed with the old key (stolen) is refused now
        doc = dict(hq.catalog.manifest("S001").doc, version=6)
        await raw_publish(broker, TOPICS.rules("S001"), Manifest(sign(doc, old_key)).encode())
        st = await statuses(broker, "S001", lambda s: s.rules_rejection is not None)
        assert "does not trust" in st.rules_rejection and gw.rules.current.version == 5


def test_key_files_are_owner_only_and_unsafe_ones_refused(tmp_path):
    import os
    import stat

    path = tmp_path / "k" / "hq.key"
    pub = hq_keys.generate(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(base64.b64decode(pub)) == 32
    with pytest.raises(hq_keys.KeyFileError, match="refusing to overwrite"):
        hq_keys.generate(path)
    os.chmod(path, 0o644)
    with pytest.raises(hq_keys.KeyFileError, match="lets others read it"):
        hq_keys.load_private(path)


def test_hq_cli_publish_card_fleet(tmp_path, broker):
    from tests.support import HQ, GatewayProc, wait_until

    hq = HQ(tmp_path, broker.port, stores={"S001": "east", "S002": "east"}).start()
    try:
        out = hq.cli("rules", "publish", str(RULES_FILE), "--all")
        assert out.returncode == 0, out.stderr
        assert "published rules v1 to store S001" in out.stdout and "to store S002" in out.stdout
        bad = tmp_path / "bad.toml"
        bad.write_text('layer = { level = "store", id = "S001" }\n[tiers.gold]\ndiscount_percent = 120\n')
        out = hq.cli("rules", "publish", str(bad), "--store", "S001")
        assert out.returncode == 2 and "refused" in out.stderr
        gw = GatewayProc(tmp_path, broker.port).start()
        try:
            wait_until(lambda: gw.status().get("rules_version") == 1, what="rules at the gateway")
            out = hq.cli("card", "deny", SILVER_CARD, "--reason", "lost on the bus")
            assert out.returncode == 0 and "deny delta v2" in out.stdout, out.stderr
            assert "lost on the bus" not in (gw.log() + out.stdout)      # the reason stays at HQ
            wait_until(lambda: gw.call("POST", "/lanes/1/taps", {"source": "qr", "raw": SILVER_CARD})[1]
                       .get("reason") == "lost", what="the card refused")
            wait_until(lambda: "online" in hq.cli("fleet", "--wait", "1").stdout, what="fleet")
            out = hq.cli("fleet", "--wait", "1.5")
            line = next(l for l in out.stdout.splitlines() if l.startswith("S001"))
            assert line.split()[:5] == ["S001", "online", "1", "1", "2"], out.stdout
            assert any(l.startswith("S002") and "never" in l for l in out.stdout.splitlines())
        finally:
            gw.stop()
    finally:
        hq.stop()


def test_hq_commands_with_the_broker_down_say_what_waits_and_the_bridge_sends_it(tmp_path, broker):
    from tests.support import HQ, GatewayProc, wait_until

    hq = HQ(tmp_path, broker.port).start()
    try:
        assert hq.cli("rules", "publish", str(RULES_FILE), "--all").returncode == 0
        gw = GatewayProc(tmp_path, broker.port).start()
        try:
            wait_until(lambda: gw.status().get("rules_version") == 1, what="rules at the gateway")
            broker.stop()
            out = hq.cli("fleet", "--wait", "0.5")                     # what HQ last received, and says so
            assert out.returncode == 0 and "broker unreachable" in out.stderr, out.stderr
            assert "what HQ last received" in out.stderr and out.stdout.splitlines()[1].startswith("S001")
            out = hq.cli("members", "show", SILVER_CARD)                # stores nothing: nothing waits either
            assert "queued" not in out.stderr
            out = hq.cli("card", "deny", SILVER_CARD, "--reason", "lost on the bus")
            assert out.returncode == 75, out.stderr
            assert "queued, not sent yet" in out.stderr and "deny list's latest change" in out.stderr
            out = hq.cli("rules", "republish", "--all")
            assert out.returncode == 75 and "the rule set of store S001" in out.stderr, out.stderr
            assert gw.call("POST", "/lanes/1/taps", {"source": "qr", "raw": SILVER_CARD})[1].get("reason") != "lost"
            broker.start()
            wait_until(lambda: gw.call("POST", "/lanes/1/taps", {"source": "qr", "raw": SILVER_CARD})[1]
                       .get("reason") == "lost", timeout=60, what="the queued deny at the store")
            wait_until(lambda: gw.status().get("rules_version") == 3, timeout=60, what="the queued rule set")   # v2 never went out: built again
            wait_until(lambda: "outbox: sent" in hq.log(), what="the bridge's log")
            catalog = Catalog(hq.db, tmp_path / "hq" / "parts")
            try:
                assert catalog.queued() == []
            finally:
                catalog.close()
        finally:
            gw.stop()
    finally:
        hq.stop()


async def test_hq_refuses_a_contradictory_layer_and_keeps_the_current_one(tmp_path, broker, hq):
    from wire.ruleset import RulesetError

    await publish_all(hq)
    before = hq.catalog.layer("store:S001")
    sneaky = dict(S001, redemption={"points_per_yuan": 1})
    (tmp_path / "sneaky.json").write_text(json.dumps(sneaky))
    with pytest.raises(RulesetError, match="locked by the chain layer"):
        await hq.publish_layer(tmp_path / "sneaky.json", store="S001")
    assert hq.catalog.layer("store:S001") == before and hq.catalog.manifest("S001").version == 3
    wrong = dict(S001, layer={"level": "store", "id": "S002"})
    (tmp_path / "wrong.json").write_text(json.dumps(wrong))
    with pytest.raises(RulesetError, match="does not match the scope"):
        await hq.publish_layer(tmp_path / "wrong.json", store="S001")


async def test_a_card_reported_lost_at_one_counter_is_refused_in_every_store(tmp_path, broker, hq):
    """Store S001's service desk reports a card lost while S003 is online:
    S001 refuses it at once; HQ commits the record, acks it and broadcasts a
    signed deny delta, so S003 refuses it too. An unfreeze at a counter is
    recorded at HQ but lifts nothing (HQ decides)."""
    await publish_all(hq)
    bridge = Bridge({"host": "127.0.0.1", "port": broker.port}, hq.ledger, publisher=hq,
                    client_id="storegate-hq-test")
    bridge_task = asyncio.create_task(bridge.run())
    try:
        async with Gateway(gw_config_for(tmp_path, broker, keys=[hq.public_key])) as gw1, \
                Gateway(gw_config_for(tmp_path, broker, store="S003", region="west", keys=[hq.public_key])) as gw3:
            await until(lambda: gw1.rules.current and gw3.rules.current, what="rules in both stores")
            assert (await tap(gw3, SILVER_CARD)).verdict == "accept"
            before = gw3.rules.deny_version
            await gw1.counter.card_service({"idempotency_key": "desk-lost-0001", "kind": "report_lost",
                                            "card_no": SILVER_CARD, "reason": "member phoned the desk"})
            assert (await tap(gw1, SILVER_CARD)).reason == "lost"          # here: at once
            await until(lambda: gw3.rules.deny_version == before + 1, timeout=15, what="the deny delta in S003")
            assert (await tap(gw3, SILVER_CARD)).reason == "lost"          # elsewhere: via HQ
            assert bridge.stats["card_broadcasts"] == 1

            await gw1.counter.card_service({"idempotency_key": "desk-unfr-0001", "kind": "unfreeze",
                                            "card_no": GOLD_CARD})
            await until(lambda: any(json.loads(b).get("op") == "unfreeze" for *_x, b in _ledger_rows(hq)),
                        timeout=15, what="the unfreeze record at HQ")
            assert gw3.rules.deny_version == before + 1 and bridge.stats["card_broadcasts"] == 1
    finally:
        bridge_task.cancel()
        await asyncio.gather(bridge_task, return_exceptions=True)


def _ledger_rows(hq):
    import sqlite3

    with sqlite3.connect(hq.ledger.path) as conn:
        return conn.execute("SELECT seq, tx_id, type, body FROM transactions WHERE type='card_op'").fetchall()
