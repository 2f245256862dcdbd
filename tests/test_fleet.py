"""`storegate-hq fleet`: every fault a store reports, readers not ready,
versions behind, last seen (pure rendering; the command itself runs in
tests/test_rules_distribution.py)."""

from hq_bridge.cli import render_fleet, store_problems

NOW = 1_800_000_000


def status(**kw) -> dict:
    return {"store": "S001", "state": "online", "ts": NOW - 30, "backlog": 0, "rules_version": 4,
            "deny_version": 7, "readers": {"1": "ready", "2": "terminal"}, "faults": [], **kw}


def test_a_healthy_store_has_no_problems():
    assert store_problems(status(), sent=4, hq_deny=7) == []
    row = render_fleet({"S001": status()}, {"S001": 4}, NOW, hq_deny=7).splitlines()[1]
    assert row.split() == ["S001", "online", "4", "4", "7", "0", "-", "30s", "ago", "-"]   # clock: not measured


def test_an_absent_reader_and_a_damaged_journal_are_both_shown_with_every_version_behind():
    s = status(readers={"1": "absent", "1.magstripe0": "ready", "2": "fault"},
               faults=["journal: segment 00000003 damaged at offset 4096", "clock behind the last rules"],
               rules_version=3, deny_version=5, rules_rejection=None, backlog=120, oldest_unsent_age_s=7300)
    problems = store_problems(s, sent=4, hq_deny=7)
    assert problems == ["journal: segment 00000003 damaged at offset 4096", "clock behind the last rules",
                        "reader 1: absent", "reader 2: fault", "rules behind: runs v3, sent v4",
                        "deny list behind: runs v5, HQ at v7"]
    out = render_fleet({"S001": s}, {"S001": 4}, NOW, hq_deny=7).splitlines()
    assert out[1].split()[:8] == ["S001", "online", "3", "4", "5", "120", "2h", "30s"]
    assert out[1].endswith(problems[0]) and [l.strip() for l in out[2:]] == problems[1:]


def test_a_store_gone_quiet_is_silent_and_a_store_never_heard_of_says_never():
    out = render_fleet({"S001": status(ts=NOW - 3600)}, {"S001": 4, "S002": None}, NOW, hq_deny=7).splitlines()
    assert out[1].split()[:2] == ["S001", "silent"] and "1h ago" in out[1]
    assert out[2].split()[:2] == ["S002", "never"]


def test_a_refused_rule_set_is_named():
    s = status(rules_rejection="signature does not verify")
    assert store_problems(s, sent=5, hq_deny=7) == ["rules refused: signature does not verify",
                                                   "rules behind: runs v4, sent v5"]


def test_the_bridge_leaves_alone_what_a_running_command_is_sending(tmp_path):
    """A command queues before it sends; the bridge sends only what a command
    released (its broker was down) or what a dead command left for long."""
    from hq_bridge.rules import Catalog, now_ms

    catalog = Catalog(tmp_path / "hq.db", tmp_path / "parts")
    try:
        t = now_ms()
        catalog.queue(["store:S001"], "rules publish", t)
        assert catalog.for_the_bridge(t - 1) == {}                   # being sent by its command
        assert catalog.for_the_bridge(t + 1) == {"store:S001": t}    # orphaned: its command is long gone
        catalog.release()                                            # the command's broker was down
        assert catalog.for_the_bridge(t - 1) == {"store:S001": t}
        catalog.sent("store:S001", t)
        assert catalog.queued() == []
    finally:
        catalog.close()
