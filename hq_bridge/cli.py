"""`storegate-hq`: the HQ side.

    storegate-hq run --config hq.toml
    storegate-hq rules publish FILE --store S --config hq.toml
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

from common.configfile import ConfigError
from hq_bridge import config as hq_config
from hq_bridge.bridge import Bridge
from hq_bridge.ledger import Ledger
from hq_bridge.rules import load_rules_file, publish_to_store
from wire.ruleset import RulesetError


async def _run(cfg: dict) -> None:
    ledger = Ledger(cfg["hq"]["database"])
    bridge = Bridge(cfg["mqtt"], ledger)
    task = asyncio.create_task(bridge.run())
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, task.cancel)
    try:
        await task
    except asyncio.CancelledError:
        pass
    finally:
        ledger.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="storegate-hq", description="storegate HQ bridge")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="ingest store transactions into the ledger and ack them")
    run.add_argument("--config", required=True)
    rules = sub.add_parser("rules", help="rule sets")
    rules_sub = rules.add_subparsers(dest="rules_command", required=True)
    pub = rules_sub.add_parser("publish", help="validate a rule set and publish it to a store")
    pub.add_argument("file")
    pub.add_argument("--store", required=True)
    pub.add_argument("--config", required=True)
    args = parser.parse_args(argv)

    try:
        cfg = hq_config.load(args.config)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    logging.basicConfig(level=cfg["logging"]["level"], format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "run":
        asyncio.run(_run(cfg))
        return 0
    try:
        rules_doc = load_rules_file(args.file)
        ledger = Ledger(cfg["hq"]["database"])
        msg = asyncio.run(publish_to_store(cfg["mqtt"], ledger, args.store, rules_doc))
    except RulesetError as exc:
        print(f"rule set rejected: {exc}", file=sys.stderr)
        return 2
    print(f"published rules v{msg.version} to store {args.store}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
