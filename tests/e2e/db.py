"""The participants' own tables: one row per (idempotency key, effect) and per decision received.

Nothing here is unique-constrained on purpose: exactly-once is proven by counting rows, so a duplicate
effect shows up as a count of 2 instead of being hidden by a constraint violation.
"""

from __future__ import annotations

import uuid
from collections import Counter

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

SERVICES = ("inventory", "payment")


def ddl(service: str) -> list[str]:
    return [
        f"""CREATE TABLE IF NOT EXISTS {service}_effects (
            id bigserial PRIMARY KEY,
            idempotency_key text NOT NULL,
            execution_id uuid NOT NULL,
            order_no integer NOT NULL,
            effect text NOT NULL,
            recorded_at timestamptz NOT NULL DEFAULT now()
        )""",
        f"""CREATE TABLE IF NOT EXISTS {service}_decisions (
            id bigserial PRIMARY KEY,
            execution_id uuid NOT NULL,
            action text NOT NULL,
            recorded_at timestamptz NOT NULL DEFAULT now()
        )""",
    ]


async def create_tables(engine: AsyncEngine) -> None:
    async with engine.begin() as conn:
        for service in SERVICES:
            for statement in ddl(service):
                await conn.execute(text(statement))


async def record_effect(
    engine: AsyncEngine,
    service: str,
    *,
    idempotency_key: str,
    execution_id: uuid.UUID,
    order: int,
    effect: str,
) -> None:
    async with engine.begin() as conn:
        await conn.execute(
            text(
                f"INSERT INTO {service}_effects (idempotency_key, execution_id, order_no, effect) "
                "VALUES (:key, :execution_id, :order_no, :effect)"
            ),
            {"key": idempotency_key, "execution_id": execution_id, "order_no": order, "effect": effect},
        )


async def record_decision(engine: AsyncEngine, service: str, *, execution_id: uuid.UUID, action: str) -> None:
    async with engine.begin() as conn:
        await conn.execute(
            text(f"INSERT INTO {service}_decisions (execution_id, action) VALUES (:execution_id, :action)"),
            {"execution_id": execution_id, "action": action},
        )


async def effect_counts(engine: AsyncEngine) -> Counter[tuple[int, str, str]]:
    """``(order, service, effect) -> rows``."""
    counts: Counter[tuple[int, str, str]] = Counter()
    async with engine.connect() as conn:
        for service in SERVICES:
            rows = await conn.execute(
                text(f"SELECT order_no, effect, count(*) FROM {service}_effects GROUP BY 1, 2")
            )
            for order, effect, count in rows:
                counts[order, service, effect] = count
    return counts


async def effects_by_key(engine: AsyncEngine) -> Counter[tuple[str, str, str]]:
    """``(service, idempotency key, effect) -> rows``: a key handled twice shows up as 2."""
    counts: Counter[tuple[str, str, str]] = Counter()
    async with engine.connect() as conn:
        for service in SERVICES:
            rows = await conn.execute(
                text(f"SELECT idempotency_key, effect, count(*) FROM {service}_effects GROUP BY 1, 2")
            )
            for key, effect, count in rows:
                counts[service, key, effect] = count
    return counts


async def decision_counts(engine: AsyncEngine) -> Counter[tuple[uuid.UUID, str, str]]:
    """``(execution id, service, action) -> rows``."""
    counts: Counter[tuple[uuid.UUID, str, str]] = Counter()
    async with engine.connect() as conn:
        for service in SERVICES:
            rows = await conn.execute(
                text(f"SELECT execution_id, action, count(*) FROM {service}_decisions GROUP BY 1, 2")
            )
            for execution_id, action, count in rows:
                counts[execution_id, service, action] = count
    return counts
