"""Ctrl-C / SIGTERM become a request to stop at the next step boundary (and save a resumable state).

A second Ctrl-C while the stop is pending interrupts at once, as users expect; files are written
atomically, so even that never leaves a half-written model or state behind.
"""

from __future__ import annotations

import signal
import threading


class StopRequest:
    """Context manager installing SIGINT/SIGTERM handlers for the duration of training."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name
        print(
            f"\n{self.signal_name} received: finishing the current step, then saving a resumable state "
            "(press Ctrl-C again to stop at once)",
            flush=True,
        )
