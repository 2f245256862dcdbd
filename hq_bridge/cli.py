"""`storegate-hq`: the HQ side.

    storegate-hq run --config hq.toml
    storegate-hq rules publish FILE (--store S | --region R | --all) [--members F] [--deny F] --config hq.toml
    storegate-hq rules snapshot (--store S | --region R | --all) [--members F] [--deny F] --config hq.toml
    storegate-hq rules republish (--store S | --region R | --all) --config hq.toml
    storegate-hq card deny|freeze|unfreeze|replace CARD --reason TEXT [--status lost] [--new-card N] --config hq.toml
    storegate-hq fleet --config hq.toml [--wait 2] [--json]
    storegate-hq keys generate|rotate [--promote]|show --config hq.toml
    storegate-hq members add|import FILE|show CARD [--json]|card OP CARD --config hq.toml
    storegate-hq reconcile [--json] [--settle ACCOUNT ...] --config hq.toml
    storegate-hq nightly [--no-snapshots] [--json] --config hq.toml   # tiers, points expiry, reconciliation, fresh snapshots
    storegate-hq topup-refund TX_ID --config hq.toml
    storegate-hq review [--json] [--store S] | review resolve STORE SEQ --config hq.toml

Every command that opens HQ's database (hq.database: an SQLite path or a
postgresql+psycopg:// URL) brings it to the newest schema first (Alembic,
hq_bridge/migrations; an SQLite ledger from before migrations is adopted).

More subcommands plug in before ``main`` runs: ``register_command(name,
register_fn, run_fn)`` (a module's ``register(subparsers)`` and ``run(args,
engine, *, publish)``), or ``register(add)`` where ``add(subparsers)`` adds a
parser with ``set_defaults(handler=fn)`` and ``fn(args, cfg) -> int`` runs with
the loaded config (``open_hq(cfg)`` opens the database).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
import time

import aiomqtt
from sqlalchemy.exc import SQLAlchemyError

from common import eventloop, journald, mqtt, runtime, sdnotify
from common.configfile import ConfigError
from common.version import package_version
from hq_bridge import config as hq_config
from hq_bridge import keys as hq_keys
from hq_bridge import members, policy, reconcile, review
from hq_bridge.bridge import Bridge
from hq_bridge.lookup import LookupService
from hq_bridge.ledger import Ledger
from hq_bridge.rules import DENY_ITEM, Catalog, PublishError, Publisher
from wire.messages import CLOCK_TOLERANCE_S, Status, WireError
from wire.ruleset import RulesetError
from wire.topics import Topics


_EXTRA: list = [members.register, reconcile.register, policy.register, review.register]
NIGHTLY_RECONCILE_DAYS = 2   # the history the nightly reconciliation reads: today's and yesterday's late records
_RUNNERS: dict = {
    "members": members.run,
    "reconcile": reconcile.run,
    "review": review.run,
    "topup-refund": lambda args, engine, publish: policy.run(args, engine),
}


def register(add) -> None:
    """Add a subcommand: ``add(subparsers)`` is called when the parser is
    built; its parser sets ``handler=fn(args, cfg) -> exit code``."""
    _EXTRA.append(add)


def register_command(name: str, register_fn, run_fn) -> None:
    """A module's subcommand ``name``: ``register_fn(subparsers)`` adds its
    parser (with ``--config``); ``run_fn(args, engine, *, publish)`` runs it
    on HQ's database (migrated) and returns the exit code; ``publish(entries,
    reason)`` sends deny-delta entries to every store (None without
    hq.signing_key)."""
    _EXTRA.append(register_fn)
    _RUNNERS[name] = run_fn


def _run_registered(run_fn, args, cfg: dict) -> int:
    ledger = open_hq(cfg)
    try:
        return run_fn(args, ledger.engine, publish=_deny_publisher(cfg, ledger))
    finally:
        ledger.close()


def _deny_publisher(cfg: dict, ledger: Ledger):
    """``publish(entries, reason)``: a signed deny delta to every store, kept
    in the outbox first (the bridge sends it if the broker is down: the
    caller sees MqttError); None without hq.signing_key."""
    if not cfg["hq"].get("signing_key"):
        return None
    publisher = make_publisher(cfg, ledger)

    def publish(entries: list[dict], reason: str):
        return asyncio.run(publisher.deny_entries(entries, reason)) if entries else None
    return publish


def open_hq(cfg: dict) -> Ledger:
    """HQ's database (migrated to the newest schema) as a Ledger; its
    ``engine`` and ``accounts`` serve any other HQ command."""
    return Ledger(hq_config.database_url(cfg))


def make_publisher(cfg: dict, ledger: Ledger) -> Publisher:
    key = cfg["hq"].get("signing_key")
    if not key:
        raise hq_keys.KeyFileError("hq.signing_key: required to sign rule sets (create one with "
                                   "`storegate-hq keys generate`)")
    catalog = Catalog(parts_dir=cfg["hq"].get("parts_dir"), engine=ledger.engine)
    return Publisher(cfg["mqtt"], ledger, catalog, key, cfg["stores"])


async def _run(cfg: dict) -> None:
    ledger = open_hq(cfg)
    runtime.tune_gc()  # a batch allocates ~100 containers a record: keep GC passes off the loaded modules
    publisher = make_publisher(cfg, ledger) if cfg["hq"].get("signing_key") else None
    if publisher is None:
        logging.getLogger("storegate.hq").warning("no hq.signing_key: resync requests from stores go unanswered")
    bridge = Bridge(cfg["mqtt"], ledger, publisher=publisher, client_id=cfg["hq"]["client_id"],
                    share_group=cfg["hq"]["share_group"],
                    resync_min_interval_s=cfg["hq"]["resync_min_interval_s"])
    task = asyncio.create_task(bridge.run())
    # Live account look-ups for the stores' taps, on a client of its own
    # (a shared subscription: several HQ workers may answer).
    lookup = asyncio.create_task(LookupService(cfg["mqtt"], ledger.engine).run(), name="hq-lookup")
    task.add_done_callback(lambda _t: lookup.cancel())
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, task.cancel)
    # systemd (Type=notify): ready once the database is open; watchdog pings from this loop.
    watchdog = sdnotify.ready("ingesting")
    try:
        await task
    except asyncio.CancelledError:
        pass
    finally:
        sdnotify.stopping()
        if watchdog:
            watchdog.cancel()
        await asyncio.gather(lookup, return_exceptions=True)
        ledger.close()


async def fleet_status(mqtt_settings: dict, wait_s: float = 2.0) -> dict[str, dict]:
    """Every store's retained status message (collected for ``wait_s``)."""
    topics = Topics(mqtt_settings.get("prefix", "sg/v1"))
    out: dict[str, dict] = {}
    async with mqtt.client(mqtt_settings, identifier=f"storegate-hq-fleet-{os.getpid()}") as client:
        await client.subscribe(topics.all_status(), qos=1)
        try:
            async with asyncio.timeout(wait_s):
                async for message in client.messages:
                    try:
                        store = topics.store_of(str(message.topic))
                        out[store] = Status.decode(message.payload).__dict__
                    except (ValueError, WireError) as exc:
                        out.setdefault(str(message.topic), {"error": str(exc)})
        except TimeoutError:
            pass
    return out


