"""The HQ bridge: store transactions in, ledger commit, acks out; resyncs.

An ack is published only after the batch is committed in the ledger, so the
gateway frees exactly what HQ holds. Duplicates are acked again.

A store that saw a gap in the deny deltas (or a part that never came)
publishes on ``{prefix}/stores/{store}/resync``; the bridge answers by
publishing that store's manifest and every part of it again (a new version
with a fresh deny part when the deny list has moved on), at most once per
``resync_min_interval_s`` per store.
"""

from __future__ import annotations

import asyncio
import logging
import time

import aiomqtt

from common import mqtt
from hq_bridge.ledger import Ledger
from wire.messages import Ack, ResyncRequest, Status, TxBatch, WireError
from wire.topics import Topics

# Counter card services HQ broadcasts as deny deltas: op -> (card action, deny status).
COUNTER_CARD_ACTIONS = {"report_lost": ("deny", "lost"), "freeze": ("freeze", None), "replace": ("replace", None)}

log = logging.getLogger("storegate.hq")


class Bridge:
    def __init__(self, mqtt_settings: dict, ledger: Ledger, *, client_id: str = "storegate-hq",
                 publisher=None, resync_min_interval_s: float = 5.0) -> None:
        self.mqtt_settings = mqtt_settings
        self.ledger = ledger
        self.publisher = publisher  # hq_bridge.rules.Publisher, to answer resync requests
        self.resync_min_interval_s = resync_min_interval_s
        self._last_resync: dict[str, float] = {}
        self.client_id = client_id
        self.topics = Topics(mqtt_settings.get("prefix", "sg/v1"))
        self.connected = asyncio.Event()
        self.stats = {"batches": 0, "applied": 0, "duplicates": 0, "conflicts": 0, "rejected": 0, "resyncs": 0,
                      "card_broadcasts": 0}

    async def run(self) -> None:
        backoff = mqtt.Backoff()
        while True:
            try:
                # A persistent session: the broker keeps QoS 1 batches for us while we are down.
                async with mqtt.client(self.mqtt_settings, identifier=self.client_id, clean_session=False) as client:
                    backoff.reset()
                    await client.subscribe(self.topics.all_tx(), qos=1)
                    await client.subscribe(self.topics.all_status(), qos=1)
                    await client.subscribe(self.topics.all_resync(), qos=1)
                    self.connected.set()
                    log.info("HQ bridge connected")
                    try:
                        async for message in client.messages:
                            await self._handle(client, message)
                    finally:
                        self.connected.clear()
            except aiomqtt.MqttError as exc:
                log.warning("HQ bridge disconnected: %s", exc)
            await asyncio.sleep(backoff.next_delay())

    async def _handle(self, client: aiomqtt.Client, message: aiomqtt.Message) -> None:
        topic = str(message.topic)
        payload = message.payload if isinstance(message.payload, bytes) else str(message.payload or "").encode()
        try:
            store = self.topics.store_of(topic)
        except ValueError as exc:
            log.warning("ignored message: %s", exc)
            return
        if topic.endswith("/status"):
            if payload:
                try:
                    status = Status.decode(payload)
                    await asyncio.to_thread(self.ledger.record_status, store, payload.decode())
                    log.debug("store %s is %s, backlog %s", store, status.state, status.backlog)
                except WireError as exc:
                    log.warning("store %s: bad status: %s", store, exc)
            return
        if topic.endswith("/resync"):
            await self._resync(client, store, payload)
            return
        try:
            batch = TxBatch.decode(payload)
            if batch.store != store:
                raise WireError(f"batch for store {batch.store!r} published on {topic}")
        except WireError as exc:
            # Not acked: nothing was committed. The store's own log and status tell ops.
            self.stats["rejected"] += 1
            log.error("store %s: rejected batch: %s", store, exc)
            return
        committed = await asyncio.to_thread(self.ledger.commit, batch)
        self.stats["batches"] += 1
        self.stats["applied"] += committed.applied
        self.stats["duplicates"] += committed.duplicates
        self.stats["conflicts"] += committed.conflicts
        if committed.conflicts:
            log.error("store %s: %d record(s) reuse a sequence number with a different id; kept in conflicts",
                      store, committed.conflicts)
        await client.publish(self.topics.ack(store), Ack.of(store, committed.seqs).encode(), qos=1)
        if committed.new_ids:
            await self._broadcast_counter_card_services(client, store, batch, committed.new_ids)

    async def _broadcast_counter_card_services(self, client: aiomqtt.Client, store: str, batch: TxBatch,
                                               new_ids: frozenset) -> None:
        """A card reported lost, frozen or replaced at one store's counter is
        refused there at once; HQ takes it to every other store as a signed
        deny delta. An unfreeze at a counter is recorded, not broadcast: who
        may lift a freeze is HQ's decision (``storegate-hq card unfreeze``)."""
        for r in batch.records:
            if r.type != "card_op" or r.id not in new_ids:
                continue
            action = COUNTER_CARD_ACTIONS.get(r.body.get("op"))
            card = r.body.get("card_no")
            if action is None or not isinstance(card, str):
                if r.body.get("op") == "unfreeze":
                    log.info("store %s: counter unfreeze of card ****%s recorded; lift it at HQ if approved",
                             store, str(card)[-4:])
                continue
            if self.publisher is None:
                log.warning("store %s: card ****%s %s at the counter, but this bridge has no signing key to "
                            "tell the other stores", store, card[-4:], action)
                continue
            try:
                await self.publisher.card_action(action[0], card, f"store {store} counter (seq {r.seq})",
                                                 status=action[1], new_card=r.body.get("new_card_no"),
                                                 client=client)
                self.stats["card_broadcasts"] += 1
            except Exception as exc:  # a bad record must not stop the bridge; the ledger has it
                log.error("store %s: could not broadcast card service seq %d: %s", store, r.seq, exc)

    async def _resync(self, client: aiomqtt.Client, store: str, payload: bytes) -> None:
        try:
            req = ResyncRequest.decode(payload)
            if req.store != store:
                raise WireError(f"resync for store {req.store!r} published on store {store}'s topic")
        except WireError as exc:
            log.warning("store %s: bad resync request: %s", store, exc)
            return
        if self.publisher is None:
            log.warning("store %s asks for a resync (%s) but this bridge has no signing key", store, req.reason)
            return
        now = time.monotonic()
        if now - self._last_resync.get(store, -1e9) < self.resync_min_interval_s:
            log.info("store %s: resync asked again within %.0f s; ignored", store, self.resync_min_interval_s)
            return
        self._last_resync[store] = now
        try:
            manifest = await self.publisher.resync(client, store)
        except Exception as exc:  # a store HQ does not know, a bad layer: log, keep bridging
            log.error("store %s: resync failed: %s", store, exc)
            return
        self.stats["resyncs"] += 1
        log.info("store %s: resync (%s): manifest v%d and its parts published again", store, req.reason,
                 manifest.version)
