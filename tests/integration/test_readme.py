"""Every code block in README.md is run (or, for the few that cannot be, checked) by these tests.

Blocks are classified by their fence info string and content:

* ``python file=NAME`` / ``yaml file=NAME``: written into a fresh tutorial directory, then the ``bash``
  blocks that use them run there.
* other ``python`` blocks: executed from the repository root.
* other ``yaml`` blocks: loaded and validated with ``saga.config.load_config``.
* ``bash`` blocks: every command runs. The services lifecycle block runs against a second, private pair of
  services (own cache dir and ports), so it really starts, inspects and stops them without touching the
  services the rest of the suite uses. The test command itself (``bash scripts/test.sh``) is what CI
  runs; here it is checked to be exactly what ``.ci/run`` executes.
* ``text`` blocks: the tutorial's expected output is compared with what ``shop.py`` printed; the layout
  block's paths must exist.

A block of a kind these rules do not know fails the test, so a new block cannot go untested.
"""

from __future__ import annotations

import os
import re
import shlex
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
TEST_COMMAND = "bash scripts/test.sh"

pytestmark = [pytest.mark.kafka, pytest.mark.postgres, pytest.mark.e2e]


@dataclass(frozen=True)
class Block:
    lang: str
    file: str | None
    body: str
    line: int
    preceding: str


def _blocks() -> list[Block]:
    text = README.read_text()
    blocks = []
    for match in re.finditer(r"^```(\w*)([^\n]*)\n(.*?)^```\s*$", text, re.S | re.M):
        info = match.group(2)
        file_match = re.search(r"file=(\S+)", info)
        line = text.count("\n", 0, match.start()) + 1
        before = text[: match.start()].rstrip().splitlines()
        blocks.append(
            Block(
                lang=match.group(1),
                file=file_match.group(1) if file_match else None,
                body=match.group(3),
                line=line,
                preceding=before[-1] if before else "",
            )
        )
    return blocks


def _commands(body: str) -> list[str]:
    """Shell commands of a bash block: comments dropped, backslash continuations joined."""
    joined = body.replace("\\\n", " ")
    commands = []
    for raw in joined.splitlines():
        line = raw.split("  #", 1)[0].strip()
        if line and not line.startswith("#"):
            commands.append(line)
    return commands


