"""The member look-up that card validation decides by, and its in-memory twin.

``MemberLookup`` is the interface (DESIGN.md principle 2): the SQLite
``MemberStore`` of a real store (gateway/store/members.py), ``InMemoryMembers``
here (a rule set's inline ``members`` / ``deny`` tables; small rule sets and the
pure tests) and the counter's view with the cards registered here
(``LocalMembers``, gateway/store/archive.py) all implement it, and
gateway/core/validate.py reads the member snapshot only through it.

Pure: no I/O, no clock (``LiveCache`` takes ``now`` as an argument).
"""

from __future__ import annotations

import threading
from typing import Iterable, NamedTuple, Protocol

from wire.ruleset import check_deny_entry, check_member

MEMBER_DEFAULTS = {"status": "active", "birthday_calendar": "solar", "points": 0, "balance_fen": 0}
DELTA_INTS = ("points", "points_earned", "points_redeemed", "stored_value_fen")
DELTA_MAPS = ("packages", "promotion_uses", "gifts")   # gifts: gift id -> gifts redeemed (the day's limits)
# package_expires: package id -> its expiry after a package_sale here ("YYYY-MM-DD", None: no expiry);
# not in the record's deltas: the counter adds it from the record's ``expires`` (package_expiry_delta).
DELTA_KEYS = set(DELTA_INTS) | set(DELTA_MAPS) | {"coupons_used", "package_expires"}


class DenyDeltaGap(Exception):
    """A deny-list delta skipped a version: the caller asks HQ for a resync."""

    def __init__(self, have: int, got: int) -> None:
        super().__init__(f"deny delta v{got} does not follow the applied v{have}; resync needed")
        self.have, self.got = have, got


def normalise_uid(raw: str) -> str:
    return raw.strip().upper().replace(":", "").replace(" ", "")


# Other spellings accepted for the same things (the brief's names): normalised on the way in.
_ALIASES = {"balance_fen": "stored_value_fen", "coupons": "coupons_used", "promotions": "promotion_uses"}


def check_deltas(deltas: dict) -> dict:
    if not isinstance(deltas, dict):
        raise ValueError("deltas: must be an object")
    if set(deltas) & (set(_ALIASES) | {"package_uses"}):
        deltas = {_ALIASES.get(k, k): v for k, v in deltas.items()}
        uses = deltas.pop("package_uses", None)
        if uses is not None:   # {id: uses consumed} -> change of remaining uses
            if not isinstance(uses, dict) or not all(type(n) is int for n in uses.values()):
                raise ValueError("deltas.package_uses: must map ids to integers")
            packages = dict(deltas.get("packages", {}))
            for pkg, n in uses.items():
                packages[pkg] = packages.get(pkg, 0) - n
            deltas["packages"] = packages
    unknown = set(deltas) - DELTA_KEYS
    if unknown:
        raise ValueError(f"deltas: unknown field(s) {', '.join(sorted(unknown))}")
    for k in DELTA_INTS:
        if type(deltas.get(k, 0)) is not int:
            raise ValueError(f"deltas.{k}: must be an integer")
    for k in DELTA_MAPS:
        if not isinstance(deltas.get(k, {}), dict) or \
                not all(isinstance(i, str) and type(n) is int for i, n in deltas.get(k, {}).items()):
            raise ValueError(f"deltas.{k}: must map ids to integers")
    expires = deltas.get("package_expires", {})
    if not isinstance(expires, dict) or not all(
            isinstance(i, str) and (d is None or (isinstance(d, str) and len(d) == 10)) for i, d in expires.items()):
        raise ValueError("deltas.package_expires: must map ids to YYYY-MM-DD or null")
    used = deltas.get("coupons_used", [])
    if not isinstance(used, list) or not all(isinstance(c, str) for c in used):
        raise ValueError("deltas.coupons_used: must be a list of codes")
    return deltas


class LiveAccount(NamedTuple):
    """HQ's live answer for one card: ``row`` (the card's member row, in the
    snapshot's format), ``primary`` (its primary card's row for a subsidiary
    card), ``store_seq`` (it includes this store's records up to it),
    ``as_of`` (HQ's clock, epoch ms), ``expires`` (epoch s, store clock)."""
    card_no: str
    row: dict
    primary: dict | None
    store_seq: int
    as_of: int
    expires: float


class LiveCache:
    """The last live answer per card, for ``hold_s`` seconds; at most
    ``max_cards`` cards (the oldest answer goes first)."""

    def __init__(self, hold_s: float = 300.0, max_cards: int = 4096) -> None:
        self.hold_s = hold_s
        self.max_cards = max_cards
        self._by_card: dict[str, LiveAccount] = {}

    def put(self, card_no: str, row: dict, primary: dict | None, store_seq: int, as_of: int,
            now: float) -> LiveAccount:
        entry = LiveAccount(card_no, expand_row(row), expand_row(primary) if primary else None, store_seq, as_of,
                            now + self.hold_s)
        self._by_card.pop(card_no, None)       # re-inserted last: dicts keep insertion order
        self._by_card[card_no] = entry
        while len(self._by_card) > self.max_cards:
            del self._by_card[next(iter(self._by_card))]
        return entry

    def get(self, card_no: str, now: float) -> LiveAccount | None:
        entry = self._by_card.get(card_no)
        if entry is None:
            return None
        if now > entry.expires:
            del self._by_card[card_no]
            return None
        return entry

    def forget(self, card_no: str | None = None) -> None:
        if card_no is None:
            self._by_card.clear()
        else:
            self._by_card.pop(card_no, None)

    def __len__(self) -> int:
        return len(self._by_card)


