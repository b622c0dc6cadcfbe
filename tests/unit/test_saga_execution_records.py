"""What `SagaExecution.to_record` writes, step after step, and what `from_record` rebuilds from it.

The engine takes shortcuts when it encodes (shared transitions, reused pieces); these tests hold every
record it writes against a plain reference encoding of the execution's state, and rebuild executions from
records mid-run to check nothing is lost.
"""

from __future__ import annotations

import os
import uuid
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

import orjson
import pytest

from saga import RetryPolicy, Saga, SagaContext, SagaExecution, SagaRequest, SagaResponse, SagaStatus
from saga.context import encode_context
from saga.state import STATE_FORMAT, Transition, moved, random_uuid
from storage import ExecutionRecord

NOW = datetime(2025, 1, 1, tzinfo=UTC)


def reference_state(ex: SagaExecution) -> dict[str, Any]:
    """The state document as the format defines it, built the slow, obvious way."""
    awaiting = ex.awaiting
    state: dict[str, Any] = {
        "v": STATE_FORMAT,
        "ctx": encode_context(dict(ex.context)),
        "phase": ex.phase,
        "cur": list(ex.cursor),
        "att": ex.attempt,
        "done": [list(path) for path in ex.executed],
        "comp": ex.compensated,
        "await": None if awaiting is None else awaiting.to_json(),
        "ans": list(ex.answered),
        "parts": list(ex.participants),
        "auto": ex.autocommit,
        "dec": ex.decision_sent,
        "dl": None if ex.deadline is None else ex.deadline.isoformat(),
    }
    if ex.traceparent is not None:
        state["tp"] = ex.traceparent
        if ex.tracestate is not None:
            state["ts"] = ex.tracestate
    return state


def check_record(ex: SagaExecution, definition: Saga, **kwargs: Any) -> ExecutionRecord:
    """``to_record`` matches the reference, byte for byte, and rebuilds into an equal execution."""
    record = ex.to_record(**kwargs)
    assert type(record.state) is bytes
    assert record.state == orjson.dumps(reference_state(ex), option=orjson.OPT_NON_STR_KEYS)
    assert record.steps == tuple(ex.steps) and type(record.steps) is tuple
    assert (record.id, record.name, record.definition_version) == (ex.id, definition.name, definition.version)
    assert (record.status, record.error, record.user) == (ex.status, ex.error, ex.user)
    assert record.reply_deadline == ex.reply_deadline
    assert (record.owner, record.lease_until) == (kwargs.get("owner"), kwargs.get("lease_until"))
    again = SagaExecution.from_record(record, definition, reply_topic="svcReply")
    assert again.to_record(**kwargs) == record
    for name in (
        "context",
        "status",
        "phase",
        "cursor",
        "attempt",
        "executed",
        "compensated",
        "answered",
        "traceparent",
        "tracestate",
    ):
        assert getattr(again, name) == getattr(ex, name), name
    assert (again.awaiting, again.participants, again.decision_sent) == (
        ex.awaiting,
        ex.participants,
        ex.decision_sent,
    )
    return record


def start(definition: Saga, context: dict[str, Any] | None = None, **kwargs: Any) -> SagaExecution:
    execution = SagaExecution.start(definition, context, reply_topic="svcReply", now=NOW, **kwargs)
    check_record(execution, definition)
    return execution


def setter(key: str, value: Any) -> Any:
    def step(ctx: SagaContext) -> SagaContext:
        ctx[key] = value
        return ctx

    step.__name__ = f"set_{key}"
    return step


def appender(key: str, value: Any) -> Any:
    """Changes a list already in the context in place (no new key, no new value object)."""

    def step(ctx: SagaContext) -> None:
        ctx[key].append(value)

    step.__name__ = f"append_{key}_{value}"
    return step


async def test_every_record_of_a_local_run_matches_the_reference_and_rebuilds() -> None:
    saga = (
        Saga("local")
        .local_step(setter("a", 1))
        .local_step(setter("when", NOW))
        .local_step(appender("items", {"id": uuid.UUID(int=3), "qty": Decimal("1.5")}))
        .local_step(appender("items", (date(2024, 2, 29), 2**63 - 1)))
        .local_step(setter("a", "changed"), name="change_a")
        .commit()
    )
    ex = start(saga, {"order": 7, "items": []}, user="alice", idempotency_key="k")
    while not ex.terminal:
        await ex.advance(NOW)
        check_record(ex, saga, owner="me", lease_until=NOW)
    assert ex.status is SagaStatus.FINISHED
    assert ex.context["items"] == [
        {"id": uuid.UUID(int=3), "qty": Decimal("1.5")},
        (date(2024, 2, 29), 2**63 - 1),
    ]


async def test_a_context_changed_in_place_after_a_save_is_saved_with_the_change() -> None:
    saga = Saga("inplace").local_step(setter("a", 1)).local_step(setter("b", 2)).commit()
    ex = start(saga, {"nested": {"list": [1]}})
    first = check_record(ex, saga)
    ex.context["nested"]["list"].append(2)  # no setter involved
    second = check_record(ex, saga)
    assert orjson.loads(second.state)["ctx"]["nested"] == {"list": [1, 2]} != orjson.loads(first.state)
    await ex.advance(NOW)
    ex.context["nested"]["extra"] = uuid.UUID(int=9)
    del ex.context["a"]
    third = check_record(ex, saga)
    assert orjson.loads(third.state)["ctx"] == {
        "nested": {"list": [1, 2], "extra": {"$uuid": str(uuid.UUID(int=9))}}
    }


