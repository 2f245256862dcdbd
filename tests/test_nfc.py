"""PC/SC NFC reader and NTAG 424 DNA SUN checks, on the real PC/SC stack:
PcscReader (pyscard) -> libpcsclite -> pcscd -> vpcd driver -> tests/vcard.py.

pcscd and vsmartcard-vpcd are Debian packages that `make test` installs; when
they are missing these tests fail (they do not skip), saying so.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from hardware.nfc import NfcRead, PcscReader, TapAgain, ndef_uri
from cards.ntag424 import CounterStore, SdmKeys, SunError, SunVerifier
from hardware.readers import CardRead
from tests import pcsc_env
from tests.vcard import Ntag215, Ntag424Dna

READER = r"Virtual PCD 00 00"
GOLD_UID = "04A1B2C3D4E5F6"
MEMBER_DATA = b"SG1|880000000013|gold"

# Generous on a shared, noisy machine: pcscd polls vpcd every 400 ms.
EVENT_TIMEOUT = 15.0
QUIET = 2.5  # how long "nothing more happens" is watched


# -- fixtures ---------------------------------------------------------------
@pytest.fixture
def pcscd(tmp_path):
    try:
        daemon = pcsc_env.PcscDaemon(tmp_path / "pcscd")
    except RuntimeError as missing:
        pytest.fail(f"PC/SC test stack unavailable: {missing}", pytrace=False)
    daemon.start()
    yield daemon
    daemon.stop()


@pytest.fixture
def cards():
    """Virtual cards made by a test, taken off the reader at the end."""
    made = []
    yield made
    for card in made:
        card.remove()


class Events:
    """Collects what reads() yields, so tests can wait for it and also check that nothing more came."""

    def __init__(self, reader: PcscReader) -> None:
        self.items: list = []
        self._task = asyncio.create_task(self._collect(reader))

    async def _collect(self, reader):
        async for event in reader.reads():
            self.items.append(event)

    async def wait_for(self, count: int, timeout: float = EVENT_TIMEOUT):
        await until(lambda: len(self.items) >= count, timeout, f"{count} card event(s), got {self.items}")
        return self.items[count - 1]

    async def quiet(self, count: int, seconds: float = QUIET) -> None:
        await asyncio.sleep(seconds)
        assert len(self.items) == count, f"expected {count} event(s), got {self.items}"

    def stop(self):
        self._task.cancel()


async def until(predicate, timeout: float = EVENT_TIMEOUT, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.05)


async def open_reader(**kw) -> tuple[PcscReader, Events]:
    reader = PcscReader("1", READER, **kw)
    await reader.open()
    return reader, Events(reader)


# -- taps -----------------------------------------------------------------------
async def test_tap_yields_one_read_with_the_uid(pcscd, cards):
    reader, events = await open_reader()
    try:
        assert reader.state == "ready" and reader.reader_name == pcsc_env.READER_NAME
        before = time.time()
        cards.append(Ntag215(pcscd.port, GOLD_UID).insert())
        read = await events.wait_for(1)
        assert isinstance(read, CardRead) and isinstance(read, NfcRead)
        assert (read.lane, read.source, read.raw) == ("1", "nfc", GOLD_UID)
        assert before - 1 <= read.at <= time.time()
        assert read.data is None and read.sun is None
        assert GOLD_UID not in repr(read)  # personal data stays out of logs
        # Held on the reader: still one tap.
        await events.quiet(1)
    finally:
        await reader.close()
    assert reader.state == "closed"


async def test_remove_and_present_again_is_a_second_tap(pcscd, cards):
    reader, events = await open_reader()
    card = Ntag215(pcscd.port, GOLD_UID)
    cards.append(card)
    try:
        card.insert()
        await events.wait_for(1)
        card.remove()
        await asyncio.to_thread(pcsc_env.wait_for_no_card)  # pcscd has seen it leave (it polls every 400 ms)
        card.insert()
        second = await events.wait_for(2)
        assert second.raw == GOLD_UID
        await events.quiet(2)
    finally:
        await reader.close()


async def test_another_card_right_after_is_a_second_tap(pcscd, cards):
    reader, events = await open_reader()
    card = Ntag215(pcscd.port, GOLD_UID)
    cards.append(card)
    try:
        card.insert()
        await events.wait_for(1)
        other = Ntag215(pcscd.port, "04112233445566")
        cards.append(other)
        card.remove()
        other.insert()  # at once, no pause for pcscd's polling
        second = await events.wait_for(2)
        assert second.raw == "04112233445566"
    finally:
        await reader.close()


async def test_card_on_the_reader_before_start_is_not_a_tap(pcscd, cards):
    card = Ntag215(pcscd.port, GOLD_UID).insert()
    cards.append(card)
    await until(lambda: card.activations >= 1, what="pcscd to power the card")
    reader, events = await open_reader()
    try:
        assert reader.state == "ready"
        await events.quiet(0)
        card.remove()
        await asyncio.to_thread(pcsc_env.wait_for_no_card)
        card.insert()
        assert (await events.wait_for(1)).raw == GOLD_UID
    finally:
        await reader.close()


@pytest.mark.parametrize("pulled_at", ["uid", "pages"])
async def test_card_pulled_away_mid_read_is_tap_again(pcscd, cards, pulled_at):
    reader, events = await open_reader(read_pages=(4, 11))
    card = Ntag215(pcscd.port, GOLD_UID, user_data=MEMBER_DATA)
    cards.append(card)
    first_byte = {"uid": 0xCA, "pages": 0xB0}[pulled_at]
    card.pull_away_on = lambda apdu: apdu[1] == first_byte
    try:
        card.insert()
        event = await events.wait_for(1)
        assert isinstance(event, TapAgain), event
        assert event.lane == "1" and event.reason == "removed" and event.pattern.value == "tap_again"
        # Presented again, whole: a normal read.
        card.pull_away_on = None
        await until(lambda: not card.present, what="the card to leave")
        await asyncio.to_thread(pcsc_env.wait_for_no_card)
        card.insert()
        read = await events.wait_for(2)
        assert isinstance(read, NfcRead) and read.data[:len(MEMBER_DATA)] == MEMBER_DATA
    finally:
        await reader.close()


async def test_ntag215_pages(pcscd, cards):
    reader, events = await open_reader(read_pages=(4, 9))  # 6 pages: one read of 4 and one of 2
    try:
        cards.append(Ntag215(pcscd.port, GOLD_UID, user_data=MEMBER_DATA).insert())
        read = await events.wait_for(1)
        assert read.raw == GOLD_UID
        assert read.data == MEMBER_DATA + bytes(24 - len(MEMBER_DATA))
        assert MEMBER_DATA.decode() not in repr(read)
    finally:
        await reader.close()


async def test_pages_the_card_does_not_have_give_a_read_without_data(pcscd, cards):
    reader, events = await open_reader(read_pages=(200, 203))  # past the 135 pages of an NTAG215
    try:
        cards.append(Ntag215(pcscd.port, GOLD_UID).insert())
        read = await events.wait_for(1)
        assert isinstance(read, NfcRead) and read.raw == GOLD_UID and read.data is None
    finally:
        await reader.close()


# -- recovery -----------------------------------------------------------------------
async def test_pcscd_restart_reader_recovers(pcscd, cards):
    reader, events = await open_reader()
    card = Ntag215(pcscd.port, GOLD_UID)
    cards.append(card)
    try:
        card.insert()
        await events.wait_for(1)
        pcscd.kill()
        await until(lambda: reader.state == "absent", what="state absent after pcscd died")
        await until(lambda: not card.present, what="the card's connection to die with pcscd")
        await asyncio.sleep(1.0)  # a few retries while pcscd is away: no busy loop, no crash
        assert reader.state == "absent"
        pcscd.start()
        await until(lambda: reader.state == "ready", what="state ready after pcscd came back")
        card.insert()
        assert (await events.wait_for(2)).raw == GOLD_UID
        await events.quiet(2)
    finally:
        await reader.close()


async def test_reader_started_before_pcscd(tmp_path, cards):
    try:
        daemon = pcsc_env.PcscDaemon(tmp_path / "pcscd")
    except RuntimeError as missing:
        pytest.fail(f"PC/SC test stack unavailable: {missing}", pytrace=False)
    reader, events = await open_reader()
    try:
        assert reader.state == "absent"
        daemon.start()
        await until(lambda: reader.state == "ready", what="the reader to appear")
        cards.append(Ntag215(daemon.port, GOLD_UID).insert())
        assert (await events.wait_for(1)).raw == GOLD_UID
    finally:
        await reader.close()
        daemon.stop()


async def test_no_matching_reader_is_absent(pcscd):
    reader = PcscReader("1", "ACR122U")
    await reader.open()
    try:
        assert reader.state == "absent"
    finally:
        await reader.close()
    assert reader.state == "closed"


async def test_close_ends_reads_promptly(pcscd):
    reader, events = await open_reader()
    started = time.monotonic()
    await reader.close()
    assert time.monotonic() - started < 3  # SCardCancel wakes the waiting thread
    await asyncio.wait_for(events._task, 2)  # reads() ended


# -- NTAG 424 DNA through the reader -------------------------------------------------
KEY_META = bytes.fromhex("2B7E151628AED2A6ABF7158809CF4F3C")
KEY_FILE = bytes.fromhex("000102030405060708090A0B0C0D0E0F")
DNA_UID = "04DE5F1EACC040"


async def test_ntag424_sun_taps(pcscd, cards, tmp_path):
    verifier = SunVerifier(SdmKeys(KEY_META, KEY_FILE), tmp_path / "sun.sqlite")
    reader, events = await open_reader(sun_verifier=verifier)
    card = Ntag424Dna(pcscd.port, DNA_UID, meta_read_key=KEY_META, file_read_key=KEY_FILE, counter=41)
    cards.append(card)
    try:
        for n, expected_counter in ((1, 42), (2, 43)):
            card.insert()
            read = await events.wait_for(n)
            assert (read.raw, read.sun, read.counter) == (DNA_UID, "ok", expected_counter)
            card.remove()
            await asyncio.to_thread(pcsc_env.wait_for_no_card)
        assert verifier.counters.last(bytes.fromhex(DNA_UID)) == 43

        # A clone that recorded the last message and plays it back.
        clone = Ntag424Dna(pcscd.port, DNA_UID)
        clone.replay_url = card.last_url
        cards.append(clone)
        clone.insert()
        read = await events.wait_for(3)
        assert read.sun == "replayed" and read.counter is None
        clone.remove()
        await asyncio.to_thread(pcsc_env.wait_for_no_card)

        # A card of another programme (other keys).
        stranger = Ntag424Dna(pcscd.port, "04AABBCCDDEE80", meta_read_key=KEY_META, file_read_key=bytes(16))
        cards.append(stranger)
        stranger.insert()
        assert (await events.wait_for(4)).sun == "bad_mac"
        stranger.remove()
        await asyncio.to_thread(pcsc_env.wait_for_no_card)

        # An NTAG215 has no NDEF application to select.
        cards.append(Ntag215(pcscd.port, GOLD_UID).insert())
        read = await events.wait_for(5)
        assert (read.raw, read.sun) == (GOLD_UID, "missing")
    finally:
        await reader.close()
        verifier.counters.close()


# -- SUN verification (NXP AN12196 vectors) --------------------------------------------
ZERO = bytes(16)
AN12196_PICC_ONLY = "https://choose.url.com/ntag424?picc_data=EF963FF7828658A599F3041510671E88&cmac=94EED9EE65337086"
AN12196_WITH_FILE = ("https://www.my424dna.com/?picc_data=FD91EC264309878BE6345CBE53BADF40"
                     "&enc=CEE9A53E3E463EF1F459635736738962&cmac=ECC1E7F6C6C73BF6")
AN12196_PLAIN = "https://choose.url.com/ntag424?uid=041E3C8A2D6B80&ctr=000006&cmac=4B00064004B0B3D3"


@pytest.fixture
def verifier(tmp_path):
    v = SunVerifier(SdmKeys(ZERO, ZERO), tmp_path / "sun.sqlite")
    yield v
    v.counters.close()


def test_an12196_encrypted_picc_data(verifier):
    message = verifier.verify(AN12196_PICC_ONLY)
    assert (message.uid_hex, message.counter, message.file_data) == ("04DE5F1EACC040", 61, None)
    assert "04DE5F1EACC040" not in repr(message)


def test_an12196_short_parameter_names_and_query_string(verifier):
    message = verifier.verify("e=EF963FF7828658A599F3041510671E88&c=94EED9EE65337086")
    assert (message.uid_hex, message.counter) == ("04DE5F1EACC040", 61)


def test_an12196_with_encrypted_file_data(verifier):
    message = verifier.verify(AN12196_WITH_FILE)
    assert (message.uid_hex, message.counter, message.file_data) == ("04958CAA5C5E80", 8, b"x" * 16)


def test_an12196_plain_mirror(verifier):
    message = verifier.verify(AN12196_PLAIN)
    assert (message.uid_hex, message.counter) == ("041E3C8A2D6B80", 6)


def test_an12196_intermediate_values():
    from cards.ntag424 import decrypt_picc_data, session_mac_key, sun_mac

    tag, uid, counter = decrypt_picc_data(ZERO, bytes.fromhex("EF963FF7828658A599F3041510671E88"))
    assert (tag, uid.hex().upper(), counter) == (0xC7, "04DE5F1EACC040", 61)
    session = session_mac_key(ZERO, uid, counter)
    assert session.hex().upper() == "3FB5F6E3A807A03D5E3570ACE393776F"
    assert sun_mac(session).hex().upper() == "94EED9EE65337086"


def test_replay_refused_and_remembered_across_restarts(tmp_path):
    path = tmp_path / "sun.sqlite"
    first = SunVerifier(SdmKeys(ZERO, ZERO), path)
    first.verify(AN12196_PICC_ONLY)
    with pytest.raises(SunError) as replay:
        first.verify(AN12196_PICC_ONLY)
    assert replay.value.reason == "replayed"
    first.counters.close()
    # A gateway restart keeps the counter.
    second = SunVerifier(SdmKeys(ZERO, ZERO), path)
    with pytest.raises(SunError) as again:
        second.verify(AN12196_PICC_ONLY)
    assert again.value.reason == "replayed"
    assert second.counters.last(bytes.fromhex("04DE5F1EACC040")) == 61
    second.counters.close()


def test_older_counter_refused(tmp_path):
    store = CounterStore(tmp_path / "sun.sqlite")
    uid = bytes.fromhex("04DE5F1EACC040")
    assert store.advance(uid, 62)
    verifier = SunVerifier(SdmKeys(ZERO, ZERO), store)
    with pytest.raises(SunError, match="replayed"):
        verifier.verify(AN12196_PICC_ONLY)  # counter 61 < 62
    assert store.last(uid) == 62
    store.close()


def test_bad_mac_refused_and_counter_untouched(verifier):
    with pytest.raises(SunError) as refused:
        verifier.verify(AN12196_PICC_ONLY.replace("cmac=94EED9EE65337086", "cmac=94EED9EE65337087"))
    assert refused.value.reason == "bad_mac"
    # A forged message must not burn the genuine card's counter.
    assert verifier.counters.last(bytes.fromhex("04DE5F1EACC040")) is None
    assert verifier.verify(AN12196_PICC_ONLY).counter == 61


def test_wrong_key_is_bad_mac(tmp_path):
    v = SunVerifier(SdmKeys(ZERO, KEY_FILE), tmp_path / "sun.sqlite")
    with pytest.raises(SunError, match="bad_mac"):
        v.verify(AN12196_PICC_ONLY)
    v.counters.close()


@pytest.mark.parametrize("tampered", [
    AN12196_PICC_ONLY.replace("EF963FF7", "EF963FF6"),                         # PICCData
    AN12196_WITH_FILE.replace("CEE9A53E", "CEE9A53F"),                         # encrypted file data
    AN12196_PLAIN.replace("ctr=000006", "ctr=000007"),                         # plain counter
    AN12196_PLAIN.replace("uid=041E3C8A2D6B80", "uid=041E3C8A2D6B81"),         # plain UID
])
def test_tampered_data_refused(verifier, tampered):
    with pytest.raises(SunError) as refused:
        verifier.verify(tampered)
    assert refused.value.reason == "bad_mac"


@pytest.mark.parametrize("message", [
    "https://choose.url.com/ntag424?picc_data=EF963FF7828658A599F3041510671E88",   # no cmac
    "https://choose.url.com/ntag424?cmac=94EED9EE65337086",                         # no picc_data
    "picc_data=EF963FF7828658A599F3041510671E&cmac=94EED9EE65337086",                # 15.5 bytes
    "picc_data=EF963FF7828658A599F3041510671E88&cmac=94EED9EE6533708",               # short cmac
    "picc_data=ZZ963FF7828658A599F3041510671E88&cmac=94EED9EE65337086",              # not hex
    AN12196_PICC_ONLY + "&cmac=0000000000000000",                                    # cmac twice
    "",
])
def test_malformed_refused(verifier, message):
    with pytest.raises(SunError) as refused:
        verifier.verify(message)
    assert refused.value.reason == "bad_format"


def test_diversified_file_key_and_keys_kept_out_of_repr(tmp_path):
    asked = []

    def file_key_for(uid: bytes) -> bytes:
        asked.append(uid)
        return ZERO  # a real deployment derives it from a programme master key and the UID

    keys = SdmKeys(ZERO, file_key_for)
    v = SunVerifier(keys, tmp_path / "sun.sqlite")
    assert v.verify(AN12196_PICC_ONLY).counter == 61
    assert asked == [bytes.fromhex("04DE5F1EACC040")]
    assert "00000000" not in repr(keys) and "00000000" not in repr(v)
    with pytest.raises(ValueError):
        SdmKeys(b"short", ZERO)
    v.counters.close()


def test_ndef_uri_parsing():
    payload = b"\x04" + b"member.example.com/t?e=00"
    record = bytes([0xD1, 0x01, len(payload)]) + b"U" + payload
    assert ndef_uri(record) == "https://member.example.com/t?e=00"
    text = bytes([0x91, 0x01, 3]) + b"T" + b"\x02en"  # a text record first, then the URI
    assert ndef_uri(text + bytes([0x51, 0x01, len(payload)]) + b"U" + payload) == "https://member.example.com/t?e=00"
    assert ndef_uri(record[:-3]) is None
    assert ndef_uri(b"") is None


# -- the gateway with a PC/SC lane ----------------------------------------------
async def test_gateway_lane_on_a_pcsc_reader(pcscd, cards, tmp_path, broker):
    """pyscard -> pcscd -> vpcd -> virtual card, into the gateway: verdict,
    indicator and the lane's POS events; a card pulled away mid-read is "tap again"."""
    from gateway.shell import config as gw_config
    from gateway.shell.service import Gateway
    from tests.support import install_rules

    cfg = gw_config.check({
        "store": {"id": "S001", "data_dir": str(tmp_path / "store")},
        "mqtt": {"host": "127.0.0.1", "port": broker.port},
        "lanes": [{"id": "1", "reader": "pcsc", "pcsc_reader": READER}],
    })
    async with Gateway(cfg) as gw:
        install_rules(gw)  # issued now: rules older than max_age_s would be rules_stale
        taps: asyncio.Queue = asyncio.Queue()
        gw.lanes["1"].listeners.add(taps)
        await until(lambda: gw.lanes["1"].reader.state == "ready", what="the reader")

        card = Ntag215(pcscd.port, GOLD_UID)
        cards.append(card)
        card.insert()
        tap = await asyncio.wait_for(taps.get(), EVENT_TIMEOUT)
        assert (tap["verdict"], tap["member"]["member_id"], tap["source"]) == ("accept", "M1001", "nfc")
        assert gw.lanes["1"].indicator.history[-1].value == "accept"

        card.remove()
        await until(lambda: not card.present, what="the card to leave")
        await asyncio.to_thread(pcsc_env.wait_for_no_card)
        card.pull_away_on = lambda apdu: apdu[1] == 0xCA     # pulled away during the UID read
        card.insert()
        tap = await asyncio.wait_for(taps.get(), EVENT_TIMEOUT)
        assert (tap["verdict"], tap["reason"], tap["pattern"]) == ("retry", "tap_again", "tap_again")
        assert "重新" in tap["text"]["zh-CN"]
        assert (await gw.status())["lanes"]["1"]["reader"] == "pcsc"
