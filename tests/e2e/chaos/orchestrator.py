"""A crashable orchestrator: SagaManager + SagaRecoveryWorker on PostgreSQL and Kafka, starting a slice of
the workload at a steady rate.

``python -m tests.e2e.chaos.orchestrator --bootstrap HOST:PORT --database-url URL --suffix S --name NAME
--first 0 --count 500 [--rate 6] [--lease 3] [--recovery-interval 0.5] [--go-file PATH]``

With ``CHAOS_CRASH=point:n`` in its environment the process SIGKILLs itself the n-th time it passes that
crash point (`tests.e2e.chaos.common.CRASH_POINTS`), printing ``CRASH point n`` first.

It prints ``READY`` once it consumes replies, waits for ``--go-file`` if given, then starts its orders with
``idempotency_key`` (a restarted process goes through its whole slice again: orders already started are
found by key and skipped, at no cost to the rate), printing ``STARTED n`` when done. It then keeps
consuming replies and recovering until SIGTERM, and prints ``STATS {json}``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import time
from collections.abc import Sequence
from typing import Any

import orjson

from broker import BrokerError
from saga import SagaError, SagaManager, SagaRecoveryWorker
from saga.hooks import SagaEvent, SagaHooks
from storage import ExecutionRecord, OutboxMessage, ReplyRecord, SqlAlchemySagaStorage, StorageError
from tests.e2e.chaos import common
from tests.e2e.chaos.order_saga import REMOTE_STEPS, order_saga, orders
from tests.e2e.workload import Names, Order

_log = logging.getLogger("chaos.orchestrator")


class CrashingStorage(SqlAlchemySagaStorage):
    """Passes the ``outbox_committed`` / ``reply_committed`` crash points right after the commit."""

    crash: common.CrashPoint

    async def save(
        self,
        record: ExecutionRecord,
        *,
        outbox: Sequence[OutboxMessage] = (),
        reply: ReplyRecord | None = None,
    ) -> ExecutionRecord:
        stored = await super().save(record, outbox=outbox, reply=reply)
        if reply is not None:
            self.crash.hit("reply_committed")
        elif outbox:
            self.crash.hit("outbox_committed")
        return stored


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--bootstrap", required=True)
    p.add_argument("--database-url", required=True)
    p.add_argument("--suffix", required=True)
    p.add_argument("--name", default="orchestrator")
    p.add_argument("--first", type=int, default=0)
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--rate", type=float, default=0.0, help="sagas started per second (0: all at once)")
    p.add_argument("--lease", type=float, default=3.0)
    p.add_argument("--recovery-interval", type=float, default=0.5)
    p.add_argument("--go-file")
    p.add_argument("--log-level", default="INFO")
    return p.parse_args(argv)


async def start_all(manager: SagaManager, saga: Any, batch: list[Order], rate: float) -> int:
    """Start every order of ``batch`` once (by idempotency key); returns how many this process created."""
    storage = manager.storage
    created = 0
    pending: set[asyncio.Task[None]] = set()
    slots = asyncio.Semaphore(20)
    interval = 1.0 / rate if rate > 0 else 0.0
    next_at = time.monotonic()

    async def start(order: Order) -> None:
        async with slots:
            while True:
                try:
                    await manager.run(
                        saga,
                        order.context(),
                        user="chaos",
                        pause_on_disk=True,
                        raise_on_error=False,
                        idempotency_key=order.idempotency_key,
                    )
                    return
                except (StorageError, BrokerError, SagaError) as exc:
                    # The database or the broker is restarting, or a step's claim moved: the execution,
                    # if it was created, is in storage and recovery takes it from there; if not, the
                    # idempotency key makes the next try create it exactly once.
                    _log.warning("order %s: start failed (%s); trying again", order.number, exc)
                    await asyncio.sleep(0.5)

    for order in batch:
        try:
            existing = await storage.find_by_idempotency_key(order.idempotency_key)
        except StorageError:
            existing = None  # the start below retries until the database answers
        if existing is not None:
            continue
        if interval:
            delay = next_at - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            next_at = max(next_at, time.monotonic() - 1.0) + interval
        task = asyncio.create_task(start(order))
        pending.add(task)
        task.add_done_callback(pending.discard)
        created += 1
    while pending:
        await asyncio.gather(*list(pending))
    return created


def _exists(path: str) -> bool:
    return os.path.exists(path)


def build(args: argparse.Namespace, crash: common.CrashPoint, runs: common.StepRuns) -> SagaManager:
    names = Names(args.suffix)
    storage = CrashingStorage(args.database_url, auto_migrate=False, pool_size=10)
    storage.crash = crash

    def step_completed(event: SagaEvent) -> None:
        if event.step in REMOTE_STEPS:
            crash.hit("reply_applying")

    manager = SagaManager(
        storage,
        common.kafka_pool(args.bootstrap, f"{names.orchestrator}-{args.name}"),
        service_name=names.orchestrator,
        owner=f"{args.name}:{os.getpid()}",
        lease_seconds=args.lease,
        relay_interval=0.2,
        hooks=SagaHooks(
            on_step_completed=step_completed,
            on_compensation_started=lambda event: crash.hit("compensation_started"),
            on_compensation_completed=lambda event: crash.hit("compensation_completed"),
        ),
    )
    manager.register(order_saga(names, runs, crash))
    return manager


async def main() -> None:
    args = parse()
    common.setup_logging(args.name, args.log_level)
    crash = common.CrashPoint.from_env()
    runs = common.StepRuns(common.engine(args.database_url, 5))
    stats: dict[str, Any] = {"pid": os.getpid(), "crash": crash.point and f"{crash.point}:{crash.n}"}
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        while True:  # a service may be restarting just when this process starts
            manager = build(args, crash, runs)
            try:
                await manager.setup()
                break
            except (StorageError, BrokerError) as exc:
                _log.warning("setup failed (%s); retrying", exc)
                with contextlib.suppress(Exception):
                    await manager.destroy()
                await asyncio.sleep(1.0)
        saga = manager.registry.get("order", 1)
        recovery = SagaRecoveryWorker(
            manager,
            interval=args.recovery_interval,
            lease_seconds=args.lease,
            max_recovery_attempts=50,
            concurrency=10,
            retry_max=2.0,
        )
        await recovery.start()
        common.say("READY")
        if args.go_file:
            while not _exists(args.go_file) and not stop.is_set():  # noqa: ASYNC110 (a file, not an event)
                await asyncio.sleep(0.05)
        batch = orders(args.first + args.count)[args.first :]
        starting = asyncio.create_task(start_all(manager, saga, batch, args.rate))
        waiting = asyncio.create_task(stop.wait())
        await asyncio.wait({starting, waiting}, return_when=asyncio.FIRST_COMPLETED)
        if starting.done():
            stats["created"] = starting.result()
            common.say(f"STARTED {stats['created']}")
            await stop.wait()
        else:
            starting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await starting
        waiting.cancel()
        await recovery.stop(grace=10)
        stats["recovery"] = dataclasses.asdict(recovery.stats)
        if manager.consumer is not None:
            stats["consumer"] = dict(manager.consumer.stats)
        if manager.relay is not None:
            stats["relay"] = dict(manager.relay.stats)
        await manager.destroy()
    finally:
        await runs.engine.dispose()
        common.say("STATS " + orjson.dumps(stats).decode())


if __name__ == "__main__":
    asyncio.run(main())
