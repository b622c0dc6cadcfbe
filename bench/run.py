#!/usr/bin/env python3
"""kafka-saga benchmark driver.

    python bench/run.py [--quick] [--only FILTER,...] [--out bench/results] [--runs N] [--list]

Sets up the peers' virtualenvs (bench/.venvs/, from the package index with pip), makes sure the
services answer (scripts/services.sh start otherwise), then runs every selected benchmark, each in a
subprocess of the right interpreter (a peer's venv python, or this python for kafka-saga and the
floors). Writes bench/results/raw-<stamp>.json always, and results.json + results.md for a full run
(no --quick, no --only); a partial run writes partial-<stamp>.md next to its raw JSON.

A FILTER is one or more of an entry's tags joined by ':' (group, library, storage, scenario), e.g.
``--only local:kafka-saga``, ``--only postgres:seq,remote``, ``--only memory-rss``. ``--list`` prints
the entries the filters select.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
VENVS = BENCH / ".venvs"
ADAPTERS = BENCH / "adapters"
sys.path.insert(0, str(BENCH))

import report  # noqa: E402
import setup_peers  # noqa: E402

PG_HOST = os.environ.get("BENCH_PG_HOST", "127.0.0.1")
PG_PORT = int(os.environ.get("BENCH_PG_PORT", "15432"))
PG_USER = os.environ.get("BENCH_PG_USER", "saga")
PG_PASSWORD = os.environ.get("BENCH_PG_PASSWORD", "saga")
PG_ADMIN_DB = os.environ.get("BENCH_PG_ADMIN_DB", "saga_test")
KAFKA = os.environ.get("BENCH_KAFKA", "127.0.0.1:19092")
# Seconds for idle backends' transaction counters to reach pg_stat_database (see run_entry).
STATS_WAIT = float(os.environ.get("BENCH_STATS_WAIT", "10.5"))


def dsn(db: str, driver: str = "postgresql") -> str:
    return f"{driver}://{PG_USER}:{PG_PASSWORD}@{PG_HOST}:{PG_PORT}/{db}"


@dataclass
class Entry:
    name: str
    group: str  # local | remote | recovery | memory-rss
    lib: str  # kafka-saga | python-cqrs | dbos | minos | floor
    storage: str  # memory | postgres | lmdb | kafka+postgres
    scenario: str  # seq | conc50 | fail | inflight1 | ... | recovery | rss
    adapter: str
    python: str  # "project" or a venv name
    db: str | None
    cfg: dict[str, Any] = field(default_factory=dict)
    fresh_db: bool = True
    timeout: float = 1800.0

    @property
    def tags(self) -> set[str]:
        return {self.group, self.lib, self.storage, self.scenario, self.name}


LOCAL_SCENARIOS = {
    # name: (sagas full, sagas quick, sagas in flight)
    "seq": (2000, 20, 1),
    "conc50": (2000, 100, 50),
    "fail": (1000, 10, 1),
}
REMOTE_INFLIGHT = {1: (300, 10), 50: (2000, 100), 500: (5000, 500)}
#: Participant throughput: commands handled per run, full and quick, by commands in flight.
PARTICIPANT_INFLIGHT = {1: (1000, 10), 50: (4000, 100), 500: (5000, 500)}

LIB_DB = {
    "kafka-saga": "bench_saga",
    "python-cqrs": "bench_cqrs",
    "dbos": "bench_dbos",
    "dbos-sync": "bench_dbos",
    "minos": "bench_minos",
    "floor": "bench_floor",
    "participant": "bench_participant",
}


def build_entries(quick: bool) -> list[Entry]:
    q = 1 if quick else 0
    out: list[Entry] = []
    local_libs = [
        # lib, storages, adapter, python
        ("kafka-saga", ["memory", "postgres"], "kafkasaga_local.py", "project"),
        ("python-cqrs", ["memory", "postgres"], "cqrs_local.py", "cqrs"),
        # DBOS has two APIs: async workflows on the event loop, and sync ones on threads.
        ("dbos", ["postgres"], "dbos_local.py", "dbos"),
        ("dbos-sync", ["postgres"], "dbos_local.py", "dbos"),
        # Minos 0.7 has no PostgreSQL saga repository: LMDB is its durable storage.
        ("minos", ["memory", "lmdb"], "minos_local.py", "minos"),
        ("floor", ["postgres"], "floor_local.py", "project"),
    ]
    for lib, storages, adapter, py in local_libs:
        for storage in storages:
            for scen, (n_full, n_quick, conc) in LOCAL_SCENARIOS.items():
                db = LIB_DB[lib] if storage == "postgres" else None
                out.append(
                    Entry(
                        name=f"local:{lib}:{storage}:{scen}",
                        group="local",
                        lib=lib,
                        storage=storage,
                        scenario=scen,
                        adapter=adapter,
                        python=py,
                        db=db,
                        cfg={
                            "scenario": scen,
                            "storage": storage,
                            "n": n_quick if q else n_full,
                            "concurrency": conc,
                            "warmup": 3 if q else None,
                            "api": "sync" if lib == "dbos-sync" else None,
                        },
                    )
                )
    for lib, adapter in (("kafka-saga", "kafkasaga_remote.py"), ("floor", "floor_remote.py")):
        for inflight, (n_full, n_quick) in REMOTE_INFLIGHT.items():
            out.append(
                Entry(
                    name=f"remote:{lib}:inflight{inflight}",
                    group="remote",
                    lib=lib,
                    storage="kafka+postgres",
                    scenario=f"inflight{inflight}",
                    adapter=adapter,
                    python="project",
                    db=LIB_DB[lib],
                    cfg={
                        "scenario": f"inflight{inflight}",
                        "inflight": inflight,
                        "n": n_quick if q else n_full,
                        "steps": 3,
                        "kafka": KAFKA,
                    },
                )
            )
    for variant in ("dedup", "transactional"):
        for inflight, (n_full, n_quick) in PARTICIPANT_INFLIGHT.items():
            out.append(
                Entry(
                    name=f"participant:kafka-saga:{variant}:inflight{inflight}",
                    group="participant",
                    lib="kafka-saga",
                    storage="postgres",
                    scenario=f"inflight{inflight}",
                    adapter="kafkasaga_participant.py",
                    python="project",
                    db=LIB_DB["participant"],
                    cfg={
                        "scenario": f"inflight{inflight}",
                        "variant": variant,
                        "inflight": inflight,
                        "n": n_quick if q else n_full,
                    },
                )
            )
    out.append(
        Entry(
            name="recovery:kafka-saga",
            group="recovery",
            lib="kafka-saga",
            storage="postgres",
            scenario="recovery",
            adapter="kafkasaga_recovery.py",
            python="project",
            # The fill is kept between runs; the quick run's small table lives in a database of its own.
            db="bench_recovery_quick" if q else "bench_recovery",
            fresh_db=False,
            cfg={"rows": 10_000 if q else 1_000_000, "calls": 20 if q else 200, "limit": 100},
        )
    )
    out.append(
        Entry(
            name="memory-rss:kafka-saga",
            group="memory-rss",
            lib="kafka-saga",
            storage="memory",
            scenario="rss",
            adapter="kafkasaga_memory.py",
            python="project",
            db=None,
            cfg={"sagas": 500 if q else 10_000, "runs": 1},
        )
    )
    for e in out:
        e.cfg = {k: v for k, v in e.cfg.items() if v is not None}
    return scenario_major(out)


def scenario_major(entries: list[Entry]) -> list[Entry]:
    """The entries with every library's run of one scenario back to back (in the libraries' order).

    Why: a ratio compares two entries; run library by library, kafka-saga's and a peer's runs of the same
    scenario were 10 to 20 minutes apart, and on a shared machine the load changes in that time.
    """
    first: dict[tuple[str, str, str], int] = {}
    for e in entries:
        first.setdefault((e.group, e.storage, e.scenario), len(first))
    return sorted(entries, key=lambda e: first[(e.group, e.storage, e.scenario)])


def select(entries: list[Entry], only: str | None) -> list[Entry]:
    if not only:
        return entries
    filters = [f.strip() for f in only.split(",") if f.strip()]
    return [e for e in entries if any(all(p in e.tags for p in f.split(":")) for f in filters)]


# ------------------------------------------------------------------------------------------------
# PostgreSQL statistics


class Pg:
    def __init__(self) -> None:
        self.con: Any = None

    async def connect(self) -> None:
        import asyncpg

        for attempt in range(30):
            try:
                self.con = await asyncpg.connect(dsn(PG_ADMIN_DB))
                break
            except (OSError, asyncpg.PostgresError) as e:
                if attempt == 29:
                    raise
                print(f"[bench] PostgreSQL not answering ({e}); retrying", file=sys.stderr)
                await asyncio.sleep(2)
        await self.con.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")

    async def ensure_connected(self) -> None:
        if self.con is None or self.con.is_closed():
            await self.connect()

    async def close(self) -> None:
        if self.con is not None:
            await self.con.close()

    async def fresh_db(self, db: str) -> None:
        await self.con.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
        await self.con.execute(f'CREATE DATABASE "{db}"')

    async def ensure_db(self, db: str) -> None:
        if not await self.con.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", db):
            await self.con.execute(f'CREATE DATABASE "{db}"')

    async def dbid(self, db: str) -> int:
        return int(await self.con.fetchval("SELECT oid FROM pg_database WHERE datname = $1", db))

    async def reset(self, dbid: int) -> tuple[int, int]:
        await self.con.execute("SELECT pg_stat_statements_reset(0, $1::oid, 0)", dbid)
        return await self.xact_commit(dbid), await self.wal_syncs()

    async def wal_syncs(self) -> int:
        """WAL flushes to disk by the whole server so far (``pg_stat_wal.wal_sync``): the fsyncs commits
        waited for, plus the WAL writer's background flushes of commits that did not wait."""
        await self.con.execute("SELECT pg_stat_clear_snapshot()")
        return int(await self.con.fetchval("SELECT wal_sync FROM pg_stat_wal"))

    async def xact_commit(self, dbid: int) -> int:
        await self.con.execute("SELECT pg_stat_clear_snapshot()")
        return int(await self.con.fetchval("SELECT xact_commit FROM pg_stat_database WHERE datid = $1", dbid))

    async def statements(self, dbid: int) -> list[dict[str, Any]]:
        rows = await self.con.fetch(
            "SELECT query, calls, total_exec_time FROM pg_stat_statements WHERE dbid = $1 "
            "ORDER BY calls DESC",
            dbid,
        )
        return [
            {"query": r["query"][:300], "calls": int(r["calls"]), "ms": round(float(r["total_exec_time"]), 2)}
            for r in rows
        ]

    async def settings(self) -> dict[str, str]:
        rows = await self.con.fetch(
            "SELECT name, setting FROM pg_settings WHERE name IN ('fsync', 'synchronous_commit', "
            "'wal_sync_method', 'shared_buffers', 'server_version', 'max_connections', 'full_page_writes')"
        )
        return {r["name"]: r["setting"] for r in rows}


