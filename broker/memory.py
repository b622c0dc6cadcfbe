"""In-memory broker with Kafka's semantics, for tests and single-process runs.

`InMemoryBrokerPool` keeps per-partition ordered logs and consumer groups in the process, so the
orchestration layer can be tested without a broker while still meeting the behaviour it relies on in
production: keyed records stay in order on one partition, a group splits partitions between its live
members, offsets advance only through ``commit``, and records fetched but not committed by a subscriber that
stops are redelivered to the group.

Everything runs on one asyncio event loop; nothing here is thread-safe.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Self

from broker.errors import BrokerClosedError, BrokerConfigError, BrokerError
from broker.headers import decode_headers, encode_headers
from broker.message import BrokerMessage

__all__ = ["InMemoryBrokerPool", "InMemoryPublisher", "InMemorySubscriber"]

_log = logging.getLogger(__name__)

TopicPartition = tuple[str, int]


@dataclass(frozen=True, slots=True)
class _Record:
    key: bytes | None
    value: bytes
    headers: Mapping[str, str]
    invalid_headers: tuple[str, ...]


@dataclass(slots=True)
class _Group:
    """A consumer group: committed offsets and the live members in join order."""

    committed: dict[TopicPartition, int] = field(default_factory=dict)
    members: list[InMemorySubscriber] = field(default_factory=list)


def partition_for_key(key: bytes, partitions: int) -> int:
    """Stable partition of ``key``: CRC-32 modulo the partition count.

    Python's ``hash()`` is salted per process, so it would scatter one key over partitions across runs;
    CRC-32 is stable and cheap.
    """
    return zlib.crc32(key) % partitions


class InMemoryPublisher:
    """The pool's shared publisher; appending to a log is the acknowledgement."""

    __slots__ = ("_pool",)

    def __init__(self, pool: InMemoryBrokerPool) -> None:
        self._pool = pool

    async def send(self, message: BrokerMessage) -> None:
        """Append ``message`` to its topic's log."""
        await self.send_batch((message,))

    async def send_batch(self, messages: Sequence[BrokerMessage]) -> None:
        """Append every message, in order, or none when the pool is stopped or a message is malformed."""
        # Yield like a network round trip would, so a loop that only publishes cannot starve other tasks.
        await asyncio.sleep(0)
        self._pool._check_open()
        for message in messages:
            _check_message(message)
            self._pool._check_size(message)
        for message in messages:
            self._pool._append(message)

    async def send_each(self, messages: Sequence[BrokerMessage]) -> list[BrokerError | None]:
        """Append each message on its own: one outcome per message, ``None`` once appended.

        A malformed message, or one over the pool's ``max_message_size``, fails alone with
        ``BrokerError.rejection`` set, as Kafka's producer refuses it (see `KafkaPublisher.send_each`).
        """
        await asyncio.sleep(0)
        self._pool._check_open()
        outcomes: list[BrokerError | None] = []
        for message in messages:
            try:
                _check_message(message)
                self._pool._check_size(message)
            except BrokerError as exc:
                exc.rejection = exc.rejection or "invalid_topic"
                outcomes.append(exc)
                continue
            except (TypeError, ValueError) as exc:
                error = BrokerError(f"publish to {message.topic!r} failed: {exc}", retriable=False)
                error.rejection = "unencodable"
                outcomes.append(error)
                continue
            self._pool._append(message)
            outcomes.append(None)
        return outcomes


