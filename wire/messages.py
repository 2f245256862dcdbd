"""Messages of the wire contract, each with its JSON Schema.

Payloads are UTF-8 JSON, or JSON in a compressed envelope:

    b"SGZ1" | u32 big-endian: bytes of the JSON once inflated | zlib stream

A tx batch larger than COMPRESS_OVER bytes is sent in the envelope when that
saves space. Nothing is inflated or parsed before its size is known to be
within the cap of its kind (MAX_BYTES): a 300 KB zlib bomb once took a
gateway to ~1 GB and HQ from 45 MB to 660 MB before any check ran. The
envelope declares the inflated size, so inflation stops at that size + 1
byte and a payload that inflates to anything else is refused. Bare zlib
(first byte 0x78, what gateways sent before the envelope) is still read,
bounded by the cap of its kind, so stores can be upgraded after HQ.

Every message is checked against its schema before use (WireError says what
and where). Live account look-ups (AccountQuery / AccountReply) are
request/response at QoS 0: an answer is only worth having within the tap's
budget (~300 ms), so nothing is queued or resent (see README "Wire contract"). Sequence numbers are at most SEQ_MAX; an ack carries at most
MAX_ACK_RANGES ranges; a record body nests at most MAX_BODY_DEPTH levels.
"""

from __future__ import annotations

import struct
import threading
import zlib
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import fastjsonschema
import orjson

COMPRESS_OVER = 1024
SCHEMA_BASE = "https://storegate.example/schemas/wire/"

KiB, MiB = 1 << 10, 1 << 20
ENVELOPE = b"SGZ1"
_ENVELOPE_HEAD = struct.Struct(">4sI")

# The most bytes of JSON a message of each kind may hold (inflated).
MAX_BYTES = {
    "tx batch": 16 * MiB,          # MAX_BATCH_RECORDS ordinary records, or at least one of MAX_RECORD_BYTES
    "ack": 64 * KiB,               # MAX_ACK_RANGES ranges of the largest seqs: ~37 KB
    "status": 256 * KiB,
    "rule-set manifest": 2 * MiB,  # 4096 parts
    "deny delta": 4 * MiB,         # 10,000 entries
    "resync request": 8 * KiB,
    "account query": 4 * KiB,
    "account reply": 2 * 64 * KiB + 8 * KiB,  # two member rows (a card and its primary) of MAX_TABLE_ROW_BYTES
}
MAX_BATCH_RECORDS = 5000           # uplink.batch_max at most
MAX_RECORD_BYTES = 1 * MiB         # one journaled record, encoded (a 500-line sale is ~200 KB)
MAX_BODY_DEPTH = 32                # levels of objects and arrays in a record body
MAX_ACK_RANGES = 1024
SEQ_MAX = 2 ** 53 - 1              # exact in every JSON reader
MAX_LAYER_BYTES = 16 * MiB         # a layer part (JSON)
MAX_TABLE_PART_BYTES = 64 * MiB    # a table part as published (compressed)
MAX_TABLE_PART_INFLATED = 512 * MiB
MAX_TABLE_ROW_BYTES = 64 * KiB     # one line of a table part
ORJSON_MAX_DEPTH = 254             # orjson refuses to encode anything nested deeper
UNSENDABLE = "unsendable"          # the type of a placeholder for a record that could not be sent
TOO_DEEP = f"body nested deeper than {MAX_BODY_DEPTH} levels"


class WireError(ValueError):
    """A message that does not follow the contract; says what and where."""


class TooDeep(WireError):
    """Nested deeper than allowed (dumps_within)."""


def _dumps(obj: Any) -> bytes:
    return orjson.dumps(obj, option=orjson.OPT_SORT_KEYS)


_wrappers: dict[int, tuple[list, list]] = {}  # depth -> (outermost, innermost) of the padding lists
_wrappers_lock = threading.Lock()


def dumps_within(obj: Any, depth: int, option: int = 0) -> bytes:
    """``orjson.dumps(obj, option=option)``; WireError if obj nests deeper
    than ``depth`` levels of objects and arrays, or is not JSON.

    orjson itself refuses anything nested deeper than ORJSON_MAX_DEPTH. Inside
    ORJSON_MAX_DEPTH - depth levels of lists, obj is refused exactly when it
    is deeper than ``depth``, and its own encoding is the middle of the
    output: the depth check costs no walk over obj in Python."""
    pad = ORJSON_MAX_DEPTH - depth
    with _wrappers_lock:
        if depth not in _wrappers:
            inner = [None]
            outer = inner
            for _ in range(pad - 1):
                outer = [outer]
            _wrappers[depth] = (outer, inner)
        outer, inner = _wrappers[depth]
        inner[0] = obj
        try:
            out = orjson.dumps(outer, option=option)
        except orjson.JSONEncodeError as exc:
            if str(exc) == "Recursion limit reached":
                raise TooDeep(f"nested deeper than {depth} levels") from None
            raise WireError(f"not JSON: {exc}") from None
        finally:
            inner[0] = None
    return out[pad:-pad]


