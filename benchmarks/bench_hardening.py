"""The hardened request path against the code before it, side by side in one run (issue 14).

Two lockgate servers on the same repository copy -- the batch-1 ``mlp`` model with a governed
input (a min/max rule on each of its 32 features, 1% payload sampling, a reference profile) --
differing only in their code:

* ``before`` -- a ``git worktree`` of ``--baseline`` (default: the commit this branch started
  from), its extensions built in place, run by this venv's Python with its ``src`` first on
  ``PYTHONPATH``;
* ``after``  -- this working tree.

What ``after`` adds on every request: the undecodable-message check, the drain gate and its
in-flight count, the codec's rank / element / BYTES / output-size checks, the governed-width
and NaN/Inf checks, the large-payload test. Measured with h2load at 1 and 128 in flight,
interleaved (repeat -> level -> target, the order reversed every other repeat); after/before
is the median of the per-repeat ratios, from throughput and from server CPU per request.
Goal: the checks cost <= 2% (after/before >= 0.98).

    .venv/bin/python benchmarks/bench_hardening.py [--baseline REF] [--levels 1,128] [--repeats 6] [--duration 3]
"""

from __future__ import annotations

import math
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.bench_governance import governance_section, write_repo
from benchmarks.harness import Cell, Harness, ab_arguments, prepare_workload, save_result
from benchmarks.models import MLP
from benchmarks.servers import LOCKGATE_BIN, REPO_ROOT, install_cleanup, lockgate_target

TARGETS = ("before", "after")
GOAL = 0.98


def default_baseline() -> str:
    """The commit this branch started from: its merge base with main."""
    out = subprocess.run(["git", "merge-base", "HEAD", "main"], cwd=REPO_ROOT, capture_output=True, text=True)
    return out.stdout.strip() or "main"


def baseline_tree(ref: str, where: Path) -> Path:
    """A detached worktree of ``ref`` with its protos and Cython extensions built in place."""
    subprocess.run(["git", "worktree", "add", "--detach", str(where), ref], cwd=REPO_ROOT, check=True,
                   capture_output=True)
    subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=where, check=True,
                   capture_output=True)
    found = subprocess.run([sys.executable, "-c", "import lockgate; print(lockgate.__file__)"], capture_output=True,
                           text=True, env={"PYTHONPATH": str(where / "src")}, check=True).stdout.strip()
    if not found.startswith(str(where)):  # the editable install must not win over PYTHONPATH
        raise RuntimeError(f"the baseline imports lockgate from {found}, not from {where}")
    return where


def drop_tree(where: Path) -> None:
    subprocess.run(["git", "worktree", "remove", "--force", str(where)], cwd=REPO_ROOT, capture_output=True)
    shutil.rmtree(where, ignore_errors=True)


def report(cells: dict[tuple[str, str, int], Cell], levels: list[int]) -> tuple[str, dict]:
    lines = [
        "| code | in flight | req/s (median) | after/before req/s (median of paired repeats) "
        "| server CPU µs/request (median) | after/before from CPU (before µs / after µs, median) | p50 ms | p99 ms | errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    goals = {}
    for level in levels:
        by_target = {t: c for (t, _, lv), c in cells.items() if lv == level}
        before, after = by_target.get("before"), by_target.get("after")
        for name in TARGETS:
            cell = by_target.get(name)
            if cell is None:
                continue
            ratio = cpu_ratio = math.nan
            if name == "after" and before is not None:
                pairs = [a.requests_per_s / b.requests_per_s for a, b in zip(cell.runs, before.runs) if b.requests_per_s]
                cpu = [b.server_cpu_us_per_request / a.server_cpu_us_per_request for a, b in zip(cell.runs, before.runs)
                       if a.server_cpu_us_per_request > 0 and not math.isnan(b.server_cpu_us_per_request)]
                ratio = statistics.median(pairs) if pairs else math.nan
                cpu_ratio = statistics.median(cpu) if cpu else math.nan
                goals[f"c={level}"] = {"ratio": ratio, "paired_ratios": pairs, "cpu_ratio": cpu_ratio,
                                       "cpu_paired_ratios": cpu, "bound": GOAL,
                                       "met": None if math.isnan(ratio) else max(ratio, cpu_ratio) >= GOAL}
            shown = "1 (baseline)" if name == "before" else f"{ratio:.3f}"
            shown_cpu = "1 (baseline)" if name == "before" else f"{cpu_ratio:.3f}"
            lines.append(f"| {name} | {level} | {cell.median('requests_per_s'):,.0f} | {shown} | "
                         f"{cell.median('server_cpu_us_per_request'):.0f} | {shown_cpu} | {cell.median('p50_ms'):.3f} | "
                         f"{cell.median('p99_ms'):.2f} | {cell.errors} |")
    return "\n".join(lines), goals


def main(argv: list[str] | None = None) -> int:
    parser = ab_arguments(__doc__.splitlines()[0], levels="1,128", repeats=6, duration=3.0)
    parser.add_argument("--baseline", default=None, help="git ref of the code before (default: merge base with main)")
    args = parser.parse_args(argv)
    levels = [int(x) for x in args.levels.split(",") if x]
    if not LOCKGATE_BIN.exists():
        print(f"{LOCKGATE_BIN} not found", file=sys.stderr)
        return 2
    ref = args.baseline or default_baseline()
    commit = subprocess.run(["git", "rev-parse", "--short", ref], cwd=REPO_ROOT, capture_output=True, text=True).stdout.strip()
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True).stdout.strip()
    install_cleanup()
    with tempfile.TemporaryDirectory(prefix="bench-hardening-") as tmp:
        work = Path(tmp)
        tree = baseline_tree(ref, work / "baseline")
        try:
            repo = write_repo(work / "repo", governance_section())
            workload = prepare_workload(MLP, repo / MLP.name / "1" / "model.onnx", work)
            with Harness(work / "logs", args.duration) as harness:
                harness.start(lockgate_target(repo, work / "state-before", name="before",
                                              env={"PYTHONPATH": str(tree / "src")}), [MLP.name])
                harness.start(lockgate_target(repo, work / "state-after", name="after"), [MLP.name])
                cells = harness.run([n for n in TARGETS if n in harness.servers], [workload], levels, args.repeats,
                                    alternate=True)
                healthy = harness.recheck([workload])
                failures = {f"{k[0]}/{k[1]}": v for k, v in harness.failures.items()}
        finally:
            drop_tree(tree)
    table, goals = report(cells, levels)
    print(f"\nRequest path before ({commit}) vs after ({head}), {MLP.name} batch-1 unary with a governed input, "
          f"{args.repeats} repeats x {args.duration:g} s\n")
    print(table)
    result = {"baseline": commit, "head": head, "cells": [c.as_dict() for c in cells.values()], "goals": goals,
              "healthy_after": healthy, "failures": failures, "markdown": table}
    return save_result(args.out, "hardening", result, cells, failures, healthy)


if __name__ == "__main__":
    sys.exit(main())
