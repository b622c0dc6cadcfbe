"""The manager's stepping loop: advance, save, publish — and the lease heartbeat around it.

`ExecutionDriver` is the part of `SagaManager` that turns an execution's transitions into storage writes
and broker sends. It is kept apart so the loop that matters for throughput reads on one screen: per step,
one callback, one encode, one ``storage.save``; nothing else unless the step pauses or ends.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from broker import BrokerClientPool, BrokerMessage
from saga.consumer import dead_letter_message
from saga.errors import SagaBusyError, SagaContextError, UnknownSagaDefinitionError
from saga.execution import SagaExecution, Transition
from saga.hooks import SagaHooks
from saga.messages import SagaResponse, SagaResponseStatus
from saga.publishing import CommandPublishing
from saga.registry import SagaRegistry
from saga.step_support import announce_start
from storage import (
    TERMINAL_STATUSES,
    ConcurrencyError,
    DuplicateReplyError,
    ExecutionNotFoundError,
    ExecutionRecord,
    ReplyRecord,
    SagaStatus,
    SagaStorage,
    StorageError,
    SupportsClaimMany,
    SupportsLoadMany,
)
from storage.records import OutboxClaim, OutboxMessage, ReplyOutcome

if TYPE_CHECKING:
    from saga.relay import OutboxRelay

__all__ = ["AlreadyAppliedError", "ExecutionDriver"]

_RUNNING = SagaStatus.RUNNING
_COMPENSATING = SagaStatus.COMPENSATING
_PAUSED = SagaStatus.PAUSED

_log = logging.getLogger(__name__)

#: Seconds published outbox ids wait to be marked sent together (`ExecutionDriver._mark_sent_soon`). Far
#: below any lease, so the relay never sees such a row as abandoned; a crash in between re-publishes it.
MARK_SENT_DELAY = 0.05


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _probe(storage: object, capability: str) -> bool:
    """See `ExecutionDriver._storage_supports`."""
    if capability == "claim_many":
        return isinstance(storage, SupportsClaimMany)
    if capability == "load_many":
        return isinstance(storage, SupportsLoadMany)
    method = storage.create if capability == "create_outbox_claim" else storage.save  # type: ignore[attr-defined]
    try:
        parameters = inspect.signature(method).parameters.values()
    except (TypeError, ValueError, AttributeError):
        return False
    return any(p.name == "outbox_claim" or p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)


class AlreadyAppliedError(Exception):
    """The reply's dedup row already exists: another worker applied that reply first."""