def _run(command: str, *, cwd: Path, env: dict[str, str], timeout: float = 300) -> str:
    proc = subprocess.run(
        ["bash", "-c", command],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, (
        f"README command failed ({proc.returncode}): {command}\n--- stdout\n{proc.stdout[-4000:]}\n"
        f"--- stderr\n{proc.stderr[-4000:]}"
    )
    return proc.stdout


def _free_ports(count: int) -> list[int]:
    """Loopback ports nobody listens on now, so this test never collides with running services."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


@pytest.fixture
def env(tmp_path: Path, kafka_bootstrap: str, database_url: str) -> dict[str, str]:
    result = dict(os.environ)
    result.update(
        KAFKA_BOOTSTRAP_SERVERS=kafka_bootstrap,
        SAGA_DATABASE_URL=database_url,
        SAGA_SQLITE_PATH=str(tmp_path / "demo.sqlite3"),
        PYTHONPATH=str(REPO),
    )
    return result


def test_every_block_is_of_a_known_kind() -> None:
    blocks = _blocks()
    assert len(blocks) >= 8
    for block in blocks:
        assert block.lang in {"bash", "python", "yaml", "text"}, f"README line {block.line}: {block.lang!r}"


def test_test_command_is_what_ci_runs() -> None:
    ci = (REPO / ".ci" / "run").read_text()
    assert re.search(r"^exec bash scripts/test\.sh\s*$", ci, re.M), ci
    quick_start = [b for b in _blocks() if b.lang == "bash" and _commands(b.body) == [TEST_COMMAND]]
    assert quick_start, "the README's test command block is missing"
    # The block that points the tests at existing services names the variables tests/services.py reads.
    services_py = (REPO / "tests" / "services.py").read_text()
    pointed = [b for b in _blocks() if b.lang == "bash" and TEST_COMMAND in b.body and "=" in b.body]
    assert pointed
    for name in re.findall(r"([A-Z_]+)=", pointed[0].body):
        assert f'"{name}"' in services_py, f"{name} is not read by tests/services.py"


def test_tutorial_and_demo_blocks_run(tmp_path: Path, env: dict[str, str]) -> None:
    blocks = _blocks()
    tutorial = tmp_path / "tutorial"
    tutorial.mkdir()
    for block in blocks:
        if block.file:
            (tutorial / block.file).write_text(block.body)
    assert (tutorial / "shop.py").exists() and (tutorial / "shop.yml").exists()

    outputs: dict[str, str] = {}
    services_blocks = []
    for block in blocks:
        if block.lang != "bash":
            continue
        commands = _commands(block.body)
        if any("scripts/services.sh" in c for c in commands):
            services_blocks.append(block)
            continue
        for command in commands:
            if command.endswith(TEST_COMMAND):
                continue  # CI runs it; checked in test_test_command_is_what_ci_runs
            uses_tutorial = "shop." in command
            cwd = tutorial if uses_tutorial else REPO
            outputs[command] = _run(command, cwd=cwd, env=env, timeout=600)

    assert services_blocks, "the services block is missing"
    demo = [out for cmd, out in outputs.items() if cmd.endswith("kafka-saga demo")]
    assert demo and "result: OK" in demo[0]
    kafka_demo = [out for cmd, out in outputs.items() if "config/kafka.yml" in cmd]
    assert kafka_demo and "result: OK" in kafka_demo[0]
    listed = [out for cmd, out in outputs.items() if "list --config shop.yml" in cmd]
    assert listed and "FINISHED" in listed[0] and "ERRORED" in listed[0]

    expected = [b for b in blocks if b.lang == "text" and b.preceding.endswith("prints:")]
    assert expected, "the tutorial's expected output block is missing"
    assert outputs["python3 shop.py"].strip() == expected[0].body.strip()


def test_python_and_yaml_blocks(env: dict[str, str]) -> None:
    from saga.config import load_config

    checked = 0
    for block in _blocks():
        if block.file:
            continue
        if block.lang == "python":
            _run(f"{shlex.quote(sys.executable)} -c {shlex.quote(block.body)}", cwd=REPO, env=env)
            checked += 1
        elif block.lang == "yaml":
            import yaml

            load_config(yaml.safe_load(block.body))
            checked += 1
    assert checked >= 1


_BROKEN_CONFIGS = {
    "storage.ulr": "storage:\n  ulr: sqlite+aiosqlite:///x.sqlite3\n",
    "recovery.interval": "recovery:\n  interval: fast\n",
    "storage.url": "storage:\n  url: ${SAGA_DATABASE_URL}\n",
}


def test_config_error_block_shows_what_users_see(tmp_path: Path) -> None:
    """The README's config errors are exactly what `kafka-saga` prints for such files (exit code 2)."""
    (block,) = [b for b in _blocks() if b.lang == "text" and "when it fails" in b.preceding]
    lines = block.body.strip().splitlines()
    assert len(lines) == len(_BROKEN_CONFIGS)
    env = {k: v for k, v in os.environ.items() if k != "SAGA_DATABASE_URL"}
    (tmp_path / "config").mkdir()
    for line in lines:
        prog, path, key, _ = line.split(": ", 3)
        assert prog == "kafka-saga", "the README shows the lines as the command prints them"
        (tmp_path / path).write_text(_BROKEN_CONFIGS[key])
        proc = subprocess.run(
            [sys.executable, "-m", "saga.cli", "stats", "--config", path],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 2, proc
        assert line in proc.stderr, proc.stderr
        assert not list(tmp_path.glob("*.sqlite3")), "a failing config must write nothing"


def test_layout_block_names_real_paths() -> None:
    layout = [b for b in _blocks() if b.lang == "text" and b.preceding.startswith("## Layout")]
    assert layout
    for block in layout:
        for line in block.body.splitlines():
            first = line.split()[0] if line.strip() and not line.startswith(" ") else None
            if first:
                assert (REPO / first.rstrip("/")).exists(), f"README layout names {first}, which is missing"


def test_services_block_runs_on_private_services(tmp_path: Path) -> None:
    """start/status/env/stop from the README, on a second pair of services that this test owns."""
    block = next(b for b in _blocks() if b.lang == "bash" and "scripts/services.sh start" in b.body)
    kafka_port, controller_port, pg_port = _free_ports(3)
    private = dict(os.environ)
    private.update(
        KAFKA_SAGA_SERVICES_DIR=str(tmp_path / "services"),
        KAFKA_SAGA_KAFKA_PORT=str(kafka_port),
        KAFKA_SAGA_KAFKA_CONTROLLER_PORT=str(controller_port),
        KAFKA_SAGA_PG_PORT=str(pg_port),
    )
    for name in ("KAFKA_BOOTSTRAP_SERVERS", "SAGA_DATABASE_URL"):
        private.pop(name, None)
    try:
        outputs = {c: _run(c, cwd=REPO, env=private, timeout=600) for c in _commands(block.body)}
    finally:
        stop = ["bash", "scripts/services.sh", "stop"]
        subprocess.run(stop, cwd=REPO, env=private, timeout=120, check=False)
    env_out = next(out for cmd, out in outputs.items() if cmd.endswith(" env"))
    assert f"127.0.0.1:{kafka_port}" in env_out and f"127.0.0.1:{pg_port}" in env_out
    status = subprocess.run(
        ["bash", "scripts/services.sh", "status"], cwd=REPO, env=private, capture_output=True, text=True
    )
    assert status.returncode != 0, f"services still running after stop:\n{status.stdout}"
