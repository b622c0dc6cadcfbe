"""`SqlParticipantStore`'s contract, on SQLite (a temporary file) and PostgreSQL (marker ``postgres``).

Claims and their leases, completion fenced by the owner, step tombstones, and the reply outbox.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Sequence

import pytest
from sqlalchemy import text

from storage.participant import OutboxRow, SqlParticipantStore


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def store(request: pytest.FixtureRequest, tmp_path: object) -> AsyncIterator[SqlParticipantStore]:
    if request.param == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp_path}/participant.db"
    else:
        url = request.getfixturevalue("database_url")
    s = SqlParticipantStore(url, pool_size=4)
    await s.start()
    try:
        yield s
    finally:
        await s.stop()


@pytest.fixture
def service() -> str:
    return f"svc-{uuid.uuid4().hex[:8]}"


async def test_a_new_key_is_claimed_then_busy_for_another_owner(
    store: SqlParticipantStore, service: str
) -> None:
    first = await store.claim(service, "k1", owner="a", lease=30)
    second = await store.claim(service, "k1", owner="b", lease=30)
    assert first.outcome == "claimed"
    assert second.outcome == "busy"
    assert 0 < second.lease_left <= 30


async def test_the_same_owner_reclaims_its_own_claim(store: SqlParticipantStore, service: str) -> None:
    await store.claim(service, "k1", owner="a", lease=30)
    assert (await store.claim(service, "k1", owner="a", lease=30)).outcome == "claimed"


async def test_an_expired_claim_is_taken_over_and_fences_its_old_owner(
    store: SqlParticipantStore, service: str
) -> None:
    await store.claim(service, "k1", owner="a", lease=0.05)
    await asyncio.sleep(0.2)
    assert (await store.claim(service, "k1", owner="b", lease=30)).outcome == "claimed"
    assert not await store.renew(service, "k1", owner="a", lease=30)
    async with store.transaction() as conn:
        assert (
            await store.complete(conn, service, "k1", owner="a", status=200, value=b"1", reply_topic="r")
            is None
        )
    async with store.transaction() as conn:
        outbox_id = await store.complete(
            conn, service, "k1", owner="b", status=200, value=b"2", reply_topic="r"
        )
    assert outbox_id
    done = await store.claim(service, "k1", owner="c", lease=30)
    assert (done.outcome, done.reply_status, done.reply_value) == ("done", 200, b"2")


async def test_a_renewed_claim_is_not_taken_over(store: SqlParticipantStore, service: str) -> None:
    await store.claim(service, "k1", owner="a", lease=0.3)
    assert await store.renew(service, "k1", owner="a", lease=30)
    await asyncio.sleep(0.4)
    assert (await store.claim(service, "k1", owner="b", lease=30)).outcome == "busy"


async def test_a_rolled_back_completion_leaves_the_claim_in_place(
    store: SqlParticipantStore, service: str
) -> None:
    await store.claim(service, "k1", owner="a", lease=30)
    with pytest.raises(RuntimeError):
        async with store.transaction() as conn:
            await store.complete(conn, service, "k1", owner="a", status=200, value=b"1", reply_topic="r")
            raise RuntimeError("crash before the commit")
    assert (await store.claim(service, "k1", owner="a", lease=30)).outcome == "claimed"
    published: list[OutboxRow] = []

    async def publish(rows: Sequence[OutboxRow]) -> None:
        published.extend(rows)

    assert await store.relay(service, publish, older_than=0) == 0


async def test_a_released_claim_is_free_at_once(store: SqlParticipantStore, service: str) -> None:
    await store.claim(service, "k1", owner="a", lease=30)
    await store.release(service, "k1", owner="a")
    assert (await store.claim(service, "k1", owner="b", lease=30)).outcome == "claimed"


async def test_the_outbox_relays_old_rows_once_and_forgets_published_ones(
    store: SqlParticipantStore, service: str
) -> None:
    ids = []
    for key in ("k1", "k2", "k3"):
        await store.claim(service, key, owner="a", lease=30)
        async with store.transaction() as conn:
            outbox_id = await store.complete(
                conn,
                service,
                key,
                owner="a",
                status=200,
                value=b'{"ok":1}',
                reply_topic="orderReply",
                reply_key=b"exec",
                reply_headers={"saga-kind": "reply", "saga-status": "200"},
            )
        assert outbox_id
        ids.append(outbox_id)
    await store.forget_outbox(ids[:1])
    published: list[OutboxRow] = []

    async def publish(rows: Sequence[OutboxRow]) -> None:
        published.extend(rows)

    assert await store.relay(service, publish, older_than=3600) == 0  # too young: their instance sends them
    assert await store.relay(service, publish, older_than=0) == 2
    assert await store.relay(service, publish, older_than=0) == 0
    assert sorted(row.id for row in published) == sorted(ids[1:])
    row = published[0]
    assert (row.topic, row.key, row.value) == ("orderReply", b"exec", b'{"ok":1}')
    assert row.headers == {"saga-kind": "reply", "saga-status": "200"}


async def test_a_failed_publish_leaves_the_rows_queued(store: SqlParticipantStore, service: str) -> None:
    await store.claim(service, "k1", owner="a", lease=30)
    async with store.transaction() as conn:
        await store.complete(conn, service, "k1", owner="a", status=200, value=b"1", reply_topic="r")

    async def fail(rows: Sequence[OutboxRow]) -> None:
        raise ConnectionError("broker down")

    with pytest.raises(ConnectionError):
        await store.relay(service, fail, older_than=0)
    sent: list[OutboxRow] = []

    async def publish(rows: Sequence[OutboxRow]) -> None:
        sent.extend(rows)

    assert await store.relay(service, publish, older_than=0) == 1


async def test_a_compensation_first_leaves_a_tombstone_that_refuses_the_forward(
    store: SqlParticipantStore, service: str
) -> None:
    execution = str(uuid.uuid4())
    async with store.transaction() as conn:
        assert await store.begin_compensation(conn, service, execution, "reserve") == "tombstoned"
    async with store.transaction() as conn:
        assert await store.begin_forward(conn, service, execution, "reserve") == "tombstone"
    async with store.transaction() as conn:
        assert await store.begin_compensation(conn, service, execution, "reserve") == "tombstone"


async def test_a_compensation_after_its_forward_runs_then_refuses_later_forwards(
    store: SqlParticipantStore, service: str
) -> None:
    execution = str(uuid.uuid4())
    async with store.transaction() as conn:
        assert await store.begin_forward(conn, service, execution, "reserve") == "forward"
    async with store.transaction() as conn:
        assert await store.begin_forward(conn, service, execution, "reserve") == "forward"  # a retry
    async with store.transaction() as conn:
        assert await store.begin_compensation(conn, service, execution, "reserve") == "forward"
        await store.set_step(conn, service, execution, "reserve", "compensated")
    async with store.transaction() as conn:
        assert await store.begin_forward(conn, service, execution, "reserve") == "compensated"
    async with store.transaction() as conn:
        assert await store.begin_compensation(conn, service, execution, "reserve") == "compensated"


async def test_a_rolled_back_forward_leaves_no_trace(store: SqlParticipantStore, service: str) -> None:
    execution = str(uuid.uuid4())
    with pytest.raises(RuntimeError):
        async with store.transaction() as conn:
            await store.begin_forward(conn, service, execution, "reserve")
            raise RuntimeError("handler crashed")
    async with store.transaction() as conn:
        assert await store.begin_compensation(conn, service, execution, "reserve") == "tombstoned"


async def test_forward_running_sees_live_forward_claims_only(
    store: SqlParticipantStore, service: str
) -> None:
    execution = str(uuid.uuid4())
    assert not await store.forward_running(service, execution, "reserve")
    await store.claim(
        service, "f1", owner="a", lease=30, kind="forward", execution_id=execution, step="reserve"
    )
    assert await store.forward_running(service, execution, "reserve")
    async with store.transaction() as conn:
        await store.complete(conn, service, "f1", owner="a", status=200, value=b"1", reply_topic=None)
    assert not await store.forward_running(service, execution, "reserve")


async def test_the_tables_come_from_their_own_alembic_branch(store: SqlParticipantStore) -> None:
    async with store.transaction() as conn:
        version = (
            await conn.execute(text("SELECT version_num FROM saga_participant_alembic_version"))
        ).scalar_one()
    assert version == "p0001_participant_store"


@pytest.mark.postgres
async def test_a_compensation_waits_for_a_forward_transaction_in_progress(
    database_url: str, service: str
) -> None:
    store = SqlParticipantStore(database_url, pool_size=4)
    await store.start()
    try:
        execution = str(uuid.uuid4())
        forward_in = asyncio.Event()
        release = asyncio.Event()

        async def forward() -> None:
            async with store.transaction() as conn:
                assert await store.begin_forward(conn, service, execution, "reserve") == "forward"
                forward_in.set()
                await release.wait()

        async def compensation() -> str:
            await forward_in.wait()
            async with store.transaction() as conn:
                return await store.begin_compensation(conn, service, execution, "reserve")

        forward_task = asyncio.create_task(forward())
        compensation_task = asyncio.create_task(compensation())
        await forward_in.wait()
        await asyncio.sleep(0.3)
        assert not compensation_task.done()  # blocked on the forward's row
        release.set()
        await forward_task
        assert await compensation_task == "forward"
    finally:
        await store.stop()


async def test_renew_many_renews_the_owners_live_claims_only(
    store: SqlParticipantStore, service: str
) -> None:
    await store.claim(service, "mine", owner="a", lease=0.3)
    await store.claim(service, "theirs", owner="b", lease=30)
    await store.claim(service, "done", owner="a", lease=30)
    async with store.transaction() as conn:
        await store.complete(conn, service, "done", owner="a", status=200, value=b"1", reply_topic=None)
    renewed = await store.renew_many(service, ["mine", "theirs", "done", "unknown"], owner="a", lease=30)
    assert renewed == {"mine"}
    await asyncio.sleep(0.4)
    assert (await store.claim(service, "mine", owner="c", lease=30)).outcome == "busy"
    assert await store.renew_many(service, [], owner="a", lease=30) == set()
