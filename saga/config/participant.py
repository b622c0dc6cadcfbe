"""The ``participant`` section: a participant service run as its own process (``kafka-saga participant``).

The section names the service, its store (the participant's own database) and the ``module:attribute``
of its `SagaParticipant` or of a factory building one; Kafka comes from the ``broker`` section, as for
the orchestrator. `check_participant` holds the rules the loader's types cannot express, and
`build_participant` turns the section into a participant, neither started nor connected.
"""

from __future__ import annotations

import inspect
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from saga.errors import SagaConfigError

if TYPE_CHECKING:
    from broker import BrokerClientPool
    from saga.config.model import SagaConfig
    from saga.participant import SagaParticipant
    from storage.participant import SqlParticipantStore

__all__ = [
    "ParticipantConfig",
    "build_participant",
    "build_participant_store",
    "check_participant",
    "participant_options",
]

_TOPIC_NAME = re.compile(r"[A-Za-z0-9._-]{1,249}")
_ASYNC_DRIVERS = {"postgresql": "asyncpg", "sqlite": "aiosqlite"}


@dataclass(frozen=True, slots=True, kw_only=True)
class ParticipantConfig:
    """A participant process.

    Attributes:
        service: The participant service's name: decisions arrive on ``{service}SagaControl``, malformed
            input goes to ``{service}DeadLetter``, and its consumer group is ``{service}-participant``.
        app: ``module:attribute`` of the service's `SagaParticipant`, or of a factory called as
            ``factory(broker_pool=..., store=...)`` that returns one (the broker from ``broker``, the store
            from ``store_url``).
        store_url: The participant's own database (``postgresql+asyncpg://...`` or
            ``sqlite+aiosqlite:///...``) holding its claims, stored replies, tombstones and reply outbox.
            ``None``: no store (in-process dedup only).
        concurrency: Most commands in progress at once.
        group: Consumer group (``None``: ``{service}-participant``).
        lease_seconds: How long a claim on a command lasts unless renewed while its handler runs.
        grace_seconds: On SIGTERM, how long in-flight handlers may still finish; the rest are left to
            their leases.
        max_reply_bytes: Largest reply the broker takes; a bigger one becomes a small 500 reply.
        store_pool_size: Connections of the store's engine.
    """

    service: str = ""
    app: str = ""
    store_url: str | None = None
    concurrency: int = 100
    group: str | None = None
    lease_seconds: float = 30.0
    grace_seconds: float = 10.0
    max_reply_bytes: int = 1_048_576
    store_pool_size: int = 20

    def __repr__(self) -> str:
        # Written by hand so that logging a configuration never prints the database password.
        return (
            f"ParticipantConfig(service={self.service!r}, app={self.app!r}, "
            f"store_url={_safe(self.store_url)!r}, "
            f"concurrency={self.concurrency!r}, group={self.group!r}, lease_seconds={self.lease_seconds!r}, "
            f"grace_seconds={self.grace_seconds!r}, max_reply_bytes={self.max_reply_bytes!r}, "
            f"store_pool_size={self.store_pool_size!r})"
        )


def _safe(url: str | None) -> str | None:
    if url is None:
        return None
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "<not a database URL>"


def check_participant(
    section: ParticipantConfig | None, error: Callable[[str, str], SagaConfigError]
) -> None:
    """Raise ``error(key, problem)`` for the first value of the section that cannot work."""
    if section is None:
        return
    if not section.service:
        raise error("participant.service", "missing value (the participant service's name)")
    if not _TOPIC_NAME.fullmatch(section.service):
        raise error(
            "participant.service",
            f"{section.service!r} cannot be part of a topic name (use letters, digits, '.', '_', '-')",
        )
    module, sep, attribute = section.app.partition(":")
    if not section.app:
        raise error("participant.app", "missing value (module:attribute of a SagaParticipant or a factory)")
    if not sep or not _dotted(module) or not _dotted(attribute):
        raise error("participant.app", f"expected 'module:attribute', got {section.app!r}")
    if section.store_url is not None:
        problem = _store_url_problem(section.store_url)
        if problem:
            raise error("participant.store_url", problem)
    for key, value, low, inclusive in (
        ("concurrency", section.concurrency, 1, True),
        ("lease_seconds", section.lease_seconds, 0, False),
        ("grace_seconds", section.grace_seconds, 0, True),
        ("max_reply_bytes", section.max_reply_bytes, 1024, True),
        ("store_pool_size", section.store_pool_size, 1, True),
    ):
        if isinstance(value, float) and not math.isfinite(value):
            raise error(f"participant.{key}", f"must be a finite number, got {value!r}")
        if value < low or (not inclusive and value == low):
            rule = f"at least {low}" if inclusive else f"greater than {low}"
            raise error(f"participant.{key}", f"must be {rule}, got {value!r}")