# ------------------------------------------------------------------------------------------------
# running one entry


def interpreter(entry: Entry) -> str:
    if entry.python == "project":
        return sys.executable
    return str(VENVS / entry.python / "bin" / "python")


async def run_entry(entry: Entry, pg: Pg | None, runs: int, logdir: Path) -> dict[str, Any]:
    cfg = dict(entry.cfg)
    cfg.setdefault("runs", runs)
    dbid = None
    if entry.db:
        assert pg is not None
        await pg.ensure_connected()
        if entry.fresh_db:
            await pg.fresh_db(entry.db)
        else:
            await pg.ensure_db(entry.db)
        dbid = await pg.dbid(entry.db)
        cfg["dsn"] = dsn(entry.db)
        cfg["db"] = entry.db
    # The adapter's stderr goes straight to this file (closed in the finally below).
    log = open(logdir / (entry.name.replace(":", "_") + ".log"), "wb")  # noqa: SIM115, ASYNC230
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) if entry.python == "project" else ""
    env.setdefault("PYTHONHASHSEED", "0")
    proc = await asyncio.create_subprocess_exec(
        interpreter(entry),
        str(ADAPTERS / entry.adapter),
        json.dumps(cfg),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=log,
        cwd=str(REPO),
        env=env,
        limit=1 << 24,
    )
    results: list[dict[str, Any]] = []
    final: dict[str, Any] = {}
    commits0 = syncs0 = 0
    t0 = time.monotonic()
    error = None
    try:
        assert proc.stdout is not None and proc.stdin is not None
        while True:
            remaining = entry.timeout - (time.monotonic() - t0)
            line = await asyncio.wait_for(proc.stdout.readline(), timeout=max(1.0, remaining))
            if not line:
                break
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            ev = msg.get("event")
            if ev == "ready":
                if dbid is not None:
                    run_no = int(msg.get("run", 0))
                    if run_no == 0:
                        # Commits are counted on the first run only: an idle backend sends its
                        # pending xact counters to pg_stat_database only after 10 s (PostgreSQL 15's
                        # PGSTAT_IDLE_INTERVAL), so each boundary costs that wait.
                        await asyncio.sleep(STATS_WAIT)
                    commits0, syncs0 = await pg.reset(dbid)  # type: ignore[union-attr]
                proc.stdin.write(b"go\n")
                await proc.stdin.drain()
            elif ev == "done":
                res = dict(msg["result"])
                if dbid is not None:
                    stmts = await pg.statements(dbid)  # type: ignore[union-attr]
                    units = res.get("sagas") or 1
                    calls = sum(s["calls"] for s in stmts)
                    res["sql_statements"] = calls
                    res["sql_statements_per_saga"] = round(calls / units, 2)
                    res["top_statements"] = stmts[:12]
                    if int(msg.get("run", 0)) == 0:
                        await asyncio.sleep(STATS_WAIT)
                        commits = await pg.xact_commit(dbid) - commits0  # type: ignore[union-attr]
                        res["commits"] = commits
                        res["commits_per_saga"] = round(commits / units, 2)
                        syncs = await pg.wal_syncs() - syncs0  # type: ignore[union-attr]
                        res["wal_syncs"] = syncs
                        res["wal_syncs_per_saga"] = round(syncs / units, 2)
                results.append(res)
            elif ev == "end":
                final = msg.get("info", {})
            elif ev == "skip":
                error = msg.get("reason", "skipped")
                final = msg.get("info", {})
        await asyncio.wait_for(proc.wait(), timeout=60)
    except TimeoutError:
        error = f"timed out after {entry.timeout:.0f} s"
        proc.kill()
        await proc.wait()
    except Exception as exc:  # the driver's own statistics connection failed (a service restarted)
        error = f"driver: {type(exc).__name__}: {exc}"
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
    finally:
        log.close()
    if proc.returncode not in (0, None) and error is None:
        tail = (logdir / (entry.name.replace(":", "_") + ".log")).read_text(errors="replace")[-2000:]
        error = f"exit {proc.returncode}: {tail.strip().splitlines()[-1] if tail.strip() else ''}"
    out: dict[str, Any] = {
        "name": entry.name,
        "group": entry.group,
        "lib": entry.lib,
        "storage": entry.storage,
        "scenario": entry.scenario,
        "config": {k: v for k, v in cfg.items() if k != "dsn"},
        "runs": results,
        "median": median_of(results),
        "info": final,
    }
    if error:
        out["error"] = error
    return out


