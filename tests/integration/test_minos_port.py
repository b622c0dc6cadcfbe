"""A Minos order service ported by changing its imports, run over the real Kafka and PostgreSQL.

The "service" section is written as a ``minos.saga`` service is: nameless ``Saga()`` definitions, one
callback serving several steps, reply callbacks that ``await response.content()``, Minos's status and
exception names, and a reply built the Minos way (``SagaResponse(content, related_services, status,
uuid=...)``) handed to ``SagaManager.run(response=...)``. Its only change from Minos is the import line.
The participants are kafka-saga `SagaParticipant` services on the same broker; every command they
handle is appended to a list (no dedup), so a command handled twice shows.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import pytest

# -- the service, as written for Minos (``from minos.saga import ...``) ---------------------------------
from saga.compat.minos import (
    AlreadyCommittedException,
    MultipleOnExecuteException,
    Saga,
    SagaContext,
    SagaExecution,
    SagaFailedExecutionException,
    SagaManager,
    SagaRequest,
    SagaResponse,
    SagaResponseStatus,
    SagaStatus,
)

SUFFIX = uuid.uuid4().hex[:10]
RESERVE, RELEASE, CHARGE, APPROVE = (
    f"{name}{SUFFIX}" for name in ("Reserve", "Release", "Charge", "Approve")
)


def _reserve_stock(context: SagaContext) -> SagaRequest:
    return SagaRequest(RESERVE, {"order": context.order_id, "quantity": context.quantity})


def _release_stock(context: SagaContext) -> SagaRequest:
    return SagaRequest(RELEASE, {"order": context.order_id})


def _charge(context: SagaContext) -> SagaRequest:
    return SagaRequest(CHARGE, {"order": context.order_id, "amount": 10 * context.quantity})


def _ask_approval(context: SagaContext) -> SagaRequest:
    return SagaRequest(APPROVE, {"order": context.order_id})


async def _store_reply(context: SagaContext, response: Any) -> SagaContext:
    """Serves every remote step: keeps what each participant answered, under the service's name."""
    content = await response.content()
    for service in response.related_services:
        context[service] = content
    context.replies = context.get("replies", 0) + 1  # attribute-style set, as Minos allows
    return context


def _mark(context: SagaContext) -> SagaContext:
    """Serves two local steps."""
    context.marks = context.get("marks", 0) + 1
    return context


def _unmark(context: SagaContext) -> SagaContext:
    context.unmarked = True
    return context


def order_saga() -> Saga:
    """Built afresh by each caller, as Minos services often do: equal nameless definitions."""
    return (
        Saga()
        .local_step(_mark)
        .on_failure(_unmark)
        .remote_step(_reserve_stock)
        .on_success(_store_reply)
        .on_failure(_release_stock)
        .local_step(_mark)
        .remote_step(_charge)
        .on_success(_store_reply)
        .commit()
    )


APPROVED_ORDER = (
    Saga()
    .remote_step(_charge)
    .on_success(_store_reply)
    .remote_step(_ask_approval)
    .on_success(_store_reply)
    .local_step(_mark)
    .commit()
)


# -- the test ----------------------------------------------------------------------------------------

from broker import KafkaBrokerPool  # noqa: E402
from saga import CommandContext, SagaBusinessError, SagaParticipant  # noqa: E402
from storage.migrate import upgrade_async  # noqa: E402
from storage.sql import SqlAlchemySagaStorage  # noqa: E402

pytestmark = [pytest.mark.kafka, pytest.mark.postgres]


async def _admin(database_url: str, sql: str) -> None:
    import asyncpg  # type: ignore[import-untyped]
    from sqlalchemy.engine import make_url

    dsn = make_url(database_url).set(drivername="postgresql").render_as_string(hide_password=False)
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@pytest.fixture
async def schema(database_url: str) -> AsyncIterator[str]:
    name = f"saga_minos_{uuid.uuid4().hex[:10]}"
    await _admin(database_url, f"CREATE SCHEMA {name}")
    try:
        await upgrade_async(database_url, schema=name)
        yield name
    finally:
        await _admin(database_url, f"DROP SCHEMA {name} CASCADE")


