"""The participant side: a service that executes saga commands and replies to the orchestrator.

`SagaParticipant` consumes the service's command topics and its control topic in one consumer group,
runs the handler registered for each command, and replies on the command's reply topic. It gives the
guarantees the orchestrator relies on:

* **Duplicates are answered, not re-run.** Before a handler runs, the reply stored under the command's
  idempotency key is looked up; a redelivered or replayed command gets that reply again without the
  handler running twice. The reply is stored *before* it is published, so a crash between the two re-sends
  the same reply. A per-key lock keeps concurrent duplicates in one process from racing. Exactly-once needs
  the handler's own effects and the stored reply in one transaction, which a separate store cannot give:
  a crash after the handler's effect but before the reply is stored runs the handler again on redelivery.
* **Compensations pair with their forward command** by execution id and step (docs/protocol.md section
  8): a compensation whose forward command was never handled leaves a tombstone and succeeds without
  running its handler, and the forward command, arriving later, is refused (400 ``cancelled``).
* **At-least-once replies.** An offset is committed only once its reply (or dead letter) was published.
* **No stalls.** Records flow through a `KeyedPipeline`: polling goes on while earlier records are
  handled, each key's records (one saga execution's) in offset order and keys concurrently, and offsets
  are committed in the background, so a slow command or a commit round trip holds up only its own saga.
* **Malformed input never stops the consumer.** It is logged with the reason, counted in `stats`, and
  forwarded with its original value and headers plus ``saga-dead-letter-reason`` to the dead-letter topic.
* **Transient failures are retried.** Retriable broker and storage errors back off and retry the record.

Autocommit decisions (``commit`` after a saga finished, ``reject`` after it failed) arrive on
``control_topic(service_name)`` and run the ``on_commit`` / ``on_reject`` handlers once per decision.

With a ``store`` (`storage.participant.SqlParticipantStore` in the participant's own database) the
participant is exactly-once for transactional handlers: each command is claimed with a lease, its handler
runs inside the database transaction that also stores its reply, and other instances wait for the claim
instead of running the handler again (see `saga.participant.claims`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import socket
import uuid
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any, Self, TypeVar

from broker import BrokerClientPool, BrokerClosedError, BrokerError, BrokerMessage, BrokerSubscriber
from saga.consumer import H_DEAD_LETTER_REASON, H_DEAD_LETTER_TOPIC, dead_letter_message
from saga.errors import MalformedMessageError, SagaStateError, UnsupportedProtocolError
from saga.messages import (
    H_SERVICE,
    SagaCommand,
    SagaControl,
    control_topic,
)
from saga.observability import tracing as _tracing
from saga.participant.claims import Abandoned, HandlerSpec, StoreFlow
from saga.participant.decisions import answer_with_dedup, command_kind, decide_with_dedup, decide_with_store
from saga.participant.dedup import KeyLock, KeyLocked, LruReplyStore, ReplyStore
from saga.participant.replies import (
    DEFAULT_MAX_REPLY_BYTES,
)
from saga.participant.support import DeadLetter, lane
from saga.participant.types import DecisionHandler, ParticipantStats
from saga.pipeline import KeyedPipeline
from storage import SagaStorage, StorageError
from storage.participant import SqlParticipantStore

__all__ = ["H_DEAD_LETTER_REASON", "H_DEAD_LETTER_TOPIC", "SagaParticipant"]

_log = logging.getLogger(__name__)

_F = TypeVar("_F", bound=Callable[..., Any])


_Abandoned = Abandoned


class SagaParticipant:
    """Executes a service's saga commands and replies to the orchestrator.

    Args:
        service_name: The service's name; replies carry it, and decisions arrive on
            ``control_topic(service_name)``.
        broker_pool: Transport. Started by `start` if needed; its owner stops it.
        storage: Where replies are remembered by idempotency key (``get_command_reply`` /
            ``put_command_reply``) so duplicates survive restarts. Without it (and without ``store``), a
            bounded in-process LRU.
        store: The participant store in the participant's own database: claims, stored replies,
            tombstones and the reply outbox, committed with the handlers' writes (exactly-once effects
            for transactional handlers). Started and stopped by the participant. Replaces ``storage``.
        lease_seconds: How long a claim lasts unless renewed (every third of it while the handler runs);
            another instance takes a command over once its claim's lease ran out.
        instance_id: This instance's name as claims' owner (default: host, pid and a random suffix).
        max_reply_bytes: Largest reply the broker takes; a bigger one is replaced by a small
            ``SYSTEM_ERROR`` reply saying so.
        relay_older_than: Seconds after which a committed reply not yet published is relayed by any instance.
        group_id: Consumer group (default ``f"{service_name}-participant"``); instances of one service
            share it so each command is handled by one of them.
        dead_letter_topic: Where malformed input goes (default ``f"{service_name}DeadLetter"``).
        dedup_cache_size: Entries of the in-process store when ``storage`` is ``None``.
        max_records: Records fetched per poll.
        concurrency: Most records in progress (fetched, not yet handled) at once; when reached, polling
            waits. Records of one key (saga execution) are handled in offset order, keys concurrently.
        poll_timeout: Seconds one poll waits for records (`stop` does not wait for it).
        retry_backoff: First pause, in seconds, after a retriable failure; doubled up to ``max_backoff``.
        max_backoff: Longest pause between retries.
        commit_interval: Least seconds between two offset commits (they run in the background and carry
            every record handled meanwhile; a crash redelivers at most that much more, answered from the
            dedup store).

    Example::

        participant = SagaParticipant("inventory", pool, storage=storage)

        @participant.command("ReserveStock")
        async def reserve(request: CommandContext) -> dict[str, Any]:
            if request.content["quantity"] > 10:
                raise SagaBusinessError("not enough stock")
            return {"reserved": request.content["quantity"]}

        async with participant:
            ...
    """

    def __init__(
        self,
        service_name: str,
        broker_pool: BrokerClientPool,
        *,
        storage: SagaStorage | None = None,
        store: SqlParticipantStore | None = None,
        lease_seconds: float = 30.0,
        instance_id: str | None = None,
        max_reply_bytes: int = DEFAULT_MAX_REPLY_BYTES,
        relay_older_than: float = 5.0,
        group_id: str | None = None,
        dead_letter_topic: str | None = None,
        dedup_cache_size: int = 100_000,
        max_records: int = 100,
        concurrency: int = 100,
        poll_timeout: float = 0.5,
        retry_backoff: float = 0.1,
        max_backoff: float = 5.0,
        commit_interval: float = 0.1,
    ) -> None:
        if not service_name:
            raise ValueError("service_name must not be empty")
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        if dedup_cache_size < 1:
            raise ValueError(f"dedup_cache_size must be >= 1, got {dedup_cache_size}")
        if not lease_seconds > 0 or lease_seconds == float("inf"):
            raise ValueError(f"lease_seconds must be a finite number > 0, got {lease_seconds}")
        if storage is not None and store is not None:
            raise ValueError("give a participant either storage= (dedup only) or store=, not both")
        self.service_name = service_name
        self.broker_pool = broker_pool
        self.storage = storage
        self.group_id = group_id or f"{service_name}-participant"
        self.dead_letter_topic = dead_letter_topic or f"{service_name}DeadLetter"
        self.control_topic = control_topic(service_name)
        self.stats = ParticipantStats()
        self.store = store
        self.instance_id = instance_id or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._lease = lease_seconds
        self._max_reply_bytes = max_reply_bytes
        self._relay_older_than = relay_older_than
        self._flow: StoreFlow | None = None
        self._replies: ReplyStore = storage if storage is not None else LruReplyStore(dedup_cache_size)
        self._max_records = max_records
        self._concurrency = concurrency
        self._poll_timeout = poll_timeout
        self._retry_backoff = retry_backoff
        self._max_backoff = max_backoff
        self._commit_interval = commit_interval
        self._handlers: dict[str, HandlerSpec] = {}
        self._on_commit: list[DecisionHandler] = []
        self._on_reject: list[DecisionHandler] = []
        self._locks: dict[str, KeyLock] = {}
        self._subscriber: BrokerSubscriber | None = None
        self._pipeline: KeyedPipeline | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()

    # -- registration ---------------------------------------------------------------------------------

    def command(
        self, topic: str, *, compensates: str | None = None, transactional: bool = True
    ) -> Callable[[_F], _F]:
        """Register the decorated function (sync or async) as the handler of command topic ``topic``.

        Its return value (JSON-able) is the ``SUCCESS`` reply's content; raising `SagaBusinessError`
        replies ``ERROR`` with ``{"error": message}``; any other exception replies ``SYSTEM_ERROR``.

        Args:
            topic: The command topic.
            compensates: The forward command topic this handler undoes: a compensation that arrives
                before its forward command leaves a tombstone and replies success without running,
                and the late forward command is refused (400 ``cancelled``). Needs a ``store``.
            transactional: With a ``store``, run the handler in the participant database's transaction
                (``request.connection`` / ``request.session``), committed with its dedup record and reply:
                the effect happens at most once. ``False`` for handlers that call the outside world: they
                run at least once (a crash after the effect and before the commit runs them again), get
                ``request.idempotency_key`` to pass on, and the claim still keeps two instances from
                running one command at once.
        """
        if not topic:
            raise ValueError("command topic must not be empty")
        if compensates is not None and (not compensates or compensates == topic):
            raise ValueError(f"compensates must name another command topic, got {compensates!r}")

        def register(fn: _F) -> _F:
            self._check_not_started()
            if topic in self._handlers:
                raise ValueError(f"command topic {topic!r} already has a handler")
            self._handlers[topic] = HandlerSpec(fn, compensates, transactional)
            return fn

        return register

    def on_commit(self, fn: _F) -> _F:
        """Register ``fn(control)`` to run once when a saga this service took part in finished."""
        self._check_not_started()
        self._on_commit.append(fn)
        return fn

    def on_reject(self, fn: _F) -> _F:
        """Register ``fn(control)`` to run once when a saga this service took part in failed."""
        self._check_not_started()
        self._on_reject.append(fn)
        return fn

    @property
    def command_topics(self) -> tuple[str, ...]:
        """The command topics with a handler, in registration order."""
        return tuple(self._handlers)

    # -- lifecycle ------------------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        """Whether the consuming task is alive."""
        return self._task is not None and not self._task.done()

    async def start(self) -> None:
        """Join the consumer group and start consuming in a background task; idempotent."""
        if self._task is not None:
            return
        if not self._handlers:
            raise SagaStateError(f"participant {self.service_name!r} has no command handlers")
        if self.store is None and any(spec.compensates for spec in self._handlers.values()):
            raise SagaStateError(f"participant {self.service_name!r}: compensates= needs a store")
        await self.broker_pool.start()
        if self.storage is not None:
            await self.storage.start()
        if self.store is not None:
            self._flow = StoreFlow(
                self.store,
                service=self.service_name,
                owner=self.instance_id,
                lease=self._lease,
                max_reply_bytes=self._max_reply_bytes,
                stats=self.stats,
                call=self._call,
                broker_pool=self.broker_pool,
                relay_older_than=self._relay_older_than,
                stopping=self._stopping,
            )
            await self._flow.start()
        topics = [*self._handlers, self.control_topic]
        await self.broker_pool.ensure_topics([*topics, self.dead_letter_topic])
        self._stopping.clear()
        subscriber = self.broker_pool.subscriber(topics, group_id=self.group_id)
        await subscriber.start()
        self._subscriber = subscriber
        self._pipeline = pipeline = KeyedPipeline(
            subscriber,
            self._process,
            lane=lane,
            concurrency=self._concurrency,
            max_records=self._max_records,
            poll_timeout=self._poll_timeout,
            on_fetch_error=self._fetch_failed,
            name=f"participant {self.service_name}",
            retry_initial=self._retry_backoff,
            retry_max=self._max_backoff,
            grace=10.0,
            commit_interval=self._commit_interval,
        )
        self._task = asyncio.create_task(self._consume(pipeline), name=f"participant-{self.service_name}")
        _log.info("participant %s consuming %s as group %s", self.service_name, topics, self.group_id)

    async def stop(self, *, grace: float = 10.0) -> None:
        """Finish the records in hand (up to ``grace`` seconds), commit, then leave the group; idempotent.

        A poll in flight is abandoned (its records are not committed, so they are redelivered); records
        still in progress after ``grace`` are cancelled and left uncommitted.
        """
        task, self._task = self._task, None
        self._stopping.set()
        if self._pipeline is not None:
            self._pipeline.stop(grace)
        if task is not None:
            await asyncio.wait({task})  # bounded: the pipeline cancels what overstays the grace
            if not task.cancelled():
                task.exception()  # logged by _consume
        subscriber, self._subscriber = self._subscriber, None
        if subscriber is not None:
            await subscriber.stop()
        if self._flow is not None:
            await self._flow.close()

    async def run(self) -> None:
        """Start and consume until `stop` is called (or the consumer fails, which is raised)."""
        await self.start()
        task = self._task
        assert task is not None
        try:
            await asyncio.shield(task)
        finally:
            if self._task is task:  # failed or cancelled rather than stopped
                await self.stop()

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

    # -- handling one record --------------------------------------------------------------------------

    async def handle(self, message: BrokerMessage) -> None:
        """Process one consumed record completely: reply, run a decision, or dead-letter it.

        The consuming task calls this; it is public for services that run their own consumer.

        Raises:
            BrokerError: The dead letter itself could not be published (not retriable).
        """
        try:
            # Decoding checks the protocol version first (`UnsupportedProtocolError` for a newer one).
            if message.topic == self.control_topic:
                await self._handle_control(message)
            else:
                await self._handle_command(message)
        except DeadLetter as dead:
            await self._dead_letter(message, dead.category, dead.reason)
        except UnsupportedProtocolError as exc:
            await self._dead_letter(message, "unsupported_protocol", f"unsupported_protocol: {exc.reason}")
        except MalformedMessageError as exc:
            await self._dead_letter(message, "malformed", str(exc))

    async def _handle_command(self, message: BrokerMessage) -> None:
        command = SagaCommand.from_message(message)
        spec = self._handlers.get(command.target)
        if spec is None:
            raise DeadLetter("no_handler", f"no handler for command topic {command.target!r}")
        if _log.isEnabledFor(logging.DEBUG):
            _log.debug(
                "%s handling %s (%s), traceparent %s",
                self.service_name,
                command.idempotency_key,
                command.target,
                command.traceparent,
            )
        async with KeyLocked(self._locks, command.idempotency_key):
            if _tracing.enabled:
                with _tracing.handler_span(command.target, message.headers, group=self.group_id):
                    await self._answer(message, command, spec)
            else:
                await self._answer(message, command, spec)

    async def _answer(self, message: BrokerMessage, command: SagaCommand, spec: HandlerSpec) -> None:
        """Answer ``command``: from its stored outcome, or by running its handler once."""
        if self._flow is not None:
            kind = command_kind(command.target, spec, self._handlers.values())
            # The saga step names the pair; without the header, the forward command's topic does.
            step = command.step or spec.compensates or command.target
            await self._flow.handle(message, command, spec, kind, step)
        else:
            await answer_with_dedup(
                self._replies,
                message,
                command,
                spec.fn,
                call=self._call,
                publish=self._publish_reply,
                service=self.service_name,
                limit=self._max_reply_bytes,
                stats=self.stats,
            )

    async def _publish_reply(self, reply: BrokerMessage) -> None:
        await self._call(self.broker_pool.publisher().send, reply)

    async def _handle_control(self, message: BrokerMessage) -> None:
        control = SagaControl.from_message(message)
        if control.service != self.service_name:
            raise MalformedMessageError(
                H_SERVICE, f"names {control.service[:64]!r}, not {self.service_name!r}"
            )
        handlers = self._on_commit if control.action == "commit" else self._on_reject
        async with KeyLocked(self._locks, control.idempotency_key):
            if self._flow is not None:
                done = await decide_with_store(self._flow, control, handlers, self._call)
            else:
                done = await decide_with_dedup(self._replies, control, handlers, self._call)
        if not done:
            self.stats.duplicate_decisions += 1
        elif control.action == "commit":
            self.stats.commits += 1
        else:
            self.stats.rejects += 1

    async def _dead_letter(self, message: BrokerMessage, category: str, reason: str) -> None:
        _log.warning(
            "%s dead-lettering %s[%s]@%s: %s",
            self.service_name,
            message.topic,
            message.partition,
            message.offset,
            reason,
        )
        letter = dead_letter_message(message, self.dead_letter_topic, reason, code=category)
        await self._retry(self.broker_pool.publisher().send, letter)
        self.stats.dead_lettered += 1
        self.stats.dead_letter_reasons[category] = self.stats.dead_letter_reasons.get(category, 0) + 1

    # -- infrastructure calls ----------------------------------------------------------------------------

    async def _call(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> Any:
        """`_retry`, turning a non-retriable broker/storage failure into a dead letter of the record."""
        try:
            return await self._retry(fn, *args)
        except BrokerClosedError:
            raise
        except (BrokerError, StorageError) as exc:
            raise DeadLetter("infrastructure", f"{type(exc).__name__}: {exc}") from exc

    async def _retry(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> Any:
        """Call ``fn``, backing off and retrying while it fails with a retriable error."""
        delay = self._retry_backoff
        while True:
            try:
                return await fn(*args)
            except (BrokerError, StorageError) as exc:
                if not exc.retriable:
                    raise
                if self._stopping.is_set():
                    raise _Abandoned() from exc
                self.stats.retries += 1
                _log.warning("%s: %s; retrying in %.2f s", self.service_name, exc, delay)
                await asyncio.sleep(delay * random.uniform(0.8, 1.2))
                delay = min(delay * 2, self._max_backoff)

    # -- consuming ----------------------------------------------------------------------------------------

    async def _consume(self, pipeline: KeyedPipeline) -> None:
        try:
            await pipeline.run()
        except BrokerClosedError:
            if not self._stopping.is_set():
                _log.error("participant %s: broker closed under it; consumer stopped", self.service_name)
                raise
        except Exception:
            _log.exception("participant %s consumer failed", self.service_name)
            raise

    async def _process(self, message: BrokerMessage) -> bool:
        """Handle one record; ``False`` when stopping abandoned it (it is left uncommitted)."""
        try:
            await self.handle(message)
        except _Abandoned:
            return False
        return True

    def _fetch_failed(self, exc: Exception, failures: int) -> float:
        """A retriable poll failure is retried after a pause; any other stops the consumer."""
        if not isinstance(exc, BrokerError) or not exc.retriable:
            raise exc
        self.stats.retries += 1
        _log.warning("%s: poll failed (%s); retrying", self.service_name, exc)
        return self._retry_backoff

    def _check_not_started(self) -> None:
        if self._task is not None:
            raise SagaStateError("handlers must be registered before the participant starts")
