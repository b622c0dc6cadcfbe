"""Floor: the 3-local-step saga written by hand on asyncpg, autocommit.

Happy path: 1 INSERT + 4 UPDATEs (one per completed step, one for the final status), each its own
durable autocommit transaction, so every completed step is on disk before the next starts.
Fail path (step 3 raises): INSERT, 2 step UPDATEs, UPDATE to COMPENSATING, one UPDATE per compensated
step, UPDATE to ERRORED.
"""

from __future__ import annotations

import asyncio
import os
import sys
import uuid

import asyncpg
import orjson

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import _proto

DDL = """
CREATE TABLE IF NOT EXISTS floor_saga (
    id uuid PRIMARY KEY,
    name text NOT NULL,
    status text NOT NULL,
    step int NOT NULL,
    context jsonb NOT NULL,
    error text,
    updated_at timestamptz NOT NULL DEFAULT now()
)
"""
INS = "INSERT INTO floor_saga (id, name, status, step, context) VALUES ($1, 'order', 'RUNNING', 0, $2)"
UPD = "UPDATE floor_saga SET step = $2, context = $3, updated_at = now() WHERE id = $1"
STAT = "UPDATE floor_saga SET status = $2, error = $3, updated_at = now() WHERE id = $1"


async def main() -> None:
    cfg = _proto.config()
    conc = int(cfg.get("concurrency", 1))
    fail = cfg["scenario"] == "fail"
    # One connection per concurrent saga, handed out from a free list: an asyncpg pool would add its
    # reset query (RESET ALL, UNLISTEN *, ...) on every release, which is not part of the floor.
    conns = [await asyncpg.connect(cfg["dsn"]) for _ in range(min(conc, 50))]
    await conns[0].execute(DDL)

    async def one(i: int) -> None:
        sid = uuid.uuid4()
        ctx: dict[str, int] = {}
        con = conns.pop()
        try:
            await con.execute(INS, sid, "{}")
            done = 0
            try:
                for k in (1, 2, 3):
                    if fail and k == 3:
                        raise _proto.StepFailed("step 3")
                    ctx[f"s{k}"] = i
                    await con.execute(UPD, sid, k, orjson.dumps(ctx).decode())
                    done = k
                await con.execute(STAT, sid, "FINISHED", None)
            except _proto.StepFailed as e:
                await con.execute(STAT, sid, "COMPENSATING", str(e))
                for k in range(done, 0, -1):
                    ctx.pop(f"s{k}")
                    await con.execute(UPD, sid, k - 1, orjson.dumps(ctx).decode())
                await con.execute(STAT, sid, "ERRORED", "step 3")
        finally:
            conns.append(con)

    await _proto.run_local_async(cfg, one)
    for con in conns:
        await con.close()


asyncio.run(main())
