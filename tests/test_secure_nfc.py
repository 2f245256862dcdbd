"""Secure NFC cards in the gateway (gateway/shell/secure_nfc.py): NTAG 424 DNA SUN
messages checked with the key set named by the card's programme in the rule
set, replays refused across restarts, clear reason codes.

The SUN messages come from tests/vcard.py's NTAG 424 DNA (its own AES/CMAC
code, independent of cards/ntag424.py); the per-card file read key is
derived with cards.ntag424.diversify_key, checked here against NXP
AN10922's published vector. The PC/SC tests go through pyscard -> pcscd ->
vpcd -> the virtual card.
"""

from __future__ import annotations

import asyncio
import logging
import os
import stat

import pytest

from gateway.shell.secure_nfc import SecureNfc
from gateway.core.reasons import reason_text
from hardware.nfc import NfcRead, PcscReader
from cards.ntag424 import diversify_key
from hardware.readers import CardRead
from tests import pcsc_env
from tests.test_nfc import EVENT_TIMEOUT, READER, Events, cards, pcscd, until  # noqa: F401 (fixtures)
from tests.vcard import Ntag215, Ntag424Dna

META = bytes.fromhex("2B7E151628AED2A6ABF7158809CF4F3C")
MASTER = bytes.fromhex("000102030405060708090A0B0C0D0E0F")
OTHER_META = bytes.fromhex("11" * 16)
OTHER_MASTER = bytes.fromhex("22" * 16)
SECURE_UID = "04DE5F1EACC040"      # card 880100000011, programme "secure" (SUN required)
OPTIONAL_UID = "04DE5F1EACC041"    # card 880200000019, programme "mixed" (SUN optional)
PLAIN_UID = "04A1B2C3D4E5F6"       # card 880000000013, programme "member" (no SUN)
SECURE_CARD = "880100000011"


def rules(**overrides) -> dict:
    """An effective rule set in the wire/RULESET.md layout (only what SUN checks read)."""
    data = {
        "card_programs": {
            "member": {"prefix": "8800", "length": 12, "card_type": "personal"},
            "secure": {"prefix": "8801", "length": 12, "card_type": "personal", "sources": ["nfc"],
                       "sun": {"key_id": "sun-2026", "required": True}},
            "mixed": {"prefix": "8802", "length": 12, "card_type": "personal",
                      "sun": {"key_id": "sun-2026", "required": False}},
            "partner": {"prefix": "8803", "length": 12, "card_type": "personal",
                        "sun": {"key_id": "partner"}},
        },
        "keys": {"sun": {
            "sun-2026": {"meta_read_key": META.hex(), "file_read_key": MASTER.hex(), "diversify": "uid"},
            "partner": {"meta_read_key": OTHER_META.hex(), "file_read_key": OTHER_MASTER.hex(), "diversify": "none"},
        }},
        "members": {
            SECURE_CARD: {"nfc_uid": SECURE_UID},
            "880200000019": {"nfc_uid": OPTIONAL_UID},
            "880000000013": {"nfc_uid": PLAIN_UID},
            "880300000017": {"nfc_uid": "04DE5F1EACC042"},
        },
    }
    data.update(overrides)
    return data


def card(uid: str = SECURE_UID, *, meta: bytes = META, master: bytes = MASTER, diversify: bool = True,
         counter: int = 0) -> Ntag424Dna:
    """A virtual NTAG 424 DNA personalised like HQ would (not inserted: sun_url() only)."""
    key = diversify_key(master, bytes.fromhex(uid)) if diversify else master
    return Ntag424Dna(0, uid, meta_read_key=meta, file_read_key=key, counter=counter)


def nfc(raw: str = SECURE_UID, sun_url: str | None = None, **kw) -> NfcRead:
    return NfcRead("1", "nfc", raw, 0.0, sun_url=sun_url, **kw)


