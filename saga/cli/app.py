"""The ``kafka-saga`` command line: argument parsing, configuration and error handling.

Exit codes: 0 success; 1 the operation failed (unknown execution, wrong status, service unreachable, demo
sagas not in their expected status); 2 usage or configuration error (nothing was written); 130
interrupted; 141 the reader of the output went away (``kafka-saga list | head``), as SIGPIPE would.

As with ``python -m``, the current directory is importable, so ``sagas: [mymodule:SAGA]`` finds
``./mymodule.py``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TextIO

import yaml

from broker import BrokerError
from saga.config import SagaConfig, load_config
from saga.config.embedded import CONFIG_ENV, DEFAULT_CONFIG_PATH, EMBEDDED_CONFIG
from saga.config.model import LoggingConfig
from saga.errors import SagaBusyError, SagaConfigError, SagaError, SagaStateError
from saga.observability.logs import JsonFormatter, text_formatter
from storage import ExecutionNotFoundError, SagaStatus, StorageError

__all__ = ["build_parser", "configure_logging", "main", "resolve_config"]

PROG = "kafka-saga"
EMBEDDED_SOURCE = f"<embedded {DEFAULT_CONFIG_PATH}>"

Handler = Callable[[argparse.Namespace], int]


class CommandError(Exception):
    """A command failed in a way the user can act on; printed without a traceback, exit code 1."""

    def __init__(self, message: str, *, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("kafka-saga")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
        return "unknown"


class IdPrefix(str):
    """The start of an execution id, resolved against the store before the command runs."""

    __slots__ = ()


#: Shortest id prefix accepted: fewer hex digits match too many executions to be worth a scan.
MIN_PREFIX = 4


def execution_id(text: str) -> uuid.UUID | IdPrefix:
    """argparse type of an execution id: a whole UUID, or an unambiguous start of one (``3f2a9c1e``)."""
    text = text.strip()
    try:
        return uuid.UUID(text)
    except ValueError:
        pass
    digits = text.replace("-", "").lower()
    if len(digits) >= MIN_PREFIX and len(digits) < 32 and all(c in "0123456789abcdef" for c in digits):
        return IdPrefix(text.lower())
    raise argparse.ArgumentTypeError(
        f"{text!r} is not an execution id (expected a UUID, or at least its first {MIN_PREFIX} hex digits)"
    )


def _non_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def _positive(text: str) -> int:
    value = _non_negative(text)
    if value == 0:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _status(text: str) -> list[SagaStatus]:
    statuses = []
    for part in text.split(","):
        name = part.strip().lower()
        try:
            statuses.append(SagaStatus(name))
        except ValueError:
            valid = ", ".join(s.value for s in SagaStatus)
            raise argparse.ArgumentTypeError(f"unknown status {part.strip()!r} (one of: {valid})") from None
    return statuses


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``kafka-saga`` and all its subcommands."""
    from saga.cli import admin, conformance, demo, operate, participant, ui, worker

    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Saga orchestrator for event-driven microservices over Kafka: run the worker, the demo, "
        "and inspect or repair saga executions.",
        epilog=f"Every command takes --config PATH (default: ${CONFIG_ENV}, else {DEFAULT_CONFIG_PATH}, else "
        "the embedded default). Exit codes: 0 ok, 1 failed, 2 usage or configuration error.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    config_help = f"YAML configuration file (default: ${CONFIG_ENV}, else {DEFAULT_CONFIG_PATH})"
    # Accepted before the command too (`kafka-saga --config F demo`); the subcommand's own --config
    # defaults to SUPPRESS so it never overwrites one given before the command.
    parser.add_argument("--config", metavar="PATH", default=None, help=config_help)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", metavar="PATH", default=argparse.SUPPRESS, help=config_help)
    as_json = argparse.ArgumentParser(add_help=False)
    as_json.add_argument("--json", action="store_true", help="print JSON for scripts instead of a table")

    def add(
        name: str, handler: Handler, help_text: str, *parents: argparse.ArgumentParser
    ) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text, parents=[common, *parents])
        sub.set_defaults(handler=handler)
        return sub

    def add_on_one(name: str, handler: Handler, help_text: str) -> argparse.ArgumentParser:
        """A command about one execution: ``kafka-saga NAME ID``."""
        sub = add(name, handler, help_text, as_json)
        sub.add_argument(
            "id", type=execution_id, metavar="ID", help="execution id, or an unambiguous start of one"
        )
        return sub

    def add_paging(sub: argparse.ArgumentParser, *, limit: int) -> None:
        """The filters and paging every listing takes, ``limit`` rows by default."""
        sub.add_argument("--name", action="append", metavar="SAGA", help="only this saga (repeatable)")
        sub.add_argument(
            "--limit", type=_positive, default=limit, metavar="N", help=f"at most N rows (default {limit})"
        )
        sub.add_argument("--offset", type=_non_negative, default=0, metavar="N", help="skip the first N rows")

    p = add(
        "worker",
        worker.run_worker,
        "Run the reply consumer, the outbox relay and the recovery worker until SIGTERM/SIGINT.",
    )
    p.add_argument("--metrics-port", type=_positive, metavar="PORT", help="serve Prometheus /metrics here")
    p = add(
        "participant",
        participant.run_participant,
        "Run the participant service of the configuration's participant section until SIGTERM/SIGINT.",
    )
    p.add_argument("--metrics-port", type=_positive, metavar="PORT", help="serve Prometheus /metrics here")

    p = add(
        "demo",
        demo.run_demo,
        "Run a batch of demo orders through the order saga with in-process participants, then check "
        "every saga reached its expected status.",
    )
    p.add_argument("--orders", type=_positive, default=20, metavar="N", help="orders to place (default 20)")
    p.add_argument(
        "--concurrency", type=_positive, default=8, metavar="N", help="orders in flight at once (default 8)"
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=120.0,
        metavar="SECONDS",
        help="give up after this long (default 120)",
    )
    p.add_argument("--no-crash", action="store_true", help="do not simulate a crashed execution")

    p = add("list", admin.cmd_list, "List saga executions, newest first.", as_json)
    p.add_argument(
        "--status",
        type=_status,
        action="extend",
        metavar="STATUS",
        help="only these statuses (repeat or comma-separate: --status failed,dead_letter)",
    )
    add_paging(p, limit=20)
    operate.add_list_filters(p)

    add_on_one(
        "show", admin.cmd_show, "Show one execution: its steps, attempts, timings, errors and replies."
    )

    add("stats", admin.cmd_stats, "Count executions by status.", as_json)

    p = add(
        "retry",
        operate.cmd_retry,
        "Move a DEAD_LETTER or FAILED execution back to recovery (as FAILED, its recovery attempts "
        "starting again from 0); with --status (and --name) instead of an ID, every matching one, after "
        "confirmation.",
        as_json,
    )
    p.add_argument(
        "id", type=execution_id, metavar="ID", nargs="?", help="execution id, or an unambiguous start of one"
    )
    p.add_argument("--status", type=_status, action="extend", metavar="STATUS", help="retry all in STATUS")
    p.add_argument("--name", action="append", metavar="SAGA", help="only this saga (repeatable)")
    p.add_argument("--yes", action="store_true", help="do not ask for confirmation")

    p = add_on_one(
        "cancel",
        operate.cmd_cancel,
        "Stop an execution going forward and compensate the steps it did (as a failed step would).",
    )
    p.add_argument("--reason", metavar="TEXT", help="stored in the execution's error (default: operator)")

    add_on_one(
        "replay",
        admin.cmd_replay,
        "Re-send the command a paused execution is waiting on (same request id and idempotency key).",
    )

    p = add_on_one(
        "set-attempts",
        admin.cmd_set_attempts,
        "Set an execution's recovery attempts (0 makes it eligible for recovery again); refused for "
        "FINISHED and ERRORED executions, which recovery never picks up.",
    )
    p.add_argument("attempts", type=_non_negative, metavar="N", help="new number of recovery attempts")

    p = add("ui", ui.cmd_ui, "Serve the web console: executions, timelines and (with a token) actions.")
    ui.add_arguments(p)

    p = add("dead-letter", admin.cmd_dead_letter, "List DEAD_LETTER executions with their errors.", as_json)
    add_paging(p, limit=50)

    db = commands.add_parser("db", help="Database schema commands.", description="Database schema commands.")
    db_commands = db.add_subparsers(dest="db_command", metavar="COMMAND", required=True)
    p = db_commands.add_parser(
        "upgrade",
        help="Bring the database schema up to date (Alembic upgrade to head).",
        description="Bring the database schema up to date (Alembic upgrade to head).",
        parents=[common],
    )
    p.add_argument("--revision", default="head", help="target revision (default head)")
    p.set_defaults(handler=admin.cmd_db_upgrade)
    conformance.add_command(commands, common, as_json)
    return parser


