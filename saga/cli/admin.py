"""Administration commands: inspect and repair executions in the configured storage."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import sys
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import orjson

from saga.cli.app import CommandError, configure_logging, resolve_config
from saga.cli.output import (
    decode_context,
    execution_to_json,
    format_duration,
    format_error,
    format_time,
    is_overdue,
    print_json,
    render_table,
    reply_to_json,
    step_to_json,
)
from saga.config import SagaConfig, build_storage, import_sagas
from saga.manager import SagaManager
from saga.parking import unregistered_definitions
from storage import (
    TERMINAL_STATUSES,
    ExecutionQuery,
    ExecutionRecord,
    QueryResult,
    SagaStatus,
    SagaStorage,
)

__all__ = [
    "cmd_db_upgrade",
    "cmd_dead_letter",
    "cmd_list",
    "cmd_replay",
    "cmd_retry",
    "cmd_set_attempts",
    "cmd_show",
    "cmd_stats",
    "resolve_id_prefix",
    "store",
]

_T = TypeVar("_T")


def _config(args: argparse.Namespace) -> SagaConfig:
    config = resolve_config(args.config)
    configure_logging(config.logging)
    args.looked_in = store(config)  # named by `main` when an id is not found
    if config.storage.is_memory:
        print(
            "kafka-saga: note: storage.url is memory://, so this process sees only its own (empty) store",
            file=sys.stderr,
        )
    return config


def _read_only(args: argparse.Namespace) -> SagaConfig:
    """The configuration of a command that only reads (``list``, ``show``, ``stats``, ...).

    It never creates a database nor migrates one: a SQLite file that does not exist is reported, with
    the store the command looked in, instead of being created empty.
    """
    config = _config(args)
    path = _sqlite_file(config.storage.url)
    if path is not None and not path.exists():
        raise CommandError(
            f"no saga database at {path} ({store(config)}): nothing has run with this configuration "
            "here; name yours with --config PATH or $SAGA_CONFIG"
        )
    return dataclasses.replace(config, storage=dataclasses.replace(config.storage, auto_migrate=False))


def store(config: SagaConfig) -> str:
    """Which store a command looked in, for its messages: the URL (password hidden) and its source."""
    return f"storage.url {config.storage.safe_url} from {config.source or 'the embedded default'}"


def _sqlite_file(url: str) -> Path | None:
    if not url.startswith("sqlite"):
        return None
    from sqlalchemy.engine import make_url

    database = make_url(url).database
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    return Path(database)


def _run(config: SagaConfig, fn: Callable[[SagaStorage], Awaitable[_T]]) -> _T:
    return _run_with(build_storage(config), fn)


def _saga_label(record: ExecutionRecord) -> str:
    return f"{record.name} v{record.definition_version}"


def _status_label(status: SagaStatus) -> str:
    return status.value.upper()


# -- list / dead-letter --------------------------------------------------------------------------------


def cmd_list(args: argparse.Namespace) -> int:
    """``kafka-saga list``."""
    config = _read_only(args)
    query = ExecutionQuery(
        statuses=args.status or None,
        names=args.name or None,
        idempotency_key=args.idempotency_key,
        created_after=args.since,
        created_before=args.until,
        overdue=True if args.overdue else None,
        error_text=args.error,
        limit=args.limit,
        offset=args.offset,
    )
    result = _run(config, lambda storage: storage.query(query))
    if args.json:
        _print_page_json(result, args)
        return 0
    now = datetime.now(UTC)
    rows = [
        (
            str(r.id),
            _saga_label(r),
            _status_label(r.status) + (" (overdue)" if is_overdue(r, now) else ""),
            r.recovery_attempts,
            format_time(r.created_at),
            format_time(r.updated_at),
            format_error(r.error, width=60),
        )
        for r in result.rows
    ]
    print(render_table(("ID", "SAGA", "STATUS", "RECOVERY", "CREATED (UTC)", "UPDATED (UTC)", "ERROR"), rows))
    print(_page_footer(len(result.rows), result.total, args.offset, "execution"))
    return 0


def _print_page_json(result: QueryResult, args: argparse.Namespace) -> None:
    """The ``--json`` page of a listing; ``list`` and ``dead-letter`` share it so scripts parse one shape."""
    print_json(
        {
            "total": result.total,
            "offset": args.offset,
            "limit": args.limit,
            "executions": [execution_to_json(r) for r in result.rows],
        }
    )


def _page_footer(shown: int, total: int, offset: int, noun: str) -> str:
    plural = noun if total == 1 else f"{noun}s"
    if shown == 0:
        return f"no {noun}s shown; {total} {plural} match" if total else f"no {noun}s match"
    return f"{offset + 1}-{offset + shown} of {total} {plural}"


def cmd_dead_letter(args: argparse.Namespace) -> int:
    """``kafka-saga dead-letter``."""
    config = _read_only(args)
    query = ExecutionQuery(
        statuses=[SagaStatus.DEAD_LETTER], names=args.name or None, limit=args.limit, offset=args.offset
    )
    result = _run(config, lambda storage: storage.query(query))
    if args.json:
        _print_page_json(result, args)
        return 0
    rows = [
        (
            str(r.id),
            _saga_label(r),
            r.recovery_attempts,
            format_time(r.updated_at),
            (r.error or {}).get("step"),
            format_error(r.error, width=70),
        )
        for r in result.rows
    ]
    print(render_table(("ID", "SAGA", "RECOVERY", "SINCE (UTC)", "STEP", "ERROR"), rows))
    print(_page_footer(len(result.rows), result.total, args.offset, "dead-lettered execution"))
    if result.rows:
        print("retry one with: kafka-saga retry ID")
    return 0


# -- show ----------------------------------------------------------------------------------------------


def cmd_show(args: argparse.Namespace) -> int:
    """``kafka-saga show ID``."""
    config = _read_only(args)
    saga_id: uuid.UUID = args.id

    async def fetch(storage: SagaStorage) -> tuple[ExecutionRecord, list[Any]]:
        record = await storage.load(saga_id)
        return record, await storage.list_replies(saga_id)

    record, replies = _run(config, fetch)
    if args.json:
        data = execution_to_json(record, with_state=True)
        data["steps"] = [step_to_json(s) for s in record.steps]
        data["replies"] = [reply_to_json(r) for r in replies]
        print_json(data)
        return 0
    overview = [
        ("execution", str(record.id)),
        ("saga", _saga_label(record)),
        ("status", _status_label(record.status)),
        ("created", f"{format_time(record.created_at)} UTC"),
        ("updated", f"{format_time(record.updated_at)} UTC"),
        ("duration", format_duration(record.created_at, record.updated_at)),
        ("recovery", f"{record.recovery_attempts} attempt(s)"),
        ("version", record.version),
        ("idempotency", record.idempotency_key),
        ("user", record.user),
        ("reply due", _reply_due(record)),
        ("claimed by", _claim(record)),
        ("error", format_error(record.error, width=None)),
    ]
    for label, value in overview:
        if value is not None or label in ("error",):
            print(f"{label + ':':<13}{'-' if value is None else value}")
    context = decode_context(record.state)
    if context:
        print()
        print("Context")
        for key, value in context.items():
            shown = orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS).decode()
            print(f"  {key}: {shown if len(shown) <= 100 else shown[:99] + '…'}")
    print()
    print(f"Steps ({len(record.steps)})")
    if record.steps:
        rows = [
            (
                index,
                s.name,
                s.kind,
                s.phase,
                s.status.upper(),
                s.attempts,
                format_time(s.started_at),
                format_duration(s.started_at, s.finished_at),
                format_error(s.error, width=60),
            )
            for index, s in enumerate(record.steps, start=1)
        ]
        print(
            render_table(
                ("#", "STEP", "KIND", "PHASE", "STATUS", "ATTEMPTS", "STARTED (UTC)", "TOOK", "ERROR"),
                rows,
                indent="  ",
            )
        )
    else:
        print("  (none)")
    print()
    print(f"Replies ({len(replies)})")
    if replies:
        steps_by_request = {
            s.request_id: f"{s.name} ({s.phase})" for s in record.steps if s.request_id is not None
        }
        reply_rows = [
            (
                format_time(r.received_at),
                steps_by_request.get(r.request_id),
                str(r.request_id),
                r.status,
                r.outcome,
                r.reason,
            )
            for r in replies
        ]
        print(
            render_table(
                ("RECEIVED (UTC)", "STEP", "REQUEST", "STATUS", "OUTCOME", "REASON"), reply_rows, indent="  "
            )
        )
    else:
        print("  (none)")
    return 0


def _reply_due(record: ExecutionRecord) -> str | None:
    """When the awaited reply is due, marked ``OVERDUE`` once that has passed."""
    if record.reply_deadline is None:
        return None
    due = f"{format_time(record.reply_deadline)} UTC"
    now = datetime.now(UTC)
    if is_overdue(record, now):
        return f"{due}  OVERDUE by {format_duration(record.reply_deadline, now)}"
    return due


def _claim(record: ExecutionRecord) -> str | None:
    """Who is advancing the execution right now (a live claim on an unfinished one), if anyone."""
    if record.owner is None or record.lease_until is None or record.status in TERMINAL_STATUSES:
        return None
    if record.lease_until <= datetime.now(UTC):
        return f"{record.owner} (lease expired {format_time(record.lease_until)} UTC)"
    return f"{record.owner} until {format_time(record.lease_until)} UTC"


# -- stats ---------------------------------------------------------------------------------------------


def cmd_stats(args: argparse.Namespace) -> int:
    """``kafka-saga stats``."""
    config = _read_only(args)
    registered = [(saga.name, saga.version) for saga in import_sagas(config) if saga.name is not None]

    async def fetch(storage: SagaStorage) -> tuple[dict[SagaStatus, int], dict[tuple[str, int], int]]:
        counts = await storage.count_by_status()
        # Without sagas in the configuration there is nothing to compare with.
        waiting = await unregistered_definitions(storage, registered) if registered else {}
        return counts, waiting

    counts, waiting = _run(config, fetch)
    total = sum(counts.values())
    if args.json:
        unregistered = [{"saga": n, "version": v, "count": c} for (n, v), c in sorted(waiting.items())]
        print_json(
            {
                "counts": {s.value: counts.get(s, 0) for s in SagaStatus},
                "total": total,
                "unregistered": unregistered,
            }
        )
        return 0
    rows = [(_status_label(s), counts.get(s, 0)) for s in SagaStatus]
    rows.append(("TOTAL", total))
    print(render_table(("STATUS", "COUNT"), rows))
    if waiting:
        print()
        print("Unfinished executions whose definition version the configuration does not register")
        print("(their replies wait with them until a process that registers the version runs):")
        print(
            render_table(("SAGA", "VERSION", "COUNT"), [(n, v, c) for (n, v), c in sorted(waiting.items())])
        )
    return 0


# -- repairs -------------------------------------------------------------------------------------------


def cmd_set_attempts(args: argparse.Namespace) -> int:
    """``kafka-saga set-attempts ID N``."""
    config = _config(args)
    saga_id: uuid.UUID = args.id

    async def apply(storage: SagaStorage) -> tuple[ExecutionRecord, ExecutionRecord]:
        before = await storage.load(saga_id)
        if before.status in (SagaStatus.FINISHED, SagaStatus.ERRORED):
            raise CommandError(
                f"execution {saga_id} is {_status_label(before.status)}, which recovery never picks up: "
                "its recovery attempts mean nothing, so nothing was changed"
            )
        await storage.set_recovery_attempts(saga_id, args.attempts)
        return before, await storage.load(saga_id)

    before, after = _run(config, apply)
    if args.json:
        print_json({**execution_to_json(after), "previous_recovery_attempts": before.recovery_attempts})
        return 0
    print(
        f"execution {after.id}: recovery attempts {before.recovery_attempts} -> {after.recovery_attempts} "
        f"(status {_status_label(after.status)})"
    )
    if after.status is SagaStatus.DEAD_LETTER:
        print("it stays DEAD_LETTER until retried: kafka-saga retry ID")
    return 0


def _manager(config: SagaConfig) -> SagaManager:
    """A manager for one administrative operation: no reply consumer, no relay."""
    from saga.config import build_manager

    return build_manager(config, consume_replies=False, relay_outbox=False)


def cmd_retry(args: argparse.Namespace) -> int:
    """``kafka-saga retry ID``."""
    config = _config(args)
    manager = _manager(config)
    saga_id: uuid.UUID = args.id

    async def apply(storage: SagaStorage) -> tuple[ExecutionRecord, ExecutionRecord]:
        before = await storage.load(saga_id)
        return before, await manager.retry(saga_id)

    before, after = _run_with(manager.storage, apply)
    if args.json:
        print_json(
            {
                **execution_to_json(after),
                "previous_status": before.status.value,
                "previous_recovery_attempts": before.recovery_attempts,
            }
        )
        return 0
    print(
        f"execution {after.id}: {_status_label(before.status)} -> {_status_label(after.status)}, "
        f"recovery attempts {before.recovery_attempts} -> {after.recovery_attempts}"
    )
    print("a running `kafka-saga worker` with recovery enabled resumes it from the step that failed")
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    """``kafka-saga replay ID``."""
    config = _config(args)
    manager = _manager(config)
    saga_id: uuid.UUID = args.id
    if config.broker.type == "memory":

        async def check(storage: SagaStorage) -> None:
            await storage.load(saga_id)  # an unknown id is reported as such first

        _run_with(manager.storage, check)
        raise CommandError(
            "replay publishes the pending command, and broker.type is memory: no other process would "
            "receive it. Use a Kafka configuration (or let the worker's recovery replay overdue steps)."
        )

    async def apply() -> ExecutionRecord:
        async with manager:
            await manager.replay(saga_id)
            return await manager.storage.load(saga_id)

    after = asyncio.run(apply())
    awaited = _awaited_step(after)
    if args.json:
        print_json({**execution_to_json(after), "replayed_step": awaited})
        return 0
    print(
        f"execution {after.id}: re-sent the command of step {awaited or '?'} ({_status_label(after.status)})"
    )
    return 0


def _awaited_step(record: ExecutionRecord) -> str | None:
    waiting = [s for s in record.steps if s.status == "waiting"]
    return waiting[-1].name if waiting else None


def _run_with(storage: SagaStorage, fn: Callable[[SagaStorage], Awaitable[_T]]) -> _T:
    async def go() -> _T:
        async with storage:
            return await fn(storage)

    return asyncio.run(go())


def resolve_id_prefix(args: argparse.Namespace, prefix: str) -> uuid.UUID:
    """The execution whose id starts with ``prefix`` (``kafka-saga show 3f2a9c1e``), in the store the
    command would use. Reads pages of ids only; refuses a prefix that matches none or several."""
    config = _read_only(args)
    wanted = prefix.lower()
    page = 500

    async def scan(storage: SagaStorage) -> list[uuid.UUID]:
        found: list[uuid.UUID] = []
        offset = 0
        while len(found) < 2:
            result = await storage.query(ExecutionQuery(limit=page, offset=offset))
            found.extend(r.id for r in result.rows if str(r.id).startswith(wanted))
            offset += page
            if offset >= result.total or not result.rows:
                break
        return found

    found = _run(config, scan)
    if not found:
        raise CommandError(f"no execution id starts with {prefix!r} in {store(config)}")
    if len(found) > 1:
        raise CommandError(
            f"{prefix!r} is the start of several execution ids ({found[0]}, {found[1]}, ...); give more of it"
        )
    return found[0]


def cmd_db_upgrade(args: argparse.Namespace) -> int:
    """``kafka-saga db upgrade``."""
    config = resolve_config(args.config)
    configure_logging(config.logging)
    if config.storage.is_memory:
        print("storage.url is memory://: there is no database schema to upgrade")
        return 0
    try:
        from storage import migrate
    except ImportError as exc:
        raise CommandError(f"database migrations are not available ({exc})") from exc
    from alembic.util import CommandError as AlembicError

    try:
        migrate.upgrade(config.storage.url, args.revision, schema=config.storage.schema)
    except AlembicError as exc:
        known = ", ".join(["head", *migrate.revisions()])
        raise CommandError(f"--revision {args.revision!r}: {exc} (known revisions: {known})") from exc
    print(f"database schema is at {args.revision}")
    return 0
