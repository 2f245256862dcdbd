"""Frames: what is valid (invariant 1 in gateway.store.journal), encoding
and decoding, scanning a file's frames. Pure: bytes in, payloads out."""

from __future__ import annotations

import hashlib
import re
import struct
import zlib
from typing import Any

import orjson

from gateway.store.journal.errors import RecordRefused
from wire.messages import MAX_BODY_DEPTH, MAX_RECORD_BYTES, TOO_DEEP, TX_RECORD_SCHEMA, TooDeep, WireError, dumps_within

MAGIC = b"SG"
HEADER = struct.Struct("<2sII")  # magic, payload length, crc32 of the payload
MAX_FRAME = 16 * 1024 * 1024

# The kinds of payload ("k").
SEGMENT_HEADER = "h"  # {"k":"h","next":N}: next_seq when the segment was opened
RECORD = "r"          # {"k":"r","seq","id","type","ts","body"} [+ "key","rh","resp": an idempotency key]
ACK = "a"             # {"k":"a","r":[[lo,hi],...]}: HQ committed these seqs
KEY = "i"             # {"k":"i","key","rh","seq","resp","ts"}: a key carried out of a deleted segment

RECORD_TYPE = re.compile(TX_RECORD_SCHEMA["properties"]["type"]["pattern"])

_pack_header = HEADER.pack


def frame(data: bytes) -> bytes:
    """The frame around an encoded payload."""
    return _pack_header(MAGIC, len(data), zlib.crc32(data)) + data


def encode_frame(payload: dict) -> bytes:
    return frame(orjson.dumps(payload))


def frame_at(buf, pos: int) -> tuple[int, dict] | None:
    """(length, payload) of the valid frame at pos in buf (bytes, mmap or
    memoryview), or None if there is none there."""
    if pos < 0 or pos + HEADER.size > len(buf):
        return None
    magic, length, crc = HEADER.unpack_from(buf, pos)
    end = pos + HEADER.size + length
    if magic != MAGIC or length > MAX_FRAME or end > len(buf):
        return None
    data = buf[pos + HEADER.size:end]
    if zlib.crc32(data) != crc:
        return None
    try:
        return end - pos, orjson.loads(data)
    except orjson.JSONDecodeError:
        return None


def scan_frames(buf, start: int = 0):
    """Yield (offset, length, payload) for each valid frame from start, and
    stop at the first spot that is not one. The caller compares the end it
    reached with len(buf) to see whether anything was left unread."""
    pos = start
    while (found := frame_at(buf, pos)) is not None:
        length, payload = found
        yield pos, length, payload
        pos += length


def frames_after_damage(buf, start: int):
    """Every valid frame after a damaged spot at start, found by searching
    for the next magic that begins a valid frame (and the frames following
    it), again after each damaged spot."""
    pos = buf.find(MAGIC, start + 1)
    while pos != -1:
        end = pos
        for offset, length, payload in scan_frames(buf, pos):
            yield offset, length, payload
            end = offset + length
        pos = buf.find(MAGIC, max(end, pos + 1))


def decode_frame(buf, pos: int, length: int) -> dict | None:
    """The payload of the frame of `length` bytes at pos in buf, or None if
    there is no valid frame of that length there."""
    found = frame_at(buf, pos)
    return found[1] if found is not None and found[0] == length else None


def encode_record(payload: dict) -> bytes:
    """A record's payload encoded, or RecordRefused if HQ could not take the
    record (invariant 9: the frame holds the record and more, so a payload
    within the bounds is a record within them)."""
    try:
        data = dumps_within(payload, MAX_BODY_DEPTH + 1)
    except TooDeep:
        raise RecordRefused(f"record not journaled: {TOO_DEEP}") from None
    except WireError as exc:
        raise RecordRefused(f"record not journaled: {exc}") from None
    if len(data) > MAX_RECORD_BYTES:
        raise RecordRefused(f"record not journaled: {len(data)} bytes, more than the {MAX_RECORD_BYTES} "
                            "a record may hold")
    return data


def key_frame(key: str, entry: tuple) -> bytes:
    """The frame carrying an index entry (request hash, seq, answer JSON,
    ts, _) of an idempotency key into a key file."""
    req_hash, seq, answer, ts = entry[:4]
    return frame(b'{"k":"%s","key":%s,"rh":%s,"seq":%d,"resp":%s,"ts":%d}'
                 % (KEY.encode(), orjson.dumps(key), orjson.dumps(req_hash), seq, answer, ts))


try:  # CPython's own SHA-256: the same digest as hashlib's, with less overhead per call
    from _sha256 import sha256 as _sha256
except ImportError:  # pragma: no cover - a build without it
    _sha256 = hashlib.sha256


def request_hash(request: Any) -> str:
    """128 bits of SHA-256 over the canonical request: plenty to tell a
    retry from a different request."""
    return _sha256(orjson.dumps(request, option=orjson.OPT_SORT_KEYS)).hexdigest()[:32]


def same_request(stored: str, req_hash: str) -> bool:
    """Frames written before the hash was shortened carry all 64 hex digits."""
    return stored == req_hash or stored[:32] == req_hash
