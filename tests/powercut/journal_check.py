"""Reading a journal directory from outside, independently of the journal's
own code, to check its invariants after a power cut.

The frame format is the documented one (gateway journal module docstring):
``b"SG" | u32 length | u32 crc32(payload) | payload (compact JSON)`` with
payloads ``{"k":"h","next":N}`` (segment header), ``{"k":"r","seq",...}``
(record), ``{"k":"a","r":[[lo,hi],...]}`` (ack) and ``{"k":"i",...}`` (an
idempotency key carried forward). Segments are ``NNNNNNNN.log``.
"""

from __future__ import annotations

import json
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

HEADER = struct.Struct("<2sII")
MAGIC = b"SG"


def journal_api():
    """The journal module through its public names, wherever it lives now
    (gateway/store/journal/ after the restructuring, gateway/journal.py before)."""
    try:
        from gateway.store import journal as mod
        mod.read_index, mod.Journal  # noqa: B018 - the package exists and exports them
        return mod
    except (ImportError, AttributeError):
        from gateway import journal as mod
        return mod


@dataclass
class Segment:
    number: int
    size: int
    frames: list = field(default_factory=list)    # (offset, length, payload)
    end: int = 0                                  # where the intact frames end
    tail: bytes = b""                             # what follows them, zeros stripped ("" = clean)


def parse_segment(buf: bytes, number: int = 0) -> Segment:
    seg = Segment(number, len(buf))
    pos = 0
    while pos + HEADER.size <= len(buf):
        magic, length, crc = HEADER.unpack_from(buf, pos)
        end = pos + HEADER.size + length
        if magic != MAGIC or end > len(buf):
            break
        data = buf[pos + HEADER.size:end]
        if zlib.crc32(data) != crc:
            break
        try:
            payload = json.loads(data)
        except ValueError:
            break
        seg.frames.append((pos, end - pos, payload))
        pos = end
    seg.end = pos
    seg.tail = buf[pos:].rstrip(b"\0")
    return seg


@dataclass
class JournalView:
    segments: list[Segment]
    records: dict[int, str]           # seq -> tx id, every record frame on disk
    pending: set[int]                 # records no ack frame covers
    next_seq: int                     # what the journal must hand out next, at least
    problems: list[str]               # invariant violations found while reading


def read_journal(directory: Path) -> JournalView:
    segs = []
    for p in sorted(directory.glob("*.log")):
        if p.stem.isdigit():
            try:
                buf = p.read_bytes()
            except FileNotFoundError:   # a running journal compacted it meanwhile
                continue
            segs.append(parse_segment(buf, int(p.stem)))
    records: dict[int, str] = {}
    acked: list[tuple[int, int]] = []
    next_seq = 1
    problems: list[str] = []
    last_seq = 0
    for seg in segs:
        for off, _length, fr in seg.frames:
            kind = fr.get("k")
            if kind == "h":
                next_seq = max(next_seq, fr["next"])
                if fr["next"] <= last_seq:
                    problems.append(f"segment {seg.number:08d}: header next={fr['next']} but seq {last_seq} "
                                    "was already written (a sequence number would be reused)")
            elif kind == "r":
                seq, tx = fr["seq"], fr["id"]
                if seq in records and records[seq] != tx:
                    problems.append(f"seq {seq} reused: {records[seq]} and {tx} (segment {seg.number:08d} at {off})")
                elif seq in records:
                    problems.append(f"seq {seq} ({tx}) written twice (segment {seg.number:08d} at {off})")
                if seq <= last_seq:
                    problems.append(f"seq {seq} after seq {last_seq} (segment {seg.number:08d} at {off})")
                records[seq] = tx
                last_seq = max(last_seq, seq)
                next_seq = max(next_seq, seq + 1)
            elif kind == "a":
                acked.extend((lo, hi) for lo, hi in fr["r"])
            elif kind == "i":
                next_seq = max(next_seq, fr["seq"] + 1)
    acked_seqs: set[int] = set()
    for lo, hi in acked:
        acked_seqs.update(range(max(lo, 1), min(hi, last_seq) + 1))
    pending = set(records) - acked_seqs
    return JournalView(segs, records, pending, next_seq, problems)
