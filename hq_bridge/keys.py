"""HQ's Ed25519 rule-signing keys, in files only their owner can read.

- ``<path>``        the current private key (PKCS#8 PEM, mode 0600)
- ``<path>.pub``    its public key, base64 of the raw 32 bytes: what goes into
                    every gateway's config (``rules.hq_public_keys``)
- ``<path>.next``   the next private key during a rotation; manifests signed
                    with the current key announce its public key as
                    ``next_key``, so gateways trust it before it signs anything

Rotation: ``keys rotate`` creates ``.next`` (manifests announce it from the
next publish on; the command republishes every store); once the fleet shows
every store on a manifest that announced it, ``keys rotate --promote`` makes
it the current key (the old one is kept as ``<path>.retired-<time>``), and
gateways that apply a manifest signed by the new key stop trusting the old.

A key file readable or writable by group or others is refused, never used.
Keys are never logged.
"""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from wire.signing import key_id, public_key_b64


class KeyFileError(ValueError):
    """A key file that is missing, unsafe or not an Ed25519 key."""


def _write_private(path: Path, key: Ed25519PrivateKey) -> None:
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.fchmod(fd, 0o600)  # whatever the umask
        os.write(fd, pem)
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_public(path: Path, key: Ed25519PrivateKey) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(public_key_b64(key) + "\n")
    os.replace(tmp, path)


def generate(path: str | Path) -> str:
    """Create a new key pair at ``path``; refuses to overwrite. Returns the public key (base64)."""
    path = Path(path)
    if path.exists():
        raise KeyFileError(f"{path} exists: refusing to overwrite a signing key")
    key = Ed25519PrivateKey.generate()
    _write_private(path, key)
    _write_public(path.with_name(path.name + ".pub"), key)
    return public_key_b64(key)


def load_private(path: str | Path) -> Ed25519PrivateKey:
    path = Path(path)
    try:
        st = path.stat()
    except FileNotFoundError:
        raise KeyFileError(f"{path}: no such key file (create one with `storegate-hq keys generate`)") from None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeyFileError(f"{path}: mode {stat.S_IMODE(st.st_mode):04o} lets others read it; "
                           f"refusing to use it (chmod 600 {path}, and consider the key compromised)")
    if st.st_uid != os.geteuid():
        raise KeyFileError(f"{path}: owned by uid {st.st_uid}, not by this user; refusing to use it")
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError) as exc:
        raise KeyFileError(f"{path}: not a PEM private key ({type(exc).__name__})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{path}: not an Ed25519 key")
    return key


def next_path(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(path.name + ".next")


def load_next(path: str | Path) -> Ed25519PrivateKey | None:
    p = next_path(path)
    return load_private(p) if p.exists() else None


def rotate(path: str | Path) -> str:
    """Start a rotation: create the next key. Returns its public key."""
    p = next_path(path)
    if p.exists():
        raise KeyFileError(f"{p} exists: a rotation is under way; promote it with `keys rotate --promote`")
    return generate(p)


def promote(path: str | Path) -> str:
    """Finish a rotation: the next key becomes the current one. Returns its public key."""
    path = Path(path)
    nxt = next_path(path)
    key = load_private(nxt)  # checks its mode too
    load_private(path)
    retired = path.with_name(f"{path.name}.retired-{time.strftime('%Y%m%dT%H%M%S')}")
    os.replace(path, retired)
    os.replace(nxt, path)
    nxt_pub = nxt.with_name(nxt.name + ".pub")
    if nxt_pub.exists():
        nxt_pub.unlink()
    _write_public(path.with_name(path.name + ".pub"), key)
    return public_key_b64(key)


def describe(path: str | Path) -> str:
    """Key ids only (never key material)."""
    cur = load_private(path)
    out = f"current key {key_id(public_key_b64(cur))} ({path})"
    nxt = load_next(path)
    if nxt is not None:
        out += f"; next key {key_id(public_key_b64(nxt))} announced"
    return out
