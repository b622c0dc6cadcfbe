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
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import random
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any, Self, TypeVar

from broker import BrokerClientPool, BrokerClosedError, BrokerError, BrokerMessage, BrokerSubscriber
from saga.consumer import H_DEAD_LETTER_REASON, H_DEAD_LETTER_TOPIC, dead_letter_message
from saga.errors import MalformedMessageError, SagaBusinessError, SagaStateError, UnsupportedProtocolError
from saga.messages import (
    H_SERVICE,
    PHASE_COMPENSATION,
    SagaCommand,
    SagaControl,
    SagaResponseStatus,
    control_topic,
    decode_json,
    encode_json,
    reply_message,
)
from saga.observability import tracing as _tracing
from saga.participant_dedup import KeyLock, KeyLocked, LruReplyStore, ReplyStore
from saga.participant_types import CommandContext, CommandHandler, DecisionHandler, ParticipantStats
from saga.pipeline import KeyedPipeline
from storage import SagaStorage, StorageError

__all__ = [
    "H_DEAD_LETTER_REASON",
    "H_DEAD_LETTER_TOPIC",
    "CommandContext",
    "CommandHandler",
    "DecisionHandler",
    "ParticipantStats",
    "SagaParticipant",
]

_log = logging.getLogger(__name__)

_F = TypeVar("_F", bound=Callable[..., Any])

_SUCCESS = int(SagaResponseStatus.SUCCESS)
_ERROR = int(SagaResponseStatus.ERROR)
_SYSTEM_ERROR = int(SagaResponseStatus.SYSTEM_ERROR)


def _lane(message: BrokerMessage) -> tuple[str, int | None, bytes | None]:
    """Records of one key (the saga execution id) are handled in offset order, other keys concurrently.

    A saga's commands and its decision share the key, so they reach handlers in the order the orchestrator
    published them; sagas sharing a partition have no order to keep between them, and handling them one
    after the other would cap a participant at one reply publish per partition at a time. Records without
    a key keep partition order.
    """
    return message.topic, message.partition, message.key


def _stored_reply(status: int, value: bytes) -> bytes:
    """A reply as the dedup store keeps it: ``{"status": ..., "content": ...}``.

    Spliced around the reply's already encoded content: the same bytes `encode_json` makes of that dict,
    without encoding the content a second time.
    """
    return b'{"status":%d,"content":%b}' % (status, value)


def _stored_outcome(key: str, stored: bytes) -> tuple[int, bytes]:
    """The status and encoded content of a reply `_stored_reply` kept under ``key``."""
    data = decode_json(stored, field_name="stored reply")
    if not isinstance(data, dict) or not isinstance(data.get("status"), int):
        raise _DeadLetter("bad_stored_reply", f"stored reply of {key!r} is unreadable")
    return data["status"], encode_json(data.get("content"))


class _DeadLetter(Exception):
    """Internal: the record goes to the dead-letter topic for ``reason``."""

    def __init__(self, category: str, reason: str) -> None:
        super().__init__(reason)
        self.category = category
        self.reason = reason


class _Abandoned(Exception):
    """Internal: the participant is stopping; leave the record uncommitted for redelivery."""


