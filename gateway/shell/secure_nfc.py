"""Secure NFC cards: NTAG 424 DNA SUN messages checked with the keys of the
card's programme, before the engine decides on the card.

The rule set (wire/RULESET.md) says which programmes need them and carries
the keys::

    [card_programs.secure]
    sun = { key_id = "sun-2026", required = true }
    [keys.sun.sun-2026]
    meta_read_key = "<32 hex>"   # decrypts PICCData (UID + read counter)
    file_read_key = "<32 hex>"   # SDM file read key, or the master of per-card keys
    diversify = "uid"            # none | uid (default; cards.ntag424.diversify_key)

A PC/SC lane reads the card's NDEF URL while the rules have SUN keys
(hardware/nfc.py, ``read_ndef``) and hands it over unverified as
``NfcRead.sun_url``. :meth:`SecureNfc.check` then

1. authenticates the message with each key set of the rules (encrypted
   PICCData hides the UID, so the card's programme is known only after
   decryption): AES-CBC PICCData, CMAC compared in constant time;
2. looks the authenticated UID up in the member snapshot, finds the card's
   programme and its ``sun`` policy;
3. refuses with a reason code (texts in gateway/core/reasons.py):
   - ``sun_missing``: the programme requires SUN and the read has none;
   - ``sun_bad_format`` / ``sun_bad_mac``: not a valid message;
   - ``sun_key_mismatch``: valid, but under another programme's key set;
   - ``sun_uid_mismatch``: the message names another UID than the card
     answered with (a recorded message on an emulator);
   - ``sun_replayed``: the read counter is not above the last one accepted
     for this card (persisted in SQLite, survives restarts);
   - ``sun_no_keys``: the programme names a key set the rules lack;
4. otherwise passes the read on with ``raw`` = the authenticated UID.

Programmes with ``required = false`` accept reads without a message (or
with something that is not a SUN message), but a message that fails the
MAC or is replayed is refused all the same: a genuine card never sends one.

Policy keys read, defensively (``.get``), from the effective rule set:
``card_programs`` (a table keyed by id, or a list of objects with ``id``),
``card_programs.<id>.prefix``, ``.length``, ``.sun.key_id`` (a string; a
list of ids is accepted too, for key rotation), ``.sun.required`` (default
true), ``keys.sun.<key_id>.meta_read_key``, ``.file_read_key``,
``.diversify`` (default "uid", as in the schema), and ``members`` (``nfc_uid``) unless the
rules object has a ``uid_index``.

Keys are held in memory only (cards.ntag424.SdmKeys), never logged, never
in an error message; see deploy/HARDWARE.md, "Key handling".
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import stat
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from gateway.core import validate
from cards.ntag424 import CounterStore, SdmKeys, SunError, SunMessage, SunVerifier, diversify_key
from hardware.readers import CardRead, CardReader

log = logging.getLogger("storegate.secure_nfc")

_HEX_KEY = re.compile(r"^[0-9A-Fa-f]{32}$")
_UID_HEX = re.compile(r"^(?:[0-9A-F]{14}|[0-9A-F]{20})$")  # 7/10-byte UIDs; random IDs are 4 bytes


@dataclass(frozen=True)
class _Programme:
    id: str
    prefix: str
    length: int | None
    key_ids: tuple[str, ...] | None  # None: the programme does not use SUN
    required: bool


@dataclass
class _Compiled:
    """What one rule set means for SUN checks, built once per rule set."""

    verifiers: dict[str, SunVerifier] = field(default_factory=dict)
    programmes: list[_Programme] = field(default_factory=list)
    uid_index: dict[str, str] = field(default_factory=dict, repr=False)

    @property
    def active(self) -> bool:
        return bool(self.verifiers) or any(p.key_ids for p in self.programmes)


def _data(rules: Any) -> dict:
    data = getattr(rules, "data", rules)
    return data if isinstance(data, dict) else {}


def _programmes(data: dict) -> list[_Programme]:
    raw = data.get("card_programs") or {}
    items = raw.items() if isinstance(raw, dict) else ((p.get("id", ""), p) for p in raw if isinstance(p, dict))
    out = []
    for pid, prog in items:
        if not isinstance(prog, dict) or prog.get("disabled"):
            continue
        sun = prog.get("sun")
        key_ids = required = None
        if isinstance(sun, dict):
            kid = sun.get("key_id")
            key_ids = tuple(k for k in ([kid] if isinstance(kid, str) else kid or []) if isinstance(k, str))
            required = sun.get("required", True) is not False
        out.append(_Programme(str(pid), str(prog.get("prefix", "")),
                              prog.get("length") if isinstance(prog.get("length"), int) else None,
                              key_ids, bool(required)))
    return out


def _key_bytes(value: Any, where: str) -> bytes:
    if not isinstance(value, str) or not _HEX_KEY.match(value):
        raise ValueError(f"{where}: must be 32 hex digits (AES-128)")  # never the value itself
    return bytes.fromhex(value)


def _uid_index(rules: Any, data: dict) -> dict[str, str]:
    index = getattr(rules, "uid_index", None)
    if isinstance(index, dict):
        return index
    members = data.get("members") or {}
    rows = members.items() if isinstance(members, dict) else ((m.get("card_no"), m) for m in members
                                                              if isinstance(m, dict))
    return {str(m["nfc_uid"]).upper(): no for no, m in rows if isinstance(m, dict) and m.get("nfc_uid")}


class SecureNfc:
    """SUN checks for the gateway's NFC reads; one per gateway.

    `counters_path`: the SQLite file of last read counters per card.
    `rules_fn`: returns the running rule set (for :meth:`wanted`).
    `rules_path`: the persisted rule set, which holds the keys: its mode is
    tightened to 0600 when it is readable by others.
    """

    def __init__(self, counters_path: str | Path, rules_fn: Callable[[], Any] | None = None, *,
                 rules_path: str | Path | None = None) -> None:
        self.counters = CounterStore(counters_path)
        _private(self.counters.path)
        self._rules_fn = rules_fn or (lambda: None)
        self._rules_path = Path(rules_path) if rules_path else None
        # (rules, what they mean): one reference, swapped whole, because reader
        # threads (wanted()) and the event loop (check()) both read it.
        self._cache: tuple[Any, _Compiled] = (None, _Compiled())
        self.refusals: dict[str, int] = {}

    def __repr__(self) -> str:
        return f"SecureNfc(counters={str(self.counters.path)!r})"

    def close(self) -> None:
        self.counters.close()

    # -- rules -------------------------------------------------------------
    def _compile(self, rules: Any) -> _Compiled:
        cached_rules, cached = self._cache
        if rules is cached_rules:
            return cached
        data = _data(rules)
        compiled = _Compiled(programmes=_programmes(data), uid_index=_uid_index(rules, data))
        key_sets = ((data.get("keys") or {}).get("sun") or {})
        for key_id, spec in (key_sets.items() if isinstance(key_sets, dict) else ()):
            where = f"keys.sun.{key_id}"
            try:
                if not isinstance(spec, dict):
                    raise ValueError(f"{where}: must be a table")
                meta = _key_bytes(spec.get("meta_read_key"), f"{where}.meta_read_key")
                file_key = _key_bytes(spec.get("file_read_key"), f"{where}.file_read_key")
                how = spec.get("diversify", "uid")  # the schema's default
                if how == "uid":
                    file_read = (lambda master: lambda uid: diversify_key(master, uid))(file_key)
                elif how == "none":
                    file_read = file_key
                else:
                    raise ValueError(f"{where}.diversify: {how!r} is not one of none, uid")
                compiled.verifiers[str(key_id)] = SunVerifier(SdmKeys(meta, file_read), self.counters)
            except ValueError as exc:  # the message names the field, never the key
                log.error("SUN key set unusable, cards of its programmes are refused: %s", exc)
        if compiled.verifiers:
            self._tighten_rules_file()
        self._cache = (rules, compiled)
        return compiled

    def _tighten_rules_file(self) -> None:
        path = self._rules_path
        try:
            if path is not None and path.exists() and stat.S_IMODE(path.stat().st_mode) & 0o077:
                os.chmod(path, 0o600)
                log.warning("%s holds SUN read keys and was readable by others: set to 0600 "
                            "(run the service with UMask=0077, see deploy/HARDWARE.md)", path)
        except OSError as exc:
            log.warning("cannot check the permissions of %s: %s", path, exc)

    def wanted(self) -> bool:
        """Should NFC readers read the NDEF URL? (asked by the reader thread at each tap)"""
        rules = self._rules_fn()
        return rules is not None and self._compile(rules).active

    def attach(self, reader: CardReader | None) -> None:
        """Make a PC/SC reader read SUN messages while the rules have SUN keys."""
        if reader is not None and hasattr(reader, "read_ndef") and getattr(reader, "sun_verifier", None) is None:
            reader.read_ndef = self.wanted

    # -- a read --------------------------------------------------------------
    async def check(self, read: CardRead, rules: Any) -> tuple[CardRead, validate.Verdict | None]:
        """(read, None) to go on to the engine, with raw = the authenticated
        UID when a SUN message checked out; or (read, deny verdict)."""
        if read.source != "nfc" or rules is None:
            return read, None
        compiled = self._compile(rules)
        if not compiled.active and getattr(read, "sun", None) is None:
            return read, None  # no secure programmes: nothing to check, no thread hop
        # The replay check writes SQLite with synchronous=FULL: off the event loop.
        return await asyncio.to_thread(self.check_sync, read, rules)

    def check_sync(self, read: CardRead, rules: Any) -> tuple[CardRead, validate.Verdict | None]:
        compiled = self._compile(rules)
        url = getattr(read, "sun_url", None)
        raw_uid = read.raw.strip().upper().replace(":", "")
        verified: tuple[str, SunMessage] | None = None
        error: str | None = None
        if url is not None and compiled.verifiers:
            try:
                verified = self._authenticate(compiled, url)
            except SunError as refused:
                error = refused.reason
        elif url is None and getattr(read, "sun", None) not in (None, "missing"):
            # A reader that verified with keys of its own (PcscReader(sun_verifier=...)).
            if read.sun != "ok":
                error = read.sun
        uid = verified[1].uid_hex if verified else raw_uid
        card_no = compiled.uid_index.get(uid)
        prog = self._programme_for(compiled, card_no) if card_no else None
        if verified and _UID_HEX.match(raw_uid) and raw_uid != uid:
            return read, self._refuse(read, "sun_uid_mismatch", card_no)
        if prog is None or prog.key_ids is None:
            # Not a secure programme (or an unknown card: the engine says so).
            return (replace(read, raw=uid) if verified else read), None
        has_message = url is not None or getattr(read, "sun", None) not in (None, "missing")
        usable = [k for k in prog.key_ids if k in compiled.verifiers]
        if not usable and (prog.required or has_message):
            return read, self._refuse(read, "sun_no_keys", card_no)
        if error == "bad_format" and not prog.required:
            return read, None  # a plain URL on a card of an optional-SUN programme
        if error:
            return read, self._refuse(read, f"sun_{error}", card_no)
        if verified is None:
            if getattr(read, "sun", None) == "ok":
                return read, None  # verified (and replay-checked) by the reader itself
            return (read, self._refuse(read, "sun_missing", card_no)) if prog.required else (read, None)
        key_id, message = verified
        if key_id not in prog.key_ids:
            return read, self._refuse(read, "sun_key_mismatch", card_no)
        # Counter last, after every other check: only a message we accept uses it up.
        if not self.counters.advance(message.uid, message.counter):
            return read, self._refuse(read, "sun_replayed", card_no)
        return replace(read, raw=uid), None

    @staticmethod
    def _authenticate(compiled: _Compiled, url: str) -> tuple[str, SunMessage]:
        """(key_id, message) of the first key set the message verifies under.
        Refused under all: bad_format only if every key set said so (a URL
        that is not a SUN message); a PICC record that decrypts to garbage
        under one key set says nothing about the others."""
        refusals: list[SunError] = []
        for key_id, verifier in compiled.verifiers.items():
            try:
                return key_id, verifier.authenticate(url)
            except SunError as refused:
                refusals.append(refused)
        if not refusals:
            raise SunError("bad_mac", "no key set")
        raise next((r for r in refusals if r.reason != "bad_format"), refusals[0])

    @staticmethod
    def _programme_for(compiled: _Compiled, card_no: str) -> _Programme | None:
        """The programme with the longest matching prefix (as wire/ruleset.py decides)."""
        best = None
        for prog in compiled.programmes:
            if card_no.startswith(prog.prefix) and (prog.length is None or len(card_no) == prog.length):
                if best is None or len(prog.prefix) > len(best.prefix):
                    best = prog
        return best

    def _refuse(self, read: CardRead, reason: str, card_no: str | None) -> validate.Verdict:
        self.refusals[reason] = self.refusals.get(reason, 0) + 1
        # The reason and the masked card only: never the UID, the URL or a key.
        log.warning("lane %s: NFC read refused: %s, card %s", read.lane, reason,
                    validate.mask_card(card_no) if card_no else "unknown")
        return validate.Verdict("deny", reason, card_no)


def _private(path: Path) -> None:
    """The counters name every secure card that was used here: owner only."""
    try:
        os.chmod(path, 0o600)
    except OSError as exc:
        log.warning("cannot restrict %s to its owner: %s", path, exc)
