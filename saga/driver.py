"""The manager's stepping loop: advance, save, publish — and the lease heartbeat around it.

`ExecutionDriver` is the part of `SagaManager` that turns an execution's transitions into storage writes
and broker sends. It is kept apart so the loop that matters for throughput reads on one screen: per step,
one callback, one encode, one ``storage.save``; nothing else unless the step pauses or ends.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import TYPE_CHECKING

from saga.errors import SagaBusyError, SagaContextError
from saga.execution import SagaExecution, Transition
from saga.hooks import SagaHooks
from storage import DuplicateReplyError, ExecutionRecord, ReplyRecord, SagaStatus, SagaStorage

if TYPE_CHECKING:
    from saga.relay import OutboxRelay

__all__ = ["AlreadyAppliedError", "ExecutionDriver"]

_RUNNING = SagaStatus.RUNNING
_COMPENSATING = SagaStatus.COMPENSATING

_log = logging.getLogger(__name__)


class AlreadyAppliedError(Exception):
    """The reply's dedup row already exists: another worker applied that reply first."""


class ExecutionDriver:
    """Drives executions to their next pause or end (mixed into `SagaManager`)."""

    storage: SagaStorage
    owner: str
    lease_seconds: float
    reply_topic: str
    hooks: SagaHooks | None
    clock: Callable[[], datetime]
    relay: OutboxRelay | None
    _active: set[uuid.UUID]
    _waiters: dict[uuid.UUID, list[asyncio.Future[SagaExecution | None]]]
    _early_waiters: dict[uuid.UUID, asyncio.Future[SagaExecution | None]]
    #: Executions being driven by this process (the heartbeat renews their claims; identity-hashed).
    _driving: set[SagaExecution]
    _beat: asyncio.TimerHandle | None
    _beat_task: asyncio.Task[None] | None

    # -- heartbeat -------------------------------------------------------------------------------------
    #
    # One timer per manager, not one per run: every third of the lease it renews the claims of the
    # executions being driven at that moment. A run shorter than that (nearly all) costs a dict entry.

    def _start_beat(self) -> None:
        self._beat = asyncio.get_running_loop().call_later(self.lease_seconds / 3, self._on_beat)

    def _on_beat(self) -> None:
        self._beat = None
        if not self._driving:
            return  # idle: the next run starts the timer again
        previous = self._beat_task
        if previous is None or previous.done():
            self._beat_task = asyncio.get_running_loop().create_task(self._renew_claims(list(self._driving)))
        self._start_beat()

    async def _renew_claims(self, executions: list[SagaExecution]) -> None:
        for execution in executions:
            if execution not in self._driving:
                continue  # finished meanwhile
            try:
                renewed = await self.storage.renew_claim(
                    execution.id, self.owner, lease_seconds=self.lease_seconds
                )
            except Exception as exc:  # transient: the lease still runs; try again at the next beat
                _log.warning("execution %s: renewing the claim failed: %s", execution.id, exc)
                continue
            if not renewed:
                execution.claim_lost = True
                _log.warning(
                    "execution %s: claim lost to another worker; its state will not be saved", execution.id
                )

    def _stop_beat(self) -> None:
        if self._beat is not None:
            self._beat.cancel()
            self._beat = None
        if self._beat_task is not None and not self._beat_task.done():
            self._beat_task.cancel()
        self._beat_task = None

    # -- driving ---------------------------------------------------------------------------------------

    async def _drive(
        self,
        execution: SagaExecution,
        stored: ExecutionRecord,
        *,
        transition: Transition | None = None,
        reply: ReplyRecord | None = None,
        wait: bool = False,
        release: bool = True,
    ) -> SagaExecution:
        """Advance, saving after every step, until the execution pauses, ends or fails.

        Args:
            execution: The execution, in step with ``stored``.
            stored: Its record as last stored (version for the optimistic save; fallback state for FAILED).
            transition: A transition already made (a reply applied, a replay) to persist first.
            reply: The applied-reply dedup row, written with the first save.
            wait: The caller will wait for the end: register its waiter before publishing, so a reply
                handled at once in this process cannot be missed.
            release: Release the claim when the execution ends too (it always is when it pauses). A fresh
                run skips it: the row is terminal, nobody will claim it, and the call would cost a
                statement on the hot path.

        Raises:
            AlreadyAppliedError: ``reply`` had been applied by another worker; nothing was written.
            SagaBusyError: The claim was lost while a step ran; nothing more was written.
            SagaContextError: The context cannot be stored; the execution was marked FAILED.
        """
        last = stored
        execution_id = execution.id
        driving = self._driving
        execution.claim_lost = False
        driving.add(execution)
        if self._beat is None:
            self._start_beat()
        published = False
        storage = self.storage
        clock = self.clock
        try:
            while True:
                if transition is None:
                    try:
                        transition = await execution.advance(clock())
                    except Exception as exc:
                        await self._fail(execution, last, exc)
                        raise
                if transition.retry_after is not None:
                    await asyncio.sleep(transition.retry_after)
                    transition = None
                    continue
                if transition.persist:
                    if execution.claim_lost:
                        raise SagaBusyError(
                            f"execution {execution_id}: claim lost while a step ran",
                            execution_id=execution_id,
                        )
                    try:
                        record = execution.to_record(
                            owner=last.owner, lease_until=last.lease_until, step=transition.step
                        )
                    except SagaContextError as exc:
                        await self._fail(execution, last, exc)
                        raise
                    try:
                        last = await storage.save(record, outbox=transition.outbox, reply=reply)
                    except DuplicateReplyError as exc:
                        raise AlreadyAppliedError(str(exc)) from exc
                    execution.record_version = last.version
                    execution.updated_at = last.updated_at
                    reply = None
                    if transition.outbox:
                        published = True
                status = transition.status
                if status is not _RUNNING and status is not _COMPENSATING:
                    break  # paused, ended or failed
                transition = None
        finally:
            driving.discard(execution)
        if execution.status is SagaStatus.PAUSED:
            if wait:
                self._early_waiters[execution_id] = self._waiter(execution_id)
            if last.owner is not None:
                await self._release(execution_id)
            self._active.discard(execution_id)
        elif release and last.owner is not None:
            await self._release(execution_id)
        if published:
            await self._flush_outbox()
        if execution.terminal:
            self._resolve_waiters(execution)
        return execution

    async def _guard(
        self, execution: SagaExecution, last: ExecutionRecord, move: Awaitable[Transition]
    ) -> Transition:
        """Run a state-machine move; an error outside step logic marks the execution FAILED and re-raises."""
        try:
            return await move
        except Exception as exc:
            if not isinstance(exc, SagaBusyError):
                await self._fail(execution, last, exc)
            raise

    async def _fail(self, execution: SagaExecution, last: ExecutionRecord, exc: Exception) -> None:
        """Store FAILED over the last good state (the step that broke runs again on recovery)."""
        if isinstance(exc, SagaContextError) and exc.execution_id is None:
            exc.execution_id = execution.id
        error = {"step": getattr(exc, "step", None), "error": str(exc), "type": type(exc).__name__}
        _log.error("execution %s failed outside step logic: %s", execution.id, exc)
        try:
            failed = SagaExecution.from_record(
                last, execution.definition, reply_topic=self.reply_topic, hooks=self.hooks, clock=self.clock
            )
            await failed.mark_failed(error)
            stored = await self.storage.save(failed.to_record(owner=last.owner, lease_until=last.lease_until))
            execution.mark_stored(stored)
            execution.status = SagaStatus.FAILED
            execution.error = error
            await self._release(execution.id)
        except Exception:
            _log.exception(
                "execution %s: could not be marked FAILED; recovery will find it by its lease", execution.id
            )

    # Provided by SagaManager.

    async def _release(self, execution_id: uuid.UUID) -> None:
        raise NotImplementedError

    async def _flush_outbox(self) -> None:
        raise NotImplementedError

    def _waiter(self, execution_id: uuid.UUID) -> asyncio.Future[SagaExecution | None]:
        raise NotImplementedError

    def _resolve_waiters(self, execution: SagaExecution) -> None:
        raise NotImplementedError
