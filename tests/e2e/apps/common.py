"""What every e2e app shares: arguments, logging, the Kafka pool, readiness and shutdown.

An app prints ``READY`` on stdout once it consumes, runs until SIGTERM/SIGINT, then prints one
``STATS {json}`` line and exits 0. Logs go to stderr, which the test shows when an assertion fails.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Callable
from typing import Any

import orjson

from broker import KafkaBrokerPool

#: Partitions of every topic of a run: two orchestrators split the reply topic 2 + 2.
PARTITIONS = 4


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--bootstrap", required=True, help="Kafka bootstrap servers")
    p.add_argument("--database-url", required=True, help="SQLAlchemy URL of this run's database")
    p.add_argument("--suffix", required=True, help="suffix of this run's service and topic names")
    p.add_argument("--log-level", default="INFO")
    return p


def setup_logging(name: str, level: str) -> None:
    logging.basicConfig(
        stream=sys.stderr,
        level=getattr(logging, level.upper()),
        format=f"%(asctime)s {name} %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("aiokafka").setLevel(logging.WARNING)


def kafka_pool(bootstrap: str, client_id: str) -> KafkaBrokerPool:
    return KafkaBrokerPool(
        bootstrap_servers=bootstrap,
        client_id=client_id,
        topic_partitions=PARTITIONS,
        connect_timeout=30.0,
        session_timeout_ms=10_000,
        heartbeat_interval_ms=1_000,
    )


def say(line: str) -> None:
    """One line on stdout, flushed: the test reads these."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def print_stats(stats: Any) -> None:
    say("STATS " + orjson.dumps(stats, default=lambda o: getattr(o, "__dict__", str(o))).decode())


async def serve_until_signal(alive: Callable[[], bool] = lambda: True) -> None:
    """Return on SIGTERM/SIGINT; raise `SystemExit` if ``alive()`` turns false first."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    while not stop.is_set():
        if not alive():
            logging.getLogger(__name__).error("a worker died; exiting")
            raise SystemExit(3)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.5)
