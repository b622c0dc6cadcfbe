"""One contract for every `BrokerClientPool` adapter: the same tests run on memory and on real Kafka.

Each test uses fresh, uniquely named topics and consumer groups, so the Kafka runs share one broker without
seeing each other's records. Waiting is done by polling with deadlines, never by fixed sleeps.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field

import pytest

from broker import (
    BrokerClientPool,
    BrokerClosedError,
    BrokerMessage,
    BrokerSubscriber,
    InMemoryBrokerPool,
    KafkaBrokerPool,
    KafkaSettings,
)

RawHeaders = Sequence[tuple[str, bytes | None]]


@dataclass
class Harness:
    """Builds pools of one adapter and publishes wire-level records for it."""

    kind: str
    bootstrap: str | None = None
    pools: list[BrokerClientPool] = field(default_factory=list)

    async def pool(self, *, partitions: int = 4) -> BrokerClientPool:
        pool: BrokerClientPool
        if self.kind == "memory":
            pool = InMemoryBrokerPool(partitions=partitions)
        else:
            assert self.bootstrap is not None
            pool = KafkaBrokerPool(kafka_settings(self.bootstrap), topic_partitions=partitions)
        self.pools.append(pool)
        await pool.start()
        return pool

    async def publish_raw(
        self, pool: BrokerClientPool, topic: str, *, key: bytes, value: bytes, headers: RawHeaders
    ) -> None:
        """Publish with raw header bytes, as a producer outside this library could."""
        if isinstance(pool, InMemoryBrokerPool):
            await pool.publish_raw(topic, key=key, value=value, headers=headers)
            return
        from aiokafka import AIOKafkaProducer

        await pool.ensure_topics([topic])
        producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap)
        await producer.start()
        try:
            await producer.send_and_wait(topic, value=value, key=key, headers=list(headers))
        finally:
            await producer.stop()


def kafka_settings(bootstrap: str) -> KafkaSettings:
    # Fast heartbeats so members notice a rebalance in ~0.1 s instead of the 3 s default.
    return KafkaSettings(
        bootstrap_servers=bootstrap,
        client_id="kafka-saga-contract",
        heartbeat_interval_ms=100,
        session_timeout_ms=6000,
        fetch_max_wait_ms=100,
        connect_timeout=20,
    )


@pytest.fixture(params=["memory", pytest.param("kafka", marks=pytest.mark.kafka)])
async def harness(request: pytest.FixtureRequest) -> AsyncIterator[Harness]:
    bootstrap = request.getfixturevalue("kafka_bootstrap") if request.param == "kafka" else None
    harness = Harness(request.param, bootstrap)
    try:
        yield harness
    finally:
        for pool in harness.pools:
            await pool.stop()


@pytest.fixture
def name() -> Callable[[str], str]:
    """Unique topic / group names, so tests sharing one broker never see each other's records."""
    suffix = uuid.uuid4().hex[:12]
    return lambda prefix: f"contract-{prefix}-{suffix}"


def msg(topic: str, key: bytes | None, value: bytes, headers: dict[str, str] | None = None) -> BrokerMessage:
    return BrokerMessage(topic=topic, key=key, value=value, headers=headers or {})


async def consume(subscriber: BrokerSubscriber, count: int, *, deadline: float = 20.0) -> list[BrokerMessage]:
    """Fetch until ``count`` records arrived (fails after ``deadline`` seconds)."""
    received: list[BrokerMessage] = []
    async with asyncio.timeout(deadline):
        while len(received) < count:
            received.extend(await subscriber.getmany(timeout=1.0))
    return received


async def wait_for(predicate: Callable[[], bool], *, deadline: float = 20.0) -> None:
    # Polling on purpose: the state watched (a consumer's assignment) lives inside aiokafka, with no event.
    async with asyncio.timeout(deadline):
        while not predicate():  # noqa: ASYNC110
            await asyncio.sleep(0.02)


def assignment(subscriber: BrokerSubscriber) -> frozenset[tuple[str, int]]:
    result: frozenset[tuple[str, int]] = subscriber.assignment()  # type: ignore[attr-defined]
    return result


