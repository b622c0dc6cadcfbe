"""The order saga of the reliability suites: the e2e order saga plus instrumented local steps.

Steps (compensation in brackets):

1. ``open_order`` — local [``cancel_order``, local]
2. ``reserve_stock`` — remote to inventory [``release_stock``]; reply timeout 15 s, then replayed under the
   same request id and idempotency key (the participant answers a replay from its dedup store), with no
   practical limit on replays: how long a reply takes under the chaos must not decide the outcome
3. ``charge_payment`` — remote to payment [``refund_payment``]; no reply timeout and one send: a 500 reply
   must compensate (a retry would be a new request, a second charge attempt), and commands and replies are
   never lost, so the reply comes
4. ``confirm_order`` — local; raises for the ``local_failure`` orders

Compensations are retried (and, when remote, replayed on timeout) without practical limit either.
Participants' effects are those of `tests.e2e.workload`, so the checks of `tests.e2e.test_orders` apply
unchanged. Local steps record their runs (`common.StepRuns`) and pass the ``local_step`` crash point
halfway through.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from saga import RetryPolicy, Saga, SagaContext, SagaRequest, SagaResponse
from tests.e2e import workload
from tests.e2e.chaos.common import CrashPoint, StepRuns
from tests.e2e.workload import Names, Order, Outcome

#: Remote steps (their completion hook is the ``reply_applying`` crash point).
REMOTE_STEPS = frozenset({"reserve_stock", "charge_payment"})
#: Replies applied per execution, by outcome: "no reply applied twice" is checked against these.
APPLIED_REPLIES = {
    Outcome.GOOD: 2,  # reserve, charge
    Outcome.REFUSED: 3,  # reserve, charge (400), release
    Outcome.CRASHED: 3,  # reserve, charge (500), release
    Outcome.LOCAL_FAILURE: 4,  # reserve, charge, refund, release
}
#: Seconds a local step works (long enough for an overlap to be visible, short enough to be cheap).
LOCAL_WORK = 0.02


def order_saga(names: Names, runs: StepRuns, crash: CrashPoint) -> Saga:
    async def local(context: SagaContext, step: str, fail: bool = False) -> None:
        async def work() -> None:
            await asyncio.sleep(LOCAL_WORK / 2)
            crash.hit("local_step")
            await asyncio.sleep(LOCAL_WORK / 2)

        await runs.run(context["order"], step, work)
        if fail:
            raise RuntimeError(f"order {context['order']} cannot be confirmed")

    async def open_order(context: SagaContext) -> None:
        await local(context, "open_order")
        context["opened"] = True

    async def cancel_order(context: SagaContext) -> None:
        await local(context, "cancel_order")
        context["cancelled"] = True

    def reserve_stock(context: SagaContext) -> SagaRequest:
        return SagaRequest(
            names.reserve_stock,
            {"order": context["order"], "sku": context["sku"], "quantity": context["quantity"]},
        )

    def stock_reserved(context: SagaContext, response: SagaResponse) -> SagaContext:
        context["reservation"] = response.content["reservation"]
        return context

    def release_stock(context: SagaContext) -> SagaRequest:
        return SagaRequest(
            names.release_stock, {"order": context["order"], "reservation": context["reservation"]}
        )

    def charge_payment(context: SagaContext) -> SagaRequest:
        return SagaRequest(
            names.charge_payment,
            {"order": context["order"], "amount": context["amount"], "crash": context["crash"]},
        )

    def payment_charged(context: SagaContext, response: SagaResponse) -> SagaContext:
        context["charge"] = response.content["charge"]
        return context

    def refund_payment(context: SagaContext) -> SagaRequest:
        # The charge has no timeout, so it is compensated only after its 200 reply: the charge id set by
        # payment_charged must be in the context (a lost context change would dead-letter the saga here).
        return SagaRequest(names.refund_payment, {"order": context["order"], "charge": context["charge"]})

    async def confirm_order(context: SagaContext) -> None:
        await local(context, "confirm_order", fail=context["fail_local"])
        context["confirmed"] = True

    #: "Without practical limit": a run that needs this many tries has a bug the checks will report.
    unlimited = RetryPolicy(max_attempts=1000, initial_delay=0.2, max_delay=2.0)
    return (
        Saga("order", version=1, compensation_retry=unlimited)
        .local_step(open_order)
        .on_failure(cancel_order)
        .remote_step(reserve_stock, timeout=15, retry=unlimited)
        .on_success(stock_reserved)
        .on_failure(release_stock)
        .remote_step(charge_payment)
        .on_success(payment_charged)
        .on_failure(refund_payment)
        .local_step(confirm_order)
        .commit()
    )


@dataclass(frozen=True, slots=True)
class ChaosOrder(Order):
    """An e2e order whose amount stays under the payment limit unless the order is meant to be refused.

    `tests.e2e.workload.Order.context` charges ``10 + number``, which passes the limit from order 991 on:
    fine for the 200-order e2e tests, wrong for 1,000 orders (those would be refused though expected to
    finish).
    """

    def context(self) -> dict[str, Any]:
        context = Order.context(self)
        if self.outcome is not Outcome.REFUSED:
            context["amount"] = 10 + self.number % 900
        return context


def orders(count: int) -> list[ChaosOrder]:
    """`tests.e2e.workload.orders` (same outcomes, same keys) with amounts kept under the limit."""
    return [ChaosOrder(order.number, order.outcome) for order in workload.orders(count)]
