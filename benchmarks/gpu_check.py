"""GPU check for a session that is lent a device machine (see shared/GPU.md).

Not runnable without a CUDA GPU and onnxruntime-gpu. One script, under 5 minutes:
  1. the CUDA execution provider is active for lockgate's runtime (no silent fallback);
  2. IO binding runs (inputs staged through pinned host buffers) and gives the same results as
     the CPU session within tolerance;
  3. throughput at batch 1, 8 and 64: plain ``session.run``, IO binding from pageable memory,
     IO binding through pinned buffers, and lockgate's dynamic batcher (batch-1 requests from
     many concurrent callers, in-process, no gRPC) against the best in-process ORT CUDA rate.
The real server on the GPU (ModelConfig, batching over gRPC, GPU metrics) is covered by
``pytest tests/test_gpu_cuda.py``, run in the same device session.

The device image has Python 3.12, numpy, grpcio and a CPU onnxruntime, but not lockgate's
other dependencies: carry wheels for pydantic(+core), pyyaml, typer, rich, prometheus-client,
opentelemetry-*, datasketches, onnx and grpcio-* (pip download --python-version 3.12 ...), and
onnxruntime-gpu in <60 MB parts as GPU.md describes, install them with --no-deps into
/tmp/site, then: PYTHONPATH=/tmp/site:src python benchmarks/gpu_check.py --json $OUT/gpu.json
(the Cython extensions must be built there: python setup.py build_ext --inplace).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import onnx
import onnxruntime as ort

from lockgate.config import DynamicBatchingConfig, RuntimeConfig
from lockgate.demo import mlp_model
from lockgate.serving.batcher import DynamicBatcher
from lockgate.serving.runtime import OrtRuntime
from lockgate.serving.stats import VersionStats

SIZES = [1024, 4096, 4096, 10]  # heavy enough that the GPU matters


def _rate(fn, seconds: float) -> float:
    fn()
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        fn()
        n += 1
    return n / (time.perf_counter() - start)


async def _served_rows_per_s(runtime: OrtRuntime, batch: int, seconds: float) -> float:
    batcher = DynamicBatcher(runtime, label="gpu-check", max_batch_size=batch,
                             batching=DynamicBatchingConfig(max_queue_delay_us=2000, preferred_batch_sizes=[batch]),
                             stats=VersionStats(), instances=2)
    x = np.random.default_rng(0).standard_normal((1, SIZES[0])).astype(np.float32)
    done = 0
    stop = time.perf_counter() + seconds

    async def caller() -> None:
        nonlocal done
        while time.perf_counter() < stop:
            await batcher.submit({"features": x}, None)
            done += 1

    start = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(batch * 4)))
    elapsed = time.perf_counter() - start
    await batcher.drain(10)
    return done / elapsed


def _outputs_to_host_runner(runtime: OrtRuntime):
    """Experiment: pinned inputs, outputs bound to host memory (ORT copies them back itself)."""
    session, staging = runtime.session, runtime.staging
    names = [o.name for o in session.get_outputs()]

    def run(x: np.ndarray) -> list[np.ndarray]:
        binding = session.io_binding()
        view = staging.stage("features", x)
        binding.bind_input("features", "cpu", 0, view.dtype.type, list(view.shape), view.ctypes.data)
        for name in names:
            binding.bind_output(name, "cpu")
        session.run_with_iobinding(binding)
        return [v.numpy() for v in binding.get_outputs()]

    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    report: dict = {"available_providers": ort.get_available_providers()}
    work = Path(tempfile.mkdtemp())
    path = work / "model.onnx"
    onnx.save(mlp_model(SIZES, seed=1), str(path))

    gpu = OrtRuntime(path, RuntimeConfig(providers=["cuda", "cpu"], io_binding=True, execution="thread"), label="gpu")
    pageable = OrtRuntime(path, RuntimeConfig(providers=["cuda", "cpu"], io_binding=True, pinned_memory=False,
                                              execution="thread"), label="gpu-pageable")
    plain = OrtRuntime(path, RuntimeConfig(providers=["cuda", "cpu"], io_binding=False, execution="thread"), label="gpu-plain")
    cpu = OrtRuntime(path, RuntimeConfig(providers=["cpu"], intra_op_threads=0), label="cpu")
    report["gpu_providers"] = list(gpu.provider.active)
    report["gpu_device"] = gpu.provider.device
    report["fallback_reason"] = gpu.provider.fallback_reason
    report["pinned_staging"] = gpu.staging is not None
    ok = gpu.on_cuda and gpu.staging is not None
    x = np.random.default_rng(1).standard_normal((64, SIZES[0])).astype(np.float32)
    out_gpu = gpu.run({"features": x})["probabilities"]  # IO binding path on CUDA
    out_cpu = cpu.run({"features": x})["probabilities"]
    report["max_abs_diff_vs_cpu"] = float(np.max(np.abs(out_gpu - out_cpu)))
    ok &= report["max_abs_diff_vs_cpu"] < 5e-3  # TF32 MatMuls on the GPU
    report["max_abs_diff_pageable_vs_pinned"] = float(np.max(np.abs(pageable.run({"features": x})["probabilities"] - out_gpu)))
    ok &= report["max_abs_diff_pageable_vs_pinned"] < 1e-5
    for runtime in (gpu, pageable, plain):
        runtime.warm_up(runtime.signature(128))
    rows = {}
    for batch in (1, 8, 64):
        xb = x[:batch]
        rates = {name: round(_rate(lambda r=r: r.run({"features": xb}), args.seconds) * batch, 1)
                 for name, r in (("session_run", plain), ("io_binding_pageable", pageable), ("io_binding_pinned", gpu))}
        if gpu.staging is not None:
            to_host = _outputs_to_host_runner(gpu)
            np.testing.assert_allclose(to_host(xb)[0], gpu.run({"features": xb})["probabilities"], atol=1e-6)
            rates["io_binding_pinned_outputs_to_host"] = round(_rate(lambda: to_host(xb), args.seconds) * batch, 1)
        served = asyncio.run(_served_rows_per_s(gpu, batch, args.seconds))
        best = max(rates.values())
        rows[batch] = {**{f"{k}_rows_per_s": v for k, v in rates.items()}, "batcher_rows_per_s": round(served, 1),
                       "batcher_vs_best_in_process": round(served / best, 3)}
        print(f"batch {batch}: {rows[batch]}", flush=True)
    report["throughput"] = rows
    report["ok"] = bool(ok)
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
