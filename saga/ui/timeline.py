"""An execution's step timeline as an SVG picture, drawn on the server (no script, no chart library).

One row per step record, in history order: forward steps first, compensations below them in another
colour. A bar spans the record's start to its end (still running: to now) on a time axis from the
execution's creation; a record with several attempts is cut into that many segments, so retries show.
Replies are marks on their step's row at their arrival (a last row holds those that answer no step): a
filled dot when applied, a ring when a duplicate, a cross when stale or of unknown status. A step that
timed out ends in a clock mark; a failed one is red.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from html import escape

from storage import ExecutionRecord, ReplyRecord, StepRecord

__all__ = ["Timeline", "render_timeline"]

_ROW = 30
_BAR = 16
_LABEL = 210
_WIDTH = 960
_TOP = 34
_COLOURS = {
    ("execute", "succeeded"): "#2f855a",
    ("execute", "failed"): "#c53030",
    ("execute", "waiting"): "#3182ce",
    ("execute", "running"): "#3182ce",
    ("compensate", "succeeded"): "#b7791f",
    ("compensate", "failed"): "#9b2c2c",
    ("compensate", "waiting"): "#d69e2e",
    ("compensate", "running"): "#d69e2e",
}


@dataclass(frozen=True, slots=True)
class Timeline:
    """The SVG markup and what the picture shows, for the page's legend and for tests."""

    svg: str
    rows: int
    span_seconds: float


def _seconds(start: datetime, at: datetime) -> float:
    return max(0.0, (at - start).total_seconds())


_TICKS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 15.0, 30.0, 60.0, 120.0)


def _tick_step(span: float) -> float:
    for step in (
        0.001,
        0.002,
        0.005,
        0.01,
        0.02,
        0.05,
        0.1,
        0.2,
        0.5,
        1,
        2,
        5,
        10,
        15,
        30,
        60,
        120,
        300,
        600,
    ):
        if span / step <= 8:
            return float(step)
    return 3600.0


def _label(seconds: float) -> str:
    if seconds == 0:
        return "0"
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 120:
        return f"{seconds:g} s"
    return f"{seconds / 60:g} min"


