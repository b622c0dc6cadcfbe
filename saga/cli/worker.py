"""``kafka-saga worker``: the orchestrator's background process.

One process runs the reply consumer (replies advance paused executions), the outbox relay (stored commands
reach Kafka even after a crash between store and publish) and, when ``recovery.enabled``, the recovery
worker. SIGTERM or SIGINT drains: the recovery worker finishes what it started, the consumer finishes the
replies in hand and commits their offsets, the relay publishes what it fetched; then the process exits 0.
A second signal stops waiting for the drain.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import sys
from collections.abc import Callable

from saga.cli.app import CommandError, configure_logging, resolve_config
from saga.cli.demo import describe_setup
from saga.cli.signals import DrainSignals
from saga.config import SagaConfig, build_manager, build_recovery_worker
from saga.heap import freeze_startup_heap
from saga.manager import SagaManager
from saga.observability.metrics import SagaMetrics
from saga.parking import unregistered_definitions
from saga.recovery import SagaRecoveryWorker

__all__ = ["run_worker", "serve"]

_log = logging.getLogger("saga.worker")


def run_worker(args: argparse.Namespace) -> int:
    """Run until SIGTERM/SIGINT; exit 0 after a clean drain."""
    config = resolve_config(args.config)
    if config.tracing.enabled:
        try:
            from saga.observability import tracing

            tracing.enable_tracing()
        except ImportError as exc:
            raise CommandError(
                f"tracing.enabled needs the otel extra: pip install 'kafka-saga[otel]' ({exc})"
            ) from exc
    port = getattr(args, "metrics_port", None) or config.metrics.port
    metrics = SagaMetrics() if port else None
    hooks = metrics.hooks() if metrics is not None else None
    # Configuration errors surface here, before anything starts. A worker is the process that consumes
    # replies, whatever consumer.consume_replies says for the service's other processes.
    manager = build_manager(config, hooks=hooks, consume_replies=True)
    configure_logging(config.logging)
    return asyncio.run(serve(config, manager, metrics=metrics, metrics_port=port))


async def _warn_unregistered(manager: SagaManager) -> None:
    """Warn about unfinished executions of this worker's sagas in versions it does not register."""
    names = {saga.name for saga in manager.registry if saga.name}
    try:
        waiting = await unregistered_definitions(manager.storage, manager.registry.keys(), names=names)
    except Exception as exc:  # a warning is not worth failing the start for
        _log.warning("could not count executions of unregistered definition versions: %s", exc)
        return
    for (name, version), count in sorted(waiting.items()):
        _say(
            f"warning: {count} unfinished execution(s) of saga {name!r} v{version}, which this worker does "
            f"not register: their replies wait with them until a process that registers v{version} "
            "runs (see README, deploying a new definition version)"
        )


def _say(message: str) -> None:
    print(f"kafka-saga worker: {message}", file=sys.stderr, flush=True)


async def serve(
    config: SagaConfig,
    manager: SagaManager,
    *,
    stop: asyncio.Event | None = None,
    metrics: SagaMetrics | None = None,
    metrics_port: int | None = None,
) -> int:
    """Set up ``manager`` (and the recovery worker), wait for ``stop`` or a signal, then drain.

    With ``metrics`` and ``metrics_port``, ``/metrics`` is served on that port while the worker runs.

    Returns:
        0 after a clean drain, 1 when a second signal cut the drain short.
    """
    stop = stop or asyncio.Event()
    signals = DrainSignals(stop, _say, draining="in-flight work")
    signals.install()
    try:
        try:
            await manager.setup()
        except BaseException:
            await manager.destroy()  # setup may have started the storage before the broker failed
            raise
        await _warn_unregistered(manager)
        recovery = None
        if config.recovery.enabled:
            recovery = build_recovery_worker(manager, config)
            if not recovery.saga_names:
                _log.warning(
                    "recovery is enabled but no sagas are registered: there is nothing it could resume"
                )
                recovery = None
        exporter = None
        try:
            if recovery is not None:
                await recovery.start()
            if metrics is not None and metrics_port:
                exporter = _start_metrics(config, manager, recovery, metrics, metrics_port)
            frozen = freeze_startup_heap()  # set up for good: full collections skip all of it (saga.heap)
            _log.debug("froze %d start-up objects out of garbage collection", frozen)
            if config.broker.type == "memory":
                _log.warning("broker.type is memory: only participants in this process can reach this worker")
            sagas = ", ".join(f"{s.name} v{s.version}" for s in manager.registry) or "none"
            _say(
                f"ready: service {manager.service_name!r}, {describe_setup(config)}; replies on "
                f"{manager.reply_topic!r} (group {manager.consumer_group!r}); sagas: {sagas}; recovery "
                + (f"every {config.recovery.interval:g}s" if recovery is not None else "off")
            )
            await stop.wait()
        finally:
            if recovery is not None:
                await recovery.stop()
            if exporter is not None:
                await exporter.stop()
            await manager.destroy()
    except asyncio.CancelledError:
        if signals.forced:
            return 1
        raise
    finally:
        signals.remove()
    _say("stopped cleanly")
    return 0


class _Exporter:
    """The ``/metrics`` server thread and the task refreshing the gauges that need I/O."""

    def __init__(self, stop_server: Callable[[], None], refresher: asyncio.Task[None]) -> None:
        self._stop_server = stop_server
        self._refresher = refresher

    async def stop(self) -> None:
        self._refresher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._refresher
        await asyncio.to_thread(self._stop_server)


def _start_metrics(
    config: SagaConfig,
    manager: SagaManager,
    recovery: SagaRecoveryWorker | None,
    metrics: SagaMetrics,
    port: int,
) -> _Exporter:
    metrics.watch_manager(manager)
    if recovery is not None:
        metrics.watch_recovery(recovery)
    stop_server = metrics.serve(port, config.metrics.host)
    refresher = asyncio.create_task(
        metrics.run_refresher(manager.storage, config.metrics.refresh_interval), name="saga-metrics"
    )
    _say(f"metrics on http://{config.metrics.host}:{port}/metrics")
    return _Exporter(stop_server, refresher)
