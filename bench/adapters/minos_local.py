"""Minos 0.7 (``minos-microservice-saga``): the 'order' saga of three local steps, Minos's own DSL.

Minos's `SagaManager` runs all local steps of an execution in memory and stores the execution once
when it stops (paused, or failed), then deletes it when it finished: nothing is stored per step, so it
does not follow the per-step durability rule the others follow; its figures are for reference. Its only
saga storage in 0.7 is LMDB (``minos-database-lmdb``; there is no PostgreSQL saga repository), so
"lmdb" (a file in a temporary directory, LMDB's default synchronous commits) stands in for durable
storage, and "memory" is a dict repository written for this benchmark.

Local steps need no broker, so the manager gets a stand-in pool whose ``acquire()`` yields nothing, and
runs with ``autocommit=False``: Minos's commit is a two-phase reserve/commit round trip through the broker
to every service the saga touched (itself included), which needs a live broker and a responder and is
not part of a local saga.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import tempfile
from pathlib import Path
from typing import Any
from uuid import UUID

from minos.saga import Saga, SagaContext, SagaExecution, SagaManager, SagaStatus
from minos.saga.executions import SagaExecutionRepository

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import _proto

FAIL = False


def step1(ctx: SagaContext) -> SagaContext:
    ctx["s1"] = ctx["order_id"]
    return ctx


def step2(ctx: SagaContext) -> SagaContext:
    ctx["s2"] = ctx["order_id"]
    return ctx


def step3(ctx: SagaContext) -> SagaContext:
    if FAIL:
        raise _proto.StepFailed("step 3")
    ctx["s3"] = ctx["order_id"]
    return ctx


def undo1(ctx: SagaContext) -> SagaContext:
    del ctx["s1"]
    return ctx


def undo2(ctx: SagaContext) -> SagaContext:
    del ctx["s2"]
    return ctx


def undo3(ctx: SagaContext) -> SagaContext:
    return ctx


ORDER = (
    Saga()
    .local_step(step1)
    .on_failure(undo1)
    .local_step(step2)
    .on_failure(undo2)
    .local_step(step3)
    .on_failure(undo3)
    .commit()
)


class MemoryRepository(SagaExecutionRepository):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._rows: dict[UUID, SagaExecution] = {}

    async def _store(self, execution: SagaExecution) -> None:
        self._rows[execution.uuid] = execution

    async def _load(self, uuid: UUID) -> SagaExecution:
        return self._rows[uuid]

    async def _delete(self, uuid: UUID) -> None:
        self._rows.pop(uuid, None)


class MemoryLockPool:
    """In-process locks for Minos's transaction repository (it has no in-memory lock pool of its own)."""

    def __init__(self) -> None:
        self._locks: dict[Any, asyncio.Lock] = {}

    @contextlib.asynccontextmanager
    async def acquire(self, key: Any, *args: Any, **kwargs: Any) -> Any:
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            yield lock


class NoBrokerPool:
    @contextlib.asynccontextmanager
    async def acquire(self, *args: Any, **kwargs: Any) -> Any:
        yield None


async def main() -> None:
    global FAIL
    cfg = _proto.config()
    FAIL = cfg["scenario"] == "fail"
    # Minos resolves the service name from an injected Config: give it the smallest one.
    from minos.common import Config, DependencyInjector

    tmp = tempfile.mkdtemp(prefix="bench-minos-")
    Path(tmp, "config.yml").write_text("version: 2\nname: order\n")  # noqa: ASYNC240 (setup)
    from minos.aggregate import InMemoryTransactionRepository
    from minos.networks import InMemoryBrokerPublisher

    # Each step runs inside a Minos TransactionEntry (a row in its transaction repository, kept in memory:
    # Minos 0.7 has no LMDB transaction repository) and the saga's commit publishes to the services it
    # touched (an in-memory publisher here).
    injector = DependencyInjector(
        Config(os.path.join(tmp, "config.yml")),
        [InMemoryTransactionRepository(lock_pool=MemoryLockPool()), InMemoryBrokerPublisher()],
    )
    await injector.wire_and_setup_injections()
    if cfg["storage"] == "lmdb":
        from minos.common import DatabaseClientPool
        from minos.common.database.clients.abc import DatabaseClientBuilder
        from minos.plugins.lmdb import LmdbDatabaseClient
        from minos.saga.executions import DatabaseSagaExecutionRepository

        builder = DatabaseClientBuilder(LmdbDatabaseClient).with_kwargs({"path": os.path.join(tmp, "lmdb")})
        repository: Any = DatabaseSagaExecutionRepository(database_pool=DatabaseClientPool(builder))
    else:
        repository = MemoryRepository()
    manager = SagaManager(storage=repository, broker_pool=NoBrokerPool())
    await manager.setup()
    want = SagaStatus.Errored if FAIL else SagaStatus.Finished

    async def one(i: int) -> None:
        execution = await manager.run(ORDER, SagaContext(order_id=i), raise_on_error=False, autocommit=False)
        if execution.status != want:
            raise AssertionError(f"saga {i} ended {execution.status}, expected {want}")

    try:
        await _proto.run_local_async(cfg, one)
    finally:
        await manager.destroy()
        await injector.unwire_and_destroy_injections()
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)


asyncio.run(main())
