"""What only the in-memory adapter promises: an injectable clock and isolation from callers' objects."""

from __future__ import annotations

import dataclasses
import uuid
from datetime import UTC, datetime, timedelta

from storage import ExecutionRecord, MemorySagaStorage, OutboxMessage, SagaStatus, StepRecord


class FakeClock:
    def __init__(self) -> None:
        self.now = datetime(2024, 1, 1, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


def record(**changes: object) -> ExecutionRecord:
    base = ExecutionRecord(
        id=uuid.uuid4(), name="order", definition_version=1, status=SagaStatus.RUNNING, state=b"{}"
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


async def test_clock_drives_timestamps_staleness_and_leases() -> None:
    clock = FakeClock()
    storage = MemorySagaStorage(clock=clock)
    created = await storage.create(record())
    assert created.created_at == created.updated_at == clock.now

    assert await storage.get_sagas_for_recovery(10, stale_after_seconds=60) == []
    clock.advance(61)
    assert await storage.get_sagas_for_recovery(10, stale_after_seconds=60) == [created.id]

    claimed = await storage.claim(created.id, "a", lease_seconds=30)
    assert claimed is not None and claimed.lease_until == clock.now + timedelta(seconds=30)
    assert claimed.updated_at == clock.now
    clock.advance(29)
    assert await storage.claim(created.id, "b", lease_seconds=30) is None
    clock.advance(2)
    taken = await storage.claim(created.id, "b", lease_seconds=30)
    assert taken is not None and taken.owner == "b"


async def test_paused_deadline_uses_the_clock() -> None:
    clock = FakeClock()
    storage = MemorySagaStorage(clock=clock)
    paused = await storage.create(
        record(status=SagaStatus.PAUSED, reply_deadline=clock.now + timedelta(seconds=10))
    )
    assert await storage.get_sagas_for_recovery(10) == []
    clock.advance(11)
    assert await storage.get_sagas_for_recovery(10) == [paused.id]


async def test_outbox_lease_uses_the_clock() -> None:
    clock = FakeClock()
    storage = MemorySagaStorage(clock=clock)
    await storage.create(record(), outbox=[OutboxMessage("t", None, b"v")])
    assert len(await storage.fetch_outbox(owner="a", lease_seconds=5)) == 1
    assert await storage.fetch_outbox(owner="b", lease_seconds=5) == []
    clock.advance(6)
    assert len(await storage.fetch_outbox(owner="b", lease_seconds=5)) == 1


async def test_callers_cannot_mutate_stored_state() -> None:
    storage = MemorySagaStorage()
    error = {"type": "Boom", "detail": {"code": 1}}
    step_error = {"type": "StepBoom"}
    step = StepRecord("s", "local", "execute", "failed", 1, datetime.now(UTC), error=step_error)
    headers = {"h": "1"}
    created = await storage.create(
        record(error=error, steps=(step,)), outbox=[OutboxMessage("t", None, b"v", headers)]
    )
    error["type"] = "changed"
    error["detail"]["code"] = 2  # type: ignore[index]
    step_error["type"] = "changed"
    headers["h"] = "changed"
    loaded = await storage.load(created.id)
    assert loaded.error == {"type": "Boom", "detail": {"code": 1}}
    assert loaded.steps[0].error == {"type": "StepBoom"}

    loaded.error["type"] = "changed again"  # type: ignore[index]
    assert (await storage.load(created.id)).error == {"type": "Boom", "detail": {"code": 1}}
    (row,) = await storage.fetch_outbox(lease_seconds=-1)
    assert row.headers == {"h": "1"}
    row.headers["h"] = "x"  # type: ignore[index]
    (again,) = await storage.fetch_outbox(lease_seconds=-1)
    assert again.headers == {"h": "1"}


async def test_save_copies_error_mappings_on_the_way_in_and_out_and_keeps_every_other_field() -> None:
    storage = MemorySagaStorage()
    now = datetime.now(UTC)
    ok = StepRecord("a", "local", "execute", "succeeded", 1, now, now)
    step_error = {"type": "StepBoom", "detail": {"n": [1]}}
    failed = StepRecord("b", "remote", "execute", "failed", 2, now, now, uuid.uuid4(), step_error)
    created = await storage.create(record())
    error = {"step": "b", "error": "boom"}
    sent = dataclasses.replace(created, steps=(ok, failed), error=error, status=SagaStatus.COMPENSATING)
    saved = await storage.save(sent)
    assert saved.steps == (ok, failed) and saved.error == error and saved.version == created.version + 1
    assert saved.steps[0] is ok  # nothing mutable in it: shared, not copied
    assert saved.steps[1].error is not step_error and saved.error is not error
    step_error["detail"]["n"].append(2)  # type: ignore[index]
    error["error"] = "changed"
    saved.steps[1].error["type"] = "changed"  # type: ignore[index]
    saved.error["step"] = "changed"  # type: ignore[index]
    loaded = await storage.load(created.id)
    assert loaded.steps[1].error == {"type": "StepBoom", "detail": {"n": [1]}}
    assert loaded.error == {"step": "b", "error": "boom"}
    expected = dataclasses.replace(saved, error=loaded.error, steps=loaded.steps)
    assert loaded == expected and type(loaded.steps) is tuple