def resolve_config(path: str | None) -> SagaConfig:
    """The configuration a command uses: ``--config``, else ``$SAGA_CONFIG``, else ``config/default.yml``
    in the current directory, else the embedded copy of it.

    Raises:
        SagaConfigError: The file is missing (when named explicitly) or invalid.
    """
    if path:
        return load_config(path)
    from_env = os.environ.get(CONFIG_ENV)
    if from_env:
        return load_config(from_env)
    if Path(DEFAULT_CONFIG_PATH).is_file():
        return load_config(DEFAULT_CONFIG_PATH)
    return load_config(yaml.safe_load(EMBEDDED_CONFIG), source_name=EMBEDDED_SOURCE)


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is at the time (tests swap it), not the one at creation."""

    _kafka_saga = True

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, value: TextIO) -> None:
        pass


#: Libraries whose INFO lines are noise in a command's output (Alembic announces every migration check).
_QUIET_LOGGERS = ("alembic", "aiokafka")


def configure_logging(config: LoggingConfig) -> None:
    """Send the process's logs to stderr as ``logging.level`` / ``logging.format`` say."""
    handler = _StderrHandler()
    formatter: logging.Formatter
    if config.format == "json":
        formatter = JsonFormatter()
    elif config.format == "text":
        formatter = text_formatter()
    else:
        formatter = text_formatter(config.format)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in list(root.handlers):
        if getattr(old, "_kafka_saga", False):
            root.removeHandler(old)
    root.addHandler(handler)
    level = logging.getLevelName(config.level.upper())
    root.setLevel(level)
    for name in _QUIET_LOGGERS:
        logging.getLogger(name).setLevel(level if level <= logging.DEBUG else max(level, logging.WARNING))


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``kafka-saga`` with ``argv`` (default: the process's arguments); return the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, usage errors: argparse already printed
        return exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 2
    handler: Handler = args.handler
    _current_directory_importable()
    try:
        if isinstance(getattr(args, "id", None), IdPrefix):
            from saga.cli.admin import resolve_id_prefix

            args.id = resolve_id_prefix(args, args.id)
        code = handler(args)
        sys.stdout.flush()  # a closed pipe shows here, not at interpreter exit
        return code
    except BrokenPipeError:
        # The reader stopped reading (`| head`): no traceback, and nothing more to flush at exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141
    except SagaConfigError as exc:
        _fail(str(exc))
        return 2
    except CommandError as exc:
        _fail(str(exc))
        return exc.code
    except ExecutionNotFoundError as exc:
        where = getattr(args, "looked_in", None)
        _fail(f"{exc} in {where}" if where else str(exc))
        return 1
    except (SagaStateError, SagaBusyError) as exc:
        _fail(str(exc))
        return 1
    except (SagaError, StorageError, BrokerError) as exc:
        _fail(f"{type(exc).__name__}: {exc}")
        return 1
    except KeyboardInterrupt:
        _fail("interrupted")
        return 130


def _current_directory_importable() -> None:
    """Put the current directory first on the import path, as ``python -m`` does (a console script
    gets its own directory instead), so configuration entries like ``mymodule:SAGA`` import."""
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)


def _fail(message: str) -> None:
    sys.stdout.flush()
    print(f"{PROG}: {message}", file=sys.stderr)
