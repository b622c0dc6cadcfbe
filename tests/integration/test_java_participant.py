"""The Java example participant (examples/java-participant/, official kafka-clients) over the real Kafka.

It is built with Maven, run as its own JVM, driven by our orchestrator through successes, refusals and
compensations, and checked by the conformance kit run as ``kafka-saga conformance participant``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from broker import KafkaBrokerPool
from saga import Saga, SagaContext, SagaManager, SagaRequest, SagaResponse, SagaStatus
from storage import SqlAlchemySagaStorage
from tests.integration.conformance_run import kit_config, run_kit

pytestmark = [pytest.mark.kafka, pytest.mark.postgres]

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "java-participant"
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


@pytest.fixture(scope="module")
def classpath() -> str:
    """Build the example (offline when Maven has every jar already, else with downloads)."""
    if shutil.which("java") is None or shutil.which("mvn") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("java and mvn are needed for the Java participant example")
        pytest.skip("java and mvn are needed for the Java participant example")
    goals = ["-q", "-B", "-Dstyle.color=never", "compile", "dependency:copy-dependencies"]
    build = subprocess.run(["mvn", "-o", *goals], cwd=EXAMPLE, capture_output=True, text=True, check=False)
    if build.returncode != 0:
        build = subprocess.run(["mvn", *goals], cwd=EXAMPLE, capture_output=True, text=True, check=False)
    assert build.returncode == 0, build.stdout + build.stderr
    return f"{EXAMPLE / 'target' / 'classes'}{os.pathsep}{EXAMPLE / 'target' / 'dependency' / '*'}"


@dataclass
class JavaParticipant:
    service: str
    reserve_topic: str
    release_topic: str
    lines: list[str] = field(default_factory=list)
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)

    async def add(self, line: str) -> None:
        async with self.changed:
            self.lines.append(line)
            self.changed.notify_all()

    async def count(self, predicate: Callable[[str], bool], expected: int, *, within: float = 60.0) -> None:
        """Wait until ``expected`` lines of the participant's log match ``predicate``; no more may."""
        async with self.changed:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(within):
                    await self.changed.wait_for(lambda: sum(map(predicate, self.lines)) >= expected)
        assert sum(map(predicate, self.lines)) == expected, "\n".join(self.lines)


@pytest.fixture
async def java(classpath: str, kafka_bootstrap: str) -> AsyncIterator[JavaParticipant]:
    suffix = uuid.uuid4().hex[:10]
    participant = JavaParticipant(f"javainventory{suffix}", f"ReserveStock{suffix}", f"ReleaseStock{suffix}")
    process = await asyncio.create_subprocess_exec(
        "java",
        "-Dorg.slf4j.simpleLogger.defaultLogLevel=warn",
        "-cp",
        classpath,
        "example.inventory.InventoryParticipant",
        "--bootstrap",
        kafka_bootstrap,
        "--service",
        participant.service,
        "--reserve-topic",
        participant.reserve_topic,
        "--release-topic",
        participant.release_topic,
        "--partitions",
        "2",
        "--stock",
        "book=10",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )

    async def read() -> None:
        assert process.stdout is not None
        async for raw in process.stdout:
            await participant.add(raw.decode(errors="replace").rstrip())

    reader = asyncio.create_task(read())
    try:
        await participant.count(lambda line: "ready:" in line, 1)
        yield participant
    finally:
        process.terminate()
        try:
            await asyncio.wait_for(process.wait(), timeout=20)
        except TimeoutError:
            process.kill()
            await process.wait()
        await reader


def order_saga(java: JavaParticipant) -> Saga:
    def reserve(context: SagaContext) -> SagaRequest:
        return SagaRequest(java.reserve_topic, {"item": "book", "qty": context.qty})

    def release(context: SagaContext) -> SagaRequest:
        return SagaRequest(java.release_topic, {"item": "book", "qty": context.qty})

    def reserved(context: SagaContext, response: SagaResponse) -> SagaContext:
        context.reserved = response.content["reserved"]
        return context

    def confirm(context: SagaContext) -> SagaContext:
        if context.fail:
            raise RuntimeError("payment declined")
        return context

    return (
        Saga(f"order{java.service}")
        .remote_step(reserve, name="reserve_stock", timeout=60)
        .on_success(reserved)
        .on_failure(release)
        .local_step(confirm, name="confirm")
        .commit()
    )


async def test_our_orchestrator_runs_sagas_through_the_java_participant(
    java: JavaParticipant, kafka_bootstrap: str, database_url: str
) -> None:
    pool = KafkaBrokerPool(bootstrap_servers=kafka_bootstrap, topic_partitions=2, connect_timeout=20.0)
    storage = SqlAlchemySagaStorage(database_url)
    saga = order_saga(java)
    # Stock 10: six orders of 1 finish, three reserve then fail and are compensated, two of 50 are refused.
    orders: list[dict[str, Any]] = [
        *({"qty": 1, "fail": False} for _ in range(6)),
        *({"qty": 1, "fail": True} for _ in range(3)),
        *({"qty": 50, "fail": False} for _ in range(2)),
    ]
    async with SagaManager(
        storage, pool, service_name=f"orders{java.service}", relay_interval=0.05
    ) as manager:
        runs = await asyncio.gather(
            *(
                manager.run(saga, SagaContext(order), raise_on_error=False, traceparent=TRACEPARENT)
                for order in orders
            )
        )
    await storage.stop()
    await pool.stop()
    statuses = [run.status for run in runs]
    assert statuses == [SagaStatus.FINISHED] * 6 + [SagaStatus.ERRORED] * 5
    assert [run.context.get("reserved") for run in runs[:6]] == [1] * 6
    assert all(run.error is not None and run.error["step"] == "reserve_stock" for run in runs[9:])
    await java.count(lambda line: line.startswith("[inventory] commit execution"), 6)
    await java.count(lambda line: line.startswith("[inventory] reject execution"), 5)
    await java.count(lambda line: line.startswith("[inventory] compensation "), 3)
    stock = [line for line in java.lines if line.startswith("[inventory] stock ")]
    assert stock[-1] == "[inventory] stock {book=4}", "\n".join(java.lines)
    commands = [
        line for line in java.lines if line.startswith(("[inventory] command", "[inventory] compensation"))
    ]
    assert len(commands) == 14 and all(line.endswith(f"traceparent {TRACEPARENT}") for line in commands)


async def test_the_java_participant_passes_the_conformance_kit(
    java: JavaParticipant, kafka_bootstrap: str, tmp_path: Path
) -> None:
    code, table, err = await run_kit(
        kit_config(tmp_path, kafka_bootstrap, f"kit{java.service}"),
        "--topic",
        java.reserve_topic,
        "--compensation-topic",
        java.release_topic,
        "--content",
        '{"item": "book", "qty": 1}',
    )
    assert code == 0, table + err
    assert table.splitlines()[-1] == "7 passed, 0 failed"
    assert f"service {java.service!r}" in table
