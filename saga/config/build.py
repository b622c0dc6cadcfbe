"""The composition root: turn a `SagaConfig` into wired objects.

Nothing here starts anything: the storage, the broker pool and the manager come back built but not
connected, so a caller decides when to ``setup()`` and a configuration error surfaces before any file,
connection or topic is created.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from broker import BrokerClientPool, InMemoryBrokerPool
from saga.config.loader import load_config
from saga.config.model import SagaConfig
from saga.errors import SagaConfigError, SagaDefinitionError
from storage import MemorySagaStorage, SagaStorage

if TYPE_CHECKING:
    from saga.definitions import Saga
    from saga.manager import SagaManager
    from saga.recovery import SagaRecoveryWorker

__all__ = [
    "apply_default_timeout",
    "build_broker_pool",
    "build_manager",
    "build_recovery_worker",
    "build_storage",
    "import_sagas",
    "manager_options",
]

ConfigSource = str | os.PathLike[str] | Mapping[str, Any] | SagaConfig


def build_storage(config: SagaConfig) -> SagaStorage:
    """The storage ``storage.url`` selects: `MemorySagaStorage` for ``memory://``, else SQLAlchemy."""
    if config.storage.is_memory:
        return MemorySagaStorage()
    from storage import SqlAlchemySagaStorage

    return SqlAlchemySagaStorage(
        config.storage.url,
        auto_migrate=config.storage.auto_migrate,
        pool_size=config.storage.pool_size,
        schema=config.storage.schema,
        echo=config.storage.echo,
    )


def build_broker_pool(config: SagaConfig) -> BrokerClientPool:
    """The broker pool ``broker.type`` selects, configured from ``broker.memory`` or ``broker.kafka``."""
    if config.broker.type == "kafka":
        from broker.kafka import KafkaBrokerPool

        return KafkaBrokerPool(config.broker.kafka)
    return InMemoryBrokerPool(partitions=config.broker.memory.partitions)


def import_sagas(config: SagaConfig) -> list[Saga]:
    """Import the definitions listed under ``sagas`` (and only those: nothing is imported by name from a
    message or a database row).

    Raises:
        SagaConfigError: An entry cannot be imported or is not a `Saga`; the key names the entry
            (``sagas[2]``).
    """
    from saga.definitions import Saga
    from saga.steps import SagaStep, not_a_saga

    sagas: list[Saga] = []
    for index, entry in enumerate(config.sagas):
        key = f"sagas[{index}]"
        module_name, _, attribute = entry.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            raise SagaConfigError(
                key, f"cannot import module {module_name!r} ({exc})", source=config.source
            ) from exc
        except Exception as exc:
            raise SagaConfigError(
                key,
                f"importing module {module_name!r} failed ({type(exc).__name__}: {exc})",
                source=config.source,
            ) from exc
        obj: Any = module
        for part in attribute.split("."):
            try:
                obj = getattr(obj, part)
            except AttributeError:
                raise SagaConfigError(
                    key, f"module {module_name!r} has no attribute {attribute!r}", source=config.source
                ) from None
        if isinstance(obj, SagaStep):
            raise SagaConfigError(key, f"{entry!r} is {not_a_saga(obj)}", source=config.source)
        if not isinstance(obj, Saga):
            raise SagaConfigError(
                key, f"{entry!r} is {_article(type(obj).__name__)}, not a Saga", source=config.source
            )
        sagas.append(obj)
    return sagas


def _article(name: str) -> str:
    return f"{'an' if name[:1].lower() in 'aeiou' else 'a'} {name}"


def manager_options(config: SagaConfig) -> dict[str, Any]:
    """Keyword arguments of `SagaManager` that the configuration sets."""
    return {
        "service_name": config.service.name,
        "reply_topic": config.topics.reply,
        "dead_letter_topic": config.topics.dead_letter,
        "consumer_group": config.consumer.group,
        "reply_concurrency": config.consumer.concurrency,
        "consume_replies": config.consumer.consume_replies,
        "lease_seconds": config.recovery.lease_seconds,
        "relay_interval": config.outbox.relay_interval,
    }


