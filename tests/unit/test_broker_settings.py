"""`KafkaSettings` validation and how `KafkaBrokerPool` applies settings (no broker needed)."""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

import pytest

from broker import BrokerClosedError, BrokerConfigError, KafkaBrokerPool, KafkaSettings
from broker.kafka_options import client_options, consumer_options, producer_options, ssl_context

SYSTEM_CA = Path("/etc/ssl/certs/ca-certificates.crt")

SASL = {
    "security_protocol": "SASL_SSL",
    "sasl_mechanism": "SCRAM-SHA-512",
    "sasl_plain_username": "saga",
    "sasl_plain_password": "s3cret-pw",
}


def test_defaults_are_valid_and_suit_the_orchestrator() -> None:
    settings = KafkaSettings()
    assert settings.auto_offset_reset == "earliest"
    assert settings.security_protocol == "PLAINTEXT"
    assert settings.bootstrap_list == ["127.0.0.1:9092"]
    assert 0 < settings.connect_timeout <= 60


def test_is_frozen_and_slotted() -> None:
    settings = KafkaSettings()
    with pytest.raises(AttributeError):
        settings.linger_ms = 5  # type: ignore[misc]
    assert not hasattr(settings, "__dict__")


def test_passwords_never_appear_in_repr() -> None:
    settings = KafkaSettings(**SASL, ssl_password="key-pw")
    text = repr(settings)
    assert "s3cret-pw" not in text and "key-pw" not in text
    assert "saga" in text  # the user name is not a secret and helps debugging
    assert "s3cret-pw" not in repr(KafkaBrokerPool(settings))


def test_bootstrap_list_splits_and_strips() -> None:
    settings = KafkaSettings(bootstrap_servers=" a:1, b.example:9093 ,")
    assert settings.bootstrap_list == ["a:1", "b.example:9093"]


@pytest.mark.parametrize(
    ("values", "field", "fragment"),
    [
        ({"bootstrap_servers": ""}, "bootstrap_servers", "at least one"),
        ({"bootstrap_servers": "kafka"}, "bootstrap_servers", "'kafka' is not host:port"),
        ({"bootstrap_servers": "kafka:99999"}, "bootstrap_servers", "not host:port"),
        ({"client_id": ""}, "client_id", "empty"),
        ({"security_protocol": "TLS"}, "security_protocol", "'TLS'"),
        ({"security_protocol": "SASL_PLAINTEXT"}, "sasl_mechanism", "None"),
        ({**SASL, "sasl_mechanism": "GSSAPI"}, "sasl_mechanism", "GSSAPI"),
        ({**SASL, "sasl_plain_username": None}, "sasl_plain_username", "required"),
        ({**SASL, "sasl_plain_password": ""}, "sasl_plain_password", "required"),
        ({"sasl_mechanism": "PLAIN"}, "sasl_mechanism", "does not use SASL"),
        ({"ssl_cafile": "/ca.pem"}, "ssl_cafile", "does not use SSL"),
        ({"security_protocol": "SSL", "ssl_keyfile": "/k.pem"}, "ssl_certfile", "required"),
        ({"compression_type": "brotli"}, "compression_type", "'brotli'"),
        ({"auto_offset_reset": "none"}, "auto_offset_reset", "'none'"),
        ({"linger_ms": -1}, "linger_ms", ">= 0"),
        ({"max_batch_size": 0}, "max_batch_size", ">= 1"),
        ({"topic_partitions": 0}, "topic_partitions", ">= 1"),
        ({"topic_replication_factor": 0}, "topic_replication_factor", ">= 1"),
        ({"max_poll_records": 0}, "max_poll_records", ">= 1"),
        ({"heartbeat_interval_ms": 10000}, "heartbeat_interval_ms", "lower than session_timeout_ms"),
        ({"connect_timeout": 0}, "connect_timeout", "> 0"),
        ({"linger_ms": "5"}, "linger_ms", "must be int, got str"),
        ({"linger_ms": True}, "linger_ms", "must be int, got bool"),
        ({"auto_create_topics": "yes"}, "auto_create_topics", "must be bool"),
        ({"client_id": None}, "client_id", "must not be None"),
        ({"connect_timeout": "30"}, "connect_timeout", "must be float"),
    ],
)
def test_invalid_values_name_the_field(values: dict[str, Any], field: str, fragment: str) -> None:
    with pytest.raises(BrokerConfigError) as caught:
        KafkaSettings(**values)
    assert caught.value.field == field
    assert f"KafkaSettings.{field}" in str(caught.value)
    assert fragment in str(caught.value)
    assert not caught.value.retriable
    assert "s3cret-pw" not in str(caught.value)