READER_OK = ("ready", "terminal")
SILENT_AFTER_S = 120     # a store's gateway publishes its status at least every minute


def clock_drift(s: dict) -> str:
    """The store's clock against HQ's at its last ack (``clock_offset_ms``,
    HQ's time minus the store's): ``+10m`` a store behind, ``-1h`` ahead,
    ``-`` not measured (an older gateway, or no ack with HQ's time yet)."""
    offset = s.get("clock_offset_ms")
    if offset is None:
        return "-"
    return ("+" if offset >= 0 else "-") + _age(abs(offset) / 1000)


def clock_problem(s: dict) -> str | None:
    """A drift past the gateways' tolerance (CLOCK_TOLERANCE_S), unless the
    store's own clock fault already says it."""
    offset = s.get("clock_offset_ms")
    if offset is None or abs(offset) <= CLOCK_TOLERANCE_S * 1000:
        return None
    if any(str(f).startswith(("clock not trusted", "clock ahead")) for f in s.get("faults") or ()):
        return None
    return f"clock {_age(abs(offset) / 1000)} {'behind' if offset > 0 else 'ahead of'} HQ's"


def store_problems(s: dict, sent: int | None, hq_deny: int | None) -> list[str]:
    """Everything wrong a store's status shows, one line each: the rules it
    refused, every fault it reports, its clock off HQ's, readers not ready,
    versions behind."""
    out = []
    if s.get("rules_rejection"):
        out.append(f"rules refused: {s['rules_rejection']}")
    out += [str(f) for f in s.get("faults") or ()]
    drift = clock_problem(s)
    if drift:
        out.append(drift)
    out += [f"reader {name}: {state}" for name, state in sorted((s.get("readers") or {}).items())
            if state not in READER_OK]
    applied = s.get("rules_version")
    if sent and applied != sent:
        out.append(f"rules behind: runs v{applied or '-'}, sent v{sent}")
    deny = s.get("deny_version")
    if hq_deny and (deny or 0) < hq_deny:
        out.append(f"deny list behind: runs v{deny if deny is not None else '-'}, HQ at v{hq_deny}")
    return out


