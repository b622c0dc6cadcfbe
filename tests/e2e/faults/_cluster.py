"""The 3-broker Kafka cluster of the fault tests, and an inventory participant that replicates its topics.

`kafka_cluster` (a session fixture; import it into the test module) starts the cluster through
``scripts/services.sh start-cluster`` and stops it at the end of the session unless it was already
running; `kill_broker` and `start_broker` go through the same script, which tracks the brokers' pids.

``python -m tests.e2e.faults._cluster --bootstrap B1,B2,B3 --database-url URL --suffix S`` is the
participant: ReserveStock/ReleaseStock like ``tests.e2e.apps.inventory`` (one effect row per handler run,
in a table without unique constraints; one row per decision), but with every topic it creates replicated
on all three brokers, since the cluster refuses ``acks=all`` writes to a topic with fewer than
``min.insync.replicas=2`` replicas.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from tests.e2e.conftest import REPO_ROOT

SERVICES_SH = REPO_ROOT / "scripts" / "services.sh"
#: Replicas of every topic the cluster tests create.
REPLICATION = 3


def services(*args: str, timeout: float = 400) -> subprocess.CompletedProcess[str]:
    """``scripts/services.sh ARGS`` with this Python for its readiness check."""
    return subprocess.run(
        ["bash", str(SERVICES_SH), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        stdin=subprocess.DEVNULL,
        env={**os.environ, "KAFKA_SAGA_PYTHON": os.environ.get("KAFKA_SAGA_PYTHON", sys.executable)},
    )


def _checked(*args: str) -> str:
    done = services(*args)
    if done.returncode != 0:
        pytest.fail(f"scripts/services.sh {' '.join(args)} exited {done.returncode}:\n{done.stderr[-3000:]}")
    return done.stdout


@pytest.fixture(scope="session")
def kafka_cluster() -> Iterator[str]:
    """Bootstrap servers of the 3-broker cluster (``host:port,host:port,host:port``)."""
    already_running = services("cluster-status").returncode == 0
    if not already_running:
        _checked("start-cluster")
    line = _checked("cluster-env").strip()
    bootstrap = line.removeprefix("export KAFKA_SAGA_CLUSTER_BOOTSTRAP=")
    try:
        yield bootstrap
    finally:
        if already_running:
            _checked("start-broker", "1")  # leave it as found: all three up
            _checked("start-broker", "2")
            _checked("start-broker", "3")
        else:
            _checked("stop-cluster")


def kill_broker(number: int) -> None:
    """SIGKILL cluster broker ``number``, as a crash would."""
    _checked("kill-broker", str(number))


def start_broker(number: int) -> None:
    """Start cluster broker ``number`` again with its data; returns once it logged its start."""
    _checked("start-broker", str(number))


async def _participant() -> None:
    from sqlalchemy.ext.asyncio import create_async_engine

    from broker import KafkaBrokerPool
    from saga import CommandContext, SagaParticipant
    from saga.messages import SagaControl
    from storage import SqlAlchemySagaStorage
    from tests.e2e import db
    from tests.e2e.apps import common
    from tests.e2e.workload import Names

    args = common.parser(__doc__ or "").parse_args()
    common.setup_logging("inventory", args.log_level)
    names = Names(args.suffix)
    engine = create_async_engine(args.database_url, pool_size=10)
    storage = SqlAlchemySagaStorage(args.database_url, auto_migrate=False)
    pool = KafkaBrokerPool(
        bootstrap_servers=args.bootstrap,
        client_id=names.inventory,
        topic_partitions=common.PARTITIONS,
        topic_replication_factor=REPLICATION,
        connect_timeout=60.0,
        session_timeout_ms=10_000,
        heartbeat_interval_ms=1_000,
    )
    participant = SagaParticipant(names.inventory, pool, storage=storage)

    async def effect(request: CommandContext, name: str) -> None:
        await db.record_effect(
            engine,
            "inventory",
            idempotency_key=request.idempotency_key,
            execution_id=request.execution_id,
            order=request.content["order"],
            effect=name,
        )

    @participant.command(names.reserve_stock)
    async def reserve_stock(request: CommandContext) -> dict[str, Any]:
        await effect(request, "reserve")
        return {"reservation": f"res-{request.content['order']}"}

    @participant.command(names.release_stock)
    async def release_stock(request: CommandContext) -> dict[str, Any]:
        await effect(request, "release")
        return {}

    async def decision(control: SagaControl) -> None:
        await db.record_decision(
            engine, "inventory", execution_id=control.execution_id, action=control.action
        )

    participant.on_commit(decision)
    participant.on_reject(decision)
    try:
        async with pool, storage, participant:
            common.say("READY")
            await common.serve_until_signal(lambda: participant.running)
    finally:
        common.print_stats(dataclasses.asdict(participant.stats))
        await engine.dispose()


if __name__ == "__main__":
    asyncio.run(_participant())
