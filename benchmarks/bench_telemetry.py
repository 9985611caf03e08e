"""Telemetry cost benchmark: lockgate throughput with telemetry off / Prometheus / + tracing.

One run, batch-1 FP32 requests to the ``mlp`` model driven by h2load (unary ModelInfer),
four lockgate servers started side by side and measured interleaved (repeat -> level ->
target, the order reversed every other repeat) so a noisy machine hits every configuration
alike; req/s are medians, each cost is 1 - the median of the per-repeat ratios to ``off``:

* ``off``        -- ``telemetry: {metrics: {enabled: false}}``, no OTEL_* variables
* ``prom``       -- metrics on (default), scraped every second by this script
* ``prom+tr1``   -- + OTLP/gRPC tracing, parent-based ratio 0.01, to a local OTLP sink
* ``prom+tr100`` -- + tracing at ratio 1.0

Targets (issue 5): prom+tr1 costs <= 3% of ``off`` throughput; prom+tr100 <= 25%.
A micro-benchmark of the per-request hooks (unsampled / sampled ``start_request``,
``VersionStats.record_request``/``record_direct``) runs first and needs no server.

    .venv/bin/python benchmarks/bench_telemetry.py            # ~4-5 min on 2 cores
    .venv/bin/python benchmarks/bench_telemetry.py --quick    # smoke run
    .venv/bin/python benchmarks/bench_telemetry.py --micro-only

Writes bench-results/telemetry-<timestamp>.json. Needs lockgate.transport.server to run
``lockgate.telemetry.integration`` (the ``telemetry:`` config section).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import threading
import time
import timeit
import urllib.request
from concurrent import futures
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make ``benchmarks.*`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import grpc
import yaml
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from benchmarks.harness import Cell, Harness, prepare_workload
from benchmarks.models import MLP, write_repository
from benchmarks.servers import LOCKGATE_BIN, REPO_ROOT, install_cleanup, lockgate_target

CONFIGS = ("off", "prom", "prom+tr1", "prom+tr100")
GOALS = {"prom+tr1": 0.03, "prom+tr100": 0.25}  # max throughput cost vs off


class OtlpSink(trace_service_pb2_grpc.TraceServiceServicer):
    """Stands in for an OpenTelemetry Collector: accepts and counts spans."""

    def __init__(self) -> None:
        self.spans = 0
        self._lock = threading.Lock()
        self.server = grpc.server(futures.ThreadPoolExecutor(2))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self, self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def Export(self, request: Any, context: Any) -> Any:
        n = sum(len(ss.spans) for rs in request.resource_spans for ss in rs.scope_spans)
        with self._lock:
            self.spans += n
        return trace_service_pb2.ExportTraceServiceResponse()

    def close(self) -> None:
        self.server.stop(0)


class Scraper(threading.Thread):
    """Scrapes every metrics endpoint once a second, as Prometheus would."""

    def __init__(self, ports: list[int]) -> None:
        super().__init__(daemon=True)
        self.ports = ports
        self.stop = threading.Event()
        self.scrapes = 0
        self.errors = 0

    def run(self) -> None:
        while not self.stop.wait(1.0):
            for port in self.ports:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                        r.read()
                    self.scrapes += 1
                except OSError:
                    self.errors += 1


def micro(n: int = 20000) -> dict[str, float]:
    """ns per call of the request-path hooks, in this process (no server)."""
    import asyncio

    from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

    from lockgate.telemetry.config import MetricsSettings, TracingSettings
    from lockgate.telemetry.metrics import GatewayMetrics
    from lockgate.telemetry.tracing import Tracing

    class Discard(SpanExporter):
        def export(self, spans: Any) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    off = Tracing(TracingSettings(enabled=True, sampler_ratio=0.0), exporter=Discard())
    on = Tracing(TracingSettings(enabled=True, sampler_ratio=1.0, max_queue_size=1 << 16), exporter=Discard())
    parent_off = {"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00"}
    out = {
        "start_request_unsampled_ns": timeit.timeit(lambda: off.start_request("ModelInfer", {}), number=n) / n * 1e9,
        "start_request_unsampled_parent_ns": timeit.timeit(lambda: off.start_request("ModelInfer", parent_off), number=n) / n * 1e9,
    }

    def sampled() -> None:
        t = on.start_request("ModelInfer", {})
        now = time.perf_counter_ns()
        t.set_model("mlp", "1")
        t.set_route("default")
        t.batch(now, now, now, 1)
        t.finish()

    out["sampled_request_4_spans_ns"] = timeit.timeit(sampled, number=n // 10) / (n // 10) * 1e9

    class _Repo:
        def subscribe(self, listener: object) -> None:
            return None

        def models(self) -> dict:
            return {}

    from lockgate.serving.stats import VersionStats

    class _Version:
        def __init__(self) -> None:
            self.extensions: dict = {}
            self.stats = VersionStats()

    metrics = GatewayMetrics(_Repo(), MetricsSettings(process=False, gpu=False))  # type: ignore[arg-type]
    version = _Version()
    stats = version.stats
    # the per-request and per-execution bookkeeping without and with the histograms attached
    out["record_request_ns"] = timeit.timeit(lambda: stats.record_request(True, 250_000, "", "default", None), number=n) / n * 1e9
    out["record_direct_ns"] = timeit.timeit(lambda: stats.record_direct(1, 80_000), number=n) / n * 1e9
    metrics.attach(version)  # type: ignore[arg-type]
    out["record_request_with_histogram_ns"] = timeit.timeit(lambda: stats.record_request(True, 250_000, "", "default", None), number=n) / n * 1e9
    out["record_direct_with_histograms_ns"] = timeit.timeit(lambda: stats.record_direct(1, 80_000), number=n) / n * 1e9
    on.shutdown()
    off.shutdown()
    del asyncio
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="lockgate telemetry cost benchmark (h2load)")
    p.add_argument("--quick", action="store_true", help="1 repeat, 2 s runs")
    p.add_argument("--micro-only", action="store_true", help="only the in-process hook micro-benchmark")
    p.add_argument("--duration", type=float, default=6.0, help="seconds per h2load run")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--levels", default="16", help="comma list of requests in flight")
    p.add_argument("--out", type=Path, default=REPO_ROOT / "bench-results")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.quick:
        args.duration, args.repeats = 2.0, 1
    levels = [int(x) for x in args.levels.split(",") if x]
    hooks = micro()
    print("per-request hook cost (ns):", json.dumps({k: round(v) for k, v in hooks.items()}))
    result: dict[str, Any] = {"micro_ns": hooks}
    if not args.micro_only:
        if not LOCKGATE_BIN.exists():
            print(f"{LOCKGATE_BIN} not found", file=sys.stderr)
            return 2
        install_cleanup()
        result.update(run_servers(args, levels))
    args.out.mkdir(parents=True, exist_ok=True)
    out_file = args.out / f"telemetry-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out_file.write_text(json.dumps(result, indent=2, default=str))
    print(f"\nwrote {out_file}")
    goals = result.get("goals", {})
    return 0 if all(g["met"] is not False for g in goals.values()) else 1


def run_servers(args: argparse.Namespace, levels: list[int]) -> dict[str, Any]:
    sink = OtlpSink()
    with tempfile.TemporaryDirectory(prefix="bench-telemetry-") as tmp:
        work = Path(tmp)
        repo = write_repository(work / "repo", specs=(MLP,))
        off_cfg = work / "off.yaml"
        off_cfg.write_text(yaml.safe_dump({"telemetry": {"metrics": {"enabled": False}}}))
        tracing_env = {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{sink.port}",
                       "OTEL_TRACES_SAMPLER": "parentbased_traceidratio"}
        targets = {
            "off": lockgate_target(repo, work / "s-off", name="off", extra_args=("--config", str(off_cfg))),
            "prom": lockgate_target(repo, work / "s-prom", name="prom"),
            "prom+tr1": lockgate_target(repo, work / "s-tr1", name="prom+tr1", env={**tracing_env, "OTEL_TRACES_SAMPLER_ARG": "0.01"}),
            "prom+tr100": lockgate_target(repo, work / "s-tr100", name="prom+tr100", env={**tracing_env, "OTEL_TRACES_SAMPLER_ARG": "1"}),
        }
        workload = prepare_workload(MLP, repo / MLP.name / "1" / "model.onnx", work)
        with Harness(work / "logs", args.duration) as harness:
            for target in targets.values():
                harness.start(target, [MLP.name])
            metric_ports = [int(t.argv[t.argv.index("--metrics-port") + 1]) for n, t in targets.items() if n != "off" and n in harness.servers]
            scraper = Scraper(metric_ports)
            scraper.start()
            try:
                cells = harness.run([n for n in CONFIGS if n in harness.servers], [workload], levels, args.repeats, alternate=True)
            finally:
                scraper.stop.set()
            healthy = harness.recheck([workload])
            failures = {f"{k[0]}/{k[1]}": v for k, v in harness.failures.items()}
    sink.close()
    table, goals = report(cells, levels)
    print(table)
    return {
        "configs": {name: {"argv": t.argv, "env": t.env} for name, t in targets.items()},
        "cells": [c.as_dict() for c in cells.values()],
        "goals": goals,
        "spans_received_by_sink": sink.spans,
        "scrapes": scraper.scrapes,
        "scrape_errors": scraper.errors,
        "healthy_after": healthy,
        "failures": failures,
        "markdown": table,
    }


def report(cells: dict[tuple[str, str, int], Cell], levels: list[int]) -> tuple[str, dict[str, Any]]:
    lines = ["| config | in flight | req/s (median) | cost vs off (median of paired repeats) | server CPU µs/request (median) "
             "| CPU cost vs off (median of paired repeats) | p50 ms | p99 ms | errors |",
             "|---|---|---|---|---|---|---|---|---|"]
    goals: dict[str, Any] = {}
    for level in levels:
        base = next((c.median("requests_per_s") for (t, _, lv), c in cells.items() if t == "off" and lv == level), math.nan)
        for name in CONFIGS:
            cell = next((c for (t, _, lv), c in cells.items() if t == name and lv == level), None)
            if cell is None:
                continue
            rps = cell.median("requests_per_s")
            # 1 - the median of the per-repeat ratios to ``off``: each repeat measures every
            # config back to back (order reversed every other repeat), so load drifts on the
            # shared machine hit all of them alike.
            off = next((c for (t, _, lv), c in cells.items() if t == "off" and lv == level), None)
            pairs = [r.requests_per_s / o.requests_per_s for r, o in zip(cell.runs, off.runs) if o.requests_per_s] if off else []
            cost = 1 - statistics.median(pairs) if pairs else math.nan
            # The same from the server's CPU time per request: at a fixed load the extra work per
            # request, what throughput loses when the server is the bottleneck.
            cpu_pairs = [r.server_cpu_us_per_request / o.server_cpu_us_per_request
                         for r, o in zip(cell.runs, off.runs) if o.server_cpu_us_per_request > 0] if off else []
            cpu_pairs = [x for x in cpu_pairs if not math.isnan(x)]
            cpu_cost = 1 - 1 / statistics.median(cpu_pairs) if cpu_pairs else math.nan
            lines.append(f"| {name} | {level} | {rps:,.0f} | {cost:+.1%} | {cell.median('server_cpu_us_per_request'):.0f} | "
                         f"{cpu_cost:+.1%} | {cell.median('p50_ms'):.2f} | {cell.median('p99_ms'):.2f} | {cell.errors} |")
            if name in GOALS:
                goals[f"{name}@{level}"] = {"cost": cost, "bound": GOALS[name],
                                            "met": None if math.isnan(cost) else cost <= GOALS[name],
                                            "runs_req_per_s": [r.requests_per_s for r in cell.runs],
                                            "paired_ratios": pairs,
                                            "cpu_cost": cpu_cost,
                                            "cpu_paired_ratios": cpu_pairs,
                                            "off_runs_req_per_s": statistics.median([base]) if not math.isnan(base) else None}
    return "\n".join(lines), goals


if __name__ == "__main__":
    sys.exit(main())
