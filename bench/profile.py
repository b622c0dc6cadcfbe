#!/usr/bin/env python3
"""Profile one kafka-saga benchmark scenario outside the driver.

    python bench/profile.py local-memory|local-postgres|remote [--n N] [--inflight K]
                            [--tool pyinstrument|py-spy] [--out bench/results/profiles]

Runs the same adapter the driver runs (``BENCH_AUTOGO=1``: no driver handshake), under pyinstrument
(a call tree, text) or py-spy (a flame graph, SVG; samples every thread, native frames excluded). The
PostgreSQL scenarios use a fresh database ``bench_profile``. Needs ``pip install pyinstrument py-spy``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))

import run  # noqa: E402

SCENARIOS = {
    "local-memory": ("kafkasaga_local.py", {"scenario": "seq", "storage": "memory", "n": 20000}),
    "local-postgres": ("kafkasaga_local.py", {"scenario": "seq", "storage": "postgres", "n": 2000}),
    "local-postgres-conc50": (
        "kafkasaga_local.py",
        {"scenario": "conc50", "storage": "postgres", "n": 2000, "concurrency": 50},
    ),
    "remote": ("kafkasaga_remote.py", {"inflight": 1, "n": 300, "steps": 3}),
}


async def fresh_db(name: str) -> None:
    pg = run.Pg()
    await pg.connect()
    try:
        await pg.fresh_db(name)
    finally:
        await pg.close()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("scenario", choices=sorted(SCENARIOS))
    p.add_argument("--n", type=int, help="sagas")
    p.add_argument("--inflight", type=int, help="sagas in flight (remote)")
    p.add_argument("--tool", choices=["pyinstrument", "py-spy"], default="pyinstrument")
    p.add_argument("--out", default=str(BENCH / "results" / "profiles"))
    args = p.parse_args()
    adapter, cfg = SCENARIOS[args.scenario]
    cfg = {**cfg, "runs": 1, "warmup": 50}
    if args.n:
        cfg["n"] = args.n
    if args.inflight:
        cfg["inflight"] = args.inflight
    if args.scenario != "local-memory":
        asyncio.run(fresh_db("bench_profile"))
        cfg["dsn"] = run.dsn("bench_profile")
        cfg["kafka"] = run.KAFKA
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    script = [str(BENCH / "adapters" / adapter), json.dumps(cfg)]
    if args.tool == "pyinstrument":
        target = out / f"{args.scenario}.txt"
        cmd = [sys.executable, "-m", "pyinstrument", "-r", "text", "-o", str(target), *script]
    else:
        target = out / f"{args.scenario}.svg"
        cmd = ["py-spy", "record", "-r", "500", "-o", str(target), "--", sys.executable, *script]
    env = {**os.environ, "BENCH_AUTOGO": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run(cmd, env=env, cwd=REPO, check=False)
    print(f"profile: {target}", file=sys.stderr)
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())
