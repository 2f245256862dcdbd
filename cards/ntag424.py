"""NTAG 424 DNA Secure Unique NFC (SUN) messages: check that a tap is genuine.

An NTAG 424 DNA with Secure Dynamic Messaging (SDM) rewrites the URL in its
NDEF file on every read, e.g.::

    https://member.example.com/t?picc_data=EF963FF7828658A599F3041510671E88&cmac=94EED9EE65337086

- ``picc_data`` (or ``e``): 16 bytes, AES-128-CBC (zero IV) under the SDM meta
  read key of PICCDataTag (1 byte: bit 7 UID mirrored, bit 6 read counter
  mirrored, bits 3..0 UID length) || UID (7) || SDMReadCtr (3, little endian)
  || random padding. The random padding makes every message look different.
- ``cmac`` (or ``c``): 8 bytes, the odd-numbered bytes (1, 3, .., 15) of
  AES-CMAC(KSesSDMFileReadMAC, MAC input), with the session key derived per
  NXP AN12196 as CMAC(K_SDMFileRead, 3CC3 0001 0080 || UID || SDMReadCtr).
- ``enc`` (optional): SDMENCFileData, file bytes encrypted under the session
  ENC key (SV1 = C33C 0001 0080 || UID || SDMReadCtr).

The MAC input is what the chip mirrors between SDMMACInputOffset and
SDMMACOffset. This module supports the two layouts of AN12196: without
``enc`` the offsets are equal and the input is empty; with ``enc`` the input
starts at the encrypted file data and runs up to the MAC, i.e. the ASCII text
``<enc hex>&cmac=``. Cards must be programmed with UID and counter mirroring
(PICCDataTag C7): without the counter there is no replay protection.

A clone can copy a URL but cannot make the next one, so the read counter of
every genuine message must be higher than the last one accepted for that card;
:class:`CounterStore` keeps the last counter per UID in SQLite, updated only
after the MAC checked out. The plain mirror (``uid=``, ``ctr=`` in clear) is
accepted too; it leaks the UID to anyone who reads the card.

Key handling
------------
- The keys of a card programme (SDM meta read key, SDM file read key) reach
  the gateway only inside its rule set, which HQ signs; they are not in
  config files, environment variables or the database.
- They are held in memory only (:class:`SdmKeys`), never written to disk and
  never logged: their fields are left out of ``repr()``, and no error
  message of this module contains a key, a UID or a MAC.
- Per-card diversification is recommended (AN10922: derive each card's file
  read key from a programme master key and the UID), so that one card
  taken apart reveals no other card's key: pass ``file_read_key`` as a
  function of the 7-byte UID. The meta read key cannot be diversified that way
  (it decrypts the UID), so it is per programme and rotated with the
  programme.
- SUN messages only prove that a tap is fresh; the gateway still validates
  the card against its rule set like any other read.
"""

from __future__ import annotations

import hmac
import re
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping
from urllib.parse import parse_qsl, urlsplit

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.cmac import CMAC

SV2_MAC_PREFIX = bytes.fromhex("3CC300010080")   # session MAC key derivation (AN12196)
SV1_ENC_PREFIX = bytes.fromhex("C33C00010080")   # session ENC key derivation
TAG_UID_MIRRORED = 0x80
TAG_COUNTER_MIRRORED = 0x40
UID_LENGTH = 7

PARAM_NAMES = {  # long name as in AN12196, short name often used to keep URLs short
    "picc_data": ("picc_data", "e"),
    "cmac": ("cmac", "c"),
    "enc": ("enc",),
    "uid": ("uid",),
    "ctr": ("ctr",),
}


class SunError(Exception):
    """A SUN message that is refused; `reason` is one of REASONS."""

    REASONS = ("bad_format", "bad_mac", "replayed")

    def __init__(self, reason: str, detail: str) -> None:
        if reason not in self.REASONS:
            raise ValueError(f"unknown SUN error reason {reason!r}")
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


@dataclass(frozen=True)
class SdmKeys:
    """The SDM keys of one card programme. In memory only; see "Key handling"."""

    meta_read: bytes = field(repr=False)
    # Either one key for all cards, or uid (7 bytes) -> that card's diversified key.
    file_read: bytes | Callable[[bytes], bytes] = field(repr=False)

    def __post_init__(self) -> None:
        _check_key(self.meta_read, "meta_read")
        if not callable(self.file_read):
            _check_key(self.file_read, "file_read")

    def file_read_for(self, uid: bytes) -> bytes:
        key = self.file_read(uid) if callable(self.file_read) else self.file_read
        _check_key(key, "file_read")
        return key


@dataclass(frozen=True)
class SunMessage:
    """A verified, fresh SUN message."""

    uid: bytes = field(repr=False)          # personal data: never logged
    counter: int                            # SDMReadCtr
    file_data: bytes | None = field(default=None, repr=False)

    @property
    def uid_hex(self) -> str:
        return self.uid.hex().upper()


