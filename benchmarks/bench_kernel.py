"""Governance cost: fused kernel vs numpy, KLL feed, and GovernanceEngine.inspect latency.

Run: ``.venv/bin/python benchmarks/bench_kernel.py [--repeats 7] [--wall]``. Prints ns per value
(median of the repeats) for the same work — validation (NaN/Inf/min/max), moments,
min/max and 20 quantile bins per feature — on 32 float32 features at batch 1 and 1,024.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

from lockgate.governance._kernels import Accumulator
from lockgate.governance.config import DriftConfig, GovernanceConfig
from lockgate.governance.engine import GovernanceEngine
from lockgate.governance.profile import build_profile
from lockgate.governance.sketches import SketchSet

KLL_K = DriftConfig().kll_k  # what a served window uses

F = 32


class NumpyGovernance:
    """The kernel's work written with numpy (vectorised where numpy allows)."""

    def __init__(self, lo: np.ndarray, hi: np.ndarray, edges: list[np.ndarray], k: int = 50) -> None:
        self.lo, self.hi, self.edges, self.k = lo, hi, edges, k
        self.count = np.zeros(F, dtype=np.int64)
        self.nan = np.zeros(F, dtype=np.int64)
        self.inf = np.zeros(F, dtype=np.int64)
        self.below = np.zeros(F, dtype=np.int64)
        self.above = np.zeros(F, dtype=np.int64)
        self.sum = np.zeros(F)
        self.m2 = np.zeros(F)
        self.min = np.full(F, np.inf)
        self.max = np.full(F, -np.inf)
        self.bins = [np.zeros(e.size + 1, dtype=np.int64) for e in edges]

    def update(self, x: np.ndarray) -> int:
        v = x.astype(np.float64)
        nan = np.isnan(v)
        inf = np.isinf(v)
        finite = ~(nan | inf)
        below = v < self.lo
        above = v > self.hi
        bad = nan | inf | below | above
        n_bad = int(bad.sum())
        if n_bad:
            rows, cols = np.nonzero(bad)
            _first = (rows[: self.k], cols[: self.k], v[rows[: self.k], cols[: self.k]])
        self.nan += nan.sum(0)
        self.inf += inf.sum(0)
        self.below += below.sum(0)
        self.above += above.sum(0)
        vf = np.where(finite, v, 0.0)
        nb = finite.sum(0)
        sb = vf.sum(0)
        mean_b = np.divide(sb, nb, out=np.zeros(F), where=nb > 0)
        m2_b = (np.where(finite, v - mean_b, 0.0) ** 2).sum(0)
        na = self.count
        n = na + nb
        mean_a = np.divide(self.sum, na, out=np.zeros(F), where=na > 0)
        delta = mean_b - mean_a
        self.m2 += m2_b + np.divide(delta * delta * na * nb, n, out=np.zeros(F), where=n > 0)
        self.sum += sb
        self.count = n
        self.min = np.minimum(self.min, np.where(finite, v, np.inf).min(0))
        self.max = np.maximum(self.max, np.where(finite, v, -np.inf).max(0))
        for j in range(F):
            col = v[finite[:, j], j]
            self.bins[j] += np.bincount(np.searchsorted(self.edges[j], col, side="right"), minlength=self.bins[j].size)
        return n_bad


CLOCK = time.thread_time_ns  # CPU time of this thread: robust to a shared, oversubscribed host


