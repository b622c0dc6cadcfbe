"""`SagaParticipant` over the in-memory broker and storage."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import orjson
import pytest

from broker import BrokerClientPool, BrokerConnectionError, BrokerMessage, InMemoryBrokerPool
from saga import SagaBusinessError, SagaResponse, SagaResponseStatus, SagaStateError
from saga.messages import (
    H_EXECUTION_ID,
    H_IDEMPOTENCY_KEY,
    H_KIND,
    H_REPLY_TOPIC,
    H_REQUEST_ID,
    H_SERVICE,
    H_STATUS,
    H_TRACEPARENT,
    SagaCommand,
    SagaControl,
    control_topic,
)
from saga.participant import H_DEAD_LETTER_REASON, H_DEAD_LETTER_TOPIC, CommandContext, SagaParticipant
from saga.participant.dedup import KeyLock, KeyLocked
from storage import MemorySagaStorage, StorageError, StorageUnavailableError

REPLY = "orderReply"


def command(
    target: str = "ReserveStock",
    content: Any = None,
    *,
    key: str | None = None,
    execution_id: uuid.UUID | None = None,
    request_id: uuid.UUID | None = None,
    user: str | None = "alice",
    traceparent: str | None = None,
) -> SagaCommand:
    return SagaCommand(
        target=target,
        content={"sku": "A", "quantity": 1} if content is None else content,
        execution_id=execution_id or uuid.uuid4(),
        request_id=request_id or uuid.uuid4(),
        reply_topic=REPLY,
        idempotency_key=key or str(uuid.uuid4()),
        user=user,
        saga="order",
        step="reserve",
        traceparent=traceparent,
    )


async def wait_for(predicate: Callable[[], bool], within: float = 3.0) -> None:
    async with asyncio.timeout(within):
        while not predicate():  # noqa: ASYNC110 (polling state, not an event)
            await asyncio.sleep(0.005)


def replies(pool: InMemoryBrokerPool) -> list[SagaResponse]:
    return [SagaResponse.from_message(m) for m in pool.topic_messages(REPLY)]


@pytest.fixture
async def pool() -> AsyncIterator[InMemoryBrokerPool]:
    async with InMemoryBrokerPool(partitions=2) as pool:
        yield pool


@pytest.fixture
async def storage() -> AsyncIterator[MemorySagaStorage]:
    async with MemorySagaStorage() as storage:
        yield storage


def inventory(pool: BrokerClientPool, storage: MemorySagaStorage | None = None, **kw: Any) -> SagaParticipant:
    """A participant whose handlers cover success, business error, system error and a sync handler."""
    participant = SagaParticipant("inventory", pool, storage=storage, **kw)
    participant.calls = []  # type: ignore[attr-defined]

    @participant.command("ReserveStock")
    async def reserve(request: CommandContext) -> dict[str, Any]:
        participant.calls.append(request)  # type: ignore[attr-defined]
        if request.content["quantity"] > 10:
            raise SagaBusinessError("not enough stock")
        if request.content.get("crash"):
            raise RuntimeError("disk on fire")
        return {"reserved": request.content["quantity"], "user": request.user}

    @participant.command("ReleaseStock")
    def release(request: CommandContext) -> str:
        participant.calls.append(request)  # type: ignore[attr-defined]
        return "released"

    return participant


async def test_success_reply_carries_status_correlation_and_service(
    pool: InMemoryBrokerPool, storage: MemorySagaStorage
) -> None:
    participant = inventory(pool, storage)
    cmd = command(traceparent="00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
    async with participant:
        await pool.publisher().send(cmd.to_message())
        await wait_for(lambda: len(pool.topic_messages(REPLY)) == 1)
    [message] = pool.topic_messages(REPLY)
    assert message.key == str(cmd.execution_id).encode()
    assert message.headers[H_KIND] == "reply"
    assert message.headers[H_STATUS] == "200"
    assert message.headers[H_SERVICE] == "inventory"
    assert message.headers[H_EXECUTION_ID] == str(cmd.execution_id)
    assert message.headers[H_REQUEST_ID] == str(cmd.request_id)
    assert message.headers[H_TRACEPARENT] == cmd.traceparent
    reply = SagaResponse.from_message(message)
    assert reply.status is SagaResponseStatus.SUCCESS
    assert reply.content == {"reserved": 1, "user": "alice"}
    [request] = participant.calls  # type: ignore[attr-defined]
    assert request == CommandContext(
        content=cmd.content,
        user="alice",
        idempotency_key=cmd.idempotency_key,
        execution_id=cmd.execution_id,
        request_id=cmd.request_id,
        topic="ReserveStock",
        saga="order",
        step="reserve",
        traceparent=cmd.traceparent,
    )
    assert participant.stats.handled == participant.stats.succeeded == 1


async def test_business_error_replies_400_and_other_errors_500(
    pool: InMemoryBrokerPool, storage: MemorySagaStorage, caplog: pytest.LogCaptureFixture
) -> None:
    participant = inventory(pool, storage)
    refused = command(content={"sku": "A", "quantity": 11})
    crashed = command(content={"sku": "A", "quantity": 1, "crash": True})
    released = command("ReleaseStock", content={"sku": "A"})
    async with participant:
        await pool.publisher().send_batch([m.to_message() for m in (refused, crashed, released)])
        await wait_for(lambda: len(pool.topic_messages(REPLY)) == 3)
    by_request = {r.request_id: r for r in replies(pool)}
    assert by_request[refused.request_id].status is SagaResponseStatus.ERROR
    assert by_request[refused.request_id].content == {"error": "not enough stock"}
    assert by_request[crashed.request_id].status is SagaResponseStatus.SYSTEM_ERROR
    assert by_request[crashed.request_id].content == {"error": "RuntimeError: disk on fire"}
    assert by_request[released.request_id].status is SagaResponseStatus.SUCCESS
    assert by_request[released.request_id].content == "released"
    assert all(r.service_name == "inventory" for r in by_request.values())
    stats = participant.stats
    assert (stats.handled, stats.succeeded, stats.business_errors, stats.system_errors) == (3, 1, 1, 1)
    assert "Traceback" in caplog.text and "disk on fire" in caplog.text


async def test_result_that_is_not_json_replies_500(pool: InMemoryBrokerPool) -> None:
    participant = SagaParticipant("svc", pool)

    @participant.command("Do")
    async def do(request: CommandContext) -> object:
        return object()

    cmd = command("Do")
    await participant.handle(await _published(pool, cmd.to_message()))
    [reply] = replies(pool)
    assert reply.status is SagaResponseStatus.SYSTEM_ERROR
    assert reply.content["error"].startswith("TypeError")


async def _published(pool: InMemoryBrokerPool, message: BrokerMessage) -> BrokerMessage:
    """``message`` as a consumer would read it (with partition and offset)."""
    await pool.publisher().send(message)
    return [
        m
        for m in pool.topic_messages(message.topic)
        if (m.value, m.headers) == (message.value, message.headers)
    ][-1]


async def test_redelivered_command_runs_once_and_gets_the_same_reply(
    pool: InMemoryBrokerPool, storage: MemorySagaStorage
) -> None:
    participant = inventory(pool, storage)
    first = command(content={"sku": "A", "quantity": 11})  # a 400 is remembered like a 200
    replay = command(
        content=first.content, key=first.idempotency_key, execution_id=first.execution_id
    )  # same key, new request id (a replay after a timeout)
    async with participant:
        await pool.publisher().send(first.to_message())
        await wait_for(lambda: len(pool.topic_messages(REPLY)) == 1)
        await pool.publisher().send_batch([first.to_message(), replay.to_message()])
        await wait_for(lambda: len(pool.topic_messages(REPLY)) == 3)
    assert len(participant.calls) == 1  # type: ignore[attr-defined]
    got = replies(pool)
    assert {(r.status, orjson.dumps(r.content)) for r in got} == {
        (SagaResponseStatus.ERROR, b'{"error":"not enough stock"}')
    }
    assert [r.request_id for r in got] == [first.request_id, first.request_id, replay.request_id]
    assert participant.stats.duplicates == 2
    assert await storage.get_command_reply(first.idempotency_key) is not None


async def test_the_stored_reply_is_the_encoded_outcome_and_a_duplicate_gets_the_same_bytes(
    pool: InMemoryBrokerPool, storage: MemorySagaStorage
) -> None:
    participant = SagaParticipant("svc", pool, storage=storage)
    result = {1: "non-string key", "nested": [1.5, None, {"x": True}], "text": "\u00e9\n"}

    @participant.command("Do")
    def do(request: CommandContext) -> Any:
        return result

    cmd = command("Do")
    async with participant:
        await pool.publisher().send_batch([cmd.to_message(), cmd.to_message()])
        await wait_for(lambda: len(pool.topic_messages(REPLY)) == 2)
    stored = await storage.get_command_reply(cmd.idempotency_key)
    assert stored == orjson.dumps({"status": 200, "content": result}, option=orjson.OPT_NON_STR_KEYS)
    first, duplicate = pool.topic_messages(REPLY)
    assert first.value == duplicate.value == orjson.dumps(result, option=orjson.OPT_NON_STR_KEYS)
    assert first.headers == duplicate.headers and participant.stats.duplicates == 1


async def test_a_key_lock_is_dropped_when_its_last_user_leaves_even_a_cancelled_one() -> None:
    locks: dict[str, KeyLock] = {}
    entered: list[str] = []

    async def use(name: str) -> None:
        async with KeyLocked(locks, "k"):
            entered.append(name)

    async with KeyLocked(locks, "k"):
        waiting = asyncio.create_task(use("cancelled"))
        queued = asyncio.create_task(use("next"))
        await asyncio.sleep(0)
        assert locks["k"].users == 3
        waiting.cancel()
        await asyncio.sleep(0)
        assert locks["k"].users == 2
    await queued
    assert entered == ["next"] and locks == {}


async def test_dedup_survives_a_restart_through_storage(
    pool: InMemoryBrokerPool, storage: MemorySagaStorage
) -> None:
    cmd = command()
    first = inventory(pool, storage)
    async with first:
        await pool.publisher().send(cmd.to_message())
        await wait_for(lambda: len(pool.topic_messages(REPLY)) == 1)
    second = inventory(pool, storage)
    async with second:
        await pool.publisher().send(cmd.to_message())
        await wait_for(lambda: len(pool.topic_messages(REPLY)) == 2)
    assert len(first.calls) == 1 and second.calls == []  # type: ignore[attr-defined]
    assert second.stats.duplicates == 1


async def test_concurrent_duplicates_in_one_process_run_the_handler_once(
    pool: InMemoryBrokerPool, storage: MemorySagaStorage
) -> None:
    participant = SagaParticipant("svc", pool, storage=storage)
    runs = 0

    @participant.command("Slow")
    async def slow(request: CommandContext) -> int:
        nonlocal runs
        runs += 1
        await asyncio.sleep(0.05)
        return runs

    message = await _published(pool, command("Slow").to_message())
    await asyncio.gather(*(participant.handle(message) for _ in range(5)))
    assert runs == 1
    assert [r.content for r in replies(pool)] == [1] * 5
    assert participant._locks == {}  # per-key locks are dropped once unused


async def test_without_storage_an_lru_bounds_the_dedup_memory(pool: InMemoryBrokerPool) -> None:
    participant = inventory(pool, dedup_cache_size=2)
    a, b, c = command(), command(), command()
    for cmd in (a, b, c, c, a):
        await participant.handle(await _published(pool, cmd.to_message()))
    # c was a duplicate; a had been evicted by c, so it ran again.
    assert [r.idempotency_key for r in participant.calls] == [  # type: ignore[attr-defined]
        a.idempotency_key,
        b.idempotency_key,
        c.idempotency_key,
        a.idempotency_key,
    ]
    assert participant.stats.duplicates == 1


async def test_commit_and_reject_handlers_run_once_per_decision(
    pool: InMemoryBrokerPool, storage: MemorySagaStorage
) -> None:
    participant = inventory(pool, storage)
    committed: list[uuid.UUID] = []
    rejected: list[uuid.UUID] = []

    @participant.on_commit
    async def on_commit(control: SagaControl) -> None:
        committed.append(control.execution_id)

    @participant.on_reject
    def on_reject(control: SagaControl) -> None:
        rejected.append(control.execution_id)

    ok, failed = uuid.uuid4(), uuid.uuid4()
    decisions = [
        SagaControl("commit", ok, "inventory"),
        SagaControl("reject", failed, "inventory"),
    ]
    async with participant:
        await pool.publisher().send_batch([d.to_message() for d in decisions * 3])
        await wait_for(lambda: participant.stats.duplicate_decisions == 4)
    assert committed == [ok] and rejected == [failed]
    assert (participant.stats.commits, participant.stats.rejects) == (1, 1)
    # Another service sharing the store gets its own decisions.
    payment = SagaParticipant("payment", pool, storage=storage)
    seen: list[uuid.UUID] = []
    payment.command("Charge")(lambda request: None)
    payment.on_commit(lambda control: seen.append(control.execution_id))
    await payment.handle(await _published(pool, SagaControl("commit", ok, "payment").to_message()))
    assert seen == [ok]


async def test_failing_decision_handler_is_dead_lettered_and_not_marked_done(
    pool: InMemoryBrokerPool,
) -> None:
    participant = inventory(pool)
    attempts = 0

    @participant.on_commit
    def boom(control: SagaControl) -> None:
        nonlocal attempts
        attempts += 1
        raise ValueError("nope")

    message = await _published(pool, SagaControl("commit", uuid.uuid4(), "inventory").to_message())
    await participant.handle(message)
    await participant.handle(message)
    assert attempts == 2
    letters = pool.topic_messages("inventoryDeadLetter")
    assert [m.headers[H_DEAD_LETTER_REASON] for m in letters] == [
        "commit handler raised ValueError: nope"
    ] * 2
    assert participant.stats.dead_letter_reasons == {"decision_failed": 2}
    assert participant.stats.commits == 0


def _raw(topic: str, value: bytes, headers: dict[str, str], key: bytes | None = b"k") -> BrokerMessage:
    return BrokerMessage(topic=topic, key=key, value=value, headers=headers)


async def test_malformed_input_is_dead_lettered_while_good_commands_keep_flowing(
    pool: InMemoryBrokerPool, storage: MemorySagaStorage
) -> None:
    participant = inventory(pool, storage)
    good = command()
    headers = dict(good.to_message().headers)
    without_reply_topic = {k: v for k, v in headers.items() if k != H_REPLY_TOPIC}
    bad = [
        _raw("ReserveStock", b"{not json", headers),
        _raw("ReserveStock", b"{}", without_reply_topic),
        _raw("ReserveStock", b"{}", {**headers, H_KIND: "reply"}),
        _raw("ReserveStock", b"{}", {**headers, H_REQUEST_ID: "not-a-uuid"}),
        _raw(control_topic("inventory"), b"{}", {H_KIND: "commit", H_EXECUTION_ID: str(uuid.uuid4())}),
        _raw(
            control_topic("inventory"),
            b"{}",
            {H_KIND: "commit", H_EXECUTION_ID: str(uuid.uuid4()), H_SERVICE: "payment"},
        ),
        BrokerMessage("ReserveStock", b"k", b"{}", dict(headers), invalid_headers=("saga-user",)),
    ]
    async with participant:
        await pool.publisher().send_batch([*bad, good.to_message()])
        await wait_for(lambda: participant.stats.dead_lettered == len(bad) and len(replies(pool)) == 1)
        assert participant.running

        # Every record gets committed (in the background): a new member of the group gets nothing again.
        def committed(topic: str) -> int:
            return sum(pool.committed("inventory-participant", topic, p) or 0 for p in range(2))

        topics = ("ReserveStock", control_topic("inventory"))
        await wait_for(lambda: all(committed(t) == len(pool.topic_messages(t)) for t in topics))
    letters = pool.topic_messages("inventoryDeadLetter")
    # orjson's own wording of the JSON error varies between releases: keep only our part of it.
    reasons = sorted(m.headers[H_DEAD_LETTER_REASON].partition(" (")[0] for m in letters)
    assert reasons == sorted(
        [
            "malformed message: value: invalid JSON",
            f"malformed message: {H_REPLY_TOPIC}: header missing",
            "malformed message: saga-kind: expected 'command', got 'reply'",
            "malformed message: saga-request-id: not a UUID: 'not-a-uuid'",
            f"malformed message: {H_SERVICE}: header missing",
            "malformed message: saga-service: names 'payment', not 'inventory'",
            "malformed message: saga-user: header value is not valid UTF-8",
        ]
    ), reasons
    json_letter = next(m for m in letters if m.value == b"{not json")
    assert json_letter.key == b"k"
    assert json_letter.headers[H_DEAD_LETTER_TOPIC] == "ReserveStock"
    assert json_letter.headers[H_IDEMPOTENCY_KEY] == good.idempotency_key  # original headers kept
    assert participant.stats.dead_letter_reasons == {"malformed": len(bad)}
    assert len(participant.calls) == 1  # type: ignore[attr-defined]


async def test_command_on_a_topic_without_handler_is_dead_lettered(pool: InMemoryBrokerPool) -> None:
    participant = inventory(pool)
    await participant.handle(await _published(pool, command("Unknown").to_message()))
    [letter] = pool.topic_messages("inventoryDeadLetter")
    assert letter.headers[H_DEAD_LETTER_REASON] == "no handler for command topic 'Unknown'"
    assert participant.stats.dead_letter_reasons == {"no_handler": 1}


class FlakyPool:
    """Wraps a pool; the publisher's first ``failures`` sends raise a retriable error."""

    def __init__(self, inner: InMemoryBrokerPool, failures: int) -> None:
        self.inner = inner
        self.failures = failures

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def publisher(self) -> FlakyPool:
        return self

    async def send(self, message: BrokerMessage) -> None:
        if self.failures > 0:
            self.failures -= 1
            raise BrokerConnectionError("leader moving")
        await self.inner.publisher().send(message)

    async def send_batch(self, messages: Sequence[BrokerMessage]) -> None:
        for message in messages:
            await self.send(message)


