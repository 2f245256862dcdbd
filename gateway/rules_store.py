"""The running rule set: checked, switched atomically, persisted.

A new rule set replaces the running one only when it is valid, in scope for
this store and strictly newer. Taps and quotes read ``store.current``, a
single reference that is swapped in one assignment, so they never see a
half-applied rule set. The last good rule set is written to disk (write to a
temporary file, fsync, rename) so a reboot comes up with it, without HQ.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from gateway.engine import Rules
from wire.messages import RulesMessage, WireError
from wire.ruleset import RulesetError

log = logging.getLogger("storegate.rules")


class RulesRejected(ValueError):
    """A rule set that was not applied; the running rules stay as they were."""


def check_scope(msg: RulesMessage, store: str, region: str | None) -> None:
    scope = msg.scope
    if scope.get("all") or scope.get("store") == store or (region and scope.get("region") == region):
        return
    raise RulesRejected(f"rule set v{msg.version} is for {scope}, not for store {store!r}")


class RulesStore:
    def __init__(self, path: str | Path, store: str, region: str | None = None) -> None:
        self.path = Path(path)
        self.store = store
        self.region = region
        self.current: Rules | None = None
        self.last_rejection: str | None = None

    def load(self) -> None:
        """Come up with the last good rules on disk, if any. A damaged file
        is set aside and reported; the gateway then waits for HQ."""
        if not self.path.exists():
            return
        try:
            self.current = Rules.from_message(RulesMessage.decode(self.path.read_bytes()))
            log.info("loaded rules v%d from %s", self.current.version, self.path)
        except (WireError, RulesetError, OSError) as exc:
            aside = self.path.with_suffix(".damaged")
            os.replace(self.path, aside)
            self.last_rejection = f"stored rules unusable ({exc}); set aside as {aside.name}"
            log.error(self.last_rejection)

    def offer(self, payload: bytes) -> Rules:
        """Apply a rule-set message from HQ, or raise RulesRejected."""
        try:
            msg = RulesMessage.decode(payload)
            check_scope(msg, self.store, self.region)
            running = self.current.version if self.current else 0
            if msg.version == running and self._is_running(msg):
                log.debug("rule set v%d is already running", running)  # the retained copy, again
                return self.current
            if msg.version <= running:
                raise RulesRejected(f"rule set v{msg.version} is not newer than the running v{running}")
            rules = Rules.from_message(msg)
        except (WireError, RulesetError, RulesRejected) as exc:
            self.last_rejection = str(exc)
            log.warning("rule set rejected: %s", exc)
            raise RulesRejected(str(exc)) from None
        self._persist(msg)
        self.current = rules  # the switch: one reference assignment
        self.last_rejection = None
        log.info("applied rules v%d", rules.version)
        return rules

    def _is_running(self, msg: RulesMessage) -> bool:
        c = self.current
        return (c.version, c.issued_at, c.scope) == (msg.version, msg.issued_at, msg.scope) and \
            self.path.exists() and RulesMessage.decode(self.path.read_bytes()) == msg

    def _persist(self, msg: RulesMessage) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            f.write(msg.encode())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        dir_fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
