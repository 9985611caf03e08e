"""The per-request trace handle the request path holds, and its no-op for unsampled requests.

Kept apart from ``tracing`` (which pulls in the OpenTelemetry SDK) so that the serving and
governance layers can name the type and share ``NO_TRACE`` without importing an exporter.
"""

from __future__ import annotations

from typing import Protocol


class Trace(Protocol):
    """What the request path calls on a request's trace (``tracing.RequestTrace`` or ``NoTrace``)."""

    sampled: bool
    trace_id_hex: str | None

    def set_model(self, model: str, version: str) -> None: ...
    def set_route(self, decision: str, key_hash: int | None = None, shadow_version: str | None = None) -> None: ...
    def governance(self, start_perf_ns: int, end_perf_ns: int, *, outcome: str, violations: int,
                   payload_sampled: bool) -> None: ...
    def batch(self, enqueued_perf_ns: int, started_perf_ns: int, finished_perf_ns: int, batch_size: int,
              error: BaseException | None = None) -> None: ...
    def finish(self, error: BaseException | None = None, end_perf_ns: int | None = None) -> None: ...


class NoTrace:
    """The trace of a request that is not sampled: the same methods as ``RequestTrace``, each
    doing nothing. The request path holds one of the two and asks ``sampled`` only where
    building a method's arguments would cost something; it never tests for None."""

    __slots__ = ()
    sampled = False
    trace_id_hex: str | None = None

    def set_model(self, model: str, version: str) -> None:
        return None

    def set_route(self, decision: str, key_hash: int | None = None, shadow_version: str | None = None) -> None:
        return None

    def governance(self, start_perf_ns: int, end_perf_ns: int, *, outcome: str, violations: int,
                   payload_sampled: bool) -> None:
        return None

    def batch(self, enqueued_perf_ns: int, started_perf_ns: int, finished_perf_ns: int, batch_size: int,
              error: BaseException | None = None) -> None:
        return None

    def finish(self, error: BaseException | None = None, end_perf_ns: int | None = None) -> None:
        return None


#: The one ``NoTrace``: it holds no state, so every unsampled request shares it.
NO_TRACE = NoTrace()