async def test_round_trip_keeps_key_headers_and_bytes(harness: Harness, name: Callable[[str], str]) -> None:
    pool = await harness.pool()
    topic = name("rt")
    value = bytes(range(256))  # not UTF-8, not JSON: the transport treats it as opaque
    await pool.publisher().send(msg(topic, b"exec-1", value, {"execution-id": "e1", "user": "zoë"}))
    async with pool.subscriber([topic], group_id=name("g")) as subscriber:
        [record] = await consume(subscriber, 1)
    assert record.topic == topic
    assert record.key == b"exec-1"
    assert record.value == value
    assert dict(record.headers) == {"execution-id": "e1", "user": "zoë"}
    assert record.invalid_headers == ()
    assert record.partition is not None and 0 <= record.partition < 4
    assert record.offset == 0


async def test_order_per_key_over_three_partitions(harness: Harness, name: Callable[[str], str]) -> None:
    pool = await harness.pool(partitions=3)
    topic = name("order")
    keys = [f"exec-{i}".encode() for i in range(10)]
    messages = [msg(topic, keys[i % 10], str(i).encode()) for i in range(500)]
    for start in range(0, 500, 100):
        await pool.publisher().send_batch(messages[start : start + 100])
    async with pool.subscriber([topic], group_id=name("g")) as subscriber:
        records = await consume(subscriber, 500)
    assert len(records) == 500
    by_key: dict[bytes | None, list[int]] = {}
    partitions: dict[bytes | None, set[int | None]] = {}
    for record in records:
        by_key.setdefault(record.key, []).append(int(record.value))
        partitions.setdefault(record.key, set()).add(record.partition)
    for key in keys:
        assert by_key[key] == sorted(by_key[key]) and len(by_key[key]) == 50
        assert len(partitions[key]) == 1  # one key, one partition
    assert {p for ps in partitions.values() for p in ps} <= {0, 1, 2}


async def test_group_members_split_records(harness: Harness, name: Callable[[str], str]) -> None:
    pool = await harness.pool(partitions=4)
    topic, group = name("split"), name("g")
    first = pool.subscriber([topic], group_id=group)
    second = pool.subscriber([topic], group_id=group)
    await first.start()
    await second.start()
    everything = {(topic, p) for p in range(4)}
    await wait_for(
        lambda: (
            bool(assignment(first))
            and bool(assignment(second))
            and not assignment(first) & assignment(second)
            and assignment(first) | assignment(second) == everything
        )
    )
    await pool.publisher().send_batch([msg(topic, f"k{i}".encode(), str(i).encode()) for i in range(200)])

    received: dict[str, list[BrokerMessage]] = {"first": [], "second": []}

    async def drain(label: str, subscriber: BrokerSubscriber) -> None:
        while sum(map(len, received.values())) < 200:
            received[label].extend(await subscriber.getmany(timeout=0.2))

    async with asyncio.timeout(20):
        await asyncio.gather(drain("first", first), drain("second", second))
    first_values = {r.value for r in received["first"]}
    second_values = {r.value for r in received["second"]}
    assert first_values and second_values
    assert not first_values & second_values
    assert len(first_values | second_values) == 200
    assert {(r.topic, r.partition) for r in received["first"]} <= assignment(first)


async def test_uncommitted_records_are_redelivered_to_the_group(
    harness: Harness, name: Callable[[str], str]
) -> None:
    pool = await harness.pool()
    topic, group = name("redeliver"), name("g")
    await pool.publisher().send_batch([msg(topic, f"k{i}".encode(), str(i).encode()) for i in range(20)])
    async with pool.subscriber([topic], group_id=group) as crashed:
        assert len(await consume(crashed, 20)) == 20
    # Stopped without commit: the next member of the group starts again from the beginning.
    async with pool.subscriber([topic], group_id=group) as successor:
        again = await consume(successor, 20)
    assert sorted(int(r.value) for r in again) == list(range(20))


async def test_partial_commit_redelivers_only_the_rest(harness: Harness, name: Callable[[str], str]) -> None:
    pool = await harness.pool(partitions=1)
    topic, group = name("partial"), name("g")
    await pool.publisher().send_batch([msg(topic, b"k", str(i).encode()) for i in range(10)])
    async with pool.subscriber([topic], group_id=group) as first:
        records = await consume(first, 10)
        await first.commit(records[:4])
    async with pool.subscriber([topic], group_id=group) as second:
        rest = await consume(second, 6)
    assert [int(r.value) for r in rest] == list(range(4, 10))


