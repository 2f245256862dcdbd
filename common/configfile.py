"""One TOML config file per service, checked against a JSON Schema.

A wrong or missing key stops start-up with a message that names the key,
Home Assistant style: ``config error in gateway.toml: mqtt.port: 'x' is not
of type 'integer'``.
"""

from __future__ import annotations

import copy
import tomllib
from pathlib import Path
from typing import Any

import jsonschema


LOGGING_SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "default": {},
    "properties": {"level": {"enum": ["DEBUG", "INFO", "WARNING", "ERROR"], "default": "INFO"}},
}


class ConfigError(ValueError):
    """The config file is missing, unreadable or has a wrong/missing key."""


def _key_path(error: jsonschema.ValidationError) -> str:
    path = ".".join(str(p) for p in error.absolute_path)
    return path or "(top level)"


def describe(error: jsonschema.ValidationError) -> str:
    if error.validator == "required":
        missing = error.message.split("'")[1] if "'" in error.message else error.message
        where = _key_path(error)
        key = missing if where == "(top level)" else f"{where}.{missing}"
        return f"{key}: required key is missing"
    if error.validator == "additionalProperties":
        where = _key_path(error)
        extra = sorted(set(error.instance) - set(error.schema.get("properties", {})))
        keys = ", ".join(extra if where == "(top level)" else (f"{where}.{k}" for k in extra))
        return f"{keys}: unknown key (check the spelling against the example config)"
    return f"{_key_path(error)}: {error.message}"


def apply_defaults(schema: dict, data: Any) -> Any:
    """A copy of data with the defaults the schema declares filled in,
    through nested objects, maps of objects and lists of objects."""
    if isinstance(data, list) and isinstance(schema.get("items"), dict):
        return [apply_defaults(schema["items"], item) for item in data]
    if not isinstance(data, dict):
        return copy.deepcopy(data)
    props = schema.get("properties", {})
    extra = schema.get("additionalProperties")
    out = {}
    for key, value in data.items():
        sub = props.get(key, extra if isinstance(extra, dict) else None)
        out[key] = apply_defaults(sub, value) if sub else copy.deepcopy(value)
    for key, sub in props.items():
        if key not in out and "default" in sub:
            out[key] = apply_defaults(sub, copy.deepcopy(sub["default"]))
    return out


def validate(data: Any, schema: dict, source: str) -> dict:
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(data), key=lambda e: list(map(str, e.absolute_path)))
    if errors:
        lines = "\n  ".join(describe(e) for e in errors)
        raise ConfigError(f"config error in {source}:\n  {lines}")
    return apply_defaults(schema, data)


def load(path: str | Path, schema: dict) -> dict:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc.strerror}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config error in {path}: not valid TOML: {exc}") from None
    return validate(data, schema, str(path))