def compress(raw: bytes) -> bytes:
    """The compressed envelope of raw JSON (see the module docstring)."""
    return _ENVELOPE_HEAD.pack(ENVELOPE, len(raw)) + zlib.compress(raw, 6)


def _inflate(data: bytes, limit: int, what: str) -> bytes:
    """A zlib stream inflated, refused as soon as it passes ``limit`` bytes."""
    d = zlib.decompressobj()
    try:
        out = d.decompress(data, limit + 1)
    except zlib.error as exc:
        raise WireError(f"{what}: bad zlib payload: {exc}") from None
    if len(out) > limit:
        raise WireError(f"{what}: inflates to more than {limit} bytes")
    if not d.eof:
        raise WireError(f"{what}: bad zlib payload: truncated")
    if d.unused_data:
        raise WireError(f"{what}: {len(d.unused_data)} bytes after the zlib stream")
    return out


def _loads(payload: bytes, what: str, limit: int | None = None) -> Any:
    """Parse a payload of kind ``what``: inflated (bounded) if compressed,
    and never parsed past ``limit`` bytes (default: MAX_BYTES[what])."""
    if isinstance(payload, str):
        payload = payload.encode()
    limit = MAX_BYTES[what] if limit is None else limit
    if payload[:4] == ENVELOPE:
        if len(payload) < _ENVELOPE_HEAD.size:
            raise WireError(f"{what}: truncated envelope")
        declared = _ENVELOPE_HEAD.unpack_from(payload)[1]
        if declared > limit:
            raise WireError(f"{what}: declares {declared} bytes, more than the {limit} it may hold")
        raw = _inflate(payload[_ENVELOPE_HEAD.size:], declared, what)
        if len(raw) != declared:
            raise WireError(f"{what}: inflates to {len(raw)} bytes, not the {declared} it declares")
        payload = raw
    elif payload[:1] == b"\x78":  # bare zlib from a gateway older than the envelope
        payload = _inflate(payload, limit, what)
    elif len(payload) > limit:
        raise WireError(f"{what}: {len(payload)} bytes, more than the {limit} it may hold")
    try:
        return orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        raise WireError(f"{what}: not JSON: {exc}") from None


@lru_cache(maxsize=None)
def _validator(name: str):
    # Compiled once: a 1,000-record batch validates in about a millisecond
    # (jsonschema's interpreter took ~130 ms).
    return fastjsonschema.compile(ALL_SCHEMAS.get(name) or _INNER_SCHEMAS[name])


def _check(name: str, obj: Any, what: str) -> None:
    try:
        _validator(name)(obj)
    except fastjsonschema.JsonSchemaValueException as exc:
        where = exc.name.replace("data", "", 1).lstrip(".") or "(top level)"
        raise WireError(f"{what}: at {where}: {exc.message}") from None


_STORE = {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}$"}
_SEQ = {"type": "integer", "minimum": 1, "maximum": SEQ_MAX}

TX_RECORD_SCHEMA = {
    "type": "object",
    "required": ["seq", "id", "type", "ts", "body"],
    "additionalProperties": False,
    "properties": {
        "seq": _SEQ,
        "id": {"type": "string", "minLength": 8, "maxLength": 64},
        "type": {"type": "string", "pattern": "^[a-z_]{1,32}$",
                 "description": f"{UNSENDABLE!r}: a placeholder for a record the store could not send (it keeps "
                                "the original); body {type: the original type, error}"},
        "ts": {"type": "integer", "minimum": 0, "maximum": SEQ_MAX, "description": "epoch milliseconds at the store"},
        "body": {"type": "object", "description": f"at most {MAX_BODY_DEPTH} levels deep"},
    },
}

TX_BATCH_SCHEMA = {
    "$id": SCHEMA_BASE + "tx_batch.json",
    "title": "Batch of journal records, gateway -> HQ, topic {prefix}/stores/{store}/tx",
    "type": "object",
    "required": ["store", "records"],
    "additionalProperties": False,
    "properties": {
        "store": _STORE,
        "records": {"type": "array", "minItems": 1, "maxItems": MAX_BATCH_RECORDS, "items": TX_RECORD_SCHEMA},
    },
}

