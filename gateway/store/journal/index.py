"""The journal's index: plain data rebuilt from frames (invariants 5 and 6
in gateway.store.journal). No I/O: the journal feeds it every frame it
reads on open and every frame it writes, in the order they are on disk."""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

import orjson

from gateway.store.journal.format import ACK, KEY, RECORD, SEGMENT_HEADER
from wire.messages import normal_ranges

NO_KEYS = 1 << 62  # keys_oldest when no key is held


def _encoded(answer: dict) -> bytes:
    """An answer as the index keeps it: its JSON, one object a key that the
    garbage collector need not walk, in a fraction of the memory of the
    dicts. A large one is copied to its exact size: orjson's bytes carry
    spare capacity."""
    data = orjson.dumps(answer)
    return bytes(memoryview(data)) if len(data) > 1024 else data


@dataclass
class JournalIndex:
    next_seq: int = 1
    pending: dict = field(default_factory=dict)        # seq -> (segment, offset, length, ts ms)
    order: list = field(default_factory=list)          # pending seqs in ascending order (may hold acked ones)
    live: dict = field(default_factory=dict)           # segment -> how many of its records are pending
    idempotency: dict = field(default_factory=dict)    # key -> (request hash, seq, answer JSON, ts ms, segment)
    keys_at: dict = field(default_factory=dict)        # segment -> how many keys are located there
    keys_oldest: int = NO_KEYS                         # no key is older than this (ts ms)

    def apply(self, frame: dict, segment: int, offset: int, length: int) -> None:
        """Fold one frame of segment `segment` (or of its key file) in."""
        kind = frame.get("k")
        if kind == RECORD:
            self.on_record(frame, segment, offset, length)
        elif kind == ACK:
            self.on_ack(frame["r"])
        elif kind == SEGMENT_HEADER:
            self.on_header(frame["next"])
        elif kind == KEY:
            self.on_key(frame, segment)

    def on_header(self, next_seq: int) -> None:
        self.next_seq = max(self.next_seq, next_seq)

    def on_record(self, frame: dict, segment: int, offset: int, length: int) -> None:
        seq = frame["seq"]
        if seq >= self.next_seq:
            self.next_seq = seq + 1
        pending = self.pending
        if seq not in pending:
            pending[seq] = (segment, offset, length, frame["ts"])
            order = self.order
            if order and seq < order[-1]:
                bisect.insort(order, seq)
            else:
                order.append(seq)
            live = self.live
            live[segment] = live.get(segment, 0) + 1
        key = frame.get("key")
        if key:
            resp = frame["resp"]
            if resp.get("tx_id") != frame["id"]:  # as on disk: the answer without the frame's seq and id
                resp = {**resp, "seq": seq, "tx_id": frame["id"]}
            self._put_key(key, (frame["rh"], seq, _encoded(resp), frame["ts"], segment))

    def on_key(self, frame: dict, segment: int) -> None:
        """A key carried out of a deleted segment (its answer is whole)."""
        self._put_key(frame["key"], (frame["rh"], frame["seq"], _encoded(frame["resp"]), frame["ts"], segment))
        self.next_seq = max(self.next_seq, frame["seq"] + 1)

    def _put_key(self, key: str, entry: tuple) -> None:
        keys_at = self.keys_at
        old = self.idempotency.get(key)
        if old is not None:
            keys_at[old[4]] -= 1
        self.idempotency[key] = entry
        keys_at[entry[4]] = keys_at.get(entry[4], 0) + 1
        if entry[3] < self.keys_oldest:
            self.keys_oldest = entry[3]

    def on_ack(self, ranges) -> int:
        """Forget the pending records in these ranges; how many there were.
        The work is bounded by the records in the ranges, however wide they
        are (ack frames of older versions were not checked against what was
        sent), and the next sequence number never moves."""
        freed = 0
        pending, order, live = self.pending, self.order, self.live
        for lo, hi in normal_ranges(ranges):
            for k in range(bisect.bisect_left(order, lo), bisect.bisect_right(order, hi)):
                loc = pending.pop(order[k], None)
                if loc is not None:
                    live[loc[0]] -= 1
                    freed += 1
        if len(order) > 2 * len(pending) + 1024:
            self.order = [s for s in order if s in pending]
        return freed

    def any_pending(self, lo: int, hi: int) -> bool:
        order, pending = self.order, self.pending
        return any(order[k] in pending
                   for k in range(bisect.bisect_left(order, lo), bisect.bisect_right(order, hi)))

    def after(self, cursor: int, limit: int) -> list[int]:
        i = bisect.bisect_right(self.order, cursor)
        out = []
        while i < len(self.order) and len(out) < limit:
            seq = self.order[i]
            if seq in self.pending:
                out.append(seq)
            i += 1
        return out

    def oldest_pending_ts(self) -> int | None:
        pending = self.pending
        for seq in self.order:
            if seq in pending:
                return pending[seq][3]
        return None

    def expire_keys(self, older_than_ms: int) -> None:
        """Forget the keys of records older than this (nothing to do, and no
        walk over the keys, until the oldest one is)."""
        if older_than_ms <= self.keys_oldest:
            return
        keys_at, oldest, expired = self.keys_at, NO_KEYS, []
        for key, entry in self.idempotency.items():
            ts = entry[3]
            if ts < older_than_ms:
                expired.append(key)
                keys_at[entry[4]] -= 1
            elif ts < oldest:
                oldest = ts
        for key in expired:
            del self.idempotency[key]
        self.keys_oldest = oldest

    def keys_in(self, segment: int) -> list[tuple[str, tuple]]:
        if not self.keys_at.get(segment):
            return []
        return [(k, v) for k, v in self.idempotency.items() if v[4] == segment]
