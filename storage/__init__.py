"""Persistence for saga executions: the `SagaStorage` port and its adapters."""

from storage.errors import (
    ConcurrencyError,
    DuplicateIdempotencyKeyError,
    DuplicateReplyError,
    ExecutionNotFoundError,
    StorageError,
    StorageUnavailableError,
)
from storage.memory import MemorySagaStorage
from storage.protocol import ISagaStorage, SagaStorage
from storage.records import (
    ExecutionQuery,
    ExecutionRecord,
    OutboxMessage,
    OutboxRecord,
    QueryResult,
    ReplyRecord,
    StepRecord,
)
from storage.status import RECOVERABLE_STATUSES, TERMINAL_STATUSES, SagaStatus

__all__ = [
    "RECOVERABLE_STATUSES",
    "TERMINAL_STATUSES",
    "ConcurrencyError",
    "DuplicateIdempotencyKeyError",
    "DuplicateReplyError",
    "ExecutionNotFoundError",
    "ExecutionQuery",
    "ExecutionRecord",
    "ISagaStorage",
    "MemorySagaStorage",
    "OutboxMessage",
    "OutboxRecord",
    "QueryResult",
    "ReplyRecord",
    "SagaStatus",
    "SagaStorage",
    "StepRecord",
    "StorageError",
    "StorageUnavailableError",
]
