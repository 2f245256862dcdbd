"""Shared bits of the benchmarks: JSON-line output, medians, timing."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys


def args(description: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="a short run")
    parser.add_argument("--dir", default=None, help="where to put files (default: a temp dir on the data disk)")
    return parser.parse_args()


def emit(metric: str, value: float, unit: str, baseline: str | None = None,
         baseline_value: float | None = None, **extra) -> dict:
    line = {"metric": metric, "value": round(value, 3), "unit": unit}
    if baseline is not None:
        line.update(baseline=baseline, baseline_value=round(baseline_value, 3),
                    ratio=round(value / baseline_value, 3) if baseline_value else None)
    line.update(extra)
    loop = _loop_name()
    if loop:
        line.setdefault("event_loop", loop)
    print(json.dumps(line, ensure_ascii=False), flush=True)
    return line


def _loop_name() -> str:
    """The running loop's kind ("uvloop" or "asyncio"), or None outside one."""
    import asyncio
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return None
    return type(loop).__module__.split(".")[0]


def median(values) -> float:
    return statistics.median(values)


def bytes_written() -> int:
    """Bytes this process caused to be written to storage (/proc/self/io)."""
    with open("/proc/self/io") as f:
        for line in f:
            if line.startswith("write_bytes:"):
                return int(line.split()[1])
    return 0


def note(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def rss_mb() -> float:
    with open(f"/proc/{os.getpid()}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0