# -- the cryptography ------------------------------------------------------
def _check_key(key: object, name: str) -> None:
    if not isinstance(key, (bytes, bytearray)) or len(key) != 16:
        raise ValueError(f"SDM key {name} must be 16 bytes (AES-128)")


def _cmac(key: bytes, message: bytes) -> bytes:
    c = CMAC(algorithms.AES(bytes(key)))
    c.update(message)
    return c.finalize()


def _session_vector(prefix: bytes, uid: bytes, counter: int) -> bytes:
    sv = prefix + uid + counter.to_bytes(3, "little")
    return sv + bytes(-len(sv) % 16)  # zero padding to a whole block (a no-op with UID and counter)


def decrypt_picc_data(meta_read_key: bytes, picc_data: bytes) -> tuple[int, bytes, int]:
    """(PICCDataTag, UID, SDMReadCtr) from the encrypted PICCData."""
    decryptor = Cipher(algorithms.AES(bytes(meta_read_key)), modes.CBC(bytes(16))).decryptor()
    plain = decryptor.update(picc_data) + decryptor.finalize()
    tag = plain[0]
    uid = plain[1:1 + UID_LENGTH]
    counter = int.from_bytes(plain[1 + UID_LENGTH:4 + UID_LENGTH], "little")
    return tag, uid, counter


def session_mac_key(file_read_key: bytes, uid: bytes, counter: int) -> bytes:
    """KSesSDMFileReadMAC = CMAC(K_SDMFileRead, SV2)."""
    return _cmac(file_read_key, _session_vector(SV2_MAC_PREFIX, uid, counter))


def sun_mac(session_key: bytes, mac_input: bytes = b"") -> bytes:
    """The 8-byte SUN MAC: bytes 1, 3, .., 15 of the CMAC."""
    return _cmac(session_key, mac_input)[1::2]


def decrypt_file_data(file_read_key: bytes, uid: bytes, counter: int, enc: bytes) -> bytes:
    """SDMENCFileData: AES-CBC under KSesSDMFileReadENC, IV = E(key, SDMReadCtr || 0..0)."""
    key = _cmac(file_read_key, _session_vector(SV1_ENC_PREFIX, uid, counter))
    iv_encryptor = Cipher(algorithms.AES(key), modes.ECB()).encryptor()
    iv = iv_encryptor.update(counter.to_bytes(3, "little") + bytes(13)) + iv_encryptor.finalize()
    decryptor = Cipher(algorithms.AES(key), modes.CBC(iv)).decryptor()
    return decryptor.update(enc) + decryptor.finalize()


def diversify_key(master_key: bytes, uid: bytes, extra: bytes = b"") -> bytes:
    """A card's own AES-128 key from a programme master key (NXP AN10922, 2.2).

    Diversification input M = UID || extra (storegate uses the 7-byte UID
    alone: the rule set's `diversify = "uid"`); D = 01 || M padded to 32
    bytes with 80 00.., CMAC-style subkey K2 on the last block when padded,
    K1 when not. Card personalisation must use the same function.
    """
    _check_key(master_key, "master")
    data = b"\x01" + bytes(uid) + bytes(extra)
    if not 2 <= len(data) <= 32:
        raise ValueError("diversification input must be 1..31 bytes")
    padded = len(data) < 32
    if padded:
        data = (data + b"\x80").ljust(32, b"\x00")
    ecb = Cipher(algorithms.AES(bytes(master_key)), modes.ECB()).encryptor()
    k0 = ecb.update(bytes(16))

    def double(block: bytes) -> bytes:
        value = int.from_bytes(block, "big") << 1
        if value >> 128:
            value = (value & ((1 << 128) - 1)) ^ 0x87
        return value.to_bytes(16, "big")

    k1 = double(k0)
    subkey = double(k1) if padded else k1
    data = data[:16] + bytes(a ^ b for a, b in zip(data[16:], subkey))
    cbc = Cipher(algorithms.AES(bytes(master_key)), modes.CBC(bytes(16))).encryptor()
    return (cbc.update(data) + cbc.finalize())[-16:]


# -- parsing ---------------------------------------------------------------
def _hex_param(params: dict[str, str], name: str, *, length: int | None = None,
               block: int | None = None, required: bool = True) -> tuple[bytes, str] | None:
    text = next((params[alias] for alias in PARAM_NAMES[name] if alias in params), None)
    if text is None:
        if required:
            raise SunError("bad_format", f"parameter {name} is missing")
        return None
    if not re.fullmatch(r"(?:[0-9A-Fa-f]{2})+", text):
        raise SunError("bad_format", f"parameter {name} is not hex")
    raw = bytes.fromhex(text)
    if length is not None and len(raw) != length:
        raise SunError("bad_format", f"parameter {name} must be {length} bytes")
    if block is not None and len(raw) % block:
        raise SunError("bad_format", f"parameter {name} must be whole {block}-byte blocks")
    return raw, text


