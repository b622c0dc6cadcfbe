"""Creates made while the database is busy are written together, one statement per group (real PostgreSQL).

Each create keeps its own outcome inside a group: its record and outbox ids, a taken id or idempotency key
failing alone with the single create's error, and members sharing an id or a key written one by one.
"""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections.abc import Coroutine
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import select

from storage import (
    ConcurrencyError,
    DuplicateIdempotencyKeyError,
    ExecutionNotFoundError,
    ExecutionRecord,
    OutboxMessage,
    SagaStatus,
    StepRecord,
)
from storage.records import OutboxClaim
from storage.sql import SqlAlchemySagaStorage
from storage.sql.sessions import AsyncpgSession
from tests.integration import test_storage_grouped_postgres as grouped_saves

pytestmark = [pytest.mark.postgres]

#: A storage with two connections, in a schema of its own (the grouped saves' fixture).
storage = grouped_saves.storage


def _groups(storage: SqlAlchemySagaStorage, monkeypatch: pytest.MonkeyPatch) -> list[list[uuid.UUID]]:
    """Record the execution ids of every group of creates the storage writes."""
    groups: list[list[uuid.UUID]] = []
    grouped = storage._grouped_creates
    original = grouped._write

    async def recorded(session: Any, group: list[Any]) -> None:
        groups.append([request.record.id for request, _ in group])
        await original(session, group)

    monkeypatch.setattr(grouped, "_write", recorded)
    return groups


