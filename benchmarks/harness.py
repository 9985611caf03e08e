"""Reusable load-test harness: servers x workloads x concurrency levels x repeats, with checks.

``bench_dataplane.py`` is one user; benchmarks that compare lockgate variants (governance
on/off, telemetry levels) build ``lockgate_target(..., extra_args=("--config", FILE))``
targets and call the same ``Harness.run`` so every number comes from one interleaved run.

Repeats are interleaved (repeat -> level -> target) rather than run target by target, so slow
drifts of a shared noisy machine hit every target alike; medians are reported.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tritonclient.grpc import service_pb2 as pb

from benchmarks.checks import CheckResult, check_stream, check_unary
from benchmarks.h2load import STREAM_PATH, UNARY_PATH, H2LoadResult, Load, infer_request, run_h2load, warm_up, write_body
from benchmarks.inprocess import session
from benchmarks.models import ModelSpec, sample_input
from benchmarks.servers import REPO_ROOT, RunningServer, Target


def load_for(in_flight: int, max_clients: int = 8) -> Load:
    """Concurrency level -> h2load clients x streams: up to ``max_clients`` HTTP/2 connections
    (enough to spread over SO_REUSEPORT workers), the rest as concurrent streams on each."""
    clients = max(1, min(in_flight, max_clients))
    return Load(clients=clients, streams=max(1, in_flight // clients))


@dataclass
class Workload:
    """One request body: a model, unary or streaming (``frames`` messages per call)."""

    name: str
    model: ModelSpec
    rpc_path: str
    frames: int
    body: Path
    request: pb.ModelInferRequest
    expected: np.ndarray

    @property
    def streaming(self) -> bool:
        return self.rpc_path == STREAM_PATH


def prepare_workload(model: ModelSpec, model_path: Path, workdir: Path, streaming: bool = False, frames: int = 100) -> Workload:
    """Write the h2load body and compute the reference output with in-process ORT."""
    data = sample_input(model)
    request = infer_request(model.name, model.input_name, data)
    frames = frames if streaming else 1
    name = f"{model.name}-{'stream' if streaming else 'unary'}"
    body = write_body(workdir / f"{name}.bin", request, frames)
    expected = session(model_path, 1).run(None, {model.input_name: data})[0]
    return Workload(name, model, STREAM_PATH if streaming else UNARY_PATH, frames, body, request, expected)


@dataclass
class Cell:
    """All repeats of one (target, workload, level)."""

    target: str
    workload: str
    level: int
    runs: list[H2LoadResult] = field(default_factory=list)

    def median(self, attr: str) -> float:
        values = [getattr(run, attr) for run in self.runs]
        return statistics.median(values) if values else float("nan")

    @property
    def errors(self) -> int:
        return sum(run.failed + run.grpc_errors for run in self.runs)

    def as_dict(self) -> dict:
        return {
            "target": self.target,
            "workload": self.workload,
            "level": self.level,
            "load": str(load_for(self.level)),
            "median_requests_per_s": self.median("requests_per_s"),
            "median_messages_per_s": self.median("messages_per_s"),
            "median_p50_ms": self.median("p50_ms"),
            "median_p99_ms": self.median("p99_ms"),
            "errors": self.errors,
            "runs": [run.as_dict() for run in self.runs],
        }


def process_tree_cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of ``pid`` and its child processes (``--workers``), from /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    pending, seen = [pid], set()
    try:
        while pending:
            current = pending.pop()
            if current in seen:
                continue
            seen.add(current)
            fields = Path(f"/proc/{current}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
            for task in Path(f"/proc/{current}/task").iterdir():
                children = (task / "children").read_text().split()
                pending.extend(int(c) for c in children)
    except (OSError, ValueError, IndexError):
        return None if not seen else total
    return total


class Harness:
    """Owns the running servers (stopped on close) and the validated response sizes."""

    def __init__(self, log_dir: Path, duration_s: float, verbose: bool = True) -> None:
        self.log_dir = log_dir
        self.duration_s = duration_s
        self.verbose = verbose
        self.servers: dict[str, RunningServer] = {}
        self.checks: dict[tuple[str, str], CheckResult] = {}
        self.failures: dict[tuple[str, str], str] = {}
        self._stack = ExitStack()

    def log(self, message: str) -> None:
        if self.verbose:
            print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)

    def start(self, target: Target, model_names: list[str]) -> RunningServer | None:
        """Start and wait for readiness; on failure log why and return None (the run goes on)."""
        self.log(f"starting {target.name}: {target.describe()}")
        try:
            server = self._stack.enter_context(RunningServer(target, model_names, self.log_dir))
        except Exception as exc:  # noqa: BLE001 -- one broken target must not sink the others
            self.log(f"{target.name} unavailable: {exc}")
            self.failures[(target.name, "start")] = str(exc)
            return None
        self.servers[target.name] = server
        return server

    def validate(self, target_name: str, workload: Workload) -> bool:
        """Real gRPC call with the h2load bytes; records the good response size."""
        server = self.servers[target_name]
        try:
            if workload.streaming:
                result = check_stream(
                    server.port, workload.request, workload.expected, workload.frames, server.target.stream_wrapped
                )
            else:
                result = check_unary(server.port, workload.request, workload.expected)
        except Exception as exc:  # noqa: BLE001 -- reported, and the cell is skipped
            self.failures[(target_name, workload.name)] = str(exc)
            self.log(f"check failed: {target_name} {workload.name}: {exc}")
            return False
        self.checks[(target_name, workload.name)] = result
        return True

    def run(
        self, targets: list[str], workloads: list[Workload], levels: list[int], repeats: int, alternate: bool = False
    ) -> dict[tuple[str, str, int], Cell]:
        """Interleaved matrix; cells whose check failed are left out (and listed in failures).

        ``alternate``: every other repeat measures the targets in reverse order (A B, B A, ...),
        so a drift in the machine's load does not always favour the target measured first.
        """
        cells: dict[tuple[str, str, int], Cell] = {}
        valid = [
            (name, workload)
            for workload in workloads
            for name in targets
            if name in self.servers and ((name, workload.name) in self.checks or self.validate(name, workload))
        ]
        for repeat in range(repeats):
            for level in levels:
                for name, workload in (valid[::-1] if alternate and repeat % 2 else valid):
                    cell = cells.setdefault((name, workload.name, level), Cell(name, workload.name, level))
                    cell.runs.append(self.measure(name, workload, level))
                    run = cell.runs[-1]
                    self.log(
                        f"rep {repeat + 1}/{repeats} {name:>10} {workload.name:<16} c={level:<4} "
                        f"{run.requests_per_s:9.0f} req/s {run.messages_per_s:9.0f} msg/s "
                        f"p50 {run.p50_ms:7.2f} ms p99 {run.p99_ms:7.2f} ms errors {run.failed + run.grpc_errors}"
                    )
        return cells

    def measure(
        self, target_name: str, workload: Workload, level: int, duration_s: float | None = None, steady_after_s: float = 0.0
    ) -> H2LoadResult:
        server = self.servers[target_name]
        if not server.alive():
            raise RuntimeError(f"{target_name} died; see {server.log_path}")
        load = load_for(level)
        check = self.checks[(target_name, workload.name)]
        warm_up(server.port, workload.rpc_path, workload.body, load, requests=max(50, 400 // workload.frames))
        cpu_before = process_tree_cpu_s(server.proc.pid) if server.proc is not None else None
        result = run_h2load(
            server.port,
            workload.rpc_path,
            workload.body,
            load,
            duration_s or self.duration_s,
            response_bytes=check.response_bytes,
            frames=workload.frames,
            steady_after_s=steady_after_s,
        )
        if cpu_before is not None and result.succeeded:
            cpu_after = process_tree_cpu_s(server.proc.pid)
            if cpu_after is not None:
                result.server_cpu_us_per_request = (cpu_after - cpu_before) / result.succeeded * 1e6
        return result

    def recheck(self, workloads: list[Workload]) -> dict[str, bool]:
        """After the load: every server still alive and still answering correctly."""
        status = {}
        for name in self.servers:
            ok = self.servers[name].alive()
            for workload in workloads:
                if (name, workload.name) in self.checks and not workload.streaming:
                    ok = ok and self.validate(name, workload)
            status[name] = ok
        return status

    def close(self) -> None:
        self._stack.close()
        self.servers.clear()

    def __enter__(self) -> Harness:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def save_result(out_dir: Path, prefix: str, result: dict, cells: dict[tuple[str, str, int], Cell],
                failures: dict, healthy: dict[str, bool]) -> int:
    """Write ``result`` to ``out_dir/<prefix>-<time>.json`` and say where; the exit code: 1 if
    any request failed, a target failed its check, or a server was unhealthy after the load."""
    out_dir.mkdir(parents=True, exist_ok=True)
    out_file = out_dir / f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out_file.write_text(json.dumps(result, indent=2, default=str))
    print(f"\nwrote {out_file}")
    errors = sum(c.errors for c in cells.values())
    return 1 if errors or failures or not all(healthy.values()) else 0


def ab_arguments(description: str, *, levels: str, repeats: int, duration: float) -> argparse.ArgumentParser:
    """The options every interleaved A/B benchmark takes (levels, repeats, duration, out)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--levels", default=levels, help="in-flight levels, comma-separated")
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--duration", type=float, default=duration, help="seconds per measurement")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "bench-results")
    return parser
