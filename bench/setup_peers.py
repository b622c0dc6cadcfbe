"""Create the peers' virtualenvs under bench/.venvs/ (git-ignored) with pip, once.

Each peer gets its own venv made with this interpreter (Python 3.11). A venv is (re)installed when its
stamp file is missing or names other requirements. The outcome, with the installed versions or the
exact pip error, is written to bench/.venvs/<name>/bench-status.json and returned to the driver.

Minos 0.7 pins ``uvloop>=0.16,<0.17``, which does not build on Python 3.11 (it includes the removed
``longintrepr.h``). The plain install is tried first and its error kept; then, to still have a number,
the Minos packages are installed with ``--no-deps`` and their other requirements with a newer uvloop.
The results say which of the two happened.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

VENVS = Path(__file__).resolve().parent / ".venvs"

PEERS: dict[str, dict[str, Any]] = {
    "cqrs": {
        "requirements": ["python-cqrs[sqlalchemy]==5.*", "asyncpg"],
        "dists": ["python-cqrs", "sqlalchemy", "asyncpg"],
    },
    "dbos": {
        "requirements": ["dbos==3.*"],
        "dists": ["dbos", "sqlalchemy", "psycopg"],
    },
    "minos": {
        "requirements": ["minos-microservice-saga==0.7.*"],
        "dists": [
            "minos-microservice-saga",
            "minos-microservice-common",
            "minos-database-lmdb",
            "minos-database-aiopg",
            "uvloop",
            "lmdb",
            "aiopg",
        ],
        # Used when the plain install fails: the Minos packages without their pins, then the pins'
        # other requirements with uvloop allowed to be a version that builds on 3.11.
        "fallback_nodeps": [
            "minos-microservice-saga==0.7.*",
            "minos-microservice-common==0.7.*",
            "minos-microservice-networks==0.7.*",
            "minos-microservice-aggregate==0.7.*",
            "minos-database-lmdb==0.7.*",
            "minos-database-aiopg==0.7.*",
        ],
        "fallback_deps": [
            "PyYAML>=5.4.1,<7",
            "aiomisc>=14.0.3,<15.8.0",
            "cached-property>=1.5.2,<2",
            "dependency-injector>=4.32.2,<5",
            "fastavro>=1.4,<2",
            "orjson>=3.5.2,<4",
            "uvloop>=0.17",
            "crontab>=0.23,<0.24",
            "lmdb>=1.2.1,<2",
            "aiopg>=1.2.1,<2",
            "psycopg2-binary>=2.9,<3",
        ],
        "import": "minos.saga",
    },
}


def _pip(venv: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "--disable-pip-version-check", *args],
        capture_output=True,
        text=True,
    )


def _versions(venv: Path, dists: list[str]) -> dict[str, str]:
    code = (
        "import importlib.metadata as m, json, sys\n"
        "out = {}\n"
        "for d in sys.argv[1:]:\n"
        "    try: out[d] = m.version(d)\n"
        "    except m.PackageNotFoundError: pass\n"
        "print(json.dumps(out))\n"
    )
    r = subprocess.run([str(venv / "bin" / "python"), "-c", code, *dists], capture_output=True, text=True)
    return json.loads(r.stdout) if r.returncode == 0 else {}


def _error_excerpt(text: str) -> str:
    lines = [ln.rstrip() for ln in text.splitlines() if ln.strip()]
    keep = [ln for ln in lines if "error" in ln.lower() or "fatal" in ln.lower()]
    return "\n".join((keep or lines)[-8:])


def ensure_one(name: str, *, skip_install: bool = False) -> dict[str, Any]:
    spec = PEERS[name]
    venv = VENVS / name
    stamp = venv / "bench-status.json"
    want = json.dumps(spec, sort_keys=True)
    if stamp.exists():
        status = json.loads(stamp.read_text())
        if skip_install or status.get("spec") == want:
            return status
    if skip_install:
        return {"usable": False, "error": "venv missing and --no-install given"}
    print(f"[bench] setting up venv {venv}", file=sys.stderr, flush=True)
    if not (venv / "bin" / "python").exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    status: dict[str, Any] = {"spec": want, "python": sys.version.split()[0]}
    r = _pip(venv, *spec["requirements"])
    if r.returncode == 0:
        status.update(usable=True, install="as published")
    else:
        status["install_error"] = _error_excerpt(r.stdout + r.stderr)
        (venv / "install-error.log").write_text(r.stdout + r.stderr)
        if "fallback_nodeps" in spec:
            r1 = _pip(venv, "--no-deps", *spec["fallback_nodeps"])
            r2 = _pip(venv, *spec["fallback_deps"]) if r1.returncode == 0 else r1
            ok = (
                r2.returncode == 0
                and subprocess.run(
                    [str(venv / "bin" / "python"), "-c", f"import {spec['import']}"], capture_output=True
                ).returncode
                == 0
            )
            if ok:
                status.update(
                    usable=True,
                    install="did not install as published; installed with --no-deps "
                    "and uvloop>=0.17 instead of its uvloop<0.17 pin",
                )
            else:
                status.update(
                    usable=False, install="did not install", error=_error_excerpt(r2.stdout + r2.stderr)
                )
        else:
            status.update(usable=False, install="did not install", error=status["install_error"])
    status["versions"] = _versions(venv, spec["dists"])
    stamp.write_text(json.dumps(status, indent=1))
    return status


def ensure(names: list[str], *, skip_install: bool = False) -> dict[str, dict[str, Any]]:
    out = {}
    for n in names:
        st = ensure_one(n, skip_install=skip_install)
        out[n] = {k: v for k, v in st.items() if k != "spec"}
    return out


if __name__ == "__main__":
    print(json.dumps(ensure(sys.argv[1:] or list(PEERS)), indent=1))