# HQ's time in an ack and a gateway's offset from it (README "Keeping time"):
# epoch milliseconds up to 2100-01-01, and a drift beyond CLOCK_TOLERANCE_S is
# a fault (gateway/core/clock.py; `storegate-hq fleet` flags it).
MAX_EPOCH_MS = 4_102_444_800_000
CLOCK_TOLERANCE_S = 300

ACK_SCHEMA = {
    "$id": SCHEMA_BASE + "ack.json",
    "title": "Sequence numbers committed in HQ's database, HQ -> gateway, topic {prefix}/stores/{store}/ack",
    "type": "object",
    "required": ["store", "acked"],
    "additionalProperties": False,
    "properties": {
        "store": _STORE,
        "acked": {
            "description": "inclusive [first, last] ranges of committed sequence numbers",
            "type": "array",
            "maxItems": MAX_ACK_RANGES,
            "items": {"type": "array", "items": [_SEQ, _SEQ], "minItems": 2, "maxItems": 2},
        },
        "hq_time_ms": {
            "description": "HQ's clock when the batch was committed, epoch ms: a time known to have passed "
                           "when the ack arrives (the gateway checks its clock against it). Optional; a "
                           "gateway older than it refuses an ack that carries it (upgrade gateways first)",
            "type": "integer", "minimum": 0, "maximum": MAX_EPOCH_MS,
        },
    },
}

STATUS_SCHEMA = {
    "$id": SCHEMA_BASE + "status.json",
    "title": "Gateway status, retained, with last will; topic {prefix}/stores/{store}/status",
    "type": "object",
    "required": ["store", "state", "ts"],
    "properties": {
        "store": _STORE,
        "state": {"enum": ["online", "offline"]},
        "ts": {"type": "integer", "minimum": 0},
        "backlog": {"type": "integer", "minimum": 0},
        "oldest_unsent_age_s": {"type": ["number", "null"], "minimum": 0},
        "rules_version": {"type": ["integer", "null"], "description": "version of the rule set applied"},
        "rules_issued_at": {"type": ["integer", "null"]},
        "deny_version": {"type": ["integer", "null"], "description": "last deny-list delta applied"},
        "rules_rejection": {"type": ["string", "null"],
                            "description": "why the last rule set or delta offered was refused (null: none)"},
        "readers": {"type": "object", "additionalProperties": {"type": "string"}},
        "faults": {"type": "array", "items": {"type": "string"}},
        "clock_offset_ms": {"type": ["integer", "null"], "minimum": -MAX_EPOCH_MS, "maximum": MAX_EPOCH_MS,
                            "description": "HQ's time in the last ack minus the gateway's clock when it came "
                                           "(positive: the gateway is behind; null: no ack with HQ's time yet)"},
    },
}

@dataclass(frozen=True)
class TxRecord:
    seq: int
    id: str
    type: str
    ts: int
    body: dict

    def to_dict(self) -> dict:
        return {"seq": self.seq, "id": self.id, "type": self.type, "ts": self.ts, "body": self.body}

    def encode(self) -> bytes:
        """The record as it goes in a batch; WireError if HQ would refuse it."""
        what = f"record {self.seq!r}"
        obj = self.to_dict()
        _check("tx_record", obj, what)
        try:
            raw = dumps_within(obj, MAX_BODY_DEPTH + 1, orjson.OPT_SORT_KEYS)
        except TooDeep:
            raise WireError(f"{what}: {TOO_DEEP}") from None
        except WireError as exc:
            raise WireError(f"{what}: {exc}") from None
        if len(raw) > MAX_RECORD_BYTES:
            raise WireError(f"{what}: {len(raw)} bytes, more than the {MAX_RECORD_BYTES} a record may hold")
        return raw


def unsendable_record(seq: int, id: Any, type_: Any, ts: Any, error: str) -> TxRecord:
    """A placeholder for a journaled record that cannot be sent as it is:
    HQ keeps it aside and acks it, so delivery goes on, and the store keeps
    the original. The original id and ts are kept when they are valid."""
    ok_id = isinstance(id, str) and 8 <= len(id) <= 64
    ok_ts = isinstance(ts, int) and 0 <= ts <= SEQ_MAX
    return TxRecord(seq, id if ok_id else f"{UNSENDABLE}-{seq}", UNSENDABLE, ts if ok_ts else 0,
                    {"type": type_ if isinstance(type_, str) else None, "error": str(error)[:500]})


