"""The participant instances of the crash suite: ``kafka-saga participant`` processes, ended by pid.

Each instance is ``python -m saga.cli participant --config FILE`` with the run's topic suffix in its
environment and, optionally, a crash point armed (`tests.e2e.participants.faults`). Output goes to files.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[3]
SERVICES = ("inventory", "payment")


def write_config(directory: Path, service: str, suffix: str, bootstrap: str, store_url: str) -> Path:
    path = directory / f"{service}.yml"
    path.write_text(
        f"""broker:
  type: kafka
  kafka:
    bootstrap_servers: "{bootstrap}"
    client_id: {service}-{suffix}
    session_timeout_ms: 6000
    heartbeat_interval_ms: 1000
    request_timeout_ms: 15000
participant:
  service: {service}-{suffix}
  app: tests.e2e.participants.apps:{service}
  store_url: "{store_url}"
  concurrency: 50
  lease_seconds: 2
  grace_seconds: 0.5
logging:
  level: WARNING
"""
    )
    return path


@dataclass
class Instance:
    name: str
    service: str
    process: subprocess.Popen[bytes]
    stdout_path: Path
    stderr_path: Path
    crash: str | None
    started_at: float = field(default_factory=time.monotonic)
    ended_by_test: bool = False

    def alive(self) -> bool:
        return self.process.poll() is None

    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def ready(self) -> bool:
        return "kafka-saga participant: ready" in self.stderr()

    def crashed_at_point(self) -> str | None:
        for line in self.stdout().splitlines():
            if line.startswith("CRASH "):
                return line.split()[1]
        return None


class Fleet:
    """Every instance started in a run, so all are ended (by pid) when it is over."""

    def __init__(self, directory: Path, suffix: str, configs: dict[str, Path]) -> None:
        self.directory = directory
        self.suffix = suffix
        self.configs = configs
        self.instances: list[Instance] = []

    def start(self, service: str, crash: str | None = None) -> Instance:
        name = f"{service}-{len(self.instances)}"
        stdout_path = self.directory / f"{name}.stdout"
        stderr_path = self.directory / f"{name}.stderr"
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "PARTICIPANT_SUFFIX": self.suffix}
        env.pop("PARTICIPANT_CRASH", None)
        if crash:
            env["PARTICIPANT_CRASH"] = crash
        with stdout_path.open("wb") as out, stderr_path.open("wb") as err:
            process = subprocess.Popen(
                [sys.executable, "-m", "saga.cli", "participant", "--config", str(self.configs[service])],
                cwd=REPO_ROOT,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                env=env,
            )
        instance = Instance(name, service, process, stdout_path, stderr_path, crash)
        self.instances.append(instance)
        return instance

    def alive(self, service: str) -> list[Instance]:
        return [i for i in self.instances if i.service == service and i.alive()]

    async def wait_ready(self, *instances: Instance, within: float = 60.0) -> None:
        deadline = time.monotonic() + within
        pending = list(instances)
        while pending:
            pending = [i for i in pending if not i.ready() and i.alive()]
            if pending and time.monotonic() > deadline:
                raise AssertionError(f"{[i.name for i in pending]} not ready\n{self.report()}")
            await asyncio.sleep(0.1)

    def kill(self, instance: Instance) -> None:
        instance.ended_by_test = True
        if instance.alive():
            instance.process.send_signal(signal.SIGKILL)
            instance.process.wait(10)

    def terminate(self, instance: Instance) -> None:
        """SIGTERM: a graceful leave (the process drains for its grace, then exits)."""
        instance.ended_by_test = True
        if instance.alive():
            instance.process.send_signal(signal.SIGTERM)

    def stop_all(self, grace: float = 15.0) -> dict[str, int | None]:
        for instance in self.instances:
            if instance.alive():
                instance.ended_by_test = True
                instance.process.send_signal(signal.SIGTERM)
        codes: dict[str, int | None] = {}
        for instance in self.instances:
            try:
                instance.process.wait(grace)
            except subprocess.TimeoutExpired:
                instance.process.kill()
                instance.process.wait(5)
            codes[instance.name] = instance.process.returncode
        return codes

    def report(self, lines: int = 15) -> str:
        parts = []
        for i in self.instances:
            state = "running" if i.alive() else f"exit {i.process.returncode}"
            tail = "\n".join(i.stderr().splitlines()[-lines:])
            parts.append(f"----- {i.name} (pid {i.process.pid}, {state}, crash {i.crash}) -----\n{tail}")
        return "\n".join(parts)
