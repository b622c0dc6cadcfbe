"""`SagaManager`: runs sagas durably — the only place where executions meet storage and the broker.

Durability rules (DESIGN §4), in the order they happen:

1. A new run is inserted first (status RUNNING, claimed by this process with a lease), before any step.
2. After each step the state is saved: exactly one ``storage.save`` per step on the hot path.
3. A remote step's command goes into the ``outbox`` of the same save that stores the PAUSED state; only
   then is it published (and marked sent). A crash in between leaves the row to `OutboxRelay`.
4. A reply is applied under a claim, in one transaction with the step that follows it: dedup row, state and
   any new command commit together; the Kafka offset is committed after that (`ReplyConsumer`).
5. The terminal save carries the commit/reject messages (autocommit), once per participant service.

Claims: the manager identifies itself as ``owner``. Within one process, a set of executions being driven
keeps two tasks from advancing the same execution; across processes, the storage claim (with a lease
renewed by a heartbeat while callbacks run) does.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import socket
import uuid
from collections.abc import Callable, Mapping
from datetime import datetime, timedelta
from typing import Any, Literal, overload

from dependency_injector.wiring import Provide

from broker import BrokerClientPool, BrokerMessage
from saga import execution_steps as _steps
from saga.arguments import check_header_text, check_user, same_saga
from saga.clock import DatabaseClock
from saga.consumer import DEFAULT_REPLY_CONCURRENCY, ReplyConsumer
from saga.context import SagaContext
from saga.definitions import Saga
from saga.driver import AlreadyAppliedError, ExecutionDriver
from saga.errors import (
    MalformedMessageError,
    SagaBusyError,
    SagaConfigError,
    SagaExecutionError,
    SagaStateError,
)
from saga.execution import SagaExecution
from saga.hooks import SagaHooks
from saga.limits import MAX_INTERVAL_SECONDS, MAX_LEASE_SECONDS, check_seconds
from saga.messages import AWAITED_REQUEST_ID, SagaResponse
from saga.observability import logs as _logs
from saga.observability import tracing as _tracing
from saga.parking import clear_parked, keep_reply, parked_replies
from saga.registry import SagaRegistry
from saga.relay import OutboxRelay
from saga.trace_context import resolve_trace_context
from storage import (
    ConcurrencyError,
    DuplicateIdempotencyKeyError,
    ExecutionRecord,
    ReplyRecord,
    SagaStatus,
    SagaStorage,
)
from storage.records import OutboxClaim, ReplyOutcome

__all__ = ["SagaManager"]

_log = logging.getLogger(__name__)


def _default_owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def _check_resolved(value: object, name: str) -> None:
    # dependency-injector markers (Provide[...], Provider[...], Closing[...]) all carry this class flag.
    if getattr(type(value), "__IS_MARKER__", False):
        raise SagaConfigError(
            name,
            f"got the unresolved dependency-injector marker {value!r}: pass a {name} explicitly, or build "
            "the manager in a process wired by a container that provides it "
            "(saga.container.create_container)",
        )


class SagaManager(ExecutionDriver):
    """Starts, resumes and recovers saga executions.

    Args:
        storage: Where executions live.
        broker_pool: Transport for commands, replies and decisions. Injected by a wired dependency-injector
            container (``Provide["broker_pool"]``); outside one, pass it explicitly. In a process where a
            container wired ``saga.manager``, pass it by keyword (``broker_pool=...``): the wiring adds the
            keyword itself, and a positional pool would then be given twice.
        service_name: This orchestrator's service name (topic defaults derive from it).
        reply_topic: Where participants reply (default ``"{service_name}Reply"``, as in Minos).
        dead_letter_topic: Where unusable replies go (default ``"{service_name}DeadLetter"``).
        registry: Definitions by ``(name, version)``; a new one by default.
        hooks: Lifecycle hooks called as executions progress.
        owner: Claim owner identity (default ``"{hostname}:{pid}:{random}"``).
        lease_seconds: Claim lease; renewed every third of it while a step runs.
        consume_replies: Whether ``setup()`` starts the `ReplyConsumer`.
        relay_outbox: Whether ``setup()`` starts the `OutboxRelay`.
        relay_interval: Seconds between relay passes.
        consumer_group: Reply consumer group (default ``"{service_name}-orchestrator"``).
        reply_concurrency: Most replies the reply consumer has in progress at once (see `ReplyConsumer`).
        wait_poll_interval: While ``run(pause_on_disk=False)`` waits, how often the manager re-reads the
            waiting executions (all in one query) to notice progress made by another process (and to act
            on an overdue reply).
        clock: Source of "now" (timezone-aware); default the database's clock (`saga.clock.DatabaseClock`,
            so deadlines and leases are set on the clock they are compared on); tests pass a controllable
            one.
        paused_cache_size: How many executions this manager paused keep their record in memory, so that
            applying their reply needs no claim statement (see `handle_reply`); 0 turns that off.

    Raises:
        SagaConfigError: ``broker_pool`` (or ``storage``) is an unresolved ``Provide`` marker, or an option
            is out of range.
    """

    def __init__(
        self,
        storage: SagaStorage,
        broker_pool: BrokerClientPool = Provide["broker_pool"],
        *,
        service_name: str = "saga",
        reply_topic: str | None = None,
        dead_letter_topic: str | None = None,
        registry: SagaRegistry | None = None,
        hooks: SagaHooks | None = None,
        owner: str | None = None,
        lease_seconds: float = 30.0,
        consume_replies: bool = True,
        relay_outbox: bool = True,
        relay_interval: float = 1.0,
        consumer_group: str | None = None,
        reply_concurrency: int = DEFAULT_REPLY_CONCURRENCY,
        wait_poll_interval: float = 1.0,
        clock: Callable[[], datetime] | None = None,
        paused_cache_size: int = 4096,
    ) -> None:
        _check_resolved(broker_pool, "broker_pool")
        _check_resolved(storage, "storage")
        if not service_name:
            raise SagaConfigError("service_name", "must be a non-empty string")
        for key, value, maximum in (
            ("lease_seconds", lease_seconds, MAX_LEASE_SECONDS),
            ("relay_interval", relay_interval, MAX_INTERVAL_SECONDS),
            ("wait_poll_interval", wait_poll_interval, MAX_INTERVAL_SECONDS),
        ):
            problem = check_seconds(value, maximum)
            if problem is not None:
                raise SagaConfigError(key, problem)
        if reply_concurrency < 1:
            raise SagaConfigError("reply_concurrency", f"must be >= 1, got {reply_concurrency!r}")
        if paused_cache_size < 0:
            raise SagaConfigError("paused_cache_size", f"must be >= 0, got {paused_cache_size!r}")
        self.storage = storage
        self.broker_pool = broker_pool
        self.service_name = service_name
        self.reply_topic = reply_topic or f"{service_name}Reply"
        self.dead_letter_topic = dead_letter_topic or f"{service_name}DeadLetter"
        self.registry = registry if registry is not None else SagaRegistry()
        self.hooks = hooks
        self.owner = owner or _default_owner()
        self.lease_seconds = float(lease_seconds)
        self.consume_replies = consume_replies
        self.relay_outbox = relay_outbox
        self.relay_interval = relay_interval
        self.consumer_group = consumer_group or f"{service_name}-orchestrator"
        self.reply_concurrency = reply_concurrency
        self.wait_poll_interval = wait_poll_interval
        # Default: the database's clock (saga.clock), which every deadline and lease is compared on.
        self.clock: Callable[[], datetime] = clock or DatabaseClock()
        self.consumer: ReplyConsumer | None = None
        self.relay: OutboxRelay | None = None
        self._lease = timedelta(seconds=self.lease_seconds)
        self._active: set[uuid.UUID] = set()
        self._waiters: dict[uuid.UUID, list[asyncio.Future[SagaExecution | None]]] = {}
        self._early_waiters: dict[uuid.UUID, asyncio.Future[SagaExecution | None]] = {}
        self._driving: dict[uuid.UUID, SagaExecution] = {}
        self._beat: asyncio.TimerHandle | None = None
        self._beat_task: asyncio.Task[None] | None = None
        self._unmarked: list[int] = []
        self._overdue: dict[uuid.UUID, asyncio.Task[None]] = {}
        self._claims_in_flight: set[asyncio.Task[None]] = set()
        self._paused: dict[uuid.UUID, ExecutionRecord] = {}
        self.paused_cache_size = paused_cache_size
        self._started = False
        self._closing = False

    @classmethod
    def from_config(cls, source: str | os.PathLike[str] | Mapping[str, Any]) -> SagaManager:
        """A manager built from a YAML file or mapping (see `saga.config`); call ``setup()`` next."""
        from saga.config import build_manager

        return build_manager(source)

    # -- lifecycle -------------------------------------------------------------------------------------

    async def setup(self) -> None:
        """Start storage and broker pool, then the reply consumer and the outbox relay; idempotent."""
        if self._started:
            return
        self._closing = False
        await self.storage.start()
        if isinstance(self.clock, DatabaseClock):
            await self.clock.sync(self.storage)
        await self.broker_pool.start()
        if self.consume_replies:
            await self.broker_pool.ensure_topics([self.reply_topic, self.dead_letter_topic])
            self.consumer = ReplyConsumer(
                self,
                self.broker_pool,
                topic=self.reply_topic,
                group_id=self.consumer_group,
                dead_letter_topic=self.dead_letter_topic,
                concurrency=self.reply_concurrency,
            )
            await self.consumer.start()
        if self.relay_outbox:
            self.relay = OutboxRelay(
                self.storage,
                self.broker_pool,
                owner=self.owner,
                interval=self.relay_interval,
                lease_seconds=self.lease_seconds,
                on_rejected=self._publish_rejected,
            )
            await self.relay.start()
        self._started = True

    async def destroy(self) -> None:
        """Stop consumer and relay (finishing work in progress), release waiters, stop pool and storage.

        Callers still waiting in ``run(pause_on_disk=False)`` get the execution as stored (PAUSED).
        """
        self._closing = True
        if self.consumer is not None:
            await self.consumer.stop()
            self.consumer = None
        if self.relay is not None:
            await self.relay.stop()
            self.relay = None
        for futures in self._waiters.values():
            for future in futures:
                if not future.done():
                    future.set_result(None)
        # Let released waiters read the stored state before storage stops (they drop out of _waiters).
        for _ in range(100):
            if not self._waiters:
                break
            await asyncio.sleep(0.01)
        for task in (self._poller, *self._overdue.values()):
            if task is not None and not task.done():
                task.cancel()
        self._poller = None
        self._overdue.clear()
        self._paused.clear()
        await self._drain_marks()
        self._stop_beat()
        await self.broker_pool.stop()
        await self.storage.stop()
        self._started = False

    async def __aenter__(self) -> SagaManager:
        await self.setup()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.destroy()

    # -- definitions -----------------------------------------------------------------------------------

    def register(self, saga: Saga, *, name: str | None = None) -> Saga:
        """Register a definition (naming a nameless one, committing an open one); see `SagaRegistry`."""
        return self.registry.register(saga, name=name)

    def _definition_for(self, definition: Saga) -> Saga:
        if isinstance(definition, Saga) and definition.name is not None and definition.committed:
            known = self.registry._definitions.get((definition.name, definition.version))
            if known is definition:
                return definition
        return self.registry.register(definition)

    # -- running ---------------------------------------------------------------------------------------

    @overload
    async def run(
        self,
        definition: Saga | None = None,
        context: SagaContext | Mapping[str, Any] | None = None,
        *,
        response: SagaResponse | None = None,
        user: str | uuid.UUID | None = None,
        autocommit: bool = True,
        pause_on_disk: bool = False,
        raise_on_error: bool = True,
        return_execution: Literal[True] = True,
        idempotency_key: str | None = None,
        traceparent: str | None = None,
        tracestate: str | None = None,
    ) -> SagaExecution: ...

    @overload
    async def run(
        self,
        definition: Saga | None = None,
        context: SagaContext | Mapping[str, Any] | None = None,
        *,
        response: SagaResponse | None = None,
        user: str | uuid.UUID | None = None,
        autocommit: bool = True,
        pause_on_disk: bool = False,
        raise_on_error: bool = True,
        return_execution: Literal[False],
        idempotency_key: str | None = None,
        traceparent: str | None = None,
        tracestate: str | None = None,
    ) -> uuid.UUID: ...

    @overload
    async def run(
        self,
        definition: Saga | None = None,
        context: SagaContext | Mapping[str, Any] | None = None,
        *,
        response: SagaResponse | None = None,
        user: str | uuid.UUID | None = None,
        autocommit: bool = True,
        pause_on_disk: bool = False,
        raise_on_error: bool = True,
        return_execution: bool = True,
        idempotency_key: str | None = None,
        traceparent: str | None = None,
        tracestate: str | None = None,
    ) -> SagaExecution | uuid.UUID: ...

    async def run(
        self,
        definition: Saga | None = None,
        context: SagaContext | Mapping[str, Any] | None = None,
        *,
        response: SagaResponse | None = None,
        user: str | uuid.UUID | None = None,
        autocommit: bool = True,
        pause_on_disk: bool = False,
        raise_on_error: bool = True,
        return_execution: bool = True,
        idempotency_key: str | None = None,
        traceparent: str | None = None,
        tracestate: str | None = None,
    ) -> SagaExecution | uuid.UUID:
        """Start a saga, or resume one with a reply (Minos semantics).

        Args:
            definition: Start a new execution of it (registered on the fly if needed).
            context: Initial context of a new execution.
            response: Resume the execution this reply names instead. A reply built without a request id
                (Minos-style) answers the request the execution awaits.
            user: User the saga runs for (forwarded in command headers): a string, or a UUID stored as its
                string.
            autocommit: Send commit/reject to the participants by itself when the saga ends; with
                ``False`` call `commit` / `reject` yourself. Given with ``response``, it holds from that
                reply on.
            pause_on_disk: Return as soon as the execution waits for a reply (PAUSED, stored); with
                ``False``, wait here until it ends.
            raise_on_error: Raise `SagaExecutionError` when it ends ERRORED or DEAD_LETTER.
            return_execution: Return the `SagaExecution` (else its id).
            idempotency_key: A second start of the same saga (any version) with the same key returns the
                first execution; keys are unique across sagas, so a start of another saga with a key
                already used raises `DuplicateIdempotencyKeyError`.
            traceparent: W3C trace context every command of the new execution carries (with
                ``tracestate``); by default the current OpenTelemetry context when the process uses
                OpenTelemetry and a span is current, else a new trace.
            tracestate: W3C vendor trace state sent with ``traceparent``.

        Raises:
            SagaExecutionError: It ended ERRORED/DEAD_LETTER and ``raise_on_error`` is set.
            SagaStateError: The manager is not set up (``setup()`` or ``async with``): nothing could be
                sent or received, so nothing is stored.
            SagaContextError: A context value cannot be stored (nothing is stored).
            TypeError, ValueError: ``user`` is not a string or UUID, or ``idempotency_key`` is not a
                string, or either is too long or not valid UTF-8 (nothing is stored).
            DuplicateIdempotencyKeyError: ``idempotency_key`` already started an execution of another saga.
            SagaBusyError: (resume) Another worker holds the execution's claim; try again later.
            ValueError: ``traceparent`` or ``tracestate`` is malformed (names which and why).
            UnknownSagaDefinitionError: (resume) The execution's definition is not registered.
        """
        if not self._started:
            raise SagaStateError(
                "run() on a SagaManager that is not set up: call `await manager.setup()` (or use "
                "`async with manager`) first"
            )
        user = check_user(user)
        if idempotency_key is not None:
            check_header_text(idempotency_key, "idempotency_key")
        if response is not None:
            if response.request_id == AWAITED_REQUEST_ID:
                response = (await self.get(response.execution_id)).correlate(response)
            execution, _ = await self._process_reply(
                response, None, wait=not pause_on_disk, autocommit=autocommit
            )
        elif definition is not None:
            trace = resolve_trace_context(traceparent, tracestate)
            execution = await self._start(
                definition,
                context,
                user,
                autocommit,
                idempotency_key,
                pause_on_disk,
                trace,
                trace_given=traceparent is not None,
            )
        else:
            raise SagaStateError("run() needs a definition to start or a response to resume")
        if not pause_on_disk and not execution.terminal:
            execution_id = execution.id
            del execution  # a waiting saga holds no state in memory: the stored one is what comes back
            execution = await self._wait(execution_id)
        if raise_on_error and execution.status in (SagaStatus.ERRORED, SagaStatus.DEAD_LETTER):
            error = execution.error or {}
            raise SagaExecutionError(
                f"saga {execution.name!r} execution {execution.id} ended {execution.status}: "
                f"{error.get('error')}",
                execution_id=execution.id,
                step=error.get("step"),
                status=str(execution.status),
                error=dict(error),
            )
        return execution if return_execution else execution.id

    async def _start(
        self,
        definition: Saga,
        context: SagaContext | Mapping[str, Any] | None,
        user: str | None,
        autocommit: bool,
        idempotency_key: str | None,
        pause_on_disk: bool,
        trace: tuple[str, str | None],
        *,
        trace_given: bool,
    ) -> SagaExecution:
        saga = self._definition_for(definition)
        if _tracing.enabled:
            # The run span continues the given context (else the current one) and becomes the saga's
            # stored context, so decisions sent long after this call still join the trace under it.
            parent = trace if trace_given else None
            with _tracing.run_span(saga.name or "", parent=parent) as span:
                trace = resolve_trace_context()
                execution = await self._start_saga(
                    saga, context, user, autocommit, idempotency_key, pause_on_disk, trace
                )
                span.set_attribute("saga.execution_id", str(execution.id))
                return execution
        return await self._start_saga(saga, context, user, autocommit, idempotency_key, pause_on_disk, trace)

    async def _start_saga(
        self,
        saga: Saga,
        context: SagaContext | Mapping[str, Any] | None,
        user: str | None,
        autocommit: bool,
        idempotency_key: str | None,
        pause_on_disk: bool,
        trace: tuple[str, str | None],
    ) -> SagaExecution:
        if idempotency_key is not None:
            existing = await self.storage.find_by_idempotency_key(idempotency_key)
            if existing is not None:
                return self._execution(same_saga(existing, saga, idempotency_key))
        now = self.clock()
        execution = SagaExecution.start(
            saga,
            context,
            reply_topic=self.reply_topic,
            now=now,
            user=user,
            autocommit=autocommit,
            idempotency_key=idempotency_key,
            hooks=self.hooks,
            clock=self.clock,
            traceparent=trace[0],
            tracestate=trace[1],
        )
        if _log.isEnabledFor(logging.DEBUG):
            _log.debug("execution %s of saga %r starts, traceparent %s", execution.id, saga.name, trace[0])
        try:
            # With an idempotency key the first move runs only once the row exists: a duplicate key must
            # find nothing started (no hook fired, no command built) for an execution that never will be.
            return await self._create_and_drive(
                execution, wait=not pause_on_disk, with_first_command=idempotency_key is None
            )
        except DuplicateIdempotencyKeyError as exc:
            existing = await self.storage.load(exc.existing_id)
            return self._execution(same_saga(existing, saga, exc.idempotency_key))

    # -- replies ---------------------------------------------------------------------------------------

    async def handle_reply(
        self, response: SagaResponse, *, message: BrokerMessage | None = None
    ) -> ReplyOutcome:
        """Apply one participant reply (what the `ReplyConsumer` calls); never waits for the saga to end.

        Claims the execution, checks the reply against the awaited request, applies it and runs the
        following steps up to the next pause or the end, exactly like a fresh run. When this manager paused
        the execution itself and still holds its record (``paused_cache_size``), the claim is skipped while
        the moves only build commands or finish: the save is version-checked, so should another worker have
        written the row meanwhile, nothing is written and the reply is applied again the claimed way (its
        reply handler then runs twice; handlers are already at-least-once). A local step or compensation
        always runs claimed. A duplicate, stale or
        unknown-status reply is recorded (``storage.record_reply``) and changes nothing; an unknown-status
        one is also copied to the dead-letter topic (``message``, the record as received, when given).

        Returns:
            ``applied``, ``duplicate``, ``stale`` or ``unknown_status``.

        Raises:
            ExecutionNotFoundError: No such execution.
            UnknownSagaDefinitionError: Its definition is not registered here (execution untouched).
            SagaBusyError: Another worker holds its claim (retriable).
            SagaContextError: A reply handler stored an unstorable value; the execution is now FAILED.
        """
        if _logs.enabled:
            with _logs.log_context(execution_id=response.execution_id, request_id=response.request_id):
                return await self._handle_reply(response, message)
        return await self._handle_reply(response, message)

    async def _handle_reply(self, response: SagaResponse, message: BrokerMessage | None) -> ReplyOutcome:
        if _tracing.enabled and message is not None:
            span_of = _tracing.reply_span(
                message.topic, message.headers, response.execution_id, response.request_id
            )
            with span_of as span:
                _, outcome = await self._process_reply(response, message, wait=False)
                span.set_attribute("saga.reply.outcome", outcome)
            return outcome
        _, outcome = await self._process_reply(response, message, wait=False)
        return outcome

    async def park_reply(self, response: SagaResponse, *, message: BrokerMessage | None = None) -> bool:
        """Keep a reply whose execution's definition version is not registered here (see `saga.parking`).

        The reply is stored with the execution, which becomes due for recovery: a process that registers
        the definition applies it from there. A reply for a finished execution is recorded as stale.

        Returns:
            Whether the reply was parked (``False``: the execution is terminal).

        Raises:
            ExecutionNotFoundError: No such execution.
            SagaBusyError: Another worker holds the execution's claim, or the definition is registered
                after all (retriable: handling the reply again applies it).
            ConcurrencyError: The row changed meanwhile (retriable).
        """
        if message is None:
            message = response.to_message(self.reply_topic)
        return await keep_reply(self.storage, self.registry, response, message, self.clock())

    async def _apply_parked(self, execution_id: uuid.UUID, parked: list[BrokerMessage]) -> SagaExecution:
        """Apply the replies parked with an execution, oldest first, then drop any left parked."""
        execution: SagaExecution | None = None
        for message in parked:
            try:
                response = SagaResponse.from_message(message)
            except MalformedMessageError:  # pragma: no cover - parked only after it decoded once
                continue
            execution, _ = await self._process_reply(response, message, wait=False)
        record = await self.storage.load(execution_id)
        if parked_replies(record, self.reply_topic):  # none of them was applied: only stale ones
            with contextlib.suppress(ConcurrencyError):  # another worker moved it on: fine
                record = await self.storage.save(clear_parked(record))
        return execution if execution is not None else self._execution(record)

    async def _process_reply(
        self,
        response: SagaResponse,
        message: BrokerMessage | None,
        *,
        wait: bool,
        autocommit: bool | None = None,
    ) -> tuple[SagaExecution, ReplyOutcome]:
        """Apply a reply; ``autocommit``, when given (``run(response=..., autocommit=...)``), replaces the
        execution's own from this reply on, as Minos takes it per call."""
        execution_id = response.execution_id
        cached = self._paused.pop(execution_id, None)
        if cached is not None and execution_id not in self._active and execution_id not in self._driving:
            applied = await self._apply_unclaimed(cached, response, wait=wait, autocommit=autocommit)
            if applied is not None:
                return applied
        record, execution = await self._claim(execution_id)
        try:  # _claim reserved the id in _active: every way out must give it back
            if autocommit is not None:
                execution.autocommit = autocommit
            outcome = execution.classify_reply(response)
            if outcome != "applied":
                await self._ignore_reply(execution, response, outcome, message)
                return execution, outcome
            reply = ReplyRecord(execution_id, response.request_id, int(response.status), "applied")
            try:
                transition = await self._guard(
                    execution, record, execution.apply_reply(response, self.clock())
                )
                execution = await self._drive(
                    execution, record, transition=transition, reply=reply, wait=wait
                )
            except AlreadyAppliedError:
                # Another worker applied this reply between our claim and our save; nothing was written.
                await self.storage.record_reply(
                    dataclasses.replace(reply, outcome="duplicate", reason="applied by another worker")
                )
                await self._release(execution_id)
                return execution, "duplicate"
            except Exception:
                await self._release(execution_id)  # nothing more will be written; let others take it
                raise
            return execution, outcome
        finally:
            self._active.discard(execution_id)

    async def _apply_unclaimed(
        self,
        cached: ExecutionRecord,
        response: SagaResponse,
        *,
        wait: bool,
        autocommit: bool | None = None,
    ) -> tuple[SagaExecution, ReplyOutcome] | None:
        """Apply a reply to an execution from the record this process stored when pausing it, unclaimed.

        Saves a claim round trip per remote step. ``None`` when this way cannot decide, for the claimed
        way to take over: the reply does not match the record (it may be stale), a handler raised, the
        definition is gone, or the row changed since (`ConcurrencyError`: nothing was written).
        """
        execution_id = cached.id
        self._active.add(execution_id)
        try:
            try:
                execution = self._execution(cached)
                if autocommit is not None:
                    execution.autocommit = autocommit
                if execution.classify_reply(response) != "applied":
                    return None
                transition = await execution.apply_reply(response, self.clock())
            except Exception:
                return None  # the claimed way reports it
            reply = ReplyRecord(execution_id, response.request_id, int(response.status), "applied")
            try:
                execution = await self._drive(
                    execution, cached, transition=transition, reply=reply, wait=wait, claimed=False
                )
            except (ConcurrencyError, SagaBusyError):
                return None
            except AlreadyAppliedError:
                await self.storage.record_reply(
                    dataclasses.replace(reply, outcome="duplicate", reason="applied by another worker")
                )
                return execution, "duplicate"
            except Exception:
                if execution.record_version != cached.version:
                    await self._release(execution_id)  # claimed (or saved claimed) on the way
                raise
            return execution, "applied"
        finally:
            self._active.discard(execution_id)

    # -- operations on stored executions ---------------------------------------------------------------

    async def get(self, execution_id: uuid.UUID) -> SagaExecution:
        """The stored execution. Raises `ExecutionNotFoundError`, `UnknownSagaDefinitionError`."""
        return self._execution(await self.storage.load(execution_id))

    async def commit(self, execution_id: uuid.UUID) -> SagaExecution:
        """Send commit to the participants of a FINISHED execution (once; a second call sends nothing)."""
        return await self._decide(execution_id, "commit")

    async def reject(self, execution_id: uuid.UUID) -> SagaExecution:
        """Send reject to the participants of an ERRORED execution (once; a second call sends nothing)."""
        return await self._decide(execution_id, "reject")

    async def _decide(self, execution_id: uuid.UUID, action: Literal["commit", "reject"]) -> SagaExecution:
        record = await self.storage.load(execution_id)
        execution = self._execution(record)
        transition = execution.decide(action)
        if transition.persist:
            # Keep whatever claim the row has: save writes the record's owner, and deciding needs none.
            record = execution.to_record(owner=record.owner, lease_until=record.lease_until)
            outbox = transition.outbox
            if outbox and self._storage_supports("outbox_claim"):
                claim = OutboxClaim(self.owner, self.lease_seconds)
                stored = await self.storage.save(record, outbox=outbox, outbox_claim=claim)
                execution.mark_stored(stored)
                await self._flush_outbox([(outbox, claim)])
            else:
                stored = await self.storage.save(record, outbox=outbox)
                execution.mark_stored(stored)
                if outbox:
                    await self._flush_outbox()
        return execution

    async def replay(self, execution_id: uuid.UUID) -> SagaExecution:
        """Re-send the pending command of a PAUSED execution (same request id and idempotency key).

        Raises:
            SagaStateError: The execution is not PAUSED.
            SagaBusyError: Another worker holds its claim.
        """
        record, execution = await self._claim(execution_id)
        try:  # _claim reserved the id in _active: every way out must give it back
            if execution.status is not SagaStatus.PAUSED or execution.awaiting is None:
                raise SagaStateError(  # the except below releases the claim
                    f"cannot replay execution {execution_id}: it is {execution.status}, not paused",
                    execution_id=execution_id,
                )
            transition = await execution.replay(self.clock())
            return await self._drive(execution, record, transition=transition)
        except Exception:
            await self._release(execution_id)
            raise
        finally:
            self._active.discard(execution_id)

    async def cancel(self, execution_id: uuid.UUID, *, reason: str = "cancelled") -> SagaExecution:
        """Stop an execution going forward and compensate what it did, as a failed step would.

        Durable like any step: the execution is claimed, COMPENSATING (or ERRORED when nothing needs
        compensating) is stored with its error ``{"type": "cancelled", ...}``, and the compensations run
        (remote ones through the outbox, so recovery finishes them after a crash).

        Raises:
            SagaStateError: It already ended or is compensating.
            SagaBusyError: Another worker holds its claim (a step is running); try again.
        """
        record, execution = await self._claim(execution_id)
        try:  # _claim reserved the id in _active: every way out must give it back
            error = {"step": None, "error": reason, "type": "cancelled"}
            transition = await _steps.cancel(execution, error)
            return await self._drive(execution, record, transition=transition)
        except Exception:
            await self._release(execution_id)
            raise
        finally:
            self._active.discard(execution_id)

    async def retry(self, execution_id: uuid.UUID) -> ExecutionRecord:
        """Move a DEAD_LETTER or FAILED execution to FAILED with no recovery attempts, for recovery to resume.

        Does not need the definition (admin tools can call it). Raises `SagaStateError` for other statuses.
        """
        record = await self.storage.load(execution_id)
        if record.status not in (SagaStatus.DEAD_LETTER, SagaStatus.FAILED):
            raise SagaStateError(
                f"cannot retry execution {execution_id}: it is {record.status}, not dead_letter or failed",
                execution_id=execution_id,
            )
        return await self.storage.save(
            dataclasses.replace(record, status=SagaStatus.FAILED, recovery_attempts=0)
        )

    async def recover(self, execution_id: uuid.UUID) -> SagaExecution:
        """Resume a stalled execution from storage; what a recovery worker calls for each candidate.

        Claims it (as ``self.owner``), then:

        * RUNNING / FAILED / CREATED: continue forward from the cursor — the interrupted step runs again
          (at-least-once; make local steps idempotent);
        * COMPENSATING: continue compensating;
        * PAUSED with the reply overdue: replay the command if the step's retry policy allows another
          attempt (same request id and idempotency key), else compensate (error ``timeout``); a FAILED run
          that was waiting re-sends its command;
        * saga deadline passed: compensate whatever ran;
        * PAUSED and not overdue, or terminal: nothing (the claim is released).

        Returns the execution as it now stands (PAUSED, terminal, ...). Recovery attempts are not counted
        here: the worker counts them when this raises. When it raises the claim is kept (if still held),
        so that the caller's bookkeeping is fenced by it; the caller releases it (the worker's fenced save
        of FAILED does).

        Raises:
            SagaBusyError: Another worker (or a task of this process) is advancing it.
            UnknownSagaDefinitionError: Its definition is not registered (execution untouched).
            ExecutionNotFoundError: No such execution.
            StorageError, BrokerError: Infrastructure trouble; retry later.
        """
        if _logs.enabled:
            with _logs.log_context(execution_id=execution_id):
                return await self._traced_recover(execution_id)
        return await self._traced_recover(execution_id)

    async def _traced_recover(self, execution_id: uuid.UUID) -> SagaExecution:
        if _tracing.enabled:
            with _tracing.recovery_span(execution_id) as span:
                recovered = await self._recover(execution_id)
                span.set_attribute("saga.status", str(recovered.status))
                return recovered
        return await self._recover(execution_id)

    async def _recover(self, execution_id: uuid.UUID) -> SagaExecution:
        record, execution = await self._claim(execution_id, keep_on_error=True)
        try:  # _claim reserved the id in _active: every way out must give it back
            if execution.terminal:
                await self._release(execution_id)
                return execution
            parked = parked_replies(record, self.reply_topic)
            if parked:  # replies kept while no process registered the definition come first
                await self._release(execution_id)
                self._active.discard(execution_id)
                return await self._apply_parked(execution_id, parked)
            now = self.clock()
            transition = None
            if execution.awaiting is not None:
                if execution.overdue(now):
                    transition = await self._guard(execution, record, execution.on_timeout(now))
                elif execution.status is not SagaStatus.PAUSED:
                    await execution.resume()
                    transition = await execution.replay(now)
                else:
                    await self._release(execution_id)
                    return execution
            elif execution.status in (SagaStatus.FAILED, SagaStatus.CREATED):
                await execution.resume()
            return await self._drive(execution, record, transition=transition)
        finally:
            self._active.discard(execution_id)
