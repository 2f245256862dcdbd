"""The MQTT connection settings both services use, and reconnect backoff."""

from __future__ import annotations

import random
import ssl
from dataclasses import dataclass

import aiomqtt

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


def client(settings: dict, *, identifier: str, will: aiomqtt.Will | None = None,
           clean_session: bool = True) -> aiomqtt.Client:
    tls_context = None
    tls = settings.get("tls")
    if tls:
        tls_context = ssl.create_default_context(cafile=tls["ca_file"])
        if tls.get("cert_file"):
            tls_context.load_cert_chain(tls["cert_file"], tls.get("key_file"))
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