@dataclass(frozen=True)
class TxBatch:
    store: str
    records: list[TxRecord]

    def encode(self) -> bytes:
        """The payload, compressed when that pays; WireError if HQ would
        refuse it (a record HQ would refuse, more than MAX_BYTES)."""
        what = "tx batch"
        obj = {"store": self.store, "records": [r.to_dict() for r in self.records]}
        _check("tx_batch.json", obj, what)
        try:
            raw = dumps_within(obj, MAX_BODY_DEPTH + 3, orjson.OPT_SORT_KEYS)
        except TooDeep:
            raise WireError(f"{what}: a record {TOO_DEEP}") from None
        except WireError as exc:
            raise WireError(f"{what}: {exc}") from None
        if len(raw) > MAX_BYTES[what]:
            raise WireError(f"{what}: {len(raw)} bytes, more than the {MAX_BYTES[what]} it may hold")
        if len(raw) > COMPRESS_OVER:
            packed = compress(raw)
            if len(packed) < len(raw):
                return packed
        return raw

    @classmethod
    def decode(cls, payload: bytes) -> "TxBatch":
        obj = _loads(payload, "tx batch")
        _check("tx_batch.json", obj, "tx batch")
        try:
            dumps_within(obj["records"], MAX_BODY_DEPTH + 2)
        except TooDeep:
            raise WireError(f"tx batch: a record {TOO_DEEP}") from None
        return cls(obj["store"], [TxRecord(**r) for r in obj["records"]])


# -- inclusive [first, last] ranges of sequence numbers -------------------------
# "Normal" ranges are sorted, disjoint and not adjacent; the functions below
# take and give normal ranges, in time linear in the number of ranges.

def seqs_to_ranges(seqs) -> list[list[int]]:
    ranges: list[list[int]] = []
    for s in sorted(set(seqs)):
        if ranges and s == ranges[-1][1] + 1:
            ranges[-1][1] = s
        else:
            ranges.append([s, s])
    return ranges


def normal_ranges(ranges) -> list[list[int]]:
    """Any [lo, hi] ranges (lo <= hi) sorted and merged."""
    out: list[list[int]] = []
    for lo, hi in sorted(ranges):
        if out and lo <= out[-1][1] + 1:
            out[-1][1] = max(out[-1][1], hi)
        else:
            out.append([lo, hi])
    return out


def intersect_ranges(a, b) -> list[list[int]]:
    out, i, j = [], 0, 0
    while i < len(a) and j < len(b):
        lo, hi = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if lo <= hi:
            out.append([lo, hi])
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return out


def subtract_ranges(a, b) -> list[list[int]]:
    """What of ``a`` is not in ``b``."""
    out, j = [], 0
    for lo, hi in a:
        while j < len(b) and b[j][1] < lo:
            j += 1
        k = j
        while lo <= hi and k < len(b) and b[k][0] <= hi:
            if b[k][0] > lo:
                out.append([lo, b[k][0] - 1])
            lo = max(lo, b[k][1] + 1)
            k += 1
        if lo <= hi:
            out.append([lo, hi])
    return out


def ranges_text(ranges, most: int = 3) -> str:
    shown = ", ".join(f"{lo}-{hi}" if lo != hi else f"{lo}" for lo, hi in ranges[:most])
    return shown + (f" and {len(ranges) - most} more range(s)" if len(ranges) > most else "")


@dataclass(frozen=True)
class Ack:
    store: str
    acked: list[list[int]] = field(default_factory=list)
    hq_time_ms: int | None = None   # HQ's clock at the commit (absent from older HQs' acks)

    @classmethod
    def for_seqs(cls, store: str, seqs, hq_time_ms: int | None = None) -> list["Ack"]:
        """The acks for these seqs: one, or more if they make more than
        MAX_ACK_RANGES ranges."""
        ranges = seqs_to_ranges(seqs)
        return [cls(store, ranges[i:i + MAX_ACK_RANGES], hq_time_ms)
                for i in range(0, len(ranges), MAX_ACK_RANGES)]

    @classmethod
    def of(cls, store: str, seqs) -> "Ack":
        """One ack for a few seqs (ValueError if they need more than one)."""
        acks = cls.for_seqs(store, seqs)
        if len(acks) > 1:
            raise ValueError(f"{len(acks)} acks needed: use Ack.for_seqs")
        return acks[0] if acks else cls(store, [])

    def encode(self) -> bytes:
        obj = {"store": self.store, "acked": self.acked}
        if self.hq_time_ms is not None:
            obj["hq_time_ms"] = self.hq_time_ms
        return _dumps(obj)

    @classmethod
    def decode(cls, payload: bytes) -> "Ack":
        obj = _loads(payload, "ack")
        _check("ack.json", obj, "ack")
        for lo, hi in obj["acked"]:
            if lo > hi:
                raise WireError(f"ack: range [{lo}, {hi}] runs backwards")
        hq_time = obj.get("hq_time_ms")   # 1.7e12 is an integer to JSON Schema: made one
        return cls(obj["store"], obj["acked"], int(hq_time) if hq_time is not None else None)


