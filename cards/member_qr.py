"""Dynamic member QR codes (pure: no I/O, no clock reads; time is an argument).

The gateway verifies a code with public keys only, so nothing on the store
box can mint one:

1. HQ's issuer key (Ed25519) signs a **credential** when a member's app is
   enrolled: member_id, card_no, the app's own Ed25519 public key, and a
   validity period.
2. The app, offline, shows a code that changes every `step_s` seconds: the
   credential plus the app's signature over (credential, time step), made
   with the app's private key, which never leaves the phone.
3. The gateway checks the issuer's signature on the credential (keys from
   the rules' `member_qr.issuer_public_keys`, by key id), the credential's
   validity at `now`, the app's signature with the public key the
   credential names, and that the step is within +-window_steps of now's
   step. Replay (each (member, step) accepted once) is state, kept apart in
   gateway/store/qr_replay.py.

A stolen gateway, a copied rule set or a sniffed code gives nothing that can
make a code for another step: that needs the app's private key, and making
a credential for another app key needs HQ's issuer key.

Encoding (measured: 272 characters for a 12-digit card number, a 5-character
member id and the key id "hq-2026"; a version 11 QR code at error correction
level L, or 13 at M, in byte mode):

    "SGQ1." + base64url-without-padding(
        credential:
          u8   version (1)
          u8   len + key id         (ASCII, 1-32)
          u8   len + member_id      (UTF-8, 1-64)
          u8   len + card_no        (ASCII digits, 6-19)
          32   app public key       (Ed25519, raw)
          u32  valid_from, u32 valid_to   (epoch seconds, big-endian)
          64   issuer signature     over b"SGQR-cred-v1" + the bytes above
        u32  step                   (floor(time / step_s))
        64   app signature          over b"SGQR-step-v1" + credential + step
    )

base64url survives any scanner in keyboard mode (letters, digits, "-",
"_", "."), and the prefix keeps dynamic codes apart from static member codes
(plain card numbers printed as barcodes), which are digits only.
"""

from __future__ import annotations

import base64
import binascii
import functools
import struct
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from wire.ruleset import is_card_no

PREFIX = "SGQ1."
VERSION = 1
CRED_DOMAIN = b"SGQR-cred-v1"
STEP_DOMAIN = b"SGQR-step-v1"
MAX_CODE_CHARS = 600
REASONS = ("bad_format", "unknown_issuer", "bad_signature", "credential_expired", "step_out_of_window")


