"""Saves made while the database is busy are written together, one statement per group (real PostgreSQL).

Each save keeps its own outcome inside a group: its record and outbox ids, a stale version or an unknown id
failing alone, a duplicate applied reply failing alone (the group is then written save by save).
"""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from storage import (
    ConcurrencyError,
    DuplicateReplyError,
    ExecutionNotFoundError,
    ExecutionRecord,
    OutboxMessage,
    ReplyRecord,
    SagaStatus,
)
from storage.migrate import upgrade_async
from storage.records import OutboxClaim
from storage.sql import SqlAlchemySagaStorage

pytestmark = [pytest.mark.postgres]


@pytest.fixture
async def storage(database_url: str) -> AsyncIterator[SqlAlchemySagaStorage]:
    """A storage with two connections, in a schema of its own (dropped afterwards)."""
    import asyncpg  # type: ignore[import-untyped]
    from sqlalchemy.engine import make_url

    dsn = make_url(database_url).set(drivername="postgresql").render_as_string(hide_password=False)
    schema = f"saga_grouped_{uuid.uuid4().hex[:10]}"
    conn = await asyncpg.connect(dsn)
    await conn.execute(f"CREATE SCHEMA {schema}")
    await conn.close()
    await upgrade_async(database_url, schema=schema)
    storage = SqlAlchemySagaStorage(database_url, schema=schema, auto_migrate=False, pool_size=2)
    await storage.start()
    try:
        yield storage
    finally:
        await storage.stop()
        conn = await asyncpg.connect(dsn)
        await conn.execute(f"DROP SCHEMA {schema} CASCADE")
        await conn.close()


def _groups(storage: SqlAlchemySagaStorage, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record the size of every group written as one statement."""
    sizes: list[int] = []
    grouped = storage._grouped
    original = grouped._write

    async def counted(session: Any, group: list[Any]) -> None:
        sizes.append(len(group))
        await original(session, group)

    monkeypatch.setattr(grouped, "_write", counted)
    return sizes


async def _created(storage: SqlAlchemySagaStorage, n: int) -> list[ExecutionRecord]:
    records = []
    for i in range(n):
        record = ExecutionRecord(
            id=uuid.uuid4(), name="order", definition_version=1, status=SagaStatus.RUNNING, state=b"{}"
        )
        records.append(await storage.create(record))
        assert records[-1].version == 1, i
    return records


def _command(record: ExecutionRecord, n: int) -> OutboxMessage:
    return OutboxMessage("payments", record.id.bytes, b"cmd-%d" % n, {"n": str(n)})


async def test_saves_waiting_for_a_connection_are_written_together(
    storage: SqlAlchemySagaStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    sizes = _groups(storage, monkeypatch)
    records = await _created(storage, 40)
    claims = [OutboxClaim("me", 30) for _ in records]
    saves = [
        storage.save(
            _paused(r),
            outbox=[_command(r, 0), _command(r, 1)],
            reply=ReplyRecord(r.id, uuid.uuid4(), 200, "applied"),
            outbox_claim=claim,
        )
        for r, claim in zip(records, claims, strict=True)
    ]
    stored = await asyncio.gather(*saves)
    assert max(sizes) > 1, sizes  # two connections, forty saves: most of them went out in groups
    for before, after, claim in zip(records, stored, claims, strict=True):
        assert after.version == before.version + 1 and after.status is SagaStatus.PAUSED
        assert (await storage.load(before.id)).version == after.version
        assert len(claim.ids) == 2 and claim.ids[0] < claim.ids[1]
        assert [r.outcome for r in await storage.list_replies(before.id)] == ["applied"]
    # The outbox rows are claimed for 30 s by their saves: a relay does not see them before that.
    assert await storage.fetch_outbox(1000, owner="relay", lease_seconds=30) == []


def _paused(record: ExecutionRecord) -> ExecutionRecord:
    return dataclasses.replace(record, status=SagaStatus.PAUSED)


async def test_each_save_of_a_group_keeps_its_own_outcome(
    storage: SqlAlchemySagaStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    sizes = _groups(storage, monkeypatch)
    records = await _created(storage, 12)
    applied = ReplyRecord(records[3].id, uuid.uuid4(), 200, "applied")
    await storage.save(records[3], reply=applied)  # that reply is applied already; records[3] now stale
    records[3] = await storage.load(records[3].id)
    stale = records[5]
    await storage.save(stale)  # version 2 stored; the save below still says 1
    unknown = ExecutionRecord(
        id=uuid.uuid4(), name="order", definition_version=1, status=SagaStatus.PAUSED, state=b"{}", version=1
    )

    # Two connections for eleven saves: the first two go out alone, the others wait and go together.
    outcomes = await asyncio.gather(
        *(
            storage.save(
                _paused(r), outbox=[_command(r, 0)], reply=ReplyRecord(r.id, uuid.uuid4(), 200, "applied")
            )
            for i, r in enumerate(records)
            if i not in (3, 5, 7)
        ),
        storage.save(_paused(records[3]), reply=applied),
        storage.save(_paused(stale)),
        storage.save(unknown),
        return_exceptions=True,
    )
    *written, duplicate, conflict, missing = outcomes
    assert isinstance(duplicate, DuplicateReplyError)
    assert isinstance(conflict, ConcurrencyError)
    assert isinstance(missing, ExecutionNotFoundError)
    assert all(isinstance(w, ExecutionRecord) and w.status is SagaStatus.PAUSED for w in written), written
    assert (await storage.load(records[3].id)).status is SagaStatus.RUNNING  # nothing of it was written
    assert (await storage.load(stale.id)).version == 2
    assert max(sizes) > 1, sizes
