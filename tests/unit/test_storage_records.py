"""The hand-written record constructors behave exactly like the dataclass ones they replace."""

from __future__ import annotations

import copy
import dataclasses
import pickle
import uuid
from datetime import UTC, datetime
from typing import Any

import pytest

from storage import ExecutionRecord, SagaStatus, StepRecord

NOW = datetime(2024, 1, 1, tzinfo=UTC)


def full_execution_record() -> ExecutionRecord:
    step = StepRecord("s", "local", "execute", "failed", 2, NOW, NOW, uuid.uuid4(), {"error": "x"})
    return ExecutionRecord(
        uuid.uuid4(),
        "order",
        3,
        SagaStatus.PAUSED,
        b'{"v":1}',
        (step,),
        4,
        1,
        "key",
        "alice",
        NOW,
        "owner",
        NOW,
        {"error": "boom"},
        NOW,
        NOW,
    )


@pytest.mark.parametrize(
    "make",
    [
        full_execution_record,
        lambda: StepRecord("s", "remote", "compensate", "waiting", 1, NOW, None, uuid.uuid4(), None),
    ],
)
def test_records_are_frozen_instances_of_their_class_with_every_field_set(make: Any) -> None:
    record = make()
    cls = type(record)
    assert cls in (ExecutionRecord, StepRecord)
    assert isinstance(record, cls) and not hasattr(record, "__dict__")
    for field in dataclasses.fields(record):
        getattr(record, field.name)  # every slot filled
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(record, field.name, None)
    assert copy.copy(record) == record == pickle.loads(pickle.dumps(record))
    assert dataclasses.replace(record) == record
    assert type(dataclasses.replace(record)) is cls


def test_positional_keyword_and_default_arguments_fill_the_same_fields() -> None:
    record = full_execution_record()
    values = {f.name: getattr(record, f.name) for f in dataclasses.fields(record)}
    assert ExecutionRecord(**values) == record
    assert ExecutionRecord(*values.values()) == record
    minimal = ExecutionRecord(record.id, "order", 1, SagaStatus.RUNNING, b"{}")
    assert (minimal.steps, minimal.version, minimal.recovery_attempts) == ((), 0, 0)
    assert minimal.idempotency_key is minimal.owner is minimal.error is minimal.updated_at is None
    assert repr(minimal).startswith("ExecutionRecord(id=")
    step = StepRecord("s", "local", "execute", "succeeded", 1, NOW)
    assert step.finished_at is step.request_id is step.error is None
    with pytest.raises(TypeError):
        StepRecord("s", "local", "execute", "succeeded")  # type: ignore[call-arg]
