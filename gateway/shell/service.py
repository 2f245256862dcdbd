"""The gateway service: readers -> validation -> indicator and POS; sales ->
journal -> uplink. This is the imperative shell around gateway.core.validate."""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

from common import runtime
from gateway.core import validate
from gateway.core.clock import ClockCheck
from gateway.shell import lane_faults
from gateway.shell.clock_watch import ClockWatch
from gateway.shell.counter import Counter
from gateway.shell.lanes import Lane
from gateway.shell.member_qr import MemberQrCheck
from gateway.shell.metrics import GatewayMetrics
from gateway.shell.secure_nfc import SecureNfc
from gateway.shell.uplink import Uplink, UplinkSettings
from gateway.store.clock_mark import ClockMark
from gateway.store.journal import Appended, Journal
from gateway.store.qr_replay import ReplayStore
from gateway.store.rules import RulesStore
from hardware.indicators import GpioIndicator, Indicator, SimulatedIndicator
from hardware.readers import CardRead, CardReader, ReadAgain, SimulatedReader
from wire.messages import Status

log = logging.getLogger("storegate.gateway")

def build_reader(lane_cfg: dict) -> CardReader | None:
    """The lane's reader; None for a lane terminal, which posts its reads."""
    kind = lane_cfg["reader"]
    if kind == "simulated":
        return SimulatedReader(lane_cfg["id"])
    if kind == "pcsc":
        from hardware.nfc import PcscReader  # needs libpcsclite only when used

        return PcscReader(lane_cfg["id"], lane_cfg["pcsc_reader"])
    return None


def build_inputs(lane_cfg: dict) -> list[CardReader]:
    """The lane's keyboard-wedge inputs (magstripe readers, scanners)."""
    if not lane_cfg.get("hid"):
        return []
    from hardware.hid import HidReader, HidSelector

    return [HidReader(lane_cfg["id"], HidSelector.of(h), h["kind"], gap_s=h.get("gap_ms", 100) / 1000)
            for h in lane_cfg["hid"]]


def build_indicator(lane_cfg: dict, pin_factory=None) -> Indicator:
    if lane_cfg["indicator"] == "gpio":
        pins = lane_cfg["gpio"]
        factory = pin_factory
        if factory is None and pins.get("mock"):
            from gpiozero.pins.mock import MockFactory
            factory = MockFactory()
        return GpioIndicator(green=pins["green"], red=pins["red"], buzzer=pins.get("buzzer"),
                             status=pins.get("status"), pin_factory=factory)
    return SimulatedIndicator()


