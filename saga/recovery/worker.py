"""`SagaRecoveryWorker`: the background loop that claims stalled executions in batches and recovers them.

Claiming, lease keeping for executions queued behind the concurrency limit, outage backoff and a draining
`SagaRecoveryWorker.stop` live here; what happens to each execution is `saga.recovery.recover`'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
import uuid
from collections.abc import Sequence
from types import TracebackType
from typing import Any, Self

from saga.recovery.outcomes import RecoveryReport, RecoveryResult, RecoveryStats
from saga.recovery.recover import RecoveryTarget, is_outage, recover_one, release_claim
from storage import ExecutionRecord

__all__ = ["SagaRecoveryWorker"]

_log = logging.getLogger(__name__)


class SagaRecoveryWorker:
    """Background recovery: claim stalled executions in batches and resume them through the manager.

    Each pass claims up to ``batch_size`` executions (``storage.claim_for_recovery`` under the manager's
    ``owner``, per saga name when ``saga_names`` is set), recovers them ``concurrency`` at a time with
    `recover_saga`'s bookkeeping, then sleeps ``interval`` seconds, or starts the next pass at once when the
    batch was full and resumed something (a backlog). A failed execution gets a fresh ``updated_at``, so
    it goes behind the backlog (and, with ``stale_after_seconds``, waits that long) before its next try.

    One bad execution never stops the loop. A database outage is retried with capped, jittered exponential
    backoff, logged once when it starts and once when it ends.

    The worker does not set up or destroy the manager: do that around it.

    Args:
        manager: The `SagaManager` whose definitions resume the executions.
        interval: Seconds between passes when there is no backlog.
        batch_size: Executions claimed per pass.
        max_recovery_attempts: Executions with this many failed attempts are no longer claimed; the
            failure that reaches it dead-letters the execution.
        stale_after_seconds: Only claim executions untouched for this long (``None``: any age).
        saga_names: Only claim executions of these sagas (``None``: all).
        lease_seconds: Lease of claimed executions (default: the manager's).
        concurrency: Recoveries running at once.
        retry_initial: First backoff (seconds) during an outage; doubles per retry.
        retry_max: Longest backoff.

    Example:
        >>> async with manager, SagaRecoveryWorker(manager, interval=10, stale_after_seconds=60):
        ...     await stop_requested.wait()
    """

    def __init__(
        self,
        manager: RecoveryTarget,
        *,
        interval: float = 5.0,
        batch_size: int = 100,
        max_recovery_attempts: int = 5,
        stale_after_seconds: int | None = None,
        saga_names: Sequence[str] | None = None,
        lease_seconds: float | None = None,
        concurrency: int = 10,
        retry_initial: float = 0.5,
        retry_max: float = 30.0,
    ) -> None:
        for key, value in (
            ("interval", interval),
            ("retry_initial", retry_initial),
            ("retry_max", retry_max),
        ):
            if not value > 0:
                raise ValueError(f"{key} must be > 0, got {value!r}")
        for key, count in (
            ("batch_size", batch_size),
            ("max_recovery_attempts", max_recovery_attempts),
            ("concurrency", concurrency),
        ):
            if count < 1:
                raise ValueError(f"{key} must be >= 1, got {count!r}")
        if stale_after_seconds is not None and stale_after_seconds < 0:
            raise ValueError(f"stale_after_seconds must be >= 0, got {stale_after_seconds!r}")
        if isinstance(saga_names, str):
            raise TypeError("saga_names must be a sequence of names, not one string")
        self.manager = manager
        self.interval = float(interval)
        self.batch_size = batch_size
        self.max_recovery_attempts = max_recovery_attempts
        self.stale_after_seconds = stale_after_seconds
        self.saga_names: tuple[str, ...] | None = None if saga_names is None else tuple(saga_names)
        self.lease_seconds = float(lease_seconds if lease_seconds is not None else manager.lease_seconds)
        if not self.lease_seconds > 0:
            raise ValueError(f"lease_seconds must be > 0, got {lease_seconds!r}")
        self.concurrency = concurrency
        self.retry_initial = float(retry_initial)
        self.retry_max = max(float(retry_max), self.retry_initial)
        self.stats = RecoveryStats()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._wake = asyncio.Event()
        self._rotation = 0

    # -- lifecycle -------------------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        """Whether the background loop is alive."""
        return self._task is not None and not self._task.done()

    async def start(self) -> None:
        """Start the background loop; idempotent."""
        if self.running:
            return
        self._stopping = False
        self._wake.clear()
        self._task = asyncio.create_task(self._run(), name=f"saga-recovery-{self.manager.owner}")

    async def stop(self, *, grace: float | None = None) -> None:
        """Stop the loop: recoveries in progress finish, claimed ones not yet started are released.

        Args:
            grace: Seconds to wait for the recoveries in progress before cancelling them (``None``:
                wait as long as they take). A cancelled recovery's claim runs out with its lease.
        """
        task, self._task = self._task, None
        self._stopping = True
        self._wake.set()
        if task is None:
            return
        try:
            await asyncio.wait_for(asyncio.shield(task), timeout=grace)
        except TimeoutError:
            _log.warning("recovery worker: recoveries still running after %ss; cancelling them", grace)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

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

    # -- one pass --------------------------------------------------------------------------------------

    async def run_once(self) -> RecoveryReport:
        """Claim one batch and recover it; what the loop does each pass (also for tests and the CLI).

        Raises:
            StorageError, OSError: The claim itself failed (nothing was claimed).
        """
        started = time.monotonic()
        records, outage = await self._claim_batch()
        self.stats.batches += 1
        self.stats.claimed += len(records)
        results, recover_outage = await self._recover_all(records)
        return RecoveryReport(
            claimed=len(records),
            results=tuple(results),
            duration=time.monotonic() - started,
            outage=outage or recover_outage,
        )

    async def _claim_batch(self) -> tuple[list[ExecutionRecord], BaseException | None]:
        storage = self.manager.storage
        options: dict[str, Any] = {
            "lease_seconds": self.lease_seconds,
            "max_recovery_attempts": self.max_recovery_attempts,
            "stale_after_seconds": self.stale_after_seconds,
        }
        if self.saga_names is None:
            claimed = await storage.claim_for_recovery(self.manager.owner, limit=self.batch_size, **options)
            return claimed, None
        # Start with a different name each pass so a backlog of one saga cannot starve the others.
        names = self.saga_names
        if names:
            start = self._rotation % len(names)
            names = names[start:] + names[:start]
            self._rotation += 1
        records: list[ExecutionRecord] = []
        for name in names:
            room = self.batch_size - len(records)
            if room <= 0:
                break
            try:
                records += await storage.claim_for_recovery(
                    self.manager.owner, limit=room, saga_name=name, **options
                )
            except Exception as exc:
                if not records or not is_outage(exc):
                    raise
                return records, exc  # recover what is claimed; the loop backs off afterwards
        return records, None

    async def _recover_all(
        self, records: list[ExecutionRecord]
    ) -> tuple[list[RecoveryResult], BaseException | None]:
        if not records:
            return [], None
        queued: dict[uuid.UUID, ExecutionRecord] = {r.id: r for r in records}
        results: list[RecoveryResult] = []
        outage: list[BaseException] = []
        slots = asyncio.Semaphore(self.concurrency)

        async def one(record: ExecutionRecord) -> None:
            async with slots:
                queued.pop(record.id, None)
                if self._stopping or outage:
                    if not outage:
                        await release_claim(self.manager, record.id)
                    result = RecoveryResult(record.id, "released" if not outage else "outage")
                else:
                    result = await recover_one(self.manager, record.id, self.max_recovery_attempts)
                    if result.outcome == "outage" and result.exception is not None:
                        outage.append(result.exception)
                results.append(result)
                self._count(result)

        keeper = asyncio.create_task(self._keep_leases(queued), name="saga-recovery-leases")
        try:
            await asyncio.gather(*(one(r) for r in records))
        finally:
            keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await keeper
        return results, outage[0] if outage else None

    async def _keep_leases(self, queued: dict[uuid.UUID, ExecutionRecord]) -> None:
        """Renew the leases of claimed executions still waiting for a slot (the manager renews the rest)."""
        storage, owner = self.manager.storage, self.manager.owner
        while queued:
            await asyncio.sleep(self.lease_seconds / 3)
            for saga_id in list(queued):
                try:
                    kept = await storage.renew_claim(saga_id, owner, lease_seconds=self.lease_seconds)
                except Exception as exc:  # outage or gone: the recovery itself will tell
                    _log.debug("execution %s: lease renewal failed: %s", saga_id, exc)
                    continue
                if not kept and queued.pop(saga_id, None) is not None:
                    _log.info(
                        "execution %s: claim lost while queued; the manager's claim will decide", saga_id
                    )

    def _count(self, result: RecoveryResult) -> None:
        outcome = result.outcome
        stats = self.stats
        if outcome == "recovered":
            stats.recovered += 1
        elif outcome == "failed":
            stats.failed += 1
        elif outcome == "dead_lettered":
            stats.failed += 1
            stats.dead_lettered += 1
        elif outcome == "busy":
            stats.busy += 1
        elif outcome == "released":
            stats.released += 1

    # -- the loop --------------------------------------------------------------------------------------

    async def _run(self) -> None:
        retries = 0
        outage_started: float | None = None
        while not self._stopping:
            report: RecoveryReport | None = None
            error: BaseException | None = None
            try:
                report = await self.run_once()
                error = report.outage
            except Exception as exc:
                if not is_outage(exc):
                    self.stats.errors += 1
                    _log.exception(
                        "recovery worker: pass failed unexpectedly; next pass in %ss", self.interval
                    )
                    await self._sleep(self.interval)
                    continue
                error = exc
            if error is not None:
                if outage_started is None:
                    outage_started = time.monotonic()
                    self.stats.outages += 1
                    _log.warning("recovery worker: database unavailable (%s); retrying with backoff", error)
                retries += 1
                await self._sleep(self._backoff(retries))
                continue
            if outage_started is not None:
                _log.warning(
                    "recovery worker: database available again after %.1fs; recovery resumes",
                    time.monotonic() - outage_started,
                )
                outage_started, retries = None, 0
            assert report is not None
            # A full batch that made progress means a backlog: go on at once. Otherwise wait, so that
            # executions failing over and over are retried once per interval, not in a tight loop.
            if report.claimed < self.batch_size or not report.recovered:
                await self._sleep(self.interval)

    def _backoff(self, retries: int) -> float:
        """Capped exponential backoff with jitter (half fixed, half random), so workers spread out."""
        delay = min(self.retry_max, self.retry_initial * 2.0 ** min(retries - 1, 30))
        return delay / 2 + random.uniform(0, delay / 2)

    async def _sleep(self, seconds: float) -> None:
        if self._stopping:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout=seconds)
