"""The gateway's clock check at run time: gathers the evidence, asks the pure
rule (gateway/core/clock.py) and keeps the high-water mark
(gateway/store/clock_mark.py).

``check()`` is cheap (a few comparisons, a cached stat) and is called for
every decision that depends on the time: the counter passes it to the engine
(a clock it cannot trust makes the rules count as stale), the member-QR check
refuses dynamic codes while it fails, and its fault goes into the faults list
(``storegate status``, ``GET /status``, HQ's status topic).

While online, HQ's time in each ack (``hq_time``, from gateway/shell/uplink.py)
is live evidence: kept with the monotonic time it came, so it advances with
real time whatever the wall clock does (a clock put right is trusted at once,
one that steps back is caught at once, no new ack needed).
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Callable, NamedTuple

from gateway.core import clock as core_clock
from gateway.core.clock import ClockCheck
from gateway.store.clock_mark import MARK_EVERY_S, ClockMark, journal_last_ts

log = logging.getLogger("storegate.clock")

# systemd-timesyncd touches this file once it has synchronized the clock (systemd >= 246);
# chrony does not, and then the local evidence always counts (gateway/core/clock.py rule 2).
TIMESYNC_FLAG = Path("/run/systemd/timesync/synchronized")
CHECK_EVERY_S = 60


class HQReading(NamedTuple):
    """HQ's time from the last ack that carried it."""

    hq_time_ms: int
    at: float               # the monotonic clock when it came
    rtt_s: float | None     # the acked batch's round trip, None if not known
    offset_ms: int          # HQ's time minus the wall clock when it came


def timesyncd_synchronized() -> bool | None:
    """True when systemd-timesyncd says the clock is synchronized; None when it does not say."""
    try:
        return True if TIMESYNC_FLAG.exists() else None
    except OSError:
        return None


class ClockWatch:
    def __init__(self, clock: Callable[[], float], mark: ClockMark, rules, *,
                 synchronized: Callable[[], bool | None] = timesyncd_synchronized,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.monotonic = monotonic
        self.hq: HQReading | None = None      # HQ's time from the last ack that carried it
        self.mark = mark
        self.rules = rules
        self.journal_ts: int | None = None   # the journal's last record at start-up
        self.deny_issued_at: int | None = None
        self.seen: int | None = None          # the latest sane reading of this run
        self._synchronized = synchronized
        self._sync_cache: tuple[float, bool | None] = (-1e9, None)
        self._sane: tuple[bool, bool] | None = None   # (sane, ahead), for logging transitions only
        rules.deny_listeners.append(self._deny_applied)

    def _deny_applied(self, _version: int, issued_at: int, _entries: dict) -> None:
        self.deny_issued_at = max(self.deny_issued_at or 0, int(issued_at))

    def hq_time(self, hq_time_ms: int, rtt_s: float | None) -> None:
        """An ack came with HQ's time (``rtt_s``: since its batch was first
        sent, if known). The next check() uses it."""
        self.hq = HQReading(int(hq_time_ms), self.monotonic(), rtt_s,
                            core_clock.offset(int(hq_time_ms), self.clock()))
        self.check()   # log a change at once

    def journal_opened(self, journal) -> None:
        self.journal_ts = journal_last_ts(journal.index)

    def synchronized(self) -> bool | None:
        at, value = self._sync_cache
        if time.monotonic() - at > 10:
            value = self._synchronized()
            self._sync_cache = (time.monotonic(), value)
        return value

    def _hq_bounds(self) -> tuple[int | None, int | None]:
        if self.hq is None:
            return None, None
        return core_clock.hq_bounds(self.hq.hq_time_ms, since_s=self.monotonic() - self.hq.at, rtt_s=self.hq.rtt_s)

    def evidence(self, hq_lower: int | None = None) -> dict[str, int | None]:
        rules = self.rules.current
        return {"rules": rules.issued_at if rules is not None else None, "deny": self.deny_issued_at,
                "hq": hq_lower if hq_lower is not None else self._hq_bounds()[0], "journal": self.journal_ts,
                "mark": self.mark.value, "seen": self.seen}

    def check(self) -> ClockCheck:
        lower, upper = self._hq_bounds()
        result = core_clock.check(self.clock(), self.evidence(lower), synchronized=self.synchronized(),
                                  hq_upper=upper, offset_ms=self.hq.offset_ms if self.hq is not None else None)
        if result.confirmed:
            self.seen = result.now    # HQ vouches for it: a later "seen" was left by a wrong clock (rule 5)
        elif result.sane and not result.ahead_s:
            self.seen = max(self.seen or 0, result.now)   # never a time HQ says is in the future (rule 5)
        state = (result.sane, bool(result.ahead_s))
        if state != self._sane:
            if result.fault:
                log.error("%s", result.fault)
            elif self._sane is not None:
                log.warning("clock trusted again: %s", core_clock.iso_utc(result.now))
            self._sane = state
        return result

    def keep_mark(self) -> None:
        """Write the high-water mark when it is due (blocking: an fsync)."""
        result = self.check()
        if core_clock.mark_due(result, self.mark.value, MARK_EVERY_S):
            try:
                self.mark.write(result.now)
            except OSError as exc:   # a full disk must not stop the counter; the mark is only evidence
                log.warning("clock mark not written: %s", exc)

    async def run(self) -> None:
        while True:
            try:
                await asyncio.to_thread(self.keep_mark)
            except Exception:  # noqa: BLE001
                log.exception("clock check failed")
            await asyncio.sleep(CHECK_EVERY_S)

    def close(self) -> None:
        """At a clean stop: leave the latest sane time for the next run."""
        result = self.check()
        if result.sane and not result.ahead_s and (self.mark.value is None or result.now > self.mark.value
                                                   or result.synchronized or result.confirmed):
            try:
                self.mark.write(result.now)
            except OSError as exc:
                log.warning("clock mark not written: %s", exc)
