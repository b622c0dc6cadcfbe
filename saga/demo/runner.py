"""Running the demo: a batch of orders, a declined card now and then, one crash, and the checks.

`run_demo` is what ``kafka-saga demo`` calls; it returns a `DemoReport` and reports progress through a
callback, leaving all printing to the caller. The same code runs on the embedded configuration (in-memory
broker, SQLite) and on real Kafka and PostgreSQL.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from saga.config import SagaConfig, build_broker_pool, build_manager, build_storage
from saga.context import SagaContext
from saga.demo.order import CRASH_SWITCH, ORDER_SAGA, ORDER_SAGA_NAME, SimulatedCrash
from saga.demo.services import DECLINED_CARD, DemoLedger, DemoServices
from saga.manager import SagaManager
from saga.recovery import recover_saga
from storage import TERMINAL_STATUSES, SagaStatus, SagaStorage

__all__ = [
    "DemoProgress",
    "DemoReport",
    "Expectation",
    "OrderPlan",
    "OrderResult",
    "plan_orders",
    "run_demo",
]

#: What an order is expected to end as: ``recovered`` is FINISHED after a crash and a recovery.
Expectation = Literal["finished", "errored", "recovered"]

_EXPECTED_STATUS: dict[Expectation, SagaStatus] = {
    "finished": SagaStatus.FINISHED,
    "errored": SagaStatus.ERRORED,
    "recovered": SagaStatus.FINISHED,
}

#: Every DECLINE_EVERY-th order (from the fourth on) pays with the declined card.
DECLINE_EVERY = 7
_SKUS = ("mug", "t-shirt", "poster", "sticker-pack", "hoodie")


@dataclass(frozen=True, slots=True)
class OrderPlan:
    """One demo order and what should become of it."""

    index: int
    order_id: str
    declined: bool
    crash: bool

    @property
    def expected(self) -> Expectation:
        """The expected outcome."""
        if self.crash:
            return "recovered"
        return "errored" if self.declined else "finished"

    @property
    def expected_status(self) -> SagaStatus:
        """The status its execution must end in."""
        return _EXPECTED_STATUS[self.expected]

    def context(self) -> dict[str, object]:
        """The saga's initial context."""
        return {
            "order_id": self.order_id,
            "sku": _SKUS[self.index % len(_SKUS)],
            "quantity": 1 + self.index % 3,
            "amount": 1250 + 100 * (self.index % 10),
            "card": DECLINED_CARD if self.declined else "4242-4242-4242-4242",
            "address": f"{self.index + 1} Demo Street",
        }


@dataclass(slots=True)
class OrderResult:
    """What became of one order."""

    plan: OrderPlan
    execution_id: uuid.UUID | None = None
    status: SagaStatus | None = None
    crashed: bool = False
    status_after_crash: SagaStatus | None = None
    recovered: bool = False
    error: str | None = None

    @property
    def ok(self) -> bool:
        """Its execution ended as expected (a crashed order must also have been recovered)."""
        if self.status is not self.plan.expected_status:
            return False
        return self.recovered if self.plan.crash else not self.crashed


@dataclass(frozen=True, slots=True)
class DemoProgress:
    """A snapshot for the progress display."""

    phase: str
    total: int
    done: int
    finished: int
    errored: int
    crashed: int
    recovered: int
    elapsed: float
    last: OrderResult | None = None

    @property
    def in_flight(self) -> int:
        """Orders started and not yet done."""
        return self.total - self.done


@dataclass(slots=True)
class DemoReport:
    """The outcome of a demo run."""

    results: list[OrderResult]
    ledger: DemoLedger
    elapsed: float
    problems: list[str] = field(default_factory=list)
    timed_out: bool = False

    @property
    def ok(self) -> bool:
        """Every saga reached its expected status and the participants' books agree."""
        return not self.problems and not self.timed_out and all(r.ok for r in self.results)

    def count(self, expectation: Expectation, *, actual: bool) -> int:
        """How many orders were expected to end as ``expectation`` (or, ``actual``, did)."""
        if not actual:
            return sum(1 for r in self.results if r.plan.expected == expectation)
        return sum(1 for r in self.results if r.plan.expected == expectation and r.ok)

    def statuses(self) -> dict[SagaStatus, int]:
        """Final status counts of the demo's executions."""
        counts: dict[SagaStatus, int] = {}
        for r in self.results:
            if r.status is not None:
                counts[r.status] = counts.get(r.status, 0) + 1
        return counts


