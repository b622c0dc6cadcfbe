"""W3C trace context for sagas: which ``traceparent`` (and ``tracestate``) a saga's commands carry.

A saga started with ``run(..., traceparent=...)`` uses that context; else, when the process uses
OpenTelemetry (``opentelemetry-api``, the ``otel`` extra, already imported) and a span is current, the
current context as OpenTelemetry's propagator writes it; else a new trace. The execution stores the
context in its state document, so every command, replay, compensation and decision of the run carries
the same trace, whichever process sends it.
"""

from __future__ import annotations

import re
import secrets
import sys
from collections.abc import Callable
from typing import Any

__all__ = [
    "current_trace_context",
    "new_traceparent",
    "resolve_trace_context",
    "validate_traceparent",
    "validate_tracestate",
]

#: ``version-traceid-parentid-flags``, lowercase hex (https://www.w3.org/TR/trace-context/#traceparent-header).
_TRACEPARENT = re.compile(r"^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?$")
#: Printable ASCII without controls; W3C allows up to 32 list members of at most 256 characters each.
_TRACESTATE = re.compile(r"^[\x20-\x7e]*$")
_TRACESTATE_MAX = 8192


def new_traceparent() -> str:
    """A ``traceparent`` starting a new, sampled trace (random trace id and parent span id)."""
    return f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-01"


def validate_traceparent(value: str) -> str:
    """``value`` when it is a valid W3C ``traceparent``; else `ValueError` saying why."""
    match = _TRACEPARENT.match(value)
    if match is None:
        raise ValueError(
            f"traceparent: expected 'version-traceid(32 hex)-parentid(16 hex)-flags', got {value[:80]!r}"
        )
    version, trace_id, parent_id, _flags, rest = match.groups()
    if version == "ff":
        raise ValueError("traceparent: version ff is forbidden")
    if version == "00" and rest is not None:
        raise ValueError("traceparent: version 00 has exactly four fields")
    if trace_id == "0" * 32:
        raise ValueError("traceparent: the trace id must not be all zeros")
    if parent_id == "0" * 16:
        raise ValueError("traceparent: the parent id must not be all zeros")
    return value


def validate_tracestate(value: str) -> str:
    """``value`` when it can travel as a ``tracestate`` header; else `ValueError` saying why."""
    if len(value) > _TRACESTATE_MAX:
        raise ValueError(f"tracestate: longer than {_TRACESTATE_MAX} characters")
    if _TRACESTATE.match(value) is None:
        raise ValueError("tracestate: only printable ASCII characters are allowed")
    return value


def _otel_inject() -> Callable[[dict[str, str]], Any] | None:
    # A process that has not imported OpenTelemetry has no span to continue: looking costs no import,
    # so a service without tracing never loads it.
    if "opentelemetry" not in sys.modules:
        return None
    try:
        from opentelemetry.propagate import inject
    except ImportError:
        return None
    otel_inject: Callable[[dict[str, str]], Any] = inject
    return otel_inject


def current_trace_context() -> tuple[str | None, str | None]:
    """The current OpenTelemetry context as ``(traceparent, tracestate)``; ``(None, None)`` without one.

    Without ``opentelemetry-api``, or with no valid span current, there is nothing to continue.
    """
    inject = _otel_inject()
    if inject is None:
        return None, None
    carrier: dict[str, str] = {}
    inject(carrier)
    traceparent = carrier.get("traceparent")
    if traceparent is None or _TRACEPARENT.match(traceparent) is None:
        return None, None
    return traceparent, carrier.get("tracestate") or None


def resolve_trace_context(
    traceparent: str | None = None, tracestate: str | None = None
) -> tuple[str, str | None]:
    """The trace context a new saga carries: the given one, else the current OpenTelemetry one, else new.

    Raises:
        ValueError: ``traceparent`` or ``tracestate`` is malformed (names the header and why), or a
            ``tracestate`` comes without a ``traceparent``.
    """
    if traceparent is not None:
        validate_traceparent(traceparent)
        if tracestate is not None:
            validate_tracestate(tracestate)
        return traceparent, tracestate or None
    if tracestate is not None:
        raise ValueError("tracestate: given without a traceparent")
    current, state = current_trace_context()
    if current is not None:
        return current, state
    return new_traceparent(), None
