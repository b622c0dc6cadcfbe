"""A small order saga and its participant, for the observability tests (metrics, tracing) over real services.

Topics carry a prefix of the test's own (``OBS_PREFIX``), so runs never see each other's commands. The saga:
``create`` (local) -> ``reserve`` (remote; compensated by ``release``) -> ``charge`` (remote; an amount over
100 is declined with a 400, which compensates ``reserve``).

``python -m tests.integration.observed_app --bootstrap HOST:PORT --prefix P --service S [--spans FILE]``
runs the participant until SIGTERM; with ``--spans``, OpenTelemetry's SDK records its spans and writes each
finished one to FILE as a JSON line (for the tracing test to read).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
from typing import Any

from saga import Saga, SagaContext, SagaRequest, SagaResponse
from saga.errors import SagaBusinessError

SAGA_NAME = "observed-order"


def build_saga(prefix: str) -> Saga:
    """The saga, its command topics prefixed with ``prefix``."""

    def create(ctx: SagaContext) -> None:
        ctx["created"] = True

    def reserve(ctx: SagaContext) -> SagaRequest:
        return SagaRequest(f"{prefix}Reserve", {"order": ctx["order"]})

    def reserved(ctx: SagaContext, response: SagaResponse) -> SagaContext:
        ctx["reservation"] = response.content["reservation"]
        return ctx

    def release(ctx: SagaContext) -> SagaRequest:
        return SagaRequest(f"{prefix}Release", {"order": ctx["order"]})

    def charge(ctx: SagaContext) -> SagaRequest:
        return SagaRequest(f"{prefix}Charge", {"order": ctx["order"], "amount": ctx["amount"]})

    return (
        Saga(SAGA_NAME)
        .local_step(create)
        .remote_step(reserve)
        .on_success(reserved)
        .on_failure(release)
        .remote_step(charge)
        .commit()
    )


#: What ``sagas:`` of the worker's configuration names; the prefix comes from the environment.
SAGA = build_saga(os.environ.get("OBS_PREFIX", "Observed"))


def _span_exporter(path: str) -> Any:
    """An SDK exporter writing each finished span as one JSON line (flushed, so a reader sees it at once)."""
    from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

    class FileExporter(SpanExporter):  # type: ignore[misc]
        def __init__(self) -> None:
            self.out = open(path, "a", encoding="utf-8")  # noqa: SIM115 - lives as long as the process

        def export(self, spans: Any) -> Any:
            for span in spans:
                ctx = span.context
                parent = span.parent
                record = {
                    "name": span.name,
                    "trace_id": f"{ctx.trace_id:032x}",
                    "span_id": f"{ctx.span_id:016x}",
                    "parent_id": f"{parent.span_id:016x}" if parent is not None else None,
                    "start": span.start_time,
                    "end": span.end_time,
                    "kind": str(span.kind),
                    "attributes": dict(span.attributes or {}),
                    "pid": os.getpid(),
                }
                self.out.write(json.dumps(record, default=str) + "\n")
            self.out.flush()
            return SpanExportResult.SUCCESS

        def shutdown(self) -> None:
            self.out.close()

    return FileExporter()


def shop(service: str, prefix: str, pool: Any, store: Any = None) -> Any:
    """The participant serving the saga's commands (``{service}-shop``; topics prefixed with ``prefix``)."""
    from saga.participant import CommandContext, SagaParticipant

    participant = SagaParticipant(f"{service}-shop", pool, group_id=f"{service}-shop", store=store)

    @participant.command(f"{prefix}Reserve")
    async def reserve(request: CommandContext) -> dict[str, Any]:
        return {"reservation": f"r-{request.content['order']}"}

    @participant.command(f"{prefix}Release")
    async def release(request: CommandContext) -> dict[str, Any]:
        return {"released": True}

    @participant.command(f"{prefix}Charge")
    async def charge(request: CommandContext) -> dict[str, Any]:
        if request.content["amount"] > 100:
            raise SagaBusinessError("declined")
        return {"charged": request.content["amount"]}

    return participant


def shop_factory(*, broker_pool: Any, store: Any) -> Any:
    """``participant.app`` of ``kafka-saga participant``: `shop` for ``OBS_SERVICE`` and ``OBS_PREFIX``."""
    return shop(os.environ["OBS_SERVICE"], os.environ.get("OBS_PREFIX", "Observed"), broker_pool, store)


async def _participant(args: argparse.Namespace) -> None:
    from broker.kafka import KafkaBrokerPool
    from broker.settings import KafkaSettings

    if args.spans:
        from opentelemetry import trace
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor

        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(_span_exporter(args.spans)))
        trace.set_tracer_provider(provider)
        from saga.observability import tracing

        tracing.enable_tracing(provider)

    pool = KafkaBrokerPool(KafkaSettings(bootstrap_servers=args.bootstrap, linger_ms=0))
    participant = shop(args.service, args.prefix, pool)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    async with pool:
        await pool.ensure_topics(participant.command_topics)
        async with participant:
            print("READY", flush=True)
            await stop.wait()
    if args.spans:
        with contextlib.suppress(Exception):
            trace.get_tracer_provider().shutdown()  # type: ignore[attr-defined]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--prefix", required=True)
    parser.add_argument("--service", required=True)
    parser.add_argument("--spans")
    asyncio.run(_participant(parser.parse_args()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
