"""Recovering one execution: `recover_saga` and the books it keeps when the recovery fails.

A failure counts one recovery attempt and leaves the execution ``FAILED`` (python-cqrs semantics); the
failure that reaches the limit moves it to ``DEAD_LETTER`` with a structured error so a person looks at it.
A busy execution, a database outage or a definition version this process does not register counts nothing
(see the package docstring for why).
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
    ConcurrencyError,
    ExecutionNotFoundError,
    ExecutionRecord,
    SagaStatus,
    SagaStorage,
    StorageError,
)

__all__ = ["RecoveryTarget", "is_outage", "recover_one", "recover_saga", "release_claim"]

_log = logging.getLogger(__name__)

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
        await release_claim(manager, saga_id)
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
    await release_claim(manager, saga_id)
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


async def release_claim(manager: RecoveryTarget, saga_id: uuid.UUID) -> None:
    """Drop our claim if we still hold it (best effort: otherwise the lease runs out by itself)."""
    try:
        await manager.storage.release_claim(saga_id, manager.owner)
    except Exception as exc:
        _log.debug("execution %s: releasing the claim failed: %s", saga_id, exc)
