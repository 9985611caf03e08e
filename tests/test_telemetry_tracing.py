"""OpenTelemetry traces against a real OTLP/gRPC receiver (opentelemetry-proto's TraceService
and LogsService on loopback): span tree, attributes, propagation, sampling, flush at shutdown,
resilience with the collector down, and (once integrated) a real lockgate process."""

from __future__ import annotations

import random
import threading
import time
import tracemalloc
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2, logs_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.sdk.trace.sampling import Decision, ParentBased, TraceIdRatioBased

from conftest import write_model
from lockgate.demo import mlp_model
from lockgate.errors import DeadlineExceeded, InvalidArgument
from lockgate.telemetry.config import TracingSettings
from lockgate.telemetry.metrics import Sample
from lockgate.telemetry.tracing import RPC_SERVICE, Tracing, parse_traceparent, resolve
from lockgate_process import LockgateProcess, free_port

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_SPAN = "00f067aa0ba902b7"


class OtlpReceiver(trace_service_pb2_grpc.TraceServiceServicer, logs_service_pb2_grpc.LogsServiceServicer):
    """An OTLP/gRPC endpoint collecting every span and log record it is sent."""

    def __init__(self) -> None:
        self.requests: list[Any] = []
        self.log_requests: list[Any] = []
        self._lock = threading.Lock()
        self.server = grpc.server(futures.ThreadPoolExecutor(4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self, self.server)
        logs_service_pb2_grpc.add_LogsServiceServicer_to_server(self, self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.endpoint = f"127.0.0.1:{self.port}"
        self.server.start()

    def Export(self, request: Any, context: Any) -> Any:
        if isinstance(request, trace_service_pb2.ExportTraceServiceRequest):
            with self._lock:
                self.requests.append(request)
            return trace_service_pb2.ExportTraceServiceResponse()
        with self._lock:
            self.log_requests.append(request)
        return logs_service_pb2.ExportLogsServiceResponse()

    def spans(self) -> list[Any]:
        with self._lock:
            return [s for r in self.requests for rs in r.resource_spans for ss in rs.scope_spans for s in ss.spans]

    def resources(self) -> list[dict[str, Any]]:
        with self._lock:
            return [attrs(rs.resource.attributes) for r in self.requests for rs in r.resource_spans]

    def log_records(self) -> list[Any]:
        with self._lock:
            return [lr for r in self.log_requests for rl in r.resource_logs for sl in rl.scope_logs for lr in sl.log_records]

    def wait_spans(self, n: int, timeout: float = 20.0) -> list[Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and len(self.spans()) < n:
            time.sleep(0.05)
        return self.spans()

    def close(self) -> None:
        self.server.stop(0)


def attrs(kvs: Any) -> dict[str, Any]:
    out = {}
    for kv in kvs:
        v = kv.value
        out[kv.key] = getattr(v, v.WhichOneof("value")) if v.WhichOneof("value") else None
    return out


@pytest.fixture()
def receiver():
    r = OtlpReceiver()
    yield r
    r.close()


def tracing_to(endpoint: str, **overrides: Any) -> Tracing:
    settings = TracingSettings(enabled=True, endpoint=endpoint, schedule_delay_ms=100, export_timeout_ms=2000, **overrides)
    return Tracing(settings)


def one_request(tracing: Tracing, metadata: dict[str, str], error: Exception | None = None) -> Any:
    """A request's worth of hooks, in the order the integrated pipeline and batcher call them."""
    t0 = time.perf_counter_ns()
    trace = tracing.start_request("ModelInfer", metadata, t0)
    if trace is None:
        return None
    trace.set_model("mlp", "2")
    trace.set_route("weighted", key_hash=0xDEADBEEF, shadow_version="3")
    g0 = time.perf_counter_ns()
    trace.governance(g0, g0 + 20_000, outcome="violations", violations=2, payload_sampled=True)
    trace.batch(g0 + 20_000, g0 + 50_000, g0 + 90_000, batch_size=4)
    trace.shadow(g0 + 90_000, g0 + 150_000, version="3", agreed=True)
    trace.drift_alert("mlp", "2", "f0", "psi", 0.4, 0.2)
    trace.finish(error, g0 + 100_000)
    return trace


# -- span tree, attributes, propagation ------------------------------------------------
def test_span_tree_attributes_and_parent_from_traceparent(receiver: OtlpReceiver) -> None:
    tracing = tracing_to(receiver.endpoint)
    trace = one_request(tracing, {"traceparent": f"00-{TRACE_ID}-{PARENT_SPAN}-01", "tracestate": "vendor=abc"})
    assert trace is not None and trace.trace_id_hex == TRACE_ID
    tracing.shutdown()
    spans = {s.name: s for s in receiver.wait_spans(5)}
    server_name = f"{RPC_SERVICE}/ModelInfer"
    assert set(spans) == {server_name, "governance", "queue", "inference", "shadow"}
    server = spans[server_name]
    assert server.kind == server.SPAN_KIND_SERVER
    assert server.trace_id.hex() == TRACE_ID and server.parent_span_id.hex() == PARENT_SPAN
    assert server.trace_state == "vendor=abc"
    for name in ("governance", "queue", "inference", "shadow"):
        assert spans[name].parent_span_id == server.span_id and spans[name].trace_id == server.trace_id
    a = attrs(server.attributes)
    assert a["rpc.system"] == "grpc" and a["rpc.service"] == RPC_SERVICE and a["rpc.method"] == "ModelInfer"
    assert a["rpc.grpc.status_code"] == 0
    assert a["lockgate.model.name"] == "mlp" and a["lockgate.model.version"] == "2"
    assert a["lockgate.route.decision"] == "weighted" and a["lockgate.route.key_hash"] == "00000000deadbeef"
    assert a["lockgate.validation.outcome"] == "violations" and a["lockgate.validation.violations"] == 2
    assert a["lockgate.payload.sampled"] is True
    assert attrs(spans["inference"].attributes)["lockgate.batch.size"] == 4
    assert attrs(spans["shadow"].attributes)["lockgate.shadow.version"] == "3"
    q = spans["queue"]
    assert q.end_time_unix_nano - q.start_time_unix_nano == 30_000  # enqueue -> batch start, as given
    assert [e.name for e in server.events] == ["lockgate.drift_alert"]
    assert attrs(server.events[0].attributes)["lockgate.drift.feature"] == "f0"
    resource = receiver.resources()[0]
    assert resource["service.name"] == "lockgate" and resource["service.version"]
    assert resource["service.instance.id"] and resource["host.name"]


def test_error_status_follows_rpc_semconv(receiver: OtlpReceiver) -> None:
    tracing = tracing_to(receiver.endpoint)
    one_request(tracing, {}, DeadlineExceeded("too late"))
    one_request(tracing, {}, InvalidArgument("bad shape"))
    tracing.shutdown()
    servers = [s for s in receiver.wait_spans(10) if s.kind == s.SPAN_KIND_SERVER]
    by_code = {attrs(s.attributes)["rpc.grpc.status_code"]: s for s in servers}
    assert set(by_code) == {4, 3}
    assert by_code[4].status.code == by_code[4].status.STATUS_CODE_ERROR  # server-side failure
    assert by_code[3].status.code == by_code[3].status.STATUS_CODE_UNSET  # client's fault: not a server error
    assert attrs(by_code[3].attributes)["error.type"] == "invalid_argument"
    assert all(s.parent_span_id == b"" for s in servers)  # no traceparent: new roots


# -- sampling --------------------------------------------------------------------------
def test_unsampled_requests_export_nothing(receiver: OtlpReceiver) -> None:
    tracing = tracing_to(receiver.endpoint, sampler_ratio=0.0)
    assert one_request(tracing, {}) is None
    assert one_request(tracing, {"traceparent": f"00-{TRACE_ID}-{PARENT_SPAN}-00"}) is None  # parent said no
    sampled = one_request(tracing, {"traceparent": f"00-{TRACE_ID}-{PARENT_SPAN}-01"})  # parent said yes
    assert sampled is not None
    for _ in range(200):
        assert tracing.start_request("ModelInfer", {}) is None
    tracing.shutdown()
    assert {s.trace_id.hex() for s in receiver.wait_spans(5)} == {TRACE_ID}
    assert len(receiver.spans()) == 5


def test_head_sampling_matches_the_sdk_sampler() -> None:
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    ratio = 0.3
    tracing = Tracing(TracingSettings(enabled=True, sampler_ratio=ratio), exporter=InMemorySpanExporter())
    sdk = ParentBased(TraceIdRatioBased(ratio))
    random.seed(11)
    kept = [t for t in (tracing.start_request("ModelInfer", {}) for _ in range(2000)) if t is not None]
    assert 400 < len(kept) < 800  # ~600 expected
    for t in kept:  # every trace id we kept is one the SDK sampler keeps
        tid = int(t.trace_id_hex, 16)
        assert sdk.should_sample(None, tid, "x").decision == Decision.RECORD_AND_SAMPLE
        t.finish()
    # parent-based off: the incoming trace id decides, exactly like TraceIdRatioBased
    flat = Tracing(TracingSettings(enabled=True, sampler_ratio=ratio, parent_based=False), exporter=InMemorySpanExporter())
    for _ in range(300):
        tid = random.getrandbits(128) | 1
        header = f"00-{tid:032x}-{PARENT_SPAN}-01"
        ours = flat.start_request("ModelInfer", {"traceparent": header}) is not None
        assert ours == (TraceIdRatioBased(ratio).should_sample(None, tid, "x").decision == Decision.RECORD_AND_SAMPLE)
    tracing.shutdown()
    flat.shutdown()


def test_traceparent_parsing() -> None:
    assert parse_traceparent(f"00-{TRACE_ID}-{PARENT_SPAN}-01") == (int(TRACE_ID, 16), int(PARENT_SPAN, 16), 1)
    assert parse_traceparent(f"00-{'0' * 32}-{PARENT_SPAN}-01") is None
    assert parse_traceparent(f"ff-{TRACE_ID}-{PARENT_SPAN}-01") is None
    assert parse_traceparent(f"00-{TRACE_ID}-{PARENT_SPAN}-01-extra") is None
    assert parse_traceparent(f"01-{TRACE_ID}-{PARENT_SPAN}-01-future") is not None  # future versions may extend
    assert parse_traceparent("garbage") is None and parse_traceparent(f"00-{TRACE_ID[:-1]}x-{PARENT_SPAN}-01") is None


def test_otel_environment_variables() -> None:
    s = resolve(TracingSettings(), {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317", "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
                                    "OTEL_TRACES_SAMPLER_ARG": "0.01", "OTEL_SERVICE_NAME": "gw", "OTEL_BSP_MAX_QUEUE_SIZE": "99"})
    assert s.enabled and s.endpoint == "http://collector:4317" and s.sampler_ratio == 0.01 and s.parent_based
    assert s.service_name == "gw" and s.max_queue_size == 99 and s.protocol == "grpc"
    assert not resolve(TracingSettings(enabled=True), {"OTEL_SDK_DISABLED": "true"}).enabled
    assert not resolve(TracingSettings(enabled=True), {"OTEL_TRACES_EXPORTER": "none"}).enabled
    assert resolve(TracingSettings(), {"OTEL_TRACES_SAMPLER": "always_off"}).sampler_ratio == 0.0
    assert resolve(TracingSettings(), {"OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"}).protocol == "http/protobuf"
    with pytest.raises(ValueError, match="OTEL_TRACES_SAMPLER"):
        resolve(TracingSettings(), {"OTEL_TRACES_SAMPLER": "jaeger_remote"})
    with pytest.raises(ValueError, match="OTEL_EXPORTER_OTLP_PROTOCOL"):
        resolve(TracingSettings(), {"OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"})


# -- shutdown, events, logs -------------------------------------------------------------
def test_spans_are_flushed_at_shutdown(receiver: OtlpReceiver) -> None:
    # A 60 s schedule delay: nothing would be sent before shutdown without the flush.
    tracing = Tracing(TracingSettings(enabled=True, endpoint=receiver.endpoint, schedule_delay_ms=60_000))
    traces = [tracing.start_request("ModelInfer", {}) for _ in range(10)]
    for t in traces:
        t.finish()
    time.sleep(0.3)
    assert receiver.spans() == []
    tracing.shutdown()
    assert len(receiver.spans()) == 10


def test_rollback_is_a_span_event_and_a_log_record(receiver: OtlpReceiver) -> None:
    tracing = tracing_to(receiver.endpoint, logs=True)
    trace = tracing.start_request("ModelInfer", {})
    tracing.rollback("mlp", "3", "2", "error rate 12% > 5%", trace)
    trace.finish()
    tracing.shutdown()
    server = receiver.wait_spans(1)[0]
    assert [e.name for e in server.events] == ["lockgate.rollback"]
    assert attrs(server.events[0].attributes)["lockgate.rollback.to_version"] == "2"
    deadline = time.monotonic() + 10
    while not receiver.log_records() and time.monotonic() < deadline:
        time.sleep(0.05)
    (record,) = receiver.log_records()
    assert "rollback of model 'mlp' from version 3 to 2" in record.body.string_value
    assert record.trace_id == server.trace_id and record.span_id == server.span_id
    assert record.severity_text == "WARN"


# -- resilience --------------------------------------------------------------------------
def test_collector_down_bounded_and_counted() -> None:
    dead = f"127.0.0.1:{free_port()}"  # nothing listens here
    tracing = Tracing(TracingSettings(enabled=True, endpoint=dead, max_queue_size=64, max_export_batch_size=32,
                                      schedule_delay_ms=50, export_timeout_ms=300, shutdown_timeout_ms=3000))
    total = 3000
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    peak_queue = 0
    started = time.perf_counter()
    for i in range(total):
        trace = tracing.start_request("ModelInfer", {})
        trace.batch(time.perf_counter_ns(), time.perf_counter_ns(), time.perf_counter_ns(), 1)
        trace.finish()
        peak_queue = max(peak_queue, len(tracing.processor._queue))
    elapsed = time.perf_counter() - started
    growth = sum(stat.size_diff for stat in tracemalloc.take_snapshot().compare_to(before, "filename"))
    tracemalloc.stop()
    assert peak_queue <= 64
    assert growth < 8 * 1024 * 1024, f"memory grew by {growth} bytes"
    assert tracing.processor.dropped > 0
    tracing.shutdown()
    dropped = tracing.spans_dropped
    assert tracing.exporter.exported == 0
    # every span (3 per request) is accounted for: dropped at the queue or failed at export
    assert dropped["queue_full"] + dropped["export_failed"] == 3 * total, (dropped, elapsed)
    samples = {(s.family, s.labels.get("reason")): s.value for s in tracing.metric_samples()}
    assert samples[("lockgate_otel_spans_dropped", "queue_full")] == dropped["queue_full"]
    assert samples[("lockgate_otel_spans_exported", None)] == 0
    assert all(isinstance(s, Sample) for s in tracing.metric_samples())


# -- end to end: a real lockgate process ---------------------------------------------------
@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("telemetry-tracing") / "models"
    write_model(root, "mlp", 1, mlp_model([4, 16, 3], seed=5, input_name="INPUT0", output_name="OUTPUT0"),
                "max_batch_size: 8\ndynamic_batching: {max_queue_delay_us: 300}\n")
    return root


def _infer(url: str, n: int, headers: dict[str, str] | None = None) -> int:
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url)
    ok = 0
    try:
        for _ in range(n):
            inp = grpcclient.InferInput("INPUT0", [1, 4], "FP32")
            inp.set_data_from_numpy(np.ones((1, 4), np.float32))
            result = client.infer("mlp", [inp], headers=headers)
            ok += result.as_numpy("OUTPUT0").shape == (1, 3)
    finally:
        client.close()
    return ok


def test_real_lockgate_exports_server_spans(repo: Path, receiver: OtlpReceiver, tmp_path: Path) -> None:
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://{receiver.endpoint}", "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
           "OTEL_TRACES_SAMPLER_ARG": "0", "OTEL_BSP_SCHEDULE_DELAY": "100"}
    server = LockgateProcess(repo, env=env, state_dir=tmp_path / "state").wait_ready()
    try:
        assert _infer(server.url, 5) == 5  # ratio 0 and no parent: nothing sampled
        assert _infer(server.url, 1, {"traceparent": f"00-{TRACE_ID}-{PARENT_SPAN}-01"}) == 1
        # A request that fails before routing (unknown model) still ends its span, with the status.
        import tritonclient.grpc as grpcclient
        from tritonclient.utils import InferenceServerException

        client = grpcclient.InferenceServerClient(server.url)
        inp = grpcclient.InferInput("INPUT0", [1, 4], "FP32")
        inp.set_data_from_numpy(np.ones((1, 4), np.float32))
        with pytest.raises(InferenceServerException):
            client.infer("no-such-model", [inp], headers={"traceparent": f"00-{TRACE_ID}-{PARENT_SPAN}-01"})
        client.close()
    finally:
        assert server.terminate() == 0  # SIGTERM: spans flushed at shutdown
    spans = receiver.wait_spans(1)
    assert {s.trace_id.hex() for s in spans} == {TRACE_ID}
    failed = [s for s in spans if s.kind == s.SPAN_KIND_SERVER and attrs(s.attributes).get("rpc.grpc.status_code") == 5]
    assert len(failed) == 1, "the NOT_FOUND request's server span was not exported"
    names = {s.name for s in spans}
    assert f"{RPC_SERVICE}/ModelInfer" in names and {"queue", "inference"} <= names
    server_span = next(s for s in spans if s.kind == s.SPAN_KIND_SERVER)
    assert server_span.parent_span_id.hex() == PARENT_SPAN
    a = attrs(server_span.attributes)
    assert a["lockgate.model.name"] == "mlp" and a["rpc.grpc.status_code"] == 0 and a["lockgate.route.decision"]


def test_real_lockgate_honours_traceparent_over_rest(repo: Path, receiver: OtlpReceiver, tmp_path: Path) -> None:
    """A REST infer with a sampled ``traceparent`` header is traced as a child of that parent;
    without one (ratio 0) nothing is; a REST failure's span carries the same canonical status."""
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://{receiver.endpoint}", "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
           "OTEL_TRACES_SAMPLER_ARG": "0", "OTEL_BSP_SCHEDULE_DELAY": "100"}
    server = LockgateProcess(repo, env=env, state_dir=tmp_path / "state").wait_ready()
    parent = {"traceparent": f"00-{TRACE_ID}-{PARENT_SPAN}-01"}
    try:
        client = httpclient.InferenceServerClient(server.http_url)
        inp = httpclient.InferInput("INPUT0", [1, 4], "FP32")
        inp.set_data_from_numpy(np.ones((1, 4), np.float32))
        for _ in range(3):
            client.infer("mlp", [inp])  # not sampled
        assert client.infer("mlp", [inp], headers=parent).as_numpy("OUTPUT0").shape == (1, 3)
        with pytest.raises(InferenceServerException):
            client.infer("no-such-model", [inp], headers=parent)
        client.close()
    finally:
        assert server.terminate() == 0
    spans = receiver.wait_spans(4)
    assert {s.trace_id.hex() for s in spans} == {TRACE_ID}
    servers = [s for s in spans if s.kind == s.SPAN_KIND_SERVER]
    assert len(servers) == 2 and all(s.parent_span_id.hex() == PARENT_SPAN for s in servers)
    assert {s.name for s in servers} == {"POST /v2/models/{model_name}/infer"}
    codes = sorted(attrs(s.attributes)["rpc.grpc.status_code"] for s in servers)
    assert codes == [0, 5]
    ok = next(s for s in servers if attrs(s.attributes)["rpc.grpc.status_code"] == 0)
    assert attrs(ok.attributes)["lockgate.model.name"] == "mlp" and attrs(ok.attributes)["http.request.method"] == "POST"


