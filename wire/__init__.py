"""The wire contract between store gateways and HQ: topics and messages.

One definition of every message, used by both sides (gateway/ and hq_bridge/).
JSON Schemas for other consumers are generated from here by
``python -m wire.schema`` into wire/schemas/.
"""

from wire.messages import (  # noqa: F401
    Ack,
    DenyDelta,
    Manifest,
    ResyncRequest,
    Status,
    TxBatch,
    TxRecord,
    WireError,
)
from wire.topics import Topics  # noqa: F401

__all__ = ["Ack", "DenyDelta", "Manifest", "ResyncRequest", "Status", "TxBatch", "TxRecord", "WireError", "Topics"]
