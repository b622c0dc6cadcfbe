"""OpenTelemetry tracing of sagas, one trace per saga across the orchestrator and its participants.

Off until `enable_tracing` is called, and then only with the ``kafka-saga[otel]`` extra installed: this
module imports nothing from OpenTelemetry before that, and every call site in the engine is guarded by the
module attribute ``enabled`` (one attribute read when off).

Spans (names, kinds and where they start):

==============================  =========  ==================================================================
``saga.run {saga}``              internal   `SagaManager.run` starting an execution: the root of its trace
``saga.step {step}``             internal   each step attempt the engine makes (local: the call; remote:
                                            building its command, whose ``traceparent`` is this span)
``saga.compensate {step}``       internal   each compensation attempt
``saga.publish {topic}``         producer   each command (or decision) published to Kafka, child of the span
                                            that wrote it (the ``traceparent`` stored with the outbox row)
``saga.handle {topic}``          consumer   a participant's handler, child of the command's ``traceparent``
``saga.reply {topic}``           consumer   a reply applied (or ignored) by the orchestrator, child of the
                                            reply's ``traceparent``; the next steps run inside it
``saga.recover``                 internal   one recovery of an execution by the recovery worker
==============================  =========  ==================================================================

Attributes follow OpenTelemetry's messaging conventions where they apply (``messaging.system=kafka``,
``messaging.destination.name``, ``messaging.message.id`` = the request id, ``messaging.operation.type``,
``messaging.consumer.group.name``) plus ``saga.name``, ``saga.execution_id``, ``saga.step`` and
``saga.phase``/``saga.attempt``/``saga.reply.outcome`` where known.

Participants copy a command's ``traceparent`` and ``tracestate`` onto their reply, so the reply span of
the orchestrator joins the trace of the step that sent the command, and the commands built while it
applies the reply carry it on: one saga, one trace.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from broker import BrokerMessage

__all__ = [
    "current_traceparent",
    "disable_tracing",
    "enable_tracing",
    "enabled",
    "handler_span",
    "publish_spans",
    "recovery_span",
    "reply_span",
    "run_span",
    "step_span",
    "trace_headers",
    "traced_move",
]

_T = TypeVar("_T")

#: Whether tracing is on; the engine checks it before calling anything here.
enabled = False

_tracer: Any = None
_propagator: Any = None
_KIND: Any = None

_H_TRACEPARENT = "traceparent"
_H_TRACESTATE = "tracestate"


def enable_tracing(tracer_provider: Any = None) -> None:
    """Turn tracing on, with ``tracer_provider`` (default: OpenTelemetry's global provider).

    Raises:
        ImportError: The ``kafka-saga[otel]`` extra (opentelemetry-api) is not installed.
    """
    global enabled, _tracer, _propagator, _KIND
    from opentelemetry import trace
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    provider = tracer_provider if tracer_provider is not None else trace.get_tracer_provider()
    _tracer = provider.get_tracer("kafka-saga")
    _propagator = TraceContextTextMapPropagator()
    _KIND = trace.SpanKind
    enabled = True


def disable_tracing() -> None:
    """Turn tracing off again (spans already started still end)."""
    global enabled
    enabled = False


# -- context on the wire -----------------------------------------------------------------------------


def trace_headers() -> dict[str, str]:
    """``traceparent`` (and ``tracestate``) of the current span, to put on an outgoing message.

    The function to call wherever a command is built; empty when tracing is off or no span is current.
    """
    if not enabled:
        return {}
    carrier: dict[str, str] = {}
    _propagator.inject(carrier)
    return carrier


def current_traceparent() -> str | None:
    """The current span's W3C ``traceparent``, or ``None`` (tracing off, or no span)."""
    if not enabled:
        return None
    return trace_headers().get(_H_TRACEPARENT)


def _parent(headers: Mapping[str, str] | None) -> Any:
    """The OpenTelemetry context a message's ``traceparent``/``tracestate`` names (``None``: current)."""
    if not headers or _H_TRACEPARENT not in headers:
        return None
    carrier = {_H_TRACEPARENT: headers[_H_TRACEPARENT]}
    if _H_TRACESTATE in headers:
        carrier[_H_TRACESTATE] = headers[_H_TRACESTATE]
    return _propagator.extract(carrier)


def _saga_attributes(headers: Mapping[str, str]) -> dict[str, str]:
    attributes = {}
    for header, attribute in (
        ("saga-name", "saga.name"),
        ("saga-execution-id", "saga.execution_id"),
        ("saga-step", "saga.step"),
    ):
        value = headers.get(header)
        if value is not None:
            attributes[attribute] = value
    return attributes


# -- spans -------------------------------------------------------------------------------------------


@contextlib.contextmanager
def run_span(saga: str, *, parent: tuple[str, str | None] | None = None) -> Iterator[Any]:
    """``saga.run {saga}``: a new execution being started; the caller sets ``saga.execution_id``.

    ``parent`` is a ``(traceparent, tracestate)`` the caller passed to ``run``; without it the span is a
    child of the current one, or a new trace's root.
    """
    headers = None
    if parent is not None:
        headers = {_H_TRACEPARENT: parent[0]}
        if parent[1] is not None:
            headers[_H_TRACESTATE] = parent[1]
    with _tracer.start_as_current_span(
        f"saga.run {saga}", context=_parent(headers), attributes={"saga.name": saga}
    ) as span:
        yield span


@contextlib.contextmanager
def step_span(saga: str, execution_id: object, phase: str) -> Iterator[Any]:
    """A step or compensation attempt; the caller names it once the move says which step it was."""
    attributes = {"saga.name": saga, "saga.execution_id": str(execution_id), "saga.phase": phase}
    name = "saga.compensate" if phase == "compensate" else "saga.step"
    with _tracer.start_as_current_span(name, attributes=attributes) as span:
        yield span


async def traced_move(saga: str, execution_id: object, phase: str, move: Awaitable[_T]) -> _T:
    """Await one engine move (a step or compensation attempt) inside its span, named after its step."""
    with step_span(saga, execution_id, phase) as span:
        transition = await move
        step = getattr(transition, "step", None)
        if step:
            span.update_name(f"{'saga.compensate' if phase == 'compensate' else 'saga.step'} {step}")
            span.set_attribute("saga.step", step)
        status = getattr(transition, "status", None)
        if status is not None:
            span.set_attribute("saga.status", str(status))
        return transition


@contextlib.contextmanager
def publish_spans(messages: Sequence[BrokerMessage]) -> Iterator[None]:
    """``saga.publish {topic}`` producer spans around publishing ``messages`` (ended when it returns)."""
    spans = []
    for message in messages:
        headers = message.headers
        attributes = {
            "messaging.system": "kafka",
            "messaging.operation.type": "send",
            "messaging.destination.name": message.topic,
            **_saga_attributes(headers),
        }
        request_id = headers.get("saga-request-id")
        if request_id is not None:
            attributes["messaging.message.id"] = request_id
        if message.key is not None:
            attributes["messaging.kafka.message.key"] = message.key.decode(errors="replace")
        spans.append(
            _tracer.start_span(
                f"saga.publish {message.topic}",
                context=_parent(headers),
                kind=_KIND.PRODUCER,
                attributes=attributes,
            )
        )
    try:
        yield
    except BaseException as exc:
        for span in spans:
            span.record_exception(exc)
        raise
    finally:
        for span in spans:
            span.end()


@contextlib.contextmanager
def _consumer_span(
    name: str, message_headers: Mapping[str, str], attributes: dict[str, Any]
) -> Iterator[Any]:
    with _tracer.start_as_current_span(
        name, context=_parent(message_headers), kind=_KIND.CONSUMER, attributes=attributes
    ) as span:
        yield span


def handler_span(
    topic: str, headers: Mapping[str, str], *, group: str | None = None
) -> contextlib.AbstractContextManager[Any]:
    """``saga.handle {topic}``: a participant's handler running one command."""
    attributes: dict[str, Any] = {
        "messaging.system": "kafka",
        "messaging.operation.type": "process",
        "messaging.destination.name": topic,
        **_saga_attributes(headers),
    }
    if group:
        attributes["messaging.consumer.group.name"] = group
    request_id = headers.get("saga-request-id")
    if request_id is not None:
        attributes["messaging.message.id"] = request_id
    return _consumer_span(f"saga.handle {topic}", headers, attributes)


def reply_span(
    topic: str, headers: Mapping[str, str], execution_id: object, request_id: object
) -> contextlib.AbstractContextManager[Any]:
    """``saga.reply {topic}``: the orchestrator applying one reply (and the steps that follow it)."""
    attributes = {
        "messaging.system": "kafka",
        "messaging.operation.type": "process",
        "messaging.destination.name": topic,
        "messaging.message.id": str(request_id),
        "saga.execution_id": str(execution_id),
        **_saga_attributes(headers),
    }
    return _consumer_span(f"saga.reply {topic}", headers, attributes)


@contextlib.contextmanager
def recovery_span(execution_id: object) -> Iterator[Any]:
    """``saga.recover``: one recovery of an execution."""
    with _tracer.start_as_current_span(
        "saga.recover", attributes={"saga.execution_id": str(execution_id)}
    ) as span:
        yield span
