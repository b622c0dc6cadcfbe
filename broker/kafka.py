"""Kafka adapter of the transport ports, on aiokafka.

One `KafkaBrokerPool` per process owns an idempotent producer (``acks=all``), an admin client that creates
topics with the configured partitions, and the consumers it hands out as `KafkaSubscriber`. Every aiokafka
exception is translated into `broker.errors` at this boundary (see `broker.kafka_errors`).

Delivery is at least once: a subscriber commits explicitly, and eager rebalancing in aiokafka rewinds every
partition of a member to the group's committed offset, so records fetched but not committed may be
delivered again, to another member or to the same one. Consumers of this pool must be idempotent.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Sequence
from types import TracebackType
from typing import Any, Self

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka import errors as kafka_errors
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.record.default_records import DefaultRecordBatchBuilder

from broker.errors import BrokerClosedError, BrokerConfigError, BrokerConnectionError, BrokerError
from broker.headers import decode_headers, encode_headers
from broker.kafka_errors import record_error, translate_error
from broker.kafka_options import client_options, consumer_options, producer_options
from broker.message import BrokerMessage
from broker.settings import KafkaSettings

__all__ = ["KafkaBrokerPool", "KafkaPublisher", "KafkaSubscriber"]

_log = logging.getLogger(__name__)

_MAX_CONNECT_BACKOFF = 2.0


class _BootstrapRetryFilter(logging.Filter):
    """Drops aiokafka's ``Unable connect to "host:port"`` error while `KafkaBrokerPool` retries a
    connect: aiokafka logs one per attempt (a few a second for ``connect_timeout``), and the pool says
    once that it retries and, at the end, whether it gave up. Outside those loops every record passes."""

    def __init__(self) -> None:
        super().__init__()
        self.retrying = 0

    def filter(self, record: logging.LogRecord) -> bool:
        return not (
            self.retrying and isinstance(record.msg, str) and record.msg.startswith('Unable connect to "')
        )


_bootstrap_filter = _BootstrapRetryFilter()
logging.getLogger("aiokafka").addFilter(_bootstrap_filter)


#: Producer-state errors that no retry of the same producer can clear.
_PRODUCER_STATE_ERRORS: tuple[type[BaseException], ...] = (
    kafka_errors.OutOfOrderSequenceNumber,
    kafka_errors.UnknownProducerId,
    kafka_errors.InvalidProducerEpoch,
    kafka_errors.InvalidProducerIdMapping,
)


class KafkaPublisher:
    """The pool's shared publisher: every ``send`` returns once the broker acknowledged (``acks=all``)."""

    __slots__ = ("_pool",)

    def __init__(self, pool: KafkaBrokerPool) -> None:
        self._pool = pool

    async def send(self, message: BrokerMessage) -> None:
        """Publish one record and wait for its acknowledgement.

        Raises:
            BrokerClosedError: The pool is stopped.
            BrokerConnectionError: The broker did not acknowledge within ``request_timeout_ms`` (retriable;
                with the idempotent producer a retry does not duplicate the record on the broker).
            BrokerError: Any other failure, e.g. a record larger than the broker accepts.
        """
        await self.send_batch((message,))

    async def send_batch(self, messages: Sequence[BrokerMessage]) -> None:
        """Publish several records, then wait for all acknowledgements.

        The records are queued first and awaited together so they travel in a few pipelined batches
        instead of one round trip each; records with the same key keep their order. When some fail, the
        others are still awaited and the first failure is raised, so a caller marking outbox rows as sent
        must treat the whole batch as unsent (re-publishing is safe: consumers deduplicate).
        """
        if not messages:
            return
        producer = self._pool._producer_or_raise()
        headers = [encode_headers(message.headers) for message in messages]  # type errors before any send
        unknown = self._pool._unknown_topics(messages)
        if unknown:
            await self._pool._ensure_known(unknown)
        futures: list[asyncio.Future[Any]] = []
        failure: BaseException | None = None
        for message, encoded in zip(messages, headers, strict=True):
            try:
                futures.append(
                    await producer.send(message.topic, value=message.value, key=message.key, headers=encoded)
                )
            except Exception as exc:
                failure = exc
                break
        # Awaited one after the other rather than gathered: they are all queued already, and a gather only
        # added a future, callbacks and a loop iteration between the acknowledgement and the caller.
        for future in futures:
            error = await _outcome(future)
            if failure is None:
                failure = error
        if failure is not None:
            topics = sorted({message.topic for message in messages})
            action = f"publish to {', '.join(topics)}"
            if isinstance(failure, _PRODUCER_STATE_ERRORS):
                # The idempotent producer's sequence or id no longer matches the broker's (a lost batch,
                # a broker restart): aiokafka would fail every later send. A new producer (new id,
                # sequences from zero) is the only way out; the caller's retry then succeeds.
                await self._pool._replace_producer(producer)
                raise BrokerConnectionError(
                    f"{action} failed: {type(failure).__name__}; the producer was replaced, retry the send",
                    retriable=True,
                ) from failure
            raise self._pool._translate(failure, action) from failure

    async def send_each(self, messages: Sequence[BrokerMessage]) -> list[BrokerError | None]:
        """Publish several records and report each one's outcome: ``None`` once acknowledged, else its error.

        Unlike `send_batch`, one record's failure does not concern the others: a record the broker refuses
        for good (too large, invalid or unauthorised topic, unencodable: ``BrokerError.rejection`` says
        which) fails alone, and the records after it are still sent. Transient failures (broker down,
        leader moving) come back as retriable errors for the caller to retry those records only.

        Raises:
            BrokerClosedError: The pool is stopped (nothing was sent).
        """
        if not messages:
            return []
        pool = self._pool
        producer = pool._producer_or_raise()
        outcomes: list[BrokerError | None] = [None] * len(messages)
        refused_topics: dict[str, BaseException] = {}
        for topic in pool._unknown_topics(messages):
            try:
                await pool._ensure_known([topic])
            except BrokerError as exc:  # this topic's records fail, the others go on
                refused_topics[topic] = exc.__cause__ or exc
        limit = pool.settings.max_request_size
        futures: list[tuple[int, asyncio.Future[Any]]] = []
        for index, message in enumerate(messages):
            action = f"publish to {message.topic!r}"
            refused = refused_topics.get(message.topic)
            if refused is not None:
                outcomes[index] = record_error(refused, action)
                continue
            try:
                headers = encode_headers(message.headers)
                futures.append(
                    (
                        index,
                        await producer.send(
                            message.topic, value=message.value, key=message.key, headers=headers
                        ),
                    )
                )
            except Exception as exc:
                outcomes[index] = self._record_error(exc, action, message, limit)
        replace = False
        for index, future in futures:
            error = await _outcome(future)
            if error is None:
                continue
            message = messages[index]
            action = f"publish to {message.topic!r}"
            if isinstance(error, _PRODUCER_STATE_ERRORS):
                replace = True
                outcomes[index] = BrokerConnectionError(
                    f"{action} failed: {type(error).__name__}; the producer was replaced, retry the send",
                    retriable=True,
                )
            else:
                outcomes[index] = self._record_error(error, action, message, None)
        if replace:
            await pool._replace_producer(producer)
        return outcomes

    def _record_error(
        self, exc: BaseException, action: str, message: BrokerMessage, limit: int | None
    ) -> BrokerError:
        error = pool_error = self._pool._translate(exc, action)
        if not isinstance(pool_error, BrokerClosedError):
            error = record_error(exc, action)
        if error.rejection == "record_too_large":
            error.size = message_size(message)
            error.limit = limit
        return error


