"""Whether the gateway may believe its wall clock: pure, every time is an argument.

A Raspberry Pi has no clock battery (a Pi 5 has an RTC, but only with a cell
on its battery connector). A box that boots offline comes up at whatever
time it has (1970, the image's build date, fake-hwclock's last save) until
chrony or systemd-timesyncd reaches a time server. Every time-sensitive
decision of the gateway reads that clock: how old the rules are (and so
whether stored value, redemption and coupons may go offline), whether a
dynamic member QR code is current, which business day a sale belongs to.

The gateway therefore checks its clock against times it knows have passed
(the *evidence*, ``{source: epoch seconds}``):

- ``rules``: the running rule set's ``issued_at`` (signed by HQ);
- ``deny``: the last deny delta's ``issued_at`` (signed by HQ);
- ``journal``: the timestamp of the journal's last record, read at start-up;
- ``mark``: the high-water mark the previous run left in the data dir;
- ``seen``: the latest reading of this run while the clock was sane.

Rules (the code below is their proof):

1. The clock is *sane* when it is not before any counted evidence by more
   than ``tolerance_s`` (NTP steps and HQ's own clock differ by seconds; a
   clock a few minutes behind would be caught by nothing else either).
2. HQ's signed times (``rules``, ``deny``) always count. The local ones
   (``journal``, ``mark``, ``seen``) count unless the clock is known to be
   synchronized (``synchronized=True``: systemd-timesyncd says so): a
   synchronized clock outranks local marks written while it was wrong (a
   clock that once jumped ahead leaves marks in the future; without this the
   box would stay insane until the future arrived).
3. A clock ahead of every evidence is sane: nothing the gateway holds can
   tell a future clock from a long offline run. (It errs on the safe side:
   the rules look older, and stale rules refuse the risky operations.)
4. While the clock is not sane the age of the rules is unknown, and unknown
   counts as stale: ``untrusted_ages`` gives ages past ``max_age_s`` (at
   least the lower bound the evidence proves), never a negative or fresh one.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Mapping

TOLERANCE_S = 300
HQ_SOURCES = frozenset({"rules", "deny"})     # times HQ signed
LOCAL_SOURCES = frozenset({"journal", "mark", "seen"})

_WHAT = {"rules": "the running rules' issue time", "deny": "the last deny list update from HQ",
         "journal": "the journal's last record", "mark": "the last time the previous run saw",
         "seen": "a time this gateway already saw"}


@dataclass(frozen=True)
class ClockCheck:
    """The verdict on one clock reading."""

    now: int                      # the clock, epoch seconds
    sane: bool
    known: int | None = None      # the latest counted evidence (a time known to have passed)
    source: str | None = None     # which evidence that is
    synchronized: bool | None = None

    @property
    def behind_s(self) -> int:
        """How far the clock is before the latest known time (0 if not)."""
        return max(0, (self.known or 0) - self.now)

    @property
    def fault(self) -> str | None:
        """The line for the faults list (``storegate status``, HQ's status), or None."""
        if self.sane:
            return None
        return (f"clock not trusted: {iso_utc(self.now)} is {_span(self.behind_s)} before {_WHAT[self.source]} "
                f"({iso_utc(self.known)}); rules count as stale (no stored value, redemption or coupons "
                f"offline) and dynamic member QR codes are refused until the time is set (timedatectl, chrony)")

    def public(self) -> dict:
        """For the status JSON."""
        return {"sane": self.sane, "now": self.now, "known": self.known, "source": self.source,
                "behind_s": self.behind_s, "synchronized": self.synchronized}


def check(now_s: float, evidence: Mapping[str, float | None], *, synchronized: bool | None = None,
          tolerance_s: int = TOLERANCE_S) -> ClockCheck:
    """Rules 1-3: is the clock reading ``now_s`` to be believed, given the
    times known to have passed (``None`` entries: not known)?"""
    now = int(now_s)
    counted = {src: int(t) for src, t in evidence.items()
               if t is not None and (src in HQ_SOURCES or not synchronized)}
    if not counted:
        return ClockCheck(now, True, synchronized=synchronized)
    source = max(counted, key=lambda s: (counted[s], s in HQ_SOURCES))
    known = counted[source]
    return ClockCheck(now, now >= known - tolerance_s, known, source, synchronized)


def untrusted_ages(ages: Mapping[str, int], clock: ClockCheck, *, issued_at: int, as_of: int,
                   max_age_s: int) -> dict[str, int]:
    """Rule 4: the offline ages (gateway/core/validate.py ``offline_ages``)
    when the clock is not sane. How old the rules are is unknown; the engine
    must see them past ``max_age_s`` (so ``rules_stale`` refuses the risky
    offline operations while identification and points go on). Each age is at
    least what the evidence proves (``known`` minus the time in question)."""
    if clock.sane:
        return dict(ages)
    floor = max(clock.known or 0, clock.now)
    rules_age = max(floor - issued_at, max_age_s + 1)
    sync_age = max(floor - min(issued_at, as_of), rules_age)
    return {**ages, "rules_age_s": rules_age, "sync_age_s": sync_age}


def mark_due(clock: ClockCheck, mark: int | None, every_s: int) -> bool:
    """Whether the high-water mark should be written now: only from a sane
    clock, once ``every_s`` has passed since the mark (rarely: each write is
    an fsync on an SD card), and at once when a synchronized clock is behind
    a mark a wrong clock left (rule 2: the mark moves back to the truth)."""
    if not clock.sane:
        return False
    if mark is None:
        return True
    if clock.synchronized and clock.now < mark:
        return True
    return clock.now - mark >= every_s


def iso_utc(t: int | None) -> str:
    return "?" if t is None else datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _span(s: int) -> str:
    if s >= 86400:
        return f"{s // 86400} d {s % 86400 // 3600} h"
    if s >= 3600:
        return f"{s // 3600} h {s % 3600 // 60} min"
    return f"{s // 60} min {s % 60} s" if s >= 60 else f"{s} s"
