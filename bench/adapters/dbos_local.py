"""DBOS Transact 3.x: the 'order' saga as a workflow of three ``@DBOS.step()``s.

The system database is our PostgreSQL (database bench_dbos). DBOS records the workflow's status
when it starts and each step's output in the system database before the workflow goes on, so each
completed step is durable before the next one starts. DBOS has no compensation primitive: the
workflow catches step 3's error and runs the compensating steps (themselves steps) in reverse.

``cfg["api"]``: "async" (async workflow and steps awaited on one event loop, the default) or "sync"
(plain functions, one thread per saga in flight, as in DBOS's threaded examples).
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from dbos import DBOS, DBOSConfig

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import _proto

FAIL = False


# ---- async API
@DBOS.step()
async def a_step1(ctx: dict[str, Any], i: int) -> dict[str, Any]:
    return {**ctx, "s1": i}


@DBOS.step()
async def a_step2(ctx: dict[str, Any], i: int) -> dict[str, Any]:
    return {**ctx, "s2": i}


@DBOS.step()
async def a_step3(ctx: dict[str, Any], i: int) -> dict[str, Any]:
    if FAIL:
        raise _proto.StepFailed("step 3")
    return {**ctx, "s3": i}


@DBOS.step()
async def a_undo(ctx: dict[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in ctx.items() if k != key}


@DBOS.workflow()
async def a_order(i: int) -> dict[str, Any]:
    ctx: dict[str, Any] = {}
    ctx = await a_step1(ctx, i)
    ctx = await a_step2(ctx, i)
    try:
        ctx = await a_step3(ctx, i)
    except _proto.StepFailed:
        ctx = await a_undo(ctx, "s2")
        ctx = await a_undo(ctx, "s1")
    return ctx


# ---- sync API
@DBOS.step()
def s_step1(ctx: dict[str, Any], i: int) -> dict[str, Any]:
    return {**ctx, "s1": i}


@DBOS.step()
def s_step2(ctx: dict[str, Any], i: int) -> dict[str, Any]:
    return {**ctx, "s2": i}


@DBOS.step()
def s_step3(ctx: dict[str, Any], i: int) -> dict[str, Any]:
    if FAIL:
        raise _proto.StepFailed("step 3")
    return {**ctx, "s3": i}


@DBOS.step()
def s_undo(ctx: dict[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in ctx.items() if k != key}


@DBOS.workflow()
def s_order(i: int) -> dict[str, Any]:
    ctx: dict[str, Any] = {}
    ctx = s_step1(ctx, i)
    ctx = s_step2(ctx, i)
    try:
        ctx = s_step3(ctx, i)
    except _proto.StepFailed:
        ctx = s_undo(ctx, "s2")
        ctx = s_undo(ctx, "s1")
    return ctx


def check(ctx: dict[str, Any]) -> None:
    assert len(ctx) == (0 if FAIL else 3), ctx


def run_sync(cfg: dict[str, Any]) -> None:
    n, conc, runs = int(cfg["n"]), int(cfg.get("concurrency", 1)), int(cfg.get("runs", 3))
    warm = int(cfg.get("warmup", min(100, max(5, n // 10))))
    pool = ThreadPoolExecutor(max_workers=conc) if conc > 1 else None

    def batch(start: int, count: int) -> tuple[float, float]:
        t0, c0 = time.perf_counter(), time.process_time()
        if pool is None:
            for i in range(start, start + count):
                check(s_order(i))
        else:
            for ctx in pool.map(s_order, range(start, start + count)):
                check(ctx)
        return time.perf_counter() - t0, time.process_time() - c0

    base = warm
    batch(0, warm)
    _proto.freeze_heap()
    for r in range(runs):
        _proto.emit({"event": "ready", "run": r})
        _proto.wait_go()
        wall, cpu = batch(base, n)
        base += n
        _proto.emit({"event": "done", "run": r, "result": _proto.throughput_result(n, wall, cpu, api="sync")})


async def run_async(cfg: dict[str, Any]) -> None:
    async def one(i: int) -> None:
        check(await a_order(i))

    await _proto.run_local_async(cfg, one)


def main() -> None:
    global FAIL
    cfg = _proto.config()
    FAIL = cfg["scenario"] == "fail"
    conc = int(cfg.get("concurrency", 1))
    api = cfg.get("api", "async")
    config: DBOSConfig = {
        "name": "bench-order",
        "system_database_url": cfg["dsn"],
        "sys_db_pool_size": max(20, min(conc, 50) + 10),
        "log_level": "WARNING",
    }
    DBOS(config=config)
    DBOS.launch()
    try:
        if api == "sync":
            run_sync(cfg)
            _proto.emit({"event": "end", "info": {"api": "sync"}})
        else:
            asyncio.run(run_async(cfg))
    finally:
        DBOS.destroy()


main()
