"""Data-plane benchmark: lockgate vs the thin grpc.aio server vs Seldon MLServer 1.7, one run.

Load: h2load sending gRPC frames (batch-1 FP32 [1, 32] requests to the MLP), unary and
streaming, at several concurrency levels, each repeated and interleaved; medians reported.
Then the compute-heavy models: best in-process ORT rows/s over batch sizes vs lockgate with
dynamic batching under high-concurrency batch-1 load (unary, and for heavy_mlp also streaming
clients). xl_mlp is the model of the batching goal; heavy_mlp is reported beside it (on these
2 cores its per-request transport is a third of its compute, see models.py).

    .venv/bin/python benchmarks/bench_dataplane.py            # full run (~6-8 min, 2 cores)
    .venv/bin/python benchmarks/bench_dataplane.py --quick    # smoke run (~1-2 min)

Prints markdown tables and writes bench-results/dataplane-<timestamp>.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make ``benchmarks.*`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.harness import Cell, Harness, Workload, load_for, prepare_workload
from benchmarks.inprocess import sweep
from benchmarks.models import HEAVY_MLP, MLP, XL_MLP, ModelSpec, write_repository
from benchmarks.servers import (
    LOCKGATE_BIN,
    REPO_ROOT,
    install_cleanup,
    lockgate_target,
    mlserver_target,
    thin_target,
)

ALL_TARGETS = ("lockgate", "lockgate-nobatch", "thin", "mlserver")
HEAVY_BATCH_SIZES = (1, 8, 32, 64, 128, 256)
HEAVY_THREADS = (1, 2)  # the in-process ceiling is the best over thread counts and batch sizes
DEFAULT_TARGETS = ("lockgate", "thin", "mlserver")


@dataclass(frozen=True)
class Goal:
    """One target ratio from the issue: ``value`` must be >= (or <=) ``bound``."""

    name: str
    description: str
    value: float
    bound: float
    higher_is_better: bool

    @property
    def met(self) -> bool | None:
        if math.isnan(self.value):
            return None
        return self.value >= self.bound if self.higher_is_better else self.value <= self.bound

    def as_dict(self) -> dict:
        return {
            "name": self.name,
            "description": self.description,
            "value": self.value,
            "bound": self.bound,
            "direction": ">=" if self.higher_is_better else "<=",
            "met": self.met,
        }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="lockgate data-plane benchmark (h2load)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 repeat, 1.5 s runs, fewer levels")
    parser.add_argument(
        "--targets",
        default=",".join(DEFAULT_TARGETS),
        help="comma list of " + ",".join(ALL_TARGETS) + " (lockgate-nobatch: config.yaml without dynamic_batching, "
        "shown in the tables for comparison; goals always use lockgate)",
    )
    parser.add_argument("--workers", type=int, default=1, help="processes per server (lockgate, thin; MLServer: see below)")
    parser.add_argument(
        "--mlserver-parallel-workers",
        type=int,
        default=None,
        help="MLServer parallel_workers (default: 0 for --workers 1 -- inference in the gRPC process, "
        "its fastest single-process mode -- else --workers)",
    )
    parser.add_argument(
        "--scale-workers",
        type=int,
        default=None,
        help="after the one-process tables, run lockgate and thin with this many processes and MLServer with "
        "parallel_workers=N at --scale-levels (default: the CPU count when > 1 and --workers is 1; 0 to skip)",
    )
    parser.add_argument("--scale-levels", default="32,128", help="unary concurrency levels of the scale-out run")
    parser.add_argument("--scale-repeats", type=int, default=5, help="repeats of the scale-out run (SO_REUSEPORT "
                        "spreads 8 connections unevenly over the workers, so single runs vary more)")
    parser.add_argument("--levels", default="1,8,32,128", help="unary concurrency levels (requests in flight)")
    parser.add_argument("--stream-levels", default="1,8", help="streaming concurrency levels (concurrent streams)")
    parser.add_argument("--stream-frames", type=int, default=100, help="messages per streaming call")
    parser.add_argument("--heavy-levels", default="512", help="concurrency levels for the compute-heavy model")
    parser.add_argument("--heavy-stream-levels", default="8", help="concurrent ModelStreamInfer streams for the "
                        "compute-heavy model (its batch-1 messages batch the same way; 0 to skip)")
    parser.add_argument("--heavy-stream-frames", type=int, default=64, help="messages per streaming call, compute-heavy model")
    parser.add_argument("--heavy-duration", type=float, default=8.0, help="seconds per h2load run on the compute-heavy model "
                        "(a batch of 128 runs ~0.3 s: short runs are mostly ramp-up)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--duration", type=float, default=3.0, help="seconds per h2load run")
    parser.add_argument("--xl-levels", default="384", help="concurrency levels for xl_mlp (two batches of 128 "
                        "executing and one filling)")
    parser.add_argument("--xl-duration", type=float, default=20.0, help="seconds per h2load run on xl_mlp (a batch of "
                        "128 runs ~1 s; the first responses come only after it)")
    parser.add_argument("--heavy-steady-after", type=float, default=2.0, help="heavy_mlp rows/s are counted after this "
                        "many seconds of each run (a fresh run starts on an empty queue)")
    parser.add_argument("--xl-steady-after", type=float, default=4.0, help="the same for xl_mlp")
    parser.add_argument("--no-heavy", action="store_true", help="skip the compute-heavy models (heavy_mlp and xl_mlp)")
    parser.add_argument("--no-xl", action="store_true", help="skip xl_mlp (~1.1 GB of weights, ~15 s to build)")
    parser.add_argument("--no-stream", action="store_true", help="skip streaming")
    parser.add_argument("--thin-mode", choices=("inline", "executor"), default="inline")
    parser.add_argument("--lockgate-arg", action="append", default=[], help="extra argument for lockgate serve (repeatable)")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "bench-results")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats = 1
        args.duration = 1.5
        args.levels = "1,32"
        args.stream_levels = "8"
        args.heavy_levels = "512"
        args.heavy_duration = 4.0
        args.xl_duration = 8.0
        args.heavy_steady_after = 1.0
        args.xl_steady_after = 3.0
        args.scale_levels = "32"
    if args.scale_workers is None:
        cpus = os.cpu_count() or 1
        args.scale_workers = cpus if cpus > 1 and args.workers == 1 else 0
    return args


def _ints(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def _cell(cells: dict[tuple[str, str, int], Cell], target: str, workload: str, level: int) -> Cell | None:
    return cells.get((target, workload, level))


def _median(cells: dict, target: str, workload: str, level: int, attr: str) -> float:
    cell = _cell(cells, target, workload, level)
    return cell.median(attr) if cell else float("nan")


def _best(cells: dict, target: str, workload: str, levels: list[int], attr: str) -> float:
    values = [v for level in levels if not math.isnan(v := _median(cells, target, workload, level, attr))]
    return max(values) if values else float("nan")


def _ratio(a: float, b: float) -> float:
    return a / b if b and not math.isnan(a) and not math.isnan(b) else float("nan")


def compute_goals(
    cells: dict, levels: list[int], stream_levels: list[int], heavy: dict[str, dict], scale: dict | None = None
) -> list[Goal]:
    high = max(levels)
    unary, stream = f"{MLP.name}-unary", f"{MLP.name}-stream"
    lg_high = _median(cells, "lockgate", unary, high, "requests_per_s")
    goals = [
        Goal(
            "throughput_vs_mlserver",
            f"lockgate / MLServer req/s at c={high} (one process each)",
            _ratio(lg_high, _median(cells, "mlserver", unary, high, "requests_per_s")),
            2.5,
            True,
        ),
        Goal(
            "throughput_vs_thin",
            f"lockgate / thin server req/s at c={high} (one process each)",
            _ratio(lg_high, _median(cells, "thin", unary, high, "requests_per_s")),
            0.90,
            True,
        ),
        Goal(
            "p50_c1_vs_mlserver",
            "lockgate / MLServer p50 latency at c=1",
            _ratio(_median(cells, "lockgate", unary, 1, "p50_ms"), _median(cells, "mlserver", unary, 1, "p50_ms")),
            0.8,
            False,
        ),
        Goal(
            "stream_vs_unary",
            "lockgate best streaming msg/s / best unary req/s",
            _ratio(_best(cells, "lockgate", stream, stream_levels, "messages_per_s"), _best(cells, "lockgate", unary, levels, "requests_per_s")),
            2.0,
            True,
        ),
    ]
    if scale is not None and scale["levels"]:
        n, top = scale["workers"], max(scale["levels"])
        lg_n = _median(cells, scale_name("lockgate", n), unary, top, "requests_per_s")
        goals.append(
            Goal(
                "throughput_vs_thin_scaled",
                f"lockgate / thin server req/s at c={top} ({n} processes each)",
                _ratio(lg_n, _median(cells, scale_name("thin", n), unary, top, "requests_per_s")),
                0.90,
                True,
            )
        )
        # Each server in its best way of using this machine's cores, measured in this run:
        # lockgate with 1 or n processes, MLServer with parallel_workers 0 or n.
        lg_best = max((v for v in (lg_n, _median(cells, "lockgate", unary, top, "requests_per_s")) if not math.isnan(v)),
                      default=float("nan"))
        ml = [v for v in (_median(cells, "mlserver", unary, top, "requests_per_s"),
                          _median(cells, scale_name("mlserver", n), unary, top, "requests_per_s")) if not math.isnan(v)]
        goals.append(
            Goal(
                "throughput_vs_mlserver_best",
                f"lockgate / MLServer req/s at c={top}, each at its best process count here "
                f"(lockgate 1 or {n} processes, MLServer parallel_workers 0 or {n})",
                _ratio(lg_best, max(ml) if len(ml) == 2 else float("nan")),
                2.5,
                True,
            )
        )
    for name, result in heavy.items():
        prefix = "heavy" if name == HEAVY_MLP.name else name
        goals.append(
            Goal(
                f"{prefix}_vs_inprocess",
                f"lockgate (dynamic batching, batch-1 requests) / best in-process ORT rows/s ({name})",
                _ratio(result["lockgate_best_rows_per_s"], result["inprocess_best_rows_per_s"]),
                0.85,
                True,
            )
        )
        if result.get("lockgate_stream_rows_per_s"):
            goals.append(
                Goal(
                    f"{prefix}_stream_vs_inprocess",
                    f"lockgate (dynamic batching, batch-1 messages on ModelStreamInfer) / best in-process ORT rows/s ({name})",
                    _ratio(result["lockgate_stream_best_rows_per_s"], result["inprocess_best_rows_per_s"]),
                    0.85,
                    True,
                )
            )
    return goals


def _fmt(value: float, digits: int = 0) -> str:
    return "n/a" if math.isnan(value) else f"{value:,.{digits}f}"


def markdown_report(
    cells: dict, targets: list[str], levels: list[int], stream_levels: list[int], heavy: dict[str, dict], goals: list[Goal],
    scale: dict | None = None,
) -> str:
    unary, stream = f"{MLP.name}-unary", f"{MLP.name}-stream"
    lines = [
        f"### Unary ModelInfer, {MLP.name} {MLP.layers}, batch-1 (median of repeats)",
        "",
        "| target | in flight (c x m) | req/s | p50 ms | p99 ms | errors |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for level in levels:
        for target in targets:
            cell = _cell(cells, target, unary, level)
            if cell:
                lines.append(
                    f"| {target} | {load_for(level)} | {_fmt(cell.median('requests_per_s'))} | "
                    f"{_fmt(cell.median('p50_ms'), 2)} | {_fmt(cell.median('p99_ms'), 2)} | {cell.errors} |"
                )
    if scale is not None and scale["targets"]:
        n = scale["workers"]
        lines += [
            "",
            f"### Scale-out: unary ModelInfer, {MLP.name}, batch-1, every server using the {os.cpu_count()} cores its own way "
            f"(lockgate and thin: {n} processes on one port; MLServer: one gRPC process + parallel_workers={n})",
            "",
            "| target | in flight (c x m) | req/s | p50 ms | p99 ms | errors |",
            "|---|---|---:|---:|---:|---:|",
        ]
        for level in scale["levels"]:
            for target in scale["targets"]:
                cell = _cell(cells, target, unary, level)
                if cell:
                    lines.append(
                        f"| {target} | {load_for(level)} | {_fmt(cell.median('requests_per_s'))} | "
                        f"{_fmt(cell.median('p50_ms'), 2)} | {_fmt(cell.median('p99_ms'), 2)} | {cell.errors} |"
                    )
    if any(key[1] == stream for key in cells):
        lines += [
            "",
            f"### Streaming ModelStreamInfer, {MLP.name}, batch-1 messages (median of repeats)",
            "",
            "| target | streams (c x m) | msg/s | calls/s | p50 ms per call | errors |",
            "|---|---|---:|---:|---:|---:|",
        ]
        for level in stream_levels:
            for target in targets:
                cell = _cell(cells, target, stream, level)
                if cell:
                    lines.append(
                        f"| {target} | {load_for(level)} | {_fmt(cell.median('messages_per_s'))} | "
                        f"{_fmt(cell.median('requests_per_s'), 1)} | {_fmt(cell.median('p50_ms'), 2)} | {cell.errors} |"
                    )
    for name, result in heavy.items():
        config = result["config"]
        lines += [
            "",
            f"### Compute-heavy {name} {tuple(result['layers'])}: rows/s (median of repeats)",
            "",
            f"Served: {config['runtime'].get('instances', 1)} instance(s) x intra_op_threads="
            f"{config['runtime']['intra_op_threads']}, dynamic batching {config['dynamic_batching']}, "
            f"max_batch_size {config['max_batch_size']}. In-process best: {result['inprocess_best']}.",
            "",
            "| source | batch / in flight | rows/s |",
            "|---|---|---:|",
        ]
        for label, rate in result["inprocess_rows_per_s"].items():
            lines.append(f"| in-process ORT | {label} | {_fmt(rate, 1)} |")
        after, whole = result["steady_after_s"], result["whole_run_rows_per_s"]
        for level, rate in result["lockgate_rows_per_s"].items():
            lines.append(f"| lockgate, dynamic batching, after the first {after:g} s (whole run: "
                         f"{_fmt(whole.get(f'unary {level}', math.nan), 1)}) | batch-1 requests, {load_for(int(level))} | {_fmt(rate, 1)} |")
        for level, rate in result.get("lockgate_stream_rows_per_s", {}).items():
            lines.append(f"| lockgate, dynamic batching, streaming, after the first {after:g} s (whole run: "
                         f"{_fmt(whole.get(f'stream {level}', math.nan), 1)}) | batch-1 messages, {level} streams x "
                         f"{result['stream_frames']} msgs/call | {_fmt(rate, 1)} |")
    lines += ["", "### Targets (ratios from this run)", "", "| goal | value | target | met |", "|---|---:|---:|---|"]
    for goal in goals:
        met = {True: "yes", False: "**no**", None: "n/a"}[goal.met]
        lines.append(
            f"| {goal.description} | {_fmt(goal.value, 2)} | {'≥' if goal.higher_is_better else '≤'} {goal.bound} | {met} |"
        )
    return "\n".join(lines)


def run_heavy(
    harness: Harness, repo: Path, spec: ModelSpec, levels: list[int], repeats: int, seconds_per_size: float,
    duration_s: float, steady_after_s: float, stream_levels: list[int] = (), stream_frames: int = 64,
) -> dict | None:
    """In-process sweep and lockgate under batch-1 load, interleaved per repeat (same noise).

    The in-process ceiling is the best rows/s over batch sizes *and* intra-op thread counts
    (1 and 2), each the median of the repeats, after two untimed runs; lockgate serves with the
    config in models.py and is counted in its steady state too: the rows answered after the
    first ``steady_after_s`` seconds of each run (a fresh h2load run starts on an empty queue,
    and no response leaves before the first full batch has run). The whole-run rate is kept
    beside it.
    """
    if "lockgate" not in harness.servers:
        return None
    model_path = repo / spec.name / "1" / "model.onnx"
    workload = prepare_workload(spec, model_path, harness.log_dir.parent)
    if not harness.validate("lockgate", workload):
        return None
    # The same batch-1 requests over ModelStreamInfer: each message still batches with the others
    # in the dynamic batcher; the transport costs less per message than a unary call does.
    streaming = None
    if stream_levels:
        streaming = prepare_workload(spec, model_path, harness.log_dir.parent, streaming=True, frames=stream_frames)
        if not harness.validate("lockgate", streaming):
            streaming = None
    streamed: dict[int, list[float]] = {level: [] for level in stream_levels} if streaming is not None else {}
    sweeps: dict[int, list[dict[int, float]]] = {t: [] for t in HEAVY_THREADS}
    served: dict[int, list[float]] = {level: [] for level in levels}
    whole: dict[str, list[float]] = {}
    for repeat in range(repeats):
        for threads in HEAVY_THREADS:
            sweeps[threads].append(sweep(model_path, spec.row_shape, threads, HEAVY_BATCH_SIZES, seconds_per_size))
            harness.log(f"rep {repeat + 1}/{repeats} in-process {spec.name} {threads} thr: " + ", ".join(f"b{k}={v:.0f}" for k, v in sweeps[threads][-1].items()))
        for level in levels:
            run = harness.measure("lockgate", workload, level, duration_s, steady_after_s)
            served[level].append(run.steady_requests_per_s)
            whole.setdefault(f"unary {level}", []).append(run.requests_per_s)
            harness.log(f"rep {repeat + 1}/{repeats} lockgate {spec.name} c={level}: {run.steady_requests_per_s:.1f} rows/s "
                        f"after {steady_after_s:g} s ({run.requests_per_s:.1f} whole run) p50 {run.p50_ms:.0f} ms "
                        f"errors {run.failed + run.grpc_errors}")
        for level in streamed:
            run = harness.measure("lockgate", streaming, level, duration_s, steady_after_s)
            streamed[level].append(run.steady_requests_per_s * stream_frames)
            whole.setdefault(f"stream {level}", []).append(run.messages_per_s)
            harness.log(f"rep {repeat + 1}/{repeats} lockgate {spec.name} streaming c={level}: "
                        f"{run.steady_requests_per_s * stream_frames:.1f} rows/s after {steady_after_s:g} s "
                        f"({run.messages_per_s:.1f} whole run) errors {run.failed + run.grpc_errors}")
    inprocess = {
        (threads, size): statistics.median(s[size] for s in sweeps[threads]) for threads in HEAVY_THREADS for size in HEAVY_BATCH_SIZES
    }
    lockgate = {level: statistics.median(values) for level, values in served.items()}
    best = max(inprocess, key=inprocess.__getitem__)
    return {
        "model": spec.name,
        "layers": spec.layers,
        "config": spec.config,
        "inprocess_rows_per_s": {f"{t} thr, batch {b}": v for (t, b), v in inprocess.items()},
        "inprocess_best": f"{best[0]} intra-op thread(s), batch {best[1]}",
        "inprocess_best_rows_per_s": inprocess[best],
        "lockgate_rows_per_s": lockgate,
        "lockgate_best_rows_per_s": max(lockgate.values()),
        "lockgate_stream_rows_per_s": {level: statistics.median(v) for level, v in streamed.items()},
        "lockgate_stream_best_rows_per_s": max((statistics.median(v) for v in streamed.values()), default=float("nan")),
        "stream_frames": stream_frames,
        "steady_after_s": steady_after_s,
        "whole_run_rows_per_s": {key: statistics.median(v) for key, v in whole.items()},
    }


def scale_name(target: str, workers: int) -> str:
    return f"{target}-x{workers}" if target != "mlserver" else f"mlserver-pw{workers}"


def run_scale_out(
    work: Path, repo: Path, mlp_path: Path, workload: Workload, targets: list[str], workers: int, levels: list[int],
    repeats: int, duration: float, thin_mode: str, lockgate_args: tuple[str, ...],
) -> dict:
    """The same unary load with every server using the machine's cores its own way.

    lockgate and thin run ``workers`` processes on one port (SO_REUSEPORT); MLServer, which has
    one gRPC front process, runs ``parallel_workers=workers`` inference processes. Started only
    after the one-process servers are stopped, so each phase has the machine to itself.
    """
    names = {t: scale_name(t, workers) for t in ("lockgate", "thin", "mlserver") if t in targets}
    with Harness(work / "logs-scale", duration) as harness:
        if "lockgate" in names and LOCKGATE_BIN.exists():
            harness.start(
                lockgate_target(repo, work / "state-scale", workers, name=names["lockgate"], extra_args=lockgate_args),
                [MLP.name],
            )
        if "thin" in names:
            harness.start(
                thin_target(mlp_path, MLP.name, workers, thin_mode, MLP.intra_op_threads, name=names["thin"]), [MLP.name]
            )
        if "mlserver" in names:
            harness.start(
                mlserver_target(mlp_path, MLP.name, work / "mlserver-scale", workers, MLP.intra_op_threads,
                                name=names["mlserver"]),
                [MLP.name],
            )
        live = [name for name in names.values() if name in harness.servers]
        cells = harness.run(live, [workload], levels, repeats, alternate=True)
        healthy = harness.recheck([workload])
        return {
            "workers": workers,
            "levels": levels,
            "targets": live,
            "cells": cells,
            "healthy_after": healthy,
            "failures": {f"{k[0]}/{k[1]}": v for k, v in harness.failures.items()},
            "commands": {name: server.target.describe() for name, server in harness.servers.items()},
        }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    install_cleanup()
    targets = [t for t in args.targets.split(",") if t]
    unknown = set(targets) - set(ALL_TARGETS)
    if unknown:
        raise SystemExit(f"unknown targets {sorted(unknown)}; choose from {ALL_TARGETS}")
    levels, stream_levels, heavy_levels = _ints(args.levels), _ints(args.stream_levels), _ints(args.heavy_levels)
    mlserver_workers = args.mlserver_parallel_workers
    if mlserver_workers is None:
        mlserver_workers = 0 if args.workers <= 1 else args.workers
    stamp = time.strftime("%Y%m%d-%H%M%S")
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()

    with tempfile.TemporaryDirectory(prefix="lockgate-bench-") as tmp:
        work = Path(tmp)
        heavy_specs = [] if args.no_heavy else [HEAVY_MLP] + ([] if args.no_xl else [XL_MLP])
        repo = write_repository(work / "repo", (MLP, *heavy_specs))
        mlp_path = repo / MLP.name / "1" / "model.onnx"
        log_dir = work / "logs"
        workloads: list[Workload] = [prepare_workload(MLP, mlp_path, work)]
        if not args.no_stream:
            workloads.append(prepare_workload(MLP, mlp_path, work, streaming=True, frames=args.stream_frames))
        with Harness(log_dir, args.duration) as harness:
            if "lockgate" in targets:
                if LOCKGATE_BIN.exists():
                    harness.start(
                        lockgate_target(repo, work / "state", args.workers, extra_args=tuple(args.lockgate_arg)),
                        [MLP.name] + [spec.name for spec in heavy_specs],
                    )
                else:
                    harness.failures[("lockgate", "start")] = f"{LOCKGATE_BIN} not found"
            if "lockgate-nobatch" in targets and LOCKGATE_BIN.exists():
                plain = write_repository(work / "repo-nobatch", (MLP,), dynamic_batching=False)
                harness.start(
                    lockgate_target(
                        plain, work / "state-nobatch", args.workers, name="lockgate-nobatch", extra_args=tuple(args.lockgate_arg)
                    ),
                    [MLP.name],
                )
            if "thin" in targets:
                harness.start(thin_target(mlp_path, MLP.name, args.workers, args.thin_mode, MLP.intra_op_threads), [MLP.name])
            if "mlserver" in targets:
                harness.start(mlserver_target(mlp_path, MLP.name, work / "mlserver", mlserver_workers, MLP.intra_op_threads), [MLP.name])
            live = [t for t in targets if t in harness.servers]
            cells = harness.run(live, workloads[:1], levels, args.repeats)
            if not args.no_stream:
                cells.update(harness.run(live, workloads[1:], stream_levels, args.repeats))
            heavy: dict[str, dict] = {}
            for spec in heavy_specs:
                if spec is HEAVY_MLP:
                    result = run_heavy(harness, repo, spec, heavy_levels, args.repeats, 0.4 if args.quick else 0.8,
                                       args.heavy_duration, args.heavy_steady_after,
                                       [lv for lv in _ints(args.heavy_stream_levels) if lv > 0], args.heavy_stream_frames)
                else:  # unary only: a 128-row batch takes ~1 s, too coarse for whole-stream accounting
                    result = run_heavy(harness, repo, spec, _ints(args.xl_levels), args.repeats, 0.4 if args.quick else 0.8,
                                       args.xl_duration, args.xl_steady_after)
                if result is not None:
                    heavy[spec.name] = result
            healthy = harness.recheck(workloads[:1])
            failures = {f"{k[0]}/{k[1]}": v for k, v in harness.failures.items()}
            # Server logs live in the temp dir: keep the tail of each for the JSON.
            logs = {p.stem: p.read_text(errors="replace")[-4000:] for p in log_dir.glob("*.log")}
            commands = {name: server.target.describe() for name, server in harness.servers.items()}
        scale = None
        if args.scale_workers > 1:
            scale = run_scale_out(
                work, repo, mlp_path, workloads[0], targets, args.scale_workers, _ints(args.scale_levels),
                1 if args.quick else args.scale_repeats,
                args.duration, args.thin_mode, tuple(args.lockgate_arg),
            )
            failures.update(scale["failures"])
            commands.update(scale["commands"])
            cells.update(scale["cells"])
            healthy.update(scale["healthy_after"])

    goals = compute_goals(cells, levels, stream_levels, heavy, scale)
    report = markdown_report(cells, targets, levels, stream_levels, heavy, goals, scale)
    command = "python benchmarks/bench_dataplane.py " + " ".join(argv if argv is not None else sys.argv[1:])
    header = (
        f"Command: `{command.strip()}` -- {os.cpu_count()} CPUs, workers={args.workers}, "
        f"MLServer parallel_workers={mlserver_workers}, repeats={args.repeats}, {args.duration:g} s per run, "
        f"streaming {args.stream_frames} msgs/call, wall {time.monotonic() - started:.0f} s"
    )
    print()
    print(header)
    print()
    print(report)
    total_errors = sum(cell.errors for cell in cells.values())
    if total_errors or failures or not all(healthy.values()):
        print(f"\nWARNING: errors={total_errors} failures={failures} healthy_after={healthy}")
    result = {
        "command": command.strip(),
        "timestamp": stamp,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "mlserver_parallel_workers": mlserver_workers,
        "server_commands": commands,
        "cells": [cell.as_dict() for cell in cells.values()],
        "heavy": heavy,
        "scale_out": None if scale is None else {k: v for k, v in scale.items() if k != "cells"},
        "goals": [goal.as_dict() for goal in goals],
        "errors": total_errors,
        "failures": failures,
        "healthy_after": healthy,
        "server_log_tails": logs,
        "markdown": header + "\n\n" + report,
    }
    out_file = args.out / f"dataplane-{stamp}.json"
    out_file.write_text(json.dumps(result, indent=2, default=str))
    print(f"\nwrote {out_file}")
    return 1 if total_errors or not all(healthy.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
