"""Tap latency: the software path from a card event to the verdict and the
indicator call, per source, p50 and p99.

    python -m bench.tap [--quick]

One gateway (gateway.shell.service.Gateway, with its real read loops) and one
lane per source. The end of every measurement is the lane indicator's
show() call with the verdict's pattern. Where each one starts:

- nfc_pcsc: an NTAG215 emulated on vpcd, pyscard -> a private pcscd -> vpcd
  (tests/pcsc_env.py, tests/vcard.py). From the moment PcscReader's thread
  saw the card arrive (SCardGetStatusChange returned; NfcRead.at) through
  connect, UID APDU, disconnect, the hand-off to asyncio, validation and the
  indicator. How long pcscd takes to notice a card entering the field is
  vpcd's poll, not ours, and reported apart as insert_to_indicator_*.
  Baseline: the bare PC/SC read alone in the same run (SCardConnect,
  FF CA 00 00 00, SCardDisconnect on the same card).
  The virtual card acknowledges every TCP segment from vpcd at once
  (TCP_QUICKACK, set here in the bench only): vpcd writes a message's
  length and its body separately, so with Nagle on its side and delayed
  ACKs on ours every APDU waited ~40 ms on loopback TCP (measured: a bare
  UID read took 44 ms instead of 0.2 ms). That is the test double's
  transport, not a USB reader's, and not ours.
- nfc: a CardRead (the UID) straight into Gateway.handle_read, no PC/SC.
- magstripe: a real swipe as the kernel's input_event structs (shift, the
  track characters, Enter) written to the simulated device's pipe; from
  just before the write, through HidReader's add_reader callback,
  python-evdev's event reader, our decoder and ISO 7813 parser, the
  gateway's read loop, validation and the indicator.
- qr: a fresh dynamic member code per tap (the clock moves one step per
  tap) into Gateway.handle_read: two Ed25519 verifications, the replay
  claim in SQLite (WAL, synchronous=FULL: one fsync), validation and the
  indicator.

Baseline for nfc, magstripe and qr: engine.validate alone on the same card
and rules, in the same run: what the gateway adds around the pure decision.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import socket
import tempfile
import time
import tomllib
from pathlib import Path

from bench.common import args, emit, note
from common import eventloop
from gateway.shell import config as gw_config
from gateway.core import validate as engine
from gateway.shell.service import Gateway
from hardware.hid import DeviceGone, SimulatedInputDevice, key_events
from cards.member_qr import Issuer, MemberApp
from hardware.readers import CardRead
from tests.support import install_rules, test_hq_public_key

ROOT = Path(__file__).resolve().parent.parent
RULES_FILE = ROOT / "deploy" / "examples" / "rules.demo.toml"
UID = "04A1B2C3D4E5F6"          # 880000000013, gold: an accepted card
CARD = "880000000013"
SWIPE = f"%B{CARD}^WANG/XIAOMING^27121010000000?;{CARD}=27121010000?"
NOW = int(time.time())          # rules are issued now; the QR lane's clock moves on from here
QR_ISSUER = Issuer("hq-bench")  # HQ's member-credential key for this run
LANE_PATTERNS = {"accept", "deny", "tap_again"}


def rule_doc() -> dict:
    """The demo rule set with a member_qr section for this run's issuer key."""
    doc = tomllib.loads(RULES_FILE.read_text(encoding="utf-8"))
    doc["member_qr"] = {"issuer_public_keys": {QR_ISSUER.key_id: QR_ISSUER.public_key_b64}, "step_s": 30,
                        "window_steps": 1, "static_codes": True}
    return doc


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def report(source: str, values_ms: list[float], baseline: str, base_ms: list[float], **extra) -> None:
    for metric, p in (("tap_p50_ms", 50), ("tap_p99_ms", 99)):
        emit(metric, pct(values_ms, p), "ms", baseline, pct(base_ms, p), source=source, n=len(values_ms), **extra)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Stopwatch:
    """Wraps a lane indicator: records when show() is called with a lane pattern."""

    def __init__(self, indicator) -> None:
        self.shown = asyncio.Event()
        self.at_perf = self.at_wall = 0.0
        original = indicator.show

        def show(pattern):
            value = getattr(pattern, "value", pattern)
            if value in LANE_PATTERNS:
                self.at_perf, self.at_wall = time.perf_counter(), time.time()
                self.pattern = value
                self.shown.set()
            return original(pattern)

        indicator.show = show

    async def wait(self, timeout: float = 10.0) -> None:
        await asyncio.wait_for(self.shown.wait(), timeout)
        self.shown.clear()