def _statements(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Record every statement the storage's asyncpg sessions run."""
    seen: list[Any] = []

    def observing(run: Any) -> Any:
        async def observed(self: Any, stmt: Any, params: Any = None) -> Any:
            seen.append(stmt)
            return await run(self, stmt, params)

        return observed

    for name in ("all", "first", "run"):
        monkeypatch.setattr(AsyncpgSession, name, observing(getattr(AsyncpgSession, name)))
    return seen


def _record(n: int, **changes: Any) -> ExecutionRecord:
    """A new execution whose every column the create writes holds a value of its own."""
    now = datetime.now(UTC).replace(microsecond=n)
    fields: dict[str, Any] = {
        "id": uuid.uuid4(),
        "name": f"order-{n}",
        "definition_version": n % 3 + 1,
        "status": SagaStatus.PAUSED if n % 2 else SagaStatus.RUNNING,
        "state": b'{"n": %d}' % n,
        "steps": (
            StepRecord("reserve", "remote", "execute", "waiting", n % 4 + 1, now - timedelta(seconds=n)),
        ),
        "recovery_attempts": n % 2,
        "idempotency_key": f"key-{uuid.uuid4().hex}" if n % 3 else None,
        "user": f"user-{n}",
        "reply_deadline": now + timedelta(seconds=60 + n),
        "owner": f"worker-{n % 2}",
        "lease_until": now + timedelta(seconds=30 + n),
        "error": {"n": n} if n % 5 == 0 else None,
    }
    fields.update(changes)
    return ExecutionRecord(**fields)


def _command(record: ExecutionRecord, n: int) -> OutboxMessage:
    return OutboxMessage("payments", record.id.bytes, b"%s-%d" % (record.name.encode(), n), {"n": str(n)})


async def _outbox_rows(storage: SqlAlchemySagaStorage) -> dict[int, tuple[Any, ...]]:
    """Every outbox row by id: execution id, value, claim owner and claim length."""
    o = storage.tables.outbox
    query = select(o.c.id, o.c.execution_id, o.c.value, o.c.claimed_by, o.c.claimed_until - o.c.created_at)
    async with storage.engine.connect() as conn:
        rows = (await conn.execute(query)).all()
    return {row[0]: tuple(row[1:]) for row in rows}


async def _together(*creates: Coroutine[Any, Any, ExecutionRecord]) -> list[Any]:
    """Run ``creates`` at once: with two connections the first two go out alone, the rest wait together."""
    return await asyncio.gather(*creates, return_exceptions=True)


async def test_creates_waiting_for_a_connection_are_written_together(
    storage: SqlAlchemySagaStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    groups = _groups(storage, monkeypatch)
    records = [_record(n) for n in range(40)]
    claims = [OutboxClaim("me", 30) for _ in records]
    statements = _statements(monkeypatch)
    created = await _together(
        *(
            storage.create(r, outbox=[_command(r, 0)], outbox_claim=claim)
            for r, claim in zip(records, claims, strict=True)
        )
    )
    monkeypatch.undo()
    assert all(isinstance(c, ExecutionRecord) for c in created), created
    # Two connections, forty creates: most of them went out in groups, each group as one statement.
    assert max(len(g) for g in groups) > 1, groups
    assert 0 < len(statements) < len(records), len(statements)
    assert sum(s is storage._s.create_many() for s in statements) == sum(len(g) > 1 for g in groups)
    rows = await _outbox_rows(storage)
    for record, stored, claim in zip(records, created, claims, strict=True):
        assert stored.created_at is not None and stored.updated_at is not None
        assert stored == dataclasses.replace(
            record, version=1, created_at=stored.created_at, updated_at=stored.updated_at
        )
        assert await storage.load(record.id) == stored  # every column as given, timestamps as returned
        assert len(claim.ids) == 1
        assert rows[claim.ids[0]] == (record.id, _command(record, 0).value, "me", timedelta(seconds=30))
    assert len(rows) == len(records)


async def test_creates_without_outbox_rows_group_too(
    storage: SqlAlchemySagaStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    groups = _groups(storage, monkeypatch)
    records = [_record(n) for n in range(30)]
    # Every third create has three rows; the others none. All but every third have a claim.
    outboxes = [[_command(r, i) for i in range(3)] if n % 3 == 0 else [] for n, r in enumerate(records)]
    claims = [OutboxClaim("me", 30) if n % 3 != 2 else None for n in range(len(records))]
    statements = _statements(monkeypatch)
    created = await _together(
        *(
            storage.create(r, outbox=outbox, outbox_claim=claim)
            for r, outbox, claim in zip(records, outboxes, claims, strict=True)
        )
    )
    monkeypatch.undo()
    assert all(isinstance(c, ExecutionRecord) for c in created), created
    assert max(len(g) for g in groups) > 1, groups
    assert 0 < len(statements) < len(records), len(statements)
    for stored in created:
        assert stored.version == 1 and await storage.load(stored.id) == stored
    rows = await _outbox_rows(storage)
    assert len(rows) == sum(map(len, outboxes))
    for record, outbox, claim in zip(records, outboxes, claims, strict=True):
        if claim is None:
            continue
        # Each execution's own ids, in the order of its rows.
        assert claim.ids == sorted(claim.ids) and len(claim.ids) == len(outbox)
        assert [rows[i] for i in claim.ids] == [
            (record.id, m.value, "me", timedelta(seconds=30)) for m in outbox
        ]


async def test_a_taken_id_or_idempotency_key_fails_alone(
    storage: SqlAlchemySagaStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    existing = await storage.create(_record(1, idempotency_key="taken"))
    other = await storage.create(_record(2, idempotency_key=None))
    groups = _groups(storage, monkeypatch)
    statements = _statements(monkeypatch)
    same_id = _record(3, id=other.id, idempotency_key=None)
    same_key = _record(4, idempotency_key="taken")
    fresh = [_record(n) for n in range(10, 20)]
    outcomes = await _together(
        *(storage.create(r, outbox=[_command(r, 0)]) for r in fresh[:6]),
        storage.create(same_id, outbox=[_command(same_id, 0)]),
        storage.create(same_key, outbox=[_command(same_key, 0)], outbox_claim=OutboxClaim("me", 30)),
        *(storage.create(r, outbox=[_command(r, 0)]) for r in fresh[6:]),
    )
    monkeypatch.undo()
    *written, conflict, duplicate = outcomes[:8]
    written += outcomes[8:]
    assert isinstance(conflict, ConcurrencyError) and conflict.execution_id == other.id
    assert isinstance(duplicate, DuplicateIdempotencyKeyError) and duplicate.existing_id == existing.id
    # Both conflicts were members of a group written as one statement, not writes of their own.
    assert any(len(g) > 1 and {same_id.id, same_key.id} <= set(g) for g in groups), groups
    assert storage._s.create_many() in statements
    for record, stored in zip(fresh, written, strict=True):
        assert isinstance(stored, ExecutionRecord) and await storage.load(record.id) == stored
    assert await storage.load(other.id) == other  # the stored execution is untouched
    with pytest.raises(ExecutionNotFoundError):
        await storage.load(same_key.id)
    rows = (await _outbox_rows(storage)).values()
    assert sorted(rows) == sorted((r.id, _command(r, 0).value, None, None) for r in fresh)


async def test_members_sharing_an_id_are_written_one_by_one(
    storage: SqlAlchemySagaStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    groups = _groups(storage, monkeypatch)
    first = _record(1, idempotency_key=None)
    twin = _record(2, id=first.id, idempotency_key=None)
    others = [_record(n) for n in range(3, 8)]
    outcomes = await _together(
        *(storage.create(r) for r in others[:2]),
        storage.create(first, outbox=[_command(first, 0)]),
        storage.create(twin, outbox=[_command(twin, 0)]),
        *(storage.create(r) for r in others[2:]),
    )
    monkeypatch.undo()
    assert any(len(g) > 2 and first.id in g for g in groups), groups
    stored, conflict = outcomes[2:4]
    assert isinstance(stored, ExecutionRecord) and await storage.load(first.id) == stored
    assert stored.name == first.name  # the first call wins, as without grouping
    assert isinstance(conflict, ConcurrencyError) and conflict.execution_id == first.id
    for record, other in zip(others, outcomes[:2] + outcomes[4:], strict=True):
        assert isinstance(other, ExecutionRecord) and await storage.load(record.id) == other
    rows = (await _outbox_rows(storage)).values()
    assert [row[:2] for row in rows] == [(first.id, _command(first, 0).value)]


async def test_members_sharing_an_idempotency_key_are_written_one_by_one(
    storage: SqlAlchemySagaStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    groups = _groups(storage, monkeypatch)
    keyed = _record(1, idempotency_key="shared")
    rival = _record(2, idempotency_key="shared")
    others = [_record(n, idempotency_key=None) for n in range(3, 8)]
    outcomes = await _together(
        *(storage.create(r) for r in others[:2]),
        storage.create(keyed),
        storage.create(rival),
        *(storage.create(r) for r in others[2:]),
    )
    monkeypatch.undo()
    assert any(len(g) > 2 and {keyed.id, rival.id} <= set(g) for g in groups), groups
    kept, duplicate = outcomes[2:4]
    assert isinstance(kept, ExecutionRecord) and await storage.load(keyed.id) == kept
    assert isinstance(duplicate, DuplicateIdempotencyKeyError) and duplicate.existing_id == keyed.id
    with pytest.raises(ExecutionNotFoundError):
        await storage.load(rival.id)
    for record, other in zip(others, outcomes[:2] + outcomes[4:], strict=True):
        assert isinstance(other, ExecutionRecord) and await storage.load(record.id) == other
