"""`storegate devices`: the card readers this box can see, each with the
config line that would select it.

- PC/SC readers through pcscd (pyscard ``smartcard.System.readers()``):
  ``pcsc_reader = "..."`` (a regular expression, as hardware/nfc.py takes it).
- Input devices (evdev): magstripe readers and barcode/QR scanners in
  keyboard-wedge mode, as a ``[[lanes.hid]]`` table selecting them by their
  ``/dev/input/by-id`` path (stable across reboots and replugs), else by
  USB vendor:product, else by name.

Nothing here reads a card or a key press; only names and ids are shown.
"""

from __future__ import annotations

import glob
import os
import re

# USB vendors of common keyboard-wedge card readers and scanners (also in
# deploy/udev/99-storegate.rules). A guess for the config line only.
KNOWN_VENDORS = {
    0x0801: ("magstripe", "MagTek"),
    0x0ACD: ("magstripe", "ID TECH"),
    0x0C2E: ("scanner", "Honeywell / Metrologic"),
    0x0536: ("scanner", "Hand Held Products (Honeywell)"),
    0x05E0: ("scanner", "Zebra / Symbol"),
    0x05F9: ("scanner", "Datalogic"),
    0x080C: ("scanner", "Datalogic ADC"),
    0x065A: ("scanner", "Opticon"),
    0x1EAB: ("scanner", "Newland"),
}
_NAME_HINTS = (
    (re.compile(r"magstripe|magnetic|\bmsr\b|card ?reader|swipe", re.I), "magstripe"),
    (re.compile(r"scan|barcode|bar code|\bqr\b|imager|2d", re.I), "scanner"),
)
_SLOT_SUFFIX = re.compile(r" \d\d \d\d$")  # pcsc-lite appends "<reader no> <slot no>"
_REGEX_SPECIAL = re.compile(r"([.^$*+?{}\[\]\\|()])")


