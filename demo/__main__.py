"""`python -m demo` (`make demo`): a whole store on this machine, and a scripted day."""

from __future__ import annotations

import argparse
import asyncio
import sys

from demo.rig import run_demo


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m demo", description=__doc__.split(":", 1)[1].strip())
    parser.add_argument("--keep", action="store_true", help="keep the demo's working directory")
    args = parser.parse_args(argv)
    return asyncio.run(run_demo(keep=args.keep))


if __name__ == "__main__":
    sys.exit(main())
