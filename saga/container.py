"""A dependency-injector container for services that wire their own application.

`SagaContainer` holds the configuration and the three singletons a service needs — the broker pool, the
storage and the saga manager — built from the same keys as ``kafka-saga`` reads (see `saga.config`)::

    container = create_container("config/kafka.yml")        # loads, and wires saga.manager
    container.wire(modules=[__name__])                       # your modules using Provide[...]

    @inject
    async def place_order(manager: SagaManager = Provide["saga_manager"]) -> None: ...

Once wired, ``SagaManager(storage)`` built anywhere in the process gets the container's broker pool through
its ``broker_pool=Provide["broker_pool"]`` default.

Load the configuration with `create_container` or ``container.config.from_dict(read_config_file(path))``:
both leave ``${VAR}`` references to `saga.config.load_config`, whose errors name the key and the variable.
(``config.from_yaml`` works too, but interpolates by itself and turns an unset variable into nothing.)
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from types import ModuleType
from typing import Any

from dependency_injector import containers, providers

from saga.config import (
    SagaConfig,
    build_broker_pool,
    build_manager,
    build_storage,
    load_config,
    read_config_file,
)

__all__ = ["SagaContainer", "create_container"]


def _saga_config(values: Mapping[str, Any] | None) -> SagaConfig:
    """Validate the container's raw configuration (``None`` when nothing was loaded: the defaults)."""
    return load_config(values or {})


class SagaContainer(containers.DeclarativeContainer):
    """Providers of a saga service.

    Attributes:
        config: The raw configuration mapping (same keys as the YAML file).
        settings: The validated `SagaConfig`.
        broker_pool: `InMemoryBrokerPool` or `KafkaBrokerPool`, per ``broker.type``.
        storage: `MemorySagaStorage` or `SqlAlchemySagaStorage`, per ``storage.url``.
        saga_manager: The `SagaManager` using both, with the configured sagas registered (not set up).
    """

    wiring_config = containers.WiringConfiguration(modules=["saga.manager"], auto_wire=False)

    config = providers.Configuration()
    settings = providers.Singleton(_saga_config, config)
    broker_pool = providers.Singleton(build_broker_pool, settings)
    storage = providers.Singleton(build_storage, settings)
    saga_manager = providers.Singleton(build_manager, settings, storage=storage, broker_pool=broker_pool)


def create_container(
    source: str | os.PathLike[str] | Mapping[str, Any] | None = None,
    *,
    wire: bool = True,
    modules: Iterable[ModuleType | str] = (),
) -> SagaContainer:
    """A `SagaContainer` loaded from ``source`` (a YAML path or a mapping; ``None``: the defaults).

    The configuration is validated here, so an error surfaces now rather than at first use.

    Args:
        source: Configuration to load.
        wire: Wire ``saga.manager`` (so ``SagaManager(storage)`` gets the container's pool) and
            ``modules``.
        modules: Further modules to wire.

    Raises:
        SagaConfigError: The configuration is invalid.
    """
    container = SagaContainer()
    if source is not None:
        data = source if isinstance(source, Mapping) else read_config_file(source)
        if isinstance(source, str | os.PathLike):
            load_config(source)  # validate with the file name in messages
        container.config.from_dict(dict(data or {}))
    container.settings()
    if wire:
        container.wire(modules=["saga.manager", *modules])
    return container
