"""Configuration: loading, validation messages users see, interpolation, the shipped files."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import yaml

from broker.settings import KafkaSettings
from saga.config import (
    EMBEDDED_CONFIG,
    RecoveryConfig,
    SagaConfig,
    interpolate,
    load_config,
    read_config_file,
)
from saga.errors import SagaConfigError

REPO = Path(__file__).resolve().parents[2]


def error_of(data: Any, **kwargs: Any) -> SagaConfigError:
    with pytest.raises(SagaConfigError) as info:
        load_config(data, **kwargs)
    return info.value


def write(tmp_path: Path, text: str, name: str = "saga.yml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# -- defaults and happy paths --------------------------------------------------------------------------


def test_empty_mapping_gives_the_defaults() -> None:
    config = load_config({})
    assert config == SagaConfig()
    assert config.broker.type == "memory"
    assert config.storage.url == "memory://"
    assert config.storage.is_memory
    assert config.reply_topic == "sagaReply"
    assert config.recovery == RecoveryConfig()


def test_empty_file_gives_the_defaults(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, "# nothing\n"))
    assert config == SagaConfig()
    assert config.source == str(tmp_path / "saga.yml")


def test_a_config_is_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        load_config({}).service.name = "x"  # type: ignore[misc]


def test_load_config_returns_a_saga_config_unchanged() -> None:
    config = SagaConfig()
    assert load_config(config) is config


def test_full_file(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
service: {name: orders}
broker:
  type: kafka
  kafka:
    bootstrap_servers: "k1:9092,k2:9092"
    client_id: orders-1
    compression_type: zstd
    linger_ms: 5
    topic_partitions: 12
    topic_replication_factor: 3
storage: {url: "postgresql+asyncpg://u:p@db/sagas", auto_migrate: false}
sagas: ["saga.demo:ORDER_SAGA"]
topics: {reply: ordersReplies, dead_letter: ordersDLQ}
consumer: {group: orders-orchestrators}
outbox: {relay_interval: 0.5}
recovery:
  enabled: false
  interval: 2
  batch_size: 10
  max_recovery_attempts: 3
  stale_after_seconds: 60
  lease_seconds: 12.5
  saga_names: [order, refund]
timeouts: {default_reply_seconds: 45}
logging: {level: debug, format: json}
""",
    )
    config = load_config(path)
    assert config.service.name == "orders"
    assert config.broker.type == "kafka"
    assert config.broker.kafka == KafkaSettings(
        bootstrap_servers="k1:9092,k2:9092",
        client_id="orders-1",
        compression_type="zstd",
        linger_ms=5,
        topic_partitions=12,
        topic_replication_factor=3,
    )
    assert config.storage.url == "postgresql+asyncpg://u:p@db/sagas"
    assert config.storage.auto_migrate is False
    assert config.sagas == ("saga.demo:ORDER_SAGA",)
    assert config.topics.reply == "ordersReplies"
    assert config.reply_topic == "ordersReplies"
    assert config.topics.dead_letter == "ordersDLQ"
    assert config.consumer.group == "orders-orchestrators"
    assert config.outbox.relay_interval == 0.5
    assert config.recovery == RecoveryConfig(
        enabled=False,
        interval=2.0,
        batch_size=10,
        max_recovery_attempts=3,
        stale_after_seconds=60,
        lease_seconds=12.5,
        saga_names=("order", "refund"),
    )
    assert isinstance(config.recovery.interval, float)
    assert config.timeouts.default_reply_seconds == 45.0
    assert config.logging.level == "debug"
    assert config.logging.format == "json"


def test_null_sections_take_their_defaults() -> None:
    config = load_config({"recovery": None, "sagas": None, "topics": None})
    assert config.recovery == RecoveryConfig()
    assert config.sagas == ()


# -- the messages users see ----------------------------------------------------------------------------


def test_misspelt_key_suggests_the_closest(tmp_path: Path) -> None:
    path = write(tmp_path, "storage:\n  ulr: memory://\n")
    error = error_of(path)
    assert str(error) == f"{path}: storage.ulr: unknown key (did you mean 'url'?)"
    assert error.key == "storage.ulr"
    assert error.problem == "unknown key (did you mean 'url'?)"
    assert error.source == str(path)


