"""Ed25519 signatures over a canonical encoding, used by both sides.

The canonical encoding of a signed document is its JSON with keys sorted and
no whitespace (orjson, OPT_SORT_KEYS), without the ``sig`` field, in UTF-8.
Signed documents hold only strings, integers, booleans, null, lists and
objects (no floats), so every implementation encodes them the same way.

Public keys travel as base64 of the raw 32 bytes; a key's id is the first 16
hex digits of the SHA-256 of those bytes, so a verifier can tell which key a
signature claims without trusting anything else in the message.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from typing import Mapping

import orjson
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey


class SignatureError(ValueError):
    """A signature that does not verify, or names a key we do not trust."""


def canonical(doc: Mapping) -> bytes:
    """The bytes that are signed: the document without ``sig``."""
    return orjson.dumps({k: v for k, v in doc.items() if k != "sig"}, option=orjson.OPT_SORT_KEYS)


def public_key_b64(key: Ed25519PublicKey | Ed25519PrivateKey) -> str:
    if isinstance(key, Ed25519PrivateKey):
        key = key.public_key()
    return base64.b64encode(key.public_bytes_raw()).decode()


def load_public_key(b64: str) -> Ed25519PublicKey:
    try:
        raw = base64.b64decode(b64, validate=True)
        return Ed25519PublicKey.from_public_bytes(raw)
    except (binascii.Error, ValueError) as exc:
        raise SignatureError(f"not an Ed25519 public key (base64 of 32 bytes): {exc}") from None


def key_id(b64_public: str) -> str:
    return hashlib.sha256(base64.b64decode(b64_public)).hexdigest()[:16]


def sign(doc: dict, private: Ed25519PrivateKey) -> dict:
    """A copy of ``doc`` with ``key_id`` and ``sig`` (base64) set."""
    out = {k: v for k, v in doc.items() if k != "sig"}
    out["key_id"] = key_id(public_key_b64(private))
    out["sig"] = base64.b64encode(private.sign(canonical(out))).decode()
    return out


class Keyring:
    """The public keys a verifier trusts, by key id."""

    def __init__(self, keys: list[str] | None = None) -> None:
        self._keys: dict[str, Ed25519PublicKey] = {}
        self._b64: dict[str, str] = {}
        for k in keys or []:
            self.add(k)

    def add(self, b64_public: str) -> str:
        kid = key_id(b64_public)
        self._keys[kid] = load_public_key(b64_public)
        self._b64[kid] = b64_public
        return kid

    def __contains__(self, kid: str) -> bool:
        return kid in self._keys

    def ids(self) -> list[str]:
        return sorted(self._keys)

    def public_keys(self) -> list[str]:
        return [self._b64[k] for k in sorted(self._b64)]

    def verify(self, doc: Mapping, what: str) -> None:
        """Raise SignatureError unless ``doc`` carries a valid signature by a trusted key."""
        kid, sig = doc.get("key_id"), doc.get("sig")
        if not isinstance(kid, str) or not isinstance(sig, str) or not sig:
            raise SignatureError(f"{what} is not signed")
        key = self._keys.get(kid)
        if key is None:
            raise SignatureError(f"{what} is signed by key {kid}, which this gateway does not trust "
                                 f"(trusted: {', '.join(self.ids()) or 'none'})")
        try:
            key.verify(base64.b64decode(sig, validate=True), canonical(doc))
        except (InvalidSignature, binascii.Error, ValueError):
            raise SignatureError(f"{what}: bad signature (key {kid})") from None
