"""deploy/ hardware files: the udev rule and the modprobe blacklist are well
formed and agree with the code (this machine has no udevd; `udevadm verify`
needs systemd >= 254, Debian 12 has 252, so the rules are checked here)."""

from __future__ import annotations

import re
from pathlib import Path

from gateway.shell.devices import KNOWN_VENDORS

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "deploy" / "udev" / "99-storegate.rules"
BLACKLIST = ROOT / "deploy" / "modprobe.d" / "storegate-blacklist.conf"
GUIDE = ROOT / "deploy" / "HARDWARE.md"

# KEY{attr}op"value" as udev(7) writes them
_PAIR = re.compile(r'^\s*([A-Z_]+)(\{[^}]+\})?\s*(==|!=|\+=|-=|:=|=)\s*"([^"]*)"\s*$')
_MATCH_KEYS = {"ACTION", "SUBSYSTEM", "KERNEL", "ATTRS", "ENV"}
_ASSIGN_KEYS = {"ENV", "GROUP", "MODE", "SYMLINK", "GOTO", "LABEL"}


def rule_lines():
    for line in RULES.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            yield line


def test_udev_rules_are_well_formed():
    labels, gotos = set(), set()
    for line in rule_lines():
        pairs = [p.strip() for p in re.split(r',(?=(?:[^"]*"[^"]*")*[^"]*$)', line)]
        for pair in pairs:
            m = _PAIR.match(pair)
            assert m, f"not a udev key/value pair: {pair!r} in {line!r}"
            key, attr, op, value = m.groups()
            if op in ("==", "!="):
                assert key in _MATCH_KEYS, line
            else:
                assert key in _ASSIGN_KEYS, line
            if key == "LABEL":
                labels.add(value)
            if key == "GOTO":
                gotos.add(value)
            if key == "MODE":
                assert value == "0660"  # group storegate, nobody else
            if key == "GROUP":
                assert value == "storegate"
    assert gotos and gotos <= labels


def test_udev_vendors_are_those_storegate_devices_knows():
    in_rules = {int(v, 16): kind for v, kind in
                re.findall(r'ATTRS\{idVendor\}=="([0-9a-f]{4})", ENV\{STOREGATE_KIND\}="(\w+)"', RULES.read_text())}
    assert in_rules == {v: kind for v, (kind, _maker) in KNOWN_VENDORS.items()}


def test_blacklist_keeps_the_kernel_nfc_stack_off_the_acr122u():
    lines = [l.split() for l in BLACKLIST.read_text().splitlines() if l.strip() and not l.startswith("#")]
    assert lines == [["blacklist", "pn533_usb"], ["blacklist", "pn533"], ["blacklist", "nfc"]]


def test_guide_names_the_default_pins_and_files():
    from hardware.indicators import DEFAULT_PINS

    guide = GUIDE.read_text()
    header = {17: 11, 27: 13, 22: 15, 23: 16}  # BCM -> physical pin on the 40-pin header
    for name, bcm in DEFAULT_PINS.items():
        assert re.search(rf"\| GPIO {bcm} \| {header[bcm]} \|", guide), name
    for needed in ("330 Ω", "2N2222", "1 kΩ", "flyback", "99-storegate.rules", "storegate-blacklist.conf",
                   "ACR122U", "ACR1252U", "Key handling", "0600"):
        assert needed in guide, needed
