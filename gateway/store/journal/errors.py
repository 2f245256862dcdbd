"""What the journal raises."""

from __future__ import annotations


class JournalError(RuntimeError):
    """The journal could not make an operation durable."""


class JournalFull(JournalError):
    """The journal's disk is full or the journal is at its configured cap."""


class IdempotencyConflict(ValueError):
    """The same idempotency key came with a different request."""


class RecordRefused(ValueError):
    """A record that could not be delivered to HQ; nothing was written."""
