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
- ``hq``: HQ's time in its last ack (``hq_time_ms``, when HQ committed a
  batch), advanced by the time passed since it came (``hq_bounds``);
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
5. HQ's time in an ack is both bounds of HQ's "now" (``hq_bounds``): HQ
   committed the batch after it was sent and before the ack came, so its
   time plus what passed since the ack is a lower bound (evidence ``hq``,
   rule 1: a clock behind it by more than the tolerance is not sane), and
   plus the batch's round trip an upper bound. A clock past the upper bound
   by more than the tolerance is *ahead* (``ahead_s``): a fault, since it
   stamps records and business days in the future, but still sane (rule 3:
   the rules only look older, the safe side), and no mark is written from
   it (``mark_due``), so a future time never becomes evidence. Without a
   round trip (an ack for a batch of an earlier connection) only the lower
   bound is known. A clock within both bounds (by the tolerance) is
   *confirmed* by HQ and outranks the local evidence as a synchronized one
   does (rule 2): a box that ran ahead and was put right is not held
   untrusted by the marks it left while it was ahead.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Mapping

from wire.messages import CLOCK_TOLERANCE_S

TOLERANCE_S = CLOCK_TOLERANCE_S   # `storegate-hq fleet` flags a store's drift past it too
HQ_SOURCES = frozenset({"rules", "deny", "hq"})     # times HQ signed, or sent in an ack
LOCAL_SOURCES = frozenset({"journal", "mark", "seen"})

_WHAT = {"rules": "the running rules' issue time", "deny": "the last deny list update from HQ",
         "hq": "HQ's time in its last ack",
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
    ahead_s: int = 0              # past HQ's upper bound by more than the tolerance (rule 5), else 0
    offset_ms: int | None = None  # HQ's time in the last ack minus this clock when it came
    confirmed: bool = False       # within both of HQ's bounds (rule 5): local evidence does not count

    @property
    def behind_s(self) -> int:
        """How far the clock is before the latest known time (0 if not)."""
        return max(0, (self.known or 0) - self.now)

    @property
    def fault(self) -> str | None:
        """The line for the faults list (``storegate status``, HQ's status), or None."""
        if self.sane and self.ahead_s:
            return (f"clock ahead: {iso_utc(self.now)} is {_span(self.ahead_s)} after HQ's time (its last ack); "
                    f"records and business days are stamped in the future until the time is set "
                    f"(timedatectl, chrony)")
        if self.sane:
            return None
        return (f"clock not trusted: {iso_utc(self.now)} is {_span(self.behind_s)} before {_WHAT[self.source]} "
                f"({iso_utc(self.known)}); rules count as stale (no stored value, redemption or coupons "
                f"offline) and dynamic member QR codes are refused until the time is set (timedatectl, chrony)")

    def public(self) -> dict:
        """For the status JSON."""
        return {"sane": self.sane, "now": self.now, "known": self.known, "source": self.source,
                "behind_s": self.behind_s, "synchronized": self.synchronized, "ahead_s": self.ahead_s,
                "offset_ms": self.offset_ms, "confirmed": self.confirmed}


def check(now_s: float, evidence: Mapping[str, float | None], *, synchronized: bool | None = None,
          tolerance_s: int = TOLERANCE_S, hq_upper: float | None = None,
          offset_ms: int | None = None) -> ClockCheck:
    """Rules 1-3 and 5: is the clock reading ``now_s`` to be believed, given
    the times known to have passed (``None`` entries: not known), and is it
    ahead of ``hq_upper`` (the latest HQ's time can be now, ``hq_bounds``)?
    ``offset_ms`` is only carried to the verdict, for the status."""
    now = int(now_s)
    ahead = now - int(hq_upper) if hq_upper is not None else 0
    ahead = ahead if ahead > tolerance_s else 0
    hq_lower = evidence.get("hq")
    confirmed = (hq_lower is not None and hq_upper is not None
                 and int(hq_lower) - tolerance_s <= now <= int(hq_upper) + tolerance_s)
    counted = {src: int(t) for src, t in evidence.items()
               if t is not None and (src in HQ_SOURCES or not (synchronized or confirmed))}
    if not counted:
        return ClockCheck(now, True, synchronized=synchronized, ahead_s=ahead, offset_ms=offset_ms,
                          confirmed=confirmed)
    source = max(counted, key=lambda s: (counted[s], s in HQ_SOURCES))
    known = counted[source]
    return ClockCheck(now, now >= known - tolerance_s, known, source, synchronized, ahead, offset_ms, confirmed)


def hq_bounds(hq_time_ms: int, *, since_s: float, rtt_s: float | None) -> tuple[int, int | None]:
    """Rule 5: what HQ's clock reads now, at least and at most, in epoch
    seconds, from its time in an ack (``hq_time_ms``, when it committed the
    batch), the time passed since the ack came (``since_s``, on a clock that
    never steps) and the batch's round trip (``rtt_s``: from its first
    sending to the ack; None when not known: no upper bound)."""
    since = max(0.0, since_s)
    lo = (hq_time_ms // 1000) + int(since)
    if rtt_s is None:
        return lo, None
    return lo, -(-(hq_time_ms + int((since + max(0.0, rtt_s)) * 1000)) // 1000)


def offset(hq_time_ms: int, local_s: float) -> int:
    """HQ's time in an ack minus this clock when the ack came, in ms
    (positive: this clock is behind HQ's)."""
    return hq_time_ms - int(local_s * 1000)


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
    an fsync on an SD card), and at once when a synchronized clock (or one
    HQ confirms, rule 5) is behind a mark a wrong clock left (rule 2: the
    mark moves back to the truth)."""
    if not clock.sane or clock.ahead_s:
        return False   # a future time must not become evidence (rule 5)
    if mark is None:
        return True
    if (clock.synchronized or clock.confirmed) and clock.now < mark:
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
