"""The lanes of a store: the member held on each, and the events a POS
watches (taps and sales), kept so a POS that reconnects misses none."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from gateway.core import validate
from hardware.indicators import Indicator
from hardware.readers import CardReader

EVENT_BACKLOG = 256  # events per lane kept for reconnecting POS terminals


class LaneEvent(dict):
    """An event on a lane (a dict, as the POS receives it) and its id."""

    def __init__(self, event: dict, event_id: str) -> None:
        super().__init__(event)
        self.id = event_id


@dataclass
class Lane:
    id: str
    reader: CardReader | None  # None: a lane terminal that posts its reads
    indicator: Indicator
    member: validate.Verdict | None = None
    member_at: float = 0.0
    member_read: tuple[str, str] | None = field(default=None, repr=False)  # (source, identified raw): re-validated per quote
    taps: int = 0
    listeners: set = field(default_factory=set)  # asyncio.Queue per SSE client
    inputs: list = field(default_factory=list)  # keyboard-wedge readers ([[lanes.hid]], hardware/hid.py)
    # The lane's recent events with their ids "<boot>-<n>", so a POS that
    # reconnects with Last-Event-ID gets what it missed, once.
    recent: deque = field(default_factory=lambda: deque(maxlen=EVENT_BACKLOG))
    boot: str = field(default_factory=lambda: f"{time.time_ns() // 1_000_000:x}")
    _event_n: int = 0

    def publish(self, event: dict) -> None:
        self._event_n += 1
        item = LaneEvent(event, f"{self.boot}-{self._event_n}")
        self.recent.append(item)
        for q in list(self.listeners):
            if q.full():
                q.get_nowait()  # a slow listener loses the oldest event, not the newest
            q.put_nowait(item)

    @property
    def last_event_id(self) -> str:
        return f"{self.boot}-{self._event_n}"

    def event_seq(self, event_id: str | None) -> int:
        """The number of one of this boot's event ids; 0 for none or another boot's."""
        boot, _, n = (event_id or "").partition("-")
        return int(n) if boot == self.boot and n.isdigit() and len(n) < 19 else 0

    def events_after(self, last_event_id: str | None) -> list["LaneEvent"]:
        """What a POS that saw ``last_event_id`` has not: nothing for a new
        stream; everything kept for an id of an earlier boot."""
        if not last_event_id:
            return []
        after = self.event_seq(last_event_id)
        return [e for e in self.recent if self.event_seq(e.id) > after]
