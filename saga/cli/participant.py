"""``kafka-saga participant``: a participant service in its own process.

The configuration's ``participant`` section names the service, its store and the ``module:attribute`` of
its `SagaParticipant` (or a factory); Kafka comes from the ``broker`` section. The process joins the
service's consumer group and serves commands until SIGTERM or SIGINT, then drains: it stops fetching, lets
the handlers in flight finish for up to ``participant.grace_seconds`` (the rest stay claimed under their
leases, which another instance takes over once they run out), and exits 0. A second signal stops waiting.
Configuration errors exit 2 naming the key, before anything connects.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from broker import BrokerClientPool
from saga.cli.app import configure_logging, resolve_config
from saga.cli.signals import DrainSignals
from saga.config import SagaConfig, build_broker_pool
from saga.config.participant import build_participant, build_participant_store
from saga.errors import SagaConfigError
from saga.observability.metrics import SagaMetrics
from saga.participant import SagaParticipant

__all__ = ["run_participant", "serve_participant"]

_log = logging.getLogger("saga.participant")


def run_participant(args: argparse.Namespace) -> int:
    """Run until SIGTERM/SIGINT; exit 0 after a clean drain."""
    config = resolve_config(args.config)
    if config.participant is None:
        raise SagaConfigError(
            "participant", "missing section (kafka-saga participant needs one)", source=config.source
        )
    pool = build_broker_pool(config)
    store = build_participant_store(config)
    participant = build_participant(config, pool, store)  # configuration errors surface before connecting
    configure_logging(config.logging)
    port = getattr(args, "metrics_port", None) or config.metrics.port
    return asyncio.run(serve_participant(config, participant, pool, metrics_port=port))


def _say(message: str) -> None:
    print(f"kafka-saga participant: {message}", file=sys.stderr, flush=True)


async def serve_participant(
    config: SagaConfig,
    participant: SagaParticipant,
    pool: BrokerClientPool,
    *,
    stop: asyncio.Event | None = None,
    metrics_port: int | None = None,
) -> int:
    """Start ``participant``, wait for ``stop`` or a signal, then drain and stop ``pool``.

    With ``metrics_port``, ``/metrics`` (the participant's counters) is served on that port meanwhile.

    Returns:
        0 after a clean drain, 1 when a second signal cut the drain short or the consumer failed.
    """
    assert config.participant is not None
    grace = config.participant.grace_seconds
    stop = stop or asyncio.Event()
    signals = DrainSignals(stop, _say, draining="in-flight commands")
    signals.install()
    failed = False
    serving: asyncio.Task[None] | None = None
    stop_metrics = None
    try:
        try:
            await participant.start()
            if metrics_port:
                metrics = SagaMetrics()
                metrics.watch_participant(participant)
                stop_metrics = metrics.serve(metrics_port, config.metrics.host)
                _say(f"metrics on http://{config.metrics.host}:{metrics_port}/metrics")
            store = participant.store
            _say(
                f"ready: service {participant.service_name!r}, group {participant.group_id!r}, commands "
                f"{', '.join(participant.command_topics)}; store "
                + (store.shown_url if store is not None else "none (in-process dedup only)")
            )
            stopped = asyncio.create_task(stop.wait())
            serving = asyncio.create_task(participant.run())  # ends early only if the consumer fails
            await asyncio.wait({stopped, serving}, return_when=asyncio.FIRST_COMPLETED)
            stopped.cancel()
            failed = not stop.is_set()
            if serving.done() and not serving.cancelled() and serving.exception() is not None:
                _log.error("participant consumer failed: %s", serving.exception())
        finally:
            await participant.stop(grace=grace)
            await pool.stop()
            if stop_metrics is not None:
                stop_metrics()
            if serving is not None:
                await asyncio.gather(serving, return_exceptions=True)
    except asyncio.CancelledError:
        if signals.forced:
            return 1
        raise
    finally:
        signals.remove()
    if failed:
        _say("the consumer stopped on an error")
        return 1
    _say("stopped cleanly")
    return 0