def baseline_validate(source: str, raw: str, rules, n: int, now) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        engine.validate(source, raw, rules, now)
        out.append((time.perf_counter() - t0) * 1000)
    return out


async def bench_nfc(gw: Gateway, watch: Stopwatch, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        await gw.handle_read(CardRead("nfc", "nfc", UID, NOW))
        await watch.wait()
        out.append((watch.at_perf - t0) * 1000)
    assert watch.pattern == "accept", watch.pattern
    return out


async def bench_qr(gw: Gateway, watch: Stopwatch, clock: list[float], n: int) -> list[float]:
    app = MemberApp.enrol(QR_ISSUER, "M1001", CARD, NOW - 60, NOW + 30 * n + 60)
    codes = [app.code(NOW + 30 * i) for i in range(n)]   # minted on the phone, not timed
    out = []
    for i, code in enumerate(codes):
        clock[0] = NOW + 30 * i
        t0 = time.perf_counter()
        verdict = await gw.handle_read(CardRead("qr", "qr", code, clock[0]))
        await watch.wait()
        out.append((watch.at_perf - t0) * 1000)
        assert verdict.verdict == "accept", verdict.reason
    return out


async def bench_magstripe(device: SimulatedInputDevice, watch: Stopwatch, n: int) -> list[float]:
    events = key_events(SWIPE, time.time(), 0.002)
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        device.send(events)
        await watch.wait()
        out.append((watch.at_perf - t0) * 1000)
    assert watch.pattern == "accept", watch.pattern
    return out


async def bench_nfc_pcsc(base: Path, n: int, n_base: int) -> tuple[list[float], list[float], list[float]] | None:
    try:
        from tests import pcsc_env
        from tests.vcard import Ntag215

        daemon = pcsc_env.PcscDaemon(base / "pcscd")
        daemon.start()
    except Exception as missing:  # no pcscd/vpcd here: say so, measure the rest
        note(f"nfc_pcsc skipped: {missing}")
        return None
    from smartcard import scard

    import tests.vcard as vcard

    recv_exact = vcard._recv_exact

    def recv_quickack(sock, n):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)  # see the module doc
        return recv_exact(sock, n)

    vcard._recv_exact = recv_quickack
    try:
        cfg = gw_config.check({
            "store": {"id": "S001", "data_dir": str(base / "store-pcsc")},
            "mqtt": {"host": "127.0.0.1", "port": free_port()},
            "rules": {"hq_public_keys": [test_hq_public_key()]},
            "lanes": [{"id": "1", "reader": "pcsc", "pcsc_reader": pcsc_env.READER_NAME}],
        })
        async with Gateway(cfg) as gw:
            install_rules(gw, [rule_doc()], now=NOW)
            watch = Stopwatch(gw.lanes["1"].indicator)
            started: list[float] = []
            handle = gw.handle_read

            async def timed_handle(read):
                started.append(read.at)   # wall clock when the reader thread saw the card
                return await handle(read)

            gw.handle_read = timed_handle
            while gw.lanes["1"].reader.state != "ready":
                await asyncio.sleep(0.05)
            card = Ntag215(daemon.port, UID)
            software, field = [], []
            for i in range(n + 1):
                inserted = time.time()
                card.insert()
                await watch.wait(15)
                if i:  # the first tap warms up pcscd's and pyscard's paths
                    software.append((watch.at_wall - started[-1]) * 1000)
                    field.append((watch.at_wall - inserted) * 1000)
                card.remove()
                await asyncio.sleep(0.3)
            assert watch.pattern == "accept", watch.pattern

            # Baseline: the bare PC/SC read of the same card through the same stack.
            card.insert()
            await watch.wait(15)
            hr, ctx = scard.SCardEstablishContext(scard.SCARD_SCOPE_USER)
            bare = []
            for _ in range(n_base):
                t0 = time.perf_counter()
                hr, handle_, proto = scard.SCardConnect(ctx, pcsc_env.READER_NAME, scard.SCARD_SHARE_SHARED,
                                                        scard.SCARD_PROTOCOL_T0 | scard.SCARD_PROTOCOL_T1)
                assert hr == scard.SCARD_S_SUCCESS, scard.SCardGetErrorMessage(hr)
                hr, resp = scard.SCardTransmit(handle_, proto, list(bytes.fromhex("FFCA000000")))
                scard.SCardDisconnect(handle_, scard.SCARD_LEAVE_CARD)
                bare.append((time.perf_counter() - t0) * 1000)
                assert bytes(resp[-2:]) == b"\x90\x00"
            scard.SCardReleaseContext(ctx)
            card.remove()
        return software, field, bare
    finally:
        vcard._recv_exact = recv_exact
        daemon.stop()


