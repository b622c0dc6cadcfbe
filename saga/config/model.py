"""The typed configuration: frozen dataclasses, one per YAML section.

Every field has a default, so ``SagaConfig()`` is a working embedded configuration (in-memory broker and
storage) and a YAML file only states what differs. The loader (`saga.config.loader`) derives its schema
from these classes, so a field added here is a key users can write, validated like the others.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from broker.settings import KafkaSettings
from saga.config.participant import ParticipantConfig

__all__ = [
    "BrokerConfig",
    "ConsumerConfig",
    "LoggingConfig",
    "MemoryBrokerConfig",
    "MetricsConfig",
    "OutboxConfig",
    "RecoveryConfig",
    "SagaConfig",
    "ServiceConfig",
    "StorageConfig",
    "TimeoutsConfig",
    "TopicsConfig",
    "TracingConfig",
    "UiConfig",
]

#: ``storage.url`` value selecting `MemorySagaStorage`.
MEMORY_STORAGE_URL = "memory://"


@dataclass(frozen=True, slots=True, kw_only=True)
class ServiceConfig:
    """Who this orchestrator is.

    Attributes:
        name: Service name; the default reply topic is ``"{name}Reply"`` and participants send
            replies there.
    """

    name: str = "saga"


@dataclass(frozen=True, slots=True, kw_only=True)
class MemoryBrokerConfig:
    """Settings of the in-process broker.

    Attributes:
        partitions: Partitions of every topic (keys keep their order within one).
    """

    partitions: int = 4


@dataclass(frozen=True, slots=True, kw_only=True)
class BrokerConfig:
    """Which transport to use and how to reach it.

    Attributes:
        type: ``memory`` (in-process, single process only) or ``kafka``.
        memory: Settings used when ``type`` is ``memory``.
        kafka: Settings used when ``type`` is ``kafka``; the keys are `KafkaSettings` fields.
    """

    type: Literal["memory", "kafka"] = "memory"
    memory: MemoryBrokerConfig = field(default_factory=MemoryBrokerConfig)
    kafka: KafkaSettings = field(default_factory=KafkaSettings)


@dataclass(frozen=True, slots=True, kw_only=True)
class StorageConfig:
    """Where executions are stored.

    Attributes:
        url: SQLAlchemy async URL (``postgresql+asyncpg://...``, ``sqlite+aiosqlite:///path``) or
            ``memory://`` for `MemorySagaStorage` (lost when the process ends).
        auto_migrate: Bring the database schema up to date when storage starts; turn off when
            ``kafka-saga db upgrade`` runs as a deployment step instead.
        pool_size: Database connections kept open (SQLite always uses one).
        schema: PostgreSQL schema holding the tables (``None``: the connection's default).
        echo: Log every SQL statement.
    """

    url: str = MEMORY_STORAGE_URL
    auto_migrate: bool = True
    pool_size: int = 10
    schema: str | None = None
    echo: bool = False

    @property
    def is_memory(self) -> bool:
        """Whether this selects the in-process storage."""
        return self.url == MEMORY_STORAGE_URL

    @property
    def safe_url(self) -> str:
        """``url`` with its password replaced by ``***``, for logs and messages."""
        if self.is_memory:
            return self.url
        from sqlalchemy.engine import make_url
        from sqlalchemy.exc import ArgumentError

        try:
            return make_url(self.url).render_as_string(hide_password=True)
        except ArgumentError:
            return "<not a database URL>"

    def __repr__(self) -> str:
        # Written by hand so that logging a configuration never prints the database password.
        return (
            f"StorageConfig(url={self.safe_url!r}, auto_migrate={self.auto_migrate!r}, "
            f"pool_size={self.pool_size!r}, schema={self.schema!r}, echo={self.echo!r})"
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class TopicsConfig:
    """Topics of the orchestrator; ``None`` means the manager's default derived from the service name.

    Attributes:
        reply: Topic participants reply on (default ``"{service.name}Reply"``).
        dead_letter: Topic malformed or unusable replies are moved to.
    """

    reply: str | None = None
    dead_letter: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class ConsumerConfig:
    """The reply consumer.

    Attributes:
        group: Consumer group of the reply consumer; orchestrators of one service share it so each
            reply is handled once. ``None`` means the manager's default.
        concurrency: Most replies in progress at once (``SagaManager(reply_concurrency=...)``).
        consume_replies: Run the reply consumer (``SagaManager(consume_replies=...)``); ``false`` for a
            process that only starts sagas with ``pause_on_disk=True``, so it does not join the group
            (each member joining or leaving rebalances the workers). ``kafka-saga worker`` always
            consumes.
    """

    group: str | None = None
    concurrency: int = 256  # saga.consumer.DEFAULT_REPLY_CONCURRENCY
    consume_replies: bool = True


@dataclass(frozen=True, slots=True, kw_only=True)
class OutboxConfig:
    """The outbox relay that publishes stored commands.

    Attributes:
        relay_interval: Seconds between polls of the outbox table when it was found empty.
    """

    relay_interval: float = 1.0


@dataclass(frozen=True, slots=True, kw_only=True)
class RecoveryConfig:
    """The recovery worker run by ``kafka-saga worker``.

    Attributes:
        enabled: Run the worker at all.
        interval: Seconds between scans for executions to recover.
        batch_size: Executions claimed per scan.
        max_recovery_attempts: Failed recoveries after which an execution goes to ``DEAD_LETTER``.
        stale_after_seconds: Only recover executions not updated for this long (``None``: no minimum).
        lease_seconds: How long a claim lasts unless the heartbeat renews it; the manager's claims while
            it runs steps use it too.
        saga_names: Recover only these sagas (empty: the sagas the configuration registers).
        concurrency: Recoveries running at once.
    """

    enabled: bool = True
    interval: float = 5.0
    batch_size: int = 100
    max_recovery_attempts: int = 5
    stale_after_seconds: int | None = None
    lease_seconds: float = 30.0
    saga_names: tuple[str, ...] = ()
    concurrency: int = 10


@dataclass(frozen=True, slots=True, kw_only=True)
class TimeoutsConfig:
    """Default deadlines.

    Attributes:
        default_reply_seconds: Reply timeout given to the remote steps of the configured sagas that set
            no ``timeout=`` of their own (``None``: they wait without limit).
    """

    default_reply_seconds: float | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class LoggingConfig:
    """Logging of the ``kafka-saga`` processes (a library user configures logging themselves).

    Attributes:
        level: ``DEBUG``, ``INFO``, ``WARNING``, ``ERROR`` or ``CRITICAL``.
        format: ``text``, ``json`` (one JSON object per line), or a `logging` format string.
    """

    level: str = "INFO"
    format: str = "text"


@dataclass(frozen=True, slots=True, kw_only=True)
class MetricsConfig:
    """Prometheus ``/metrics`` of ``kafka-saga worker`` and ``kafka-saga participant``.

    Attributes:
        port: Serve ``/metrics`` on this port (``None``: no endpoint unless ``--metrics-port`` is given).
        host: Address to listen on.
        refresh_interval: Seconds between reads of the outbox backlog and the reply consumer's lag.
    """

    port: int | None = None
    host: str = "0.0.0.0"
    refresh_interval: float = 5.0


@dataclass(frozen=True, slots=True, kw_only=True)
class TracingConfig:
    """OpenTelemetry tracing of ``kafka-saga worker`` (needs the ``kafka-saga[otel]`` extra).

    Attributes:
        enabled: Record spans through OpenTelemetry's global tracer provider (set it up by running the
            process under ``opentelemetry-instrument``, or in code before the manager starts).
    """

    enabled: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class UiConfig:
    """The web console, ``kafka-saga ui``.

    Attributes:
        port: HTTP port (``--port`` overrides it).
        host: Address to listen on.
        token: Token that enables the actions (retry, replay, cancel, set-attempts); ``None``: read-only.
            Prefer ``${SAGA_UI_TOKEN}`` over writing it in the file.
        page_size: Executions per page of the list.
    """

    port: int = 8080
    host: str = "127.0.0.1"
    token: str | None = None
    page_size: int = 50

    def __repr__(self) -> str:
        # Written by hand so that logging a configuration never prints the token.
        token = None if self.token is None else "***"
        return (
            f"UiConfig(port={self.port!r}, host={self.host!r}, token={token!r}, page_size={self.page_size!r})"
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class SagaConfig:
    """A whole, validated configuration.

    Attributes:
        service: Service identity.
        broker: Transport.
        storage: Persistence.
        sagas: ``"module:attribute"`` references of the saga definitions to register.
        topics: Orchestrator topics.
        consumer: Reply consumer.
        outbox: Outbox relay.
        recovery: Recovery worker.
        timeouts: Default deadlines.
        logging: Logging of the CLI processes.
        metrics: Prometheus endpoint of the worker and participant processes.
        tracing: OpenTelemetry tracing of the worker.
        ui: The web console.
        participant: A participant process (``kafka-saga participant``); ``None`` when not configured.
        source: Where it was read from (a path, or ``None`` for a mapping); used in error messages.
    """

    service: ServiceConfig = field(default_factory=ServiceConfig)
    broker: BrokerConfig = field(default_factory=BrokerConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    sagas: tuple[str, ...] = ()
    topics: TopicsConfig = field(default_factory=TopicsConfig)
    consumer: ConsumerConfig = field(default_factory=ConsumerConfig)
    outbox: OutboxConfig = field(default_factory=OutboxConfig)
    recovery: RecoveryConfig = field(default_factory=RecoveryConfig)
    timeouts: TimeoutsConfig = field(default_factory=TimeoutsConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    tracing: TracingConfig = field(default_factory=TracingConfig)
    ui: UiConfig = field(default_factory=UiConfig)
    participant: ParticipantConfig | None = None
    source: str | None = field(default=None, compare=False)

    @property
    def reply_topic(self) -> str:
        """The reply topic in effect."""
        return self.topics.reply or f"{self.service.name}Reply"