@dataclass(frozen=True)
class Status:
    store: str
    state: str
    ts: int
    backlog: int = 0
    oldest_unsent_age_s: float | None = None
    rules_version: int | None = None
    readers: dict = field(default_factory=dict)
    faults: list = field(default_factory=list)
    deny_version: int | None = None
    rules_rejection: str | None = None
    rules_issued_at: int | None = None
    clock_offset_ms: int | None = None   # HQ's time in the last ack minus this clock when it came

    def encode(self) -> bytes:
        return _dumps(self.__dict__)

    @classmethod
    def decode(cls, payload: bytes) -> "Status":
        obj = _loads(payload, "status")
        _check("status.json", obj, "status")
        known = {k: obj[k] for k in cls.__dataclass_fields__ if k in obj}
        if known.get("clock_offset_ms") is not None:
            known["clock_offset_ms"] = int(known["clock_offset_ms"])
        return cls(**known)


# -- rule-set distribution (signed; see wire/RULESET.md and README "Rules from HQ") --

_SHA256 = {"type": "string", "pattern": "^[0-9a-f]{64}$"}
_KEY_ID = {"type": "string", "pattern": "^[0-9a-f]{16}$"}
_SIG = {"type": "string", "minLength": 8, "maxLength": 200, "description": "base64 Ed25519 signature over the canonical encoding"}
_PUBKEY = {"type": "string", "pattern": "^[A-Za-z0-9+/]{43}=$", "description": "base64 of a raw Ed25519 public key"}
_EPOCH = {"type": "integer", "minimum": 0, "description": "epoch seconds"}
PART_NAME = r"^(layer:chain|layer:region:[A-Za-z0-9_-]{1,64}|layer:store:[A-Za-z0-9_-]{1,64}|members|deny)$"
TABLE_PARTS = ("members", "deny")
DENY_STATUSES = ["not_activated", "lost", "frozen", "blocked", "limited", "cancelled", "replaced",
                 "expired"]   # wire/ruleset.py

PART_SCHEMA = {
    "type": "object",
    "required": ["name", "sha256", "size", "topic", "encoding"],
    "additionalProperties": False,
    "properties": {
        "name": {"type": "string", "pattern": PART_NAME,
                 "description": "a table may come as several parts of the same name: their rows in manifest order"},
        "sha256": _SHA256,
        "size": {"type": "integer", "minimum": 0, "maximum": MAX_TABLE_PART_BYTES,
                 "description": f"bytes of the payload as published; a layer (json) at most {MAX_LAYER_BYTES}"},
        "topic": {"type": "string", "minLength": 1, "description": "retained topic keyed by the sha256"},
        "encoding": {"enum": ["json", "ndjson+zlib"]},
    },
}

MANIFEST_SCHEMA = {
    "$id": SCHEMA_BASE + "manifest.json",
    "title": "Signed rule-set manifest for one store, HQ -> gateway, retained; topic {prefix}/stores/{store}/rules",
    "type": "object",
    "required": ["store", "version", "issued_at", "max_age_s", "scope", "parts", "members", "deny_version",
                 "next_key", "key_id", "sig"],
    "additionalProperties": False,
    "properties": {
        "store": _STORE,
        "version": {"type": "integer", "minimum": 1, "description": "per store, strictly increasing"},
        "issued_at": _EPOCH,
        "max_age_s": {"type": "integer", "minimum": 60},
        "scope": {
            "type": "object",
            "required": ["store", "region"],
            "additionalProperties": False,
            "properties": {"store": _STORE, "region": {"type": ["string", "null"]}},
        },
        "parts": {"type": "array", "minItems": 1, "maxItems": 4096, "items": PART_SCHEMA},
        "members": {
            "type": ["object", "null"],
            "required": ["as_of", "store_seq"],
            "additionalProperties": False,
            "properties": {"as_of": _EPOCH, "store_seq": {"type": "integer", "minimum": 0}},
        },
        "deny_version": {"type": "integer", "minimum": 0,
                         "description": "the deny part is the deny list as of this delta version"},
        "next_key": {"anyOf": [_PUBKEY, {"type": "null"}],
                     "description": "HQ's next public key: trusted from now on for rotation"},
        "key_id": _KEY_ID,
        "sig": _SIG,
    },
}

DENY_ENTRY_SCHEMA = {
    "type": "object",
    "required": ["card_no", "status"],
    "additionalProperties": False,
    "properties": {
        "card_no": {"type": "string", "pattern": "^[0-9]{6,19}$"},
        "status": {"enum": DENY_STATUSES + ["active"], "description": "active: lifted, off the deny list"},
        "since": {"type": "string", "pattern": r"^\d{4}-\d{2}-\d{2}$"},
        "replaced_by": {"type": "string", "pattern": "^[0-9]{6,19}$"},
    },
}

