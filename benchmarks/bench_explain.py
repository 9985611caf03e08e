"""Explanations: latency against shap.KernelExplainer, and what they cost plain inference.

One run, three parts, every comparison interleaved in the same run:

1. **Explanation latency** (p50/p99) of a 32-feature MLP with a background of 100 rows, for a
   request of 1 row and of 8 rows: ``shap.KernelExplainer`` calling an ONNX Runtime session
   (the baseline: shap calls the model twice per row), lockgate's batched KernelSHAP in
   process (same shap sampling and solver, one ORT run per request), and lockgate served over
   gRPC with ``lockgate_explain: true`` (tritonclient, end to end: inference + explanation in
   the explain pool's process, here at normal priority and without a CPU budget). Same model,
   background, nsamples and seed; the attributions are checked equal before timing.
2. **Plain-inference throughput with 1% of requests explained** vs none: closed-loop plain
   callers for a few seconds per round, rounds alternating; in the explained rounds a side
   sender adds explain requests at 1% of the plain rate (open loop, so they do not occupy the
   plain callers). The server runs with the default explain pool (nice 19, a quarter of a core
   per worker: what it cannot take it refuses with RESOURCE_EXHAUSTED, counted in the table).
   Ratio of plain requests per second; target >= 0.95.
3. **The unexplained hot path**: ``pipeline.infer`` per plain request with the explain hook
   installed vs removed (no gRPC, same gateway, interleaved): the cost of the one parameter test.

    .venv/bin/python benchmarks/bench_explain.py [--requests 20] [--nsamples 512] [--rounds 8] [--seconds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import grpc
import numpy as np
import onnx
import onnxruntime as ort
import shap
import tritonclient.grpc as grpcclient
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from benchmarks.servers import RunningServer, install_cleanup, lockgate_target
from lockgate.demo import mlp_model
from lockgate.explain.background import background_path, save_background
from lockgate.explain.kernel import BatchedKernelExplainer

FEATURES = 32
BACKGROUND = 100
MODEL = "mlp32"


def _config(nsamples: int) -> str:
    return (f"max_batch_size: 64\ndynamic_batching: {{max_queue_delay_us: 0}}\nruntime: {{execution: auto}}\n"
            f"explain: {{nsamples: {nsamples}, background_size: {BACKGROUND}, max_rows: 8, max_queue: 4, timeout_s: 300, "
            f"max_evaluations: 100000000}}\n")


def write_repo(root: Path, nsamples: int) -> tuple[Path, np.ndarray]:
    repo = root / "models"
    path = repo / MODEL / "1" / "model.onnx"
    path.parent.mkdir(parents=True)
    onnx.save(mlp_model([FEATURES, 64, 64, 4], seed=3), str(path))
    (repo / MODEL / "config.yaml").write_text(_config(nsamples))
    background = np.random.default_rng(0).normal(size=(BACKGROUND, FEATURES)).astype(np.float32)
    save_background(background_path(repo, MODEL, "1"), {"features": background})
    return repo, background


def _percentiles(samples: list[float]) -> tuple[float, float]:
    return float(np.percentile(samples, 50)) * 1e3, float(np.percentile(samples, 99)) * 1e3


def latency(port: int, repo: Path, background: np.ndarray, args: argparse.Namespace) -> list[dict]:
    session = ort.InferenceSession(str(repo / MODEL / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    f = lambda a: session.run(None, {"features": a.astype(np.float32)})[0]  # noqa: E731
    theirs = shap.KernelExplainer(f, background)
    ours = BatchedKernelExplainer(f, background, nsamples=args.nsamples, seed=0)
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{port}")
    rows_out = []
    try:
        for rows in (1, 8):
            x = np.random.default_rng(rows).normal(size=(rows, FEATURES)).astype(np.float32)
            inp = grpcclient.InferInput("features", [rows, FEATURES], "FP32")
            inp.set_data_from_numpy(x)

            def shap_call() -> np.ndarray:
                np.random.seed(0)
                return np.asarray(theirs.shap_values(x, nsamples=args.nsamples, l1_reg=False, silent=True))

            def ours_call() -> np.ndarray:
                return ours.explain_rows(x)

            def served_call() -> np.ndarray:
                return client.infer(MODEL, [inp], parameters={"lockgate_explain": True},
                                    client_timeout=600).as_numpy("lockgate_attributions")

            reference = shap_call()
            for name, call in (("in-process", ours_call), ("served", served_call)):
                err = float(np.max(np.abs(call() - reference)))
                if err > 1e-4:
                    raise SystemExit(f"{name} attributions differ from shap.KernelExplainer by {err}")
            times: dict[str, list[float]] = {"shap": [], "in-process": [], "served": []}
            for _ in range(args.requests):
                for name, call in (("shap", shap_call), ("in-process", ours_call), ("served", served_call)):
                    start = time.perf_counter()
                    call()
                    times[name].append(time.perf_counter() - start)
            for name, samples in times.items():
                p50, p99 = _percentiles(samples)
                rows_out.append({"rows": rows, "method": name, "p50_ms": p50, "p99_ms": p99})
    finally:
        client.close()
    return rows_out


def _request(explain: bool) -> pb.ModelInferRequest:
    x = np.random.default_rng(9).normal(size=(1, FEATURES)).astype(np.float32)
    request = pb.ModelInferRequest(model_name=MODEL)
    request.inputs.add(name="features", datatype="FP32", shape=[1, FEATURES])
    request.raw_input_contents.append(x.tobytes())
    if explain:
        request.parameters["lockgate_explain"].bool_param = True
    return request


async def _round(port: int, seconds: float, callers: int, explain_rate: float) -> dict[str, float]:
    plain, explained = _request(False), _request(True)
    counts = {"plain": 0, "explained": 0, "explain_refused": 0, "errors": 0}
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        stop = time.perf_counter() + seconds
        side: set[asyncio.Task] = set()

        async def caller() -> None:
            while time.perf_counter() < stop:
                try:
                    await stub.ModelInfer(plain, timeout=30)
                    counts["plain"] += 1
                except grpc.aio.AioRpcError:
                    counts["errors"] += 1

        async def one_explained() -> None:
            try:
                await stub.ModelInfer(explained, timeout=300)
                counts["explained"] += 1
            except grpc.aio.AioRpcError as exc:
                counts["explain_refused" if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED else "errors"] += 1

        async def sender() -> None:
            if explain_rate <= 0:
                return
            next_at = time.perf_counter()
            while time.perf_counter() < stop:
                task = asyncio.get_running_loop().create_task(one_explained())
                side.add(task)
                task.add_done_callback(side.discard)
                next_at += 1.0 / explain_rate
                await asyncio.sleep(max(0.0, next_at - time.perf_counter()))

        start = time.perf_counter()
        await asyncio.gather(*(caller() for _ in range(callers)), sender())
        elapsed = time.perf_counter() - start
        if side:
            await asyncio.gather(*side, return_exceptions=True)
    return {"plain_rps": counts["plain"] / elapsed, **counts}


def _pool_ready(port: int, timeout_s: float = 300.0) -> None:
    """Wait until one explanation has been answered: the explain worker is spawned, shap is
    imported and the explainer built (seconds of CPU that would otherwise land in a round)."""
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        while True:
            try:
                stub.ModelInfer(_request(True), timeout=max(1.0, deadline - time.monotonic()))
                return
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.DEADLINE_EXCEEDED or time.monotonic() >= deadline:
                    raise
                # the explanation's own deadline passed while the pool was starting: ask again


def throughput(port: int, args: argparse.Namespace) -> dict:
    """Pairs of rounds, none vs 1% explained, the order flipped every pair so drift in the machine's
    load cancels; the ratio is of the medians over all rounds of each kind."""
    _pool_ready(port)  # the pool's spawn, imports and explainer build must not fall in a round
    asyncio.run(_round(port, 1.0, args.callers, 0.0))  # warm-up
    rounds = []
    none_rps: list[float] = []
    some_rps: list[float] = []
    for i in range(args.rounds):
        pair = {}
        for kind in (("none", "one_percent") if i % 2 == 0 else ("one_percent", "none")):
            rate = 0.0 if kind == "none" else 0.01 * statistics.median(none_rps or [pair.get("none", {}).get("plain_rps", 1000.0)])
            pair[kind] = asyncio.run(_round(port, args.seconds, args.callers, rate))
            (none_rps if kind == "none" else some_rps).append(pair[kind]["plain_rps"])
        pair["ratio"] = pair["one_percent"]["plain_rps"] / pair["none"]["plain_rps"]
        rounds.append(pair)
    return {"rounds": rounds, "median_ratio": statistics.median(some_rps) / statistics.median(none_rps)}


async def _hot_path(repo: Path, state: Path, requests: int, repeats: int) -> dict[str, float]:
    from lockgate._proto import inference_pb2 as lpb
    from lockgate.config import ServerSettings
    from lockgate.pipeline import RequestContext
    from lockgate.transport.server import Gateway

    settings = ServerSettings(model_repository=repo, state_dir=state, grpc_port=0, metrics_port=0,
                              require_approval=False, log_level="WARNING")
    gateway = Gateway(settings)
    await gateway.control.start()
    await gateway.repository.load_all()
    pipeline = gateway.pipeline
    await asyncio.gather(*gateway.explain._tasks)  # the explainer's warm-up in the pool: not during the timing
    request = lpb.ModelInferRequest.FromString(_request(False).SerializeToString())

    async def drive() -> float:
        start = time.perf_counter()
        for _ in range(requests):
            await pipeline.infer(request, lpb.ModelInferResponse, RequestContext(deadline=None, metadata={}))
            await asyncio.sleep(0)
        return (time.perf_counter() - start) / requests * 1e6

    hook = pipeline.explain
    samples: dict[str, list[float]] = {"hook": [], "no hook": []}
    await drive()
    for i in range(repeats):  # alternate which goes first
        for name in (("hook", "no hook") if i % 2 == 0 else ("no hook", "hook")):
            pipeline.explain = hook if name == "hook" else None
            samples[name].append(await drive())
    pipeline.explain = hook
    await gateway.repository.close()
    await gateway.explain.close()
    gateway.governance.close()
    await gateway.control.close()
    gateway.telemetry.close()
    return {name: statistics.median(values) for name, values in samples.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20, help="timed explanations per method and row count")
    parser.add_argument("--nsamples", type=int, default=512, help="KernelSHAP coalitions per row (both sides)")
    parser.add_argument("--rounds", type=int, default=8, help="throughput round pairs (none and 1%% explained)")
    parser.add_argument("--seconds", type=float, default=2.0, help="length of one throughput round")
    parser.add_argument("--callers", type=int, default=16, help="plain requests in flight")
    parser.add_argument("--hot-path-requests", type=int, default=20000)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    install_cleanup()
    with tempfile.TemporaryDirectory(prefix="bench-explain-") as tmp:
        repo, background = write_repo(Path(tmp), args.nsamples)
        # latency: the method itself, so the pool runs at normal priority with no CPU budget
        # (explain_nice 0, explain_cpu_share 1), like the shap baseline beside it
        fast = lockgate_target(repo, Path(tmp) / "state-latency", name="lockgate-latency",
                               env={"LOCKGATE_EXPLAIN_NICE": "0", "LOCKGATE_EXPLAIN_CPU_SHARE": "1"})
        with RunningServer(fast, [MODEL], Path(tmp) / "logs") as server:
            lat = latency(server.port, repo, background, args)
        # throughput: the defaults (nice 19, a quarter of a core per explain worker)
        with RunningServer(lockgate_target(repo, Path(tmp) / "state"), [MODEL], Path(tmp) / "logs") as server:
            tput = throughput(server.port, args)
        hot = asyncio.run(_hot_path(repo, Path(tmp) / "state-hot", args.hot_path_requests, 6))
    print(f"\nExplanation latency, {FEATURES}-feature MLP, background {BACKGROUND}, nsamples {args.nsamples}, "
          f"{args.requests} requests each (ms)\n")
    print("| rows | method | p50 ms | p99 ms | p50 vs shap |")
    print("|---:|---|---:|---:|---:|")
    for rows in (1, 8):
        base = next(r for r in lat if r["rows"] == rows and r["method"] == "shap")["p50_ms"]
        for r in (r for r in lat if r["rows"] == rows):
            label = {"shap": "shap.KernelExplainer + ORT session", "in-process": "lockgate batched KernelSHAP, in process",
                     "served": "lockgate over gRPC (inference + explanation)"}[r["method"]]
            print(f"| {rows} | {label} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {base / r['p50_ms']:.2f}x |")
    print(f"\nPlain throughput, 1-row requests, {args.callers} callers, {args.seconds:g} s rounds\n")
    print("| pair | plain req/s, none explained | plain req/s, 1% explained | explained ok / refused | ratio |")
    print("|---:|---:|---:|---:|---:|")
    for i, r in enumerate(tput["rounds"], 1):
        print(f"| {i} | {r['none']['plain_rps']:.0f} | {r['one_percent']['plain_rps']:.0f} | "
              f"{r['one_percent']['explained']} / {r['one_percent']['explain_refused']} | {r['ratio']:.3f} |")
    print(f"\nratio of the medians (1% explained / none): {tput['median_ratio']:.3f} (target >= 0.95)")
    print(f"\nUnexplained hot path, pipeline.infer per plain request (µs, median of 6, alternating): "
          f"hook installed {hot['hook']:.1f}, removed {hot['no hook']:.1f}, ratio {hot['hook'] / hot['no hook']:.3f}")
    if args.json is not None:
        args.json.write_text(json.dumps({"latency": lat, "throughput": tput, "hot_path_us": hot}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
