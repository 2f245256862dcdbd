"""The HQ bridge's config file (TOML). Documented example: deploy/hq.example.toml."""

from __future__ import annotations

from pathlib import Path

from common import configfile
from common.mqtt import MQTT_CONFIG_SCHEMA

HQ_CONFIG_SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "required": ["hq", "mqtt"],
    "properties": {
        "hq": {
            "type": "object",
            "additionalProperties": False,
            "required": ["database"],
            "properties": {
                "database": {"type": "string", "description": "path of the SQLite ledger"},
                "parts_dir": {"type": "string",
                              "description": "rule-set part payloads by sha256 (default: parts/ next to the database)"},
                "signing_key": {"type": "string",
                                "description": "HQ's Ed25519 private key (PEM, mode 0600); its .pub goes to gateways"},
                "resync_min_interval_s": {"type": "number", "minimum": 0, "default": 5,
                                          "description": "answer a store's resync requests at most this often"},
            },
        },
        "mqtt": MQTT_CONFIG_SCHEMA,
        "stores": {
            "type": "object",
            "default": {},
            "description": "every store HQ publishes rules to, with its region: [stores.S001] region = \"east\"",
            "propertyNames": {"pattern": "^[A-Za-z0-9_-]{1,64}$"},
            "additionalProperties": {
                "type": "object",
                "additionalProperties": False,
                "properties": {"region": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}$"}},
            },
        },
        "logging": configfile.LOGGING_SCHEMA,
    },
}


def check(config: dict, source: str = "config") -> dict:
    return configfile.validate(config, HQ_CONFIG_SCHEMA, source)


def load(path: str | Path) -> dict:
    return configfile.load(path, HQ_CONFIG_SCHEMA)
