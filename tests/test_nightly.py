"""The nightly run on real parts: ``storegate-hq nightly`` moves the accounts
for the chain's business day (tiers, points expiry), commits, then refreshes
every store's member snapshot from the accounts; with the broker down it says
what it kept and what it did not send, and exits 1 (a systemd timer's run
shows as failed)."""

from __future__ import annotations

import pytest

from tests.support import HQ, RULES_FILE, running_shop, wait_until
from tests.test_republish import member_view

GOLD_CARD = "880000000013"
EXPIRING = """
[accounts]
points_expiry_months = 1
"""


@pytest.fixture
def shop(tmp_path, broker):
    rules = tmp_path / "rules-expiring.toml"
    rules.write_text(RULES_FILE.read_text(encoding="utf-8") + EXPIRING, encoding="utf-8")
    # publishing imports the inline members: lots expire in a month or so
    with running_shop(tmp_path, broker.port, rules_file=rules) as shop:
        yield shop


def points_at_store(gw) -> int:
    return member_view(gw)["points"]


def hq_points(hq: HQ) -> int:
    import orjson
    out = hq.cli("members", "show", GOLD_CARD, "--json")
    assert out.returncode == 0, out.stderr
    return orjson.loads(out.stdout)["points"]


def test_nightly_expires_points_and_every_store_gets_the_fresh_snapshot(shop):
    hq, gw = shop
    before = points_at_store(gw)
    assert before == hq_points(hq) > 0
    out = hq.cli("nightly", "--date", "2030-01-01")             # long after every imported lot's expiry
    assert out.returncode == 0, out.stderr
    assert "points expired" in out.stdout and "to store S001" in out.stdout
    assert "nightly reconciliation" in out.stdout and "(no overdrafts)" in out.stdout
    assert hq_points(hq) == 0
    wait_until(lambda: gw.status()["rules_version"] == 2, timeout=30, what="the nightly snapshot at the store")
    assert points_at_store(gw) == 0


def test_nightly_with_the_broker_down_commits_the_accounts_and_the_bridge_sends_the_snapshots_later(shop, broker):
    hq, gw = shop
    broker.stop()
    out = hq.cli("nightly", "--date", "2030-01-01", timeout=120)
    assert out.returncode == 75, out.stderr                     # stored, sent later
    assert "committed" in out.stderr and "queued, not sent yet" in out.stderr
    assert "the rule set of store S001" in out.stderr and "as soon as the broker is back" in out.stderr
    assert hq_points(hq) == 0                                   # the account policy is kept
    again = hq.cli("nightly", "--date", "2030-01-01", "--no-snapshots")
    assert again.returncode == 0 and "0 points expired" in again.stdout    # nothing applied twice
    assert gw.status()["rules_version"] == 1
    broker.start()                                              # the bridge sends what waits, unasked
    wait_until(lambda: gw.status()["rules_version"] == 3, timeout=60, what="the queued snapshot at the store (built again)")
    assert points_at_store(gw) == 0
    assert "outbox: sent store:S001" in hq.log()


def test_a_bad_time_zone_is_named(tmp_path):
    hq = HQ(tmp_path, 1)
    hq.config.write_text(hq.config.read_text().replace("[hq]\n", '[hq]\ntimezone = "Mars/Olympus"\n'))
    out = hq.cli("nightly")
    assert out.returncode == 2 and "hq.timezone" in out.stderr and "Mars/Olympus" in out.stderr


def test_the_nightly_timers_calendar_is_one_systemd_reads():
    import configparser
    import shutil
    import subprocess

    from tests.support import ROOT
    if not shutil.which("systemd-analyze"):
        pytest.skip("systemd-analyze is not installed")
    timer = configparser.ConfigParser(strict=False)
    timer.read(ROOT / "deploy" / "systemd" / "storegate-hq-nightly.timer")
    out = subprocess.run(["systemd-analyze", "calendar", timer["Timer"]["OnCalendar"]], capture_output=True, text=True)
    assert out.returncode == 0 and "Next elapse" in out.stdout, out.stderr
