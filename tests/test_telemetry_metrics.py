"""Prometheus metrics: collectors over real VersionStats scraped over HTTP, a real Prometheus
server scraping them, the alerting rules loaded by promtool, and (once the gateway runs
``lockgate.telemetry.integration``) a real lockgate under traffic scraped by Prometheus."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families as parse_text

from conftest import write_model
from lockgate._proto import inference_pb2 as pb
from lockgate.demo import mlp_model
from lockgate.errors import LockgateError
from lockgate.pipeline import InferencePipeline, RequestContext
from lockgate.serving.repository import ModelRepository
from lockgate.telemetry.config import MetricsSettings, TelemetrySettings, TracingSettings
from lockgate.telemetry.gpu import GpuCollector
from lockgate.telemetry.integration import Telemetry
from lockgate.telemetry.metrics import DRIFT_STATUS, Sample, worker_metrics_port
from lockgate_process import LockgateProcess, free_port

ROOT = Path(__file__).resolve().parent.parent
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
PROM_CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.yml"
MLP_CONFIG = "max_batch_size: 8\ndynamic_batching: {max_queue_delay_us: 300}\nruntime: {execution: inline}\n"


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("telemetry-metrics") / "models"
    write_model(root, "mlp", 1, mlp_model([4, 16, 3], seed=5, input_name="INPUT0", output_name="OUTPUT0"), MLP_CONFIG)
    return root


def request(rows: int = 1, width: int = 4, model: str = "mlp") -> Any:
    req = pb.ModelInferRequest(model_name=model, id="t")
    req.inputs.add(name="INPUT0", datatype="FP32", shape=[rows, width])
    req.raw_input_contents.append(np.ones((rows, width), np.float32).tobytes())
    return req


async def infer(pipeline: InferencePipeline, telemetry: Telemetry, req: Any, metadata: dict | None = None) -> bool:
    """What the integrated pipeline does per request (the calls the lead wires in); the
    pipeline itself records the outcome into the version's stats and histograms."""
    start = time.perf_counter_ns()
    trace = telemetry.start_request("ModelInfer", metadata or {}, start)
    ok, error = False, None
    try:
        await pipeline.infer(req, pb.ModelInferResponse, RequestContext(trace=trace))
        ok = True
    except LockgateError as exc:
        error = exc
    finally:
        elapsed = time.perf_counter_ns() - start
        if trace is not None:
            trace.finish(error, start + elapsed)
    return ok


async def with_gateway(root: Path, scenario: Callable[..., Any], settings: TelemetrySettings | None = None,
                       env: dict | None = None) -> Any:
    repository = ModelRepository(root)
    await repository.load_all()
    pipeline = InferencePipeline(repository)
    telemetry = Telemetry(settings or TelemetrySettings(), repository, metrics_port=0, host="127.0.0.1", env=env or {})
    port = telemetry.start()
    try:
        return await scenario(pipeline, telemetry, port)
    finally:
        telemetry.close()
        await repository.close()


def scrape(port: int, openmetrics: bool = False) -> str:
    headers = {"Accept": "application/openmetrics-text; version=1.0.0"} if openmetrics else {}
    with urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{port}/metrics", headers=headers), timeout=10) as r:
        return r.read().decode()


def samples(text: str, name: str, openmetrics: bool = False) -> list[Any]:
    parse = parse_openmetrics if openmetrics else parse_text
    return [s for family in parse(text) for s in family.samples if s.name == name]


