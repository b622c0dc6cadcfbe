"""Adapter side of the benchmark protocol (standard library only: peers' venvs import it too).

Every scenario runs in a subprocess: ``python bench/adapters/<lib>.py '<json config>'``. The subprocess
sets itself up (schema, warm-up), then for each measured run:

    adapter -> driver   {"event": "ready", "run": i}
    driver  -> adapter  "go"            (the driver has reset pg_stat_statements for the database)
    adapter -> driver   {"event": "done", "run": i, "result": {...}}

and finally ``{"event": "end"}``. Anything else the adapter prints goes to stderr. The driver never
imports an adapter, so each library runs with its own interpreter and dependencies.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

_OUT = sys.stdout


def config() -> dict[str, Any]:
    """The JSON config the driver passed as argv[1] (or {} for a manual run)."""
    # Everything the library prints must not corrupt the protocol: point sys.stdout at stderr.
    sys.stdout = sys.stderr
    return json.loads(sys.argv[1]) if len(sys.argv) > 1 else {}


def emit(obj: dict[str, Any]) -> None:
    _OUT.write(json.dumps(obj, default=str) + "\n")
    _OUT.flush()


def wait_go() -> None:
    if os.environ.get("BENCH_AUTOGO"):  # standalone run (profiling): no driver to say "go"
        return
    line = sys.stdin.readline()
    if line.strip() != "go":
        raise SystemExit(f"driver said {line!r}, expected 'go'")


async def await_go() -> None:
    await asyncio.get_running_loop().run_in_executor(None, wait_go)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    s = sorted(values)
    k = max(0, min(len(s) - 1, round(q / 100.0 * len(s) + 0.5) - 1))
    return s[k]


def throughput_result(n: int, wall: float, cpu: float, **extra: Any) -> dict[str, Any]:
    return {
        "sagas": n,
        "wall_s": round(wall, 6),
        "sagas_per_s": round(n / wall, 2),
        "us_per_saga": round(wall / n * 1e6, 1),
        "client_cpu_us_per_saga": round(cpu / n * 1e6, 1),
        **extra,
    }


def freeze_heap() -> None:
    """Take the adapter's set-up heap out of garbage collection, after its warm-up and before measuring.

    Every adapter does this alike, as a long-running service would (kafka-saga's worker does it after its
    setup, `saga.heap.freeze_startup_heap`): full collections otherwise walk every object the imports and
    the set-up created, over and over (0.07-0.08 s each, about 1 s per 15,000 remote steps for kafka-saga,
    whose process holds ~110,000 of them; the asyncpg floor's process triggers almost none).
    """
    gc.collect()
    gc.freeze()


async def drive_async(
    n: int,
    concurrency: int,
    one: Callable[[int], Awaitable[Any]],
) -> tuple[float, float]:
    """Run ``one(i)`` for i in range(n), ``concurrency`` at once; return (wall s, process CPU s)."""
    t0, c0 = time.perf_counter(), time.process_time()
    if concurrency <= 1:
        for i in range(n):
            await one(i)
    else:
        counter = iter(range(n))

        async def worker() -> None:
            for i in counter:
                await one(i)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.perf_counter() - t0, time.process_time() - c0


async def run_local_async(
    cfg: dict[str, Any],
    one: Callable[[int], Awaitable[Any]],
    *,
    check: Callable[[], Awaitable[dict[str, Any]]] | None = None,
) -> None:
    """The standard local-saga loop: warm-up, then ``cfg['runs']`` measured runs of ``cfg['n']`` sagas."""
    n, conc, runs = int(cfg["n"]), int(cfg.get("concurrency", 1)), int(cfg.get("runs", 3))
    warm = int(cfg.get("warmup", min(100, max(5, n // 10))))
    base = 0
    await drive_async(warm, min(conc, max(1, warm)), one)
    base += warm
    freeze_heap()
    for r in range(runs):
        emit({"event": "ready", "run": r})
        await await_go()
        wall, cpu = await drive_async(n, conc, lambda i, b=base: one(b + i))
        base += n
        extra = await check() if check else {}
        emit({"event": "done", "run": r, "result": throughput_result(n, wall, cpu, **extra)})
    emit({"event": "end"})


class StepFailed(Exception):
    """Raised by step 3 in the 'fail' scenario."""
