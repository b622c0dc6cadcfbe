"""The participant conformance kit: scripted cases that drive a running participant over a real broker.

The kit plays the orchestrator of docs/protocol.md: it publishes commands and decisions and checks what
comes back (replies, dead letters, and what does not come back). Each case uses its own execution ids, so
cases neither depend on nor disturb each other, and a record the participant must *not* answer is checked
by sending a valid command under the same key after it: a participant handles one key's records in order,
so once the later command is answered, the earlier one was handled, and its reply would have been seen.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from broker import BrokerClientPool, BrokerMessage
from saga.conformance.wire import Collector
from saga.consumer import H_DEAD_LETTER_REASON
from saga.errors import MalformedMessageError
from saga.messages import (
    H_DEAD_LETTER_CODE,
    H_EXECUTION_ID,
    H_IDEMPOTENCY_KEY,
    H_KIND,
    H_PROTOCOL_VERSION,
    H_REQUEST_ID,
    H_SERVICE,
    H_TRACEPARENT,
    H_TRACESTATE,
    PHASE_COMPENSATION,
    PHASE_FORWARD,
    CommandPhase,
    SagaCommand,
    SagaControl,
    SagaResponse,
    control_topic,
)
from saga.trace_context import new_traceparent

__all__ = ["CaseResult", "ConformanceFailure", "ConformanceReport", "ParticipantKit"]

_TRACESTATE = "kafka-saga-conformance=1"


class ConformanceFailure(Exception):
    """A case's expectation was not met; the message says which, naming the header at fault."""


@dataclass(frozen=True, slots=True)
class CaseResult:
    """How one case went.

    Attributes:
        case: The case's name.
        passed: Whether every expectation held.
        detail: What was checked, or what failed.
        seconds: How long the case took.
    """

    case: str
    passed: bool
    detail: str
    seconds: float


@dataclass(slots=True)
class ConformanceReport:
    """Every case's result; ``passed`` only when all passed."""

    topic: str
    service: str | None
    results: list[CaseResult] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return bool(self.results) and all(result.passed for result in self.results)

    def to_json(self) -> dict[str, Any]:
        return {
            "topic": self.topic,
            "service": self.service,
            "passed": self.passed,
            "cases": [
                {"case": r.case, "passed": r.passed, "detail": r.detail, "seconds": round(r.seconds, 3)}
                for r in self.results
            ],
        }


@dataclass(frozen=True, slots=True)
class _Sent:
    """A command the kit published, for matching and checking its reply."""

    message: BrokerMessage
    execution: str
    request: str | None

    @property
    def headers(self) -> Mapping[str, str]:
        return self.message.headers


