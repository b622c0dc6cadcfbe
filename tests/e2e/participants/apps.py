"""The inventory and payment participants of the participant crash suite, run by ``kafka-saga participant``.

``participant.app`` is ``tests.e2e.participants.apps:inventory`` or ``...:payment``; the topic names come
from ``PARTICIPANT_SUFFIX`` (one suffix per test run). Every handler is transactional: its effect row goes
through the handler's connection, so it commits with the command's dedup record and reply, or not at all.
The effect tables have no unique constraint, so a doubled effect shows as two rows.

A command whose content carries ``slow`` sleeps that many seconds inside its transaction (instances join
and leave meanwhile); ``PARTICIPANT_CRASH`` arms a crash point (`tests.e2e.participants.faults`).
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from sqlalchemy import Column, Integer, MetaData, String, Table, insert

from broker import BrokerClientPool
from saga import CommandContext, SagaBusinessError, SagaParticipant
from storage.participant import SqlParticipantStore
from tests.e2e.participants.faults import CrashingPool, CrashPoint

#: Charges above this are refused (400).
PAYMENT_LIMIT = 1_000

metadata = MetaData()
effects = Table(
    "participant_effects",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("service", String(40), nullable=False),
    Column("effect", String(20), nullable=False),
    Column("execution_id", String(64), nullable=False),
    Column("order_no", Integer, nullable=False),
    Column("idempotency_key", String(64), nullable=False),
    Column("pid", Integer, nullable=False),
)


class Topics:
    """The run's topic names."""

    def __init__(self, suffix: str) -> None:
        self.reserve = f"ReserveStock-{suffix}"
        self.reserve_late = f"ReserveStockLate-{suffix}"
        self.release = f"ReleaseStock-{suffix}"
        self.charge = f"Charge-{suffix}"
        self.refund = f"Refund-{suffix}"
        self.orchestrator = f"orders-{suffix}"
        self.reply = f"orders-{suffix}Reply"
        self.inventory = f"inventory-{suffix}"
        self.payment = f"payment-{suffix}"


def topics() -> Topics:
    return Topics(os.environ["PARTICIPANT_SUFFIX"])


async def _effect(request: CommandContext, service: str, effect: str, crash: CrashPoint) -> None:
    await request.connection.execute(
        insert(effects).values(
            service=service,
            effect=effect,
            execution_id=str(request.execution_id),
            order_no=request.content["order"],
            idempotency_key=request.idempotency_key,
            pid=os.getpid(),
        )
    )
    slow = request.content.get("slow", 0)
    if slow:
        await asyncio.sleep(slow)
    crash.hit("effect")


def _participant(
    service: str, broker_pool: BrokerClientPool, store: SqlParticipantStore | None, options: dict[str, Any]
) -> tuple[SagaParticipant, CrashPoint]:
    crash = CrashPoint()
    pool: Any = CrashingPool(broker_pool, crash, topics().reply)
    return SagaParticipant(service, pool, store=store, **options), crash


def inventory(
    *, broker_pool: BrokerClientPool, store: SqlParticipantStore | None, **options: Any
) -> SagaParticipant:
    names = topics()
    participant, crash = _participant(names.inventory, broker_pool, store, options)

    @participant.command(names.reserve)
    async def reserve(request: CommandContext) -> dict[str, Any]:
        await _effect(request, "inventory", "reserve", crash)
        return {"reservation": f"res-{request.content['order']}"}

    @participant.command(names.release, compensates=names.reserve)
    async def release(request: CommandContext) -> dict[str, Any]:
        await _effect(request, "inventory", "release", crash)
        return {"released": request.content["order"]}

    return participant


def payment(
    *, broker_pool: BrokerClientPool, store: SqlParticipantStore | None, **options: Any
) -> SagaParticipant:
    names = topics()
    participant, crash = _participant(names.payment, broker_pool, store, options)

    @participant.command(names.charge)
    async def charge(request: CommandContext) -> dict[str, Any]:
        if request.content["amount"] > PAYMENT_LIMIT:
            raise SagaBusinessError(f"amount {request.content['amount']} over the limit")
        await _effect(request, "payment", "charge", crash)
        return {"charge": f"ch-{request.content['order']}"}

    @participant.command(names.refund, compensates=names.charge)
    async def refund(request: CommandContext) -> dict[str, Any]:
        await _effect(request, "payment", "refund", crash)
        return {"refunded": request.content["order"]}

    return participant
