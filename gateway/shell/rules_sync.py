"""Rules from HQ over MQTT: the manifest, its parts, deny deltas, resync.

- ``{prefix}/stores/{store}/rules`` (retained): the signed manifest. Checked
  at once (signature, scope, version); then only the parts not in the cache
  are fetched, by subscribing to their hash-keyed retained topics and
  unsubscribing when they have come. The snapshot is loaded in a worker
  thread; the switch happens on the event loop in one assignment.
- ``{prefix}/rules/deny`` (retained: the latest delta): applied within
  milliseconds. A delta that skips versions means deltas were missed (the
  gateway was offline past more than one): the gateway asks for a resync on
  ``{prefix}/stores/{store}/resync`` and HQ republishes its manifest with a
  fresh deny part.
- A manifest whose parts do not all arrive within ``part_timeout_s`` is
  rejected as incomplete, and a resync is asked for once for that version.

The worker lives as long as the uplink: a dropped connection does not lose a
half-fetched rule set's cached parts; the retained manifest comes again on
reconnect and only what is still missing is fetched.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from typing import Awaitable, Callable

import aiomqtt

from gateway.store.rules import DenyGap, RulesRejected, RulesStore, trim_heap
from wire.messages import Manifest, Part, ResyncRequest
from wire.topics import Topics

log = logging.getLogger("storegate.rules")

APPLY_SWITCH_INTERVAL_S = 0.0005
FETCH_WINDOW = 2   # parts subscribed to at once


class LinkDown(Exception):
    """The broker connection went away while parts were awaited."""


class RulesSync:
    def __init__(self, rules: RulesStore, topics: Topics, store: str, *, part_timeout_s: float = 60.0,
                 on_change: Callable[[], Awaitable[None]] | None = None) -> None:
        self.rules = rules
        self.topics = topics
        self.store = store
        self.part_timeout_s = part_timeout_s
        self.on_change = on_change
        self.client: aiomqtt.Client | None = None
        self._latest: bytes | None = None
        self._wake = asyncio.Event()
        self._awaited: dict[str, tuple[Part, asyncio.Future]] = {}  # topic -> (part, future)
        self._resync_asked: set = set()
        self._last_resync = 0.0
        self.applying = False
        self._latest_at = 0.0
        # monotonic times of the last rule set applied: manifest received, live (benchmarks, logs)
        self.timings: dict[str, float] = {}

    def topics_to_subscribe(self) -> list[str]:
        return [self.topics.rules(self.store), self.topics.deny()]

    # -- session lifecycle (called by the uplink) ------------------------

    def attach(self, client: aiomqtt.Client) -> None:
        self.client = client

    def detach(self) -> None:
        self.client = None
        for _part, fut in self._awaited.values():
            if not fut.done():
                fut.set_exception(LinkDown())
        self._awaited.clear()

    async def handle(self, topic: str, payload: bytes) -> bool:
        """A message for the rules side? Handle it and say True."""
        if topic in self._awaited:
            self._on_part(topic, payload)
            return True
        if topic == self.topics.rules(self.store):
            if payload:
                self._latest, self._latest_at = payload, time.monotonic()
                self._wake.set()
            return True
        if topic == self.topics.deny():
            if payload:
                await self._on_deny(payload)
            return True
        return False

    # -- deny deltas -----------------------------------------------------

    async def _on_deny(self, payload: bytes) -> None:
        try:
            self.rules.apply_deny(payload)
        except DenyGap as exc:
            log.warning("%s", exc)
            await self.request_resync(str(exc))
        except RulesRejected:
            await self._changed()

    async def request_resync(self, reason: str) -> None:
        client = self.client
        now = time.monotonic()
        if client is None or now - self._last_resync < 5.0:
            return
        self._last_resync = now
        m = self.rules.manifest
        req = ResyncRequest(self.store, reason[:500], m.version if m else None, self.rules.deny_version)
        try:
            await client.publish(self.topics.resync(self.store), req.encode(), qos=1)
            log.info("asked HQ for a resync: %s", reason)
        except aiomqtt.MqttError as exc:
            log.warning("resync request not sent: %s", exc)

    # -- parts -----------------------------------------------------------

    def _on_part(self, topic: str, payload: bytes) -> None:
        part, fut = self._awaited[topic]
        if fut.done() or not payload:
            return

        async def keep() -> None:
            try:
                # Hashing and writing a big part takes a while: not on the event loop.
                await asyncio.to_thread(self.rules.store_part, part, payload)
            except RulesRejected as exc:
                if not fut.done():
                    fut.set_exception(exc)
                return
            except OSError as exc:
                if not fut.done():
                    fut.set_exception(RulesRejected(f"part {part.name}: cannot be kept: {exc}"))
                return
            if not fut.done():
                fut.set_result(None)

        asyncio.get_running_loop().create_task(keep())

    async def _fetch(self, m: Manifest, missing: list[Part]) -> None:
        """Fetch the missing parts, FETCH_WINDOW at a time: a big snapshot's
        parts (tens of MB) never sit in memory all at once. The part timeout
        counts for the whole fetch."""
        for p in missing:
            if not self.topics.part_topic_ok(self.store, p.topic):
                raise RulesRejected(f"rule set v{m.version}: part {p.name} on topic {p.topic!r}, which is not "
                                    f"a part topic this store reads")
        try:
            async with asyncio.timeout(self.part_timeout_s):
                for i in range(0, len(missing), FETCH_WINDOW):
                    await self._fetch_some(missing[i:i + FETCH_WINDOW])
        except TimeoutError:
            late = [p.name for p in missing if not self.rules.have_part(p)]
            raise RulesRejected(f"rule set v{m.version} is incomplete: part(s) {', '.join(late)} not "
                                f"received within {self.part_timeout_s:.0f} s") from None

    async def _fetch_some(self, parts: list[Part]) -> None:
        client = self.client
        if client is None:
            raise LinkDown()
        loop = asyncio.get_running_loop()
        waits = {}
        for p in parts:
            fut = loop.create_future()
            self._awaited[p.topic] = (p, fut)
            waits[p.topic] = fut
        try:
            await client.subscribe([(t, 1) for t in waits])
            for fut in waits.values():
                await fut
        finally:
            for t in waits:
                self._awaited.pop(t, None)
            for f in waits.values():
                if f.done() and not f.cancelled():
                    f.exception()  # retrieved: no "never retrieved" warnings
            if self.client is client:
                try:
                    await client.unsubscribe(list(waits))
                except aiomqtt.MqttError:
                    pass

    # -- the worker ------------------------------------------------------

    async def run(self) -> None:
        """Apply the latest manifest offered, one at a time, until cancelled."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            payload, self._latest = self._latest, None
            if payload is None:
                continue
            try:
                await self._process(payload, self._latest_at)
            except LinkDown:
                log.info("link down while fetching rule-set parts; continuing when the manifest comes again")
            except RulesRejected as exc:
                if self.rules.last_rejection != str(exc):
                    self.rules.reject(str(exc))
                await self._changed()
            except Exception:
                log.exception("rule set processing failed")

    async def _process(self, payload: bytes, received: float) -> None:
        m = self.rules.check_manifest(payload)
        if m is None:
            return
        missing = self.rules.missing_parts(m)
        if missing:
            log.info("rule set v%d: fetching %d of %d part(s)", m.version, len(missing), len(m.parts))
            try:
                await self._fetch(m, missing)
            except RulesRejected as exc:
                if m.version not in self._resync_asked:
                    self._resync_asked.add(m.version)
                    self.rules.reject(str(exc))
                    await self.request_resync(str(exc))
                raise
        fetched = time.monotonic()
        trim_heap()  # the fetched payloads are freed: give their pages back before the load
        self.applying = True
        # The load runs in a worker thread; taps and quotes run on the event
        # loop and need the GIL back quickly: hand it over every 0.5 ms
        # instead of every 5 ms while the load runs.
        switch = sys.getswitchinterval()
        sys.setswitchinterval(APPLY_SWITCH_INTERVAL_S)
        try:
            rules = await asyncio.to_thread(self.rules.build, m)
        finally:
            sys.setswitchinterval(switch)
            self.applying = False
        # A newer manifest that came meanwhile is checked next; this one, complete
        # and valid, goes live first.
        self.rules.commit(m, rules)
        trim_heap()
        try:  # only now, with the new manifest durable: parts no set in force names (gateway/store/rules.py)
            await asyncio.to_thread(self.rules.prune_parts)
        except OSError as exc:
            log.warning("rule-set part cache not pruned: %s", exc)
        self.timings = {"received": received, "fetched": fetched, "live": time.monotonic(), "version": m.version}
        log.info("rule set v%d live %.2f s after its manifest came", m.version, self.timings["live"] - received)
        await self._changed()

    async def _changed(self) -> None:
        if self.on_change:
            try:
                await self.on_change()
            except aiomqtt.MqttError:
                pass
