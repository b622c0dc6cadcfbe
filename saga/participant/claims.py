"""How a participant with a store handles a command: claim, run once, commit the reply with the effect.

`StoreFlow` is the store-backed half of `SagaParticipant` (the participant without a store keeps its
in-process or `SagaStorage` dedup). For each command:

1. **Claim** it in the store under its idempotency key, with a lease on the database's clock, renewed while
   the handler runs. A command already ``done`` is answered from its stored reply; one another instance
   holds is waited for (answered once it is done, taken over once its lease ran out: the holder died).
2. **Run** the handler. A *transactional* handler runs inside the participant database's transaction, in
   which the participant then marks the command done with its reply and queues the reply in the outbox;
   the commit makes the effect, the dedup record and the reply durable together. The completion is
   conditional on still holding the claim, so an instance whose lease was taken over rolls back. An
   *at-least-once* handler (one calling the outside world) runs outside any transaction, receives the
   idempotency key to pass on, and its reply is committed after it returned.
3. **Reply**: published at once after the commit; the outbox row is forgotten after the publish, and the
   relay publishes rows whose instance died in between.

Pairing a compensation with its forward command: a handler registered with ``compensates="Forward"`` is
the compensation of the handler of topic ``Forward``; both commands of one saga step carry the same
``saga-execution-id`` and ``saga-step`` headers (the step name; without it, the forward topic), which
name the step here. The step's row in the store orders them: the forward command marks it ``forward``
in its own transaction (so it takes effect only if no tombstone is there); a compensation that finds no
row writes a tombstone and replies success without running its handler, and a later forward command is
refused with a 400 ``cancelled`` reply; a compensation that finds ``forward`` runs its handler and
marks the step ``compensated``, which refuses any later forward command too. On PostgreSQL the
compensation's statement waits for a forward transaction in progress on the step.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from broker import BrokerClientPool, BrokerMessage
from saga.errors import SagaBusinessError
from saga.messages import SagaCommand, SagaResponseStatus, encode_json
from saga.participant.relay import ReplyRelay
from saga.participant.replies import reply_to, sized_reply
from saga.participant.types import CommandContext, CommandHandler, HandlerTransaction, ParticipantStats
from storage.participant import ClaimResult, CommandKind, SqlParticipantStore

__all__ = ["HandlerSpec", "StoreFlow", "run_handler"]

_log = logging.getLogger("saga.participant")

_SUCCESS = int(SagaResponseStatus.SUCCESS)
_ERROR = int(SagaResponseStatus.ERROR)
_SYSTEM_ERROR = int(SagaResponseStatus.SYSTEM_ERROR)

Call = Callable[..., Awaitable[Any]]


@dataclass(frozen=True, slots=True)
class HandlerSpec:
    """A registered command handler and how it runs.

    Attributes:
        fn: The handler.
        compensates: The forward command topic this handler compensates, if it is a compensation.
        transactional: Run inside the participant database's transaction (needs a store); ``False`` for
            handlers that call the outside world (at-least-once, with the idempotency key).
    """

    fn: CommandHandler
    compensates: str | None = None
    transactional: bool = True


class Abandoned(Exception):
    """The participant is stopping while waiting for another instance; leave the record uncommitted."""


class _Rollback(Exception):
    """Internal: end the transaction without committing the handler's writes; reply ``status``."""

    def __init__(self, status: int, value: bytes) -> None:
        super().__init__(status)
        self.status = status
        self.value = value


class _LostClaim(Exception):
    """Internal: another instance took the claim over; roll back and leave the reply to it."""


async def run_handler(
    handler: CommandHandler, request: CommandContext, stats: ParticipantStats, service: str
) -> tuple[int, bytes]:
    """Run ``handler``; the reply's status and its content, encoded (exceptions become replies)."""
    stats.handled += 1
    try:
        result = handler(request)
        if inspect.isawaitable(result):
            result = await result
        encoded = encode_json(result)
    except SagaBusinessError as exc:
        stats.business_errors += 1
        _log.info("%s refused command %s: %s", service, request.idempotency_key, exc)
        return _ERROR, encode_json({"error": str(exc)})
    except Exception as exc:
        stats.system_errors += 1
        _log.exception("%s handler of %r failed", service, request.topic)
        return _SYSTEM_ERROR, encode_json({"error": f"{type(exc).__name__}: {exc}"})
    stats.succeeded += 1
    return _SUCCESS, encoded


def command_context(
    command: SagaCommand, message: BrokerMessage, tx: HandlerTransaction | None
) -> CommandContext:
    """What the handler of ``command`` receives."""
    return CommandContext(
        content=command.content,
        user=command.user,
        idempotency_key=command.idempotency_key,
        execution_id=command.execution_id,
        request_id=command.request_id,
        topic=command.target,
        saga=command.saga,
        step=command.step,
        traceparent=command.traceparent,
        tracestate=message.headers.get("tracestate"),
        transaction=tx,
    )


