"""Deploying v2 while v1 executions are in flight strands none of them.

Six v1 sagas pause on their reserve command; then only a v2 orchestrator (``kafka-saga worker``, another
OS process) runs and reads their replies, and its recovery worker sees their 3 s reply timeouts pass. The
replies must be kept (not dead-lettered), no recovery attempt counted, the worker must warn at start-up
and ``kafka-saga stats`` show the six; once a process registering v1 runs, every saga finishes with the
reply it got, each reservation made once.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from broker import KafkaBrokerPool
from saga import SagaManager
from storage import SagaStatus, SqlAlchemySagaStorage
from tests.e2e import db
from tests.e2e.conftest import Apps
from tests.e2e.faults import _stock
from tests.e2e.workload import Names

pytestmark = [pytest.mark.kafka, pytest.mark.postgres, pytest.mark.e2e]

SAGAS = 6


@dataclass
class Run:
    names: Names
    url: str
    bootstrap: str
    storage: SqlAlchemySagaStorage
    engine: AsyncEngine
    apps: Apps
    tmp: Path

    def args(self) -> list[str]:
        return ["--bootstrap", self.bootstrap, "--database-url", self.url, "--suffix", self.names.suffix]

    def config(self, name: str, *sagas: str) -> Path:
        return _stock.write_config(
            self.tmp / f"{name}.yml",
            names=self.names,
            bootstrap=self.bootstrap,
            database_url=self.url,
            sagas=[f"tests.e2e.faults._stock:{saga}" for saga in sagas],
        )


@pytest.fixture
async def run(kafka_bootstrap: str, e2e_database: str, apps: Apps, tmp_path: Path) -> AsyncIterator[Run]:
    storage = SqlAlchemySagaStorage(e2e_database, auto_migrate=True)
    await storage.start()
    engine = create_async_engine(e2e_database)
    await db.create_tables(engine)
    run = Run(Names(uuid.uuid4().hex[:10]), e2e_database, kafka_bootstrap, storage, engine, apps, tmp_path)
    try:
        inventory = apps.start("inventory", "inventory", *run.args())
        await apps.wait_ready(inventory)
        yield run
    finally:
        apps.stop_all()
        await storage.stop()
        await engine.dispose()


async def start_v1_sagas(run: Run) -> list[uuid.UUID]:
    """Start the v1 sagas from this process (no reply consumer, no recovery): they pause on disk."""
    v1 = _stock.stock_saga(run.names, 1, timeout=3.0)
    pool = KafkaBrokerPool(bootstrap_servers=run.bootstrap, topic_partitions=4)
    storage = SqlAlchemySagaStorage(run.url, auto_migrate=False)
    manager = SagaManager(storage, pool, service_name=run.names.orchestrator, consume_replies=False)
    manager.register(v1)
    await manager.setup()
    try:
        ids = [
            (await manager.run(v1, {"order": n}, pause_on_disk=True, idempotency_key=f"v1-{n}")).id
            for n in range(SAGAS)
        ]

        async def reserved() -> bool:
            return sum((await _stock.effect_counts(run.engine)).values()) >= SAGAS

        await _stock.eventually(reserved, within=60, what="the reservations", report=run.apps.report)
    finally:
        await manager.destroy()
    return ids


async def test_replies_of_v1_executions_wait_for_a_v1_process(run: Run) -> None:
    ids = await start_v1_sagas(run)
    v2_only = run.config("v2", "V2")
    both = run.config("v1v2", "V1", "V2")

    # Only v2 is deployed: its worker reads the v1 replies and its recovery sees the timeouts pass.
    worker_v2 = _stock.start_worker(run.apps, "worker-v2", v2_only, run.names)
    await _stock.wait_worker_ready(run.apps, worker_v2)

    async def settled() -> bool:
        records = [await run.storage.load(i) for i in ids]
        return all(b'"parked"' in r.state or r.status is not SagaStatus.PAUSED for r in records)

    await _stock.eventually(settled, within=60, what="the v1 replies reaching the v2 worker")
    await asyncio.sleep(5)  # past every 3 s reply timeout: the v2 worker's recovery passes run meanwhile
    records = [await run.storage.load(i) for i in ids]
    assert [r.status for r in records] == [SagaStatus.PAUSED] * SAGAS, run.apps.report()
    assert [r.recovery_attempts for r in records] == [0] * SAGAS
    assert f"{SAGAS} unfinished execution(s) of saga 'stock{run.names.suffix}' v1" in (
        worker_v2.stderr_path.read_text()
    ), run.apps.report()

    stats = _stock.run_cli(run.names, "stats", "--config", str(v2_only), "--json")
    assert stats.returncode == 0, stats.stderr
    assert json.loads(stats.stdout)["unregistered"] == [
        {"saga": f"stock{run.names.suffix}", "version": 1, "count": SAGAS}
    ]
    run.apps.stop(worker_v2)

    # v1 is deployed again (beside v2): the kept replies are applied, nothing runs twice.
    worker_both = _stock.start_worker(run.apps, "worker-v1v2", both, run.names)
    await _stock.wait_worker_ready(run.apps, worker_both)

    async def finished() -> bool:
        return [(await run.storage.load(i)).status for i in ids] == [SagaStatus.FINISHED] * SAGAS

    await _stock.eventually(finished, within=60, what="every v1 saga finishing", report=run.apps.report)
    for execution_id in ids:
        record = await run.storage.load(execution_id)
        assert record.definition_version == 1 and b'"confirmed_by":1' in record.state
        replies = await run.storage.list_replies(execution_id)
        assert [r.outcome for r in replies].count("applied") == 1
    effects = await _stock.effect_counts(run.engine)
    assert effects == {(i, "reserve"): 1 for i in ids}, effects

    async def committed() -> bool:
        return len(await _stock.decision_counts(run.engine)) == SAGAS

    await _stock.eventually(committed, within=30, what="the commit decisions")
    assert await _stock.decision_counts(run.engine) == {(i, "commit"): 1 for i in ids}
    stats = _stock.run_cli(run.names, "stats", "--config", str(both), "--json")
    assert json.loads(stats.stdout)["unregistered"] == []
    print(
        f"\nDEFINITION VERSIONS: {SAGAS} v1 sagas, replies kept by the v2-only worker "
        f"(0 dead-lettered, 0 attempts counted), {SAGAS} finished once v1 was back, "
        f"{sum(effects.values())} reservations (one per saga)"
    )
