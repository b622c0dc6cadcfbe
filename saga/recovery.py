"""Recovery: resume executions that crashes, lost replies, timeouts or deadlines left stalled.

Two layers, following python-cqrs's names (DESIGN §1):

* `recover_saga` resumes one execution through the manager (``SagaManager.recover``) and keeps the
  books when that fails: one more recovery attempt and status ``FAILED`` (python-cqrs semantics), and
  ``DEAD_LETTER`` with a structured error once the attempts reach the limit, so a person looks at it.
* `SagaRecoveryWorker` is the background loop: it *claims* a batch of recoverable executions with
  ``storage.claim_for_recovery`` (DBOS's "claim, do not just select": concurrent workers never receive the
  same row) and recovers them with bounded concurrency.

Claims and leases. The worker claims under the manager's own ``owner``: ``SagaManager.recover`` claims the
execution again, and a claim by the holder itself succeeds, so the hand-over keeps the row owned all the
way; from then on the manager renews the lease while steps run. Rows claimed but still queued behind the
concurrency limit are the worker's to keep alive: it renews their leases until it hands them over, and on
`SagaRecoveryWorker.stop` it releases those it never started so other workers take them at once.

What is not a failure. `SagaBusyError` (another worker, or another task of this process, is advancing the
execution) is skipped without counting. A database outage (a retriable `StorageError`, or an ``OSError``)
is not counted either: it is not the execution's fault, and counting it would dead-letter healthy sagas
during a long outage. The claim's lease runs out and the execution is retried once the database answers;
the worker backs off meanwhile. Everything else counts, as in python-cqrs.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal, Protocol, Self

from saga.errors import SagaBusyError, SagaError
from saga.execution import SagaExecution
from saga.hooks import SagaEvent, SagaHooks, call_hook
from storage import (
    ConcurrencyError,
    ExecutionNotFoundError,
    ExecutionRecord,
    SagaStatus,
    SagaStorage,
    StorageError,
)

__all__ = [
    "RecoveryOutcome",
    "RecoveryReport",
    "RecoveryResult",
    "RecoveryStats",
    "RecoveryTarget",
    "SagaRecoveryWorker",
    "is_outage",
    "recover_saga",
]

_log = logging.getLogger(__name__)

#: What became of one claimed execution.
#:
#: ``recovered``: the manager resumed it (it may now be PAUSED, FINISHED, ERRORED...);
#: ``failed``: recovery raised, one attempt was counted and the execution is FAILED;
#: ``dead_lettered``: that failure used the last attempt, the execution is DEAD_LETTER;
#: ``busy``: another worker holds it, nothing counted;
#: ``outage``: the database was unreachable, nothing counted;
#: ``released``: claimed but not started because the worker was stopping (claim released).
RecoveryOutcome = Literal["recovered", "failed", "dead_lettered", "busy", "outage", "released"]

#: Bounded retries of the optimistic DEAD_LETTER write when other writers keep moving the version.
_DEAD_LETTER_TRIES = 5
#: Longest error message kept in the structured error.
_MESSAGE_LIMIT = 2000


class RecoveryTarget(Protocol):
    """What recovery needs from the manager (`SagaManager` provides it)."""

    @property
    def storage(self) -> SagaStorage: ...

    @property
    def owner(self) -> str: ...

    @property
    def lease_seconds(self) -> float: ...

    async def recover(self, execution_id: uuid.UUID) -> SagaExecution: ...


def is_outage(exc: BaseException) -> bool:
    """Whether ``exc`` means the database (or the network to it) is away, rather than a bad execution."""
    return (isinstance(exc, StorageError) and exc.retriable) or isinstance(exc, OSError)


def _describe(exc: BaseException) -> dict[str, str]:
    message = str(exc) or type(exc).__name__
    return {"type": type(exc).__name__, "message": message[:_MESSAGE_LIMIT]}


@dataclass(frozen=True, slots=True)
class RecoveryResult:
    """The outcome of recovering one execution.

    Attributes:
        execution_id: The execution.
        outcome: See `RecoveryOutcome`.
        status: Its status afterwards, when known.
        attempts: Its recovery attempts after a counted failure.
        error: ``type`` and ``message`` of the exception that made the recovery fail.
        execution: The execution as the manager left it (``recovered`` only).
        exception: The exception itself (``failed``, ``dead_lettered``, ``outage``).
    """

    execution_id: uuid.UUID
    outcome: RecoveryOutcome
    status: SagaStatus | None = None
    attempts: int | None = None
    error: Mapping[str, str] | None = None
    execution: SagaExecution | None = field(default=None, repr=False, compare=False)
    exception: BaseException | None = field(default=None, repr=False, compare=False)


@dataclass(frozen=True, slots=True)
class RecoveryReport:
    """What one `SagaRecoveryWorker.run_once` pass did.

    Attributes:
        claimed: Executions claimed by this pass.
        results: One result per claimed execution, in completion order.
        duration: Seconds the pass took.
        outage: The database error that cut the pass short, if one did.
    """

    claimed: int
    results: tuple[RecoveryResult, ...] = ()
    duration: float = 0.0
    outage: BaseException | None = field(default=None, repr=False, compare=False)

    def ids(self, outcome: RecoveryOutcome) -> list[uuid.UUID]:
        """Ids of the executions with this outcome."""
        return [r.execution_id for r in self.results if r.outcome == outcome]

    @property
    def recovered(self) -> list[uuid.UUID]:
        """Ids resumed by the manager."""
        return self.ids("recovered")

    @property
    def failed(self) -> list[uuid.UUID]:
        """Ids whose recovery failed (attempt counted, now FAILED)."""
        return self.ids("failed")

    @property
    def dead_lettered(self) -> list[uuid.UUID]:
        """Ids moved to DEAD_LETTER by this pass."""
        return self.ids("dead_lettered")

    @property
    def busy(self) -> list[uuid.UUID]:
        """Ids another worker was advancing."""
        return self.ids("busy")


@dataclass(slots=True)
class RecoveryStats:
    """Counters of a `SagaRecoveryWorker` since it was built.

    Attributes:
        batches: Claim passes that reached the database.
        claimed: Executions claimed.
        recovered: Resumed by the manager.
        failed: Recoveries that raised (attempt counted), dead-lettered ones included.
        dead_lettered: Executions moved to DEAD_LETTER.
        busy: Skipped because another worker held them.
        released: Claimed but released unstarted at shutdown.
        outages: Database outages ridden out (one per outage, however many retries it took).
        errors: Unexpected errors of the loop itself (logged, then the loop carried on).
    """

    batches: int = 0
    claimed: int = 0
    recovered: int = 0
    failed: int = 0
    dead_lettered: int = 0
    busy: int = 0
    released: int = 0
    outages: int = 0
    errors: int = 0


# -- one execution ---------------------------------------------------------------------------------------


async def recover_saga(
    manager: RecoveryTarget,
    saga_id: uuid.UUID,
    *,
    max_recovery_attempts: int = 5,
) -> SagaExecution | None:
    """Resume one execution through ``manager.recover`` and count the attempt if that fails.

    On failure (any exception but the two below) the execution gets one more recovery attempt and status
    ``FAILED`` (``storage.increment_recovery_attempts(saga_id, new_status=FAILED)``, as in python-cqrs);
    once its attempts reach ``max_recovery_attempts`` it goes to ``DEAD_LETTER`` with a structured error
    (``type="recovery_exhausted"``, ``attempts``, ``last_error`` with the exception's type and message, and
    the execution's previous error as ``cause``). ``SagaManager.retry`` or ``set_recovery_attempts(id, 0)``
    makes it recoverable again. The original exception is then re-raised.

    Args:
        manager: The `SagaManager` (anything with ``storage``, ``owner``, ``lease_seconds``, ``recover``).
        saga_id: The execution.
        max_recovery_attempts: Attempts after which the execution is dead-lettered.

    Returns:
        The execution as the manager left it, or ``None`` when another worker holds it
        (`SagaBusyError`: not a failure, nothing counted).

    Raises:
        Exception: Whatever made the recovery fail, after the books were kept. A database outage (retriable
            `StorageError`, ``OSError``) is re-raised without counting an attempt.
    """
    result = await _recover_one(manager, saga_id, max_recovery_attempts)
    if result.outcome == "recovered":
        return result.execution
    if result.outcome == "busy":
        return None
    assert result.exception is not None
    raise result.exception


async def _recover_one(manager: RecoveryTarget, saga_id: uuid.UUID, max_attempts: int) -> RecoveryResult:
    """`recover_saga` without the raising: every outcome comes back as a `RecoveryResult`."""
    try:
        execution = await manager.recover(saga_id)
    except SagaBusyError:
        _log.info("execution %s: recovery skipped: another worker is advancing it", saga_id)
        return RecoveryResult(saga_id, "busy")
    except Exception as exc:
        if is_outage(exc):
            _log.warning("execution %s: recovery interrupted, database unavailable: %s", saga_id, exc)
            await _release(manager, saga_id)  # if the database is back already; else the lease runs out
            return RecoveryResult(saga_id, "outage", error=_describe(exc), exception=exc)
        return await _count_failure(manager, saga_id, exc, max_attempts)
    if execution.status is SagaStatus.FAILED:
        # The manager stored the run as FAILED without raising: still a failed recovery, or the worker
        # would pick it up again and again without the attempts ever reaching the limit.
        error = execution.error or {}
        failure = SagaError(
            str(error.get("error") or "execution left FAILED"), execution_id=saga_id, step=error.get("step")
        )
        return await _count_failure(manager, saga_id, failure, max_attempts)
    _log.info("execution %s: recovered, now %s", saga_id, execution.status)
    return RecoveryResult(saga_id, "recovered", status=execution.status, execution=execution)


async def _count_failure(
    manager: RecoveryTarget, saga_id: uuid.UUID, exc: BaseException, max_attempts: int
) -> RecoveryResult:
    """Count a failed attempt (status FAILED) and dead-letter the execution at the limit."""
    error = _describe(exc)
    storage = manager.storage
    try:
        await storage.increment_recovery_attempts(saga_id, new_status=SagaStatus.FAILED)
        record = await storage.load(saga_id)
    except Exception as book_error:
        outage = is_outage(book_error)
        _log.warning(
            "execution %s: recovery failed (%s: %s) and the attempt could not be counted: %s",
            saga_id,
            error["type"],
            error["message"],
            book_error,
            exc_info=None if outage or isinstance(book_error, ExecutionNotFoundError) else book_error,
        )
        if outage:
            return RecoveryResult(saga_id, "outage", error=error, exception=exc)
        return RecoveryResult(saga_id, "failed", error=error, exception=exc)
    attempts = record.recovery_attempts
    if attempts < max_attempts:
        _log.warning(
            "execution %s: recovery attempt %d of %d failed: %s: %s",
            saga_id,
            attempts,
            max_attempts,
            error["type"],
            error["message"],
            exc_info=exc,
        )
        await _release(manager, saga_id)
        return RecoveryResult(
            saga_id, "failed", status=record.status, attempts=attempts, error=error, exception=exc
        )
    try:
        dead = await _dead_letter(manager, saga_id, exc, max_attempts)
    except Exception as dl_error:
        # The execution stays FAILED at the limit, which recovery no longer selects: nothing resumes it,
        # it merely lacks the DEAD_LETTER status until the next failure or a person looks.
        _log.warning("execution %s: could not move it to DEAD_LETTER: %s", saga_id, dl_error)
        dead = None
    await _release(manager, saga_id)
    if dead is None:
        return RecoveryResult(
            saga_id, "failed", status=record.status, attempts=attempts, error=error, exception=exc
        )
    _log.error(
        "execution %s: moved to DEAD_LETTER after %d failed recovery attempts; last error: %s: %s",
        saga_id,
        dead.recovery_attempts,
        error["type"],
        error["message"],
        exc_info=exc,
    )
    return RecoveryResult(
        saga_id,
        "dead_lettered",
        status=SagaStatus.DEAD_LETTER,
        attempts=dead.recovery_attempts,
        error=error,
        exception=exc,
    )


async def _dead_letter(
    manager: RecoveryTarget, saga_id: uuid.UUID, exc: BaseException, max_attempts: int
) -> ExecutionRecord | None:
    """Move a FAILED execution at the attempt limit to DEAD_LETTER; ``None`` if someone moved it on.

    Claims the execution first (so a worker advancing it is never overtaken: it will count its own
    failure), then writes DEAD_LETTER with the optimistic version. A `ConcurrencyError` means another
    writer got in between; the execution is re-read and the decision taken again. Anything that brought
    it back (``retry``, ``set_recovery_attempts``, a reply) makes the re-check leave it alone.
    """
    storage = manager.storage
    for _ in range(_DEAD_LETTER_TRIES):
        record = await storage.claim(saga_id, manager.owner, lease_seconds=manager.lease_seconds)
        if record is None:
            _log.info("execution %s: not dead-lettered: another worker holds it now", saga_id)
            return None
        if record.status is not SagaStatus.FAILED or record.recovery_attempts < max_attempts:
            return None
        previous = None if record.error is None else dict(record.error)
        last = _describe(exc)
        step = getattr(exc, "step", None)
        if step is None and previous is not None:
            step = previous.get("step")
        error: dict[str, Any] = {
            "step": step,
            "type": "recovery_exhausted",
            "error": (
                f"recovery failed {record.recovery_attempts} times (limit {max_attempts}); "
                f"last error: {last['type']}: {last['message']}"
            ),
            "attempts": record.recovery_attempts,
            "max_recovery_attempts": max_attempts,
            "last_error": last,
            "cause": previous,
        }
        try:
            stored = await storage.save(
                dataclasses.replace(record, status=SagaStatus.DEAD_LETTER, error=error)
            )
        except ConcurrencyError:
            continue
        await _dead_letter_hooks(manager, stored)
        return stored
    _log.warning("execution %s: not dead-lettered: it kept changing under us", saga_id)
    return None


async def _dead_letter_hooks(manager: RecoveryTarget, record: ExecutionRecord) -> None:
    """Tell the manager's hooks, as the engine does for its own transitions (a hook never raises)."""
    hooks = getattr(manager, "hooks", None)
    if not isinstance(hooks, SagaHooks):
        return
    common: dict[str, Any] = {"status": SagaStatus.DEAD_LETTER, "previous_status": SagaStatus.FAILED}
    if hooks.on_status_changed is not None:
        await call_hook(
            hooks.on_status_changed, SagaEvent("on_status_changed", record.id, record.name, **common)
        )
    if hooks.on_dead_lettered is not None:
        event = SagaEvent("on_dead_lettered", record.id, record.name, error=record.error, **common)
        await call_hook(hooks.on_dead_lettered, event)


async def _release(manager: RecoveryTarget, saga_id: uuid.UUID) -> None:
    """Drop our claim if we still hold it (best effort: otherwise the lease runs out by itself)."""
    try:
        await manager.storage.release_claim(saga_id, manager.owner)
    except Exception as exc:
        _log.debug("execution %s: releasing the claim failed: %s", saga_id, exc)


# -- the worker ------------------------------------------------------------------------------------------


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
                        await _release(self.manager, record.id)
                    result = RecoveryResult(record.id, "released" if not outage else "outage")
                else:
                    result = await _recover_one(self.manager, record.id, self.max_recovery_attempts)
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