def plan_orders(count: int, *, crash: bool = True, run_tag: str | None = None) -> list[OrderPlan]:
    """The batch: every `DECLINE_EVERY`-th order declined, one order in the middle crashing."""
    tag = run_tag or uuid.uuid4().hex[:8]
    declined = [i % DECLINE_EVERY == 3 for i in range(count)]
    crash_index = -1
    if crash and count:
        candidates = [i for i in range(count // 2, count) if not declined[i]] or [
            i for i in range(count) if not declined[i]
        ]
        crash_index = candidates[0] if candidates else -1
    return [
        OrderPlan(index=i, order_id=f"order-{tag}-{i + 1:04d}", declined=declined[i], crash=i == crash_index)
        for i in range(count)
    ]


ProgressCallback = Callable[[DemoProgress], None]


class _Tracker:
    def __init__(self, plans: list[OrderPlan], on_progress: ProgressCallback | None) -> None:
        self.results = [OrderResult(plan) for plan in plans]
        self.started = time.monotonic()
        self.phase = "running"
        self._on_progress = on_progress

    def notify(self, last: OrderResult | None = None) -> None:
        if self._on_progress is None:
            return
        done = [r for r in self.results if r.status in TERMINAL_STATUSES or r.crashed]
        self._on_progress(
            DemoProgress(
                phase=self.phase,
                total=len(self.results),
                done=len(done),
                finished=sum(1 for r in self.results if r.status is SagaStatus.FINISHED),
                errored=sum(1 for r in self.results if r.status is SagaStatus.ERRORED),
                crashed=sum(1 for r in self.results if r.crashed),
                recovered=sum(1 for r in self.results if r.recovered),
                elapsed=time.monotonic() - self.started,
                last=last,
            )
        )


async def run_demo(
    config: SagaConfig,
    *,
    orders: int = 20,
    concurrency: int = 8,
    crash: bool = True,
    time_limit: float = 120.0,
    on_progress: ProgressCallback | None = None,
    latency: float = 0.005,
) -> DemoReport:
    """Run the demo batch on the broker and storage ``config`` describes.

    The order saga is registered if the configuration does not list it. Participants run in this process
    on the same broker pool and storage as the orchestrator.

    Raises:
        SagaConfigError: The configuration cannot be built.
    """
    storage = build_storage(config)
    pool = build_broker_pool(config)
    manager = build_manager(config, storage=storage, broker_pool=pool)
    if (ORDER_SAGA_NAME, ORDER_SAGA.version) not in manager.registry:
        manager.register(ORDER_SAGA)
    # Participant groups per orchestrator service: two demos against one Kafka keep to their own commands.
    services = DemoServices(pool, storage=storage, latency=latency, group_suffix=f"-{config.service.name}")
    plans = plan_orders(orders, crash=crash)
    tracker = _Tracker(plans, on_progress)
    CRASH_SWITCH.reset()
    report = DemoReport(results=tracker.results, ledger=services.ledger, elapsed=0.0)
    async with manager:
        await services.start()
        try:
            async with asyncio.timeout(time_limit):
                await _run_batch(manager, tracker, concurrency)
                tracker.phase = "recovering"
                tracker.notify()
                await _recover_crashed(manager, config, tracker)
        except TimeoutError:
            report.timed_out = True
            report.problems.append(f"gave up after {time_limit:g}s with orders unfinished")
        finally:
            CRASH_SWITCH.reset()
            await services.stop()
        await _final_statuses(storage, tracker)
    report.elapsed = time.monotonic() - tracker.started
    report.ledger = services.ledger.only([plan.order_id for plan in plans])
    report.problems.extend(_check_ledger(report))
    tracker.phase = "done"
    tracker.notify()
    return report


async def _run_batch(manager: SagaManager, tracker: _Tracker, concurrency: int) -> None:
    gate = asyncio.Semaphore(concurrency)

    async def one(result: OrderResult) -> None:
        plan = result.plan
        async with gate:
            if plan.crash:
                CRASH_SWITCH.arm(plan.order_id)
            try:
                execution = await manager.run(
                    ORDER_SAGA,
                    SagaContext(plan.context()),
                    idempotency_key=plan.order_id,
                    raise_on_error=False,
                )
            except SimulatedCrash as crash:
                # What a process crash leaves behind: the execution as last stored, unfinished.
                result.crashed = True
                result.error = str(crash)
                record = await manager.storage.find_by_idempotency_key(plan.order_id)
                if record is not None:
                    result.execution_id = record.id
                    result.status = result.status_after_crash = record.status
            else:
                result.execution_id = execution.id
                result.status = execution.status
                if execution.error:
                    result.error = str(execution.error.get("error"))
        tracker.notify(result)

    await asyncio.gather(*(one(result) for result in tracker.results))


async def _recover_crashed(manager: SagaManager, config: SagaConfig, tracker: _Tracker) -> None:
    """Resume the crashed executions as a restarted worker would, then wait for them to end."""
    for result in tracker.results:
        if not result.crashed or result.execution_id is None:
            continue
        await recover_saga(
            manager, result.execution_id, max_recovery_attempts=config.recovery.max_recovery_attempts
        )
        while True:
            record = await manager.storage.load(result.execution_id)
            if record.status in TERMINAL_STATUSES:
                break
            await asyncio.sleep(0.02)
        result.status = record.status
        result.recovered = True
        tracker.notify(result)


async def _final_statuses(storage: SagaStorage, tracker: _Tracker) -> None:
    """Re-read every execution: the report states what storage holds, not what the callers saw."""
    for result in tracker.results:
        if result.execution_id is not None:
            result.status = (await storage.load(result.execution_id)).status


def _check_ledger(report: DemoReport) -> list[str]:
    ledger = report.ledger
    problems = []
    for r in report.results:
        order = r.plan.order_id
        if not r.ok:
            expected = r.plan.expected_status.value.upper()
            actual = r.status.value.upper() if r.status is not None else "not started"
            note = " and was not recovered" if r.plan.crash and not r.recovered else ""
            problems.append(f"{order}: expected {expected}, got {actual}{note}")
            continue
        if r.plan.expected_status is SagaStatus.FINISHED:
            if not (ledger.holds_stock(order) and ledger.holds_payment(order) and order in ledger.shipped):
                problems.append(f"{order}: finished, but its stock, payment or shipment is missing")
        elif ledger.holds_stock(order) or ledger.holds_payment(order) or order in ledger.shipped:
            problems.append(f"{order}: compensated, but the participants still hold its stock or payment")
    return problems
