"""Rendering for the CLI: aligned tables for people, JSON for scripts."""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, TextIO

import orjson

from storage import ExecutionRecord, ReplyRecord, SagaStatus, StepRecord

__all__ = [
    "execution_to_json",
    "format_duration",
    "format_error",
    "format_time",
    "is_overdue",
    "print_json",
    "render_table",
    "reply_to_json",
    "step_to_json",
]


def render_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], *, indent: str = "") -> str:
    """Left-aligned columns separated by two spaces; ``None`` shows as ``-``."""
    cells = [[("-" if v is None else str(v)) for v in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in cells:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))
    lines = [indent + "  ".join(h.ljust(widths[i]) for i, h in enumerate(headers)).rstrip()]
    for row in cells:
        lines.append(indent + "  ".join(c.ljust(widths[i]) for i, c in enumerate(row)).rstrip())
    return "\n".join(lines)


def print_json(data: Any, *, stream: TextIO | None = None) -> None:
    """Write ``data`` as indented JSON (UUIDs and datetimes as strings)."""
    out = stream or sys.stdout
    out.write(orjson.dumps(data, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS).decode() + "\n")


def format_time(value: datetime | None) -> str | None:
    """``YYYY-MM-DD HH:MM:SS`` in UTC, or ``None``."""
    if value is None:
        return None
    if value.tzinfo is not None:
        value = value.astimezone(UTC)
    return value.strftime("%Y-%m-%d %H:%M:%S")


def is_overdue(record: ExecutionRecord, now: datetime) -> bool:
    """Whether a paused execution's reply deadline has passed (recovery then replays or compensates)."""
    deadline = record.reply_deadline
    return record.status is SagaStatus.PAUSED and deadline is not None and deadline < now


def format_duration(start: datetime | None, end: datetime | None) -> str | None:
    """``1.234s`` / ``12ms`` between two instants, or ``None`` when either is missing."""
    if start is None or end is None:
        return None
    seconds = (end - start).total_seconds()
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    if seconds < 120:
        return f"{seconds:.2f}s"
    return f"{seconds / 60:.1f}min"


def format_error(error: Mapping[str, Any] | None, *, width: int | None = 80) -> str | None:
    """``type: message (detail)`` of a structured error, shortened to ``width`` characters.

    Understands the engine's shape (``type``, ``error``, a participant's ``reply`` content) and the
    recovery's (``type``, ``message``, ``last_error``); anything else is shown as JSON.
    """
    if not error:
        return None
    kind = error.get("type")
    message = error.get("message") or error.get("error")
    if message is None and isinstance(error.get("last_error"), Mapping):
        last = error["last_error"]
        message = ": ".join(str(p) for p in (last.get("type"), last.get("message")) if p)
    parts = [str(p) for p in (kind, message) if p]
    if not parts:
        return _shorten(orjson.dumps(dict(error), option=orjson.OPT_NON_STR_KEYS).decode(), width)
    text = ": ".join(parts)
    reply = error.get("reply")
    if isinstance(reply, Mapping) and reply.get("error"):
        text += f" ({reply['error']})"
    return _shorten(text, width)


def _shorten(text: str, width: int | None) -> str:
    text = " ".join(text.split())
    if width is not None and len(text) > width:
        text = text[: width - 1] + "…"
    return text


def decode_context(state: bytes) -> dict[str, Any] | None:
    """The saga context stored in an engine state document, as JSON-able data (``None`` if unreadable)."""
    try:
        document = orjson.loads(state)
        from saga.context import decode_context as decode

        context = decode(document["ctx"])
        return orjson.loads(orjson.dumps(dict(context), default=str, option=orjson.OPT_NON_STR_KEYS))  # type: ignore[no-any-return]
    except Exception:
        return None


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def decode_state(state: bytes) -> Any:
    """The engine's state document as JSON data, or a placeholder when it is not JSON."""
    try:
        return orjson.loads(state)
    except orjson.JSONDecodeError:
        return f"<{len(state)} bytes, not JSON>"


def execution_to_json(record: ExecutionRecord, *, with_state: bool = False) -> dict[str, Any]:
    """The JSON shape of an execution row (``steps``/``replies`` are added by ``show``)."""
    data: dict[str, Any] = {
        "id": str(record.id),
        "name": record.name,
        "definition_version": record.definition_version,
        "status": record.status.value,
        "version": record.version,
        "recovery_attempts": record.recovery_attempts,
        "idempotency_key": record.idempotency_key,
        "user": record.user,
        "reply_deadline": _iso(record.reply_deadline),
        "owner": record.owner,
        "lease_until": _iso(record.lease_until),
        "error": dict(record.error) if record.error is not None else None,
        "created_at": _iso(record.created_at),
        "updated_at": _iso(record.updated_at),
        "overdue": is_overdue(record, datetime.now(UTC)),
    }
    if with_state:
        data["context"] = decode_context(record.state)
        data["state"] = decode_state(record.state)
    return data


def step_to_json(step: StepRecord) -> dict[str, Any]:
    """The JSON shape of a step history entry."""
    duration = None
    if step.finished_at is not None:
        duration = (step.finished_at - step.started_at).total_seconds()
    return {
        "name": step.name,
        "kind": step.kind,
        "phase": step.phase,
        "status": step.status,
        "attempts": step.attempts,
        "started_at": _iso(step.started_at),
        "finished_at": _iso(step.finished_at),
        "duration_seconds": duration,
        "request_id": str(step.request_id) if step.request_id is not None else None,
        "error": dict(step.error) if step.error is not None else None,
    }


def reply_to_json(reply: ReplyRecord) -> dict[str, Any]:
    """The JSON shape of a recorded reply."""
    return {
        "request_id": str(reply.request_id),
        "status": reply.status,
        "outcome": reply.outcome,
        "reason": reply.reason,
        "received_at": _iso(reply.received_at),
    }