DENY_DELTA_SCHEMA = {
    "$id": SCHEMA_BASE + "deny_delta.json",
    "title": "Signed deny-list delta, HQ -> every store, retained (latest); topic {prefix}/rules/deny",
    "type": "object",
    "required": ["version", "issued_at", "entries", "key_id", "sig"],
    "additionalProperties": False,
    "properties": {
        "version": {"type": "integer", "minimum": 1, "description": "chain-wide, +1 per delta"},
        "issued_at": _EPOCH,
        "entries": {"type": "array", "minItems": 1, "maxItems": 10000, "items": DENY_ENTRY_SCHEMA},
        "key_id": _KEY_ID,
        "sig": _SIG,
    },
}

RESYNC_SCHEMA = {
    "$id": SCHEMA_BASE + "resync.json",
    "title": "A gateway asks HQ to republish its rule set; gateway -> HQ; topic {prefix}/stores/{store}/resync",
    "type": "object",
    "required": ["store", "reason"],
    "additionalProperties": False,
    "properties": {
        "store": _STORE,
        "rules_version": {"type": ["integer", "null"]},
        "deny_version": {"type": ["integer", "null"]},
        "reason": {"type": "string", "maxLength": 500},
    },
}


@dataclass(frozen=True)
class Part:
    name: str
    sha256: str
    size: int
    topic: str
    encoding: str

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass(frozen=True)
class Manifest:
    """A signed rule-set manifest. ``doc`` is the signed document as received."""

    doc: dict

    @property
    def store(self) -> str: return self.doc["store"]
    @property
    def version(self) -> int: return self.doc["version"]
    @property
    def issued_at(self) -> int: return self.doc["issued_at"]
    @property
    def max_age_s(self) -> int: return self.doc["max_age_s"]
    @property
    def scope(self) -> dict: return self.doc["scope"]
    @property
    def parts(self) -> list[Part]: return [Part(**p) for p in self.doc["parts"]]
    @property
    def members(self) -> dict | None: return self.doc["members"]
    @property
    def deny_version(self) -> int: return self.doc["deny_version"]
    @property
    def next_key(self) -> str | None: return self.doc["next_key"]
    @property
    def key_id(self) -> str: return self.doc["key_id"]

    @staticmethod
    def unsigned(*, store: str, version: int, issued_at: int, max_age_s: int, region: str | None,
                 parts: list[Part], members: dict | None, deny_version: int, next_key: str | None) -> dict:
        return {"store": store, "version": version, "issued_at": issued_at, "max_age_s": max_age_s,
                "scope": {"store": store, "region": region}, "parts": [p.to_dict() for p in parts],
                "members": members, "deny_version": deny_version, "next_key": next_key}

    def encode(self) -> bytes:
        return _dumps(self.doc)

    @classmethod
    def decode(cls, payload: bytes) -> "Manifest":
        obj = _loads(payload, "rule-set manifest")
        _check("manifest.json", obj, "rule-set manifest")
        if obj["scope"]["store"] != obj["store"]:
            raise WireError(f"rule-set manifest: scope.store {obj['scope']['store']!r} is not store {obj['store']!r}")
        for p in obj["parts"]:
            if p["encoding"] == "json" and p["size"] > MAX_LAYER_BYTES:
                raise WireError(f"rule-set manifest: part {p['name']} of {p['size']} bytes, more than the "
                                f"{MAX_LAYER_BYTES} a layer may hold")
        return cls(obj)


@dataclass(frozen=True)
class DenyDelta:
    doc: dict

    @property
    def version(self) -> int: return self.doc["version"]
    @property
    def issued_at(self) -> int: return self.doc["issued_at"]
    @property
    def entries(self) -> list[dict]: return self.doc["entries"]

    def encode(self) -> bytes:
        return _dumps(self.doc)

    @classmethod
    def decode(cls, payload: bytes) -> "DenyDelta":
        obj = _loads(payload, "deny delta")
        _check("deny_delta.json", obj, "deny delta")
        return cls(obj)


@dataclass(frozen=True)
class ResyncRequest:
    store: str
    reason: str
    rules_version: int | None = None
    deny_version: int | None = None

    def encode(self) -> bytes:
        return _dumps(self.__dict__)

    @classmethod
    def decode(cls, payload: bytes) -> "ResyncRequest":
        obj = _loads(payload, "resync request")
        _check("resync.json", obj, "resync request")
        return cls(**obj)