def _dotted(text: str) -> bool:
    return bool(text) and all(part.isidentifier() for part in text.split("."))


def _store_url_problem(url: str) -> str | None:
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(url)
    except ArgumentError:
        return "not a database URL (expected e.g. postgresql+asyncpg://... or sqlite+aiosqlite:///...)"
    backend, driver = parsed.get_backend_name(), parsed.get_driver_name()
    shown = parsed.render_as_string(hide_password=True)
    if backend not in _ASYNC_DRIVERS:
        return f"unsupported database {backend!r} in {shown!r} (use postgresql+asyncpg:// or sqlite+aiosqlite:///)"
    if "+" not in parsed.drivername or driver != _ASYNC_DRIVERS[backend]:
        return f"{shown!r}: use {backend}+{_ASYNC_DRIVERS[backend]}:// (the store is asynchronous)"
    return None


def build_participant_store(config: SagaConfig) -> SqlParticipantStore | None:
    """The store ``participant.store_url`` names (``None`` without one); not started."""
    section = config.participant
    if section is None or section.store_url is None:
        return None
    from storage.participant import SqlParticipantStore

    return SqlParticipantStore(section.store_url, pool_size=section.store_pool_size)


def build_participant(
    config: SagaConfig, broker_pool: BrokerClientPool, store: SqlParticipantStore | None
) -> SagaParticipant:
    """The participant ``participant.app`` names, given the broker and the store; neither started.

    A factory is called with ``broker_pool=`` and ``store=``; a `SagaParticipant` object is used as it is
    (its own broker and store), after checking it serves ``participant.service``.

    Raises:
        SagaConfigError: The section is missing, or ``participant.app`` cannot be imported, is neither a
            participant nor a factory, or its factory fails or returns something else.
    """
    from saga.config.build import import_reference
    from saga.participant import SagaParticipant

    section = config.participant
    if section is None:
        raise SagaConfigError(
            "participant", "missing section (kafka-saga participant needs one)", source=config.source
        )
    key = "participant.app"
    target = import_reference(section.app, key, config.source)
    if isinstance(target, SagaParticipant):
        participant = target
    elif callable(target):
        try:
            participant = target(**_factory_arguments(target, broker_pool, store, section))
        except Exception as exc:
            raise SagaConfigError(
                key, f"factory {section.app!r} failed ({type(exc).__name__}: {exc})", source=config.source
            ) from exc
        if inspect.isawaitable(participant):
            raise SagaConfigError(key, f"factory {section.app!r} must not be async", source=config.source)
        if not isinstance(participant, SagaParticipant):
            raise SagaConfigError(
                key,
                f"factory {section.app!r} returned {type(participant).__name__}, not a SagaParticipant",
                source=config.source,
            )
    else:
        raise SagaConfigError(
            key,
            f"{section.app!r} is a {type(target).__name__}, not a SagaParticipant or a factory",
            source=config.source,
        )
    if participant.service_name != section.service:
        raise SagaConfigError(
            "participant.service",
            f"{section.app!r} serves {participant.service_name!r}, not {section.service!r}",
            source=config.source,
        )
    if not participant.command_topics:
        raise SagaConfigError(key, f"{section.app!r} has no command handlers", source=config.source)
    return participant


def participant_options(section: ParticipantConfig) -> dict[str, Any]:
    """Keyword arguments of `SagaParticipant` that the section sets."""
    return {
        "group_id": section.group,
        "concurrency": section.concurrency,
        "lease_seconds": section.lease_seconds,
        "max_reply_bytes": section.max_reply_bytes,
    }


def _factory_arguments(
    factory: Callable[..., Any],
    broker_pool: BrokerClientPool,
    store: SqlParticipantStore | None,
    section: ParticipantConfig,
) -> dict[str, Any]:
    """``broker_pool`` and ``store``, plus the `participant_options` the factory takes (all of them when it
    takes ``**kwargs``), so a factory passes them on to `SagaParticipant` with ``**options``."""
    arguments: dict[str, Any] = {"broker_pool": broker_pool, "store": store}
    options = participant_options(section)
    try:
        parameters = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):
        return arguments
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return {**arguments, **options}
    names = {p.name for p in parameters}
    return {**arguments, **{k: v for k, v in options.items() if k in names}}
