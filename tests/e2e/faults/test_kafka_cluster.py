"""Sagas over a real 3-broker Kafka cluster survive a broker crash and a broker outage.

The cluster (``scripts/services.sh start-cluster``) replicates every topic three times with
``min.insync.replicas=2``; the orchestrator is ``kafka-saga worker`` (its own OS process, topics created
with ``broker.kafka.topic_replication_factor: 3``, producers with ``acks=all``), the inventory participant
another one, and this process starts the sagas. One test SIGKILLs a broker mid-run and starts it again;
the other keeps a broker down for 60 s while sagas keep starting. Every saga must finish, and the
participant's table (no unique constraint) must hold exactly one reservation and one commit per saga:
0 lost, 0 doubled.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from broker import KafkaBrokerPool
from saga import Saga, SagaManager
from storage import SagaStatus, SqlAlchemySagaStorage
from tests.e2e import db
from tests.e2e.conftest import Apps
from tests.e2e.faults import _cluster, _stock
from tests.e2e.faults._cluster import kafka_cluster  # noqa: F401  (the session fixture)
from tests.e2e.workload import Names

pytestmark = [pytest.mark.kafka, pytest.mark.postgres, pytest.mark.e2e, pytest.mark.slow]

#: Seconds a broker stays down in the outage test.
OUTAGE = 60.0


@dataclass
class Cluster:
    names: Names
    bootstrap: str
    storage: SqlAlchemySagaStorage
    engine: AsyncEngine
    apps: Apps
    manager: SagaManager
    saga: Saga
    ids: list[uuid.UUID]

    async def start(self, count: int) -> None:
        """Start ``count`` sagas (they pause on disk; the worker process drives them)."""
        saga = self.saga
        for _ in range(count):
            n = len(self.ids)
            execution = await self.manager.run(
                saga, {"order": n}, pause_on_disk=True, idempotency_key=f"c-{n}"
            )
            self.ids.append(execution.id)

    async def check_all_finished_once(self) -> dict[str, int]:
        """Wait for every saga to finish, then count effects and decisions: one of each per saga."""

        async def finished() -> bool:
            records = [await self.storage.load(i) for i in self.ids]
            return all(r.status is SagaStatus.FINISHED for r in records)

        await _stock.eventually(finished, within=120, what="every saga finishing", report=self.apps.report)
        effects = await _stock.effect_counts(self.engine)

        async def committed() -> bool:
            return len(await _stock.decision_counts(self.engine)) >= len(self.ids)

        await _stock.eventually(committed, within=60, what="every commit decision", report=self.apps.report)
        decisions = await _stock.decision_counts(self.engine)
        assert effects == {(i, "reserve"): 1 for i in self.ids}, effects
        assert decisions == {(i, "commit"): 1 for i in self.ids}, decisions
        self.apps.check_alive()
        return {"sagas": len(self.ids), "reservations": sum(effects.values()), "commits": len(decisions)}

    async def replicas(self) -> dict[str, list[int]]:
        """Replica counts of the partitions of the topics the saga traffic uses."""
        from aiokafka.admin import AIOKafkaAdminClient

        topics = [f"{self.names.orchestrator}Reply", self.names.reserve_stock]
        admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap)
        await admin.start()
        try:
            described = await admin.describe_topics(topics)
        finally:
            await admin.close()
        return {t["topic"]: sorted({len(p["replicas"]) for p in t["partitions"]}) for t in described}


@pytest.fixture
async def cluster(
    kafka_cluster: str,  # noqa: F811
    e2e_database: str,
    apps: Apps,
    tmp_path: Path,
) -> AsyncIterator[Cluster]:
    names = Names(uuid.uuid4().hex[:10])
    storage = SqlAlchemySagaStorage(e2e_database, auto_migrate=True)
    await storage.start()
    engine = create_async_engine(e2e_database)
    await db.create_tables(engine)
    config = _stock.write_config(
        tmp_path / "worker.yml",
        names=names,
        bootstrap=kafka_cluster,
        database_url=e2e_database,
        sagas=["tests.e2e.faults._stock:PATIENT"],
        kafka={"topic_replication_factor": _cluster.REPLICATION, "connect_timeout": 60},
        recovery={"interval": 1.0, "lease_seconds": 10},
    )
    args = ["--bootstrap", kafka_cluster, "--database-url", e2e_database, "--suffix", names.suffix]
    pool = KafkaBrokerPool(
        bootstrap_servers=kafka_cluster, topic_partitions=4, topic_replication_factor=_cluster.REPLICATION
    )
    manager = SagaManager(
        storage, pool, service_name=names.orchestrator, consume_replies=False, relay_interval=0.2
    )
    try:
        participant = _stock.start_module(apps, "inventory", names, "tests.e2e.faults._cluster", *args)
        worker = _stock.start_worker(apps, "worker", config, names)
        await apps.wait_ready(participant)
        await _stock.wait_worker_ready(apps, worker)
        await manager.setup()
        saga = _stock.stock_saga(names, 1, timeout=30.0)
        yield Cluster(names, kafka_cluster, storage, engine, apps, manager, saga, [])
    finally:
        apps.stop_all()
        await manager.destroy()  # stops the relay, the pool and the storage
        await engine.dispose()
        for n in (1, 2, 3):  # whatever a failed test left down
            _cluster.start_broker(n)


async def test_a_broker_killed_mid_run_loses_and_doubles_nothing(cluster: Cluster) -> None:
    await cluster.start(30)
    _cluster.kill_broker(2)
    await cluster.start(30)
    _cluster.start_broker(2)
    await cluster.start(20)
    figures = await cluster.check_all_finished_once()
    replicas = await cluster.replicas()
    assert list(replicas.values()) == [[_cluster.REPLICATION]] * 2, replicas
    print(f"\nCLUSTER BROKER KILL: {figures}")


async def test_a_broker_down_for_a_minute_loses_and_doubles_nothing(cluster: Cluster) -> None:
    await cluster.start(10)
    _cluster.kill_broker(3)
    down_since = time.monotonic()
    while time.monotonic() - down_since < OUTAGE:  # sagas keep starting while the broker is away
        await cluster.start(5)
        await asyncio.sleep(5)
    _cluster.start_broker(3)
    await cluster.start(10)
    figures = await cluster.check_all_finished_once()
    print(f"\nCLUSTER BROKER OUTAGE ({OUTAGE:.0f} s): {figures}")
