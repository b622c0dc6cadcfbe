"""SagaContainer: providers built from the configuration, and wiring of Provide[...] defaults."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from dependency_injector.wiring import Provide, inject

from broker import BrokerClientPool, InMemoryBrokerPool
from broker.kafka import KafkaBrokerPool
from saga.config import SagaConfig
from saga.container import SagaContainer, create_container
from saga.errors import SagaConfigError
from saga.manager import SagaManager
from storage import MemorySagaStorage, SagaStorage

THIS_MODULE = sys.modules[__name__]


@inject
def injected_manager(manager: SagaManager = Provide["saga_manager"]) -> SagaManager:
    return manager


@inject
def injected_pool(pool: BrokerClientPool = Provide["broker_pool"]) -> BrokerClientPool:
    return pool


def manager_built_here(storage: SagaStorage) -> SagaManager:
    """Application code that leaves the broker pool to the container."""
    return SagaManager(storage, service_name="built-here")


@pytest.fixture
def container() -> Iterator[SagaContainer]:
    container = create_container(
        {"service": {"name": "wired"}, "sagas": ["saga.demo:ORDER_SAGA"]}, modules=[THIS_MODULE]
    )
    yield container
    container.unwire()


def test_providers_follow_the_configuration(container: SagaContainer) -> None:
    settings = container.settings()
    assert isinstance(settings, SagaConfig)
    assert settings.service.name == "wired"
    assert isinstance(container.broker_pool(), InMemoryBrokerPool)
    assert isinstance(container.storage(), MemorySagaStorage)
    manager = container.saga_manager()
    assert manager is container.saga_manager()  # singleton
    assert manager.storage is container.storage()
    assert manager.broker_pool is container.broker_pool()
    assert manager.service_name == "wired"
    assert ("demo-order", 1) in manager.registry


def test_provide_markers_resolve_in_wired_modules(container: SagaContainer) -> None:
    assert injected_manager() is container.saga_manager()
    assert injected_pool() is container.broker_pool()


def test_a_manager_built_without_a_pool_gets_the_containers(container: SagaContainer) -> None:
    storage = MemorySagaStorage()
    manager = manager_built_here(storage)
    assert manager.broker_pool is container.broker_pool()
    assert manager.storage is storage
    direct = SagaManager(storage)  # saga.manager itself is wired too
    assert direct.broker_pool is container.broker_pool()


def test_outside_a_wired_container_the_pool_must_be_passed() -> None:
    with pytest.raises(SagaConfigError, match="broker_pool: got the unresolved dependency-injector marker"):
        manager_built_here(MemorySagaStorage())


def test_overriding_a_provider(container: SagaContainer) -> None:
    pool = InMemoryBrokerPool(partitions=1)
    with container.broker_pool.override(pool):
        assert injected_pool() is pool
        assert manager_built_here(MemorySagaStorage()).broker_pool is pool


def test_kafka_configuration_from_a_file(tmp_path: Path) -> None:
    path = tmp_path / "saga.yml"
    path.write_text(
        "broker:\n  type: kafka\n  kafka:\n    bootstrap_servers: ${SAGA_TEST_BOOTSTRAP:kafka-1:9092}\n"
    )
    container = create_container(path, wire=False)
    pool = container.broker_pool()
    assert isinstance(pool, KafkaBrokerPool)
    assert pool.settings.bootstrap_servers == "kafka-1:9092"


def test_invalid_configuration_fails_at_creation(tmp_path: Path) -> None:
    path = tmp_path / "saga.yml"
    path.write_text("storage:\n  ulr: memory://\n")
    with pytest.raises(SagaConfigError) as info:
        create_container(path)
    assert str(info.value) == f"{path}: storage.ulr: unknown key (did you mean 'url'?)"


def test_an_unloaded_container_uses_the_defaults() -> None:
    container = SagaContainer()
    assert container.settings() == SagaConfig()
    assert isinstance(container.saga_manager(), SagaManager)


def test_config_loaded_by_hand() -> None:
    container = SagaContainer()
    container.config.from_dict({"service": {"name": "by-hand"}, "recovery": {"interval": 3}})
    assert container.settings().service.name == "by-hand"
    assert container.settings().recovery.interval == 3.0