class FlakyStorage(MemorySagaStorage):
    def __init__(self, failures: int) -> None:
        super().__init__()
        self.failures = failures

    async def get_command_reply(self, idempotency_key: str) -> bytes | None:
        if self.failures > 0:
            self.failures -= 1
            raise StorageUnavailableError("connection lost")
        return await super().get_command_reply(idempotency_key)


async def test_retriable_failures_back_off_and_retry_the_record(pool: InMemoryBrokerPool) -> None:
    flaky_pool = FlakyPool(pool, failures=2)
    flaky_storage = FlakyStorage(failures=2)
    participant = inventory(flaky_pool, flaky_storage, retry_backoff=0.001)
    cmd = command()
    async with participant:
        await pool.publisher().send(cmd.to_message())
        await wait_for(lambda: len(pool.topic_messages(REPLY)) == 1)
    assert participant.stats.retries == 4
    assert len(participant.calls) == 1  # type: ignore[attr-defined]
    # The reply was stored before the failed publishes.
    assert await flaky_storage.get_command_reply(cmd.idempotency_key) is not None


async def test_record_left_uncommitted_when_stopping_during_retries(pool: InMemoryBrokerPool) -> None:
    storage = MemorySagaStorage()
    flaky_pool = FlakyPool(pool, failures=10**6)
    participant = inventory(flaky_pool, storage, retry_backoff=0.01)
    cmd = command()
    await participant.start()
    await pool.publisher().send(cmd.to_message())
    await wait_for(lambda: participant.stats.retries > 0)
    await participant.stop()
    assert all(pool.committed("inventory-participant", "ReserveStock", p) is None for p in range(2))
    # The next instance gets the record again and answers it from the stored reply.
    again = inventory(pool, storage)
    async with again:
        await wait_for(lambda: len(pool.topic_messages(REPLY)) == 1)
    assert again.calls == [] and again.stats.duplicates == 1  # type: ignore[attr-defined]


