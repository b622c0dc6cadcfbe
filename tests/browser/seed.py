"""Real executions for the console's browser tests, made by running sagas (not by writing rows by hand).

`seed(url)` runs them on PostgreSQL with the in-memory broker and a participant in the same process, and
leaves finished, compensated (ERRORED), dead-lettered, paused and overdue executions, with retries,
timeouts, duplicate and stale replies in their histories. The console process registers the same
definitions (``sagas:`` of its configuration names `SHOP`, `HOLD` and `FRAGILE`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from typing import Any

from broker import InMemoryBrokerPool
from saga import RetryPolicy, Saga, SagaContext, SagaManager, SagaRequest, SagaResponse, SagaStatus
from saga.errors import SagaBusinessError
from saga.participant import CommandContext, SagaParticipant
from storage import SqlAlchemySagaStorage


def _create(ctx: SagaContext) -> None:
    ctx["created"] = True


def _undo_create(ctx: SagaContext) -> None:
    ctx["created"] = False


def _reserve(ctx: SagaContext) -> SagaRequest:
    topic = "BrowserReserveSilent" if ctx.get("silent") else "BrowserReserve"
    return SagaRequest(topic, {"order": ctx["order"]})


def _reserved(ctx: SagaContext, response: SagaResponse) -> SagaContext:
    ctx["reservation"] = response.content["reservation"]
    return ctx


def _release(ctx: SagaContext) -> SagaRequest:
    return SagaRequest("BrowserRelease", {"order": ctx["order"]})


def _charge(ctx: SagaContext) -> SagaRequest:
    topic = "BrowserChargeSlow" if ctx.get("slow") else "BrowserCharge"
    return SagaRequest(topic, {"order": ctx["order"], "amount": ctx["amount"]})


SHOP = (
    Saga("shop-order")
    .local_step(_create, name="create")
    .on_failure(_undo_create)
    .remote_step(_reserve, name="reserve", timeout=0.3)
    .on_success(_reserved)
    .on_failure(_release)
    .remote_step(_charge, name="charge", timeout=0.3, retry=RetryPolicy(max_attempts=2))
    .commit()
)


def _hold(ctx: SagaContext) -> SagaRequest:
    return SagaRequest("BrowserHold", {"order": ctx["order"]})


HOLD = (
    Saga("hold-order")
    .local_step(_create, name="create")
    .on_failure(_undo_create)
    .remote_step(_hold, name="hold")
    .commit()
)


def _broken_undo(ctx: SagaContext) -> None:
    raise RuntimeError("inventory service refused the release")


def _explode(ctx: SagaContext) -> None:
    raise ValueError("address does not exist")


FRAGILE = (
    Saga("fragile-order", compensation_retry=RetryPolicy(max_attempts=2, initial_delay=0.01))
    .local_step(_create, name="create")
    .on_failure(_broken_undo)
    .local_step(_explode, name="validate_address")
    .commit()
)


@dataclasses.dataclass
class Seeded:
    """Ids of the executions `seed` made, by what they show."""

    finished: list[uuid.UUID]
    compensated: uuid.UUID
    timed_out: uuid.UUID
    dead: uuid.UUID
    overdue: uuid.UUID
    paused: uuid.UUID
    keyed: str


async def seed(url: str) -> Seeded:
    pool = InMemoryBrokerPool()
    shop = SagaParticipant("browser-shop", pool)

    @shop.command("BrowserReserve")
    async def reserve(request: CommandContext) -> dict[str, Any]:
        return {"reservation": f"r-{request.content['order']}"}

    @shop.command("BrowserRelease")
    async def release(request: CommandContext) -> dict[str, Any]:
        return {"released": True}

    @shop.command("BrowserCharge")
    async def charge(request: CommandContext) -> dict[str, Any]:
        if request.content["amount"] > 100:
            raise SagaBusinessError("card declined")
        return {"charged": request.content["amount"]}

    manager = SagaManager(SqlAlchemySagaStorage(url), pool, service_name="browser", wait_poll_interval=0.05)
    for saga in (SHOP, HOLD, FRAGILE):
        manager.register(saga)
    async with manager, shop:
        finished = []
        for n in range(3):
            key = f"order-{n}"
            done = await manager.run(SHOP, SagaContext(order=key, amount=10 + n), idempotency_key=key)
            finished.append(done.id)
        compensated = await manager.run(SHOP, SagaContext(order="big", amount=500), raise_on_error=False)
        # A charge that never gets an answer: timeout, one replay (attempt 2), timeout, compensation.
        slow = await manager.run(SHOP, SagaContext(order="slow", amount=5, slow=True), pause_on_disk=True)
        for _ in range(2):
            await asyncio.sleep(0.35)
            await manager.recover(slow.id)
        await _settle(manager, slow.id, SagaStatus.ERRORED)
        dead = await manager.run(FRAGILE, SagaContext(order="fragile"), raise_on_error=False)
        overdue = await manager.run(
            SHOP, SagaContext(order="silent", amount=1, silent=True), pause_on_disk=True
        )
        paused = await manager.run(HOLD, SagaContext(order="hold"), pause_on_disk=True)
        await asyncio.sleep(0.35)  # the silent reservation's deadline passes: overdue
        # A duplicate and a stale reply, recorded and ignored.
        record = await manager.storage.load(finished[0])
        request_id = next(s.request_id for s in record.steps if s.request_id is not None)
        assert request_id is not None
        await manager.handle_reply(
            SagaResponse(execution_id=finished[0], request_id=request_id, status=200, content={})
        )
        await manager.handle_reply(
            SagaResponse(execution_id=finished[0], request_id=uuid.uuid4(), status=200, content={})
        )
    return Seeded(
        finished=finished,
        compensated=compensated.id,
        timed_out=slow.id,
        dead=dead.id,
        overdue=overdue.id,
        paused=paused.id,
        keyed="order-1",
    )


async def _settle(manager: SagaManager, saga_id: uuid.UUID, status: SagaStatus) -> None:
    async with asyncio.timeout(10):
        while (await manager.storage.load(saga_id)).status is not status:  # noqa: ASYNC110 - polls storage
            await asyncio.sleep(0.05)
