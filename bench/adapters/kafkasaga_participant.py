"""kafka-saga participant throughput: the transactional store against the dedup store, on PostgreSQL.

Each command's handler writes one effect row. ``variant``:

* ``dedup``: the participant as it runs without a participant store: the handler writes its effect in a
  transaction of its own (the application's engine), and the reply is remembered in the dedup store
  (`SqlAlchemySagaStorage`: ``get_command_reply`` then ``put_command_reply``). A crash between the effect
  and the stored reply runs the effect again on redelivery.
* ``transactional``: `SqlParticipantStore`: the command is claimed under a lease, the handler writes its
  effect through ``request.connection`` and the reply is committed with it (dedup record and outbox row);
  the outbox row is deleted in batches after the publish.

Commands are handed to ``participant.handle`` directly and replies go to the in-process broker, so the
figures are the participant's own cost (store and handler), without Kafka's round trips, which are the
same for both. ``inflight`` commands are handled at once (distinct executions, so none wait on another).
"""

from __future__ import annotations

import asyncio
import os
import sys
import uuid
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import _proto
from sqlalchemy import Column, Integer, MetaData, String, Table, insert
from sqlalchemy.ext.asyncio import create_async_engine

from broker import InMemoryBrokerPool
from saga import CommandContext, SagaParticipant
from saga.messages import SagaCommand
from storage import SqlAlchemySagaStorage
from storage.participant import SqlParticipantStore

metadata = MetaData()
effects = Table(
    "bench_effects",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("execution_id", String(64), nullable=False),
    Column("quantity", Integer, nullable=False),
)


def commands(n: int, topic: str) -> list[Any]:
    out = []
    for _ in range(n):
        request_id = uuid.uuid4()
        command = SagaCommand(
            target=topic,
            content={"quantity": 1},
            execution_id=uuid.uuid4(),
            request_id=request_id,
            reply_topic="benchReply",
            idempotency_key=str(request_id),
            saga="order",
            step="reserve",
        )
        out.append(command.to_message())
    return out


async def main() -> None:
    cfg = _proto.config()
    variant, inflight, n, runs = cfg["variant"], int(cfg["inflight"]), int(cfg["n"]), int(cfg.get("runs", 3))
    url = cfg["dsn"].replace("postgresql://", "postgresql+asyncpg://")
    connections = min(max(inflight, 2), 50)
    topic = "ReserveStock"
    pool = InMemoryBrokerPool(partitions=4)
    app_engine = create_async_engine(url, pool_size=connections, max_overflow=0)
    async with app_engine.begin() as conn:
        await conn.run_sync(metadata.create_all)
    if variant == "dedup":
        storage = SqlAlchemySagaStorage(url, pool_size=connections)
        participant = SagaParticipant("inventory", pool, storage=storage, concurrency=inflight)

        @participant.command(topic)
        async def reserve_dedup(request: CommandContext) -> dict[str, Any]:
            async with app_engine.begin() as conn:
                await conn.execute(insert(effects).values(execution_id=str(request.execution_id), quantity=1))
            return {"reserved": 1}

    else:
        # As many connections in all as the dedup variant has (its dedup store's and its application's).
        store = SqlParticipantStore(url, pool_size=2 * connections)
        participant = SagaParticipant("inventory", pool, store=store, concurrency=inflight)

        @participant.command(topic)
        async def reserve_tx(request: CommandContext) -> dict[str, Any]:
            await request.connection.execute(
                insert(effects).values(execution_id=str(request.execution_id), quantity=1)
            )
            return {"reserved": 1}

    await participant.start()
    try:
        warm = commands(min(n, 200), topic)
        await _proto.drive_async(len(warm), min(inflight, 50), lambda i: participant.handle(warm[i]))
        _proto.freeze_heap()
        for r in range(runs):
            batch = commands(n, topic)
            _proto.emit({"event": "ready", "run": r})
            await _proto.await_go()
            wall, cpu = await _proto.drive_async(n, inflight, lambda i, b=batch: participant.handle(b[i]))
            await asyncio.sleep(0.5)  # the batched outbox deletes of this run land inside its counters
            _proto.emit(
                {
                    "event": "done",
                    "run": r,
                    "result": {
                        "sagas": n,
                        "commands": n,
                        "inflight": inflight,
                        "variant": variant,
                        "wall_s": round(wall, 4),
                        "commands_per_s": round(n / wall, 1),
                        "client_cpu_us_per_command": round(cpu / n * 1e6, 1),
                    },
                }
            )
    finally:
        await participant.stop()
        await pool.stop()
        if variant == "dedup":
            await storage.stop()
        await app_engine.dispose()
    _proto.emit({"event": "end"})


asyncio.run(main())
