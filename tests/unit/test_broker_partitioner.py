"""`broker.partitioner`: the same partitions as Kafka's default partitioner (Java client and aiokafka)."""

from __future__ import annotations

import os
import uuid

import pytest
from aiokafka.partitioner import DefaultPartitioner
from aiokafka.partitioner import murmur2 as aiokafka_murmur2

from broker.kafka_options import producer_options
from broker.partitioner import KeyHashPartitioner, murmur2
from broker.settings import KafkaSettings


def _signed(value: int) -> int:
    return value - (1 << 32) if value & 0x80000000 else value


@pytest.mark.parametrize(
    ("key", "java"),
    [  # org.apache.kafka.common.utils.UtilsTest#testMurmur2
        (b"21", -973932308),
        (b"foobar", -790332482),
        (b"a-little-bit-long-string", -985981536),
        (b"a-little-bit-longer-string", -1486304829),
        (b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8", -58897971),
        (b"abc", 479470107),
    ],
)
def test_murmur2_is_the_java_clients(key: bytes, java: int) -> None:
    assert _signed(murmur2(key)) == java


def test_murmur2_agrees_with_aiokafka_for_every_length() -> None:
    for length in range(70):
        for _ in range(50):
            data = os.urandom(length)
            assert murmur2(data) == aiokafka_murmur2(data), data


def test_partitions_are_the_default_partitioners() -> None:
    ours, default = KeyHashPartitioner(size=8), DefaultPartitioner()
    for n in range(500):
        key = str(uuid.uuid4()).encode() if n % 2 else os.urandom(n % 20 + 1)
        partitions = list(range(n % 9 + 1))
        assert ours(key, partitions, partitions) == default(key, partitions, partitions)
        assert ours(key, partitions, partitions) == default(key, partitions, partitions)  # remembered


def test_remembered_hashes_are_bounded() -> None:
    partitioner = KeyHashPartitioner(size=4)
    for n in range(10):
        partitioner(str(n).encode(), [0, 1, 2], [0, 1, 2])
        assert len(partitioner._hashes) <= 4


def test_a_keyless_record_goes_to_an_available_partition() -> None:
    partitioner = KeyHashPartitioner()
    assert {partitioner(None, [0, 1, 2, 3], [2]) for _ in range(20)} == {2}
    assert partitioner(None, [0, 1], []) in (0, 1)


def test_each_producer_gets_its_own_partitioner() -> None:
    settings = KafkaSettings()
    first, second = producer_options(settings)["partitioner"], producer_options(settings)["partitioner"]
    assert isinstance(first, KeyHashPartitioner) and first is not second
