"""``kafka-saga participant --metrics-port``: scrape ``/metrics`` of a participant process during a run over
real Kafka and PostgreSQL, and check its counters against the commands the sagas sent."""

from __future__ import annotations

import asyncio
import sys
import time
import uuid
from pathlib import Path

import pytest

from broker.kafka import KafkaBrokerPool
from broker.settings import KafkaSettings
from saga import SagaManager, SagaStatus
from storage import SqlAlchemySagaStorage

# ``procs`` is the fixture that ends the test's processes.
from tests.integration.test_metrics_worker import Proc, free_port, procs, scrape, value  # noqa: F401

pytestmark = [pytest.mark.kafka, pytest.mark.postgres, pytest.mark.e2e]


def write_config(path: Path, *, bootstrap: str, database_url: str, service: str) -> Path:
    path.write_text(
        f"""
broker:
  type: kafka
  kafka: {{bootstrap_servers: "{bootstrap}", linger_ms: 0, topic_partitions: 2}}
participant:
  service: {service}-shop
  app: tests.integration.observed_app:shop_factory
  store_url: "{database_url}"
metrics: {{host: 127.0.0.1}}
logging: {{level: INFO}}
"""
    )
    return path


async def run_orders(bootstrap: str, database_url: str, prefix: str, service: str) -> list[SagaStatus]:
    from tests.integration.observed_app import build_saga

    saga = build_saga(prefix)
    manager = SagaManager(
        SqlAlchemySagaStorage(database_url),
        KafkaBrokerPool(KafkaSettings(bootstrap_servers=bootstrap, linger_ms=0)),
        service_name=service,
    )
    manager.register(saga)
    async with manager:
        runs = [
            manager.run(saga, {"order": f"o{n}", "amount": amount}, raise_on_error=False)
            for n, amount in enumerate([10, 20, 30, 500])
        ]
        return [execution.status for execution in await asyncio.gather(*runs)]


def test_participant_metrics_count_its_commands(
    tmp_path: Path,
    procs: list[Proc],  # noqa: F811
    kafka_bootstrap: str,
    database_url: str,
) -> None:
    tag = uuid.uuid4().hex[:8]
    prefix, service = f"PObs{tag}", f"pobs-{tag}"
    config = write_config(
        tmp_path / "participant.yml", bootstrap=kafka_bootstrap, database_url=database_url, service=service
    )
    port = free_port()
    participant = Proc(
        "participant",
        [
            sys.executable,
            "-m",
            "saga.cli",
            "participant",
            "--config",
            str(config),
            "--metrics-port",
            str(port),
        ],
        {"OBS_PREFIX": prefix, "OBS_SERVICE": service},
        tmp_path,
    )
    procs.append(participant)
    participant.wait_for("metrics on http://127.0.0.1:")
    participant.wait_for("ready: service")
    assert value(scrape(port), "saga_participant_handled_total") == 0

    statuses = asyncio.run(run_orders(kafka_bootstrap, database_url, prefix, service))
    assert sorted(statuses) == sorted([SagaStatus.FINISHED] * 3 + [SagaStatus.ERRORED])

    # finished: reserve and charge; declined: reserve, charge (400) and release
    deadline = time.monotonic() + 30
    while value(samples := scrape(port), "saga_participant_handled_total") < 3 * 2 + 3:
        assert time.monotonic() < deadline, participant.stderr.read_text()[-3000:]
        time.sleep(0.2)
    assert value(samples, "saga_participant_handled_total") == 9
    assert value(samples, "saga_participant_succeeded_total") == 8
    assert value(samples, "saga_participant_business_errors_total") == 1
    assert value(samples, "saga_participant_system_errors_total") == 0
    assert participant.stop() == 0