def expand_row(rec: dict) -> dict:
    """A member row with the defaults a snapshot read fills in (MemberStore.get)."""
    out = {**MEMBER_DEFAULTS, "packages": {}, "coupons": [], **rec}
    if out.get("nfc_uid"):
        out["nfc_uid"] = normalise_uid(out["nfc_uid"])
    return out


def package_expiry_delta(type_: str, body: dict) -> dict:
    """What a journaled record says about a package's expiry, as a local
    delta: a ``package_sale`` sets it to the record's ``expires`` (None: no
    expiry), as HQ does when it applies the record; other records nothing."""
    if type_ != "package_sale" or not isinstance(body.get("package_id"), str):
        return {}
    return {"package_expires": {body["package_id"]: body.get("expires")}}


def empty_totals() -> dict:
    """Since the snapshot: net changes (``package_expires``: set by the
    latest package sale here); ``today``: the store-local day's use."""
    return {"points": 0, "stored_value_fen": 0, "packages": {}, "package_expires": {}, "coupons_used": [],
            "today": {"points_redeemed": 0, "stored_value_paid_fen": 0, "promotion_uses": {}, "coupons_used": []}}


def add_deltas(totals: dict, row_day: str, day: str, d: dict) -> None:
    totals["points"] += d.get("points", 0)
    totals["stored_value_fen"] += d.get("stored_value_fen", 0)
    for pkg, n in d.get("packages", {}).items():
        totals["packages"][pkg] = totals["packages"].get(pkg, 0) + n
    totals["package_expires"].update(d.get("package_expires", {}))   # in seq order: the latest sale's
    totals["coupons_used"] += [c for c in d.get("coupons_used", []) if c not in totals["coupons_used"]]
    if row_day == day:
        today = totals["today"]
        today["points_redeemed"] += max(0, d.get("points_redeemed", 0))
        today["stored_value_paid_fen"] += max(0, -d.get("stored_value_fen", 0))
        for pid, n in d.get("promotion_uses", {}).items():
            today["promotion_uses"][pid] = today["promotion_uses"].get(pid, 0) + n
        for gid, n in d.get("gifts", {}).items():   # "gifts" only on a day with gifts redeemed
            gifts = today.setdefault("gifts", {})
            gifts[gid] = gifts.get(gid, 0) + n
        today["coupons_used"] += [c for c in d.get("coupons_used", []) if c not in today["coupons_used"]]


# ---------------------------------------------------------------- in memory

