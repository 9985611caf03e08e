"""Drift window close and evaluation time, before vs after, in one run (issue 16).

For each implementation -- this checkout ("after") and a baseline source tree ("before",
by default ``main`` exported and built here) -- a child process builds a reference profile
of F features (one in eight categorical), feeds 10,000 rows into a GovernanceEngine in
batches of 100, then times

* ``close``: ``engine.close_window()`` -- take the window (cut, buffered rows into the
  sketches), evaluate it against the profile, no persistence;
* ``evaluate``: ``drift.evaluate(state, profile, config)`` alone on the same window;
* ``inspect``: the request path, ``engine.inspect`` of one row, per call (what the window
  bookkeeping adds per request), best of 5 x 20,000 calls.

Times are the child's thread CPU time (the machine is shared; wall time would count other
processes' turns).

Implementations alternate within every repeat, so a slow moment on the shared machine hits
both; figures are medians of the repeats and ratios after/before.

    .venv/bin/python benchmarks/bench_drift_window.py [--features 32,1024] [--repeats 5] [--baseline-ref main]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent

CHILD = r"""
import json, sys, time
import numpy as np
from lockgate.governance.config import GovernanceConfig
from lockgate.governance.drift import evaluate
from lockgate.governance.engine import GovernanceEngine
from lockgate.governance.profile import build_profile

F, ROWS = int(sys.argv[1]), 10_000
rng = np.random.default_rng(F)
def data(n):
    x = rng.normal(size=(n, F)).astype(np.float32)
    x[:, ::8] = rng.integers(0, 6, size=(n, x[:, ::8].shape[1]))
    return x
cat = list(range(0, F, 8))
profile = build_profile({"x": data(20_000)}, categorical_features={"x": cat}, model="m", version="1")
config = GovernanceConfig.model_validate({"drift": {"window_rows": 10**9, "persist": False}, "payload_log": {"enabled": False},
                                          "sampling": {"rate": 0.0}})
engine = GovernanceEngine("m", "1", config, ["x"], profile, background=False)
live = data(ROWS)
live[:, 1] += 0.5
def fill():
    for i in range(0, ROWS, 100):
        engine.inspect({"x": live[i:i + 100]}, "r")
fill(); engine.close_window()  # warm caches (profile CDFs, imports)
fill()
t = time.thread_time(); report = engine.close_window(); close = time.thread_time() - t
fill()
state = engine.take_window()
t = time.thread_time(); evaluate(state, profile, config.drift); ev = time.thread_time() - t
one = live[:1].copy()
calls = 20_000
inspect_us = float("inf")
for _ in range(5):  # thread CPU time, best of 5: the machine is shared
    t = time.thread_time()
    for _ in range(calls):
        engine.inspect({"x": one}, "")
    inspect_us = min(inspect_us, (time.thread_time() - t) / calls * 1e6)
print(json.dumps({"close_ms": close * 1e3, "evaluate_ms": ev * 1e3, "inspect_us": inspect_us, "status": report.status}))
"""


def build_baseline(ref: str, cache: Path) -> Path:
    """Export ``ref`` and build its extensions once (cached by commit)."""
    sha = subprocess.run(["git", "rev-parse", ref], cwd=REPO_ROOT, capture_output=True, text=True, check=True).stdout.strip()
    target = cache / f"baseline-{sha[:12]}"
    if (target / ".built").exists():
        return target
    target.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "archive", "--format=tar", sha], cwd=REPO_ROOT, capture_output=True, check=True).stdout
    with tempfile.TemporaryFile() as handle:
        handle.write(archive)
        handle.seek(0)
        with tarfile.open(fileobj=handle) as tar:
            tar.extractall(target, filter="data")
    subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace", "-q"], cwd=target, check=True,
                   capture_output=True)  # fmt: skip
    (target / ".built").touch()
    return target


def measure(src: Path, features: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(src / "src")}
    out = subprocess.run([sys.executable, "-c", CHILD, str(features)], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--features", default="32,1024")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--baseline-ref", default="main", help="git ref of the 'before' implementation")
    parser.add_argument("--baseline", type=Path, default=None, help="a built source tree instead of --baseline-ref")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "bench-results")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    before = args.baseline or build_baseline(args.baseline_ref, args.out)
    impls = {"before": before, "after": REPO_ROOT}
    results: dict[tuple[str, int], list[dict]] = {}
    for repeat in range(args.repeats):
        for features in [int(f) for f in args.features.split(",")]:
            order = list(impls) if repeat % 2 == 0 else list(reversed(impls))
            for name in order:
                results.setdefault((name, features), []).append(measure(impls[name], features))
    lines = ["| features | metric | before | after | after / before |", "|---:|---|---:|---:|---:|"]
    summary = {}
    for features in [int(f) for f in args.features.split(",")]:
        for metric, unit in (("close_ms", "ms"), ("evaluate_ms", "ms"), ("inspect_us", "µs")):
            b = statistics.median(r[metric] for r in results[("before", features)])
            a = statistics.median(r[metric] for r in results[("after", features)])
            lines.append(f"| {features:,} | {metric.rsplit('_', 1)[0]} ({unit}, median of {args.repeats}) | {b:,.2f} | {a:,.2f} | {a / b:.2f} |")
            summary[f"{features}/{metric}"] = {"before": b, "after": a, "ratio": a / b}
    print(f"\nDrift window close / evaluation, 10,000 rows, before = {before}, after = this checkout\n")
    print("\n".join(lines))
    (args.out / "drift_window.json").write_text(json.dumps({"summary": summary, "runs": {f"{k[0]}/{k[1]}": v for k, v in results.items()}}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
