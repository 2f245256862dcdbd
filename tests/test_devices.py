"""`storegate devices`: PC/SC readers through the real pcscd + vpcd stack, input
devices (none on this machine: no /dev/input), and config lines that really
select what they name."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib

import pytest
from evdev import ecodes as e

from gateway.shell import config as gw_config
from gateway.shell.devices import describe_input, regex_literal, toml_string
from hardware.nfc import PcscReader
from tests import pcsc_env
from tests.test_nfc import pcscd  # noqa: F401 (fixture)


def storegate(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gateway.shell.cli", "devices", *args], capture_output=True,
                          text=True, timeout=60, env={**os.environ, **(env or {})})


def test_pcscd_absent_is_a_clear_message_not_a_traceback(tmp_path):
    out = storegate(env={"PCSCLITE_CSOCK_NAME": str(tmp_path / "nothing" / "pcscd.comm")})
    assert out.returncode == 0, out.stderr
    assert "pcscd is not running" in out.stdout
    assert "Traceback" not in out.stdout + out.stderr
    found = json.loads(storegate("--json", env={"PCSCLITE_CSOCK_NAME": str(tmp_path / "x")}).stdout)
    assert found["pcsc"]["available"] is False and "pcscd is not running" in found["pcsc"]["error"]


async def test_lists_pcsc_readers_with_lines_that_select_them(pcscd, tmp_path):  # noqa: F811
    out = storegate("--input-dir", str(tmp_path / "no-input"))
    assert out.returncode == 0, out.stderr
    assert pcsc_env.READER_NAME in out.stdout
    found = json.loads(storegate("--json", "--input-dir", str(tmp_path / "no-input")).stdout)
    readers = found["pcsc"]["readers"]
    names = [r["name"] for r in readers]
    assert names == ["Virtual PCD 00 00", "Virtual PCD 00 01"]  # vpcd's two slots
    for r in readers:
        assert r["config"] in out.stdout
        # Two readers alike: only the full name tells them apart.
        pattern = tomllib.loads(r["config"])["pcsc_reader"]
        assert pattern == f"^{r['name']}$"
        # The line really selects that reader, through pcscd.
        reader = PcscReader("1", pattern)
        await reader.open()
        try:
            assert reader.state == "ready" and reader.reader_name == r["name"]
        finally:
            await reader.close()


def test_no_input_devices(tmp_path):
    (tmp_path / "input" / "by-id").mkdir(parents=True)
    out = storegate("--input-dir", str(tmp_path / "input"))
    assert out.returncode == 0 and "Traceback" not in out.stderr
    assert "Input devices" in out.stdout and "  none" in out.stdout
    gone = json.loads(storegate("--json", "--input-dir", str(tmp_path / "absent")).stdout)["input"]
    assert gone["devices"] == [] and "does not exist" in gone["error"]


WEDGE_KEYS = {e.KEY_ENTER, e.KEY_LEFTSHIFT, *(getattr(e, f"KEY_{d}") for d in range(10)),
              *(getattr(e, f"KEY_{c}") for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZ")}


def hid_table(config: str) -> dict:
    return tomllib.loads(config.replace("[[lanes.hid]]", "[[hid]]"))["hid"][0]


def test_scanner_with_a_by_id_link_is_selected_by_it():
    link = "/dev/input/by-id/usb-Honeywell_Imaging___Mobility_1900_21012B4C95-event-kbd"
    d = describe_input("/dev/input/event3", "Honeywell Imaging & Mobility 1900", 0x0C2E, 0x0B61, WEDGE_KEYS,
                       ["/dev/input/by-id/usb-Honeywell_Imaging___Mobility_1900_21012B4C95-if01-event-mouse", link])
    assert d["keyboard_wedge"] and d["kind"] == "scanner" and d["usb"] == "0c2e:0b61"
    assert hid_table(d["config"]) == {"kind": "scanner", "device": link}  # the keyboard interface
    # The lines drop into a lane as they are and pass the gateway's config check.
    lane = {"id": "1", "reader": "terminal", "hid": [hid_table(d["config"])]}
    gw_config.check({"store": {"id": "S001"}, "mqtt": {"host": "h"}, "lanes": [lane]})


def test_magstripe_without_by_id_is_selected_by_usb_ids():
    d = describe_input("/dev/input/event5", "Mag-Tek USB Swipe Reader", 0x0801, 0x0001, WEDGE_KEYS, [])
    assert hid_table(d["config"]) == {"kind": "magstripe", "usb": "0801:0001"}


def test_unknown_wedge_by_name_and_kind_left_to_the_operator():
    d = describe_input("/dev/input/event7", 'Generic "HID" Keyboard', 0, 0, WEDGE_KEYS, [])
    assert d["kind"] is None
    table = hid_table(d["config"])
    assert table["name"] == 'Generic "HID" Keyboard' and "which is it" in d["config"]


def test_a_mouse_is_not_a_keyboard_wedge():
    d = describe_input("/dev/input/event1", "USB Optical Mouse", 0x046D, 0xC077, {e.BTN_LEFT, e.BTN_RIGHT}, [])
    assert not d["keyboard_wedge"] and d["config"] is None


@pytest.mark.parametrize("name", ["ACS ACR122U PICC Interface", "Reader (1) [x]", 'a\\b "c"'])
def test_escaping(name):
    import re

    pattern = tomllib.loads(f"p = {toml_string('^' + regex_literal(name))}")["p"]
    assert re.search(pattern, name + " 00 00") and not re.search(pattern, "x" + name)
