"""Every Core statement the SQL storage runs, built once per storage and reused.

Building them once keeps the hot path to "look up the compiled form in SQLAlchemy's cache and bind the
parameters": no ORM, no per-call statement construction. All values are bound parameters; the only
literals are the status constants the recovery query filters on, which must be literals so PostgreSQL can
match its partial index (``status IN ('compensating', ...)``) even under a generic prepared-statement plan.

Time is the one thing that differs by backend (`Clock`): on PostgreSQL "now" is the server's ``now()``, so
``updated_at``, leases and staleness all use the database clock whichever host the workers run on; SQLite
has no server, so the client's UTC time goes in as a parameter under the same names.

On PostgreSQL the claim, heartbeat, release and sent-mark statements also turn ``synchronous_commit`` off
for their own transaction (`Statements._commit_without_flush`, which says why that is safe for them and
for nothing else).
"""

from __future__ import annotations

import functools
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import (
    BigInteger,
    ColumnElement,
    Delete,
    Insert,
    Integer,
    Interval,
    Select,
    Update,
    and_,
    any_,
    bindparam,
    case,
    exists,
    func,
    literal_column,
    or_,
    select,
    true,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite

from storage.sql.combined import combined_create, combined_create_many, combined_save, combined_save_many
from storage.sql.schema import RECOVERY_CANDIDATES, SagaTables
from storage.sql.types import UtcDateTime
from storage.status import SagaStatus

__all__ = ["Clock", "RecoveryFilter", "Statements"]


def _p(name: str, type_: Any = None) -> Any:
    # Every parameter is prefixed so it can never collide with a column's automatic SET/VALUES parameter.
    return bindparam(f"p_{name}", type_=type_)


class Clock:
    """Where "now" comes from in SQL: the server's clock, or a parameter the client fills in.

    Args:
        server: Use the database server's ``now()`` (PostgreSQL).
        source: Without a server clock, where the client's "now" comes from (timezone-aware UTC; tests
            inject a skewed or controllable one). Every time a SQLite storage writes or compares comes from
            it: one clock.
    """

    def __init__(self, *, server: bool, source: Callable[[], datetime] | None = None) -> None:
        self.server = server
        self.current: Callable[[], datetime] = source or functools.partial(datetime.now, UTC)
        #: Server-clock parameters by shift names and seconds: every write asks for the same few (a lease,
        #: an outbox lease), and building the dict and its timedeltas each time showed in profiles.
        self._fixed: dict[tuple[tuple[str, float], ...], dict[str, Any]] = {}

    def now(self) -> ColumnElement[datetime]:
        """The current time inside a statement."""
        if self.server:
            return func.now(type_=UtcDateTime())
        return bindparam("p_now", type_=UtcDateTime())

    def shifted(self, name: str) -> ColumnElement[datetime]:
        """``now`` plus the number of seconds given (via `params`) under ``name``."""
        if self.server:
            return func.now(type_=UtcDateTime()) + bindparam(f"p_{name}", type_=Interval())
        return bindparam(f"p_{name}", type_=UtcDateTime())

    def params(self, **shifts: float) -> dict[str, Any]:
        """Parameters for `now` and every `shifted` name used by a statement."""
        if self.server:
            key = tuple(shifts.items())
            fixed = self._fixed.get(key)
            if fixed is None:
                if len(self._fixed) > 64:  # shifts are configuration, not data; stay bounded all the same
                    self._fixed.clear()
                fixed = self._fixed[key] = {f"p_{k}": timedelta(seconds=v) for k, v in shifts.items()}
            return dict(fixed)  # callers add their own parameters to it
        now = self.current()
        out: dict[str, Any] = {f"p_{k}": now + timedelta(seconds=v) for k, v in shifts.items()}
        out["p_now"] = now
        return out


@dataclass(frozen=True, slots=True)
class RecoveryFilter:
    """Which optional recovery predicates a statement variant carries."""

    stale: bool
    by_name: bool


@dataclass(slots=True)
class Statements:
    """The prepared statements of one storage (one dialect, one clock)."""

    tables: SagaTables
    clock: Clock
    dialect: str
    insert_execution: Insert = field(init=False)
    save: Update = field(init=False)
    version_of: Select[int] = field(init=False)
    load: Select[Any] = field(init=False)
    load_many: Select[Any] = field(init=False)
    by_idempotency_key: Select[Any] = field(init=False)
    id_by_idempotency_key: Select[uuid.UUID, str] = field(init=False)
    increment_attempts: Update = field(init=False)
    increment_attempts_status: Update = field(init=False)
    set_attempts: Update = field(init=False)
    claim: Update = field(init=False)
    claim_many: Update = field(init=False)
    renew: Update = field(init=False)
    release: Update = field(init=False)
    insert_reply: Insert = field(init=False)
    list_replies: Select[Any] = field(init=False)
    insert_outbox: Insert = field(init=False)
    cancel_moved_past: Update = field(init=False)
    fetch_outbox: Update = field(init=False)
    mark_sent: Update = field(init=False)
    defer_outbox: Update = field(init=False)
    reject_outbox: Update = field(init=False)
    get_command_reply: Select[bytes] = field(init=False)
    put_command_reply: Insert = field(init=False)
    count_by_status: Select[str, int] = field(init=False)
    database_time: Select[Any] = field(init=False)
    _recovery_ids: dict[RecoveryFilter, Select[uuid.UUID]] = field(init=False, default_factory=dict)
    _recovery_claims: dict[RecoveryFilter, Update] = field(init=False, default_factory=dict)
    _combined_saves: dict[tuple[bool, bool], Select[Any]] = field(init=False, default_factory=dict)
    _combined_create: Select[Any] | None = field(init=False, default=None)
    _save_many: Select[Any] | None = field(init=False, default=None)
    _create_many: Select[Any] | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        t = self.tables.executions
        now = self.clock.now
        bump = {"version": t.c.version + 1, "updated_at": now()}
        every = list(t.c)

        self.insert_execution = (
            t.insert()
            .values(
                id=_p("id"),
                name=_p("name"),
                definition_version=_p("definition_version"),
                status=_p("status"),
                state=_p("state"),
                steps=_p("steps"),
                version=1,
                recovery_attempts=_p("recovery_attempts"),
                idempotency_key=_p("idempotency_key"),
                user=_p("user"),
                reply_deadline=_p("reply_deadline"),
                owner=_p("owner"),
                lease_until=_p("lease_until"),
                error=_p("error"),
                created_at=now(),
                updated_at=now(),
                awaiting_request=_p("awaiting_request"),
            )
            .returning(t.c.created_at, t.c.updated_at)
        )
        self.save = (
            update(t)
            .where(t.c.id == _p("id"), t.c.version == _p("version"))
            .values(
                status=_p("status"),
                state=_p("state"),
                steps=_p("steps"),
                recovery_attempts=_p("recovery_attempts"),
                user=_p("user"),
                reply_deadline=_p("reply_deadline"),
                error=_p("error"),
                # The claim as the record carries it (None releases it). The holder's own lease is never
                # shortened: a heartbeat may have extended it after the record was read (renew_claim does
                # not bump the version), so the later of the two ends wins.
                owner=_p("owner"),
                lease_until=case(
                    (
                        and_(t.c.owner == _p("owner"), t.c.lease_until > _p("lease_until", UtcDateTime())),
                        t.c.lease_until,
                    ),
                    else_=_p("lease_until", UtcDateTime()),
                ),
                awaiting_request=_p("awaiting_request"),
                **bump,
            )
            # id and awaiting_request last: the combined form's cancel of moved-past commands reads them.
            .returning(
                t.c.version,
                t.c.updated_at,
                t.c.owner,
                t.c.lease_until,
                t.c.created_at,
                t.c.id,
                t.c.awaiting_request,
            )
        )
        self.version_of = select(t.c.version).where(t.c.id == _p("id"))
        self.load = select(*every).where(t.c.id == _p("id"))
        self.load_many = select(*every).where(self._one_of(t.c.id, t.c.id.type))
        self.by_idempotency_key = select(*every).where(t.c.idempotency_key == _p("key"))
        self.id_by_idempotency_key = select(t.c.id, t.c.name).where(t.c.idempotency_key == _p("key"))

        by_id = t.c.id == _p("id")
        self.increment_attempts = (
            update(t)
            .where(by_id)
            .values(recovery_attempts=t.c.recovery_attempts + 1, **bump)
            .returning(t.c.id)
        )
        self.increment_attempts_status = (
            update(t)
            .where(by_id)
            .values(recovery_attempts=t.c.recovery_attempts + 1, status=_p("status"), **bump)
            .returning(t.c.id)
        )
        self.set_attempts = (
            update(t).where(by_id).values(recovery_attempts=_p("attempts"), **bump).returning(t.c.id)
        )

        owner = _p("owner")
        no_flush = self._commit_without_flush()
        claimable = or_(
            t.c.owner.is_(None),
            t.c.owner == owner,
            t.c.lease_until.is_(None),
            t.c.lease_until < now(),
        )
        self.claim = (
            update(t)
            .where(by_id, claimable, *no_flush)
            .values(owner=owner, lease_until=self.clock.shifted("lease"), **bump)
            .returning(*every)
        )
        self.claim_many = (
            update(t)
            .where(self._one_of(t.c.id, t.c.id.type), claimable, *no_flush)
            .values(owner=owner, lease_until=self.clock.shifted("lease"), **bump)
            .returning(*every)
        )
        self.renew = (
            update(t)
            .where(by_id, t.c.owner == owner, *no_flush)
            .values(lease_until=self.clock.shifted("lease"))
            .returning(t.c.id)
        )
        self.release = (
            update(t)
            .where(by_id, t.c.owner == owner, *no_flush)
            .values(owner=None, lease_until=None, **bump)
            .returning(t.c.id)
        )

        r = self.tables.replies
        self.insert_reply = r.insert().values(
            execution_id=_p("execution_id"),
            request_id=_p("request_id"),
            status=_p("status"),
            outcome=_p("outcome"),
            reason=_p("reason"),
            received_at=func.coalesce(_p("received_at", UtcDateTime()), now()),
        )
        self.list_replies = (
            select(r.c.execution_id, r.c.request_id, r.c.status, r.c.outcome, r.c.reason, r.c.received_at)
            .where(r.c.execution_id == _p("id"))
            .order_by(r.c.id)
        )

        o = self.tables.outbox
        # One row per call, with its claim (owner and lease; both NULL unclaimed, the owner NULL for a
        # delayed row, whose lease is its delay): an executemany, or RETURNING its id for a claimed write.
        self.insert_outbox = (
            o.insert()
            .values(
                execution_id=_p("execution_id"),
                topic=_p("topic"),
                key=_p("key"),
                value=_p("value"),
                headers=_p("headers"),
                created_at=now(),
                claimed_by=_p("owner"),
                claimed_until=self.clock.shifted("lease"),
                request_id=_p("request_id"),
            )
            .returning(o.c.id)
        )
        # SQLite's form of the combined statements' cancel (`storage.sql.combined.cancel_moved_past`).
        self.cancel_moved_past = (
            update(o)
            .where(
                o.c.execution_id == _p("id"),
                o.c.sent_at.is_(None),
                o.c.request_id.is_not(None),
                o.c.request_id.is_distinct_from(_p("awaiting_request", t.c.awaiting_request.type)),
            )
            .values(sent_at=now(), outcome=literal_column("'cancelled'"))
        )
        # A command is current while its execution awaits its request; rows of requests left behind are
        # cancelled by the save that moved past them, and this keeps any other stale row unpublished.
        current = or_(
            o.c.request_id.is_(None),
            exists().where(t.c.id == o.c.execution_id, t.c.awaiting_request == o.c.request_id),
        )
        pick = (
            select(o.c.id)
            .where(
                o.c.sent_at.is_(None),
                or_(o.c.claimed_until.is_(None), o.c.claimed_until < now()),
                current,
            )
            .order_by(o.c.id)
            .limit(_p("limit", Integer()))
        )
        self.fetch_outbox = (
            update(o)
            .where(self._picked(o.c.id, pick))
            .values(claimed_by=_p("owner"), claimed_until=self.clock.shifted("lease"))
            .returning(
                o.c.id,
                o.c.execution_id,
                o.c.topic,
                o.c.key,
                o.c.value,
                o.c.headers,
                o.c.created_at,
                o.c.request_id,
                o.c.attempts,
            )
        )
        self.mark_sent = (
            update(o)
            .where(self._one_of(o.c.id, BigInteger()), o.c.sent_at.is_(None), *no_flush)
            .values(sent_at=now())
        )
        # A transient failure: the row is released and not due again before its backoff.
        self.defer_outbox = (
            update(o)
            .where(o.c.id == _p("id", BigInteger()), o.c.sent_at.is_(None))
            .values(attempts=o.c.attempts + 1, claimed_by=None, claimed_until=self.clock.shifted("delay"))
        )
        # Refused for good: out of the unsent rows, with why (a row cancelled meanwhile says rejected too).
        self.reject_outbox = (
            update(o)
            .where(o.c.id == _p("id", BigInteger()))
            .values(
                sent_at=func.coalesce(o.c.sent_at, now()),
                outcome=literal_column("'rejected'"),
                error=_p("error", o.c.error.type),
            )
        )

        c = self.tables.command_replies
        self.get_command_reply = select(c.c.reply).where(c.c.idempotency_key == _p("key"))
        insert = postgresql.insert if self.dialect == "postgresql" else sqlite.insert
        self.put_command_reply = (
            insert(c)
            .values(idempotency_key=_p("key"), reply=_p("reply"), created_at=now())
            .on_conflict_do_nothing(index_elements=[c.c.idempotency_key])
        )
        self.count_by_status = select(t.c.status, func.count()).group_by(t.c.status)
        # clock_timestamp(): the time at the call, where now() is the transaction's start.
        self.database_time = select(func.clock_timestamp(type_=UtcDateTime()))

    def _one_of(self, column: ColumnElement[Any], type_: Any) -> ColumnElement[bool]:
        """``column`` is one of the values of the list parameter ``p_ids``."""
        if self.dialect == "postgresql":
            # ``= ANY(array)``: one SQL text for any number of ids, so it is prebuilt and runs on the
            # driver directly; an expanding ``IN`` is rendered per call and takes SQLAlchemy's path.
            return column == any_(_p("ids", postgresql.ARRAY(type_)))
        return column.in_(bindparam("p_ids", expanding=True))

    def _commit_without_flush(self) -> list[ColumnElement[bool]]:
        """PostgreSQL: a condition that turns ``synchronous_commit`` off for the statement's own transaction.

        ``(SELECT set_config('synchronous_commit', 'off', true)) IS NOT NULL`` is uncorrelated, so it is
        planned as an InitPlan run once before any row is touched (a one-time filter, always true), and
        ``true`` makes the setting local to the transaction: the autocommit statement's own. Its commit then
        returns without waiting for the WAL flush, in the same single round trip. Visibility to other
        sessions is immediate either way; only durability across a server crash changes.

        Used only by writes that a server crash may lose without harm (`claim`, `renew_claim`,
        `release_claim`, `mark_outbox_sent`); never by ``save``, ``create``, ``record_reply`` or
        ``put_command_reply``, which the "persist before publish" and "commit the offset after the
        transaction" rules stand on:

        * WAL is flushed in order, so the first durable commit after such a write (the holder's ``save``)
          makes it durable too.
        * A claim lost in a crash was never followed by a durable write of its holder, and the holder's next
          save fails the version check: the stored row is back at the version before the claim (or, if
          another worker claimed it since, that worker holds the same version and the first save of the
          two wins, as between any two racing writers). A lost renewal only shortens the lease, a lost
          release only keeps the row claimed until its lease ends.
        * A lost sent-mark only makes a relay publish the row again once its claim's lease is over, and
          participants drop the duplicate by its idempotency key.

        SQLite has no such setting (and no server to crash separately): no condition there.
        """
        if self.dialect != "postgresql":
            return []
        setting = func.set_config(literal_column("'synchronous_commit'"), literal_column("'off'"), true())
        return [select(setting).scalar_subquery().is_not(None)]

    def _picked(self, column: ColumnElement[Any], pick: Select[Any]) -> ColumnElement[bool]:
        """``column`` is one of the ids ``pick`` selects, with ``pick`` run exactly once per statement.

        PostgreSQL: ``= ANY(ARRAY(pick FOR UPDATE SKIP LOCKED))``. The uncorrelated ``ARRAY(...)`` is an
        InitPlan, evaluated once before any row is updated, so ``pick``'s ``LIMIT`` bounds the claim. The
        obvious ``id IN (pick)`` is a semi-join, and the planner may put ``pick`` on the inner side of a
        nested loop and rescan it for every outer row: each rescan skips the rows this statement already
        updated (locked by itself) and locks the next ``limit`` ones, so one claim can take every
        claimable row. ``SKIP LOCKED`` makes concurrent claimers skip each other's rows instead of queueing.

        SQLite serialises writers, and one ``UPDATE ... WHERE id IN (pick)`` is atomic there; it runs a
        plain ``IN`` subquery once.
        """
        if self.dialect == "postgresql":
            return column == any_(func.array(pick.with_for_update(skip_locked=True).scalar_subquery()))
        return column.in_(pick)

    # -- one-statement writes (PostgreSQL) --------------------------------------------------------------

    @property
    def combines(self) -> bool:
        """Whether a write spanning tables runs as one statement (`storage.sql.combined`): PostgreSQL only."""
        return self.dialect == "postgresql"

    def save_combined(self, *, reply: bool, outbox: bool) -> Select[Any]:
        """``save`` with the applied reply's row and/or outbox rows, as one statement."""
        stmt = self._combined_saves.get((reply, outbox))
        if stmt is None:
            stmt = self._combined_saves[reply, outbox] = combined_save(
                self.tables, self.save, reply=reply, outbox=outbox
            )
        return stmt

    def save_many(self) -> Select[Any]:
        """Several executions' saves with their reply and outbox rows, as one statement."""
        if self._save_many is None:
            self._save_many = combined_save_many(self.tables)
        return self._save_many

    def create_combined(self) -> Select[Any]:
        """``insert_execution`` with outbox rows, as one statement."""
        if self._combined_create is None:
            self._combined_create = combined_create(self.tables, self.insert_execution)
        return self._combined_create

    def create_many(self) -> Select[Any]:
        """Several new executions with their outbox rows, as one statement."""
        if self._create_many is None:
            self._create_many = combined_create_many(self.tables)
        return self._create_many

    # -- recovery --------------------------------------------------------------------------------------

    def _recoverable(self, flt: RecoveryFilter) -> ColumnElement[bool]:
        """The recovery predicate, in the shape the partial index ``ix_saga_executions_recoverable`` serves.

        ``status IN (every candidate)`` repeats the index's own predicate, so PostgreSQL proves the index
        applies; the paused rows' deadline and the attempt limit are then checked on the index's INCLUDE
        columns while it is read in ``(updated_at, id)`` order, which stops after ``limit`` matches. The
        equivalent ``status IN (...) OR (status = 'paused' AND reply_deadline < now())`` is planned as a
        bitmap scan of every recoverable row and a sort: milliseconds instead of a tenth of one at a
        million rows.
        """
        t = self.tables.executions
        paused: ColumnElement[str] = literal_column(f"'{SagaStatus.PAUSED.value}'")
        conditions: list[ColumnElement[bool]] = [
            t.c.status.in_([literal_column(f"'{s}'") for s in RECOVERY_CANDIDATES]),
            or_(t.c.status != paused, t.c.reply_deadline < self.clock.now()),
            t.c.recovery_attempts < _p("max_attempts", Integer()),
        ]
        if flt.stale:
            conditions.append(t.c.updated_at < self.clock.shifted("stale"))
        if flt.by_name:
            conditions.append(t.c.name == _p("name"))
        return and_(*conditions)

    def recovery_ids(self, flt: RecoveryFilter) -> Select[uuid.UUID]:
        """``SELECT id`` of recoverable executions, oldest ``updated_at`` first (python-cqrs's query)."""
        stmt = self._recovery_ids.get(flt)
        if stmt is None:
            t = self.tables.executions
            stmt = (
                select(t.c.id)
                .where(self._recoverable(flt))
                .order_by(t.c.updated_at, t.c.id)
                .limit(_p("limit", Integer()))
            )
            self._recovery_ids[flt] = stmt
        return stmt

    def recovery_claim(self, flt: RecoveryFilter) -> Update:
        """One ``UPDATE ... RETURNING *`` claim of the rows `_picked` by the recovery filter, oldest first."""
        stmt = self._recovery_claims.get(flt)
        if stmt is None:
            t = self.tables.executions
            now = self.clock.now
            pick = (
                select(t.c.id)
                .where(
                    self._recoverable(flt),
                    or_(t.c.owner.is_(None), t.c.lease_until.is_(None), t.c.lease_until < now()),
                )
                .order_by(t.c.updated_at, t.c.id)
                .limit(_p("limit", Integer()))
            )
            stmt = (
                update(t)
                .where(self._picked(t.c.id, pick))
                .values(
                    owner=_p("owner"),
                    lease_until=self.clock.shifted("lease"),
                    version=t.c.version + 1,
                    updated_at=now(),
                )
                .returning(*t.c)
            )
            self._recovery_claims[flt] = stmt
        return stmt

    def delete_all(self) -> list[Delete]:
        """``DELETE`` of every row of every table (test helper; no ``TRUNCATE`` on SQLite)."""
        return [tbl.delete() for tbl in (self.tables.executions, self.tables.replies, self.tables.outbox)] + [
            self.tables.command_replies.delete()
        ]


def recovery_params(
    clock: Clock,
    *,
    limit: int,
    max_recovery_attempts: int,
    stale_after_seconds: int | None,
    saga_name: str | None,
    extra: Mapping[str, Any] | None = None,
    **shifts: float,
) -> tuple[RecoveryFilter, dict[str, Any]]:
    """The statement variant and its parameters for a recovery call."""
    if stale_after_seconds is not None:
        shifts["stale"] = -float(stale_after_seconds)
    params = clock.params(**shifts)
    params["p_limit"] = limit
    params["p_max_attempts"] = max_recovery_attempts
    if saga_name is not None:
        params["p_name"] = saga_name
    if extra:
        params.update(extra)
    return RecoveryFilter(stale=stale_after_seconds is not None, by_name=saga_name is not None), params
