"""A participant whose ``Report`` command succeeds with a reply over the broker's 1 MB limit.

``python -m tests.e2e.participants.oversized --bootstrap HOST:PORT --database-url URL --suffix S``

Its ``Hold`` command (and the ``Unhold`` compensation) reply small. The dedup store is the orchestrator's
kind of storage (``SagaStorage``), so the process runs the same on any version of the participant.
Prints ``READY``, runs until SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from typing import Any

from broker.kafka import KafkaBrokerPool
from saga import CommandContext, SagaParticipant
from storage import SqlAlchemySagaStorage

#: Bytes of the oversized reply's content: past Kafka's default ``max_request_size`` of 1 MiB.
REPLY_BYTES = 1_100_000


def topics(suffix: str) -> dict[str, str]:
    return {
        "service": f"reports-{suffix}",
        "hold": f"Hold-{suffix}",
        "unhold": f"Unhold-{suffix}",
        "report": f"Report-{suffix}",
        "orchestrator": f"big-{suffix}",
    }


async def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--bootstrap", required=True)
    p.add_argument("--database-url", required=True)
    p.add_argument("--suffix", required=True)
    args = p.parse_args()
    names = topics(args.suffix)
    pool = KafkaBrokerPool(bootstrap_servers=args.bootstrap, client_id=names["service"])
    storage = SqlAlchemySagaStorage(args.database_url, pool_size=2)
    participant = SagaParticipant(names["service"], pool, storage=storage)

    @participant.command(names["hold"])
    def hold(request: CommandContext) -> dict[str, Any]:
        return {"held": True}

    @participant.command(names["unhold"])
    def unhold(request: CommandContext) -> dict[str, Any]:
        return {"unheld": True}

    @participant.command(names["report"])
    def report(request: CommandContext) -> dict[str, Any]:
        return {"report": "x" * REPLY_BYTES}

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    await participant.start()
    print("READY", flush=True)
    await stop.wait()
    await participant.stop()
    await pool.stop()
    await storage.stop()


if __name__ == "__main__":
    asyncio.run(main())
