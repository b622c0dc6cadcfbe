"""The console's pure parts: list filters from a query string, and the SVG timeline."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

from saga.ui.filters import cursor_of, parse_filters
from saga.ui.timeline import render_timeline
from storage import ExecutionRecord, ReplyRecord, SagaStatus, StepRecord

T0 = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


def test_filters_parse_and_round_trip() -> None:
    record = ExecutionRecord(uuid.uuid4(), "x", 1, SagaStatus.FINISHED, b"", created_at=T0)
    cursor = cursor_of(record)
    f = parse_filters(
        {"saga": "order", "version": "2", "since": "2026-01-01T00:00", "overdue": "1", "after": cursor},
        ["paused,dead_letter"],
    )
    assert f.problems == []
    q = f.query(limit=50)
    assert q.statuses == [SagaStatus.PAUSED, SagaStatus.DEAD_LETTER] and q.names == ["order"]
    assert q.versions == [2] and q.overdue is True and q.limit == 50
    assert q.created_after == datetime(2026, 1, 1, tzinfo=UTC)
    assert q.after == (T0, record.id)
    assert "after=" not in f.link(after=None) and "status=paused" in f.link()


def test_bad_filters_are_named_and_left_out() -> None:
    f = parse_filters({"version": "two", "until": "soon", "after": "@@@"}, ["finshed"])
    assert f.problems == [
        "status: 'finshed' is not a status",
        "version: 'two' is not a whole number",
        "until: 'soon' is not an ISO-8601 time (2026-01-02T03:04)",
        "after: not a page cursor of this list (showing the first page)",
    ]
    q = f.query(limit=10)
    assert (q.statuses, q.versions, q.created_before, q.after) == (None, None, None, None)


def test_timeline_draws_attempts_replies_and_escapes_text() -> None:
    request = uuid.uuid4()
    steps = (
        StepRecord("<b>create</b>", "local", "execute", "succeeded", 1, T0, T0 + timedelta(milliseconds=5)),
        StepRecord(
            "charge",
            "remote",
            "execute",
            "failed",
            3,
            T0 + timedelta(milliseconds=5),
            T0 + timedelta(seconds=2),
            request,
            {"step": "charge", "error": "no reply <in time>", "type": "timeout"},
        ),
        StepRecord("<b>create</b>", "local", "compensate", "succeeded", 1, T0 + timedelta(seconds=2)),
    )
    record = ExecutionRecord(
        uuid.uuid4(), "order", 1, SagaStatus.ERRORED, b"", steps=steps, created_at=T0, updated_at=T0
    )
    replies = [
        ReplyRecord(record.id, request, 200, "duplicate", received_at=T0 + timedelta(seconds=1)),
        ReplyRecord(record.id, uuid.uuid4(), 200, "stale", received_at=T0 + timedelta(seconds=1)),
    ]
    timeline = render_timeline(record, replies, now=T0 + timedelta(seconds=3))
    svg = timeline.svg
    assert svg.startswith("<svg") and svg.endswith("</svg>")
    assert svg.count('class="attempt"') == 1 + 3 + 1  # one bar per attempt
    assert svg.count('class="timeout"') == 1 and "3 attempts" in svg
    assert 'class="reply reply-duplicate"' in svg and 'class="reply reply-stale"' in svg
    assert "<b>" not in svg and "&lt;b&gt;create&lt;/b&gt;" in svg and "&lt;in time&gt;" in svg
    assert timeline.rows == 4  # three steps and the row of replies to no step
