"""Settings of the Kafka transport, validated when built.

`KafkaSettings` is a frozen value: the composition root builds it once (from YAML through
`KafkaSettings.from_mapping`, or in code) and every client of a `KafkaBrokerPool` reads it. Validation
happens in the constructor so a typo fails at start-up with the field's name, not minutes later inside
aiokafka with a message about something else.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Self

from broker.errors import BrokerConfigError

__all__ = ["KafkaSettings"]

SECURITY_PROTOCOLS = frozenset({"PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"})
SASL_MECHANISMS = frozenset({"PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"})
COMPRESSION_TYPES = frozenset({"gzip", "snappy", "lz4", "zstd"})
OFFSET_RESETS = frozenset({"earliest", "latest"})
#: Longest ``connect_timeout``: one hour.
MAX_CONNECT_TIMEOUT = 3600


def config_error(name: str, problem: str) -> BrokerConfigError:
    """A `BrokerConfigError` about field ``name``, with ``field`` set for programmatic handling."""
    error = BrokerConfigError(f"KafkaSettings.{name} {problem}")
    error.field = name
    return error


@dataclass(frozen=True, slots=True, kw_only=True)
class KafkaSettings:
    """How to reach Kafka and how the pool's clients behave.

    The defaults suit a development broker and the orchestrator's needs: consumers start at the earliest
    offset so a new group never skips replies published before it first joined, and topics the pool creates
    get ``topic_partitions`` partitions so orchestrators can scale out to that many consumers.

    Attributes:
        bootstrap_servers: Comma-separated ``host:port`` list used to discover the cluster.
        client_id: Name the broker logs and quotas know this process by.
        security_protocol: ``PLAINTEXT``, ``SSL``, ``SASL_PLAINTEXT`` or ``SASL_SSL``.
        sasl_mechanism: ``PLAIN``, ``SCRAM-SHA-256`` or ``SCRAM-SHA-512``; required with SASL.
        sasl_plain_username: SASL user; required with SASL.
        sasl_plain_password: SASL password; required with SASL. Never shown by ``repr``.
        ssl_cafile: CA bundle to verify the broker with (system CAs when ``None``).
        ssl_certfile: Client certificate, for mutual TLS.
        ssl_keyfile: Private key of ``ssl_certfile``.
        ssl_password: Password of ``ssl_keyfile``. Never shown by ``repr``.
        compression_type: ``gzip``, ``snappy``, ``lz4``, ``zstd`` or ``None``.
        linger_ms: How long the producer waits to fill a batch; 0 sends as soon as possible.
        max_batch_size: Producer batch size in bytes, per partition.
        max_request_size: Largest record the producer sends, in bytes (as aiokafka estimates its size).
            The orchestrator checks a command against it before storing it, so a command that can never
            be sent fails its step at once instead of sitting in the outbox.
        request_timeout_ms: Bound on each request to the broker, including a send's acknowledgement.
        retry_backoff_ms: Pause between retries of a failed request.
        topic_partitions: Partitions of topics the pool creates.
        topic_replication_factor: Replicas of topics the pool creates (1 for a single broker; 3 in
            production so ``acks=all`` means something).
        auto_create_topics: Whether publishing to, or subscribing to, an unknown topic creates it with
            ``topic_partitions`` partitions first. Off, the broker's own auto-creation (or its absence)
            applies.
        session_timeout_ms: A consumer that sends no heartbeat this long is removed from its group.
        heartbeat_interval_ms: Heartbeat period; also how fast members notice a rebalance.
        max_poll_interval_ms: Longest allowed gap between fetches before a consumer is considered stuck.
        max_poll_records: Default upper bound of records one fetch returns.
        fetch_max_wait_ms: Longest the broker holds a fetch waiting for new data.
        auto_offset_reset: Where a group without a committed offset starts: ``earliest`` or ``latest``.
        connect_timeout: Seconds ``start()`` keeps trying to reach the broker (and a subscriber to join
            its group) before raising `BrokerConnectionError`.
    """

    bootstrap_servers: str = "127.0.0.1:9092"
    client_id: str = "kafka-saga"
    security_protocol: str = "PLAINTEXT"
    sasl_mechanism: str | None = None
    sasl_plain_username: str | None = None
    sasl_plain_password: str | None = field(default=None, repr=False)
    ssl_cafile: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    ssl_password: str | None = field(default=None, repr=False)
    compression_type: str | None = None
    linger_ms: int = 0
    max_batch_size: int = 16384
    max_request_size: int = 1048576
    request_timeout_ms: int = 30000
    retry_backoff_ms: int = 100
    topic_partitions: int = 4
    topic_replication_factor: int = 1
    auto_create_topics: bool = True
    session_timeout_ms: int = 10000
    heartbeat_interval_ms: int = 3000
    max_poll_interval_ms: int = 300000
    max_poll_records: int = 500
    fetch_max_wait_ms: int = 500
    auto_offset_reset: str = "earliest"
    connect_timeout: float = 30.0

    def __post_init__(self) -> None:
        self._check_types()
        self._check_values()

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], *, base: KafkaSettings | None = None) -> Self:
        """Build settings from a mapping such as a YAML section; unknown keys are errors, not ignored.

        Args:
            values: Field names to values.
            base: Settings to start from (defaults to the class defaults).

        Raises:
            BrokerConfigError: A key is not a field, or a value is invalid.
        """
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            error = BrokerConfigError(
                f"unknown Kafka setting(s) {', '.join(map(repr, unknown))}; known: {', '.join(sorted(names))}"
            )
            error.field = unknown[0]
            raise error
        if base is None:
            return cls(**values)
        return dataclasses.replace(base, **values)  # type: ignore[return-value]

    def with_overrides(self, **overrides: Any) -> KafkaSettings:
        """A copy with some fields replaced, validated like a new instance."""
        return KafkaSettings.from_mapping(overrides, base=self)

    @property
    def bootstrap_list(self) -> list[str]:
        """``bootstrap_servers`` split into its ``host:port`` entries."""
        return [entry.strip() for entry in self.bootstrap_servers.split(",") if entry.strip()]

    @property
    def uses_ssl(self) -> bool:
        """Whether connections are wrapped in TLS."""
        return self.security_protocol in ("SSL", "SASL_SSL")

    @property
    def uses_sasl(self) -> bool:
        """Whether connections authenticate with SASL."""
        return self.security_protocol.startswith("SASL_")

    # -- validation ---------------------------------------------------------------------------------

    def _check_types(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            expected = str(f.type)
            optional = expected.endswith("| None")
            base = expected.removesuffix(" | None")
            if value is None:
                if not optional:
                    raise config_error(f.name, "must not be None")
                continue
            if base == "bool":
                ok = isinstance(value, bool)
            elif base == "int":
                ok = isinstance(value, int) and not isinstance(value, bool)
            elif base == "float":
                ok = isinstance(value, int | float) and not isinstance(value, bool)
            else:
                ok = isinstance(value, str)
            if not ok:
                raise config_error(f.name, f"must be {expected}, got {type(value).__name__}")

    def _check_values(self) -> None:
        entries = self.bootstrap_list
        if not entries:
            raise config_error("bootstrap_servers", "must name at least one host:port")
        for entry in entries:
            host, sep, port = entry.rpartition(":")
            if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise config_error("bootstrap_servers", f"entry {entry!r} is not host:port")
        if not self.client_id:
            raise config_error("client_id", "must not be empty")
        if self.security_protocol not in SECURITY_PROTOCOLS:
            raise config_error(
                "security_protocol",
                f"must be one of {sorted(SECURITY_PROTOCOLS)}, got {self.security_protocol!r}",
            )
        if self.uses_sasl:
            if self.sasl_mechanism not in SASL_MECHANISMS:
                raise config_error(
                    "sasl_mechanism",
                    f"must be one of {sorted(SASL_MECHANISMS)} with {self.security_protocol}, "
                    f"got {self.sasl_mechanism!r}",
                )
            if not self.sasl_plain_username:
                raise config_error("sasl_plain_username", f"is required with {self.security_protocol}")
            if not self.sasl_plain_password:
                raise config_error("sasl_plain_password", f"is required with {self.security_protocol}")
        elif self.sasl_mechanism is not None:
            raise config_error(
                "sasl_mechanism",
                f"is set but security_protocol {self.security_protocol} does not use SASL",
            )
        if not self.uses_ssl:
            for name in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
                if getattr(self, name) is not None:
                    raise config_error(
                        name, f"is set but security_protocol {self.security_protocol} does not use SSL"
                    )
        if self.ssl_keyfile is not None and self.ssl_certfile is None:
            raise config_error("ssl_certfile", "is required when ssl_keyfile is set")
        if self.compression_type is not None and self.compression_type not in COMPRESSION_TYPES:
            raise config_error(
                "compression_type",
                f"must be one of {sorted(COMPRESSION_TYPES)} or None, got {self.compression_type!r}",
            )
        if self.auto_offset_reset not in OFFSET_RESETS:
            raise config_error(
                "auto_offset_reset", f"must be one of {sorted(OFFSET_RESETS)}, got {self.auto_offset_reset!r}"
            )
        minimums = {
            "linger_ms": 0,
            "max_batch_size": 1,
            "max_request_size": 1,
            "request_timeout_ms": 1,
            "retry_backoff_ms": 0,
            "topic_partitions": 1,
            "topic_replication_factor": 1,
            "session_timeout_ms": 1,
            "heartbeat_interval_ms": 1,
            "max_poll_interval_ms": 1,
            "max_poll_records": 1,
            "fetch_max_wait_ms": 0,
        }
        for name, minimum in minimums.items():
            value = getattr(self, name)
            if value < minimum:
                raise config_error(name, f"must be >= {minimum}, got {value}")
        if self.heartbeat_interval_ms >= self.session_timeout_ms:
            raise config_error(
                "heartbeat_interval_ms",
                f"({self.heartbeat_interval_ms}) must be lower than session_timeout_ms "
                f"({self.session_timeout_ms})",
            )
        if not 0 < self.connect_timeout <= MAX_CONNECT_TIMEOUT:  # also refuses NaN
            raise config_error(
                "connect_timeout",
                f"must be > 0 and <= {MAX_CONNECT_TIMEOUT} seconds, got {self.connect_timeout}",
            )
