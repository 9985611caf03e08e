"""GPU only: lockgate served over gRPC on a GPU against in-process ORT CUDA (shared/GPU.md).

A real ``lockgate serve`` (``--workers N``, CUDA provider, dynamic batching) takes batch-1
ModelInfer calls from several client processes (grpc.aio, pre-serialized requests, responses
counted and their gRPC status checked, not decoded), for ``--seconds`` after a warm-up. The
reference is the best in-process ORT CUDA rate over batch sizes 1-256 (plain ``session.run``).
No h2load on the device machine, hence Python clients: each client process drives ~3-5k
calls/s, so the client count is part of the result and is printed.

    python benchmarks/gpu_served.py --model heavy_mlp --workers 1,4 --clients 8 --json out.json

Runs on a CPU too (the provider falls back, logged), which is how it was tried before use.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import multiprocessing as mp
import os
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np

from benchmarks.h2load import UNARY_PATH, infer_request
from benchmarks.inprocess import rows_per_second
from benchmarks.models import MODELS, sample_input, write_repository
from benchmarks.servers import RunningServer, Target, audit_key_for, free_port


def _gpu_spec(name: str, max_batch: int, delay_us: int, instances: int):
    spec = MODELS[name]
    config = {
        "max_batch_size": max_batch,
        "dynamic_batching": {"max_queue_delay_us": delay_us, "preferred_batch_sizes": [max_batch], "max_queue_size": 8192},
        "runtime": {"providers": ["cuda", "cpu"], "instances": instances, "intra_op_threads": 1},
    }
    return dataclasses.replace(spec, config=config)


def in_process_best(model_path: Path, row_shape: tuple[int, ...], seconds: float) -> dict:
    import onnxruntime as ort

    session = ort.InferenceSession(str(model_path), providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    rng = np.random.default_rng(7)
    rates = {batch: round(rows_per_second(session, rng.standard_normal((batch, *row_shape)).astype(np.float32), seconds), 1)
             for batch in (1, 8, 32, 64, 128, 256)}
    return {"providers": session.get_providers(), "rows_per_s": rates}


def _client(port: int, body: bytes, concurrency: int, warmup: float, seconds: float, out: mp.Queue) -> None:
    import grpc

    async def main() -> tuple[int, int]:
        ok = failed = 0
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.unary_unary(UNARY_PATH, request_serializer=None, response_deserializer=None)
            start = time.perf_counter()
            measure_from, stop = start + warmup, start + warmup + seconds

            async def loop() -> None:
                nonlocal ok, failed
                while True:
                    now = time.perf_counter()
                    if now >= stop:
                        return
                    try:
                        await call(body, timeout=30)
                        if time.perf_counter() >= measure_from and time.perf_counter() < stop:
                            ok += 1
                    except grpc.aio.AioRpcError:
                        failed += 1

            await asyncio.gather(*(loop() for _ in range(concurrency)))
        return ok, failed

    out.put(asyncio.run(main()))


def served(repo: Path, model: str, workers: int, clients: int, concurrency: int, body: bytes, warmup: float,
           seconds: float) -> dict:
    # ``python -m lockgate.cli``, not .venv/bin/lockgate: the device machine has no virtualenv.
    port = free_port()
    state = Path(tempfile.mkdtemp())
    argv = [sys.executable, "-m", "lockgate.cli", "serve", "--model-repository", str(repo), "--grpc-port", str(port),
            "--metrics-port", str(free_port()), "--host", "127.0.0.1", "--state-dir", str(state / "state"),
            "--allow-unapproved", "--workers", str(workers), "--audit-key-file", str(audit_key_for(state / "state"))]
    target = Target(name=f"lockgate-x{workers}", argv=argv, env={}, port=port, processes=workers, ready_timeout_s=180.0)
    # RunningServer waits for ServerReady + ModelReady over several connections: every worker loaded.
    with RunningServer(target, [model], state) as server:
        queue: mp.Queue = mp.Queue()
        procs = [mp.Process(target=_client, args=(port, body, concurrency, warmup, seconds, queue)) for _ in range(clients)]
        for p in procs:
            p.start()
        results = [queue.get(timeout=warmup + seconds + 120) for _ in procs]
        for p in procs:
            p.join(30)
        text = server.log_path.read_text(errors="replace")
    ok = sum(r[0] for r in results)
    return {"workers": workers, "clients": clients, "in_flight": clients * concurrency,
            "rows_per_s": round(ok / seconds, 1), "failed": sum(r[1] for r in results),
            "on_cuda": "on cuda:" in text, "log_tail": text[-600:]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="heavy_mlp", choices=sorted(MODELS))
    parser.add_argument("--workers", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--concurrency", type=int, default=64, help="calls in flight per client process")
    parser.add_argument("--max-batch", type=int, default=128)
    parser.add_argument("--delay-us", type=int, default=2000)
    parser.add_argument("--instances", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    spec = _gpu_spec(args.model, args.max_batch, args.delay_us, args.instances)
    repo = write_repository(Path(tempfile.mkdtemp()) / "repo", specs=(spec,))
    body = infer_request(spec.name, spec.input_name, sample_input(spec)).SerializeToString()
    report: dict = {"model": spec.name, "layers": spec.layers, "config": spec.config, "cpus": os.cpu_count()}
    report["in_process"] = in_process_best(repo / spec.name / "1" / "model.onnx", spec.row_shape, 2.0)
    best = max(report["in_process"]["rows_per_s"].values())
    print(json.dumps(report["in_process"]), flush=True)
    report["served"] = []
    for workers in args.workers:
        row = served(repo, spec.name, workers, args.clients, args.concurrency, body, args.warmup, args.seconds)
        row["vs_best_in_process"] = round(row["rows_per_s"] / best, 4)
        report["served"].append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "log_tail"}), flush=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