async def main() -> None:
    opts = args("Tap latency from card event to verdict and indicator, per source")
    logging.basicConfig(level=logging.ERROR)   # the uplink has no broker here: its retries are not news
    base = Path(opts.dir or tempfile.mkdtemp(prefix="sg-bench-tap-", dir=os.environ.get("BENCH_DIR")))
    base.mkdir(parents=True, exist_ok=True)
    n_fast, n_qr, n_swipe, n_pcsc = (300, 100, 100, 8) if opts.quick else (3000, 1000, 1000, 30)

    pcsc = await bench_nfc_pcsc(base, n_pcsc, 50 if opts.quick else 200)

    clock = [float(NOW)]
    cfg = gw_config.check({
        "store": {"id": "S001", "data_dir": str(base / "store")},
        "mqtt": {"host": "127.0.0.1", "port": free_port()},
        "rules": {"hq_public_keys": [test_hq_public_key()]},
        "lanes": [{"id": "nfc", "reader": "simulated"}, {"id": "qr", "reader": "simulated"},
                  {"id": "msr", "reader": "terminal", "hid": [{"kind": "magstripe", "usb": "0801:0001"}]}],
    })
    gw = Gateway(cfg, clock=lambda: clock[0])
    swiper = SimulatedInputDevice("bench swipe reader")

    def finder(selector):
        if swiper.closed:
            raise DeviceGone("absent", "closed")
        return swiper

    gw.lanes["msr"].inputs[0].finder = finder
    async with gw:
        install_rules(gw, [rule_doc()], now=NOW)
        rules, now = gw.rules.current, gw.now()
        while gw.lanes["msr"].inputs[0].state != "ready":
            await asyncio.sleep(0.01)
        nfc = await bench_nfc(gw, Stopwatch(gw.lanes["nfc"].indicator), n_fast)
        swipes = await bench_magstripe(swiper, Stopwatch(gw.lanes["msr"].indicator), n_swipe)
        qr = await bench_qr(gw, Stopwatch(gw.lanes["qr"].indicator), clock, n_qr)

    validate = "engine.validate alone, same card and rules, same run"
    if pcsc is not None:
        software, field, bare = pcsc
        report("nfc_pcsc", software, "bare PC/SC UID read (SCardConnect + FF CA + SCardDisconnect) "
               "through the same pcscd+vpcd, same run", bare,
               insert_to_indicator_p50_ms=round(pct(field, 50), 3),
               insert_to_indicator_p99_ms=round(pct(field, 99), 3))
    report("nfc", nfc, validate, baseline_validate("nfc", UID, rules, n_fast, now))
    report("magstripe", swipes, validate, baseline_validate("magstripe", CARD, rules, n_fast, now))
    report("qr", qr, validate, baseline_validate("qr", CARD, rules, n_fast, now))


if __name__ == "__main__":
    eventloop.run(main())  # the gateway's own loop (common/eventloop.py)
