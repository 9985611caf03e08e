"""Telemetry settings: the ``telemetry:`` section of the server config file.

Kept free of SDK imports so ``lockgate.config`` can embed it without pulling in
OpenTelemetry. Standard ``OTEL_*`` environment variables take precedence over the file for
tracing (see ``lockgate.telemetry.tracing.resolve``), as operators expect.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

# Seconds. Batch-1 requests on small models take ~100 us, large ones tens of ms.
DEFAULT_LATENCY_BUCKETS: tuple[float, ...] = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
DEFAULT_BATCH_BUCKETS: tuple[float, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class MetricsSettings(_Strict):
    """Prometheus exposition on ``metrics_port`` (+ worker index with ``--workers``)."""

    enabled: bool = True
    host: str | None = Field(None, description="bind address; default: the server's host")
    latency_buckets: list[float] = Field(default_factory=lambda: list(DEFAULT_LATENCY_BUCKETS))
    batch_size_buckets: list[float] = Field(default_factory=lambda: list(DEFAULT_BATCH_BUCKETS))
    exemplars: bool = Field(True, description="trace-id exemplars on the request-duration histogram")
    process: bool = Field(True, description="process_* and python_* families")
    gpu: bool = Field(True, description="GPU memory/utilisation via pynvml when importable and a GPU exists")


class TracingSettings(_Strict):
    """OpenTelemetry traces. ``OTEL_*`` environment variables override these fields."""

    enabled: bool = Field(False, description="also switched on by OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT")
    endpoint: str | None = Field(None, description="OTLP endpoint; default localhost:4317 (grpc) / :4318 (http)")
    protocol: Literal["grpc", "http/protobuf"] = "grpc"
    insecure: bool = True
    headers: dict[str, str] = Field(default_factory=dict)
    sampler_ratio: float = Field(1.0, ge=0.0, le=1.0, description="head sampling ratio for root spans")
    parent_based: bool = Field(True, description="honour the sampled flag of an incoming traceparent")
    service_name: str = "lockgate"
    max_queue_size: int = Field(2048, ge=1, description="spans buffered for export; beyond it they are dropped (counted)")
    max_export_batch_size: int = Field(512, ge=1)
    schedule_delay_ms: int = Field(1000, ge=1)
    export_timeout_ms: int = Field(5000, ge=1)
    shutdown_timeout_ms: int = Field(5000, ge=0)
    logs: bool = Field(False, description="export rollback log records over OTLP too (OTEL_LOGS_EXPORTER=otlp)")


class TelemetrySettings(_Strict):
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)
    tracing: TracingSettings = Field(default_factory=TracingSettings)
