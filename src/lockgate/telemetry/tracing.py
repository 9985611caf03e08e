"""OpenTelemetry traces: one SERVER span per inference request, children for the stages.

Why the sampling decision is taken here, before the SDK sees anything: an unsampled request
should cost next to nothing. ``start_request`` parses ``traceparent`` itself (parent-based:
the caller's sampled flag decides) or draws the root trace id and compares its low 64 bits
with the ratio bound: exactly ``ParentBased(TraceIdRatioBased(ratio))``'s rule.
Unsampled requests get ``None`` and every later hook is skipped by an ``if trace`` check.
A sampled request's spans are plain data until they end, then handed to the processor as
finished ``ReadableSpan``s: no live SDK span, context or lock per request.

Spans (names): ``inference.GRPCInferenceService/<method>`` (SERVER, RPC semconv attributes)
with children ``governance``, ``queue``, ``inference`` and ``shadow``. Children may be
recorded after the fact from ``time.perf_counter_ns()`` timestamps the pipeline and batcher
already take (``queue`` runs from enqueue to batch start).

Export: ``BatchSpanProcessor`` with a bounded queue in front of the OTLP exporter. When the
collector is down, spans beyond the queue are dropped without logging per span and counted
(``queue_full``), and batches the exporter fails to deliver are counted (``export_failed``);
both are exposed as ``lockgate_otel_spans_dropped_total{reason}``. Serving never waits on it.
"""

from __future__ import annotations

import logging
import os
from random import getrandbits
import socket
import time
import uuid
from typing import Any, Iterable, Mapping, Sequence

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.exporter.otlp.proto.common._internal import (
    _encode_instrumentation_scope,
    _encode_key_value,
    _encode_resource,
)
from opentelemetry.exporter.otlp.proto.common._internal.trace_encoder import _encode_events, _encode_links, _encode_status
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest, ExportTraceServiceResponse
from opentelemetry.proto.trace.v1.trace_pb2 import Span as PB2Span
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.sampling import ParentBased, Sampler, TraceIdRatioBased
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, Status, StatusCode, TraceFlags, TraceState

import lockgate
from lockgate.errors import CODE_NUMBERS
from lockgate.telemetry._otlp import encode_export_request, probe_private_fields
from lockgate.telemetry.config import TracingSettings
from lockgate.telemetry.metrics import Sample

log = logging.getLogger("lockgate.telemetry.tracing")

RPC_SERVICE = "inference.GRPCInferenceService"
_MASK64 = (1 << 64) - 1
# perf_counter_ns -> epoch ns, for spans recorded after the fact from pipeline timestamps.
_EPOCH_OFFSET_NS = time.time_ns() - time.perf_counter_ns()
# RPC semconv: on SERVER spans these gRPC codes mark the span as an error.
_SERVER_ERROR_CODES = frozenset({2, 4, 12, 13, 14, 15})
_UNSET = Status(StatusCode.UNSET)
_SAMPLED = TraceFlags(TraceFlags.SAMPLED)
_EMPTY_STATE = TraceState()
_SERVER = SpanKind.SERVER
_INTERNAL = SpanKind.INTERNAL
_PB2_KIND = {SpanKind.INTERNAL: PB2Span.SPAN_KIND_INTERNAL, SpanKind.SERVER: PB2Span.SPAN_KIND_SERVER,
             SpanKind.CLIENT: PB2Span.SPAN_KIND_CLIENT, SpanKind.PRODUCER: PB2Span.SPAN_KIND_PRODUCER,
             SpanKind.CONSUMER: PB2Span.SPAN_KIND_CONSUMER}
_KIND_BY_ID = {id(kind): number for kind, number in _PB2_KIND.items()}

