"""Per-version counters behind ModelStatistics (Triton's meaning) and the Prometheus families.

The counters live in a small Cython module (``_stats.pyx``): recording them is part of every
request and every model execution, and in C it is one call with no allocation. Written on the
event loop thread only (no locks); readers take a consistent-enough snapshot.
"""

from __future__ import annotations

from typing import Callable, Sequence

from lockgate.serving._stats import BatchStat, Duration, Histogram, VersionStats

# Listeners get (batch_size, queue_ns_per_request, compute_ns) after each execution.
BatchListener = Callable[[int, Sequence[int], int], None]

__all__ = ["BatchListener", "BatchStat", "Duration", "Histogram", "VersionStats"]