def test_misspelt_section_suggests_the_closest() -> None:
    assert str(error_of({"stroage": {}})) == "stroage: unknown key (did you mean 'storage'?)"


def test_misspelt_kafka_setting_suggests_the_closest() -> None:
    error = error_of({"broker": {"kafka": {"bootstrap_server": "k:9092"}}})
    assert str(error) == "broker.kafka.bootstrap_server: unknown key (did you mean 'bootstrap_servers'?)"


def test_unknown_key_without_a_close_match_lists_the_valid_keys() -> None:
    error = error_of({"storage": {"driver": "asyncpg"}})
    valid = "url, auto_migrate, pool_size, schema, echo"
    assert str(error) == f"storage.driver: unknown key (valid keys: {valid})"


def test_wrong_type(tmp_path: Path) -> None:
    path = write(tmp_path, "recovery:\n  interval: fast\n")
    assert str(error_of(path)) == f"{path}: recovery.interval: expected a number, got 'fast'"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"recovery": {"batch_size": 2.5}}, "recovery.batch_size: expected an integer, got 2.5"),
        ({"recovery": {"enabled": "maybe"}}, "recovery.enabled: expected true or false, got 'maybe'"),
        (
            {"recovery": {"saga_names": "order"}},
            "recovery.saga_names: expected a list of strings, got 'order'",
        ),
        ({"recovery": {"saga_names": ["a", 3]}}, "recovery.saga_names[1]: expected a string, got 3"),
        ({"recovery": ["interval"]}, "recovery: expected a mapping of keys, got a list"),
        ({"service": {"name": 42}}, "service.name: expected a string, got 42"),
        ({"storage": {"url": ["x"]}}, "storage.url: expected a string, got a list"),
        ({"recovery": {"interval": True}}, "recovery.interval: expected a number, got true"),
        (
            {"broker": {"memory": {"partitions": "4"}}},
            "broker.memory.partitions: expected an integer, got '4'",
        ),
        (
            {"broker": {"kafka": {"linger_ms": "soon"}}},
            "broker.kafka.linger_ms: expected an integer, got 'soon'",
        ),
    ],
)
def test_wrong_types(data: dict[str, Any], message: str) -> None:
    assert str(error_of(data)) == message


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"storage": {"url": None}}, "storage.url: missing value"),
        ({"storage": {"url": ""}}, "storage.url: missing value"),
        ({"service": {"name": None}}, "service.name: missing value"),
        ({"recovery": {"interval": None}}, "recovery.interval: missing value"),
        ({"sagas": [None]}, "sagas[0]: missing value"),
        (
            {"broker": {"type": "kafka"}},
            "broker.kafka.bootstrap_servers: missing value (required when broker.type is 'kafka')",
        ),
    ],
)
def test_missing_values(data: dict[str, Any], message: str) -> None:
    assert str(error_of(data)) == message


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"recovery": {"batch_size": 0}}, "recovery.batch_size: must be at least 1, got 0"),
        ({"recovery": {"interval": 0}}, "recovery.interval: must be greater than 0, got 0.0"),
        ({"recovery": {"lease_seconds": -1}}, "recovery.lease_seconds: must be greater than 0, got -1.0"),
        (
            {"recovery": {"stale_after_seconds": -5}},
            "recovery.stale_after_seconds: must be at least 0, got -5",
        ),
        ({"broker": {"memory": {"partitions": 0}}}, "broker.memory.partitions: must be at least 1, got 0"),
        (
            {"broker": {"type": "rabbit"}},
            "broker.type: expected one of 'memory', 'kafka', got 'rabbit'",
        ),
        (
            {"broker": {"type": "kafak"}},
            "broker.type: expected one of 'memory', 'kafka', got 'kafak' (did you mean 'kafka'?)",
        ),
        (
            {"logging": {"level": "verbos"}},
            "logging.level: expected one of 'DEBUG', 'INFO', 'WARNING', 'ERROR', 'CRITICAL', got 'verbos'",
        ),
        (
            {"logging": {"level": "warnin"}},
            "logging.level: expected one of 'DEBUG', 'INFO', 'WARNING', 'ERROR', 'CRITICAL', got 'warnin' "
            "(did you mean 'WARNING'?)",
        ),
        (
            {"logging": {"format": "pretty"}},
            "logging.format: expected 'text', 'json' or a logging format string with %(...)s, got 'pretty'",
        ),
        (
            {"service": {"name": "order service"}},
            "service.name: 'order service' cannot be part of a topic name "
            "(use letters, digits, '.', '_', '-')",
        ),
        (
            {"topics": {"reply": "a/b"}},
            "topics.reply: 'a/b' is not a valid topic name (use letters, digits, '.', '_', '-')",
        ),
        (
            {"sagas": ["saga.demo.ORDER_SAGA"]},
            "sagas[0]: expected 'module:attribute', got 'saga.demo.ORDER_SAGA'",
        ),
        ({"sagas": ["saga demo:X"]}, "sagas[0]: expected 'module:attribute', got 'saga demo:X'"),
        ({"recovery": {"concurrency": 0}}, "recovery.concurrency: must be at least 1, got 0"),
        ({"storage": {"pool_size": 0}}, "storage.pool_size: must be at least 1, got 0"),
        (
            {"storage": {"url": "sqlite+aiosqlite:///x.db", "schema": "sagas"}},
            "storage.schema: is only supported with PostgreSQL (storage.url postgresql+asyncpg://...)",
        ),
    ],
)
def test_invalid_values(data: dict[str, Any], message: str) -> None:
    assert str(error_of(data)) == message


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("nonsense", "storage.url: not a database URL (expected e.g. postgresql+asyncpg://... or memory://)"),
        (
            "postgresql://saga:secret@db/sagas",
            "storage.url: 'postgresql://saga:***@db/sagas' names no driver; use postgresql+asyncpg:// "
            "(storage is asynchronous)",
        ),
        (
            "postgresql+psycopg2://saga:secret@db/sagas",
            "storage.url: 'postgresql+psycopg2://saga:***@db/sagas' uses the 'psycopg2' driver; use "
            "postgresql+asyncpg:// (storage is asynchronous)",
        ),
        (
            "mysql+aiomysql://saga:secret@db/sagas",
            "storage.url: unsupported database 'mysql' in 'mysql+aiomysql://saga:***@db/sagas' (use "
            "postgresql+asyncpg://, sqlite+aiosqlite:/// or memory://)",
        ),
    ],
)
def test_storage_url_checks_never_show_the_password(url: str, message: str) -> None:
    error = error_of({"storage": {"url": url}})
    assert str(error) == message
    assert "secret" not in str(error)