def test_valid_security_combinations() -> None:
    KafkaSettings(**SASL)
    KafkaSettings(**{**SASL, "security_protocol": "SASL_PLAINTEXT", "sasl_mechanism": "PLAIN"})
    KafkaSettings(security_protocol="SSL", ssl_cafile="/ca.pem", ssl_certfile="/c.pem", ssl_keyfile="/k.pem")
    KafkaSettings(connect_timeout=1)  # an int is a fine float


def test_from_mapping_rejects_unknown_keys() -> None:
    with pytest.raises(BrokerConfigError, match="'bootstrap_server'") as caught:
        KafkaSettings.from_mapping({"bootstrap_server": "kafka:9092"})
    assert caught.value.field == "bootstrap_server"


def test_from_mapping_and_overrides() -> None:
    base = KafkaSettings.from_mapping({"bootstrap_servers": "kafka:9092", "topic_partitions": 6})
    assert base.topic_partitions == 6
    changed = base.with_overrides(linger_ms=5)
    assert (changed.bootstrap_servers, changed.topic_partitions, changed.linger_ms) == ("kafka:9092", 6, 5)
    with pytest.raises(BrokerConfigError, match="linger_ms"):
        base.with_overrides(linger_ms=-5)


def test_pool_applies_overrides_over_settings() -> None:
    pool = KafkaBrokerPool(KafkaSettings(bootstrap_servers="kafka:9092"), topic_partitions=8)
    assert pool.settings.bootstrap_servers == "kafka:9092"
    assert pool.settings.topic_partitions == 8
    assert KafkaBrokerPool().settings == KafkaSettings()


def test_pool_rejects_unknown_override() -> None:
    with pytest.raises(BrokerConfigError, match="'partitions'"):
        KafkaBrokerPool(partitions=3)


async def test_missing_ssl_file_fails_start_with_the_field() -> None:
    pool = KafkaBrokerPool(security_protocol="SSL", ssl_cafile="/nonexistent/ca.pem", connect_timeout=1)
    with pytest.raises(BrokerConfigError) as caught:
        await pool.start()
    assert caught.value.field == "ssl_cafile"
    assert "/nonexistent/ca.pem" in str(caught.value)


async def test_unusable_pool_raises_closed() -> None:
    pool = KafkaBrokerPool(bootstrap_servers="127.0.0.1:1")
    with pytest.raises(BrokerClosedError, match="not started"):
        await pool.publisher().send_batch([_msg()])
    subscriber = pool.subscriber(["t"], group_id="g")
    with pytest.raises(BrokerClosedError, match="not started"):
        await subscriber.getmany(timeout=0)
    await pool.stop()
    with pytest.raises(BrokerClosedError, match="stopped"):
        await pool.start()
    with pytest.raises(BrokerClosedError):
        pool.subscriber(["t"], group_id="g")
    with pytest.raises(BrokerClosedError):
        await subscriber.start()


def _msg() -> Any:
    from broker import BrokerMessage

    return BrokerMessage(topic="t", key=b"k", value=b"v")


def test_producer_is_idempotent_with_acks_all_whatever_the_settings() -> None:
    options = producer_options(KafkaSettings(linger_ms=5, compression_type="gzip"))
    assert options["acks"] == "all" and options["enable_idempotence"] is True
    assert (options["linger_ms"], options["compression_type"]) == (5, "gzip")


def test_consumer_commits_only_explicitly() -> None:
    options = consumer_options(KafkaSettings(max_poll_records=7), "orders")
    assert options["enable_auto_commit"] is False
    assert options["group_id"] == "orders"
    assert options["auto_offset_reset"] == "earliest"
    assert options["max_poll_records"] == 7


def test_client_options_carry_sasl_only_when_used() -> None:
    assert "sasl_plain_password" not in client_options(KafkaSettings())
    options = client_options(KafkaSettings(**{**SASL, "security_protocol": "SASL_PLAINTEXT"}))
    assert options["sasl_mechanism"] == "SCRAM-SHA-512"
    assert options["sasl_plain_password"] == "s3cret-pw"
    assert options["ssl_context"] is None
    assert options["bootstrap_servers"] == ["127.0.0.1:9092"]


def test_ssl_context_is_built_from_the_ca_file(tmp_path: Path) -> None:
    if not SYSTEM_CA.exists():
        pytest.skip("no system CA bundle to load")
    ca = tmp_path / "ca.pem"
    ca.write_text(SYSTEM_CA.read_text())
    context = ssl_context(KafkaSettings(security_protocol="SSL", ssl_cafile=str(ca)))
    assert isinstance(context, ssl.SSLContext)
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname


def test_unloadable_certificate_is_a_config_error(tmp_path: Path) -> None:
    bogus = tmp_path / "cert.pem"
    bogus.write_text("not a certificate")
    settings = KafkaSettings(security_protocol="SSL", ssl_certfile=str(bogus))
    with pytest.raises(BrokerConfigError, match="SSL context"):
        ssl_context(settings)
