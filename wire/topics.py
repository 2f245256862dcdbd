"""MQTT topic layout of the wire contract (see DESIGN.md, "Wire contract")."""

from __future__ import annotations

import re
from dataclasses import dataclass

DEFAULT_PREFIX = "sg/v1"
_STORE_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def check_store_id(store: str) -> str:
    """Store ids become topic levels: no '/', '+', '#' or spaces allowed."""
    if not isinstance(store, str) or not _STORE_ID.match(store):
        raise ValueError(
            f"store id {store!r} is invalid: use 1-64 letters, digits, '_' or '-'"
        )
    return store


@dataclass(frozen=True)
class Topics:
    prefix: str = DEFAULT_PREFIX

    def tx(self, store: str) -> str:
        return f"{self.prefix}/stores/{check_store_id(store)}/tx"

    def ack(self, store: str) -> str:
        return f"{self.prefix}/stores/{check_store_id(store)}/ack"

    def rules(self, store: str) -> str:
        return f"{self.prefix}/stores/{check_store_id(store)}/rules"

    def status(self, store: str) -> str:
        return f"{self.prefix}/stores/{check_store_id(store)}/status"

    # HQ side subscriptions over all stores
    def all_tx(self) -> str:
        return f"{self.prefix}/stores/+/tx"

    def all_status(self) -> str:
        return f"{self.prefix}/stores/+/status"

    def chain_rules(self) -> str:
        return f"{self.prefix}/rules/#"

    def store_of(self, topic: str) -> str:
        """The store id in a per-store topic; ValueError for anything else."""
        head = f"{self.prefix}/stores/"
        if not topic.startswith(head):
            raise ValueError(f"topic {topic!r} is not under {head}")
        parts = topic[len(head):].split("/")
        if len(parts) != 2:
            raise ValueError(f"topic {topic!r} is not a per-store topic")
        return check_store_id(parts[0])
