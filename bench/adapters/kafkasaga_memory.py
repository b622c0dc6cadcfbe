"""Memory: RSS growth per 10,000 in-flight sagas waiting in memory for a reply.

A saga with one remote step, on `MemorySagaStorage` and `InMemoryBrokerPool` with no participant, so
every ``run(..., pause_on_disk=False)`` stays waiting. RSS is read (``/proc/self/statm``) after a
warm-up and a ``gc.collect()``, then again once all ``sagas`` executions are PAUSED. The growth counts
everything a waiting saga costs this process: its coroutine and future, the stored execution and the
command held by the in-memory broker.
"""

from __future__ import annotations

import asyncio
import gc
import os
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import _proto

from broker import InMemoryBrokerPool
from storage import MemorySagaStorage, SagaStatus

try:
    from saga import Saga, SagaManager, SagaRequest
except ImportError:
    from saga import SagaRequest
    from saga.definitions import Saga
    from saga.manager import SagaManager


def request(ctx: Any) -> SagaRequest:
    return SagaRequest("benchReserve", {"order_id": ctx["order_id"], "items": [1, 2, 3]})


def success(ctx: Any, response: Any) -> Any:
    ctx["reserved"] = response.content
    return ctx


async def main() -> None:
    cfg = _proto.config()
    n = int(cfg["sagas"])
    storage = MemorySagaStorage()
    manager = SagaManager(
        storage, broker_pool=InMemoryBrokerPool(), consume_replies=False, relay_outbox=False
    )
    saga = Saga("waiting_order").remote_step(request).on_success(success).local_step(lambda c: c).commit()
    await manager.setup()
    manager.register(saga)

    async def paused() -> int:
        return (await storage.count_by_status()).get(SagaStatus.PAUSED, 0)

    # Warm-up: code paths, caches and allocator arenas, then drop what it made.
    warm = [asyncio.create_task(manager.run(saga, {"order_id": -i})) for i in range(1, 201)]
    while await paused() < len(warm):  # noqa: ASYNC110 (polling the storage is the point)
        await asyncio.sleep(0.01)
    results = []
    for r in range(int(cfg.get("runs", 1))):
        _proto.emit({"event": "ready", "run": r})
        await _proto.await_go()
        gc.collect()
        before = _proto.rss_bytes()
        base = await paused()
        t0 = time.perf_counter()
        tasks = [asyncio.create_task(manager.run(saga, {"order_id": r * n + i})) for i in range(n)]
        while await paused() < base + n:  # noqa: ASYNC110
            await asyncio.sleep(0.02)
        started_s = time.perf_counter() - t0
        await asyncio.sleep(0.2)
        gc.collect()
        after = _proto.rss_bytes()
        growth = after - before
        res = {
            "sagas": n,
            "rss_before_mib": round(before / 2**20, 1),
            "rss_after_mib": round(after / 2**20, 1),
            "rss_growth_mib": round(growth / 2**20, 2),
            "rss_mib_per_10k": round(growth / 2**20 / n * 10_000, 2),
            "kib_per_saga": round(growth / 1024 / n, 2),
            "start_all_s": round(started_s, 3),
        }
        results.append(tasks)
        _proto.emit({"event": "done", "run": r, "result": res})
    for tasks in [warm, *results]:
        for t in tasks:
            t.cancel()
    await asyncio.gather(*warm, *(t for ts in results for t in ts), return_exceptions=True)
    await manager.destroy()
    _proto.emit({"event": "end"})


asyncio.run(main())
