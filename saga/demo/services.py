"""The demo's participants: inventory, payment and shipping services, run in the demo's process.

Each is a `SagaParticipant` with a little in-memory ledger, so the demo can check the end state: every
finished order holds a reservation, a charge and a shipment; every compensated order holds none.
"""

from __future__ import annotations

import asyncio
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

from broker import BrokerClientPool
from saga.demo.order import (
    CHARGE_PAYMENT,
    REFUND_PAYMENT,
    RELEASE_STOCK,
    RESERVE_STOCK,
    SCHEDULE_SHIPPING,
)
from saga.errors import SagaBusinessError
from saga.participant import CommandContext, SagaParticipant
from storage import SagaStorage

__all__ = ["DECLINED_CARD", "DemoLedger", "DemoServices"]

#: The card number the payment service declines.
DECLINED_CARD = "4000-0000-0000-0002"


@dataclass(slots=True)
class DemoLedger:
    """What the participants did, by order id."""

    reserved: dict[str, int] = field(default_factory=dict)
    released: set[str] = field(default_factory=set)
    charged: dict[str, int] = field(default_factory=dict)
    declined: set[str] = field(default_factory=set)
    refunded: set[str] = field(default_factory=set)
    shipped: dict[str, str] = field(default_factory=dict)

    def holds_stock(self, order_id: str) -> bool:
        """A reservation was made and not released."""
        return order_id in self.reserved and order_id not in self.released

    def holds_payment(self, order_id: str) -> bool:
        """A charge was made and not refunded."""
        return order_id in self.charged and order_id not in self.refunded

    def only(self, order_ids: Collection[str]) -> DemoLedger:
        """The entries of these orders only.

        A consumer group new to a long-lived Kafka starts at the earliest offset, so the participants may
        also answer commands left over from earlier runs; the report counts this run's orders.
        """
        keep = set(order_ids)
        return DemoLedger(
            reserved={k: v for k, v in self.reserved.items() if k in keep},
            released=self.released & keep,
            charged={k: v for k, v in self.charged.items() if k in keep},
            declined=self.declined & keep,
            refunded=self.refunded & keep,
            shipped={k: v for k, v in self.shipped.items() if k in keep},
        )


class DemoServices:
    """The three demo participants on one broker pool.

    Args:
        broker_pool: The pool the orchestrator uses (the in-memory broker only connects one process).
        storage: Where participants remember replies by idempotency key (``None``: in-process).
        latency: Seconds each handler pretends to work, so sagas overlap.
        group_suffix: Appended to the consumer groups (keeps runs against a shared Kafka apart).
    """

    def __init__(
        self,
        broker_pool: BrokerClientPool,
        *,
        storage: SagaStorage | None = None,
        latency: float = 0.005,
        group_suffix: str = "",
    ) -> None:
        self.ledger = DemoLedger()
        self._latency = latency
        self._serial = 0
        self.inventory = SagaParticipant(
            "demo-inventory", broker_pool, storage=storage, group_id=f"demo-inventory{group_suffix}"
        )
        self.payment = SagaParticipant(
            "demo-payment", broker_pool, storage=storage, group_id=f"demo-payment{group_suffix}"
        )
        self.shipping = SagaParticipant(
            "demo-shipping", broker_pool, storage=storage, group_id=f"demo-shipping{group_suffix}"
        )
        self.inventory.command(RESERVE_STOCK)(self._reserve)
        self.inventory.command(RELEASE_STOCK)(self._release)
        self.payment.command(CHARGE_PAYMENT)(self._charge)
        self.payment.command(REFUND_PAYMENT)(self._refund)
        self.shipping.command(SCHEDULE_SHIPPING)(self._ship)

    @property
    def participants(self) -> Sequence[SagaParticipant]:
        """All three, in start order."""
        return (self.inventory, self.payment, self.shipping)

    @property
    def command_topics(self) -> list[str]:
        """Every command topic the participants consume."""
        return [topic for p in self.participants for topic in p.command_topics]

    async def start(self) -> None:
        """Start consuming (joins the consumer groups)."""
        for participant in self.participants:
            await participant.start()

    async def stop(self) -> None:
        """Stop consuming; the pool stays open (its owner stops it)."""
        for participant in reversed(self.participants):
            await participant.stop()

    def _next(self, prefix: str) -> str:
        self._serial += 1
        return f"{prefix}-{self._serial:05d}"

    async def _work(self) -> None:
        if self._latency > 0:
            await asyncio.sleep(self._latency)

    async def _reserve(self, request: CommandContext) -> dict[str, Any]:
        await self._work()
        order_id = request.content["order_id"]
        self.ledger.reserved[order_id] = int(request.content["quantity"])
        return {"reservation_id": self._next("res")}

    async def _release(self, request: CommandContext) -> dict[str, Any]:
        await self._work()
        order_id = request.content["order_id"]
        self.ledger.released.add(order_id)
        return {"released": order_id in self.ledger.reserved}

    async def _charge(self, request: CommandContext) -> dict[str, Any]:
        await self._work()
        order_id = request.content["order_id"]
        if request.content["card"] == DECLINED_CARD:
            self.ledger.declined.add(order_id)
            raise SagaBusinessError(f"card declined for order {order_id}")
        self.ledger.charged[order_id] = int(request.content["amount"])
        return {"payment_id": self._next("pay")}

    async def _refund(self, request: CommandContext) -> dict[str, Any]:
        await self._work()
        order_id = request.content["order_id"]
        if order_id in self.ledger.charged:
            self.ledger.refunded.add(order_id)
        return {"refunded": order_id in self.ledger.refunded}

    async def _ship(self, request: CommandContext) -> dict[str, Any]:
        await self._work()
        order_id = request.content["order_id"]
        tracking = self._next("trk")
        self.ledger.shipped[order_id] = tracking
        return {"tracking_number": tracking}
