"""`SagaParticipant` against the real `SagaManager`, in one process on the in-memory broker and storage.

The same order saga as the end-to-end tests, fast enough for the unit run: statuses, effects,
compensations and decisions, and a replayed command answered from the participant's dedup store.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from broker import InMemoryBrokerPool
from saga import CommandContext, SagaBusinessError, SagaManager, SagaParticipant, SagaStatus
from saga.messages import SagaControl
from storage import MemorySagaStorage
from tests.e2e.apps.orchestrator import order_saga
from tests.e2e.workload import PAYMENT_LIMIT, Names, Outcome, orders


@dataclass
class World:
    pool: InMemoryBrokerPool
    storage: MemorySagaStorage
    manager: SagaManager
    inventory: SagaParticipant
    payment: SagaParticipant
    names: Names
    #: ``(order, service, effect) -> count`` and ``(execution id, service, action) -> count``
    effects: Counter[tuple[int, str, str]] = field(default_factory=Counter)
    decisions: Counter[tuple[Any, str, str]] = field(default_factory=Counter)


def participants(
    world_effects: Counter[Any], decisions: Counter[Any], pool: Any, storage: Any, names: Names
) -> Any:
    inventory = SagaParticipant(names.inventory, pool, storage=storage)
    payment = SagaParticipant(names.payment, pool, storage=storage)

    def effect(service: str, name: str) -> Callable[[CommandContext], Any]:
        def handler(request: CommandContext) -> dict[str, Any]:
            world_effects[request.content["order"], service, name] += 1
            order = request.content["order"]
            if name == "charge" and request.content.get("crash"):
                raise RuntimeError("gateway down")
            if name == "charge" and request.content["amount"] > PAYMENT_LIMIT:
                raise SagaBusinessError("over the limit")
            return {"reservation": f"r{order}", "charge": f"c{order}"}

        return handler

    inventory.command(names.reserve_stock)(effect("inventory", "reserve"))
    inventory.command(names.release_stock)(effect("inventory", "release"))
    payment.command(names.charge_payment)(effect("payment", "charge"))
    payment.command(names.refund_payment)(effect("payment", "refund"))
    for participant, service in ((inventory, "inventory"), (payment, "payment")):

        def decided(control: SagaControl, service: str = service) -> None:
            decisions[control.execution_id, service, control.action] += 1

        participant.on_commit(decided)
        participant.on_reject(decided)
    return inventory, payment


@pytest.fixture
async def world() -> AsyncIterator[World]:
    names = Names("unit")
    pool = InMemoryBrokerPool(partitions=2)
    storage = MemorySagaStorage()
    manager = SagaManager(storage, pool, service_name=names.orchestrator, relay_interval=0.05)
    manager.register(order_saga(names))
    effects: Counter[tuple[int, str, str]] = Counter()
    decisions: Counter[tuple[Any, str, str]] = Counter()
    inventory, payment = participants(effects, decisions, pool, storage, names)
    world = World(pool, storage, manager, inventory, payment, names, effects, decisions)
    async with manager:
        try:
            yield world
        finally:
            await inventory.stop()
            await payment.stop()


async def eventually(predicate: Callable[[], bool], within: float = 5.0) -> None:
    async with asyncio.timeout(within):
        while not predicate():  # noqa: ASYNC110 (polling state, not an event)
            await asyncio.sleep(0.01)


async def test_order_sagas_with_the_manager(world: World) -> None:
    await world.inventory.start()
    await world.payment.start()
    saga = world.manager.registry.get("order", 1)
    workload = orders(20)
    executions = await asyncio.gather(
        *(world.manager.run(saga, order.context(), raise_on_error=False) for order in workload)
    )
    for order, execution in zip(workload, executions, strict=True):
        assert execution.status is order.expected_status, (order, execution.error)
        expected = {("inventory", "reserve"): 1, ("payment", "charge"): 1}
        if order.outcome is not Outcome.GOOD:
            expected["inventory", "release"] = 1
        if order.outcome is Outcome.LOCAL_FAILURE:
            expected["payment", "refund"] = 1
        got = {(service, name): n for (o, service, name), n in world.effects.items() if o == order.number}
        assert got == expected, order
    await eventually(lambda: sum(world.decisions.values()) == 2 * len(workload))
    for execution in executions:
        action = "commit" if execution.status is SagaStatus.FINISHED else "reject"
        for service in ("inventory", "payment"):
            assert world.decisions[execution.id, service, action] == 1


async def test_replayed_command_is_answered_from_the_dedup_store(world: World) -> None:
    saga = world.manager.registry.get("order", 1)
    [order] = orders(1)
    paused = await world.manager.run(saga, order.context(), pause_on_disk=True)
    assert paused.status is SagaStatus.PAUSED
    await world.manager.replay(paused.id)  # the same command again: same request id and key
    await world.inventory.start()
    await world.payment.start()
    async with asyncio.timeout(5):
        while (await world.storage.load(paused.id)).status is not SagaStatus.FINISHED:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
    assert world.effects[order.number, "inventory", "reserve"] == 1
    assert world.inventory.stats.duplicates == 1
    assert world.manager.consumer is not None
    await eventually(lambda: world.manager.consumer.stats["duplicate"] == 1)  # type: ignore[union-attr]
