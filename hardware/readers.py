"""Card readers: one lane per reader, each yields CardRead events.

A reader is used like an aiomqtt client::

    async with SimulatedReader("1") as reader:
        async for read in reader.reads():
            ...

A read that failed (the card left the field, a bad swipe, an unreadable
code) is a ``ReadAgain`` from every reader: the gateway shows the "tap again"
pattern and the member presents the card again.

The raw identifier (NFC UID, track data, QR payload) is personal data: it is
kept out of repr() and must never be logged.
"""

from __future__ import annotations

import abc
import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, ClassVar

from hardware.indicators import Pattern

log = logging.getLogger("storegate.readers")

SOURCES = ("nfc", "magstripe", "qr")
# The verdict reason of a failed read, by source (texts in gateway/core/reasons.py).
AGAIN_REASONS = {"nfc": "tap_again", "magstripe": "swipe_again", "qr": "scan_again"}


@dataclass(frozen=True)
class CardRead:
    """One card presented at one lane."""

    lane: str
    source: str  # one of SOURCES
    raw: str = field(repr=False)  # never logged
    at: float = 0.0  # wall-clock seconds (time.time()) when read

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"unknown card source {self.source!r}; expected one of {SOURCES}")
        if not isinstance(self.raw, str) or not self.raw:
            raise ValueError("card read has an empty raw identifier")


@dataclass(frozen=True)
class ReadAgain:
    """A read that failed, from any reader: the gateway shows ``pattern`` and
    the member presents the card again. ``reason``: what went wrong (an NFC
    "removed" / "unreadable", a cards.magstripe reason, "unreadable_code")."""

    lane: str
    at: float                       # wall-clock seconds (time.time()), or the frame's kernel timestamp
    reason: str
    source: str                     # one of SOURCES

    pattern: ClassVar[Pattern] = Pattern.TAP_AGAIN

    @property
    def verdict_reason(self) -> str:
        return AGAIN_REASONS[self.source]


class CardReader(abc.ABC):
    """Interface every reader implements."""

    kind = "abstract"

    def __init__(self, lane: str) -> None:
        self.lane = lane
        self.state = "closed"  # closed | ready | absent | fault

    async def __aenter__(self) -> "CardReader":
        await self.open()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def open(self) -> None:
        self.state = "ready"

    async def close(self) -> None:
        self.state = "closed"

    @abc.abstractmethod
    def reads(self) -> AsyncIterator[CardRead | ReadAgain]:
        """Yield one CardRead per tap (a ReadAgain per failed one), for as long as the reader is open."""


class LatestReads:
    """What a device reader hands the gateway: a bounded queue that keeps the
    newest reads when nobody keeps up (a stale tap is worth less than the
    newest one), iterated until ``close()``. On the event loop only."""

    _CLOSED = object()

    def __init__(self, maxsize: int, what: str) -> None:
        self._queue: asyncio.Queue = asyncio.Queue(maxsize)
        self._what = what     # for the log: "lane 1: nfc"

    def put(self, event) -> None:
        if self._queue.full():
            self._queue.get_nowait()
            log.warning("%s: reads() not consumed, dropped the oldest event", self._what)
        self._queue.put_nowait(event)

    def close(self) -> None:
        self.put(self._CLOSED)

    async def __aiter__(self):
        while True:
            event = await self._queue.get()
            if event is self._CLOSED:
                return
            yield event


class QueueReader(CardReader):
    """A reader fed through an asyncio queue: the base of the simulated twin and
    of lane terminals that post their reads over the LAN."""

    def __init__(self, lane: str, *, maxsize: int = 64) -> None:
        super().__init__(lane)
        self._queue: asyncio.Queue[CardRead] = asyncio.Queue(maxsize)

    def push(self, source: str, raw: str, at: float | None = None) -> CardRead:
        read = CardRead(self.lane, source, raw, time.time() if at is None else at)
        self._queue.put_nowait(read)
        return read

    async def reads(self) -> AsyncIterator[CardRead]:
        while True:
            yield await self._queue.get()


class SimulatedReader(QueueReader):
    """The simulated twin: tests and the demo present cards with present()."""

    kind = "simulated"

    def present(self, raw: str, source: str = "nfc") -> CardRead:
        return self.push(source, raw)
