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

* ``ingest``: the 10,000 rows through ``engine.inspect`` in batches of 100 (the kernel's
  validation, bins and sketch buffers), so ``ingest + close`` is the whole window's cost.

The peer, in the same run: **whylogs** (``whylogs==1.6.4``, in a virtual environment of its own,
``.venv-peer``, which the script creates with pip when missing; ``--no-peer`` skips it) on the
same rows as a pandas DataFrame (categorical columns as integers): ``why.log(window)`` is its
ingest (profiles with KLL and frequent-items sketches, as lockgate's), and
``calculate_drift_scores(target_view, reference_view)`` its evaluation (KS from the KLL
sketches, chi-squared on frequent items, one uncorrected p-value per column); whylogs has no
separate close, so its ``close`` row is profile + drift scores.

Times are the child's thread CPU time (the machine is shared; wall time would count other
processes' turns).

Implementations alternate within every repeat, so a slow moment on the shared machine hits
both; figures are medians of the repeats and ratios after/before.

    .venv/bin/python benchmarks/bench_drift_window.py [--features 32,1024] [--repeats 5] [--baseline-ref main] [--no-peer]
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

# Both children's rows: F features, one in eight categorical (codes 0..5), the same seed.
DATA = r"""
import sys
import numpy as np
F, ROWS = int(sys.argv[1]), 10_000
rng = np.random.default_rng(F)
def data(n):
    x = rng.normal(size=(n, F)).astype(np.float32)
    x[:, ::8] = rng.integers(0, 6, size=(n, x[:, ::8].shape[1]))
    return x
"""

CHILD = DATA + r"""
import json, time
from lockgate.governance.config import GovernanceConfig
from lockgate.governance.drift import evaluate
from lockgate.governance.engine import GovernanceEngine
from lockgate.governance.profile import build_profile

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
t = time.thread_time(); fill(); ingest = time.thread_time() - t
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
print(json.dumps({"close_ms": close * 1e3, "evaluate_ms": ev * 1e3, "ingest_ms": ingest * 1e3, "inspect_us": inspect_us,
                  "status": report.status}))
"""

# The same data (same generator and seed) through whylogs: profile the window, then drift scores.
PEER_CHILD = DATA + r"""
import json, logging, time
import pandas as pd
import whylogs as why
from whylogs.viz.drift.column_drift_algorithms import calculate_drift_scores
logging.disable(logging.WARNING)
def frame(x):
    df = pd.DataFrame(x, columns=[f"f{j}" for j in range(F)])
    for j in range(0, F, 8):
        df[f"f{j}"] = df[f"f{j}"].astype(np.int64)
    return df
reference = why.log(frame(data(20_000))).view()
live = data(ROWS)
live[:, 1] += 0.5
window = frame(live)
calculate_drift_scores(target_view=why.log(window).view(), reference_view=reference)  # warm up
t = time.thread_time(); view = why.log(window).view(); ingest = time.thread_time() - t
t = time.thread_time(); scores = calculate_drift_scores(target_view=view, reference_view=reference, with_thresholds=True)
ev = time.thread_time() - t
drift = sorted(k for k, v in scores.items() if v and v.get("drift_category") == "DRIFT")
print(json.dumps({"close_ms": (ingest + ev) * 1e3, "evaluate_ms": ev * 1e3, "ingest_ms": ingest * 1e3, "drifted": drift}))
"""
PEER_REQUIREMENTS = ["whylogs==1.6.4", "pandas", "scipy"]


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


def peer_python(venv: Path) -> Path:
    """whylogs' interpreter: ``venv`` (created with pip on first use; whylogs pins its own
    dependencies, so it stays out of lockgate's environment)."""
    python = venv / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", *PEER_REQUIREMENTS], check=True)
    return python


def measure(impl: Path, features: int) -> dict:
    """``impl``: a lockgate source tree, or the peer's interpreter."""
    if impl.name.startswith("python"):
        command, env = [str(impl), "-c", PEER_CHILD, str(features)], dict(os.environ)
    else:
        command, env = [sys.executable, "-c", CHILD, str(features)], {**os.environ, "PYTHONPATH": str(impl / "src")}
    out = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--features", default="32,1024")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--baseline-ref", default="main", help="git ref of the 'before' implementation")
    parser.add_argument("--baseline", type=Path, default=None, help="a built source tree instead of --baseline-ref")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "bench-results")
    parser.add_argument("--peer-venv", type=Path, default=REPO_ROOT / ".venv-peer", help="whylogs' virtual environment")
    parser.add_argument("--no-peer", action="store_true", help="skip whylogs")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    before = args.baseline or build_baseline(args.baseline_ref, args.out)
    impls = {"before": before, "after": REPO_ROOT}
    if not args.no_peer:
        impls["whylogs"] = peer_python(args.peer_venv)
    results: dict[tuple[str, int], list[dict]] = {}
    for repeat in range(args.repeats):
        for features in [int(f) for f in args.features.split(",")]:
            order = list(impls) if repeat % 2 == 0 else list(reversed(impls))
            for name in order:
                results.setdefault((name, features), []).append(measure(impls[name], features))
    peer = "whylogs" in impls
    lines = ["| features | metric | before | after | after / before |" + (" whylogs 1.6.4 | after / whylogs |" if peer else ""),
             "|---:|---|---:|---:|---:|" + ("---:|---:|" if peer else "")]
    summary = {}
    for features in [int(f) for f in args.features.split(",")]:
        for metric, unit in (("ingest_ms", "ms"), ("close_ms", "ms"), ("evaluate_ms", "ms"), ("inspect_us", "µs")):
            b = statistics.median(r[metric] for r in results[("before", features)])
            a = statistics.median(r[metric] for r in results[("after", features)])
            line = f"| {features:,} | {metric.rsplit('_', 1)[0]} ({unit}, median of {args.repeats}) | {b:,.2f} | {a:,.2f} | {a / b:.2f} |"
            summary[f"{features}/{metric}"] = {"before": b, "after": a, "ratio": a / b}
            if peer:
                runs = [r[metric] for r in results[("whylogs", features)] if metric in r]
                w = statistics.median(runs) if runs else None
                line += " - | - |" if w is None else f" {w:,.2f} | {a / w:.2f} |"
                summary[f"{features}/{metric}"].update(whylogs=w, ratio_whylogs=None if w is None else a / w)
            lines.append(line)
    print(f"\nDrift window close / evaluation, 10,000 rows, before = {before}, after = this checkout"
          + (", whylogs = why.log + calculate_drift_scores on the same rows" if peer else "") + "\n")
    print("\n".join(lines))
    (args.out / "drift_window.json").write_text(json.dumps({"summary": summary, "runs": {f"{k[0]}/{k[1]}": v for k, v in results.items()}}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
