"""What a store's Prometheus sees at /metrics (gateway/shell/metrics.py):
a member taps, the POS quotes and sells, and the scrape after says so."""

from __future__ import annotations

import asyncio

from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from demo.testbed import free_port
from gateway.shell import config as gw_config
from gateway.shell.service import Gateway
from gateway.store.journal import Journal
from gateway.store.journal.commit import CommitStats
from tests.support import GOLD_UID, api_client, install_rules, sale_body


def gateway_config(tmp_path, store: str = "S001") -> dict:
    return gw_config.check({
        "store": {"id": store, "data_dir": str(tmp_path / store)},
        "mqtt": {"host": "127.0.0.1", "port": free_port()},   # no broker: the link to HQ is down
        "lanes": [{"id": "1", "reader": "simulated"}, {"id": "2", "reader": "terminal"}],
    })


def samples(text: str) -> dict[tuple, float]:
    """(sample name, frozenset of labels) -> value, from the text format."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(scrape: dict, name: str, **labels) -> float:
    return scrape.get((name, frozenset(labels.items())), 0.0)


async def scrape(client) -> tuple[dict, str]:
    answer = await client.get("/metrics")
    assert answer.status_code == 200, answer.body
    assert answer.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    text = answer.body.decode()
    return samples(text), text


async def test_a_tap_a_quote_and_a_sale_move_the_counters_and_histograms(tmp_path):
    async with Gateway(gateway_config(tmp_path)) as gw:
        install_rules(gw)
        client = api_client(gw)
        before, _ = await scrape(client)

        denied = await client.post("/lanes/1/taps", body={"source": "qr", "raw": "880000000054"})  # lost card
        assert denied.json["verdict"] == "deny"
        tap = await client.post("/lanes/1/taps", body={"source": "nfc", "raw": GOLD_UID})
        assert tap.json["verdict"] == "accept"
        body = sale_body("pos1-metrics-1", member=True)
        assert (await client.post("/lanes/1/quote", body={"lines": body["lines"], "member": True})).status_code == 200
        assert (await client.post("/lanes/1/sales", body=body)).status_code == 201
        refused = await client.post("/lanes/2/sales", body=sale_body("pos2-metrics-1", member=True))
        assert refused.status_code == 409                     # no member on lane 2

        after, text = await scrape(client)

    def moved(name: str, **labels) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("storegate_taps_total", source="nfc", verdict="accept") == 1
    assert moved("storegate_taps_total", source="qr", verdict="deny") == 1
    assert moved("storegate_quote_seconds_count", outcome="ok") == 1
    assert moved("storegate_sale_seconds_count", outcome="ok") == 1
    assert moved("storegate_sale_seconds_count", outcome="refused") == 1
    assert value(after, "storegate_sale_seconds_bucket", outcome="ok", le="+Inf") == 1
    assert 0 < value(after, "storegate_sale_seconds_sum", outcome="ok") < 5
    # The sale's record went through one group commit: written, synced, timed.
    assert moved("storegate_journal_records_total") == 1
    assert moved("storegate_journal_commit_seconds_count") >= 1
    assert moved("storegate_journal_group_frames_sum") >= 1
    assert value(after, "storegate_journal_commit_seconds_bucket", le="+Inf") == \
        value(after, "storegate_journal_commit_seconds_count")
    # The state the scrape reads: one record waiting for HQ, which is unreachable.
    assert value(after, "storegate_backlog_records") == 1
    assert value(after, "storegate_backlog_oldest_age_seconds") >= 0
    assert value(after, "storegate_uplink_connected") == 0
    assert value(after, "storegate_rules_version") == 1
    assert 0 <= value(after, "storegate_rules_age_seconds") < 60
    assert value(after, "storegate_reader_state", lane="1", input="reader", kind="simulated", state="ready") == 1
    assert value(after, "storegate_reader_state", lane="1", input="reader", kind="simulated", state="fault") == 0
    info = [(dict(labels), v) for (name, labels), v in after.items() if name == "storegate_info"]
    assert len(info) == 1 and info[0][0]["store"] == "S001" and info[0][1] == 1
    assert value(after, "storegate_disk_free_bytes") > 0
    if hasattr(Gateway, "clock_check"):                    # the gateway's own clock check (gateway/core/clock.py)
        assert value(after, "storegate_clock_trusted") == 1
    assert value(after, "process_resident_memory_bytes") > 0
    # Nothing of a member's card reaches the scrape.
    assert "880000" not in text and GOLD_UID not in text


async def test_metrics_need_a_terminal_credential(tmp_path):
    async with Gateway(gateway_config(tmp_path)) as gw:
        client = api_client(gw)
        answer = await client.get("/metrics", headers={"Authorization": "Bearer test-manager.wrong"})
        assert answer.status_code == 401
        answer = await client.get("/metrics", headers={"Authorization": f"Bearer {client.tokens['lane_terminal']}"})
        assert answer.status_code == 403                      # a lane terminal only posts taps


async def test_each_gateway_has_its_own_registry(tmp_path):
    async with Gateway(gateway_config(tmp_path, "S001")) as one, Gateway(gateway_config(tmp_path, "S002")) as two:
        one.metrics.tap("nfc", "accept")
        a, _ = await scrape(api_client(one))
        b, _ = await scrape(api_client(two))
        assert value(a, "storegate_taps_total", source="nfc", verdict="accept") == 1
        assert value(b, "storegate_taps_total", source="nfc", verdict="accept") == 0
        assert one.metrics.registry is not two.metrics.registry
    assert not [name for name in REGISTRY._names_to_collectors if name.startswith("storegate")]


async def test_eight_lanes_at_once_are_one_group_commit(tmp_path):
    async with Journal(tmp_path / "journal") as journal:
        await asyncio.gather(*(journal.append("sale", {"lane": str(n)}) for n in range(8)))
        stats = journal.commit_stats
    assert stats.groups == 1 and stats.frames == 8
    assert stats.size_buckets[CommitStats.SIZES.index(8)] == 1     # counted in the bucket "up to 8"
    assert sum(stats.seconds_buckets) == 1 and stats.seconds_sum > 0


def test_commit_stats_buckets_are_upper_bounds_inclusive():
    stats = CommitStats()
    stats.group(1, 100, 0.001)          # exactly on a bound: in that bucket (Prometheus' "le")
    stats.group(513, 100, 9.0)          # past every bound: the last bucket
    assert stats.seconds_buckets[CommitStats.SECONDS.index(0.001)] == 1
    assert stats.seconds_buckets[-1] == 1 and stats.size_buckets[0] == 1 and stats.size_buckets[-1] == 1
    assert (stats.groups, stats.frames, stats.bytes) == (2, 514, 200)