def median_of(results: list[dict[str, Any]]) -> dict[str, Any]:
    if not results:
        return {}
    keys = [k for k, v in results[0].items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    med: dict[str, Any] = {}
    for k in keys:
        vals = [r[k] for r in results if isinstance(r.get(k), (int, float))]
        if vals:
            med[k] = statistics.median(vals)
    # keep the statement list of the median-throughput run
    key = "sagas_per_s" if "sagas_per_s" in results[0] else next(iter(keys), None)
    if key and "top_statements" in results[0]:
        ordered = sorted(results, key=lambda r: r.get(key, 0))
        med["top_statements"] = ordered[len(ordered) // 2].get("top_statements")
    return med


# ------------------------------------------------------------------------------------------------
# machine, services


_TRANSIENT = (
    "Connection refused",
    "Connect call failed",
    "shutting down",
    "unavailable",
    "connection is closed",
    "ConnectionResetError",
    "KafkaConnectionError",
    "NodeNotReady",
)


def _transient(error: str) -> bool:
    return any(t.lower() in error.lower() for t in _TRANSIENT)


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cores": os.cpu_count(),
    }
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        mem = Path("/proc/meminfo").read_text().splitlines()[0].split()[1]
        info["memory_gib"] = round(int(mem) / 1024 / 1024, 1)
    except OSError:
        pass
    info["loadavg"] = list(os.getloadavg())
    return info


def port_open(hostport: str) -> bool:
    import socket

    host, port = hostport.rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=2):
            return True
    except OSError:
        return False


