"""Publishing rule sets to stores (unsigned in this version; signing comes
with the rules-distribution work)."""

from __future__ import annotations

import json
import time
import tomllib
from pathlib import Path

from common import mqtt
from hq_bridge.ledger import Ledger
from wire.messages import RulesMessage
from wire.ruleset import RulesetError, validate_ruleset
from wire.topics import Topics, check_store_id


def load_rules_file(path: str | Path) -> dict:
    """An authored rule set from TOML or JSON; RulesetError names what is wrong."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise RulesetError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        rules = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as exc:
        raise RulesetError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'TOML'}: {exc}") from None
    try:
        validate_ruleset(rules)
    except RulesetError as exc:
        raise RulesetError(f"{path}: {exc}") from None
    return rules


def build_message(rules: dict, store: str, version: int, now: float | None = None) -> RulesMessage:
    validate_ruleset(rules)
    return RulesMessage(version, int(now if now is not None else time.time()), {"store": check_store_id(store)}, rules)


async def publish_to_store(mqtt_settings: dict, ledger: Ledger, store: str, rules: dict) -> RulesMessage:
    """Validate, take the next version for the store, publish retained."""
    validate_ruleset(rules)
    version = ledger.next_rules_version(f"store:{store}")
    msg = build_message(rules, store, version)
    topics = Topics(mqtt_settings.get("prefix", "sg/v1"))
    async with mqtt.client(mqtt_settings, identifier=f"storegate-hq-publish-{store}-{version}") as client:
        await client.publish(topics.rules(store), msg.encode(), qos=1, retain=True)
    return msg
