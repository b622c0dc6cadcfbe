"""Errors raised by storage adapters.

Adapters translate driver exceptions into these so callers handle one family whatever the backend::

    StorageError                      (retriable: bool)
    ├── StorageUnavailableError       retriable: the database did not answer / connection lost
    ├── ExecutionNotFoundError        .execution_id: no such execution (also a LookupError, ValueError)
    ├── ConcurrencyError              .execution_id, .expected_version: a stale write; nothing changed
    │   └── ExecutionAlreadyExistsError   a create with an id already taken (also a ValueError)
    ├── DuplicateIdempotencyKeyError  .idempotency_key, .existing_id: a start with a key already used
    └── DuplicateReplyError           .execution_id, .request_id: that reply was already applied

python-cqrs's storages raise ``ValueError("Saga <id> not found")`` and ``ValueError("Saga <id> already
exists")``; the two errors that mean the same are ``ValueError`` subclasses with those words in their
messages, so its callers (``except ValueError``, ``pytest.raises(ValueError, match="not found")``) work
unchanged.
"""

from __future__ import annotations

import uuid

__all__ = [
    "ConcurrencyError",
    "DuplicateIdempotencyKeyError",
    "DuplicateReplyError",
    "ExecutionAlreadyExistsError",
    "ExecutionNotFoundError",
    "StorageError",
    "StorageUnavailableError",
]


class StorageError(Exception):
    """Root of storage errors.

    Attributes:
        retriable: Whether the same call may succeed later (the database may come back).
    """

    retriable: bool = False


class StorageUnavailableError(StorageError):
    """The database could not be reached or dropped the connection."""

    retriable = True


class ExecutionNotFoundError(StorageError, LookupError, ValueError):
    """No execution has the given id (a ``ValueError`` too, as python-cqrs raises)."""

    def __init__(self, execution_id: uuid.UUID) -> None:
        super().__init__(f"saga execution {execution_id} not found")
        self.execution_id = execution_id


class ConcurrencyError(StorageError):
    """A write was based on a version that is no longer current; nothing was changed."""

    def __init__(self, execution_id: uuid.UUID, expected_version: int) -> None:
        super().__init__(
            f"saga execution {execution_id} changed since version {expected_version} was read; "
            "the write was not applied"
        )
        self.execution_id = execution_id
        self.expected_version = expected_version


class ExecutionAlreadyExistsError(ConcurrencyError, ValueError):
    """A create found an execution with its id: the caller expected none (version 0); nothing changed."""

    def __init__(self, execution_id: uuid.UUID) -> None:
        StorageError.__init__(self, f"saga execution {execution_id} already exists; nothing was created")
        self.execution_id = execution_id
        self.expected_version = 0


class DuplicateIdempotencyKeyError(StorageError):
    """An execution with this idempotency key already exists.

    Idempotency keys are unique across sagas: a key names one start of one saga. When the names are
    known, the message says which saga holds the key and which one asked for it again.

    Attributes:
        idempotency_key: The key.
        existing_id: The execution it started.
        existing_saga: That execution's saga name, when known.
        saga: The saga name of the start that was refused, when known.
    """

    def __init__(
        self,
        idempotency_key: str,
        existing_id: uuid.UUID,
        *,
        existing_saga: str | None = None,
        saga: str | None = None,
    ) -> None:
        held = f" of saga {existing_saga!r}" if existing_saga is not None else ""
        message = f"idempotency key {idempotency_key!r} already started execution {existing_id}{held}"
        if saga is not None and saga != existing_saga:
            message += (
                f"; it cannot start saga {saga!r} too (use a key of its own, e.g. prefixed by the saga)"
            )
        super().__init__(message)
        self.idempotency_key = idempotency_key
        self.existing_id = existing_id
        self.existing_saga = existing_saga
        self.saga = saga


class DuplicateReplyError(StorageError):
    """The reply to this request was already applied; the transaction was rolled back."""

    def __init__(self, execution_id: uuid.UUID, request_id: uuid.UUID) -> None:
        super().__init__(f"reply to request {request_id} of execution {execution_id} was already applied")
        self.execution_id = execution_id
        self.request_id = request_id