def test_real_lockgate_serves_with_collector_down(repo: Path, tmp_path: Path) -> None:
    import urllib.request

    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{free_port()}", "OTEL_TRACES_SAMPLER": "always_on",
           "OTEL_BSP_MAX_QUEUE_SIZE": "16", "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "8", "OTEL_BSP_EXPORT_TIMEOUT": "200"}
    server = LockgateProcess(repo, env=env, state_dir=tmp_path / "state").wait_ready()
    try:
        assert _infer(server.url, 200) == 200
        with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10) as r:
            text = r.read().decode()
        dropped = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                      if line.startswith("lockgate_otel_spans_dropped_total{"))
        assert dropped > 0
    finally:
        assert server.terminate() == 0



def _without_unset_status(message):
    """An UNSET status is the proto default: the SDK writes it, lockgate leaves it out."""
    for rs in message.resource_spans:
        for ss in rs.scope_spans:
            for s in ss.spans:
                if s.status.code == 0 and not s.status.message:
                    s.ClearField("status")
    return message


def test_span_encoder_matches_the_sdk_encoder() -> None:
    """lockgate's OTLP encoder (private SDK helpers, cached attributes) must produce exactly
    what the SDK's public encoder produces, apart from the protobuf-default empty status."""
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from opentelemetry.trace import Status, StatusCode

    from lockgate.telemetry.tracing import SpanEncoder

    memory = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "lockgate-test", "host.name": "h"}))
    provider.add_span_processor(SimpleSpanProcessor(memory))
    tracer = provider.get_tracer("lockgate.test", "1.0")
    for i in range(3):
        with tracer.start_as_current_span("inference.GRPCInferenceService/ModelInfer", attributes={
            "rpc.system": "grpc", "rpc.method": "ModelInfer", "lockgate.batch.size": i + 1, "ok": i != 1,
        }) as span:
            span.add_event("drift", {"feature": "age", "psi": 0.3})
            with tracer.start_as_current_span("inference", attributes={"lockgate.batch.size": 4}):
                pass
            if i == 1:
                span.set_status(Status(StatusCode.ERROR, "NOT_FOUND"))
    spans = memory.get_finished_spans()
    assert len(spans) == 6
    ours = SpanEncoder().encode(spans)
    sdk = encode_spans(spans)
    assert _without_unset_status(ours) == _without_unset_status(sdk)


