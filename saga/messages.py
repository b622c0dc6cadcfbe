"""Saga messages and their mapping to and from `BrokerMessage`.

Everything that crosses the wire is JSON (orjson) in the value and correlation data in headers, so a
participant written in another language needs nothing but a Kafka client. Decoding never trusts the
input: every missing or wrong field raises `MalformedMessageError` naming the field, and nothing read
from a message is ever imported or evaluated.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, Literal

import orjson

from broker import BrokerMessage
from saga.errors import MalformedMessageError, UnsupportedProtocolError

__all__ = [
    "AWAITED_REQUEST_ID",
    "H_DEAD_LETTER_CODE",
    "H_EXECUTION_ID",
    "H_IDEMPOTENCY_KEY",
    "H_KIND",
    "H_PHASE",
    "H_PROTOCOL_VERSION",
    "H_REPLY_TOPIC",
    "H_REQUEST_ID",
    "H_SAGA",
    "H_SERVICE",
    "H_STATUS",
    "H_STEP",
    "H_TRACEPARENT",
    "H_TRACESTATE",
    "H_USER",
    "PHASE_COMPENSATION",
    "PHASE_FORWARD",
    "PROTOCOL_VERSION",
    "CommandPhase",
    "ControlAction",
    "SagaCommand",
    "SagaControl",
    "SagaRequest",
    "SagaResponse",
    "SagaResponseStatus",
    "control_topic",
    "decode_json",
    "encode_json",
    "protocol_version",
    "reply_message",
]

H_KIND = "saga-kind"
H_EXECUTION_ID = "saga-execution-id"
H_REQUEST_ID = "saga-request-id"
H_REPLY_TOPIC = "saga-reply-topic"
H_USER = "saga-user"
H_IDEMPOTENCY_KEY = "saga-idempotency-key"
H_STATUS = "saga-status"
H_SERVICE = "saga-service"
H_SAGA = "saga-name"
H_STEP = "saga-step"
#: ``forward`` for a step's command, ``compensation`` for the command that undoes it. With the execution id
#: and the step name it pairs a compensation with the forward command it undoes.
H_PHASE = "saga-phase"
H_TRACEPARENT = "traceparent"
H_TRACESTATE = "tracestate"
#: Every message kafka-saga writes carries its wire-format version; a message without one is version 1.
#: A receiver that meets a newer major version dead-letters it (reason ``unsupported_protocol``)
#: instead of guessing at its meaning.
H_PROTOCOL_VERSION = "saga-protocol-version"
PROTOCOL_VERSION = 1
_VERSION_TEXT = str(PROTOCOL_VERSION)
#: Machine-readable reason of a dead letter (``malformed``, ``unsupported_protocol``, ``no_handler``...),
#: beside the human-readable ``saga-dead-letter-reason``; docs/protocol.md lists every code.
H_DEAD_LETTER_CODE = "saga-dead-letter-code"

ControlAction = Literal["commit", "reject"]
CommandPhase = Literal["forward", "compensation"]
PHASE_FORWARD: CommandPhase = "forward"
PHASE_COMPENSATION: CommandPhase = "compensation"


class SagaResponseStatus(IntEnum):
    """Reply statuses, as in Minos: the participant succeeded, refused (business error) or crashed."""

    SUCCESS = 200
    ERROR = 400
    SYSTEM_ERROR = 500

    @classmethod
    def from_raw(cls, raw: int) -> SagaResponseStatus:
        """The member with value ``raw`` (Minos's name for ``SagaResponseStatus(raw)``)."""
        return cls(raw)


#: Status codes to members: a dict lookup, where ``SagaResponseStatus(code)`` costs an enum call per reply.
_KNOWN_STATUSES: dict[int, SagaResponseStatus] = {member.value: member for member in SagaResponseStatus}


def encode_json(content: Any) -> bytes:
    """Encode message content; raises `TypeError` naming the offending type for non-JSON values."""
    return orjson.dumps(content, option=orjson.OPT_NON_STR_KEYS)


def decode_json(value: bytes, *, field_name: str = "value") -> Any:
    """Decode message content, turning any decoding failure into `MalformedMessageError`."""
    try:
        return orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        raise MalformedMessageError(field_name, f"invalid JSON ({exc})") from None


def _require(headers: Mapping[str, str], name: str) -> str:
    value = headers.get(name)
    if value is None or value == "":
        raise MalformedMessageError(name, "header missing")
    return value


def _uuid_header(headers: Mapping[str, str], name: str) -> uuid.UUID:
    raw = _require(headers, name)
    try:
        return uuid.UUID(raw)
    except ValueError:
        raise MalformedMessageError(name, f"not a UUID: {raw[:64]!r}") from None


def protocol_version(message: BrokerMessage) -> int:
    """The wire-format version a message declares: 1 when it declares none.

    Raises:
        UnsupportedProtocolError: The version is newer than `PROTOCOL_VERSION`.
        MalformedMessageError: The header is not a positive decimal integer.
    """
    raw = message.headers.get(H_PROTOCOL_VERSION)
    if raw is None or raw == "":
        if H_PROTOCOL_VERSION in message.invalid_headers:
            raise MalformedMessageError(H_PROTOCOL_VERSION, "header value is not valid UTF-8")
        return 1
    if raw == _VERSION_TEXT:
        return PROTOCOL_VERSION
    if not (raw.isascii() and raw.isdigit()) or int(raw) < 1:
        raise MalformedMessageError(H_PROTOCOL_VERSION, f"not a positive integer: {raw[:64]!r}")
    version = int(raw)
    if version > PROTOCOL_VERSION:
        raise UnsupportedProtocolError(H_PROTOCOL_VERSION, version, PROTOCOL_VERSION)
    return version


def _check_envelope(message: BrokerMessage) -> None:
    """The checks every received message passes first: a version this receiver speaks, UTF-8 headers."""
    protocol_version(message)
    if message.invalid_headers:
        raise MalformedMessageError(message.invalid_headers[0], "header value is not valid UTF-8")


def _check_kind(message: BrokerMessage, expected: str) -> None:
    _check_envelope(message)
    kind = _require(message.headers, H_KIND)
    if kind != expected:
        raise MalformedMessageError(H_KIND, f"expected {expected!r}, got {kind[:64]!r}")


def control_topic(service: str) -> str:
    """Topic on which a participant service receives commit/reject decisions."""
    return f"{service}SagaControl"


@dataclass(frozen=True, slots=True)
class SagaRequest:
    """What a remote step's ``on_execute`` returns: a command for ``target`` (the command topic).

    ``content`` must be plain JSON-able data.
    """

    target: str
    content: Any = None


@dataclass(frozen=True, slots=True)
class SagaCommand:
    """A command as published to a participant, with everything needed to reply and deduplicate.

    Attributes:
        target: Command topic.
        content: JSON-able payload.
        execution_id: The saga execution that sent it.
        request_id: Correlates the reply with exactly this request.
        reply_topic: Where the participant must reply.
        idempotency_key: Same for replays of one request, so participants can drop duplicates.
        user: The user the saga runs for.
        saga: Saga definition name (informational).
        step: Step name; with the execution id it pairs a compensation with its forward command.
        traceparent: W3C trace context of the saga, passed through to the reply.
        tracestate: W3C vendor trace state, passed through with ``traceparent``.
        phase: ``forward`` (a step's command) or ``compensation`` (the command undoing it); ``None`` when
            a received command did not say, which receivers take as ``forward``.
    """

    target: str
    content: Any
    execution_id: uuid.UUID
    request_id: uuid.UUID
    reply_topic: str
    idempotency_key: str
    user: str | None = None
    saga: str | None = None
    step: str | None = None
    traceparent: str | None = None
    tracestate: str | None = None
    phase: CommandPhase | None = None

    def to_message(self) -> BrokerMessage:
        """Encode for publishing, keyed by execution id so one partition orders a saga's traffic."""
        headers = {
            H_PROTOCOL_VERSION: _VERSION_TEXT,
            H_KIND: "command",
            H_EXECUTION_ID: str(self.execution_id),
            H_REQUEST_ID: str(self.request_id),
            H_REPLY_TOPIC: self.reply_topic,
            H_IDEMPOTENCY_KEY: self.idempotency_key,
        }
        if self.user is not None:
            headers[H_USER] = self.user
        if self.saga is not None:
            headers[H_SAGA] = self.saga
        if self.step is not None:
            headers[H_STEP] = self.step
        if self.phase is not None:
            headers[H_PHASE] = self.phase
        if self.traceparent is not None:
            headers[H_TRACEPARENT] = self.traceparent
        if self.tracestate is not None:
            headers[H_TRACESTATE] = self.tracestate
        return BrokerMessage(
            topic=self.target,
            key=str(self.execution_id).encode(),
            value=encode_json(self.content),
            headers=headers,
        )

    @classmethod
    def from_message(cls, message: BrokerMessage) -> SagaCommand:
        """Decode a received command. Raises `MalformedMessageError` naming the bad field."""
        _check_kind(message, "command")
        headers = message.headers
        phase = headers.get(H_PHASE)
        if phase is not None and phase != PHASE_FORWARD and phase != PHASE_COMPENSATION:
            raise MalformedMessageError(H_PHASE, f"expected 'forward' or 'compensation', got {phase[:64]!r}")
        return cls(
            target=message.topic,
            content=decode_json(message.value),
            execution_id=_uuid_header(headers, H_EXECUTION_ID),
            request_id=_uuid_header(headers, H_REQUEST_ID),
            reply_topic=_require(headers, H_REPLY_TOPIC),
            idempotency_key=_require(headers, H_IDEMPOTENCY_KEY),
            user=headers.get(H_USER),
            saga=headers.get(H_SAGA),
            step=headers.get(H_STEP),
            traceparent=headers.get(H_TRACEPARENT),
            tracestate=headers.get(H_TRACESTATE),
            phase=phase,
        )


#: The request id of a reply built without one (Minos-style, ``saga.compat.minos.SagaResponse``): given to
#: ``SagaManager.run(response=...)``, it answers the request the execution awaits. Replies read from the
#: broker always carry their own request id, and are applied only to that request.
AWAITED_REQUEST_ID = uuid.UUID(int=0)


@dataclass(frozen=True, slots=True)
class SagaResponse:
    """A participant's reply to one command.

    Attributes:
        content: JSON-able payload (a plain attribute, not a coroutine as in Minos).
        status: ``SagaResponseStatus`` or, for a reply with an unknown status, the raw integer: such a
            reply is never taken as success.
        execution_id: Execution the reply belongs to.
        request_id: Request it answers; only a reply to the awaited request is applied.
        service_name: The replying service; autocommit sends commit/reject to it.
    """

    content: Any = None
    status: SagaResponseStatus | int = SagaResponseStatus.SUCCESS
    execution_id: uuid.UUID = field(default_factory=uuid.uuid4)
    request_id: uuid.UUID = field(default_factory=uuid.uuid4)
    service_name: str | None = None

    def __post_init__(self) -> None:
        status = self.status
        if type(status) is not SagaResponseStatus and (
            isinstance(status, bool) or not isinstance(status, int)
        ):
            raise TypeError(
                f"SagaResponse status must be a SagaResponseStatus or an int, got {status!r}; "
                "Minos's SagaResponse(content, related_services, status, uuid=...) is "
                "saga.compat.minos.SagaResponse"
            )

    @property
    def ok(self) -> bool:
        """Whether the participant succeeded (status 200), as Minos's ``ok``."""
        return int(self.status) == 200

    @property
    def uuid(self) -> uuid.UUID:
        """The execution the reply belongs to (Minos's name for ``execution_id``)."""
        return self.execution_id

    @property
    def related_services(self) -> set[str]:
        """The replying service as a set (Minos's name; autocommit sends it commit or reject)."""
        return set() if self.service_name is None else {self.service_name}

    @property
    def known_status(self) -> SagaResponseStatus | None:
        """The status as an enum member, or ``None`` when it is not one we know."""
        return _KNOWN_STATUSES.get(int(self.status))

    def to_message(self, topic: str) -> BrokerMessage:
        """Encode for publishing to ``topic`` (the orchestrator's reply topic)."""
        return reply_message(
            topic,
            value=encode_json(self.content),
            status=self.status,
            execution_id=self.execution_id,
            request_id=self.request_id,
            service_name=self.service_name,
        )

    @classmethod
    def from_message(cls, message: BrokerMessage) -> SagaResponse:
        """Decode a received reply. Raises `MalformedMessageError` naming the bad field."""
        _check_kind(message, "reply")
        headers = message.headers
        raw_status = _require(headers, H_STATUS)
        try:
            status_code = int(raw_status)
        except ValueError:
            raise MalformedMessageError(H_STATUS, f"not an integer: {raw_status[:64]!r}") from None
        status: SagaResponseStatus | int = _KNOWN_STATUSES.get(status_code, status_code)
        return cls(
            content=decode_json(message.value),
            status=status,
            execution_id=_uuid_header(headers, H_EXECUTION_ID),
            request_id=_uuid_header(headers, H_REQUEST_ID),
            service_name=headers.get(H_SERVICE),
        )


def reply_message(
    topic: str,
    *,
    value: bytes,
    status: int,
    execution_id: uuid.UUID,
    request_id: uuid.UUID,
    service_name: str | None,
    traceparent: str | None = None,
    tracestate: str | None = None,
) -> BrokerMessage:
    """A reply whose content is already encoded (``value``), as `SagaResponse.to_message` publishes it.

    A participant encodes a handler's result once, for the reply and its dedup record alike, and passes
    the command's trace context on, without building a `SagaResponse` and a copy of its message.
    """
    execution = str(execution_id)
    headers = {
        H_PROTOCOL_VERSION: _VERSION_TEXT,
        H_KIND: "reply",
        H_EXECUTION_ID: execution,
        H_REQUEST_ID: str(request_id),
        H_STATUS: str(int(status)),
    }
    if service_name is not None:
        headers[H_SERVICE] = service_name
    if traceparent is not None:
        headers[H_TRACEPARENT] = traceparent
    if tracestate is not None:
        headers[H_TRACESTATE] = tracestate
    return BrokerMessage(topic=topic, key=execution.encode(), value=value, headers=headers)


@dataclass(frozen=True, slots=True)
class SagaControl:
    """Autocommit's decision for one participant: ``commit`` after success, ``reject`` after failure.

    ``traceparent`` and ``tracestate`` carry the saga's trace context, as its commands do.
    """

    action: ControlAction
    execution_id: uuid.UUID
    service: str
    traceparent: str | None = None
    tracestate: str | None = None

    @property
    def idempotency_key(self) -> str:
        """One key per execution, participant and decision, so a redelivered decision is applied once.

        The service is part of the key so participants sharing one dedup store never swallow each
        other's decisions.
        """
        return f"{self.service}:{self.execution_id}:{self.action}"

    def to_message(self) -> BrokerMessage:
        """Encode for the participant's control topic."""
        headers = {
            H_PROTOCOL_VERSION: _VERSION_TEXT,
            H_KIND: self.action,
            H_EXECUTION_ID: str(self.execution_id),
            H_IDEMPOTENCY_KEY: self.idempotency_key,
            H_SERVICE: self.service,
        }
        if self.traceparent is not None:
            headers[H_TRACEPARENT] = self.traceparent
        if self.tracestate is not None:
            headers[H_TRACESTATE] = self.tracestate
        return BrokerMessage(
            topic=control_topic(self.service),
            key=str(self.execution_id).encode(),
            value=encode_json({"action": self.action}),
            headers=headers,
        )

    @classmethod
    def from_message(cls, message: BrokerMessage) -> SagaControl:
        """Decode a received decision. Raises `MalformedMessageError` naming the bad field."""
        _check_envelope(message)
        kind = _require(message.headers, H_KIND)
        if kind not in ("commit", "reject"):
            raise MalformedMessageError(H_KIND, f"expected 'commit' or 'reject', got {kind[:64]!r}")
        action: ControlAction = "commit" if kind == "commit" else "reject"
        return cls(
            action=action,
            execution_id=_uuid_header(message.headers, H_EXECUTION_ID),
            service=_require(message.headers, H_SERVICE),
            traceparent=message.headers.get(H_TRACEPARENT),
            tracestate=message.headers.get(H_TRACESTATE),
        )