# -- live account look-up (gateway <-> HQ, QoS 0, not retained) ------------------
# While its link is up, a gateway asks HQ for the live account behind a card
# on a tap; HQ answers from its accounts of record within a few ms. Past the
# gateway's wait (uplink.live_lookup_ms) the store decides from its snapshot.

LOOKUP_ID = {"type": "string", "pattern": "^[A-Za-z0-9_-]{8,64}$",
             "description": "random per query (the gateway's own); the reply carries it back"}
_CARD = {"type": "string", "pattern": "^[0-9]{6,19}$"}
_EPOCH_MS = {"type": "integer", "minimum": 0, "maximum": SEQ_MAX, "description": "epoch milliseconds"}


MAX_DAY_GIFT_KINDS = 64         # gift ids in a live answer's today.gifts
MAX_DAY_GIFT_COUNT = 100_000    # gifts of one id in a day (per_member_day_limit is at most 1,000)
DAY_GIFTS = {"type": "object", "propertyNames": {"pattern": r"^[A-Za-z0-9_.-]{1,64}$"},
             "maxProperties": MAX_DAY_GIFT_KINDS,
             "additionalProperties": {"type": "integer", "minimum": 1, "maximum": MAX_DAY_GIFT_COUNT},
             "description": "live answers only: the account's gifts of that day at every store, as HQ has "
                          "applied them (gift id -> gifts; absent: none); a store adds its own records after "
                          "store_seq (per_member_day_limit, wire/RULESET.md \"Points for gifts\")"}


def _member_row_schema() -> dict:
    """The snapshot's member row (one definition, wire/ruleset.py) whose
    ``today`` may carry the day's ``gifts`` too: a snapshot row never does."""
    from wire.ruleset import MEMBER_SCHEMA
    row = {k: v for k, v in MEMBER_SCHEMA.items() if k not in ("$id", "title")}
    today = row["properties"]["today"]
    return {**row, "properties": {**row["properties"], "today": {
        **today, "properties": {**today["properties"], "gifts": DAY_GIFTS}}}}


ACCOUNT_QUERY_SCHEMA = {
    "$id": SCHEMA_BASE + "account_query.json",
    "title": "Live account look-up, gateway -> HQ, QoS 0; topic {prefix}/stores/{store}/account/query",
    "type": "object",
    "required": ["store", "id", "card_no", "sent_at"],
    "additionalProperties": False,
    "properties": {
        "store": _STORE,
        "id": LOOKUP_ID,
        "card_no": _CARD,
        "sent_at": {**_EPOCH_MS, "description": "epoch milliseconds at the store (information only)"},
    },
}

ACCOUNT_REPLY_SCHEMA = {
    "$id": SCHEMA_BASE + "account_reply.json",
    "title": "HQ's live account for a card, HQ -> the asking gateway only, QoS 0; "
             "topic {prefix}/stores/{store}/account/reply",
    "type": "object",
    "required": ["store", "id", "card_no", "found", "account", "store_seq", "as_of"],
    "additionalProperties": False,
    "properties": {
        "store": {**_STORE, "description": "the asking store (the reply topic's)"},
        "id": LOOKUP_ID,
        "card_no": _CARD,
        "found": {"type": "boolean", "description": "false: HQ has no such card (account is null)"},
        "account": {"anyOf": [_member_row_schema(), {"type": "null"}],
                    "description": "the card's row exactly as in a member snapshot part (wire/schemas/member.json); "
                                   "the row with the account's balances may add the day's gift counts "
                                   "(today.gifts)"},
        "primary": {"anyOf": [_member_row_schema(), {"type": "null"}],
                    "description": "for a card whose row names a primary_card: that primary card's row, "
                                   "which carries the account's balances"},
        "store_seq": {"type": "integer", "minimum": 0, "maximum": SEQ_MAX,
                      "description": "the answer includes exactly this store's records up to this seq (HQ's "
                                     "watermark for the asking store, read in the same transaction)"},
        "as_of": {**_EPOCH_MS, "description": "epoch milliseconds at HQ when the account was read"},
    },
}


@dataclass(frozen=True)
class AccountQuery:
    store: str
    id: str
    card_no: str
    sent_at: int

    def encode(self) -> bytes:
        obj = dict(self.__dict__)
        _check("account_query.json", obj, "account query")
        return _dumps(obj)

    @classmethod
    def decode(cls, payload: bytes) -> "AccountQuery":
        obj = _loads(payload, "account query")
        _check("account_query.json", obj, "account query")
        return cls(**obj)


