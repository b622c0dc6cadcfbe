"""Structured logs: one JSON object per line, with the saga fields a line is about.

Each line carries ``time`` (ISO-8601, UTC, milliseconds, ``Z``), ``level``, ``logger`` and ``message``,
and, where known, ``execution_id``, ``saga``, ``step``, ``request_id`` and ``trace_id``/``span_id``. They
come, in this order of precedence, from the log call's ``extra=`` (the engine's own lines pass them), from
`log_context` (the manager sets it while it applies a reply, recovers or cancels one execution), and for
the trace ids from the current OpenTelemetry span when tracing is on.

`log_context` costs nothing unless a JSON formatter was built (``enabled``): callers check it first.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import time
from collections.abc import Iterator
from typing import Any

import orjson

__all__ = ["FIELDS", "JsonFormatter", "enabled", "log_context", "text_formatter"]

#: The saga fields a JSON line may carry, in the order they are written.
FIELDS = ("execution_id", "saga", "step", "request_id", "trace_id", "span_id")

#: Whether some JSON formatter exists in this process (then `log_context` is worth setting).
enabled = False

_context: contextvars.ContextVar[dict[str, str] | None] = contextvars.ContextVar(
    "saga_log_context", default=None
)


@contextlib.contextmanager
def log_context(**fields: object) -> Iterator[None]:
    """Within the block, JSON log lines of this task carry ``fields`` (``None`` values are left out)."""
    outer = _context.get()
    merged = dict(outer or {})
    merged.update({k: str(v) for k, v in fields.items() if v is not None})
    token = _context.set(merged)
    try:
        yield
    finally:
        _context.reset(token)


def _utc_iso(created: float) -> str:
    whole = time.gmtime(created)
    return time.strftime("%Y-%m-%dT%H:%M:%S", whole) + f".{int(created % 1 * 1000):03d}Z"


class JsonFormatter(logging.Formatter):
    """One JSON object per record (see the module docstring for its keys)."""

    def __init__(self) -> None:
        super().__init__()
        global enabled
        enabled = True

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "time": _utc_iso(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        context = _context.get() or {}
        for name in FIELDS:
            value = record.__dict__.get(name)
            if value is None:
                value = context.get(name)
            if value is not None:
                data[name] = str(value)
        if "trace_id" not in data:
            data.update(_trace_ids())
        action = record.__dict__.get("action")
        if action is not None:
            data["action"] = action
        if record.exc_info:
            data["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(data).decode()


def _trace_ids() -> dict[str, str]:
    from saga.observability import tracing

    if not tracing.enabled:
        return {}
    from opentelemetry import trace

    ctx = trace.get_current_span().get_span_context()
    if not ctx.is_valid:
        return {}
    return {"trace_id": f"{ctx.trace_id:032x}", "span_id": f"{ctx.span_id:016x}"}


def text_formatter(fmt: str = "%(asctime)s %(levelname)-7s %(name)s: %(message)s") -> logging.Formatter:
    """A plain-text formatter whose ``asctime`` is ISO-8601 UTC too."""
    formatter = logging.Formatter(fmt, datefmt="%Y-%m-%dT%H:%M:%SZ")
    formatter.converter = time.gmtime
    return formatter