class SagaParticipant:
    """Executes a service's saga commands and replies to the orchestrator.

    Args:
        service_name: The service's name; replies carry it, and decisions arrive on
            ``control_topic(service_name)``.
        broker_pool: Transport. Started by `start` if needed; its owner stops it.
        storage: Where replies are remembered by idempotency key (``get_command_reply`` /
            ``put_command_reply``) so duplicates survive restarts. Without it, a bounded in-process LRU.
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
        self.service_name = service_name
        self.broker_pool = broker_pool
        self.storage = storage
        self.group_id = group_id or f"{service_name}-participant"
        self.dead_letter_topic = dead_letter_topic or f"{service_name}DeadLetter"
        self.control_topic = control_topic(service_name)
        self.stats = ParticipantStats()
        self._replies: ReplyStore = storage if storage is not None else LruReplyStore(dedup_cache_size)
        self._max_records = max_records
        self._concurrency = concurrency
        self._poll_timeout = poll_timeout
        self._retry_backoff = retry_backoff
        self._max_backoff = max_backoff
        self._commit_interval = commit_interval
        self._handlers: dict[str, CommandHandler] = {}
        self._on_commit: list[DecisionHandler] = []
        self._on_reject: list[DecisionHandler] = []
        self._locks: dict[str, KeyLock] = {}
        self._subscriber: BrokerSubscriber | None = None
        self._pipeline: KeyedPipeline | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()

    # -- registration ---------------------------------------------------------------------------------

    def command(self, topic: str) -> Callable[[_F], _F]:
        """Register the decorated function (sync or async) as the handler of command topic ``topic``.

        Its return value (JSON-able) is the ``SUCCESS`` reply's content; raising `SagaBusinessError`
        replies ``ERROR`` with ``{"error": message}``; any other exception replies ``SYSTEM_ERROR``.
        """
        if not topic:
            raise ValueError("command topic must not be empty")

        def register(fn: _F) -> _F:
            self._check_not_started()
            if topic in self._handlers:
                raise ValueError(f"command topic {topic!r} already has a handler")
            self._handlers[topic] = fn
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
        await self.broker_pool.start()
        if self.storage is not None:
            await self.storage.start()
        topics = [*self._handlers, self.control_topic]
        await self.broker_pool.ensure_topics([*topics, self.dead_letter_topic])
        self._stopping.clear()
        subscriber = self.broker_pool.subscriber(topics, group_id=self.group_id)
        await subscriber.start()
        self._subscriber = subscriber
        self._pipeline = pipeline = KeyedPipeline(
            subscriber,
            self._process,
            lane=_lane,
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
            if message.topic == self.control_topic:
                await self._handle_control(message)
            else:
                await self._handle_command(message)
        except _DeadLetter as dead:
            await self._dead_letter(message, dead.category, dead.reason)
        except UnsupportedProtocolError as exc:
            await self._dead_letter(message, "unsupported_protocol", f"unsupported_protocol: {exc.reason}")
        except MalformedMessageError as exc:
            await self._dead_letter(message, "malformed", str(exc))

    async def _handle_command(self, message: BrokerMessage) -> None:
        command = SagaCommand.from_message(message)
        handler = self._handlers.get(command.target)
        if handler is None:
            raise _DeadLetter("no_handler", f"no handler for command topic {command.target!r}")
        key = command.idempotency_key
        async with KeyLocked(self._locks, key):
            stored = await self._call(self._replies.get_command_reply, key)
            if stored is not None:
                self.stats.duplicates += 1
                _log.debug("command %s already handled; re-sending its reply", key)
                status, value = _stored_outcome(key, stored)
            else:
                if _tracing.enabled:
                    with _tracing.handler_span(command.target, message.headers, group=self.group_id):
                        status, value = await self._first_delivery(handler, command)
                else:
                    status, value = await self._first_delivery(handler, command)
                await self._call(self._replies.put_command_reply, key, _stored_reply(status, value))
            reply = reply_message(
                command.reply_topic,
                value=value,
                status=status,
                # Addressed from the command just received (reply topic, request id), not from the one
                # first handled, so a replay under the same key that carries a new request id still gets
                # an applicable reply.
                execution_id=command.execution_id,
                request_id=command.request_id,
                service_name=self.service_name,
                traceparent=command.traceparent,
                tracestate=command.tracestate,
            )
            await self._call(self.broker_pool.publisher().send, reply)

    async def _first_delivery(self, handler: CommandHandler, command: SagaCommand) -> tuple[int, bytes]:
        """Run a command seen for the first time, minding the forward/compensation pairing of its step.

        A compensation whose forward command (same execution and step) was never handled has nothing to
        undo: it leaves a tombstone and succeeds without running its handler, and the forward command,
        should it arrive later, is refused (400 ``cancelled``) instead of doing what nobody will undo.
        """
        if command.step is None:
            return await self._run_handler(handler, command)
        pair = f"{self.service_name}:{command.execution_id}:{command.step}"
        if command.phase == PHASE_COMPENSATION:
            if await self._call(self._replies.get_command_reply, f"{pair}:forward") is None:
                await self._call(self._replies.put_command_reply, f"{pair}:tombstone", b"{}")
                _log.info("%s: compensation %s before its forward command", self.service_name, pair)
                return _SUCCESS, b"{}"
            return await self._run_handler(handler, command)
        if await self._call(self._replies.get_command_reply, f"{pair}:tombstone") is not None:
            _log.info("%s: forward command %s arrived after its compensation", self.service_name, pair)
            return _ERROR, encode_json({"error": "cancelled"})
        await self._call(self._replies.put_command_reply, f"{pair}:forward", b"{}")
        return await self._run_handler(handler, command)

    async def _run_handler(self, handler: CommandHandler, command: SagaCommand) -> tuple[int, bytes]:
        """Run ``handler``; the reply's status and its content, encoded."""
        request = CommandContext(
            content=command.content,
            user=command.user,
            idempotency_key=command.idempotency_key,
            execution_id=command.execution_id,
            request_id=command.request_id,
            topic=command.target,
            saga=command.saga,
            step=command.step,
            traceparent=command.traceparent,
        )
        self.stats.handled += 1
        if _log.isEnabledFor(logging.DEBUG):
            _log.debug(
                "%s handling %s (%s), traceparent %s",
                self.service_name,
                command.idempotency_key,
                command.target,
                command.traceparent,
            )
        try:
            result = handler(request)
            if inspect.isawaitable(result):
                result = await result
            encoded = encode_json(result)
        except SagaBusinessError as exc:
            self.stats.business_errors += 1
            _log.info("%s refused command %s: %s", self.service_name, command.idempotency_key, exc)
            return _ERROR, encode_json({"error": str(exc)})
        except Exception as exc:
            self.stats.system_errors += 1
            _log.exception("%s handler of %r failed", self.service_name, command.target)
            return _SYSTEM_ERROR, encode_json({"error": f"{type(exc).__name__}: {exc}"})
        self.stats.succeeded += 1
        return _SUCCESS, encoded

    async def _handle_control(self, message: BrokerMessage) -> None:
        control = SagaControl.from_message(message)
        if control.service != self.service_name:
            raise MalformedMessageError(
                H_SERVICE, f"names {control.service[:64]!r}, not {self.service_name!r}"
            )
        # Several services may share one store; the decision's own key is per execution and action only.
        key = control.idempotency_key
        async with KeyLocked(self._locks, key):
            if await self._call(self._replies.get_command_reply, key) is not None:
                self.stats.duplicate_decisions += 1
                return
            handlers = self._on_commit if control.action == "commit" else self._on_reject
            for fn in handlers:
                try:
                    result = fn(control)
                    if inspect.isawaitable(result):
                        await result
                except Exception as exc:
                    _log.exception("%s %s handler failed", self.service_name, control.action)
                    raise _DeadLetter(
                        "decision_failed", f"{control.action} handler raised {type(exc).__name__}: {exc}"
                    ) from exc
            await self._call(self._replies.put_command_reply, key, encode_json({"decision": control.action}))
        if control.action == "commit":
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
            raise _DeadLetter("infrastructure", f"{type(exc).__name__}: {exc}") from exc

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
