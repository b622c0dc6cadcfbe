"""`SagaParticipant` over `KafkaBrokerPool` on the real broker: commands in, replies and dead letters out."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from broker import BrokerMessage, KafkaBrokerPool
from saga import CommandContext, SagaBusinessError, SagaParticipant, SagaResponse, SagaResponseStatus
from saga.messages import H_KIND, SagaCommand, SagaControl
from saga.participant import H_DEAD_LETTER_REASON
from storage import MemorySagaStorage

pytestmark = pytest.mark.kafka


@pytest.fixture
async def pool(kafka_bootstrap: str) -> AsyncIterator[KafkaBrokerPool]:
    async with KafkaBrokerPool(
        bootstrap_servers=kafka_bootstrap, topic_partitions=2, connect_timeout=20.0
    ) as pool:
        yield pool


async def collect(
    pool: KafkaBrokerPool, topic: str, count: int, *, within: float = 30.0
) -> list[BrokerMessage]:
    """Read ``count`` records of ``topic`` with a fresh group (from the earliest offset)."""
    records: list[BrokerMessage] = []
    async with pool.subscriber([topic], group_id=f"reader-{uuid.uuid4().hex}") as reader:
        async with asyncio.timeout(within):
            while len(records) < count:
                records.extend(await reader.getmany(timeout=0.5))
    return records


async def test_participant_round_trips_commands_over_kafka(pool: KafkaBrokerPool) -> None:
    suffix = uuid.uuid4().hex[:12]
    service, command_topic, reply_topic = f"inventory{suffix}", f"ReserveStock{suffix}", f"orderReply{suffix}"
    participant = SagaParticipant(service, pool, storage=MemorySagaStorage())
    handled: list[str] = []
    committed: list[uuid.UUID] = []

    @participant.command(command_topic)
    async def reserve(request: CommandContext) -> dict[str, Any]:
        handled.append(request.idempotency_key)
        if request.content["quantity"] > 10:
            raise SagaBusinessError("not enough stock")
        return {"reserved": request.content["quantity"]}

    participant.on_commit(lambda control: committed.append(control.execution_id))

    def command(quantity: int, key: str | None = None) -> SagaCommand:
        return SagaCommand(
            target=command_topic,
            content={"sku": "A", "quantity": quantity},
            execution_id=uuid.uuid4(),
            request_id=uuid.uuid4(),
            reply_topic=reply_topic,
            idempotency_key=key or uuid.uuid4().hex,
            user="alice",
        )

    good, refused = command(2), command(11)
    duplicate = command(2, key=good.idempotency_key)
    await pool.ensure_topics([reply_topic])
    async with participant:
        publisher = pool.publisher()
        await publisher.send_batch(
            [
                good.to_message(),
                refused.to_message(),
                BrokerMessage(command_topic, b"x", b"{broken", {H_KIND: "command"}),
                duplicate.to_message(),
                SagaControl("commit", good.execution_id, service).to_message(),
                SagaControl("commit", good.execution_id, service).to_message(),
            ]
        )
        replies = [SagaResponse.from_message(m) for m in await collect(pool, reply_topic, 3)]
        letters = await collect(pool, participant.dead_letter_topic, 1)
        async with asyncio.timeout(30):
            while participant.stats.commits + participant.stats.duplicate_decisions < 2:  # noqa: ASYNC110
                await asyncio.sleep(0.05)

    by_request = {r.request_id: r for r in replies}
    assert by_request[good.request_id].status is SagaResponseStatus.SUCCESS
    assert by_request[good.request_id].content == {"reserved": 2}
    assert by_request[good.request_id].service_name == service
    assert by_request[good.request_id].execution_id == good.execution_id
    assert by_request[duplicate.request_id].content == {"reserved": 2}
    assert by_request[refused.request_id].status is SagaResponseStatus.ERROR
    assert by_request[refused.request_id].content == {"error": "not enough stock"}
    assert sorted(handled) == sorted([good.idempotency_key, refused.idempotency_key])
    assert letters[0].value == b"{broken"
    assert letters[0].headers[H_DEAD_LETTER_REASON].startswith("malformed message:")
    assert committed == [good.execution_id]
    assert participant.stats.duplicates == 1


@pytest.mark.postgres
async def test_two_instances_over_kafka_and_postgres_run_a_command_once(
    pool: KafkaBrokerPool, database_url: str
) -> None:
    """The second instance gets the command while the first runs it (a rebalance's redelivery): it waits
    for the first one's claim and answers from its outcome; the effect row is written once."""
    from sqlalchemy import text

    from storage.participant import SqlParticipantStore

    suffix = uuid.uuid4().hex[:12]
    service, command_topic, reply_topic = f"inventory{suffix}", f"Reserve{suffix}", f"orderReply{suffix}"
    table = f"effects_{suffix}"
    gate, started = asyncio.Event(), asyncio.Event()

    def instance(name: str) -> SagaParticipant:
        store = SqlParticipantStore(database_url, pool_size=4)
        participant = SagaParticipant(service, pool, store=store, instance_id=name, lease_seconds=5)

        @participant.command(command_topic)
        async def reserve(request: CommandContext) -> dict[str, Any]:
            await request.connection.execute(
                text(f"INSERT INTO {table} (key, instance) VALUES (:key, :instance)"),
                {"key": request.idempotency_key, "instance": name},
            )
            started.set()
            await gate.wait()
            return {"reserved": 1, "by": name}

        return participant

    a, b = instance("a"), instance("b")
    command = SagaCommand(
        target=command_topic,
        content={"quantity": 1},
        execution_id=uuid.uuid4(),
        request_id=uuid.uuid4(),
        reply_topic=reply_topic,
        idempotency_key=uuid.uuid4().hex,
    )
    await pool.ensure_topics([reply_topic])
    async with a, b:
        async with a.store.engine.begin() as conn:  # type: ignore[union-attr]
            await conn.execute(text(f"CREATE TABLE {table} (key text, instance text)"))
        try:
            first = asyncio.create_task(a.handle(command.to_message()))
            await started.wait()
            second = asyncio.create_task(b.handle(command.to_message()))
            async with asyncio.timeout(10):
                while b.stats.waited == 0:  # noqa: ASYNC110 (polling a counter)
                    await asyncio.sleep(0.01)
            assert not second.done()
            gate.set()
            await asyncio.gather(first, second)
            replies = [SagaResponse.from_message(m) for m in await collect(pool, reply_topic, 2)]
            async with a.store.engine.connect() as conn:  # type: ignore[union-attr]
                rows = (await conn.execute(text(f"SELECT instance FROM {table}"))).scalars().all()
        finally:
            async with a.store.engine.begin() as conn:  # type: ignore[union-attr]
                await conn.execute(text(f"DROP TABLE {table}"))
    assert rows == ["a"]
    assert [r.content for r in replies] == [{"reserved": 1, "by": "a"}] * 2
    assert b.stats.duplicates == 1 and b.stats.handled == 0


def _start_process(config: str, suffix: str, output: Any) -> Any:
    import os
    import subprocess
    import sys
    from pathlib import Path

    return subprocess.Popen(
        [sys.executable, "-m", "saga.cli", "participant", "--config", config],
        cwd=Path(__file__).resolve().parents[2],
        stdin=subprocess.DEVNULL,
        stdout=output,
        stderr=output,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "PARTICIPANT_SUFFIX": suffix},
    )