def render_timeline(record: ExecutionRecord, replies: Sequence[ReplyRecord], now: datetime) -> Timeline:
    """The timeline of ``record`` with its ``replies`` (``now`` ends the bars of unfinished steps)."""
    steps: Sequence[StepRecord] = record.steps
    origin = record.created_at or (steps[0].started_at if steps else now)
    ends = [s.finished_at or now for s in steps] + [r.received_at for r in replies if r.received_at]
    end = max([origin, record.updated_at or origin, *ends])
    span = max(_seconds(origin, end), 0.001)
    plot = _WIDTH - _LABEL - 110  # room on the right for the attempts label and the timeout mark
    requests = {s.request_id for s in steps if s.request_id is not None}
    unmatched = any(r.request_id not in requests for r in replies)
    lanes = len(steps) + (1 if unmatched else 0)
    height = _TOP + max(lanes, 1) * _ROW + 40

    def x(at: datetime) -> float:
        return _LABEL + plot * _seconds(origin, at) / span

    parts: list[str] = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="timeline" role="img" width="{_WIDTH}" '
        f'height="{height}" viewBox="0 0 {_WIDTH} {height}" font-family="DejaVu Sans, sans-serif" '
        'font-size="12">',
        f"<title>Step timeline of execution {escape(str(record.id))}</title>",
        f'<rect x="0" y="0" width="{_WIDTH}" height="{height}" fill="#ffffff"/>',
    ]
    tick = _tick_step(span)
    t = 0.0
    while t <= span + 1e-9:
        tx = _LABEL + plot * t / span
        parts.append(
            f'<line x1="{tx:.1f}" y1="{_TOP - 8}" x2="{tx:.1f}" y2="{height - 30}" stroke="#e2e8f0"/>'
            f'<text x="{tx:.1f}" y="{_TOP - 14}" text-anchor="middle" fill="#4a5568">{_label(t)}</text>'
        )
        t += tick
    by_request: dict[uuid.UUID, int] = {}
    for row, step in enumerate(steps):
        y = _TOP + row * _ROW
        if step.request_id is not None:
            by_request[step.request_id] = row
        colour = _COLOURS.get((step.phase, step.status), "#718096")
        phase = "↩ " if step.phase == "compensate" else ""
        parts.append(
            f'<text x="8" y="{y + _BAR - 3}" fill="#1a202c" class="step-label">'
            f"{escape(phase + step.name)}</text>"
        )
        x0, x1 = x(step.started_at), x(step.finished_at or now)
        width = max(x1 - x0, 3.0)
        attempts = max(step.attempts, 1)
        title = (
            f"{step.name} ({step.phase}): {step.status}, {attempts} attempt(s), "
            f"{_label(_seconds(step.started_at, step.finished_at or now))}"
        )
        error = dict(step.error) if step.error else None
        if error:
            title += f" — {error.get('type')}: {error.get('error') or error.get('message')}"
        segment = width / attempts
        for attempt in range(attempts):
            parts.append(
                f'<rect class="attempt" data-step="{escape(step.name)}" data-phase="{step.phase}" '
                f'data-status="{step.status}" x="{x0 + attempt * segment:.1f}" y="{y}" '
                f'width="{max(segment - (1 if attempts > 1 else 0), 1.5):.1f}" height="{_BAR}" rx="3" '
                f'fill="{colour}"><title>{escape(title)} — attempt {attempt + 1}</title></rect>'
            )
        if attempts > 1:
            timed_out = bool(error and error.get("type") == "timeout")
            parts.append(
                f'<text x="{x0 + width + (14 if timed_out else 6):.1f}" y="{y + _BAR - 3}" fill="#4a5568" '
                'class="retries">'
                f"{attempts} attempts</text>"
            )
        if error and error.get("type") == "timeout":
            cx = x0 + width
            parts.append(
                f'<g class="timeout"><circle cx="{cx:.1f}" cy="{y + _BAR / 2}" r="7" fill="#fff" '
                f'stroke="#c53030" stroke-width="2"/><line x1="{cx:.1f}" y1="{y + _BAR / 2}" '
                f'x2="{cx:.1f}" y2="{y + _BAR / 2 - 4.5}" stroke="#c53030" stroke-width="2"/>'
                f'<line x1="{cx:.1f}" y1="{y + _BAR / 2}" x2="{cx + 3.5:.1f}" y2="{y + _BAR / 2}" '
                f'stroke="#c53030" stroke-width="2"/><title>timed out waiting for the reply</title></g>'
            )
    if unmatched:
        parts.append(
            f'<text x="8" y="{_TOP + len(steps) * _ROW + _BAR - 3}" fill="#4a5568" class="step-label">'
            "replies to no step</text>"
        )
    for reply in replies:
        lane = by_request.get(reply.request_id, len(steps))
        if reply.received_at is None:
            continue
        cx, cy = x(reply.received_at), _TOP + lane * _ROW + _BAR / 2
        tip = f"reply {reply.status} {reply.outcome}" + (f" ({reply.reason})" if reply.reason else "")
        if reply.outcome == "applied":
            mark = f'<circle cx="{cx:.1f}" cy="{cy}" r="5" fill="#1a202c" stroke="#fff" stroke-width="1.5"/>'
        elif reply.outcome == "duplicate":
            mark = f'<circle cx="{cx:.1f}" cy="{cy}" r="5" fill="#fff" stroke="#1a202c" stroke-width="2"/>'
        else:
            mark = (
                f'<path d="M{cx - 4:.1f},{cy - 4} L{cx + 4:.1f},{cy + 4} M{cx - 4:.1f},{cy + 4} '
                f'L{cx + 4:.1f},{cy - 4}" stroke="#dd6b20" stroke-width="2.5"/>'
            )
        parts.append(f'<g class="reply reply-{escape(reply.outcome)}">{mark}<title>{escape(tip)}</title></g>')
    legend_y = height - 12
    legend = [
        ("#2f855a", "step succeeded"),
        ("#c53030", "step failed"),
        ("#3182ce", "waiting"),
        ("#b7791f", "compensation"),
    ]
    lx = 8.0
    for colour, text in legend:
        parts.append(
            f'<rect x="{lx}" y="{legend_y - 9}" width="12" height="10" rx="2" fill="{colour}"/>'
            f'<text x="{lx + 16}" y="{legend_y}" fill="#4a5568">{text}</text>'
        )
        lx += 24 + 7 * len(text)
    parts.append(
        f'<circle cx="{lx + 5}" cy="{legend_y - 4}" r="5" fill="#1a202c"/>'
        f'<text x="{lx + 14}" y="{legend_y}" fill="#4a5568">reply applied</text>'
        f'<circle cx="{lx + 115}" cy="{legend_y - 4}" r="5" fill="#fff" stroke="#1a202c" stroke-width="2"/>'
        f'<text x="{lx + 124}" y="{legend_y}" fill="#4a5568">duplicate</text>'
        f'<path d="M{lx + 196},{legend_y - 8} l8,8 m-8,0 l8,-8" stroke="#dd6b20" stroke-width="2.5"/>'
        f'<text x="{lx + 210}" y="{legend_y}" fill="#4a5568">stale</text>'
    )
    parts.append("</svg>")
    return Timeline(svg="".join(parts), rows=lanes, span_seconds=span)
