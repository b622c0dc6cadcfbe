"""SIGTERM and SIGINT for the long-running commands (``worker``, ``participant``).

The first signal asks for a drain (the command's ``stop`` event); a second one stops at once, by cancelling
the task that installed the handlers, so an operator is never left waiting on a drain that hangs.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Callable

__all__ = ["DrainSignals"]


class DrainSignals:
    """Signal handlers that set ``stop`` on the first signal and cancel the installing task on the second."""

    def __init__(self, stop: asyncio.Event, say: Callable[[str], None], *, draining: str) -> None:
        self.stop = stop
        #: Signals received so far.
        self.count = 0
        self._say = say
        self._draining = draining
        self._task: asyncio.Task[object] | None = None
        self._installed: list[signal.Signals] = []

    @property
    def forced(self) -> bool:
        """Whether a second signal cut the drain short."""
        return self.count > 1

    def install(self) -> None:
        """Handle SIGTERM and SIGINT in the running loop (skipped where the loop cannot: not the main
        thread, Windows)."""
        loop = asyncio.get_running_loop()
        self._task = asyncio.current_task()
        for signum in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(signum, self._on_signal, signum)
                self._installed.append(signum)

    def remove(self) -> None:
        """Give the signals back to their previous handling."""
        loop = asyncio.get_running_loop()
        for signum in self._installed:
            loop.remove_signal_handler(signum)
        self._installed.clear()

    def _on_signal(self, signum: signal.Signals) -> None:
        self.count += 1
        if self.count == 1:
            self._say(f"{signum.name} received: draining {self._draining} (signal again to force)")
            self.stop.set()
        elif self._task is not None:
            self._say("second signal: stopping without waiting for the drain")
            self._task.cancel()