def parse_params(message: str | Mapping[str, str]) -> dict[str, str]:
    """The query parameters of a SUN URL (or of a bare query string, or a mapping)."""
    if isinstance(message, Mapping):
        return dict(message)
    if not isinstance(message, str):
        raise SunError("bad_format", "SUN message must be a URL or query string")
    query = urlsplit(message).query if "?" in message or "://" in message else message
    pairs = parse_qsl(query, keep_blank_values=True)
    params: dict[str, str] = {}
    for key, value in pairs:
        if key in params:  # an appended second cmac= must not win or lose silently
            raise SunError("bad_format", f"parameter {key} appears twice")
        params[key] = value
    return params


# -- replay protection -----------------------------------------------------
class CounterStore:
    """The last accepted SDMReadCtr per card, in SQLite (durable, thread-safe)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Shared by the reader threads of all lanes: one connection behind a lock.
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._lock = threading.Lock()
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")  # an accepted counter survives a power cut
            self._db.execute("CREATE TABLE IF NOT EXISTS sun_counters ("
                             " uid TEXT PRIMARY KEY, counter INTEGER NOT NULL, seen_at REAL NOT NULL)")

    def advance(self, uid: bytes, counter: int) -> bool:
        """Store `counter` if it is higher than the stored one; False means a replay."""
        with self._lock:
            cursor = self._db.execute(
                "INSERT INTO sun_counters (uid, counter, seen_at) VALUES (?, ?, ?)"
                " ON CONFLICT (uid) DO UPDATE SET counter = excluded.counter, seen_at = excluded.seen_at"
                " WHERE excluded.counter > sun_counters.counter",
                (uid.hex().upper(), counter, time.time()))
            return cursor.rowcount == 1

    def last(self, uid: bytes) -> int | None:
        with self._lock:
            row = self._db.execute("SELECT counter FROM sun_counters WHERE uid = ?",
                                   (uid.hex().upper(),)).fetchone()
        return None if row is None else row[0]

    def close(self) -> None:
        with self._lock:
            self._db.close()


# -- verification ----------------------------------------------------------
class SunVerifier:
    """Verifies SUN messages of one card programme and refuses replays.

    verify() is thread-safe: the PC/SC readers call it from their threads.
    """

    def __init__(self, keys: SdmKeys, counters: CounterStore | str | Path) -> None:
        self._keys = keys
        self.counters = counters if isinstance(counters, CounterStore) else CounterStore(counters)

    def __repr__(self) -> str:
        return f"SunVerifier(counters={str(self.counters.path)!r})"  # never the keys

    def verify(self, message: str | Mapping[str, str]) -> SunMessage:
        """The verified message; raises SunError (bad_format, bad_mac, replayed)."""
        result = self.authenticate(message)
        if not self.counters.advance(result.uid, result.counter):
            raise SunError("replayed", "read counter not higher than the last accepted one")
        return result

    def authenticate(self, message: str | Mapping[str, str]) -> SunMessage:
        """Checks the MAC only, without the replay check (nor recording the counter)."""
        params = parse_params(message)
        mac, _ = _hex_param(params, "cmac", length=8)
        encrypted = _hex_param(params, "picc_data", length=16, required=False)
        if encrypted is not None:
            tag, uid, counter = decrypt_picc_data(self._keys.meta_read, encrypted[0])
            if tag & 0x0F != UID_LENGTH or tag & 0x30:
                # Garbage after decryption: a wrong key or altered data.
                raise SunError("bad_mac", "PICCData does not decrypt to a PICC data record")
            if tag & (TAG_UID_MIRRORED | TAG_COUNTER_MIRRORED) != TAG_UID_MIRRORED | TAG_COUNTER_MIRRORED:
                raise SunError("bad_format", "card does not mirror both UID and read counter")
        else:
            uid, _ = _hex_param(params, "uid", length=UID_LENGTH)
            counter_raw, _ = _hex_param(params, "ctr", length=3)
            counter = int.from_bytes(counter_raw, "big")  # the plain mirror shows it most significant first
        enc = _hex_param(params, "enc", block=16, required=False)
        file_key = self._keys.file_read_for(uid)
        if enc is None:
            mac_input = b""
        else:
            cmac_name = next(alias for alias in PARAM_NAMES["cmac"] if alias in params)
            mac_input = f"{enc[1]}&{cmac_name}=".encode("ascii")
        expected = sun_mac(session_mac_key(file_key, uid, counter), mac_input)
        if not hmac.compare_digest(expected, mac):
            raise SunError("bad_mac", "SUN MAC does not match")
        file_data = decrypt_file_data(file_key, uid, counter, enc[0]) if enc is not None else None
        return SunMessage(uid=uid, counter=counter, file_data=file_data)
