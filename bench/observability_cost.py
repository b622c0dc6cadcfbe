"""What metrics and tracing cost per saga when on, and that they cost nothing measurable when off.

``python bench/observability_cost.py [--sagas 3000] [--runs 5]``: in-memory storage and broker, a saga of
three local steps, run one after the other; sagas per second (median of ``--runs``) with observability
off, with `SagaMetrics` hooks, and with tracing on (OpenTelemetry SDK, spans kept in memory). Figures in
bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from broker import InMemoryBrokerPool
from saga import Saga, SagaContext, SagaManager
from saga.observability import SagaMetrics, tracing
from storage import MemorySagaStorage


def _step(ctx: SagaContext) -> None:
    ctx["n"] = ctx.get("n", 0) + 1


SAGA = (
    Saga("cost").local_step(_step, name="a").local_step(_step, name="b").local_step(_step, name="c").commit()
)


async def _rate(sagas: int, hooks: object) -> float:
    manager = SagaManager(
        MemorySagaStorage(), InMemoryBrokerPool(), consume_replies=False, relay_outbox=False, hooks=hooks
    )
    async with manager:
        for _ in range(100):
            await manager.run(SAGA)
        start = time.perf_counter()
        for _ in range(sagas):
            await manager.run(SAGA)
        return sagas / (time.perf_counter() - start)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sagas", type=int, default=3000)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    results: dict[str, list[float]] = {"off": [], "metrics": [], "tracing": []}
    for _ in range(args.runs):
        results["off"].append(asyncio.run(_rate(args.sagas, None)))
        results["metrics"].append(asyncio.run(_rate(args.sagas, SagaMetrics().hooks())))
        provider = TracerProvider()
        exporter = InMemorySpanExporter()
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        tracing.enable_tracing(provider)
        results["tracing"].append(asyncio.run(_rate(args.sagas, None)))
        tracing.disable_tracing()
        exporter.clear()
    base = statistics.median(results["off"])
    print("| observability | sagas/s (median) | µs per saga | ratio to off |")
    print("|---|---:|---:|---:|")
    for name, rates in results.items():
        rate = statistics.median(rates)
        print(f"| {name} | {rate:,.0f} | {1e6 / rate:.0f} | {rate / base:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
