"""systemd's service notification protocol (sd_notify(3)): the part a service needs.

A unit with ``Type=notify`` is "started" only when the service says ``READY=1``
on the datagram socket named by ``NOTIFY_SOCKET``; with ``WatchdogSec=`` systemd
kills and restarts it when ``WATCHDOG=1`` stops coming for that long. Both are
one datagram each; without ``NOTIFY_SOCKET`` (not under systemd, or another
``Type=``) every call does nothing, so the same code runs from a shell.

The watchdog pings come from a task on the service's event loop: a loop that
is blocked or wedged stops pinging, which is what the watchdog is for.

No dependency: `sdnotify` (PyPI) is these lines, unmaintained since 2017, and
`systemd-python` needs libsystemd headers and a compiler on the Pi.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket

log = logging.getLogger("storegate.sdnotify")


def notify(state: str) -> bool:
    """Send ``state`` (e.g. ``"READY=1\\nSTATUS=serving"``); False when not under systemd."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address[0] == "@":  # an abstract socket
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
    except OSError as exc:  # systemd gone or the socket not ours: nothing to tell
        log.warning("sd_notify to %s failed: %s", os.environ.get("NOTIFY_SOCKET"), exc)
        return False
    return True


def watchdog_interval() -> float | None:
    """Seconds between pings (half of ``WatchdogSec=``), or None when no watchdog
    is set for this process."""
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if pid.isdigit() and int(pid) != os.getpid():
        return None  # meant for another process (a parent that exec'd us not)
    return int(usec) / 1e6 / 2


async def watchdog(interval: float) -> None:
    """Ping ``WATCHDOG=1`` every ``interval`` seconds until cancelled."""
    while True:
        notify("WATCHDOG=1")
        await asyncio.sleep(interval)


def ready(status: str) -> asyncio.Task | None:
    """Tell systemd the service is ready and start the watchdog task when one is
    asked for (keep the returned task; cancel it on the way out)."""
    notify(f"READY=1\nSTATUS={status}")
    interval = watchdog_interval()
    if interval is None:
        return None
    return asyncio.get_running_loop().create_task(watchdog(interval), name="sd-watchdog")


def stopping(status: str = "stopping") -> None:
    notify(f"STOPPING=1\nSTATUS={status}")
