"""The gateway's config file (TOML). Documented example: deploy/gateway.example.toml."""

from __future__ import annotations

from pathlib import Path

from common import configfile
from common.mqtt import MQTT_CONFIG_SCHEMA

_PIN = {"type": ["integer", "string"]}

GATEWAY_CONFIG_SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "required": ["store", "mqtt", "lanes"],
    "properties": {
        "store": {
            "type": "object",
            "additionalProperties": False,
            "required": ["id"],
            "properties": {
                "id": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}$"},
                "region": {"type": "string"},
                "timezone": {"type": "string", "default": "Asia/Shanghai"},
                "data_dir": {"type": "string", "default": "/var/lib/storegate"},
            },
        },
        "mqtt": MQTT_CONFIG_SCHEMA,
        "api": {
            "type": "object",
            "additionalProperties": False,
            "default": {},
            "properties": {
                "host": {"type": "string", "default": "0.0.0.0"},
                "port": {"type": "integer", "minimum": 0, "maximum": 65535, "default": 8080},
                "terminals_file": {"type": "string", "minLength": 1,
                                   "description": "the POS terminals' credentials (hashed), managed with "
                                                  "`storegate terminals add|list|revoke`; default "
                                                  "<data_dir>/terminals.json"},
                "member_hold_s": {"type": "integer", "minimum": 10, "default": 300},
                "max_connections": {"type": "integer", "minimum": 4, "maximum": 10000, "default": 256,
                                    "description": "open connections at once; more are answered 503 and closed"},
                "max_connections_per_host": {"type": "integer", "minimum": 1, "maximum": 10000, "default": 32},
                "header_timeout_s": {"type": "number", "minimum": 0.1, "maximum": 120, "default": 5,
                                     "description": "time a client has to send its request line and headers"},
                "body_timeout_s": {"type": "number", "minimum": 0.1, "maximum": 120, "default": 10,
                                   "description": "time a client has to send its request body"},
                "max_header_bytes": {"type": "integer", "minimum": 1024, "maximum": 65536, "default": 16384},
                "max_body_bytes": {"type": "integer", "minimum": 1024, "maximum": 4194304, "default": 262144,
                                   "description": "a 500-line basket is about 70 KB"},
                "max_event_streams": {"type": "integer", "minimum": 1, "maximum": 1000, "default": 64,
                                      "description": "server-sent event streams open at once"},
                "allowed_hosts": {"type": "array", "items": {"type": "string", "minLength": 1}, "default": [],
                                  "description": "Host header values accepted besides the API's own address, "
                                                 "localhost and this box's host name (e.g. a DNS name for the box)"},
                "cors_origins": {"type": "array", "items": {"type": "string", "pattern": "^https?://[^/]+$"},
                                 "default": [],
                                 "description": "origins of browser-based POS allowed to call the API; "
                                                "empty: no cross-origin calls (CORS off)"},
                "tls": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["cert_file", "key_file"],
                    "properties": {
                        "cert_file": {"type": "string", "minLength": 1},
                        "key_file": {"type": "string", "minLength": 1},
                    },
                    "description": "serve the POS API over HTTPS with this certificate",
                },
                "pos_return_max_fen": {"type": "integer", "minimum": 0, "default": 20000,
                                       "description": "a POS may refund up to this much (fen) per return of a "
                                                      "sale made on its lanes; larger returns need the service desk"},
                "auth_failures_per_minute": {"type": "integer", "minimum": 1, "maximum": 10000, "default": 10,
                                             "description": "failed log-ins from one address before it is "
                                                            "refused (429) for a minute"},
            },
        },
        "uplink": {
            "type": "object",
            "additionalProperties": False,
            "default": {},
            "properties": {
                "batch_max": {"type": "integer", "minimum": 1, "maximum": 5000, "default": 1000},
                "window": {"type": "integer", "minimum": 1, "maximum": 64, "default": 8},
                "resend_after_s": {"type": "number", "minimum": 1, "default": 10},
                "status_interval_s": {"type": "number", "minimum": 1, "default": 10},
                "live_lookup_ms": {"type": "integer", "minimum": 0, "maximum": 2000, "default": 300,
                                   "description": "while online, a tap waits at most this long for HQ's live "
                                                  "account; past it (or 0: never ask) the store decides from "
                                                  "its snapshot"},
                "part_timeout_s": {"type": "number", "minimum": 1, "default": 60,
                                   "description": "a rule set whose parts do not all arrive in this time is rejected"},
            },
        },
        "rules": {
            "type": "object",
            "additionalProperties": False,
            "default": {},
            "properties": {
                "hq_public_keys": {
                    "type": "array", "default": [],
                    "items": {"type": "string", "pattern": "^[A-Za-z0-9+/]{43}=$"},
                    "description": "HQ's Ed25519 public key(s), base64 (storegate-hq keys generate prints it); "
                                   "rule sets not signed by one of them (or by a key they announced) are refused",
                },
            },
        },
        "journal": {
            "type": "object",
            "additionalProperties": False,
            "default": {},
            "properties": {
                "max_mb": {"type": "integer", "minimum": 1, "default": 1024,
                           "description": "cap on the journal's disk use; past it, sales are refused (507)"},
                "segment_mb": {"type": "integer", "minimum": 1, "maximum": 256, "default": 16,
                               "description": "size of a journal segment file, allocated up front"},
                "writer": {"enum": ["inline", "thread"], "default": "inline",
                           "description": "'thread' keeps the event loop free during fdatasync (slow SD cards)"},
            },
        },
        "lanes": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["id", "reader"],
                "properties": {
                    "id": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,16}$"},
                    "reader": {"enum": ["simulated", "terminal", "pcsc"]},
                    "pcsc_reader": {"type": "string", "minLength": 1,
                                    "description": "regular expression matched against PC/SC reader names"},
                    "indicator": {"enum": ["simulated", "gpio"], "default": "simulated"},
                    "hid": {  # keyboard-wedge inputs (hardware/hid.py), in addition to the lane's reader
                        "type": "array",
                        "default": [],
                        "items": {
                            "type": "object",
                            "additionalProperties": False,
                            "required": ["kind"],
                            "properties": {
                                "kind": {"enum": ["magstripe", "scanner"]},
                                "device": {"type": "string", "pattern": "^/", "description": "/dev/input/by-id/... path"},
                                "name": {"type": "string", "minLength": 1, "description": "input device name"},
                                "usb": {"type": "string", "pattern": "^[0-9A-Fa-f]{4}:[0-9A-Fa-f]{4}$",
                                        "description": "USB vendor:product in hex"},
                                "gap_ms": {"type": "integer", "minimum": 5, "maximum": 2000, "default": 100,
                                           "description": "inter-key timeout that ends a frame without Enter"},
                            },
                        },
                    },
                    "gpio": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["green", "red"],
                        "properties": {
                            "green": _PIN, "red": _PIN, "buzzer": _PIN, "status": _PIN,
                            "mock": {"type": "boolean", "default": False,
                                     "description": "drive gpiozero's MockFactory instead of real pins"},
                        },
                    },
                },
            },
        },
        "logging": configfile.LOGGING_SCHEMA,
    },
}


