"""`ReplyConsumer`: reads participants' replies from the reply topic and hands them to the manager.

Offsets are committed only after the manager's transaction for the reply committed, so a crash redelivers
rather than loses; redelivered replies are recognised as duplicates. Bad input never stops the consumer:
undecodable records, replies naming an unknown execution or definition, and other non-retriable failures
are logged, counted, copied to the dead-letter topic with a ``saga-dead-letter-reason`` header, and
committed. Retriable trouble (another worker holds the execution, the database or broker is briefly away)
is retried with backoff on the same record, without committing past it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from types import TracebackType
from typing import Protocol, Self

from broker import BrokerClientPool, BrokerError, BrokerMessage, BrokerSubscriber
from saga.errors import MalformedMessageError, SagaBusyError, SagaError, UnknownSagaDefinitionError
from saga.messages import SagaResponse
from storage import ConcurrencyError, ExecutionNotFoundError, StorageError
from storage.records import ReplyOutcome

__all__ = ["H_DEAD_LETTER_REASON", "ReplyConsumer", "ReplyHandler", "dead_letter_message"]

_log = logging.getLogger(__name__)

#: Header added to records copied to the dead-letter topic: why they were set aside.
H_DEAD_LETTER_REASON = "saga-dead-letter-reason"


class ReplyHandler(Protocol):
    """What the consumer needs from the manager."""

    async def handle_reply(
        self, response: SagaResponse, *, message: BrokerMessage | None = None
    ) -> ReplyOutcome: ...


def dead_letter_message(message: BrokerMessage, topic: str, reason: str) -> BrokerMessage:
    """A copy of ``message`` (original bytes and headers) for the dead-letter ``topic``, with the reason."""
    headers = dict(message.headers)
    headers[H_DEAD_LETTER_REASON] = reason
    return BrokerMessage(topic=topic, key=message.key, value=message.value, headers=headers)


def _retriable(exc: BaseException) -> bool:
    if isinstance(exc, SagaBusyError | ConcurrencyError | BrokerError):
        return True
    return isinstance(exc, StorageError | SagaError) and exc.retriable


class ReplyConsumer:
    """Consumes the reply topic in a consumer group; each execution's replies in order.

    Args:
        handler: The manager (``handle_reply``).
        broker_pool: Source of the subscriber and the publisher (dead letters).
        topic: Reply topic.
        group_id: Consumer group; orchestrators of one service share it to split the partitions.
        dead_letter_topic: Where unusable records are copied.
        poll_timeout: Seconds one fetch waits for records.
        max_records: Records per fetch.
        retry_initial: First backoff (seconds) for a retriable failure; doubles up to ``retry_max``.
        retry_max: Longest backoff.
        stop_timeout: How long ``stop()`` lets the record in progress finish before cancelling it.
        concurrency: How many executions' replies of one fetched batch are handled at once (replies of
            one execution always one after the other).
    """

    def __init__(
        self,
        handler: ReplyHandler,
        broker_pool: BrokerClientPool,
        *,
        topic: str,
        group_id: str,
        dead_letter_topic: str,
        poll_timeout: float = 1.0,
        max_records: int = 100,
        retry_initial: float = 0.05,
        retry_max: float = 5.0,
        stop_timeout: float = 10.0,
        concurrency: int = 64,
    ) -> None:
        self.handler = handler
        self.broker_pool = broker_pool
        self.topic = topic
        self.group_id = group_id
        self.dead_letter_topic = dead_letter_topic
        self.poll_timeout = poll_timeout
        self.max_records = max_records
        self.retry_initial = retry_initial
        self.retry_max = retry_max
        self.stop_timeout = stop_timeout
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        self.concurrency = concurrency
        #: Counters by outcome (``applied``, ``duplicate``, ``stale``, ``unknown_status``) and trouble
        #: (``malformed``, ``unknown_execution``, ``unknown_definition``, ``failed``, ``dead_lettered``,
        #: ``retries``, ``errors``); ``received`` counts every record handled.
        self.stats: dict[str, int] = dict.fromkeys(
            (
                "received",
                "applied",
                "duplicate",
                "stale",
                "unknown_status",
                "malformed",
                "unknown_execution",
                "unknown_definition",
                "failed",
                "dead_lettered",
                "retries",
                "errors",
            ),
            0,
        )
        self._subscriber: BrokerSubscriber | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._fetching = False
        self._stop_event = asyncio.Event()

    @property
    def running(self) -> bool:
        """Whether the consuming task is alive."""
        return self._task is not None and not self._task.done()

    async def start(self) -> None:
        """Join the consumer group and start consuming; idempotent."""
        if self.running:
            return
        self._stopping = False
        self._stop_event.clear()
        subscriber = self.broker_pool.subscriber([self.topic], group_id=self.group_id)
        await subscriber.start()
        self._subscriber = subscriber
        self._task = asyncio.create_task(self._run(subscriber), name=f"saga-reply-consumer-{self.topic}")

    async def stop(self) -> None:
        """Finish the record in progress, commit what was processed, leave the group; idempotent."""
        task, self._task = self._task, None
        self._stopping = True
        self._stop_event.set()
        if task is not None:
            if self._fetching:
                task.cancel()  # idle in a fetch: nothing processed is left uncommitted
            done, _ = await asyncio.wait({task}, timeout=self.stop_timeout)
            if not done:
                task.cancel()
                await asyncio.wait({task})
        subscriber, self._subscriber = self._subscriber, None
        if subscriber is not None:
            with contextlib.suppress(BrokerError):
                await subscriber.stop()

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

    # -- consuming -------------------------------------------------------------------------------------

    async def _run(self, subscriber: BrokerSubscriber) -> None:
        failures = 0
        while not self._stopping:
            self._fetching = True
            try:
                batch = await subscriber.getmany(timeout=self.poll_timeout, max_records=self.max_records)
            except BrokerError as exc:
                if self._stopping:
                    break
                failures += 1
                _log.warning("reply consumer: fetch failed (%s); retrying", exc)
                await self._pause(self._backoff(failures))
                continue
            except Exception:
                failures += 1
                _log.exception("reply consumer: unexpected error while fetching; retrying")
                await self._pause(self._backoff(failures))
                continue
            finally:
                self._fetching = False
            failures = 0
            if batch:
                done = await self._process_batch(batch)
                if done:
                    await self._commit(subscriber, done)

    async def _process_batch(self, batch: list[BrokerMessage]) -> list[BrokerMessage]:
        """Handle a batch: one execution's replies in order, different executions concurrently.

        Records are keyed by execution id, so grouping by key keeps each saga's replies in order while
        the database round trips of different sagas overlap. Returns the records that may be committed:
        per partition, the prefix handled before a stop interrupted the batch.
        """
        groups: dict[bytes | None, list[BrokerMessage]] = {}
        for message in batch:
            groups.setdefault(message.key, []).append(message)
        handled: set[int] = set()
        if len(groups) == 1 or self.concurrency == 1:
            for message in batch:
                if not await self._handle_with_retry(message):
                    break
                handled.add(id(message))
        else:
            slots = asyncio.Semaphore(self.concurrency)

            async def run_group(messages: list[BrokerMessage]) -> None:
                async with slots:
                    for message in messages:
                        if not await self._handle_with_retry(message):
                            return
                        handled.add(id(message))

            await asyncio.gather(*(run_group(messages) for messages in groups.values()))
        if len(handled) == len(batch):
            return batch
        done: list[BrokerMessage] = []
        blocked: set[tuple[str, int | None]] = set()
        for message in batch:  # batch order is offset order within a partition
            partition = (message.topic, message.partition)
            if partition in blocked:
                continue
            if id(message) in handled:
                done.append(message)
            else:
                blocked.add(partition)
        return done

    async def _handle_with_retry(self, message: BrokerMessage) -> bool:
        """Handle one record, retrying retriable failures; ``False`` if stopping interrupted it."""
        self.stats["received"] += 1
        attempt = 0
        while True:
            try:
                await self.handle(message)
                return True
            except Exception as exc:
                if not _retriable(exc):  # pragma: no cover - handle() sets such records aside itself
                    _log.exception("reply consumer: record %s@%s skipped", message.topic, message.offset)
                    return True
                attempt += 1
                self.stats["retries"] += 1
                if attempt == 1 or attempt % 20 == 0:
                    _log.info("reply consumer: %s; retrying the record (attempt %d)", exc, attempt)
                if self._stopping:
                    return False
                await self._pause(self._backoff(attempt))

    async def handle(self, message: BrokerMessage) -> None:
        """Process one record to completion (applied, ignored, or dead-lettered).

        Raises:
            Exception: Only retriable ones (busy execution, database or broker trouble): the caller retries
                the record without committing past it.
        """
        try:
            response = SagaResponse.from_message(message)
        except MalformedMessageError as exc:
            await self._set_aside(message, "malformed", f"malformed: {exc.field}: {exc.reason}")
            return
        try:
            outcome = await self.handler.handle_reply(response, message=message)
        except ExecutionNotFoundError as exc:
            await self._set_aside(message, "unknown_execution", f"unknown execution {exc.execution_id}")
            return
        except UnknownSagaDefinitionError as exc:
            await self._set_aside(
                message, "unknown_definition", f"unknown saga definition {exc.name!r} v{exc.version}"
            )
            return
        except Exception as exc:
            if _retriable(exc):
                raise
            if isinstance(exc, SagaError) and exc.execution_id is not None:
                # The manager marked the execution FAILED; recovery resumes it. The reply is not lost: the
                # recovered step re-sends its command and the participant answers again.
                self.stats["failed"] += 1
                _log.warning(
                    "reply consumer: execution %s failed applying a reply: %s", exc.execution_id, exc
                )
                return
            self.stats["errors"] += 1
            _log.exception(
                "reply consumer: cannot process record %s[%s]@%s",
                message.topic,
                message.partition,
                message.offset,
            )
            await self._set_aside(message, None, f"error: {type(exc).__name__}: {exc}")
            return
        self.stats[outcome] = self.stats.get(outcome, 0) + 1

    async def _set_aside(self, message: BrokerMessage, counter: str | None, reason: str) -> None:
        if counter is not None:
            self.stats[counter] += 1
        _log.warning(
            "reply consumer: record %s[%s]@%s sent to %s: %s",
            message.topic,
            message.partition,
            message.offset,
            self.dead_letter_topic,
            reason,
        )
        await self.broker_pool.publisher().send(dead_letter_message(message, self.dead_letter_topic, reason))
        self.stats["dead_lettered"] += 1

    async def _commit(self, subscriber: BrokerSubscriber, messages: Sequence[BrokerMessage]) -> None:
        attempt = 0
        while True:
            try:
                await subscriber.commit(messages)
                return
            except BrokerError as exc:
                attempt += 1
                if self._stopping or not exc.retriable or attempt >= 5:
                    # Uncommitted records are redelivered and recognised as duplicates: safe to give up.
                    _log.warning("reply consumer: offset commit failed (%s); records may be redelivered", exc)
                    return
                await self._pause(self._backoff(attempt))

    def _backoff(self, attempt: int) -> float:
        return float(min(self.retry_max, self.retry_initial * 2 ** min(attempt - 1, 16)))

    async def _pause(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop_event.wait(), timeout=seconds)
