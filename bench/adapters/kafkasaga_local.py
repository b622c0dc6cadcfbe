"""kafka-saga: the 'order' saga of three local steps, run by the embedded `SagaManager`.

``SagaManager(storage, broker_pool=InMemoryBrokerPool(), consume_replies=False, relay_outbox=False)``:
local steps need no transport. The manager inserts the execution, then saves it after every step
(PostgreSQL: one autocommit statement, durable before the next step starts).
"""

from __future__ import annotations

import asyncio
import os
import sys
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import _proto

from broker import InMemoryBrokerPool
from storage import MemorySagaStorage, SagaStatus

try:
    from saga import Saga, SagaManager
except ImportError:  # before saga/__init__ re-exports them
    from saga.definitions import Saga
    from saga.manager import SagaManager

FAIL = False


def step1(ctx: Any) -> Any:
    ctx["s1"] = ctx["order_id"]
    return ctx


def step2(ctx: Any) -> Any:
    ctx["s2"] = ctx["order_id"]
    return ctx


def step3(ctx: Any) -> Any:
    if FAIL:
        raise _proto.StepFailed("step 3")
    ctx["s3"] = ctx["order_id"]
    return ctx


def undo1(ctx: Any) -> Any:
    del ctx["s1"]
    return ctx


def undo2(ctx: Any) -> Any:
    del ctx["s2"]
    return ctx


def undo3(ctx: Any) -> Any:
    ctx.pop("s3", None)
    return ctx


def definition() -> Saga:
    return (
        Saga("order")
        .local_step(step1)
        .on_failure(undo1)
        .local_step(step2)
        .on_failure(undo2)
        .local_step(step3)
        .on_failure(undo3)
        .commit()
    )


def make_storage(cfg: dict[str, Any]) -> Any:
    if cfg["storage"] == "postgres":
        from storage import SqlAlchemySagaStorage

        conc = int(cfg.get("concurrency", 1))
        url = cfg["dsn"].replace("postgresql://", "postgresql+asyncpg://")
        return SqlAlchemySagaStorage(url, pool_size=max(10, min(conc, 50)))
    return MemorySagaStorage()


async def main() -> None:
    global FAIL
    cfg = _proto.config()
    FAIL = cfg["scenario"] == "fail"
    manager = SagaManager(
        make_storage(cfg), broker_pool=InMemoryBrokerPool(), consume_replies=False, relay_outbox=False
    )
    saga = definition()
    await manager.setup()
    manager.register(saga)
    want = SagaStatus.ERRORED if FAIL else SagaStatus.FINISHED

    async def one(i: int) -> None:
        execution = await manager.run(saga, {"order_id": i}, raise_on_error=False)
        if execution.status != want:
            raise AssertionError(f"saga {i} ended {execution.status}, expected {want}")

    try:
        await _proto.run_local_async(cfg, one)
    finally:
        await manager.destroy()


if __name__ == "__main__":
    asyncio.run(main())
