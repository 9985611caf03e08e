"""Governance end to end: lockgate throughput with governance on vs off, in one run (issue 3).

Two lockgate servers on two repositories holding the same batch-1 ``mlp`` model:

* ``gov-on``  -- config.yaml ``governance:`` with a min/max rule on each of the 32 features,
  NaN/Inf rejected, ``sampling: {rate: 0.01}`` into the rotating payload log, drift windows,
  and a reference profile beside the model (so the kernel also fills the quantile bins);
* ``gov-off`` -- ``governance: {enabled: false}``.

The request payload satisfies every rule (in-range values), as production traffic mostly does.
Measured with h2load, interleaved (repeat -> level -> target, the order of the two targets
reversed every other repeat); on/off is the median of the per-repeat ratios.
Target: gov-on req/s >= 95% of gov-off.

    .venv/bin/python benchmarks/bench_governance.py [--levels 1,32] [--repeats 3] [--duration 4]
"""

from __future__ import annotations

import math
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import yaml

from benchmarks.harness import Cell, Harness, ab_arguments, prepare_workload, save_result
from benchmarks.models import MLP, write_repository
from benchmarks.servers import LOCKGATE_BIN, install_cleanup, lockgate_target
from lockgate.governance.profile import ReferenceProfile, build_profile

TARGETS = ("gov-off", "gov-on")
GOAL = 0.95


def governance_section() -> dict[str, Any]:
    """Per-feature rules on every input feature, 1% payload sampling (issue 3's benchmark)."""
    return {
        "enabled": True,
        "mode": "reject",
        "inputs": {MLP.input_name: {"features": {j: {"min": -10.0, "max": 10.0} for j in range(MLP.input_dim)}}},
        "sampling": {"rate": 0.01},
    }


PROFILE_SCRIPT = """
import sys, numpy as np
from lockgate.governance.profile import ReferenceProfile, build_profile
name, width, model, path = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
reference = np.random.default_rng(1).standard_normal((20_000, width)).astype(np.float32)
build_profile({name: reference}, model=model, version="1").save(path)
"""


def write_repo(root: Path, governance: dict[str, Any], env: dict[str, str] | None = None) -> Path:
    """``env``: build the profile with another lockgate (PYTHONPATH), in the format it reads."""
    repo = write_repository(root, specs=(MLP,))
    config_path = repo / MLP.name / "config.yaml"
    config = yaml.safe_load(config_path.read_text())
    config["governance"] = governance
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    if governance.get("enabled", True):
        path = ReferenceProfile.path_for(repo, MLP.name, "1")
        if env:
            import os
            import subprocess

            subprocess.run([sys.executable, "-c", PROFILE_SCRIPT, MLP.input_name, str(MLP.input_dim), MLP.name, str(path)],
                           env={**os.environ, **env}, check=True)  # fmt: skip
        else:
            reference = np.random.default_rng(1).standard_normal((20_000, MLP.input_dim)).astype(np.float32)
            build_profile({MLP.input_name: reference}, model=MLP.name, version="1").save(path)
    return repo