@pytest.fixture
def secure(tmp_path):
    s = SecureNfc(tmp_path / "sun_counters.sqlite")
    yield s
    s.close()


def test_an10922_diversification_vector():
    # NXP AN10922 2.2.1: AES-128 master key, M = UID || AID || system identifier.
    m = bytes.fromhex("04782E21801D803042F54E585020416275")
    key = diversify_key(bytes.fromhex("00112233445566778899AABBCCDDEEFF"), m[:7], m[7:])
    assert key.hex().upper() == "A8DD63A3B89D54B37CA802473FDA9175"
    # Without padding (32-byte input: subkey K1) it is a different, still 16-byte key.
    assert len(diversify_key(MASTER, bytes(31))) == 16
    with pytest.raises(ValueError):
        diversify_key(b"short", bytes(7))


async def test_genuine_message_passes_with_the_authenticated_uid(secure):
    url = card(counter=41).sun_url(42)
    read, refused = await secure.check(nfc("08A1B2C3", url), rules())  # a random ID from FF CA
    assert refused is None
    assert read.raw == SECURE_UID and isinstance(read, NfcRead)
    assert secure.counters.last(bytes.fromhex(SECURE_UID)) == 42


async def test_replay_refused_also_after_a_restart(tmp_path):
    url = card().sun_url(7)
    first = SecureNfc(tmp_path / "c.sqlite")
    assert (await first.check(nfc(SECURE_UID, url), rules()))[1] is None
    _, refused = await first.check(nfc(SECURE_UID, url), rules())
    assert (refused.verdict, refused.reason) == ("deny", "sun_replayed")
    first.close()
    again = SecureNfc(tmp_path / "c.sqlite")  # the gateway restarted
    _, refused = await again.check(nfc(SECURE_UID, url), rules())
    assert refused.reason == "sun_replayed"
    _, older = await again.check(nfc(SECURE_UID, card().sun_url(6)), rules())
    assert older.reason == "sun_replayed"
    read, ok = await again.check(nfc(SECURE_UID, card().sun_url(8)), rules())
    assert ok is None and read.raw == SECURE_UID
    again.close()


async def test_required_programme_without_a_message_is_sun_missing(secure):
    _, refused = await secure.check(nfc(SECURE_UID), rules())
    assert (refused.verdict, refused.reason, refused.card_no) == ("deny", "sun_missing", SECURE_CARD)
    public = refused.public()
    assert public["card"] == "8801****0011" and public["pattern"] == "deny"
    assert public["text"]["zh-CN"] and public["text"]["en"]


async def test_forged_mac_is_refused_and_does_not_burn_the_counter(secure):
    url = card().sun_url(5)
    forged = url[:-1] + ("0" if url[-1] != "0" else "1")
    _, refused = await secure.check(nfc(SECURE_UID, forged), rules())
    assert refused.reason == "sun_bad_mac"
    assert secure.counters.last(bytes.fromhex(SECURE_UID)) is None
    assert (await secure.check(nfc(SECURE_UID, url), rules()))[1] is None


async def test_card_keyed_without_diversification_fails_where_the_rules_say_uid(secure):
    undiversified = card(diversify=False).sun_url(3)
    _, refused = await secure.check(nfc(SECURE_UID, undiversified), rules())
    assert refused.reason == "sun_bad_mac"


async def test_message_under_another_programmes_keys_is_key_mismatch(secure):
    # Genuine under the partner key set, but the UID belongs to a "secure" card.
    url = card(meta=OTHER_META, master=OTHER_MASTER, diversify=False).sun_url(9)
    _, refused = await secure.check(nfc(SECURE_UID, url), rules())
    assert refused.reason == "sun_key_mismatch"
    assert secure.counters.last(bytes.fromhex(SECURE_UID)) is None


async def test_recorded_message_on_a_card_with_another_uid(secure):
    url = card().sun_url(11)  # recorded from the genuine card, played by an emulator with its own UID
    _, refused = await secure.check(nfc("04FFFFFFFFFF01", url), rules())
    assert refused.reason == "sun_uid_mismatch"