def test_storage_urls_accepted() -> None:
    for url in ("memory://", "sqlite+aiosqlite:///./x.sqlite3", "postgresql+asyncpg://u:p@h:5432/d"):
        assert load_config({"storage": {"url": url}}).storage.url == url


def test_kafka_settings_errors_are_reported_under_their_key() -> None:
    error = error_of({"broker": {"kafka": {"security_protocol": "TLS"}}})
    assert error.key == "broker.kafka.security_protocol"
    assert str(error).startswith("broker.kafka.security_protocol: must be one of ")
    error = error_of({"broker": {"kafka": {"bootstrap_servers": "nohost"}}})
    assert str(error) == "broker.kafka.bootstrap_servers: entry 'nohost' is not host:port"


def test_the_top_level_must_be_a_mapping(tmp_path: Path) -> None:
    path = write(tmp_path, "- a\n- b\n")
    assert str(error_of(path)) == f"{path}: expected a mapping of sections at the top level, got a list"


def test_a_missing_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "nope.yml"
    assert str(error_of(path)) == f"{path}: configuration file not found"


def test_invalid_yaml_is_located(tmp_path: Path) -> None:
    path = write(tmp_path, "storage:\n  url: [unclosed\n")
    message = str(error_of(path))
    assert message.startswith(f"{path}: invalid YAML at line 3, column 1: ")


