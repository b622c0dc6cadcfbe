"""Persistence for saga executions: the `SagaStorage` port and its adapters.

`SqlAlchemySagaStorage` is imported on first use, so code that only needs the port or the in-memory adapter
does not pay for importing SQLAlchemy, its drivers and Alembic.
"""

from typing import TYPE_CHECKING, Any

from storage.errors import (
    ConcurrencyError,
    DuplicateIdempotencyKeyError,
    DuplicateReplyError,
    ExecutionAlreadyExistsError,
    ExecutionNotFoundError,
    StorageError,
    StorageUnavailableError,
)
from storage.memory import MemorySagaStorage
from storage.protocol import (
    ISagaStorage,
    SagaStorage,
    SupportsClaimMany,
    SupportsDatabaseTime,
    SupportsDefinitionCounts,
    SupportsListOutbox,
    SupportsLoadMany,
    SupportsOutboxBacklog,
    SupportsOutboxOutcomes,
)
from storage.records import (
    ExecutionQuery,
    ExecutionRecord,
    OutboxBacklog,
    OutboxMessage,
    OutboxRecord,
    QueryResult,
    ReplyRecord,
    StepRecord,
)
from storage.status import RECOVERABLE_STATUSES, TERMINAL_STATUSES, SagaStatus

if TYPE_CHECKING:
    from storage.sql import SqlAlchemySagaStorage

__all__ = [
    "RECOVERABLE_STATUSES",
    "TERMINAL_STATUSES",
    "ConcurrencyError",
    "DuplicateIdempotencyKeyError",
    "DuplicateReplyError",
    "ExecutionAlreadyExistsError",
    "ExecutionNotFoundError",
    "ExecutionQuery",
    "ExecutionRecord",
    "ISagaStorage",
    "MemorySagaStorage",
    "OutboxBacklog",
    "OutboxMessage",
    "OutboxRecord",
    "QueryResult",
    "ReplyRecord",
    "SagaStatus",
    "SagaStorage",
    "SqlAlchemySagaStorage",
    "StepRecord",
    "StorageError",
    "StorageUnavailableError",
    "SupportsClaimMany",
    "SupportsDatabaseTime",
    "SupportsDefinitionCounts",
    "SupportsListOutbox",
    "SupportsLoadMany",
    "SupportsOutboxBacklog",
    "SupportsOutboxOutcomes",
]


def __getattr__(name: str) -> Any:
    if name == "SqlAlchemySagaStorage":
        from storage.sql import SqlAlchemySagaStorage

        return SqlAlchemySagaStorage
    raise AttributeError(f"module 'storage' has no attribute {name!r}")
