"""The ``kafka-saga`` command line: argument parsing, configuration and error handling.

Exit codes: 0 success; 1 the operation failed (unknown execution, wrong status, service unreachable, demo
sagas not in their expected status); 2 usage or configuration error (nothing was written); 130
interrupted.
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

import orjson
import yaml

from broker import BrokerError
from saga.config import SagaConfig, load_config
from saga.config.embedded import CONFIG_ENV, DEFAULT_CONFIG_PATH, EMBEDDED_CONFIG
from saga.config.model import LoggingConfig
from saga.errors import SagaBusyError, SagaConfigError, SagaError, SagaStateError
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


def execution_id(text: str) -> uuid.UUID:
    """argparse type of an execution id."""
    try:
        return uuid.UUID(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an execution id (expected a UUID)") from None


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
    from saga.cli import admin, demo, participant, worker

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
        sub.add_argument("id", type=execution_id, metavar="ID", help="execution id")
        return sub

    def add_paging(sub: argparse.ArgumentParser, *, limit: int) -> None:
        """The filters and paging every listing takes, ``limit`` rows by default."""
        sub.add_argument("--name", action="append", metavar="SAGA", help="only this saga (repeatable)")
        sub.add_argument(
            "--limit", type=_positive, default=limit, metavar="N", help=f"at most N rows (default {limit})"
        )
        sub.add_argument("--offset", type=_non_negative, default=0, metavar="N", help="skip the first N rows")

    add(
        "worker",
        worker.run_worker,
        "Run the reply consumer, the outbox relay and the recovery worker until SIGTERM/SIGINT.",
    )
    add(
        "participant",
        participant.run_participant,
        "Run the participant service of the configuration's participant section until SIGTERM/SIGINT.",
    )

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

    add_on_one(
        "show", admin.cmd_show, "Show one execution: its steps, attempts, timings, errors and replies."
    )

    add("stats", admin.cmd_stats, "Count executions by status.", as_json)

    add_on_one(
        "retry",
        admin.cmd_retry,
        "Move a DEAD_LETTER execution back to recovery (its recovery attempts start again from 0).",
    )

    add_on_one(
        "replay",
        admin.cmd_replay,
        "Re-send the command a paused execution is waiting on (same request id and idempotency key).",
    )

    p = add_on_one(
        "set-attempts",
        admin.cmd_set_attempts,
        "Set an execution's recovery attempts (0 makes it eligible for recovery again).",
    )
    p.add_argument("attempts", type=_non_negative, metavar="N", help="new number of recovery attempts")

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


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        data = {
            "time": self.formatTime(record),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            data["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(data).decode()


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
        formatter = _JsonFormatter()
    elif config.format == "text":
        formatter = logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    else:
        formatter = logging.Formatter(config.format)
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
    try:
        return handler(args)
    except SagaConfigError as exc:
        _fail(str(exc))
        return 2
    except CommandError as exc:
        _fail(str(exc))
        return exc.code
    except ExecutionNotFoundError as exc:
        _fail(str(exc))
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


def _fail(message: str) -> None:
    sys.stdout.flush()
    print(f"{PROG}: {message}", file=sys.stderr)