def test_yaml_is_read_safely(tmp_path: Path) -> None:
    path = write(tmp_path, "service: !!python/object/apply:os.system ['echo pwned']\n")
    assert "invalid YAML" in str(error_of(path))


def test_mapping_source_can_be_named() -> None:
    error = error_of({"x": 1}, source_name="<inline>")
    assert str(error).startswith("<inline>: x: unknown key")


def test_load_config_rejects_other_types() -> None:
    with pytest.raises(TypeError):
        load_config(42)  # type: ignore[arg-type]


# -- interpolation -------------------------------------------------------------------------------------


def test_interpolation_from_the_environment() -> None:
    env = {"DB": "/tmp/s.db", "SERVICE": "billing"}
    config = load_config(
        {"service": {"name": "${SERVICE}"}, "storage": {"url": "sqlite+aiosqlite:///${DB}"}}, environ=env
    )
    assert config.service.name == "billing"
    assert config.storage.url == "sqlite+aiosqlite:////tmp/s.db"


def test_interpolation_defaults_and_escapes() -> None:
    config = load_config(
        {
            "storage": {"url": "${NOT_SET:postgresql+asyncpg://saga:saga@127.0.0.1:15432/saga_test}"},
            "topics": {"reply": "${NOT_SET_EITHER:orders}Reply"},
            "consumer": {"group": "cost-$$5"},
        },
        environ={},
    )
    assert config.storage.url == "postgresql+asyncpg://saga:saga@127.0.0.1:15432/saga_test"
    assert config.topics.reply == "ordersReply"
    assert config.consumer.group == "cost-$5"


def test_a_set_variable_wins_over_the_default() -> None:
    config = load_config({"service": {"name": "${NAME:orders}"}}, environ={"NAME": "payments"})
    assert config.service.name == "payments"


def test_missing_variable_without_default_names_the_key_and_variable(tmp_path: Path) -> None:
    path = write(tmp_path, "storage:\n  url: ${SAGA_TEST_UNSET_DATABASE_URL}\n")
    error = error_of(path, environ={})
    assert str(error) == (
        f"{path}: storage.url: "
        "environment variable SAGA_TEST_UNSET_DATABASE_URL is not set and has no default"
    )
    assert error.key == "storage.url"


def test_missing_variable_in_a_list_names_the_item() -> None:
    error = error_of({"sagas": ["saga.demo:ORDER_SAGA", "${SAGA_MODULE}:SAGA"]}, environ={})
    assert str(error) == "sagas[1]: environment variable SAGA_MODULE is not set and has no default"


def test_interpolated_values_fill_numbers_booleans_and_optionals() -> None:
    config = load_config(
        {
            "recovery": {
                "interval": "${INTERVAL:2.5}",
                "batch_size": "${BATCH}",
                "enabled": "${ENABLED:false}",
                "stale_after_seconds": "${STALE:}",
                "saga_names": "${NAMES:order, refund}",
            },
            "broker": {"kafka": {"sasl_mechanism": "${MECH:}", "topic_replication_factor": "${RF:3}"}},
        },
        environ={"BATCH": "7"},
    )
    assert config.recovery.interval == 2.5
    assert config.recovery.batch_size == 7
    assert config.recovery.enabled is False
    assert config.recovery.stale_after_seconds is None
    assert config.recovery.saga_names == ("order", "refund")
    assert config.broker.kafka.sasl_mechanism is None
    assert config.broker.kafka.topic_replication_factor == 3


def test_interpolated_value_of_the_wrong_type() -> None:
    error = error_of({"recovery": {"interval": "${INTERVAL}"}}, environ={"INTERVAL": "fast"})
    assert str(error) == "recovery.interval: expected a number, got 'fast'"


def test_interpolated_empty_value_for_a_required_string() -> None:
    error = error_of({"storage": {"url": "${URL:}"}}, environ={})
    assert str(error) == "storage.url: missing value"


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("a${B", "storage.url: unterminated '${' in 'a${B'"),
        ("${1X}", "storage.url: invalid environment reference '${1X}' (write ${NAME} or ${NAME:default})"),
        ("${}", "storage.url: invalid environment reference '${}' (write ${NAME} or ${NAME:default})"),
    ],
)
def test_malformed_references(value: str, message: str) -> None:
    assert str(error_of({"storage": {"url": value}}, environ={})) == message


