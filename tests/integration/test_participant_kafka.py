"""`SagaParticipant` over `KafkaBrokerPool` on the real broker: commands in, replies and dead letters out."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from broker import BrokerMessage, KafkaBrokerPool
from saga import CommandContext, SagaBusinessError, SagaParticipant, SagaResponse, SagaResponseStatus
from saga.messages import H_KIND, SagaCommand, SagaControl
from saga.participant import H_DEAD_LETTER_REASON
from storage import MemorySagaStorage

pytestmark = pytest.mark.kafka


@pytest.fixture
async def pool(kafka_bootstrap: str) -> AsyncIterator[KafkaBrokerPool]:
    async with KafkaBrokerPool(
        bootstrap_servers=kafka_bootstrap, topic_partitions=2, connect_timeout=20.0
    ) as pool:
        yield pool


async def collect(
    pool: KafkaBrokerPool, topic: str, count: int, *, within: float = 30.0
) -> list[BrokerMessage]:
    """Read ``count`` records of ``topic`` with a fresh group (from the earliest offset)."""
    records: list[BrokerMessage] = []
    async with pool.subscriber([topic], group_id=f"reader-{uuid.uuid4().hex}") as reader:
        async with asyncio.timeout(within):
            while len(records) < count:
                records.extend(await reader.getmany(timeout=0.5))
    return records


async def test_participant_round_trips_commands_over_kafka(pool: KafkaBrokerPool) -> None:
    suffix = uuid.uuid4().hex[:12]
    service, command_topic, reply_topic = f"inventory{suffix}", f"ReserveStock{suffix}", f"orderReply{suffix}"
    participant = SagaParticipant(service, pool, storage=MemorySagaStorage())
    handled: list[str] = []
    committed: list[uuid.UUID] = []

    @participant.command(command_topic)
    async def reserve(request: CommandContext) -> dict[str, Any]:
        handled.append(request.idempotency_key)
        if request.content["quantity"] > 10:
            raise SagaBusinessError("not enough stock")
        return {"reserved": request.content["quantity"]}

    participant.on_commit(lambda control: committed.append(control.execution_id))

    def command(quantity: int, key: str | None = None) -> SagaCommand:
        return SagaCommand(
            target=command_topic,
            content={"sku": "A", "quantity": quantity},
            execution_id=uuid.uuid4(),
            request_id=uuid.uuid4(),
            reply_topic=reply_topic,
            idempotency_key=key or uuid.uuid4().hex,
            user="alice",
        )

    good, refused = command(2), command(11)
    duplicate = command(2, key=good.idempotency_key)
    await pool.ensure_topics([reply_topic])
    async with participant:
        publisher = pool.publisher()
        await publisher.send_batch(
            [
                good.to_message(),
                refused.to_message(),
                BrokerMessage(command_topic, b"x", b"{broken", {H_KIND: "command"}),
                duplicate.to_message(),
                SagaControl("commit", good.execution_id, service).to_message(),
                SagaControl("commit", good.execution_id, service).to_message(),
            ]
        )
        replies = [SagaResponse.from_message(m) for m in await collect(pool, reply_topic, 3)]
        letters = await collect(pool, participant.dead_letter_topic, 1)
        async with asyncio.timeout(30):
            while participant.stats.commits + participant.stats.duplicate_decisions < 2:  # noqa: ASYNC110
                await asyncio.sleep(0.05)

    by_request = {r.request_id: r for r in replies}
    assert by_request[good.request_id].status is SagaResponseStatus.SUCCESS
    assert by_request[good.request_id].content == {"reserved": 2}
    assert by_request[good.request_id].service_name == service
    assert by_request[good.request_id].execution_id == good.execution_id
    assert by_request[duplicate.request_id].content == {"reserved": 2}
    assert by_request[refused.request_id].status is SagaResponseStatus.ERROR
    assert by_request[refused.request_id].content == {"error": "not enough stock"}
    assert sorted(handled) == sorted([good.idempotency_key, refused.idempotency_key])
    assert letters[0].value == b"{broken"
    assert letters[0].headers[H_DEAD_LETTER_REASON].startswith("malformed message:")
    assert committed == [good.execution_id]
    assert participant.stats.duplicates == 1
