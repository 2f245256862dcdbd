"""HQ's live account look-ups: a store's tap asks for the live account
behind a card, HQ answers from its accounts of record in a few ms.

    store --AccountQuery--> {prefix}/stores/{store}/account/query   (QoS 0)
    HQ    --AccountReply--> {prefix}/stores/{store}/account/reply   (QoS 0; the ACL: only that store reads it)

``LookupService(mqtt_settings, engine).run()`` is its own task with its own
MQTT client (``storegate-hq run`` starts it next to the bridge). It reads
the queries through an MQTT shared subscription (``$share/hq/...``), so
several HQ workers, each running one, split the queries between them.

Every answer is read in one read-only transaction: the card's row (and, for
a subsidiary or linked card, its primary card's row, which carries the
account's balances) built by the same code as the member snapshot
(hq_bridge/accounts.py ``account_rows``: the same format, field by field),
and the asking store's watermark. ``store_seq`` in the reply means exactly:
this answer includes that store's records up to that seq, so the store adds
its own records after it, once.

The row with the account's balances carries the day's use of the offline
allowances at every store (``today``: the account's latest store-local day
HQ has records of); its ``today.gifts`` adds the account's gifts of that day
({gift id: gifts}, from the ``gift_redemption`` history entries:
hq_bridge/reconcile.py ``day_gift_counts``, the counting reconciliation
uses), read in the same transaction as the watermark, so a store's
``per_member_day_limit`` counts every store's gifts while it is online.
Only live answers carry it (a snapshot row has no ``today.gifts``).

Bounded work: a query is one card (a few indexed reads: the card, at most
``MAX_PRIMARIES`` primary cards and the first card of its account, the
account's packages and issued coupons, and on a day with allowances used its
newest ``GIFT_SCAN`` history entries for the day's gifts); at most ``max_queue`` queries wait,
and one that waited longer than ``max_wait_s`` is dropped unanswered (the
store decided from its snapshot long ago). Hostile input (a query on
another store's topic, malformed, a bomb) is refused by the bounded decode
(wire.messages), logged and counted; no message ends the loop.

On SQLite the reads use a connection of their own that begins deferred
transactions with ``PRAGMA query_only``: in WAL mode they never wait for the
ledger's writer (hq_bridge.db's engines begin every transaction IMMEDIATE,
which would). On PostgreSQL: REPEATABLE READ, READ ONLY.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import time
from concurrent.futures import ThreadPoolExecutor

import aiomqtt
from sqlalchemy import create_engine, event, select
from sqlalchemy.engine import Engine

from common import mqtt
from hq_bridge import db
from hq_bridge.accounts import Grouped, account_rows, limited_accounts, member_rows_query
from hq_bridge.reconcile import day_gift_counts
from wire.messages import MAX_DAY_GIFT_COUNT, MAX_DAY_GIFT_KINDS, AccountQuery, AccountReply, WireError
from wire.topics import Topics

log = logging.getLogger("storegate.hq.lookup")

MAX_PRIMARIES = 16     # primary cards of one account read per query (a group account may hold thousands of cards)


def read_engine(engine: Engine) -> Engine:
    """An engine for read-only look-ups on the same database."""
    if engine.dialect.name != "sqlite":
        return engine
    ro = create_engine(engine.url, pool_size=8, max_overflow=8)

    @event.listens_for(ro, "connect")
    def _connect(dbapi_conn, _record):
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA busy_timeout=2000")
        cur.execute("PRAGMA query_only=ON")
        cur.close()

    @event.listens_for(ro, "begin")
    def _begin(conn):
        conn.exec_driver_sql("BEGIN")   # deferred: a reader, never the writer's lock

    return ro


def lookup_account(conn, store: str, card_no: str) -> tuple[dict | None, dict | None, int]:
    """(the card's member row, its primary card's row or None, the store's
    watermark), read on ``conn`` in one transaction; (None, None, mark) for
    a card HQ does not know."""
    w = db.account_watermarks
    mark = conn.execute(select(w.c.seq).where(w.c.store == store)).scalar() or 0
    a, c = db.accounts, db.cards
    aid = conn.execute(select(c.c.account_id).where(c.c.card_no == card_no)).scalar()
    if aid is None:
        return None, None, mark
    # The cards account_rows needs to pick the account's main card as the snapshot does:
    # the one asked for, the primaries, and the account's first card.
    wanted = {card_no, *conn.execute(select(c.c.card_no).where(c.c.account_id == aid, c.c.role == "primary")
                                     .order_by(c.c.card_no).limit(MAX_PRIMARIES)).scalars(),
              *conn.execute(select(c.c.card_no).where(c.c.account_id == aid).order_by(c.c.card_no).limit(1))
              .scalars()}
    q = member_rows_query().where(a.c.account_id == aid, c.c.card_no.in_(sorted(wanted))).order_by(c.c.card_no)
    group = list(conn.execute(q))
    if not group:
        return None, None, mark
    pkg = conn.execute(select(db.packages.c.account_id, db.packages.c.package_id, db.packages.c.uses_left,
                              db.packages.c.expires)
                       .where(db.packages.c.account_id == aid).order_by(db.packages.c.package_id)).all()
    cp = conn.execute(select(db.coupons.c.account_id, db.coupons.c.code)
                      .where(db.coupons.c.account_id == aid, db.coupons.c.state == "issued")
                      .order_by(db.coupons.c.code)).all()
    limited = limited_accounts(conn, [aid])   # reconciliation's "limit" holds online too
    rows = {r["card_no"]: r for r in account_rows(group, Grouped(pkg), Grouped(cp), limited)}
    row = rows.get(card_no)
    if row is None:
        return None, None, mark
    primary = rows.get(row["primary_card"]) if row.get("primary_card") else None
    holder = primary if row.get("primary_card") else row    # the row with the account's balances and day
    today = (holder or {}).get("today")
    if today:
        gifts = day_gift_counts(conn, aid, today["day"])
        if gifts:
            today["gifts"] = day_gifts(gifts)
    return row, primary, mark


def day_gifts(counts: dict[str, int]) -> dict[str, int]:
    """The day's gift counts within the wire's bounds (account_reply
    ``today.gifts``): at most MAX_DAY_GIFT_KINDS ids (the most given first)."""
    top = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:MAX_DAY_GIFT_KINDS]
    return {gid: min(n, MAX_DAY_GIFT_COUNT) for gid, n in sorted(top)}


class LookupService:
    def __init__(self, mqtt_settings: dict, engine: Engine, *, client_id: str | None = None,
                 share_group: str | None = "hq", max_queue: int = 1000, max_wait_s: float = 1.0,
                 threads: int = 4) -> None:
        self.mqtt_settings = mqtt_settings
        self.engine = engine
        self.read_engine = read_engine(engine)
        self.topics = Topics(mqtt_settings.get("prefix", "sg/v1"))
        self.share_group = share_group
        self.client_id = client_id or f"storegate-hq-lookup-{os.getpid()}-{secrets.token_hex(3)}"
        self.max_wait_s = max_wait_s
        self.threads = threads
        self.connected = asyncio.Event()
        self._queue: asyncio.Queue = asyncio.Queue(max_queue)
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="hq-lookup")
        self.stats = {"queries": 0, "answered": 0, "not_found": 0, "dropped": 0, "bad_messages": 0, "errors": 0}
        self.answer_ms: list[float] = []   # the last answers' read + encode time (for bench / status)

    # -- one answer (a worker thread) ----------------------------------------------

    def answer(self, store: str, query: AccountQuery) -> AccountReply:
        """HQ's live account for the query, read in one read-only transaction."""
        conn = self.read_engine.connect()
        try:
            if self.read_engine.dialect.name == "postgresql":
                conn = conn.execution_options(isolation_level="REPEATABLE READ", postgresql_readonly=True)
            with conn.begin():
                row, primary, mark = lookup_account(conn, store, query.card_no)
        finally:
            conn.close()
        return AccountReply(store, query.id, query.card_no, row is not None, row, mark,
                            int(time.time() * 1000), primary)

    # -- the service -----------------------------------------------------------------

    async def run(self) -> None:
        backoff = mqtt.Backoff()
        try:
            while True:
                try:
                    # Clean session: a query nobody answered while we were away is worth nothing now.
                    async with mqtt.client(self.mqtt_settings, identifier=self.client_id) as client:
                        backoff.reset()
                        await client.subscribe(self.topics.all_account_queries(self.share_group), qos=0)
                        self.connected.set()
                        log.info("HQ account look-ups connected (%s)", self.client_id)
                        try:
                            async with asyncio.TaskGroup() as tasks:
                                for i in range(self.threads):
                                    tasks.create_task(self._work(client), name=f"lookup-{i}")
                                tasks.create_task(self._receive(client), name="lookup-receive")
                        finally:
                            self.connected.clear()
                except* aiomqtt.MqttError as group:
                    log.warning("HQ account look-ups disconnected: %s", group.exceptions[0])
                await asyncio.sleep(backoff.next_delay())
        finally:
            self._pool.shutdown(wait=False, cancel_futures=True)

    async def _receive(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            self.stats["queries"] += 1
            topic = str(message.topic)
            payload = message.payload if isinstance(message.payload, bytes) else str(message.payload or "").encode()
            try:
                store = self.topics.store_of_account_query(topic)
                query = AccountQuery.decode(payload)
                if query.store != store:
                    raise WireError(f"a query of store {query.store!r} on store {store}'s topic")
            except (ValueError, WireError) as exc:
                self.stats["bad_messages"] += 1
                log.warning("ignored an account query on %s: %s", topic[:200], str(exc)[:300])
                continue
            try:
                self._queue.put_nowait((time.monotonic(), store, query))
            except asyncio.QueueFull:
                self.stats["dropped"] += 1

    async def _work(self, client: aiomqtt.Client) -> None:
        loop = asyncio.get_running_loop()
        while True:
            received, store, query = await self._queue.get()
            if time.monotonic() - received > self.max_wait_s:
                self.stats["dropped"] += 1   # the store stopped waiting long ago
                continue
            t0 = time.perf_counter()
            try:
                reply = await loop.run_in_executor(self._pool, self.answer, store, query)
                payload = reply.encode()
            except WireError as exc:   # a row too big for the wire: the store decides from its snapshot
                self.stats["errors"] += 1
                log.warning("store %s: no live answer for card ****%s: %s", store, query.card_no[-4:], exc)
                continue
            except Exception:   # a database fault: this query goes unanswered, the service goes on
                self.stats["errors"] += 1
                log.exception("store %s: account look-up failed", store)
                continue
            await client.publish(self.topics.account_reply(store), payload, qos=0)
            self.stats["answered" if reply.found else "not_found"] += 1
            self.answer_ms.append((time.perf_counter() - t0) * 1000)
            if len(self.answer_ms) > 1000:
                del self.answer_ms[:500]
