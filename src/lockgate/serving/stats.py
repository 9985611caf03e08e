"""Per-version counters behind ModelStatistics (Triton's meaning) and the Prometheus families.

Plain integer attributes updated on the event loop thread: no locks, no allocation on the
hot path. Readers (ModelStatistics, the metrics collector) take a consistent-enough snapshot.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Sequence


@dataclass(slots=True)
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, ns: int, count: int = 1) -> None:
        self.count += count
        self.ns += ns


@dataclass(slots=True)
class BatchStat:
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)


# Listeners get (batch_size, queue_ns_per_request, compute_ns) after each execution; the
# telemetry layer subscribes here so the batcher needs no knowledge of metrics backends.
BatchListener = Callable[[int, Sequence[int], int], None]


@dataclass(slots=True)
class VersionStats:
    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)
    inference_count: int = 0  # rows (batch elements) inferred
    execution_count: int = 0  # model executions (batches)
    last_inference_ms: int = 0
    pending: int = 0
    failures_by_reason: dict[str, int] = field(default_factory=dict)
    batch_stats: dict[int, BatchStat] = field(default_factory=dict)
    listeners: list[BatchListener] = field(default_factory=list)

    def record_batch(self, rows: int, queue_ns: Sequence[int], input_ns: int, infer_ns: int, output_ns: int) -> None:
        self.execution_count += 1
        self.inference_count += rows
        self.last_inference_ms = time.time_ns() // 1_000_000
        for ns in queue_ns:
            self.queue.add(ns)
        self.compute_input.add(input_ns, len(queue_ns))
        self.compute_infer.add(infer_ns, len(queue_ns))
        self.compute_output.add(output_ns, len(queue_ns))
        stat = self.batch_stats.get(rows)
        if stat is None:
            stat = self.batch_stats[rows] = BatchStat()
        stat.compute_input.add(input_ns)
        stat.compute_infer.add(infer_ns)
        stat.compute_output.add(output_ns)
        for listener in self.listeners:
            listener(rows, queue_ns, input_ns + infer_ns + output_ns)

    def record_request(self, ok: bool, duration_ns: int, reason: str = "") -> None:
        if ok:
            self.success.add(duration_ns)
        else:
            self.fail.add(duration_ns)
            self.failures_by_reason[reason] = self.failures_by_reason.get(reason, 0) + 1
