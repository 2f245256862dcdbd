"""HQ's rule sets: authored layers in the HQ database, merged per store,
signed, published as content-addressed parts plus a manifest; the member
parts built from HQ's accounts of record.

Data (HQ's database, SQLite or PostgreSQL, the tables of hq_bridge/db.py):

- ``rule_layers``      the current authored layer per scope: ``chain``, ``region:<id>``, ``store:<id>``
- ``rule_snapshots``   the member parts last built (scope ``accounts``), for ops
- ``rule_manifests``   the manifest each store was last sent (resync, fleet)
- ``deny_list``        the chain-wide deny list now; ``deny_log`` one row per deny version
- ``retained_parts``   part topics holding a retained payload on the broker (cleared when unused)

Part payloads are kept in ``hq.parts_dir`` by sha256, so HQ can publish them
again (resync, a broker that lost its retained messages).

Member snapshots: every publish (``rules publish``, ``rules snapshot``,
``rules republish``, a resync, a key rotation) builds the member parts from
HQ's accounts (``Publisher.member_snapshot``) with each store's watermark
read in the same transaction, so a store's ``store_seq`` means exactly "this
snapshot includes my records up to seq N". A members file (``--members``,
an inline ``[members]`` table) is an import into the accounts
(accounts.import_members: cards HQ holds already are never overwritten),
not the snapshot itself.

Which stores exist and their region: the ``[stores]`` table in hq.toml.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import aiomqtt
import orjson
from sqlalchemy import Engine, func, select

from common import mqtt
from hq_bridge import keys as hq_keys, migrations
from hq_bridge import accounts as hq_accounts
from hq_bridge import db
from hq_bridge.ledger import Ledger
from wire import ruleset as _rs
from wire.distribution import check_layer_header, effective_rules, layer_part_name
from wire.messages import (DENY_STATUSES, DenyDelta, Manifest, Part, WireError, encode_layer, encode_table,
                           _check)
from wire.ruleset import RulesetError
from wire.signing import public_key_b64, sign
from wire.topics import Topics, check_store_id

log = logging.getLogger("storegate.hq.rules")

MEMBERS_PER_PART = 100_000   # ~6 MB compressed: a gateway holds at most two in memory while fetching
TABLE_KEYS = ("members", "deny")



class PublishError(ValueError):
    """A publish refused before anything went out; the message says why."""


# -- authored files ------------------------------------------------------------

def _read_doc(path: str | Path) -> dict:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise RulesetError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        return json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as exc:
        raise RulesetError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'TOML'}: {exc}") from None


def load_layer_file(path: str | Path, level: str, ident: str) -> tuple[dict, dict | None, dict | None]:
    """An authored layer document: (layer, members, deny). A ``[layer]``
    header, if present, must agree with the command line's scope; big tables
    written inline (``[members.<card>]``, ``[deny.<card>]``) are taken out
    of the layer and published as snapshot parts."""
    doc = _read_doc(path)
    head = doc.get("layer")
    want = {"level": level, "id": ident}
    if head is None:
        if level == "chain":
            want["id"] = doc.get("chain", "chain")
        doc = {"layer": want, **doc}
    elif head.get("level") != level or (level != "chain" and head.get("id") != ident):
        raise RulesetError(f"{path}: its [layer] header {head} does not match the scope {want}")
    members = doc.pop("members", None)
    deny = doc.pop("deny", None)
    check_layer_header(doc, layer_part_name(level, ident))
    return doc, members, deny


def member_rows(members) -> Iterator[dict]:
    """Member rows from {card_no: {...}} or a list of rows."""
    if isinstance(members, dict):
        for card_no, m in members.items():
            yield {"card_no": card_no, **m}
    else:
        yield from members


def deny_rows(deny) -> Iterator[dict]:
    if isinstance(deny, dict):
        for card_no, d in deny.items():
            yield {"card_no": card_no, **d}
    else:
        yield from deny


def read_table_file(path: str | Path) -> Iterator[dict]:
    """Rows from NDJSON (``.ndjson``/``.jsonl``), JSON or TOML (a table keyed by card number)."""
    path = Path(path)
    if path.suffix in (".ndjson", ".jsonl"):
        with open(path, "rb") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        row = orjson.loads(line)
                    except orjson.JSONDecodeError as exc:
                        raise RulesetError(f"{path}:{n}: not JSON: {exc}") from None
                    if n == 1 and isinstance(row, dict) and "part" in row:
                        continue  # a part file's header line ({"part": "members", ...})
                    yield row
        return
    doc = _read_doc(path)
    if isinstance(doc, dict) and len(doc) == 1 and next(iter(doc)) in TABLE_KEYS:
        doc = next(iter(doc.values()))
    yield from member_rows(doc)


def check_member_row(row: dict, where: str) -> dict:
    if not isinstance(row, dict) or not isinstance(row.get("card_no"), str):
        raise RulesetError(f"{where}: a member row needs a card_no")
    try:
        _rs.check_member(row)
    except RulesetError as exc:
        raise RulesetError(f"{where}: {exc}") from None
    return row


def check_deny_row(row: dict, where: str) -> dict:
    row = {k: v for k, v in row.items() if k in ("card_no", "status", "since", "replaced_by")}
    try:
        _check("deny_delta.json", {"version": 1, "issued_at": 0, "entries": [row], "key_id": "0" * 16,
                                   "sig": "x" * 8}, where)
    except WireError as exc:
        raise RulesetError(str(exc)) from None
    if row["status"] == "active":
        raise RulesetError(f"{where}: a deny-list entry cannot be active")
    _rs.check_deny_entry(row)
    return row


# -- the HQ rule database ---------------------------------------------------------

class Catalog:
    """The rule publisher's tables (hq_bridge/db.py) on HQ's database: a path
    (SQLite), a database URL, or ``engine`` (the ledger's, shared). Part
    payloads are files in ``parts_dir`` (required with a database URL that is
    not SQLite; default ``parts/`` next to an SQLite file)."""

    def __init__(self, database: str | Path | None = None, parts_dir: str | Path | None = None, *,
                 engine: Engine | None = None, migrate: bool = True) -> None:
        engine, self._own_engine = db.engine_for(database, engine, "Catalog")
        self.engine = engine
        self.path = db.sqlite_path(engine.url.render_as_string(hide_password=False))
        if parts_dir:
            self.parts_dir = Path(parts_dir)
        elif self.path is not None:
            self.parts_dir = self.path.parent / "parts"
        else:
            raise ValueError("hq.parts_dir: required when hq.database is not an SQLite file")
        self.parts_dir.mkdir(parents=True, exist_ok=True)
        if migrate:
            migrations.migrate_once(engine)
        self._write_lock = db.writer_lock(engine)
        self._deny_cache: tuple[int, str, int] | None = None

    def close(self) -> None:
        if self._own_engine:
            self.engine.dispose()

    def _write(self, fn):
        return db.write(self.engine, fn, self._write_lock)

    def _read(self, fn):
        return db.read(self.engine, fn)

    # parts: content-addressed files
    def put_part(self, payload: bytes) -> tuple[str, int]:
        sha = hashlib.sha256(payload).hexdigest()
        dest = self.parts_dir / sha
        if not dest.exists():
            tmp = dest.with_name(f"{sha}.tmp-{os.getpid()}-{threading.get_ident()}")
            tmp.write_bytes(payload)
            os.replace(tmp, dest)
        return sha, len(payload)

    def part_bytes(self, sha: str) -> bytes:
        return (self.parts_dir / sha).read_bytes()

    # layers
    def set_layer(self, scope: str, doc: dict) -> None:
        row = {"scope": scope, "doc": json.dumps(doc), "updated_at": int(time.time())}
        self._write(lambda c: db.upsert(c, db.rule_layers, [row], ["scope"]))

    def delete_layer(self, scope: str) -> None:
        t = db.rule_layers
        self._write(lambda c: c.execute(t.delete().where(t.c.scope == scope)))

    def layer(self, scope: str) -> dict | None:
        t = db.rule_layers
        doc = self._read(lambda c: c.execute(select(t.c.doc).where(t.c.scope == scope)).scalar())
        return json.loads(doc) if doc is not None else None

    # member snapshots: parts built from HQ's accounts (Publisher.member_snapshot)
    def encode_members(self, rows: Iterable[dict]) -> tuple[list, int]:
        """Member rows into content-addressed parts (MEMBERS_PER_PART rows
        each): ([(sha256, size), ...], rows)."""
        parts, batch, n = [], [], 0
        for row in rows:
            n += 1
            batch.append(row)
            if len(batch) >= MEMBERS_PER_PART:
                parts.append(self.put_part(encode_table(batch)))
                batch = []
        if batch or not parts:
            parts.append(self.put_part(encode_table(batch)))
        return parts, n

    def set_snapshot(self, scope: str, parts: list, as_of: int, rows: int) -> None:
        """Keep the parts last built for ``scope`` (``accounts``: from HQ's accounts)."""
        row = {"scope": scope, "parts": json.dumps(parts), "as_of": as_of, "rows": rows,
               "updated_at": int(time.time())}
        self._write(lambda c: db.upsert(c, db.rule_snapshots, [row], ["scope"]))

    def snapshot(self, scope: str) -> tuple[list, int] | None:
        t = db.rule_snapshots
        row = self._read(lambda c: c.execute(select(t.c.parts, t.c.as_of).where(t.c.scope == scope)).first())
        return (json.loads(row[0]), row[1]) if row else None

    def snapshot_scopes(self) -> list[str]:
        t = db.rule_snapshots
        return self._read(lambda c: list(c.execute(select(t.c.scope).order_by(t.c.scope)).scalars()))

    # deny list
    @staticmethod
    def _deny_version(conn) -> int:
        return conn.execute(select(func.coalesce(func.max(db.deny_log.c.version), 0))).scalar()

    def deny_version(self) -> int:
        return self._read(self._deny_version)

    def _lock_deny(self, conn) -> None:
        """One deny version at a time (PostgreSQL: a transaction-scoped advisory lock)."""
        if db.is_postgres(conn):
            conn.exec_driver_sql("SELECT pg_advisory_xact_lock(7391001)")

    def deny_entries(self) -> dict[str, str]:
        """{card_no: status} of the deny list now."""
        t = db.deny_list
        return self._read(lambda c: dict(c.execute(select(t.c.card_no, t.c.status)).all()))

    def replace_deny(self, rows: Iterable[dict], reason: str) -> int:
        checked = [check_deny_row(r, f"deny row {i}") for i, r in enumerate(rows, 1)]
        now = int(time.time())
        t = db.deny_list

        def work(c):
            self._lock_deny(c)
            have = {r[0]: {k: v for k, v in zip(("card_no", "status", "since", "replaced_by"), r) if v is not None}
                    for r in c.execute(select(t.c.card_no, t.c.status, t.c.since, t.c.replaced_by))}
            version = self._deny_version(c)
            if have == {r["card_no"]: r for r in checked} and version:
                return version  # the same list again: no new deny version
            version += 1
            c.execute(t.delete())
            db.insert_rows(c, t, [{"card_no": r["card_no"], "status": r["status"], "since": r.get("since"),
                                   "replaced_by": r.get("replaced_by"), "version": version, "reason": reason,
                                   "updated_at": now} for r in checked])
            c.execute(db.deny_log.insert().values(version=version, issued_at=now,
                                                  doc=json.dumps({"snapshot": len(checked)}), reason=reason))
            return version
        return self._write(work)

    def deny_status(self, card_no: str) -> str | None:
        """The card's status on HQ's deny list now (None: not on it)."""
        t = db.deny_list
        return self._read(lambda c: c.execute(select(t.c.status).where(t.c.card_no == card_no)).scalar())

    def record_delta(self, entries: list[dict], reason: str, sign_fn, queued_at: int | None = None) -> DenyDelta:
        """Take the next deny version, apply ``entries`` to the deny list,
        keep the signed delta and put it in the outbox (``queued_at``, epoch
        ms), all in one transaction: it leaves the outbox once it is sent."""
        now = int(time.time())
        queued_at = now_ms() if queued_at is None else queued_at
        t = db.deny_list

        def work(c):
            self._lock_deny(c)
            version = self._deny_version(c) + 1
            delta = DenyDelta(sign_fn({"version": version, "issued_at": now, "entries": entries}))
            for e in entries:
                if e["status"] == "active":
                    c.execute(t.delete().where(t.c.card_no == e["card_no"]))
                else:
                    db.upsert(c, t, [{"card_no": e["card_no"], "status": e["status"], "since": e.get("since"),
                                      "replaced_by": e.get("replaced_by"), "version": version, "reason": reason,
                                      "updated_at": now}], ["card_no"])
            c.execute(db.deny_log.insert().values(version=version, issued_at=now, doc=delta.encode().decode(),
                                                  reason=reason))
            self._queue(c, [DENY_ITEM], reason, queued_at)
            return delta
        return self._write(work)

    def latest_delta(self) -> DenyDelta | None:
        t = db.deny_log
        doc = self._read(lambda c: c.execute(select(t.c.doc).where(t.c.doc.not_like('{"snapshot"%'))
                                             .order_by(t.c.version.desc()).limit(1)).scalar())
        return DenyDelta.decode(doc.encode()) if doc is not None else None

    def deny_part(self) -> tuple[int, str, int]:
        """(deny version, sha256, size) of the deny list now, as a table part
        (encoded once per deny version, however many stores are published)."""
        t = db.deny_list

        def work(c):
            version = self._deny_version(c)
            cached = self._deny_cache
            if cached and cached[0] == version and (self.parts_dir / cached[1]).exists():
                return version, None
            return version, c.execute(select(t.c.card_no, t.c.status, t.c.since, t.c.replaced_by)
                                      .order_by(t.c.card_no)).all()
        version, rows = self._read(work)
        if rows is None:
            return self._deny_cache
        if db.is_postgres(self.engine):
            rows.sort(key=lambda r: r[0])    # as Python orders them, whatever the collation
        table = ({k: v for k, v in zip(("card_no", "status", "since", "replaced_by"), r) if v is not None}
                 for r in rows)
        sha, size = self.put_part(encode_table(table))
        self._deny_cache = (version, sha, size)
        return self._deny_cache

    # manifests and retained parts
    def record_manifest(self, manifest: Manifest) -> None:
        row = {"store": manifest.store, "version": manifest.version, "doc": manifest.encode().decode(),
               "published_at": int(time.time())}
        self._write(lambda c: db.upsert(c, db.rule_manifests, [row], ["store"]))

    def manifest(self, store: str) -> Manifest | None:
        t = db.rule_manifests
        doc = self._read(lambda c: c.execute(select(t.c.doc).where(t.c.store == store)).scalar())
        return Manifest(json.loads(doc)) if doc is not None else None

    def manifests(self) -> dict[str, Manifest]:
        t = db.rule_manifests
        rows = self._read(lambda c: c.execute(select(t.c.store, t.c.doc)).all())
        return {s: Manifest(json.loads(d)) for s, d in rows}

    def retained(self) -> dict[str, str]:
        t = db.retained_parts
        return self._read(lambda c: dict(c.execute(select(t.c.topic, t.c.sha256)).all()))

    def mark_retained(self, topic: str, sha: str, present: bool) -> None:
        t = db.retained_parts
        if present:
            row = {"topic": topic, "sha256": sha, "published_at": int(time.time())}
            self._write(lambda c: db.upsert(c, t, [row], ["topic"]))
        else:
            self._write(lambda c: c.execute(t.delete().where(t.c.topic == topic)))


    # the outbox: stored at HQ, not sent yet (db.outbox)
    @staticmethod
    def _queue(conn, items: Iterable[str], reason: str, at_ms: int) -> None:
        db.upsert(conn, db.outbox, [{"item": i, "reason": reason[:200], "queued_at": at_ms} for i in items],
                  ["item"])

    def queue(self, items: Iterable[str], reason: str, at_ms: int) -> None:
        items = list(items)
        if items:
            self._write(lambda c: self._queue(c, items, reason, at_ms))

    def queued(self) -> list[tuple[str, str, int]]:
        """(item, reason, queued_at ms) of everything not sent yet, oldest first."""
        t = db.outbox
        return self._read(lambda c: [tuple(r) for r in c.execute(
            select(t.c.item, t.c.reason, t.c.queued_at).order_by(t.c.queued_at, t.c.item))])

    def release(self) -> None:
        """The command's own sending failed: the bridge takes what waits."""
        t = db.outbox
        self._write(lambda c: c.execute(t.update().where(t.c.released_at.is_(None)).values(released_at=now_ms())))

    def for_the_bridge(self, orphaned_before_ms: int) -> dict[str, int]:
        """{item: queued_at} the bridge sends: released, or queued before
        ``orphaned_before_ms`` (its command died without a word). Others are
        being sent by the command that queued them."""
        t = db.outbox
        return self._read(lambda c: dict(c.execute(select(t.c.item, t.c.queued_at).where(
            (t.c.released_at.is_not(None)) | (t.c.queued_at < orphaned_before_ms))).all()))

    def sent(self, item: str, built_at_ms: int) -> None:
        """``item`` has gone out as built at ``built_at_ms``: it leaves the
        outbox unless it was queued again after that."""
        t = db.outbox
        self._write(lambda c: c.execute(t.delete().where(t.c.item == item, t.c.queued_at <= built_at_ms)))


DENY_ITEM = "deny"
OUTBOX_ORPHANED_S = 600   # an item not released by then: its command died; the bridge sends it


def store_item(store: str) -> str:
    return f"store:{store}"


def now_ms() -> int:
    return int(time.time() * 1000)


# -- merging, signing, publishing ------------------------------------------------

@dataclass
class MemberParts:
    """Member parts built from HQ's accounts in one read transaction."""
    parts: list            # [(sha256, size), ...]: chain-wide rows, shared by every store
    watermarks: dict       # store -> seq: the snapshot includes that store's records up to it
    as_of: int             # epoch s
    rows: int


@dataclass
class Built:
    manifest: Manifest
    payloads: dict[str, str]  # topic -> sha256 (bytes in the catalog's parts dir)
    built_at: int = 0         # epoch ms when its building began (what HQ held then is in it)


class Publisher:
    """Builds and publishes signed manifests. ``stores`` maps store id ->
    {"region": ...} (hq.toml [stores])."""

    def __init__(self, mqtt_settings: dict, ledger: Ledger, catalog: Catalog, key_path: str | Path,
                 stores: dict[str, dict]) -> None:
        self.mqtt_settings = mqtt_settings
        self.ledger = ledger
        self.catalog = catalog
        self.key_path = Path(key_path)
        self.stores = stores
        self.topics = Topics(mqtt_settings.get("prefix", "sg/v1"))

    # scope helpers
    def region_of(self, store: str) -> str | None:
        try:
            return self.stores[store].get("region")
        except KeyError:
            raise PublishError(f"store {store!r} is not in the [stores] table of hq.toml") from None

    def affected(self, *, store: str | None = None, region: str | None = None, all_: bool = False) -> list[str]:
        if store:
            self.region_of(check_store_id(store))
            return [store]
        if region:
            stores = sorted(s for s, v in self.stores.items() if v.get("region") == region)
            if not stores:
                raise PublishError(f"no store in [stores] of hq.toml is in region {region!r}")
            return stores
        if all_:
            return sorted(self.stores)
        raise PublishError("say which stores: --store S, --region R or --all")

    @staticmethod
    def scope_key(*, store=None, region=None, all_=False) -> tuple[str, str, str]:
        """(layer scope, layer level, layer id) for the command line's scope."""
        if store:
            return f"store:{store}", "store", store
        if region:
            return f"region:{region}", "region", region
        return "chain", "chain", ""

    def sign(self, doc: dict) -> dict:
        return sign(doc, hq_keys.load_private(self.key_path))

    # building
    def layers_for(self, store: str) -> list[tuple[str, dict]]:
        region = self.region_of(store)
        out = []
        for scope, level, ident in (("chain", "chain", ""), (f"region:{region}", "region", region),
                                    (f"store:{store}", "store", store)):
            if level == "region" and not region:
                continue
            doc = self.catalog.layer(scope)
            if doc is not None:
                out.append((layer_part_name(level, ident), doc))
        if not out:
            raise PublishError(f"store {store}: no layer published yet (publish a chain layer with --all)")
        return out

    # member snapshots from HQ's accounts
    def member_snapshot(self, stores: list[str], *, as_of: int | None = None) -> "MemberParts | None":
        """The member part(s) for ``stores``, built from HQ's accounts of record
        (hq_bridge/accounts.py ``snapshot_rows``) with each store's watermark
        read in the same transaction (REPEATABLE READ on PostgreSQL; one read
        transaction on SQLite under WAL): the snapshot includes exactly that
        store's records up to that seq, so the store keeps what it journaled
        after it and nothing is handed back. The rows are chain-wide and the
        parts content-addressed: every store shares them; only the watermark,
        in each store's manifest, differs. None: HQ holds no card yet (no
        members part is sent; a store keeps what it has)."""
        engine = self.ledger.engine
        as_of = int(time.time()) if as_of is None else int(as_of)

        def read(conn):
            if conn.execute(select(db.cards.c.card_no).limit(1)).first() is None:
                return None
            marks = {s: hq_accounts.snapshot_rows(conn, s, as_of=as_of).watermark for s in stores}
            rows = hq_accounts.snapshot_rows(conn, stores[0] if stores else "", as_of=as_of)
            parts, n = self.catalog.encode_members(rows)
            return MemberParts(parts, marks, as_of, n)

        with engine.connect() as conn:
            if db.is_postgres(conn):
                conn = conn.execution_options(isolation_level="REPEATABLE READ", readonly=True)
            else:
                conn = conn.execution_options(readonly=True)
            with conn.begin():
                snap = read(conn)
        if snap is not None:
            self.catalog.set_snapshot("accounts", snap.parts, as_of, snap.rows)
        return snap

    def import_members(self, rows: Iterable[dict], source: str) -> "hq_accounts.ImportResult":
        """An external member base into HQ's accounts (an import, never the
        source of truth: cards HQ has already are skipped, not overwritten).
        A bad row refuses the whole file, naming the row."""
        from hq_bridge.policy import chain_rules
        engine = self.ledger.engine

        def work(conn):     # the chain's account policy (points expiry, card validity) as stored now
            policy = hq_accounts.policy_from_rules(chain_rules(conn))
            return hq_accounts.import_members(conn, rows, policy=policy, source=source)
        try:
            return db.run_in_transaction(engine, work, attempts=3)
        except (hq_accounts.ImportError_, RulesetError) as exc:
            raise PublishError(f"{source}: {exc}") from None

    def build(self, store: str, *, version: int | None = None, now: float | None = None,
              members: "MemberParts | None | bool" = True) -> Built:
        """``members``: the member parts to send (``member_snapshot``), None
        for none, True (default) to build them from the accounts now."""
        region = self.region_of(store)
        layers = self.layers_for(store)
        try:
            effective = effective_rules([doc for _name, doc in layers], store=store, region=region)
        except RulesetError as exc:
            raise RulesetError(f"store {store}: {exc}") from None
        parts: list[Part] = []
        payloads: dict[str, str] = {}

        def add(name: str, sha: str, size: int, store_only: bool, encoding: str) -> None:
            topic = self.topics.store_part(store, sha) if store_only else self.topics.chain_part(sha)
            parts.append(Part(name, sha, size, topic, encoding))
            payloads[topic] = sha

        for name, doc in layers:
            sha, size = self.catalog.put_part(encode_layer(doc))
            add(name, sha, size, name.startswith("layer:store:"), "json")
        members_meta = None
        if members is True:
            members = self.member_snapshot([store])
        if members is not None:
            for sha, size in members.parts:
                add("members", sha, size, False, "ndjson+zlib")
            members_meta = {"as_of": members.as_of, "store_seq": members.watermarks[store]}
        deny_version, sha, size = self.catalog.deny_part()
        add("deny", sha, size, False, "ndjson+zlib")
        nxt = hq_keys.load_next(self.key_path)
        doc = Manifest.unsigned(
            store=store, version=version or self.ledger.next_rules_version(f"store:{store}"),
            issued_at=int(now if now is not None else time.time()), max_age_s=effective.get("max_age_s", 604800),
            region=region, parts=parts, members=members_meta, deny_version=deny_version,
            next_key=public_key_b64(nxt) if nxt else None)
        return Built(Manifest(self.sign(doc)), payloads)

    # publishing
    async def publish_built(self, client: aiomqtt.Client, built: Built, *, force_parts: bool = False) -> None:
        retained = self.catalog.retained()
        for topic, sha in built.payloads.items():
            if force_parts or retained.get(topic) != sha:
                await client.publish(topic, self.catalog.part_bytes(sha), qos=1, retain=True)
                self.catalog.mark_retained(topic, sha, True)
        m = built.manifest
        await client.publish(self.topics.rules(m.store), m.encode(), qos=1, retain=True)
        self.catalog.record_manifest(m)
        if built.built_at:
            self.catalog.sent(store_item(m.store), built.built_at)
        log.info("published rules v%d to store %s (%d parts)", m.version, m.store, len(built.payloads))

    async def collect_garbage(self, client: aiomqtt.Client) -> int:
        """Clear retained parts no current manifest refers to."""
        used = {p.topic for m in self.catalog.manifests().values() for p in m.parts}
        cleared = 0
        for topic in self.catalog.retained():
            if topic not in used:
                await client.publish(topic, b"", qos=1, retain=True)
                self.catalog.mark_retained(topic, "", False)
                cleared += 1
        return cleared

    async def publish_stores(self, stores: list[str], client: aiomqtt.Client | None = None,
                             force_parts: bool = False, as_of: int | None = None) -> list[Manifest]:
        built_at = now_ms()
        members = self.member_snapshot(stores, as_of=as_of)   # once for all: the parts are shared
        builts = [self.build(s, members=members) for s in stores]  # everything checked before anything goes out
        for b in builts:
            b.built_at = built_at
        # Queued before the broker is tried: each store leaves the outbox as its manifest goes out.
        self.catalog.queue(map(store_item, stores), "rules for " + ", ".join(stores[:5])
                           + (f" and {len(stores) - 5} more" if len(stores) > 5 else ""), built_at)
        if client is None:
            async with mqtt.client(self.mqtt_settings, identifier=f"storegate-hq-publish-{os.getpid()}") as c:
                return await self._publish_all(c, builts, force_parts)
        return await self._publish_all(client, builts, force_parts)

    async def _publish_all(self, client, builts: list[Built], force_parts: bool) -> list[Manifest]:
        for b in builts:
            await self.publish_built(client, b, force_parts=force_parts)
        await self.collect_garbage(client)
        return [b.manifest for b in builts]

    async def resync(self, client: aiomqtt.Client, store: str) -> Manifest:
        """Answer a store's resync request: its manifest again with every part
        published again; a new version when the deny list has moved on."""
        current = self.catalog.manifest(store)
        announcing = hq_keys.load_next(self.key_path) is not None
        if current is not None and current.deny_version == self.catalog.deny_version() \
                and announcing == (current.next_key is not None):
            retained = {p.topic: p.sha256 for p in current.parts}
            await self.publish_built(client, Built(current, retained), force_parts=True)
            return current
        built = self.build(store)
        await self.publish_built(client, built, force_parts=True)
        return built.manifest

    async def send_queued(self, client: aiomqtt.Client) -> list[str]:
        """Send what commands stored and could not send (the broker was
        down): the latest deny delta, and the queued stores' rule sets built
        now from what HQ holds. Returns the items sent."""
        items = self.catalog.for_the_bridge(now_ms() - OUTBOX_ORPHANED_S * 1000)
        done = []
        if DENY_ITEM in items:
            delta = self.catalog.latest_delta()
            if delta is not None:
                await client.publish(self.topics.deny(), delta.encode(), qos=1, retain=True)
            self.catalog.sent(DENY_ITEM, items.pop(DENY_ITEM))
            done.append(DENY_ITEM)
        known = set(self.affected(all_=True))
        stores = []
        for item, at in items.items():
            store = item.removeprefix("store:")
            if store in known:
                stores.append(store)
            else:    # taken out of hq.toml since: nothing to send it to
                log.warning("outbox: %s is no longer in [stores]; dropped", item)
                self.catalog.sent(item, at)
        if stores:
            await self.publish_stores(stores, client)
            done += map(store_item, stores)
        return done

    # authoring commands
    async def publish_layer(self, file: str | Path, *, store=None, region=None, all_=False,
                            members_file=None, deny_file=None, as_of: int | None = None) -> list[Manifest]:
        stores = self.affected(store=store, region=region, all_=all_)
        if deny_file and not all_:
            raise PublishError("the deny list is chain-wide: replace it with --all")
        scope, level, ident = self.scope_key(store=store, region=region, all_=all_)
        layer, inline_members, inline_deny = load_layer_file(file, level, ident or "chain")
        if inline_deny is not None and not all_ and not self._deny_is_current(deny_rows(inline_deny)):
            raise PublishError("the deny list is chain-wide: publish [deny] tables with --all (or use "
                               "`storegate-hq card ...`)")
        # check the merge for every affected store before storing anything
        previous = self.catalog.layer(scope)
        self.catalog.set_layer(scope, layer)
        try:
            for s in stores:
                try:
                    effective_rules([d for _n, d in self.layers_for(s)], store=s, region=self.region_of(s))
                except RulesetError as exc:
                    raise RulesetError(f"store {s}: {exc}") from None
        except (RulesetError, PublishError):
            if previous is None:
                    self.catalog.delete_layer(scope)
            else:
                self.catalog.set_layer(scope, previous)
            raise
        self._take_tables(store=store, region=region, all_=all_,
                          members=read_table_file(members_file) if members_file else
                          (member_rows(inline_members) if inline_members is not None else None),
                          deny=read_table_file(deny_file) if deny_file else
                          (deny_rows(inline_deny) if inline_deny is not None else None),
                          source=str(members_file) if members_file else f"{file} [members]")
        return await self.publish_stores(stores, as_of=as_of)

    def _take_tables(self, *, store, region, all_, members, deny, source: str = "members") -> None:
        """Deny first (checked before anything is imported), then members into the accounts."""
        if deny is not None:
            deny = list(deny)
            if not all_:  # an inline [deny] table in a region/store layer: only if it changes nothing
                if not self._deny_is_current(deny):
                    raise PublishError("the deny list is chain-wide: replace it with --all")
            else:
                for i, r in enumerate(deny, 1):
                    check_deny_row(r, f"deny row {i}")
        if members is not None:
            res = self.import_members(members, f"import:{Path(source).name}"[:80])
            log.info("members imported into HQ's accounts from %s: %d account(s), %d card(s); %d card(s) HQ "
                     "holds already kept as they are", source, res.accounts, res.cards, len(res.skipped))
        if deny is not None and all_:
            self.catalog.replace_deny(deny, "snapshot")

    def _deny_is_current(self, deny) -> bool:
        """An inline deny table under --store/--region: accepted if it adds nothing new."""
        have = self.catalog.deny_entries()
        return all(have.get(r["card_no"]) == r["status"] for r in deny)

    async def snapshot(self, *, store=None, region=None, all_=False, members_file=None, deny_file=None,
                       as_of: int | None = None) -> list[Manifest]:
        stores = self.affected(store=store, region=region, all_=all_)
        if deny_file and not all_:
            raise PublishError("the deny list is chain-wide: replace it with --all")
        self._take_tables(store=store, region=region, all_=all_,
                          members=read_table_file(members_file) if members_file else None,
                          deny=read_table_file(deny_file) if deny_file else None,
                          source=str(members_file or "members"))
        return await self.publish_stores(stores, as_of=as_of)

    async def deny_entries(self, entries: list[dict], reason: str, client: aiomqtt.Client | None = None) -> DenyDelta:
        """A signed deny delta of ready entries (checked against the schema) to
        every store. Kept in the outbox before the broker is tried (``client``
        None: a connection of its own), so the bridge sends it if this cannot."""
        try:
            _check("deny_delta.json", {"version": 1, "issued_at": 0, "entries": entries, "key_id": "0" * 16,
                                       "sig": "x" * 8}, "deny entries")
        except WireError as exc:
            raise PublishError(str(exc)) from None
        at = now_ms()
        delta = self.catalog.record_delta(entries, reason, self.sign, queued_at=at)
        await self._send_delta(delta, at, client)
        return delta

    async def _send_delta(self, delta: DenyDelta, queued_at: int, client: aiomqtt.Client | None) -> None:
        if client is None:
            async with mqtt.client(self.mqtt_settings, identifier=f"storegate-hq-deny-{os.getpid()}") as c:
                await c.publish(self.topics.deny(), delta.encode(), qos=1, retain=True)
        else:
            await client.publish(self.topics.deny(), delta.encode(), qos=1, retain=True)
        self.catalog.sent(DENY_ITEM, queued_at)

    async def card_action(self, action: str, card_no: str, reason: str, *, status: str | None = None,
                          new_card: str | None = None, activate_new: bool = True,
                          client: aiomqtt.Client | None = None, hq_own: bool = True,
                          user: str = "admin") -> DenyDelta:
        """A signed deny delta to every store. ``hq_own``: HQ's own command
        (``storegate-hq card``): on a card HQ holds it is the card service it
        means (hq_bridge/members.py ``deny_list_action``), so the next member
        snapshot agrees with the deny list; False for a broadcast of what a
        counter did (the accounts applied that record already)."""
        entries = card_entries(action, card_no, status=status, new_card=new_card, activate_new=activate_new)
        if hq_own:
            from hq_bridge.accounts import deny_entries
            from hq_bridge.members import MemberError, deny_list_action
            from hq_bridge.policy import chain_rules
            try:
                done = db.run_in_transaction(self.ledger.engine, lambda conn: deny_list_action(
                    conn, action, card_no, status=status, new_card_no=new_card, reason=reason, user=user,
                    rules=chain_rules(conn)))
            except MemberError as exc:
                raise PublishError(str(exc)) from None
            if done is not None:
                entries = deny_entries(done.cards_changed)
        at = now_ms()
        delta = self.catalog.record_delta(entries, reason, self.sign, queued_at=at)
        await self._send_delta(delta, at, client)
        log.info("deny delta v%d: %s card ****%s", delta.version, action, card_no[-4:])
        return delta


def card_entries(action: str, card_no: str, *, status: str | None = None, new_card: str | None = None,
                 today: str | None = None, activate_new: bool = True) -> list[dict]:
    """The deny-delta entries of a card action. ``replace`` also lifts any
    deny of the new card (``active``) unless ``activate_new`` is False: HQ's
    own command may lift one, a store's counter may not."""
    since = today or time.strftime("%Y-%m-%d")
    if action == "deny":
        status = status or "lost"
        if status not in DENY_STATUSES:
            raise PublishError(f"--status {status!r}: one of {', '.join(DENY_STATUSES)}")
        if status in ("blocked", "limited"):   # an account's debt: reconciliation's to set and lift, not a card's
            raise PublishError(f"--status {status}: set by reconciliation (storegate-hq reconcile) on an overdrawn "
                               "account and lifted when it is settled; not by hand")
        entries = [{"card_no": card_no, "status": status, "since": since}]
    elif action == "freeze":
        entries = [{"card_no": card_no, "status": "frozen", "since": since}]
    elif action == "unfreeze":
        entries = [{"card_no": card_no, "status": "active"}]
    elif action == "replace":
        if not new_card:
            raise PublishError("card replace needs --new-card N")
        entries = [{"card_no": card_no, "status": "replaced", "since": since, "replaced_by": new_card}]
        if activate_new:
            entries.append({"card_no": new_card, "status": "active"})
    else:
        raise PublishError(f"unknown card action {action!r}")
    try:
        _check("deny_delta.json", {"version": 1, "issued_at": 0, "entries": entries, "key_id": "0" * 16,
                                   "sig": "x" * 8}, "card")
    except WireError as exc:
        raise PublishError(str(exc)) from None
    return entries


# -- a rule set without a broker or database: provisioning and tests -----------

def offline_rule_set(layer_docs: list[dict], *, store: str, version: int, issued_at: int, key,
                     region: str | None = None, members=None, deny=None, as_of: int = 0, store_seq: int = 0,
                     deny_version: int = 0, prefix: str = "sg/v1", next_key: str | None = None,
                     max_age_s: int | None = None) -> tuple[bytes, dict[str, bytes]]:
    """A signed manifest and its parts ({sha256: payload}) from layer
    documents and tables, as HQ would publish them. ``key``: an Ed25519
    private key. Inline ``members``/``deny`` tables in the layers are taken
    out as parts, like ``rules publish`` does."""
    topics = Topics(prefix)
    layers, inline_m, inline_d = [], [], []
    for doc in layer_docs:
        doc = dict(doc)
        inline_m.extend(member_rows(doc.pop("members", {})))
        inline_d.extend(deny_rows(doc.pop("deny", {})))
        layers.append(doc)
    effective = effective_rules(layers, store=store, region=region)
    payloads: dict[str, bytes] = {}
    parts: list[Part] = []

    def add(name: str, payload: bytes, store_only: bool, encoding: str) -> None:
        sha = hashlib.sha256(payload).hexdigest()
        payloads[sha] = payload
        topic = topics.store_part(store, sha) if store_only else topics.chain_part(sha)
        parts.append(Part(name, sha, len(payload), topic, encoding))

    for doc in layers:
        head = doc.get("layer") or {"level": "chain", "id": doc.get("chain", "chain")}
        if "layer" not in doc:
            doc["layer"] = head
        add(layer_part_name(head["level"], head.get("id", "")), encode_layer(doc), head["level"] == "store", "json")
    rows = list(member_rows(members)) if members is not None else inline_m
    add("members", encode_table(rows), False, "ndjson+zlib")
    add("deny", encode_table(list(deny_rows(deny)) if deny is not None else inline_d), False, "ndjson+zlib")
    doc = Manifest.unsigned(store=store, version=version, issued_at=issued_at,
                            max_age_s=max_age_s or effective.get("max_age_s", 604800), region=region, parts=parts,
                            members={"as_of": as_of, "store_seq": store_seq}, deny_version=deny_version,
                            next_key=next_key)
    return Manifest(sign(doc, key)).encode(), payloads
