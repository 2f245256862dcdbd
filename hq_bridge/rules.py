"""HQ's rule sets: authored layers and snapshots in the HQ database, merged
per store, signed, published as content-addressed parts plus a manifest.

Data (same SQLite file as the ledger, own tables):

- ``rule_layers``      the current authored layer per scope: ``chain``, ``region:<id>``, ``store:<id>``
- ``rule_snapshots``   member snapshot parts per scope (``all``, ``region:<id>``, ``store:<id>``)
- ``rule_manifests``   the manifest each store was last sent (resync, fleet)
- ``deny_list``        the chain-wide deny list now; ``deny_log`` one row per deny version
- ``retained_parts``   part topics holding a retained payload on the broker (cleared when unused)

Part payloads are kept in ``hq.parts_dir`` by sha256, so HQ can publish them
again (resync, a broker that lost its retained messages).

Which stores exist and their region: the ``[stores]`` table in hq.toml.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sqlite3
import threading
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import aiomqtt
import orjson

from common import mqtt
from hq_bridge import keys as hq_keys
from hq_bridge.ledger import Ledger, open_schema
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

SCHEMA = """
CREATE TABLE IF NOT EXISTS rule_layers (scope TEXT PRIMARY KEY, doc TEXT NOT NULL, updated_at INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS rule_snapshots (scope TEXT PRIMARY KEY, parts TEXT NOT NULL, as_of INTEGER NOT NULL,
    rows INTEGER NOT NULL, updated_at INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS rule_manifests (store TEXT PRIMARY KEY, version INTEGER NOT NULL, doc TEXT NOT NULL,
    published_at INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS deny_list (card_no TEXT PRIMARY KEY, status TEXT NOT NULL, since TEXT, replaced_by TEXT,
    version INTEGER NOT NULL, reason TEXT, updated_at INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS deny_log (version INTEGER PRIMARY KEY, issued_at INTEGER NOT NULL, doc TEXT NOT NULL,
    reason TEXT);
CREATE TABLE IF NOT EXISTS retained_parts (topic TEXT PRIMARY KEY, sha256 TEXT NOT NULL, published_at INTEGER NOT NULL);
"""


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
    def __init__(self, database: str | Path, parts_dir: str | Path | None = None) -> None:
        self.path = Path(database)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.parts_dir = Path(parts_dir) if parts_dir else self.path.parent / "parts"
        self.parts_dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
        open_schema(self._conn, SCHEMA)

    def close(self) -> None:
        self._conn.close()

    def _tx(self):
        conn = self._conn

        class _T:
            def __enter__(s):
                self._lock.acquire()
                conn.execute("BEGIN IMMEDIATE")
                return conn

            def __exit__(s, et, ev, tb):
                try:
                    conn.execute("ROLLBACK" if et else "COMMIT")
                finally:
                    self._lock.release()
        return _T()

    # parts: content-addressed files
    def put_part(self, payload: bytes) -> tuple[str, int]:
        sha = hashlib.sha256(payload).hexdigest()
        dest = self.parts_dir / sha
        if not dest.exists():
            tmp = dest.with_name(sha + ".tmp")
            tmp.write_bytes(payload)
            os.replace(tmp, dest)
        return sha, len(payload)

    def part_bytes(self, sha: str) -> bytes:
        return (self.parts_dir / sha).read_bytes()

    # layers
    def set_layer(self, scope: str, doc: dict) -> None:
        with self._tx() as c:
            c.execute("INSERT INTO rule_layers(scope, doc, updated_at) VALUES (?,?,?) ON CONFLICT(scope) DO UPDATE "
                      "SET doc=excluded.doc, updated_at=excluded.updated_at", (scope, json.dumps(doc), int(time.time())))

    def layer(self, scope: str) -> dict | None:
        with self._lock:
            row = self._conn.execute("SELECT doc FROM rule_layers WHERE scope=?", (scope,)).fetchone()
        return json.loads(row[0]) if row else None

    # member snapshots
    def set_snapshot(self, scope: str, rows: Iterable[dict], as_of: int) -> int:
        """Encode members into parts (MEMBERS_PER_PART rows each), keep them for ``scope``."""
        parts, batch, n = [], [], 0
        for row in rows:
            n += 1
            batch.append(check_member_row(row, f"members row {n}"))
            if len(batch) >= MEMBERS_PER_PART:
                parts.append(self.put_part(encode_table(batch)))
                batch = []
        if batch or not parts:
            parts.append(self.put_part(encode_table(batch)))
        with self._tx() as c:
            c.execute("INSERT INTO rule_snapshots(scope, parts, as_of, rows, updated_at) VALUES (?,?,?,?,?) "
                      "ON CONFLICT(scope) DO UPDATE SET parts=excluded.parts, as_of=excluded.as_of, "
                      "rows=excluded.rows, updated_at=excluded.updated_at",
                      (scope, json.dumps(parts), as_of, n, int(time.time())))
        return n

    def snapshot(self, scope: str) -> tuple[list, int] | None:
        with self._lock:
            row = self._conn.execute("SELECT parts, as_of FROM rule_snapshots WHERE scope=?", (scope,)).fetchone()
        return (json.loads(row[0]), row[1]) if row else None

    # deny list
    def deny_version(self) -> int:
        with self._lock:
            return self._conn.execute("SELECT COALESCE(MAX(version), 0) FROM deny_log").fetchone()[0]

    def replace_deny(self, rows: Iterable[dict], reason: str) -> int:
        checked = [check_deny_row(r, f"deny row {i}") for i, r in enumerate(rows, 1)]
        now = int(time.time())
        with self._tx() as c:
            have = {r[0]: {k: v for k, v in zip(("card_no", "status", "since", "replaced_by"), r) if v is not None}
                    for r in c.execute("SELECT card_no, status, since, replaced_by FROM deny_list")}
            version = c.execute("SELECT COALESCE(MAX(version), 0) FROM deny_log").fetchone()[0]
            if have == {r["card_no"]: r for r in checked} and version:
                return version  # the same list again: no new deny version
            version += 1
            c.execute("DELETE FROM deny_list")
            c.executemany("INSERT INTO deny_list(card_no, status, since, replaced_by, version, reason, updated_at) "
                          "VALUES (?,?,?,?,?,?,?)",
                          [(r["card_no"], r["status"], r.get("since"), r.get("replaced_by"), version, reason, now)
                           for r in checked])
            c.execute("INSERT INTO deny_log(version, issued_at, doc, reason) VALUES (?,?,?,?)",
                      (version, now, json.dumps({"snapshot": len(checked)}), reason))
        return version

    def deny_status(self, card_no: str) -> str | None:
        """The card's status on HQ's deny list now (None: not on it)."""
        with self._lock:
            row = self._conn.execute("SELECT status FROM deny_list WHERE card_no=?", (card_no,)).fetchone()
        return row[0] if row else None

    def record_delta(self, entries: list[dict], reason: str, sign_fn) -> DenyDelta:
        """Take the next deny version, apply ``entries`` to the deny list and
        keep the signed delta, all in one transaction."""
        now = int(time.time())
        with self._tx() as c:
            version = c.execute("SELECT COALESCE(MAX(version), 0) FROM deny_log").fetchone()[0] + 1
            delta = DenyDelta(sign_fn({"version": version, "issued_at": now, "entries": entries}))
            for e in entries:
                if e["status"] == "active":
                    c.execute("DELETE FROM deny_list WHERE card_no=?", (e["card_no"],))
                else:
                    c.execute("INSERT INTO deny_list(card_no, status, since, replaced_by, version, reason, updated_at) "
                              "VALUES (?,?,?,?,?,?,?) ON CONFLICT(card_no) DO UPDATE SET status=excluded.status, "
                              "since=excluded.since, replaced_by=excluded.replaced_by, version=excluded.version, "
                              "reason=excluded.reason, updated_at=excluded.updated_at",
                              (e["card_no"], e["status"], e.get("since"), e.get("replaced_by"), version, reason, now))
            c.execute("INSERT INTO deny_log(version, issued_at, doc, reason) VALUES (?,?,?,?)",
                      (version, now, delta.encode().decode(), reason))
        return delta

    def latest_delta(self) -> DenyDelta | None:
        with self._lock:
            row = self._conn.execute("SELECT doc FROM deny_log WHERE doc NOT LIKE '{\"snapshot\"%' "
                                     "ORDER BY version DESC LIMIT 1").fetchone()
        return DenyDelta.decode(row[0].encode()) if row else None

    def deny_part(self) -> tuple[int, str, int]:
        """(deny version, sha256, size) of the deny list now, as a table part
        (encoded once per deny version, however many stores are published)."""
        with self._lock:
            version = self._conn.execute("SELECT COALESCE(MAX(version), 0) FROM deny_log").fetchone()[0]
            cached = getattr(self, "_deny_cache", None)
            if cached and cached[0] == version and (self.parts_dir / cached[1]).exists():
                return cached
            rows = self._conn.execute("SELECT card_no, status, since, replaced_by FROM deny_list ORDER BY card_no"
                                      ).fetchall()
        table = ({k: v for k, v in zip(("card_no", "status", "since", "replaced_by"), r) if v is not None}
                 for r in rows)
        sha, size = self.put_part(encode_table(table))
        self._deny_cache = (version, sha, size)
        return self._deny_cache

    # manifests and retained parts
    def record_manifest(self, manifest: Manifest) -> None:
        with self._tx() as c:
            c.execute("INSERT INTO rule_manifests(store, version, doc, published_at) VALUES (?,?,?,?) "
                      "ON CONFLICT(store) DO UPDATE SET version=excluded.version, doc=excluded.doc, "
                      "published_at=excluded.published_at",
                      (manifest.store, manifest.version, manifest.encode().decode(), int(time.time())))

    def manifest(self, store: str) -> Manifest | None:
        with self._lock:
            row = self._conn.execute("SELECT doc FROM rule_manifests WHERE store=?", (store,)).fetchone()
        return Manifest(json.loads(row[0])) if row else None

    def manifests(self) -> dict[str, Manifest]:
        with self._lock:
            rows = self._conn.execute("SELECT store, doc FROM rule_manifests").fetchall()
        return {s: Manifest(json.loads(d)) for s, d in rows}

    def retained(self) -> dict[str, str]:
        with self._lock:
            return dict(self._conn.execute("SELECT topic, sha256 FROM retained_parts").fetchall())

    def mark_retained(self, topic: str, sha: str, present: bool) -> None:
        with self._tx() as c:
            if present:
                c.execute("INSERT OR REPLACE INTO retained_parts(topic, sha256, published_at) VALUES (?,?,?)",
                          (topic, sha, int(time.time())))
            else:
                c.execute("DELETE FROM retained_parts WHERE topic=?", (topic,))


# -- merging, signing, publishing ------------------------------------------------

@dataclass
class Built:
    manifest: Manifest
    payloads: dict[str, str]  # topic -> sha256 (bytes in the catalog's parts dir)


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

    def build(self, store: str, *, version: int | None = None, now: float | None = None) -> Built:
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
        for scope in (f"store:{store}", f"region:{region}" if region else None, "all"):
            snap = scope and self.catalog.snapshot(scope)
            if snap:
                shards, as_of = snap
                for sha, size in shards:
                    add("members", sha, size, scope.startswith("store:"), "ndjson+zlib")
                members_meta = {"as_of": as_of, "store_seq": self._store_seq(store)}
                break
        deny_version, sha, size = self.catalog.deny_part()
        add("deny", sha, size, False, "ndjson+zlib")
        nxt = hq_keys.load_next(self.key_path)
        doc = Manifest.unsigned(
            store=store, version=version or self.ledger.next_rules_version(f"store:{store}"),
            issued_at=int(now if now is not None else time.time()), max_age_s=effective.get("max_age_s", 604800),
            region=region, parts=parts, members=members_meta, deny_version=deny_version,
            next_key=public_key_b64(nxt) if nxt else None)
        return Built(Manifest(self.sign(doc)), payloads)

    def _store_seq(self, store: str) -> int:
        with self.ledger._lock:
            row = self.ledger._conn.execute("SELECT COALESCE(MAX(seq), 0) FROM transactions WHERE store=?",
                                            (store,)).fetchone()
        return row[0]

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
                             force_parts: bool = False) -> list[Manifest]:
        builts = [self.build(s) for s in stores]  # everything checked before anything goes out
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
                with self.catalog._tx() as c:
                    c.execute("DELETE FROM rule_layers WHERE scope=?", (scope,))
            else:
                self.catalog.set_layer(scope, previous)
            raise
        self._take_tables(store=store, region=region, all_=all_,
                          members=read_table_file(members_file) if members_file else
                          (member_rows(inline_members) if inline_members is not None else None),
                          deny=read_table_file(deny_file) if deny_file else
                          (deny_rows(inline_deny) if inline_deny is not None else None), as_of=as_of)
        return await self.publish_stores(stores)

    def _take_tables(self, *, store, region, all_, members, deny, as_of) -> None:
        snap_scope = f"store:{store}" if store else f"region:{region}" if region else "all"
        if members is not None:
            self.catalog.set_snapshot(snap_scope, members, int(as_of if as_of is not None else time.time()))
        if deny is not None:
            if not all_:  # an inline [deny] table in a region/store layer: only if it changes nothing
                if not self._deny_is_current(deny):
                    raise PublishError("the deny list is chain-wide: replace it with --all")
            else:
                self.catalog.replace_deny(deny, "snapshot")

    def _deny_is_current(self, deny) -> bool:
        """An inline deny table under --store/--region: accepted if it adds nothing new."""
        with self.catalog._lock:
            have = dict(self.catalog._conn.execute("SELECT card_no, status FROM deny_list").fetchall())
        return all(have.get(r["card_no"]) == r["status"] for r in deny)

    async def snapshot(self, *, store=None, region=None, all_=False, members_file=None, deny_file=None,
                       as_of: int | None = None) -> list[Manifest]:
        stores = self.affected(store=store, region=region, all_=all_)
        if deny_file and not all_:
            raise PublishError("the deny list is chain-wide: replace it with --all")
        self._take_tables(store=store, region=region, all_=all_,
                          members=read_table_file(members_file) if members_file else None,
                          deny=read_table_file(deny_file) if deny_file else None, as_of=as_of)
        return await self.publish_stores(stores)

    async def card_action(self, action: str, card_no: str, reason: str, *, status: str | None = None,
                          new_card: str | None = None, activate_new: bool = True,
                          client: aiomqtt.Client | None = None) -> DenyDelta:
        entries = card_entries(action, card_no, status=status, new_card=new_card, activate_new=activate_new)
        delta = self.catalog.record_delta(entries, reason, self.sign)
        if client is None:
            async with mqtt.client(self.mqtt_settings, identifier=f"storegate-hq-card-{os.getpid()}") as c:
                await c.publish(self.topics.deny(), delta.encode(), qos=1, retain=True)
        else:
            await client.publish(self.topics.deny(), delta.encode(), qos=1, retain=True)
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