def toml_string(value: str) -> str:
    """A TOML basic string."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def regex_literal(text: str) -> str:
    """`text` as a regular expression matching it literally (spaces kept readable)."""
    return _REGEX_SPECIAL.sub(r"\\\1", text)


# -- PC/SC -------------------------------------------------------------------
def pcsc_readers() -> dict:
    """{"available", "error", "readers": [{"name", "pattern", "config"}]}."""
    try:
        from smartcard.System import readers as list_readers
        from smartcard.Exceptions import SmartcardException
        from smartcard.pcsc.PCSCExceptions import BaseSCardException
    except ImportError as exc:  # pyscard or libpcsclite missing
        return {"available": False, "readers": [],
                "error": f"pyscard cannot load ({exc}); install libpcsclite1 (apt) and the venv (make venv)"}
    try:
        names = [str(r) for r in list_readers()]
    except (BaseSCardException, SmartcardException) as exc:
        hresult = getattr(exc, "hresult", None)
        if hresult is not None and hresult & 0xFFFFFFFF == 0x8010001D:  # SCARD_E_NO_SERVICE
            why = "pcscd is not running (no PC/SC service); start it: sudo systemctl start pcscd.socket"
        else:
            why = f"PC/SC error: {exc}"
        return {"available": False, "readers": [], "error": why}
    except Exception as exc:  # never a traceback for an operator
        return {"available": False, "readers": [], "error": f"PC/SC error: {exc}"}
    stems = [_SLOT_SUFFIX.sub("", n) for n in names]
    out = []
    for name, stem in zip(names, stems):
        if stems.count(stem) == 1:
            # Without pcsc-lite's reader/slot numbers: they change with the order of plugging.
            pattern = "^" + regex_literal(stem)
        else:
            pattern = "^" + regex_literal(name) + "$"  # two alike: only the full name tells them apart
        out.append({"name": name, "pattern": pattern, "config": f"pcsc_reader = {toml_string(pattern)}"})
    return {"available": True, "readers": out, "error": None}


# -- evdev -----------------------------------------------------------------------
def guess_kind(name: str, vendor: int) -> str | None:
    if vendor in KNOWN_VENDORS:
        return KNOWN_VENDORS[vendor][0]
    for pattern, kind in _NAME_HINTS:
        if pattern.search(name):
            return kind
    return None


def describe_input(path: str, name: str, vendor: int, product: int, keys: set[int],
                   by_id: list[str]) -> dict:
    """One input device as listed, with its [[lanes.hid]] lines (pure: tested without devices)."""
    from evdev import ecodes as e

    digits = {getattr(e, f"KEY_{d}") for d in range(10)}
    wedge = e.KEY_ENTER in keys and digits <= keys
    kind = guess_kind(name, vendor)
    usb = f"{vendor:04x}:{product:04x}" if vendor else None
    if by_id:
        select = f"device = {toml_string(sorted(by_id, key=lambda p: ('-event-kbd' not in p, p))[0])}"
    elif usb:
        select = f"usb = {toml_string(usb)}"
    else:
        select = f"name = {toml_string(name)}"
    kind_line = f"kind = {toml_string(kind)}" if kind else 'kind = "scanner"   # or "magstripe": which is it?'
    return {"path": path, "by_id": by_id, "name": name, "usb": usb, "keyboard_wedge": wedge,
            "kind": kind, "vendor": KNOWN_VENDORS.get(vendor, (None, None))[1],
            "config": "\n".join(["[[lanes.hid]]", kind_line, select]) if wedge else None}


def _by_id_links(by_id_dir: str) -> dict[str, list[str]]:
    links: dict[str, list[str]] = {}
    for link in sorted(glob.glob(os.path.join(by_id_dir, "*"))):
        try:
            links.setdefault(os.path.realpath(link), []).append(link)
        except OSError:
            continue
    return links


def input_devices(input_dir: str = "/dev/input") -> dict:
    """{"available", "error", "devices": [...], "unreadable": [paths]}."""
    try:
        import evdev
    except ImportError as exc:
        return {"available": False, "devices": [], "unreadable": [], "error": f"python-evdev cannot load ({exc})"}
    if not os.path.isdir(input_dir):
        return {"available": True, "devices": [], "unreadable": [],
                "error": f"{input_dir} does not exist: no input devices on this machine"}
    links = _by_id_links(os.path.join(input_dir, "by-id"))
    openable = set(evdev.list_devices(input_dir))
    everything = set(glob.glob(os.path.join(input_dir, "event*"))) | openable
    devices, unreadable = [], []
    for path in sorted(everything, key=lambda p: (len(p), p)):
        try:
            dev = evdev.InputDevice(path)
        except PermissionError:
            unreadable.append(path)
            continue
        except OSError:
            continue  # unplugged in between
        try:
            keys = set(dev.capabilities().get(evdev.ecodes.EV_KEY, []))
            devices.append(describe_input(path, dev.name, dev.info.vendor, dev.info.product, keys,
                                          links.get(os.path.realpath(path), [])))
        finally:
            dev.close()
    error = None
    if unreadable:
        error = (f"{len(unreadable)} input device(s) not readable by this user: run as the storegate user "
                 "or root; deploy/udev/99-storegate.rules grants the storegate group known readers")
    return {"available": True, "devices": devices, "unreadable": unreadable, "error": error}


# -- both ------------------------------------------------------------------------
def scan(input_dir: str = "/dev/input") -> dict:
    return {"pcsc": pcsc_readers(), "input": input_devices(input_dir)}


def render(found: dict) -> str:
    rows = ["PC/SC readers (NFC, through pcscd)"]
    pcsc = found["pcsc"]
    if pcsc["error"]:
        rows.append(f"  {pcsc['error']}")
    elif not pcsc["readers"]:
        rows.append("  none: pcscd runs but sees no reader (plugged in? ACR122U: is pn533_usb blacklisted? "
                    "see deploy/HARDWARE.md)")
    for r in pcsc["readers"]:
        rows += [f"  {r['name']}", f"    {r['config']}"]
    rows += ["", "Input devices (magstripe readers, barcode/QR scanners in keyboard-wedge mode)"]
    inp = found["input"]
    if inp["error"]:
        rows.append(f"  {inp['error']}")
    if not inp["devices"] and not inp["unreadable"] and inp["available"] and not inp["error"]:
        rows.append("  none")
    for d in inp["devices"]:
        ids = f"usb {d['usb']}" if d["usb"] else "not USB"
        maker = f", {d['vendor']}" if d["vendor"] else ""
        wedge = "keyboard wedge" if d["keyboard_wedge"] else "not a keyboard wedge (no digits + Enter)"
        rows.append(f"  {d['path']}  {d['name']!r}  {ids}{maker}  {wedge}")
        for link in d["by_id"]:
            rows.append(f"    {link}")
        if d["config"]:
            rows += ["    " + line for line in d["config"].splitlines()]
    for path in inp["unreadable"]:
        rows.append(f"  {path}  (no permission)")
    return "\n".join(rows)


def main(as_json: bool = False, input_dir: str = "/dev/input") -> int:
    import json

    found = scan(input_dir)
    print(json.dumps(found, indent=2, ensure_ascii=False) if as_json else render(found))
    return 0
