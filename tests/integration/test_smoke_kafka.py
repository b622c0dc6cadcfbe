"""Smoke test: the Kafka features the orchestrator relies on work against the real broker.

Idempotent producer with acks=all, keyed messages keeping per-key order across partitions, a
consumer group with manual commits, and committed offsets seen by the next member of the group.
"""

from __future__ import annotations

import asyncio
import uuid

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

pytestmark = pytest.mark.kafka

MESSAGES = 1_000
KEYS = 10
PARTITIONS = 3


async def _create_topic(bootstrap: str, topic: str) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        response = await admin.create_topics(
            [NewTopic(topic, num_partitions=PARTITIONS, replication_factor=1)]
        )
        errors = [(name, code) for name, code, *_ in response.topic_errors if code != 0]
        assert not errors, f"CreateTopics failed: {errors}"
        # Metadata reaches the broker's cache asynchronously; wait until all partitions show up.
        for _ in range(100):
            [described] = await admin.describe_topics([topic])
            if described["error_code"] == 0 and len(described["partitions"]) == PARTITIONS:
                return
            await asyncio.sleep(0.1)
        raise AssertionError(f"topic {topic} did not get {PARTITIONS} partitions: {described}")
    finally:
        await admin.close()


async def test_idempotent_produce_group_consume_manual_commit(kafka_bootstrap: str) -> None:
    topic = f"smoke-{uuid.uuid4().hex}"
    group = f"smoke-group-{uuid.uuid4().hex}"
    await _create_topic(kafka_bootstrap, topic)

    producer = AIOKafkaProducer(
        bootstrap_servers=kafka_bootstrap, enable_idempotence=True, acks="all", linger_ms=5
    )
    await producer.start()
    try:
        futures = []
        for seq in range(MESSAGES):
            key = f"key-{seq % KEYS}".encode()
            value = f"{seq // KEYS}".encode()  # per-key sequence number 0, 1, 2, ...
            futures.append(await producer.send(topic, value, key=key))
        metadata = await asyncio.gather(*futures)
    finally:
        await producer.stop()
    assert {m.partition for m in metadata} <= set(range(PARTITIONS))
    assert len({m.partition for m in metadata}) > 1, "10 keys should spread over several partitions"

    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=kafka_bootstrap,
        group_id=group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    await consumer.start()
    received: dict[bytes, list[int]] = {}
    count = 0
    try:
        async with asyncio.timeout(60):
            while count < MESSAGES:
                batches = await consumer.getmany(timeout_ms=1_000)
                for records in batches.values():
                    for record in records:
                        assert record.key is not None and record.value is not None
                        received.setdefault(record.key, []).append(int(record.value))
                        count += 1
        await consumer.commit()
        partitions = sorted(consumer.assignment())
        end_offsets = await consumer.end_offsets(partitions)
    finally:
        await consumer.stop()

    assert count == MESSAGES
    assert len(received) == KEYS
    for key, sequence in received.items():
        assert sequence == list(range(MESSAGES // KEYS)), f"order broken for {key!r}"
    assert len(partitions) == PARTITIONS
    assert sum(end_offsets.values()) == MESSAGES

    # The next member of the group resumes where the first one committed.
    second = AIOKafkaConsumer(bootstrap_servers=kafka_bootstrap, group_id=group, enable_auto_commit=False)
    await second.start()
    try:
        committed = {tp: await second.committed(tp) for tp in partitions}
    finally:
        await second.stop()
    assert committed == end_offsets
    assert all(isinstance(tp, TopicPartition) for tp in committed)
