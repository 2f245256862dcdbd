"""What the journal raises: DomainErrors (gateway/core/errors.py), each with
the code and HTTP status the POS API answers it with."""

from __future__ import annotations

from gateway.core.errors import DomainError


class JournalError(DomainError, RuntimeError):
    """The journal could not make an operation durable."""

    code, status = "journal_unavailable", 507


class JournalFull(JournalError):
    """The journal's disk is full or the journal is at its configured cap."""

    code, status = "journal_full", 507


class IdempotencyConflict(DomainError, ValueError):
    """The same idempotency key came with a different request."""

    code, status = "idempotency_conflict", 409


class RecordRefused(DomainError, ValueError):
    """A record that could not be delivered to HQ; nothing was written."""

    code, status = "record_refused", 400