class Gateway:
    """Use as ``async with Gateway(config) as gw:``; serves until closed."""

    def __init__(self, config: dict, *, pin_factory=None, clock=time.time) -> None:
        self.config = config
        store = config["store"]
        self.store_id = store["id"]
        self.tz = ZoneInfo(store["timezone"])
        self.clock = clock
        data_dir = Path(store["data_dir"])
        jcfg = config["journal"]
        self.journal = Journal(data_dir / "journal", max_bytes=jcfg["max_mb"] << 20,
                               segment_bytes=jcfg["segment_mb"] << 20, writer=jcfg["writer"], clock=clock)
        self.rules = RulesStore(data_dir / "rules", self.store_id, store.get("region"),
                                public_keys=config.get("rules", {}).get("hq_public_keys", []))
        # Is the clock to be believed? (gateway/core/clock.py; the mark: gateway/store/clock_mark.py)
        self.clockwatch = ClockWatch(clock, ClockMark(data_dir / "clock.json"), self.rules)
        self.lanes: dict[str, Lane] = {}
        for lane_cfg in config["lanes"]:
            self.lanes[lane_cfg["id"]] = Lane(lane_cfg["id"], build_reader(lane_cfg),
                                              build_indicator(lane_cfg, pin_factory), inputs=build_inputs(lane_cfg))
        self.qr = MemberQrCheck(ReplayStore(data_dir / "qr_replay.sqlite3"))
        # NTAG 424 DNA SUN checks with the keys that come with the rules (gateway/shell/secure_nfc.py).
        self.secure_nfc = SecureNfc(data_dir / "sun_counters.sqlite", lambda: self.rules.current,
                                    rules_path=self.rules.path)
        for lane in self.lanes.values():
            self.secure_nfc.attach(lane.reader)
        self.counter = Counter(self, data_dir / "counter.db")
        self.uplink = Uplink(config["mqtt"], self.store_id, self.journal, self.rules, self.status_message,
                             UplinkSettings(**config["uplink"]), on_connection_change=self._on_link)
        self.uplink.on_hq_time = self.clockwatch.hq_time   # HQ's time in each ack checks the clock while online
        # HQ's live answers are held as long as the lane holds its member, for the counter's re-validation.
        self.live = self.uplink.live
        self.live.clock = clock
        self.live.cache.hold_s = config["api"]["member_hold_s"]
        self.started_at = clock()
        self.http_stats = lambda: {}  # the POS API server's counters, once it serves (gateway/shell/cli.py)
        self._tasks: list[asyncio.Task] = []
        self.stats = {"taps": 0, "accepted": 0, "denied": 0, "retries": 0, "sales": 0}
        self.metrics = GatewayMetrics(self)  # /metrics and the status page (gateway/shell/metrics.py)

    # -- lifetime -----------------------------------------------------------

    async def __aenter__(self) -> "Gateway":
        self.rules.load()
        runtime.tune_gc()  # the rules are loaded: freeze them out of GC passes (common/runtime.py)
        await self.journal.open()
        self.clockwatch.journal_opened(self.journal)  # its last record is evidence (before anything new)
        replayed = await self.counter.catch_up()  # local state the journal holds and a crash may have missed
        if replayed:
            log.info("re-applied %d journaled counter operation(s) to the local state", replayed)
        for lane in self.lanes.values():
            if lane.reader is not None:
                await lane.reader.open()
                self._tasks.append(asyncio.create_task(self._read_loop(lane), name=f"reader-{lane.id}"))
            for j, hid in enumerate(lane.inputs):
                await hid.open()
                self._tasks.append(asyncio.create_task(self._read_loop(lane, hid), name=f"hid-{lane.id}-{j}"))
            lane.indicator.show("offline")  # until the uplink says otherwise
        self._tasks.append(asyncio.create_task(self.uplink.run(), name="uplink"))
        self._tasks.append(asyncio.create_task(lane_faults.watch(self), name="lane-faults"))
        self._tasks.append(asyncio.create_task(self.metrics.run(), name="metrics"))
        self._tasks.append(asyncio.create_task(self.clockwatch.run(), name="clock"))
        return self

    async def __aexit__(self, *exc) -> None:
        self.uplink.stop()
        for task in reversed(self._tasks):
            task.cancel()
        done, stuck = await asyncio.wait(self._tasks, timeout=10)
        for task in stuck:  # never hang a shutdown (systemd would SIGKILL us anyway)
            log.error("task %s did not stop within 10 s", task.get_name())
        self._tasks.clear()
        for lane in self.lanes.values():
            if lane.reader is not None:
                await lane.reader.close()
            for hid in lane.inputs:
                await hid.close()
            lane.indicator.close()
        await self.journal.close()
        self.clockwatch.close()
        self.counter.close()
        self.secure_nfc.close()
        self.qr.close()

    def _on_link(self, up: bool) -> None:
        for lane in self.lanes.values():
            lane.indicator.show("online" if up else "offline")

    async def _read_loop(self, lane: Lane, reader: CardReader | None = None) -> None:
        async for read in (reader or lane.reader).reads():
            try:
                if isinstance(read, ReadAgain):  # a failed read (card pulled away, a bad swipe or scan)
                    self.show_verdict(lane, read.source, validate.Verdict("retry", read.verdict_reason))
                else:
                    await self.handle_read(read)
            except Exception:  # one bad read must not stop the lane
                log.exception("lane %s: tap handling failed", lane.id)

    # -- counter ------------------------------------------------------------

    def now(self) -> datetime:
        return datetime.fromtimestamp(self.clock(), self.tz)

    def clock_check(self) -> ClockCheck:
        """Whether the clock is to be believed now (a fault and stale rules while not)."""
        return self.clockwatch.check()

    def lane(self, lane_id: str) -> Lane:
        try:
            return self.lanes[lane_id]
        except KeyError:
            raise KeyError(f"unknown lane {lane_id!r}; this store has lanes {sorted(self.lanes)}") from None

    async def handle_read(self, read: CardRead) -> validate.Verdict:
        lane = self.lane(read.lane)
        # Secure NFC cards (SUN): refused here, or raw becomes the UID the message authenticated.
        read, refused = await self.secure_nfc.check(read, self.rules.current)
        if refused:
            self.show_verdict(lane, read.source, refused)
            return refused
        raw = read.raw
        if read.source == "qr":  # a dynamic member code: verified and claimed once, then its card number
            raw, refused = self.qr.identify(raw, self.rules.current, self.clock(),
                                            clock_ok=self.clock_check().sane)
            if refused:
                verdict = validate.Verdict("deny", refused)
                self.show_verdict(lane, read.source, verdict)
                return verdict
        rules = self.rules.current
        await self.ask_hq(read.source, raw, rules)
        verdict = self.counter.validate(read.source, raw)  # HQ's rules and snapshot, then this store's own records
        self.show_verdict(lane, read.source, verdict)
        if verdict.accepted:
            lane.member_read = (read.source, raw)
        return verdict

    async def ask_hq(self, source: str, raw: str, rules: validate.Rules | None) -> None:
        """While online: HQ's live account for the card, within the tap's
        budget (uplink.live_lookup_ms), held where validate.validate finds it
        (gateway/shell/live_accounts.py) for the quote and sale that follow.
        Offline, past the wait, or for a card refused anyway: nothing held,
        the store decides from its snapshot (an earlier answer is let go, so
        the tap and the counter's re-validation use the view the tap shows)."""
        if rules is None:
            return
        card_no, _ = validate.card_number_of(source, raw, rules)
        if card_no is None:
            return
        denied = rules.members.denied(card_no)
        # HQ's limit (欠款限用) is the one deny status the live answer decides online
        if not self.live.online or not 6 <= len(card_no) <= 19 or (denied and denied["status"] != "limited") \
                or validate.program_for(card_no, rules)[2]:
            self.live.cache.forget(card_no)
            return
        rules.members.live = self.live.cache   # the member store the engine reads (it may be a new one)
        try:
            if await self.live.lookup(card_no) is None:
                self.live.cache.forget(card_no)
        except Exception:   # a look-up must never cost the tap: decide from the snapshot
            self.live.cache.forget(card_no)
            log.exception("live account look-up failed")

    def show_verdict(self, lane: Lane, source: str, verdict: validate.Verdict) -> None:
        """The counter side of a verdict: indicator, lane state, POS event, log."""
        lane.indicator.show(verdict.pattern)
        lane.taps += 1
        self.stats["taps"] += 1
        self.metrics.tap(source, verdict.verdict)
        if verdict.accepted:
            self.stats["accepted"] += 1
            lane.member, lane.member_at = verdict, self.clock()
        elif verdict.verdict == "deny":
            self.stats["denied"] += 1
            lane.member = None  # the card just refused is the lane's customer now
        else:
            self.stats["retries"] += 1
        # Logs carry the reason and the masked card, never the raw read.
        log.info("lane %s: %s tap -> %s (%s) card %s", lane.id, source, verdict.verdict,
                 verdict.reason, validate.mask_card(verdict.card_no) if verdict.card_no else "-")
        lane.publish({"type": "tap", "lane": lane.id, "source": source, **verdict.public()})

    def current_member(self, lane: Lane) -> validate.Verdict | None:
        hold = self.config["api"]["member_hold_s"]
        if lane.member and self.clock() - lane.member_at <= hold:
            return lane.member
        return None

    def quote(self, lane_id: str, request: dict) -> dict:
        return self.counter.quote(lane_id, request)

    async def commit_sale(self, lane_id: str, request: dict) -> Appended:
        """Price the basket again (the POS's numbers are not trusted), journal
        the sale durably, and only then answer (gateway/shell/counter.py)."""
        return await self.counter.sale(lane_id, request)

    # -- status -------------------------------------------------------------

    async def status(self) -> dict:
        backlog = await self.journal.backlog()
        rules = self.rules.current
        up = self.uplink.state
        return {
            "store": self.store_id,
            "uplink": "online" if up.connected else "offline",
            "last_hq_contact": up.last_hq_contact,
            "backlog": backlog["depth"],
            "oldest_unsent_age_s": backlog["oldest_age_s"],
            "last_seq": backlog["last_seq"],
            "acked_records": up.acked_records,
            "rejected_acks": up.rejected_acks,
            "rules_version": rules.version if rules else None,
            "rules_issued_at": rules.issued_at if rules else None,
            "rules_rejection": self.rules.last_rejection,
            "deny_version": self.rules.deny_version,
            "live_lookups": self.live.status(),
            "lanes": {lid: {"reader": (l.reader.kind if l.reader else "terminal"), "taps": l.taps,
                            "state": l.reader.state if l.reader else "terminal"}
                      for lid, l in self.lanes.items()},
            "faults": self.faults(),
            "clock": self.clock_check().public(),
            "stats": dict(self.stats),
            "http": self.http_stats(),
        }

    def faults(self) -> list[str]:
        faults = list(self.journal.faults) + list(self.counter.faults) + list(self.uplink.state.faults)
        if self.rules.last_rejection:
            faults.append(f"rules rejected: {self.rules.last_rejection}")
        clock_fault = self.clock_check().fault
        if clock_fault:
            faults.append(clock_fault)
        return faults

    async def status_message(self, state: str) -> Status:
        backlog = await self.journal.backlog()
        rules = self.rules.current
        readers = {lid: (l.reader.state if l.reader else "terminal") for lid, l in self.lanes.items()}
        readers.update({f"{lid}.{h.input_kind}{j}": h.state
                        for lid, l in self.lanes.items() for j, h in enumerate(l.inputs)})
        return Status(self.store_id, state, int(self.clock()), backlog["depth"], backlog["oldest_age_s"],
                      rules.version if rules else None, readers, self.faults(),
                      deny_version=self.rules.deny_version, rules_rejection=self.rules.last_rejection,
                      rules_issued_at=rules.issued_at if rules else None,
                      clock_offset_ms=self.clockwatch.hq.offset_ms if self.clockwatch.hq else None)

    def sim_reader(self, lane_id: str) -> SimulatedReader:
        reader = self.lane(lane_id).reader
        if not isinstance(reader, SimulatedReader):
            raise KeyError(f"lane {lane_id!r} has no simulated reader")
        return reader
