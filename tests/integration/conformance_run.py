"""Running ``kafka-saga conformance participant`` as its own process, for the conformance tests."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

ROOT = str(Path(__file__).resolve().parents[2])


def kit_config(tmp_path: Path, bootstrap: str, name: str) -> Path:
    path = tmp_path / "conformance.yml"
    path.write_text(
        f"service:\n  name: {name}\n"
        f"broker:\n  type: kafka\n  kafka:\n    bootstrap_servers: {bootstrap}\n    topic_partitions: 2\n"
        "logging:\n  level: WARNING\n"
    )
    return path


async def run_kit(config: Path, *args: str) -> tuple[int, str, str]:
    """``kafka-saga conformance participant ...`` as its own process: exit code, stdout, stderr."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "saga.cli",
        "conformance",
        "participant",
        "--config",
        str(config),
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": ROOT},
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout=300)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()