def check(config: dict, source: str = "config") -> dict:
    config = configfile.validate(config, GATEWAY_CONFIG_SCHEMA, source)
    problems = []
    seen = set()
    for i, lane in enumerate(config["lanes"]):
        if lane["id"] in seen:
            problems.append(f"lanes[{i}].id: duplicate lane id {lane['id']!r}")
        seen.add(lane["id"])
        if lane["indicator"] == "gpio" and "gpio" not in lane:
            problems.append(f"lanes[{i}].gpio: required when indicator = \"gpio\"")
        if lane["reader"] == "pcsc" and "pcsc_reader" not in lane:
            problems.append(f"lanes[{i}].pcsc_reader: required when reader = \"pcsc\" (e.g. \"ACR122U\")")
        for j, hid in enumerate(lane["hid"]):
            chosen = [k for k in ("device", "name", "usb") if k in hid]
            if len(chosen) != 1:
                problems.append(f"lanes[{i}].hid[{j}]: select the input device with exactly one of device, "
                                f"name or usb (got {', '.join(chosen) or 'none'})")
    try:
        from zoneinfo import ZoneInfo
        ZoneInfo(config["store"]["timezone"])
    except Exception:
        problems.append(f"store.timezone: unknown time zone {config['store']['timezone']!r}")
    if problems:
        raise configfile.ConfigError(f"config error in {source}:\n  " + "\n  ".join(problems))
    return config


def load(path: str | Path) -> dict:
    raw = configfile.load(path, {"type": "object"})  # TOML syntax errors first
    return check(raw, str(path))
