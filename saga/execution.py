"""`SagaExecution`: one run of a saga, as an I/O-free state machine.

The execution holds everything about a run (context, cursor, awaited request, step history) and moves it
forward one step at a time: `advance` runs exactly one step (or emits one command), `apply_reply` applies
the awaited reply, `on_timeout` handles an overdue one. Each returns a `Transition` telling the caller what
to persist and publish; the execution itself never touches storage or the broker, which is what lets the
manager keep the rule "persist, then publish" in one place and lets tests drive the machine directly.

Cursor: a path of ints into the definition. ``[i]`` is top-level step ``i``; a conditional step that took
branch ``b`` extends it to ``[i, b, j]`` (step ``j`` of that branch's sub-saga), and so on. Compensation walks
the executed paths in reverse.
"""

from __future__ import annotations

import dataclasses
import functools
import uuid
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson

from saga import compensation as _comp
from saga import execution_minos as _minos
from saga import execution_steps as _steps
from saga import step_support as _support
from saga.context import SagaContext, decode_context, encode_context
from saga.definitions import Saga
from saga.errors import SagaStateError
from saga.hooks import SagaHooks
from saga.messages import ControlAction, SagaControl, SagaResponse
from saga.observability import tracing as _tracing
from saga.state import STATE_FORMAT, AwaitedRequest, Transition, compact, outbox_message, random_uuid
from saga.steps import ConditionalSagaStep, RemoteSagaStep, SagaStep
from saga.trace_context import new_traceparent
from storage import ExecutionRecord, OutboxMessage, SagaStatus, StepRecord
from storage.records import ReplyOutcome, StepPhase, new_execution_record

__all__ = ["SagaExecution", "Transition"]


#: The default clock: timezone-aware UTC now (a C-level partial: it is read on every step).
_utc_now: Callable[[], datetime] = functools.partial(datetime.now, UTC)


# Enum members read from the class cost a descriptor call each (3.11); these run on every step.
_RUNNING = SagaStatus.RUNNING
_PAUSED = SagaStatus.PAUSED
_COMPENSATING = SagaStatus.COMPENSATING
_FINISHED = SagaStatus.FINISHED
_ERRORED = SagaStatus.ERRORED
_DEAD_LETTER = SagaStatus.DEAD_LETTER
_dumps = orjson.dumps
_NON_STR_KEYS = orjson.OPT_NON_STR_KEYS


# `SagaExecution.to_record` builds records positionally; fail at import, not with shuffled columns.
_RECORD_FIELDS = (
    "id",
    "name",
    "definition_version",
    "status",
    "state",
    "steps",
    "version",
    "recovery_attempts",
    "idempotency_key",
    "user",
    "reply_deadline",
    "owner",
    "lease_until",
    "error",
    "created_at",
    "updated_at",
    "awaiting_request",
)
if tuple(f.name for f in dataclasses.fields(ExecutionRecord)) != _RECORD_FIELDS:  # pragma: no cover
    raise ImportError("storage.ExecutionRecord fields changed: update SagaExecution.to_record")


def _deadline_error() -> dict[str, Any]:
    return {"step": None, "error": "saga deadline passed", "type": "deadline"}


