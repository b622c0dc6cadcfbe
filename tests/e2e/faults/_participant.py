"""The participant of the fault tests: a plain Kafka consumer that counts every command it receives.

No dedup and no tombstones (unlike `saga.SagaParticipant`): every delivery of a command or a decision is a
row of ``fault_commands``, so a command published twice, or after its compensation, shows. It replies 200,
or 500 for the first ``fail_first[step]`` commands of an execution on that step's topic, after
``reply_delay[step]`` seconds if set. Run as the ``participant`` role of `tests.e2e.faults._orchestration`.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Mapping
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from broker import BrokerMessage, KafkaBrokerPool
from saga.messages import SagaCommand, SagaResponse, SagaResponseStatus, control_topic
from tests.e2e.faults._orchestration import say, service, stop_event, topics

__all__ = ["participant"]


async def participant(config: Mapping[str, Any]) -> None:
    engine = create_async_engine(config["database_url"], pool_size=5)
    pool = KafkaBrokerPool(bootstrap_servers=config["bootstrap"], client_id="fault-participant")
    await pool.start()
    command_topics = list(topics(config["suffix"]).values())
    control = control_topic(service(config["suffix"]))
    await pool.ensure_topics([*command_topics, control])
    fail_first: dict[str, int] = config.get("fail_first", {})
    delays: dict[str, float] = config.get("reply_delay", {})
    seen: dict[tuple[str, uuid.UUID], int] = {}
    subscriber = pool.subscriber([*command_topics, control], group_id=f"fault-{config['suffix']}")
    publisher = pool.publisher()
    await subscriber.start()
    stop = stop_event()
    say("READY")
    while not stop.is_set():
        messages = await subscriber.getmany(timeout=0.2)
        for message in messages:
            await _serve(engine, publisher, message, fail_first, seen, config["suffix"], delays)
        if messages:
            await subscriber.commit(messages)
    await subscriber.stop()
    await pool.stop()
    await engine.dispose()


async def _serve(
    engine: AsyncEngine,
    publisher: Any,
    message: BrokerMessage,
    fail_first: Mapping[str, int],
    seen: dict[tuple[str, uuid.UUID], int],
    suffix: str,
    delays: Mapping[str, float],
) -> None:
    kind = message.headers.get("saga-kind", "?")
    if kind != "command":
        await _record(
            engine, message.topic, kind, message.headers.get("saga-execution-id"), None, None, None, None
        )
        return
    command = SagaCommand.from_message(message)
    step = command.target.removeprefix("fault_").removesuffix(f"_{suffix}")
    count = seen[command.target, command.execution_id] = (
        seen.get((command.target, command.execution_id), 0) + 1
    )
    status = 500 if count <= fail_first.get(step, 0) else 200
    await _record(
        engine,
        command.target,
        kind,
        str(command.execution_id),
        command.request_id,
        command.idempotency_key,
        step,
        status,
    )
    if delays.get(step):
        asyncio.get_running_loop().call_later(delays[step], _send_later, publisher, command, status, suffix)
        return
    await publisher.send(_reply(command, status, suffix).to_message(command.reply_topic))


def _send_later(publisher: Any, command: SagaCommand, status: int, suffix: str) -> None:
    task = asyncio.get_running_loop().create_task(
        publisher.send(_reply(command, status, suffix).to_message(command.reply_topic))
    )
    _LATER.add(task)
    task.add_done_callback(_LATER.discard)


_LATER: set[asyncio.Task[None]] = set()


def _reply(command: SagaCommand, status: int, suffix: str) -> SagaResponse:
    return SagaResponse(
        content={"ok": status == 200},
        status=SagaResponseStatus(status),
        execution_id=command.execution_id,
        request_id=command.request_id,
        service_name=service(suffix),
    )


async def _record(
    engine: AsyncEngine,
    topic: str,
    kind: str,
    execution_id: str | None,
    request_id: uuid.UUID | None,
    key: str | None,
    step: str | None,
    replied: int | None,
) -> None:
    async with engine.begin() as conn:
        await conn.execute(
            text(
                "INSERT INTO fault_commands"
                " (topic, kind, execution_id, request_id, idempotency_key, step, replied, pid)"
                " VALUES (:t, :k, :e, :r, :i, :s, :st, :p)"
            ),
            {
                "t": topic,
                "k": kind,
                "e": execution_id,
                "r": request_id,
                "i": key,
                "s": step,
                "st": replied,
                "p": os.getpid(),
            },
        )
