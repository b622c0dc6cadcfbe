"""python-cqrs's recovery calls, written as its own storage tests are, against every adapter.

Code ported from python-cqrs catches ``ValueError`` for an unknown saga id and for a create whose id is
taken; these tests use nothing but what such code uses: the three recovery methods, their defaults, and
``pytest.raises(ValueError, match=...)``.
"""

from __future__ import annotations

import uuid

import pytest

from storage import (
    ConcurrencyError,
    ExecutionAlreadyExistsError,
    ExecutionNotFoundError,
    SagaStatus,
    SagaStorage,
)
from tests.contract.test_storage_contract import execution, harness, pg_contract, storage

__all__ = ["harness", "pg_contract", "storage"]  # the adapters' fixtures, shared with the contract suite


async def test_increment_recovery_attempts_of_an_unknown_saga_is_a_value_error(storage: SagaStorage) -> None:
    with pytest.raises(ValueError, match="not found"):
        await storage.increment_recovery_attempts(uuid.uuid4())
    with pytest.raises(ValueError, match="not found"):
        await storage.increment_recovery_attempts(uuid.uuid4(), new_status=SagaStatus.FAILED)


async def test_set_recovery_attempts_of_an_unknown_saga_raises_value_error(storage: SagaStorage) -> None:
    missing = uuid.uuid4()
    with pytest.raises(ValueError, match="not found") as info:
        await storage.set_recovery_attempts(missing, 3)
    # Still the storage's own error, for code written against it.
    assert isinstance(info.value, ExecutionNotFoundError) and isinstance(info.value, LookupError)
    assert info.value.execution_id == missing


async def test_creating_a_saga_twice_raises_value_error(storage: SagaStorage) -> None:
    created = await storage.create(execution())
    with pytest.raises(ValueError, match="already exists") as info:
        await storage.create(execution(id=created.id, name="other"))
    assert isinstance(info.value, ExecutionAlreadyExistsError) and isinstance(info.value, ConcurrencyError)
    assert info.value.execution_id == created.id and info.value.expected_version == 0
    assert await storage.load(created.id) == created


async def test_recovery_loop_as_python_cqrs_writes_it(storage: SagaStorage) -> None:
    """get_sagas_for_recovery -> recover -> increment_recovery_attempts on failure, until the maximum."""
    stuck = await storage.create(execution(status=SagaStatus.RUNNING))
    for _ in range(5):
        ids = await storage.get_sagas_for_recovery(limit=10)
        assert ids == [stuck.id]
        await storage.increment_recovery_attempts(ids[0])
    assert await storage.get_sagas_for_recovery(limit=10) == []  # max_recovery_attempts=5 by default
    await storage.set_recovery_attempts(stuck.id, 0)
    assert await storage.get_sagas_for_recovery(limit=10, max_recovery_attempts=5) == [stuck.id]


async def test_failed_stays_recoverable(storage: SagaStorage) -> None:
    """Unlike python-cqrs's current protocol (RUNNING and COMPENSATING only), FAILED is picked up."""
    failed = await storage.create(execution(status=SagaStatus.FAILED))
    assert await storage.get_sagas_for_recovery(limit=10) == [failed.id]
