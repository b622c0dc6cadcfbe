"""The composition root: build_manager wiring, saga imports from the configuration, default timeouts."""

from __future__ import annotations

import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker import InMemoryBrokerPool
from broker.kafka import KafkaBrokerPool
from saga.config import (
    apply_default_timeout,
    build_broker_pool,
    build_manager,
    build_recovery_worker,
    build_storage,
    import_sagas,
    load_config,
)
from saga.consumer import DEFAULT_REPLY_CONCURRENCY
from saga.definitions import Saga
from saga.demo import ORDER_SAGA
from saga.errors import SagaConfigError
from saga.manager import SagaManager
from saga.messages import SagaRequest
from saga.recovery import SagaRecoveryWorker
from storage import MemorySagaStorage, SqlAlchemySagaStorage


@pytest.fixture
def sagas_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A throwaway importable module holding definitions and things that are not."""
    name = "kafka_saga_test_definitions"
    (tmp_path / f"{name}.py").write_text(
        textwrap.dedent(
            """
            from saga.definitions import Saga
            from saga.messages import SagaRequest

            def _send(context):
                return SagaRequest("Topic", {})

            PAYMENT = Saga("payment").remote_step(_send).commit()
            OPEN = Saga("open")
            OPEN.local_step(lambda context: None, name="step")
            UNCOMMITTED = Saga("unc").remote_step(_send)
            NAMELESS = Saga().local_step(lambda context: None, name="only").commit()
            NOT_A_SAGA = 42

            class Holder:
                NESTED = Saga("nested").local_step(lambda context: None, name="n").commit()
            """
        )
    )
    (tmp_path / "kafka_saga_broken_module.py").write_text("raise RuntimeError('import side effect failed')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    for module in (name, "kafka_saga_broken_module"):
        sys.modules.pop(module, None)


def test_build_manager_wires_everything(sagas_module: str) -> None:
    manager = build_manager(
        {
            "service": {"name": "orders"},
            "sagas": [f"{sagas_module}:PAYMENT", f"{sagas_module}:Holder.NESTED", "saga.demo:ORDER_SAGA"],
            "topics": {"reply": "ordersReplies", "dead_letter": "ordersDLQ"},
            "consumer": {"group": "orders-group", "concurrency": 32},
            "outbox": {"relay_interval": 0.25},
            "recovery": {"lease_seconds": 7},
        }
    )
    assert isinstance(manager, SagaManager)
    assert isinstance(manager.storage, MemorySagaStorage)
    assert isinstance(manager.broker_pool, InMemoryBrokerPool)
    assert manager.service_name == "orders"
    assert manager.reply_topic == "ordersReplies"
    assert manager.dead_letter_topic == "ordersDLQ"
    assert manager.consumer_group == "orders-group"
    assert manager.reply_concurrency == 32
    assert manager.relay_interval == 0.25
    assert manager.lease_seconds == 7.0
    assert manager.registry.keys() == [("payment", 1), ("nested", 1), ("demo-order", 1)]
    assert manager.consumer is None and manager.relay is None  # not set up


def test_build_manager_defaults_follow_the_service_name() -> None:
    manager = build_manager({"service": {"name": "billing"}})
    assert manager.reply_topic == "billingReply"
    assert manager.dead_letter_topic == "billingDeadLetter"
    assert manager.consumer_group == "billing-orchestrator"
    assert manager.reply_concurrency == DEFAULT_REPLY_CONCURRENCY
    assert len(manager.registry) == 0


def test_build_manager_accepts_overrides_and_injected_parts() -> None:
    storage = MemorySagaStorage()
    pool = InMemoryBrokerPool()
    manager = build_manager({}, storage=storage, broker_pool=pool, consume_replies=False, owner="me")
    assert manager.storage is storage
    assert manager.broker_pool is pool
    assert manager.consume_replies is False
    assert manager.owner == "me"


def test_build_manager_from_a_file(tmp_path: Path) -> None:
    path = tmp_path / "saga.yml"
    path.write_text("service:\n  name: files\nsagas:\n  - saga.demo:ORDER_SAGA\n")
    manager = build_manager(path)
    assert manager.service_name == "files"
    assert ("demo-order", 1) in manager.registry


def test_from_config_is_build_manager(tmp_path: Path) -> None:
    path = tmp_path / "saga.yml"
    path.write_text("service:\n  name: viaclass\n")
    manager = SagaManager.from_config(path)
    assert manager.service_name == "viaclass"


def test_build_manager_reports_config_errors_first(tmp_path: Path) -> None:
    path = tmp_path / "saga.yml"
    path.write_text("recovery:\n  interval: fast\n")
    with pytest.raises(SagaConfigError, match=r"recovery\.interval: expected a number, got 'fast'"):
        build_manager(path)


def test_storage_selection(tmp_path: Path) -> None:
    assert isinstance(build_storage(load_config({})), MemorySagaStorage)
    url = f"sqlite+aiosqlite:///{tmp_path / 's.db'}"
    storage = build_storage(load_config({"storage": {"url": url, "auto_migrate": False}}))
    assert isinstance(storage, SqlAlchemySagaStorage)
    assert not (tmp_path / "s.db").exists()  # building connects to nothing


def test_broker_selection() -> None:
    pool = build_broker_pool(load_config({"broker": {"memory": {"partitions": 3}}}))
    assert isinstance(pool, InMemoryBrokerPool)
    kafka = build_broker_pool(
        load_config({"broker": {"type": "kafka", "kafka": {"bootstrap_servers": "k1:9092", "linger_ms": 5}}})
    )
    assert isinstance(kafka, KafkaBrokerPool)
    assert kafka.settings.bootstrap_servers == "k1:9092"
    assert kafka.settings.linger_ms == 5


def test_recovery_worker_from_the_config() -> None:
    config = load_config(
        {
            "recovery": {
                "interval": 2,
                "batch_size": 7,
                "max_recovery_attempts": 3,
                "stale_after_seconds": 30,
                "lease_seconds": 9,
                "saga_names": ["demo-order"],
                "concurrency": 4,
            }
        }
    )
    worker = build_recovery_worker(build_manager(config), config)
    assert isinstance(worker, SagaRecoveryWorker)
    assert (worker.interval, worker.batch_size, worker.max_recovery_attempts) == (2.0, 7, 3)
    assert (worker.stale_after_seconds, worker.lease_seconds, worker.concurrency) == (30, 9.0, 4)
    assert worker.saga_names == ("demo-order",)
    registered = load_config({"sagas": ["saga.demo:ORDER_SAGA"]})
    assert build_recovery_worker(build_manager(registered), registered).saga_names == ("demo-order",)
    assert build_recovery_worker(build_manager({}), load_config({})).saga_names == ()


# -- sagas listed in the configuration ---------------------------------------------------------------


def test_import_sagas(sagas_module: str) -> None:
    config = load_config({"sagas": [f"{sagas_module}:PAYMENT", "saga.demo:ORDER_SAGA"]})
    sagas = import_sagas(config)
    assert [s.name for s in sagas] == ["payment", "demo-order"]
    assert sagas[1] is ORDER_SAGA


def test_nameless_sagas_are_named_on_registration(sagas_module: str) -> None:
    manager = build_manager({"sagas": [f"{sagas_module}:NAMELESS"]})
    names = [saga.name or "" for saga in manager.registry]
    assert names[0].startswith("saga_")


def test_a_saga_without_commit_is_refused_with_the_fix(sagas_module: str) -> None:
    with pytest.raises(SagaConfigError, match=r"sagas\[0\].*'open' is not committed: call .commit\(\)"):
        build_manager({"sagas": [f"{sagas_module}:OPEN"]})
    with pytest.raises(
        SagaConfigError,
        match=r"sagas\[0\]: .*:UNCOMMITTED' is a RemoteSagaStep \(step '_send' of saga 'unc'\), not a Saga: "
        r"end the chain with .commit\(\)",
    ):
        build_manager({"sagas": [f"{sagas_module}:UNCOMMITTED"]})


@pytest.mark.parametrize(
    ("entry", "problem"),
    [
        ("kafka_saga_no_such_module:X", "cannot import module 'kafka_saga_no_such_module' (No module named"),
        (
            "kafka_saga_broken_module:X",
            "importing module 'kafka_saga_broken_module' failed (RuntimeError: import side effect failed)",
        ),
        ("{module}:MISSING", "module '{module}' has no attribute 'MISSING'"),
        ("{module}:NOT_A_SAGA", "'{module}:NOT_A_SAGA' is an int, not a Saga"),
        ("{module}:Holder", "'{module}:Holder' is a type, not a Saga"),
    ],
)
def test_import_errors_name_the_entry(sagas_module: str, tmp_path: Path, entry: str, problem: str) -> None:
    entry = entry.format(module=sagas_module)
    path = tmp_path / "saga.yml"
    path.write_text(f"sagas:\n  - saga.demo:ORDER_SAGA\n  - {entry}\n")
    with pytest.raises(SagaConfigError) as info:
        build_manager(path)
    assert info.value.key == "sagas[1]"
    assert str(info.value).startswith(f"{path}: sagas[1]: {problem.format(module=sagas_module)}")


def test_conflicting_definitions_name_the_entry(sagas_module: str) -> None:
    import importlib

    other = Saga("payment").local_step(lambda context: None, name="x").commit()
    setattr(importlib.import_module(sagas_module), "OTHER_PAYMENT", other)  # noqa: B010
    with pytest.raises(SagaConfigError) as info:
        build_manager({"sagas": [f"{sagas_module}:PAYMENT", f"{sagas_module}:OTHER_PAYMENT"]})
    assert info.value.key == "sagas[1]"
    assert "cannot be registered: saga 'payment' version 1 is already registered" in str(info.value)


def test_sagas_are_only_imported_from_the_configuration() -> None:
    # Loading validates the references but imports nothing; only building does.
    config = load_config({"sagas": ["kafka_saga_never_imported:X"]})
    assert "kafka_saga_never_imported" not in sys.modules
    with pytest.raises(SagaConfigError):
        import_sagas(config)


# -- timeouts.default_reply_seconds -----------------------------------------------------------------


def _remote(name: str, timeout: float | None = None) -> Saga:
    return (
        Saga(name)
        .remote_step(lambda context: SagaRequest("T", {}), name="first", timeout=timeout)
        .remote_step(lambda context: SagaRequest("T", {}), name="second")
        .commit()
    )


def test_default_reply_timeout_fills_steps_without_one() -> None:
    saga = _remote("timeouts", timeout=3)
    apply_default_timeout(saga, 20)
    assert [s.timeout for s in saga.steps] == [3.0, 20]  # type: ignore[attr-defined]
    apply_default_timeout(saga, 40)  # a later configuration replaces its own default only
    assert [s.timeout for s in saga.steps] == [3.0, 40]  # type: ignore[attr-defined]
    apply_default_timeout(saga, None)
    assert [s.timeout for s in saga.steps] == [3.0, None]  # type: ignore[attr-defined]


def test_default_reply_timeout_reaches_sub_sagas() -> None:
    branch = _remote("branch")
    saga = Saga("outer").conditional_step(name="choose").if_then(lambda context: True, branch).commit()
    apply_default_timeout(saga, 12)
    assert [s.timeout for s in branch.steps] == [12, 12]  # type: ignore[attr-defined]


def test_build_manager_applies_the_default_reply_timeout(sagas_module: str) -> None:
    manager = build_manager({"sagas": [f"{sagas_module}:PAYMENT"], "timeouts": {"default_reply_seconds": 15}})
    (saga,) = list(manager.registry)
    assert saga.steps[0].timeout == 15  # type: ignore[attr-defined]