class ExecutionDriver(CommandPublishing):
    """Drives executions to their next pause or end (mixed into `SagaManager`)."""

    storage: SagaStorage
    broker_pool: BrokerClientPool
    registry: SagaRegistry
    dead_letter_topic: str
    wait_poll_interval: float
    owner: str
    lease_seconds: float
    #: ``lease_seconds`` as a timedelta.
    _lease: timedelta
    reply_topic: str
    hooks: SagaHooks | None
    clock: Callable[[], datetime]
    relay: OutboxRelay | None
    _active: set[uuid.UUID]
    _waiters: dict[uuid.UUID, list[asyncio.Future[SagaExecution | None]]]
    _early_waiters: dict[uuid.UUID, asyncio.Future[SagaExecution | None]]
    _closing: bool
    #: Executions being driven by this process, by id (the heartbeat renews their claims).
    _driving: dict[uuid.UUID, SagaExecution]
    _beat: asyncio.TimerHandle | None
    _beat_task: asyncio.Task[None] | None
    #: Until when each publish sweeps every unsent row (`publish_outbox`), set after a publish failed.
    _sweep_until: datetime | None = None
    #: Which optional capabilities the storage has, and for which storage object that was checked.
    _capabilities: tuple[object, dict[str, bool]] | None = None
    #: Outbox ids published but not yet marked sent, and the task marking them (`_mark_sent_soon`).
    _unmarked: list[int]
    _marker: asyncio.Task[None] | None = None
    #: What the marker waits on during its delay; resolved early by `_drain_marks`.
    _mark_wake: asyncio.Future[None] | None = None
    #: The one task that polls storage for every run waiting in ``run()`` (`_poll_waiting`).
    _poller: asyncio.Task[None] | None = None
    #: Recoveries of overdue waiting runs started by the poller, by execution id.
    _overdue: dict[uuid.UUID, asyncio.Task[None]]
    #: Claims asked for in this turn of the event loop, to be taken in one statement (`_take_claim`).
    _claim_batch: dict[uuid.UUID, asyncio.Future[ExecutionRecord | None]] | None = None
    _claims_in_flight: set[asyncio.Task[None]]
    #: Records of executions this process paused itself, claim released, by id, oldest first; at most
    #: ``paused_cache_size`` of them (`_remember_paused`, `_apply_unclaimed`).
    _paused: dict[uuid.UUID, ExecutionRecord]
    paused_cache_size: int

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
            self._beat_task = asyncio.get_running_loop().create_task(
                self._renew_claims(list(self._driving.values()))
            )
        self._start_beat()

    async def _renew_claims(self, executions: list[SagaExecution]) -> None:
        for execution in executions:
            if self._driving.get(execution.id) is not execution:
                continue  # finished meanwhile
            try:
                renewed = await self.storage.renew_claim(
                    execution.id, self.owner, lease_seconds=self.lease_seconds
                )
            except Exception as exc:  # transient: the lease still runs; try again at the next beat
                _log.warning("execution %s: renewing the claim failed: %s", execution.id, exc)
                continue
            if not renewed and self._driving.get(execution.id) is execution:
                # (A run that ended while the renewal was on its way released the claim itself.)
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
        claimed: bool = True,
    ) -> SagaExecution:
        """Advance, saving after every step, until the execution pauses, ends or fails.

        Args:
            execution: The execution, in step with ``stored``.
            stored: Its record as last stored (version for the optimistic save; fallback state for FAILED).
            transition: A transition already made (a reply applied, a replay) to persist first.
            reply: The applied-reply dedup row, written with the first save. When applying the reply
                leaves the execution running, that save is the one after the next step: a reply costs one
                transaction (dedup row, state, new outbox rows), as DESIGN §4 asks.
            wait: The caller will wait for the end: register its waiter before publishing, so a reply
                handled at once in this process cannot be missed.
            release: Release the claim when the execution ends too (it always is when it pauses). A fresh
                run skips it: the row is terminal, nobody will claim it, and the call would cost a
                statement on the hot path.
            claimed: Whether this process holds the claim. ``False`` (a reply applied to an execution this
                process paused, see `_apply_unclaimed`): the claim is taken before the first move that
                may run step code with effects, and until then the version-checked save decides.

        Raises:
            AlreadyAppliedError: ``reply`` had been applied by another worker; nothing was written.
            SagaBusyError: The claim was lost while a step ran; nothing more was written.
            SagaContextError: The context cannot be stored; the execution was marked FAILED.
            ConcurrencyError: Unclaimed only: the execution changed since ``stored``; nothing was written.
        """
        last = stored
        execution_id = execution.id
        driving = self._driving
        execution.claim_lost = False
        if claimed:
            driving[execution_id] = execution  # the heartbeat renews what is in here
            if self._beat is None:
                self._start_beat()
        written: list[tuple[Sequence[OutboxMessage], OutboxClaim | None]] = []
        saved_at = 0.0
        storage = self.storage
        clock = self.clock
        try:
            while True:
                if transition is None:
                    now = clock()
                    if not claimed and execution.next_move_runs_effects(now):
                        last = await self._claim_in_place(execution, last)
                        claimed = True
                    try:
                        transition = await execution.advance(now)
                    except Exception as exc:
                        await self._fail(execution, last, exc)
                        raise
                if transition.retry_after is not None:
                    await asyncio.sleep(transition.retry_after)
                    transition = None
                    continue
                if transition.outbox and transition.status is _PAUSED:
                    transition = await self._refuse_oversized(execution, last, transition)
                if transition.persist and reply is not None and transition.outcome == "applied":
                    status = transition.status
                    if status is _RUNNING or status is _COMPENSATING:
                        # One transaction per reply: the applied reply's state goes out with the next
                        # step's (its dedup row and any new command included), not in a save of its own.
                        transition = None
                        continue
                if transition.persist:
                    if execution.claim_lost:
                        raise SagaBusyError(
                            f"execution {execution_id}: claim lost while a step ran",
                            execution_id=execution_id,
                        )
                    status = transition.status
                    if status is _PAUSED or (release and execution.terminal):
                        # The save drops the claim in the same statement (SagaStorage.save writes the
                        # record's owner): no release_claim round trip after it.
                        owner, lease_until = None, None
                    else:
                        owner, lease_until = last.owner, last.lease_until
                    try:
                        record = execution.to_record(
                            owner=owner, lease_until=lease_until, step=transition.step
                        )
                    except SagaContextError as exc:
                        await self._fail(execution, last, exc)
                        raise
                    outbox = transition.outbox
                    try:
                        if outbox and self._storage_supports("outbox_claim"):
                            # Rows written claimed by us, their ids reported: published and marked sent
                            # below with no fetch_outbox round trip.
                            claim = OutboxClaim(self.owner, self.lease_seconds)
                            last = await storage.save(record, outbox=outbox, reply=reply, outbox_claim=claim)
                            written.append((outbox, claim))
                        else:
                            last = await storage.save(record, outbox=outbox, reply=reply)
                            if outbox:
                                written.append((outbox, None))
                    except DuplicateReplyError as exc:
                        raise AlreadyAppliedError(str(exc)) from exc
                    if outbox:
                        saved_at = time.monotonic()
                    execution.record_version = last.version
                    execution.updated_at = last.updated_at
                    reply = None
                status = transition.status
                if status is not _RUNNING and status is not _COMPENSATING:
                    break  # paused, ended or failed
                transition = None
        finally:
            driving.pop(execution_id, None)
        return await self._settle(
            execution,
            last,
            saved=last is not stored,
            written=written,
            wait=wait,
            release=release,
            saved_at=saved_at,
        )

    async def _settle(
        self,
        execution: SagaExecution,
        last: ExecutionRecord,
        *,
        saved: bool,
        written: Sequence[tuple[Sequence[OutboxMessage], OutboxClaim | None]],
        wait: bool,
        release: bool,
        saved_at: float,
    ) -> SagaExecution:
        """After a drive stopped: give the claim back if still held, publish, and tell who waits."""
        execution_id = execution.id
        # A save that paused or ended the run released the claim already (``last.owner`` is None); the
        # releases below only matter when the loop stopped without saving (nothing to persist).
        if execution.status is SagaStatus.PAUSED:
            if wait:
                self._early_waiters[execution_id] = self._waiter(execution_id)
            if last.owner is not None:
                await self._release(execution_id)
            elif saved:
                self._remember_paused(last)  # before the publish: its reply may come back at once
            self._active.discard(execution_id)
        elif release and last.owner is not None:
            await self._release(execution_id)
        if written:
            await self._flush_outbox(written, execution_id=execution_id, saved_at=saved_at)
        if execution.terminal:
            self._resolve_waiters(execution)
        return execution

    async def _create_and_drive(
        self, execution: SagaExecution, *, wait: bool, with_first_command: bool = True
    ) -> SagaExecution:
        """Store a new execution and drive it; when its first move only sends a command, in one statement.

        The row is created claimed by this manager (nobody else can see it before, so nobody else can be
        advancing it). A first step that is a remote step is built before the row exists and created
        already PAUSED with its command in the outbox: one ``create`` where a create and a save were two,
        with the same outcome. Any other first move (a local step, a condition) runs after the create,
        so that each step is durable before the next one starts; so does every first move without
        ``with_first_command``.

        Raises:
            DuplicateIdempotencyKeyError: From the create (nothing was run).
        """
        now = self.clock()
        record = execution.to_record(owner=self.owner, lease_until=now + self._lease)

        async def create(
            record: ExecutionRecord, outbox: Sequence[OutboxMessage] = (), claim: OutboxClaim | None = None
        ) -> ExecutionRecord:
            if claim is None:  # a storage written before ``outbox_claim`` may not take it
                stored = await self.storage.create(record)
            else:
                stored = await self.storage.create(record, outbox=outbox, outbox_claim=claim)
            execution.mark_stored(stored)
            if execution.hooks is not None:
                await announce_start(execution)
            return stored

        if (
            not with_first_command
            or execution.next_move_runs_effects(now)
            or not self._storage_supports("create_outbox_claim")
        ):
            return await self._drive(execution, await create(record), wait=wait, release=False)
        try:
            transition = await execution.advance(now)
            paused = None
            if (
                transition.status is _PAUSED
                and transition.outbox
                and transition.retry_after is None
                and self._oversized(transition.outbox) is None  # else the drive fails the step
            ):
                paused = execution.to_record(step=transition.step)  # no owner: created released
        except Exception as exc:
            await self._fail(execution, await create(record), exc)
            raise
        if paused is None:  # the command could not be built: compensating (or ended); persist that
            stored = await create(record)
            return await self._drive(execution, stored, transition=transition, wait=wait, release=False)
        claim = OutboxClaim(self.owner, self.lease_seconds)
        stored = await create(paused, transition.outbox, claim)
        return await self._settle(
            execution,
            stored,
            saved=True,
            written=[(transition.outbox, claim)],
            wait=wait,
            release=False,
            saved_at=time.monotonic(),
        )

    async def _guard(
        self, execution: SagaExecution, last: ExecutionRecord, move: Awaitable[Transition]
    ) -> Transition:
        """Run a state-machine move; an error outside step logic marks the execution FAILED and re-raises."""
        try:
            return await move
        except Exception as exc:
            await self._fail(execution, last, exc)
            raise

    async def _fail(self, execution: SagaExecution, last: ExecutionRecord, exc: Exception) -> None:
        """Store FAILED over the last good state (the step that broke runs again on recovery).

        Raises:
            ConcurrencyError: The execution changed since ``last`` (another worker moved it on); nothing
                was written.
        """
        if isinstance(exc, SagaContextError) and exc.execution_id is None:
            exc.execution_id = execution.id
        error = {"step": getattr(exc, "step", None), "error": str(exc), "type": type(exc).__name__}
        _log.error("execution %s failed outside step logic: %s", execution.id, exc)
        try:
            failed = SagaExecution.from_record(
                last, execution.definition, reply_topic=self.reply_topic, hooks=self.hooks, clock=self.clock
            )
            await failed.mark_failed(error)
            # owner=None: the save releases the claim too (recovery takes FAILED runs over).
            stored = await self.storage.save(failed.to_record())
            execution.mark_stored(stored)
            execution.status = SagaStatus.FAILED
            execution.error = error
        except ConcurrencyError as fenced:
            # Another worker moved the execution on since ``last``: this run's failure is void, and saying
            # so (instead of the step's error) keeps recovery from counting it as a failed attempt.
            _log.warning("execution %s: not marked FAILED: another worker moved it on", execution.id)
            raise fenced from exc
        except Exception:
            _log.exception(
                "execution %s: could not be marked FAILED; recovery will find it by its lease", execution.id
            )

    # -- plumbing shared by the manager's operations ---------------------------------------------------

    def _execution(self, record: ExecutionRecord) -> SagaExecution:
        """Rebuild a stored execution with its registered definition (`UnknownSagaDefinitionError`)."""
        definition = self.registry.get(record.name, record.definition_version, execution_id=record.id)
        return SagaExecution.from_record(
            record, definition, reply_topic=self.reply_topic, hooks=self.hooks, clock=self.clock
        )

    async def _claim(
        self, execution_id: uuid.UUID, *, keep_on_error: bool = False
    ) -> tuple[ExecutionRecord, SagaExecution]:
        """Take the claim and rebuild the execution; `SagaBusyError` if anyone else is advancing it.

        Every task of a process claims under the same owner, which storage cannot tell apart, so the id is
        reserved in ``_active`` before the first await: a second task of this process (the recovery
        worker and the reply consumer racing) then gets `SagaBusyError` instead of a claim of its own.
        On success the caller owns the reservation and must discard it when done (`_claimed`). With
        ``keep_on_error`` a claim taken for an execution that cannot be rebuilt is kept, for the caller's
        bookkeeping (recovery counts the failure under it); an unregistered definition always releases it.
        """
        if execution_id in self._active or execution_id in self._driving:
            raise SagaBusyError(
                f"execution {execution_id} is being advanced by this process", execution_id=execution_id
            )
        self._active.add(execution_id)
        self._paused.pop(execution_id, None)  # the claim changes the version: the copy is stale now
        try:
            record = await self._take_claim(execution_id)
            if record is None:
                raise SagaBusyError(
                    f"execution {execution_id} is claimed by another worker", execution_id=execution_id
                )
            try:
                return record, self._execution(record)
            except UnknownSagaDefinitionError:
                # Not this process's to count: the execution waits, unclaimed, for one that registers it.
                await self._release(execution_id)
                raise
            except Exception:
                if not keep_on_error:
                    await self._release(execution_id)
                raise
        except BaseException:
            self._active.discard(execution_id)
            raise

    async def _claim_in_place(self, execution: SagaExecution, last: ExecutionRecord) -> ExecutionRecord:
        """Claim an execution being advanced unclaimed, which must still be stored as ``last``.

        The claim bumps the version by one; anything else means another worker wrote the row since
        ``last`` was stored, and what was computed from ``last`` is void (`ConcurrencyError`, claim given
        back). On success the execution is registered for the heartbeat like any claimed drive.

        Raises:
            SagaBusyError: Another worker holds a live claim.
            ConcurrencyError: The row changed since ``last``.
        """
        execution_id = execution.id
        record = await self._take_claim(execution_id)
        if record is None:
            raise SagaBusyError(
                f"execution {execution_id} is claimed by another worker", execution_id=execution_id
            )
        if record.version != last.version + 1:
            await self._release(execution_id)
            raise ConcurrencyError(execution_id, last.version)
        execution.mark_stored(record)
        self._driving[execution_id] = execution
        if self._beat is None:
            self._start_beat()
        return record

    def _remember_paused(self, record: ExecutionRecord) -> None:
        """Keep the record of an execution this process just paused (and released), for its reply.

        When the reply comes back to this process, as it does unless the reply topic's partitions moved,
        the record in hand replaces the claim's read: see `_apply_unclaimed`. Bounded, oldest dropped
        first; a copy made stale by another worker only costs the fallback to a claim.
        """
        paused = self._paused
        paused[record.id] = record
        if len(paused) > self.paused_cache_size:
            del paused[next(iter(paused))]

    async def _take_claim(self, execution_id: uuid.UUID) -> ExecutionRecord | None:
        """``storage.claim``, batched: the claims asked for in one turn of the event loop share a statement.

        Replies fetched together are dispatched together, so under load their claims arrive in the same
        turn; one ``UPDATE ... WHERE id = ANY(...)`` then takes them all, where one each cost a round trip
        apiece. A single claim, or a storage without `SupportsClaimMany`, goes straight through.
        """
        if not self._storage_supports("claim_many"):
            return await self.storage.claim(execution_id, self.owner, lease_seconds=self.lease_seconds)
        loop = asyncio.get_running_loop()
        batch = self._claim_batch
        if batch is None:
            batch = self._claim_batch = {}
            loop.call_soon(self._start_claims, batch)
        future: asyncio.Future[ExecutionRecord | None] = loop.create_future()
        batch[execution_id] = future  # one per id: _claim reserved it in _active
        return await future

    def _start_claims(self, batch: dict[uuid.UUID, asyncio.Future[ExecutionRecord | None]]) -> None:
        if self._claim_batch is batch:
            self._claim_batch = None  # later claims start a batch of their own
        self._claim_task(self._claim_batched(batch))

    async def _claim_batched(self, batch: dict[uuid.UUID, asyncio.Future[ExecutionRecord | None]]) -> None:
        storage = self.storage
        owner, lease = self.owner, self.lease_seconds
        if len(batch) == 1:
            await self._claim_one(*next(iter(batch.items())))
            return
        assert isinstance(storage, SupportsClaimMany)
        try:
            found = await storage.claim_many(list(batch), owner, lease_seconds=lease)
        except Exception as exc:
            for future in batch.values():
                if not future.done():
                    future.set_exception(exc)
            return
        claimed = {record.id: record for record in found}
        missed = []
        for execution_id, future in batch.items():
            if execution_id in claimed:
                self._hand_over(execution_id, future, claimed.pop(execution_id))
            else:
                missed.append((execution_id, future))
        # Held by someone else, or unknown: each one's own claim tells which (and raises for the unknown,
        # to its caller alone); rare enough to cost a round trip apiece.
        for execution_id, future in missed:
            await self._claim_one(execution_id, future)

    async def _claim_one(
        self, execution_id: uuid.UUID, future: asyncio.Future[ExecutionRecord | None]
    ) -> None:
        try:
            record = await self.storage.claim(execution_id, self.owner, lease_seconds=self.lease_seconds)
        except Exception as exc:
            if not future.done():
                future.set_exception(exc)
            return
        self._hand_over(execution_id, future, record)

    def _hand_over(
        self,
        execution_id: uuid.UUID,
        future: asyncio.Future[ExecutionRecord | None],
        record: ExecutionRecord | None,
    ) -> None:
        if not future.done():
            future.set_result(record)
        elif record is not None:  # the caller gave up (cancelled) meanwhile: do not sit on the claim
            self._claim_task(self._release(execution_id))

    def _claim_task(self, work: Coroutine[object, object, None]) -> None:
        """Run claim bookkeeping in a task the manager keeps a reference to until it ends."""
        task = asyncio.get_running_loop().create_task(work)
        self._claims_in_flight.add(task)
        task.add_done_callback(self._claims_in_flight.discard)

    async def _release(self, execution_id: uuid.UUID) -> None:
        """Drop this manager's claim; a failure only delays others until the lease runs out."""
        try:
            await self.storage.release_claim(execution_id, self.owner)
        except StorageError as exc:  # the lease runs out by itself
            _log.warning("execution %s: releasing the claim failed: %s", execution_id, exc)

    def _storage_supports(self, capability: str) -> bool:
        """Whether the storage has an optional capability, checked once per storage object (a protocol
        ``isinstance`` or a signature inspection costs microseconds, and this is asked on every step):

        * ``outbox_claim``: ``save`` takes ``outbox_claim`` (a storage written before it may not);
        * ``create_outbox_claim``: ``create`` takes it;
        * ``claim_many``: `SupportsClaimMany`;
        * ``load_many``: `SupportsLoadMany`.
        """
        storage = self.storage
        known = self._capabilities
        if known is None or known[0] is not storage:
            known = self._capabilities = (storage, {})
        supported = known[1].get(capability)
        if supported is None:
            supported = known[1][capability] = _probe(storage, capability)
        return supported

    async def _refuse_oversized(
        self, execution: SagaExecution, last: ExecutionRecord, transition: Transition
    ) -> Transition:
        """Fail the step of a command too large to publish, before anything is stored: the step's retry
        policy, then compensation, take over as for a 500 reply (error ``publish_rejected``)."""
        while transition.outbox and transition.status is _PAUSED:
            found = self._oversized(transition.outbox)
            if found is None:
                break
            message, error = found
            assert message.request_id is not None
            _log.warning("execution %s: %s", execution.id, error["error"])
            refusal = SagaResponse(
                content=error,
                status=SagaResponseStatus.SYSTEM_ERROR,
                execution_id=execution.id,
                request_id=message.request_id,
            )
            transition = await self._guard(execution, last, execution.apply_reply(refusal, self.clock()))
        return transition

    def _mark_sent_soon(self, ids: Sequence[int]) -> None:
        """Mark published outbox rows sent in the background, many publishes per statement.

        The mark is bookkeeping, not a durability step: a row published but never marked is published
        again by the relay once its claim's lease ends, and participants answer a repeated command from
        their dedup store. So the step that published does not wait for it, and the marks wait up to
        `MARK_SENT_DELAY` to go out together: one ``UPDATE`` for every publish of that while, instead of
        one per publish competing with the steps for the event loop (and the database) when few run.
        """
        self._unmarked.extend(ids)
        marker = self._marker
        if marker is None or marker.done():
            self._marker = asyncio.get_running_loop().create_task(self._mark_sent(), name="saga-outbox-mark")

    async def _mark_sent(self) -> None:
        loop = asyncio.get_running_loop()
        while self._unmarked:
            if not self._closing:
                wake = self._mark_wake = loop.create_future()
                timer = loop.call_later(MARK_SENT_DELAY, _wake, wake)
                try:
                    await wake
                finally:
                    timer.cancel()
                    self._mark_wake = None
            ids, self._unmarked = self._unmarked, []
            try:
                await self.storage.mark_outbox_sent(ids)
            except Exception as exc:  # the relay re-publishes them after their lease; that is all it costs
                _log.warning(
                    "marking %d outbox rows sent failed (%s); they will be published again", len(ids), exc
                )

    async def _drain_marks(self) -> None:
        """Write pending sent-marks now, without their delay, and wait for them (before storage stops)."""
        marker = self._marker
        if marker is not None and not marker.done():
            if self._mark_wake is not None:
                _wake(self._mark_wake)
            await asyncio.wait({marker})
        self._marker = None

    async def _ignore_reply(
        self,
        execution: SagaExecution,
        response: SagaResponse,
        outcome: ReplyOutcome,
        message: BrokerMessage | None,
    ) -> None:
        """Record a reply that changes nothing; an unknown-status one also goes to the dead-letter topic."""
        if _log.isEnabledFor(logging.INFO):
            _log.info(
                "execution %s: %s reply to request %s (status %s) ignored",
                execution.id,
                outcome,
                response.request_id,
                response.status,
            )
        reason = f"{outcome}: status {int(response.status)}" if outcome == "unknown_status" else outcome
        try:
            await self.storage.record_reply(
                ReplyRecord(execution.id, response.request_id, int(response.status), outcome, reason=reason)
            )
        finally:
            await self._release(execution.id)
        if outcome == "unknown_status":
            original = message if message is not None else response.to_message(self.reply_topic)
            copy = dead_letter_message(original, self.dead_letter_topic, reason, code=outcome)
            await self.broker_pool.publisher().send(copy)

    async def _wait(self, execution_id: uuid.UUID) -> SagaExecution:
        """Wait for a terminal status: resolved by this process's reply handling, else by the poller.

        The waiter is a future; the execution is not held in memory meanwhile. Progress made by another
        process (its consumer took the reply) and overdue replies are noticed by `_poll_waiting`, one task
        for all waiting runs, so waiting costs no storage reads of its own.
        """
        future = self._early_waiters.pop(execution_id, None) or self._waiter(execution_id)
        self._ensure_poller()
        try:
            result = await future
            if result is not None:
                return result
            return self._execution(await self.storage.load(execution_id))  # shutting down
        finally:
            self._drop_waiter(execution_id, future)

    def _ensure_poller(self) -> None:
        poller = self._poller
        if (poller is None or poller.done()) and not self._closing:
            self._poller = asyncio.get_running_loop().create_task(
                self._poll_waiting(), name="saga-wait-poller"
            )

    async def _poll_waiting(self) -> None:
        """Every ``wait_poll_interval``, read all waiting runs in one query (chunks of 500) and settle them.

        A run found terminal resolves its waiters; one whose reply is overdue is recovered (replayed or
        compensated, as its retry policy says) in a task of its own. Runs being advanced by this process
        at that moment are skipped: their own drive resolves them. Stops when nobody waits.
        """
        while self._waiters and not self._closing:
            await asyncio.sleep(self.wait_poll_interval)
            ids = [i for i in self._waiters if i not in self._driving and i not in self._overdue]
            for start in range(0, len(ids), 500):
                try:
                    records = await self._load_many(ids[start : start + 500])
                except Exception as exc:  # storage away: waiters keep waiting; try at the next interval
                    _log.warning("polling %d waiting executions failed: %s", len(ids), exc)
                    break
                now = self.clock()
                for record in records:
                    if record.status in TERMINAL_STATUSES:
                        try:
                            execution = self._execution(record)
                        except Exception as exc:
                            self._fail_waiters(record.id, exc)
                            continue
                        self._resolve_waiters(execution)
                    elif record.reply_deadline is not None and record.reply_deadline <= now:
                        self._overdue[record.id] = asyncio.get_running_loop().create_task(
                            self._recover_waiting(record.id)
                        )

    async def _load_many(self, ids: list[uuid.UUID]) -> Sequence[ExecutionRecord]:
        storage = self.storage
        if self._storage_supports("load_many"):  # one query for all
            assert isinstance(storage, SupportsLoadMany)
            found: Sequence[ExecutionRecord] = await storage.load_many(ids)
            for missing in set(ids).difference(r.id for r in found):
                self._fail_waiters(missing, ExecutionNotFoundError(missing))
            return found
        records = []
        for execution_id in ids:
            try:
                records.append(await storage.load(execution_id))
            except ExecutionNotFoundError as exc:
                self._fail_waiters(execution_id, exc)
        return records

    async def _recover_waiting(self, execution_id: uuid.UUID) -> None:
        try:
            recovered = await self.recover(execution_id)
        except SagaBusyError:
            return  # someone is advancing it; the next poll looks again
        except Exception as exc:
            _log.warning("execution %s: recovering an overdue reply failed: %s", execution_id, exc)
            await self._release(execution_id)  # recover keeps the claim for a caller that counts
            return
        finally:
            self._overdue.pop(execution_id, None)
        if recovered.terminal:
            self._resolve_waiters(recovered)

    def _fail_waiters(self, execution_id: uuid.UUID, exc: BaseException) -> None:
        for future in self._waiters.get(execution_id, ()):
            if not future.done():
                future.set_exception(exc)

    def _waiter(self, execution_id: uuid.UUID) -> asyncio.Future[SagaExecution | None]:
        future: asyncio.Future[SagaExecution | None] = asyncio.get_running_loop().create_future()
        if self._closing:
            future.set_result(None)
        self._waiters.setdefault(execution_id, []).append(future)
        return future

    def _drop_waiter(self, execution_id: uuid.UUID, future: asyncio.Future[SagaExecution | None]) -> None:
        futures = self._waiters.get(execution_id)
        if futures is not None:
            if future in futures:
                futures.remove(future)
            if not futures:
                del self._waiters[execution_id]

    def _resolve_waiters(self, execution: SagaExecution) -> None:
        waiters = self._waiters
        if not waiters:
            return  # the common case (no one waits by id): no UUID hash
        for future in waiters.get(execution.id, ()):
            if not future.done():
                future.set_result(execution)

    if TYPE_CHECKING:

        async def recover(self, execution_id: uuid.UUID) -> SagaExecution:
            """Provided by `SagaManager`."""
