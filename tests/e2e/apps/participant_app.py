"""What the two participant apps share: their wiring, the effect and decision records, and serving.

Each app registers only its own command handlers; everything the test checks in common (one effect row per
handler run, one decision row per commit or reject, ``READY`` and the ``STATS`` line) is done here once, so
the two participants cannot drift apart in what they record.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from broker import KafkaBrokerPool
from saga import CommandContext, SagaParticipant
from saga.messages import SagaControl
from storage import SqlAlchemySagaStorage
from tests.e2e import db
from tests.e2e.apps import common
from tests.e2e.workload import Names


@dataclass(slots=True)
class ParticipantApp:
    """One participant process: its names, database engine, storage, Kafka pool and `SagaParticipant`."""

    service: str
    names: Names
    engine: AsyncEngine
    storage: SqlAlchemySagaStorage
    pool: KafkaBrokerPool
    participant: SagaParticipant

    @classmethod
    def from_args(
        cls, service: str, description: str, service_name: Callable[[Names], str]
    ) -> ParticipantApp:
        """Parse the command line, set up logging and build the app (nothing is started yet).

        Args:
            service: Short name used in log lines and in the effect and decision rows.
            description: The app's ``--help`` text.
            service_name: Picks the participant's service name from the run's `Names`.
        """
        args = common.parser(description).parse_args()
        common.setup_logging(service, args.log_level)
        names = Names(args.suffix)
        engine = create_async_engine(args.database_url, pool_size=10)
        storage = SqlAlchemySagaStorage(args.database_url, auto_migrate=False)
        pool = common.kafka_pool(args.bootstrap, service_name(names))
        participant = SagaParticipant(service_name(names), pool, storage=storage)
        return cls(service, names, engine, storage, pool, participant)

    async def effect(self, request: CommandContext, name: str) -> None:
        """Record that a handler ran for ``request`` (the test counts these per idempotency key)."""
        await db.record_effect(
            self.engine,
            self.service,
            idempotency_key=request.idempotency_key,
            execution_id=request.execution_id,
            order=request.content["order"],
            effect=name,
        )

    async def _decision(self, control: SagaControl) -> None:
        await db.record_decision(
            self.engine, self.service, execution_id=control.execution_id, action=control.action
        )

    async def serve(self) -> None:
        """Record commit and reject decisions, consume until SIGTERM/SIGINT, then print the stats."""
        participant = self.participant
        participant.on_commit(self._decision)
        participant.on_reject(self._decision)
        try:
            async with self.pool, self.storage, participant:
                common.say("READY")
                await common.serve_until_signal(lambda: participant.running)
        finally:
            common.print_stats(dataclasses.asdict(participant.stats))
            await self.engine.dispose()
