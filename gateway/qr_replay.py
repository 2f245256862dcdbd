"""Member QR codes at the gateway: the state around hardware.member_qr.

- ReplayStore: each (member, step) is accepted once. A screenshot of a code,
  or a code sent to a friend, is refused as "already used" for as long as it
  would otherwise verify. Kept in SQLite (<data_dir>/qr_replay.sqlite3, WAL,
  synchronous=FULL like the SUN counters) so a restart, even a power cut,
  does not reopen the window. Rows are pruned once their step can no longer
  verify, so the table holds a few minutes of scans.
- MemberQrCheck: what the gateway does with a scanner read before
  engine.validate. A dynamic code ("SGQ1." prefix) is verified with the
  issuer keys from the rules' `member_qr` section, then claimed in the
  ReplayStore, and its card number goes on to engine.validate. A static code
  (a plain card number) goes on unchanged when `member_qr.static_codes` is
  true (the default, also when the rules have no member_qr section).

Verdict reason codes (texts in gateway/texts.py): qr_bad_format,
qr_unknown_issuer, qr_bad_signature, qr_credential_expired,
qr_step_out_of_window, qr_used, qr_not_configured, qr_static_refused.
"""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path

from hardware import member_qr

log = logging.getLogger("storegate.qr")

PRUNE_EVERY = 256  # claims between prunes

_DEFAULT_POLICY = {"issuer_public_keys": {}, "step_s": 30, "window_steps": 1, "static_codes": True}


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


def policy_of(rules) -> dict:
    """The rules' member_qr section with defaults (read defensively: older
    rule-set schemas have no such section)."""
    section = (rules.data.get("member_qr") if rules is not None else None) or {}
    return {**_DEFAULT_POLICY, **section}


class MemberQrCheck:
    def __init__(self, store: ReplayStore) -> None:
        self.store = store

    def identify(self, payload: str, rules, now: float) -> tuple[str | None, str | None]:
        """(card number for engine.validate, None) or (None, verdict reason)."""
        if rules is None:
            return payload, None  # engine.validate refuses it: no rules yet
        policy = policy_of(rules)
        if not member_qr.is_dynamic(payload):
            return (payload, None) if policy["static_codes"] else (None, "qr_static_refused")
        keys = policy["issuer_public_keys"]
        if not keys:
            return None, "qr_not_configured"
        step_s, window = policy["step_s"], policy["window_steps"]
        try:
            who = member_qr.verify(payload, keys, now, step_s, window)
        except member_qr.QrError as refused:
            log.info("member QR code refused: %s", refused)  # the reason, never the code
            return None, f"qr_{refused.reason}"
        # The step verifies until `window` steps after it have passed.
        if not self.store.claim(who.member_id, who.step, (who.step + window + 1) * step_s, now):
            log.warning("member QR code for member %s step %d used again (screenshot or replay)",
                        who.member_id, who.step)
            return None, "qr_used"
        return who.card_no, None

    def close(self) -> None:
        self.store.close()
