"""`OutboxRelay`: publishes outbox rows that were stored but not (yet) sent.

The manager publishes a command right after the transaction that stored it; the relay is the safety net
for the window in between: a crash, a broker outage, a publish that timed out. It claims unsent rows with a
lease (so several relays skip each other), publishes them, and marks them sent. A row published but not
marked (crash between the two) is published again: participants deduplicate by idempotency key.

The outbox is a queue of independent rows. Each row's publish has its own outcome: a row the broker
refuses for good (too large, invalid or unauthorised topic, unencodable) fails its own step with a
``publish_rejected`` error (the manager applies it as a 500 reply, so the step's retry policy and then
compensation take over) and leaves the queue; a row that fails transiently is released with its own
jittered backoff, grown with its attempts. Neither holds up the rows behind it. Storage only hands out
rows that are due and current (their execution still awaits their request), so a delayed retry waits out
its backoff and a command left behind by its saga is never published.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextlib import nullcontext
from types import TracebackType
from typing import Any, Self

from broker import BrokerClientPool, BrokerError, BrokerMessage
from saga.observability import tracing as _tracing
from saga.retry import RetryPolicy
from storage import OutboxRecord, SagaStorage, StorageError, SupportsOutboxOutcomes

__all__ = ["OutboxRelay", "RejectionHandler", "publish_outbox", "rejection_error", "settle_outcomes"]

_log = logging.getLogger(__name__)


#: What the relay calls for a row the broker refuses for good: fail the row's step with the error, and say
#: whether that was done (``False``: try again later, the row stays queued with a backoff).
RejectionHandler = Callable[[OutboxRecord, Mapping[str, Any]], Awaitable[bool]]

#: Backoff of a row whose publish failed transiently, by the row's attempts (jittered).
ROW_BACKOFF = RetryPolicy(max_attempts=1, initial_delay=0.5, backoff=2.0, max_delay=30.0)


def rejection_error(error: BrokerError, message: BrokerMessage | OutboxRecord) -> dict[str, Any]:
    """The structured ``publish_rejected`` error of a record the broker refuses for good."""
    return {
        "type": "publish_rejected",
        "error": f"the broker refused the command for good: {error}",
        "reason": error.rejection,
        "topic": message.topic,
        "size": error.size,
        "limit": error.limit,
    }


async def publish_outbox(
    storage: SagaStorage,
    broker_pool: BrokerClientPool,
    *,
    owner: str | None,
    limit: int = 100,
    lease_seconds: float = 30.0,
    on_rejected: RejectionHandler | None = None,
    backoff: RetryPolicy = ROW_BACKOFF,
) -> int:
    """One relay pass: claim up to ``limit`` due unsent rows, publish each, record each one's outcome.

    Sent rows are marked sent; a row refused for good goes to ``on_rejected`` (its step fails) and out of
    the queue; a row that failed transiently is released, due again after ``backoff`` for its attempts.
    With a storage or publisher lacking per-row outcomes (`SupportsOutboxOutcomes`, ``send_each``) the
    batch is sent as one and a failure leaves it all claimed until the lease ends.

    Returns:
        How many rows were published.

    Raises:
        BrokerError, StorageError: The pass could not run (the rows stay unsent, claimed until their lease
            ends); per-row failures are not raised.
    """
    rows: list[OutboxRecord] = await storage.fetch_outbox(limit, owner=owner, lease_seconds=lease_seconds)
    if not rows:
        return 0
    messages = [
        BrokerMessage(topic=row.topic, key=row.key, value=row.value, headers=row.headers) for row in rows
    ]
    publisher = broker_pool.publisher()
    send_each = getattr(publisher, "send_each", None)
    if send_each is None or not isinstance(storage, SupportsOutboxOutcomes):
        with _tracing.publish_spans(messages) if _tracing.enabled else nullcontext():
            await publisher.send_batch(messages)
        await storage.mark_outbox_sent([row.id for row in rows])
        return len(rows)
    with _tracing.publish_spans(messages) if _tracing.enabled else nullcontext():
        outcomes: list[BrokerError | None] = await send_each(messages)
    await settle_outcomes(storage, rows, outcomes, on_rejected=on_rejected, backoff=backoff)
    return sum(1 for outcome in outcomes if outcome is None)


async def settle_outcomes(
    storage: SagaStorage,
    rows: Sequence[OutboxRecord],
    outcomes: Sequence[BrokerError | None],
    *,
    on_rejected: RejectionHandler | None,
    backoff: RetryPolicy = ROW_BACKOFF,
) -> None:
    """Record each row's publish outcome (see `publish_outbox`); ``storage`` has `SupportsOutboxOutcomes`."""
    assert isinstance(storage, SupportsOutboxOutcomes)
    sent: list[int] = []
    rejected: dict[int, Mapping[str, Any]] = {}
    delays: dict[int, float] = {}
    transient: BrokerError | None = None
    for row, outcome in zip(rows, outcomes, strict=True):
        if outcome is None:
            sent.append(row.id)
        elif outcome.rejection is not None:
            error = rejection_error(outcome, row)
            _log.warning(
                "outbox row %d (execution %s) refused for good: %s", row.id, row.execution_id, outcome
            )
            handled = True
            if on_rejected is not None and row.request_id is not None:
                try:
                    handled = await on_rejected(row, error)
                except Exception as exc:
                    _log.warning("outbox row %d: failing its step failed: %s", row.id, exc)
                    handled = False
            if handled:
                rejected[row.id] = error
            else:
                delays[row.id] = backoff.jittered_delay(row.attempts + 1)
        else:
            transient = outcome
            delays[row.id] = backoff.jittered_delay(row.attempts + 1)
    if sent:
        await storage.mark_outbox_sent(sent)
    if rejected:
        await storage.reject_outbox(rejected)
    if delays:
        await storage.defer_outbox(delays)
    if transient is not None:
        _log.warning(
            "outbox: %d rows failed transiently (%s); each retries after its backoff", len(delays), transient
        )


