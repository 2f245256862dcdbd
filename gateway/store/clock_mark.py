"""The clock's high-water mark: the last wall-clock time a run of the gateway
saw while its clock was sane, kept across restarts (``<data_dir>/clock.json``).

Invariants:

1. The file holds ``{"mark": <epoch seconds>}`` and is replaced whole (tmp,
   fsync, rename, fsync of the directory): after a power cut it holds the
   previous mark or the new one, never a torn one.
2. It is written rarely (gateway/core/clock.py ``mark_due``: every
   ``MARK_EVERY_S`` and at a clean stop), so it costs the SD card ~100 small
   writes a day; the mark is therefore up to that much behind the last time
   seen, which the clock check's tolerance and the journal's last record
   make up for.
3. A file that cannot be read or parsed is no evidence (logged, then
   overwritten by the next write): a damaged mark must not stop the counter.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import orjson

from gateway.store.durable import make_dirs, sync_dir

log = logging.getLogger("storegate.clock")

MARK_EVERY_S = 600


class ClockMark:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.value: int | None = self._read()

    def _read(self) -> int | None:
        try:
            mark = orjson.loads(self.path.read_bytes())["mark"]
        except FileNotFoundError:
            return None
        except (OSError, orjson.JSONDecodeError, KeyError, TypeError) as exc:
            log.error("clock mark %s unreadable (%s): not used", self.path, exc)
            return None
        if not isinstance(mark, int) or isinstance(mark, bool) or mark < 0:
            log.error("clock mark %s holds %r: not used", self.path, mark)
            return None
        return mark

    def write(self, mark: int) -> None:
        make_dirs(self.path.parent, mode=0o700)
        tmp = self.path.with_name(self.path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(orjson.dumps({"mark": int(mark)}))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        sync_dir(self.path.parent)
        self.value = int(mark)


def journal_last_ts(index) -> int | None:
    """The latest record time (epoch seconds) the journal's index still holds:
    pending records and the idempotency keys of sent ones (gateway/store/
    journal/index.py). Read once at start-up, before anything new is written."""
    times = [loc[3] for loc in index.pending.values()]
    times += [entry[3] for entry in index.idempotency.values()]
    return max(times) // 1000 if times else None
