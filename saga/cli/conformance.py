"""``kafka-saga conformance participant``: check a running participant against docs/protocol.md."""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

import orjson

from saga.cli.app import CommandError, configure_logging, resolve_config
from saga.cli.output import print_json, render_table
from saga.config import build_broker_pool
from saga.conformance import ConformanceReport, ParticipantKit

__all__ = ["add_command", "cmd_participant"]


def _json_value(text: str) -> Any:
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from None


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def add_command(commands: Any, common: argparse.ArgumentParser, as_json: argparse.ArgumentParser) -> None:
    """Register ``conformance participant`` on the ``kafka-saga`` parser."""
    help_text = "Check an implementation of the wire protocol (docs/protocol.md) over the real broker."
    group = commands.add_parser("conformance", help=help_text, description=help_text)
    kinds = group.add_subparsers(dest="conformance_command", metavar="KIND", required=True)
    participant_help = (
        "Drive the participant consuming --topic through scripted cases (reply shape, duplicates, "
        "compensations, decisions, malformed input, protocol versions); exit 0 only when all pass."
    )
    p = kinds.add_parser(
        "participant", help=participant_help, description=participant_help, parents=[common, as_json]
    )
    p.add_argument("--topic", required=True, help="the participant's command topic (forward commands)")
    p.add_argument("--compensation-topic", help="where compensations go (default: --topic)")
    p.add_argument(
        "--content",
        type=_json_value,
        default={},
        metavar="JSON",
        help="value of the forward commands; the participant must answer it 200 (default {})",
    )
    p.add_argument(
        "--compensation-content",
        type=_json_value,
        metavar="JSON",
        help="value of compensations (default --content)",
    )
    p.add_argument("--service", help="the participant's service name (default: from its first reply)")
    p.add_argument("--reply-topic", help="the kit's reply topic (default {service.name}ConformanceReply)")
    p.add_argument(
        "--timeout",
        type=_positive_seconds,
        default=30.0,
        metavar="SECONDS",
        help="how long to wait for each expected record (default 30)",
    )
    p.add_argument(
        "--case",
        action="append",
        choices=ParticipantKit.CASES,
        help="run only this case (repeatable; default all)",
    )
    p.set_defaults(handler=cmd_participant)


def cmd_participant(args: argparse.Namespace) -> int:
    config = resolve_config(args.config)
    if config.broker.type != "kafka":
        raise CommandError(
            f"conformance needs a Kafka broker; the configuration's broker.type is {config.broker.type!r}",
            code=2,
        )
    configure_logging(config.logging)
    report = asyncio.run(_run(args, config.service.name))
    if args.json:
        print_json(report.to_json())
    else:
        _print(report)
    return 0 if report.passed else 1


async def _run(args: argparse.Namespace, service_name: str) -> ConformanceReport:
    pool = build_broker_pool(resolve_config(args.config))
    kit = ParticipantKit(
        pool,
        topic=args.topic,
        compensation_topic=args.compensation_topic,
        content=args.content,
        compensation_content=args.compensation_content,
        service=args.service,
        reply_topic=args.reply_topic or f"{service_name}ConformanceReply",
        timeout=args.timeout,
    )
    try:
        return await kit.run(tuple(args.case) if args.case else None)
    finally:
        await pool.stop()


def _print(report: ConformanceReport) -> None:
    rows = [
        (result.case, "pass" if result.passed else "FAIL", f"{result.seconds:.2f}s", result.detail)
        for result in report.results
    ]
    print(f"participant on {report.topic!r} (service {report.service!r})")
    print(render_table(("case", "result", "time", "detail"), rows))
    passed = sum(result.passed for result in report.results)
    print(f"{passed} passed, {len(report.results) - passed} failed")
    sys.stdout.flush()
