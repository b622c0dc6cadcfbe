"""Recovery workers racing on real PostgreSQL: every stalled execution is resumed exactly once.

Each worker has its own `SqlAlchemySagaStorage` (its own connections, as separate processes would) and
its own `SagaManager` with a distinct owner; they share one database schema created for this module and
dropped afterwards. Nothing is mocked: claims are PostgreSQL's ``FOR UPDATE SKIP LOCKED`` and leases the
database clock.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import update

from broker import InMemoryBrokerPool
from saga.context import SagaContext
from saga.definitions import Saga
from saga.execution import SagaExecution
from saga.manager import SagaManager
from saga.recovery import RecoveryReport, SagaRecoveryWorker
from storage import SagaStatus
from storage.migrate import upgrade_async
from storage.sql import SqlAlchemySagaStorage

pytestmark = [pytest.mark.postgres]

WORKERS = 8
ROWS = 1000


async def _admin(database_url: str, sql: str) -> None:
    import asyncpg  # type: ignore[import-untyped]
    from sqlalchemy.engine import make_url

    dsn = make_url(database_url).set(drivername="postgresql").render_as_string(hide_password=False)
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@pytest.fixture
async def schema(database_url: str) -> AsyncIterator[str]:
    """A schema of our own with the saga tables, dropped afterwards."""
    name = f"saga_recovery_{uuid.uuid4().hex[:10]}"
    await _admin(database_url, f"CREATE SCHEMA {name}")
    try:
        await upgrade_async(database_url, schema=name)
        yield name
    finally:
        await _admin(database_url, f"DROP SCHEMA {name} CASCADE")


class Fleet:
    """Several recovery processes in one test: a storage, a manager and a worker each."""

    def __init__(
        self,
        database_url: str,
        schema: str,
        saga: Saga,
        count: int,
        *,
        manager_lease: float = 30.0,
        **worker: Any,
    ) -> None:
        self.storages = [
            SqlAlchemySagaStorage(database_url, schema=schema, auto_migrate=False, pool_size=4)
            for _ in range(count)
        ]
        self.managers = [
            SagaManager(
                s,
                InMemoryBrokerPool(),
                consume_replies=False,
                relay_outbox=False,
                owner=f"worker-{i}",
                lease_seconds=manager_lease,
            )
            for i, s in enumerate(self.storages)
        ]
        for m in self.managers:
            m.register(saga)
        self.workers = [SagaRecoveryWorker(m, **worker) for m in self.managers]

    async def __aenter__(self) -> Fleet:
        for m in self.managers:
            await m.setup()
        return self

    async def __aexit__(self, *exc: object) -> None:
        for m in self.managers:
            await m.destroy()


async def store_stalled(storage: SqlAlchemySagaStorage, saga: Saga, n: int, *, age: float) -> list[uuid.UUID]:
    """Insert ``n`` RUNNING executions as crashed processes left them, last touched ``age`` seconds ago."""
    now = datetime.now(UTC)
    executions = [SagaExecution.start(saga, {"n": i}, reply_topic="r", now=now) for i in range(n)]
    await asyncio.gather(*(storage.create(e.to_record()) for e in executions))  # pool_size at a time
    ids = [e.id for e in executions]
    table = storage.tables.executions
    async with storage.engine.begin() as conn:
        await conn.execute(update(table).values(updated_at=now - timedelta(seconds=age)))
    return ids


async def test_eight_workers_resume_a_thousand_stale_executions_exactly_once(
    database_url: str, schema: str, capsys: pytest.CaptureFixture[str]
) -> None:
    resumed: Counter[int] = Counter()

    async def resume(context: SagaContext) -> None:
        resumed[context["n"]] += 1
        await asyncio.sleep(0)  # let the other workers interleave

    saga = Saga("bulk").local_step(resume).commit()
    fleet = Fleet(database_url, schema, saga, WORKERS, batch_size=50, concurrency=10, stale_after_seconds=60)
    async with fleet:
        await store_stalled(fleet.storages[0], saga, ROWS, age=3600)

        async def drain(worker: SagaRecoveryWorker) -> list[RecoveryReport]:
            reports = []
            while True:
                report = await worker.run_once()
                reports.append(report)
                if report.claimed == 0:
                    return reports

        started = time.perf_counter()
        all_reports = await asyncio.gather(*(drain(w) for w in fleet.workers))
        elapsed = time.perf_counter() - started
        counts = await fleet.storages[0].count_by_status()

    assert len(resumed) == ROWS
    assert set(resumed.values()) == {1}
    assert counts == {SagaStatus.FINISHED: ROWS}
    per_worker = [sum(len(r.recovered) for r in reports) for reports in all_reports]
    assert sum(per_worker) == ROWS
    assert all(w.stats.failed == 0 and w.stats.busy == 0 for w in fleet.workers)
    with capsys.disabled():
        print(
            f"\n{WORKERS} recovery workers, {ROWS} stale executions: {elapsed:.2f} s, "
            f"{ROWS / elapsed:.0f} rows/s; per worker {per_worker}"
        )


async def test_a_step_slower_than_staleness_and_lease_is_not_taken_twice(
    database_url: str, schema: str
) -> None:
    runs = Counter[str]()
    inside = asyncio.Event()

    async def slow(context: SagaContext) -> None:
        runs["slow"] += 1
        inside.set()
        await asyncio.sleep(3.0)

    saga = Saga("slow").local_step(slow).commit()
    # Lease 1 s (renewed every 1/3 s by the manager's heartbeat), stale after 1 s, step 3 s.
    fleet = Fleet(database_url, schema, saga, 2, stale_after_seconds=1, lease_seconds=1.0, manager_lease=1.0)
    async with fleet:
        [saga_id] = await store_stalled(fleet.storages[0], saga, 1, age=10)
        first, second = fleet.workers
        first_pass = asyncio.create_task(first.run_once())
        await asyncio.wait_for(inside.wait(), 5)
        rival_reports = []
        while not first_pass.done():
            rival_reports.append(await second.run_once())
            await asyncio.sleep(0.2)
        report = await first_pass
        after = await second.run_once()
        record = await fleet.storages[1].load(saga_id)

    assert report.recovered == [saga_id]
    assert len(rival_reports) >= 5  # the rival kept trying while the step ran
    assert all(r.claimed == 0 for r in rival_reports)
    assert after.claimed == 0
    assert runs["slow"] == 1
    assert record.status is SagaStatus.FINISHED