async def test_registration_rules(pool: InMemoryBrokerPool) -> None:
    participant = SagaParticipant("svc", pool)
    assert participant.group_id == "svc-participant"
    assert participant.dead_letter_topic == "svcDeadLetter"
    assert participant.control_topic == "svcSagaControl"
    with pytest.raises(SagaStateError, match="no command handlers"):
        await participant.start()
    participant.command("A")(lambda request: None)
    with pytest.raises(ValueError, match="already has a handler"):
        participant.command("A")(lambda request: None)
    assert participant.command_topics == ("A",)
    async with participant:
        with pytest.raises(SagaStateError):
            participant.command("B")(lambda request: None)
        with pytest.raises(SagaStateError):
            participant.on_commit(lambda control: None)
    other = SagaParticipant("svc", pool, group_id="g", dead_letter_topic="dlq")
    assert (other.group_id, other.dead_letter_topic) == ("g", "dlq")


async def test_run_returns_once_stopped(pool: InMemoryBrokerPool) -> None:
    participant = inventory(pool)
    runner = asyncio.create_task(participant.run())
    await wait_for(lambda: participant.running)
    await pool.publisher().send(command().to_message())
    await wait_for(lambda: len(pool.topic_messages(REPLY)) == 1)
    await participant.stop()
    await asyncio.wait_for(runner, 2)
    assert not participant.running


