"""`OutboxRelay`: publishes outbox rows that were stored but not (yet) sent.

The manager publishes a command right after the transaction that stored it; the relay is the safety net
for the window in between: a crash, a broker outage, a publish that timed out. It claims unsent rows with a
lease (so several relays skip each other), publishes them in one batch, and marks them sent. A row published
but not marked (crash between the two) is published again: participants deduplicate by idempotency key.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from types import TracebackType
from typing import Self

from broker import BrokerClientPool, BrokerError, BrokerMessage
from saga.observability import tracing as _tracing
from storage import OutboxRecord, SagaStorage, StorageError

__all__ = ["OutboxRelay", "publish_outbox"]

_log = logging.getLogger(__name__)


async def publish_outbox(
    storage: SagaStorage,
    broker_pool: BrokerClientPool,
    *,
    owner: str | None,
    limit: int = 100,
    lease_seconds: float = 30.0,
) -> int:
    """One relay pass: claim up to ``limit`` unsent rows, publish them, mark them sent.

    Returns:
        How many rows were published.

    Raises:
        BrokerError, StorageError: The rows stay unsent (and claimed until their lease ends).
    """
    rows: list[OutboxRecord] = await storage.fetch_outbox(limit, owner=owner, lease_seconds=lease_seconds)
    if not rows:
        return 0
    messages = [
        BrokerMessage(topic=row.topic, key=row.key, value=row.value, headers=row.headers) for row in rows
    ]
    if _tracing.enabled:
        with _tracing.publish_spans(messages):
            await broker_pool.publisher().send_batch(messages)
    else:
        await broker_pool.publisher().send_batch(messages)
    await storage.mark_outbox_sent([row.id for row in rows])
    return len(rows)


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