async def test_a_failed_step_rolls_the_context_back_to_the_last_record() -> None:
    def breaks(ctx: SagaContext) -> None:
        ctx["nested"]["list"].append("half-done")
        ctx["later"] = 1
        raise RuntimeError("boom")

    saga = Saga("rollback").local_step(setter("a", 1)).local_step(breaks).commit()
    ex = start(saga, {"nested": {"list": [1]}})
    await ex.advance(NOW)
    stored = check_record(ex, saga)
    failed = await ex.advance(NOW)
    assert failed.status is SagaStatus.ERRORED
    assert ex.context == {"nested": {"list": [1]}, "a": 1}
    record = check_record(ex, saga)
    assert orjson.loads(record.state)["ctx"] == orjson.loads(stored.state)["ctx"]


async def test_records_of_a_compensated_run_with_remote_steps_match_the_reference() -> None:
    def undo(ctx: SagaContext) -> SagaRequest:
        return SagaRequest("payments", {"refund": ctx["order"]})

    def fail(ctx: SagaContext) -> None:
        raise ValueError("no stock")

    saga = (
        Saga("mixed", deadline=3600)
        .local_step(setter("a", 1))
        .on_failure(setter("a_undone", True))
        .remote_step(lambda ctx: SagaRequest("payments", {"order": ctx["order"], "n": [1, 2]}), timeout=5)
        .on_success(lambda ctx, response: SagaContext(ctx, paid=response.content))
        .on_failure(undo)
        .local_step(fail)
        .commit()
    )
    ex = start(saga, {"order": 1})
    moves: list[Transition] = []
    while not ex.terminal:
        if ex.awaiting is not None:
            response = SagaResponse({"id": 5}, 200, ex.id, ex.awaiting.request_id, "payments")
            moves.append(await ex.apply_reply(response, NOW))
        else:
            moves.append(await ex.advance(NOW))
        check_record(ex, saga, owner="me")
    assert [m.status for m in moves] == [
        SagaStatus.RUNNING,
        SagaStatus.PAUSED,
        SagaStatus.RUNNING,
        SagaStatus.COMPENSATING,
        SagaStatus.PAUSED,
        SagaStatus.COMPENSATING,
        SagaStatus.ERRORED,
    ]
    assert ex.participants == ["payments"] and ex.decision_sent
    assert ex.context == {"order": 1, "a": 1, "paid": {"id": 5}, "a_undone": True}


async def test_records_of_a_retried_and_replayed_run_match_the_reference() -> None:
    attempts: list[int] = []

    def flaky(ctx: SagaContext) -> None:
        attempts.append(1)
        if len(attempts) < 2:
            raise RuntimeError("flaky")

    saga = (
        Saga("retry")
        .local_step(flaky, retry=RetryPolicy(max_attempts=3, initial_delay=0.0))
        .remote_step(lambda ctx: SagaRequest("stock", {}), timeout=1, retry=RetryPolicy(max_attempts=2))
        .commit()
    )
    ex = start(saga)
    retry = await ex.advance(NOW)
    assert retry.retry_after is not None and not retry.persist
    check_record(ex, saga)
    await ex.advance(NOW)
    await ex.advance(NOW)
    assert ex.awaiting is not None
    replayed = await ex.on_timeout(NOW + timedelta(seconds=2))
    assert replayed.paused and ex.awaiting.attempt == 2
    check_record(ex, saga)


def test_random_uuid_is_a_version_4_uuid_like_uuid4() -> None:
    seen = set()
    for _ in range(200):
        value = random_uuid()
        assert type(value) is uuid.UUID and value.version == 4 and value.variant == uuid.RFC_4122
        assert uuid.UUID(str(value)) == value and hash(uuid.UUID(bytes=value.bytes)) == hash(value)
        assert value.is_safe is uuid.SafeUUID.unknown
        with pytest.raises(TypeError):
            value.int = 1  # type: ignore[misc]
        seen.add(value)
    assert len(seen) == 200


def test_a_forked_child_never_hands_out_its_parents_next_ids() -> None:
    random_uuid()  # ids drawn ahead in this process
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.close(read)
        os.write(write, random_uuid().bytes)
        os._exit(0)
    os.close(write)
    child = uuid.UUID(bytes=os.read(read, 16))
    os.close(read)
    os.waitpid(pid, 0)
    assert child.version == 4 and child != random_uuid()


def test_moved_transitions_are_shared_and_equal_to_fresh_ones() -> None:
    first = moved(SagaStatus.COMPENSATING, "step")
    assert first is moved(SagaStatus.COMPENSATING, "step")
    assert first == Transition(SagaStatus.COMPENSATING, step="step")
    assert moved(SagaStatus.FINISHED, None) == Transition(SagaStatus.FINISHED)
    assert moved(SagaStatus.FINISHED, None) is not moved(SagaStatus.ERRORED, None)
