"""Per-request cost of lockgate's Python data plane vs the thin server's, without gRPC.

Profiling under h2load shows both servers spend most of their CPU in grpc.aio's C core and the
event loop, which a Python sampler cannot attribute. This isolates what lockgate does *on top*:
``Gateway.pipeline.infer`` (routing, decode, governance inspect, batcher hop, encode, stats,
telemetry hooks) vs the thin server's decode/run/encode, on the same request object, in one
process, one event loop, N concurrent callers. Each caller yields one loop turn after each
call, as under gRPC, where every request arrives in its own loop turn (so a lone request takes
the batcher's direct path there and here alike). Reports µs per request (wall, median of
repeats) and a cProfile breakdown of the lockgate path.

    .venv/bin/python benchmarks/bench_pipeline.py [--requests 20000] [--concurrency 1,32] [--profile]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import json
import pstats
import statistics
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import yaml

from benchmarks.h2load import infer_request
from benchmarks.models import MLP, sample_input, write_repository
from benchmarks.thin_server import ThinModel
from lockgate._proto import inference_pb2 as lpb
from lockgate.config import ServerSettings
from lockgate.pipeline import RequestContext
from lockgate.transport.server import Gateway


def _lockgate_request() -> lpb.ModelInferRequest:
    return lpb.ModelInferRequest.FromString(infer_request(MLP.name, MLP.input_name, sample_input(MLP)).SerializeToString())


async def _drive(call, n: int, concurrency: int, cpu: bool = False) -> float:
    """µs per request for ``n`` calls with ``concurrency`` callers in flight (wall, or with
    ``cpu`` this process's CPU time: less moved by other work on a shared machine)."""
    per = n // concurrency

    async def worker() -> None:
        for _ in range(per):
            await call()
            await asyncio.sleep(0)  # as under gRPC: each request arrives in its own loop turn

    clock = time.process_time if cpu else time.perf_counter
    start = clock()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return (clock() - start) / (per * concurrency) * 1e6


async def run(args: argparse.Namespace, work: Path) -> dict[str, dict[int, float]]:
    repo = write_repository(work / "repo", specs=(MLP,))
    if args.governance:
        cfg_path = repo / MLP.name / "config.yaml"
        cfg = yaml.safe_load(cfg_path.read_text())
        cfg["governance"] = {"inputs": {MLP.input_name: {"features": {j: {"min": -50, "max": 50} for j in range(MLP.input_dim)}}},
                             "sampling": {"rate": 0.01}}
        cfg_path.write_text(yaml.safe_dump(cfg))
    settings = ServerSettings(model_repository=repo, state_dir=work / "state", grpc_port=0, metrics_port=0,
                              require_approval=False, log_level="WARNING")
    gateway = Gateway(settings)
    await gateway.control.start()
    await gateway.repository.load_all()
    pipeline = gateway.pipeline
    thin = ThinModel(MLP.name, repo / MLP.name / "1" / "model.onnx", 1, 1)
    request = _lockgate_request()
    response_type = lpb.ModelInferResponse

    async def lockgate_call() -> None:
        await pipeline.infer(request, response_type, RequestContext(deadline=None, metadata={}))

    async def thin_call() -> None:
        thin.encode(request, thin.run(thin.decode(request)))

    results: dict[str, dict[int, float]] = {"lockgate": {}, "thin": {}}
    for c in args.concurrency:
        samples: dict[str, list[float]] = {"lockgate": [], "thin": []}
        for _ in range(args.repeats):
            samples["lockgate"].append(await _drive(lockgate_call, args.requests, c, args.cpu))
            samples["thin"].append(await _drive(thin_call, args.requests, c, args.cpu))
        for name in samples:
            results[name][c] = statistics.median(samples[name])
    if args.profile:
        prof = cProfile.Profile()
        prof.enable()
        await _drive(lockgate_call, args.requests, max(args.concurrency))
        prof.disable()
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(45)
        print(out.getvalue())
    await gateway.repository.close()
    gateway.governance.close()
    await gateway.control.close()
    gateway.telemetry.close()
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 32])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--governance", action="store_true", help="add a governance section (per-feature rules, 1%% sampling)")
    parser.add_argument("--profile", action="store_true", help="print a cProfile of the lockgate path")
    parser.add_argument("--cpu", action="store_true", help="process CPU time per request instead of wall time")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    with tempfile.TemporaryDirectory(prefix="bench-pipeline-") as tmp:
        results = asyncio.run(run(args, Path(tmp)))
    print(f"\nPython data-plane cost per batch-1 {MLP.name} request, no gRPC (µs, {'CPU' if args.cpu else 'wall'}, median of {args.repeats})"
          f"{' -- governance on' if args.governance else ''}\n")
    print("| callers in flight | lockgate pipeline µs | thin decode/run/encode µs | lockgate extra µs |")
    print("|---:|---:|---:|---:|")
    for c in args.concurrency:
        lg, th = results["lockgate"][c], results["thin"][c]
        print(f"| {c} | {lg:.1f} | {th:.1f} | {lg - th:+.1f} |")
    if args.json is not None:
        args.json.write_text(json.dumps({"governance": args.governance, "repeats": args.repeats,
                                         "us_per_request": {k: {str(c): v for c, v in r.items()} for k, r in results.items()}}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