class QrError(ValueError):
    """A dynamic code that does not identify a member; `reason` is one of REASONS."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


@dataclass(frozen=True)
class Credential:
    key_id: str
    member_id: str
    card_no: str = field(repr=False)
    app_public_key: bytes = field(repr=False)
    valid_from: int
    valid_to: int
    signature: bytes = field(repr=False)

    def body(self) -> bytes:
        """The signed bytes (everything but the issuer signature)."""
        return (bytes([VERSION]) + _short(self.key_id.encode("ascii")) + _short(self.member_id.encode("utf-8"))
                + _short(self.card_no.encode("ascii")) + self.app_public_key
                + struct.pack(">II", self.valid_from, self.valid_to))

    def encode(self) -> bytes:
        return self.body() + self.signature


@dataclass(frozen=True)
class Identity:
    """Who a verified code identifies."""

    card_no: str = field(repr=False)   # becomes the card number for validate.validate
    member_id: str
    step: int
    key_id: str


def is_dynamic(payload: str) -> bool:
    return payload.startswith(PREFIX)


def current_step(now: float, step_s: int) -> int:
    return int(now // step_s)


# -- verifying (the gateway) -------------------------------------------------
def verify(payload: str, issuer_public_keys: dict[str, str], now: float, step_s: int = 30,
           window_steps: int = 1) -> Identity:
    """The identity a dynamic code proves at `now`, or QrError(reason).
    `issuer_public_keys`: key id -> base64 of the raw 32-byte Ed25519 key."""
    cred, step, app_sig, signed = decode(payload)
    key_b64 = issuer_public_keys.get(cred.key_id)
    if key_b64 is None:
        raise QrError("unknown_issuer", f"issuer key {cred.key_id!r} is not in the rules")
    try:
        _public_key(key_b64).verify(cred.signature, CRED_DOMAIN + cred.body())
        Ed25519PublicKey.from_public_bytes(cred.app_public_key).verify(app_sig, STEP_DOMAIN + signed)
    except InvalidSignature:
        raise QrError("bad_signature", "the code is not signed by HQ and the member's app") from None
    if not cred.valid_from <= now <= cred.valid_to:
        raise QrError("credential_expired", "the member app's credential is not valid now; "
                                            "the app must sign in again")
    drift = step - current_step(now, step_s)
    if abs(drift) > window_steps:
        raise QrError("step_out_of_window", f"the code is {abs(drift)} steps "
                                            f"{'old' if drift < 0 else 'ahead'}; allowed +-{window_steps}")
    return Identity(cred.card_no, cred.member_id, step, cred.key_id)


def decode(payload: str) -> tuple[Credential, int, bytes, bytes]:
    """(credential, step, app signature, the bytes the app signed) or QrError("bad_format")."""
    if not isinstance(payload, str) or not payload.startswith(PREFIX) or len(payload) > MAX_CODE_CHARS:
        raise QrError("bad_format", "not a member QR code")
    text = payload[len(PREFIX):]
    try:
        blob = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise QrError("bad_format", "the code is not base64url") from None
    try:
        pos = 0
        if blob[pos] != VERSION:
            raise QrError("bad_format", f"unknown code version {blob[pos]}")
        pos += 1
        key_id, pos = _read_short(blob, pos, 1, 32)
        member_id, pos = _read_short(blob, pos, 1, 64)
        card_no, pos = _read_short(blob, pos, 6, 19)
        app_key = blob[pos:pos + 32]
        valid_from, valid_to = struct.unpack_from(">II", blob, pos + 32)
        pos += 40
        cred_sig = blob[pos:pos + 64]
        pos += 64
        (step,) = struct.unpack_from(">I", blob, pos)
        signed = blob[:pos + 4]
        app_sig = blob[pos + 4:]
        if len(app_key) != 32 or len(cred_sig) != 64 or len(app_sig) != 64:
            raise QrError("bad_format", "the code is cut short or too long")
        cred = Credential(key_id.decode("ascii"), member_id.decode("utf-8"), card_no.decode("ascii"),
                          app_key, valid_from, valid_to, cred_sig)
    except (IndexError, struct.error, UnicodeDecodeError):
        raise QrError("bad_format", "the code is cut short or garbled") from None
    if not is_card_no(cred.card_no):
        raise QrError("bad_format", "the card number in the code is not digits")
    return cred, step, app_sig, signed


@functools.lru_cache(maxsize=64)
def _public_key(key_b64: str) -> Ed25519PublicKey:
    try:
        return Ed25519PublicKey.from_public_bytes(base64.b64decode(key_b64, validate=True))
    except (binascii.Error, ValueError):
        raise QrError("unknown_issuer", "the issuer key in the rules is not a base64 Ed25519 public key") from None


def _short(data: bytes) -> bytes:
    if not 0 < len(data) < 256:
        raise ValueError("field must be 1-255 bytes")
    return bytes([len(data)]) + data


def _read_short(blob: bytes, pos: int, low: int, high: int) -> tuple[bytes, int]:
    n = blob[pos]
    if not low <= n <= high or pos + 1 + n > len(blob):
        raise QrError("bad_format", "a field of the code has an impossible length")
    return blob[pos + 1:pos + 1 + n], pos + 1 + n


# -- minting (HQ and the member app; never on the gateway) --------------------
def public_key_b64(key: Ed25519PrivateKey | Ed25519PublicKey) -> str:
    """A public key as it goes into the rules' member_qr.issuer_public_keys."""
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return base64.b64encode(public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)).decode()


class Issuer:
    """HQ's side: signs member credentials with an issuer key."""

    def __init__(self, key_id: str, private_key: Ed25519PrivateKey | None = None) -> None:
        if not key_id.isascii() or not 1 <= len(key_id) <= 32:
            raise ValueError("key_id: 1-32 ASCII characters")
        self.key_id = key_id
        self.private_key = private_key or Ed25519PrivateKey.generate()

    @property
    def public_key_b64(self) -> str:
        return public_key_b64(self.private_key)

    def issue(self, member_id: str, card_no: str, app_public_key: Ed25519PublicKey, valid_from: int,
              valid_to: int) -> Credential:
        if not is_card_no(card_no):
            raise ValueError("card_no: 6-19 digits")
        if not 1 <= len(member_id.encode("utf-8")) <= 64:
            raise ValueError("member_id: 1-64 bytes of UTF-8")
        if not 0 <= valid_from <= valid_to < 2 ** 32:
            raise ValueError("valid_from <= valid_to, epoch seconds")
        raw_app = app_public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        unsigned = Credential(self.key_id, member_id, card_no, raw_app, valid_from, valid_to, b"")
        return Credential(self.key_id, member_id, card_no, raw_app, valid_from, valid_to,
                          self.private_key.sign(CRED_DOMAIN + unsigned.body()))


class MemberApp:
    """The member app's side (a reference for the app team, the demo and the tests)."""

    def __init__(self, credential: Credential, private_key: Ed25519PrivateKey) -> None:
        self.credential = credential
        self.private_key = private_key

    @classmethod
    def enrol(cls, issuer: Issuer, member_id: str, card_no: str, valid_from: int, valid_to: int) -> "MemberApp":
        key = Ed25519PrivateKey.generate()  # made on the phone; only its public half goes to HQ
        return cls(issuer.issue(member_id, card_no, key.public_key(), valid_from, valid_to), key)

    def code(self, now: float, step_s: int = 30, *, step: int | None = None) -> str:
        step = current_step(now, step_s) if step is None else step
        signed = self.credential.encode() + struct.pack(">I", step)
        signature = self.private_key.sign(STEP_DOMAIN + signed)
        return PREFIX + base64.urlsafe_b64encode(signed + signature).rstrip(b"=").decode("ascii")