async def test_a_minos_order_service_runs_with_only_its_imports_changed(
    kafka_bootstrap: str, database_url: str, schema: str
) -> None:
    handled: list[tuple[str, str]] = []  # (topic, order): no dedup here, so a double shows
    decisions: list[tuple[str, uuid.UUID]] = []

    def participant(service: str, pool: KafkaBrokerPool) -> SagaParticipant:
        p = SagaParticipant(f"{service}{SUFFIX}", pool, group_id=f"{service}-{SUFFIX}")
        p.on_commit(lambda control: decisions.append(("commit", control.execution_id)))
        p.on_reject(lambda control: decisions.append(("reject", control.execution_id)))
        return p

    pool = KafkaBrokerPool(bootstrap_servers=kafka_bootstrap, topic_partitions=2, connect_timeout=20.0)
    stock, payment = participant("stock", pool), participant("payment", pool)

    @stock.command(RESERVE)
    async def reserve(request: CommandContext) -> dict[str, Any]:
        handled.append((RESERVE, request.content["order"]))
        if request.content["quantity"] > 5:
            raise SagaBusinessError("not enough stock")
        return {"reserved": request.content["quantity"]}

    @stock.command(RELEASE)
    async def release(request: CommandContext) -> dict[str, Any]:
        handled.append((RELEASE, request.content["order"]))
        return {"released": True}

    @payment.command(CHARGE)
    async def charge(request: CommandContext) -> dict[str, Any]:
        handled.append((CHARGE, request.content["order"]))
        return {"charged": request.content["amount"]}

    storage = SqlAlchemySagaStorage(database_url, schema=schema, auto_migrate=False)
    manager = SagaManager(storage, pool, service_name=f"orders{SUFFIX}", relay_interval=0.05)
    await pool.start()
    await pool.ensure_topics([RESERVE, RELEASE, CHARGE, APPROVE])
    async with stock, payment, manager:
        # Minos's definition errors, by Minos's names.
        with pytest.raises(AlreadyCommittedException):
            APPROVED_ORDER.local_step(_mark)
        with pytest.raises(MultipleOnExecuteException):
            Saga().remote_step(_charge).on_execute(_charge)

        # Two equal nameless definitions, one callback in several steps, replies over Kafka.
        first = await manager.run(order_saga(), SagaContext(order_id="o1", quantity=2))
        second = await manager.run(order_saga(), SagaContext(order_id="o2", quantity=3))
        assert isinstance(first, SagaExecution)
        assert first.status == SagaStatus.Finished and second.status == SagaStatus.Finished
        assert first.name == second.name
        assert first.context["marks"] == 2 and first.context["replies"] == 2
        assert first.context[f"stock{SUFFIX}"] == {"reserved": 2}
        assert first.context[f"payment{SUFFIX}"] == {"charged": 20}
        assert [s.name for s in first.steps] == ["_mark", "_reserve_stock", "_mark_2", "_charge"]

        # A refused reservation compensates and raises Minos's exception.
        with pytest.raises(SagaFailedExecutionException) as info:
            await manager.run(order_saga(), SagaContext(order_id="o3", quantity=9))
        refused = await manager.get(info.value.execution_id)  # type: ignore[arg-type]
        assert refused.status == SagaStatus.Errored
        assert refused.context["unmarked"] is True

        # A reply built the Minos way resumes a run paused on disk; autocommit=False holds per call.
        paused = await manager.run(APPROVED_ORDER, SagaContext(order_id="o4", quantity=1), pause_on_disk=True)
        assert paused.status == SagaStatus.Paused
        async with asyncio.timeout(30):
            while (await manager.get(paused.uuid)).context.get("replies") != 1:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
        desk = f"desk{SUFFIX}"
        response = SagaResponse({"approved": True}, {desk}, SagaResponseStatus.SUCCESS, uuid=paused.uuid)
        assert response.ok and response.uuid == paused.uuid and response.related_services == {desk}
        done = await manager.run(response=response, autocommit=False)
        assert done.status == SagaStatus.Finished
        assert done.context[f"desk{SUFFIX}"] == {"approved": True} and done.context["marks"] == 1
        stored = await storage.load(done.uuid)
        assert SagaStatus.from_raw(stored.status.raw) is SagaStatus.Finished

        expected = Counter(
            {("commit", first.uuid): 2, ("commit", second.uuid): 2, ("reject", refused.uuid): 1}
        )
        async with asyncio.timeout(30):
            while Counter(decisions) != expected:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
        assert not (await manager.get(done.uuid)).decision_sent  # autocommit=False: nothing sent by itself
        await manager.commit(done.uuid)
        async with asyncio.timeout(30):
            while ("commit", done.uuid) not in decisions:  # noqa: ASYNC110
                await asyncio.sleep(0.05)

    assert Counter(handled) == {
        (RESERVE, "o1"): 1, (CHARGE, "o1"): 1, (RESERVE, "o2"): 1, (CHARGE, "o2"): 1, (RESERVE, "o3"): 1,
        (CHARGE, "o4"): 1,
    }  # fmt: skip
    assert Counter(decisions) == expected + Counter({("commit", done.uuid): 1})