async def test_malformed_message_on_a_required_programme(secure):
    _, refused = await secure.check(nfc(SECURE_UID, "https://member.example.com/t?picc_data=00&cmac=11"), rules())
    assert refused.reason == "sun_bad_format"


async def test_optional_programme(secure):
    # No message, or a plain URL: accepted (cards issued before the programme went secure).
    assert (await secure.check(nfc(OPTIONAL_UID), rules()))[1] is None
    assert (await secure.check(nfc(OPTIONAL_UID, "https://member.example.com/welcome"), rules()))[1] is None
    # A genuine message is checked and counted; a forged or replayed one is refused all the same.
    url = card(OPTIONAL_UID).sun_url(1)
    assert (await secure.check(nfc(OPTIONAL_UID, url), rules()))[1] is None
    assert (await secure.check(nfc(OPTIONAL_UID, url), rules()))[1].reason == "sun_replayed"
    forged = card(OPTIONAL_UID, master=OTHER_MASTER).sun_url(2)
    assert (await secure.check(nfc(OPTIONAL_UID, forged), rules()))[1].reason == "sun_bad_mac"


async def test_programmes_without_sun_and_other_sources_are_untouched(secure):
    read = nfc(PLAIN_UID, "https://example.com/anything")
    assert await secure.check(read, rules()) == (read, None)
    swipe = CardRead("1", "magstripe", ";880100000011=2812?")
    assert await secure.check(swipe, rules()) == (swipe, None)
    unknown = nfc("04000000000099")
    assert await secure.check(unknown, rules()) == (unknown, None)  # the engine says unknown_nfc_card
    assert await secure.check(nfc(SECURE_UID), None) == (nfc(SECURE_UID), None)  # no rules: the engine decides


async def test_programme_naming_a_missing_key_set(secure, caplog):
    r = rules()
    r["keys"]["sun"]["sun-2026"]["meta_read_key"] = "not-a-key-but-secret-looking-1234"
    with caplog.at_level(logging.ERROR, "storegate.secure_nfc"):
        _, refused = await secure.check(nfc(SECURE_UID, card().sun_url(1)), r)
    assert refused.reason == "sun_no_keys"
    assert "keys.sun.sun-2026.meta_read_key" in caplog.text
    assert "secret-looking" not in caplog.text  # the bad value is never logged


async def test_nothing_secret_or_personal_in_the_logs(secure, caplog):
    url = card().sun_url(3)
    with caplog.at_level(logging.DEBUG):
        await secure.check(nfc(SECURE_UID, url), rules())
        await secure.check(nfc(SECURE_UID, url), rules())          # replayed: logged as a refusal
        await secure.check(nfc(SECURE_UID), rules())               # missing
    text = caplog.text
    assert "sun_replayed" in text and "sun_missing" in text
    for secret in (SECURE_UID, SECURE_CARD, META.hex(), MASTER.hex(), url.split("=")[1][:16]):
        assert secret.lower() not in text.lower()
    assert "8801****0011" in text
    assert MASTER.hex() not in repr(secure)


def test_wanted_only_while_the_rules_have_sun(tmp_path):
    current = {"rules": None}
    s = SecureNfc(tmp_path / "c.sqlite", lambda: current["rules"])
    try:
        assert not s.wanted()
        current["rules"] = {"card_programs": {"member": {"prefix": "8800", "length": 12}}}
        assert not s.wanted()
        current["rules"] = rules()
        assert s.wanted()
    finally:
        s.close()


def test_counter_and_rules_files_are_private(tmp_path):
    rules_file = tmp_path / "rules.json"
    rules_file.write_text("{}")
    os.chmod(rules_file, 0o644)
    s = SecureNfc(tmp_path / "c.sqlite", lambda: rules(), rules_path=rules_file)
    try:
        assert stat.S_IMODE((tmp_path / "c.sqlite").stat().st_mode) == 0o600
        assert s.wanted()  # compiles the rules: they hold keys
        assert stat.S_IMODE(rules_file.stat().st_mode) == 0o600
    finally:
        s.close()


