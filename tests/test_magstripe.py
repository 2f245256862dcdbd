"""ISO/IEC 7813 track parsing (cards/magstripe.py)."""

import pytest

from cards.magstripe import MAX_SWIPE_CHARS, SwipeError, parse

PAN = "880000000013"
T1 = f"%B{PAN}^WANG/XIAOMING^27121010000000000000?"
T2 = f";{PAN}=27121010000000?"
# A track 3 in the ISO 4909 layout (the sample from the card industry spec, with its
# masked fields filled in): it contains "=" too, and must never pass for track 2.
T3 = ";011234567890123445=724724100000000000030300123404040009901000000000000000000000000000==1=0000000000000000?"


@pytest.mark.parametrize("swipe, track", [
    (T1 + T2, 2),                 # both tracks: track 2 wins
    (T1 + T2 + T3, 2),            # and track 3 is ignored
    (T2, 2),
    (T1, 1),
    ("%E?" + T2, 2),              # track 1 unreadable, track 2 fine
    (T1 + ";E?", 1),              # track 2 unreadable, track 1 fine
    (T1 + ";E?" + T3, 1),         # track 3 (with "=") does not pass for track 2
])
def test_card_number_and_expiry(swipe, track):
    result = parse(swipe)
    assert (result.pan, result.expiry, result.track) == (PAN, "2712", track)


def test_proprietary_card_numbers_need_no_luhn_and_expiry_may_be_absent():
    assert parse(";1234567=?").pan == "1234567"        # no Luhn here: the engine checks per card program
    assert parse(";1234567=?").expiry is None
    assert parse("%B1234567^MEMBER^^?").expiry is None


@pytest.mark.parametrize("swipe, reason", [
    ("%E?;E?", "error_track"),
    ("%E?;E?+E?", "error_track"),
    (";E?", "error_track"),
    ("", "no_track"),
    ("hello world", "no_track"),
    (f";{PAN}=2712", "no_track"),            # stopped before the end sentinel: half a swipe
    (f"%B{PAN}^WANG", "no_track"),
    (";12AB=2712?", "bad_track"),            # letters in a track 2 PAN
    (";12345678901234567890=2712?", "bad_track"),   # PAN longer than 19 digits
    ("%B880000000013WANG2712?", "bad_track"),       # no field separators
    (f"%B{PAN}^X^2712?;880000000021=2712?", "track_mismatch"),
    ("x" * (MAX_SWIPE_CHARS + 1), "no_track"),
])
def test_bad_swipes_say_swipe_again_with_a_reason(swipe, reason):
    with pytest.raises(SwipeError) as refused:
        parse(swipe)
    assert refused.value.reason == reason
    assert PAN not in str(refused.value) and "WANG" not in str(refused.value)


def test_repr_keeps_the_card_number_and_name_out():
    result = parse(T1 + T2)
    assert PAN not in repr(result) and "2712" not in repr(result) and "WANG" not in repr(result)


def test_not_text():
    with pytest.raises(SwipeError) as refused:
        parse(b";123=?")
    assert refused.value.reason == "no_track"
