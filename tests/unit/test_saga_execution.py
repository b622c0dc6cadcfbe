"""SagaExecution as a pure state machine: no storage, no broker, transitions only."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest

from broker import BrokerMessage
from saga import (
    RetryPolicy,
    Saga,
    SagaContext,
    SagaContextError,
    SagaExecution,
    SagaRequest,
    SagaResponse,
    SagaStateError,
    SagaStatus,
)
from saga.messages import SagaCommand, SagaControl
from saga.state import AwaitedRequest, Transition
from storage import OutboxMessage

NOW = datetime(2025, 1, 1, tzinfo=UTC)


def start(saga: Saga, context: dict[str, Any] | None = None, **kwargs: Any) -> SagaExecution:
    return SagaExecution.start(saga, context, reply_topic="svcReply", now=NOW, **kwargs)


def command(transition: Transition, index: int = 0) -> SagaCommand:
    row = transition.outbox[index]
    return SagaCommand.from_message(
        BrokerMessage(topic=row.topic, key=row.key, value=row.value, headers=row.headers)
    )


def reply(
    ex: SagaExecution,
    status: int = 200,
    content: Any = None,
    *,
    service: str = "orders",
    request: uuid.UUID | None = None,
) -> SagaResponse:
    assert ex.awaiting is not None or request is not None
    rid = request if request is not None else ex.awaiting.request_id  # type: ignore[union-attr]
    return SagaResponse(content, status, ex.id, rid, service)


def add(key: str, value: Any) -> Any:
    def step(ctx: SagaContext) -> None:
        ctx[key] = value

    step.__name__ = f"add_{key}"
    return step


def request_to(topic: str) -> Any:
    def build(ctx: SagaContext) -> SagaRequest:
        return SagaRequest(topic, {"order": ctx.get("order")})

    build.__name__ = f"send_{topic}"
    return build


async def test_local_steps_one_per_advance_and_finish_in_the_last_move() -> None:
    saga = Saga("local").local_step(add("a", 1)).local_step(add("b", 2)).local_step(add("c", 3)).commit()
    ex = start(saga, {"order": 7})
    assert ex.status is SagaStatus.RUNNING
    first = await ex.advance(NOW)
    assert (first.status, first.persist, first.step, first.outbox) == (SagaStatus.RUNNING, True, "add_a", ())
    await ex.advance(NOW)
    last = await ex.advance(NOW)
    assert last.status is SagaStatus.FINISHED and last.terminal and not last.paused
    assert dict(ex.context) == {"order": 7, "a": 1, "b": 2, "c": 3}
    assert [(s.name, s.status, s.attempts) for s in ex.steps] == [
        ("add_a", "succeeded", 1),
        ("add_b", "succeeded", 1),
        ("add_c", "succeeded", 1),
    ]
    with pytest.raises(SagaStateError, match="cannot advance"):
        await ex.advance(NOW)


async def test_local_step_may_return_a_new_context_or_mapping() -> None:
    async def replace(ctx: SagaContext) -> dict[str, Any]:
        return {"only": True}

    saga = Saga("ret").local_step(lambda ctx: SagaContext(x=1)).local_step(replace).commit()
    ex = start(saga)
    await ex.advance(NOW)
    assert ex.context == {"x": 1}
    await ex.advance(NOW)
    assert ex.context == {"only": True}


async def test_record_round_trip_keeps_everything() -> None:
    saga = (
        Saga("rt")
        .local_step(add("a", uuid.UUID(int=5)))
        .remote_step(request_to("orders"), timeout=5)
        .commit()
    )
    ex = start(saga, {"order": 1}, user="alice", idempotency_key="k1")
    await ex.advance(NOW)
    paused = await ex.advance(NOW)
    assert paused.paused and len(paused.outbox) == 1
    record = ex.to_record(owner="me")
    assert record.status is SagaStatus.PAUSED and record.owner == "me" and record.user == "alice"
    assert record.reply_deadline == NOW + timedelta(seconds=5)
    assert orjson.loads(record.state)["ctx"]["a"] == {"$uuid": str(uuid.UUID(int=5))}
    again = SagaExecution.from_record(record, saga, reply_topic="svcReply")
    assert again.context == ex.context and again.awaiting == ex.awaiting
    assert again.steps == ex.steps and again.idempotency_key == "k1" and again.uuid == ex.id
    assert again.cursor == ex.cursor and again.executed == ex.executed
    other = Saga("rt", version=2).local_step(add("a", 1)).commit()
    with pytest.raises(SagaStateError, match="not 'rt' v2"):
        SagaExecution.from_record(record, other, reply_topic="x")


async def test_remote_step_pauses_with_a_command_and_applies_only_the_awaited_reply() -> None:
    def ok(ctx: SagaContext, response: SagaResponse) -> SagaContext:
        ctx.reserved = response.content["id"]
        return ctx

    saga = (
        Saga("remote").remote_step(request_to("orders")).on_success(ok).local_step(add("done", True)).commit()
    )
    ex = start(saga, {"order": 3}, user="bob")
    paused = await ex.advance(NOW)
    assert paused.status is SagaStatus.PAUSED
    cmd = command(paused)
    assert cmd.target == "orders" and cmd.content == {"order": 3} and cmd.reply_topic == "svcReply"
    assert cmd.execution_id == ex.id and cmd.idempotency_key == str(cmd.request_id) and cmd.user == "bob"
    assert cmd.saga == "remote" and cmd.step == "send_orders"
    assert ex.awaiting is not None and ex.awaiting.request_id == cmd.request_id
    with pytest.raises(SagaStateError):
        await ex.advance(NOW)

    stranger = await ex.apply_reply(reply(ex, request=uuid.uuid4()), NOW)
    assert (stranger.outcome, stranger.persist) == ("stale", False)
    weird = await ex.apply_reply(reply(ex, 302), NOW)
    assert weird.outcome == "unknown_status" and ex.awaiting is not None
    applied = await ex.apply_reply(reply(ex, 200, {"id": "r-1"}), NOW)
    assert applied.outcome == "applied" and applied.status is SagaStatus.RUNNING
    assert ex.context.reserved == "r-1" and "done" not in ex.context  # one step per move
    finished = await ex.advance(NOW)
    assert finished.status is SagaStatus.FINISHED and ex.context.done is True
    assert ex.participants == ["orders"]
    duplicate = await ex.apply_reply(reply(ex, 200, request=cmd.request_id), NOW)
    assert duplicate.outcome == "duplicate" and not duplicate.persist
    commit = finished.outbox
    assert [
        SagaControl.from_message(BrokerMessage(r.topic, r.key, r.value, r.headers)).action for r in commit
    ] == ["commit"]


async def test_reverse_compensation_order_and_errored() -> None:
    undone: list[str] = []

    def undo(name: str) -> Any:
        def compensation(ctx: SagaContext) -> None:
            undone.append(name)

        return compensation

    def boom(ctx: SagaContext) -> None:
        ctx.half = "applied"  # must not survive the failure
        raise RuntimeError("no stock")

    saga = (
        Saga("comp")
        .local_step(add("a", 1))
        .on_failure(undo("a"))
        .local_step(add("b", 2))  # no compensation: skipped
        .local_step(add("c", 3))
        .on_failure(undo("c"))
        .local_step(boom)
        .on_failure(undo("boom"))
        .commit()
    )
    ex = start(saga)
    for _ in range(3):
        await ex.advance(NOW)
    failing = await ex.advance(NOW)
    assert failing.status is SagaStatus.COMPENSATING
    assert "half" not in ex.context
    assert ex.error == {"step": "boom", "error": "no stock", "type": "RuntimeError"}
    await ex.advance(NOW)
    final = await ex.advance(NOW)
    assert final.status is SagaStatus.ERRORED
    assert undone == ["c", "a"]
    phases = [(s.name, s.phase, s.status) for s in ex.steps]
    assert phases[3:] == [
        ("boom", "execute", "failed"),
        ("add_c", "compensate", "succeeded"),
        ("add_a", "compensate", "succeeded"),
    ]


async def test_failure_with_nothing_to_compensate_ends_errored_at_once() -> None:
    saga = Saga("x").local_step(lambda ctx: 1 / 0).commit()
    ex = start(saga)
    transition = await ex.advance(NOW)
    assert transition.status is SagaStatus.ERRORED and ex.error is not None
    assert ex.error["type"] == "ZeroDivisionError"


async def test_local_retry_returns_a_delay_without_persisting() -> None:
    calls = []

    def flaky(ctx: SagaContext) -> None:
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionError("flaky")
        ctx.ok = True

    saga = (
        Saga("retry")
        .local_step(flaky, retry=RetryPolicy(max_attempts=3, initial_delay=0.2, backoff=3))
        .commit()
    )
    ex = start(saga)
    first = await ex.advance(NOW)
    assert (first.persist, first.retry_after) == (False, 0.2)
    second = await ex.advance(NOW + timedelta(seconds=1))
    assert second.retry_after == pytest.approx(0.6)
    third = await ex.advance(NOW + timedelta(seconds=2))
    assert third.status is SagaStatus.FINISHED and ex.context.ok
    assert ex.steps[0].attempts == 3 and ex.steps[0].started_at == NOW


async def test_400_with_and_without_on_error() -> None:
    def handled(ctx: SagaContext, response: SagaResponse) -> SagaContext:
        ctx.refused = response.content
        return ctx

    compensated: list[str] = []
    with_handler = (
        Saga("h")
        .remote_step(request_to("pay"))
        .on_error(handled)
        .on_failure(lambda ctx: compensated.append("pay") or None)
        .commit()
    )
    ex = start(with_handler)
    await ex.advance(NOW)
    result = await ex.apply_reply(reply(ex, 400, "no funds", service="pay"), NOW)
    assert result.status is SagaStatus.FINISHED and ex.context.refused == "no funds"
    assert ex.steps[0].status == "succeeded" and ex.steps[0].error is not None
    assert ex.executed == []  # a refused command has nothing to undo

    without = (
        Saga("n")
        .local_step(add("a", 1))
        .on_failure(lambda ctx: compensated.append("a"))
        .remote_step(request_to("pay"))
        .commit()
    )
    ex = start(without)
    await ex.advance(NOW)
    await ex.advance(NOW)
    result = await ex.apply_reply(reply(ex, 400, {"why": "no"}, service="pay"), NOW)
    assert result.status is SagaStatus.COMPENSATING
    assert ex.error is not None and ex.error["status"] == 400 and ex.error["reply"] == {"why": "no"}
    final = await ex.advance(NOW)
    assert final.status is SagaStatus.ERRORED and compensated == ["a"]
    rejects = [r.topic for r in final.outbox]
    assert rejects == ["paySagaControl"]


async def test_on_error_that_raises_compensates() -> None:
    def refuse(ctx: SagaContext, response: SagaResponse) -> None:
        raise ValueError("cannot continue")

    saga = Saga("x").remote_step(request_to("pay")).on_error(refuse).commit()
    ex = start(saga)
    await ex.advance(NOW)
    result = await ex.apply_reply(reply(ex, 400), NOW)
    assert result.status is SagaStatus.ERRORED
    assert ex.error == {"step": "send_pay", "error": "cannot continue", "type": "ValueError"}


async def test_500_is_retried_with_a_new_request_then_compensates() -> None:
    saga = Saga("x").remote_step(request_to("pay"), retry=RetryPolicy(max_attempts=2)).commit()
    ex = start(saga)
    first = command(await ex.advance(NOW))
    retried = await ex.apply_reply(reply(ex, 500), NOW)
    second = command(retried)
    assert retried.status is SagaStatus.PAUSED
    assert second.request_id != first.request_id and second.idempotency_key != first.idempotency_key
    assert second.content == first.content and ex.steps[0].attempts == 2
    final = await ex.apply_reply(reply(ex, 500), NOW)
    assert final.status is SagaStatus.ERRORED and ex.error is not None and ex.error["status"] == 500
    late = await ex.apply_reply(reply(ex, 200, request=first.request_id), NOW)
    assert late.outcome == "duplicate"


async def test_timeout_replays_same_request_then_compensates_the_step_too() -> None:
    undone: list[str] = []
    saga = (
        Saga("t")
        .remote_step(request_to("pay"), timeout=10, retry=RetryPolicy(max_attempts=2))
        .on_failure(lambda ctx: undone.append("pay") or SagaRequest("refund", {}))
        .commit()
    )
    ex = start(saga)
    first = command(await ex.advance(NOW))
    not_yet = await ex.on_timeout(NOW + timedelta(seconds=5))
    assert not not_yet.persist and not ex.overdue(NOW + timedelta(seconds=5))
    later = NOW + timedelta(seconds=11)
    assert ex.overdue(later)
    replayed = await ex.on_timeout(later)
    again = command(replayed)
    assert (again.request_id, again.idempotency_key) == (first.request_id, first.idempotency_key)
    assert ex.steps[0].attempts == 2 and ex.to_record().reply_deadline == later + timedelta(seconds=10)
    gave_up = await ex.on_timeout(later + timedelta(seconds=11))
    assert (
        gave_up.status is SagaStatus.COMPENSATING and ex.error is not None and ex.error["type"] == "timeout"
    )
    refund = await ex.advance(later)
    assert refund.paused and command(refund).target == "refund" and undone == ["pay"]
    late = await ex.apply_reply(reply(ex, 200, request=first.request_id), NOW)
    assert late.outcome == "stale"  # never answered, no longer awaited
    done = await ex.apply_reply(reply(ex, 200, service="refund"), NOW)
    assert done.status is SagaStatus.ERRORED


async def test_failing_compensation_goes_dead_letter_with_structured_error() -> None:
    attempts: list[int] = []

    def bad_undo(ctx: SagaContext) -> None:
        attempts.append(1)
        raise OSError("disk full")

    saga = (
        Saga("dl", compensation_retry=RetryPolicy(max_attempts=2, initial_delay=0.01))
        .local_step(add("a", 1))
        .on_failure(bad_undo)
        .local_step(lambda ctx: 1 / 0, name="explode")
        .commit()
    )
    ex = start(saga)
    await ex.advance(NOW)
    await ex.advance(NOW)
    retry = await ex.advance(NOW)
    assert retry.retry_after == 0.01 and not retry.persist
    final = await ex.advance(NOW)
    assert final.status is SagaStatus.DEAD_LETTER and len(attempts) == 2
    assert ex.error is not None
    assert {k: ex.error[k] for k in ("step", "error", "failed_step", "compensation_error")} == {
        "step": "add_a",
        "error": "division by zero",
        "failed_step": "explode",
        "compensation_error": "disk full",
    }
    # Retried by a person: the compensation runs again and the original error comes back.
    ex.status = SagaStatus.FAILED
    attempts.clear()
    saga.steps[0].failure_fn = lambda ctx: None  # type: ignore[attr-defined]
    await ex.resume()
    assert ex.status is SagaStatus.COMPENSATING
    done = await ex.advance(NOW)
    assert done.status is SagaStatus.ERRORED and ex.error is not None and ex.error["step"] == "explode"


async def test_remote_compensation_non_200_retries_then_dead_letters() -> None:
    saga = (
        Saga("rc")
        .remote_step(request_to("stock"))
        .on_failure(lambda ctx: SagaRequest("release", {}))
        .local_step(lambda ctx: 1 / 0, name="explode")
        .commit()
    )
    ex = start(saga)
    await ex.advance(NOW)
    await ex.apply_reply(reply(ex, 200, service="stock"), NOW)
    assert (await ex.advance(NOW)).status is SagaStatus.COMPENSATING
    sent = await ex.advance(NOW)
    assert sent.paused and command(sent).target == "release"
    result = await ex.apply_reply(reply(ex, 500, service="stock"), NOW)
    assert result.status is SagaStatus.DEAD_LETTER
    assert ex.error is not None and ex.error["compensation_error"] == "participant stock replied 500"


async def test_remote_compensation_returning_none_is_skipped() -> None:
    saga = (
        Saga("s")
        .local_step(add("a", 1))
        .on_failure(add("undone", True))
        .remote_step(request_to("x"))
        .on_failure(lambda ctx: None)
        .local_step(lambda ctx: 1 / 0, name="explode")
        .commit()
    )
    ex = start(saga)
    await ex.advance(NOW)
    await ex.advance(NOW)
    await ex.apply_reply(reply(ex), NOW)
    assert (await ex.advance(NOW)).status is SagaStatus.COMPENSATING  # explode
    skipped = await ex.advance(NOW)
    assert skipped.status is SagaStatus.COMPENSATING
    final = await ex.advance(NOW)
    assert final.status is SagaStatus.ERRORED and ex.context.undone
    assert [s.status for s in ex.steps if s.phase == "compensate"] == ["skipped", "succeeded"]


@pytest.mark.parametrize(("x", "expected"), [(1, ["a", "after"]), (2, ["b", "after"]), (3, ["c", "after"])])
async def test_conditional_branches(x: int, expected: list[str]) -> None:
    ran: list[str] = []

    def mark(name: str) -> Any:
        def step(ctx: SagaContext) -> None:
            ran.append(name)

        step.__name__ = name
        return step

    async def is_two(ctx: SagaContext) -> bool:
        return bool(ctx.x == 2)

    saga = (
        Saga("cond")
        .conditional_step(name="pick")
        .if_then(lambda ctx: ctx.x == 1, Saga().local_step(mark("a")).commit())
        .if_then(is_two, Saga().local_step(mark("b")).commit())
        .else_then(Saga().local_step(mark("c")).commit())
        .local_step(mark("after"))
        .commit()
    )
    ex = start(saga, {"x": x})
    first = await ex.advance(NOW)
    assert first.status is SagaStatus.RUNNING and first.step == expected[0]
    final = await ex.advance(NOW)
    assert final.status is SagaStatus.FINISHED and ran == expected
    assert ex.steps[0].name == "pick" and ex.steps[0].kind == "conditional"


async def test_conditional_with_no_branch_taken_skips_and_nested_steps_compensate() -> None:
    undone: list[str] = []
    inner = (
        Saga()
        .local_step(add("in1", 1), name="in1")
        .on_failure(lambda ctx: undone.append("in1"))
        .local_step(add("in2", 2), name="in2")
        .on_failure(lambda ctx: undone.append("in2"))
        .commit()
    )
    skip = Saga("skip").conditional_step().if_then(lambda ctx: False, inner).local_step(add("z", 1)).commit()
    ex = start(skip)
    result = await ex.advance(NOW)
    assert result.status is SagaStatus.FINISHED and ex.steps[0].status == "skipped"

    ending = Saga("end").local_step(add("a", 1)).conditional_step().if_then(lambda ctx: False, inner).commit()
    ex = start(ending)
    await ex.advance(NOW)
    assert (await ex.advance(NOW)).status is SagaStatus.FINISHED

    failing = (
        Saga("fail")
        .local_step(add("a", 1))
        .on_failure(lambda ctx: undone.append("a"))
        .conditional_step()
        .if_then(lambda ctx: True, inner)
        .local_step(lambda ctx: 1 / 0, name="explode")
        .commit()
    )
    ex = start(failing)
    while not ex.terminal:
        await ex.advance(NOW)
    assert ex.status is SagaStatus.ERRORED and undone == ["in2", "in1", "a"]


async def test_condition_that_raises_compensates() -> None:
    sub = Saga().local_step(add("x", 1)).commit()
    saga = Saga("c").conditional_step(name="pick").if_then(lambda ctx: ctx.missing, sub).commit()
    ex = start(saga)
    result = await ex.advance(NOW)
    assert result.status is SagaStatus.ERRORED and ex.error is not None and ex.error["step"] == "pick"


async def test_unstorable_context_value_names_key_and_step() -> None:
    def store_object(ctx: SagaContext) -> None:
        ctx.handle = object()

    saga = Saga("bad").local_step(store_object).commit()
    ex = start(saga)
    with pytest.raises(SagaContextError, match="set in step 'store_object'") as info:
        await ex.advance(NOW)
    assert info.value.key == "handle" and info.value.step == "store_object"

    def nested(ctx: SagaContext) -> None:
        ctx.things = []
        ctx.things.append({1, 2})  # mutated in place: caught when the state is stored

    ex = start(Saga("late").local_step(nested).commit())
    transition = await ex.advance(NOW)
    with pytest.raises(SagaContextError, match=r"'things\[0\]'.*set in step 'nested'") as late:
        ex.to_record(step=transition.step)
    assert late.value.key == "things" and late.value.step == "nested"


async def test_saga_deadline_compensates_running_and_paused_runs() -> None:
    undone: list[str] = []
    saga = (
        Saga("dl", deadline=60)
        .local_step(add("a", 1))
        .on_failure(lambda ctx: undone.append("a"))
        .remote_step(request_to("slow"))
        .on_failure(lambda ctx: undone.append("slow") or None)
        .commit()
    )
    ex = start(saga)
    await ex.advance(NOW)
    await ex.advance(NOW)
    assert ex.to_record().reply_deadline == NOW + timedelta(seconds=60)
    late = NOW + timedelta(seconds=61)
    assert ex.overdue(late)
    result = await ex.on_timeout(late)
    assert (
        result.status is SagaStatus.COMPENSATING and ex.error is not None and ex.error["type"] == "deadline"
    )
    while not ex.terminal:
        await ex.advance(late)
    assert undone == ["slow", "a"]

    ex = start(Saga("dl2", deadline=1).local_step(add("a", 1)).local_step(add("b", 1)).commit())
    await ex.advance(NOW)
    result = await ex.advance(NOW + timedelta(seconds=2))
    assert result.status is SagaStatus.ERRORED and ex.error is not None and ex.error["type"] == "deadline"


async def test_decide_once_and_only_in_the_right_status() -> None:
    saga = Saga("d").remote_step(request_to("a")).remote_step(request_to("b")).commit()
    ex = start(saga, autocommit=False)
    await ex.advance(NOW)
    await ex.apply_reply(reply(ex, service="svc"), NOW)
    await ex.advance(NOW)
    final = await ex.apply_reply(reply(ex, service="svc"), NOW)
    assert final.status is SagaStatus.FINISHED and final.outbox == ()
    with pytest.raises(SagaStateError, match="cannot reject"):
        ex.decide("reject")
    first = ex.decide("commit")
    assert [m.topic for m in first.outbox] == ["svcSagaControl"]  # one per service, not per step
    second = ex.decide("commit")
    assert not second.persist and second.outbox == ()


async def test_mark_failed_and_resume() -> None:
    saga = Saga("f").local_step(add("a", 1)).commit()
    ex = start(saga)
    await ex.mark_failed({"error": "crash"})
    assert ex.status is SagaStatus.FAILED
    await ex.resume()
    assert ex.status is SagaStatus.RUNNING
    with pytest.raises(SagaStateError):
        await ex.resume()
    with pytest.raises(SagaStateError, match="awaits no reply"):
        await ex.on_timeout(NOW)
    with pytest.raises(SagaStateError, match="awaits no reply"):
        await ex.replay(NOW)


def test_awaited_request_json_round_trip() -> None:
    awaited = AwaitedRequest(uuid.uuid4(), "k", (1, 0, 2), "compensate", "t", {"a": [1]}, 2, NOW, 3)
    assert AwaitedRequest.from_json(orjson.loads(orjson.dumps(awaited.to_json()))) == awaited
    assert isinstance(Transition(SagaStatus.FAILED).outbox, tuple)
    assert OutboxMessage("t", None, b"").headers == {}


def test_definition_must_be_committed_and_named() -> None:
    with pytest.raises(SagaStateError, match="named and committed"):
        start(Saga("open"))
