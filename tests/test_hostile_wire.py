"""Hostile input on every MQTT topic the gateway and the HQ bridge read:
zlib bombs, forged and oversized acks, records that cannot be sent, garbage
and forged batches, a counter replace onto a denied card. Each attack is
made first (on a real mosquitto where the broker matters), then the test
asserts nothing was lost, nothing was freed that HQ did not commit, memory
stayed bounded and the service kept serving."""

from __future__ import annotations

import asyncio
import json
import struct
import time
import zlib
from pathlib import Path

import aiomqtt
import orjson
import pytest

from gateway.store.rules import RulesStore
from gateway.shell.service import Gateway
from gateway.store.journal import (UNSENDABLE_DIR, Journal, JournalIndex, RecordRefused, UnreadableRecord,
                                   encode_frame, read_segment, scan_frames)
from gateway.shell.uplink import Uplink, UplinkSettings
from hq_bridge.bridge import Bridge
from hq_bridge.ledger import Ledger
from hq_bridge.rules import card_entries
from tests.pg import hq_db_url, pg_server  # noqa: F401  (fixtures)
from tests.support import zlib_bomb
from tests.test_rules_distribution import (GOLD_CARD, LOST_CARD, SILVER_CARD, gw_config_for, hq,  # noqa: F401
                                           publish_all, tap, until)
from wire.messages import (ENVELOPE, MAX_ACK_RANGES, MAX_BODY_DEPTH, MAX_BYTES, SEQ_MAX, Ack, DenyDelta, Manifest,
                           ResyncRequest, Status, TxBatch, TxRecord, WireError, compress, decode_layer, encode_table,
                           iter_table)
from wire.topics import Topics

TOPICS = Topics()
BOMB_INFLATED = 256 << 20


@pytest.fixture(scope="module")
def bomb() -> bytes:
    """~260 KB of zlib that inflates to 256 MB."""
    return zlib_bomb(BOMB_INFLATED)


def lying_envelope(bomb: bytes, declared: int = 100) -> bytes:
    """The envelope, declaring a small size, around a bomb."""
    return struct.pack(">4sI", ENVELOPE, declared) + bomb


def nested(depth: int) -> dict:
    body: dict = {}
    for _ in range(depth - 1):
        body = {"a": body}
    return body


