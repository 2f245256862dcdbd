"""Live account look-ups: while the link to HQ is up, a tap asks HQ for the
member's live account, so a top-up in store A is spendable in store B a
moment later (DESIGN.md principle 8, README "Wire contract").

    gateway --AccountQuery--> {prefix}/stores/{store}/account/query  (QoS 0)
    gateway <--AccountReply-- {prefix}/stores/{store}/account/reply  (QoS 0, only this store may read it)

``LiveAccounts.lookup(card_no, budget_s)`` publishes a query with a random
id and waits at most ``budget_s`` (``uplink.live_lookup_ms``, default 300)
for the reply with that id. An answer is put in the member store's
``LiveCache`` (``rules.members.live``) for ``api.member_hold_s``, where
validate.validate finds it: the tap and the counter's re-validation on quote
and sale see the same live account without a second round trip. Offline,
past the wait, or with an answer that cannot be used, the store decides
from its snapshot plus its own records (the verdict's ``source`` says
which). An answer's account carries the day's use at every store as HQ has
it (``today``: stored value, points, and the gifts that a gift's
``per_member_day_limit`` counts); validate adds this store's own records
journaled after the reply's ``store_seq`` to it, so none is counted twice.

Anything on the reply topic may be hostile: a reply is decoded bounded
(wire.messages), and used only if it is for this store, answers a query
this gateway has waiting (its id) and names the card asked for; anything
else is ignored and counted (``stats``).

When HQ does not answer (its look-up service down, a broker that drops
QoS 0), every tap would wait the whole budget: after ``quiet_after``
unanswered queries in a row, look-ups pause for ``quiet_s`` seconds (taps
decide from the snapshot at once), then one query probes again.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from typing import Any, Callable

from gateway.core.members import LiveAccount, LiveCache
from wire.messages import AccountQuery, AccountReply, WireError
from wire.topics import Topics

log = logging.getLogger("storegate.live")

MAX_WAITING = 256          # queries waiting for a reply at once; more: decided from the snapshot


class LiveAccounts:
    def __init__(self, store: str, topics: Topics, *, budget_s: float = 0.3, hold_s: float = 300.0,
                 clock: Callable[[], float] = time.time, quiet_after: int = 3, quiet_s: float = 10.0) -> None:
        self.store = store
        self.topics = topics
        self.budget_s = budget_s
        self.clock = clock
        self.cache = LiveCache(hold_s)
        self.quiet_after = quiet_after
        self.quiet_s = quiet_s
        self.reply_topic = topics.account_reply(store)
        self.query_topic = topics.account_query(store)
        self._client: Any = None
        self._waiting: dict[str, tuple[str, asyncio.Future]] = {}   # query id -> (card_no, future)
        self._misses = 0
        self._quiet_until = 0.0
        self.stats = {"queries": 0, "answered": 0, "not_found": 0, "timeouts": 0, "offline": 0, "skipped": 0,
                      "ignored_replies": 0}
        self.last_ignored: str | None = None

    # -- the uplink's session --------------------------------------------------

    def attach(self, client: Any) -> None:
        self._client = client

    def detach(self) -> None:
        self._client = None
        for _card, fut in self._waiting.values():
            if not fut.done():
                fut.set_result(None)   # the link went down: those taps decide offline now
        self._waiting.clear()

    @property
    def online(self) -> bool:
        return self._client is not None

    def subscription(self) -> tuple[str, int]:
        return (self.reply_topic, 0)

    def handle(self, topic: str, payload: bytes) -> bool:
        """A message for us? (True: a reply topic message, used or ignored.)"""
        if topic != self.reply_topic:
            return False
        try:
            reply = AccountReply.decode(payload)
            if reply.store != self.store:
                raise WireError(f"a reply for store {reply.store!r}")
            waiting = self._waiting.get(reply.id)
            if waiting is None:
                raise WireError("a reply to no query waiting (late, repeated or forged)")
            card_no, fut = waiting
            if reply.card_no != card_no:
                raise WireError("a reply naming another card than the one asked for")
        except WireError as exc:
            self.stats["ignored_replies"] += 1
            self.last_ignored = str(exc)[:300]
            log.warning("ignored an account reply: %s", self.last_ignored)
            return True
        del self._waiting[reply.id]
        if not fut.done():
            fut.set_result(reply)
        return True

    # -- the tap ------------------------------------------------------------------

    async def lookup(self, card_no: str, budget_s: float | None = None) -> LiveAccount | None:
        """HQ's live account for the card, held in the cache; None when
        offline, past the wait, not found at HQ, or not usable."""
        client = self._client
        if client is None:
            self.stats["offline"] += 1
            return None
        budget = self.budget_s if budget_s is None else budget_s
        now = time.monotonic()
        if budget <= 0 or len(self._waiting) >= MAX_WAITING or (
                self._misses >= self.quiet_after and now < self._quiet_until):
            self.stats["skipped"] += 1
            return None
        if self._misses >= self.quiet_after:
            self._quiet_until = now + self.quiet_s   # this one probes; the next ones wait for it
        qid = secrets.token_urlsafe(12)
        fut = asyncio.get_running_loop().create_future()
        self._waiting[qid] = (card_no, fut)
        self.stats["queries"] += 1
        try:
            async with asyncio.timeout(budget):
                await client.publish(self.query_topic, AccountQuery(self.store, qid, card_no,
                                                                    int(self.clock() * 1000)).encode(), qos=0)
                reply: AccountReply | None = await fut
        except TimeoutError:
            self.stats["timeouts"] += 1
            self._missed()
            return None
        except Exception as exc:   # the link went down mid-publish: decide offline
            log.info("account look-up not sent: %s", exc)
            self.stats["offline"] += 1
            return None
        finally:
            self._waiting.pop(qid, None)
        if reply is None:
            self.stats["offline"] += 1
            return None
        self._misses = 0
        if not reply.found:
            self.stats["not_found"] += 1
            self.cache.forget(card_no)
            return None
        self.stats["answered"] += 1
        return self.cache.put(card_no, reply.account, reply.primary, reply.store_seq, reply.as_of, self.clock())

    def _missed(self) -> None:
        self._misses += 1
        if self._misses == self.quiet_after:
            self._quiet_until = time.monotonic() + self.quiet_s
            log.warning("HQ answered none of the last %d account look-ups: taps decide from the snapshot "
                        "for %.0f s", self._misses, self.quiet_s)

    def status(self) -> dict:
        return {**self.stats, "waiting": len(self._waiting), "held": len(self.cache),
                "quiet": self._misses >= self.quiet_after and time.monotonic() < self._quiet_until}
