"""``kafka-saga worker --metrics-port``: scrape ``/metrics`` of the worker process during a run over real
Kafka and PostgreSQL, and check its counters against what storage holds."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from broker.kafka import KafkaBrokerPool
from broker.settings import KafkaSettings
from saga import SagaContext, SagaManager, SagaStatus
from storage import SqlAlchemySagaStorage
from tests.integration.observed_app import SAGA_NAME, build_saga

pytestmark = [pytest.mark.kafka, pytest.mark.postgres, pytest.mark.e2e]

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_config(path: Path, *, bootstrap: str, database_url: str, service: str) -> Path:
    path.write_text(
        f"""
service: {{name: {service}}}
broker:
  type: kafka
  kafka: {{bootstrap_servers: "{bootstrap}", linger_ms: 0, topic_partitions: 2}}
storage: {{url: "{database_url}"}}
sagas: ["tests.integration.observed_app:SAGA"]
outbox: {{relay_interval: 0.1}}
recovery: {{enabled: true, interval: 0.5}}
metrics: {{host: 127.0.0.1, refresh_interval: 0.2}}
logging: {{level: INFO, format: json}}
"""
    )
    return path


class Proc:
    """An OS process whose output goes to files, ended by pid."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], out: Path) -> None:
        self.stdout = out / f"{name}.out"
        self.stderr = out / f"{name}.err"
        with self.stdout.open("wb") as o, self.stderr.open("wb") as e:
            self.process = subprocess.Popen(
                argv, stdout=o, stderr=e, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO), **env}
            )

    def wait_for(self, text: str, *, within: float = 60, stream: str = "any") -> None:
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            found = self.stdout.read_text(errors="replace") + self.stderr.read_text(errors="replace")
            if text in found:
                return
            if self.process.poll() is not None:
                break
            time.sleep(0.1)
        raise AssertionError(f"{text!r} not seen; stderr:\n{self.stderr.read_text(errors='replace')[-3000:]}")

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


@pytest.fixture
def procs() -> Iterator[list[Proc]]:
    started: list[Proc] = []
    yield started
    for proc in reversed(started):
        proc.stop()


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        body = response.read().decode()
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def start_orders(manager: SagaManager, prefix: str, amounts: list[int]) -> list[uuid.UUID]:
    saga = build_saga(prefix)
    manager.register(saga)
    ids = []
    async with manager:
        for n, amount in enumerate(amounts):
            context = SagaContext(order=f"o{n}", amount=amount)
            ids.append((await manager.run(saga, context, pause_on_disk=True)).id)
    return ids


async def stored(database_url: str, ids: list[uuid.UUID]) -> tuple[dict[SagaStatus, int], int]:
    """Statuses of ``ids`` and how many applied replies storage recorded for them."""
    statuses: dict[SagaStatus, int] = {}
    applied = 0
    async with SqlAlchemySagaStorage(database_url) as storage:
        for saga_id in ids:
            record = await storage.load(saga_id)
            statuses[record.status] = statuses.get(record.status, 0) + 1
            applied += sum(r.outcome == "applied" for r in await storage.list_replies(saga_id))
    return statuses, applied


def test_worker_metrics_match_storage(
    tmp_path: Path, procs: list[Proc], kafka_bootstrap: str, database_url: str
) -> None:
    tag = uuid.uuid4().hex[:8]
    prefix, service = f"Obs{tag}", f"obs-{tag}"
    config = write_config(
        tmp_path / "saga.yml", bootstrap=kafka_bootstrap, database_url=database_url, service=service
    )
    env = {"OBS_PREFIX": prefix}
    port = free_port()
    participant = Proc(
        "participant",
        [
            sys.executable,
            "-m",
            "tests.integration.observed_app",
            "--bootstrap",
            kafka_bootstrap,
            "--prefix",
            prefix,
            "--service",
            service,
        ],
        env,
        tmp_path,
    )
    procs.append(participant)
    worker = Proc(
        "worker",
        [sys.executable, "-m", "saga.cli", "worker", "--config", str(config), "--metrics-port", str(port)],
        env,
        tmp_path,
    )
    procs.append(worker)
    participant.wait_for("READY")
    worker.wait_for("metrics on http://127.0.0.1:")
    worker.wait_for("ready: service")

    before = scrape(port)
    assert value(before, "saga_replies_total", outcome="applied") == 0
    assert ("saga_outbox_backlog_rows", ()) in before

    amounts = [10, 20, 30, 40, 500, 600]  # the last two are declined: reserve is compensated
    starter = SagaManager(
        SqlAlchemySagaStorage(database_url),
        KafkaBrokerPool(KafkaSettings(bootstrap_servers=kafka_bootstrap, linger_ms=0)),
        service_name=service,
        consume_replies=False,
    )
    ids = asyncio.run(start_orders(starter, prefix, amounts))

    deadline = time.monotonic() + 90
    while True:
        samples = scrape(port)
        ended = sum(
            value(samples, "saga_executions_ended_total", saga=SAGA_NAME, status=s)
            for s in ("finished", "errored")
        )
        if ended >= len(ids):
            break
        assert time.monotonic() < deadline, (
            f"only {ended} of {len(ids)} ended; worker:\n{worker.stderr.read_text()[-3000:]}"
        )
        time.sleep(0.2)
    statuses, applied = asyncio.run(stored(database_url, ids))

    assert statuses == {SagaStatus.FINISHED: 4, SagaStatus.ERRORED: 2}
    assert (
        value(samples, "saga_executions_ended_total", saga=SAGA_NAME, status="finished")
        == statuses[SagaStatus.FINISHED]
    )
    assert (
        value(samples, "saga_executions_ended_total", saga=SAGA_NAME, status="errored")
        == statuses[SagaStatus.ERRORED]
    )
    # every reply the worker applied is one storage recorded as applied, and no other
    assert value(samples, "saga_replies_total", outcome="applied") == applied
    assert applied == 4 * 2 + 2 * 3  # finished: reserve, charge; errored: reserve, charge (400), release
    for outcome in ("duplicate", "stale", "unknown_status", "malformed"):
        assert ("saga_replies_total", (("outcome", outcome),)) in samples
    assert value(samples, "saga_execution_duration_seconds_count", saga=SAGA_NAME, status="finished") == 4
    charge_ok = value(
        samples,
        "saga_step_duration_seconds_count",
        saga=SAGA_NAME,
        step="charge",
        phase="execute",
        outcome="succeeded",
    )
    assert charge_ok == 4
    assert (
        value(
            samples,
            "saga_step_duration_seconds_count",
            saga=SAGA_NAME,
            step="reserve",
            phase="compensate",
            outcome="succeeded",
        )
        == 2
    )
    assert value(samples, "saga_runs_waiting") == 0
    assert ("saga_recovery_claims_total", ()) in samples
    lags = [k for k in samples if k[0] == "saga_reply_consumer_lag_records"]
    assert lags, "the lag gauge has a sample per assigned partition of the reply topic"
    assert worker.stop() == 0
