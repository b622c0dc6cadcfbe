"""`RetryPolicy`: how often, and how patiently, a step or a compensation is tried again."""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["NO_RETRY", "RetryPolicy"]


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Attempts and exponential backoff for one step or compensation.

    ``max_attempts`` counts every try, the first one included, so the default of 1 means "no retry".
    What a retry means depends on the step:

    * local step: the function is called again after ``delay(attempt)`` seconds; once attempts run out,
      the saga compensates;
    * remote step: a timed-out command is re-sent under the same request id and idempotency key (a replay
      the participant can drop as a duplicate), and a ``500`` reply is answered by a new command with a new
      request id; both count towards ``max_attempts``;
    * compensation: a failing compensation is tried again; once attempts run out the execution goes to
      ``DEAD_LETTER`` for a person to look at.

    Attributes:
        max_attempts: Total tries, at least 1.
        initial_delay: Seconds before the second try.
        backoff: Factor applied to the delay after every further try (1.0 keeps it constant).
        max_delay: Upper bound of any single delay.
    """

    max_attempts: int = 1
    initial_delay: float = 0.1
    backoff: float = 2.0
    max_delay: float = 30.0

    def __post_init__(self) -> None:
        if isinstance(self.max_attempts, bool) or not isinstance(self.max_attempts, int):
            raise TypeError(f"max_attempts must be an int, got {self.max_attempts!r}")
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {self.max_attempts}")
        for name in ("initial_delay", "backoff", "max_delay"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
                raise TypeError(f"{name} must be a finite number, got {value!r}")
        if self.initial_delay < 0:
            raise ValueError(f"initial_delay must be >= 0, got {self.initial_delay}")
        if self.backoff < 1:
            raise ValueError(f"backoff must be >= 1, got {self.backoff}")
        if self.max_delay < self.initial_delay:
            raise ValueError(f"max_delay ({self.max_delay}) must be >= initial_delay ({self.initial_delay})")

    def allows(self, attempts: int) -> bool:
        """Whether another try may follow ``attempts`` tries made so far."""
        return attempts < self.max_attempts

    def delay(self, attempts: int) -> float:
        """Seconds to wait before the try that follows ``attempts`` tries (``attempts`` >= 1)."""
        exponent = min(max(attempts - 1, 0), 1000)
        try:
            grown = self.initial_delay * self.backoff**exponent
        except OverflowError:
            grown = math.inf
        return float(min(self.max_delay, grown))

    def jittered_delay(self, attempts: int, rand: Callable[[], float] = random.random) -> float:
        """`delay`, half of it fixed and half random, so many retries started together spread out."""
        delay = self.delay(attempts)
        return delay / 2 + delay / 2 * rand()


#: The policy of steps that set none: one try.
NO_RETRY = RetryPolicy()
