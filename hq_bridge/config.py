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
            },
        },
        "mqtt": MQTT_CONFIG_SCHEMA,
        "logging": configfile.LOGGING_SCHEMA,
    },
}


def check(config: dict, source: str = "config") -> dict:
    return configfile.validate(config, HQ_CONFIG_SCHEMA, source)


def load(path: str | Path) -> dict:
    return configfile.load(path, HQ_CONFIG_SCHEMA)
