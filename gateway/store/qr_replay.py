"""Member QR codes at the gateway: the replay store around cards.member_qr.

Each (member, step) is accepted once. A screenshot of a code, or a code sent
to a friend, is refused as "already used" for as long as it would otherwise
verify. Kept in SQLite (<data_dir>/qr_replay.sqlite3, WAL, synchronous=FULL
like the SUN counters) so a restart, even a power cut, does not reopen the
window. Rows are pruned once their step can no longer verify, so the table
holds a few minutes of scans. The check that claims in it is
gateway/shell/member_qr.py (MemberQrCheck).
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

PRUNE_EVERY = 256  # claims between prunes


class ReplayStore:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Made wherever the Gateway is built, used from the event loop only.
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # an accepted step survives a power cut
        self._db.execute("CREATE TABLE IF NOT EXISTS used (member TEXT NOT NULL, step INTEGER NOT NULL, "
                         "until INTEGER NOT NULL, PRIMARY KEY (member, step)) WITHOUT ROWID")
        self._claims = 0

    def claim(self, member: str, step: int, until: float, now: float) -> bool:
        """True the first time (member, step) is seen; False for a replay.
        `until`: when the step stops verifying anyway (then the row may go)."""
        self._claims += 1
        if self._claims % PRUNE_EVERY == 1:
            self.prune(now)
        cur = self._db.execute("INSERT OR IGNORE INTO used (member, step, until) VALUES (?, ?, ?)",
                               (member, step, int(until) + 1))
        return cur.rowcount == 1

    def prune(self, now: float) -> int:
        return self._db.execute("DELETE FROM used WHERE until < ?", (int(now),)).rowcount

    def __len__(self) -> int:
        return self._db.execute("SELECT count(*) FROM used").fetchone()[0]

    def close(self) -> None:
        self._db.close()
