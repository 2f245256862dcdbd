"""Log lines that carry journald's priorities when stderr is the journal.

systemd sets ``JOURNAL_STREAM=<device>:<inode>`` for a service whose output goes
to journald. A line that starts with ``<N>`` (syslog priority: 3 error,
4 warning, 6 info, 7 debug) is stored with that priority (``SyslogLevelPrefix=``,
on by default), so ``journalctl -p warning -u storegate-gateway`` shows what
needs a person. Every line of a multi-line record (a traceback) gets the
prefix, or journald would file its continuation lines as info. journald
stamps the time, so the journal format leaves it out; from a shell the lines
look as before.
"""

from __future__ import annotations

import logging
import os
import sys

PLAIN_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
JOURNAL_FORMAT = "%(name)s: %(message)s"


def priority(levelno: int) -> int:
    """syslog priority of a logging level."""
    if levelno >= logging.CRITICAL:
        return 2
    if levelno >= logging.ERROR:
        return 3
    if levelno >= logging.WARNING:
        return 4
    if levelno >= logging.INFO:
        return 6
    return 7


def stderr_is_journal(stream=None) -> bool:
    """True when ``stream`` (stderr) is the journal stream systemd connected."""
    device, _, inode = os.environ.get("JOURNAL_STREAM", "").partition(":")
    if not (device.isdigit() and inode.isdigit()):
        return False
    try:
        st = os.fstat((stream or sys.stderr).fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return (st.st_dev, st.st_ino) == (int(device), int(inode))


class JournalFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{priority(record.levelno)}>"
        return "\n".join(prefix + line for line in super().format(record).splitlines() or [""])


def configure(level: str | int) -> None:
    """``logging.basicConfig`` for a service: journald priorities under systemd."""
    handler = logging.StreamHandler()
    if stderr_is_journal():
        handler.setFormatter(JournalFormatter(JOURNAL_FORMAT))
    else:
        handler.setFormatter(logging.Formatter(PLAIN_FORMAT))
    logging.basicConfig(level=level, handlers=[handler])
