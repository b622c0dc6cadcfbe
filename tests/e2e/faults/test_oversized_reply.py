"""A participant reply over the broker's size limit (the effect done) becomes a small 500 reply.

Real Kafka and PostgreSQL; the participant is its own OS process (`tests.e2e.participants.oversized`).
The saga holds something at one participant step, then asks for a report whose reply is 1.1 MB. The
broker would refuse that reply for good: dead-lettering it at the participant leaves the saga PAUSED with
no error. The participant instead answers with a small ``SYSTEM_ERROR`` reply naming the reason, the size
and the limit, so the saga compensates the hold and ends ERRORED with that error.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from broker.kafka import KafkaBrokerPool
from saga import Saga, SagaContext, SagaManager, SagaRequest, SagaStatus
from storage import SqlAlchemySagaStorage
from tests.e2e.participants.oversized import REPLY_BYTES, topics

pytestmark = [pytest.mark.kafka, pytest.mark.postgres, pytest.mark.e2e]

REPO_ROOT = Path(__file__).resolve().parents[3]
#: How long the saga may take to end once the participant answers (it answers within a second or two).
SETTLE = 30.0


def saga(names: dict[str, str]) -> Saga:
    return (
        Saga("report", version=1)
        .remote_step(lambda context: SagaRequest(names["hold"], {}), name="hold")
        .on_failure(lambda context: SagaRequest(names["unhold"], {}))
        .remote_step(lambda context: SagaRequest(names["report"], {}), name="report")
        .commit()
    )


def start_participant(
    bootstrap: str, database_url: str, suffix: str, output: Path
) -> subprocess.Popen[bytes]:
    with output.open("wb") as out:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.e2e.participants.oversized",
                "--bootstrap",
                bootstrap,
                "--database-url",
                database_url,
                "--suffix",
                suffix,
            ],
            cwd=REPO_ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )


async def test_an_oversized_reply_compensates_the_saga_instead_of_pausing_it(
    e2e_database: str, kafka_bootstrap: str, tmp_path: Path
) -> None:
    suffix = uuid.uuid4().hex[:8]
    names = topics(suffix)
    storage = SqlAlchemySagaStorage(e2e_database, pool_size=4)
    pool = KafkaBrokerPool(bootstrap_servers=kafka_bootstrap, client_id=names["orchestrator"])
    manager = SagaManager(storage, pool, service_name=names["orchestrator"], relay_interval=0.2)
    definition = saga(names)
    manager.register(definition)
    await manager.setup()  # migrates the database before the participant uses it as its dedup store
    participant = start_participant(kafka_bootstrap, e2e_database, suffix, tmp_path / "participant.out")
    try:
        deadline = time.monotonic() + 60
        while b"READY" not in (tmp_path / "participant.out").read_bytes():
            assert participant.poll() is None, (tmp_path / "participant.out").read_text()
            assert time.monotonic() < deadline, "participant not ready"
            await asyncio.sleep(0.1)
        execution = await manager.run(definition, SagaContext(), pause_on_disk=True, raise_on_error=False)
        assert execution is not None
        deadline = time.monotonic() + SETTLE
        while True:
            record = await storage.load(execution.uuid)
            if record.status in (SagaStatus.ERRORED, SagaStatus.FINISHED, SagaStatus.DEAD_LETTER):
                break
            assert time.monotonic() < deadline, (
                f"saga still {record.status.value} after {SETTLE} s: the oversized reply never came back\n"
                + (tmp_path / "participant.out").read_text()[-3000:]
            )
            await asyncio.sleep(0.25)
        assert record.status is SagaStatus.ERRORED
        error = dict(record.error or {})
        assert (error.get("step"), error.get("status")) == ("report", 500), error
        reply = error["reply"]
        assert reply["reason"] == "reply_too_large"
        assert reply["limit"] == 1_048_576
        assert reply["size"] > REPLY_BYTES
        steps = {(s.name, s.phase): s.status for s in await storage.get_steps(execution.uuid)}
        assert steps[("hold", "compensate")] == "succeeded", steps
    finally:
        participant.terminate()
        participant.wait(15)
        await manager.destroy()