def value(text: str, name: str, **labels: str) -> float:
    found = [s.value for s in samples(text, name) if all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(found) == 1, f"{name}{labels}: {found}"
    return found[0]


# -- collectors over real VersionStats -------------------------------------------------
def test_serving_families_count_what_was_sent(repo: Path) -> None:
    async def scenario(pipeline: InferencePipeline, telemetry: Telemetry, port: int) -> str:
        good = await asyncio.gather(*(infer(pipeline, telemetry, request()) for _ in range(7)))
        bad = await asyncio.gather(*(infer(pipeline, telemetry, request(width=5)) for _ in range(3)))
        assert all(good) and not any(bad)
        await infer(pipeline, telemetry, request(rows=3))
        return await asyncio.to_thread(scrape, port)

    text = asyncio.run(with_gateway(repo, scenario))
    mv = {"model": "mlp", "version": "1"}
    assert value(text, "lockgate_inference_request_success_total", **mv) == 8
    assert value(text, "lockgate_inference_request_failure_total", reason="invalid_argument", **mv) == 3
    assert value(text, "lockgate_inference_count_total", **mv) == 10  # 7 + 3 rows
    execs = value(text, "lockgate_inference_exec_count_total", **mv)
    assert 2 <= execs <= 8  # concurrent requests were merged into batches
    assert value(text, "lockgate_inference_pending_request_count", **mv) == 0
    assert value(text, "lockgate_request_duration_seconds_count", **mv) == 8
    assert value(text, "lockgate_request_duration_seconds_bucket", le="+Inf", **mv) == 8
    assert value(text, "lockgate_queue_duration_seconds_count", **mv) == 8
    assert value(text, "lockgate_compute_duration_seconds_count", **mv) == execs
    assert value(text, "lockgate_batch_size_sum", **mv) == 10
    assert value(text, "lockgate_route_decisions_total", decision="default", **mv) == 11
    assert value(text, "lockgate_inference_request_duration_us_total", **mv) > 0
    # buckets are cumulative and end at the count
    buckets = [s.value for s in samples(text, "lockgate_request_duration_seconds_bucket")]
    assert buckets == sorted(buckets) and buckets[-1] == 8
    assert samples(text, "process_cpu_seconds_total") and samples(text, "lockgate_build_info")


def test_exemplars_carry_trace_ids_in_openmetrics(repo: Path) -> None:
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    memory = InMemorySpanExporter()

    async def scenario(pipeline: InferencePipeline, telemetry: Telemetry, port: int) -> tuple[str, str]:
        from lockgate.telemetry.tracing import Tracing

        telemetry.tracing = Tracing(TracingSettings(enabled=True, sampler_ratio=1.0), exporter=memory)
        for _ in range(3):
            assert await infer(pipeline, telemetry, request())
        telemetry.tracing.force_flush()
        return await asyncio.to_thread(scrape, port, True), await asyncio.to_thread(scrape, port)

    om, plain = asyncio.run(with_gateway(repo, scenario))
    trace_ids = {format(s.context.trace_id, "032x") for s in memory.get_finished_spans()}
    assert len(trace_ids) == 3
    exemplars = [s.exemplar for s in samples(om, "lockgate_request_duration_seconds_bucket", openmetrics=True) if s.exemplar]
    assert exemplars and all(e.labels["trace_id"] in trace_ids for e in exemplars)
    assert "trace_id" not in plain  # the classic text format has no exemplars


def test_sources_feed_governance_families_and_errors_are_counted(repo: Path) -> None:
    def governance() -> list[Sample]:
        return [
            Sample("lockgate_validation_violations", {"model": "mlp", "version": "1", "input": "INPUT0", "feature": "f0", "rule": "range"}, 4),
            Sample("lockgate_drift_status", {"model": "mlp", "version": "1", "feature": "f0"}, DRIFT_STATUS["drift"]),
            Sample("lockgate_payload_samples", {"model": "mlp", "version": "1"}, 2),
            Sample("lockgate_payload_samples", {"model": "mlp", "version": "1"}, 3),  # second report adds up
        ]

    def routing() -> list[Sample]:
        return [Sample("lockgate_traffic_weight", {"model": "mlp", "version": "1"}, 0.9),
                Sample("lockgate_no_such_family", {}, 1),
                Sample("lockgate_rollbacks", {"model": "mlp", "bogus": "x"}, 1)]

    def broken() -> list[Sample]:
        raise RuntimeError("source bug")

    async def scenario(pipeline: InferencePipeline, telemetry: Telemetry, port: int) -> str:
        telemetry.register_source("governance", governance)
        telemetry.register_source("routing", routing)
        telemetry.register_source("broken", broken)
        with pytest.raises(ValueError):
            telemetry.register_source("routing", routing)
        return await asyncio.to_thread(scrape, port)

    text = asyncio.run(with_gateway(repo, scenario))
    assert value(text, "lockgate_validation_violations_total", feature="f0", rule="range") == 4
    assert value(text, "lockgate_drift_status", feature="f0") == 2
    assert value(text, "lockgate_payload_samples_total", model="mlp") == 5
    assert value(text, "lockgate_traffic_weight", version="1") == 0.9
    assert value(text, "lockgate_telemetry_source_errors_total", source="broken") == 1
    assert value(text, "lockgate_telemetry_source_errors_total", source="routing") == 2
    assert value(text, "lockgate_telemetry_source_errors_total", source="governance") == 0
    assert not samples(text, "lockgate_rollbacks_total")


def test_metrics_off_and_worker_ports(repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async def scenario(pipeline: InferencePipeline, telemetry: Telemetry, port: int | None) -> None:
        assert port is None and telemetry.metrics is None and telemetry.tracing is None
        assert await infer(pipeline, telemetry, request())  # no-op hooks keep serving

    asyncio.run(with_gateway(repo, scenario, TelemetrySettings(metrics=MetricsSettings(enabled=False))))
    monkeypatch.setenv("LOCKGATE_WORKER_INDEX", "3")
    assert worker_metrics_port(8002) == 8005
    monkeypatch.delenv("LOCKGATE_WORKER_INDEX")
    assert worker_metrics_port(8002) == 8002


def test_gpu_collector_absent_without_nvml() -> None:
    collector = GpuCollector.create()
    if importlib.util.find_spec("pynvml") is None:
        assert collector is None
    elif collector is not None:  # NVML and a GPU: every family has one sample per GPU
        families = {f.name: f for f in collector.collect()}
        assert families["lockgate_gpu_memory_total_bytes"].samples[0].value > 0


# -- real Prometheus -------------------------------------------------------------------
def ensure_prometheus() -> tuple[str, str]:
    """prometheus + promtool binaries; installs Debian's package when missing (root + apt)."""
    if not (shutil.which("prometheus") and shutil.which("promtool")):
        install = ["apt-get", "install", "-y", "-q", "prometheus"]
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        if shutil.which("apt-get") and subprocess.run(install, capture_output=True, env=env).returncode != 0:
            subprocess.run(["apt-get", "update", "-q"], capture_output=True, env=env)
            subprocess.run(install, capture_output=True, env=env)
    prom, tool = shutil.which("prometheus"), shutil.which("promtool")
    if not (prom and tool):
        # The real-backend tests are the point: missing Prometheus is a failure, never a skip.
        pytest.fail("prometheus/promtool missing and apt-get could not install them (needs root and apt)")
    return prom, tool


class PrometheusServer:
    """A real Prometheus scraping ``targets`` every second, with our alerting rules loaded."""

    def __init__(self, tmp: Path, targets: list[str]) -> None:
        binary, _ = ensure_prometheus()
        self.port = free_port()
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(ALERTS)],
            "scrape_configs": [{"job_name": "lockgate", "static_configs": [{"targets": targets}]}],
        }
        (tmp / "prometheus.yml").write_text(json.dumps(config))
        self.log = open(tmp / "prometheus.log", "wb")
        self.proc = subprocess.Popen(
            [binary, f"--config.file={tmp / 'prometheus.yml'}", f"--storage.tsdb.path={tmp / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--enable-feature=exemplar-storage"],
            stdout=self.log, stderr=subprocess.STDOUT,
        )

    def api(self, path: str, **params: str) -> Any:
        url = f"http://127.0.0.1:{self.port}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        with urllib.request.urlopen(url, timeout=5) as r:
            body = json.load(r)
        assert body["status"] == "success", body
        return body["data"]

    def wait_value(self, query: str, expected: float, timeout: float = 40.0) -> float:
        deadline, last = time.monotonic() + timeout, None
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, "prometheus exited"
            try:
                result = self.api("query", query=query)["result"]
                if result:
                    last = float(result[0]["value"][1])
                    if last == expected:
                        return last
            except OSError:
                pass
            time.sleep(0.5)
        raise AssertionError(f"{query}: last value {last}, expected {expected}")

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def test_alert_rules_and_scrape_config_pass_promtool() -> None:
    _, promtool = ensure_prometheus()
    rules = subprocess.run([promtool, "check", "rules", str(ALERTS)], capture_output=True, text=True)
    assert rules.returncode == 0, rules.stdout + rules.stderr
    config = subprocess.run([promtool, "check", "config", str(PROM_CONFIG)], capture_output=True, text=True)
    assert config.returncode == 0, config.stdout + config.stderr


