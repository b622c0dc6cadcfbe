"""The participant store's statements, one set per dialect, as SQLAlchemy Core.

Built once per store (SQLAlchemy caches their compiled form). Times come from the database's clock, so
leases written by one instance compare right on another whatever their clocks say.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import (
    ColumnElement,
    Float,
    LargeBinary,
    String,
    Text,
    and_,
    bindparam,
    cast,
    delete,
    func,
    literal,
    or_,
    select,
    update,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from storage.participant.schema import commands, outbox, steps

__all__ = ["Statements", "params"]


def params(mapping: dict[str, Any] | None = None, /, **values: Any) -> dict[str, Any]:
    """Statement parameters, named with the ``p_`` prefix the fast path binds (`storage.sql.sessions`)."""
    return {f"p_{k}": v for k, v in {**(mapping or {}), **values}.items()}


def _clock(dialect: str) -> ColumnElement[float]:
    """The database clock in seconds since the epoch: one clock for every instance's leases."""
    if dialect == "postgresql":
        return cast(func.extract("epoch", func.clock_timestamp()), Float)
    return (func.julianday("now") - 2440587.5) * 86400.0


class Statements:
    """The store's statements for one dialect, built once (SQLAlchemy caches their compiled form)."""

    def __init__(self, dialect: str) -> None:
        pg = dialect == "postgresql"
        insert = pg_insert if pg else sqlite_insert
        now = _clock(dialect)
        c, st, o = commands.c, steps.c, outbox.c
        service = bindparam("p_service", type_=String())
        key = bindparam("p_key", type_=String())
        owner = bindparam("p_owner", type_=String())
        lease = bindparam("p_lease", type_=Float())
        this = and_(c.service == service, c.idempotency_key == key)
        claimed_by = and_(this, c.state == "claimed", c.owner == owner)
        self.claim_insert = (
            insert(commands)
            .values(
                service=service,
                idempotency_key=key,
                execution_id=bindparam("p_execution_id"),
                step=bindparam("p_step"),
                kind=bindparam("p_kind"),
                state="claimed",
                owner=owner,
                lease_until=now + lease,
                updated_at=now,
            )
            .on_conflict_do_nothing(index_elements=[c.service, c.idempotency_key])
            .returning(c.kind)
        )
        self.claim_take = (
            update(commands)
            .where(this, c.state == "claimed", or_(c.lease_until < now, c.owner == owner))
            .values(owner=owner, lease_until=now + lease, updated_at=now)
            .returning(c.kind)
        )
        self.claim_read = select(c.state, c.reply_status, c.reply_value, c.lease_until - now).where(this)
        self.renew_many = (
            update(commands)
            .where(
                c.service == service,
                c.idempotency_key.in_(bindparam("p_keys", expanding=True)),
                c.state == "claimed",
                c.owner == owner,
            )
            .values(lease_until=now + lease)
            .returning(c.idempotency_key)
        )
        self.release = delete(commands).where(claimed_by)
        self.done = (
            update(commands)
            .where(claimed_by)
            .values(
                state="done",
                owner=None,
                lease_until=None,
                reply_status=bindparam("p_status"),
                reply_value=bindparam("p_value"),
                updated_at=now,
            )
        )
        self.done_returning = self.done.returning(c.idempotency_key)
        row: dict[str, ColumnElement[Any]] = {
            "service": service,
            "topic": bindparam("p_topic", type_=String()),
            "key": bindparam("p_mkey", type_=LargeBinary()),
            "value": bindparam("p_mvalue", type_=LargeBinary()),
            "headers": bindparam("p_headers", type_=Text()),
            "created_at": now,
        }
        self.insert_outbox = insert(outbox).values(**row).returning(o.id)
        # PostgreSQL completes in one round trip: the outbox row is inserted only if the claim still held.
        done = self.done.returning(literal(1).label("done")).cte("done")
        self.complete_pg = (
            pg_insert(outbox)
            .from_select(
                list(row),
                select(*row.values()).select_from(done),
            )
            .returning(o.id)
            if pg
            else None
        )
        step_key = and_(
            st.service == service,
            st.execution_id == bindparam("p_execution_id"),
            st.step == bindparam("p_step"),
        )
        step_row = {
            "service": service,
            "execution_id": bindparam("p_execution_id"),
            "step": bindparam("p_step"),
            "updated_at": now,
        }
        forward = insert(steps).values(state="forward", **step_row)
        self.step_forward = forward.on_conflict_do_update(
            index_elements=[st.service, st.execution_id, st.step], set_={"state": st.state}
        ).returning(st.state)
        self.step_tombstone = (
            insert(steps)
            .values(state="tombstone", **step_row)
            .on_conflict_do_nothing(index_elements=[st.service, st.execution_id, st.step])
            .returning(st.state)
        )
        read = select(st.state).where(step_key)
        self.step_read = read.with_for_update() if pg else read
        self.step_set = update(steps).where(step_key).values(state=bindparam("p_state"), updated_at=now)
        self.forward_running = (
            select(literal(1))
            .where(
                c.execution_id == bindparam("p_execution_id"),
                c.service == service,
                c.step == bindparam("p_step"),
                c.kind == "forward",
                c.state == "claimed",
                c.lease_until >= now,
            )
            .limit(1)
        )
        unsent = (
            select(o.id, o.topic, o.key, o.value, o.headers)
            .where(o.service == service, o.created_at <= now - bindparam("p_age"))
            .order_by(o.created_at)
            .limit(bindparam("p_limit"))
        )
        self.unsent = unsent.with_for_update(skip_locked=True) if pg else unsent
        self.delete_outbox = delete(outbox).where(o.id.in_(bindparam("p_ids", expanding=True)))
