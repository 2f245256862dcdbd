"""The HQ bridge: store transactions in, ledger commit, acks out; resyncs.

An ack is published only after the batch is committed in the ledger, so the
gateway frees exactly what HQ holds. Duplicates are acked again. Every ack
carries HQ's time when the batch was committed (``hq_time_ms``): the store
checks its clock against it (gateway/core/clock.py; an older gateway refuses
it, so gateways are upgraded first: README "Wire contract"). The ledger
applies the new records to HQ's accounts in the same transaction
(hq_bridge/ledger.py); records the accounts set aside are counted and logged
(they stay in ``set_aside`` for ops), and acked like any record.

A store that saw a gap in the deny deltas (or a part that never came)
publishes on ``{prefix}/stores/{store}/resync``; the bridge answers by
publishing that store's manifest and every part of it again (a new version
with a fresh deny part when the deny list has moved on), at most once per
``resync_min_interval_s`` per store.

Anything on a topic the bridge reads may be hostile: every payload is
bounded and checked (wire.messages) before use, a refused one is logged and
counted, and no message, however bad, ends the bridge's loop. A batch that
is refused is not acked (nothing was committed); a store's placeholder for a
record it could not send is kept in the ledger and acked.

Several bridges may share the ingest (``hq.share_group``: MQTT shared
subscriptions, each batch to one of them; each with its own
``hq.client_id``): the ledger applies every record exactly once and in
order per store whichever bridge a batch reaches (hq_bridge/ledger.py).

What a command stored at HQ while the broker was down (a rule set, a deny
delta: hq_bridge/rules.py's outbox) is sent on connecting and every
``outbox_interval_s``.

Counter card services are recorded in the ledger. A counter's replace never
lifts a deny: the new card's number is not broadcast as active, and if HQ
lists it as denied the service is marked for review.
"""

from __future__ import annotations

import asyncio
import logging
import time

import aiomqtt

from common import mqtt
from hq_bridge.ledger import Ledger
from hq_bridge.accounts import deny_entries
from wire.messages import Ack, ResyncRequest, Status, TxBatch, WireError
from wire.topics import Topics

# Counter card services HQ broadcasts as deny deltas: op -> (card action, deny status).
COUNTER_CARD_ACTIONS = {"report_lost": ("deny", "lost"), "freeze": ("freeze", None), "replace": ("replace", None)}

log = logging.getLogger("storegate.hq")