async def test_committed_records_are_not_redelivered(harness: Harness, name: Callable[[str], str]) -> None:
    pool = await harness.pool()
    topic, group = name("committed"), name("g")
    await pool.publisher().send_batch([msg(topic, f"k{i}".encode(), str(i).encode()) for i in range(20)])
    async with pool.subscriber([topic], group_id=group) as first:
        await first.commit(await consume(first, 20))
    async with pool.subscriber([topic], group_id=group) as second:
        assert await second.getmany(timeout=0.5) == []
        await pool.publisher().send(msg(topic, b"k-new", b"new"))
        [record] = await consume(second, 1)
    assert record.value == b"new"


async def test_getmany_returns_empty_after_timeout(harness: Harness, name: Callable[[str], str]) -> None:
    pool = await harness.pool()
    async with pool.subscriber([name("empty")], group_id=name("g")) as subscriber:
        loop = asyncio.get_running_loop()
        started = loop.time()
        assert await subscriber.getmany(timeout=0.3) == []
        elapsed = loop.time() - started
    assert 0.2 <= elapsed < 3


async def test_publish_after_stop_raises_closed(harness: Harness, name: Callable[[str], str]) -> None:
    pool = await harness.pool()
    topic = name("closed")
    subscriber = pool.subscriber([topic], group_id=name("g"))
    await subscriber.start()
    await pool.stop()
    await pool.stop()  # idempotent
    with pytest.raises(BrokerClosedError):
        await pool.publisher().send(msg(topic, b"k", b"v"))
    with pytest.raises(BrokerClosedError):
        await pool.publisher().send_batch([msg(topic, b"k", b"v")])
    # Stopping the pool stopped the subscribers it created.
    with pytest.raises(BrokerClosedError):
        await subscriber.getmany(timeout=0)


async def test_invalid_utf8_header_is_reported_not_raised(
    harness: Harness, name: Callable[[str], str]
) -> None:
    pool = await harness.pool()
    topic = name("headers")
    headers: list[tuple[str, bytes | None]] = [("good", b"ok"), ("bad", b"\xff\xfe"), ("also-good", b"x")]
    await harness.publish_raw(pool, topic, key=b"k", value=b"{}", headers=headers)
    async with pool.subscriber([topic], group_id=name("g")) as subscriber:
        [record] = await consume(subscriber, 1)
    assert dict(record.headers) == {"good": "ok", "also-good": "x"}
    assert record.invalid_headers == ("bad",)


async def test_ensure_topics_is_idempotent(harness: Harness, name: Callable[[str], str]) -> None:
    pool = await harness.pool()
    topics = [name("ensure-a"), name("ensure-b")]
    await pool.ensure_topics(topics)
    await pool.ensure_topics(topics)
    await pool.publisher().send(msg(topics[0], b"k", b"v"))


async def test_start_and_stop_are_idempotent(harness: Harness, name: Callable[[str], str]) -> None:
    pool = await harness.pool()
    await pool.start()
    async with pool.subscriber([name("idem")], group_id=name("g")) as subscriber:
        await subscriber.start()
        await subscriber.stop()
        await subscriber.stop()
    await pool.stop()
    await pool.stop()


async def test_stop_while_fetching_raises_closed(harness: Harness, name: Callable[[str], str]) -> None:
    pool = await harness.pool()
    subscriber = pool.subscriber([name("stop-fetch")], group_id=name("g"))
    await subscriber.start()
    fetch = asyncio.create_task(subscriber.getmany(timeout=10))
    await asyncio.sleep(0.1)
    loop = asyncio.get_running_loop()
    started = loop.time()
    await subscriber.stop()
    with pytest.raises(BrokerClosedError):
        await fetch
    assert loop.time() - started < 5


async def test_commit_skips_partitions_lost_to_a_rebalance(
    harness: Harness, name: Callable[[str], str]
) -> None:
    pool = await harness.pool(partitions=4)
    topic, group = name("revoked"), name("g")
    await pool.publisher().send_batch([msg(topic, f"k{i}".encode(), str(i).encode()) for i in range(40)])
    first = pool.subscriber([topic], group_id=group)
    await first.start()
    fetched = await consume(first, 40)
    second = pool.subscriber([topic], group_id=group)
    await second.start()
    await wait_for(lambda: len(assignment(first)) == 2 and len(assignment(second)) == 2)
    await first.commit(fetched)  # no error: the moved partitions are simply not committed
    moved = assignment(second)
    expected = {r.value for r in fetched if (r.topic, r.partition) in moved}
    redelivered = await consume(second, len(expected))
    assert {r.value for r in redelivered} == expected
