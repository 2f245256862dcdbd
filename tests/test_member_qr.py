"""Dynamic member QR codes: verification with public keys only
(cards/member_qr.py), each (member, step) accepted once across restarts
(gateway/store/qr_replay.py), and a scanner lane end to end."""

import asyncio
import base64
import logging
import struct
import time
import tomllib

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gateway.shell.member_qr import MemberQrCheck, policy_of
from gateway.store.qr_replay import ReplayStore
from cards.member_qr import Issuer, MemberApp, QrError, verify

NOW = 1_790_000_000          # 2026-09-21
CARD = "880000000013"        # M1001 in the demo rules, gold
HQ = Issuer("hq-2026", Ed25519PrivateKey.from_private_bytes(bytes(range(32))))
KEYS = {"hq-2026": HQ.public_key_b64}


@pytest.fixture(scope="module")
def app():
    return MemberApp.enrol(HQ, "M1001", CARD, NOW - 86400, NOW + 86400 * 30)


def refused(code, keys=KEYS, now=NOW, **kw) -> str:
    with pytest.raises(QrError) as err:
        verify(code, keys, now, **kw)
    assert CARD not in str(err.value)
    return err.value.reason


def test_a_code_identifies_the_member_within_one_step(app):
    code = app.code(NOW)
    assert code.startswith("SGQ1.") and len(code) <= 280
    who = verify(code, KEYS, NOW)
    assert (who.card_no, who.member_id, who.step, who.key_id) == (CARD, "M1001", NOW // 30, "hq-2026")
    assert verify(code, KEYS, NOW + 30).step == NOW // 30          # one step later: still fine
    assert verify(code, KEYS, NOW - 30).step == NOW // 30          # the phone's clock a little ahead
    assert CARD not in repr(who)


def test_code_characters_are_typeable_by_a_keyboard_wedge(app):
    from hardware.hid import WedgeDecoder, key_events

    code = app.code(NOW)
    assert [f.text for f in WedgeDecoder().feed_all(key_events(code))] == [code]


@pytest.mark.parametrize("now, window, reason", [
    (NOW + 60, 1, "step_out_of_window"),    # two steps old: a stale screenshot
    (NOW - 60, 1, "step_out_of_window"),    # two steps ahead
    (NOW + 30, 0, "step_out_of_window"),
    (NOW + 86400 * 31, 10**6, "credential_expired"),
    (NOW - 86400 * 2, 10**6, "credential_expired"),      # not valid yet
])
def test_time_limits(app, now, window, reason):
    assert refused(app.code(NOW), now=now, window_steps=window) == reason


def test_the_step_comes_from_the_signed_code_not_the_scanner(app):
    assert refused(app.code(NOW, step=NOW // 30 + 5)) == "step_out_of_window"
    assert verify(app.code(0, step=NOW // 30 + 1), KEYS, NOW).step == NOW // 30 + 1


def _with_app_signature_flipped(code: str) -> str:
    """The same code with one bit of the app's signature flipped: always a forgery.
    (Overwriting the last characters is not: an Ed25519 signature's last byte is
    small, so its base64 tail is often "AAA" already.)"""
    blob = bytearray(base64.urlsafe_b64decode(code[5:] + "=" * (-len(code[5:]) % 4)))
    blob[len(blob) - 40] ^= 0x01
    return "SGQ1." + base64.urlsafe_b64encode(bytes(blob)).rstrip(b"=").decode()


def test_forgeries_are_refused(app):
    code = app.code(NOW)
    blob = bytearray(base64.urlsafe_b64decode(code[5:] + "=" * (-len(code[5:]) % 4)))
    enc = lambda b: "SGQ1." + base64.urlsafe_b64encode(bytes(b)).rstrip(b"=").decode()

    other_card = bytes(blob).replace(CARD.encode(), b"880000000021")     # someone else's card number
    assert refused(enc(other_card)) == "bad_signature"
    later = bytearray(blob)
    later[len(blob) - 68:len(blob) - 64] = struct.pack(">I", NOW // 30 + 1)   # move the step
    assert refused(enc(later)) == "bad_signature"

    rogue_hq = Issuer("hq-2026")                                          # right key id, wrong key
    assert refused(MemberApp.enrol(rogue_hq, "M1001", CARD, 0, NOW * 2).code(NOW)) == "bad_signature"
    # The gateway's rules hold only public keys: a thief of the app credential
    # without the app's private key cannot sign a step.
    thief = MemberApp(app.credential, Ed25519PrivateKey.generate())
    assert refused(thief.code(NOW)) == "bad_signature"
    assert refused(_with_app_signature_flipped(code)) == "bad_signature"
    assert refused(MemberApp.enrol(Issuer("hq-2099"), "M1001", CARD, 0, NOW * 2).code(NOW)) == "unknown_issuer"
    assert refused(code, keys={"hq-2026": "not base64!"}) == "unknown_issuer"


@pytest.mark.parametrize("payload", [
    "", "880000000013", "SGQ1.", "SGQ1.!!!!", "SGQ2.AAAA", "SGQ1." + "A" * 700, "SGQ1.AQ",
])
def test_bad_format(payload):
    assert refused(payload) == "bad_format"


def test_cut_short_or_padded_codes_are_bad_format(app):
    code = app.code(NOW)
    assert refused(code[:-10]) == "bad_format"
    assert refused(code + "AAAA") == "bad_format"


# -- replay store and the gateway's check -----------------------------------------
class PolicyOnly:
    """A rule set reduced to the one section MemberQrCheck reads (validate.Rules.data)."""

    def __init__(self, qr_section=None):
        self.data = {} if qr_section is None else {"member_qr": qr_section}


def test_each_member_step_is_accepted_once_also_after_a_restart(tmp_path, app):
    path = tmp_path / "qr_replay.sqlite3"
    check = MemberQrCheck(ReplayStore(path))
    rules = PolicyOnly({"issuer_public_keys": KEYS})
    code = app.code(NOW)
    assert check.identify(code, rules, NOW) == (CARD, None)
    assert check.identify(code, rules, NOW + 5) == (None, "qr_used")        # a screenshot of the same code
    assert check.identify(app.code(NOW + 30), rules, NOW + 30) == (CARD, None)   # the next step is fine
    check.close()
    check = MemberQrCheck(ReplayStore(path))                                 # the gateway restarted
    assert check.identify(code, rules, NOW + 10) == (None, "qr_used")
    assert check.identify(app.code(NOW + 30), rules, NOW + 31) == (None, "qr_used")
    check.close()


def test_refused_codes_change_nothing_and_old_steps_are_pruned(tmp_path, app):
    store = ReplayStore(tmp_path / "r.sqlite3")
    check = MemberQrCheck(store)
    rules = PolicyOnly({"issuer_public_keys": KEYS})
    assert check.identify(app.code(NOW), rules, NOW + 90)[1] == "qr_step_out_of_window"
    assert check.identify("SGQ1.garbage", rules, NOW)[1] == "qr_bad_format"
    assert len(store) == 0
    assert check.identify(app.code(NOW), rules, NOW)[0] == CARD
    assert store.prune(NOW + 30) == 0 and len(store) == 1        # may still verify: kept
    assert store.prune(NOW + 91) == 1 and len(store) == 0        # can no longer verify: gone
    store.close()


def test_policy_from_the_rules(tmp_path, app):
    check = MemberQrCheck(ReplayStore(tmp_path / "r.sqlite3"))
    assert policy_of(PolicyOnly()) == {"issuer_public_keys": {}, "step_s": 30, "window_steps": 1, "static_codes": True}
    assert check.identify(CARD, PolicyOnly(), NOW) == (CARD, None)                    # static codes by default
    assert check.identify(CARD, PolicyOnly({"static_codes": False}), NOW) == (None, "qr_static_refused")
    assert check.identify(app.code(NOW), PolicyOnly(), NOW) == (None, "qr_not_configured")
    assert check.identify(app.code(NOW), None, NOW) == (app.code(NOW), None)      # engine says no_rules
    wide = PolicyOnly({"issuer_public_keys": KEYS, "step_s": 60, "window_steps": 2})
    assert check.identify(app.code(NOW, 60), wide, NOW + 120)[0] == CARD
    check.close()


def test_minting_checks_its_input():
    key = Ed25519PrivateKey.generate().public_key()
    for bad in (("M1", "88A0000013", key, 0, 1), ("M1", "123", key, 0, 1), ("", CARD, key, 0, 1),
                ("M1", CARD, key, 5, 1)):
        with pytest.raises(ValueError):
            HQ.issue(*bad)
    with pytest.raises(ValueError):
        Issuer("")


# -- a scanner lane end to end ---------------------------------------------------------
async def test_gateway_scanner_lane_dynamic_codes_and_replay_across_restart(tmp_path, broker, caplog):
    from gateway.shell import config as gw_config
    from gateway.shell.service import Gateway
    from hardware.hid import DeviceGone, SimulatedInputDevice
    from tests.support import RULES_FILE, install_rules

    caplog.set_level(logging.DEBUG)
    cfg = gw_config.check({
        "store": {"id": "S001", "data_dir": str(tmp_path / "store")},
        "mqtt": {"host": "127.0.0.1", "port": broker.port},
        "lanes": [{"id": "1", "reader": "simulated", "hid": [{"kind": "scanner", "usb": "0c2e:0b61"}]}],
    })
    # The demo rule set with its member_qr section (wire/RULESET.md), signed as HQ does.
    now = int(time.time())
    doc = tomllib.loads(RULES_FILE.read_text(encoding="utf-8"))
    doc["member_qr"] = {"issuer_public_keys": KEYS, "step_s": 30, "window_steps": 1, "static_codes": True}
    app = MemberApp.enrol(HQ, "M1001", CARD, now - 86400, now + 86400)
    code = app.code(now)

    async def run_once(scans: list[str]) -> list[dict]:
        device = SimulatedInputDevice("Honeywell scanner")
        gw = Gateway(cfg, clock=lambda: now + 3)
        scanner = gw.lanes["1"].inputs[0]

        def finder(selector):
            if device.closed:
                raise DeviceGone("absent", "closed")
            return device
        scanner.finder = finder
        taps: asyncio.Queue = asyncio.Queue()
        async with gw:
            if gw.rules.current is None:  # the second run comes up with the rules on disk
                install_rules(gw, [doc], now=now)
            gw.lanes["1"].listeners.add(taps)
            while scanner.state != "ready":
                await asyncio.sleep(0.01)
            out = []
            for scan in scans:
                device.type(scan)
                out.append(await asyncio.wait_for(taps.get(), 5))
        return out

    first, again, forged = await run_once([code, code, _with_app_signature_flipped(code)])
    assert (first["verdict"], first["member"]["member_id"], first["card"], first["source"]) == \
        ("accept", "M1001", "8800****0013", "qr")
    assert (again["verdict"], again["reason"]) == ("deny", "qr_used")
    assert again["text"] == {"zh-CN": "会员码已使用过，请刷新后重试",
                             "en": "This member code was already used; please refresh it and try again"}
    assert (forged["verdict"], forged["reason"]) == ("deny", "qr_bad_signature")

    (after_restart,) = await run_once([code])                  # a restart does not reopen the window
    assert (after_restart["verdict"], after_restart["reason"]) == ("deny", "qr_used")
    assert code not in caplog.text and CARD not in caplog.text