def ensure_services(need_pg: bool, need_kafka: bool) -> None:
    missing = (need_pg and not port_open(f"{PG_HOST}:{PG_PORT}")) or (need_kafka and not port_open(KAFKA))
    if missing:
        print("[bench] starting services: scripts/services.sh start", file=sys.stderr)
        env = {
            **os.environ,
            "KAFKA_SAGA_PG_PORT": str(PG_PORT),
            "KAFKA_SAGA_KAFKA_PORT": KAFKA.rsplit(":", 1)[1],
        }
        subprocess.run(["bash", str(REPO / "scripts" / "services.sh"), "start"], check=True, env=env)


def use_private_services() -> None:
    """Point the benchmark at its own PostgreSQL and Kafka (started by services.sh on other ports).

    The shared services get restarted by other people's reliability tests; a run on its own pair is not
    cut short by that (it still shares the CPU).
    """
    global PG_PORT, KAFKA
    PG_PORT = int(os.environ.get("BENCH_PRIVATE_PG_PORT", "25433"))
    KAFKA = f"127.0.0.1:{os.environ.get('BENCH_PRIVATE_KAFKA_PORT', '29092')}"


# ------------------------------------------------------------------------------------------------


async def amain(args: argparse.Namespace) -> int:
    if args.private_services:
        use_private_services()
    entries = select(build_entries(args.quick), args.only)
    if args.list:
        for e in entries:
            print(e.name)
        return 0
    if not entries:
        print("no benchmark matches", args.only, file=sys.stderr)
        return 2
    out = Path(args.out)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    logdir = out / "logs" / stamp
    logdir.mkdir(parents=True, exist_ok=True)

    peers_needed = sorted({e.python for e in entries if e.python != "project"})
    peers = setup_peers.ensure(peers_needed, skip_install=args.no_install) if peers_needed else {}
    need_pg = any(e.db for e in entries)
    need_kafka = any(e.group == "remote" for e in entries)
    if not args.no_services:
        ensure_services(need_pg, need_kafka)
    pg = None
    pg_settings: dict[str, str] = {}
    if need_pg:
        pg = Pg()
        await pg.connect()
        pg_settings = await pg.settings()

    results: list[dict[str, Any]] = []
    started = time.time()
    head = git_head()  # the code measured: the commit when the run starts
    machine = machine_info()
    for e in entries:
        peer = peers.get(e.python)
        if peer is not None and not peer.get("usable"):
            results.append(
                {
                    "name": e.name,
                    "group": e.group,
                    "lib": e.lib,
                    "storage": e.storage,
                    "scenario": e.scenario,
                    "runs": [],
                    "median": {},
                    "error": f"{e.lib} not installed: {peer.get('error', '?')}",
                }
            )
            print(f"[bench] {e.name}: skipped ({e.lib} not installed)", file=sys.stderr)
            continue
        print(f"[bench] {e.name} ...", file=sys.stderr, flush=True)
        t = time.monotonic()
        r = await run_entry(e, pg, args.runs, logdir)
        if r.get("error") and _transient(r["error"]):
            # A service went away under us (another user restarting it): wait for it, try once more.
            print(f"[bench]   {r['error']}; retrying once", file=sys.stderr, flush=True)
            if not args.no_services:
                await asyncio.sleep(5)
                ensure_services(need_pg, need_kafka)
            r = await run_entry(e, pg, args.runs, logdir)
            r["retried"] = True
        r["elapsed_s"] = round(time.monotonic() - t, 1)
        results.append(r)
        m = r["median"]
        brief = {
            k: m[k]
            for k in (
                "sagas_per_s",
                "us_per_saga",
                "sql_statements_per_saga",
                "commits_per_saga",
                "wal_syncs_per_saga",
                "step_p50_us",
                "step_p99_us",
                "steps_per_s",
                "p50_ms",
                "p99_ms",
                "rss_mib_per_10k",
            )
            if k in m
        }
        print(
            f"[bench]   {brief}{'  ERROR: ' + r['error'] if 'error' in r else ''}",
            file=sys.stderr,
            flush=True,
        )
    if pg:
        await pg.close()
    machine["loadavg_end"] = list(os.getloadavg())
    doc = {
        "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)),
        "duration_s": round(time.time() - started, 1),
        "quick": args.quick,
        "only": args.only,
        "runs_per_scenario": args.runs,
        "machine": machine,
        "postgres": pg_settings,
        "kafka": KAFKA if need_kafka else None,
        "peers": peers,
        "kafka_saga_commit": head,
        "results": results,
    }
    doc["targets"] = report.targets(doc)
    md = write_outputs(doc, out, stamp, full=not args.quick and not args.only)
    if args.print:
        print(md)
    return 0