def _time_per_call(fn, calls: int, repeats: int, *args) -> float:
    """Median over ``repeats`` of the time per ``fn(*args)``. The kernel rows pass the bound
    method and its array directly, so the figure is the call as the engine makes it, without a
    lambda's extra Python frame (~50 ns, a sixth of a batch-1 call)."""
    samples = []
    for _ in range(repeats):
        start = CLOCK()
        for _ in range(calls):
            fn(*args)
        samples.append((CLOCK() - start) / calls)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--wall", action="store_true", help="measure wall time instead of thread CPU time")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures to this JSON file")
    args = parser.parse_args()
    global CLOCK
    if args.wall:
        CLOCK = time.perf_counter_ns
    rng = np.random.default_rng(0)
    reference = rng.normal(size=(50_000, F)).astype(np.float32)
    profile = build_profile({"x": reference}, model="bench", version="1")
    edges = profile.tensors["x"].edges()
    lo, hi = np.full(F, -50.0), np.full(F, 50.0)

    rows_out = []
    for batch, calls in ((1, 20_000), (1024, 200)):
        x = np.ascontiguousarray(rng.normal(size=(batch, F)).astype(np.float32))
        acc = Accumulator(F, lo=lo, hi=hi, allow_nan=np.zeros(F, bool), allow_inf=np.zeros(F, bool), edges=edges, buffer_rows=0)
        ref = NumpyGovernance(lo, hi, edges)
        kernel_ns = _time_per_call(acc.update, calls, args.repeats, x)
        numpy_ns = _time_per_call(ref.update, max(calls // 20, 50), args.repeats, x)
        rows_out.append((f"fused kernel, batch {batch}", kernel_ns / x.size, kernel_ns, numpy_ns / x.size, numpy_ns))

    # the same with the sketch row buffer on (as served)
    x = np.ascontiguousarray(rng.normal(size=(1024, F)).astype(np.float32))
    acc = Accumulator(F, lo=lo, hi=hi, allow_nan=np.zeros(F, bool), allow_inf=np.zeros(F, bool), edges=edges, buffer_rows=1 << 20)

    def with_buffer() -> None:
        if acc.buffered_rows > (1 << 20) - 1024:
            acc.drain()
        acc.update(x)

    buffered = _time_per_call(with_buffer, 200, args.repeats)

    block = rng.normal(size=(16_384, F)).astype(np.float32)
    feed_ns = _time_per_call(lambda: SketchSet(F, k=KLL_K).feed(block), 1, args.repeats)

    config = GovernanceConfig.model_validate(
        {
            "inputs": {"x": {"features": {j: {"min": -50, "max": 50} for j in range(F)}}},
            "sampling": {"rate": 0.01},
            "payload_log": {"enabled": False},
            "drift": {"window_rows": 10**12},
        }
    )
    engine = GovernanceEngine("bench", "1", config, ["x"], profile)
    one = {"x": np.ascontiguousarray(rng.normal(size=(1, F)).astype(np.float32))}
    out = {"y": np.array([[0.2, 0.8]], dtype=np.float32)}
    ids = [f"req-{i}" for i in range(20_000)]
    it = iter(range(10**9))
    inspect_ns = _time_per_call(lambda: engine.inspect(one, ids[next(it) % 20_000]), 20_000, args.repeats)
    both_ns = _time_per_call(
        lambda: engine.observe_outputs(out, engine.inspect(one, ids[next(it) % 20_000])), 20_000, args.repeats
    )
    engine.close(final_window=False)

    clock = "wall time" if args.wall else "thread CPU time"
    print(f"governance benchmark: {F} float32 features, 20 quantile bins, min/max/NaN/Inf rules, median of {args.repeats} ({clock})")
    print(f"{'work':<44}{'lockgate ns/value':>18}{'ns/call':>12}{'numpy ns/value':>16}{'ns/call':>12}{'speed-up':>10}")
    for name, k_v, k_c, n_v, n_c in rows_out:
        print(f"{name:<44}{k_v:>18.2f}{k_c:>12.0f}{n_v:>16.2f}{n_c:>12.0f}{n_v / k_v:>9.1f}x")
    print(f"{'fused kernel + sketch row buffer, batch 1024':<44}{buffered / x.size:>18.2f}{buffered:>12.0f}")
    print(f"{f'KLL (k={KLL_K}) feed from 16384-row buffer':<44}{feed_ns / block.size:>18.2f}{feed_ns:>12.0f}   (off the request path)")
    print(f"{'GovernanceEngine.inspect, batch 1':<44}{'':>18}{inspect_ns:>12.0f}   = {inspect_ns / 1000:.2f} us added per request")
    print(f"{'inspect + observe_outputs, batch 1':<44}{'':>18}{both_ns:>12.0f}   = {both_ns / 1000:.2f} us")
    if args.json is not None:
        args.json.write_text(json.dumps({
            "clock": clock,
            "repeats": args.repeats,
            "kernel": [{"work": name, "ns_per_value": k_v, "ns_per_call": k_c, "numpy_ns_per_value": n_v, "numpy_ns_per_call": n_c}
                       for name, k_v, k_c, n_v, n_c in rows_out],
            "kernel_with_buffer_ns_per_value": buffered / x.size,
            "kll_feed_ns_per_value": feed_ns / block.size,
            "inspect_ns": inspect_ns,
            "inspect_observe_ns": both_ns,
        }, indent=2))


if __name__ == "__main__":
    main()
