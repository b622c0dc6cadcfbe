"""aiokafka client options derived from `KafkaSettings`.

Kept apart from the pool so the mapping from our settings to aiokafka's keyword arguments (and the few
options we force, like idempotence and manual commits) can be read, and tested, in one place.
"""

from __future__ import annotations

import os
import ssl
from typing import Any

from aiokafka.helpers import create_ssl_context

from broker.errors import BrokerConfigError
from broker.partitioner import KeyHashPartitioner
from broker.settings import KafkaSettings, config_error

__all__ = ["client_options", "consumer_options", "producer_options", "ssl_context"]


def ssl_context(settings: KafkaSettings) -> ssl.SSLContext | None:
    """The TLS context for ``SSL``/``SASL_SSL``, built with aiokafka's helper; ``None`` otherwise.

    Raises:
        BrokerConfigError: A file is missing or the certificate/key cannot be loaded.
    """
    if not settings.uses_ssl:
        return None
    for name in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
        path = getattr(settings, name)
        if path is not None and not os.path.isfile(path):
            raise config_error(name, f"names a file that does not exist: {path}")
    try:
        context: ssl.SSLContext = create_ssl_context(
            cafile=settings.ssl_cafile,
            certfile=settings.ssl_certfile,
            keyfile=settings.ssl_keyfile,
            password=settings.ssl_password,
        )
    except (ssl.SSLError, OSError, ValueError) as exc:
        raise BrokerConfigError(f"cannot build the SSL context from the ssl_* settings: {exc}") from exc
    return context


def client_options(settings: KafkaSettings) -> dict[str, Any]:
    """Options every aiokafka client (producer, consumer, admin) takes: address, identity, security."""
    options: dict[str, Any] = {
        "bootstrap_servers": settings.bootstrap_list,
        "client_id": settings.client_id,
        "request_timeout_ms": settings.request_timeout_ms,
        "retry_backoff_ms": settings.retry_backoff_ms,
        "security_protocol": settings.security_protocol,
        "ssl_context": ssl_context(settings),
    }
    if settings.uses_sasl:
        options["sasl_mechanism"] = settings.sasl_mechanism
        options["sasl_plain_username"] = settings.sasl_plain_username
        options["sasl_plain_password"] = settings.sasl_plain_password
    return options


def producer_options(settings: KafkaSettings) -> dict[str, Any]:
    """Producer options: idempotent with ``acks=all``, so a retried send neither loses nor duplicates."""
    return {
        "acks": "all",
        "enable_idempotence": True,
        "compression_type": settings.compression_type,
        "linger_ms": settings.linger_ms,
        "max_batch_size": settings.max_batch_size,
        "max_request_size": settings.max_request_size,
        "partitioner": KeyHashPartitioner(),  # Kafka's default partitioning, cheaper (broker.partitioner)
    }


def consumer_options(settings: KafkaSettings, group_id: str) -> dict[str, Any]:
    """Consumer options: a group member that never commits on its own (offsets move only via commit)."""
    return {
        **client_options(settings),
        "group_id": group_id,
        "enable_auto_commit": False,
        "auto_offset_reset": settings.auto_offset_reset,
        "session_timeout_ms": settings.session_timeout_ms,
        "heartbeat_interval_ms": settings.heartbeat_interval_ms,
        "max_poll_interval_ms": settings.max_poll_interval_ms,
        "max_poll_records": settings.max_poll_records,
        "fetch_max_wait_ms": settings.fetch_max_wait_ms,
    }
