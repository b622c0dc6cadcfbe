"""The admin query (`SagaStorage.query`) as SQL: built per call, since its filters vary.

Rows come newest first on ``(created_at, id)``, which ``ix_saga_executions_created_at`` serves: a page
reads ``limit`` index entries whatever the table's size, and keyset paging (``after``) keeps that true deep
into the list, where ``OFFSET`` would read and drop every row before the page.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, Select, Table, Text, and_, cast, func, not_, or_, select

from storage.records import ExecutionQuery
from storage.sql.statements import Clock
from storage.status import SagaStatus

__all__ = ["admin_query", "backlog_query", "outbox_query"]


def admin_query(
    t: Table, clock: Clock, q: ExecutionQuery
) -> tuple[Select[Any], Select[Any], dict[str, Any] | None]:
    """The page statement, the count statement and their parameters for ``q``."""
    where: list[ColumnElement[bool]] = []
    if q.statuses is not None:
        where.append(t.c.status.in_([SagaStatus(s).value for s in q.statuses]))
    if q.names is not None:
        where.append(t.c.name.in_(list(q.names)))
    if q.created_after is not None:
        where.append(t.c.created_at >= q.created_after)
    if q.created_before is not None:
        where.append(t.c.created_at < q.created_before)
    if q.updated_after is not None:
        where.append(t.c.updated_at >= q.updated_after)
    if q.updated_before is not None:
        where.append(t.c.updated_at < q.updated_before)
    if q.versions is not None:
        where.append(t.c.definition_version.in_(list(q.versions)))
    if q.idempotency_key is not None:
        where.append(t.c.idempotency_key == q.idempotency_key)
    if q.overdue is not None:
        late = and_(
            t.c.status == SagaStatus.PAUSED.value,
            t.c.reply_deadline.is_not(None),
            t.c.reply_deadline < clock.now(),
        )
        where.append(late if q.overdue else not_(late))
    if q.error_text is not None:
        where.append(cast(t.c.error, Text).icontains(q.error_text, autoescape=True))
    keyset = list(where)
    if q.after is not None:
        created, after_id = q.after
        # The first condition alone bounds the created_at index scan (an OR of the two would not).
        keyset.append(t.c.created_at <= created)
        keyset.append(or_(t.c.created_at < created, t.c.id < after_id))
    page = (
        select(*t.c)
        .where(*keyset)
        .order_by(t.c.created_at.desc(), t.c.id.desc())
        .offset(q.offset)
        .limit(q.limit)
    )
    total: Select[Any]
    if q.count_limit is None:
        total = select(func.count()).select_from(t).where(*where)
    else:  # a bounded subquery: the count stops scanning after count_limit matches
        capped = select(t.c.id).where(*where).limit(q.count_limit).subquery()
        total = select(func.count()).select_from(capped)
    return page, total, (clock.params() if q.overdue is not None else None)


def backlog_query(outbox: Table, clock: Clock) -> tuple[Select[int, Any, datetime], dict[str, Any]]:
    """``count`` and oldest ``created_at`` of the unsent outbox rows (the partial index), and "now" on the
    clock that wrote them, so the age is measured on one clock."""
    unsent = outbox.c.sent_at.is_(None)
    stmt = select(func.count(), func.min(outbox.c.created_at), clock.now()).select_from(outbox).where(unsent)
    return stmt, clock.params()


def outbox_query(outbox: Table, saga_id: uuid.UUID) -> Select[Any]:
    """Every outbox row of one execution, oldest first, in the columns `codec.outbox_from_row` reads."""
    o = outbox.c
    return (
        select(
            o.id, o.execution_id, o.topic, o.key, o.value, o.headers, o.created_at, o.request_id, o.attempts
        )
        .where(o.execution_id == saga_id)
        .order_by(o.id)
    )