class KafkaSubscriber:
    """A consumer-group member over `AIOKafkaConsumer`, with explicit commits only.

    Created by `KafkaBrokerPool.subscriber`; ``start()`` joins the group and returns once partitions are
    assigned.
    """

    def __init__(self, pool: KafkaBrokerPool, topics: Sequence[str], group_id: str) -> None:
        if not topics or not all(topics):
            raise BrokerConfigError("subscriber needs at least one non-empty topic name")
        if not group_id:
            raise BrokerConfigError("subscriber needs a non-empty group_id")
        self._pool = pool
        self.topics: tuple[str, ...] = tuple(dict.fromkeys(topics))
        self.group_id = group_id
        self._consumer: AIOKafkaConsumer | None = None
        self._stopped = False
        self._lock = asyncio.Lock()

    async def start(self) -> None:
        """Join the group; returns once this member has its partitions. Idempotent.

        Raises:
            BrokerConnectionError: The broker or the group coordinator did not answer within
                ``connect_timeout``.
            BrokerClosedError: The subscriber or its pool was stopped, or the pool is not started.
        """
        async with self._lock:
            if self._stopped:
                raise BrokerClosedError(f"subscriber of {list(self.topics)} was stopped; create a new one")
            if self._consumer is not None:
                return
            self._pool._producer_or_raise()
            await self._pool._ensure_known(self.topics)
            consumer = AIOKafkaConsumer(*self.topics, **consumer_options(self._pool.settings, self.group_id))
            timeout = self._pool.settings.connect_timeout
            try:
                async with asyncio.timeout(timeout):
                    await consumer.start()
            except BaseException as exc:
                await _quietly(consumer.stop())
                if isinstance(exc, TimeoutError):
                    raise BrokerConnectionError(
                        f"joining group {self.group_id!r} on {self._pool.settings.bootstrap_servers} "
                        f"did not complete within {timeout:g}s (connect_timeout)",
                    ) from exc
                if isinstance(exc, Exception):
                    raise self._pool._translate(exc, f"join group {self.group_id!r}") from exc
                raise
            if self._stopped:  # stop() ran while this call was joining
                await _quietly(consumer.stop())
                raise BrokerClosedError("subscriber was stopped while joining its group")
            self._consumer = consumer

    async def stop(self) -> None:
        """Leave the group without committing; the group rebalances its partitions. Idempotent.

        Does not wait for a ``start()`` in progress: that call notices, leaves the group and raises
        `BrokerClosedError`.
        """
        if self._stopped:
            return
        self._stopped = True
        self._pool._forget(self)
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            await _quietly(consumer.stop())

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

    def assignment(self) -> frozenset[tuple[str, int]]:
        """The ``(topic, partition)`` pairs currently assigned to this member (empty while rebalancing)."""
        if self._consumer is None:
            return frozenset()
        return frozenset((tp.topic, tp.partition) for tp in self._consumer.assignment())

    async def lag(self) -> dict[tuple[str, int], int]:
        """Records not yet fetched, per assigned ``(topic, partition)``: its high watermark minus the
        position (partitions whose watermark is not known yet are left out)."""
        consumer = self._consumer
        if consumer is None:
            return {}
        behind: dict[tuple[str, int], int] = {}
        for tp in consumer.assignment():
            high = consumer.highwater(tp)
            if high is None:
                continue
            behind[(tp.topic, tp.partition)] = max(0, high - await consumer.position(tp))
        return behind

    async def getmany(self, *, timeout: float = 1.0, max_records: int = 500) -> list[BrokerMessage]:  # noqa: ASYNC109
        """Return up to ``max_records`` records, waiting up to ``timeout`` seconds for some.

        Records come grouped by partition, in offset order within each.

        Raises:
            BrokerClosedError: The subscriber is not started or was stopped (also when ``stop()`` runs while
                this call waits).
            BrokerError: Group coordination failed (translated; retriable when a retry may help).
        """
        if max_records < 1:
            raise BrokerConfigError(f"max_records must be >= 1, got {max_records}")
        consumer = self._consumer_or_raise()
        try:
            batches = await consumer.getmany(timeout_ms=max(0, int(timeout * 1000)), max_records=max_records)
        except Exception as exc:
            if self._stopped:
                raise BrokerClosedError("subscriber was stopped while fetching") from exc
            raise self._pool._translate(exc, f"fetch from {list(self.topics)}") from exc
        if self._stopped:
            # aiokafka returns whatever it had when stopped mid-fetch; this member no longer owns those
            # records (they are redelivered to the group), so handing them out would invite a double.
            raise BrokerClosedError("subscriber was stopped while fetching")
        messages: list[BrokerMessage] = []
        for records in batches.values():
            for record in records:
                headers, invalid = decode_headers(record.headers)
                messages.append(
                    BrokerMessage(
                        topic=record.topic,
                        key=record.key,
                        value=b"" if record.value is None else record.value,
                        headers=headers,
                        partition=record.partition,
                        offset=record.offset,
                        invalid_headers=invalid,
                    )
                )
        return messages

    async def commit(self, messages: Sequence[BrokerMessage]) -> None:
        """Commit, per partition, the offset after the highest of ``messages``.

        This sets the group's committed offset, even below an earlier commit of the same partition, so
        commit batches in the order they were fetched.

        Partitions a rebalance has taken from this member are not committed (a warning is logged): Kafka
        refuses such commits and the new owner re-reads those records, which consumers deduplicate anyway.

        Raises:
            BrokerClosedError: The subscriber is not started or was stopped.
            BrokerConfigError: A message lacks partition/offset (it was not returned by ``getmany``).
            BrokerError: The commit failed on the broker (translated).
        """
        consumer = self._consumer_or_raise()
        offsets: dict[TopicPartition, int] = {}
        for message in messages:
            if message.partition is None or message.offset is None:
                raise BrokerConfigError(
                    f"cannot commit a record without partition/offset (topic {message.topic!r}); "
                    "commit records returned by getmany()"
                )
            tp = TopicPartition(message.topic, message.partition)
            offsets[tp] = max(offsets.get(tp, 0), message.offset + 1)
        assigned = consumer.assignment()
        revoked = sorted(f"{tp.topic}[{tp.partition}]" for tp in offsets if tp not in assigned)
        if revoked:
            _log.warning("not committing %s: no longer assigned to this member", ", ".join(revoked))
        offsets = {tp: offset for tp, offset in offsets.items() if tp in assigned}
        if not offsets:
            return
        try:
            await consumer.commit(offsets)
        except (kafka_errors.CommitFailedError, kafka_errors.IllegalStateError) as exc:
            if self._stopped:
                raise BrokerClosedError("subscriber was stopped while committing") from exc
            _log.warning("commit of group %r skipped, the group rebalanced: %s", self.group_id, exc)
        except Exception as exc:
            raise self._pool._translate(exc, f"commit for group {self.group_id!r}") from exc

    def _consumer_or_raise(self) -> AIOKafkaConsumer:
        if self._stopped:
            raise BrokerClosedError("subscriber is stopped")
        if self._consumer is None:
            raise BrokerClosedError("subscriber is not started; call start() first")
        return self._consumer


