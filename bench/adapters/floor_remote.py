"""Floor for remote steps: a raw aiokafka request/reply ping-pong plus two asyncpg commits per hop.

A saga is one INSERT, then three hops. A hop: UPDATE the saga row (the command is about to go out:
autocommit, durable), send the command (idempotent producer, acks=all) and wait for the reply that an
in-process participant sends back on the reply topic, then UPDATE the row with the result (durable).
Latency per remote step runs from the first UPDATE's start to the second UPDATE's end.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
import uuid
from typing import Any

import asyncpg
import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import _proto

DDL = """
CREATE TABLE IF NOT EXISTS floor_remote_saga (
    id uuid PRIMARY KEY,
    status text NOT NULL,
    step int NOT NULL,
    request_id uuid,
    context jsonb NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
)
"""
INS = "INSERT INTO floor_remote_saga (id, status, step, context) VALUES ($1, 'RUNNING', 0, '{}')"
SENT = (
    "UPDATE floor_remote_saga SET status = 'PAUSED', step = $2, request_id = $3, updated_at = now() "
    "WHERE id = $1"
)
GOT = (
    "UPDATE floor_remote_saga SET status = $2, context = $3, request_id = NULL, updated_at = now() "
    "WHERE id = $1"
)
PARTITIONS = 4  # as many as kafka-saga's pool gives the topics it creates


async def main() -> None:
    cfg = _proto.config()
    inflight, n, runs, steps = int(cfg["inflight"]), int(cfg["n"]), int(cfg.get("runs", 3)), int(cfg["steps"])
    bootstrap = cfg["kafka"]
    tag = uuid.uuid4().hex[:8]
    cmd_topic, reply_topic = f"bench-floor-cmd-{tag}", f"bench-floor-reply-{tag}"
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    await admin.create_topics([NewTopic(cmd_topic, PARTITIONS, 1), NewTopic(reply_topic, PARTITIONS, 1)])

    conns: asyncio.Queue[Any] = asyncio.Queue()
    for _ in range(min(inflight, 20)):
        conns.put_nowait(await asyncpg.connect(cfg["dsn"]))
    c = await conns.get()
    await c.execute(DDL)
    conns.put_nowait(c)

    prod_kw = {"bootstrap_servers": bootstrap, "acks": "all", "enable_idempotence": True, "linger_ms": 0}
    orch_prod = AIOKafkaProducer(**prod_kw)
    part_prod = AIOKafkaProducer(**prod_kw)
    cons_kw = {"bootstrap_servers": bootstrap, "auto_offset_reset": "earliest", "enable_auto_commit": True}
    part_cons = AIOKafkaConsumer(cmd_topic, group_id=f"floor-participant-{tag}", **cons_kw)
    orch_cons = AIOKafkaConsumer(reply_topic, group_id=f"floor-orchestrator-{tag}", **cons_kw)
    for x in (orch_prod, part_prod, part_cons, orch_cons):
        await x.start()

    waiting: dict[bytes, asyncio.Future[dict[str, Any]]] = {}

    async def participant() -> None:
        async for msg in part_cons:
            body = orjson.loads(msg.value)
            reply = orjson.dumps(
                {"request_id": body["request_id"], "status": 200, "content": {"ok": body["step"]}}
            )
            await part_prod.send(reply_topic, reply, key=msg.key)

    async def replies() -> None:
        async for msg in orch_cons:
            body = orjson.loads(msg.value)
            fut = waiting.pop(body["request_id"].encode(), None)
            if fut is not None and not fut.done():
                fut.set_result(body)

    tasks = [asyncio.create_task(participant()), asyncio.create_task(replies())]
    latencies: list[float] = []

    async def one(i: int) -> None:
        sid = uuid.uuid4()
        key = sid.bytes
        ctx: dict[str, Any] = {}
        con = await conns.get()
        try:
            await con.execute(INS, sid)
        finally:
            conns.put_nowait(con)
        loop = asyncio.get_running_loop()
        for k in range(1, steps + 1):
            t0 = time.perf_counter()
            rid = uuid.uuid4()
            con = await conns.get()
            try:
                await con.execute(SENT, sid, k, rid)
            finally:
                conns.put_nowait(con)
            fut: asyncio.Future[dict[str, Any]] = loop.create_future()
            waiting[str(rid).encode()] = fut
            await orch_prod.send_and_wait(
                cmd_topic, orjson.dumps({"request_id": str(rid), "step": k}), key=key
            )
            reply = await fut
            ctx[f"s{k}"] = reply["content"]["ok"]
            con = await conns.get()
            try:
                await con.execute(
                    GOT, sid, "FINISHED" if k == steps else "RUNNING", orjson.dumps(ctx).decode()
                )
            finally:
                conns.put_nowait(con)
            latencies.append(time.perf_counter() - t0)

    await _proto.drive_async(min(inflight, 50), min(inflight, 50), one)  # warm-up (consumers assigned)
    _proto.freeze_heap()
    for r in range(runs):
        latencies.clear()
        _proto.emit({"event": "ready", "run": r})
        await _proto.await_go()
        wall, cpu = await _proto.drive_async(n, inflight, one)
        us = [x * 1e6 for x in latencies]
        _proto.emit(
            {
                "event": "done",
                "run": r,
                "result": {
                    "sagas": n,
                    "inflight": inflight,
                    "steps": len(us),
                    "wall_s": round(wall, 4),
                    "steps_per_s": round(len(us) / wall, 1),
                    "sagas_per_s": round(n / wall, 1),
                    "step_p50_us": round(_proto.percentile(us, 50)),
                    "step_p99_us": round(_proto.percentile(us, 99)),
                    "step_mean_us": round(sum(us) / len(us)),
                    "client_cpu_us_per_step": round(cpu / len(us) * 1e6, 1),
                },
            }
        )
    for t in tasks:
        t.cancel()
    for x in (orch_cons, part_cons, orch_prod, part_prod):
        await x.stop()
    await admin.delete_topics([cmd_topic, reply_topic])
    await admin.close()
    while not conns.empty():
        await (conns.get_nowait()).close()
    _proto.emit({"event": "end"})


asyncio.run(main())
