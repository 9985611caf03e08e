"""Entry point of ``make bench``: every benchmark in one go, then one markdown report.

Prepares what the benchmarks need outside lockgate's own venv (h2load, the MLServer peer's
``.venv-mlserver``), runs each benchmark as a subprocess (its progress streams to the console),
collects the JSON each one writes into a fresh ``bench-results/run-<timestamp>/`` folder, and
prints -- and writes to ``--results`` (default ``benchmarks/RESULTS.md``) -- the command, the
machine's load average, every table, and one targets table with the ratios from this run.

    .venv/bin/python benchmarks/run_all.py            # full run, ~12-15 min on 2 cores
    .venv/bin/python benchmarks/run_all.py --quick    # smoke run, ~4 min
    .venv/bin/python benchmarks/run_all.py --only dataplane,governance

Order: data plane (lockgate / thin / MLServer, streaming, compute-heavy batching), governance
on/off end to end, governance kernel micro-benchmark, telemetry cost, the in-process pipeline
cost breakdown, the outcome ledger and feedback. Exit status 1 if any benchmark failed or any
request errored.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.h2load import ensure_h2load
from benchmarks.servers import MLSERVER_BIN, MLSERVER_RUNTIME_DIR, REPO_ROOT

BENCH_DIR = REPO_ROOT / "benchmarks"
ALL = ("dataplane", "governance", "kernel", "telemetry", "pipeline", "outcomes")


def ensure_mlserver_venv() -> None:
    """Create .venv-mlserver (MLServer 1.7 + ORT) once; it never touches lockgate's venv."""
    if MLSERVER_BIN.exists():
        return
    venv = MLSERVER_BIN.parent.parent
    print(f"creating {venv} for the MLServer peer ...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, "-r", str(MLSERVER_RUNTIME_DIR / "requirements.txt")], check=True)


def loadavg() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def plan(args: argparse.Namespace, out: Path) -> dict[str, list[str]]:
    """The command line of each benchmark (quick mode: fewer repeats, shorter runs)."""
    py = sys.executable
    q = args.quick
    return {
        "dataplane": [py, str(BENCH_DIR / "bench_dataplane.py"), "--out", str(out), *(["--quick"] if q else []), *args.dataplane_arg],
        "governance": [py, str(BENCH_DIR / "bench_governance.py"), "--out", str(out),
                       "--repeats", "1" if q else "30", "--duration", "2" if q else "1"],
        "kernel": [py, str(BENCH_DIR / "bench_kernel.py"), "--repeats", "3" if q else "7", "--json", str(out / "kernel.json")],
        "telemetry": [py, str(BENCH_DIR / "bench_telemetry.py"), "--out", str(out),
                      "--repeats", "1" if q else "30", "--duration", "2" if q else "1"],
        "pipeline": [py, str(BENCH_DIR / "bench_pipeline.py"), "--requests", "4000" if q else "20000",
                     "--repeats", "1" if q else "3", "--json", str(out / "pipeline.json")],
        "outcomes": [py, str(BENCH_DIR / "bench_outcomes.py"), "--out", str(out),
                     "--repeats", "1" if q else "10", "--duration", "2",
                     *(["--ingest-rows", "49152", "--no-postgres"] if q else [])],
    }


def run_one(name: str, cmd: list[str]) -> tuple[int, str, float]:
    """Run one benchmark, streaming its output, and keep the output for the report."""
    print(f"\n=== [{time.strftime('%H:%M:%S')}] {name}: {shlex.join(cmd)}  (load average {loadavg()})\n", flush=True)
    started = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    assert proc.stdout is not None
    for line in proc.stdout:
        print(line, end="", flush=True)
        lines.append(line)
    return proc.wait(), "".join(lines), time.monotonic() - started


def _latest(out: Path, prefix: str) -> dict[str, Any] | None:
    files = sorted(out.glob(f"{prefix}-*.json"))
    return json.loads(files[-1].read_text()) if files else None


def _load(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.exists() else None


def _met(value: float, bound: float, higher: bool) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    ok = value >= bound if higher else value <= bound
    return "yes" if ok else "**no**"


def _table_after(text: str, marker: str) -> str:
    """The markdown block of a benchmark's console output that starts at ``marker``."""
    start = text.find(marker)
    if start < 0:
        return ""
    block = []
    for line in text[start:].splitlines():
        if line.startswith("wrote ") or line.startswith("["):
            break
        block.append(line)
    return "\n".join(block).strip()


def targets_table(out: Path) -> tuple[list[str], list[tuple[str, str, str, str]]]:
    """One row per target of issues 2, 3 and 5: (goal, value, target, met)."""
    rows: list[tuple[str, str, str, str]] = []
    dp = _latest(out, "dataplane")
    if dp:
        for goal in dp["goals"]:
            sign = "≥" if goal["direction"] == ">=" else "≤"
            rows.append((f"data plane: {goal['description']}", f"{goal['value']:.2f}", f"{sign} {goal['bound']}",
                         _met(goal["value"], goal["bound"], goal["direction"] == ">=")))
    gov = _latest(out, "governance")
    if gov:
        for level, goal in gov["goals"].items():
            rows.append((f"governance: on / off req/s ({level})", f"{goal['ratio']:.3f}", "≥ 0.95", _met(goal["ratio"], 0.95, True)))
            if not math.isnan(goal.get("cpu_ratio", math.nan)):
                rows.append((f"governance: on / off from server CPU per request ({level})", f"{goal['cpu_ratio']:.3f}", "≥ 0.95",
                             _met(goal["cpu_ratio"], 0.95, True)))
    kernel = _load(out / "kernel.json")
    if kernel:
        for k in kernel["kernel"]:
            rows.append((f"governance: {k['work']} ns/value (numpy {k['numpy_ns_per_value']:.1f})", f"{k['ns_per_value']:.2f}", "≤ 10",
                         _met(k["ns_per_value"], 10.0, False)))
        us = kernel["inspect_observe_ns"] / 1000
        rows.append(("governance: added CPU per batch-1 request (inspect + observe_outputs), µs", f"{us:.2f}", "≤ 15", _met(us, 15.0, False)))
        rows.append(("governance: KLL feed ns/value (off the request path; report only)", f"{kernel['kll_feed_ns_per_value']:.1f}", "report", "-"))
    tel = _latest(out, "telemetry")
    if tel:
        for key, goal in tel.get("goals", {}).items():
            rows.append((f"telemetry: throughput cost of {key} vs off", f"{goal['cost']:+.1%}", f"≤ {goal['bound']:.0%}",
                         "n/a" if goal["met"] is None else ("yes" if goal["met"] else "**no**")))
            cpu_cost = goal.get("cpu_cost", math.nan)
            if not math.isnan(cpu_cost):
                rows.append((f"telemetry: cost of {key} vs off from server CPU per request", f"{cpu_cost:+.1%}",
                             f"≤ {goal['bound']:.0%}", _met(cpu_cost, goal["bound"], False)))
    outcomes = _latest(out, "outcomes")
    if outcomes:
        for level, goal in outcomes["goals"].items():
            rows.append((f"outcomes: ledger on / off req/s ({level})", f"{goal['ratio']:.3f}", "≥ 0.95", _met(goal["ratio"], 0.95, True)))
        for backend, r in outcomes.get("ingestion", {}).items():
            if "labels_per_s" in r:
                bound = "≥ 20000" if backend == "sqlite" else "report"
                rows.append((f"outcomes: feedback labels/s, one stream ({backend})", f"{r['labels_per_s']:,.0f}", bound,
                             _met(r["labels_per_s"], 20000, True) if backend == "sqlite" else "-"))
        sqlite_result = outcomes.get("ingestion", {}).get("sqlite", {})
        if "bytes_per_row_unlabeled" in sqlite_result:
            value = sqlite_result["bytes_per_row_unlabeled"]
            rows.append(("outcomes: ledger bytes per prediction row (SQLite)", f"{value:.1f}", "≤ 128", _met(value, 128, False)))
    lines = ["| goal | value (this run) | target | met |", "|---|---:|---:|---|"]
    lines += [f"| {g} | {v} | {t} | {m} |" for g, v, t, m in rows]
    return lines, rows


def report(args: argparse.Namespace, command: str, out: Path, outputs: dict[str, tuple[int, str, float]],
           load_start: str, load_end: str, wall_s: float) -> str:
    lines = [
        "# lockgate benchmark results",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {os.cpu_count()} CPUs, {platform.platform()}, Python {platform.python_version()}; shared with other "
        f"engineers' work. Load average (1/5/15 min) at start: {load_start}; at end: {load_end}. "
        f"Wall time {wall_s / 60:.1f} min. Raw JSON: `{out.relative_to(REPO_ROOT)}/`.",
        "",
        "Every ratio below comes from this one run (servers measured interleaved, medians of repeats). "
        "Absolute numbers on this noisy 2-core machine are not comparable across runs.",
        "",
        "## Targets",
        "",
        *targets_table(out)[0],
    ]
    dp = _latest(out, "dataplane")
    if dp:
        lines += ["", "## Data plane (issue 2)", "", dp["markdown"]]
    if "governance" in outputs:
        lines += ["", "## Governance end to end (issue 3)", "", _table_after(outputs["governance"][1], "Governance on vs off")]
    if "kernel" in outputs:
        lines += ["", "## Governance kernel (issue 3)", "", "```", _table_after(outputs["kernel"][1], "governance benchmark:"), "```"]
    if "telemetry" in outputs:
        text = outputs["telemetry"][1]
        hooks = next((line for line in text.splitlines() if line.startswith("per-request hook cost")), "")
        lines += ["", "## Telemetry cost (issue 5)", "", f"`{hooks}`", "", _table_after(text, "| config |")]
    if "pipeline" in outputs:
        lines += ["", "## Python data-plane cost, no gRPC (profiling aid)", "", _table_after(outputs["pipeline"][1], "Python data-plane cost")]
    outcomes = _latest(out, "outcomes")
    if outcomes:
        lines += ["", "## Outcome governance (issue 17)", "", outcomes["markdown"]]
    failed = {name: rc for name, (rc, _, _) in outputs.items() if rc != 0}
    lines += ["", "## Benchmark exit status", "",
              "| benchmark | exit | wall s |", "|---|---:|---:|",
              *[f"| {name} | {rc} | {wall:.0f} |" for name, (rc, _, wall) in outputs.items()]]
    if failed:
        lines += ["", f"Non-zero exits: {failed} (1 = a target missed or a request errored; see the tables)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 repeat, short runs")
    parser.add_argument("--only", default=",".join(ALL), help="comma list of " + ",".join(ALL))
    parser.add_argument("--dataplane-arg", action="append", default=[], help="extra argument for bench_dataplane.py (repeatable)")
    parser.add_argument("--results", type=Path, default=BENCH_DIR / "RESULTS.md", help="markdown report to write")
    args = parser.parse_args(argv)
    selected = [name for name in args.only.split(",") if name]
    unknown = set(selected) - set(ALL)
    if unknown:
        raise SystemExit(f"unknown benchmarks {sorted(unknown)}; choose from {ALL}")
    command = shlex.join(["python", "benchmarks/run_all.py", *(argv if argv is not None else sys.argv[1:])])
    ensure_h2load()
    if "dataplane" in selected and "mlserver" in " ".join(args.dataplane_arg + ["mlserver"]):
        ensure_mlserver_venv()
    out = REPO_ROOT / "bench-results" / f"run-{time.strftime('%Y%m%d-%H%M%S')}"
    out.mkdir(parents=True, exist_ok=True)
    load_start = loadavg()
    started = time.monotonic()
    outputs: dict[str, tuple[int, str, float]] = {}
    commands = plan(args, out)
    for name in selected:
        outputs[name] = run_one(name, commands[name])
    text = report(args, command, out, outputs, load_start, loadavg(), time.monotonic() - started)
    print("\n" + text)
    args.results.write_text(text)
    (out / "RESULTS.md").write_text(text)
    print(f"wrote {args.results}")
    return 0 if all(rc == 0 for rc, _, _ in outputs.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
