"""One object the gateway owns: metrics + tracing, built from settings, started and stopped.

The gateway builds it with ``Telemetry.from_settings(settings, repository)``, hands it to the
pipeline, calls ``start()`` after the servers are up and ``close()`` after they drained. The request path calls one method,
``start_request(method, metadata, start_perf_ns)`` -> ``RequestTrace | None`` (None with
tracing off). Metrics need no per-request call: ``GatewayMetrics.attach`` hands each version's
``VersionStats`` its histograms, which the pipeline's own request/batch bookkeeping fills.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Mapping

from lockgate.telemetry.config import TelemetrySettings
from lockgate.telemetry.metrics import GatewayMetrics, MetricsServer, Source, start_metrics_server, worker_metrics_port
from lockgate.telemetry.tracing import RequestTrace, Tracing, resolve

if TYPE_CHECKING:
    from lockgate.config import ServerSettings
    from lockgate.serving.repository import ModelRepository

log = logging.getLogger("lockgate.telemetry")


class Telemetry:
    def __init__(self, settings: TelemetrySettings, repository: "ModelRepository", *, metrics_port: int,
                 host: str = "0.0.0.0", env: Mapping[str, str] | None = None) -> None:
        self.settings = settings
        self.metrics: GatewayMetrics | None = GatewayMetrics(repository, settings.metrics) if settings.metrics.enabled else None
        tracing_settings = resolve(settings.tracing, env)
        self.tracing: Tracing | None = Tracing(tracing_settings) if tracing_settings.enabled else None
        if self.metrics is not None and self.tracing is not None:
            self.metrics.register_source("tracing", self.tracing.metric_samples)
        self.metrics_port = worker_metrics_port(metrics_port)
        self.metrics_host = settings.metrics.host or host
        self.server: MetricsServer | None = None

    @classmethod
    def from_settings(cls, settings: "ServerSettings", repository: "ModelRepository") -> "Telemetry":
        """From the server settings' ``telemetry`` section (and the ``OTEL_*`` environment).

        Opens no port: call ``start()`` once the gateway is serving."""
        telemetry_settings = getattr(settings, "telemetry", None) or TelemetrySettings()
        if isinstance(telemetry_settings, dict):
            telemetry_settings = TelemetrySettings.model_validate(telemetry_settings)
        return cls(telemetry_settings, repository, metrics_port=settings.metrics_port, host=settings.host)

    # -- lifecycle -------------------------------------------------------------------
    def start(self) -> int | None:
        """Open /metrics; returns the bound port (None with metrics off)."""
        if self.metrics is None or self.server is not None:
            return self.server.port if self.server else None
        self.server = start_metrics_server(self.metrics.registry, self.metrics_port, self.metrics_host)
        log.info("metrics on http://%s:%d/metrics", self.metrics_host, self.server.port)
        if self.tracing is not None:
            s = self.tracing.settings
            log.info("tracing: OTLP/%s to %s, sampling ratio %g%s", s.protocol, s.endpoint or "default endpoint",
                     s.sampler_ratio, " (parent-based)" if s.parent_based else "")
        return self.server.port

    def close(self, timeout_ms: int | None = None) -> None:
        """Flush spans (bounded), then stop the metrics endpoint."""
        if self.tracing is not None:
            try:
                self.tracing.shutdown(timeout_ms)
            except Exception:  # noqa: BLE001 -- shutdown must finish even if export is broken
                log.exception("tracing shutdown failed")
        if self.server is not None:
            self.server.close()
            self.server = None

    # -- request path ----------------------------------------------------------------
    def start_request(self, method: str, metadata: Mapping[str, str], start_perf_ns: int | None = None) -> RequestTrace | None:
        tracing = self.tracing
        if tracing is None:
            return None
        return tracing.start_request(method, metadata, start_perf_ns)

    # -- for other subsystems --------------------------------------------------------
    def register_source(self, name: str, source: Source) -> None:
        """Governance/routing/audit: see ``lockgate.telemetry.metrics`` (no-op with metrics off)."""
        if self.metrics is not None:
            self.metrics.register_source(name, source)

    def rollback(self, model: str, from_version: str, to_version: str, reason: str, trace: RequestTrace | None = None) -> None:
        if self.tracing is not None:
            self.tracing.rollback(model, from_version, to_version, reason, trace)
