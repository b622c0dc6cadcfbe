"""Errors raised by transports.

Every transport failure is translated at the boundary into one of these, so callers never catch a
library's exception type. ``retriable`` tells the caller whether trying again later may succeed::

    BrokerError                 (retriable: bool)
    ├── BrokerConnectionError   retriable: broker unreachable, leader moving, request timed out
    ├── BrokerClosedError       not retriable: the pool or client was stopped
    └── BrokerConfigError       not retriable: bad settings (unknown option, bad SASL/SSL setup);
                                ``field`` names the offending setting when there is one

``rejection`` is set on the error of one record the broker refuses for good, whatever the moment: the record
is larger than the producer or the broker accepts (``record_too_large``), its topic is invalid
(``invalid_topic``) or not authorised (``topic_authorization_failed``), or it cannot be encoded
(``unencodable``). Sending it again can never succeed; other records are not concerned.

Adapters chain the library's exception as ``__cause__`` so logs keep the original detail.
"""

from __future__ import annotations

__all__ = ["BrokerClosedError", "BrokerConfigError", "BrokerConnectionError", "BrokerError"]


class BrokerError(Exception):
    """Root of transport errors.

    Attributes:
        retriable: Whether the same call may succeed if repeated later.
        rejection: For one record refused for good, why (see the module docstring); else ``None``.
        size: With ``record_too_large``: the record's size in bytes, when known.
        limit: With ``record_too_large``: the largest size accepted, when known.
    """

    retriable: bool = False
    rejection: str | None = None
    size: int | None = None
    limit: int | None = None

    def __init__(self, message: str, *, retriable: bool | None = None) -> None:
        super().__init__(message)
        if retriable is not None:
            self.retriable = retriable


class BrokerConnectionError(BrokerError):
    """The broker could not be reached or did not answer in time."""

    retriable = True


class BrokerClosedError(BrokerError):
    """The client was used after ``stop()``."""


class BrokerConfigError(BrokerError):
    """The transport settings are invalid; fixing the configuration is the only remedy.

    Attributes:
        field: Name of the offending setting (e.g. ``"sasl_mechanism"``), or ``None`` when the problem is
            not one setting's.
    """

    field: str | None = None
