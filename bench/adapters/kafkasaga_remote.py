"""kafka-saga, remote steps: a saga of three remote steps over real Kafka and PostgreSQL.

The orchestrator is a `SagaManager` on `SqlAlchemySagaStorage` and `KafkaBrokerPool` (reply consumer and
outbox relay on, as deployed); the participant is a `SagaParticipant` in the same process with its own
pool, answering each command at once. ``run(..., pause_on_disk=False)`` keeps ``inflight`` sagas going.

Latency of a remote step: from the step starting (``on_step_started`` hook) to the next step starting,
or, for the last step, to ``run()`` returning with the saga finished: the command's durable save, the
round trip through Kafka and the participant, and the reply's durable save.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
import uuid
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import _proto

from broker import KafkaBrokerPool
from storage import SagaStatus, SqlAlchemySagaStorage

try:
    from saga import Saga, SagaManager, SagaParticipant, SagaRequest
except ImportError:
    from saga import SagaParticipant, SagaRequest
    from saga.definitions import Saga
    from saga.manager import SagaManager
from saga.hooks import SagaEvent, SagaHooks


def definition(cmd_topic: str, steps: int) -> Saga:
    saga = Saga("remote_order")
    for k in range(1, steps + 1):

        def request(ctx: Any, k: int = k) -> SagaRequest:
            return SagaRequest(cmd_topic, {"order_id": ctx["order_id"], "step": k})

        def success(ctx: Any, response: Any, k: int = k) -> Any:
            ctx[f"s{k}"] = response.content["ok"]
            return ctx

        saga.remote_step(request, name=f"step{k}").on_success(success)
    return saga.commit()


async def main() -> None:
    cfg = _proto.config()
    inflight, n, runs, steps = int(cfg["inflight"]), int(cfg["n"]), int(cfg.get("runs", 3)), int(cfg["steps"])
    tag = uuid.uuid4().hex[:8]
    service = f"bench{tag}"
    cmd_topic = f"bench{tag}Cmd"
    starts: dict[uuid.UUID, float] = {}
    latencies: list[float] = []

    def started(event: SagaEvent) -> None:
        now = time.perf_counter()
        prev = starts.get(event.execution_id)
        if prev is not None:
            latencies.append(now - prev)
        starts[event.execution_id] = now

    url = cfg["dsn"].replace("postgresql://", "postgresql+asyncpg://")
    storage = SqlAlchemySagaStorage(url, pool_size=min(max(10, inflight), 20))
    pool = KafkaBrokerPool(bootstrap_servers=cfg["kafka"])
    manager = SagaManager(
        storage, broker_pool=pool, service_name=service, hooks=SagaHooks(on_step_started=started)
    )
    participant_pool = KafkaBrokerPool(bootstrap_servers=cfg["kafka"])
    participant = SagaParticipant(f"{service}Participant", participant_pool)

    @participant.command(cmd_topic)
    def handle(request: Any) -> dict[str, Any]:
        return {"ok": request.content["step"]}

    saga = definition(cmd_topic, steps)
    await manager.setup()
    await pool.ensure_topics([cmd_topic])
    manager.register(saga)
    await participant.start()

    async def one(i: int) -> None:
        execution = await manager.run(saga, {"order_id": i})
        end = time.perf_counter()
        latencies.append(end - starts.pop(execution.id))
        if execution.status != SagaStatus.FINISHED:
            raise AssertionError(f"saga {i} ended {execution.status}")

    try:
        await _proto.drive_async(min(inflight, 50), min(inflight, 50), one)  # warm-up (groups joined)
        _proto.freeze_heap()
        for r in range(runs):
            latencies.clear()
            _proto.emit({"event": "ready", "run": r})
            await _proto.await_go()
            wall, cpu = await _proto.drive_async(n, inflight, one)
            us = [x * 1e6 for x in latencies]
            _proto.emit(
                {
                    "event": "done",
                    "run": r,
                    "result": {
                        "sagas": n,
                        "inflight": inflight,
                        "steps": len(us),
                        "wall_s": round(wall, 4),
                        "steps_per_s": round(len(us) / wall, 1),
                        "sagas_per_s": round(n / wall, 1),
                        "step_p50_us": round(_proto.percentile(us, 50)),
                        "step_p99_us": round(_proto.percentile(us, 99)),
                        "step_mean_us": round(sum(us) / len(us)),
                        "client_cpu_us_per_step": round(cpu / len(us) * 1e6, 1),
                    },
                }
            )
    finally:
        await participant.stop()
        await participant_pool.stop()
        await manager.destroy()
    _proto.emit({"event": "end"})


asyncio.run(main())