class ParticipantKit:
    """Runs the conformance cases against the participant consuming ``topic``.

    Args:
        pool: Transport to the participant's broker (started by `run`; its owner stops it).
        topic: The participant's command topic: forward commands go there.
        compensation_topic: Where compensations go (default ``topic``).
        content: Value of the forward commands; the participant must answer it 200.
        compensation_content: Value of the compensations (default ``content``).
        service: The participant's service name (default: the ``saga-service`` of its first reply).
        reply_topic: The kit's reply topic.
        timeout: Seconds to wait for each expected record.
        step: The ``saga-step`` the commands carry.
    """

    CASES = (
        "command_reply",
        "duplicate_command",
        "compensation",
        "compensation_before_forward",
        "commit_reject",
        "malformed_command",
        "unknown_protocol_version",
    )

    def __init__(
        self,
        pool: BrokerClientPool,
        *,
        topic: str,
        compensation_topic: str | None = None,
        content: Any = None,
        compensation_content: Any = None,
        service: str | None = None,
        reply_topic: str = "sagaConformanceReply",
        timeout: float = 30.0,
        step: str = "conformance",
    ) -> None:
        self.pool = pool
        self.topic = topic
        self.compensation_topic = compensation_topic or topic
        self.content = {} if content is None else content
        self.compensation_content = self.content if compensation_content is None else compensation_content
        self.service = service
        self.reply_topic = reply_topic
        self.timeout = timeout
        self.step = step
        self._replies = Collector(pool, reply_topic, f"{reply_topic}-conformance")
        self._letters: Collector | None = None
        #: Executions whose forward command was answered 200 (the decisions case settles them).
        self._finished: list[str] = []

    # -- running ---------------------------------------------------------------------------------------

    async def run(self, cases: tuple[str, ...] | None = None) -> ConformanceReport:
        """Run ``cases`` (default: all, in `CASES` order) and report each one."""
        await self.pool.start()
        await self._replies.start(within=self.timeout)
        report = ConformanceReport(self.topic, self.service)
        try:
            for name in cases or self.CASES:
                case: Callable[[], Awaitable[str]] = getattr(self, f"case_{name}")
                started = time.monotonic()
                try:
                    detail = await case()
                    passed = True
                except ConformanceFailure as exc:
                    detail, passed = str(exc), False
                report.results.append(CaseResult(name, passed, detail, time.monotonic() - started))
        finally:
            await self._replies.stop()
            if self._letters is not None:
                await self._letters.stop()
        report.service = self.service
        return report

    # -- the cases -------------------------------------------------------------------------------------

    async def case_command_reply(self) -> str:
        """A command is answered on its reply topic with every header the protocol requires."""
        sent = await self._send(self._command())
        reply = await self._reply_to(sent)
        response = self._check_reply(reply, sent, status=200)
        self._finished.append(sent.execution)
        notes = (
            "" if reply.key == sent.execution.encode() else "; note: the reply is not keyed by execution id"
        )
        return f"200 from {response.service_name!r} with every required header, trace context copied{notes}"

    async def case_duplicate_command(self) -> str:
        """A redelivered command is answered from the stored reply; a replay gets it at its request id."""
        sent = await self._send(self._command())
        first = self._check_reply(await self._reply_to(sent), sent, status=200)
        again = await self._send(sent.message)
        replay = self._command(
            execution=sent.execution, key=sent.headers[H_IDEMPOTENCY_KEY], content=self.content
        )
        replay_sent = await self._send(replay)
        replies = await self._replies.wait(sent.execution, 3, self.timeout, where=_is_reply)
        if len(replies) < 3:
            raise ConformanceFailure(
                f"{len(replies)} replies to 3 deliveries of one command within {self.timeout:g}s: "
                "every delivery must be answered"
            )
        for label, delivery in (("the redelivered command", again), ("the replay", replay_sent)):
            matching = [r for r in replies if r.headers.get(H_REQUEST_ID) == delivery.request]
            if not matching:
                raise ConformanceFailure(
                    f"no reply to {label} carries its saga-request-id {delivery.request}: a reply must "
                    "be addressed to the command it answers"
                )
            response = self._check_reply(matching[0], delivery)
            if int(response.status) != int(first.status) or response.content != first.content:
                raise ConformanceFailure(
                    f"{label} got saga-status {int(response.status)} {response.content!r}, the first "
                    f"delivery {int(first.status)} {first.content!r}: a duplicate must be answered from the "
                    "stored reply, not executed again"
                )
        return "a redelivery and a replay under the same idempotency key got the stored reply"

    async def case_compensation(self) -> str:
        """A compensation after its forward command is executed and answered 200."""
        forward = await self._send(self._command())
        self._check_reply(await self._reply_to(forward), forward, status=200)
        compensation = await self._send(self._compensation(forward.execution))
        self._check_reply(await self._reply_to(compensation), compensation, status=200)
        self._finished.append(forward.execution)
        return f"forward 200, then compensation on {self.compensation_topic!r} 200"

    async def case_compensation_before_forward(self) -> str:
        """A compensation whose forward command never came succeeds; the late forward command is refused."""
        compensation = await self._send(self._compensation(str(uuid.uuid4())))
        self._check_reply(await self._reply_to(compensation), compensation, status=200)
        forward = await self._send(self._command(execution=compensation.execution))
        response = self._check_reply(await self._reply_to(forward), forward, status=400)
        error = response.content.get("error") if isinstance(response.content, dict) else None
        if error != "cancelled":
            raise ConformanceFailure(
                f"the late forward command was refused with {response.content!r}, "
                'not {"error": "cancelled"}'
            )
        return 'compensation first: 200 (tombstone); the late forward command: 400 {"error": "cancelled"}'

    async def case_commit_reject(self) -> str:
        """Decisions are consumed without a reply; one naming another service is dead-lettered."""
        letters = await self._dead_letters()
        service = self._service()
        if len(self._finished) < 2:
            self._finished.extend(str(uuid.uuid4()) for _ in range(2 - len(self._finished)))
        committed, rejected = self._finished[0], self._finished[-1]
        decisions = [
            SagaControl("commit", uuid.UUID(committed), service, new_traceparent()),
            SagaControl("commit", uuid.UUID(committed), service),  # a redelivery
            SagaControl("reject", uuid.UUID(rejected), service),
        ]
        # Addressed to the participant's control topic but naming another service: they must be
        # dead-lettered, and as they follow the valid decisions under the same keys, their dead letters
        # also say the valid ones were handled.
        stranger = f"not-{service}"
        strays = [
            _with(
                message,
                {
                    **message.headers,
                    H_SERVICE: stranger,
                    H_IDEMPOTENCY_KEY: f"{stranger}:{decision.execution_id}:{decision.action}",
                },
            )
            for decision in (decisions[0], decisions[2])
            for message in (decision.to_message(),)
        ]
        for message in [*(decision.to_message() for decision in decisions), *strays]:
            await self.pool.publisher().send(message)
        for execution in (committed, rejected):
            found = await letters.wait(execution, 1, self.timeout, where=lambda r: _names(r, stranger))
            if not found:
                raise ConformanceFailure(
                    f"a decision for execution {execution} whose saga-service names {stranger!r} was not "
                    f"dead-lettered to {letters.topic!r} within {self.timeout:g}s"
                )
        wrong = [
            r for e in (committed, rejected) for r in letters.of(e) if _names(r, service) and _decision(r)
        ]
        if wrong:
            reason = wrong[0].headers.get(H_DEAD_LETTER_REASON)
            raise ConformanceFailure(f"a valid {wrong[0].headers.get(H_KIND)} was dead-lettered: {reason}")
        return (
            f"commit, its redelivery and reject consumed from {control_topic(service)!r}; decisions naming "
            "another service dead-lettered"
        )

    async def case_malformed_command(self) -> str:
        """Malformed commands are dead-lettered with a reason, and never answered."""
        letters = await self._dead_letters()
        execution = str(uuid.uuid4())
        valid = self._command(execution=execution)
        bad_json = _with(valid.message, dict(valid.headers), value=b'{"not json')
        no_request = self._command(execution=execution)
        headers = dict(no_request.headers)
        del headers[H_REQUEST_ID]
        missing = _with(no_request.message, headers)
        await self.pool.publisher().send(bad_json)
        await self.pool.publisher().send(missing)
        await self._probe(execution, "a malformed command")
        found = await letters.wait(execution, 2, self.timeout)
        if len(found) < 2:
            raise ConformanceFailure(
                f"{len(found)} of 2 malformed commands (a value that is not JSON; no saga-request-id) were "
                f"dead-lettered to {letters.topic!r} within {self.timeout:g}s"
            )
        for letter in found:
            self._check_dead_letter(letter, "malformed")
        if not any(letter.value == b'{"not json' for letter in found):
            raise ConformanceFailure(
                "the dead letter of the command that is not JSON lost its original value"
            )
        return (
            f"both dead-lettered to {letters.topic!r} with a reason and the original value; neither answered"
        )

    async def case_unknown_protocol_version(self) -> str:
        """A command of a newer protocol version is dead-lettered (``unsupported_protocol``), not executed."""
        letters = await self._dead_letters()
        newer = self._command()
        message = _with(newer.message, {**newer.headers, H_PROTOCOL_VERSION: "2"})
        await self.pool.publisher().send(message)
        await self._probe(newer.execution, "a command of protocol version 2")
        found = await letters.wait(newer.execution, 1, self.timeout)
        if not found:
            raise ConformanceFailure(
                f"a command with saga-protocol-version 2 was not dead-lettered to {letters.topic!r} within "
                f"{self.timeout:g}s"
            )
        self._check_dead_letter(found[0], "unsupported_protocol")
        return "saga-protocol-version 2 dead-lettered as unsupported_protocol, not answered"

    # -- building and checking records ------------------------------------------------------------------

    def _command(
        self,
        *,
        execution: str | None = None,
        key: str | None = None,
        content: Any = None,
        phase: CommandPhase = PHASE_FORWARD,
    ) -> _Sent:
        execution = execution or str(uuid.uuid4())
        request = uuid.uuid4()
        command = SagaCommand(
            target=self.topic if phase == PHASE_FORWARD else self.compensation_topic,
            content=(self.content if phase == PHASE_FORWARD else self.compensation_content)
            if content is None
            else content,
            execution_id=uuid.UUID(execution),
            request_id=request,
            reply_topic=self.reply_topic,
            idempotency_key=key or str(request),
            user="conformance",
            saga="conformance",
            step=self.step,
            traceparent=new_traceparent(),
            tracestate=_TRACESTATE,
            phase=phase,
        )
        return _Sent(command.to_message(), execution, str(request))

    def _compensation(self, execution: str) -> _Sent:
        return self._command(execution=execution, phase=PHASE_COMPENSATION)

    async def _send(self, sent: _Sent | BrokerMessage) -> _Sent:
        if isinstance(sent, BrokerMessage):
            sent = _Sent(sent, str(sent.headers[H_EXECUTION_ID]), sent.headers.get(H_REQUEST_ID))
        await self.pool.publisher().send(sent.message)
        return sent

    async def _reply_to(self, sent: _Sent) -> BrokerMessage:
        def answers(record: BrokerMessage) -> bool:
            request = record.headers.get(H_REQUEST_ID)
            return request is None or request.lower() == sent.request

        found = await self._replies.wait(sent.execution, 1, self.timeout, where=answers)
        if not found:
            phase = sent.headers.get("saga-phase", PHASE_FORWARD)
            raise ConformanceFailure(
                f"no reply to the {phase} command on {sent.message.topic!r} (execution {sent.execution}) "
                f"reached {self.reply_topic!r} within {self.timeout:g}s"
            )
        return found[0]

    async def _probe(self, execution: str, what: str) -> None:
        """Send a valid command under ``execution``'s key and wait for its reply: ``what`` was handled."""
        probe = await self._send(self._command(execution=execution))
        self._check_reply(await self._reply_to(probe), probe)
        answered = [r for r in self._replies.of(execution) if r.headers.get(H_REQUEST_ID) != probe.request]
        if answered:
            raise ConformanceFailure(
                f"{what} was answered (saga-status {answered[0].headers.get('saga-status')})"
            )

    def _check_reply(self, reply: BrokerMessage, sent: _Sent, *, status: int | None = None) -> SagaResponse:
        """The reply decoded, once it meets every rule of docs/protocol.md section 5."""
        try:
            response = SagaResponse.from_message(reply)
        except MalformedMessageError as exc:
            raise ConformanceFailure(f"reply: {exc.field}: {exc.reason}") from None
        if str(response.execution_id) != sent.execution:
            raise ConformanceFailure(f"reply: saga-execution-id {response.execution_id} is not the command's")
        if int(response.status) not in (200, 400, 500):
            raise ConformanceFailure(f"reply: saga-status {int(response.status)} is not 200, 400 or 500")
        if status is not None and int(response.status) != status:
            raise ConformanceFailure(
                f"reply: saga-status {int(response.status)} ({response.content!r}), expected {status}"
            )
        if not response.service_name:
            raise ConformanceFailure(
                "reply: saga-service: header missing (without it the participant receives no decision)"
            )
        for name in (H_TRACEPARENT, H_TRACESTATE):
            if reply.headers.get(name) is None:
                raise ConformanceFailure(
                    f"reply: {name}: header missing (it must be copied from the command)"
                )
            if reply.headers[name] != sent.headers[name]:
                raise ConformanceFailure(f"reply: {name}: {reply.headers[name]!r} is not the command's")
        if self.service is None:
            self.service = response.service_name
        return response

    def _check_dead_letter(self, letter: BrokerMessage, code: str) -> None:
        reason = letter.headers.get(H_DEAD_LETTER_REASON)
        if not reason:
            raise ConformanceFailure(f"dead letter: {H_DEAD_LETTER_REASON}: header missing")
        given = letter.headers.get(H_DEAD_LETTER_CODE)
        if given is not None and given != code:
            raise ConformanceFailure(f"dead letter: {H_DEAD_LETTER_CODE}: {given!r}, expected {code!r}")
        if given is None and code == "unsupported_protocol" and code not in reason:
            raise ConformanceFailure(
                f"dead letter: no {H_DEAD_LETTER_CODE}, and {H_DEAD_LETTER_REASON} {reason!r} does not "
                f"say {code}"
            )

    def _service(self) -> str:
        if self.service is None:
            raise ConformanceFailure(
                "the participant's service is unknown: no reply named it (pass --service)"
            )
        return self.service

    async def _dead_letters(self) -> Collector:
        if self._letters is None:
            service = self._service()
            self._letters = Collector(self.pool, f"{service}DeadLetter", f"{self.reply_topic}-dead-letters")
            await self._letters.start(within=self.timeout)
        return self._letters


def _with(message: BrokerMessage, headers: Mapping[str, str], *, value: bytes | None = None) -> BrokerMessage:
    return BrokerMessage(
        topic=message.topic, key=message.key, value=message.value if value is None else value, headers=headers
    )


def _is_reply(record: BrokerMessage) -> bool:
    return record.headers.get(H_KIND) == "reply"


def _names(record: BrokerMessage, service: str) -> bool:
    return record.headers.get(H_SERVICE) == service


def _decision(record: BrokerMessage) -> bool:
    return record.headers.get(H_KIND) in ("commit", "reject")
