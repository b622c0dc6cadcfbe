"""Behaviour specific to `InMemoryBrokerPool` (the shared semantics are in tests/contract)."""

from __future__ import annotations

import asyncio

import pytest

from broker import (
    BrokerClientPool,
    BrokerClosedError,
    BrokerConfigError,
    BrokerMessage,
    BrokerPublisher,
    BrokerSubscriber,
    InMemoryBrokerPool,
    KafkaBrokerPool,
)
from broker.memory import partition_for_key


def msg(topic: str, key: bytes | None, value: bytes = b"v") -> BrokerMessage:
    return BrokerMessage(topic=topic, key=key, value=value)


def test_adapters_satisfy_the_ports() -> None:
    for pool in (InMemoryBrokerPool(), KafkaBrokerPool()):
        assert isinstance(pool, BrokerClientPool)
        assert isinstance(pool.publisher(), BrokerPublisher)
        assert isinstance(pool.subscriber(["t"], group_id="g"), BrokerSubscriber)


def test_rejects_zero_partitions() -> None:
    with pytest.raises(BrokerConfigError, match="partitions"):
        InMemoryBrokerPool(partitions=0)


def test_key_hash_is_stable_across_processes() -> None:
    # CRC-32, not the per-process salted hash(): pin a value.
    assert partition_for_key(b"execution-1", 4) == partition_for_key(b"execution-1", 4)
    assert partition_for_key(b"abc", 1000) == 891568578 % 1000


async def test_topic_messages_and_partitioning() -> None:
    async with InMemoryBrokerPool(partitions=3) as pool:
        publisher = pool.publisher()
        await publisher.send_batch([msg("t", b"k", bytes([i])) for i in range(5)])
        await publisher.send_batch([msg("t", None, b"rr") for _ in range(3)])
        records = pool.topic_messages("t")
        keyed = [r for r in records if r.key == b"k"]
        assert [r.value for r in keyed] == [bytes([i]) for i in range(5)]
        assert {r.partition for r in keyed} == {partition_for_key(b"k", 3)}
        assert [r.offset for r in keyed] == list(range(5))
        # Records without a key go round-robin over the partitions.
        assert sorted(r.partition for r in records if r.key is None) == [0, 1, 2]
        assert pool.topic_messages("unknown") == []


async def test_getmany_wakes_up_on_publish_without_polling() -> None:
    async with InMemoryBrokerPool() as pool, pool.subscriber(["t"], group_id="g") as sub:
        waiter = asyncio.create_task(sub.getmany(timeout=10))
        await asyncio.sleep(0)
        loop = asyncio.get_running_loop()
        started = loop.time()
        await pool.publisher().send(msg("t", b"k"))
        batch = await waiter
        assert [m.key for m in batch] == [b"k"]
        assert loop.time() - started < 1


async def test_assignment_is_split_and_rebalanced() -> None:
    async with InMemoryBrokerPool(partitions=4) as pool:
        a = pool.subscriber(["t"], group_id="g")
        b = pool.subscriber(["t"], group_id="g")
        await a.start()
        assert a.assignment() == {("t", p) for p in range(4)}
        await b.start()
        assert a.assignment() == {("t", 0), ("t", 2)}
        assert b.assignment() == {("t", 1), ("t", 3)}
        await a.stop()
        assert b.assignment() == {("t", p) for p in range(4)}


async def test_member_keeps_position_of_partitions_it_keeps() -> None:
    async with InMemoryBrokerPool(partitions=1) as pool:
        await pool.publisher().send(msg("t", b"k"))
        a = pool.subscriber(["t"], group_id="g")
        await a.start()
        assert len(await a.getmany(timeout=0)) == 1
        other = pool.subscriber(["other"], group_id="g")
        await other.start()  # rebalance of the group that does not move t[0]
        assert await a.getmany(timeout=0) == []


async def test_commit_tracks_highest_offset_plus_one() -> None:
    async with InMemoryBrokerPool(partitions=1) as pool:
        await pool.publisher().send_batch([msg("t", b"k") for _ in range(3)])
        async with pool.subscriber(["t"], group_id="g") as sub:
            batch = await sub.getmany(timeout=0)
            await sub.commit(list(reversed(batch)))
        assert pool.committed("g", "t", 0) == 3
        assert pool.committed("other", "t", 0) is None


async def test_commit_of_unconsumed_message_is_rejected() -> None:
    async with InMemoryBrokerPool() as pool, pool.subscriber(["t"], group_id="g") as sub:
        with pytest.raises(BrokerConfigError, match="partition/offset"):
            await sub.commit([msg("t", b"k")])


async def test_getmany_in_flight_raises_closed_when_pool_stops() -> None:
    pool = InMemoryBrokerPool()
    await pool.start()
    sub = pool.subscriber(["t"], group_id="g")
    await sub.start()
    waiter = asyncio.create_task(sub.getmany(timeout=10))
    await asyncio.sleep(0)
    await pool.stop()
    with pytest.raises(BrokerClosedError):
        await waiter
    with pytest.raises(BrokerClosedError):
        pool.subscriber(["t"], group_id="g")
    with pytest.raises(BrokerClosedError):
        await pool.start()


async def test_unstarted_subscriber_cannot_fetch() -> None:
    pool = InMemoryBrokerPool()
    sub = pool.subscriber(["t"], group_id="g")
    with pytest.raises(BrokerClosedError, match="start"):
        await sub.getmany(timeout=0)


async def test_capped_fetches_rotate_over_partitions() -> None:
    async with InMemoryBrokerPool(partitions=2) as pool:
        keys = {}
        for i in range(100):  # find one key per partition
            keys.setdefault(partition_for_key(str(i).encode(), 2), str(i).encode())
        await pool.publisher().send_batch([msg("t", keys[p]) for p in (0, 1) for _ in range(10)])
        async with pool.subscriber(["t"], group_id="g") as sub:
            first = await sub.getmany(timeout=0, max_records=5)
            second = await sub.getmany(timeout=0, max_records=5)
        assert {m.partition for m in first} != {m.partition for m in second}


async def test_commit_sets_the_offset_like_kafka() -> None:
    async with InMemoryBrokerPool(partitions=1) as pool:
        await pool.publisher().send_batch([msg("t", b"k") for _ in range(5)])
        async with pool.subscriber(["t"], group_id="g") as sub:
            batch = await sub.getmany(timeout=0)
            await sub.commit(batch)
            await sub.commit(batch[:2])
        assert pool.committed("g", "t", 0) == 2


async def test_non_string_header_values_are_rejected() -> None:
    async with InMemoryBrokerPool() as pool:
        with pytest.raises(TypeError, match="header 'n'"):
            await pool.publisher().send(BrokerMessage(topic="t", key=None, value=b"", headers={"n": 1}))  # type: ignore[dict-item]