class KafkaBrokerPool:
    """A process's Kafka clients: one idempotent producer, an admin client, and the subscribers.

    Args:
        settings: Connection and client settings; defaults to `KafkaSettings()`.
        **overrides: Fields of `KafkaSettings` replacing those of ``settings``
            (e.g. ``KafkaBrokerPool(bootstrap_servers="kafka:9092")``).

    Raises:
        BrokerConfigError: An override is not a setting, or a value is invalid.
    """

    def __init__(self, settings: KafkaSettings | None = None, **overrides: Any) -> None:
        base = settings if settings is not None else KafkaSettings()
        self.settings: KafkaSettings = base.with_overrides(**overrides) if overrides else base
        self._producer: AIOKafkaProducer | None = None
        self._admin: AIOKafkaAdminClient | None = None
        self._publisher = KafkaPublisher(self)
        self._subscribers: set[KafkaSubscriber] = set()
        self._known_topics: set[str] = set()
        self._topics_lock = asyncio.Lock()
        self._lifecycle_lock = asyncio.Lock()
        self._stopped = False

    def __repr__(self) -> str:
        return f"KafkaBrokerPool({self.settings.bootstrap_servers!r})"

    @property
    def max_message_size(self) -> int:
        """The largest record the producer sends (``max_request_size``), as `message_size` counts it."""
        return self.settings.max_request_size

    def message_size(self, message: BrokerMessage) -> int:
        """The size of ``message`` as the producer checks it against `max_message_size`.

        Raises:
            TypeError: A header is not a string.
        """
        return message_size(message)

    # -- lifecycle ----------------------------------------------------------------------------------

    async def start(self) -> None:
        """Connect the producer and the admin client; idempotent.

        Retries with backoff while the broker is unreachable, for at most ``connect_timeout`` seconds, so a
        process started alongside Kafka waits for it but a wrong address fails clearly.

        Raises:
            BrokerConnectionError: No broker answered within ``connect_timeout``; names the address.
            BrokerConfigError: The settings cannot work (SSL files, compression library, credentials).
            BrokerClosedError: The pool was stopped; pools are not restartable.
        """
        async with self._lifecycle_lock:
            if self._stopped:
                raise BrokerClosedError("KafkaBrokerPool was stopped; create a new one")
            if self._producer is not None:
                return
            loop = asyncio.get_running_loop()
            deadline = loop.time() + self.settings.connect_timeout
            common = client_options(self.settings)
            producer = await self._connect_producer(deadline)
            try:
                self._admin = await self._connect(
                    lambda: AIOKafkaAdminClient(**common), deadline, "admin client"
                )
            except BaseException:
                await _quietly(producer.stop())
                raise
            self._producer = producer

    async def stop(self) -> None:
        """Stop every subscriber created here, flush and close the producer; idempotent."""
        async with self._lifecycle_lock:
            if self._stopped:
                return
            self._stopped = True
            for subscriber in list(self._subscribers):
                await subscriber.stop()
            producer, self._producer = self._producer, None
            admin, self._admin = self._admin, None
            if producer is not None:
                await _quietly(producer.stop())
            if admin is not None:
                await _quietly(admin.close())

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

    def publisher(self) -> KafkaPublisher:
        """The shared publisher; usable once the pool is started."""
        return self._publisher

    def subscriber(self, topics: Sequence[str], *, group_id: str) -> KafkaSubscriber:
        """A new, not yet started, subscriber of ``topics`` in consumer group ``group_id``."""
        if self._stopped:
            raise BrokerClosedError("KafkaBrokerPool is stopped")
        subscriber = KafkaSubscriber(self, topics, group_id)
        self._subscribers.add(subscriber)
        return subscriber

    async def ensure_topics(self, topics: Sequence[str]) -> None:
        """Create the topics that do not exist yet, with the configured partitions and replication.

        Existing topics are left as they are (their partition count is not changed).
        """
        self._producer_or_raise()
        admin = self._admin
        assert admin is not None
        wanted = list(dict.fromkeys(topics))
        if not wanted:
            return
        new_topics = [
            NewTopic(name, self.settings.topic_partitions, self.settings.topic_replication_factor)
            for name in wanted
        ]
        action = f"create topics {', '.join(wanted)}"
        try:
            response = await admin.create_topics(new_topics)
        except Exception as exc:
            raise self._translate(exc, action) from exc
        for topic, code, *rest in response.topic_errors:
            if code in (0, kafka_errors.TopicAlreadyExistsError.errno):
                continue
            error_type = kafka_errors.for_code(code)
            detail = rest[0] if rest and rest[0] else ""
            cause = error_type(detail) if detail else error_type()
            raise self._translate(cause, f"create topic {topic!r}") from cause
        self._known_topics.update(wanted)

    # -- internals ----------------------------------------------------------------------------------

    def _producer_or_raise(self) -> AIOKafkaProducer:
        if self._stopped:
            raise BrokerClosedError("KafkaBrokerPool is stopped")
        if self._producer is None:
            raise BrokerClosedError("KafkaBrokerPool is not started; call start() first")
        return self._producer

    async def _replace_producer(self, broken: Any) -> None:
        """Swap in a fresh producer for ``broken`` (once, however many senders saw it fail)."""
        stop_broken = broken.stop
        async with self._lifecycle_lock:
            if self._stopped or self._producer is not broken:
                return  # stopped, or another sender already replaced it
            deadline = asyncio.get_running_loop().time() + self.settings.connect_timeout
            self._producer = await self._connect_producer(deadline)
            _log.warning("replaced the Kafka producer after a producer-state error")
        await _quietly(stop_broken())

    async def _connect_producer(self, deadline: float) -> Any:
        """A started idempotent producer with the pool's settings (`start` and producer replacement)."""
        options = {**client_options(self.settings), **producer_options(self.settings)}
        return await self._connect(lambda: AIOKafkaProducer(**options), deadline, "producer")

    def _forget(self, subscriber: KafkaSubscriber) -> None:
        self._subscribers.discard(subscriber)

    def _translate(self, exc: BaseException, action: str) -> BrokerError:
        if self._stopped and not isinstance(exc, BrokerError):
            return BrokerClosedError(f"{action} failed: KafkaBrokerPool was stopped")
        return translate_error(exc, action)

    def _unknown_topics(self, messages: Sequence[BrokerMessage]) -> list[str]:
        """Topics of ``messages`` `_ensure_known` would create (none once each was seen: no await then)."""
        if not self.settings.auto_create_topics:
            return []
        known = self._known_topics
        return [topic for topic in {message.topic for message in messages} if topic not in known]

    async def _ensure_known(self, topics: Iterable[str]) -> None:
        """Create, once per process, topics not seen yet, when ``auto_create_topics`` is on."""
        if not self.settings.auto_create_topics:
            return
        unknown = [topic for topic in topics if topic not in self._known_topics]
        if not unknown:
            return
        async with self._topics_lock:
            unknown = [topic for topic in unknown if topic not in self._known_topics]
            if unknown:
                await self.ensure_topics(unknown)

    async def _connect(self, factory: Any, deadline: float, what: str) -> Any:
        """Build a client with ``factory`` and start it, retrying until ``deadline``."""
        _bootstrap_filter.retrying += 1
        try:
            return await self._connect_retrying(factory, deadline, what)
        finally:
            _bootstrap_filter.retrying -= 1

    async def _connect_retrying(self, factory: Any, deadline: float, what: str) -> Any:
        loop = asyncio.get_running_loop()
        bootstrap = self.settings.bootstrap_servers
        backoff = 0.1
        told = False
        while True:
            try:
                client = factory()
            except (ValueError, RuntimeError, TypeError) as exc:
                raise BrokerConfigError(f"invalid Kafka {what} settings: {exc}") from exc
            remaining = deadline - loop.time()
            try:
                async with asyncio.timeout(max(remaining, 0.001)):
                    await client.start()
                return client
            except Exception as exc:
                await _quietly(client.stop() if hasattr(client, "stop") else client.close())
                error = translate_error(exc, f"connect {what} to {bootstrap}")
                remaining = deadline - loop.time()
                if not error.retriable:
                    raise error from exc
                if remaining <= 0:
                    detail = str(exc) or type(exc).__name__
                    raise BrokerConnectionError(
                        f"Kafka at {bootstrap} did not answer within "
                        f"{self.settings.connect_timeout:g}s (connect_timeout): {detail}",
                    ) from exc
                if told:
                    _log.debug("Kafka at %s not reachable yet (%s); retrying", bootstrap, exc)
                else:
                    told = True
                    _log.warning(
                        "Kafka at %s not reachable yet (%s); retrying for up to %gs (connect_timeout)",
                        bootstrap,
                        exc,
                        self.settings.connect_timeout,
                    )
                await asyncio.sleep(min(backoff, remaining))
                backoff = min(backoff * 2, _MAX_CONNECT_BACKOFF)


def message_size(message: BrokerMessage) -> int:
    """The record's size as aiokafka estimates it before refusing one over ``max_request_size``."""
    return int(
        DefaultRecordBatchBuilder.estimate_size_in_bytes(
            message.key, message.value, encode_headers(message.headers)
        )
    )


async def _outcome(future: asyncio.Future[Any]) -> BaseException | None:
    """What ``future`` failed with, if it did; the caller's own cancellation is raised, not returned."""
    try:
        await future
    except asyncio.CancelledError as exc:
        task = asyncio.current_task()
        if task is None or task.cancelling():
            raise
        return exc  # the future alone was cancelled: a failed send like any other
    except Exception as exc:
        return exc
    return None


async def _quietly(awaitable: Any) -> None:
    """Await a cleanup step, logging instead of raising: cleanup must not mask the original error."""
    try:
        await awaitable
    except Exception:
        _log.debug("error while closing a Kafka client", exc_info=True)