def apply_default_timeout(saga: Saga, seconds: float | None) -> None:
    """Give ``seconds`` as reply timeout to the remote steps (sub-sagas included) that set none.

    A step whose timeout came from an earlier configuration is updated; one set in code is left alone.
    """
    from saga.steps import ConditionalSagaStep, RemoteSagaStep

    for step in saga.steps:
        if isinstance(step, RemoteSagaStep):
            if step.timeout is None or getattr(step, _TIMEOUT_MARK, False):
                step.timeout = seconds
                setattr(step, _TIMEOUT_MARK, seconds is not None)
        elif isinstance(step, ConditionalSagaStep):
            for sub in step.sub_sagas():
                apply_default_timeout(sub, seconds)


_TIMEOUT_MARK = "_saga_config_default_timeout"


def build_manager(
    source: ConfigSource,
    *,
    storage: SagaStorage | None = None,
    broker_pool: BrokerClientPool | None = None,
    **overrides: Any,
) -> SagaManager:
    """A fully wired `SagaManager` (storage, broker pool, registered sagas, settings), not yet set up.

    Args:
        source: A YAML path, a parsed mapping, or a `SagaConfig`.
        storage: Use this storage instead of building one from ``storage.url``.
        broker_pool: Use this pool instead of building one from ``broker``.
        **overrides: `SagaManager` keyword arguments replacing the configured ones (e.g.
            ``consume_replies=False`` for a process that only starts sagas).

    Raises:
        SagaConfigError: The configuration is invalid or a listed saga cannot be imported or registered.
    """
    from saga.manager import SagaManager

    config = load_config(source)
    sagas = import_sagas(config)
    # Keywords, not positions: once a container wired saga.manager, dependency-injector adds
    # broker_pool=... itself unless it is passed by keyword.
    manager = SagaManager(
        storage=storage if storage is not None else build_storage(config),
        broker_pool=broker_pool if broker_pool is not None else build_broker_pool(config),
        **{**manager_options(config), **overrides},
    )
    for index, (entry, saga) in enumerate(zip(config.sagas, sagas, strict=True)):
        try:
            manager.register(saga)
        except SagaDefinitionError as exc:
            raise SagaConfigError(
                f"sagas[{index}]", f"{entry!r} cannot be registered: {exc}", source=config.source
            ) from exc
        if config.timeouts.default_reply_seconds is not None:
            apply_default_timeout(saga, config.timeouts.default_reply_seconds)
    return manager


def build_recovery_worker(manager: SagaManager, config: SagaConfig) -> SagaRecoveryWorker:
    """The `SagaRecoveryWorker` the ``recovery`` section describes, for ``manager``.

    Without ``recovery.saga_names`` it recovers the sagas ``manager`` has registered, and only those: in a
    database shared by several services, another service's executions are not this worker's to resume
    (it could not, lacking their definitions, and every try would count against them).
    """
    from saga.recovery import SagaRecoveryWorker

    recovery = config.recovery
    names = recovery.saga_names or tuple(dict.fromkeys(saga.name or "" for saga in manager.registry))
    return SagaRecoveryWorker(
        manager,
        interval=recovery.interval,
        batch_size=recovery.batch_size,
        max_recovery_attempts=recovery.max_recovery_attempts,
        stale_after_seconds=recovery.stale_after_seconds,
        saga_names=names,
        lease_seconds=recovery.lease_seconds,
        concurrency=recovery.concurrency,
    )


def import_reference(entry: str, key: str, source: str | None) -> Any:
    """The object ``module:attribute`` names, for configuration keys that reference code by name.

    Raises:
        SagaConfigError: The module cannot be imported or lacks the attribute; the error names ``key``.
    """
    module_name, _, attribute = entry.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise SagaConfigError(key, f"cannot import module {module_name!r} ({exc})", source=source) from exc
    except Exception as exc:
        raise SagaConfigError(
            key, f"importing module {module_name!r} failed ({type(exc).__name__}: {exc})", source=source
        ) from exc
    obj: Any = module
    for part in attribute.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise SagaConfigError(
                key, f"module {module_name!r} has no attribute {attribute!r}", source=source
            ) from None
    return obj
