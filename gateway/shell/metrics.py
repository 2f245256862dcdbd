"""What the gateway says about itself: Prometheus metrics at ``/metrics`` and
the samples behind the status page's backlog chart (gateway/shell/status_page/).

One ``GatewayMetrics`` per Gateway, with its own registry (several gateways
run in one test process; the global default registry is never used).

Measured where they happen, at the shell's edges (the core stays pure):

- taps, by card source and verdict (``tap``, from Gateway.show_verdict);
- quote and sale latency, by outcome (``timed``, around the POS API's calls).

Read when scraped, from the state the gateway keeps anyway (``collect``):
backlog and its oldest record, journal size and group commits
(gateway/store/journal/commit.py ``CommitStats``), uplink, rules and deny
versions and ages, readers, faults, disk, the clock, the POS API server's
counters; and the process (RSS, CPU, open files) from /proc.

The status page's chart reads ``history``: one sample of the backlog per
``SAMPLE_EVERY_S``, the last ``HISTORY_SAMPLES`` of them (6 hours), in memory
only (a restart starts a new chart).
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import time
from collections import deque
from contextlib import contextmanager
from importlib.metadata import PackageNotFoundError, version
from typing import Iterator

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector, exposition, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

log = logging.getLogger("storegate.metrics")

# No "<name>_created" series beside every counter and histogram: they double a scrape for
# nothing Prometheus uses. (A process-wide switch of the library: the gateway is its only user.)
prometheus_client.disable_created_metrics()

SAMPLE_EVERY_S = 60.0
HISTORY_SAMPLES = 360               # 6 hours at one a minute
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
READER_STATES = ("ready", "absent", "fault", "closed")   # hardware/readers.py CardReader.state
# The text format generate_latest writes (0.0.4), which every Prometheus reads.
CONTENT_TYPE = getattr(exposition, "CONTENT_TYPE_PLAIN_0_0_4", exposition.CONTENT_TYPE_LATEST)
HTTP_GAUGES = ("connections_open", "connections_peak", "event_streams_open")
RECENT_FAULTS = 20                  # faults cleared since start, kept for the status page


def product_version() -> str:
    try:
        return version("storegate")
    except PackageNotFoundError:
        return "unknown"


def readers_of(gw) -> list[dict]:
    """Every reader of every lane: lane, input ("reader" or "<kind><n>" for a
    keyboard-wedge input), kind and state. A lane terminal posts its reads
    and has no state of its own here: kind "terminal", state "terminal"."""
    out = []
    for lid, lane in gw.lanes.items():
        if lane.reader is None:
            out.append({"lane": lid, "input": "reader", "kind": "terminal", "state": "terminal"})
        else:
            out.append({"lane": lid, "input": "reader", "kind": lane.reader.kind, "state": lane.reader.state})
        for j, hid in enumerate(lane.inputs):
            kind = getattr(hid, "input_kind", "hid")
            out.append({"lane": lid, "input": f"{kind}{j}", "kind": kind, "state": hid.state})
    return out


def clock_check_of(gw) -> dict | None:
    """The gateway's own clock check (gateway/shell/clock_watch.py) where it has one: {"sane", "now",
    "known", "source", "synchronized", ...}; None without one."""
    check = getattr(gw, "clock_check", None)
    if check is None:
        return None
    try:
        return check().public()
    except Exception:  # noqa: BLE001 - the page and the scrape go on without it
        log.exception("clock check failed")
        return None


def disk_of(path) -> dict | None:
    try:
        usage = shutil.disk_usage(path)
    except OSError:
        return None
    return {"total_bytes": usage.total, "free_bytes": usage.free}


class GatewayMetrics:
    """The metrics of one gateway (``gw``: a gateway.shell.service.Gateway)."""

    def __init__(self, gw) -> None:
        self.gw = gw
        self.registry = CollectorRegistry(auto_describe=True)
        self.taps = Counter("storegate_taps", "Card reads decided, by card source and verdict",
                            ["source", "verdict"], registry=self.registry)
        self.quote_seconds = Histogram("storegate_quote_seconds", "POS quote latency at the API, by outcome",
                                       ["outcome"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.sale_seconds = Histogram("storegate_sale_seconds", "POS sale latency at the API (priced, journaled, "
                                      "synced), by outcome", ["outcome"], buckets=LATENCY_BUCKETS,
                                      registry=self.registry)
        self.registry.register(_GatewayCollector(self))
        try:
            ProcessCollector(registry=self.registry)   # process_resident_memory_bytes, _cpu_seconds_total, ...
        except Exception:  # noqa: BLE001 - no /proc (not Linux): the rest still works
            log.info("process metrics unavailable on this system")
        self.history: deque[tuple[float, int, float | None]] = deque(maxlen=HISTORY_SAMPLES)
        self.deny_issued_at: int | None = None   # of the last deny delta applied since start
        # Faults as the gateway reports them, with when they were first seen here
        # (by a sample or a read of the page); the cleared ones, newest last.
        self.active_faults: dict[str, float] = {}
        self.cleared_faults: deque[dict] = deque(maxlen=RECENT_FAULTS)
        self._snapshot: dict = {}
        gw.rules.deny_listeners.append(self._deny_applied)

    # -- measured where it happens -------------------------------------------

    def tap(self, source: str, verdict: str) -> None:
        self.taps.labels(source, verdict).inc()

    @contextmanager
    def timed(self, operation: str) -> Iterator[list]:
        """``with metrics.timed("sale") as outcome: ...; outcome[0] = "refused"``
        (default "ok"; an exception counts as "error")."""
        hist = self.sale_seconds if operation == "sale" else self.quote_seconds
        outcome = ["ok"]
        started = time.perf_counter()
        try:
            yield outcome
        except BaseException:
            outcome[0] = "error"
            raise
        finally:
            hist.labels(outcome[0]).observe(time.perf_counter() - started)

    def _deny_applied(self, version_: int, issued_at: int, entries: dict) -> None:
        self.deny_issued_at = issued_at

    # -- the backlog chart ----------------------------------------------------

    async def sample(self) -> None:
        backlog = await self.gw.journal.backlog()
        now = self.gw.clock()
        self.history.append((now, backlog["depth"], backlog["oldest_age_s"]))
        self.note_faults(self.gw.faults(), now)

    def note_faults(self, faults: list[str], now: float) -> None:
        """Keep track of when each fault line appeared and went away."""
        current = set(faults)
        for text in faults:
            self.active_faults.setdefault(text, now)
        for text in [t for t in self.active_faults if t not in current]:
            self.cleared_faults.append({"text": text, "since": self.active_faults.pop(text), "cleared": now})

    async def run(self) -> None:
        """Sample the backlog once a SAMPLE_EVERY_S (on the monotonic clock), until cancelled."""
        while True:
            try:
                await self.sample()
            except Exception:  # noqa: BLE001 - a sample missed is a gap in a chart, nothing more
                log.exception("backlog sample failed")
            await asyncio.sleep(SAMPLE_EVERY_S)

    # -- read when scraped ----------------------------------------------------

    async def snapshot(self) -> dict:
        """What the scrape and the status page read, gathered once."""
        gw = self.gw
        backlog = await gw.journal.backlog()
        rules = gw.rules.current
        now = gw.clock()
        faults = gw.faults()
        self.note_faults(faults, now)
        return {
            "now": now,
            "backlog": backlog,
            "journal_max_bytes": gw.config["journal"]["max_mb"] << 20,
            "commit": gw.journal.commit_stats,
            "appends": gw.journal.stats.get("appends", 0),
            "uplink": gw.uplink.state,
            "rules": None if rules is None else {
                "version": rules.version, "issued_at": rules.issued_at, "age_s": now - rules.issued_at,
                "max_age_s": rules.data.get("max_age_s") if isinstance(rules.data, dict) else None},
            "deny_version": gw.rules.deny_version,
            "deny_issued_at": self.deny_issued_at,
            "readers": readers_of(gw),
            "faults": faults,
            "disk": disk_of(gw.config["store"]["data_dir"]),
            "clock_check": clock_check_of(gw),
            "http": gw.http_stats(),
            "started_at": gw.started_at,
        }

    async def exposition(self) -> bytes:
        """The text format Prometheus scrapes."""
        self._snapshot = await self.snapshot()
        return generate_latest(self.registry)


class _GatewayCollector:
    """The gauges and counters read from the gateway's state at scrape time."""

    def __init__(self, metrics: GatewayMetrics) -> None:
        self.metrics = metrics

    def describe(self):
        return []   # unchecked: the families depend on what the gateway holds

    def collect(self):
        m = self.metrics
        s = m._snapshot
        if not s:
            return
        gw = m.gw

        def gauge(name: str, doc: str, value, labels: dict | None = None):
            g = GaugeMetricFamily(name, doc, labels=list(labels) if labels else None)
            if value is not None:
                g.add_metric(list(labels.values()) if labels else [], value)
            return g

        def counter(name: str, doc: str, value):
            c = CounterMetricFamily(name, doc)
            c.add_metric([], value)
            return c

        yield gauge("storegate_info", "This gateway: store and version", 1,
                    {"store": gw.store_id, "version": product_version()})
        yield gauge("storegate_time_seconds", "The gateway's wall clock (compare with the scraper's)", s["now"])
        yield gauge("storegate_start_time_seconds", "When the gateway started (its wall clock)", s["started_at"])
        if s["clock_check"] is not None:
            yield gauge("storegate_clock_trusted", "1 while the gateway's clock check passes (gateway/core/clock.py)",
                        int(bool(s["clock_check"].get("sane"))))
        backlog = s["backlog"]
        yield gauge("storegate_backlog_records", "Journaled records HQ has not acked yet", backlog["depth"])
        yield gauge("storegate_backlog_oldest_age_seconds", "Age of the oldest record HQ has not acked (0: none)",
                    backlog["oldest_age_s"] or 0.0)
        yield gauge("storegate_journal_last_seq", "The last sequence number journaled", backlog["last_seq"])
        yield gauge("storegate_journal_bytes", "Bytes the journal's files take", backlog["bytes"])
        yield gauge("storegate_journal_max_bytes", "The journal's cap (journal.max_mb)", s["journal_max_bytes"])
        yield from self._commits(s["commit"], s["appends"])
        up = s["uplink"]
        yield gauge("storegate_uplink_connected", "1 while connected to HQ's broker", int(up.connected))
        yield gauge("storegate_uplink_last_hq_contact_timestamp_seconds",
                    "Wall clock of the last ack or rule set from HQ", up.last_hq_contact)
        yield counter("storegate_uplink_reconnects", "Connections to the broker lost", up.reconnects)
        yield counter("storegate_uplink_sent_batches", "Batches of records sent to HQ", up.sent_batches)
        yield counter("storegate_uplink_acked_records", "Records HQ acked (committed)", up.acked_records)
        yield counter("storegate_uplink_rejected_acks", "Acks ignored (malformed, foreign, not in flight)",
                      up.rejected_acks)
        rules = s["rules"]
        if rules is not None:
            yield gauge("storegate_rules_version", "Version of the rule set in force", rules["version"])
            yield gauge("storegate_rules_issued_timestamp_seconds", "When HQ issued the rule set in force",
                        rules["issued_at"])
            yield gauge("storegate_rules_age_seconds", "Age of the rule set in force (by the gateway's clock)",
                        rules["age_s"])
            if isinstance(rules["max_age_s"], (int, float)):
                yield gauge("storegate_rules_max_age_seconds", "Age past which the rules are stale",
                            rules["max_age_s"])
        if s["deny_version"] is not None:
            yield gauge("storegate_deny_version", "Version of the deny list held", s["deny_version"])
        if s["deny_issued_at"] is not None:
            yield gauge("storegate_deny_age_seconds", "Age of the last deny delta applied since start",
                        s["now"] - s["deny_issued_at"])
        readers = GaugeMetricFamily("storegate_reader_state", "1 for the state each reader is in, 0 for the others",
                                    labels=["lane", "input", "kind", "state"])
        for r in s["readers"]:
            if r["kind"] == "terminal":
                continue   # a lane terminal posts its reads: no state here
            for state in dict.fromkeys((*READER_STATES, r["state"])):
                readers.add_metric([r["lane"], r["input"], r["kind"], state], int(state == r["state"]))
        yield readers
        yield gauge("storegate_faults", "Faults the gateway reports now (see /status)", len(s["faults"]))
        disk = s["disk"]
        if disk:
            yield gauge("storegate_disk_free_bytes", "Free bytes on the data directory's file system",
                        disk["free_bytes"])
            yield gauge("storegate_disk_total_bytes", "Size of the data directory's file system",
                        disk["total_bytes"])
        for key, value in (s["http"] or {}).items():
            if key in HTTP_GAUGES:
                yield gauge(f"storegate_http_{key}", f"POS API server: {key.replace('_', ' ')}", value)
            else:
                yield counter(f"storegate_http_{key}", f"POS API server: {key.replace('_', ' ')}", value)

    @staticmethod
    def _commits(stats, appends: int):
        """The journal's group commits (gateway/store/journal/commit.py CommitStats)."""
        def histogram(name: str, doc: str, bounds, counts, total):
            buckets, running = [], 0
            for bound, n in zip(bounds, counts):
                running += n
                buckets.append((repr(float(bound)), running))
            buckets.append(("+Inf", running + counts[-1]))
            h = HistogramMetricFamily(name, doc)
            h.add_metric([], buckets, total)
            return h

        yield histogram("storegate_journal_commit_seconds", "Write and sync of one group commit",
                        stats.SECONDS, list(stats.seconds_buckets), stats.seconds_sum)
        sizes = list(stats.size_buckets)
        yield histogram("storegate_journal_group_frames", "Frames (records, acks) written in one group commit",
                        stats.SIZES, sizes, stats.frames)
        yield CounterMetricFamily("storegate_journal_records", "Records journaled (synced) since start",
                                  value=appends)
        yield CounterMetricFamily("storegate_journal_written_bytes", "Frame bytes written by group commits",
                                  value=stats.bytes)
        yield CounterMetricFamily("storegate_journal_write_failures", "Group commits that failed (full, I/O)",
                                  value=stats.failures)