# Attribute keys (lockgate.* for our own, semconv names for the RPC ones).
ATTR_MODEL = "lockgate.model.name"
ATTR_VERSION = "lockgate.model.version"
ATTR_ROUTE = "lockgate.route.decision"
ATTR_ROUTE_KEY_HASH = "lockgate.route.key_hash"
ATTR_VALIDATION = "lockgate.validation.outcome"
ATTR_VIOLATIONS = "lockgate.validation.violations"
ATTR_PAYLOAD_SAMPLED = "lockgate.payload.sampled"
ATTR_BATCH_SIZE = "lockgate.batch.size"
ATTR_SHADOW_VERSION = "lockgate.shadow.version"


def perf_to_epoch_ns(perf_ns: int) -> int:
    return perf_ns + _EPOCH_OFFSET_NS


def parse_traceparent(value: str) -> tuple[int, int, int] | None:
    """W3C traceparent -> (trace_id, span_id, flags), or None if malformed (then: a new root)."""
    parts = value.strip().split("-")
    if len(parts) < 4 or len(parts[0]) != 2 or len(parts[1]) != 32 or len(parts[2]) != 16 or len(parts[3]) != 2:
        return None
    version = parts[0].lower()
    if version == "ff" or (version == "00" and len(parts) != 4):
        return None
    try:
        int(version, 16)
        trace_id, span_id, flags = int(parts[1], 16), int(parts[2], 16), int(parts[3], 16)
    except ValueError:
        return None
    if trace_id == 0 or span_id == 0:
        return None
    return trace_id, span_id, flags


# -- configuration -------------------------------------------------------------------
_SAMPLERS = {
    "always_on": (False, 1.0),
    "always_off": (False, 0.0),
    "traceidratio": (False, None),
    "parentbased_always_on": (True, 1.0),
    "parentbased_always_off": (True, 0.0),
    "parentbased_traceidratio": (True, None),
}


