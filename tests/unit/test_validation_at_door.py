"""Bad numbers, contexts and arguments are refused where they enter, naming the key; nothing is stored."""

from __future__ import annotations

import uuid
from decimal import Decimal
from typing import Any

import pytest

from broker import InMemoryBrokerPool, KafkaSettings
from broker.errors import BrokerConfigError
from saga import (
    RetryPolicy,
    Saga,
    SagaConfigError,
    SagaContext,
    SagaContextError,
    SagaDefinitionError,
    SagaManager,
    SagaStateError,
    load_config,
)
from saga.context import MAX_CONTEXT_DEPTH, encode_context
from storage import MemorySagaStorage


def nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize(
    ("section", "key", "value", "problem"),
    [
        ("timeouts", "default_reply_seconds", float("inf"), "finite"),
        ("timeouts", "default_reply_seconds", 1e12, "at most 31622400"),
        ("timeouts", "default_reply_seconds", "1e12", "at most 31622400"),
        ("recovery", "interval", float("nan"), "finite"),
        ("recovery", "interval", 86400, "at most 3600"),
        ("recovery", "lease_seconds", float("inf"), "finite"),
        ("recovery", "stale_after_seconds", 1e300, "at most"),
        ("recovery", "max_recovery_attempts", float("inf"), "expected an integer"),
        ("outbox", "relay_interval", float("inf"), "finite"),
        ("outbox", "relay_interval", -1, "greater than 0"),
    ],
)
def test_config_numbers_are_finite_and_bounded(section: str, key: str, value: Any, problem: str) -> None:
    with pytest.raises(SagaConfigError) as caught:
        load_config({section: {key: value}})
    assert caught.value.key == f"{section}.{key}"
    assert problem in caught.value.problem


def test_config_reads_yaml12_exponents_and_keeps_sane_values() -> None:
    config = load_config({"timeouts": {"default_reply_seconds": "1e3"}, "recovery": {"batch_size": "1e2"}})
    assert config.timeouts.default_reply_seconds == 1000.0 and config.recovery.batch_size == 100


def test_kafka_connect_timeout_is_bounded() -> None:
    with pytest.raises(SagaConfigError) as caught:
        load_config({"broker": {"kafka": {"connect_timeout": float("inf")}}})
    assert caught.value.key == "broker.kafka.connect_timeout"
    with pytest.raises(BrokerConfigError):
        KafkaSettings(connect_timeout=float("inf"))


@pytest.mark.parametrize("timeout", [1e12, float("inf"), float("nan"), 0, True])
def test_remote_step_timeout_is_bounded(timeout: float) -> None:
    with pytest.raises(SagaDefinitionError) as caught:
        Saga("t").remote_step(lambda c: None, timeout=timeout, name="reserve")
    assert caught.value.step == "reserve"


def test_saga_deadline_is_bounded() -> None:
    with pytest.raises(SagaDefinitionError, match="at most"):
        Saga("t", deadline=1e12)


@pytest.mark.parametrize(
    ("option", "value"),
    [("lease_seconds", float("inf")), ("relay_interval", float("nan")), ("wait_poll_interval", 1e9)],
)
def test_manager_options_are_bounded(option: str, value: float) -> None:
    with pytest.raises(SagaConfigError) as caught:
        SagaManager(MemorySagaStorage(), InMemoryBrokerPool(), **{option: value})
    assert caught.value.key == option


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (nested(300), f"nested deeper than {MAX_CONTEXT_DEPTH}"),
        ({"a": {"b": nested(MAX_CONTEXT_DEPTH)}}, "nested deeper"),
        ("ok\ud800", "lone surrogate"),
        ({"k\udc00": 1}, "lone surrogate"),
        (Decimal("NaN"), "not a finite number"),
        (Decimal("-Infinity"), "not a finite number"),
        (2**70, "64 bits"),
        (2**63, "64 bits"),
        (-(2**63) - 1, "64 bits"),
        ([1, {"x": (2**64,)}], "64 bits"),
    ],
)
def test_context_refuses_what_json_peers_cannot_read(value: Any, reason: str) -> None:
    with pytest.raises(SagaContextError, match=reason) as caught:
        SagaContext(order=value)
    assert caught.value.key == "order"
    with pytest.raises(SagaContextError, match=reason) as caught:
        encode_context({"order": value}, step="reserve")
    assert caught.value.key == "order" and caught.value.step == "reserve"


def test_context_keeps_what_fits() -> None:
    ctx = SagaContext(deep=nested(MAX_CONTEXT_DEPTH - 1), text="héllo €", low=-(2**63), high=2**63 - 1)
    assert SagaContext.from_json(ctx.to_json()) == ctx


def test_context_key_with_a_lone_surrogate_is_refused_with_a_printable_key() -> None:
    with pytest.raises(SagaContextError) as caught:
        SagaContext({"bad\ud800": 1})
    assert caught.value.key == "bad\\ud800"
    str(caught.value).encode()  # printable in any log


def _saga() -> Saga:
    return Saga("door").local_step(lambda c: c, name="only").commit()


async def test_run_before_setup_raises_at_once() -> None:
    storage = MemorySagaStorage()
    manager = SagaManager(storage, InMemoryBrokerPool())
    for pause_on_disk in (True, False):
        with pytest.raises(SagaStateError, match="not set up"):
            await manager.run(_saga(), {"n": 1}, pause_on_disk=pause_on_disk)
    await storage.start()
    assert (await storage.query()).total == 0


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"user": 42}, TypeError, "user must be a str or a uuid.UUID"),
        ({"user": b"alice"}, TypeError, "user must be a str or a uuid.UUID"),
        ({"user": "al\ud800ice"}, ValueError, "user is not valid UTF-8"),
        ({"user": "u" * 256}, ValueError, "user is 256 characters"),
        ({"idempotency_key": 7}, TypeError, "idempotency_key must be a str"),
        ({"idempotency_key": "k\udfff"}, ValueError, "idempotency_key is not valid UTF-8"),
    ],
)
async def test_run_checks_user_and_idempotency_key(
    kwargs: dict[str, Any], error: type[Exception], match: str
) -> None:
    async with SagaManager(MemorySagaStorage(), InMemoryBrokerPool()) as manager:
        with pytest.raises(error, match=match):
            await manager.run(_saga(), {"n": 1}, **kwargs)
        assert (await manager.storage.query()).total == 0


async def test_run_stores_a_uuid_user_as_its_string() -> None:
    user = uuid.UUID(int=7)
    async with SagaManager(MemorySagaStorage(), InMemoryBrokerPool()) as manager:
        execution = await manager.run(_saga(), {"n": 1}, user=user)
        record = await manager.storage.load(execution.id)
    assert record.user == str(user) and execution.user == str(user)


async def test_run_refuses_a_bad_context_before_storing_anything() -> None:
    async with SagaManager(MemorySagaStorage(), InMemoryBrokerPool()) as manager:
        with pytest.raises(SagaContextError) as caught:
            await manager.run(_saga(), {"n": Decimal("NaN")})
        assert caught.value.key == "n"
        assert (await manager.storage.query()).total == 0


def test_retry_policy_numbers_stay_finite() -> None:
    with pytest.raises(TypeError):
        RetryPolicy(max_attempts=2, initial_delay=float("inf"))
