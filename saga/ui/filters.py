"""The list page's filters: read from the query string, turned into an `ExecutionQuery`, written back.

Bad input never fails the page: each field that cannot be read is named in ``problems`` (shown above the
list) and left out of the query, so the operator sees why the list is wider than asked.
"""

from __future__ import annotations

import base64
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from urllib.parse import urlencode

from storage import ExecutionQuery, ExecutionRecord, SagaStatus

__all__ = ["ListFilters", "cursor_of", "parse_filters"]

#: The list counts matches up to this many; beyond, it says "more than".
COUNT_LIMIT = 10_000


@dataclass(slots=True)
class ListFilters:
    """What the operator asked for, as typed (for the form) and as parsed (for the query)."""

    statuses: list[SagaStatus] = field(default_factory=list)
    saga: str = ""
    version: int | None = None
    since: datetime | None = None
    until: datetime | None = None
    key: str = ""
    overdue: bool = False
    error: str = ""
    after: tuple[datetime, uuid.UUID] | None = None
    raw: dict[str, str] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def query(self, limit: int) -> ExecutionQuery:
        """The storage query of one page (``limit`` rows after the cursor), counting up to `COUNT_LIMIT`."""
        return ExecutionQuery(
            statuses=self.statuses or None,
            names=[self.saga] if self.saga else None,
            versions=[self.version] if self.version is not None else None,
            created_after=self.since,
            created_before=self.until,
            idempotency_key=self.key or None,
            overdue=True if self.overdue else None,
            error_text=self.error or None,
            after=self.after,
            count_limit=COUNT_LIMIT,
            limit=limit,
        )

    def link(self, **changes: str | None) -> str:
        """The list URL with these filters, changed as given (``None`` drops a parameter)."""
        params: list[tuple[str, str]] = [("status", s.value) for s in self.statuses]
        for name in ("saga", "version", "since", "until", "key", "error"):
            value = self.raw.get(name, "")
            if value:
                params.append((name, value))
        if self.overdue:
            params.append(("overdue", "1"))
        for name, change in changes.items():
            params = [(k, v) for k, v in params if k != name]
            if change is not None:
                params.append((name, change))
        return "/?" + urlencode(params) if params else "/"


def _time(text: str) -> datetime:
    value = datetime.fromisoformat(text.strip())
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def cursor_of(record: ExecutionRecord) -> str:
    """The opaque keyset cursor after ``record`` (its ``created_at`` and id)."""
    assert record.created_at is not None
    raw = f"{record.created_at.isoformat()}|{record.id}"
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def _cursor(text: str) -> tuple[datetime, uuid.UUID]:
    padded = text + "=" * (-len(text) % 4)
    created, _, saga_id = base64.urlsafe_b64decode(padded.encode()).decode().partition("|")
    return _time(created), uuid.UUID(saga_id)


def parse_filters(params: Mapping[str, str], statuses: Sequence[str]) -> ListFilters:
    """Read the filters from the query string (``statuses``: every ``status`` value given)."""
    f = ListFilters(raw={k: v for k, v in params.items() if isinstance(v, str)})
    for text in statuses:
        for part in text.split(","):
            if not part.strip():
                continue
            try:
                f.statuses.append(SagaStatus(part.strip().lower()))
            except ValueError:
                f.problems.append(f"status: {part!r} is not a status")
    f.saga = params.get("saga", "").strip()
    f.key = params.get("key", "").strip()
    f.error = params.get("error", "").strip()
    f.overdue = params.get("overdue", "") in ("1", "on", "true", "yes")
    version = params.get("version", "").strip()
    if version:
        try:
            f.version = int(version)
        except ValueError:
            f.problems.append(f"version: {version!r} is not a whole number")
    for name in ("since", "until"):
        text = params.get(name, "").strip()
        if not text:
            continue
        try:
            setattr(f, name, _time(text))
        except ValueError:
            f.problems.append(f"{name}: {text!r} is not an ISO-8601 time (2026-01-02T03:04)")
    after = params.get("after", "").strip()
    if after:
        try:
            f.after = _cursor(after)
        except (ValueError, UnicodeDecodeError):
            f.problems.append("after: not a page cursor of this list (showing the first page)")
    return f
