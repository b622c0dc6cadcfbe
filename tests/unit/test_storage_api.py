"""The storage package's public names: pinned, sorted, importable, and independent of saga/broker."""

from __future__ import annotations

import subprocess
import sys

import storage

PUBLIC = [
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


def _isort_key(name: str) -> tuple[int, str]:
    # ruff's RUF022 order: CONSTANTS, then Classes, then functions, each alphabetical.
    return (0 if name.isupper() else 1 if name[0].isupper() else 2, name)


def test_all_is_pinned_and_sorted() -> None:
    assert storage.__all__ == PUBLIC
    assert storage.__all__ == sorted(storage.__all__, key=_isort_key)


def test_every_public_name_resolves() -> None:
    for name in storage.__all__:
        assert getattr(storage, name) is not None


def test_adapters_satisfy_the_port() -> None:
    for adapter in (storage.MemorySagaStorage(), storage.SqlAlchemySagaStorage("sqlite+aiosqlite://")):
        assert isinstance(adapter, storage.SagaStorage)
        assert isinstance(adapter, storage.SupportsLoadMany)
        assert isinstance(adapter, storage.SupportsClaimMany)
        assert isinstance(adapter, storage.SupportsOutboxBacklog)
        assert isinstance(adapter, storage.SupportsDefinitionCounts)


def test_load_many_is_optional() -> None:
    """A storage written against the port before ``load_many`` still is a `SagaStorage`."""

    class Older(storage.MemorySagaStorage):
        load_many = None  # type: ignore[assignment]

    assert isinstance(Older(), storage.SagaStorage)
    assert not isinstance(object(), storage.SupportsLoadMany)
    assert not isinstance(object(), storage.SupportsClaimMany)


def test_importing_storage_does_not_import_sqlalchemy_or_the_engine() -> None:
    code = (
        "import sys, storage; "
        "assert 'sqlalchemy' not in sys.modules, 'sqlalchemy'; "
        "assert not any(m == 'saga' or m.startswith(('saga.', 'broker')) for m in sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
