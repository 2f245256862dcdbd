"""The HQ bridge's config file (TOML). Documented example: deploy/hq.example.toml."""

from __future__ import annotations

from pathlib import Path

from common import configfile
from common.configfile import ConfigError
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
                "database": {"type": "string", "minLength": 1,
                             "description": "HQ's database: a path (SQLite, the embedded default) or a URL, "
                                            "sqlite:///PATH or postgresql+psycopg://USER@HOST/DB"},
                "parts_dir": {"type": "string",
                              "description": "rule-set part payloads by sha256 (default: parts/ next to the database)"},
                "signing_key": {"type": "string",
                                "description": "HQ's Ed25519 private key (PEM, mode 0600); its .pub goes to gateways"},
                "resync_min_interval_s": {"type": "number", "minimum": 0, "default": 5,
                                          "description": "answer a store's resync requests at most this often"},
                "client_id": {"type": "string", "pattern": "^[A-Za-z0-9_.-]{1,64}$", "default": "storegate-hq",
                              "description": "this bridge's MQTT client id (its persistent session); "
                                             "unique per bridge process"},
                "share_group": {"type": "string", "pattern": "^[A-Za-z0-9_-]{0,64}$", "default": "",
                                "description": "run several bridges on one database: the same share group "
                                               "(MQTT shared subscriptions) and each its own client_id; "
                                               "empty: this bridge takes every store's messages"},
                "timezone": {"type": "string", "default": "Asia/Shanghai",
                             "description": "the chain's business day: `nightly` runs tiers and points expiry "
                                            "for the day in this zone"},
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
    config = configfile.validate(config, HQ_CONFIG_SCHEMA, source)
    _check_hq(config["hq"], source)
    return config


def load(path: str | Path) -> dict:
    config = configfile.load(path, HQ_CONFIG_SCHEMA)
    _check_hq(config["hq"], str(path))
    return config


def database_url(config: dict) -> str:
    """hq.database as an SQLAlchemy URL (a path is an SQLite file)."""
    from hq_bridge.db import database_url as url
    return url(config["hq"]["database"])


def _check_hq(hq: dict, source: str) -> None:
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError
    try:
        ZoneInfo(hq["timezone"])
    except (ZoneInfoNotFoundError, ValueError):
        raise ConfigError(f"{source}: hq.timezone: unknown time zone {hq['timezone']!r}") from None
    text = hq["database"]
    if "://" not in text:
        return
    scheme = text.split("://", 1)[0]
    if scheme not in ("sqlite", "postgresql", "postgresql+psycopg"):
        raise ConfigError(f"{source}: hq.database: {scheme}:// is not supported "
                          "(a path, sqlite:///PATH or postgresql+psycopg://USER@HOST/DB)")
    if scheme.startswith("postgresql") and not hq.get("parts_dir"):
        raise ConfigError(f"{source}: hq.parts_dir: required with a PostgreSQL hq.database "
                          "(where rule-set part payloads are kept)")
