"""Which partition a keyed record goes to: Kafka's murmur2 partitioning, computed once per key.

Records of one saga carry its execution id as key, so they land on one partition and stay in order; every
producer of those keys (a participant on the Java client, another orchestrator) must pick the same
partition, so the hash is exactly the one of Kafka's default partitioner. aiokafka's pure-Python murmur2
reads the key a byte at a time and cost more CPU per send (~14 µs for a 36-byte key on the reference
machine) than the rest of building the record; here the key is read a word at a time, and the hash of
each key is kept (a saga sends several records under one key) in a bounded table.
"""

from __future__ import annotations

import random
import struct
from collections.abc import Sequence

__all__ = ["KeyHashPartitioner", "murmur2"]

_SEED = 0x9747B28C
_M = 0x5BD1E995
_MASK = 0xFFFFFFFF
_words = struct.Struct("<I")


def murmur2(data: bytes) -> int:
    """Kafka's murmur2 of ``data`` (``org.apache.kafka.common.utils.Utils.murmur2``), unsigned 32 bits.

    The same value as ``aiokafka.partitioner.murmur2``.
    """
    length = len(data)
    h = _SEED ^ length
    words = length >> 2
    if words:
        for (k,) in _words.iter_unpack(data[: words << 2]):
            k = (k * _M) & _MASK
            k ^= k >> 24
            h = ((h * _M) & _MASK) ^ ((k * _M) & _MASK)
    tail = length & 3
    if tail:
        base = length - tail
        if tail == 3:
            h ^= data[base + 2] << 16
        if tail >= 2:
            h ^= data[base + 1] << 8
        h = ((h ^ data[base]) * _M) & _MASK
    h ^= h >> 13
    h = (h * _M) & _MASK
    return h ^ (h >> 15)


class KeyHashPartitioner:
    """aiokafka partitioner: ``murmur2(key) & 0x7fffffff`` modulo the partition count, like Kafka's default.

    A keyless record goes to a random available partition (aiokafka's default). One instance per producer;
    it remembers up to ``size`` key hashes and starts afresh when full.
    """

    __slots__ = ("_hashes", "_size")

    def __init__(self, size: int = 65536) -> None:
        self._hashes: dict[bytes, int] = {}
        self._size = size

    def __call__(self, key: bytes | None, all_partitions: Sequence[int], available: Sequence[int]) -> int:
        if key is None:
            return random.choice(available or all_partitions)  # spreading load, not a secret
        hashes = self._hashes
        h = hashes.get(key)
        if h is None:
            if len(hashes) >= self._size:
                hashes.clear()
            h = hashes[key] = murmur2(key) & 0x7FFFFFFF
        return all_partitions[h % len(all_partitions)]