async def test_instances_of_one_service_share_the_commands(
    pool: InMemoryBrokerPool, storage: MemorySagaStorage
) -> None:
    first, second = inventory(pool, storage), inventory(pool, storage)
    commands = [command() for _ in range(40)]
    async with first, second:
        await pool.publisher().send_batch([c.to_message() for c in commands])
        await wait_for(lambda: len(pool.topic_messages(REPLY)) == 40)
    assert first.calls and second.calls  # type: ignore[attr-defined]
    handled = [r.idempotency_key for r in (*first.calls, *second.calls)]  # type: ignore[attr-defined]
    assert sorted(handled) == sorted(c.idempotency_key for c in commands)


class BrokenStorage(MemorySagaStorage):
    """Refuses one key for good (a non-retriable error, like a key too long for its column)."""

    async def put_command_reply(self, idempotency_key: str, reply: bytes) -> None:
        if idempotency_key == "poison":
            raise StorageError("value too long for type character varying(255)")
        await super().put_command_reply(idempotency_key, reply)


async def test_non_retriable_storage_error_dead_letters_the_record_and_keeps_going(
    pool: InMemoryBrokerPool,
) -> None:
    participant = inventory(pool, BrokenStorage())
    poison, good = command(key="poison"), command()
    async with participant:
        await pool.publisher().send_batch([poison.to_message(), good.to_message()])
        await wait_for(lambda: participant.stats.dead_lettered == 1 and len(replies(pool)) == 1)
        assert participant.running
    [letter] = pool.topic_messages("inventoryDeadLetter")
    assert letter.headers[H_IDEMPOTENCY_KEY] == "poison"
    assert letter.headers[H_DEAD_LETTER_REASON] == (
        "StorageError: value too long for type character varying(255)"
    )
    assert participant.stats.dead_letter_reasons == {"infrastructure": 1}
    assert [r.request_id for r in replies(pool)] == [good.request_id]