def render_fleet(statuses: dict[str, dict], expected: dict[str, int | None], now: float,
                 hq_deny: int | None = None) -> str:
    head = (f"{'store':<10} {'state':<8} {'rules':>6} {'sent':>6} {'deny':>6} {'backlog':>8} {'oldest':>8} "
            f"{'seen':>8} {'clock':>6}  problems")
    lines = [head]
    for store in sorted(set(statuses) | set(expected)):
        s = statuses.get(store) or {}
        if "error" in s:
            lines.append(f"{store:<10} bad status: {s['error']}")
            continue
        state = s.get("state", "never")
        seen = now - s["ts"] if s.get("ts") else None
        if state == "online" and seen is not None and seen > SILENT_AFTER_S:
            state = "silent"
        oldest = s.get("oldest_unsent_age_s")
        problems = store_problems(s, expected.get(store), hq_deny) if s else []
        lines.append(f"{store:<10} {state:<8} {str(s.get('rules_version') or '-'):>6} "
                     f"{str(expected.get(store) or '-'):>6} "
                     f"{str(s.get('deny_version') if s.get('deny_version') is not None else '-'):>6} "
                     f"{s.get('backlog', '-'):>8} {(_age(oldest) if oldest else '-'):>8} "
                     f"{(_age(seen) + ' ago' if seen is not None else '-'):>8} {clock_drift(s):>6}  "
                     f"{problems[0] if problems else ''}")
        lines += [f"{'':>76}{p}" for p in problems[1:]]
    return "\n".join(lines)


def _age(seconds: float) -> str:
    seconds = max(0, int(seconds))
    for unit, n in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= n:
            return f"{seconds // n}{unit}"
    return f"{seconds}s"


def _scope_args(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--store")
    g.add_argument("--region")
    g.add_argument("--all", action="store_true")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="storegate-hq", description="storegate HQ bridge")
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="ingest store transactions into the ledger and ack them; answer resyncs")
    run.add_argument("--config", required=True)

    rules = sub.add_parser("rules", help="rule sets")
    rules_sub = rules.add_subparsers(dest="rules_command", required=True)
    pub = rules_sub.add_parser("publish", help="store an authored layer and publish to every affected store")
    pub.add_argument("file")
    _scope_args(pub)
    for p in (pub, snap := rules_sub.add_parser(
            "snapshot", help="publish the member snapshot from HQ's accounts now (and/or a new deny list)")):
        p.add_argument("--members", help="import members into HQ's accounts first (NDJSON, one member per line, "
                                         "JSON or TOML; cards HQ holds are kept as they are)")
        p.add_argument("--deny", help="the whole deny list (chain-wide, with --all)")
        p.add_argument("--as-of", type=int, help="epoch seconds the snapshot says it is as of (default: now, "
                                                 "when it is read from the accounts)")
        p.add_argument("--config", required=True)
    _scope_args(snap)
    rep = rules_sub.add_parser("republish", help="sign and publish the current layers again (new version)")
    _scope_args(rep)
    rep.add_argument("--config", required=True)

    card = sub.add_parser("card", help="report a card: a signed deny-list delta to every store, now")
    card.add_argument("action", choices=["deny", "freeze", "unfreeze", "replace"])
    card.add_argument("card_no")
    card.add_argument("--reason", required=True, help="kept at HQ; not sent to the stores")
    card.add_argument("--status", default=None, help="for deny: lost (default), cancelled, expired, not_activated")
    card.add_argument("--new-card", help="for replace: the new card number")
    card.add_argument("--user", default=os.environ.get("USER", "admin"), help="the operator (history: hq:<user>)")
    card.add_argument("--config", required=True)

    fleet = sub.add_parser("fleet", help="every store's rules and deny versions, state, backlog, clock drift")
    fleet.add_argument("--config", required=True)
    fleet.add_argument("--wait", type=float, default=2.0, help="seconds to collect retained status messages")
    fleet.add_argument("--json", action="store_true")

    keys = sub.add_parser("keys", help="HQ's rule-signing keys")
    keys.add_argument("keys_command", choices=["generate", "rotate", "show"])
    keys.add_argument("--promote", action="store_true", help="rotate: make the announced next key current")
    keys.add_argument("--config", required=True)
    for add in _EXTRA:
        add(sub)
    args = parser.parse_args(argv)

    try:
        cfg = hq_config.load(args.config)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    journald.configure(cfg["logging"]["level"])  # <N> priorities when stderr is the journal
    logging.getLogger("alembic").setLevel(logging.WARNING)  # its plugin set-up lines say nothing to an operator
    if args.command == "run":
        try:
            mqtt.make_tls_context(cfg["mqtt"])  # a missing TLS file stops start-up here, naming its key
            open_hq(cfg).close()          # migrate (and fail) before going to the broker
        except ConfigError as exc:
            print(f"config error in {args.config}: {exc}", file=sys.stderr)
            return 2
        except SQLAlchemyError as exc:
            print(f"database error: {exc}", file=sys.stderr)
            return 2
        eventloop.run(_run(cfg))
        return 0
    try:
        if args.command == "nightly":
            return _nightly(args, cfg)
        if args.command in _RUNNERS:
            return _run_registered(_RUNNERS[args.command], args, cfg)
        handler = getattr(args, "handler", None)
        return handler(args, cfg) if handler else _command(args, cfg)
    except (RulesetError, PublishError) as exc:
        print(f"refused: {exc}", file=sys.stderr)
        return 2
    except hq_keys.KeyFileError as exc:
        print(f"key error: {exc}", file=sys.stderr)
        return 2
    except aiomqtt.MqttError as exc:
        return _broker_down(args, cfg, exc)
    except SQLAlchemyError as exc:
        print(f"database error: {exc}", file=sys.stderr)
        return 2


