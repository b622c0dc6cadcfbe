"""Every kind of message the code produces validates against docs/asyncapi.yaml; decoding follows the
protocol's version and phase rules.

A saga manager and a participant run on the in-memory broker through successes, refusals, crashes and
compensations, so commands (forward and compensation), replies of each status and both decisions are the
ones the code really publishes; then the reply consumer and the participant are fed records of every kind
they dead-letter. Each record's headers and value are checked against its message's schemas, every header
it carries must be declared there, and every dead-letter code the document lists must have been produced.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest

from broker import BrokerMessage, InMemoryBrokerPool
from saga import (
    CommandContext,
    Saga,
    SagaBusinessError,
    SagaContext,
    SagaManager,
    SagaParticipant,
    SagaRequest,
    SagaResponse,
    SagaStatus,
)
from saga.consumer import ReplyConsumer
from saga.errors import MalformedMessageError, UnknownSagaDefinitionError, UnsupportedProtocolError
from saga.messages import (
    H_DEAD_LETTER_CODE,
    H_EXECUTION_ID,
    H_IDEMPOTENCY_KEY,
    H_KIND,
    H_PHASE,
    H_PROTOCOL_VERSION,
    H_REPLY_TOPIC,
    H_REQUEST_ID,
    H_SERVICE,
    H_STATUS,
    SagaCommand,
    SagaControl,
    SagaResponseStatus,
    protocol_version,
)
from saga.participant.dedup import LruReplyStore
from storage import ExecutionNotFoundError, MemorySagaStorage, StorageError
from tests.contract import wire

SERVICE = "shop"
PARTICIPANT = "inventory"


def reserve(context: SagaContext) -> SagaRequest:
    return SagaRequest("Reserve", {"item": context.item, "qty": context.qty})


def release(context: SagaContext) -> SagaRequest:
    return SagaRequest("Release", {"item": context.item, "qty": context.qty})


def confirm(context: SagaContext) -> SagaContext:
    if context.get("fail"):
        raise RuntimeError("confirmation failed")
    return context


SHOP = (
    Saga("shop")
    .remote_step(reserve, name="reserve")
    .on_success(lambda context, response: context)
    .on_error(lambda context, response: (_ for _ in ()).throw(RuntimeError("refused")))
    .on_failure(release)
    .local_step(confirm, name="confirm")
    .commit()
)
NOBODY = Saga("nobody").remote_step(lambda context: SagaRequest("Nobody", {}), name="wait").commit()


@dataclass
class World:
    pool: InMemoryBrokerPool
    manager: SagaManager
    participant: SagaParticipant
    letters: list[BrokerMessage] = field(default_factory=list)


@pytest.fixture
async def world() -> AsyncIterator[World]:
    pool = InMemoryBrokerPool(partitions=2)
    manager = SagaManager(MemorySagaStorage(), pool, service_name=SERVICE, relay_interval=0.05)
    participant = SagaParticipant(PARTICIPANT, pool)

    @participant.command("Reserve")
    def reserve_stock(request: CommandContext) -> Any:
        if request.content["qty"] > 5:
            raise SagaBusinessError("not enough stock")
        if request.content["item"] == "crash":
            raise RuntimeError("disk full")
        return {"reserved": request.content["qty"]}

    @participant.command("Release")
    def release_stock(request: CommandContext) -> Any:
        return None

    participant.on_commit(lambda control: None)
    participant.on_reject(lambda control: None)
    async with pool, manager, participant:
        yield World(pool, manager, participant)


async def _sagas(world: World) -> None:
    manager = world.manager
    ok = await manager.run(SHOP, SagaContext(item="book", qty=1))
    refused = await manager.run(SHOP, SagaContext(item="book", qty=9), raise_on_error=False)
    undone = await manager.run(SHOP, SagaContext(item="book", qty=1, fail=True), raise_on_error=False)
    crashed = await manager.run(SHOP, SagaContext(item="crash", qty=1), raise_on_error=False)
    assert ok.status is SagaStatus.FINISHED
    assert {refused.status, undone.status, crashed.status} == {SagaStatus.ERRORED}
    for _ in range(200):  # decisions are published by the relay after the run returned
        if len(world.pool.topic_messages(f"{PARTICIPANT}SagaControl")) >= 4:
            break
        await asyncio.sleep(0.01)


def _reply(**headers: str) -> BrokerMessage:
    base = {
        H_KIND: "reply",
        H_EXECUTION_ID: str(uuid.uuid4()),
        H_REQUEST_ID: str(uuid.uuid4()),
        H_STATUS: "200",
    }
    return BrokerMessage(topic=f"{SERVICE}Reply", key=None, value=b"{}", headers={**base, **headers})


def _command(topic: str = "Reserve", **headers: str) -> BrokerMessage:
    request = str(uuid.uuid4())
    base = {
        H_KIND: "command",
        H_EXECUTION_ID: str(uuid.uuid4()),
        H_REQUEST_ID: request,
        H_REPLY_TOPIC: f"{SERVICE}Reply",
        H_IDEMPOTENCY_KEY: request,
    }
    value = b'{"item": "book", "qty": 1}'
    return BrokerMessage(topic=topic, key=None, value=value, headers={**base, **headers})


class _Handler:
    """A reply handler failing the way the manager does for executions and definitions it lacks."""

    def __init__(self, exc: Exception) -> None:
        self.exc = exc

    async def handle_reply(self, response: SagaResponse, *, message: BrokerMessage | None = None) -> Any:
        raise self.exc


class _BrokenStore:
    async def get_command_reply(self, idempotency_key: str) -> bytes | None:
        raise StorageError("disk gone")

    async def put_command_reply(self, idempotency_key: str, reply: bytes) -> None:
        raise StorageError("disk gone")


async def _orchestrator_dead_letters(world: World) -> None:
    """Records of every kind the reply side dead-letters."""
    pool = world.pool
    letters = f"{SERVICE}DeadLetter"
    for exc, message in (
        (RuntimeError("unused"), _reply(**{H_KIND: ""})),
        (RuntimeError("unused"), _reply(**{H_PROTOCOL_VERSION: "2"})),
        (ExecutionNotFoundError(uuid.uuid4()), _reply()),
        (UnknownSagaDefinitionError("elsewhere", 1), _reply()),
        (KeyError("bug"), _reply()),
    ):
        consumer = ReplyConsumer(
            _Handler(exc), pool, topic=f"{SERVICE}Reply", group_id="g", dead_letter_topic=letters
        )
        await consumer.handle(message)
    # An unknown status to the request an execution awaits goes through the real manager.
    waiting = await world.manager.run(NOBODY, SagaContext(), pause_on_disk=True)
    assert waiting.awaiting is not None
    stray = _reply(
        **{
            H_EXECUTION_ID: str(waiting.id),
            H_REQUEST_ID: str(waiting.awaiting.request_id),
            H_STATUS: "299",
            H_SERVICE: PARTICIPANT,
        }
    )
    await world.manager.handle_reply(SagaResponse.from_message(stray), message=stray)


async def _participant_dead_letters(world: World) -> None:
    """Records of every kind the participant dead-letters."""
    participant = world.participant
    await participant.handle(_command(**{H_KIND: "reply"}))
    await participant.handle(_command(**{H_PROTOCOL_VERSION: "2"}))
    await participant.handle(_command("Unknown"))
    failing = SagaParticipant("failing", world.pool)
    failing.command("Reserve")(lambda request: {})

    @failing.on_commit
    def boom(control: SagaControl) -> None:
        raise RuntimeError("ledger closed")

    await failing.handle(SagaControl("commit", uuid.uuid4(), "failing").to_message())
    garbled = _command()
    store = LruReplyStore(10)
    await store.put_command_reply(garbled.headers[H_IDEMPOTENCY_KEY], b'"not a reply"')
    stored = SagaParticipant(PARTICIPANT, world.pool, storage=store)  # type: ignore[arg-type]
    stored.command("Reserve")(lambda request: {})
    await stored.handle(garbled)
    broken = SagaParticipant(PARTICIPANT, world.pool, storage=_BrokenStore())  # type: ignore[arg-type]
    broken.command("Reserve")(lambda request: {})
    await broken.handle(_command())


def _check(kind: str, message: BrokerMessage, *, json_value: bool = True) -> None:
    where = f"{kind} on {message.topic}: {dict(message.headers)}"
    assert not wire.problems(wire.header_validator(kind), dict(message.headers)), (
        wire.problems(wire.header_validator(kind), dict(message.headers)),
        where,
    )
    undeclared = set(message.headers) - wire.declared_headers(kind)
    assert not undeclared, f"{where}: headers not in docs/asyncapi.yaml: {sorted(undeclared)}"
    if json_value:
        assert message.headers[H_PROTOCOL_VERSION] == "1", where
        value = orjson.loads(message.value)
        assert not wire.problems(wire.payload_validator(kind), value), where
        assert message.key == message.headers[H_EXECUTION_ID].encode(), where


async def test_every_produced_message_validates_against_the_asyncapi_document(world: World) -> None:
    await _sagas(world)
    await _orchestrator_dead_letters(world)
    await _participant_dead_letters(world)
    pool = world.pool

    commands = pool.topic_messages("Reserve") + pool.topic_messages("Release")
    phases = {m.headers.get("saga-phase") for m in commands}
    assert phases == {"forward", "compensation"}
    for message in commands:
        _check("command", message)
        assert message.headers["traceparent"]
    replies = pool.topic_messages(f"{SERVICE}Reply")
    assert {m.headers[H_STATUS] for m in replies} >= {"200", "400", "500"}
    assert {int(s) for s in (m.headers[H_STATUS] for m in replies)} >= set(map(int, SagaResponseStatus))
    for message in replies:
        _check("reply", message)
    decisions = pool.topic_messages(f"{PARTICIPANT}SagaControl")
    assert {m.headers[H_KIND] for m in decisions} == {"commit", "reject"}
    for message in decisions:
        _check(message.headers[H_KIND], message)

    letters = pool.topic_messages(f"{SERVICE}DeadLetter") + pool.topic_messages(f"{PARTICIPANT}DeadLetter")
    letters += pool.topic_messages("failingDeadLetter")
    for message in letters:
        _check("deadLetter", message, json_value=False)
    codes = [m.headers[H_DEAD_LETTER_CODE] for m in letters]
    assert set(codes) == wire.dead_letter_codes(), sorted(codes)
    orchestrator = [m.headers[H_DEAD_LETTER_CODE] for m in pool.topic_messages(f"{SERVICE}DeadLetter")]
    assert sorted(orchestrator) == sorted(
        [
            "malformed",
            "unsupported_protocol",
            "unknown_execution",
            "unknown_definition",
            "error",
            "unknown_status",
        ]
    )
    participant = [
        m.headers[H_DEAD_LETTER_CODE]
        for m in pool.topic_messages(f"{PARTICIPANT}DeadLetter") + pool.topic_messages("failingDeadLetter")
    ]
    assert sorted(participant) == sorted(
        [
            "malformed",
            "unsupported_protocol",
            "no_handler",
            "bad_stored_reply",
            "infrastructure",
            "decision_failed",
        ]
    )
    for letter in letters:
        assert letter.headers["saga-dead-letter-topic"] in {
            f"{SERVICE}Reply",
            "Reserve",
            "Unknown",
            "failingSagaControl",
        }


@pytest.mark.parametrize(
    ("value", "version"),
    [(None, 1), ("", 1), ("1", 1)],
)
def test_a_message_without_a_version_is_version_1(value: str | None, version: int) -> None:
    headers = {} if value is None else {H_PROTOCOL_VERSION: value}
    assert protocol_version(BrokerMessage(topic="t", key=None, value=b"{}", headers=headers)) == version


@pytest.mark.parametrize("value", ["0", "-1", "1.0", "one", " 1", "\u0661"])
def test_a_version_that_is_not_a_positive_integer_is_malformed(value: str) -> None:
    message = BrokerMessage(topic="t", key=None, value=b"{}", headers={H_PROTOCOL_VERSION: value})
    with pytest.raises(
        MalformedMessageError, match="saga-protocol-version: not a positive integer"
    ) as caught:
        protocol_version(message)
    assert not isinstance(caught.value, UnsupportedProtocolError)


@pytest.mark.parametrize(
    "decode", [SagaCommand.from_message, SagaResponse.from_message, SagaControl.from_message]
)
def test_every_decoder_refuses_a_newer_version_before_anything_else(decode: Any) -> None:
    # Nothing else in the record is valid: the version decides first.
    message = BrokerMessage(topic="t", key=None, value=b"", headers={H_PROTOCOL_VERSION: "2"})
    with pytest.raises(UnsupportedProtocolError) as caught:
        decode(message)
    assert (caught.value.field, caught.value.version, caught.value.supported) == (H_PROTOCOL_VERSION, 2, 1)


def test_a_command_phase_other_than_forward_or_compensation_is_malformed() -> None:
    with pytest.raises(MalformedMessageError, match="saga-phase: expected 'forward' or 'compensation'"):
        SagaCommand.from_message(_command(**{H_PHASE: "undo"}))
    assert SagaCommand.from_message(_command()).phase is None  # missing: a forward command
    assert SagaCommand.from_message(_command(**{H_PHASE: "compensation"})).phase == "compensation"


async def test_a_decision_of_a_newer_version_is_dead_lettered_by_the_participant(world: World) -> None:
    decision = SagaControl("commit", uuid.uuid4(), PARTICIPANT).to_message()
    newer = BrokerMessage(
        topic=decision.topic,
        key=decision.key,
        value=decision.value,
        headers={**decision.headers, H_PROTOCOL_VERSION: "7"},
    )
    await world.participant.handle(newer)
    (letter,) = world.pool.topic_messages(f"{PARTICIPANT}DeadLetter")
    assert letter.headers[H_DEAD_LETTER_CODE] == "unsupported_protocol"
    assert letter.headers["saga-dead-letter-reason"].startswith("unsupported_protocol: version 7")
    assert world.participant.stats.commits == 0


def test_the_conformance_package_exports_are_pinned_and_sorted() -> None:
    import saga.conformance

    assert saga.conformance.__all__ == [
        "CaseResult",
        "ConformanceFailure",
        "ConformanceReport",
        "ParticipantKit",
    ]
