"""MQTT topic layout of the wire contract (see DESIGN.md, "Wire contract",
and README.md, "Wire contract", for the reasons behind each topic).

    {prefix}/stores/{store}/tx              gateway -> HQ   QoS 1             journal batches
    {prefix}/stores/{store}/ack             HQ -> gateway   QoS 1             committed seq ranges
    {prefix}/stores/{store}/status          gateway -> HQ   QoS 1, retained   status, last will "offline"
    {prefix}/stores/{store}/rules           HQ -> gateway   QoS 1, retained   signed rule-set manifest
    {prefix}/stores/{store}/parts/<sha256>  HQ -> gateway   QoS 1, retained   parts only this store reads
    {prefix}/stores/{store}/resync          gateway -> HQ   QoS 1             "republish my rule set"
    {prefix}/stores/{store}/account/query   gateway -> HQ   QoS 0             live account look-up (a tap)
    {prefix}/stores/{store}/account/reply   HQ -> gateway   QoS 0             HQ's live account, to the asker only
    {prefix}/rules/parts/<sha256>           HQ -> all       QoS 1, retained   chain-wide parts
    {prefix}/rules/deny                     HQ -> all       QoS 1, retained   the latest signed deny delta

Parts are content-addressed: the payload on a part topic never changes, so a
gateway that holds a part never fetches it again. The broker ACL
(deploy/mosquitto/acl) lets a store read only its own store topics and
``{prefix}/rules/#``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

DEFAULT_PREFIX = "sg/v1"
_STORE_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_SHA = re.compile(r"^[0-9a-f]{64}$")


def _check_sha(sha256: str) -> str:
    if not isinstance(sha256, str) or not _SHA.match(sha256):
        raise ValueError(f"{sha256!r} is not a lowercase hex sha256")
    return sha256


def check_store_id(store: str) -> str:
    """Store ids become topic levels: no '/', '+', '#' or spaces allowed."""
    if not isinstance(store, str) or not _STORE_ID.match(store):
        raise ValueError(
            f"store id {store!r} is invalid: use 1-64 letters, digits, '_' or '-'"
        )
    return store


def _shared(topic: str, share_group: str | None) -> str:
    return f"$share/{share_group}/{topic}" if share_group else topic


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

    def resync(self, store: str) -> str:
        """Gateway -> HQ: republish my rule set (a gap in deny deltas, a part
        that never came). Not retained."""
        return f"{self.prefix}/stores/{check_store_id(store)}/resync"

    def account_query(self, store: str) -> str:
        """Gateway -> HQ: the live account of a card (QoS 0: worth nothing after the tap's wait)."""
        return f"{self.prefix}/stores/{check_store_id(store)}/account/query"

    def account_reply(self, store: str) -> str:
        """HQ -> the asking gateway only (the ACL): the live account."""
        return f"{self.prefix}/stores/{check_store_id(store)}/account/reply"

    def store_part(self, store: str, sha256: str) -> str:
        """A part only this store may read (the ACL): its store layer, a store snapshot."""
        return f"{self.prefix}/stores/{check_store_id(store)}/parts/{_check_sha(sha256)}"

    def chain_part(self, sha256: str) -> str:
        """A part every store may read: chain and region layers, chain-wide tables."""
        return f"{self.prefix}/rules/parts/{_check_sha(sha256)}"

    def deny(self) -> str:
        """Signed deny-list deltas to every store (retained: the latest one)."""
        return f"{self.prefix}/rules/deny"

    def part_topic_ok(self, store: str, topic: str) -> bool:
        """Is ``topic`` a part topic this store may be told to fetch?"""
        for head in (f"{self.prefix}/rules/parts/", f"{self.prefix}/stores/{store}/parts/"):
            if topic.startswith(head) and _SHA.match(topic[len(head):]):
                return True
        return False

    # HQ side subscriptions over all stores. With a share group, an MQTT shared
    # subscription ($share/<group>/...): each message goes to one of the HQ
    # workers subscribed in the group.
    def all_tx(self, share_group: str | None = None) -> str:
        return _shared(f"{self.prefix}/stores/+/tx", share_group)

    def all_status(self, share_group: str | None = None) -> str:
        return _shared(f"{self.prefix}/stores/+/status", share_group)

    def all_resync(self, share_group: str | None = None) -> str:
        return _shared(f"{self.prefix}/stores/+/resync", share_group)

    def all_account_queries(self, share_group: str | None = "hq") -> str:
        """Every store's look-ups (by default shared among the HQ workers)."""
        return _shared(f"{self.prefix}/stores/+/account/query", share_group)

    def store_of_account_query(self, topic: str) -> str:
        """The asking store of an account query topic; ValueError for anything else."""
        head, tail = f"{self.prefix}/stores/", "/account/query"
        if not (topic.startswith(head) and topic.endswith(tail)):
            raise ValueError(f"topic {topic!r} is not an account query topic")
        return check_store_id(topic[len(head):-len(tail)])

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