def test_reason_texts_in_both_languages():
    for code in ("sun_missing", "sun_bad_format", "sun_bad_mac", "sun_replayed", "sun_uid_mismatch",
                 "sun_key_mismatch", "sun_no_keys"):
        text = reason_text(code)
        assert text["zh-CN"] and text["en"] and text["zh-CN"] != text["en"]


# -- through the real PC/SC stack ----------------------------------------------------
async def test_pcsc_reader_hands_sun_messages_to_the_gateway_check(pcscd, cards, tmp_path):  # noqa: F811
    current = {"rules": rules()}
    secure = SecureNfc(tmp_path / "c.sqlite", lambda: current["rules"])
    reader = PcscReader("1", READER)
    secure.attach(reader)
    await reader.open()
    events = Events(reader)

    async def tap(c, n):
        c.insert()
        read = await events.wait_for(n)
        c.remove()
        await until(lambda: not c.present, what="the card to leave")
        await asyncio.to_thread(pcsc_env.wait_for_no_card)
        return read, *(await secure.check(read, current["rules"]))

    try:
        genuine = Ntag424Dna(pcscd.port, SECURE_UID, meta_read_key=META,
                             file_read_key=diversify_key(MASTER, bytes.fromhex(SECURE_UID)), counter=99)
        cards.append(genuine)
        read, passed, refused = await tap(genuine, 1)
        assert refused is None and passed.raw == SECURE_UID and read.sun is None
        assert read.sun_url and read.sun_url not in repr(read)
        assert secure.counters.last(bytes.fromhex(SECURE_UID)) == 100

        clone = Ntag424Dna(pcscd.port, SECURE_UID)
        clone.replay_url = genuine.last_url
        cards.append(clone)
        assert (await tap(clone, 2))[2].reason == "sun_replayed"

        # An NTAG215 answering with the secure card's UID (a UID clone): no SUN message.
        uid_clone = Ntag215(pcscd.port, SECURE_UID)
        cards.append(uid_clone)
        read, _, refused = await tap(uid_clone, 3)
        assert read.sun_url is None and refused.reason == "sun_missing"

        # Rules without SUN keys: the reader stops reading NDEF files.
        current["rules"] = {"card_programs": {"member": {"prefix": "8800", "length": 12}}}
        sent = len(genuine.apdus)
        read, _, refused = await tap(genuine, 4)
        assert read.sun_url is None and refused is None
        assert genuine.apdus[sent:] == [bytes.fromhex("FFCA000000")]
    finally:
        events.stop()
        await reader.close()
        secure.close()


