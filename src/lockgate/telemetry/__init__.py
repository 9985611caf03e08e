"""Telemetry: Prometheus metrics read at scrape time and OpenTelemetry traces.

``integration.Telemetry.from_settings`` builds both from the server settings; see ``integration`` for the calls
the request path makes, ``metrics`` for the families and the source API other subsystems use,
and ``tracing`` for spans, sampling and export accounting.
"""

from lockgate.telemetry.config import MetricsSettings, TelemetrySettings, TracingSettings
from lockgate.telemetry.metrics import CANARY_STATE, DRIFT_STATUS, FAMILIES, GatewayMetrics, Sample

__all__ = [
    "CANARY_STATE", "DRIFT_STATUS", "FAMILIES", "GatewayMetrics", "MetricsSettings", "Sample",
    "TelemetrySettings", "TracingSettings",
]
