"""`ReplyConsumer`: reads participants' replies from the reply topic and hands them to the manager.

Offsets are committed only after the manager's transaction for the reply committed, so a crash redelivers
rather than loses; redelivered replies are recognised as duplicates. Bad input never stops the consumer:
undecodable records, replies naming an unknown execution, and other non-retriable failures are logged,
counted, copied to the dead-letter topic with a ``saga-dead-letter-reason`` header, and committed. A reply
for an execution whose definition version this process does not register is kept with the execution
(`saga.parking`) for a process that registers it. Retriable trouble (another worker holds the execution,
the database or broker is briefly away) is retried with backoff on the same record, without committing
past it.

Records flow through a `KeyedPipeline`: the consumer keeps fetching while earlier replies are applied, one
execution's replies in order and different executions' concurrently, and offsets are committed in the
background as the handled prefix of each partition grows, so neither a slow reply nor a commit round trip
holds up the replies behind it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from types import TracebackType
from typing import Protocol, Self

from broker import BrokerClientPool, BrokerError, BrokerMessage, BrokerSubscriber
from saga.errors import (
    MalformedMessageError,
    SagaBusyError,
    SagaError,
    UnknownSagaDefinitionError,
    UnsupportedProtocolError,
)
from saga.messages import H_DEAD_LETTER_CODE, H_EXECUTION_ID, SagaResponse
from saga.pipeline import KeyedPipeline
from storage import ConcurrencyError, ExecutionNotFoundError, StorageError
from storage.records import ReplyOutcome

__all__ = [
    "DEFAULT_REPLY_CONCURRENCY",
    "H_DEAD_LETTER_REASON",
    "H_DEAD_LETTER_TOPIC",
    "ReplyConsumer",
    "ReplyHandler",
    "dead_letter_message",
]

_log = logging.getLogger(__name__)

#: Replies in progress at once by default. In the remote benchmark at 500 sagas in flight, 256 gave about
#: a sixth more remote steps per second than 64 (larger save groups, no idle wait for a free slot).
DEFAULT_REPLY_CONCURRENCY = 256

#: Header added to records copied to the dead-letter topic: why they were set aside.
H_DEAD_LETTER_REASON = "saga-dead-letter-reason"
#: Header added to dead letters naming the topic the record was consumed from.
H_DEAD_LETTER_TOPIC = "saga-dead-letter-topic"


class ReplyHandler(Protocol):
    """What the consumer needs from the manager."""

    async def handle_reply(
        self, response: SagaResponse, *, message: BrokerMessage | None = None
    ) -> ReplyOutcome: ...


def dead_letter_message(
    message: BrokerMessage, topic: str, reason: str, *, code: str = "error"
) -> BrokerMessage:
    """A copy of ``message`` (original bytes and headers) for the dead-letter ``topic``.

    It adds why (``reason``, for people; ``code``, one of the codes docs/protocol.md lists, for programs)
    and the topic the record came from.
    """
    headers = dict(message.headers)
    headers[H_DEAD_LETTER_REASON] = reason
    headers[H_DEAD_LETTER_CODE] = code
    headers[H_DEAD_LETTER_TOPIC] = message.topic
    return BrokerMessage(topic=topic, key=message.key, value=message.value, headers=headers)


def _execution_key(message: BrokerMessage) -> str | bytes | None:
    """One execution's replies share a lane, so they are handled in order, one at a time.

    The lane is the execution id header, not the record key: a reply published under another key (a
    participant that keys by something else, a re-keyed copy) would otherwise run beside the execution's
    other replies, find the execution being advanced by this process, and back off for up to
    ``retry_max`` per attempt while the others went first. Records without the header keep their key.
    """
    execution = message.headers.get(H_EXECUTION_ID)
    return message.key if execution is None else execution


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
        stop_timeout: How long ``stop()`` lets the records in progress finish before cancelling them.
        concurrency: Most replies in progress (fetched, not yet handled) at once; when reached, fetching
            waits. Replies of different executions are handled concurrently, those of one execution one
            after the other. The default (`DEFAULT_REPLY_CONCURRENCY`) is sized for many sagas in flight:
            most of a reply's time in progress is spent waiting for its save and its next command's
            acknowledgement, and replies in progress together are saved together (one statement on
            PostgreSQL), so a low bound leaves both the process and the database waiting.
        commit_interval: Least seconds between two offset commits (they run in the background and carry
            every reply handled meanwhile; a crash redelivers at most that much more, as duplicates).
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
        concurrency: int = DEFAULT_REPLY_CONCURRENCY,
        commit_interval: float = 0.1,
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
        self.commit_interval = commit_interval
        #: Counters by outcome (``applied``, ``duplicate``, ``stale``, ``unknown_status``) and trouble
        #: (``malformed``, ``unknown_execution``, ``unknown_definition``, ``parked`` (kept with an
        #: execution whose definition is not registered here), ``unsupported_protocol``, ``failed``,
        #: ``dead_lettered``, ``retries``, ``errors``); ``received`` counts every record handled.
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
                "unsupported_protocol",
                "parked",
                "failed",
                "dead_lettered",
                "retries",
                "errors",
            ),
            0,
        )
        self._subscriber: BrokerSubscriber | None = None
        self._pipeline: KeyedPipeline | None = None
        self._task: asyncio.Task[None] | None = None
        self._stop_event = asyncio.Event()

    @property
    def running(self) -> bool:
        """Whether the consuming task is alive."""
        return self._task is not None and not self._task.done()

    async def start(self) -> None:
        """Join the consumer group and start consuming; idempotent."""
        if self.running:
            return
        self._stop_event.clear()
        subscriber = self.broker_pool.subscriber([self.topic], group_id=self.group_id)
        await subscriber.start()
        self._subscriber = subscriber
        self._pipeline = KeyedPipeline(
            subscriber,
            self._handle_with_retry,
            lane=_execution_key,
            concurrency=self.concurrency,
            max_records=self.max_records,
            poll_timeout=self.poll_timeout,
            on_fetch_error=self._fetch_failed,
            name="reply consumer",
            retry_initial=self.retry_initial,
            retry_max=self.retry_max,
            grace=self.stop_timeout,
            commit_interval=self.commit_interval,
        )
        self._task = asyncio.create_task(self._pipeline.run(), name=f"saga-reply-consumer-{self.topic}")

    async def stop(self) -> None:
        """Finish the records in progress, commit what was handled, leave the group; idempotent.

        A fetch in flight is abandoned (its records are not committed, so they are redelivered). Records in
        progress get ``stop_timeout`` seconds to finish; the rest are cancelled and left uncommitted.
        """
        task, self._task = self._task, None
        self._stop_event.set()
        if self._pipeline is not None:
            self._pipeline.stop(self.stop_timeout)
        if task is not None:
            await asyncio.wait({task})  # bounded: the pipeline cancels what overstays stop_timeout
            if not task.cancelled() and task.exception() is not None:
                _log.error("reply consumer failed", exc_info=task.exception())
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

    def _fetch_failed(self, exc: Exception, failures: int) -> float:
        """Fetch trouble never stops the consumer: log it and back off."""
        if isinstance(exc, BrokerError):
            _log.warning("reply consumer: fetch failed (%s); retrying", exc)
        else:
            _log.error("reply consumer: unexpected error while fetching; retrying", exc_info=exc)
        return self._backoff(failures)

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
                if self._stop_event.is_set():
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
        except UnsupportedProtocolError as exc:
            await self._set_aside(message, "unsupported_protocol", f"unsupported_protocol: {exc.reason}")
            return
        except MalformedMessageError as exc:
            await self._set_aside(message, "malformed", f"malformed: {exc.field}: {exc.reason}")
            return
        try:
            outcome = await self.handler.handle_reply(response, message=message)
        except ExecutionNotFoundError as exc:
            await self._set_aside(message, "unknown_execution", f"unknown execution {exc.execution_id}")
            return
        except UnknownSagaDefinitionError as exc:
            await self._park(response, message, exc)
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

    async def _park(
        self, response: SagaResponse, message: BrokerMessage, exc: UnknownSagaDefinitionError
    ) -> None:
        """Keep a reply whose execution's definition this process does not register, with the execution.

        During a rolling deployment a process with only v2 reads replies of v1 executions: they wait with
        their execution until a process that registers v1 applies them (`SagaManager.park_reply`), rather
        than going to the dead-letter topic, which would strand the saga. With a handler that cannot park
        (no ``park_reply``) the reply goes to the dead-letter topic. Retriable failures propagate (the
        record is retried).
        """
        park = getattr(self.handler, "park_reply", None)
        if park is None:
            reason = f"unknown saga definition {exc.name!r} v{exc.version}"
            await self._set_aside(message, "unknown_definition", reason)
            return
        self.stats["unknown_definition"] += 1
        try:
            parked = await park(response, message=message)
        except ExecutionNotFoundError as missing:
            await self._set_aside(message, "unknown_execution", f"unknown execution {missing.execution_id}")
            return
        if parked:
            self.stats["parked"] += 1
            _log.warning(
                "reply consumer: execution %s is of saga %r v%d, which this process does not register: its "
                "reply is kept with it until a process that registers that version applies it",
                response.execution_id,
                exc.name,
                exc.version,
            )

    async def _set_aside(self, message: BrokerMessage, counter: str | None, reason: str) -> None:
        """Dead-letter ``message``; ``counter`` is its stats counter and dead-letter code (else ``error``)."""
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
        letter = dead_letter_message(message, self.dead_letter_topic, reason, code=counter or "error")
        await self.broker_pool.publisher().send(letter)
        self.stats["dead_lettered"] += 1

    def _backoff(self, attempt: int) -> float:
        return float(min(self.retry_max, self.retry_initial * 2 ** min(attempt - 1, 16)))

    async def _pause(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop_event.wait(), timeout=seconds)