def report(cells: dict[tuple[str, str, int], Cell], levels: list[int], targets: tuple[str, ...] = TARGETS) -> tuple[str, dict[str, Any]]:
    lines = [
        "| config | in flight | req/s (median) | on/off (median of paired repeats) | server CPU µs/request (median) "
        "| CPU off/on (median of paired repeats) | p50 ms | p99 ms | errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    goals: dict[str, Any] = {}
    for level in levels:
        off = next((c for (t, _, lv), c in cells.items() if t == "gov-off" and lv == level), None)
        base = off.median("requests_per_s") if off else math.nan
        for name in targets:
            cell = next((c for (t, _, lv), c in cells.items() if t == name and lv == level), None)
            if cell is None:
                continue
            rps = cell.median("requests_per_s")
            # The median of the per-repeat ratios: each repeat measures on and off back to back
            # (in alternating order), so a slow minute on the shared machine hits both alike.
            pairs = [r.requests_per_s / o.requests_per_s for r, o in zip(cell.runs, off.runs)] if off else []
            ratio = statistics.median(pairs) if pairs and all(o.requests_per_s for o in off.runs) else math.nan
            # The same from server CPU per request: off/on is the throughput ratio a CPU-bound
            # server would show, with less of the shared machine's noise.
            cpu_pairs = [o.server_cpu_us_per_request / r.server_cpu_us_per_request
                         for r, o in zip(cell.runs, off.runs) if r.server_cpu_us_per_request > 0] if off else []
            cpu_pairs = [x for x in cpu_pairs if not math.isnan(x)]
            cpu_ratio = statistics.median(cpu_pairs) if cpu_pairs else math.nan
            lines.append(
                f"| {name} | {level} | {rps:,.0f} | {ratio:.3f} | {cell.median('server_cpu_us_per_request'):.0f} | "
                f"{cpu_ratio:.3f} | {cell.median('p50_ms'):.3f} | {cell.median('p99_ms'):.2f} | {cell.errors} |"
            )
            if name == "gov-on":
                goals[f"c={level}"] = {
                    "ratio": ratio,
                    "ratio_of_medians": rps / base if base else math.nan,
                    "paired_ratios": pairs,
                    "cpu_ratio": cpu_ratio,
                    "cpu_paired_ratios": cpu_pairs,
                    "bound": GOAL,
                    "met": None if math.isnan(ratio) else ratio >= GOAL,
                    "p50_added_us": (cell.median("p50_ms") - off.median("p50_ms")) * 1000 if off else math.nan,
                }
    return "\n".join(lines), goals


def main(argv: list[str] | None = None) -> int:
    parser = ab_arguments(__doc__.splitlines()[0], levels="1,32", repeats=3, duration=4.0)
    parser.add_argument("--baseline", type=Path, default=None,
                        help="a built source tree of another lockgate (e.g. main, see bench_drift_window.py): "
                             "adds gov-on-before, the same governed server running that code, in the same run")
    args = parser.parse_args(argv)
    levels = [int(x) for x in args.levels.split(",") if x]
    if not LOCKGATE_BIN.exists():
        print(f"{LOCKGATE_BIN} not found", file=sys.stderr)
        return 2
    install_cleanup()
    with tempfile.TemporaryDirectory(prefix="bench-governance-") as tmp:
        work = Path(tmp)
        repos = {"gov-off": write_repo(work / "repo-off", {"enabled": False}), "gov-on": write_repo(work / "repo-on", governance_section())}
        targets = TARGETS
        envs: dict[str, dict[str, str]] = {}
        if args.baseline is not None:
            targets = (*TARGETS, "gov-on-before")
            envs["gov-on-before"] = {"PYTHONPATH": str(args.baseline.resolve() / "src")}
            repos["gov-on-before"] = write_repo(work / "repo-before", governance_section(), env=envs["gov-on-before"])
        workload = prepare_workload(MLP, repos["gov-on"] / MLP.name / "1" / "model.onnx", work)
        with Harness(work / "logs", args.duration) as harness:
            for name in targets:
                harness.start(lockgate_target(repos[name], work / f"state-{name}", name=name, env=envs.get(name)), [MLP.name])
            cells = harness.run([n for n in targets if n in harness.servers], [workload], levels, args.repeats, alternate=True)
            healthy = harness.recheck([workload])
            failures = {f"{k[0]}/{k[1]}": v for k, v in harness.failures.items()}
            sampled = {
                name: sum(1 for p in (work / f"state-{name}").rglob("*.jsonl") for _ in p.open()) for name in targets
            }
    table, goals = report(cells, levels, targets)
    print(f"\nGovernance on vs off, {MLP.name} batch-1 unary, {args.repeats} repeats x {args.duration:g} s, "
          f"payload records written: {sampled}\n")
    print(table)
    result = {"cells": [c.as_dict() for c in cells.values()], "goals": goals, "healthy_after": healthy,
              "failures": failures, "payload_records": sampled, "governance": governance_section(), "markdown": table}
    return save_result(args.out, "governance", result, cells, failures, healthy)


if __name__ == "__main__":
    sys.exit(main())