def test_span_encoder_wire_bytes_match_the_sdk_for_remote_parents_state_and_links() -> None:
    """The bytes the exporter sends parse to the SDK's message: remote parent (flags),
    W3C tracestate, links, dropped counts, two scopes and a span without attributes."""
    from opentelemetry import trace as otel_trace
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import SpanLimits, TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from opentelemetry.trace import Link, NonRecordingSpan, SpanContext, SpanKind, TraceFlags, TraceState

    from lockgate.telemetry.tracing import SpanEncoder

    memory = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "lockgate-test"}),
                              span_limits=SpanLimits(max_span_attributes=2))
    provider.add_span_processor(SimpleSpanProcessor(memory))
    remote = SpanContext(0x0AF7651916CD43DD8448EB211C80319C, 0xB7AD6B7169203331, is_remote=True,
                         trace_flags=TraceFlags(1), trace_state=TraceState([("vendor", "v1"), ("other", "x")]))
    parent = otel_trace.set_span_in_context(NonRecordingSpan(remote))
    linked = SpanContext(0x1, 0x2, is_remote=False, trace_flags=TraceFlags(1))
    with provider.get_tracer("lockgate.a", "1").start_as_current_span(
        "server", context=parent, kind=SpanKind.SERVER, links=[Link(linked, {"why": "batch"})],
        attributes={"a": 1, "b": 2.5, "c": "dropped"},
    ):
        with provider.get_tracer("lockgate.b").start_as_current_span("bare"):
            pass
    spans = memory.get_finished_spans()
    sent = ExportTraceServiceRequest.FromString(SpanEncoder().encode_bytes(spans))
    sdk = encode_spans(spans)
    assert _without_unset_status(sent) == _without_unset_status(sdk)
    server = next(s for rs in sent.resource_spans for ss in rs.scope_spans for s in ss.spans if s.name == "server")
    assert server.trace_state == "vendor=v1,other=x" and server.dropped_attributes_count == 1
    assert server.flags & 0x200 and server.parent_span_id == (0xB7AD6B7169203331).to_bytes(8, "big")


