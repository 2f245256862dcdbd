"""Uplink to HQ over MQTT: store-and-forward of journal records, acks, rules.

- Records go out in sequence order as batches on ``{prefix}/stores/{store}/tx``
  (QoS 1), with up to ``window`` batches awaiting HQ's ack at a time.
- Only HQ's application-level ack on ``.../ack`` (committed in HQ's database)
  frees a record; a broker PUBACK frees nothing. A batch not acked within
  ``resend_after_s``, and everything unacked after a reconnect, is sent again;
  HQ applies each record once and acks duplicates again.
- An ack frees only records this connection sent and has not had acked; any
  other part of it (seqs never sent, never journaled; malformed; another
  store's) is ignored, logged and counted (``state.rejected_acks``, a fault).
  The work per ack is bounded by its ranges, never by the seqs they span.
- An ack carries HQ's time at the commit (``hq_time_ms``, optional: older
  HQs send none). From an ack that was not ignored it goes to
  ``on_hq_time`` (the clock watch, gateway/shell/clock_watch.py) with the
  batch's round trip (since the acked records were first sent, when known).
- A record that cannot be sent as it is (not encodable, nested too deep, too
  big, refused by the record schema, unreadable) never stops delivery: the
  journal keeps a copy aside and reports it, HQ gets a placeholder record of
  type ``unsendable`` in its place (wire.messages.unsendable_record), and the
  rest goes on.
- Reconnects with exponential backoff and full jitter.
- Publishes a retained status message, with a retained "offline" last will.
- Rules from HQ (signed manifest, parts, deny deltas, resync): gateway.shell.rules_sync.
- Live account look-ups on a tap (QoS 0 query/reply, bounded wait):
  gateway.shell.live_accounts; this session carries them while connected.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Awaitable, Callable

import aiomqtt

from common import mqtt
from gateway.shell.live_accounts import LiveAccounts
from gateway.store.rules import RulesStore
from gateway.shell.rules_sync import RulesSync
from gateway.store.journal import Journal, JournalError, UnreadableRecord
from wire.messages import (MAX_BATCH_RECORDS, MAX_BYTES, Ack, Status, TxBatch, TxRecord, WireError,
                           intersect_ranges, normal_ranges, ranges_text, seqs_to_ranges, subtract_ranges,
                           unsendable_record)
from wire.topics import Topics

log = logging.getLogger("storegate.uplink")

# An ignored ack stays a fault on status until acks have been right for this
# long (an ack for a batch of the previous process, after a restart, is one).
ACK_FAULT_CLEARS_S = 600.0

BATCH_BUDGET = MAX_BYTES["tx batch"] - 4096  # the records of a batch; the rest is its frame


@dataclass
class UplinkSettings:
    batch_max: int = 1000
    window: int = 8
    resend_after_s: float = 10.0
    status_interval_s: float = 10.0
    part_timeout_s: float = 60.0
    live_lookup_ms: int = 300   # a tap waits at most this long for HQ's live account (0: never ask)


@dataclass
class UplinkState:
    connected: bool = False
    last_hq_contact: float | None = None  # wall clock of the last ack or rule set
    sent_batches: int = 0
    acked_records: int = 0
    reconnects: int = 0
    rejected_acks: int = 0  # acks ignored: malformed, another store's, or naming records not in flight
    faults: list = field(default_factory=list)


class InFlight:
    """What this gateway published since it started and HQ has not acked
    yet: the seq ranges (an ack frees records only within them; kept across
    reconnects, since HQ may commit a batch and ack it after the link came
    back) and, per batch of this connection, when it was sent (the window
    and the resend timer)."""

    def __init__(self) -> None:
        self.ranges: list[list[int]] = []
        self.batches: dict[int, float] = {}  # last seq of a batch -> when sent
        self.first_sent: dict[int, float] = {}  # last seq of a batch -> when first sent (kept across resends)

    def sent(self, records: list[TxRecord], now: float) -> None:
        self.ranges = normal_ranges(self.ranges + seqs_to_ranges(r.seq for r in records))
        self.batches[records[-1].seq] = now
        self.first_sent.setdefault(records[-1].seq, now)

    def sent_at(self, ranges: list[list[int]]) -> float | None:
        """When the earliest batch these (normal) ranges ack was first sent
        (None: none of them in flight): HQ committed it after that."""
        times = [t for last, t in self.first_sent.items() if intersect_ranges([[last, last]], ranges)]
        return min(times) if times else None

    def acked(self, ranges: list[list[int]]) -> list[list[int]]:
        """The part of these (normal) ranges that was in flight; it is not any more."""
        hits = intersect_ranges(ranges, self.ranges)
        if hits:
            self.ranges = subtract_ranges(self.ranges, hits)
            for last in [s for s in self.batches if intersect_ranges([[s, s]], hits)]:
                del self.batches[last]
            for last in [s for s in self.first_sent if not intersect_ranges([[s, s]], self.ranges)]:
                del self.first_sent[last]
        return hits


class Uplink:
    def __init__(self, mqtt_settings: dict, store: str, journal: Journal, rules: RulesStore,
                 status: Callable[[str], Awaitable[Status]], settings: UplinkSettings | None = None,
                 on_connection_change: Callable[[bool], None] | None = None) -> None:
        self.mqtt_settings = mqtt_settings
        self.store = store
        self.journal = journal
        self.rules = rules
        self.status = status
        self.settings = settings or UplinkSettings()
        self.topics = Topics(mqtt_settings.get("prefix", "sg/v1"))
        self.state = UplinkState()
        self.on_connection_change = on_connection_change
        self.on_hq_time: Callable[[int, float | None], None] | None = None   # HQ's time in an ack, round trip
        self._wake = asyncio.Event()
        self._stopping = False
        journal.on_append = self._wake.set
        self._client: aiomqtt.Client | None = None
        self._inflight = InFlight()
        self._last_ignored_ack = 0.0
        self.sync = RulesSync(rules, self.topics, store, part_timeout_s=self.settings.part_timeout_s,
                              on_change=self._publish_status_now)
        self.live = LiveAccounts(store, self.topics, budget_s=self.settings.live_lookup_ms / 1000)

    async def run(self) -> None:
        """Stay connected until cancelled."""
        backoff = mqtt.Backoff()
        offline = Status(self.store, "offline", int(time.time()))
        will = aiomqtt.Will(self.topics.status(self.store), offline.encode(), qos=1, retain=True)
        worker = asyncio.create_task(self.sync.run(), name="rules-sync")
        try:
            await self._run(will, backoff)
        finally:
            worker.cancel()

    async def _run(self, will: aiomqtt.Will, backoff: mqtt.Backoff) -> None:
        while True:
            try:
                async with mqtt.client(self.mqtt_settings, identifier=f"storegate-{self.store}", will=will) as client:
                    backoff.reset()
                    self._set_connected(True)
                    log.info("connected to broker %s:%s", self.mqtt_settings["host"], self.mqtt_settings.get("port", 1883))
                    try:
                        await self._session(client)
                    except asyncio.CancelledError:
                        await self._say_offline(client, will)
                        raise
                    finally:
                        self._set_connected(False)
            except* aiomqtt.MqttError as group:
                log.warning("uplink down: %s", group.exceptions[0])
            except* Exception as group:  # a bug or a journal fault: log it, keep the uplink alive
                log.error("uplink session failed: %r", group.exceptions[0], exc_info=group.exceptions[0])
            if self._stopping:
                # Shutting down, but something on the way (a library's cleanup,
                # a callback's error) replaced the CancelledError: stop anyway,
                # never reconnect after a shutdown began.
                raise asyncio.CancelledError
            self.state.reconnects += 1
            delay = backoff.next_delay()
            log.info("reconnecting in %.1f s", delay)
            await asyncio.sleep(delay)

    def stop(self) -> None:
        """Mark the shutdown before cancelling run(): it will not reconnect."""
        self._stopping = True

    async def _say_offline(self, client: aiomqtt.Client, will: aiomqtt.Will) -> None:
        """On a clean shutdown the broker sends no will: publish it ourselves."""
        try:
            async with asyncio.timeout(2.0):
                await client.publish(will.topic, will.payload, qos=1, retain=True)
        except (aiomqtt.MqttError, TimeoutError):
            pass

    def _set_connected(self, up: bool) -> None:
        if self.state.connected != up:
            self.state.connected = up
            if self.on_connection_change:
                try:
                    self.on_connection_change(up)
                except Exception:  # the LEDs must not take the uplink down
                    log.exception("connection-change callback failed")

    async def _session(self, client: aiomqtt.Client) -> None:
        await client.subscribe([(self.topics.ack(self.store), 1)] + [(t, 1) for t in self.sync.topics_to_subscribe()]
                               + [self.live.subscription()])
        inflight = self._inflight
        inflight.batches.clear()  # a new connection's window; everything unacked goes out again
        self._client = client
        self.sync.attach(client)
        self.live.attach(client)
        try:
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(self._receive(client, inflight))
                tasks.create_task(self._send(client, inflight, tasks))
                tasks.create_task(self._publish_status_periodically(client))
        finally:
            self._client = None
            self.live.detach()
            self.sync.detach()

    async def _receive(self, client: aiomqtt.Client, inflight: InFlight) -> None:
        ack_topic = self.topics.ack(self.store)
        async for message in client.messages:
            topic = str(message.topic)
            payload = message.payload if isinstance(message.payload, bytes) else str(message.payload or "").encode()
            try:
                if self.live.handle(topic, payload):  # first: a tap is waiting for it
                    pass
                elif topic == ack_topic:
                    await self._on_ack(payload, inflight)
                elif await self.sync.handle(topic, payload):
                    if topic == self.topics.rules(self.store):
                        self.state.last_hq_contact = time.time()
                else:  # some brokers (amqtt) echo messages we did not subscribe to
                    log.debug("ignored a message on %s", topic)
            except (aiomqtt.MqttError, JournalError):
                raise  # the session ends; everything unacked is sent again on the next one
            except Exception:  # one message must not end the session: it would come again (retained)
                log.exception("message on %s not handled", topic)

    async def _on_ack(self, payload: bytes, inflight: InFlight) -> None:
        try:
            ack = Ack.decode(payload)
            if ack.store != self.store:
                raise WireError(f"ack for store {ack.store!r}")
        except WireError as exc:
            self._ignored_ack(str(exc))
            return
        asked = normal_ranges(ack.acked)
        sent_at = inflight.sent_at(asked)
        hits = inflight.acked(asked)
        if hits:
            self.state.acked_records += await self.journal.mark_acked_ranges(hits)
            self._wake.set()
        # The rest is either acked already (a batch sent twice, acked twice)
        # or not ours to free: seqs never journaled, or pending but not sent
        # on this connection. HQ cannot have committed those.
        index = self.journal.index
        stray = [[lo, hi] for lo, hi in subtract_ranges(asked, hits)
                 if hi >= index.next_seq or index.any_pending(lo, hi)]
        if stray:
            self._ignored_ack(f"seq {ranges_text(stray)} not in flight")
        else:
            self.state.last_hq_contact = time.time()
            if ack.hq_time_ms is not None and self.on_hq_time is not None:
                rtt = time.monotonic() - sent_at if hits and sent_at is not None else None
                try:
                    self.on_hq_time(ack.hq_time_ms, rtt)
                except Exception:  # the clock check must not take the uplink down
                    log.exception("HQ's time not taken")
            if self._last_ignored_ack and time.monotonic() - self._last_ignored_ack > ACK_FAULT_CLEARS_S:
                self._clear_fault("ack")  # acks have been right for a while: a past glitch, not a fault now

    def _ignored_ack(self, reason: str) -> None:
        self._last_ignored_ack = time.monotonic()
        self.state.rejected_acks += 1
        reason = reason[:300]
        log.warning("ignored an ack: %s", reason)
        self._fault("ack", f"ignored {self.state.rejected_acks} ack(s) HQ cannot have sent (last: {reason})")

    def _fault(self, kind: str, text: str) -> None:
        """One fault line per kind in state.faults, kept up to date."""
        self._clear_fault(kind)
        self.state.faults.append(f"uplink {kind}: {text}")

    def _clear_fault(self, kind: str) -> None:
        head = f"uplink {kind}: "
        self.state.faults[:] = [f for f in self.state.faults if not f.startswith(head)]

    async def _publish_status_now(self) -> None:
        """After a rule set or delta was applied or refused: tell HQ at once."""
        client = self._client
        if client is not None:
            await self._publish_status(client)

    async def _send(self, client: aiomqtt.Client, inflight: InFlight, tasks: asyncio.TaskGroup) -> None:
        cursor = 0  # a new connection sends everything not yet acked
        topic = self.topics.tx(self.store)
        batches = inflight.batches
        while True:
            now = time.monotonic()
            if batches and now - min(batches.values()) > self.settings.resend_after_s:
                log.warning("no ack for %d batch(es) in %.0f s: sending again", len(batches),
                            self.settings.resend_after_s)
                batches.clear()
                cursor = 0
            if len(batches) < self.settings.window:
                records = await self.journal.pending(cursor, min(self.settings.batch_max, MAX_BATCH_RECORDS))
                if records:
                    records, payload = await self._batch(records)
                    # Not awaited here: the broker's PUBACK frees nothing, HQ's
                    # ack does. Tasks start in order, so batches go out in order;
                    # a failed publish fails the session and everything unacked
                    # is sent again on the next connection.
                    tasks.create_task(client.publish(topic, payload, qos=1))
                    cursor = records[-1].seq
                    inflight.sent(records, time.monotonic())
                    self.state.sent_batches += 1
                    continue
            self._wake.clear()
            try:
                # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a
                # cancellation that arrives as the event is set, and the
                # session would never end.
                async with asyncio.timeout(1.0):
                    await self._wake.wait()
            except TimeoutError:
                pass

    async def _batch(self, records: list[TxRecord]) -> tuple[list[TxRecord], bytes]:
        """The records that go in one batch, and its payload. Usually all of
        them as they are; a record HQ would refuse is set aside and replaced
        by a placeholder, and a batch is cut before it passes BATCH_BUDGET."""
        if not any(isinstance(r, UnreadableRecord) for r in records):
            try:
                return records, TxBatch(self.store, records).encode()
            except WireError:
                pass  # look at each record
        out: list[TxRecord] = []
        size = 0
        for r in records:
            try:
                if isinstance(r, UnreadableRecord):
                    raise WireError(r.error)
                n = len(r.encode())
            except WireError as exc:
                await self.journal.set_aside(r.seq, str(exc))
                r = unsendable_record(r.seq, r.id, r.type, r.ts, str(exc))
                n = len(r.encode())
            if out and size + n > BATCH_BUDGET:
                break
            out.append(r)
            size += n + 1
        return out, TxBatch(self.store, out).encode()

    async def _publish_status(self, client: aiomqtt.Client) -> None:
        await client.publish(self.topics.status(self.store), (await self.status("online")).encode(), qos=1, retain=True)

    async def _publish_status_periodically(self, client: aiomqtt.Client) -> None:
        while True:
            await self._publish_status(client)
            await asyncio.sleep(self.settings.status_interval_s)