class InMemoryMembers:
    """The member interface over dicts: inline ``members`` / ``deny`` tables
    (keyed by card number, as in a rule set) or part records."""

    live: LiveCache | None = None   # HQ's live answers (gateway/shell/live_accounts.py), when online

    def __init__(self, members: dict | Iterable[dict] = (), deny: dict | Iterable[dict] = (), *,
                 version: int = 0, as_of: int | None = None, store_seq: int = 0, deny_version: int = 0) -> None:
        self._lock = threading.Lock()
        self._deltas: dict[int, tuple[str, str, dict]] = {}   # seq -> (member_id, day, deltas)
        self._deny_log: dict[int, dict] = {}
        self._load(members, deny, version, as_of, store_seq, deny_version)

    @staticmethod
    def _records(table: dict | Iterable[dict]) -> Iterable[dict]:
        if isinstance(table, dict):
            return ({"card_no": no, **rec} for no, rec in table.items())
        return table

    def _load(self, members, deny, version, as_of, store_seq, deny_version) -> None:
        by_card = {}
        for rec in self._records(members):
            rec = check_member(rec)
            by_card[rec["card_no"]] = rec
        deny_map = {}
        for rec in self._records(deny):
            rec = check_deny_entry(rec)
            deny_map[rec["card_no"]] = rec
        uids = {normalise_uid(r["nfc_uid"]): no for no, r in by_card.items() if r.get("nfc_uid")}
        for v in sorted(self._deny_log):  # deny deltas newer than the snapshot's deny list
            if v > deny_version:
                self._apply_deny(deny_map, self._deny_log[v], by_card)
        with self._lock:
            self._members, self._deny, self._uids = by_card, deny_map, uids
            self.version, self.as_of, self.store_seq = version, as_of, store_seq
            self.deny_version = max([deny_version, *self._deny_log])
            self._deltas = {s: d for s, d in self._deltas.items() if s > store_seq}
            self._deny_log = {v: e for v, e in self._deny_log.items() if v > deny_version}

    def get(self, card_no: str) -> dict | None:
        return self._members.get(card_no)

    def card_for_uid(self, uid: str) -> str | None:
        return self._uids.get(normalise_uid(uid))

    def denied(self, card_no: str) -> dict | None:
        return self._deny.get(card_no)

    def count(self) -> tuple[int, int]:
        return len(self._members), len(self._deny)

    def replace_snapshot(self, members: Iterable[dict], deny: Iterable[dict], *, version: int,
                         as_of: int, store_seq: int, deny_version: int = 0, rules: dict | None = None) -> None:
        """``rules``: accepted for the interface; rows are checked with
        wire.ruleset.check_member alone here (the SQLite store checks them
        against the effective rules' card types too)."""
        self._load(members, deny, version, as_of, store_seq, deny_version)

    @staticmethod
    def _apply_deny(deny_map: dict, entries: dict, members: dict | None = None) -> None:
        """A delta on the deny list; a lift also lifts the member row's status
        (``members``, changed in place): see ``lifted_row``."""
        for card_no, entry in entries.items():
            if entry is None:
                deny_map.pop(card_no, None)
                row = members.get(card_no) if members is not None else None
                if row is not None and lifted_row(row) is not row:
                    members[card_no] = lifted_row(row)
            else:
                deny_map[card_no] = check_deny_entry({"card_no": card_no, **entry})

    def apply_deny_delta(self, version: int, entries: dict) -> bool:
        """Apply deny delta ``version`` ({card_no: entry, or None to lift}).
        False if already applied; DenyDeltaGap if a version was skipped."""
        with self._lock:
            if version <= self.deny_version:
                return False
            if version != self.deny_version + 1:
                raise DenyDeltaGap(self.deny_version, version)
            deny_map = dict(self._deny)
            lifts = any(e is None and self._members.get(no, {}).get("status", "active") != "active"
                        for no, e in entries.items())
            members = dict(self._members) if lifts else self._members   # copied only when a row changes
            self._apply_deny(deny_map, entries, members)
            self._deny, self._members, self.deny_version = deny_map, members, version
            self._deny_log[version] = entries
            return True

    def record_deltas(self, seq: int, member_id: str, day: str, deltas: dict) -> None:
        deltas = check_deltas(deltas)
        with self._lock:
            if seq > self.store_seq:
                self._deltas[seq] = (member_id, day, deltas)

    def local_totals(self, member_id: str, day: str, after: int | None = None) -> dict:
        """The member's deltas journaled here after seq ``after`` (default:
        the snapshot's watermark; a live account's ``store_seq``)."""
        after = self.store_seq if after is None else max(after, self.store_seq)
        totals = empty_totals()
        for seq in sorted(self._deltas):
            mid, row_day, d = self._deltas[seq]
            if mid == member_id and seq > after:
                add_deltas(totals, row_day, day, d)
        return totals

    def close(self) -> None:
        pass


def lifted_row(row: dict) -> dict:
    """A member row as a lift in a deny delta leaves it: ``active``.

    HQ lifts a card (a deny delta entry ``active``: an overdraft's block
    settled, ``card unfreeze``, ``cancel_lost``) only when the card is active
    at HQ, and a delta applied on a snapshot is newer than it (a snapshot
    re-applies only the deltas after its deny list's version). A snapshot
    built while the card was blocked or frozen says so in the row's
    ``status`` too: without this, the lift took the card off the deny list
    but the row kept refusing it offline until HQ's next snapshot."""
    if row.get("status", "active") == "active":
        return row
    return {**row, "status": "active"}


class LiveAnswers(Protocol):
    """HQ's live answers held for a short time (``LiveCache``)."""

    def get(self, card_no: str, now: float) -> "LiveAccount | None": ...


class MemberLookup(Protocol):
    """What validation reads of the member snapshot and the deny list.

    ``version`` / ``as_of`` / ``store_seq``: the snapshot's version, HQ's time
    it was cut (epoch s, 0: with the rules) and its watermark (this store's
    records up to it are in it). ``live``: HQ's live answers, when online."""

    version: int
    as_of: int | None
    store_seq: int
    live: LiveAnswers | None

    def get(self, card_no: str) -> dict | None: ...

    def card_for_uid(self, uid: str) -> str | None: ...

    def denied(self, card_no: str) -> dict | None: ...

    def local_totals(self, member_id: str, day: str, after: int | None = None) -> dict: ...


class MemberSnapshot(MemberLookup, Protocol):
    """A member look-up that HQ's snapshots and deny deltas are loaded into,
    and the counter's local deltas recorded in (``MemberStore``,
    ``InMemoryMembers``)."""

    deny_version: int

    def replace_snapshot(self, members: Iterable[dict], deny: Iterable[dict], *, version: int,
                         as_of: int, store_seq: int, deny_version: int = 0, rules: dict | None = None) -> None: ...

    def apply_deny_delta(self, version: int, entries: dict) -> bool: ...

    def record_deltas(self, seq: int, member_id: str, day: str, deltas: dict) -> None: ...

    def count(self) -> tuple[int, int]: ...

    def close(self) -> None: ...