def test_real_lockgate_concurrent_calls_each_keep_their_own_traceparent(repo: Path, receiver: OtlpReceiver, tmp_path: Path) -> None:
    """The server reads each call's metadata from what grpc decoded to find its handler (a
    context variable per call): under concurrency no call may see another's traceparent,
    and every message of a stream sees the stream's."""
    import asyncio

    from lockgate._proto import inference_pb2 as pb

    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://{receiver.endpoint}", "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
           "OTEL_TRACES_SAMPLER_ARG": "0", "OTEL_BSP_SCHEDULE_DELAY": "100"}
    rng = random.Random(11)
    calls = [(f"{rng.getrandbits(128):032x}", f"{rng.getrandbits(64) | 1:016x}", i % 2 == 0) for i in range(96)]
    stream_trace, stream_parent = f"{rng.getrandbits(128):032x}", f"{rng.getrandbits(64) | 1:016x}"

    def request() -> Any:
        req = pb.ModelInferRequest(model_name="mlp")
        req.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 4])
        req.raw_input_contents.append(np.ones((1, 4), np.float32).tobytes())
        return req

    async def drive(url: str) -> tuple[int, int]:
        async with grpc.aio.insecure_channel(url) as channel:
            infer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer",
                                        request_serializer=pb.ModelInferRequest.SerializeToString,
                                        response_deserializer=pb.ModelInferResponse.FromString)
            stream = channel.stream_stream("/inference.GRPCInferenceService/ModelStreamInfer",
                                           request_serializer=pb.ModelInferRequest.SerializeToString,
                                           response_deserializer=pb.ModelStreamInferResponse.FromString)

            async def one(trace_id: str, span_id: str, sampled: bool) -> bool:
                header = f"00-{trace_id}-{span_id}-{'01' if sampled else '00'}"
                response = await infer(request(), metadata=(("traceparent", header),))
                return len(response.raw_output_contents) == 1

            async def streamed() -> int:
                header = f"00-{stream_trace}-{stream_parent}-01"
                call = stream(iter([request() for _ in range(5)]), metadata=(("traceparent", header),))
                return sum([not r.error_message async for r in call])

            results = await asyncio.gather(*(one(*c) for c in calls), streamed())
            return sum(results[:-1]), results[-1]

    server = LockgateProcess(repo, env=env, state_dir=tmp_path / "state").wait_ready()
    try:
        assert asyncio.run(drive(server.url)) == (len(calls), 5)
    finally:
        assert server.terminate() == 0  # spans flushed at shutdown
    expected = {trace_id: parent for trace_id, parent, sampled in calls if sampled}
    servers = [s for s in receiver.wait_spans(len(expected) + 5) if s.kind == s.SPAN_KIND_SERVER]
    got: dict[str, list[str]] = {}
    for span in servers:
        got.setdefault(span.trace_id.hex(), []).append(span.parent_span_id.hex())
    assert got.pop(stream_trace) == [stream_parent] * 5
    assert got == {trace_id: [parent] for trace_id, parent in expected.items()}
