"""The ``kafka-saga`` command line: help, argument parsing, configuration errors and exit codes."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from saga.cli import build_parser, main
from saga.cli.app import EMBEDDED_SOURCE, resolve_config

REPO = Path(__file__).resolve().parents[2]
TEST_CONFIG = str(REPO / "config" / "test.yml")

SUBCOMMANDS = [
    ["worker"],
    ["demo"],
    ["list"],
    ["show"],
    ["stats"],
    ["retry"],
    ["replay"],
    ["set-attempts"],
    ["dead-letter"],
    ["db"],
    ["db", "upgrade"],
]


def run_cli(
    *args: str, env: dict[str, str] | None = None, cwd: Path = REPO
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "saga.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
        check=False,
    )


def test_help_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: kafka-saga ")
    for command in (
        "worker",
        "demo",
        "list",
        "show",
        "stats",
        "retry",
        "replay",
        "set-attempts",
        "dead-letter",
        "db",
    ):
        assert f"    {command}" in out


@pytest.mark.parametrize("command", SUBCOMMANDS, ids=" ".join)
def test_every_subcommand_has_help(command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*command, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: kafka-saga {' '.join(command)}")
    if command != ["db"]:
        assert "--config PATH" in out


@pytest.mark.parametrize(
    "command",
    [
        ["list"],
        ["show", "x"],
        ["stats"],
        ["retry", "x"],
        ["replay", "x"],
        ["set-attempts", "x", "1"],
        ["dead-letter"],
    ],
    ids=lambda c: c[0],
)
def test_admin_commands_offer_json(command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main([command[0], "--help"]) == 0
    assert "--json" in capsys.readouterr().out


def test_help_through_the_module_entry_point() -> None:
    result = run_cli("--help")
    assert result.returncode == 0
    assert "usage: kafka-saga" in result.stdout


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("kafka-saga ")


def test_no_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "the following arguments are required: COMMAND" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["show", "not-a-uuid"], "'not-a-uuid' is not an execution id (expected a UUID, or at least"),
        (["set-attempts", str(uuid.uuid4()), "-1"], "must be 0 or more, got -1"),
        (["list", "--status", "sleeping"], "unknown status 'sleeping'"),
        (["list", "--limit", "0"], "must be at least 1"),
        (["demo", "--orders", "many"], "'many' is not an integer"),
    ],
)
def test_bad_arguments_exit_2(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_list_parses_status_filters() -> None:
    args = build_parser().parse_args(["list", "--status", "failed,DEAD_LETTER", "--status", "paused"])
    assert [s.value for s in args.status] == ["failed", "dead_letter", "paused"]


# -- configuration errors: message on stderr, exit code 2, nothing written ------------------------------


def bad_config(tmp_path: Path) -> tuple[Path, Path]:
    database = tmp_path / "sagas.sqlite3"
    path = tmp_path / "bad.yml"
    path.write_text(f"storage:\n  url: sqlite+aiosqlite:///{database}\n  ulr: oops\n", encoding="utf-8")
    return path, database


@pytest.mark.parametrize(
    "argv",
    [
        ["list"],
        ["show", str(uuid.uuid4())],
        ["stats"],
        ["retry", str(uuid.uuid4())],
        ["replay", str(uuid.uuid4())],
        ["set-attempts", str(uuid.uuid4()), "0"],
        ["dead-letter"],
        ["db", "upgrade"],
        ["worker"],
        ["demo"],
    ],
    ids=lambda argv: argv[0] if argv[0] != "db" else "db upgrade",
)
def test_config_errors_exit_2_and_write_nothing(
    argv: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path, database = bad_config(tmp_path)
    assert main([*argv, "--config", str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == f"kafka-saga: {path}: storage.ulr: unknown key (did you mean 'url'?)\n"
    assert not database.exists()


def test_missing_config_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "missing.yml"
    assert main(["stats", "--config", str(missing)]) == 2
    assert capsys.readouterr().err == f"kafka-saga: {missing}: configuration file not found\n"


def test_missing_environment_variable_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SAGA_CLI_TEST_UNSET", raising=False)
    path = tmp_path / "env.yml"
    path.write_text("storage:\n  url: ${SAGA_CLI_TEST_UNSET}\n", encoding="utf-8")
    assert main(["list", "--config", str(path)]) == 2
    assert capsys.readouterr().err == (
        f"kafka-saga: {path}: storage.url: "
        "environment variable SAGA_CLI_TEST_UNSET is not set and has no default\n"
    )


def test_config_error_in_a_subprocess(tmp_path: Path) -> None:
    path, database = bad_config(tmp_path)
    result = run_cli("stats", "--config", str(path))
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.strip() == f"kafka-saga: {path}: storage.ulr: unknown key (did you mean 'url'?)"
    assert not database.exists()


# -- which configuration is used ------------------------------------------------------------------------


def test_config_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SAGA_CONFIG", TEST_CONFIG)
    assert resolve_config(None).source == TEST_CONFIG


def test_explicit_config_wins_over_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SAGA_CONFIG", "/nonexistent.yml")
    assert resolve_config(TEST_CONFIG).source == TEST_CONFIG


def test_default_file_in_the_working_directory(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SAGA_CONFIG", raising=False)
    monkeypatch.chdir(REPO)
    assert resolve_config(None).source == "config/default.yml"


def test_embedded_default_elsewhere(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("SAGA_CONFIG", raising=False)
    monkeypatch.chdir(tmp_path)
    config = resolve_config(None)
    assert config.source == EMBEDDED_SOURCE
    assert config.sagas == ("saga.demo:ORDER_SAGA",)


# -- unknown executions ---------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["show", "retry", "replay", "set-attempts"])
def test_unknown_id_exits_1_with_a_clear_message(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    missing = uuid.uuid4()
    argv = [command, str(missing), "--config", TEST_CONFIG]
    if command == "set-attempts":
        argv.insert(2, "0")
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert f"kafka-saga: saga execution {missing} not found in storage.url memory:// from " in err
