"""The conformance kit against Python participants over the real Kafka broker.

`SagaParticipant` (with its participant store on PostgreSQL) passes every case, through the
``kafka-saga conformance participant`` command run as its own process; a hand-written participant whose
replies lack a required header fails the matching case, and the failure names the header.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from broker import KafkaBrokerPool
from saga import CommandContext, SagaBusinessError, SagaParticipant
from saga.conformance import ParticipantKit
from saga.messages import H_REQUEST_ID, H_SERVICE, SagaCommand, reply_message
from storage.participant import SqlParticipantStore
from tests.integration.conformance_run import kit_config, run_kit

pytestmark = [pytest.mark.kafka, pytest.mark.postgres]


@pytest.fixture
async def pool(kafka_bootstrap: str) -> AsyncIterator[KafkaBrokerPool]:
    async with KafkaBrokerPool(
        bootstrap_servers=kafka_bootstrap, topic_partitions=2, connect_timeout=20.0
    ) as pool:
        yield pool


async def test_saga_participant_passes_every_case(
    pool: KafkaBrokerPool, database_url: str, kafka_bootstrap: str, tmp_path: Path
) -> None:
    suffix = uuid.uuid4().hex[:10]
    reserve_topic, release_topic = f"ReserveStock{suffix}", f"ReleaseStock{suffix}"
    store = SqlParticipantStore(database_url)
    participant = SagaParticipant(f"inventory{suffix}", pool, store=store)
    stock = {"book": 1_000_000}

    @participant.command(reserve_topic)
    def reserve(request: CommandContext) -> dict[str, Any]:
        qty = request.content["qty"]
        if stock["book"] < qty:
            raise SagaBusinessError("out of stock")
        stock["book"] -= qty
        return {"reserved": qty, "left": stock["book"]}

    @participant.command(release_topic, compensates=reserve_topic)
    def release(request: CommandContext) -> None:
        stock["book"] += request.content["qty"]

    async with participant:
        code, out, err = await run_kit(
            kit_config(tmp_path, kafka_bootstrap, f"kit{suffix}"),
            "--topic",
            reserve_topic,
            "--compensation-topic",
            release_topic,
            "--content",
            '{"qty": 1}',
            "--json",
        )
    await store.stop()
    report = json.loads(out)
    failed = {case["case"]: case["detail"] for case in report["cases"] if not case["passed"]}
    assert failed == {}, err
    assert code == 0
    assert [case["case"] for case in report["cases"]] == list(ParticipantKit.CASES)
    assert report["service"] == f"inventory{suffix}"


async def _bad_participant(pool: KafkaBrokerPool, topic: str, leave_out: str) -> None:
    """Answers every command 200, but leaves header ``leave_out`` off its replies."""
    async with pool.subscriber([topic], group_id=f"bad-{topic}") as commands:
        while True:
            for record in await commands.getmany(timeout=0.2):
                command = SagaCommand.from_message(record)
                reply = reply_message(
                    command.reply_topic,
                    value=b"{}",
                    status=200,
                    execution_id=command.execution_id,
                    request_id=command.request_id,
                    service_name="bad",
                    traceparent=command.traceparent,
                    tracestate=command.tracestate,
                )
                headers = {k: v for k, v in reply.headers.items() if k != leave_out}
                await pool.publisher().send(
                    type(reply)(topic=reply.topic, key=reply.key, value=reply.value, headers=headers)
                )


@pytest.mark.parametrize("leave_out", [H_REQUEST_ID, H_SERVICE, "traceparent"])
async def test_a_reply_without_a_required_header_fails_naming_it(
    pool: KafkaBrokerPool, leave_out: str
) -> None:
    topic = f"Bad{uuid.uuid4().hex[:10]}"
    await pool.ensure_topics([topic])
    task = asyncio.create_task(_bad_participant(pool, topic, leave_out))
    try:
        kit = ParticipantKit(pool, topic=topic, reply_topic=f"{topic}Reply", timeout=20.0, service="bad")
        report = await kit.run(("command_reply",))
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    (result,) = report.results
    assert not result.passed
    assert leave_out in result.detail
    assert not report.passed


def test_the_kit_refuses_a_configuration_without_kafka(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from saga.cli import main

    config = tmp_path / "memory.yml"
    config.write_text("service:\n  name: kit\nbroker:\n  type: memory\n")
    assert main(["conformance", "participant", "--config", str(config), "--topic", "T"]) == 2
    assert (
        "conformance needs a Kafka broker; the configuration's broker.type is 'memory'"
        in capsys.readouterr().err
    )