class Bridge:
    def __init__(self, mqtt_settings: dict, ledger: Ledger, *, client_id: str = "storegate-hq",
                 publisher=None, resync_min_interval_s: float = 5.0, outbox_interval_s: float = 60.0,
                 share_group: str | None = None, clock=time.time) -> None:
        self.mqtt_settings = mqtt_settings
        self.clock = clock   # HQ's time in the acks
        self.ledger = ledger
        self.publisher = publisher  # hq_bridge.rules.Publisher, to answer resync requests
        self.resync_min_interval_s = resync_min_interval_s
        self.outbox_interval_s = outbox_interval_s
        # Several bridges in one share group divide the stores' messages between them (each
        # batch to one of them); each needs its own client_id.
        self.share_group = share_group or None
        self._last_resync: dict[str, float] = {}
        self.client_id = client_id
        self.topics = Topics(mqtt_settings.get("prefix", "sg/v1"))
        self.connected = asyncio.Event()
        self.stats = {"batches": 0, "applied": 0, "duplicates": 0, "conflicts": 0, "rejected": 0, "resyncs": 0,
                      "card_broadcasts": 0, "card_reviews": 0, "unsendable": 0, "bad_messages": 0, "errors": 0,
                      "set_aside": 0}

    async def run(self) -> None:
        backoff = mqtt.Backoff()
        while True:
            try:
                # A persistent session: the broker keeps QoS 1 batches for us while we are down.
                async with mqtt.client(self.mqtt_settings, identifier=self.client_id, clean_session=False) as client:
                    backoff.reset()
                    for topic in (self.topics.all_tx, self.topics.all_status, self.topics.all_resync):
                        await client.subscribe(topic(self.share_group), qos=1)
                    self.connected.set()
                    log.info("HQ bridge connected")
                    outbox = asyncio.create_task(self._send_outbox(client)) if self.publisher else None
                    try:
                        async for message in client.messages:
                            await self._handle_safely(client, message)
                    finally:
                        self.connected.clear()
                        if outbox is not None:
                            outbox.cancel()
            except aiomqtt.MqttError as exc:
                log.warning("HQ bridge disconnected: %s", exc)
            await asyncio.sleep(backoff.next_delay())

    async def _send_outbox(self, client: aiomqtt.Client) -> None:
        """What commands stored while the broker was down goes out on
        connecting, and anything queued since every ``outbox_interval_s``."""
        while True:
            try:
                sent = await self.publisher.send_queued(client)
                if sent:
                    log.info("outbox: sent %s", ", ".join(sent))
            except aiomqtt.MqttError:
                return          # the connection is gone: the next one sends it
            except Exception:   # a database fault: try again at the next round
                log.exception("outbox not sent")
            await asyncio.sleep(self.outbox_interval_s)

    async def _handle_safely(self, client: aiomqtt.Client, message: aiomqtt.Message) -> None:
        try:
            await self._handle(client, message)
        except aiomqtt.MqttError:
            raise  # reconnect; a batch not acked comes again
        except Exception:  # a bug or a database fault: this message is lost to us, not the bridge
            self.stats["errors"] += 1
            log.exception("message on %s not handled", message.topic)

    async def _handle(self, client: aiomqtt.Client, message: aiomqtt.Message) -> None:
        topic = str(message.topic)
        payload = message.payload if isinstance(message.payload, bytes) else str(message.payload or "").encode()
        try:
            store = self.topics.store_of(topic)
        except ValueError as exc:
            log.warning("ignored message: %s", exc)
            return
        kind = topic.rsplit("/", 1)[-1]
        if kind == "status":
            if payload:
                await self._status(store, payload)
        elif kind == "resync":
            await self._resync(client, store, payload)
        elif kind == "tx":
            await self._tx(client, store, topic, payload)

    async def _status(self, store: str, payload: bytes) -> None:
        try:
            status = Status.decode(payload)
            if status.store != store:
                raise WireError(f"status of store {status.store!r} published on store {store}'s topic")
        except WireError as exc:
            self.stats["bad_messages"] += 1
            log.warning("store %s: bad status: %s", store, exc)
            return
        # what was checked, re-encoded: never the payload as it came
        await asyncio.to_thread(self.ledger.record_status, store, status.encode().decode())
        log.debug("store %s is %s, backlog %s", store, status.state, status.backlog)

    async def _tx(self, client: aiomqtt.Client, store: str, topic: str, payload: bytes) -> None:
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
        self.stats["unsendable"] += len(committed.unsendable)
        if committed.conflicts:
            log.error("store %s: %d record(s) reuse a sequence number with a different id; kept in conflicts",
                      store, committed.conflicts)
        for seq, original, error in committed.unsendable:
            log.error("store %s: record seq %d (%s) could not be sent by the store (%s); its placeholder is kept "
                      "in the ledger's unsendable table, the original stays at the store", store, seq, original, error)
        hq_time_ms = int(self.clock() * 1000)   # after the commit: a time known to have passed at the store
        for ack in Ack.for_seqs(store, committed.seqs, hq_time_ms):
            await client.publish(self.topics.ack(store), ack.encode(), qos=1)
        if committed.accounts is not None and committed.accounts.set_aside:
            self.stats["set_aside"] += len(committed.accounts.set_aside)
            for seq, why in committed.accounts.set_aside:
                log.warning("store %s: record seq %d not applied to the accounts (%s); kept in set_aside", store,
                            seq, why)
        if committed.new_ids:
            await self._counter_card_services(client, store, batch, committed.new_ids, committed.accounts)

    async def _counter_card_services(self, client: aiomqtt.Client, store: str, batch: TxBatch,
                                     new_ids: frozenset, accounts=None) -> None:
        """A card reported lost, frozen or replaced at one store's counter is
        refused there at once; HQ takes it to every other store as a signed
        deny delta. An unfreeze at a counter is recorded, not broadcast: who
        may lift a freeze is HQ's decision (``storegate-hq card unfreeze``);
        so is lifting a deny of the new card of a replace. Every counter
        card service is recorded in the ledger with what HQ did.

        Cards the accounts moved to a denying status by other records of the
        batch (``cards_changed`` of the account application: cancelled,
        expired, lost, frozen, replaced) go out as a deny delta too; a card
        the accounts made active is never broadcast as active from a store.
        What HQ's own policy decided on ingest (``hq_cards_changed``: an
        overdraft's block or limit, and its lift once settled; a card the
        batch issued on an account held so, with the account's ``blocked`` /
        ``limited``: hq_bridge/reconcile.py) goes out as it is."""
        broadcast: set[str] = set()
        for r in batch.records:
            if r.type != "card_op" or r.id not in new_ids:
                continue
            op, card, new_card = r.body.get("op"), r.body.get("card_no"), r.body.get("new_card_no")
            try:
                outcome, review = await self._counter_card_service(client, store, r.seq, op, card, new_card)
            except Exception as exc:  # a bad record must not stop the bridge; the ledger has it
                outcome, review = f"not broadcast: {exc}", True
                log.error("store %s: could not broadcast card service seq %d: %s", store, r.seq, exc)
            if review:
                self.stats["card_reviews"] += 1
            if isinstance(card, str):
                broadcast.update((card, new_card) if isinstance(new_card, str) else (card,))
            await asyncio.to_thread(self.ledger.record_card_service, store, r.seq, r.id, op, card, new_card,
                                    outcome, review)
        entries = [] if accounts is None else (deny_entries(accounts.cards_changed, lifts=False, skip=broadcast)
                                               + deny_entries(accounts.hq_cards_changed))
        if entries and self.publisher is not None:
            try:
                delta = await self.publisher.deny_entries(entries, f"store {store} records (accounts)", client=client)
                self.stats["card_broadcasts"] += 1
                log.info("store %s: %d card(s) moved by the accounts, broadcast as deny delta v%d", store,
                         len(entries), delta.version)
            except Exception as exc:
                log.error("store %s: could not broadcast card changes of the accounts: %s", store, exc)

    async def _counter_card_service(self, client: aiomqtt.Client, store: str, seq: int, op, card,
                                    new_card) -> tuple[str, bool]:
        """(what HQ did, whether a person must look at it)."""
        action = COUNTER_CARD_ACTIONS.get(op)
        masked = f"****{str(card)[-4:]}"
        if action is None or not isinstance(card, str):
            if op == "unfreeze":
                log.info("store %s: counter unfreeze of card %s recorded; lift it at HQ if approved", store, masked)
                return "recorded: lift the freeze at HQ if approved", True
            return "recorded", False
        if self.publisher is None:
            log.warning("store %s: card %s %s at the counter, but this bridge has no signing key to tell the other "
                        "stores", store, masked, action[0])
            return "not broadcast: no signing key", True
        review = None
        if action[0] == "replace" and isinstance(new_card, str):
            denied = self.publisher.catalog.deny_status(new_card)
            if denied is not None:
                review = (f"new card ****{new_card[-4:]} is on HQ's deny list ({denied}) and stays denied; "
                          "lift it at HQ if approved")
                log.warning("store %s: counter replace of card %s (seq %d): %s", store, masked, seq, review)
        delta = await self.publisher.card_action(action[0], card, f"store {store} counter (seq {seq})",
                                                 status=action[1], new_card=new_card, activate_new=False,
                                                 client=client, hq_own=False)
        self.stats["card_broadcasts"] += 1
        outcome = f"broadcast as deny delta v{delta.version}"
        return (f"{outcome}; {review}", True) if review else (outcome, False)

    async def _resync(self, client: aiomqtt.Client, store: str, payload: bytes) -> None:
        try:
            req = ResyncRequest.decode(payload)
            if req.store != store:
                raise WireError(f"resync for store {req.store!r} published on store {store}'s topic")
        except WireError as exc:
            self.stats["bad_messages"] += 1
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