class SagaExecution(_minos.MinosExecutionAPI):
    """One run of a saga definition.

    Build one with `start` (a new run) or `from_record` (a stored run); drive it with `advance`,
    `apply_reply`, `on_timeout` and `replay`; store it with `to_record`. Every driving method returns a
    `Transition`; when its ``persist`` is true the caller saves `to_record()` together with the
    transition's ``outbox`` before publishing anything. Minos's driving API (``from_definition``,
    ``execute``, ``rollback``) comes from `saga.execution_minos.MinosExecutionAPI`.

    Attributes:
        id: Execution id.
        definition: The committed saga definition.
        status: Current status.
        context: The saga's data.
        user: User the saga runs for (forwarded in command headers).
        idempotency_key: Start key, if the run was started with one.
        autocommit: Whether the terminal state sends commit/reject to participants by itself.
        error: Structured error once the run failed.
        steps: Step history (storage records), oldest first.
        participants: Services that replied, in first-reply order (they receive commit/reject).
        awaiting: The request whose reply is awaited, while paused.
        deadline: Saga deadline, if the definition sets one.
        decision_sent: Whether commit/reject was already written to the outbox.
        record_version: Storage version of the last stored record (for the optimistic save).
        recovery_attempts: As stored.
        traceparent: W3C trace context every command and decision of the run carries.
        tracestate: W3C vendor trace state sent with ``traceparent``, when there is one.
    """

    __slots__ = (
        "_attempt_started",
        "_clock",
        "_ctx_snapshot",
        "answered",
        "attempt",
        "autocommit",
        "awaiting",
        "claim_lost",
        "compensated",
        "context",
        "created_at",
        "cursor",
        "deadline",
        "decision_sent",
        "definition",
        "error",
        "executed",
        "hooks",
        "id",
        "idempotency_key",
        "outbox",
        "participants",
        "phase",
        "record_version",
        "recovery_attempts",
        "reply_topic",
        "saga_name",
        "status",
        "steps",
        "traceparent",
        "tracestate",
        "updated_at",
        "user",
    )

    def __init__(
        self,
        definition: Saga,
        *,
        execution_id: uuid.UUID,
        context: SagaContext,
        reply_topic: str,
        status: SagaStatus = SagaStatus.RUNNING,
        user: str | None = None,
        autocommit: bool = True,
        idempotency_key: str | None = None,
        deadline: datetime | None = None,
        hooks: SagaHooks | None = None,
        clock: Callable[[], datetime] | None = None,
        traceparent: str | None = None,
        tracestate: str | None = None,
    ) -> None:
        name = definition.name
        if not definition.committed or name is None:
            raise SagaStateError(f"definition {definition!r} must be named and committed before it runs")
        self.definition = definition
        #: Definition name (cached: it is written with every record).
        self.saga_name: str = name
        self.id = execution_id
        self.context = context
        self.reply_topic = reply_topic
        self.status = status
        self.user = user
        self.autocommit = autocommit
        self.idempotency_key = idempotency_key
        self.deadline = deadline
        self.hooks = hooks
        self.traceparent = traceparent
        self.tracestate = tracestate
        self._clock = clock or _utc_now
        self.error: dict[str, Any] | None = None
        self.steps: list[StepRecord] = []
        self.participants: list[str] = []
        self.awaiting: AwaitedRequest | None = None
        self.decision_sent = False
        self.phase: StepPhase = "execute"
        self.cursor: list[int] = [0]
        self.attempt = 0
        self.executed: list[tuple[int, ...]] = []
        self.compensated = 0
        self.answered: list[str] = []
        self.record_version = 0
        self.recovery_attempts = 0
        self.created_at: datetime | None = None
        self.updated_at: datetime | None = None
        self._ctx_snapshot: dict[str, Any] = {}
        self._attempt_started: datetime | None = None
        #: Set by the manager's heartbeat when another worker took the claim while this run was driven.
        self.claim_lost = False
        #: What `execute` and `rollback` (the Minos driving API) produced, for their caller to publish.
        self.outbox: tuple[OutboxMessage, ...] = ()

    # -- construction ----------------------------------------------------------------------------------

    @classmethod
    def start(
        cls,
        definition: Saga,
        context: SagaContext | Mapping[str, Any] | None = None,
        *,
        reply_topic: str,
        now: datetime,
        user: str | None = None,
        autocommit: bool = True,
        idempotency_key: str | None = None,
        execution_id: uuid.UUID | None = None,
        hooks: SagaHooks | None = None,
        clock: Callable[[], datetime] | None = None,
        traceparent: str | None = None,
        tracestate: str | None = None,
    ) -> SagaExecution:
        """A new run in ``RUNNING`` status, cursor on the first step (nothing has run yet)."""
        ctx = SagaContext(context) if context is not None else SagaContext()
        deadline = None if definition.deadline is None else now + timedelta(seconds=definition.deadline)
        return cls(
            definition,
            execution_id=execution_id or random_uuid(),
            context=ctx,
            reply_topic=reply_topic,
            user=user,
            autocommit=autocommit,
            idempotency_key=idempotency_key,
            deadline=deadline,
            hooks=hooks,
            clock=clock,
            traceparent=traceparent,
            tracestate=tracestate,
        )

    @classmethod
    def from_record(
        cls,
        record: ExecutionRecord,
        definition: Saga,
        *,
        reply_topic: str,
        hooks: SagaHooks | None = None,
        clock: Callable[[], datetime] | None = None,
    ) -> SagaExecution:
        """Rebuild a stored run. ``definition`` must be the one registered as ``(record.name, version)``."""
        if definition.name != record.name or definition.version != record.definition_version:
            raise SagaStateError(
                f"execution {record.id} is {record.name!r} v{record.definition_version}, "
                f"not {definition.name!r} v{definition.version}",
                execution_id=record.id,
            )
        state = orjson.loads(record.state)
        if state.get("v") != STATE_FORMAT:
            raise SagaStateError(f"unknown state format {state.get('v')!r}", execution_id=record.id)
        deadline = state["dl"]
        execution = cls(
            definition,
            execution_id=record.id,
            context=decode_context(state["ctx"]),
            reply_topic=reply_topic,
            status=record.status,
            user=record.user,
            autocommit=state["auto"],
            idempotency_key=record.idempotency_key,
            deadline=None if deadline is None else datetime.fromisoformat(deadline),
            hooks=hooks,
            clock=clock,
            traceparent=state.get("tp"),
            tracestate=state.get("ts"),
        )
        execution._ctx_snapshot = state["ctx"]
        execution.phase = state["phase"]
        execution.cursor = state["cur"]
        execution.attempt = state["att"]
        execution.executed = [tuple(path) for path in state["done"]]
        execution.compensated = state["comp"]
        execution.answered = state["ans"]
        execution.participants = state["parts"]
        execution.decision_sent = state["dec"]
        awaiting = state["await"]
        execution.awaiting = None if awaiting is None else AwaitedRequest.from_json(awaiting)
        execution.steps = list(record.steps)
        execution.error = None if record.error is None else dict(record.error)
        execution.mark_stored(record)
        return execution

    def mark_stored(self, record: ExecutionRecord) -> None:
        """Take the storage-owned fields (version, timestamps, attempts) from the record as stored."""
        self.record_version = record.version
        self.recovery_attempts = record.recovery_attempts
        self.created_at = record.created_at
        self.updated_at = record.updated_at

    # -- reading ---------------------------------------------------------------------------------------

    @property
    def uuid(self) -> uuid.UUID:
        """The execution id (Minos's name for it)."""
        return self.id

    @property
    def name(self) -> str:
        """Definition name."""
        return self.saga_name

    @property
    def definition_version(self) -> int:
        """Definition version."""
        return self.definition.version

    @property
    def terminal(self) -> bool:
        """FINISHED, ERRORED or DEAD_LETTER."""
        status = self.status
        return status is _FINISHED or status is _ERRORED or status is _DEAD_LETTER

    @property
    def reply_deadline(self) -> datetime | None:
        """While paused: when recovery must look at the run (reply overdue or saga deadline passed)."""
        awaiting = self.awaiting
        if awaiting is None or self.status is not _PAUSED:
            return None
        if self.phase == "compensate" or self.deadline is None:
            return awaiting.deadline
        if awaiting.deadline is None:
            return self.deadline
        return min(awaiting.deadline, self.deadline)

    def step_at(self, path: tuple[int, ...] | list[int]) -> SagaStep:
        """The step a cursor path points to."""
        step: SagaStep = self.definition._steps[path[0]]
        for i in range(1, len(path), 2):
            assert isinstance(step, ConditionalSagaStep)
            step = step.branch(path[i])._steps[path[i + 1]]
        return step

    # -- storing ---------------------------------------------------------------------------------------

    def to_record(
        self, *, owner: str | None = None, lease_until: datetime | None = None, step: str | None = None
    ) -> ExecutionRecord:
        """The storage row for the current state.

        The ``state`` document holds the tagged context, the cursor, the executed paths, the awaited
        request, the participants and the trace context, as orjson bytes. The trace context rides in the
        document the row already stores, so carrying it costs no column and no statement.

        Args:
            owner: Claim owner to write (storage decides whether ``save`` honours it).
            lease_until: Lease end to write alongside.
            step: The step that just ran, named in a `SagaContextError`.

        Raises:
            SagaContextError: The context holds a value that cannot be stored (names the key and step).
        """
        ctx = encode_context(self.context, step=step)
        awaiting = self.awaiting
        deadline = self.deadline
        state = {
            "v": STATE_FORMAT,
            "ctx": ctx,
            "phase": self.phase,
            "cur": self.cursor,
            "att": self.attempt,
            "done": self.executed,
            "comp": self.compensated,
            "await": None if awaiting is None else awaiting.to_json(),
            "ans": self.answered,
            "parts": self.participants,
            "auto": self.autocommit,
            "dec": self.decision_sent,
            "dl": None if deadline is None else deadline.isoformat(),
        }
        if self.traceparent is not None:
            state["tp"] = self.traceparent
            if self.tracestate is not None:
                state["ts"] = self.tracestate
        # Context keys are always strings (SagaContext refuses others, nested dicts are checked by
        # encode_context); only the awaited request's content may need OPT_NON_STR_KEYS, which costs
        # about 0.2 µs per encode when it is set. The copy is `compact`, inlined: stored state must not
        # keep orjson's output buffer.
        encoded = _dumps(state) if awaiting is None else _dumps(state, option=_NON_STR_KEYS)
        data = memoryview(encoded).tobytes()
        self._ctx_snapshot = ctx
        # Positional, in field order (checked at import below): a third cheaper than keywords, and this
        # runs once per step.
        return new_execution_record(
            self.id,
            self.saga_name,
            self.definition.version,
            self.status,
            data,
            tuple(self.steps),
            self.record_version,
            self.recovery_attempts,
            self.idempotency_key,
            self.user,
            None if awaiting is None else self.reply_deadline,
            owner,
            lease_until,
            self.error,
            self.created_at,
            self.updated_at,
            None if awaiting is None else awaiting.request_id,
        )

    def _restore_context(self) -> None:
        """Undo in-place changes a failed callback made, back to the last stored context."""
        self.context = decode_context(self._ctx_snapshot)

    # -- driving ---------------------------------------------------------------------------------------

    async def advance(self, now: datetime) -> Transition:
        """Run exactly one step forward (or one compensation) and say what to persist and publish.

        Conditional steps are decided inline: their conditions run and the first step of the chosen
        branch runs in the same move. A step that fails with retries left returns a transition with
        ``retry_after`` and nothing to persist; the caller waits that long and calls ``advance`` again.

        Raises:
            SagaStateError: The run is paused or terminal.
            SagaContextError: A callback stored a value that cannot be stored (``step`` is set); the
                caller marks the run FAILED from its last stored record.
        """
        status = self.status
        if self.awaiting is not None or status is _FINISHED or status is _ERRORED or status is _DEAD_LETTER:
            raise SagaStateError(
                f"cannot advance execution {self.id} in status {status}", execution_id=self.id
            )
        phase = self.phase
        if phase == "compensate":
            move = _comp.compensate_next(self, now)
        elif self.deadline is not None and now >= self.deadline:
            move = _comp.begin_compensation(self, _deadline_error())
        else:
            move = _steps.execute_next(self, now)
        if _tracing.enabled:
            return await _tracing.traced_move(self.name, self.id, phase, move)
        return await move

    def next_move_runs_effects(self, now: datetime) -> bool:
        """Whether the next `advance` may run step code with effects of its own: a local step, a
        compensation or a condition.

        ``False`` only when it certainly builds a remote step's command or finishes the run, both of which
        the save that follows decides: the manager advances such moves without holding the claim
        (`ExecutionDriver` applies a reply to an execution it paused itself that way) and takes the claim
        first otherwise, so that a local step never runs on two workers at once. Conservative: anything
        less obvious (inside a conditional branch, compensating, deadline passed) counts as effects.
        """
        if self.phase != "execute" or self.status is not _RUNNING or self.awaiting is not None:
            return True
        deadline = self.deadline
        if deadline is not None and now >= deadline:
            return True
        cursor = self.cursor
        if len(cursor) != 1:
            return True
        top = self.definition._steps
        return cursor[0] < len(top) and not isinstance(top[cursor[0]], RemoteSagaStep)

    def classify_reply(self, response: SagaResponse) -> ReplyOutcome:
        """Whether ``response`` would be applied, and if not why (changes nothing).

        ``duplicate``: that request was answered before; ``stale``: any other request that is not awaited;
        ``unknown_status``: the awaited request, but a status other than 200/400/500.
        """
        awaiting = self.awaiting
        if awaiting is None or response.request_id != awaiting.request_id or response.execution_id != self.id:
            return "duplicate" if str(response.request_id) in self.answered else "stale"
        if response.known_status is None:
            return "unknown_status"
        return "applied"

    async def apply_reply(self, response: SagaResponse, now: datetime) -> Transition:
        """Apply the reply to the awaited request; any other reply changes nothing (``persist`` false).

        The transition's ``outcome`` is ``applied`` or why the reply was ignored (see `classify_reply`).
        An ``unknown_status`` reply leaves the step waiting: its timeout decides.

        Raises:
            SagaContextError: A reply handler stored a value that cannot be stored (names key and step).
        """
        outcome = self.classify_reply(response)
        if outcome != "applied":
            return Transition(self.status, persist=False, outcome=outcome)
        awaiting = self.awaiting
        status = response.known_status
        assert awaiting is not None and status is not None
        self.awaiting = None
        self.answered.append(str(response.request_id))
        service = response.service_name
        if service and service not in self.participants:
            self.participants.append(service)
        if awaiting.phase == "compensate":
            result = await _comp.compensation_replied(self, awaiting, status, response, now)
        else:
            result = await _steps.step_replied(self, awaiting, status, response, now)
        if result.status is _RUNNING or result.status is _COMPENSATING:
            # The manager saves this together with the next step; should that step fail, its context
            # must roll back to here (reply applied), not to the last save.
            self._ctx_snapshot = encode_context(self.context, step=result.step)
        return Transition(result.status, result.outbox, outcome="applied", step=result.step)

    def overdue(self, now: datetime) -> bool:
        """Whether the awaited reply is late, or the saga deadline passed while waiting for one."""
        awaiting = self.awaiting
        if awaiting is None:
            return False
        if awaiting.deadline is not None and now >= awaiting.deadline:
            return True
        return awaiting.phase == "execute" and self.deadline is not None and now >= self.deadline

    async def on_timeout(self, now: datetime) -> Transition:
        """The awaited reply is overdue (or the saga deadline passed): replay, compensate or dead-letter.

        A step whose retry policy allows another attempt is replayed under the same request id and
        idempotency key; otherwise the step is compensated too (it may have run and only its reply was
        lost) along with everything before it. An overdue compensation follows its compensation retry
        policy, then goes to DEAD_LETTER. Not overdue yet: nothing changes (``persist`` false).

        Raises:
            SagaStateError: Nothing is awaited.
        """
        awaiting = self.awaiting
        if awaiting is None:
            raise SagaStateError(f"execution {self.id} awaits no reply", execution_id=self.id)
        step = self.step_at(awaiting.path)
        assert isinstance(step, RemoteSagaStep)
        if awaiting.phase == "execute" and self.deadline is not None and now >= self.deadline:
            return await _steps.abandon_request(self, awaiting, step, _deadline_error())
        if awaiting.deadline is None or now < awaiting.deadline:
            return Transition(self.status, persist=False, step=step.name)
        policy = step.retry if awaiting.phase == "execute" else _support.compensation_policy(self, step)
        if policy.allows(awaiting.attempt):
            return await self.replay(now)
        error = {"step": step.name, "error": "no reply before the step's timeout", "type": "timeout"}
        _support.log_exhausted(self, step.name, awaiting.phase, awaiting.attempt, error)
        if awaiting.phase == "compensate":
            return await _comp.compensation_timed_out(self, awaiting, step, error)
        return await _steps.abandon_request(self, awaiting, step, error)

    async def replay(self, now: datetime) -> Transition:
        """Re-send the awaited command under the same request id and idempotency key (one more attempt).

        Raises:
            SagaStateError: Nothing is awaited.
        """
        awaiting = self.awaiting
        if awaiting is None:
            raise SagaStateError(f"execution {self.id} awaits no reply to replay", execution_id=self.id)
        step = self.step_at(awaiting.path)
        assert isinstance(step, RemoteSagaStep)
        if self.traceparent is None:  # a run stored without a trace context starts one with this command
            self.traceparent = new_traceparent()
        awaiting.attempt += 1
        timeout = step.timeout
        awaiting.deadline = None if timeout is None else now + timedelta(seconds=timeout)
        _support.update_record(self, awaiting.record, "waiting", attempts=awaiting.attempt)
        await _support.set_status(self, SagaStatus.PAUSED)
        command = awaiting.command(
            execution_id=self.id,
            reply_topic=self.reply_topic,
            user=self.user,
            saga=self.name,
            step=step.name,
            traceparent=self.traceparent,
            tracestate=self.tracestate,
        )
        return Transition(SagaStatus.PAUSED, (outbox_message(command),), step=step.name)

    async def resume(self) -> None:
        """Take a FAILED run (or a retried DEAD_LETTER one) back to RUNNING or COMPENSATING.

        The interrupted step runs again from the start (at-least-once).

        Raises:
            SagaStateError: The run is not FAILED, DEAD_LETTER or CREATED.
        """
        if self.status not in (SagaStatus.FAILED, SagaStatus.DEAD_LETTER, SagaStatus.CREATED):
            raise SagaStateError(f"execution {self.id} is {self.status}, not failed", execution_id=self.id)
        self.attempt = 0
        target = SagaStatus.COMPENSATING if self.phase == "compensate" else SagaStatus.RUNNING
        if self.awaiting is not None:
            target = SagaStatus.PAUSED
        await _support.set_status(self, target)

    async def mark_failed(self, error: dict[str, Any]) -> None:
        """Record an error outside step logic (unstorable context, crash); recovery resumes FAILED runs."""
        self.error = error
        await _support.set_status(self, SagaStatus.FAILED)

    def decide(self, action: ControlAction) -> Transition:
        """Write commit (FINISHED) or reject (ERRORED) for every participant, once.

        A second call returns a transition with nothing to persist or send.

        Raises:
            SagaStateError: The status does not fit the action.
        """
        expected = SagaStatus.FINISHED if action == "commit" else SagaStatus.ERRORED
        if self.status is not expected:
            raise SagaStateError(
                f"cannot {action} execution {self.id}: it is {self.status}, not {expected}",
                execution_id=self.id,
            )
        if self.decision_sent:
            return Transition(self.status, persist=False)
        return Transition(self.status, self._decision(action))

    def _decision(self, action: ControlAction) -> tuple[OutboxMessage, ...]:
        """Control messages for every participant; remembered so each is sent once."""
        self.decision_sent = True
        if not self.participants:
            return ()
        messages = []
        for service in self.participants:
            message = SagaControl(
                action=action,
                execution_id=self.id,
                service=service,
                traceparent=self.traceparent,
                tracestate=self.tracestate,
            ).to_message()
            messages.append(
                OutboxMessage(
                    topic=message.topic,
                    key=message.key,
                    value=compact(message.value),
                    headers=message.headers,
                )
            )
        return tuple(messages)

    def __repr__(self) -> str:
        return f"<SagaExecution {self.id} {self.name!r} {self.status}>"
