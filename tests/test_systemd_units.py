"""The systemd units and the users file in deploy/, checked with systemd's own tools.

The gateway runs on a box in every store: its unit must be sandboxed
(`systemd-analyze security` rates it "OK", at most 3.0), must not depend on a
group plain Debian lacks, and must not restart forever on a config error.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
UNITS = ROOT / "deploy" / "systemd"
SERVICES = ["storegate-gateway.service", "storegate-hq.service", "storegate-hq-nightly.service"]
CONFIG_ERROR_EXIT = 2  # gateway/shell/cli.py and hq_bridge/cli.py: a config error exits 2

needs_analyze = pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is missing")


def settings(unit: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in (UNITS / unit).read_text().splitlines():
        if "=" in line and not line.lstrip().startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            out.setdefault(key.strip(), []).append(value.strip())
    return out


@needs_analyze
@pytest.mark.parametrize("unit", SERVICES)
def test_every_service_is_rated_ok_by_systemd_analyze_security(unit):
    result = subprocess.run(["systemd-analyze", "security", "--offline=true", "--no-pager", str(UNITS / unit)],
                            capture_output=True, text=True, timeout=60)
    found = re.search(r"Overall exposure level for \S+: (\d+\.\d+) (\w+)", result.stdout + result.stderr)
    assert found, result.stdout + result.stderr
    score = float(found.group(1))
    print(f"{unit}: {score} {found.group(2)}")
    assert score <= 3.0, f"{unit} rated {score} {found.group(2)}:\n{result.stdout}"


@needs_analyze
@pytest.mark.parametrize("unit", SERVICES + ["storegate-hq-nightly.timer"])
def test_units_have_no_unknown_settings(unit):
    result = subprocess.run(["systemd-analyze", "verify", "--man=no", str(UNITS / unit)],
                            capture_output=True, text=True, timeout=60)
    # The venv and the users exist only on an installed box; anything else is a mistake in the file.
    problems = [line for line in result.stderr.splitlines()
                if line.strip() and "is not executable" not in line and "/opt/storegate" not in line
                and "Failed to resolve" not in line and "Unit is bound to inactive unit" not in line]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("unit,watchdog", [("storegate-gateway.service", 15), ("storegate-hq.service", 60)])
def test_long_running_services_say_when_ready_and_are_watched(unit, watchdog):
    s = settings(unit)
    assert s["Type"] == ["notify"]
    seconds = int(s["WatchdogSec"][0].rstrip("s"))
    # The Pi's hardware watchdog tops out near 15 s; the service's own must fire before it would.
    assert 0 < seconds < watchdog
    assert "time-sync.target" in " ".join(s["After"])
    assert str(CONFIG_ERROR_EXIT) in s["RestartPreventExitStatus"][0].split()
    assert s["ExecStart"][0].startswith("/opt/storegate/venv/bin/")


def test_gateway_unit_needs_no_group_that_plain_debian_lacks():
    s = settings("storegate-gateway.service")
    assert "SupplementaryGroups" not in s, "a missing group fails the start: sysusers and install.sh add members"
    assert s["User"] == ["storegate"] and s["Group"] == ["storegate"]


@pytest.mark.skipif(shutil.which("systemd-sysusers") is None, reason="systemd-sysusers is missing")
def test_sysusers_file_creates_the_users_in_an_empty_root(tmp_path):
    etc = tmp_path / "etc"
    etc.mkdir()
    for name, text in {"passwd": "root:x:0:0:root:/root:/bin/bash\n", "group": "root:x:0:\n",
                       "shadow": "root:*:19000:0:99999:7:::\n", "gshadow": "root:*::\n"}.items():
        (etc / name).write_text(text)
    subprocess.run(["systemd-sysusers", f"--root={tmp_path}", str(ROOT / "deploy/sysusers.d/storegate.conf")],
                   check=True, capture_output=True, timeout=60)
    passwd = (etc / "passwd").read_text()
    group = (etc / "group").read_text()
    assert re.search(r"^storegate:x:\d+:\d+:.*:/var/lib/storegate:/usr/sbin/nologin$", passwd, re.M)
    assert re.search(r"^storegate-hq:x:\d+:\d+:", passwd, re.M)
    assert re.search(r"^storegate:x:\d+:$", group, re.M)
    assert "gpio" not in group  # created by nothing here: plain Debian has none
