"""Errors raised by transports.

Every transport failure is translated at the boundary into one of these, so callers never catch a
library's exception type. ``retriable`` tells the caller whether trying again later may succeed::

    BrokerError                 (retriable: bool)
    ├── BrokerConnectionError   retriable: broker unreachable, leader moving, request timed out
    ├── BrokerClosedError       not retriable: the pool or client was stopped
    └── BrokerConfigError       not retriable: bad settings (unknown option, bad SASL/SSL setup);
                                ``field`` names the offending setting when there is one

Adapters chain the library's exception as ``__cause__`` so logs keep the original detail.
"""

from __future__ import annotations

__all__ = ["BrokerClosedError", "BrokerConfigError", "BrokerConnectionError", "BrokerError"]


class BrokerError(Exception):
    """Root of transport errors.

    Attributes:
        retriable: Whether the same call may succeed if repeated later.
    """

    retriable: bool = False

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
