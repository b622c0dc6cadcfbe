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
from storage.records import new_execution_record, new_step_record

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


def test_the_hot_path_builders_give_what_the_constructors_give() -> None:
    record = full_execution_record()
    values = [getattr(record, f.name) for f in dataclasses.fields(record)]
    built = new_execution_record(*values)
    assert type(built) is ExecutionRecord and built == record and built is not record
    assert new_execution_record(record.id, "n", 1, SagaStatus.RUNNING, b"") == ExecutionRecord(
        record.id, "n", 1, SagaStatus.RUNNING, b""
    )
    step = record.steps[0]
    assert new_step_record(*[getattr(step, f.name) for f in dataclasses.fields(step)]) == step
    assert type(new_step_record("s", "local", "execute", "running", 1, NOW)) is StepRecord
    with pytest.raises(dataclasses.FrozenInstanceError):
        built.status = SagaStatus.FAILED  # type: ignore[misc]


def test_a_subclass_without_slots_of_its_own_is_built_as_itself() -> None:
    @dataclasses.dataclass(frozen=True, slots=True)
    class Tagged(StepRecord):
        pass

    tagged = Tagged("s", "local", "execute", "running", 1, NOW)
    assert type(tagged) is Tagged and tagged.name == "s"