class StoreFlow:
    """Claims, runs and commits commands of one participant through its `SqlParticipantStore`."""

    def __init__(
        self,
        store: SqlParticipantStore,
        *,
        service: str,
        owner: str,
        lease: float,
        max_reply_bytes: int,
        stats: ParticipantStats,
        call: Call,
        broker_pool: BrokerClientPool,
        relay_older_than: float,
        stopping: asyncio.Event,
    ) -> None:
        self.store = store
        self.service = service
        self.owner = owner
        self.lease = lease
        self._limit = max_reply_bytes
        self._stats = stats
        self._call = call
        self._pool = broker_pool
        self._stopping = stopping
        self.relay = ReplyRelay(store, service, broker_pool, older_than=relay_older_than)
        self._published = self.relay.published
        self._own_store = False
        self._held: set[str] = set()
        self._renewer: asyncio.Task[None] | None = None

    # -- claims ---------------------------------------------------------------------------------------

    async def claim(
        self, key: str, kind: CommandKind, execution_id: str | None, step: str | None
    ) -> ClaimResult:
        """Claim ``key``, waiting while another instance holds it; ``claimed`` or ``done``."""
        waited = False
        delay = min(0.05, self.lease / 10)
        while True:
            result: ClaimResult = await self._call(
                functools.partial(self.store.claim, owner=self.owner, lease=self.lease, kind=kind),
                self.service,
                key,
                execution_id,
                step,
            )
            if result.outcome != "busy":
                return result
            if not waited:
                waited = True
                self._stats.waited += 1
                _log.info("%s: command %s is being handled by another instance; waiting", self.service, key)
            if self._stopping.is_set():
                raise Abandoned()
            await asyncio.sleep(min(delay, max(result.lease_left, 0.01)))
            delay = min(delay * 2, max(self.lease / 4, 0.05))

    @contextlib.asynccontextmanager
    async def renewing(self, key: str) -> AsyncIterator[None]:
        """Keep ``key``'s lease renewed while the body runs.

        One background task renews every claim this instance holds, in one statement every third of the
        lease, rather than a task and a statement per command.
        """
        self._held.add(key)
        if self._renewer is None or self._renewer.done():
            self._renewer = asyncio.create_task(self._renew(), name=f"leases-{self.service}")
        try:
            yield
        finally:
            self._held.discard(key)

    async def _renew(self) -> None:
        while True:
            await asyncio.sleep(self.lease / 3)
            keys = list(self._held)
            if not keys:
                continue
            try:
                renewed = await self.store.renew_many(self.service, keys, owner=self.owner, lease=self.lease)
            except Exception as exc:  # the next renewal, or the lease, decides
                _log.warning("%s: renewing %d claims failed: %s", self.service, len(keys), exc)
                continue
            for key in keys:
                if key not in renewed and key in self._held:
                    _log.warning("%s: lost the claim of %s (its lease ran out)", self.service, key)

    async def start(self) -> None:
        """Start the store (unless someone else did) and the reply relay."""
        # A store someone else started (shared by several participants) is theirs to stop.
        self._own_store = not self.store.started
        await self.store.start()
        self.relay.start()

    async def close(self) -> None:
        """Stop renewing (the claims still held are left to their leases), the relay, and the store."""
        task, self._renewer = self._renewer, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.relay.stop()
        if self._own_store:
            self._own_store = False
            await self.store.stop()

    async def _publish(self, reply: BrokerMessage) -> None:
        await self._call(self._pool.publisher().send, reply)

    # -- commands ---------------------------------------------------------------------------------------

    async def handle(
        self,
        message: BrokerMessage,
        command: SagaCommand,
        spec: HandlerSpec,
        kind: CommandKind,
        step: str,
    ) -> None:
        """Claim, run (at most once) and answer one command."""
        key = command.idempotency_key
        execution = str(command.execution_id)
        claim = await self.claim(key, kind, execution, step)
        if claim.outcome == "done":
            self._stats.duplicates += 1
            assert claim.reply_status is not None and claim.reply_value is not None
            await self._publish(self._reply(message, command, claim.reply_status, claim.reply_value))
            return
        async with self.renewing(key):
            if spec.transactional:
                outcome = await self._call(self._transactional, message, command, spec, kind, step)
            else:
                outcome = await self._at_least_once(message, command, spec, kind, step)
        if outcome is None:
            return
        reply, outbox_id = outcome
        await self._publish(reply)
        if outbox_id:
            self._published(outbox_id)

    def _reply(
        self, message: BrokerMessage, command: SagaCommand, status: int, value: bytes
    ) -> BrokerMessage:
        return reply_to(message, command, status, value, self.service)

    def _sized(
        self, message: BrokerMessage, command: SagaCommand, status: int, value: bytes
    ) -> BrokerMessage:
        return sized_reply(
            message, command, status, value, service=self.service, limit=self._limit, stats=self._stats
        )

    async def _complete(self, conn: Any, command: SagaCommand, reply: BrokerMessage) -> int:
        status = int(reply.headers["saga-status"])
        outbox_id = await self.store.complete(
            conn,
            self.service,
            command.idempotency_key,
            owner=self.owner,
            status=status,
            value=reply.value,
            reply_topic=reply.topic,
            reply_key=reply.key,
            reply_headers=reply.headers,
        )
        if outbox_id is None:
            raise _LostClaim()
        return outbox_id

    async def _transactional(
        self, message: BrokerMessage, command: SagaCommand, spec: HandlerSpec, kind: CommandKind, step: str
    ) -> tuple[BrokerMessage, int] | None:
        """Run the handler in the participant's transaction and commit its reply with it."""
        store = self.store
        execution = str(command.execution_id)
        try:
            async with store.transaction() as conn:
                reply = await self._gate(conn, message, command, kind, step)
                if reply is None:
                    handler_conn = conn.connection
                    if not handler_conn.in_transaction():
                        # SQLAlchemy's view of the transaction the store opened on the driver, so an
                        # ORM session joins it instead of committing a transaction of its own.
                        await handler_conn.begin()
                    tx = HandlerTransaction(handler_conn)
                    status, value = await run_handler(
                        spec.fn, command_context(command, message, tx), self._stats, self.service
                    )
                    if status != _SUCCESS:
                        await tx.discard()
                        # SQLAlchemy's side too: a failed statement of the handler leaves it needing one.
                        await handler_conn.rollback()
                        raise _Rollback(status, value)
                    await tx.flush()
                    reply = self._sized(message, command, status, value)
                    if reply.headers["saga-status"] != str(_SUCCESS):
                        # Too large to send: the effect is undone with the transaction, and the small
                        # SYSTEM_ERROR reply says why.
                        raise _Rollback(int(reply.headers["saga-status"]), reply.value)
                    if kind == "compensate":
                        await store.set_step(conn, self.service, execution, step, "compensated")
                return reply, await self._complete(conn, command, reply)
        except _LostClaim:
            self._stats.lost_claims += 1
            _log.warning("%s: claim of %s taken over; rolled back", self.service, command.idempotency_key)
            return None
        except _Rollback as refused:
            reply = self._sized(message, command, refused.status, refused.value)
            try:
                async with store.transaction() as conn:
                    return reply, await self._complete(conn, command, reply)
            except _LostClaim:
                self._stats.lost_claims += 1
                return None

    async def _gate(
        self, conn: Any, message: BrokerMessage, command: SagaCommand, kind: CommandKind, step: str
    ) -> BrokerMessage | None:
        """Order a step's forward command and compensation; a reply when the handler must not run."""
        execution = str(command.execution_id)
        if kind == "forward":
            state = await self.store.begin_forward(conn, self.service, execution, step)
            if state != "forward":
                self._stats.cancelled += 1
                _log.info(
                    "%s: %s refused: step %s of %s was compensated",
                    self.service,
                    command.target,
                    step,
                    execution,
                )
                return self._reply(message, command, _ERROR, _cancelled(step))
        elif kind == "compensate":
            found = await self.store.begin_compensation(conn, self.service, execution, step)
            if found != "forward":
                self._stats.tombstones += 1
                return self._reply(message, command, _SUCCESS, _nothing_to_undo(found))
        return None

    async def _at_least_once(
        self, message: BrokerMessage, command: SagaCommand, spec: HandlerSpec, kind: CommandKind, step: str
    ) -> tuple[BrokerMessage, int] | None:
        """Run a handler that calls the outside world: the claim is its only guard against a second run."""
        store = self.store
        execution = str(command.execution_id)
        if kind == "compensate":
            while await self._call(store.forward_running, self.service, execution, step):
                if self._stopping.is_set():
                    raise Abandoned()
                await asyncio.sleep(min(0.1, self.lease / 10))

        async def gate() -> BrokerMessage | None:
            async with store.transaction() as conn:
                early = await self._gate(conn, message, command, kind, step)
                if early is None and kind == "compensate":
                    # Later forward commands are refused from here on, whatever this compensation does.
                    await store.set_step(conn, self.service, execution, step, "compensating")
                return early

        early: BrokerMessage | None = await self._call(gate)
        if early is None:
            status, value = await run_handler(
                spec.fn, command_context(command, message, None), self._stats, self.service
            )
            reply = self._sized(message, command, status, value)
        else:
            reply = early

        async def finish() -> tuple[BrokerMessage, int] | None:
            try:
                async with store.transaction() as conn:
                    if (
                        early is None
                        and kind == "compensate"
                        and reply.headers["saga-status"] == str(_SUCCESS)
                    ):
                        await store.set_step(conn, self.service, execution, step, "compensated")
                    return reply, await self._complete(conn, command, reply)
            except _LostClaim:
                self._stats.lost_claims += 1
                return None

        result: tuple[BrokerMessage, int] | None = await self._call(finish)
        return result


def _cancelled(step: str) -> bytes:
    return encode_json({"error": "cancelled", "reason": f"step {step!r} was compensated before this command"})


def _nothing_to_undo(found: str) -> bytes:
    return encode_json({"compensated": False, "reason": f"forward command never took effect ({found})"})
