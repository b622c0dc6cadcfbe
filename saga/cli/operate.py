"""Operator commands that change executions: ``cancel`` one, ``retry`` many, and their list filters.

``cancel`` goes through `SagaManager.cancel`, the path a failed step takes (claim, store COMPENSATING,
compensate), so it is as durable as any step. Bulk ``retry`` lists what it would move and asks before it
moves anything; each execution is retried on its own, so one that changed meanwhile fails alone.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import re
import sys
import uuid
from datetime import UTC, datetime, timedelta

from saga.cli.admin import _config, _manager, _status_label
from saga.cli.admin import cmd_retry as retry_one
from saga.cli.app import CommandError
from saga.cli.output import execution_to_json, print_json
from saga.errors import SagaBusyError, SagaStateError
from storage import ExecutionQuery, ExecutionRecord, SagaStatus, SagaStorage

__all__ = ["add_list_filters", "cmd_cancel", "cmd_retry", "parse_time"]

_audit = logging.getLogger("saga.audit")

_RELATIVE = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhd])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


def parse_time(text: str) -> datetime:
    """argparse type of an instant: ISO-8601 (UTC when it names no zone) or an age such as ``15m``, ``2h``."""
    value = text.strip()
    relative = _RELATIVE.match(value)
    if relative:
        amount, unit = relative.groups()
        return datetime.now(UTC) - timedelta(**{_UNITS[unit]: float(amount)})
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is neither an ISO-8601 time (2026-01-02T03:04:05Z) nor an age (30s, 15m, 2h, 7d)"
        ) from None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


def add_list_filters(sub: argparse.ArgumentParser) -> None:
    """``list``'s filters beyond status and name."""
    sub.add_argument("--idempotency-key", metavar="KEY", help="only the execution started with this key")
    sub.add_argument(
        "--since", type=parse_time, metavar="TIME", help="created at or after TIME (ISO-8601 UTC, or 2h ago)"
    )
    sub.add_argument("--until", type=parse_time, metavar="TIME", help="created before TIME")
    sub.add_argument(
        "--overdue", action="store_true", help="only PAUSED executions whose reply deadline has passed"
    )
    sub.add_argument("--error", metavar="TEXT", help="only executions whose error contains TEXT")


# -- cancel --------------------------------------------------------------------------------------------


def cmd_cancel(args: argparse.Namespace) -> int:
    """``kafka-saga cancel ID``."""
    config = _config(args)
    manager = _manager(config)
    saga_id: uuid.UUID = args.id
    reason = args.reason or "cancelled by an operator"

    async def apply() -> tuple[ExecutionRecord, ExecutionRecord]:
        async with manager:
            before = await manager.storage.load(saga_id)
            await manager.cancel(saga_id, reason=reason)
            return before, await manager.storage.load(saga_id)

    before, after = asyncio.run(apply())
    _audit.warning(
        "cancel execution %s (%s): %s -> %s",
        saga_id,
        reason,
        before.status.value,
        after.status.value,
        extra={"execution_id": str(saga_id), "saga": after.name, "action": "cancel"},
    )
    if args.json:
        print_json({**execution_to_json(after), "previous_status": before.status.value})
        return 0
    print(
        f"execution {after.id}: {_status_label(before.status)} -> {_status_label(after.status)} (cancelled)"
    )
    if after.status is SagaStatus.COMPENSATING or after.status is SagaStatus.PAUSED:
        print("its compensations continue as their replies arrive (kafka-saga worker)")
    return 0


# -- retry, one or many --------------------------------------------------------------------------------


def cmd_retry(args: argparse.Namespace) -> int:
    """``kafka-saga retry ID`` or ``kafka-saga retry --status dead_letter [--name X] [--yes]``."""
    if args.id is not None:
        if args.status or args.name:
            raise CommandError("give either an execution ID or --status/--name, not both", code=2)
        return retry_one(args)
    if not args.status:
        raise CommandError("retry needs an execution ID, or --status (and --name) to retry many", code=2)
    statuses: list[SagaStatus] = list(args.status)
    wrong = [s.value for s in statuses if s not in (SagaStatus.DEAD_LETTER, SagaStatus.FAILED)]
    if wrong:
        raise CommandError(f"--status {', '.join(wrong)}: only dead_letter and failed can be retried", code=2)
    config = _config(args)
    manager = _manager(config)
    query = ExecutionQuery(statuses=statuses, names=args.name or None)

    async def matching(storage: SagaStorage) -> list[ExecutionRecord]:
        found: list[ExecutionRecord] = []
        after = None
        while True:
            page = await storage.query(dataclasses.replace(query, after=after, limit=500))
            found.extend(page.rows)
            if len(page.rows) < 500:
                return found
            last = page.rows[-1]
            assert last.created_at is not None
            after = (last.created_at, last.id)

    async def go() -> tuple[int, list[str]]:
        async with manager.storage:
            targets = await matching(manager.storage)
            if not targets:
                return 0, []
            if not args.yes and not _confirm(targets):
                raise CommandError("nothing retried (not confirmed)")
            moved, problems = 0, []
            for record in targets:
                try:
                    await manager.retry(record.id)
                    moved += 1
                    _audit.warning(
                        "retry execution %s: %s -> failed",
                        record.id,
                        record.status.value,
                        extra={"execution_id": str(record.id), "saga": record.name, "action": "retry"},
                    )
                except (SagaStateError, SagaBusyError) as exc:
                    problems.append(f"{record.id}: {exc}")
            return moved, problems

    moved, problems = asyncio.run(go())
    if args.json:
        print_json({"retried": moved, "failed": problems})
    elif moved == 0 and not problems:
        print("no executions match")
    else:
        print(f"retried {moved} execution{'s' if moved != 1 else ''}; a worker with recovery resumes them")
        for problem in problems:
            print(f"  not retried: {problem}")
    return 1 if problems else 0


def _confirm(targets: list[ExecutionRecord]) -> bool:
    names = sorted({f"{r.name} v{r.definition_version}" for r in targets})
    print(f"{len(targets)} execution(s) would move back to recovery ({', '.join(names)}):")
    for record in targets[:10]:
        print(f"  {record.id}  {_status_label(record.status)}")
    if len(targets) > 10:
        print(f"  ... and {len(targets) - 10} more")
    print("retry them? [y/N] ", end="", flush=True)
    answer = sys.stdin.readline().strip().lower()  # end of input counts as no
    print()
    return answer in ("y", "yes")