class InMemorySubscriber:
    """A member of a consumer group of an `InMemoryBrokerPool`.

    Created by `InMemoryBrokerPool.subscriber`; join the group with ``start()`` (or ``async with``).
    """

    _ids = itertools.count()

    def __init__(self, pool: InMemoryBrokerPool, topics: Sequence[str], group_id: str) -> None:
        if not topics:
            raise BrokerConfigError("subscriber needs at least one topic")
        if not group_id:
            raise BrokerConfigError("subscriber needs a non-empty group_id")
        self._pool = pool
        self.topics: tuple[str, ...] = tuple(dict.fromkeys(topics))
        self.group_id = group_id
        self.member_id = next(self._ids)
        # Fetch positions of the assigned partitions, in a stable order.
        self._positions: dict[TopicPartition, int] = {}
        self._next_partition = 0
        self._wakeup = asyncio.Event()
        self._started = False
        self._stopped = False

    # -- lifecycle ----------------------------------------------------------------------------------

    async def start(self) -> None:
        """Join the group; partitions are assigned before this returns. Idempotent."""
        if self._stopped:
            raise BrokerClosedError("subscriber was stopped; create a new one")
        if self._started:
            return
        self._pool._check_open()
        self._started = True
        self._pool._join(self)

    async def stop(self) -> None:
        """Leave the group without committing; its partitions go to the remaining members. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        if self._started:
            self._pool._leave(self)
        self._pool._forget(self)
        self._positions.clear()
        self._wakeup.set()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    # -- consuming ----------------------------------------------------------------------------------

    def assignment(self) -> frozenset[TopicPartition]:
        """The ``(topic, partition)`` pairs currently assigned to this member."""
        return frozenset(self._positions)

    async def getmany(self, *, timeout: float = 1.0, max_records: int = 500) -> list[BrokerMessage]:  # noqa: ASYNC109
        """Return up to ``max_records`` records, waiting up to ``timeout`` seconds for the first one.

        Raises:
            BrokerClosedError: The subscriber was not started, or was stopped.
        """
        if max_records < 1:
            raise BrokerConfigError(f"max_records must be >= 1, got {max_records}")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(timeout, 0.0)
        await asyncio.sleep(0)  # always yield, as a fetch from Kafka does: no starvation in tight loops
        while True:
            self._check_active()
            self._wakeup.clear()
            batch = self._fetch(max_records)
            if batch:
                return batch
            remaining = deadline - loop.time()
            if remaining <= 0:
                return []
            try:
                async with asyncio.timeout(remaining):
                    await self._wakeup.wait()
            except TimeoutError:
                return []

    async def commit(self, messages: Sequence[BrokerMessage]) -> None:
        """Commit, per partition, the offset after the highest of ``messages``.

        Like Kafka, this sets the committed offset, even below an earlier commit of the same partition.

        Partitions no longer assigned to this member (a rebalance moved them) are skipped with a warning,
        as Kafka rejects such commits: their records are redelivered to the new owner, which is the
        at-least-once contract anyway.
        """
        self._check_active()
        group = self._pool._groups[self.group_id]
        for tp, offset in _next_offsets(messages).items():
            if tp not in self._positions:
                _log.warning("not committing %s[%d]: partition no longer assigned to this member", *tp)
                continue
            group.committed[tp] = offset

    # -- internals used by the pool -----------------------------------------------------------------

    def _check_active(self) -> None:
        if self._stopped:
            raise BrokerClosedError("subscriber is stopped")
        if not self._started:
            raise BrokerClosedError("subscriber is not started; call start() first")

    def _fetch(self, max_records: int) -> list[BrokerMessage]:
        """Take up to ``max_records`` records, starting each call at the next partition.

        Rotating the starting partition keeps one busy partition from starving the others when batches
        are capped, as Kafka's fetcher does.
        """
        batch: list[BrokerMessage] = []
        partitions = list(self._positions)
        if not partitions:
            return batch
        start = self._next_partition % len(partitions)
        self._next_partition = start + 1
        for tp in partitions[start:] + partitions[:start]:
            position = self._positions[tp]
            log = self._pool._log(tp)
            end = min(len(log), position + max_records - len(batch))
            topic, partition = tp
            batch.extend(
                BrokerMessage(
                    topic=topic,
                    key=record.key,
                    value=record.value,
                    headers=dict(record.headers),
                    partition=partition,
                    offset=offset,
                    invalid_headers=record.invalid_headers,
                )
                for offset, record in enumerate(log[position:end], start=position)
            )
            self._positions[tp] = max(position, end)
            if len(batch) >= max_records:
                break
        return batch

    def _assign(self, partitions: Sequence[TopicPartition], committed: Mapping[TopicPartition, int]) -> None:
        """Take a new assignment: kept partitions keep their position, new ones start at the commit."""
        old = self._positions
        self._positions = {tp: old[tp] if tp in old else committed.get(tp, 0) for tp in partitions}
        self._wakeup.set()

    def _notify(self) -> None:
        self._wakeup.set()


def _check_message(message: BrokerMessage) -> None:
    """Reject what Kafka's producer would reject, so tests on memory catch it too."""
    if not isinstance(message.value, bytes | bytearray | memoryview):
        raise TypeError(f"BrokerMessage.value must be bytes, got {type(message.value).__name__}")
    if message.key is not None and not isinstance(message.key, bytes | bytearray | memoryview):
        raise TypeError(f"BrokerMessage.key must be bytes or None, got {type(message.key).__name__}")
    if not message.topic:
        raise BrokerConfigError("BrokerMessage.topic must not be empty")
    encode_headers(message.headers)


