"""Smoke run of the benchmark harness (bench/run.py), so it never rots.

Runs the driver in ``--quick`` mode for kafka-saga on the in-memory storage only: a few sagas per
scenario, one run, no peers, no services, no network. Checks the raw JSON the driver writes and the
markdown it renders. The real benchmarks are not part of the test command (see bench/README.md).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "bench"


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, str]:
    out = tmp_path_factory.mktemp("bench")
    proc = subprocess.run(
        [
            sys.executable,
            str(BENCH / "run.py"),
            "--quick",
            "--only",
            "local:kafka-saga:memory,memory-rss",
            "--no-install",
            "--no-services",
            "--out",
            str(out),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    raws = list(out.glob("raw-*.json"))
    mds = list(out.glob("partial-*.md"))
    assert len(raws) == 1 and len(mds) == 1, (raws, mds)
    assert not (out / "results.json").exists(), "a partial run must not overwrite the recorded results"
    return json.loads(raws[0].read_text()), mds[0].read_text()


def test_quick_run_measures_kafka_saga_in_memory(quick_run: tuple[dict, str]) -> None:
    doc, _ = quick_run
    assert doc["quick"] is True
    assert {"cpu", "cores", "python"} <= set(doc["machine"])
    by_name = {r["name"]: r for r in doc["results"]}
    assert set(by_name) == {
        "local:kafka-saga:memory:seq",
        "local:kafka-saga:memory:conc50",
        "local:kafka-saga:memory:fail",
        "memory-rss:kafka-saga",
    }
    for name, r in by_name.items():
        assert "error" not in r, (name, r.get("error"))
        assert len(r["runs"]) == 1
    for scen in ("seq", "conc50", "fail"):
        med = by_name[f"local:kafka-saga:memory:{scen}"]["median"]
        assert med["sagas"] > 0
        assert med["sagas_per_s"] > 0
        assert med["us_per_saga"] == pytest.approx(1e6 / med["sagas_per_s"], rel=0.01)
        assert med["client_cpu_us_per_saga"] > 0
    rss = by_name["memory-rss:kafka-saga"]["median"]
    assert rss["sagas"] > 0 and "rss_mib_per_10k" in rss and "kib_per_saga" in rss


def test_quick_run_reports_targets_and_table(quick_run: tuple[dict, str]) -> None:
    doc, md = quick_run
    targets = doc["targets"]
    assert targets and all({"target", "value", "bound", "met"} <= set(t) for t in targets)
    # Nothing to compare with in this run: every ratio is "not measured", never a made-up pass.
    assert all(t["met"] is None for t in targets)
    assert "## Saga of 3 local steps" in md
    assert "## Memory" in md
    assert "| **kafka-saga** | memory | one at a time |" in md
