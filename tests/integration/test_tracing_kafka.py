"""One saga, one trace: the orchestrator (this process, OpenTelemetry SDK with the in-memory exporter) and a
participant (another OS process, its finished spans written to a file) over real Kafka and PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from broker.kafka import KafkaBrokerPool
from broker.settings import KafkaSettings
from saga import SagaContext, SagaManager, SagaStatus
from saga.observability import tracing
from storage import SqlAlchemySagaStorage
from tests.integration.observed_app import SAGA_NAME, build_saga
from tests.integration.test_metrics_worker import Proc

pytestmark = [pytest.mark.kafka, pytest.mark.postgres, pytest.mark.e2e]


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    memory = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    tracing.enable_tracing(provider)
    try:
        yield memory
    finally:
        tracing.disable_tracing()
        provider.shutdown()


def _local(span: Any) -> dict[str, Any]:
    return {
        "name": span.name,
        "trace_id": f"{span.context.trace_id:032x}",
        "span_id": f"{span.context.span_id:016x}",
        "parent_id": f"{span.parent.span_id:016x}" if span.parent is not None else None,
        "start": span.start_time,
        "kind": str(span.kind),
        "attributes": dict(span.attributes or {}),
        "pid": os.getpid(),
    }


def _remote(path: Path, expected: int) -> list[dict[str, Any]]:
    deadline = time.monotonic() + 30
    while True:
        lines = path.read_text().splitlines() if path.exists() else []
        spans = [json.loads(line) for line in lines]
        handled = [s for s in spans if s["name"].startswith("saga.handle")]
        if len(handled) >= expected or time.monotonic() > deadline:
            return spans
        time.sleep(0.1)


def test_one_trace_across_orchestrator_and_participant(
    tmp_path: Path, exporter: InMemorySpanExporter, kafka_bootstrap: str, database_url: str
) -> None:
    tag = uuid.uuid4().hex[:8]
    prefix, service = f"Trace{tag}", f"trace-{tag}"
    spans_file = tmp_path / "participant-spans.jsonl"
    participant = Proc(
        "participant",
        [
            sys.executable,
            "-m",
            "tests.integration.observed_app",
            "--bootstrap",
            kafka_bootstrap,
            "--prefix",
            prefix,
            "--service",
            service,
            "--spans",
            str(spans_file),
        ],
        {},
        tmp_path,
    )
    try:
        participant.wait_for("READY")
        saga = build_saga(prefix)

        async def run() -> uuid.UUID:
            manager = SagaManager(
                SqlAlchemySagaStorage(database_url),
                KafkaBrokerPool(KafkaSettings(bootstrap_servers=kafka_bootstrap, linger_ms=0)),
                service_name=service,
            )
            manager.register(saga)
            async with manager:
                execution = await manager.run(saga, SagaContext(order="t1", amount=10))
                assert execution.status is SagaStatus.FINISHED
                return execution.id

        execution_id = asyncio.run(run())
        remote = _remote(spans_file, expected=2)
    finally:
        participant.stop()

    local = [_local(s) for s in exporter.get_finished_spans()]
    spans = local + remote
    assert {s["pid"] for s in remote} == {participant.process.pid}
    assert len({s["trace_id"] for s in spans}) == 1, sorted((s["name"], s["trace_id"]) for s in spans)

    by_name = {s["name"]: s for s in spans}
    chain = [
        "saga.run observed-order",
        "saga.step create",
        "saga.step reserve",
        f"saga.publish {prefix}Reserve",
        f"saga.handle {prefix}Reserve",
        f"saga.reply {service}Reply",
        "saga.step charge",
        f"saga.publish {prefix}Charge",
        f"saga.handle {prefix}Charge",
    ]
    missing = [name for name in chain if name not in by_name]
    assert not missing, f"missing spans {missing}; got {sorted(by_name)}"
    replies = sorted(
        (s for s in local if s["name"] == f"saga.reply {service}Reply"), key=lambda s: s["start"]
    )
    assert len(replies) == 2
    run, create, reserve, publish_reserve, handle_reserve, _, charge, publish_charge, handle_charge = (
        by_name[n] for n in chain
    )
    reply_reserve, reply_charge = replies
    # parents: the run is the root; each command's handler and reply hang off the step that sent it, and the
    # next step runs inside the reply that let it go on
    assert run["parent_id"] is None
    assert create["parent_id"] == run["span_id"] and reserve["parent_id"] == run["span_id"]
    assert publish_reserve["parent_id"] == reserve["span_id"]
    assert handle_reserve["parent_id"] == reserve["span_id"]
    assert reply_reserve["parent_id"] == reserve["span_id"]
    assert charge["parent_id"] == reply_reserve["span_id"]
    assert publish_charge["parent_id"] == charge["span_id"]
    assert handle_charge["parent_id"] == charge["span_id"]
    assert reply_charge["parent_id"] == charge["span_id"]
    # in order, across both processes
    ordered = [run, create, reserve, publish_reserve, handle_reserve, reply_reserve, charge, publish_charge]
    ordered += [handle_charge, reply_charge]
    starts = [s["start"] for s in ordered]
    assert starts == sorted(starts), [s["name"] for s in sorted(ordered, key=lambda s: s["start"])]

    for span in (publish_reserve, handle_reserve, reply_reserve):
        assert span["attributes"]["messaging.system"] == "kafka"
        assert span["attributes"]["saga.execution_id"] == str(execution_id)
        assert span["attributes"]["messaging.message.id"]
    assert publish_reserve["attributes"]["messaging.destination.name"] == f"{prefix}Reserve"
    assert handle_reserve["attributes"]["saga.name"] == SAGA_NAME
    assert handle_reserve["attributes"]["saga.step"] == "reserve"
    assert handle_reserve["attributes"]["messaging.consumer.group.name"] == f"{service}-shop"
    assert "PRODUCER" in publish_reserve["kind"] and "CONSUMER" in handle_reserve["kind"]
    assert reserve["attributes"]["saga.step"] == "reserve"
    assert reserve["attributes"]["saga.execution_id"] == str(execution_id)
    assert run["attributes"]["saga.execution_id"] == str(execution_id)
