"""``kafka-saga`` against real Kafka and PostgreSQL: the demo with config/kafka.yml, admin and replay."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer

from saga.config import build_manager, load_config
from saga.context import SagaContext
from saga.demo import ORDER_SAGA
from saga.demo.order import RESERVE_STOCK
from saga.messages import H_EXECUTION_ID, H_REQUEST_ID
from storage import SagaStatus

pytestmark = [pytest.mark.kafka, pytest.mark.postgres, pytest.mark.e2e]

REPO = Path(__file__).resolve().parents[2]
KAFKA_YML = REPO / "config" / "kafka.yml"


@pytest.fixture
def env(kafka_bootstrap: str, database_url: str) -> dict[str, str]:
    """The services' addresses for config/kafka.yml, and a service name of this test's own."""
    service = f"orders-{uuid.uuid4().hex[:8]}"
    return {
        "KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap,
        "SAGA_DATABASE_URL": database_url,
        "SAGA_SERVICE_NAME": service,
    }


def run_cli(*args: str, env: dict[str, str], timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "saga.cli", *args, "--config", str(KAFKA_YML)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), **env},
        check=False,
    )


def test_demo_on_kafka_and_postgres(env: dict[str, str]) -> None:
    result = run_cli("demo", env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert f"(Kafka at {env['KAFKA_BOOTSTRAP_SERVERS']}, storage postgresql+asyncpg://" in out
    assert ":saga@" not in out  # password hidden
    assert "statuses in storage: ERRORED 3, FINISHED 17" in out
    assert "participants: 20 stock reservations (3 released), 17 charges (3 declined, 0 refunded)" in out
    assert re.search(r"result: OK, all 20 sagas reached their expected status", out)
    crashed = re.search(
        r"crashed: order-\w+-0012 \(execution ([0-9a-f-]{36})\): RUNNING after the crash", out
    )
    assert crashed is not None

    # The admin commands read the same PostgreSQL database.
    shown = run_cli("show", crashed.group(1), "--json", env=env)
    assert shown.returncode == 0, shown.stderr
    execution = json.loads(shown.stdout)
    assert execution["status"] == "finished"
    assert execution["name"] == "demo-order"
    create = [s for s in execution["steps"] if s["name"] == "create_order" and s["phase"] == "execute"]
    assert create and create[-1]["status"] == "succeeded"
    assert {r["outcome"] for r in execution["replies"]} == {"applied"}

    listed = run_cli(
        "list", "--name", "demo-order", "--status", "errored", "--limit", "200", "--json", env=env
    )
    assert listed.returncode == 0, listed.stderr
    assert json.loads(listed.stdout)["total"] >= 3


async def _paused_execution(env: dict[str, str]) -> uuid.UUID:
    """An order paused at reserve_stock, its command published, with no participant to answer."""
    config = load_config(KAFKA_YML, environ={**os.environ, **env})
    manager = build_manager(config, consume_replies=False)
    async with manager:
        execution = await manager.run(
            ORDER_SAGA,
            SagaContext(
                order_id=f"replay-{uuid.uuid4().hex[:8]}", sku="mug", quantity=1, amount=100, card="x"
            ),
            pause_on_disk=True,
        )
    assert execution.status is SagaStatus.PAUSED
    return execution.id


async def _commands_for(bootstrap: str, execution_id: uuid.UUID, expected: int) -> list[dict[str, str]]:
    consumer = AIOKafkaConsumer(
        RESERVE_STOCK,
        bootstrap_servers=bootstrap,
        group_id=f"test-replay-{uuid.uuid4().hex[:8]}",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    found: list[dict[str, str]] = []
    try:
        async with asyncio.timeout(60):
            while len(found) < expected:
                batches = await consumer.getmany(timeout_ms=500)
                for records in batches.values():
                    for record in records:
                        headers = {k: v.decode() for k, v in record.headers}
                        if headers.get(H_EXECUTION_ID) == str(execution_id):
                            found.append(headers)
    finally:
        await consumer.stop()
    return found


async def test_replay_resends_the_pending_command(env: dict[str, str]) -> None:
    execution_id = await _paused_execution(env)
    result = await asyncio.to_thread(run_cli, "replay", str(execution_id), env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"execution {execution_id}: re-sent the command of step reserve_stock (PAUSED)\n"
    commands = await _commands_for(env["KAFKA_BOOTSTRAP_SERVERS"], execution_id, expected=2)
    assert len(commands) == 2
    assert commands[0][H_REQUEST_ID] == commands[1][H_REQUEST_ID]


def test_db_upgrade_on_postgres(env: dict[str, str]) -> None:
    result = run_cli("db", "upgrade", env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "database schema is at head\n"
