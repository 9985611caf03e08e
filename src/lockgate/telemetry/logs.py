"""Problems that can repeat on every request: counted per cause, logged at most once a while.

An undecodable message, a call that ended before its answer could be sent, a payload record
the disk refused: each can happen once per request, so a caller (or a full disk) could make a
log line -- let alone a traceback -- per request. ``CauseLog`` counts every occurrence by cause
(exported as a Prometheus counter by whoever owns it) and writes one warning per cause per
``interval_s``, saying how many it left out since the last one. A traceback, when asked for,
comes with that one line only.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable

#: Default quiet period per cause between two log lines.
DEFAULT_INTERVAL_S = 10.0


class CauseLog:
    """Per-cause counters and a rate-limited warning; safe to call from any thread."""

    def __init__(self, logger: logging.Logger, *, interval_s: float = DEFAULT_INTERVAL_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.logger = logger
        self.interval_s = interval_s
        self._clock = clock
        self._lock = threading.Lock()
        self._counts: dict[str, int] = {}
        self._last_logged: dict[str, float] = {}
        self._left_out: dict[str, int] = {}

    def record(self, cause: str, message: str, *args: Any, exc_info: Any = None, level: int = logging.WARNING) -> None:
        """Count one ``cause``; log ``message % args`` unless this cause was logged recently."""
        now = self._clock()
        with self._lock:
            self._counts[cause] = self._counts.get(cause, 0) + 1
            last = self._last_logged.get(cause)
            if last is not None and now - last < self.interval_s:
                self._left_out[cause] = self._left_out.get(cause, 0) + 1
                return
            self._last_logged[cause] = now
            left_out = self._left_out.pop(cause, 0)
        suffix = (f" [{cause}: {left_out} more since the last report, "
                  f"at most one line per {self.interval_s:g}s]") if left_out else ""
        self.logger.log(level, message + suffix, *args, exc_info=exc_info)

    def counts(self) -> dict[str, int]:
        """Occurrences by cause since start (a copy)."""
        with self._lock:
            return dict(self._counts)

    def count(self, cause: str) -> int:
        with self._lock:
            return self._counts.get(cause, 0)
