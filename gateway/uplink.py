"""Uplink to HQ over MQTT: store-and-forward of journal records, acks, rules.

- Records go out in sequence order as batches on ``{prefix}/stores/{store}/tx``
  (QoS 1), with up to ``window`` batches awaiting HQ's ack at a time.
- Only HQ's application-level ack on ``.../ack`` (committed in HQ's database)
  frees a record; a broker PUBACK frees nothing. A batch not acked within
  ``resend_after_s``, and everything unacked after a reconnect, is sent again;
  HQ applies each record once and acks duplicates again.
- Reconnects with exponential backoff and full jitter.
- Publishes a retained status message, with a retained "offline" last will.
- Rules from HQ (signed manifest, parts, deny deltas, resync): gateway.rules_sync.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Awaitable, Callable

import aiomqtt

from common import mqtt
from gateway.journal import Journal
from gateway.rules_store import RulesStore
from gateway.rules_sync import RulesSync
from wire.messages import Ack, Status, TxBatch, WireError
from wire.topics import Topics

log = logging.getLogger("storegate.uplink")


@dataclass
class UplinkSettings:
    batch_max: int = 1000
    window: int = 8
    resend_after_s: float = 10.0
    status_interval_s: float = 10.0
    part_timeout_s: float = 60.0


@dataclass
class UplinkState:
    connected: bool = False
    last_hq_contact: float | None = None  # wall clock of the last ack or rule set
    sent_batches: int = 0
    acked_records: int = 0
    reconnects: int = 0
    faults: list = field(default_factory=list)


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
        self._wake = asyncio.Event()
        self._stopping = False
        journal.on_append = self._wake.set
        self._client: aiomqtt.Client | None = None
        self.sync = RulesSync(rules, self.topics, store, part_timeout_s=self.settings.part_timeout_s,
                              on_change=self._publish_status_now)

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
        await client.subscribe([(self.topics.ack(self.store), 1)] + [(t, 1) for t in self.sync.topics_to_subscribe()])
        inflight: dict[int, float] = {}  # last seq of a batch -> when sent
        self._client = client
        self.sync.attach(client)
        try:
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(self._receive(client, inflight))
                tasks.create_task(self._send(client, inflight, tasks))
                tasks.create_task(self._publish_status_periodically(client))
        finally:
            self._client = None
            self.sync.detach()

    async def _receive(self, client: aiomqtt.Client, inflight: dict[int, float]) -> None:
        ack_topic = self.topics.ack(self.store)
        async for message in client.messages:
            topic = str(message.topic)
            payload = message.payload if isinstance(message.payload, bytes) else str(message.payload or "").encode()
            if topic == ack_topic:
                await self._on_ack(payload, inflight)
            elif await self.sync.handle(topic, payload):
                if topic == self.topics.rules(self.store):
                    self.state.last_hq_contact = time.time()
            else:  # some brokers (amqtt) echo messages we did not subscribe to
                log.debug("ignored a message on %s", topic)

    async def _on_ack(self, payload: bytes, inflight: dict[int, float]) -> None:
        try:
            ack = Ack.decode(payload)
        except WireError as exc:
            log.warning("ignored malformed ack: %s", exc)
            return
        if ack.store != self.store:
            log.warning("ignored ack for store %s", ack.store)
            return
        seqs = ack.seqs()
        freed = await self.journal.mark_acked(seqs)
        self.state.acked_records += freed
        self.state.last_hq_contact = time.time()
        for lo, hi in ack.acked:
            for last in [s for s in inflight if lo <= s <= hi]:
                del inflight[last]
        self._wake.set()

    async def _publish_status_now(self) -> None:
        """After a rule set or delta was applied or refused: tell HQ at once."""
        client = self._client
        if client is not None:
            await self._publish_status(client)

    async def _send(self, client: aiomqtt.Client, inflight: dict[int, float], tasks: asyncio.TaskGroup) -> None:
        cursor = 0  # a new connection sends everything not yet acked
        topic = self.topics.tx(self.store)
        while True:
            now = time.monotonic()
            if inflight and now - min(inflight.values()) > self.settings.resend_after_s:
                log.warning("no ack for %d batch(es) in %.0f s: sending again", len(inflight),
                            self.settings.resend_after_s)
                inflight.clear()
                cursor = 0
            if len(inflight) < self.settings.window:
                records = await self.journal.pending(cursor, self.settings.batch_max)
                if records:
                    # Not awaited here: the broker's PUBACK frees nothing, HQ's
                    # ack does. Tasks start in order, so batches go out in order;
                    # a failed publish fails the session and everything unacked
                    # is sent again on the next connection.
                    tasks.create_task(client.publish(topic, TxBatch(self.store, records).encode(), qos=1))
                    cursor = records[-1].seq
                    inflight[cursor] = time.monotonic()
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

    async def _publish_status(self, client: aiomqtt.Client) -> None:
        await client.publish(self.topics.status(self.store), (await self.status("online")).encode(), qos=1, retain=True)

    async def _publish_status_periodically(self, client: aiomqtt.Client) -> None:
        while True:
            await self._publish_status(client)
            await asyncio.sleep(self.settings.status_interval_s)
