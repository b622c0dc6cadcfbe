"""Recovering one execution: `recover_saga` and the books it keeps when the recovery fails.

A failure counts one recovery attempt and leaves the execution ``FAILED`` (python-cqrs semantics); the
failure that reaches the limit moves it to ``DEAD_LETTER`` with a structured error so a person looks at it.
A busy execution, a database outage or a definition version this process does not register counts nothing
(see the package docstring for why), and neither does a lost race: the bookkeeping is fenced by the
version (and claim) the worker read, so a worker that stalled past its lease while another finished the
saga never writes FAILED or DEAD_LETTER over it, and nothing moves a terminal execution back. The seed
methods (``increment_recovery_attempts``, ``set_recovery_attempts``) keep their unconditional python-cqrs
semantics for callers; the worker does not use them.
`SagaRecoveryWorker` uses `recover_one`, which returns every outcome instead of raising.
"""

from __future__ import annotations

import dataclasses
import logging
import uuid
from typing import Any, Protocol

from saga.errors import SagaBusyError, SagaError, UnknownSagaDefinitionError
from saga.execution import SagaExecution
from saga.hooks import SagaEvent, SagaHooks, call_hook
from saga.recovery.outcomes import RecoveryResult
from storage import (
    TERMINAL_STATUSES,
    ConcurrencyError,
    ExecutionNotFoundError,
    ExecutionRecord,
    SagaStatus,
    SagaStorage,
    StorageError,
)

__all__ = ["RecoveryTarget", "is_outage", "recover_one", "recover_saga", "release_claim"]

_log = logging.getLogger(__name__)

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


async def recover_saga(
    manager: RecoveryTarget,
    saga_id: uuid.UUID,
    *,
    max_recovery_attempts: int = 5,
) -> SagaExecution | None:
    """Resume one execution through ``manager.recover`` and count the attempt if that fails.

    On failure (any exception but the ones below) the execution gets one more recovery attempt and status
    ``FAILED`` (python-cqrs semantics, written as a version-checked save: see `_count_failure`);
    once its attempts reach ``max_recovery_attempts`` it goes to ``DEAD_LETTER`` with a structured error
    (``type="recovery_exhausted"``, ``attempts``, ``last_error`` with the exception's type and message, and
    the execution's previous error as ``cause``). ``SagaManager.retry`` or ``set_recovery_attempts(id, 0)``
    makes it recoverable again. The original exception is then re-raised.

    Args:
        manager: The `SagaManager` (anything with ``storage``, ``owner``, ``lease_seconds``, ``recover``).
        saga_id: The execution.
        max_recovery_attempts: Attempts after which the execution is dead-lettered.

    Returns:
        The execution as the manager left it, or ``None`` when another worker holds it or moved it on
        (`SagaBusyError`, `ConcurrencyError`: not a failure, nothing counted).

    Raises:
        Exception: Whatever made the recovery fail, after the books were kept. A database outage (retriable
            `StorageError`, ``OSError``) is re-raised without counting an attempt.
    """
    result = await recover_one(manager, saga_id, max_recovery_attempts)
    if result.outcome == "recovered":
        return result.execution
    if result.outcome == "busy":
        return None
    assert result.exception is not None
    raise result.exception


async def recover_one(manager: RecoveryTarget, saga_id: uuid.UUID, max_attempts: int) -> RecoveryResult:
    """`recover_saga` without the raising: every outcome comes back as a `RecoveryResult`."""
    try:
        execution = await manager.recover(saga_id)
    except SagaBusyError:
        _log.info("execution %s: recovery skipped: another worker is advancing it", saga_id)
        return RecoveryResult(saga_id, "busy")
    except UnknownSagaDefinitionError as exc:
        # Not a failed attempt: the execution waits for a process that registers its definition version
        # (the manager released the claim without touching it).
        _log.debug("execution %s: recovery skipped: %s", saga_id, exc)
        return RecoveryResult(saga_id, "released")
    except ConcurrencyError:
        # Our write was fenced off: another worker moved the execution on. Not a failed attempt.
        _log.info("execution %s: recovery superseded: another worker moved it on", saga_id)
        await release_claim(manager, saga_id)
        return RecoveryResult(saga_id, "busy")
    except Exception as exc:
        if is_outage(exc):
            _log.warning("execution %s: recovery interrupted, database unavailable: %s", saga_id, exc)
            # Release if the database is back already; else the lease runs out.
            await release_claim(manager, saga_id)
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


