"""``kafka-saga demo``: run the demo batch with a live progress display and a summary table."""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import TextIO

from saga.cli.app import configure_logging, resolve_config
from saga.cli.output import render_table
from saga.config import SagaConfig
from saga.demo.order import ORDER_SAGA_NAME

__all__ = ["describe_setup", "run_demo"]


def describe_setup(config: SagaConfig) -> str:
    """``in-memory broker, storage sqlite+aiosqlite:///...`` with any password hidden."""
    if config.broker.type == "kafka":
        broker = f"Kafka at {config.broker.kafka.bootstrap_servers}"
    else:
        broker = "in-memory broker"
    return f"{broker}, storage {config.storage.safe_url}"


class ProgressDisplay:
    """One line rewritten in place on a terminal; a line per finished order otherwise."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.live = stream.isatty()
        self._width = 0

    def __call__(self, progress: object) -> None:
        from saga.demo.runner import DemoProgress

        assert isinstance(progress, DemoProgress)
        if self.live:
            line = (
                f"[{progress.phase}] {progress.done}/{progress.total} done · {progress.finished} finished · "
                f"{progress.errored} errored · {progress.crashed} crashed · {progress.recovered} recovered · "
                f"{progress.elapsed:.1f}s"
            )
            self.stream.write("\r" + line.ljust(self._width))
            self._width = len(line)
            if progress.phase == "done":
                self.stream.write("\n")
            self.stream.flush()
            return
        last = progress.last
        if last is None:
            if progress.phase == "recovering" and progress.crashed:
                print(f"recovering {progress.crashed} crashed execution(s) ...", file=self.stream, flush=True)
            return
        width = len(str(progress.total))
        status = last.status.value.upper() if last.status is not None else "?"
        if last.recovered:
            what = f"recovered, now {status}"
        elif last.crashed:
            what = f"CRASHED (simulated), left {status} in storage"
        elif last.error:
            what = f"{status}: {last.error}; compensated"
        else:
            what = status
        print(
            f"[{progress.done:>{width}}/{progress.total}] {last.plan.order_id}  {what}",
            file=self.stream,
            flush=True,
        )


def run_demo(args: argparse.Namespace) -> int:
    """``kafka-saga demo``: exit 0 only when every saga reached its expected status."""
    from saga.config import build_manager
    from saga.demo.runner import run_demo as run

    config = resolve_config(args.config)
    build_manager(config)  # surfaces configuration errors before anything is written
    configure_logging(config.logging)
    progress = ProgressDisplay(sys.stderr)
    print(
        f"kafka-saga demo: {args.orders} orders through saga {ORDER_SAGA_NAME!r} "
        f"({describe_setup(config)}; config {config.source})",
        flush=True,
    )
    report = asyncio.run(
        run(
            config,
            orders=args.orders,
            concurrency=args.concurrency,
            crash=not args.no_crash,
            time_limit=args.timeout,
            on_progress=progress,
        )
    )
    print()
    rows = []
    notes = {
        "finished": "FINISHED",
        "errored": "ERRORED (card declined: stock released, order cancelled)",
        "recovered": "FINISHED after a simulated crash, resumed by recover_saga",
    }
    for expectation in ("finished", "errored", "recovered"):
        expected = report.count(expectation, actual=False)
        if expected or expectation != "recovered":
            reached = report.count(expectation, actual=True)
            mark = "ok" if reached == expected else "MISSED"
            rows.append((expectation, expected, reached, mark, notes[expectation]))
    total = len(report.results)
    reached_total = sum(1 for r in report.results if r.ok)
    rows.append(("total", total, reached_total, "ok" if reached_total == total else "MISSED", ""))
    print(render_table(("OUTCOME", "EXPECTED", "REACHED", "", "EXPECTED STATUS"), rows))
    print()
    statuses = report.statuses()
    print(
        "statuses in storage: "
        + (", ".join(f"{s.value.upper()} {n}" for s, n in sorted(statuses.items())) or "none")
    )
    ledger = report.ledger
    print(
        f"participants: {len(ledger.reserved)} stock reservations ({len(ledger.released)} released), "
        f"{len(ledger.charged)} charges ({len(ledger.declined)} declined, {len(ledger.refunded)} refunded), "
        f"{len(ledger.shipped)} shipments"
    )
    crashed = [r for r in report.results if r.crashed]
    for r in crashed:
        before = r.status_after_crash.value.upper() if r.status_after_crash else "?"
        after = r.status.value.upper() if r.status else "?"
        print(
            f"crashed: {r.plan.order_id} (execution {r.execution_id}): {before} after the crash, "
            f"{after} after recovery"
        )
    errored = next((r for r in report.results if r.plan.expected == "errored" and r.execution_id), None)
    if errored is not None and errored.execution_id is not None:
        where = f" --config {args.config}" if args.config else ""
        print(f"see a compensated one: kafka-saga show {errored.execution_id}{where}")
    rate = total / report.elapsed if report.elapsed > 0 else 0.0
    if report.ok:
        print(
            f"result: OK, all {total} sagas reached their expected status "
            f"in {report.elapsed:.2f}s ({rate:.0f} sagas/s)"
        )
        return 0
    print(f"result: FAILED, {len(report.problems)} problem(s) in {report.elapsed:.2f}s:")
    for problem in report.problems:
        print(f"  - {problem}")
    return 1