def _command(args, cfg: dict) -> int:
    if args.command == "keys":
        path = cfg["hq"].get("signing_key")
        if not path:
            raise hq_keys.KeyFileError("hq.signing_key: set the key file's path in hq.toml")
        if args.keys_command == "generate":
            pub = hq_keys.generate(path)
            print(f"created {path} (mode 0600) and {path}.pub\n"
                  f"put this public key in every gateway's config, rules.hq_public_keys:\n  {pub}")
        elif args.keys_command == "show":
            print(hq_keys.describe(path))
        elif args.promote:
            hq_keys.promote(path)
            print(f"the next key is now current: {hq_keys.describe(path)}")
            _republish_all(args, cfg)
        else:
            hq_keys.rotate(path)
            print(f"next key created and announced: {hq_keys.describe(path)}")
            _republish_all(args, cfg)
        return 0
    if args.command == "fleet":
        return _fleet(args, cfg)
    ledger = open_hq(cfg)
    runtime.tune_gc()  # a batch allocates ~100 containers a record: keep GC passes off the loaded modules
    publisher = make_publisher(cfg, ledger)
    scope = {"store": getattr(args, "store", None), "region": getattr(args, "region", None),
             "all_": getattr(args, "all", False)}
    try:
        if args.command == "card":
            delta = asyncio.run(publisher.card_action(args.action, args.card_no, args.reason, status=args.status,
                                                      new_card=args.new_card, user=args.user))
            print(f"deny delta v{delta.version} sent to every store: {args.action} card ****{args.card_no[-4:]}")
            return 0
        if args.rules_command == "publish":
            manifests = asyncio.run(publisher.publish_layer(args.file, members_file=args.members,
                                                            deny_file=args.deny, as_of=args.as_of, **scope))
        elif args.rules_command == "snapshot":
            manifests = asyncio.run(publisher.snapshot(members_file=args.members, deny_file=args.deny,
                                                       as_of=args.as_of, **scope))
        else:
            manifests = asyncio.run(publisher.publish_stores(publisher.affected(**scope)))
    finally:
        ledger.close()
    for m in manifests:
        print(f"published rules v{m.version} to store {m.store}")
    return 0


