"""The running rule set: verified, applied atomically, persisted.

A signed manifest from HQ (wire.messages.Manifest) is checked, in this order,
before anything is applied; the first failure rejects it with a logged
reason (``last_rejection``, reported on the status topic) and the running
rules stay untouched:

1. the contract's schema (malformed);
2. the Ed25519 signature, by a key this gateway trusts (forged, wrong key,
   unsigned);
3. the scope: this store, and this store's region (wrong store/region);
4. the version: strictly newer than the running one (older, replayed);
5. every part: present (incomplete), its sha256 and size (hash mismatch);
6. the layer documents: headers, merge, schema of the effective rule set
   (schema violation, contradictory layers);
7. the member snapshot and deny list: every record (schema, references).

Trust: the keys in the gateway config (``rules.hq_public_keys``) until a
manifest has been applied; from then on the key that signed the running
manifest plus the ``next_key`` it announces (``<dir>/trust.json``). So a
rotation needs no visit to the store, and once HQ signs with the new key the
old one is no longer accepted.

Parts are cached on disk by sha256 (``<dir>/parts/<sha256>``): a part already
held is never fetched again. The member snapshot and deny list go into the
member store (SQLite, loaded into a new file in a worker thread and switched
by rename); the policy is switched by one reference assignment
(``self.current``). Taps and quotes read ``self.current`` and so see the old
rules until the new ones are complete.

Persistence: the manifest is written (tmp, fsync, rename) after the member
store has switched; on boot the manifest is verified again against the
cached parts, and the member store is rebuilt from them if it holds another
version (a power cut between the two renames).

The part cache is pruned (``prune_parts``) after each rule set is applied:
a member snapshot is ~50 MB a time, and a full disk refuses member sales
(507). Its invariants, which make a power cut at any point harmless:

1. A part named by ``manifest.json`` (the running set, the one a reboot
   loads) or by the set that ran before it is never deleted.
2. Pruning runs only after ``commit`` has made the new ``manifest.json``
   durable (tmp, fsync, rename, fsync of the directory). Before that, the
   manifest on disk is the old one and nothing has been deleted, so every
   part the old set needs is there, including for rebuilding the member
   store from them when a power cut fell between its switch and the
   manifest's (the case ``load`` handles). After it, the new set's parts
   are in the keep set.
3. The previous set is the one running before the switch (in memory: the
   manifest loaded at boot or the last applied). Its parts are kept so a
   rule set that goes back to them (HQ withdrawing a change) needs no
   download; those of older sets, of rejected or superseded sets, and
   half-fetched parts of a set never applied are deleted.
4. Deletion is one unlink at a time of a file that no set in force
   names: a power cut in the middle leaves some unneeded files, which the
   next prune takes. ``*.tmp`` files (a write cut short) go once they are
   an hour old, so a part being written at that moment is not touched.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import re
import time
from pathlib import Path
from typing import Iterator

import orjson

from common import runtime
from gateway.core.validate import Rules, mask_card
from gateway.core.errors import DomainError
from gateway.core.members import DenyDeltaGap, MemberSnapshot
from gateway.store.members import MemberStore
from gateway.store.durable import make_dirs, sync_dir
from wire.distribution import check_layer_header, effective_rules, parse_layer_name
from wire.messages import DenyDelta, Manifest, Part, WireError, decode_layer, iter_table
from wire.ruleset import RulesetError
from wire.signing import Keyring, SignatureError, key_id

log = logging.getLogger("storegate.rules")

READ_BLOCK = 1 << 16
_CARD_RUN = re.compile(r"(?<![0-9a-f])[0-9]{8,19}(?![0-9a-f])")


def trim_heap() -> None:
    """Return freed heap pages to the OS (glibc malloc_trim). A snapshot load
    runs in a worker thread with its own malloc arena, which cannot reuse what
    the event loop's arena freed after the fetch, and batches freed during the
    load stay resident otherwise; without this they add up in RSS."""
    try:
        _libc().malloc_trim(0)
    except (OSError, AttributeError):
        pass


@functools.lru_cache(maxsize=1)
def _libc():
    import ctypes

    return ctypes.CDLL("libc.so.6")


TRIM_EVERY_ROWS = 20_000


class RulesRejected(DomainError, ValueError):
    """A rule set or delta that was not applied; the running rules stay as they were."""

    code, status = "rules_rejected", 422


class DenyGap(RulesRejected):
    """A deny delta skipped versions: ask HQ for a resync."""


def _write_atomic(path: Path, data: bytes) -> None:
    """tmp, fsync, rename, fsync the directory. Mode 0600: layers carry keys (SUN, QR)."""
    make_dirs(path.parent, mode=0o700)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    sync_dir(path.parent)


class RulesStore:
    def __init__(self, directory: str | Path, store: str, region: str | None = None, *,
                 public_keys: list[str] | None = None, members: MemberSnapshot | None = None,
                 clock=time.time) -> None:
        self.dir = Path(directory)
        self.parts_dir = self.dir / "parts"
        make_dirs(self.parts_dir, mode=0o700)
        os.chmod(self.dir, 0o700)
        self.manifest_path = self.dir / "manifest.json"
        self.path = self.manifest_path  # the persisted rule set (gateway.shell.secure_nfc checks its mode)
        self.trust_path = self.dir / "trust.json"
        self.store = store
        self.region = region
        self.clock = clock
        self.config_keys = list(public_keys or [])
        self.keyring = self._load_trust()
        self.members: MemberSnapshot = members if members is not None else MemberStore(self.dir / "members")
        self.current: Rules | None = None
        self.manifest: Manifest | None = None
        self.previous: Manifest | None = None  # the set that ran before the current one (kept in the cache)
        self.last_rejection: str | None = None
        self._verified: set[str] = set()  # parts hashed since start (a damaged cache file is caught at boot)
        self.counters = {"applied": 0, "rejected": 0, "parts_fetched": 0, "parts_cached": 0, "deny_deltas": 0,
                         "parts_pruned": 0}
        # Called after a deny delta is applied: (version, issued_at epoch s,
        # {card_no: entry or None when lifted}). The counter registers one to
        # clear its local card status when HQ lifts a card (gateway/shell/counter.py
        # ``Counter.deny_applied``); this module imports nothing of the counter.
        self.deny_listeners: list = []

    @property
    def deny_version(self) -> int | None:
        return self.members.deny_version

    # -- trust ------------------------------------------------------------

    def _load_trust(self) -> Keyring:
        if self.trust_path.exists():
            try:
                keys = orjson.loads(self.trust_path.read_bytes())["keys"]
                return Keyring(keys)
            except (orjson.JSONDecodeError, KeyError, TypeError, SignatureError) as exc:
                log.error("trust file %s unusable (%s): using the keys in the config", self.trust_path, exc)
        if not self.config_keys:
            log.error("no HQ public key configured (rules.hq_public_keys): every rule set will be refused")
        return Keyring(self.config_keys)

    def _trust_after(self, manifest: Manifest) -> Keyring:
        """Applying a manifest: trust its signer and the next key it announces."""
        signer = next(k for k in self.keyring.public_keys() if key_id(k) == manifest.key_id)
        keys = [signer] + ([manifest.next_key] if manifest.next_key else [])
        return Keyring(keys)

    # -- rejection --------------------------------------------------------

    def reject(self, reason: str, exc_type=RulesRejected) -> RulesRejected:
        # card numbers never reach logs or the status topic in full (DESIGN principle 8)
        reason = _CARD_RUN.sub(lambda mt: mask_card(mt.group()), reason)
        self.last_rejection = reason
        self.counters["rejected"] += 1
        log.warning("rule set rejected: %s", reason)
        return exc_type(reason)

    # -- checks before anything is fetched or applied ----------------------

    def check_manifest(self, payload: bytes) -> Manifest | None:
        """The manifest if it is to be applied; None if it is the running one
        again (the retained copy); RulesRejected otherwise."""
        try:
            m = Manifest.decode(payload)
        except WireError as exc:
            raise self.reject(f"malformed manifest: {exc}") from None
        try:
            self.keyring.verify(m.doc, f"rule set v{m.version}")
        except SignatureError as exc:
            raise self.reject(str(exc)) from None
        if m.store != self.store:
            raise self.reject(f"rule set v{m.version} is for store {m.store!r}, not for store {self.store!r}")
        region = m.scope.get("region")
        if self.region is not None and region != self.region:
            raise self.reject(f"rule set v{m.version} is for region {region!r}, but store {self.store} is in "
                              f"region {self.region!r}")
        running = self.manifest.version if self.manifest else 0
        if self.manifest is not None and m.doc == self.manifest.doc:
            return None
        if m.version <= running:
            raise self.reject(f"rule set v{m.version} is not newer than the running v{running} "
                              f"(an older or replayed manifest)")
        for p in m.parts:
            if p.name.startswith("layer:"):
                level, ident = parse_layer_name(p.name)
                if level == "store" and ident != self.store:
                    raise self.reject(f"rule set v{m.version}: part {p.name} is another store's layer")
                if level == "region" and ident != region:
                    raise self.reject(f"rule set v{m.version}: part {p.name} is not the region {region!r} "
                                      f"of the manifest")
        return m

    # -- the part cache ---------------------------------------------------

    def part_path(self, sha: str) -> Path:
        return self.parts_dir / sha

    def have_part(self, part: Part) -> bool:
        p = self.part_path(part.sha256)
        return p.exists() and p.stat().st_size == part.size

    def missing_parts(self, m: Manifest) -> list[Part]:
        missing, seen = [], set()
        for p in m.parts:
            if p.sha256 in seen:
                continue
            seen.add(p.sha256)
            if self.have_part(p):
                self.counters["parts_cached"] += 1
            else:
                missing.append(p)
        return missing

    def store_part(self, part: Part, payload: bytes) -> None:
        """Keep a received part, after checking its size and sha256."""
        if len(payload) != part.size:
            raise RulesRejected(f"part {part.name} ({part.sha256[:12]}): {len(payload)} bytes, the manifest "
                                f"says {part.size}")
        sha = hashlib.sha256(payload).hexdigest()
        if sha != part.sha256:
            raise RulesRejected(f"part {part.name}: sha256 {sha[:12]}... does not match the manifest's "
                                f"{part.sha256[:12]}...")
        _write_atomic(self.part_path(sha), payload)
        self._verified.add(sha)  # hashed just now: build() need not read it back
        self.counters["parts_fetched"] += 1

    def _chunks(self, part: Part) -> Iterator[bytes]:
        with open(self.part_path(part.sha256), "rb") as f:
            while block := f.read(READ_BLOCK):
                yield block

    def _verify_cached(self, part: Part) -> None:
        if part.sha256 in self._verified:
            return
        h = hashlib.sha256()
        for block in self._chunks(part):
            h.update(block)
        if h.hexdigest() != part.sha256:
            raise RulesRejected(f"cached part {part.name} ({part.sha256[:12]}) is damaged")
        self._verified.add(part.sha256)

    # -- building and applying (blocking: run in a worker thread) -----------

    def policy(self, m: Manifest) -> dict:
        """The effective rule set of the manifest's layer parts."""
        layers = []
        for p in m.parts:
            if not p.name.startswith("layer:"):
                continue
            if not self.have_part(p):
                raise RulesRejected(f"rule set v{m.version} is incomplete: part {p.name} missing")
            doc = decode_layer(self.part_path(p.sha256).read_bytes(), p.name)
            check_layer_header(doc, p.name)
            layers.append(doc)
        if not layers:
            raise RulesRejected(f"rule set v{m.version} has no layer parts")
        data = effective_rules(layers, store=self.store, region=m.scope.get("region"))
        if data.get("max_age_s") != m.max_age_s:
            raise RulesRejected(f"rule set v{m.version}: max_age_s {m.max_age_s} in the manifest differs "
                                f"from the rules' {data.get('max_age_s')}")
        data.pop("members", None)
        data.pop("deny", None)
        return data

    def _rows(self, m: Manifest, name: str) -> Iterator[dict]:
        n = 0
        for p in m.parts:
            if p.name == name:
                for row in iter_table(self._chunks(p), p.name):
                    yield row
                    n += 1
                    if n % TRIM_EVERY_ROWS == 0:
                        trim_heap()  # keeps the load's peak RSS down (measured in bench.rules_apply)

    def _table_key(self, m: Manifest | None) -> tuple | None:
        if m is None:
            return None
        return (tuple(p.sha256 for p in m.parts if p.name in ("members", "deny")), m.members, m.deny_version)

    def build(self, m: Manifest) -> Rules:
        """Everything but the switch of the policy: verify, merge, load the
        member store (which switches itself atomically when complete).
        Blocking; the running rules are untouched on any error."""
        try:
            for p in m.parts:
                if not self.have_part(p):
                    raise RulesRejected(f"rule set v{m.version} is incomplete: part {p.name} "
                                        f"({p.sha256[:12]}) not received")
                if p.encoding == "json":
                    self._verify_cached(p)
            data = self.policy(m)
            if self._table_key(m) != self._table_key(self.manifest) or \
                    self.members.version != (self.manifest.version if self.manifest else None):
                for p in m.parts:
                    if p.encoding != "json":
                        self._verify_cached(p)
                meta = m.members or {"as_of": 0, "store_seq": 0}
                # every record is checked by the member store (wire.ruleset.check_member
                # with the effective rules, check_deny_entry) before its switch
                self.members.replace_snapshot(self._rows(m, "members"), self._rows(m, "deny"), version=m.version,
                                              as_of=meta["as_of"], store_seq=meta["store_seq"],
                                              deny_version=m.deny_version, rules=data)
            return Rules(m.version, m.issued_at, dict(m.scope), data, self.members)
        except RulesRejected as exc:
            raise self.reject(str(exc)) from None
        except (RulesetError, WireError, ValueError, KeyError, TypeError) as exc:
            raise self.reject(f"rule set v{m.version}: {exc}") from None

    def commit(self, m: Manifest, rules: Rules) -> None:
        """The switch (call on the event loop), then persist the manifest and the trust."""
        self.current = rules        # one reference assignment: taps see old or new, never half
        if self.manifest is not None and self.manifest.doc != m.doc:
            self.previous = self.manifest
        self.manifest = m
        self.last_rejection = None
        self.counters["applied"] += 1
        self.keyring = self._trust_after(m)
        _write_atomic(self.manifest_path, m.encode())
        _write_atomic(self.trust_path, orjson.dumps({"keys": self.keyring.public_keys()}))
        log.info("applied rules v%d (signed by key %s; deny list at v%s)", m.version, m.key_id, self.deny_version)
        runtime.tune_gc()  # freeze the new rule set out of GC passes; the old one's cycles go now

    def install(self, payload: bytes, parts: dict[str, bytes] | None = None) -> Rules | None:
        """Apply a manifest with its parts at hand ({sha256: payload}), without
        a broker: provisioning from a file, tests. Every check still applies."""
        m = self.check_manifest(payload)
        if m is None:
            return self.current
        for p in self.missing_parts(m):
            if parts and p.sha256 in parts:
                try:
                    self.store_part(p, parts[p.sha256])
                except RulesRejected as exc:
                    raise self.reject(str(exc)) from None
        return self.apply_manifest_blocking(payload)

    def apply_manifest_blocking(self, payload: bytes) -> Rules | None:
        """For tests and tools: check, build, commit in one go (parts must be cached)."""
        m = self.check_manifest(payload)
        if m is None:
            return self.current
        missing = self.missing_parts(m)
        if missing:
            raise self.reject(f"rule set v{m.version} is incomplete: part {missing[0].name} not received")
        rules = self.build(m)
        self.commit(m, rules)
        self.prune_parts()
        return rules

    def prune_parts(self) -> list[str]:
        """Delete the cached parts neither the running nor the previous rule
        set names (invariants 1-4 above). Call after ``commit``; blocking
        (unlinks): the rules sync runs it in a worker thread. Returns the
        names deleted. A file that cannot be deleted is logged and left."""
        if self.manifest is None:
            return []   # nothing applied: every cached part may belong to the set being fetched
        keep = {p.sha256 for m in (self.manifest, self.previous) if m is not None for p in m.parts}
        deleted, freed = [], 0
        stale_tmp = self.clock() - 3600
        for entry in os.scandir(self.parts_dir):
            name = entry.name
            if name in keep:
                continue
            try:
                if name.endswith(".tmp") and entry.stat().st_mtime > stale_tmp:
                    continue
                size = entry.stat().st_size
                os.unlink(entry.path)
            except FileNotFoundError:
                continue
            except OSError as exc:
                log.warning("rule-set part cache: %s not deleted: %s", name, exc)
                continue
            self._verified.discard(name)
            deleted.append(name)
            freed += size
        if deleted:
            sync_dir(self.parts_dir)
            self.counters["parts_pruned"] += len(deleted)
            log.info("rule-set part cache: deleted %d part(s) no rule set in force names (%.1f MB)",
                     len(deleted), freed / 1e6)
        return deleted

    # -- boot ------------------------------------------------------------

    def load(self) -> None:
        """Come up with the last good rules on disk, without HQ."""
        if not self.manifest_path.exists():
            return
        try:
            m = Manifest.decode(self.manifest_path.read_bytes())
            # The running manifest's signer is the first key in the trust file.
            Keyring(self.keyring.public_keys() + self.config_keys).verify(m.doc, f"stored rule set v{m.version}")
            if self.members.version != m.version:
                log.warning("member store holds v%s, the stored manifest is v%d: reloading it from the parts",
                            self.members.version, m.version)
            else:
                self.manifest = m  # build() sees the tables as loaded already
            rules = self.build(m)
        except (WireError, SignatureError, RulesRejected, OSError) as exc:
            aside = self.manifest_path.with_suffix(".damaged")
            os.replace(self.manifest_path, aside)
            self.manifest = None
            self.last_rejection = f"stored rules unusable ({exc}); set aside as {aside.name}"
            log.error(self.last_rejection)
            return
        self.current, self.manifest = rules, m
        self.last_rejection = None
        log.info("loaded rules v%d from %s", m.version, self.manifest_path)

    # -- deny deltas -----------------------------------------------------

    def apply_deny(self, payload: bytes) -> bool:
        """Apply a signed deny delta now. True if applied, False if already
        held; DenyGap if versions were skipped; RulesRejected if bad."""
        try:
            delta = DenyDelta.decode(payload)
            self.keyring.verify(delta.doc, f"deny delta v{delta.version}")
        except (WireError, SignatureError) as exc:
            raise self.reject(f"deny delta refused: {exc}") from None
        entries = {e["card_no"]: (None if e["status"] == "active" else
                                  {k: v for k, v in e.items() if k != "card_no"}) for e in delta.entries}
        try:
            applied = self.members.apply_deny_delta(delta.version, entries)
        except DenyDeltaGap as exc:
            raise DenyGap(str(exc)) from None
        except (RulesetError, ValueError) as exc:
            raise self.reject(f"deny delta v{delta.version} refused: {exc}") from None
        if applied:
            self.counters["deny_deltas"] += 1
            log.info("deny delta v%d applied (%d card(s))", delta.version, len(entries))
            for listener in list(self.deny_listeners):
                try:  # the delta stands whatever a listener does
                    listener(delta.version, delta.issued_at, entries)
                except Exception:  # noqa: BLE001
                    log.exception("deny delta v%d: a listener failed", delta.version)
        return applied