@dataclass(frozen=True)
class AccountReply:
    store: str
    id: str
    card_no: str
    found: bool
    account: dict | None
    store_seq: int
    as_of: int
    primary: dict | None = None

    def encode(self) -> bytes:
        obj = {**self.__dict__, "account": dict(self.account) if self.account else None,
               "primary": dict(self.primary) if self.primary else None}
        _check("account_reply.json", obj, "account reply")
        raw = _dumps(obj)
        if len(raw) > MAX_BYTES["account reply"]:
            raise WireError(f"account reply: {len(raw)} bytes, more than the {MAX_BYTES['account reply']} it may hold")
        return raw

    @classmethod
    def decode(cls, payload: bytes) -> "AccountReply":
        obj = _loads(payload, "account reply")
        _check("account_reply.json", obj, "account reply")
        if obj["found"] != (obj["account"] is not None):
            raise WireError("account reply: found must be true exactly when an account is given")
        acct, primary = obj["account"], obj.get("primary")
        if acct is not None and acct["card_no"] != obj["card_no"]:
            raise WireError(f"account reply: account.card_no {acct['card_no']!r} is not the card asked for")
        if primary is not None and (acct is None or primary["card_no"] != acct.get("primary_card")):
            raise WireError("account reply: primary is not the account's primary_card")
        return cls(**obj)


# Part payloads. Layer documents: canonical JSON. Tables (members, deny): one
# JSON object per line, zlib-compressed; read back as a stream so a million
# rows never sit in memory at once.

def encode_layer(doc: dict) -> bytes:
    return _dumps(doc)


def decode_layer(payload: bytes, name: str) -> dict:
    obj = _loads(payload, f"part {name}", MAX_LAYER_BYTES)
    if not isinstance(obj, dict):
        raise WireError(f"part {name}: a layer document must be a JSON object")
    return obj


def encode_table(rows, level: int = 6) -> bytes:
    comp = zlib.compressobj(level)
    out = []
    buf = []
    size = 0
    for row in rows:
        line = orjson.dumps(row, option=orjson.OPT_SORT_KEYS)
        buf.append(line)
        size += len(line) + 1
        if size > 1 << 20:
            out.append(comp.compress(b"\n".join(buf) + b"\n"))
            buf, size = [], 0
    if buf:
        out.append(comp.compress(b"\n".join(buf) + b"\n"))
    out.append(comp.flush())
    return b"".join(out)


def iter_table(chunks, name: str, out_block: int = 1 << 16, *, max_bytes: int = MAX_TABLE_PART_INFLATED,
               max_row: int = MAX_TABLE_ROW_BYTES):
    """Rows of a table part (dicts, one at a time) from an iterable of
    compressed byte chunks (a file read in blocks). Memory stays flat: at
    most ``out_block`` bytes are decompressed at a time, and a row longer
    than ``max_row`` or a part inflating past ``max_bytes`` is refused."""
    d = zlib.decompressobj()
    tail = b""
    lineno = 0
    inflated = 0
    loads = orjson.loads

    def lines_of(data: bytes):
        nonlocal tail, lineno, inflated
        inflated += len(data)
        if inflated > max_bytes:
            raise WireError(f"part {name}: inflates to more than {max_bytes} bytes")
        data = tail + data
        cut = data.rfind(b"\n")
        if cut < 0:
            tail = data
            if len(tail) > max_row:
                raise WireError(f"part {name}: line {lineno + 1}: longer than {max_row} bytes")
            return
        tail = data[cut + 1:]
        for line in data[:cut].split(b"\n"):
            lineno += 1
            if len(line) > max_row:
                raise WireError(f"part {name}: line {lineno}: longer than {max_row} bytes")
            if line:
                yield loads(line)

    try:
        for chunk in chunks:
            while chunk:
                yield from lines_of(d.decompress(chunk, out_block))
                chunk = d.unconsumed_tail
        yield from lines_of(d.flush() + b"\n")
        if not d.eof:
            raise WireError(f"part {name}: truncated zlib stream")
    except zlib.error as exc:
        raise WireError(f"part {name}: bad zlib stream: {exc}") from None
    except orjson.JSONDecodeError as exc:
        raise WireError(f"part {name}: line {lineno}: not JSON: {exc}") from None


_INNER_SCHEMAS = {"tx_record": TX_RECORD_SCHEMA}

ALL_SCHEMAS = {
    "tx_batch.json": TX_BATCH_SCHEMA,
    "ack.json": ACK_SCHEMA,
    "status.json": STATUS_SCHEMA,
    "manifest.json": MANIFEST_SCHEMA,
    "deny_delta.json": DENY_DELTA_SCHEMA,
    "resync.json": RESYNC_SCHEMA,
    "account_query.json": ACCOUNT_QUERY_SCHEMA,
    "account_reply.json": ACCOUNT_REPLY_SCHEMA,
}
