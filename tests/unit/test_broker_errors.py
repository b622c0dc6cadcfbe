"""Translation of aiokafka exceptions into `broker.errors`, and header decoding (no broker needed)."""

from __future__ import annotations

import pytest
from aiokafka import errors as kafka_errors

from broker import BrokerClosedError, BrokerConfigError, BrokerConnectionError, BrokerError
from broker.headers import decode_headers, encode_headers
from broker.kafka_errors import translate_error


@pytest.mark.parametrize(
    "exc",
    [
        kafka_errors.KafkaConnectionError("Unable to bootstrap"),
        kafka_errors.KafkaTimeoutError(),
        kafka_errors.RequestTimedOutError(),
        kafka_errors.NotLeaderForPartitionError(),
        kafka_errors.LeaderNotAvailableError(),  # flagged retriable by aiokafka
        kafka_errors.GroupCoordinatorNotAvailableError(),
        kafka_errors.NodeNotReadyError(),
        TimeoutError(),
        ConnectionRefusedError(111, "Connection refused"),
    ],
)
def test_transient_failures_become_retriable_connection_errors(exc: BaseException) -> None:
    error = translate_error(exc, "publish to orders")
    assert type(error) is BrokerConnectionError
    assert error.retriable
    assert str(error).startswith("publish to orders failed: ")


@pytest.mark.parametrize(
    "exc",
    [kafka_errors.IllegalStateError("No partitions assigned"), kafka_errors.ConsumerStoppedError()],
)
def test_use_after_stop_becomes_closed(exc: BaseException) -> None:
    error = translate_error(exc, "commit")
    assert type(error) is BrokerClosedError
    assert not error.retriable


@pytest.mark.parametrize(
    "exc",
    [
        kafka_errors.KafkaConfigurationError("bad"),
        kafka_errors.UnsupportedCodecError(),
        kafka_errors.SaslAuthenticationFailed(),
        kafka_errors.TopicAuthorizationFailedError(),
        kafka_errors.InvalidReplicationFactorError(),
    ],
)
def test_settings_and_permission_problems_become_config_errors(exc: BaseException) -> None:
    error = translate_error(exc, "start")
    assert type(error) is BrokerConfigError
    assert not error.retriable


def test_other_kafka_errors_keep_their_retriable_flag() -> None:
    too_large = translate_error(kafka_errors.MessageSizeTooLargeError(), "publish")
    assert type(too_large) is BrokerError and not too_large.retriable
    not_enough = translate_error(kafka_errors.NotEnoughReplicasError(), "publish")
    assert isinstance(not_enough, BrokerConnectionError) and not_enough.retriable


def test_unknown_exceptions_are_wrapped_not_retriable() -> None:
    error = translate_error(ValueError("boom"), "fetch")
    assert type(error) is BrokerError and not error.retriable
    assert "boom" in str(error)


def test_broker_errors_pass_through_unchanged() -> None:
    original = BrokerClosedError("already ours")
    assert translate_error(original, "anything") is original


def test_decode_headers_reports_invalid_values() -> None:
    headers, invalid = decode_headers(
        [("a", b"1"), ("bad", b"\xc3\x28"), ("null", None), ("a", b"2"), ("bad", b"\xff")]
    )
    assert headers == {"a": "2"}
    assert invalid == ("bad", "null")


def test_decode_headers_drops_an_earlier_valid_value_of_a_name_later_invalid() -> None:
    headers, invalid = decode_headers([("x", b"ok"), ("x", b"\xff")])
    assert headers == {}
    assert invalid == ("x",)


def test_encode_headers_round_trips() -> None:
    original = {"user": "zoë", "trace": "00-abc-01"}
    assert decode_headers(encode_headers(original)) == (original, ())