def test_real_prometheus_scrapes_in_process_metrics(repo: Path, tmp_path: Path) -> None:
    weights = {"1": 0.75}

    def routing() -> list[Sample]:
        return [Sample("lockgate_traffic_weight", {"model": "mlp", "version": v}, w) for v, w in weights.items()]

    def governance() -> list[Sample]:
        return [Sample("lockgate_validation_violations", {"model": "mlp", "version": "1", "input": "INPUT0", "feature": "f2", "rule": "max"}, 6)]

    async def scenario(pipeline: InferencePipeline, telemetry: Telemetry, port: int) -> None:
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

        from lockgate.telemetry.tracing import Tracing

        telemetry.tracing = Tracing(TracingSettings(enabled=True), exporter=InMemorySpanExporter())
        telemetry.register_source("routing", routing)
        telemetry.register_source("governance", governance)
        results = await asyncio.gather(*(infer(pipeline, telemetry, request()) for _ in range(25)),
                                       *(infer(pipeline, telemetry, request(width=7)) for _ in range(4)))
        assert sum(results) == 25
        prom = PrometheusServer(tmp_path, [f"127.0.0.1:{port}"])
        try:
            sel = '{model="mlp",version="1"}'
            await asyncio.to_thread(prom.wait_value, f"lockgate_inference_request_success_total{sel}", 25)
            await asyncio.to_thread(prom.wait_value, 'lockgate_inference_request_failure_total{model="mlp",reason="invalid_argument"}', 4)
            await asyncio.to_thread(prom.wait_value, f"lockgate_request_duration_seconds_count{sel}", 25)
            await asyncio.to_thread(prom.wait_value, 'lockgate_validation_violations_total{feature="f2",rule="max"}', 6)
            await asyncio.to_thread(prom.wait_value, f"lockgate_traffic_weight{sel}", 0.75)
            groups = (await asyncio.to_thread(prom.api, "rules"))["groups"]
            alert_names = {r["name"] for g in groups for r in g["rules"]}
            assert {"LockgateDriftDetected", "LockgateHighErrorRate", "LockgateHighP99Latency", "LockgateRollback",
                    "LockgatePayloadRecordsDropped", "LockgateAuditVerifyFailed"} <= alert_names
            now = time.time()
            exemplars = await asyncio.to_thread(prom.api, "query_exemplars", query="lockgate_request_duration_seconds_bucket",
                                                start=str(now - 300), end=str(now + 60))
            assert any(len(e["labels"]["trace_id"]) == 32 for series in exemplars for e in series["exemplars"])
        finally:
            prom.close()

    asyncio.run(with_gateway(repo, scenario))


