"""Magnetic-stripe track parsing, ISO/IEC 7813 (pure: no I/O, no clock).

A keyboard-wedge swipe reader types what it read from the stripe, one track
after the other, each between its start and end sentinel:

    track 1 (format B)  %B<PAN>^<NAME>^<YYMM><service code><discretionary>?
    track 2             ;<PAN>=<YYMM><service code><discretionary>?
    track 3             ;<digits>?                 (ignored: no member data)

A track the head could not read comes as an error track, ``%E?`` or
``;E?`` (``+E?`` on some readers for track 3). Which tracks arrive depends on
the card and on the reader's setup.

parse() takes one swipe (the text of one frame from hardware.hid) and
returns a Swipe with the card number (PAN) and the expiry, or raises
SwipeError whose `reason` says why the member must swipe again:

    no_track        nothing that looks like a track (junk, a half swipe)
    error_track     the reader sent only error tracks (a bad swipe)
    bad_track       a track with sentinels but not the ISO 7813 layout
    track_mismatch  track 1 and track 2 carry different card numbers

Member cards may be proprietary: the PAN is not checked here (no Luhn, no
issuer prefix); gateway/core/validate.py checks it against the card programs.
Track 2 wins over track 1 when both are good (it is the one readers and
issuers treat as authoritative); either alone is enough.

The track data, the PAN and the cardholder name are personal data: Swipe
keeps only the PAN and expiry, out of repr(); errors never quote the input.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

MAX_SWIPE_CHARS = 512          # three full tracks are < 300 characters

_TRACK1 = re.compile(r"%([^%?;]*)\?")
_TRACK2 = re.compile(r";([^%?;]*)\?")
_ERROR = re.compile(r"[%;+]E\?")
# %B + PAN (up to 19 digits) ^ name (up to 26) ^ YYMM or ^ (absent) ...
_T1_BODY = re.compile(r"^B([0-9]{1,19})\^([^^]{0,26})\^([0-9]{4}|\^)?")
# PAN (up to 19 digits) = YYMM or = (absent) ...
_T2_BODY = re.compile(r"^([0-9]{1,19})=([0-9]{4}|=)?")

REASONS = ("no_track", "error_track", "bad_track", "track_mismatch")


class SwipeError(ValueError):
    """The swipe gave no usable card number; the member swipes again."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


@dataclass(frozen=True)
class Swipe:
    pan: str = field(repr=False)           # the card number; never logged in full
    expiry: str | None = field(default=None, repr=False)  # "YYMM" as on the stripe, None if absent
    track: int = 2                         # the track the PAN was taken from


def parse(data: str) -> Swipe:
    """The card number and expiry of one swipe, or SwipeError(reason)."""
    if not isinstance(data, str):
        raise SwipeError("no_track", "swipe data must be text")
    if len(data) > MAX_SWIPE_CHARS:
        raise SwipeError("no_track", f"more than {MAX_SWIPE_CHARS} characters: not one swipe")
    t1 = t2 = None
    bad = []
    for m in _TRACK1.finditer(data):
        body = m.group(1)
        if body == "E":
            continue
        got = _T1_BODY.match(body)
        if got is None:
            bad.append(1)
        elif t1 is None:
            expiry = got.group(3)
            t1 = Swipe(got.group(1), expiry if expiry and expiry != "^" else None, 1)
    # Track 2 is the first ";...?" of the swipe; a later one is track 3, which
    # can also have "=" separators (ISO 4909) and must not pass for track 2.
    m = _TRACK2.search(data)
    if m is not None and m.group(1) != "E":
        got = _T2_BODY.match(m.group(1))
        if got is None:
            bad.append(2)
        else:
            expiry = got.group(2)
            t2 = Swipe(got.group(1), expiry if expiry and expiry != "=" else None, 2)
    if t1 and t2 and t1.pan != t2.pan:
        raise SwipeError("track_mismatch", "track 1 and track 2 carry different card numbers")
    if t2:
        return t2
    if t1:
        return t1
    if bad:
        raise SwipeError("bad_track", f"track {bad[0]} is not in the ISO/IEC 7813 layout")
    if _ERROR.search(data):
        raise SwipeError("error_track", "the reader could not read any track")
    raise SwipeError("no_track", "no track between start and end sentinels")