class PeakRss:
    """How far this process's resident memory rose at its peak (Linux
    /proc: clear_refs resets the peak, VmHWM reads it)."""

    def __enter__(self) -> "PeakRss":
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pytest.skip("cannot reset the peak RSS here (/proc/self/clear_refs)")
        self.base = self._kb("VmRSS")
        return self

    def __exit__(self, *exc) -> None:
        pass

    @staticmethod
    def _kb(key: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
        raise KeyError(key)

    @property
    def growth_mb(self) -> float:
        return (self._kb("VmHWM") - self.base) / 1024


async def publish(broker, topic: str, payload: bytes, retain: bool = False) -> None:
    async with aiomqtt.Client("127.0.0.1", broker.port, identifier=f"intruder-{time.monotonic_ns()}") as c:
        await c.publish(topic, payload, qos=1, retain=retain)


def rec(seq: int, body=None, type_: str = "sale") -> TxRecord:
    return TxRecord(seq, f"id-{seq:08d}", type_, 1_790_000_000_000 + seq, body if body is not None else {"n": seq})


# -- 1. zlib bombs and oversized payloads: bounded before anything is parsed ----------

DECODERS = {"tx batch": TxBatch.decode, "ack": Ack.decode, "status": Status.decode,
            "rule-set manifest": Manifest.decode, "deny delta": DenyDelta.decode,
            "resync request": ResyncRequest.decode}


@pytest.mark.parametrize("kind", list(DECODERS))
def test_every_message_kind_refuses_bombs_without_inflating_them(kind, bomb):
    decode = DECODERS[kind]
    cap = MAX_BYTES[kind]
    with PeakRss() as rss:
        t0 = time.monotonic()
        for payload, words in [
            (bomb, "inflates to more than"),                                 # bare zlib, as before the envelope
            (lying_envelope(bomb), "inflates to more than 100 bytes"),     # declares little, inflates a lot
            (lying_envelope(bomb, cap + 1), "more than the"),              # declares too much: not inflated at all
            (struct.pack(">4sI", ENVELOPE, 10) + zlib.compress(b"{}"), "inflates to 2 bytes, not the 10"),
            (b" " * (cap + 1), "more than the"),                             # plain, too big to parse
            (b"SGZ1\x00", "truncated"),
        ]:
            with pytest.raises(WireError, match=words):
                decode(payload)
    assert rss.growth_mb < 2 * cap / (1 << 20) + 24, f"{kind}: memory rose {rss.growth_mb:.0f} MB"
    assert time.monotonic() - t0 < 2


def test_envelope_round_trip_and_legacy_bare_zlib():
    records = [rec(i, {"pad": "收银" * 50}) for i in range(1, 40)]
    payload = TxBatch("S001", records).encode()
    assert payload[:4] == ENVELOPE and struct.unpack(">I", payload[4:8])[0] > len(payload)
    assert TxBatch.decode(payload).records == records
    raw = orjson.dumps({"store": "S001", "records": [r.to_dict() for r in records]})
    assert TxBatch.decode(zlib.compress(raw)).records == records       # an older gateway's batch
    assert TxBatch.decode(compress(raw)).records == records


def test_table_parts_and_layers_are_bounded(bomb):
    # a table part of one endless line: refused at the row cap, memory flat
    with PeakRss() as rss:
        with pytest.raises(WireError, match="longer than"):
            list(iter_table([bomb], "members"))
        with pytest.raises(WireError, match="inflates to more than"):
            list(iter_table([zlib.compress(b"\n" * (3 << 20))], "deny", max_bytes=1 << 20))
    assert rss.growth_mb < 16
    rows = [{"card_no": f"88{i:010d}", "member_id": f"M{i}", "tier": "gold"} for i in range(1000)]
    assert list(iter_table([encode_table(rows)], "members")) == rows
    with pytest.raises(WireError, match="inflates to more than"):
        decode_layer(bomb, "layer:chain")
    # a manifest may not announce a layer part bigger than a layer may be
    doc = {"store": "S001", "version": 1, "issued_at": 0, "max_age_s": 600, "scope": {"store": "S001", "region": None},
           "parts": [{"name": "layer:chain", "sha256": "0" * 64, "size": 17 << 20, "topic": "t", "encoding": "json"}],
           "members": None, "deny_version": 0, "next_key": None, "key_id": "0" * 16, "sig": "x" * 8}
    with pytest.raises(WireError, match="more than the .* a layer may hold"):
        Manifest.decode(orjson.dumps(doc))


async def test_bombs_on_the_gateways_topics_leave_it_serving(tmp_path, broker, bomb):
    """The attack: ~260 KB on the ack, rules and deny topics once took a
    gateway to ~1 GB. Now each is refused at its cap, and the gateway goes on
    journaling and answering taps."""
    cfg = gw_config_for(tmp_path, broker)
    async with Gateway(cfg) as gw:
        await until(lambda: gw.uplink.state.connected, what="the uplink")
        with PeakRss() as rss:
            for payload in (bomb, lying_envelope(bomb)):
                await publish(broker, TOPICS.ack("S001"), payload)
                await publish(broker, TOPICS.rules("S001"), payload, retain=True)
                await publish(broker, TOPICS.deny(), payload, retain=True)
            await until(lambda: gw.uplink.state.rejected_acks == 2, what="both ack bombs refused")
            await until(lambda: gw.rules.counters["rejected"] >= 4, what="the rules and deny bombs refused")
            assert (await gw.journal.append("sale", {"total": 100})).seq == 1
            assert (await tap(gw, GOLD_CARD, "magstripe")).verdict in ("deny", "retry")   # answered (no rules yet)
        assert rss.growth_mb < 64, f"memory rose {rss.growth_mb:.0f} MB"
        assert "inflates to more than" in (gw.rules.last_rejection or "")
        assert gw.uplink.state.connected and (await gw.journal.backlog())["depth"] == 1


# -- 2. acks: only what this connection sent and is in flight ------------------------

def test_journal_index_ack_is_bounded_and_never_moves_the_next_seq():
    idx = JournalIndex()
    for seq in (1, 2, 3):
        idx.on_record({"seq": seq, "ts": 0}, 1, seq * 10, 10)
    t0 = time.monotonic()
    assert idx.on_ack([[5, 2 ** 64 - 1]]) == 0                   # an older version's forged ack frame, replayed
    assert idx.on_ack([[2, 20_000_000], [1, 1]]) == 3
    assert time.monotonic() - t0 < 0.05
    assert idx.next_seq == 4


async def test_forged_acks_free_nothing_and_never_move_the_seq(tmp_path, broker):
    """The attacks: an ack for records never sent freed them; seq 2^64-1 made
    every later sale fail and the journal unopenable; [[1, 20000000]] (39
    bytes) stalled the gateway 6 s and took 1.6 GB; acks for seqs never
    journaled made the next sale seq 1,000,001."""
    cfg = gw_config_for(tmp_path, broker, batch_max=5, window=1, resend_after_s=60)
    journal_dir = Path(cfg["store"]["data_dir"]) / "journal"
    ack_topic = TOPICS.ack("S001")
    async with Gateway(cfg) as gw:
        for i in range(20):
            await gw.journal.append("sale", {"i": i})
        await until(lambda: gw.uplink.state.sent_batches >= 1, what="the first batch (seqs 1-5) in flight")
        forged = [
            Ack("S001", [[6, 20_000_000]]).encode(),                       # pending but never sent, and beyond
            Ack("S001", [[21, 1_000_000]]).encode(),                       # never journaled
            b'{"store": "S001", "acked": [[18446744073709551615, 18446744073709551615]]}',
            Ack("S001", [[k * 10 ** 12, k * 10 ** 12 + 10 ** 12 - 1] for k in range(1, MAX_ACK_RANGES + 1)]).encode(),
            orjson.dumps({"store": "S001", "acked": [[k, k] for k in range(6, 8 + 2 * MAX_ACK_RANGES, 2)]}),  # too many
            Ack("S002", [[1, 5]]).encode(),                                # another store's, on our topic
            b"\x00\xffnot an ack",
        ]
        t0 = time.monotonic()
        for payload in forged:
            await publish(broker, ack_topic, payload)
        await until(lambda: gw.uplink.state.rejected_acks == len(forged), what="every forged ack ignored")
        assert time.monotonic() - t0 < 5
        assert sorted(gw.journal.index.pending) == list(range(1, 21))  # nothing freed
        assert (await gw.journal.append("sale", {"i": 20})).seq == 21   # the next seq did not move
        assert gw.uplink.state.acked_records == 0
        assert any("ignored 7 ack(s)" in f for f in gw.uplink.state.faults), gw.uplink.state.faults
        # an ack for what is in flight still frees it; HQ then takes the rest
        bridge = Bridge({"host": "127.0.0.1", "port": broker.port}, Ledger(tmp_path / "hq" / "ledger.sqlite3"))
        task = asyncio.create_task(bridge.run())
        try:
            await asyncio.wait_for(bridge.connected.wait(), 10)
            await publish(broker, ack_topic, Ack("S001", [[1, 5]]).encode())
            await until(lambda: gw.uplink.state.acked_records >= 5, what="the ack of what was in flight")
            await until(lambda: not gw.journal.index.pending, timeout=20, what="the backlog delivered")
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        assert gw.uplink.state.rejected_acks == len(forged) and bridge.ledger.counts()["transactions"] == 16
        bridge.ledger.close()
    # the ack frames on disk hold only ranges of records this journal wrote
    for path in journal_dir.glob("*.log"):
        for _o, _l, frame in scan_frames(read_segment(path)):
            if frame.get("k") == "a":
                assert all(1 <= lo <= hi <= 21 for lo, hi in frame["r"]), frame
    async with Journal(journal_dir) as j:                               # opens, and counts on from 22
        assert (await j.append("sale", {})).seq == 22


# -- 3. a record that cannot be sent never stops delivery ------------------------------

async def test_journal_refuses_what_could_not_be_delivered(tmp_path):
    async with Journal(tmp_path / "j") as j:
        for body, words in [
            (nested(252), "nested deeper"),      # the original attack: fsync'd, then no batch could hold it
            (nested(300), "nested deeper"),      # deeper than orjson encodes at all
            (nested(MAX_BODY_DEPTH + 1), "nested deeper"),
            ({"big": "x" * (2 << 20)}, "more than the"),
            ({"n": 2 ** 64}, "not JSON"),
            ({"s": {1, 2}}, "not JSON"),
            ([1, 2], "JSON object body"),
        ]:
            with pytest.raises(RecordRefused, match=words):
                await j.append("sale", body, idempotency_key="k-00000001", request={"x": 1})
        with pytest.raises(RecordRefused, match="type"):
            await j.append("Sale Type", {})
        assert not j.index.pending and not j.index.idempotency
        first = await j.append("sale", nested(MAX_BODY_DEPTH), idempotency_key="k-00000001", request={"x": 1})
        assert first.seq == 1 and not first.duplicate                  # no sequence number was consumed


def write_journal(directory: Path, frames: list[dict]) -> None:
    """A journal segment as an older version (or a bug) could have left it."""
    directory.mkdir(parents=True, exist_ok=True)
    data = encode_frame({"k": "h", "next": 1}) + b"".join(encode_frame(f) for f in frames)
    (directory / "00000001.log").write_bytes(data)


def record_frame(seq: int, body, type_: str = "sale") -> dict:
    return {"k": "r", "seq": seq, "id": f"rec-{seq:08d}", "type": type_, "ts": 1_790_000_000_000 + seq, "body": body}


async def test_uplink_sets_aside_what_cannot_be_sent(tmp_path):
    """Without a broker: the batch the uplink builds from a journal holding
    records that cannot go as they are, one that cannot be read, and too many
    bytes for one batch."""
    directory = tmp_path / "j"
    big = {"pad": "y" * (900 << 10)}
    write_journal(directory, [record_frame(1, {"ok": 1}), record_frame(2, nested(252)),
                              record_frame(3, {"ok": 3}, type_="Not A Type"), record_frame(4, {"ok": 4})]
                  + [record_frame(s, big) for s in range(5, 30)])
    async with Journal(directory) as j:
        # damage record 4 on disk after the journal checked it at open
        seg = directory / "00000001.log"
        data = bytearray(seg.read_bytes())
        at = data.index(b"rec-00000004")
        data[at:at + 3] = b"\xff\xfe\xfd"  # no longer the bytes the checksum covers
        seg.write_bytes(bytes(data))
        records = await j.pending(0, 100)
        assert isinstance(records[3], UnreadableRecord) and "unreadable" in records[3].error
        uplink = Uplink({"host": "127.0.0.1"}, "S001", j, RulesStore(tmp_path / "rules", "S001"), None,
                        UplinkSettings())
        sent, payload = await uplink._batch(records)
        assert len(payload) <= MAX_BYTES["tx batch"] and 5 < len(sent) < len(records)   # cut at the size cap
        batch = TxBatch.decode(payload)
        assert [r.type for r in batch.records[:4]] == ["sale", "unsendable", "unsendable", "unsendable"]
        assert batch.records[1].body == {"type": "sale", "error": "record 2: body nested deeper than 32 levels"}
        assert batch.records[1].id == "rec-00000002" and batch.records[1].ts == 1_790_000_000_002
        assert "unreadable" in batch.records[3].body["error"] and batch.records[3].id == "unsendable-4"
        kept = sorted(p.name for p in (directory / UNSENDABLE_DIR).iterdir())
        assert kept == ["000000000002.frame", "000000000003.frame", "000000000004.frame"]
        assert b"rec-00000002" in (directory / UNSENDABLE_DIR / kept[0]).read_bytes()   # the original, as it was
        assert j.faults == [f"3 journaled record(s) could not be sent to HQ and are kept in "
                            f"{directory / UNSENDABLE_DIR} (HQ holds a placeholder for each); last: seq 4: "
                            f"unreadable in journal segment 1 at offset {j.index.pending[4][1]}"]
        await uplink._batch(records)                                     # built again (a resend): no new copies
        assert len(list((directory / UNSENDABLE_DIR).iterdir())) == 3 and len(j.faults) == 1
    async with Journal(directory) as j:                                  # still reported after a restart
        assert any(f.startswith("3 journaled record(s) could not be sent") for f in j.faults)


async def test_poison_record_is_set_aside_and_later_records_reach_hq(tmp_path, broker, hq_db_url):
    """The attack: a record nested 252 deep was fsync'd, no batch holding it
    could be encoded, and nothing after it reached HQ, ever, while status said
    online with no fault."""
    cfg = gw_config_for(tmp_path, broker, batch_max=2)
    write_journal(Path(cfg["store"]["data_dir"]) / "journal",
                  [record_frame(1, {"ok": 1}), record_frame(2, nested(252)),
                   record_frame(3, {"ok": 3}, type_="Bad Type"), record_frame(4, {"ok": 4})])
    ledger = Ledger(hq_db_url)
    bridge = Bridge({"host": "127.0.0.1", "port": broker.port}, ledger)
    task = asyncio.create_task(bridge.run())
    try:
        await asyncio.wait_for(bridge.connected.wait(), 10)
        async with Gateway(cfg) as gw:
            later = await gw.journal.append("sale", {"ok": 5})
            await until(lambda: not gw.journal.index.pending, timeout=20, what="everything delivered")
            rows = ledger._conn.execute("SELECT seq, tx_id, type FROM transactions ORDER BY seq").fetchall()
            assert rows == [(1, "rec-00000001", "sale"), (2, "rec-00000002", "unsendable"),
                            (3, "rec-00000003", "unsendable"), (4, "rec-00000004", "sale"), (5, later.id, "sale")]
            held = ledger.unsendable("S001")
            assert [(s, t, o) for _st, s, t, o, _ts, _e in held] == [(2, "rec-00000002", "sale"),
                                                                     (3, "rec-00000003", "Bad Type")]
            assert "nested deeper than 32 levels" in held[0][5]
            assert bridge.stats["unsendable"] == 2
            fault = next(f for f in gw.faults() if "could not be sent to HQ" in f)
            assert fault.startswith("2 journaled record(s)")

            def reported():                                              # and on the status topic, at HQ
                row = ledger._conn.execute("SELECT status FROM stores WHERE store='S001'").fetchone()
                return row and any("could not be sent" in f for f in json.loads(row[0]).get("faults", []))
            await until(reported, what="the fault on the status topic")
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        ledger.close()


# -- 4. the HQ bridge: garbage, bombs and forgeries on every topic it reads ----------------

async def test_hq_bridge_survives_garbage_bombs_and_forged_batches(tmp_path, broker, bomb, hq_db_url):
    """The attack: the same 300 KB bomb on a store's tx topic took the bridge
    from 45 MB to 660 MB. Now that and every other bad payload on tx, status
    and resync is refused and counted, and the next good batch is committed
    and acked."""
    ledger = Ledger(hq_db_url)
    bridge = Bridge({"host": "127.0.0.1", "port": broker.port}, ledger)
    task = asyncio.create_task(bridge.run())
    tx = TOPICS.tx("S001")

    def batch_json(records: list[dict], store: str = "S001") -> bytes:
        return orjson.dumps({"store": store, "records": records})

    good = {"seq": 1, "id": "id-00000001", "type": "sale", "ts": 1, "body": {}}
    deep = (b'{"store": "S001", "records": [{"seq": 1, "id": "id-00000001", "type": "sale", "ts": 1, "body": '
            + b'{"a": ' * 300 + b"{}" + b"}" * 300 + b"}]}")
    bad_tx = [
        bomb, lying_envelope(bomb), b"", b"\x00\xff\xfe", b"[]", b'{"store": "S001"}', b"{" * 100_000,
        batch_json([{**good, "seq": 0}]),
        batch_json([good]).replace(b'"seq":1', b'"seq":18446744073709551616'),
        batch_json([{**good, "seq": SEQ_MAX + 1}]),
        batch_json([{**good, "ts": -1}]),
        batch_json([{**good, "type": "DROP TABLE"}]),
        batch_json([{**good, "body": "not an object"}]),
        batch_json([{**good, "extra": 1}]),
        batch_json([good] * 5001),
        batch_json([good], store="S002"),                              # another store's batch on S001's topic
        deep,
    ]
    try:
        await asyncio.wait_for(bridge.connected.wait(), 10)
        async with aiomqtt.Client("127.0.0.1", broker.port, identifier="store-S001") as c:
            await c.subscribe(TOPICS.ack("S001"), qos=1)
            with PeakRss() as rss:
                for payload in bad_tx:
                    await c.publish(tx, payload, qos=1)
                for payload in (bomb, b"{}", b"garbage", Status("S002", "online", 1).encode()):
                    await c.publish(TOPICS.status("S001"), payload, qos=1)
                    await c.publish(TOPICS.resync("S001"), payload, qos=1)
                await until(lambda: bridge.stats["rejected"] == len(bad_tx), what="every bad batch refused")
                await until(lambda: bridge.stats["bad_messages"] == 8, what="bad status and resync refused")
            assert rss.growth_mb < 64, f"memory rose {rss.growth_mb:.0f} MB"
            assert ledger.counts()["transactions"] == 0
            # a database fault while handling one message does not end the loop
            real, calls = ledger.commit, []
            ledger.commit = lambda batch: calls.append(1) or (_ for _ in ()).throw(RuntimeError("disk on fire"))
            await c.publish(tx, TxBatch("S001", [rec(1)]).encode(), qos=1)
            await until(lambda: bridge.stats["errors"] == 1, what="the fault logged")
            ledger.commit = real
            # a compressed status is stored (checked, re-encoded)
            await c.publish(TOPICS.status("S001"), compress(Status("S001", "online", 7).encode()), qos=1)
            # and the next good batch (with a placeholder) is committed and acked
            placeholder = TxRecord(2, "id-00000002", "unsendable", 2, {"type": "sale", "error": "too deep"})
            await c.publish(tx, TxBatch("S001", [rec(1), placeholder]).encode(), qos=1)
            async with asyncio.timeout(10):
                async for m in c.messages:
                    assert Ack.decode(m.payload).acked == [[1, 2]]
                    break
        assert not task.done()
        assert ledger.counts() == {"transactions": 2, "conflicts": 0}
        assert [r[1] for r in ledger.unsendable("S001")] == [2]
        row = ledger._conn.execute("SELECT status FROM stores WHERE store='S001'").fetchone()
        assert json.loads(row[0])["ts"] == 7
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        ledger.close()


def test_hq_acks_many_ranges_in_several_acks():
    seqs = range(1, 2 * (2 * MAX_ACK_RANGES + 10), 2)                 # every other seq: one range each
    acks = Ack.for_seqs("S001", seqs)
    assert [len(a.acked) for a in acks] == [MAX_ACK_RANGES, MAX_ACK_RANGES, 10]
    for a in acks:
        assert Ack.decode(a.encode()) == a and len(a.encode()) <= MAX_BYTES["ack"]
    worst = Ack("S001", [[SEQ_MAX, SEQ_MAX]] * MAX_ACK_RANGES).encode()
    assert len(worst) <= MAX_BYTES["ack"]


def test_a_counter_replace_never_activates_the_new_card():
    assert card_entries("replace", GOLD_CARD, new_card=LOST_CARD, today="2026-01-01", activate_new=False) == [
        {"card_no": GOLD_CARD, "status": "replaced", "since": "2026-01-01", "replaced_by": LOST_CARD}]
    assert card_entries("replace", GOLD_CARD, new_card=LOST_CARD, today="2026-01-01")[-1] == {
        "card_no": LOST_CARD, "status": "active"}                        # HQ's own command may


async def test_counter_replace_onto_a_denied_card_does_not_lift_the_deny(tmp_path, broker, hq):  # noqa: F811
    """The attack: a service desk 'replaces' a member's card with a number HQ
    lists as lost; HQ broadcast the new number as active and every store
    accepted the lost card again."""
    await publish_all(hq)
    bridge = Bridge({"host": "127.0.0.1", "port": broker.port}, hq.ledger, publisher=hq, client_id="hq-hostile")
    task = asyncio.create_task(bridge.run())
    try:
        await asyncio.wait_for(bridge.connected.wait(), 10)
        async with Gateway(gw_config_for(tmp_path, broker, keys=[hq.public_key])) as gw1, \
                Gateway(gw_config_for(tmp_path, broker, store="S003", region="west", keys=[hq.public_key])) as gw3:
            await until(lambda: gw1.rules.current and gw3.rules.current, what="rules in both stores")
            assert (await tap(gw3, LOST_CARD)).reason == "lost"
            before = gw3.rules.deny_version
            await gw1.counter.card_service({"idempotency_key": "desk-repl-0001", "kind": "replace",
                                            "card_no": SILVER_CARD, "new_card_no": LOST_CARD})
            await until(lambda: gw3.rules.deny_version == before + 1, timeout=15, what="the replace's delta")
            assert (await tap(gw3, SILVER_CARD)).reason == "replaced"
            assert (await tap(gw3, LOST_CARD)).reason == "lost"          # still refused everywhere
            assert hq.catalog.deny_status(LOST_CARD) == "lost"
            assert [e["card_no"] for e in hq.catalog.latest_delta().entries] == [SILVER_CARD]
            assert bridge.stats["card_reviews"] == 1
            # the review is recorded right after the delta goes out: wait for it
            await until(lambda: hq.ledger.card_services(review_only=True), timeout=15, what="the review recorded")
            (row,) = hq.ledger.card_services(review_only=True)
            assert row[:5] == ("S001", row[1], "replace", SILVER_CARD, LOST_CARD) and "stays denied" in row[5]
            # an ordinary counter report is recorded too, with what HQ did
            await gw1.counter.card_service({"idempotency_key": "desk-lost-0001", "kind": "report_lost",
                                            "card_no": GOLD_CARD})
            await until(lambda: len(hq.ledger.card_services()) == 2, timeout=15, what="the report recorded")
            assert hq.ledger.card_services()[-1][5].startswith("broadcast as deny delta v")
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