def _nightly(args, cfg: dict) -> int:
    """The chain's nightly run (deploy/systemd/storegate-hq-nightly.timer):
    the account policy for the business day, committed; reconciliation of
    every account over the last NIGHTLY_RECONCILE_DAYS days (what ingest did
    not see: an overrun of an earlier day, a policy changed since), its
    blocks, limits and lifts to every store; then every store's member
    snapshot refreshed from the accounts (on demand: ``rules snapshot``).
    With the broker down what was committed waits in the outbox: said, exit 75."""
    from datetime import datetime
    from zoneinfo import ZoneInfo

    today = datetime.now(ZoneInfo(cfg["hq"]["timezone"])).date()
    ledger = open_hq(cfg)
    try:
        code = policy.run(args, ledger.engine, today=today)
        if code != 0:
            return code
        said = sys.stderr if args.json else sys.stdout
        publish = _deny_publisher(cfg, ledger)
        recent = argparse.Namespace(settle=None, days=NIGHTLY_RECONCILE_DAYS, json=False)
        print(f"nightly reconciliation (records applied in the last {NIGHTLY_RECONCILE_DAYS} days; "
              "balances whole):", file=said)
        try:
            code = reconcile.run(recent, ledger.engine, out=said, publish=publish)
        except aiomqtt.MqttError as exc:
            print("nightly: the account policy and the reconciliation are committed", file=sys.stderr)
            return _broker_down(args, cfg, exc)
        if code != 0 or args.no_snapshots or not cfg["stores"]:
            return code
        if not cfg["hq"].get("signing_key"):
            print("nightly: no hq.signing_key, so no member snapshots were published", file=sys.stderr)
            return 1
        publisher = make_publisher(cfg, ledger)
        have = set(publisher.catalog.manifests())       # stores that have had rules
        try:
            manifests = asyncio.run(publisher.publish_stores([s for s in publisher.affected(all_=True) if s in have]))
        except aiomqtt.MqttError as exc:
            print("nightly: the account policy and the reconciliation are committed", file=sys.stderr)
            return _broker_down(args, cfg, exc)
        for m in manifests:
            print(f"published member snapshot in rules v{m.version} to store {m.store}", file=said)
        return 0
    finally:
        ledger.close()


def _fleet(args, cfg: dict) -> int:
    """Every store: the status it publishes (retained at the broker) or,
    where the broker has none or is down, the last one HQ's bridge received."""
    ledger = open_hq(cfg)
    try:
        catalog = Catalog(parts_dir=cfg["hq"].get("parts_dir"), engine=ledger.engine)
        expected = {s: m.version for s, m in catalog.manifests().items()}
        hq_deny = catalog.deny_version() or None
        kept = {}
        for store, doc in ledger.store_statuses().items():
            try:
                kept[store] = Status.decode(doc.encode()).__dict__
            except WireError:
                continue
    finally:
        ledger.close()
    for s in cfg["stores"]:
        expected.setdefault(s, None)
    try:
        live = asyncio.run(fleet_status(cfg["mqtt"], args.wait))
        note = None
    except aiomqtt.MqttError as exc:
        live, note = {}, f"broker unreachable ({exc}): what HQ last received from each store"
    statuses = dict(kept)
    for store, st in live.items():
        if "error" in st or st.get("ts", 0) >= statuses.get(store, {}).get("ts", 0):
            statuses[store] = st
    if args.json:
        print(json.dumps({"statuses": statuses, "sent": expected, "deny_version": hq_deny,
                          "problems": {s: store_problems(st, expected.get(s), hq_deny)
                                       for s, st in statuses.items() if "error" not in st},
                          **({"note": note} if note else {})}, indent=2, ensure_ascii=False))
    else:
        if note:
            print(note, file=sys.stderr)
        print(render_fleet(statuses, expected, time.time(), hq_deny))
    return 0


EX_TEMPFAIL = 75   # stored at HQ, sent later (sysexits.h: "try again later")


def _broker_down(args, cfg: dict, exc: Exception) -> int:
    """The broker could not be reached: say what HQ stored and has not sent.
    It waits in the outbox, and the bridge (``storegate-hq run``) sends it
    as soon as the broker is back: exit 75. Nothing waiting: exit 3."""
    print(f"broker unreachable: {exc}", file=sys.stderr)
    if args.command in ("fleet", "run"):
        return 3
    ledger = open_hq(cfg)
    try:
        catalog = Catalog(parts_dir=cfg["hq"].get("parts_dir"), engine=ledger.engine)
        catalog.release()          # this command cannot send them: the bridge will
        queued = catalog.queued()
    finally:
        ledger.close()
    if not queued:
        print("nothing is waiting to be sent", file=sys.stderr)
        return 3
    print("stored at HQ and queued, not sent yet:", file=sys.stderr)
    for item, reason, at in queued:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(at / 1000))
        what = "the deny list's latest change" if item == DENY_ITEM else f"the rule set of store {item[6:]}"
        print(f"  {what} (queued {when}: {reason})", file=sys.stderr)
    print("`storegate-hq run` sends them as soon as the broker is back.", file=sys.stderr)
    return EX_TEMPFAIL


def _republish_all(args, cfg: dict) -> None:
    if not cfg["stores"]:
        return
    ledger = open_hq(cfg)
    try:
        publisher = make_publisher(cfg, ledger)
        have = set(publisher.catalog.manifests())
        stores = [s for s in publisher.affected(all_=True) if s in have]
        if stores:
            for m in asyncio.run(publisher.publish_stores(stores)):
                print(f"published rules v{m.version} to store {m.store}")
    finally:
        ledger.close()


if __name__ == "__main__":
    sys.exit(main())
