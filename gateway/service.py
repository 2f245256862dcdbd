"""The gateway service: readers -> validation -> indicator and POS; sales ->
journal -> uplink. This is the imperative shell around gateway.engine."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

from gateway import engine, lane_faults, runtime
from gateway.counter import Counter
from gateway.qr_replay import MemberQrCheck, ReplayStore
from gateway.rules_store import RulesStore
from gateway.secure_nfc import SecureNfc
from gateway.store.journal import Appended, Journal
from gateway.uplink import Uplink, UplinkSettings
from hardware.indicators import GpioIndicator, Indicator, SimulatedIndicator
from hardware.readers import CardRead, CardReader, SimulatedReader
from wire.messages import Status

log = logging.getLogger("storegate.gateway")

EVENT_BACKLOG = 256  # events per lane kept for reconnecting POS terminals


class NoMember(ValueError):
    """A member sale was asked for on a lane where no member card was accepted."""


class QuoteChanged(ValueError):
    """The POS's expected total no longer matches the price (rules changed)."""


class LaneEvent(dict):
    """An event on a lane (a dict, as the POS receives it) and its id."""

    def __init__(self, event: dict, event_id: str) -> None:
        super().__init__(event)
        self.id = event_id


@dataclass
class Lane:
    id: str
    reader: CardReader | None  # None: a lane terminal that posts its reads
    indicator: Indicator
    member: engine.Verdict | None = None
    member_at: float = 0.0
    member_read: tuple[str, str] | None = field(default=None, repr=False)  # (source, identified raw): re-validated per quote
    taps: int = 0
    listeners: set = field(default_factory=set)  # asyncio.Queue per SSE client
    inputs: list = field(default_factory=list)  # keyboard-wedge readers ([[lanes.hid]], hardware/hid.py)
    # The lane's recent events with their ids "<boot>-<n>", so a POS that
    # reconnects with Last-Event-ID gets what it missed, once.
    recent: deque = field(default_factory=lambda: deque(maxlen=EVENT_BACKLOG))
    boot: str = field(default_factory=lambda: f"{time.time_ns() // 1_000_000:x}")
    _event_n: int = 0

    def publish(self, event: dict) -> None:
        self._event_n += 1
        item = LaneEvent(event, f"{self.boot}-{self._event_n}")
        self.recent.append(item)
        for q in list(self.listeners):
            if q.full():
                q.get_nowait()  # a slow listener loses the oldest event, not the newest
            q.put_nowait(item)

    @property
    def last_event_id(self) -> str:
        return f"{self.boot}-{self._event_n}"

    def event_seq(self, event_id: str | None) -> int:
        """The number of one of this boot's event ids; 0 for none or another boot's."""
        boot, _, n = (event_id or "").partition("-")
        return int(n) if boot == self.boot and n.isdigit() and len(n) < 19 else 0

    def events_after(self, last_event_id: str | None) -> list["LaneEvent"]:
        """What a POS that saw ``last_event_id`` has not: nothing for a new
        stream; everything kept for an id of an earlier boot."""
        if not last_event_id:
            return []
        after = self.event_seq(last_event_id)
        return [e for e in self.recent if self.event_seq(e.id) > after]


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
        self.lanes: dict[str, Lane] = {}
        for lane_cfg in config["lanes"]:
            self.lanes[lane_cfg["id"]] = Lane(lane_cfg["id"], build_reader(lane_cfg),
                                              build_indicator(lane_cfg, pin_factory), inputs=build_inputs(lane_cfg))
        self.qr = MemberQrCheck(ReplayStore(data_dir / "qr_replay.sqlite3"))
        # NTAG 424 DNA SUN checks with the keys that come with the rules (gateway/secure_nfc.py).
        self.secure_nfc = SecureNfc(data_dir / "sun_counters.sqlite", lambda: self.rules.current,
                                    rules_path=self.rules.path)
        for lane in self.lanes.values():
            self.secure_nfc.attach(lane.reader)
        self.counter = Counter(self, data_dir / "counter.db")
        self.uplink = Uplink(config["mqtt"], self.store_id, self.journal, self.rules, self.status_message,
                             UplinkSettings(**config["uplink"]), on_connection_change=self._on_link)
        # HQ's live answers are held as long as the lane holds its member, for the counter's re-validation.
        self.live = self.uplink.live
        self.live.clock = clock
        self.live.cache.hold_s = config["api"]["member_hold_s"]
        self.started_at = clock()
        self.http_stats = lambda: {}  # the POS API server's counters, once it serves (gateway/cli.py)
        self._tasks: list[asyncio.Task] = []
        self.stats = {"taps": 0, "accepted": 0, "denied": 0, "retries": 0, "sales": 0}

    # -- lifetime -----------------------------------------------------------

    async def __aenter__(self) -> "Gateway":
        self.rules.load()
        runtime.tune_gc()  # the rules are loaded: freeze them out of GC passes (gateway/runtime.py)
        await self.journal.open()
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
        self.counter.close()
        self.secure_nfc.close()
        self.qr.close()

    def _on_link(self, up: bool) -> None:
        for lane in self.lanes.values():
            lane.indicator.show("online" if up else "offline")

    async def _read_loop(self, lane: Lane, reader: CardReader | None = None) -> None:
        async for read in (reader or lane.reader).reads():
            try:
                if isinstance(read, CardRead):
                    await self.handle_read(read)
                else:  # a failed read (card pulled away mid-read): the member taps again
                    source = getattr(read, "source", "nfc")  # hardware/hid.py SwipeAgain: a bad swipe or scan
                    again = {"magstripe": "swipe_again", "qr": "scan_again"}.get(source, "tap_again")
                    self.show_verdict(lane, source, engine.Verdict("retry", again))
            except Exception:  # one bad read must not stop the lane
                log.exception("lane %s: tap handling failed", lane.id)

    # -- counter ------------------------------------------------------------

    def now(self) -> datetime:
        return datetime.fromtimestamp(self.clock(), self.tz)

    def lane(self, lane_id: str) -> Lane:
        try:
            return self.lanes[lane_id]
        except KeyError:
            raise KeyError(f"unknown lane {lane_id!r}; this store has lanes {sorted(self.lanes)}") from None

    async def handle_read(self, read: CardRead) -> engine.Verdict:
        lane = self.lane(read.lane)
        # Secure NFC cards (SUN): refused here, or raw becomes the UID the message authenticated.
        read, refused = await self.secure_nfc.check(read, self.rules.current)
        if refused:
            self.show_verdict(lane, read.source, refused)
            return refused
        raw = read.raw
        if read.source == "qr":  # a dynamic member code: verified and claimed once, then its card number
            raw, refused = self.qr.identify(raw, self.rules.current, self.clock())
            if refused:
                verdict = engine.Verdict("deny", refused)
                self.show_verdict(lane, read.source, verdict)
                return verdict
        rules = self.rules.current
        await self.ask_hq(read.source, raw, rules)
        verdict = self.counter.validate(read.source, raw)  # HQ's rules and snapshot, then this store's own records
        self.show_verdict(lane, read.source, verdict)
        if verdict.accepted:
            lane.member_read = (read.source, raw)
        return verdict

    async def ask_hq(self, source: str, raw: str, rules: engine.Rules | None) -> None:
        """While online: HQ's live account for the card, within the tap's
        budget (uplink.live_lookup_ms), held where engine.validate finds it
        (gateway/live_accounts.py) for the quote and sale that follow.
        Offline, past the wait, or for a card refused anyway: nothing held,
        the store decides from its snapshot (an earlier answer is let go, so
        the tap and the counter's re-validation use the view the tap shows)."""
        if rules is None:
            return
        card_no, _ = engine.card_number_of(source, raw, rules)
        if card_no is None:
            return
        if not self.live.online or not 6 <= len(card_no) <= 19 or rules.members.denied(card_no) \
                or engine.program_for(card_no, rules)[2]:
            self.live.cache.forget(card_no)
            return
        rules.members.live = self.live.cache   # the member store the engine reads (it may be a new one)
        try:
            if await self.live.lookup(card_no) is None:
                self.live.cache.forget(card_no)
        except Exception:   # a look-up must never cost the tap: decide from the snapshot
            self.live.cache.forget(card_no)
            log.exception("live account look-up failed")

    def show_verdict(self, lane: Lane, source: str, verdict: engine.Verdict) -> None:
        """The counter side of a verdict: indicator, lane state, POS event, log."""
        lane.indicator.show(verdict.pattern)
        lane.taps += 1
        self.stats["taps"] += 1
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
                 verdict.reason, engine.mask_card(verdict.card_no) if verdict.card_no else "-")
        lane.publish({"type": "tap", "lane": lane.id, "source": source, **verdict.public()})

    def current_member(self, lane: Lane) -> engine.Verdict | None:
        hold = self.config["api"]["member_hold_s"]
        if lane.member and self.clock() - lane.member_at <= hold:
            return lane.member
        return None

    def quote(self, lane_id: str, request: dict) -> dict:
        return self.counter.quote(lane_id, request)

    async def commit_sale(self, lane_id: str, request: dict) -> Appended:
        """Price the basket again (the POS's numbers are not trusted), journal
        the sale durably, and only then answer (gateway/counter.py)."""
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
            "stats": dict(self.stats),
            "http": self.http_stats(),
        }

    def faults(self) -> list[str]:
        faults = list(self.journal.faults) + list(self.counter.faults) + list(self.uplink.state.faults)
        if self.rules.last_rejection:
            faults.append(f"rules rejected: {self.rules.last_rejection}")
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
                      rules_issued_at=rules.issued_at if rules else None)

    def sim_reader(self, lane_id: str) -> SimulatedReader:
        reader = self.lane(lane_id).reader
        if not isinstance(reader, SimulatedReader):
            raise KeyError(f"lane {lane_id!r} has no simulated reader")
        return reader


def quote_error_status(exc: Exception) -> tuple[int, str]:
    """HTTP status and error code for an error from quote/commit."""
    mapping: dict[type, tuple[int, str]] = {
        engine.BasketError: (400, "bad_request"),
        NoMember: (409, "no_member"),
        QuoteChanged: (409, "quote_changed"),
    }
    for cls, answer in mapping.items():
        if isinstance(exc, cls):
            return answer
    return 500, "internal"

