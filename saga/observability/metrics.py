"""Prometheus metrics of an orchestrator or participant process, served on ``/metrics``.

Nothing here runs on the hot path unless metrics are on, and even then little does:

* lifecycle counters and duration histograms come from `SagaHooks` (`SagaMetrics.hooks`), which the
  engine calls only when hooks are set;
* reply outcomes, recovery counts and participant counts are the counters those parts keep anyway
  (``ReplyConsumer.stats``, ``SagaRecoveryWorker.stats``, ``SagaParticipant.stats``), read when Prometheus
  scrapes;
* the outbox backlog and the reply consumer's lag need I/O, so `SagaMetrics.refresh` reads them every
  ``refresh_interval`` seconds in the background (`SagaMetrics.run_refresher`).

Each `SagaMetrics` has its own ``CollectorRegistry``, so several in one process (tests) never clash.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from saga.hooks import SagaEvent, SagaHooks
from storage import SagaStatus, SupportsOutboxBacklog

if TYPE_CHECKING:
    from prometheus_client.core import Metric

__all__ = ["SagaMetrics", "combine_hooks"]

_log = logging.getLogger(__name__)

#: Buckets for step and saga durations: a local step takes milliseconds, a remote one a round trip, a saga
#: that waited for a timeout minutes.
_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)

_ENDED = frozenset((SagaStatus.FINISHED, SagaStatus.ERRORED, SagaStatus.DEAD_LETTER))

#: Reply consumer counters exported as ``saga_replies_total{outcome=...}``.
_REPLY_OUTCOMES = (
    "applied",
    "duplicate",
    "stale",
    "unknown_status",
    "malformed",
    "unknown_execution",
    "unknown_definition",
    "failed",
    "errors",
)


class SagaMetrics:
    """The metric set of one process, in its own registry.

    Args:
        registry: Registry to add the metrics to (default: a new one).
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        self.started = Counter(
            "saga_executions_started", "Executions started, by saga.", ["saga"], registry=r
        )
        self.ended = Counter(
            "saga_executions_ended",
            "Executions that reached FINISHED, ERRORED or DEAD_LETTER, by saga and status.",
            ["saga", "status"],
            registry=r,
        )
        self.saga_duration = Histogram(
            "saga_execution_duration_seconds",
            "Time from an execution's creation to its end, by saga and final status.",
            ["saga", "status"],
            buckets=_BUCKETS,
            registry=r,
        )
        self.step_duration = Histogram(
            "saga_step_duration_seconds",
            "Duration of step and compensation attempts that ended, by saga, step, phase and outcome.",
            ["saga", "step", "phase", "outcome"],
            buckets=_BUCKETS,
            registry=r,
        )
        self.step_attempts = Counter(
            "saga_step_attempts",
            "Step and compensation attempts started, by saga, step and phase.",
            ["saga", "step", "phase"],
            registry=r,
        )
        self.dead_letters = Counter(
            "saga_dead_letters", "Executions moved to DEAD_LETTER, by saga.", ["saga"], registry=r
        )
        self.outbox_backlog = Gauge(
            "saga_outbox_backlog_rows", "Outbox rows written and not yet published.", registry=r
        )
        self.outbox_age = Gauge(
            "saga_outbox_oldest_unsent_age_seconds",
            "How long the oldest unpublished outbox row has waited (0 when none waits).",
            registry=r,
        )
        self.consumer_lag = Gauge(
            "saga_reply_consumer_lag_records",
            "Records on the reply topic not yet fetched by this process, by partition.",
            ["topic", "partition"],
            registry=r,
        )
        self._children: dict[tuple[object, ...], Any] = {}
        self._sources = _Sources()
        r.register(self._sources)

    # -- sources read at scrape time ------------------------------------------------------------------

    def watch_manager(self, manager: Any) -> None:
        """Export ``manager``'s reply consumer counters and the runs waiting in memory."""
        self._sources.manager = manager

    def watch_recovery(self, worker: Any) -> None:
        """Export a `SagaRecoveryWorker`'s claim, attempt and dead-letter counts."""
        self._sources.recovery = worker

    def watch_participant(self, participant: Any) -> None:
        """Export a participant's ``stats`` (every integer field a counter, every mapping a labelled one)."""
        self._sources.participant = participant

    # -- hooks -----------------------------------------------------------------------------------------

    def hooks(self) -> SagaHooks:
        """Hooks that feed the lifecycle counters and histograms (combine with others: `combine_hooks`)."""
        return SagaHooks(
            on_execution_started=self._on_started,
            on_status_changed=self._on_status,
            on_dead_lettered=self._on_dead_lettered,
            on_step_started=self._on_attempt("execute"),
            on_compensation_started=self._on_attempt("compensate"),
            on_step_completed=self._on_step_end("execute", "succeeded"),
            on_step_failed=self._on_step_end("execute", "failed"),
            on_compensation_completed=self._on_step_end("compensate", "succeeded"),
            on_compensation_failed=self._on_step_end("compensate", "failed"),
        )

    def _child(self, metric: Any, *labels: str) -> Any:
        """``metric.labels(*labels)``, remembered: the library's lookup takes a lock and builds a key."""
        key = (id(metric), *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def _on_started(self, event: SagaEvent) -> None:
        self._child(self.started, event.saga).inc()

    def _on_status(self, event: SagaEvent) -> None:
        status = event.status
        if status in _ENDED and event.previous_status not in _ENDED:
            assert status is not None
            self._child(self.ended, event.saga, status.value).inc()
            if event.duration is not None:
                self._child(self.saga_duration, event.saga, status.value).observe(event.duration)

    def _on_dead_lettered(self, event: SagaEvent) -> None:
        self._child(self.dead_letters, event.saga).inc()

    def _on_attempt(self, phase: str) -> Callable[[SagaEvent], None]:
        def count(event: SagaEvent) -> None:
            self._child(self.step_attempts, event.saga, event.step or "", phase).inc()

        return count

    def _on_step_end(self, phase: str, outcome: str) -> Callable[[SagaEvent], None]:
        def observe(event: SagaEvent) -> None:
            if event.duration is not None:
                child = self._child(self.step_duration, event.saga, event.step or "", phase, outcome)
                child.observe(event.duration)

        return observe

    # -- gauges that need I/O --------------------------------------------------------------------------

    async def refresh(self, storage: object | None = None) -> None:
        """Read the outbox backlog from ``storage`` and the reply consumer's lag from the broker."""
        if isinstance(storage, SupportsOutboxBacklog):
            backlog = await storage.outbox_backlog()
            self.outbox_backlog.set(backlog.rows)
            self.outbox_age.set(backlog.oldest_age_seconds or 0.0)
        subscriber = getattr(getattr(self._sources.manager, "consumer", None), "_subscriber", None)
        lag = getattr(subscriber, "lag", None)
        if lag is not None:
            for (topic, partition), behind in (await lag()).items():
                self.consumer_lag.labels(topic, str(partition)).set(behind)

    async def run_refresher(self, storage: object | None, interval: float) -> None:
        """`refresh` every ``interval`` seconds until cancelled; a failed read is logged and retried."""
        while True:
            try:
                await self.refresh(storage)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                _log.warning("metrics: cannot refresh the outbox and lag gauges: %s", exc)
            await asyncio.sleep(interval)

    # -- exposition ------------------------------------------------------------------------------------

    def render(self) -> bytes:
        """The text exposition format, as ``/metrics`` serves it."""
        return generate_latest(self.registry)

    def serve(self, port: int, host: str = "0.0.0.0") -> Callable[[], None]:
        """Serve ``/metrics`` over HTTP from a background thread; return a function that stops it."""
        from prometheus_client import start_http_server

        server, thread = start_http_server(port, addr=host, registry=self.registry)

        def stop() -> None:
            server.shutdown()
            server.server_close()
            thread.join(timeout=5)

        return stop


class _Sources(Collector):
    """Counters other parts keep, turned into metric families at scrape time."""

    def __init__(self) -> None:
        self.manager: Any = None
        self.recovery: Any = None
        self.participant: Any = None

    def describe(self) -> list[Metric]:
        return []  # dynamic: the families depend on what is watched

    def collect(self) -> Iterator[Metric]:
        manager = self.manager
        if manager is not None:
            consumer = getattr(manager, "consumer", None)
            stats: dict[str, int] = dict(getattr(consumer, "stats", {}) or {})
            replies = CounterMetricFamily(
                "saga_replies", "Replies handled by the reply consumer, by outcome.", labels=["outcome"]
            )
            for outcome in _REPLY_OUTCOMES:
                replies.add_metric([outcome], stats.get(outcome, 0))
            yield replies
            yield CounterMetricFamily(
                "saga_reply_dead_letters",
                "Reply records copied to the dead-letter topic.",
                value=stats.get("dead_lettered", 0),
            )
            waiting = GaugeMetricFamily(
                "saga_runs_waiting",
                "run() calls of this process waiting for their execution to end.",
                value=len(getattr(manager, "_waiters", {}) or {}),
            )
            yield waiting
        recovery = self.recovery
        if recovery is not None:
            rs = recovery.stats
            yield CounterMetricFamily(
                "saga_recovery_claims", "Executions claimed by the recovery worker.", value=rs.claimed
            )
            attempts = CounterMetricFamily(
                "saga_recovery_attempts", "Recovery attempts, by outcome.", labels=["outcome"]
            )
            for outcome in ("recovered", "failed", "busy", "released"):
                attempts.add_metric([outcome], getattr(rs, outcome))
            yield attempts
            yield CounterMetricFamily(
                "saga_recovery_dead_letters",
                "Executions the recovery worker moved to DEAD_LETTER (attempts exhausted).",
                value=rs.dead_lettered,
            )
        participant = self.participant
        if participant is not None:
            yield from _participant_families(participant.stats)


def _participant_families(stats: object) -> Iterator[Metric]:
    """``saga_participant_<field>_total`` for each integer field of the participant's stats."""
    fields = dataclasses.fields(stats) if dataclasses.is_dataclass(stats) else ()
    for f in fields:
        value = getattr(stats, f.name)
        if isinstance(value, int) and not isinstance(value, bool):
            yield CounterMetricFamily(
                f"saga_participant_{f.name}", f"Participant: {f.name.replace('_', ' ')}.", value=value
            )
        elif isinstance(value, dict):
            family = CounterMetricFamily(
                f"saga_participant_{f.name}",
                f"Participant: {f.name.replace('_', ' ')}, by category.",
                labels=["category"],
            )
            for key, count in value.items():
                family.add_metric([str(key)], count)
            yield family


def combine_hooks(*all_hooks: SagaHooks | None) -> SagaHooks | None:
    """One `SagaHooks` calling each given one's hooks in turn (``None`` when none is given)."""
    given = [h for h in all_hooks if h is not None]
    if not given:
        return None
    if len(given) == 1:
        return given[0]
    from saga.hooks import call_hook

    combined: dict[str, Any] = {}
    for f in dataclasses.fields(SagaHooks):
        fns = [getattr(h, f.name) for h in given if getattr(h, f.name) is not None]
        if not fns:
            continue
        if len(fns) == 1:
            combined[f.name] = fns[0]
            continue

        async def each(event: SagaEvent, fns: list[Any] = fns) -> None:
            for fn in fns:
                await call_hook(fn, event)

        combined[f.name] = each
    return SagaHooks(**combined)