def resolve(settings: TracingSettings | None = None, env: Mapping[str, str] | None = None) -> TracingSettings:
    """Apply the standard OTEL_* environment variables on top of the config file's settings."""
    env = os.environ if env is None else env
    s = (settings or TracingSettings()).model_copy(deep=True)
    endpoint = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    if endpoint:
        s.endpoint = endpoint
        s.enabled = True
    protocol = env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get("OTEL_EXPORTER_OTLP_PROTOCOL")
    if protocol:
        if protocol not in ("grpc", "http/protobuf"):
            raise ValueError(f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol!r}: lockgate supports grpc and http/protobuf")
        s.protocol = protocol  # type: ignore[assignment]
    exporter = env.get("OTEL_TRACES_EXPORTER")
    if exporter == "otlp":
        s.enabled = True
    elif exporter == "none":
        s.enabled = False
    elif exporter:
        raise ValueError(f"OTEL_TRACES_EXPORTER={exporter!r}: lockgate supports otlp and none")
    sampler = env.get("OTEL_TRACES_SAMPLER")
    if sampler:
        if sampler not in _SAMPLERS:
            raise ValueError(f"OTEL_TRACES_SAMPLER={sampler!r}: supported: {', '.join(_SAMPLERS)}")
        parent_based, ratio = _SAMPLERS[sampler]
        s.parent_based = parent_based
        if ratio is None:
            arg = env.get("OTEL_TRACES_SAMPLER_ARG")
            ratio = float(arg) if arg else 1.0
            if not 0.0 <= ratio <= 1.0:
                raise ValueError(f"OTEL_TRACES_SAMPLER_ARG={arg}: must be within [0, 1]")
        s.sampler_ratio = ratio
    elif env.get("OTEL_TRACES_SAMPLER_ARG"):
        s.sampler_ratio = float(env["OTEL_TRACES_SAMPLER_ARG"])
    if env.get("OTEL_SERVICE_NAME"):
        s.service_name = env["OTEL_SERVICE_NAME"]
    if env.get("OTEL_EXPORTER_OTLP_INSECURE"):
        s.insecure = env["OTEL_EXPORTER_OTLP_INSECURE"].lower() == "true"
    for var, field in (("OTEL_BSP_MAX_QUEUE_SIZE", "max_queue_size"), ("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "max_export_batch_size"),
                       ("OTEL_BSP_SCHEDULE_DELAY", "schedule_delay_ms"), ("OTEL_BSP_EXPORT_TIMEOUT", "export_timeout_ms")):
        if env.get(var):
            setattr(s, field, int(env[var]))
    if env.get("OTEL_LOGS_EXPORTER") == "otlp":
        s.logs = True
    if env.get("OTEL_SDK_DISABLED", "").lower() == "true":
        s.enabled = False
    return TracingSettings.model_validate(s.model_dump())


def _endpoint(s: TracingSettings, signal: str) -> str | None:
    if s.protocol == "grpc":
        return s.endpoint
    # OTLP/HTTP: a base URL gets the signal path appended; a full signal URL is kept.
    base = s.endpoint or "http://localhost:4318"
    return base if base.rstrip("/").endswith(f"/v1/{signal}") else base.rstrip("/") + f"/v1/{signal}"


def make_span_exporter(s: TracingSettings) -> SpanExporter:
    timeout = s.export_timeout_ms / 1000
    if s.protocol == "grpc":
        return _grpc_exporter_class()(endpoint=s.endpoint, insecure=s.insecure, headers=s.headers or None, timeout=timeout)
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter

    return HttpExporter(endpoint=_endpoint(s, "traces"), headers=s.headers or None, timeout=timeout)


# -- OTLP encoding -------------------------------------------------------------------
class SpanEncoder:
    """ReadableSpans -> a serialized ``ExportTraceServiceRequest``, reusing what repeats.

    Why not the SDK's ``encode_spans`` (~70 us/span here): it hashes each span's ``Resource``
    (a JSON dump of its attributes) to group spans, builds a fresh ``KeyValue``/``AnyValue``
    pair per attribute and then copies every span into its parent message. Here resources
    are grouped by identity and encoded once, attributes come from a bounded cache of their
    serialized form (model, version, route, method... repeat on every request), and the
    Cython writer in ``lockgate.telemetry._otlp`` puts each span's own fields straight into
    the wire format. The parsed result is the message the SDK builds (an UNSET status is left
    out: the proto default).
    """

    def __init__(self, max_cached_attributes: int = 4096) -> None:
        self.max_cached_attributes = max_cached_attributes
        self._resources: dict[int, tuple[Resource, bytes]] = {}
        self._scopes: dict[InstrumentationScope | None, bytes] = {}
        # (key, type, value) -> that attribute serialized as a Span's ``attributes`` field
        self._attrs: dict[tuple[str, type, Any], bytes] = {}

    @staticmethod
    def _encode_attribute(key: str, value: Any) -> bytes:
        """One attribute serialized as a Span's ``attributes`` field (cached by the caller)."""
        return PB2Span(attributes=[_encode_key_value(key, value)]).SerializeToString()

    def _resource_bytes(self, resource: Resource) -> bytes:
        """The serialized Resource, encoded once per resource object (one per provider)."""
        cached = self._resources.get(id(resource))
        if cached is None or cached[0] is not resource:
            if len(self._resources) >= 16:  # one per provider: a handful at most
                self._resources.clear()
            cached = self._resources[id(resource)] = (resource, _encode_resource(resource).SerializeToString())
        return cached[1]

    def _scope_bytes(self, scope: InstrumentationScope | None) -> bytes:
        encoded = self._scopes.get(scope)
        if encoded is None:
            if len(self._scopes) >= 64:
                self._scopes.clear()
            encoded = self._scopes[scope] = _encode_instrumentation_scope(scope).SerializeToString()
        return encoded

    @staticmethod
    def _rare_fields(span: ReadableSpan) -> bytes:
        """Status, events and links as serialized Span fields; b"" when the span has none."""
        status = span.status
        events = span.events
        links = span.links
        has_status = status is not None and status.status_code is not StatusCode.UNSET
        if not (has_status or events or links):
            return b""
        pb = PB2Span()
        if has_status:
            pb.status.CopyFrom(_encode_status(status))
        if events:
            pb.events.extend(_encode_events(events))
        if links:
            pb.links.extend(_encode_links(links))
        return pb.SerializeToString()

    def encode_bytes(self, spans: Sequence[ReadableSpan]) -> bytes:
        """The serialized request, as the exporter sends it."""
        return encode_export_request(spans, self, _KIND_BY_ID, _UNSET, _EMPTY_STATE)

    def encode(self, spans: Sequence[ReadableSpan]) -> ExportTraceServiceRequest:
        """The request as a message (tests, tools); the exporter sends ``encode_bytes``."""
        return ExportTraceServiceRequest.FromString(self.encode_bytes(spans))


# Once: does this SDK keep ReadableSpan's fields where the Cython writer reads them directly?
probe_private_fields(ReadableSpan("probe", context=SpanContext(1, 1, False), parent=SpanContext(1, 2, True),
                                  resource=Resource({}), start_time=1, end_time=2))


class _RawTraceServiceStub:
    """``TraceServiceStub`` whose Export takes the already serialized request (bytes)."""

    def __init__(self, channel: Any) -> None:
        self.Export = channel.unary_unary(
            "/opentelemetry.proto.collector.trace.v1.TraceService/Export",
            request_serializer=None,  # bytes go out as they are
            response_deserializer=ExportTraceServiceResponse.FromString,
        )


def _grpc_exporter_class() -> type[SpanExporter]:
    """The SDK's OTLP/gRPC span exporter (retries, TLS, headers, compression) sending the
    bytes ``SpanEncoder`` writes, instead of a message built by ``encode_spans``."""
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    class FastOTLPSpanExporter(OTLPSpanExporter):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._encoder = SpanEncoder()
            # The mixin builds ``_client = _stub(_channel)`` now and again on reconnect.
            self._stub = _RawTraceServiceStub
            self._client = _RawTraceServiceStub(self._channel)

        def _translate_data(self, data: Sequence[ReadableSpan]) -> bytes:  # type: ignore[override]
            return self._encoder.encode_bytes(data)

    return FastOTLPSpanExporter


# -- export accounting ---------------------------------------------------------------
class CountingSpanExporter(SpanExporter):
    """Counts what the wrapped exporter delivered and what it failed to (spans, not batches)."""

    def __init__(self, inner: SpanExporter) -> None:
        self.inner = inner
        self.exported = 0
        self.failed = 0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        try:
            result = self.inner.export(spans)
        except Exception as exc:  # noqa: BLE001 -- exporter bugs must not kill the export thread
            log.warning("span export raised %s: %s", type(exc).__name__, exc)
            result = SpanExportResult.FAILURE
        if result is SpanExportResult.SUCCESS:
            self.exported += len(spans)
        else:
            self.failed += len(spans)
        return result

    def shutdown(self) -> None:
        self.inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.inner.force_flush(timeout_millis)


class BoundedBatchSpanProcessor(BatchSpanProcessor):
    """BatchSpanProcessor that counts queue-full drops instead of logging a warning per span."""

    def __init__(self, exporter: SpanExporter, *, max_queue_size: int, shutdown_timeout_ms: int = 5000, **kwargs: Any) -> None:
        super().__init__(exporter, max_queue_size=max_queue_size, **kwargs)
        self.max_queue_size = max_queue_size
        self.shutdown_timeout_ms = shutdown_timeout_ms
        self.dropped = 0
        # The SDK's queue (a bounded deque); without it we still bound memory via the SDK.
        self._queue = getattr(self._batch_processor, "_queue", None)

    def on_end(self, span: ReadableSpan) -> None:
        queue = self._queue
        if queue is not None and len(queue) >= self.max_queue_size:
            self.dropped += 1
            return
        super().on_end(span)

    def shutdown(self) -> None:
        # The SDK default waits up to 30 s for the export thread; shutdown must stay bounded.
        self._batch_processor.shutdown(timeout_millis=self.shutdown_timeout_ms)


#: The request method of a call that came over the REST binding (``RequestContext.method``).
HTTP_INFER = "HTTP ModelInfer"
HTTP_ROUTE = "/v2/models/{model_name}/infer"


def _server_span_names(method: str) -> tuple[str, dict[str, Any]]:
    """The SERVER span's name and fixed attributes: gRPC's (``rpc.*``) or REST's (``http.*``).
    Both carry the canonical status in ``rpc.grpc.status_code`` (the same number for the same
    failure on either transport)."""
    if method == HTTP_INFER:
        return f"POST {HTTP_ROUTE}", {"http.request.method": "POST", "http.route": HTTP_ROUTE,
                                     "rpc.method": "ModelInfer", "lockgate.transport": "http"}
    return f"{RPC_SERVICE}/{method}", {"rpc.system": "grpc", "rpc.service": RPC_SERVICE, "rpc.method": method}


# -- per-request handle --------------------------------------------------------------
class RequestTrace:
    """A sampled request's SERVER span, kept as plain data until ``finish``, plus its children.

    Why not a live SDK span: every field of the SERVER span is known by the end of the request,
    so it is built once, finished, as a ``ReadableSpan`` (like the children). That skips the
    SDK's per-span sampler call, context object, locks and attribute cleaning, which were most
    of a sampled request's CPU. Attribute values are our own (str/int/bool), so no cleaning is
    lost; the exported span is the same as the SDK would have produced.
    """

    __slots__ = ("_tracing", "span_context", "parent", "name", "start_time", "attributes", "events", "status",
                 "_ended", "_trace_id_hex")

    def __init__(self, tracing: "Tracing", span_context: SpanContext, parent: SpanContext | None, name: str,
                 start_time: int, attributes: dict[str, Any]) -> None:
        self._tracing = tracing
        self.span_context = span_context
        self.parent = parent
        self.name = name
        self.start_time = start_time
        self.attributes = attributes
        self.events: list[Event] = []
        self.status = _UNSET
        self._ended = False
        self._trace_id_hex: str | None = None

    @property
    def trace_id_hex(self) -> str:
        """32 hex digits: the exemplar label and the payload log's trace reference."""
        if self._trace_id_hex is None:
            self._trace_id_hex = format(self.span_context.trace_id, "032x")
        return self._trace_id_hex

    @property
    def span_id_hex(self) -> str:
        return format(self.span_context.span_id, "016x")

    @property
    def context(self) -> Context:
        """An OTel context holding this span (log records correlate through it); built on demand."""
        return trace.set_span_in_context(NonRecordingSpan(self.span_context))

    @property
    def is_finished(self) -> bool:
        return self._ended

    # attributes on the SERVER span
    def set_model(self, model: str, version: str) -> None:
        attrs = self.attributes
        attrs[ATTR_MODEL] = model
        attrs[ATTR_VERSION] = version

    def set_route(self, decision: str, key_hash: int | None = None, shadow_version: str | None = None) -> None:
        attrs = self.attributes
        attrs[ATTR_ROUTE] = decision
        if key_hash is not None:
            attrs[ATTR_ROUTE_KEY_HASH] = format(key_hash & _MASK64, "016x")
        if shadow_version is not None:
            attrs[ATTR_SHADOW_VERSION] = shadow_version

    # children
    def _child(self, name: str, start_perf_ns: int, end_perf_ns: int, attributes: dict[str, Any],
               error: BaseException | None = None) -> None:
        """A finished child built directly as a ReadableSpan and handed to the processor.

        Its times are already known, so the SDK's live-span machinery is skipped. ``attributes``
        must be a dict this call may keep (callers build a fresh one).
        """
        tracing = self._tracing
        parent = self.span_context
        events: tuple[Event, ...] = ()
        status = _UNSET
        if error is not None:
            status = Status(StatusCode.ERROR, str(error))
            events = (Event("exception", {"exception.type": type(error).__name__, "exception.message": str(error)},
                            end_perf_ns + _EPOCH_OFFSET_NS),)
        tracing.processor.on_end(ReadableSpan(
            name,
            context=SpanContext(parent.trace_id, getrandbits(64) or 1, False, parent.trace_flags, parent.trace_state),
            parent=parent, resource=tracing.resource, attributes=attributes, events=events, kind=_INTERNAL,
            status=status, start_time=start_perf_ns + _EPOCH_OFFSET_NS, end_time=end_perf_ns + _EPOCH_OFFSET_NS,
            instrumentation_scope=tracing.scope,
        ))

    def governance(self, start_perf_ns: int, end_perf_ns: int, *, outcome: str, violations: int,
                   payload_sampled: bool) -> None:
        """Validation/sketch/sampling stage; its outcome is mirrored on the SERVER span."""
        attrs = self.attributes
        attrs[ATTR_VALIDATION] = outcome
        attrs[ATTR_VIOLATIONS] = violations
        attrs[ATTR_PAYLOAD_SAMPLED] = payload_sampled
        self._child("governance", start_perf_ns, end_perf_ns,
                    {ATTR_VALIDATION: outcome, ATTR_VIOLATIONS: violations, ATTR_PAYLOAD_SAMPLED: payload_sampled})

    def batch(self, enqueued_perf_ns: int, started_perf_ns: int, finished_perf_ns: int, batch_size: int,
              error: BaseException | None = None) -> None:
        """``queue`` (enqueue -> batch start) and ``inference`` (batch start -> results split)."""
        self._child("queue", enqueued_perf_ns, started_perf_ns, {})
        self._child("inference", started_perf_ns, finished_perf_ns, {ATTR_BATCH_SIZE: batch_size}, error)

    def shadow(self, start_perf_ns: int, end_perf_ns: int, *, version: str, agreed: bool | None = None,
               error: BaseException | None = None) -> None:
        attrs: dict[str, Any] = {ATTR_SHADOW_VERSION: version}
        if agreed is not None:
            attrs["lockgate.shadow.agreed"] = agreed
        self._child("shadow", start_perf_ns, end_perf_ns, attrs, error)

    # events
    def event(self, name: str, attributes: Mapping[str, Any] | None = None) -> None:
        if not self._ended:
            self.events.append(Event(name, dict(attributes or {})))

    def drift_alert(self, model: str, version: str, feature: str, statistic: str, value: float, threshold: float) -> None:
        self.event("lockgate.drift_alert", {ATTR_MODEL: model, ATTR_VERSION: version, "lockgate.drift.feature": feature,
                                            "lockgate.drift.statistic": statistic, "lockgate.drift.value": value,
                                            "lockgate.drift.threshold": threshold})

    def finish(self, error: BaseException | None = None, end_perf_ns: int | None = None) -> None:
        """Set ``rpc.grpc.status_code`` (and ERROR status per semconv), then export the span once."""
        if self._ended:  # like the SDK: a second end is ignored
            return
        self._ended = True
        attrs = self.attributes
        # Later attribute writes (none expected) go to a scratch dict, not the exported span.
        self.attributes = {}
        if error is None:
            attrs["rpc.grpc.status_code"] = 0
        else:
            number = CODE_NUMBERS.get(getattr(error, "code", None), 13)  # INTERNAL unless it names one
            attrs["rpc.grpc.status_code"] = number
            attrs["error.type"] = getattr(error, "reason", type(error).__name__)
            if number in _SERVER_ERROR_CODES:
                self.status = Status(StatusCode.ERROR, getattr(error, "message", str(error)))
        tracing = self._tracing
        tracing.processor.on_end(ReadableSpan(
            self.name, context=self.span_context, parent=self.parent, resource=tracing.resource, attributes=attrs,
            events=tuple(self.events), kind=_SERVER, status=self.status, start_time=self.start_time,
            end_time=end_perf_ns + _EPOCH_OFFSET_NS if end_perf_ns is not None else time.time_ns(),
            instrumentation_scope=tracing.scope,
        ))


# -- the tracer ----------------------------------------------------------------------
class Tracing:
    """Owns the TracerProvider, the export pipeline and the head-sampling decision."""

    def __init__(self, settings: TracingSettings, *, exporter: SpanExporter | None = None,
                 resource_attributes: Mapping[str, Any] | None = None) -> None:
        self.settings = settings
        ratio = settings.sampler_ratio
        # TraceIdRatioBased's rule: sampled iff (trace_id & 2**64-1) < round(ratio * 2**64).
        self._bound = TraceIdRatioBased.get_bound_for_rate(ratio)
        self._parent_based = settings.parent_based
        root: Sampler = TraceIdRatioBased(ratio)
        sampler: Sampler = ParentBased(root) if settings.parent_based else root
        self.resource = Resource.create({
            "service.name": settings.service_name,
            "service.version": lockgate.__version__,
            "service.instance.id": f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}",
            "host.name": socket.gethostname(),
            **(resource_attributes or {}),
        })
        # The provider owns the processor's lifecycle (flush, shutdown) and serves ``tracer`` for
        # any other span; request spans are built by ``start_request`` with the same sampling rule.
        self.provider = TracerProvider(sampler=sampler, resource=self.resource, shutdown_on_exit=False)
        self.exporter = CountingSpanExporter(exporter or make_span_exporter(settings))
        self.processor = BoundedBatchSpanProcessor(
            self.exporter,
            max_queue_size=settings.max_queue_size,
            schedule_delay_millis=settings.schedule_delay_ms,
            max_export_batch_size=min(settings.max_export_batch_size, settings.max_queue_size),
            export_timeout_millis=settings.export_timeout_ms,
            shutdown_timeout_ms=settings.shutdown_timeout_ms,
        )
        self.provider.add_span_processor(self.processor)
        self.tracer = self.provider.get_tracer("lockgate", lockgate.__version__)
        self.scope = InstrumentationScope("lockgate", lockgate.__version__)
        # method -> (SERVER span name, its RPC semconv attributes): built once per method.
        self._server_names: dict[str, tuple[str, dict[str, Any]]] = {}
        self._logger: Any = None
        self._log_provider: Any = None
        self._setup_logs()
        self._closed = False

    def _setup_logs(self) -> None:
        """Rollback log records: our own OTLP LoggerProvider when asked, else a configured global one."""
        try:
            from opentelemetry._logs import get_logger_provider
            from opentelemetry.sdk._logs import LoggerProvider
        except ImportError:
            return
        if self.settings.logs:
            from opentelemetry.sdk._logs.export import BatchLogRecordProcessor

            if self.settings.protocol == "grpc":
                from opentelemetry.exporter.otlp.proto.grpc._log_exporter import OTLPLogExporter

                log_exporter = OTLPLogExporter(endpoint=self.settings.endpoint, insecure=self.settings.insecure)
            else:
                from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter as HttpLogExporter

                log_exporter = HttpLogExporter(endpoint=_endpoint(self.settings, "logs"))
            self._log_provider = LoggerProvider(resource=self.resource, shutdown_on_exit=False)
            self._log_provider.add_log_record_processor(BatchLogRecordProcessor(log_exporter))
            self._logger = self._log_provider.get_logger("lockgate", lockgate.__version__)
        else:
            provider = get_logger_provider()
            if isinstance(provider, LoggerProvider):
                self._logger = provider.get_logger("lockgate", lockgate.__version__)

    # -- hot path --------------------------------------------------------------------
    def start_request(self, method: str, metadata: Mapping[str, str], start_perf_ns: int | None = None) -> RequestTrace | None:
        """The sampling decision, then (only if sampled) the SERVER span.

        ``metadata`` is the gRPC invocation metadata (lower-case keys). Returns None when
        the request is not sampled: no SDK object is created.
        """
        parent: SpanContext | None = None
        trace_state = _EMPTY_STATE
        header = metadata.get("traceparent")
        if header is not None:
            parsed = parse_traceparent(header)
            if parsed is not None:
                trace_id, span_id, flags = parsed
                if self._parent_based:
                    if not flags & 1:
                        return None
                elif (trace_id & _MASK64) >= self._bound:
                    return None
                state = metadata.get("tracestate")
                if state:
                    trace_state = TraceState.from_header([state])
                parent = SpanContext(trace_id, span_id, is_remote=True, trace_flags=TraceFlags(flags), trace_state=trace_state)
        if parent is None:
            trace_id = getrandbits(128)
            if (trace_id & _MASK64) >= self._bound or trace_id == 0:
                return None
        context = SpanContext(trace_id, getrandbits(64) or 1, False, _SAMPLED, trace_state)
        start = start_perf_ns + _EPOCH_OFFSET_NS if start_perf_ns is not None else time.time_ns()
        names = self._server_names.get(method)
        if names is None:
            names = self._server_names[method] = _server_span_names(method)
        return RequestTrace(self, context, parent, names[0], start, names[1].copy())

    # -- events outside a request ----------------------------------------------------
    def rollback(self, model: str, from_version: str, to_version: str, reason: str, trace_: RequestTrace | None = None) -> None:
        """A rollback: span event on the triggering request (if any) and an OTel log record."""
        attrs = {ATTR_MODEL: model, "lockgate.rollback.from_version": from_version,
                 "lockgate.rollback.to_version": to_version, "lockgate.rollback.reason": reason}
        if trace_ is not None:
            trace_.event("lockgate.rollback", attrs)
        if self._logger is not None:
            from opentelemetry._logs import LogRecord, SeverityNumber

            ctx = trace_.context if trace_ is not None else None
            self._logger.emit(LogRecord(
                timestamp=time.time_ns(), context=ctx, severity_text="WARN", severity_number=SeverityNumber.WARN,
                body=f"rollback of model '{model}' from version {from_version} to {to_version}: {reason}",
                attributes=attrs, event_name="lockgate.rollback",
            ))

    # -- accounting & lifecycle ------------------------------------------------------
    @property
    def spans_dropped(self) -> dict[str, int]:
        return {"queue_full": self.processor.dropped, "export_failed": self.exporter.failed}

    def metric_samples(self) -> Iterable[Sample]:
        """A metrics source: ``register_source("tracing", tracing.metric_samples)``."""
        yield Sample("lockgate_otel_spans_exported", {}, self.exporter.exported)
        for reason, count in self.spans_dropped.items():
            yield Sample("lockgate_otel_spans_dropped", {"reason": reason}, count)

    def force_flush(self, timeout_ms: int | None = None) -> bool:
        return self.provider.force_flush(timeout_ms if timeout_ms is not None else self.settings.shutdown_timeout_ms)

    def shutdown(self, timeout_ms: int | None = None) -> None:
        """Flush what is queued (bounded by ``timeout_ms``), then stop the export thread."""
        if self._closed:
            return
        self._closed = True
        timeout = timeout_ms if timeout_ms is not None else self.settings.shutdown_timeout_ms
        try:
            self.provider.force_flush(timeout)
        finally:
            self.provider.shutdown()
            if self._log_provider is not None:
                self._log_provider.force_flush(timeout)
                self._log_provider.shutdown()
