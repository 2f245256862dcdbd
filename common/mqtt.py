"""The MQTT connection settings both services use, and reconnect backoff."""

from __future__ import annotations

import random
import ssl
from dataclasses import dataclass

import aiomqtt

from common.configfile import ConfigError

MQTT_CONFIG_SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "required": ["host"],
    "properties": {
        "host": {"type": "string", "minLength": 1},
        "port": {"type": "integer", "minimum": 1, "maximum": 65535, "default": 1883},
        "prefix": {"type": "string", "pattern": "^[A-Za-z0-9_/-]+$", "default": "sg/v1"},
        "client_id": {"type": "string"},
        "username": {"type": "string"},
        "password": {"type": "string"},
        "keepalive": {"type": "integer", "minimum": 5, "maximum": 3600, "default": 30},
        "tls": {
            "type": "object",
            "additionalProperties": False,
            "required": ["ca_file"],
            "properties": {
                "ca_file": {"type": "string"},
                "cert_file": {"type": "string"},
                "key_file": {"type": "string"},
            },
        },
    },
}


@dataclass
class Backoff:
    """Exponential backoff with full jitter (AWS architecture blog style)."""

    base: float = 0.5
    cap: float = 30.0
    attempt: int = 0

    def next_delay(self) -> float:
        delay = random.uniform(0, min(self.cap, self.base * 2 ** self.attempt))
        self.attempt += 1
        return delay

    def reset(self) -> None:
        self.attempt = 0


def make_tls_context(settings: dict, section: str = "mqtt") -> ssl.SSLContext | None:
    """The client's TLS context from ``[mqtt.tls]``, or None without TLS. A file
    that cannot be used raises ConfigError naming its key (``mqtt.tls.cert_file:
    cannot read /etc/...: No such file or directory``): the services check this
    once at start-up and exit with the config-error code instead of failing on
    every reconnect."""
    tls = settings.get("tls")
    if not tls:
        return None
    for name in ("ca_file", "cert_file", "key_file"):
        if tls.get(name):
            try:
                open(tls[name], "rb").close()
            except OSError as exc:
                raise ConfigError(f"{section}.tls.{name}: cannot read {tls[name]}: {exc.strerror or exc}") from None
    try:
        context = ssl.create_default_context(cafile=tls["ca_file"])
    except ssl.SSLError as exc:
        raise ConfigError(f"{section}.tls.ca_file: {tls['ca_file']} holds no usable CA certificate ({exc})") from None
    if tls.get("cert_file"):
        try:
            context.load_cert_chain(tls["cert_file"], tls.get("key_file"))
        except ssl.SSLError as exc:
            raise ConfigError(f"{section}.tls.cert_file/key_file: {tls['cert_file']} and "
                              f"{tls.get('key_file') or '(key in the same file)'} are not a certificate and "
                              f"its private key ({exc})") from None
    return context


def client(settings: dict, *, identifier: str, will: aiomqtt.Will | None = None,
           clean_session: bool = True) -> aiomqtt.Client:
    tls_context = make_tls_context(settings)
    return aiomqtt.Client(
        settings["host"],
        settings.get("port", 1883),
        identifier=settings.get("client_id") or identifier,
        username=settings.get("username"),
        password=settings.get("password"),
        keepalive=settings.get("keepalive", 30),
        will=will,
        clean_session=clean_session,
        tls_context=tls_context,
        protocol=aiomqtt.ProtocolVersion.V311,
        max_queued_outgoing_messages=None,
    )