def _next_offsets(messages: Sequence[BrokerMessage]) -> dict[TopicPartition, int]:
    """Offset to commit per partition: one after the highest offset seen."""
    offsets: dict[TopicPartition, int] = {}
    for message in messages:
        if message.partition is None or message.offset is None:
            raise BrokerConfigError(
                f"cannot commit a record without partition/offset (topic {message.topic!r}); "
                "commit records returned by getmany()"
            )
        tp = (message.topic, message.partition)
        offsets[tp] = max(offsets.get(tp, 0), message.offset + 1)
    return offsets


class InMemoryBrokerPool:
    """A broker in the process, with Kafka's ordering, consumer-group and offset semantics.

    Topics are created on first use with ``partitions`` partitions. A record's partition is a stable hash
    of its key, or round-robin for records without a key. The partitions of a topic are split between the
    started subscribers of a group (partition ``p`` goes to the ``p mod n``-th member in join order) and
    reassigned whenever a member starts or stops.

    Args:
        partitions: Partitions of every topic this pool creates.
        max_message_size: Refuse messages larger than this many bytes (`message_size`), as Kafka's
            producer refuses those over its ``max_request_size``; ``None``: no limit.
    """

    def __init__(self, *, partitions: int = 4, max_message_size: int | None = None) -> None:
        if partitions < 1:
            raise BrokerConfigError(f"partitions must be >= 1, got {partitions}")
        self.partitions = partitions
        self.max_message_size = max_message_size
        self._topics: dict[str, list[list[_Record]]] = {}
        self._round_robin: dict[str, int] = {}
        self._groups: dict[str, _Group] = {}
        self._subscribers: list[InMemorySubscriber] = []
        self._publisher = InMemoryPublisher(self)
        self._started = False
        self._stopped = False

    # -- lifecycle ----------------------------------------------------------------------------------

    async def start(self) -> None:
        """Open the pool; idempotent. A stopped pool cannot be restarted."""
        if self._stopped:
            raise BrokerClosedError("broker pool was stopped; create a new one")
        self._started = True

    async def stop(self) -> None:
        """Stop every subscriber created from this pool and refuse further publishing; idempotent."""
        if self._stopped:
            return
        self._stopped = True
        for subscriber in list(self._subscribers):
            await subscriber.stop()
        self._subscribers.clear()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    # -- port ---------------------------------------------------------------------------------------

    def publisher(self) -> InMemoryPublisher:
        """The shared publisher.

        Unlike Kafka, no connection is needed, so it works before ``start()``; it raises
        `BrokerClosedError` after ``stop()``.
        """
        return self._publisher

    def subscriber(self, topics: Sequence[str], *, group_id: str) -> InMemorySubscriber:
        """A new, not yet started, subscriber of ``topics`` in consumer group ``group_id``."""
        self._check_open()
        subscriber = InMemorySubscriber(self, topics, group_id)
        self._subscribers.append(subscriber)
        return subscriber

    async def ensure_topics(self, topics: Sequence[str]) -> None:
        """Create the topics that do not exist yet."""
        self._check_open()
        for topic in topics:
            self._topic(topic)

    # -- test helpers -------------------------------------------------------------------------------

    def topic_messages(self, topic: str) -> list[BrokerMessage]:
        """Every record published to ``topic``, partition by partition, in offset order.

        Meant for assertions in tests; it neither needs nor affects any consumer group.
        """
        result: list[BrokerMessage] = []
        for partition, log in enumerate(self._topics.get(topic, ())):
            result.extend(
                BrokerMessage(
                    topic=topic,
                    key=record.key,
                    value=record.value,
                    headers=dict(record.headers),
                    partition=partition,
                    offset=offset,
                    invalid_headers=record.invalid_headers,
                )
                for offset, record in enumerate(log)
            )
        return result

    async def publish_raw(
        self,
        topic: str,
        *,
        key: bytes | None,
        value: bytes,
        headers: Sequence[tuple[str, bytes | None]] = (),
    ) -> None:
        """Publish a record with wire-level header bytes, as a foreign producer could.

        Header values are decoded like the Kafka adapter decodes them, so tests can feed malformed input
        (invalid UTF-8, null values) and see it surface in ``invalid_headers``.
        """
        decoded, invalid = decode_headers(headers)
        self._check_open()
        self._append(
            BrokerMessage(topic=topic, key=key, value=value, headers=decoded, invalid_headers=invalid)
        )

    def committed(self, group_id: str, topic: str, partition: int) -> int | None:
        """The committed offset of a group on a partition, or ``None`` when nothing was committed."""
        group = self._groups.get(group_id)
        return None if group is None else group.committed.get((topic, partition))

    # -- internals ----------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._stopped:
            raise BrokerClosedError("broker pool is stopped")

    def _topic(self, topic: str) -> list[list[_Record]]:
        logs = self._topics.get(topic)
        if logs is None:
            if not topic:
                raise BrokerConfigError("topic name must not be empty")
            logs = self._topics[topic] = [[] for _ in range(self.partitions)]
            self._round_robin[topic] = 0
            # A new topic may be one some group already subscribes to: hand out its partitions.
            for group in self._groups.values():
                if any(topic in member.topics for member in group.members):
                    self._rebalance(group)
        return logs

    def _log(self, tp: TopicPartition) -> list[_Record]:
        return self._topics[tp[0]][tp[1]]

    def message_size(self, message: BrokerMessage) -> int:
        """The bytes a message counts against ``max_message_size``: key, value, header names and values."""
        headers = sum(len(k.encode()) + len(v.encode()) for k, v in message.headers.items())
        return len(message.value) + len(message.key or b"") + headers

    def _check_size(self, message: BrokerMessage) -> None:
        limit = self.max_message_size
        if limit is None:
            return
        size = self.message_size(message)
        if size > limit:
            error = BrokerError(
                f"publish to {message.topic!r} failed: the record is {size} bytes, over the limit of {limit}",
                retriable=False,
            )
            error.rejection, error.size, error.limit = "record_too_large", size, limit
            raise error

    def _append(self, message: BrokerMessage) -> None:
        self._check_open()
        logs = self._topic(message.topic)
        if message.key is None:
            partition = self._round_robin[message.topic] % len(logs)
            self._round_robin[message.topic] = partition + 1
        else:
            partition = partition_for_key(bytes(message.key), len(logs))
        logs[partition].append(
            _Record(
                key=None if message.key is None else bytes(message.key),
                value=bytes(message.value),
                headers=dict(message.headers),
                invalid_headers=tuple(message.invalid_headers),
            )
        )
        tp = (message.topic, partition)
        for group in self._groups.values():
            for member in group.members:
                if tp in member._positions:
                    member._notify()

    def _forget(self, subscriber: InMemorySubscriber) -> None:
        if subscriber in self._subscribers:
            self._subscribers.remove(subscriber)

    def _join(self, subscriber: InMemorySubscriber) -> None:
        for topic in subscriber.topics:
            self._topic(topic)
        group = self._groups.setdefault(subscriber.group_id, _Group())
        group.members.append(subscriber)
        self._rebalance(group)

    def _leave(self, subscriber: InMemorySubscriber) -> None:
        group = self._groups[subscriber.group_id]
        if subscriber in group.members:
            group.members.remove(subscriber)
            self._rebalance(group)

    def _rebalance(self, group: _Group) -> None:
        """Split every subscribed topic's partitions between the members subscribed to it.

        Members that keep a partition keep their fetch position; a partition that changes hands starts at
        the group's committed offset, so whatever the previous owner fetched without committing is
        delivered again.
        """
        assignments: dict[int, list[TopicPartition]] = {id(member): [] for member in group.members}
        topics = sorted({topic for member in group.members for topic in member.topics})
        for topic in topics:
            members = [member for member in group.members if topic in member.topics]
            for partition in range(len(self._topics[topic])):
                owner = members[partition % len(members)]
                assignments[id(owner)].append((topic, partition))
        for member in group.members:
            member._assign(assignments[id(member)], group.committed)
