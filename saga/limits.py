"""Upper bounds of the numbers the API and the configuration accept, and the checks that apply them.

Durations become ``datetime`` arithmetic and database timestamps, which overflow long before a float does
(``now + timedelta(seconds=1e12)`` is past year 9999), and intervals become sleeps; so every duration is
checked where it enters (a definition, a manager option, a configuration key) to be a finite number within
a bound, instead of failing later inside a step or a background loop.
"""

from __future__ import annotations

import math

__all__ = [
    "MAX_DURATION_SECONDS",
    "MAX_INTERVAL_SECONDS",
    "MAX_LEASE_SECONDS",
    "check_seconds",
]

#: Longest reply timeout, saga deadline or staleness: 366 days.
MAX_DURATION_SECONDS = 366 * 86400
#: Longest pause between two passes of a background loop (outbox relay, recovery, waiting): one hour.
MAX_INTERVAL_SECONDS = 3600
#: Longest claim lease: one day (a heartbeat renews a lease while a step runs, so this bounds only how
#: long a crashed worker's claim keeps others away).
MAX_LEASE_SECONDS = 86400


def check_seconds(value: object, maximum: float) -> str | None:
    """Why ``value`` is not a positive, finite number of seconds of at most ``maximum``; ``None`` if it is."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return f"must be a number of seconds, got {value!r}"
    if not math.isfinite(value):
        return f"must be a finite number of seconds, got {value!r}"
    if value <= 0:
        return f"must be greater than 0 seconds, got {value!r}"
    if value > maximum:
        return f"must be at most {maximum:g} seconds, got {value!r}"
    return None
