"""Recovery query latency: ``get_sagas_for_recovery(limit=100)`` with many executions stored.

Fills kafka-saga's own table (made by the storage's migrations) once with ``INSERT ... SELECT
generate_series``: mostly terminal executions, a slice still in flight or stalled, spread over 30 days
of ``updated_at``. A later run reuses the rows if the count and the distribution version match.
Then it calls the storage's ``get_sagas_for_recovery`` (the real code path, SQLAlchemy included) and
reports the latency, plus ``EXPLAIN (ANALYZE, BUFFERS)`` of the statement it runs.

Distribution per 1,000 rows (``i % 1000``): 0-969 finished, 970-984 errored, 985-989 dead_letter,
990-991 failed (recovery_attempts 0..6, so some exhausted), 992-994 running, 995 compensating,
996-998 paused with a future reply deadline, 999 paused with an overdue one.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import sys
import time

from sqlalchemy import text

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import _proto

from storage import SqlAlchemySagaStorage

DIST_VERSION = "1"
FILL = """
INSERT INTO saga_executions (id, name, definition_version, status, state, steps, version, recovery_attempts,
                             reply_deadline, created_at, updated_at)
SELECT md5(i::text)::uuid,
       'order',
       1,
       CASE WHEN i % 1000 < 970 THEN 'finished'
            WHEN i % 1000 < 985 THEN 'errored'
            WHEN i % 1000 < 990 THEN 'dead_letter'
            WHEN i % 1000 < 992 THEN 'failed'
            WHEN i % 1000 < 995 THEN 'running'
            WHEN i % 1000 < 996 THEN 'compensating'
            ELSE 'paused' END,
       '\\x7b7d'::bytea,
       '[]'::jsonb,
       4,
       CASE WHEN i % 1000 BETWEEN 990 AND 991 THEN (i / 1000) % 7 ELSE 0 END,
       CASE WHEN i % 1000 BETWEEN 996 AND 998 THEN now() + interval '1 hour'
            WHEN i % 1000 = 999 THEN now() - interval '1 minute' END,
       now() - (i::double precision / :rows) * interval '30 days' - interval '1 minute',
       now() - (i::double precision / :rows) * interval '30 days'
FROM generate_series(1, :rows) AS i
"""


async def main() -> None:
    cfg = _proto.config()
    rows, calls, limit = int(cfg["rows"]), int(cfg["calls"]), int(cfg.get("limit", 100))
    url = cfg["dsn"].replace("postgresql://", "postgresql+asyncpg://")
    storage = SqlAlchemySagaStorage(url, pool_size=2)
    await storage.start()
    engine = storage.engine
    marker = f"{rows}:{DIST_VERSION}"
    async with engine.begin() as con:
        await con.execute(text("CREATE TABLE IF NOT EXISTS bench_meta (k text PRIMARY KEY, v text)"))
        have = (await con.execute(text("SELECT v FROM bench_meta WHERE k = 'recovery_rows'"))).scalar()
    filled_s = None
    if have != marker:
        t0 = time.perf_counter()
        async with engine.begin() as con:
            await con.execute(text("TRUNCATE saga_executions"))
            await con.execute(text(FILL), {"rows": rows})
            await con.execute(
                text(
                    "INSERT INTO bench_meta VALUES ('recovery_rows', :m) "
                    "ON CONFLICT (k) DO UPDATE SET v = excluded.v"
                ),
                {"m": marker},
            )
        async with engine.connect() as con:
            await (await con.execution_options(isolation_level="AUTOCOMMIT")).execute(
                text("VACUUM ANALYZE saga_executions")
            )
        filled_s = round(time.perf_counter() - t0, 1)
    async with engine.connect() as con:
        count = (await con.execute(text("SELECT count(*) FROM saga_executions"))).scalar()
        candidates = (
            await con.execute(
                text(
                    "SELECT count(*) FROM saga_executions "
                    "WHERE (status IN ('running', 'compensating', 'failed') "
                    "OR (status = 'paused' AND reply_deadline < now())) AND recovery_attempts < 5"
                )
            )
        ).scalar()

    # The plan of the statement the storage runs, with the same parameters.
    from storage.sql.statements import recovery_params

    flt, params = recovery_params(
        storage._clock, limit=limit, max_recovery_attempts=5, stale_after_seconds=None, saga_name=None
    )
    compiled = storage._s.recovery_ids(flt).compile(dialect=engine.dialect)
    sql = compiled.string
    bound = compiled.construct_params(params)
    raw = await engine.raw_connection()
    try:
        adapted = raw.driver_connection
        positional = [bound[name] for name in compiled.positiontup]
        plan_rows = await adapted.fetch("EXPLAIN (ANALYZE, BUFFERS) " + sql, *positional)
        plan = [r[0] for r in plan_rows]
    finally:
        raw.close()

    for _ in range(20):  # warm-up: statement cache, buffers
        await storage.get_sagas_for_recovery(limit=limit)
    for r in range(int(cfg.get("runs", 3))):
        _proto.emit({"event": "ready", "run": r})
        await _proto.await_go()
        lat = []
        got = 0
        c0 = time.process_time()
        for _ in range(calls):
            t0 = time.perf_counter()
            ids = await storage.get_sagas_for_recovery(limit=limit)
            lat.append((time.perf_counter() - t0) * 1e3)
            got = len(ids)
        cpu = time.process_time() - c0
        _proto.emit(
            {
                "event": "done",
                "run": r,
                "result": {
                    "rows": count,
                    "candidates": candidates,
                    "returned": got,
                    "calls": calls,
                    "sagas": calls,
                    "p50_ms": round(statistics.median(lat), 3),
                    "p99_ms": round(_proto.percentile(lat, 99), 3),
                    "mean_ms": round(statistics.fmean(lat), 3),
                    "client_cpu_ms_per_call": round(cpu / calls * 1e3, 3),
                },
            }
        )
    await storage.stop()
    _proto.emit({"event": "end", "info": {"plan": plan, "sql": sql, "filled_s": filled_s}})


asyncio.run(main())