def write_outputs(doc: dict[str, Any], out: Path, stamp: str, *, full: bool) -> str:
    """Raw JSON always; results.{md,json} and the README's table for a full run; the markdown."""
    raw = out / f"raw-{stamp}.json"
    raw.write_text(json.dumps(doc, indent=1, default=str))
    md = report.markdown(doc)
    if full:
        (out / "results.json").write_text(json.dumps(doc, indent=1, default=str))
        (out / "results.md").write_text(md)
        if out.resolve() == (BENCH / "results").resolve():
            update_readme(md)
        print(f"[bench] wrote {out / 'results.md'} and {out / 'results.json'}", file=sys.stderr)
    else:
        (out / f"partial-{stamp}.md").write_text(md)
        print(f"[bench] wrote {out / f'partial-{stamp}.md'} and {raw}", file=sys.stderr)
    return md


def update_readme(md: str) -> None:
    """Put the results (without their title) between the README's results markers."""
    readme = BENCH / "README.md"
    text = readme.read_text()
    begin, end = "<!-- results:begin -->", "<!-- results:end -->"
    if begin not in text or end not in text:
        return
    body = md.split("\n", 1)[1].lstrip("\n").replace("\n## ", "\n### ")
    head, rest = text.split(begin, 1)
    tail = rest.split(end, 1)[1]
    readme.write_text(f"{head}{begin}\n## Results (from the last full run)\n\n{body}\n{end}{tail}")


def git_head() -> str | None:
    try:
        return subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a few sagas per scenario, one run (smoke)")
    p.add_argument("--only", help="comma-separated filters of ':'-joined tags")
    p.add_argument("--out", default=str(BENCH / "results"))
    p.add_argument("--runs", type=int, default=None, help="measured runs per scenario (median); 3, 1 quick")
    p.add_argument("--list", action="store_true", help="list the selected entries and exit")
    p.add_argument("--no-install", action="store_true", help="use the peers' venvs as they are")
    p.add_argument("--no-services", action="store_true", help="do not start services")
    p.add_argument("--print", action="store_true", help="print the markdown table")
    p.add_argument(
        "--private-services",
        action="store_true",
        help="run PostgreSQL and Kafka of its own (ports 25433, 29092) via scripts/services.sh",
    )
    args = p.parse_args(argv)
    if args.runs is None:
        args.runs = 1 if args.quick else 3
    return asyncio.run(amain(args))


if __name__ == "__main__":
    sys.exit(main())