# -- end to end: a real lockgate process under traffic ---------------------------------
def test_real_prometheus_scrapes_real_lockgate(repo: Path, tmp_path: Path) -> None:
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    with LockgateProcess(repo, state_dir=tmp_path / "state") as server:
        client = grpcclient.InferenceServerClient(server.url)
        good, bad = 40, 5
        for i in range(good + bad):
            width = 4 if i < good else 9
            inp = grpcclient.InferInput("INPUT0", [1, width], "FP32")
            inp.set_data_from_numpy(np.ones((1, width), np.float32))
            try:
                client.infer("mlp", [inp])
            except InferenceServerException:
                assert i >= good
        client.close()
        text = scrape(server.metrics_port)
        assert value(text, "lockgate_inference_request_success_total", model="mlp", version="1") == good
        prom = PrometheusServer(tmp_path, [f"127.0.0.1:{server.metrics_port}"])
        try:
            prom.wait_value('lockgate_inference_request_success_total{model="mlp",version="1"}', good)
            prom.wait_value('lockgate_inference_request_failure_total{model="mlp",version="1",reason="invalid_argument"}', bad)
            prom.wait_value('lockgate_request_duration_seconds_count{model="mlp",version="1"}', good)
            prom.wait_value('sum(lockgate_route_decisions_total{model="mlp"})', good + bad)
            prom.wait_value('up{job="lockgate"}', 1)
        finally:
            prom.close()