def test_interpolate_helper() -> None:
    assert interpolate("${A}-${B:b}-$$", "k", environ={"A": "a"}) == "a-b-$"
    assert interpolate("plain", "k", environ={}) == "plain"
    with pytest.raises(SagaConfigError, match="k: environment variable C is not set"):
        interpolate("${C}", "k", environ={})


def test_interpolation_uses_os_environ_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SAGA_TEST_SERVICE_NAME", "from-env")
    assert load_config({"service": {"name": "${SAGA_TEST_SERVICE_NAME}"}}).service.name == "from-env"


def test_keys_are_not_interpolated() -> None:
    assert error_of({"${X:storage}": {}}, environ={}).key == "${X:storage}"


# -- the shipped configuration files ------------------------------------------------------------------


def test_default_yml(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SAGA_SQLITE_PATH", raising=False)
    monkeypatch.delenv("SAGA_SERVICE_NAME", raising=False)
    config = load_config(REPO / "config" / "default.yml")
    assert config.broker.type == "memory"
    assert config.storage.url == "sqlite+aiosqlite:///./kafka-saga.sqlite3"
    assert "saga.demo:ORDER_SAGA" in config.sagas
    monkeypatch.setenv("SAGA_SQLITE_PATH", "/tmp/elsewhere.sqlite3")
    assert (
        load_config(REPO / "config" / "default.yml").storage.url
        == "sqlite+aiosqlite:////tmp/elsewhere.sqlite3"
    )


def test_kafka_yml(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (
        "KAFKA_BOOTSTRAP_SERVERS",
        "SAGA_DATABASE_URL",
        "KAFKA_SECURITY_PROTOCOL",
        "KAFKA_SASL_MECHANISM",
    ):
        monkeypatch.delenv(name, raising=False)
    config = load_config(REPO / "config" / "kafka.yml")
    assert config.broker.type == "kafka"
    assert config.broker.kafka.bootstrap_servers == "127.0.0.1:19092"
    assert config.broker.kafka.sasl_mechanism is None
    assert config.storage.url == "postgresql+asyncpg://saga:saga@127.0.0.1:15432/saga_test"
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "kafka:9092")
    monkeypatch.setenv("SAGA_DATABASE_URL", "postgresql+asyncpg://a:b@pg/x")
    config = load_config(REPO / "config" / "kafka.yml")
    assert config.broker.kafka.bootstrap_servers == "kafka:9092"
    assert config.storage.url == "postgresql+asyncpg://a:b@pg/x"


def test_test_yml() -> None:
    config = load_config(REPO / "config" / "test.yml")
    assert config.storage.is_memory
    assert config.broker.type == "memory"


def test_the_embedded_default_is_config_default_yml() -> None:
    shipped = (REPO / "config" / "default.yml").read_text(encoding="utf-8")
    assert shipped == EMBEDDED_CONFIG
    assert load_config(yaml.safe_load(EMBEDDED_CONFIG)) == load_config(REPO / "config" / "default.yml")


def test_read_config_file_does_not_interpolate(tmp_path: Path) -> None:
    path = write(tmp_path, "storage: {url: '${X}'}\n")
    assert read_config_file(path) == {"storage": {"url": "${X}"}}


def test_the_repr_hides_the_database_password() -> None:
    config = load_config({"storage": {"url": "postgresql+asyncpg://saga:s3cret@db:5432/sagas"}})
    assert config.storage.url == "postgresql+asyncpg://saga:s3cret@db:5432/sagas"
    assert config.storage.safe_url == "postgresql+asyncpg://saga:***@db:5432/sagas"
    for text in (repr(config), str(config), repr(config.storage)):
        assert "s3cret" not in text
    assert "StorageConfig(url='postgresql+asyncpg://saga:***@db:5432/sagas', auto_migrate=True" in repr(
        config
    )
    assert load_config({}).storage.safe_url == "memory://"
