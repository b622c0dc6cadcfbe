"""The demo order saga: create the order, reserve stock, charge the card, schedule shipping, confirm.

It exercises what the orchestrator is for: three remote steps whose participants answer on Kafka (or the
in-memory broker), a business refusal (a declined card, replied ``400``) that compensates what already
happened (the stock reservation is released, the order cancelled), and a crash in the middle of a run that
the recovery machinery resumes.
"""

from __future__ import annotations

from typing import Any

from saga.context import SagaContext
from saga.definitions import Saga
from saga.messages import SagaRequest, SagaResponse

__all__ = [
    "CHARGE_PAYMENT",
    "CRASH_SWITCH",
    "ORDER_SAGA",
    "ORDER_SAGA_NAME",
    "REFUND_PAYMENT",
    "RELEASE_STOCK",
    "RESERVE_STOCK",
    "SCHEDULE_SHIPPING",
    "CrashSwitch",
    "SimulatedCrash",
]

ORDER_SAGA_NAME = "demo-order"

# Command topics of the demo participants.
RESERVE_STOCK = "DemoReserveStock"
RELEASE_STOCK = "DemoReleaseStock"
CHARGE_PAYMENT = "DemoChargePayment"
REFUND_PAYMENT = "DemoRefundPayment"
SCHEDULE_SHIPPING = "DemoScheduleShipping"


class SimulatedCrash(BaseException):
    """Stands for the orchestrator process dying in the middle of a step.

    A `BaseException` on purpose: like ``SystemExit`` or a ``kill -9``, it is not a step failure the saga
    compensates, so the execution stays unfinished in storage for recovery to resume.
    """


class CrashSwitch:
    """Orders armed to crash once in their ``create_order`` step (the demo arms one; nothing by default).

    The first step runs in the task that called ``SagaManager.run``, so the crash surfaces there, as a
    dying process would: the execution was already stored (RUNNING, claimed by this process) before the
    step ran, and stays so until recovery resumes it from that step.
    """

    def __init__(self) -> None:
        self._armed: set[str] = set()
        self.crashed: list[str] = []

    def arm(self, order_id: str) -> None:
        """Make the next ``create_order`` of ``order_id`` crash."""
        self._armed.add(order_id)

    def take(self, order_id: str) -> bool:
        """Whether to crash now (true once per arming)."""
        if order_id in self._armed:
            self._armed.discard(order_id)
            self.crashed.append(order_id)
            return True
        return False

    def reset(self) -> None:
        """Disarm everything."""
        self._armed.clear()
        self.crashed.clear()


#: The process-wide switch the demo arms; harmless when nothing is armed.
CRASH_SWITCH = CrashSwitch()


def _order(context: SagaContext) -> dict[str, Any]:
    return {"order_id": context["order_id"]}


def create_order(context: SagaContext) -> SagaContext:
    if CRASH_SWITCH.take(context["order_id"]):
        raise SimulatedCrash(f"simulated crash while creating {context['order_id']}")
    context["order_status"] = "pending"
    return context


def cancel_order(context: SagaContext) -> SagaContext:
    context["order_status"] = "cancelled"
    return context


def reserve_stock(context: SagaContext) -> SagaRequest:
    return SagaRequest(
        RESERVE_STOCK, {**_order(context), "sku": context["sku"], "quantity": context["quantity"]}
    )


def stock_reserved(context: SagaContext, response: SagaResponse) -> SagaContext:
    context["reservation_id"] = response.content["reservation_id"]
    return context


def release_stock(context: SagaContext) -> SagaRequest:
    return SagaRequest(RELEASE_STOCK, _order(context))


def charge_payment(context: SagaContext) -> SagaRequest:
    return SagaRequest(
        CHARGE_PAYMENT, {**_order(context), "amount": context["amount"], "card": context["card"]}
    )


def payment_charged(context: SagaContext, response: SagaResponse) -> SagaContext:
    context["payment_id"] = response.content["payment_id"]
    return context


def refund_payment(context: SagaContext) -> SagaRequest:
    return SagaRequest(REFUND_PAYMENT, _order(context))


def schedule_shipping(context: SagaContext) -> SagaRequest:
    return SagaRequest(SCHEDULE_SHIPPING, {**_order(context), "address": context["address"]})


def shipping_scheduled(context: SagaContext, response: SagaResponse) -> SagaContext:
    context["tracking_number"] = response.content["tracking_number"]
    return context


def confirm_order(context: SagaContext) -> SagaContext:
    context["order_status"] = "confirmed"
    return context


#: The demo saga, registered by ``config/default.yml`` as ``saga.demo:ORDER_SAGA``.
ORDER_SAGA = (
    Saga(ORDER_SAGA_NAME)
    .local_step(create_order)
    .on_failure(cancel_order)
    .remote_step(reserve_stock)
    .on_success(stock_reserved)
    .on_failure(release_stock)
    .remote_step(charge_payment)
    .on_success(payment_charged)
    .on_failure(refund_payment)
    .remote_step(schedule_shipping)
    .on_success(shipping_scheduled)
    .local_step(confirm_order)
    .commit()
)