class OutboxRelay:
    """Background task that keeps the outbox empty.

    Args:
        storage: Where the outbox rows live.
        broker_pool: Where they go.
        owner: Claim owner of fetched rows (the process's identity).
        interval: Seconds between passes when there is nothing to do.
        batch_size: Rows per pass; a full batch triggers the next pass at once.
        lease_seconds: How long fetched rows stay claimed by this relay.
        max_backoff: Upper bound of the wait after consecutive failures.
        on_rejected: Fails the step of a row the broker refuses for good (the manager's); without it the
            row only leaves the queue, with its error stored, and the step's timeout decides.
    """

    def __init__(
        self,
        storage: SagaStorage,
        broker_pool: BrokerClientPool,
        *,
        owner: str | None = None,
        interval: float = 1.0,
        batch_size: int = 100,
        lease_seconds: float = 30.0,
        max_backoff: float = 30.0,
        on_rejected: RejectionHandler | None = None,
    ) -> None:
        if interval <= 0:
            raise ValueError(f"interval must be > 0, got {interval}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.storage = storage
        self.broker_pool = broker_pool
        self.owner = owner
        self.interval = interval
        self.batch_size = batch_size
        self.lease_seconds = lease_seconds
        self.max_backoff = max_backoff
        self.on_rejected = on_rejected
        #: Counters: ``published`` rows, ``passes`` made, ``errors`` met.
        self.stats: dict[str, int] = {"published": 0, "passes": 0, "errors": 0}
        self._task: asyncio.Task[None] | None = None
        self._wakeup = asyncio.Event()
        self._stopping = False

    @property
    def running(self) -> bool:
        """Whether the background task is alive."""
        return self._task is not None and not self._task.done()

    async def start(self) -> None:
        """Start the background task; idempotent."""
        if self.running:
            return
        self._stopping = False
        self._task = asyncio.create_task(self._run(), name="saga-outbox-relay")

    async def stop(self) -> None:
        """Stop after the pass in progress (if any) finishes; idempotent."""
        task, self._task = self._task, None
        if task is None:
            return
        self._stopping = True
        self._wakeup.set()
        done, _ = await asyncio.wait({task}, timeout=max(self.interval, 5.0))
        if not done:
            task.cancel()
            await asyncio.wait({task})

    def wake(self) -> None:
        """Run a pass now instead of waiting for the interval."""
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

    async def run_once(self) -> int:
        """One pass (see `publish_outbox`); errors propagate."""
        published = await publish_outbox(
            self.storage,
            self.broker_pool,
            owner=self.owner,
            limit=self.batch_size,
            lease_seconds=self.lease_seconds,
            on_rejected=self.on_rejected,
        )
        self.stats["passes"] += 1
        self.stats["published"] += published
        return published

    async def _run(self) -> None:
        failures = 0
        while not self._stopping:
            try:
                published = await self.run_once()
            except Exception as exc:
                failures += 1
                self.stats["errors"] += 1
                delay = min(self.max_backoff, self.interval * 2 ** min(failures - 1, 10))
                if isinstance(exc, BrokerError | StorageError):
                    _log.warning("outbox relay: %s; retrying in %.1fs", exc, delay)
                else:
                    _log.exception("outbox relay: unexpected error; retrying in %.1fs", delay)
                await self._sleep(delay)
                continue
            failures = 0
            if published >= self.batch_size:
                continue  # more may be waiting
            await self._sleep(self.interval)

    async def _sleep(self, seconds: float) -> None:
        if self._stopping:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wakeup.wait(), timeout=seconds)
        self._wakeup.clear()
