"""W3C trace context on the wire: every command and decision of a saga carries one, replies copy it.

The context comes from ``run(..., traceparent=...)``, else from the current OpenTelemetry span, else it
is a new trace; it is stored with the execution, so a replay sent from the stored row carries it too.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
from opentelemetry import trace
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

import saga.trace_context
from broker import BrokerMessage, InMemoryBrokerPool
from saga import (
    CommandContext,
    Saga,
    SagaContext,
    SagaExecution,
    SagaManager,
    SagaParticipant,
    SagaRequest,
    SagaStatus,
)
from saga.trace_context import validate_traceparent
from storage import MemorySagaStorage

TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def _fail(context: SagaContext) -> SagaContext:
    raise RuntimeError("confirmation failed")


UNDONE = (
    Saga("undone")
    .remote_step(lambda context: SagaRequest("Reserve", {"qty": 1}), name="reserve")
    .on_failure(lambda context: SagaRequest("Release", {"qty": 1}))
    .local_step(_fail, name="confirm")
    .commit()
)
WAITING = Saga("waiting").remote_step(lambda context: SagaRequest("Nobody", {}), name="wait").commit()


@pytest.fixture
async def world() -> AsyncIterator[tuple[InMemoryBrokerPool, SagaManager, MemorySagaStorage]]:
    pool = InMemoryBrokerPool(partitions=2)
    storage = MemorySagaStorage()
    manager = SagaManager(storage, pool, service_name="shop", relay_interval=0.05)
    participant = SagaParticipant("inventory", pool)
    participant.command("Reserve")(lambda request: {"reserved": 1})
    participant.command("Release")(lambda request: None)
    async with pool, manager, participant:
        yield pool, manager, storage


async def _messages(pool: InMemoryBrokerPool, topic: str, count: int) -> list[BrokerMessage]:
    for _ in range(300):
        messages = pool.topic_messages(topic)
        if len(messages) >= count:
            return messages
        await asyncio.sleep(0.01)
    raise AssertionError(f"{topic}: fewer than {count} messages")


async def test_a_given_trace_context_is_on_every_command_reply_and_decision(world: Any) -> None:
    pool, manager, _ = world
    done = await manager.run(
        UNDONE, SagaContext(), traceparent=TRACEPARENT, tracestate="vendor=opaque", raise_on_error=False
    )
    assert done.status is SagaStatus.ERRORED
    messages = [
        *pool.topic_messages("Reserve"),
        *pool.topic_messages("Release"),
        *pool.topic_messages("shopReply"),
        *await _messages(pool, "inventorySagaControl", 1),
    ]
    assert len(messages) == 5
    for message in messages:
        assert message.headers["traceparent"] == TRACEPARENT, message
        assert message.headers["tracestate"] == "vendor=opaque", message


async def test_a_replay_from_the_stored_execution_carries_the_same_context(world: Any) -> None:
    pool, manager, _ = world
    waiting = await manager.run(WAITING, SagaContext(), pause_on_disk=True, traceparent=TRACEPARENT)
    await manager.replay(waiting.id)
    commands = await _messages(pool, "Nobody", 2)
    assert [m.headers["traceparent"] for m in commands] == [TRACEPARENT, TRACEPARENT]
    assert "tracestate" not in commands[0].headers


async def test_the_current_opentelemetry_span_is_continued(world: Any) -> None:
    pool, manager, _ = world
    context = SpanContext(
        trace_id=0x0AF7651916CD43DD8448EB211C80319C,
        span_id=0xB7AD6B7169203331,
        is_remote=False,
        trace_flags=TraceFlags(TraceFlags.SAMPLED),
    )
    with trace.use_span(NonRecordingSpan(context)):
        await manager.run(UNDONE, SagaContext(), raise_on_error=False)
    expected = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    assert pool.topic_messages("Reserve")[0].headers["traceparent"] == expected
    assert pool.topic_messages("shopReply")[0].headers["traceparent"] == expected


async def test_without_any_context_each_saga_starts_a_new_trace(
    world: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    pool, manager, _ = world
    monkeypatch.setattr(saga.trace_context, "_otel_inject", lambda: None)
    await manager.run(UNDONE, SagaContext(), raise_on_error=False)
    await manager.run(UNDONE, SagaContext(), raise_on_error=False)
    first, second = (m.headers["traceparent"] for m in pool.topic_messages("Reserve"))
    assert validate_traceparent(first) and validate_traceparent(second)
    assert first.split("-")[1] != second.split("-")[1]
    release = pool.topic_messages("Release")
    assert {m.headers["traceparent"] for m in release} == {first, second}


@pytest.mark.parametrize(
    ("traceparent", "tracestate", "words"),
    [
        ("not-a-trace", None, "traceparent: expected"),
        ("00-00000000000000000000000000000000-00f067aa0ba902b7-01", None, "trace id"),
        ("ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", None, "version ff"),
        (None, "vendor=x", "tracestate: given without a traceparent"),
        (TRACEPARENT, "caf\u00e9=1", "tracestate: only printable ASCII"),
    ],
)
async def test_a_malformed_trace_context_is_refused_before_anything_starts(
    world: Any, traceparent: str | None, tracestate: str | None, words: str
) -> None:
    pool, manager, storage = world
    with pytest.raises(ValueError, match=words):
        await manager.run(UNDONE, SagaContext(), traceparent=traceparent, tracestate=tracestate)
    assert await storage.count_by_status() == {}
    assert pool.topic_messages("Reserve") == []


async def test_the_participant_logs_the_trace_context_of_each_command(
    world: Any, caplog: pytest.LogCaptureFixture
) -> None:
    _, manager, _ = world
    with caplog.at_level(logging.DEBUG):
        await manager.run(UNDONE, SagaContext(), traceparent=TRACEPARENT, raise_on_error=False)
    sides = {r.name.split(".")[1] for r in caplog.records if TRACEPARENT in r.getMessage()}
    assert {"manager", "participant"} <= sides


def test_handlers_see_the_trace_context() -> None:
    assert "traceparent" in CommandContext.__dataclass_fields__


async def test_a_stored_execution_without_a_trace_context_starts_one_with_its_next_command(
    world: Any,
) -> None:
    _, manager, storage = world
    waiting = await manager.run(WAITING, SagaContext(), pause_on_disk=True, traceparent=TRACEPARENT)
    record = await storage.load(waiting.id)
    state = orjson.loads(record.state)
    assert state["tp"] == TRACEPARENT
    del state["tp"]
    bare = dataclasses.replace(record, state=orjson.dumps(state))
    loaded = SagaExecution.from_record(bare, WAITING, reply_topic="shopReply")
    assert loaded.traceparent is None
    transition = await loaded.replay(datetime.now(UTC))
    (command,) = transition.outbox
    assert loaded.traceparent is not None and validate_traceparent(loaded.traceparent)
    assert command.headers["traceparent"] == loaded.traceparent != TRACEPARENT
    assert orjson.loads(loaded.to_record().state)["tp"] == loaded.traceparent