@pytest.mark.postgres
async def test_kafka_saga_participant_serves_then_drains_on_sigterm(
    pool: KafkaBrokerPool, database_url: str, tmp_path: Any
) -> None:
    """``kafka-saga participant`` in its own process: a command in, its reply out, SIGTERM, exit 0."""
    import signal

    from sqlalchemy import select
    from sqlalchemy.ext.asyncio import create_async_engine

    from tests.e2e.participants.apps import Topics, effects, metadata
    from tests.e2e.participants.fleet import write_config

    suffix = uuid.uuid4().hex[:8]
    names = Topics(suffix)
    engine = create_async_engine(database_url)
    async with engine.begin() as conn:
        await conn.run_sync(metadata.create_all)
    config = write_config(tmp_path, "inventory", suffix, pool.settings.bootstrap_servers, database_url)
    log = (tmp_path / "participant.log").open("wb")
    process = _start_process(str(config), suffix, log)
    try:
        async with asyncio.timeout(60):
            while b"ready" not in (tmp_path / "participant.log").read_bytes():
                assert process.poll() is None, (tmp_path / "participant.log").read_text()
                await asyncio.sleep(0.1)
        command = SagaCommand(
            target=names.reserve,
            content={"order": 7},
            execution_id=uuid.uuid4(),
            request_id=uuid.uuid4(),
            reply_topic=names.reply,
            idempotency_key=uuid.uuid4().hex,
            step="reserve",
        )
        await pool.ensure_topics([names.reply])
        await pool.publisher().send(command.to_message())
        [reply] = [SagaResponse.from_message(m) for m in await collect(pool, names.reply, 1, within=60)]
        assert reply.status is SagaResponseStatus.SUCCESS
        assert reply.content == {"reservation": "res-7"}
        process.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(process.wait, 30) == 0
        assert b"stopped cleanly" in (tmp_path / "participant.log").read_bytes()
        async with engine.connect() as conn:
            rows = (
                await conn.execute(
                    select(effects.c.order_no).where(effects.c.execution_id == str(command.execution_id))
                )
            ).all()
        assert [r[0] for r in rows] == [7]
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
        log.close()
        await engine.dispose()
