"""`storegate`: the gateway.

    storegate run --config /etc/storegate/gateway.toml
    storegate status [--config FILE | --url http://127.0.0.1:8080]
    storegate demo
    storegate devices [--json]    # PC/SC readers and input devices, with the config lines selecting them
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
import time
import urllib.error
import urllib.request

from common import eventloop
from common.configfile import ConfigError


async def serve(cfg: dict, *, ready=None) -> None:
    """Run the gateway and its POS API until SIGTERM/SIGINT."""
    from gateway.api import create_app
    from gateway.service import Gateway

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with Gateway(cfg) as gw:
        app = create_app(gw)
        server = asyncio.create_task(app.start_server(host=cfg["api"]["host"], port=cfg["api"]["port"]))
        logging.getLogger("storegate").info("POS API on %s:%s (event loop: %s)", cfg["api"]["host"],
                                            cfg["api"]["port"], type(loop).__module__.split(".")[0])
        if ready:
            ready(gw)
        await stop.wait()
        app.shutdown()
        # uvloop's Server.close() does not wake serve_forever() as asyncio's
        # does; Microdot takes the cancellation as the end of serving.
        server.cancel()
        await asyncio.wait_for(server, 5)


def _status(args) -> int:
    url = args.url
    if url is None:
        if args.config:
            from gateway import config as gw_config
            cfg = gw_config.load(args.config)
            host = cfg["api"]["host"]
            url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{cfg['api']['port']}"
        else:
            url = "http://127.0.0.1:8080"
    def fetch() -> dict:
        with urllib.request.urlopen(url.rstrip("/") + "/status", timeout=5) as resp:
            return json.load(resp)

    try:
        status = fetch()
        if args.json:
            print(json.dumps(status, indent=2, ensure_ascii=False))
            return 0
        print(render_status(status))
        if args.watch:
            _watch_drain(fetch, status)
    except (urllib.error.URLError, OSError) as exc:
        print(f"gateway at {url} is not answering: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print()
    return 0


def progress_line(peak: int, backlog: int, rate: float, width: int = 30) -> str:
    """``drain [#########.....]  61%  3,902 left  1,250 rec/s  ~3 s``"""
    done = peak - backlog
    frac = done / peak if peak else 1.0
    filled = int(frac * width)
    eta = f"  ~{backlog / rate:.0f} s" if rate > 0 and backlog else ""
    return (f"drain [{'#' * filled}{'.' * (width - filled)}] {frac * 100:4.0f}%  "
            f"{backlog:,} left  {rate:,.0f} rec/s{eta}")


def _watch_drain(fetch, status: dict, interval: float = 1.0) -> None:
    """Redraw a progress bar while the backlog drains; stop when it is empty."""
    peak = status["backlog"]
    last_backlog, last_t = peak, time.monotonic()
    rate = 0.0
    while True:
        backlog = status["backlog"]
        peak = max(peak, backlog)
        now = time.monotonic()
        if now > last_t:
            rate = 0.7 * rate + 0.3 * max(0.0, (last_backlog - backlog) / (now - last_t))
        last_backlog, last_t = backlog, now
        uplink = "" if status["uplink"] == "online" else "  (HQ unreachable)"
        print("\r" + progress_line(peak, backlog, rate) + uplink, end="", flush=True)
        if backlog == 0:
            print()
            return
        time.sleep(interval)
        status = fetch()


def _reader_state(lane: dict) -> str:
    state = lane.get("state")
    return f" {state}" if state and state not in ("ready", "terminal") else ""  # only what needs a look


def render_status(s: dict, now: float | None = None) -> str:
    now = time.time() if now is None else now
    contact = s.get("last_hq_contact")
    age = s.get("oldest_unsent_age_s")
    rows = [
        f"store            {s['store']}",
        f"uplink           {s['uplink']}",
        f"last HQ contact  {f'{now - contact:.0f} s ago' if contact else 'never'}",
        f"rules version    {s['rules_version'] if s['rules_version'] is not None else 'none'}",
        f"deny list        v{s.get('deny_version') or 0} (signed deltas applied)",
        f"backlog          {s['backlog']} record(s)" + (f", oldest {age:.0f} s" if age is not None else ""),
        f"delivered        {s['acked_records']} acked by HQ since start, last seq {s['last_seq']}",
        "lanes            " + ", ".join(f"{lid} ({l['reader']}{_reader_state(l)}, {l['taps']} taps)" for lid, l in s["lanes"].items()),
    ]
    for fault in s.get("faults", []):
        rows.append(f"FAULT            {fault}")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="storegate", description="storegate in-store gateway")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the gateway")
    run.add_argument("--config", required=True)
    st = sub.add_parser("status", help="show the running gateway's status")
    st.add_argument("--config")
    st.add_argument("--url")
    st.add_argument("--json", action="store_true")
    st.add_argument("--watch", action="store_true", help="show a progress bar until the backlog has drained")
    demo = sub.add_parser("demo", help="run a whole store on this machine with simulated readers")
    dev = sub.add_parser("devices", help="list PC/SC readers and input devices with the config line for each")
    dev.add_argument("--json", action="store_true")
    dev.add_argument("--input-dir", default="/dev/input", help=argparse.SUPPRESS)  # for tests
    demo.add_argument("--keep", action="store_true", help="keep the demo's working directory")
    args = parser.parse_args(argv)

    if args.command == "status":
        try:
            return _status(args)
        except ConfigError as exc:
            print(exc, file=sys.stderr)
            return 2
    if args.command == "devices":
        from gateway.devices import main as devices_main
        return devices_main(as_json=args.json, input_dir=args.input_dir)
    if args.command == "demo":
        from gateway.demo import run_demo
        return asyncio.run(run_demo(keep=args.keep))
    from gateway import config as gw_config
    try:
        cfg = gw_config.load(args.config)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    logging.basicConfig(level=cfg["logging"]["level"], format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    eventloop.run(serve(cfg))
    return 0


if __name__ == "__main__":
    sys.exit(main())
