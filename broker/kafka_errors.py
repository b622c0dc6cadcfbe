"""Translation of aiokafka's exceptions into the `broker.errors` hierarchy.

Callers of the transport handle `BrokerError` and its ``retriable`` flag only; this module is the one place
that knows aiokafka's zoo of exception types. The original exception is always kept as ``__cause__``
(``raise translate_error(exc, ...) from exc``).
"""

from __future__ import annotations

import asyncio

from aiokafka import errors as kafka_errors

from broker.errors import BrokerClosedError, BrokerConfigError, BrokerConnectionError, BrokerError

__all__ = ["record_error", "translate_error"]

# Exceptions that mean the client is closed: retrying the same object cannot help.
_CLOSED: tuple[type[BaseException], ...] = (
    kafka_errors.IllegalStateError,
    kafka_errors.ConsumerStoppedError,
    kafka_errors.ProducerClosed,
)

# Exceptions that mean the settings (or credentials, or permissions) are wrong.
_CONFIG: tuple[type[BaseException], ...] = (
    kafka_errors.KafkaConfigurationError,
    kafka_errors.IllegalArgumentError,
    kafka_errors.UnsupportedCodecError,
    kafka_errors.AuthenticationMethodNotSupported,
    kafka_errors.AuthenticationFailedError,
    kafka_errors.SaslAuthenticationFailed,
    kafka_errors.TopicAuthorizationFailedError,
    kafka_errors.GroupAuthorizationFailedError,
    kafka_errors.ClusterAuthorizationFailedError,
    kafka_errors.InvalidTopicError,
    kafka_errors.InvalidPartitionsError,
    kafka_errors.InvalidReplicationFactorError,
    kafka_errors.PolicyViolationError,
    kafka_errors.IncompatibleBrokerVersion,
    kafka_errors.UnrecognizedBrokerVersion,
)

# Transient broker conditions aiokafka does not flag ``retriable`` but which do pass.
_TRANSIENT: tuple[type[BaseException], ...] = (
    kafka_errors.KafkaConnectionError,
    kafka_errors.KafkaTimeoutError,
    kafka_errors.RequestTimedOutError,
    kafka_errors.NotLeaderForPartitionError,
    kafka_errors.KafkaUnavailableError,
    kafka_errors.BrokerNotAvailableError,
    asyncio.TimeoutError,
    ConnectionError,
)


def translate_error(exc: BaseException, action: str) -> BrokerError:
    """The `BrokerError` to raise for ``exc``, which happened while doing ``action``.

    Args:
        exc: What aiokafka (or the socket layer under it) raised.
        action: What the transport was doing, e.g. ``"publish to 'orders'"``; starts the message so logs
            say what failed, not just how.

    Returns:
        `BrokerClosedError` for use after stop, `BrokerConfigError` for settings, credentials and
        permissions, `BrokerConnectionError` (retriable) for unreachable brokers, timeouts, moving leaders
        and any error aiokafka flags retriable, else a plain `BrokerError` carrying aiokafka's
        ``retriable`` flag. A `BrokerError` is returned unchanged.
    """
    if isinstance(exc, BrokerError):
        return exc
    detail = str(exc) or type(exc).__name__
    message = f"{action} failed: {detail}"
    if isinstance(exc, _CLOSED):
        return BrokerClosedError(message)
    if isinstance(exc, _CONFIG):
        return BrokerConfigError(message)
    if isinstance(exc, _TRANSIENT):
        return BrokerConnectionError(message, retriable=True)
    if isinstance(exc, kafka_errors.KafkaError):
        if exc.retriable:
            return BrokerConnectionError(message, retriable=True)
        return BrokerError(message, retriable=False)
    if isinstance(exc, OSError):
        return BrokerConnectionError(message, retriable=True)
    return BrokerError(message, retriable=False)


#: aiokafka exceptions that refuse one record for good, and the `BrokerError.rejection` they mean.
_REJECTIONS: tuple[tuple[type[BaseException], str], ...] = (
    (kafka_errors.MessageSizeTooLargeError, "record_too_large"),
    (kafka_errors.RecordListTooLargeError, "record_too_large"),
    (kafka_errors.InvalidTopicError, "invalid_topic"),
    (kafka_errors.TopicAuthorizationFailedError, "topic_authorization_failed"),
)


def record_error(exc: BaseException, action: str) -> BrokerError:
    """`translate_error` for the failure of one record's send, with ``rejection`` set when the broker
    refuses that record for good (see `broker.errors`); encoding errors (``TypeError``, ``ValueError``,
    ``UnicodeError``) are ``unencodable``."""
    if isinstance(exc, BrokerError):
        return exc
    if isinstance(exc, TypeError | ValueError | UnicodeError) and not isinstance(
        exc, kafka_errors.KafkaError
    ):
        error = BrokerError(f"{action} failed: {exc}", retriable=False)
        error.rejection = "unencodable"
        return error
    error = translate_error(exc, action)
    for kind, rejection in _REJECTIONS:
        if isinstance(exc, kind):
            error.rejection = rejection
            error.retriable = False
            break
    return error
