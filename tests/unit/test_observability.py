"""Structured logs, metrics hooks and the tracing switch, in process (the real services are in
tests/integration/test_metrics_worker.py and test_tracing_kafka.py)."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys

import pytest
from prometheus_client.parser import text_string_to_metric_families

from broker import InMemoryBrokerPool
from saga import RetryPolicy, Saga, SagaContext, SagaEvent, SagaHooks, SagaManager, SagaStatus
from saga.cli.app import configure_logging
from saga.config.model import LoggingConfig
from saga.observability import SagaMetrics, combine_hooks
from saga.observability.logs import JsonFormatter, log_context
from storage.memory import MemorySagaStorage


def _fail(ctx: SagaContext) -> None:
    raise RuntimeError("boom")


def _broken(ctx: SagaContext) -> None:
    raise RuntimeError("cannot undo")


def _ok(ctx: SagaContext) -> None:
    ctx["ok"] = True


def _json_lines(stream: io.StringIO) -> list[dict[str, str]]:
    return [json.loads(line) for line in stream.getvalue().splitlines() if line.startswith("{")]


async def test_json_logs_carry_saga_fields_and_dead_letters_warn(monkeypatch: pytest.MonkeyPatch) -> None:
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    configure_logging(LoggingConfig(level="WARNING", format="json"))
    saga = (
        Saga("logged", compensation_retry=RetryPolicy(max_attempts=2, initial_delay=0.001))
        .local_step(_ok, name="reserve")
        .on_failure(_broken)
        .local_step(_fail, name="charge", retry=RetryPolicy(max_attempts=2, initial_delay=0.001))
        .commit()
    )
    async with SagaManager(MemorySagaStorage(), InMemoryBrokerPool(), consume_replies=False) as manager:
        execution = await manager.run(saga, raise_on_error=False)
    assert execution.status is SagaStatus.DEAD_LETTER
    lines = _json_lines(stream)
    exhausted = [line for line in lines if "failed after 2 attempts" in line["message"]]
    assert {line["step"] for line in exhausted} == {"charge", "reserve"}  # the step, then its compensation
    dead = next(line for line in lines if "moved to DEAD_LETTER" in line["message"])
    assert dead["level"] == "WARNING" and dead["execution_id"] == str(execution.id)
    assert dead["saga"] == "logged" and dead["step"] == "reserve"
    assert dead["time"].endswith("Z") and dead["time"][10] == "T"  # 2026-01-02T03:04:05.678Z


def test_log_context_fills_the_fields_a_line_does_not_give() -> None:
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "hello %s", ("you",), None)
    formatter = JsonFormatter()
    with log_context(execution_id="e-1", request_id="r-1"):
        data = json.loads(formatter.format(record))
    assert data["message"] == "hello you"
    assert (data["execution_id"], data["request_id"]) == ("e-1", "r-1")
    assert "execution_id" not in json.loads(formatter.format(record))


async def test_metrics_hooks_count_a_run() -> None:
    metrics = SagaMetrics()
    seen: list[str] = []
    hooks = combine_hooks(metrics.hooks(), SagaHooks(on_status_changed=lambda e: seen.append(str(e.status))))
    saga = Saga("metered").local_step(_ok, name="one").local_step(_fail, name="two").commit()
    ok = Saga("fine").local_step(_ok, name="one").commit()
    async with SagaManager(
        MemorySagaStorage(), InMemoryBrokerPool(), consume_replies=False, hooks=hooks
    ) as manager:
        metrics.watch_manager(manager)
        await manager.run(saga, raise_on_error=False)
        await manager.run(ok)
        await metrics.refresh(manager.storage)
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(metrics.render().decode())
        for s in f.samples
    }
    assert samples[("saga_executions_started_total", (("saga", "metered"),))] == 1
    assert samples[("saga_executions_ended_total", (("saga", "metered"), ("status", "errored")))] == 1
    assert samples[("saga_executions_ended_total", (("saga", "fine"), ("status", "finished")))] == 1
    key = (
        "saga_step_duration_seconds_count",
        (("outcome", "succeeded"), ("phase", "execute"), ("saga", "fine"), ("step", "one")),
    )
    assert samples[key] == 1
    assert samples[("saga_outbox_backlog_rows", ())] == 0
    assert "errored" in seen  # the other hooks still run


def test_combine_hooks() -> None:
    assert combine_hooks(None, None) is None
    one = SagaHooks(on_step_started=lambda e: None)
    assert combine_hooks(one, None) is one
    calls: list[str] = []

    async def first(event: SagaEvent) -> None:
        calls.append("first")

    both = combine_hooks(
        SagaHooks(on_dead_lettered=first), SagaHooks(on_dead_lettered=lambda e: calls.append("second"))
    )
    assert both is not None and both.on_dead_lettered is not None


def test_nothing_of_the_extras_is_imported_when_off() -> None:
    code = (
        "import asyncio, sys\n"
        "from saga import Saga, SagaManager\n"
        "from broker import InMemoryBrokerPool\n"
        "from storage.memory import MemorySagaStorage\n"
        "import saga.observability\n"
        "async def main():\n"
        "    async with SagaManager(MemorySagaStorage(), InMemoryBrokerPool(), consume_replies=False) as m:\n"
        "        await m.run(Saga('s').local_step(lambda c: None, name='a').commit())\n"
        "asyncio.run(main())\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('opentelemetry', 'prometheus_client')]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"ui": {"page_size": 0}}, "ui.page_size: must be at least 1, got 0"),
        ({"metrics": {"port": "x"}}, "metrics.port: expected an integer, got 'x'"),
        ({"metrics": {"refresh_interval": 0}}, "metrics.refresh_interval: must be greater than 0"),
        ({"tracing": {"enabled": "maybe"}}, "tracing.enabled"),
    ],
)
def test_metrics_ui_and_tracing_sections_are_validated(section: dict[str, object], message: str) -> None:
    from saga.config import load_config
    from saga.errors import SagaConfigError

    with pytest.raises(SagaConfigError, match=message):
        load_config(section)


def test_the_console_token_is_never_shown() -> None:
    from saga.config import load_config

    config = load_config({"ui": {"token": "s3cret"}})
    assert config.ui.token == "s3cret"
    assert "s3cret" not in repr(config)