# -- the gateway: signed rules with a secure programme, a PC/SC lane ------------------
async def test_gateway_pcsc_lane_refuses_clones_of_secure_cards(pcscd, cards, tmp_path, broker, caplog):  # noqa: F811
    """pyscard -> pcscd -> vpcd -> virtual NTAG 424 DNA into Gateway.handle_read,
    with the keys coming in the signed rule set (wire/RULESET.md layout)."""
    import time
    import tomllib

    from gateway.shell import config as gw_config
    from gateway.shell.service import Gateway
    from tests.support import GOLD_UID, RULES_FILE, install_rules

    secure_card = "880100000012"  # Luhn-valid, programme "secure"
    doc = tomllib.loads(RULES_FILE.read_text(encoding="utf-8"))
    doc["card_programs"]["secure"] = {
        "name": {"zh-CN": "安全芯片会员卡", "en": "Secure member card"}, "prefix": "8801", "length": 12,
        "check_digit": "luhn", "card_type": "personal", "sources": ["nfc"],
        "sun": {"key_id": "sun-2026", "required": True}}
    doc["keys"] = {"sun": {"sun-2026": {"meta_read_key": META.hex(), "file_read_key": MASTER.hex()}}}  # diversify: uid (default)
    doc["members"][secure_card] = {"member_id": "M2001", "name": "安*", "tier": "gold", "nfc_uid": SECURE_UID}

    cfg = gw_config.check({
        "store": {"id": "S001", "data_dir": str(tmp_path / "store")},
        "mqtt": {"host": "127.0.0.1", "port": broker.port},
        "lanes": [{"id": "1", "reader": "pcsc", "pcsc_reader": READER}],
    })
    caplog.set_level(logging.DEBUG)
    async with Gateway(cfg) as gw:
        install_rules(gw, [doc], now=int(time.time()))
        taps: asyncio.Queue = asyncio.Queue()
        gw.lanes["1"].listeners.add(taps)
        await until(lambda: gw.lanes["1"].reader.state == "ready", what="the reader")

        async def tap(c) -> dict:
            c.insert()
            event = await asyncio.wait_for(taps.get(), EVENT_TIMEOUT)
            c.remove()
            await until(lambda: not c.present, what="the card to leave")
            await asyncio.to_thread(pcsc_env.wait_for_no_card)
            return event

        genuine = Ntag424Dna(pcscd.port, SECURE_UID, meta_read_key=META,
                             file_read_key=diversify_key(MASTER, bytes.fromhex(SECURE_UID)), counter=5)
        cards.append(genuine)
        event = await tap(genuine)
        assert (event["verdict"], event["member"]["member_id"], event["card"]) == ("accept", "M2001", "8801****0012")

        clone = Ntag424Dna(pcscd.port, SECURE_UID)
        clone.replay_url = genuine.last_url
        cards.append(clone)
        event = await tap(clone)
        assert (event["verdict"], event["reason"], event["pattern"]) == ("deny", "sun_replayed", "deny")
        assert event["text"] == reason_text("sun_replayed") and event["card"] == "8801****0012"
        assert gw.lanes["1"].indicator.history[-1].value == "deny"

        uid_clone = Ntag215(pcscd.port, SECURE_UID)  # the UID alone, no SUN message
        cards.append(uid_clone)
        assert (await tap(uid_clone))["reason"] == "sun_missing"

        plain = Ntag215(pcscd.port, GOLD_UID)  # an ordinary member card on the same lane
        cards.append(plain)
        event = await tap(plain)
        assert (event["verdict"], event["member"]["member_id"]) == ("accept", "M1001")

        assert (await tap(genuine))["verdict"] == "accept"  # the genuine card again: a fresh message
        assert gw.stats["denied"] == 2
    for secret in (SECURE_UID, secure_card, META.hex(), MASTER.hex()):
        assert secret.lower() not in caplog.text.lower()


async def test_a_message_that_decrypts_to_garbage_under_one_key_set_is_tried_under_the_others(secure, tmp_path):
    """Decrypted under the wrong programme's keys, a PICC record is random;
    about one in eighty of them looks like a card that mirrors no counter
    ("bad_format"). That must not end the search: the message is genuine
    under its own key set (the test above failed this way now and then)."""
    from cards.ntag424 import SdmKeys, SunError, SunVerifier

    genuine = card(meta=OTHER_META, master=OTHER_MASTER, diversify=False)
    wrong = SunVerifier(SdmKeys(META, lambda uid: diversify_key(MASTER, uid)), tmp_path / "counters.sqlite")
    for counter in range(1, 3000):
        url = genuine.sun_url(counter)
        try:
            wrong.authenticate(url)
        except SunError as refused:
            if refused.reason == "bad_format":
                break
    else:
        pytest.fail("no message among 3000 counters decrypts to a non-mirroring record under the wrong keys")
    _, refused = await secure.check(nfc(SECURE_UID, url), rules())
    assert refused.reason == "sun_key_mismatch"