def _still_ours(record: ExecutionRecord, owner: str) -> bool:
    """Whether a failed recovery's execution is still where that recovery left it.

    Ours: we still hold its claim (`SagaManager.recover` keeps it when it raises), or the failure was
    stored (FAILED, claim released by that save). A terminal execution, or one another worker holds or
    has moved on (any other status, unclaimed), is not: its version has moved past what we read, and
    counting our failure on it would rewrite another worker's progress.
    """
    if record.status in TERMINAL_STATUSES:
        return False
    return record.owner == owner or (record.owner is None and record.status is SagaStatus.FAILED)


async def _count_failure(
    manager: RecoveryTarget, saga_id: uuid.UUID, exc: BaseException, max_attempts: int
) -> RecoveryResult:
    """Count a failed attempt (status FAILED), or at the limit dead-letter the execution, fenced.

    The write is the version-checked ``save`` of the record as read here, and only if the execution is
    still ours (`_still_ours`): a `ConcurrencyError` or a record moved on means another worker got there
    first, which is not a failure of ours (outcome ``busy``, nothing written). The attempt that reaches the
    limit writes DEAD_LETTER with its structured error in the same statement (and, as every save that
    moves past a request, cancels the execution's unsent commands).
    """
    error = _describe(exc)
    storage = manager.storage
    owner = manager.owner
    try:
        record = await storage.load(saga_id)
        if not _still_ours(record, owner):
            _log.info(
                "execution %s: recovery failed (%s: %s) but another worker has moved it on (%s); not counted",
                saga_id,
                error["type"],
                error["message"],
                record.status,
            )
            await release_claim(manager, saga_id)
            return RecoveryResult(saga_id, "busy", status=record.status, error=error)
        attempts = record.recovery_attempts + 1
        if attempts < max_attempts:
            failed = dataclasses.replace(
                record, status=SagaStatus.FAILED, recovery_attempts=attempts, owner=None, lease_until=None
            )
        else:
            failed = dataclasses.replace(
                record,
                status=SagaStatus.DEAD_LETTER,
                recovery_attempts=attempts,
                owner=None,
                lease_until=None,
                awaiting_request=None,
                error=_exhausted(record, exc, attempts, max_attempts),
            )
        stored = await storage.save(failed)
    except ConcurrencyError:
        _log.info("execution %s: recovery failed, but another worker moved it on; not counted", saga_id)
        return RecoveryResult(saga_id, "busy", error=error)
    except Exception as book_error:
        await release_claim(manager, saga_id)
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
    if stored.status is SagaStatus.FAILED:
        _log.warning(
            "execution %s: recovery attempt %d of %d failed: %s: %s",
            saga_id,
            attempts,
            max_attempts,
            error["type"],
            error["message"],
            exc_info=exc,
        )
        return RecoveryResult(
            saga_id, "failed", status=stored.status, attempts=attempts, error=error, exception=exc
        )
    await _dead_letter_hooks(manager, stored)
    _log.error(
        "execution %s: moved to DEAD_LETTER after %d failed recovery attempts; last error: %s: %s",
        saga_id,
        stored.recovery_attempts,
        error["type"],
        error["message"],
        exc_info=exc,
    )
    return RecoveryResult(
        saga_id,
        "dead_lettered",
        status=SagaStatus.DEAD_LETTER,
        attempts=stored.recovery_attempts,
        error=error,
        exception=exc,
    )


def _exhausted(
    record: ExecutionRecord, exc: BaseException, attempts: int, max_attempts: int
) -> dict[str, Any]:
    """The structured error of an execution dead-lettered because its recovery attempts ran out."""
    previous = None if record.error is None else dict(record.error)
    last = _describe(exc)
    step = getattr(exc, "step", None)
    if step is None and previous is not None:
        step = previous.get("step")
    return {
        "step": step,
        "type": "recovery_exhausted",
        "error": (
            f"recovery failed {attempts} times (limit {max_attempts}); "
            f"last error: {last['type']}: {last['message']}"
        ),
        "attempts": attempts,
        "max_recovery_attempts": max_attempts,
        "last_error": last,
        "cause": previous,
    }


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


async def release_claim(manager: RecoveryTarget, saga_id: uuid.UUID) -> None:
    """Drop our claim if we still hold it (best effort: otherwise the lease runs out by itself)."""
    try:
        await manager.storage.release_claim(saga_id, manager.owner)
    except Exception as exc:
        _log.debug("execution %s: releasing the claim failed: %s", saga_id, exc)
