"""PostgreSQL: a write that spans tables as one statement, through data-modifying CTEs.

Why: on the explicit-transaction path a remote step's ``save`` costs ``BEGIN``, the ``UPDATE``, the reply's
``INSERT``, one ``INSERT ... RETURNING id`` per outbox row and ``COMMIT``: five or more round trips for one
fsync. PostgreSQL runs a single statement in a transaction of its own, so the same writes chained as CTEs
are just as atomic and cost one round trip::

    WITH e AS (UPDATE saga_executions ... WHERE id = $id AND version = $version RETURNING ...),
         r AS (INSERT INTO saga_replies (...) SELECT ... FROM e),
         o AS (INSERT INTO saga_outbox (...) SELECT ... FROM e JOIN unnest($topics, $keys, $values, $headers)
               WITH ORDINALITY AS m ON true ORDER BY m.n RETURNING id)
    SELECT e.*, (SELECT array_agg(id ORDER BY id) FROM o) FROM e

Every rule of the multi-statement path still holds:

* Version check: the reply and outbox rows are selected ``FROM e``, the ``UPDATE``'s own output. When it
  matched no row (unknown id, stale version) they insert nothing and the statement returns no row, so the
  caller tells "not found" from "stale" with the same follow-up ``SELECT`` as before.
* A duplicate applied reply violates ``ux_saga_replies_applied`` and aborts the whole statement: the
  ``UPDATE`` and the outbox rows go with it.
* Outbox ids come back in the rows' order: the rows are inserted in ordinality order, so the sequence hands
  out ascending ids in that order, and ``array_agg(id ORDER BY id)`` returns them so.
* One clock: ``now()`` is the transaction's start time, the same in every part of the statement.
* Claimed and unclaimed rows are one statement: each row's ``claimed_by`` and ``claimed_until = now() +
  lease`` come from per-row arrays, NULL for an unclaimed row (an interval of NULL gives NULL).
* Fencing: every save also cancels its execution's unsent commands for requests it no longer awaits
  (`cancel_moved_past`), in the same statement.

The rows travel as one array per column (``unnest`` of several arrays zips them), so the SQL text is the same
for any number of rows and compiles once to a `storage.sql.sessions.Plan` like every prebuilt statement.
SQLite has no data-modifying CTEs, so it keeps the explicit transaction.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import (
    CTE,
    Column,
    ColumnElement,
    Insert,
    Integer,
    Interval,
    LargeBinary,
    ScalarSelect,
    Select,
    String,
    Table,
    TableValuedAlias,
    Update,
    and_,
    any_,
    bindparam,
    case,
    func,
    literal,
    select,
    true,
    update,
)
from sqlalchemy.dialects import postgresql
from sqlalchemy.dialects.postgresql import ARRAY, aggregate_order_by

from storage.sql.schema import SagaTables
from storage.sql.types import JsonDocument, UtcDateTime

__all__ = [
    "OUTBOX_IDS",
    "cancel_moved_past",
    "combined_create",
    "combined_create_many",
    "combined_save",
    "combined_save_many",
]

#: Position of the outbox ids (an array, or NULL when no row was written) in a combined statement's row.
OUTBOX_IDS = -1


def _p(name: str, type_: Any) -> Any:
    # The same ``p_`` prefix as every statement parameter (see `storage.sql.statements`).
    return bindparam(f"p_{name}", type_=type_)


def _reply_row(replies: Table, source: CTE) -> CTE:
    """``INSERT INTO saga_replies ... SELECT ... FROM source``: one row if ``source`` has one, else none."""
    return (
        replies.insert()
        .from_select(
            ["execution_id", "request_id", "status", "outcome", "reason", "received_at"],
            select(
                _p("reply_execution_id", replies.c.execution_id.type),
                _p("reply_request_id", replies.c.request_id.type),
                _p("reply_status", Integer()),
                _p("reply_outcome", String()),
                _p("reply_reason", String()),
                func.coalesce(_p("reply_received_at", UtcDateTime()), func.now(type_=UtcDateTime())),
            ).select_from(source),
        )
        .cte("r")
    )


def _outbox_rows(outbox: Table, execution_id: ColumnElement[Any], source: CTE) -> CTE:
    """``INSERT INTO saga_outbox ... SELECT`` the zipped parameter arrays, once per row of ``source``.

    Each row carries its request id, claim owner and lease (see `storage.sql.codec.outbox_claims`: a
    claimed write's rows are claimed by its owner, a delayed row is unclaimed and not due before its
    delay; an interval of NULL gives NULL).
    """
    rows = (
        func.unnest(
            _p("outbox_topics", ARRAY(String())),
            _p("outbox_keys", ARRAY(LargeBinary())),
            _p("outbox_values", ARRAY(LargeBinary())),
            _p("outbox_headers", ARRAY(JsonDocument(), dimensions=1)),
            _p("outbox_request_ids", ARRAY(outbox.c.request_id.type)),
            _p("outbox_owners", ARRAY(String())),
            _p("outbox_leases", ARRAY(Interval())),
        )
        .table_valued("topic", "key", "value", "headers", "request_id", "owner", "lease", with_ordinality="n")
        .render_derived(name="m")
    )
    now = func.now(type_=UtcDateTime())
    return (
        outbox.insert()
        .from_select(
            [
                "execution_id",
                "topic",
                "key",
                "value",
                "headers",
                "created_at",
                "claimed_by",
                "claimed_until",
                "request_id",
            ],
            select(
                execution_id,
                rows.c.topic,
                rows.c.key,
                rows.c.value,
                rows.c.headers,
                now,
                rows.c.owner,
                now + rows.c.lease,
                rows.c.request_id,
            )
            .select_from(source.join(rows, true()))
            .order_by(rows.c.n),
        )
        .returning(outbox.c.id)
        .cte("o")
    )


def cancel_moved_past(outbox: Table, e: CTE) -> CTE:
    """``UPDATE saga_outbox SET sent_at = now(), outcome = 'cancelled'`` for the unsent commands of every
    execution ``e`` wrote whose request is not the one it now awaits (``e`` returns ``id`` and
    ``awaiting_request``): moving past a request cancels its unsent rows in the same transaction.

    Rows the same statement inserts are not seen (one snapshot for every part of a statement), so a
    save's own new command stays. The rows are found through the partial index on ``execution_id`` over
    unsent rows: a probe that finds nothing once the commands went out.

    The rows are picked ``FOR UPDATE SKIP LOCKED``, once (``= ANY(ARRAY(...))``, see
    `storage.sql.statements.Statements._picked`): a row another statement holds is being marked sent
    (published) or claimed by a relay that read it while it was still current, and waiting for it would
    order this statement's execution locks before that row's lock while a sent-mark of many rows takes
    them in another order (a deadlock).
    """
    unsent = outbox.alias("u")
    pick = (
        select(unsent.c.id)
        .where(
            unsent.c.execution_id == e.c.id,
            unsent.c.sent_at.is_(None),
            unsent.c.request_id.is_not(None),
            unsent.c.request_id.is_distinct_from(e.c.awaiting_request),
        )
        .with_for_update(skip_locked=True, of=unsent)
    )
    return (
        update(outbox)
        .where(outbox.c.id == any_(func.array(pick.scalar_subquery())))
        .values(sent_at=func.now(type_=UtcDateTime()), outcome=literal("cancelled", String()))
        .cte("c")
    )


def _with_ids(write: CTE, outbox: CTE | None, *others: CTE) -> Select[Any]:
    """``SELECT write.*, (SELECT array_agg(id ORDER BY id) FROM outbox) FROM write``, carrying ``others``."""
    columns: list[Any] = list(write.c)
    if outbox is not None:
        columns.append(select(func.array_agg(aggregate_order_by(outbox.c.id, outbox.c.id))).scalar_subquery())
    stmt = select(*columns)
    return stmt.add_cte(*others) if others else stmt


def combined_save(tables: SagaTables, save: Update, *, reply: bool, outbox: bool) -> Select[Any]:
    """``save`` (the optimistic ``UPDATE ... RETURNING``) with its reply row and/or outbox rows."""
    e = save.cte("e")
    others = [cancel_moved_past(tables.outbox, e)]
    if reply:
        others.append(_reply_row(tables.replies, e))
    o = _outbox_rows(tables.outbox, _p("id", tables.executions.c.id.type), e) if outbox else None
    return _with_ids(e, o, *others)


def combined_create(tables: SagaTables, insert: Insert) -> Select[Any]:
    """``insert`` (the new execution's ``INSERT ... RETURNING``) with its outbox rows."""
    e = insert.cte("e")
    return _with_ids(e, _outbox_rows(tables.outbox, _p("id", tables.executions.c.id.type), e))


#: Columns only a create writes: a save leaves them as created.
_CREATE_ONLY = ("name", "definition_version", "idempotency_key")


def _execution_arrays(executions: Table, *, without: Sequence[str]) -> TableValuedAlias:
    """``unnest($p_id, $p_status, ...) AS v(id, status, ...)``: several executions' values, one array per
    column under the name the single statements give its value, zipped into one row per execution; every
    column of the table but those ``without``, each named by its key.

    A string column's array is cast to ``VARCHAR[]``, not to the column's ``VARCHAR(n)[]``: a cast cuts a
    longer value short silently, where the insert or update of a single statement fails on it.
    """
    columns = [c for c in executions.c if c.key not in without]
    arrays = [
        _p(c.key, ARRAY(String() if isinstance(c.type, String) else c.type, dimensions=1)) for c in columns
    ]
    return func.unnest(*arrays).table_valued(*(c.key for c in columns)).render_derived(name="v")


def combined_save_many(tables: SagaTables) -> Select[Any]:
    """Several executions' saves, each with its applied reply and outbox rows, as one statement.

    The per-execution statement of `combined_save`, with every value an array under the name the single
    statement gives it (`storage.sql.codec.save_params`, `reply_params`, `outbox_arrays`): the executions'
    columns zipped by ``unnest`` into ``v`` and updated ``FROM v`` where id and version match; the replies and
    the outbox rows (each carrying its execution's id) inserted for the executions the ``UPDATE`` returned.
    Returns one row per execution saved: id, version, updated_at, owner, lease_until, created_at and its
    outbox ids in order. An execution that is not returned was not found or stale, and nothing of it was
    written; a duplicate applied reply aborts the whole statement, as in `combined_save`.
    """
    t, now = tables.executions, func.now(type_=UtcDateTime())
    v = _execution_arrays(t, without=(*_CREATE_ONLY, "created_at", "updated_at"))
    e = (
        update(t)
        .where(t.c.id == v.c.id, t.c.version == v.c.version)
        .values(
            status=v.c.status,
            state=v.c.state,
            steps=v.c.steps,
            recovery_attempts=v.c.recovery_attempts,
            user=v.c.user,
            reply_deadline=v.c.reply_deadline,
            error=v.c.error,
            owner=v.c.owner,
            # As in the single save: the holder's own lease is never shortened.
            lease_until=case(
                (and_(t.c.owner == v.c.owner, t.c.lease_until > v.c.lease_until), t.c.lease_until),
                else_=v.c.lease_until,
            ),
            version=t.c.version + 1,
            updated_at=now,
            awaiting_request=v.c.awaiting_request,
        )
        .returning(
            t.c.id,
            t.c.version,
            t.c.updated_at,
            t.c.owner,
            t.c.lease_until,
            t.c.created_at,
            t.c.awaiting_request,
        )
        .cte("e")
    )
    replies = tables.replies
    rr = (
        func.unnest(
            _p("reply_execution_id", ARRAY(replies.c.execution_id.type)),
            _p("reply_request_id", ARRAY(replies.c.request_id.type)),
            _p("reply_status", ARRAY(Integer())),
            _p("reply_outcome", ARRAY(String())),
            _p("reply_reason", ARRAY(String())),
            _p("reply_received_at", ARRAY(UtcDateTime(), dimensions=1)),
        )
        .table_valued("execution_id", "request_id", "status", "outcome", "reason", "received_at")
        .render_derived(name="rr")
    )
    r = (
        replies.insert()
        .from_select(
            ["execution_id", "request_id", "status", "outcome", "reason", "received_at"],
            select(
                rr.c.execution_id,
                rr.c.request_id,
                rr.c.status,
                rr.c.outcome,
                rr.c.reason,
                func.coalesce(rr.c.received_at, now),
            ).select_from(e.join(rr, e.c.id == rr.c.execution_id)),
        )
        .cte("r")
    )
    cancel = cancel_moved_past(tables.outbox, e)
    return select(*e.c, _outbox_ids_many(tables.outbox, e)).add_cte(r, cancel)


def combined_create_many(tables: SagaTables) -> Select[Any]:
    """Several new executions, each with its outbox rows, as one statement.

    The per-execution statement of `combined_create`, with every value an array under the name the single
    statement gives it (`storage.sql.codec.insert_params`, `outbox_arrays`): the executions' columns zipped
    by ``unnest`` into ``v`` and inserted ``ON CONFLICT DO NOTHING``, so an execution whose id or
    idempotency key is taken is skipped instead of aborting the others; the outbox rows (each carrying its
    execution's id) inserted for the executions the ``INSERT`` returned. Returns one row per execution
    created: id, created_at, updated_at and its outbox ids in order. An execution that is not returned
    conflicted, and nothing of it was written.
    """
    t, now = tables.executions, func.now(type_=UtcDateTime())
    v = _execution_arrays(t, without=("version", "created_at", "updated_at"))
    values: dict[Column[Any], Any] = {t.c[name]: column for name, column in v.c.items()}
    values.update({t.c.version: literal(1, Integer()), t.c.created_at: now, t.c.updated_at: now})
    e = (
        postgresql.insert(t)
        .from_select(list(values), select(*values.values()).select_from(v))
        .on_conflict_do_nothing()
        .returning(t.c.id, t.c.created_at, t.c.updated_at)
        .cte("e")
    )
    return select(*e.c, _outbox_ids_many(tables.outbox, e))


def _outbox_ids_many(outbox: Table, e: CTE) -> ScalarSelect[Any]:
    """The outbox rows of several executions inserted for those ``e`` returned (a CTE ``o``), and per row of
    ``e`` its rows' ids in order: ``(SELECT array_agg(id ORDER BY id) FROM o WHERE execution_id = e.id)``.

    Each row carries its execution's id, claim owner and lease (NULL, NULL without a claim), so claimed and
    unclaimed rows of different executions are one statement; they are inserted in ordinality order, so
    each execution's ids ascend in the order of its ``outbox`` argument.
    """
    now = func.now(type_=UtcDateTime())
    m = (
        func.unnest(
            _p("outbox_execution_ids", ARRAY(outbox.c.execution_id.type)),
            _p("outbox_topics", ARRAY(String())),
            _p("outbox_keys", ARRAY(LargeBinary())),
            _p("outbox_values", ARRAY(LargeBinary())),
            _p("outbox_headers", ARRAY(JsonDocument(), dimensions=1)),
            _p("outbox_request_ids", ARRAY(outbox.c.request_id.type)),
            _p("outbox_owners", ARRAY(String())),
            _p("outbox_leases", ARRAY(Interval())),
        )
        .table_valued(
            "execution_id",
            "topic",
            "key",
            "value",
            "headers",
            "request_id",
            "owner",
            "lease",
            with_ordinality="n",
        )
        .render_derived(name="m")
    )
    o = (
        outbox.insert()
        .from_select(
            [
                "execution_id",
                "topic",
                "key",
                "value",
                "headers",
                "created_at",
                "claimed_by",
                "claimed_until",
                "request_id",
            ],
            select(
                m.c.execution_id,
                m.c.topic,
                m.c.key,
                m.c.value,
                m.c.headers,
                now,
                m.c.owner,
                now + m.c.lease,
                m.c.request_id,
            )
            .select_from(e.join(m, e.c.id == m.c.execution_id))
            .order_by(m.c.n),
        )
        .returning(outbox.c.id, outbox.c.execution_id)
        .cte("o")
    )
    return (
        select(func.array_agg(aggregate_order_by(o.c.id, o.c.id)))
        .where(o.c.execution_id == e.c.id)
        .scalar_subquery()
    )
