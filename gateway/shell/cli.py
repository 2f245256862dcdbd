"""`storegate`: the gateway.

    storegate run --config /etc/storegate/gateway.toml
    storegate status [--config FILE | --url http://127.0.0.1:8080 --token-file F]
    storegate terminals add ID --role pos|lane_terminal|service_desk|manager --lanes 1,2 --config FILE
    storegate terminals list|revoke ID --config FILE
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

from common import eventloop, journald, mqtt, sdnotify
from common.configfile import ConfigError
from common.version import package_version


async def serve(cfg: dict, *, ready=None) -> None:
    """Run the gateway and its POS API until SIGTERM/SIGINT."""
    from gateway.shell.api import create_app
    from gateway.shell.http_server import PosServer
    from gateway.shell.service import Gateway

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    from gateway.shell import terminals as gw_terminals

    registry = gw_terminals.Terminals(gw_terminals.default_path(cfg))
    async with Gateway(cfg) as gw:
        app = create_app(gw, registry)  # refuses to serve without terminal credentials
        gw_terminals.write_cli_token(cfg, registry)  # for `storegate status` on this box
        # Connection caps, deadlines and size limits: gateway/shell/http_server.py.
        async with PosServer.from_config(app, cfg["api"]) as server:
            logging.getLogger("storegate").info("POS API on %s://%s:%s (event loop: %s)", server.scheme,
                                                cfg["api"]["host"], server.port, type(loop).__module__.split(".")[0])
            gw.http_stats = lambda: dict(server.stats)
            if ready:
                ready(gw)
            # systemd (Type=notify): ready now that the journal is open and the API bound; watchdog pings
            # come from this loop (common/sdnotify.py, deploy/systemd/storegate-gateway.service).
            watchdog = sdnotify.ready(f"POS API on port {server.port}")
            try:
                await stop.wait()
            finally:
                sdnotify.stopping()
                if watchdog:
                    watchdog.cancel()


def _status(args) -> int:
    from gateway.shell import terminals as gw_terminals

    url, token = args.url, None
    if args.token_file:
        try:
            token = open(args.token_file).read().strip()
        except OSError as exc:
            print(f"--token-file {args.token_file}: {exc.strerror}", file=sys.stderr)
            return 2
    if args.config:
        from gateway.shell import config as gw_config
        cfg = gw_config.load(args.config)
        if url is None:
            host = cfg["api"]["host"]
            scheme = "https" if "tls" in cfg["api"] else "http"
            url = f"{scheme}://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{cfg['api']['port']}"
        token = token or gw_terminals.read_cli_token(cfg)
        if token is None:
            print(f"no credential to ask the gateway with: {gw_terminals.cli_token_path(cfg)} is missing or "
                  "unreadable (the running gateway writes it; run this as root or the storegate user)",
                  file=sys.stderr)
            return 2
    url = url or "http://127.0.0.1:8080"

    def fetch() -> dict:
        request = urllib.request.Request(url.rstrip("/") + "/status",
                                         headers={"Authorization": f"Bearer {token}"} if token else {})
        with urllib.request.urlopen(request, timeout=5, context=_tls_context(url)) as resp:
            return json.load(resp)

    try:
        status = fetch()
        if args.json:
            print(json.dumps(status, indent=2, ensure_ascii=False))
            return 0
        print(render_status(status))
        if args.watch:
            _watch_drain(fetch, status)
    except urllib.error.HTTPError as exc:
        print(f"gateway at {url} refused: HTTP {exc.code} {exc.read()[:300].decode(errors='replace')}",
              file=sys.stderr)
        return 1
    except (urllib.error.URLError, OSError) as exc:
        print(f"gateway at {url} is not answering: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print()
    return 0


def _tls_context(url: str):
    """The box's own API over HTTPS: its certificate is the store's, often
    self-signed, and we are talking to 127.0.0.1, so it is not verified."""
    if not url.startswith("https:"):
        return None
    import ssl
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def _terminals(args) -> int:
    from gateway.shell import config as gw_config
    from gateway.shell import terminals as gw_terminals

    cfg = gw_config.load(args.config)
    path = gw_terminals.default_path(cfg)
    try:
        if args.action == "add":
            lanes = [lane.strip() for lane in (args.lanes or "").split(",") if lane.strip()]
            known = {lane["id"] for lane in cfg["lanes"]}
            unknown = [lane for lane in lanes if lane != gw_terminals.ALL_LANES and lane not in known]
            if unknown:
                print(f"--lanes: this store has no lane {', '.join(unknown)} (lanes: {', '.join(sorted(known))})",
                      file=sys.stderr)
                return 2
            token = gw_terminals.add(path, args.id, args.role, lanes)
            print(f"terminal {args.id} ({args.role}, lanes {', '.join(lanes)}) added to {path}.\n"
                  f"Its token, shown once (configure it on the terminal; it sends "
                  f"'Authorization: Bearer <token>'):\n{token}")
        elif args.action == "revoke":
            t = gw_terminals.revoke(path, args.id)
            print(f"terminal {t.id} revoked; the running gateway refuses it within a second")
        else:
            rows = sorted(gw_terminals.read_file(path).values(), key=lambda t: t.id)
            if args.json:
                print(json.dumps([t.public() for t in rows], indent=2))
            else:
                print(f"{'terminal':<20} {'role':<14} {'lanes':<16} state")
                for t in rows:
                    state = "revoked" if t.revoked_at else "active"
                    print(f"{t.id:<20} {t.role:<14} {','.join(t.lanes):<16} {state}")
    except gw_terminals.TerminalsError as exc:
        print(exc, file=sys.stderr)
        return 2
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
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the gateway")
    run.add_argument("--config", required=True)
    st = sub.add_parser("status", help="show the running gateway's status")
    st.add_argument("--config")
    st.add_argument("--url")
    st.add_argument("--token-file", help="a terminal token to ask with (default: the gateway's CLI token)")
    st.add_argument("--json", action="store_true")
    st.add_argument("--watch", action="store_true", help="show a progress bar until the backlog has drained")
    term = sub.add_parser("terminals", help="POS terminal credentials: add, list, revoke")
    term.add_argument("action", choices=["add", "list", "revoke"])
    term.add_argument("id", nargs="?")
    term.add_argument("--role", choices=["pos", "lane_terminal", "service_desk", "manager"])
    term.add_argument("--lanes", help="comma-separated lane ids, or '*' for every lane")
    term.add_argument("--json", action="store_true")
    term.add_argument("--config", required=True)
    dev = sub.add_parser("devices", help="list PC/SC readers and input devices with the config line for each")
    dev.add_argument("--json", action="store_true")
    dev.add_argument("--input-dir", default="/dev/input", help=argparse.SUPPRESS)  # for tests
    args = parser.parse_args(argv)

    if args.command == "terminals":
        if args.action in ("add", "revoke") and not args.id:
            parser.error(f"terminals {args.action}: give the terminal id")
        if args.action == "add" and not args.role:
            parser.error("terminals add: --role is required")
    if args.command in ("status", "terminals"):
        try:
            return _status(args) if args.command == "status" else _terminals(args)
        except ConfigError as exc:
            print(exc, file=sys.stderr)
            return 2
    if args.command == "devices":
        from gateway.shell.devices import main as devices_main
        return devices_main(as_json=args.json, input_dir=args.input_dir)
    from gateway.shell import config as gw_config
    try:
        cfg = gw_config.load(args.config)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    journald.configure(cfg["logging"]["level"])  # <N> priorities when stderr is the journal
    try:
        mqtt.make_tls_context(cfg["mqtt"])  # a missing TLS file stops start-up here, naming its key
    except ConfigError as exc:
        print(f"config error in {args.config}: {exc}", file=sys.stderr)
        return 2
    from gateway.shell.terminals import Terminals, TerminalsError, default_path
    try:
        if not Terminals(default_path(cfg)).configured():  # before anything starts: say how, and stop
            raise TerminalsError(
                f"api.terminals_file: no POS terminal credentials in {default_path(cfg)}; add one with "
                f"`storegate terminals add pos-1 --role pos --lanes 1,2 --config {args.config}`")
    except TerminalsError as exc:
        print(f"config error in {args.config}: {exc}", file=sys.stderr)
        return 2
    from gateway.shell.http_server import StartError
    try:
        eventloop.run(serve(cfg))
    except StartError as exc:  # a port in use, a missing certificate: say which key, do not loop
        print(f"cannot start: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
