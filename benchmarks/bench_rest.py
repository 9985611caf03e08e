"""REST benchmark, in one run: lockgate's KServe v2 REST (Triton's binary extension and JSON)
against MLServer's REST and Triton (PyTriton) over HTTP, the HTTP server A/B that chose
uvicorn, and lockgate's gRPC against a baseline tree (``main``) to show it did not fall.

    .venv/bin/python benchmarks/bench_rest.py                      # everything, ~10 min on 2 cores
    .venv/bin/python benchmarks/bench_rest.py --quick              # smoke run
    .venv/bin/python benchmarks/bench_rest.py --only servers       # the HTTP server A/B alone
    .venv/bin/python benchmarks/bench_rest.py --baseline-src DIR   # gRPC A/B against another tree

Load is h2load over HTTP/1.1 (``--h1``: N connections, one request in flight on each, as
tritonclient.http and curl use HTTP/1.1) and over HTTP/2 for gRPC. Every target serves the
batch-1 ``mlp`` model (32 -> 256 -> 4) with one ORT intra-op thread; each answer is checked
against in-process ONNX Runtime before it is measured, and h2load counts non-2xx answers as
failures. Repeats are interleaved (repeat -> level -> target); medians are reported.

``serve`` is the child mode of the server A/B: one lockgate gateway in process, its HTTP
application carried by the server named with ``--server``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.checks import check_unary
from benchmarks.h2load import UNARY_PATH, Load, infer_request, run_h2load, warm_up, write_body
from benchmarks.inprocess import session
from benchmarks.models import MLP, sample_input, write_model, write_repository
from benchmarks.servers import (
    MLSERVER_BIN, REPO_ROOT, RunningServer, Target, free_port, install_cleanup, lockgate_target, mlserver_target,
)

PYTRITON_PY = REPO_ROOT / ".venv-pytriton" / "bin" / "python"
SERVERS = ("uvicorn", "granian-asgi", "granian-rsgi")


# ------------------------------------------------------------------ child: one server kind
async def _serve(args: argparse.Namespace) -> None:
    from lockgate.config import ServerSettings
    from lockgate.transport.server import Gateway

    settings = ServerSettings(model_repository=args.repo, state_dir=args.state, grpc_port=0, metrics_port=free_port(),
                              http_enabled=False, require_approval=False, host="127.0.0.1", log_level="WARNING")
    gateway = Gateway(settings)
    await gateway.start()
    app = gateway.http_app()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    if args.server == "uvicorn":
        from lockgate.transport.http.server import HttpServer

        server = HttpServer(app, host="127.0.0.1", port=args.port, tls=None, drain_timeout_s=1)
        await server.start()
        print("READY", flush=True)
        await stop.wait()
        await server.stop()
    else:
        from granian.constants import Interfaces
        from granian.server.embed import Server

        target = app if args.server == "granian-asgi" else _rsgi(app)
        interface = Interfaces.ASGINL if args.server == "granian-asgi" else Interfaces.RSGI
        server = Server(target, address="127.0.0.1", port=args.port, interface=interface, log_enabled=False,
                        backlog=2048, websockets=False)
        task = loop.create_task(server.serve())
        print("READY", flush=True)
        await stop.wait()
        server.stop()
        await asyncio.wait_for(task, 10)
    await gateway.stop()


def _rsgi(app: object):
    """The same ASGI application behind granian's RSGI interface (its fastest)."""

    class RsgiAdapter:
        async def __call__(self, scope, protocol) -> None:  # noqa: ANN001
            body = await protocol()
            sent: dict = {}

            async def receive() -> dict:
                return {"type": "http.request", "body": body, "more_body": False}

            async def send(message: dict) -> None:
                if message["type"] == "http.response.start":
                    sent["status"] = message["status"]
                    sent["headers"] = [(k.decode(), v.decode()) for k, v in message["headers"]]
                else:
                    protocol.response_bytes(sent["status"], sent["headers"], message.get("body", b""))

            asgi_scope = {"type": "http", "method": scope.method, "path": scope.path,
                          "query_string": scope.query_string.encode(),
                          "headers": [(k.encode(), v.encode()) for k, v in scope.headers.items()]}
            await app(asgi_scope, receive, send)  # type: ignore[operator]

    return RsgiAdapter()


# ------------------------------------------------------------------ parent: the measurements
@dataclass
class RestWorkload:
    name: str
    path: str
    body: Path
    headers: tuple[str, ...]


@dataclass
class Series:
    rates: dict[str, dict[int, list[float]]] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)

    def add(self, target: str, level: int, rate: float, errors: int) -> None:
        self.rates.setdefault(target, {}).setdefault(level, []).append(rate)
        self.errors[target] = self.errors.get(target, 0) + errors

    def median(self, target: str, level: int) -> float:
        values = self.rates.get(target, {}).get(level, [])
        return statistics.median(values) if values else float("nan")


def rest_bodies(workdir: Path, model: str, input_name: str, data: np.ndarray) -> tuple[RestWorkload, RestWorkload]:
    """The binary-extension body (JSON header + raw tensor) and the all-JSON body."""
    header = json.dumps({"inputs": [{"name": input_name, "shape": list(data.shape), "datatype": "FP32",
                                     "parameters": {"binary_data_size": data.nbytes}}],
                         "parameters": {"binary_data_output": True}}).encode()
    binary = workdir / f"{model}-rest-binary.bin"
    binary.write_bytes(header + data.tobytes())
    plain = workdir / f"{model}-rest-json.json"
    plain.write_text(json.dumps({"inputs": [{"name": input_name, "shape": list(data.shape), "datatype": "FP32",
                                             "data": data.ravel().tolist()}]}))
    path = f"/v2/models/{model}/infer"
    return (RestWorkload("binary", path, binary, (f"inference-header-content-length: {len(header)}",
                                                  "content-type: application/octet-stream")),
            RestWorkload("json", path, plain, ("content-type: application/json",)))


def check_rest(port: int, workload: RestWorkload, expected: np.ndarray) -> None:
    """One request: its answer must equal in-process ORT (binary or JSON output)."""
    headers = dict(h.split(": ", 1) for h in workload.headers)
    request = urllib.request.Request(f"http://127.0.0.1:{port}{workload.path}", data=workload.body.read_bytes(),
                                     method="POST", headers=headers)
    with urllib.request.urlopen(request, timeout=30) as response:
        body = response.read()
        length = response.headers.get("Inference-Header-Content-Length")
    if length is not None:
        answer = np.frombuffer(body[int(length):], np.float32)
    else:
        answer = np.asarray(json.loads(body)["outputs"][0]["data"], np.float32)
    np.testing.assert_allclose(answer.reshape(expected.shape), expected, rtol=1e-4, atol=1e-5)


def wait_http(port: int, proc: subprocess.Popen | None, timeout_s: float = 120.0, path: str = "/v2/health/ready") -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, OSError):
            pass
        time.sleep(0.2)
    raise TimeoutError(f"no HTTP answer on port {port} after {timeout_s:.0f}s")


def measure_rest(port: int, workload: RestWorkload, level: int, duration: float) -> tuple[float, int]:
    load = Load(clients=level, streams=1)
    warm_up(port, workload.path, workload.body, load, requests=max(200, level * 4), headers=workload.headers, http1=True)
    result = run_h2load(port, workload.path, workload.body, load, duration, response_bytes=0,
                        headers=workload.headers, http1=True)
    return result.requests_per_s, result.failed + result.grpc_errors


class ChildServer:
    """``bench_rest.py serve --server KIND`` in its own process group."""

    def __init__(self, kind: str, repo: Path, state: Path, log_dir: Path) -> None:
        self.kind = kind
        self.port = free_port()
        self.log = (log_dir / f"server-{kind}.log").open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "serve", "--server", kind, "--port", str(self.port), "--repo", str(repo),
             "--state", str(state)], stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

    def __enter__(self) -> ChildServer:
        wait_http(self.port, self.proc)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()


def server_ab(args: argparse.Namespace, work: Path, repo: Path, binary: RestWorkload, expected: np.ndarray) -> dict:
    """The same lockgate application carried by each HTTP server, interleaved."""
    series = Series()
    for repeat in range(args.repeats):
        for kind in args.servers:
            with ChildServer(kind, repo, work / f"state-{kind}-{repeat}", work) as child:
                check_rest(child.port, binary, expected)
                for level in args.levels:
                    rate, errors = measure_rest(child.port, binary, level, args.duration)
                    series.add(kind, level, rate, errors)
                    print(f"  server A/B repeat {repeat + 1}: {kind:13s} {level:4d} in flight: {rate:8.0f} req/s", flush=True)
    return {"rates": series.rates, "errors": series.errors,
            "median": {k: {lv: series.median(k, lv) for lv in args.levels} for k in args.servers}}


def pytriton_target(model_path: Path, work: Path) -> Target:
    grpc_port, http_port = free_port(), free_port()
    argv = [str(PYTRITON_PY), str(Path(__file__).with_name("pytriton_server.py")), "--model", str(model_path),
            "--model-name", MLP.name, "--input", MLP.input_name, "--output", MLP.output_name,
            "--grpc-port", str(grpc_port), "--http-port", str(http_port), "--metrics-port", str(free_port()),
            "--workspace", str(work / "pytriton")]
    return Target(name="pytriton", argv=argv, port=grpc_port, http_port=http_port, processes=2, ready_timeout_s=90)


def comparison(args: argparse.Namespace, work: Path, repo: Path, model_path: Path, workloads: tuple[RestWorkload, RestWorkload],
               expected: np.ndarray, notes: list[str]) -> dict:
    """lockgate REST (binary, JSON) vs MLServer REST vs PyTriton HTTP; lockgate gRPC vs baseline."""
    binary, plain = workloads
    request = infer_request(MLP.name, MLP.input_name, sample_input(MLP))
    grpc_body = write_body(work / "mlp-grpc.bin", request)
    targets: list[tuple[str, Target, str]] = []  # (label, target, what to drive)
    lockgate = lockgate_target(repo, work / "state-lockgate", name="lockgate")
    targets += [("lockgate REST binary", lockgate, "binary"), ("lockgate REST JSON", lockgate, "json"),
                ("lockgate gRPC", lockgate, "grpc")]
    if args.baseline_src:
        env = {"PYTHONPATH": str(Path(args.baseline_src) / "src")}
        base = lockgate_target(repo, work / "state-baseline", name="baseline", env=env, http=False)
        targets.append(("baseline gRPC", base, "grpc"))
    if "mlserver" in args.peers:
        if MLSERVER_BIN.exists():
            ml = mlserver_target(model_path, MLP.name, work / "mlserver", parallel_workers=0)
            targets += [("MLServer REST JSON", ml, "json")]
        else:
            notes.append(f"MLServer not measured: {MLSERVER_BIN} missing (create it with benchmarks/run_all.py)")
    if "pytriton" in args.peers:
        if PYTRITON_PY.exists():
            pt = pytriton_target(model_path, work)
            targets += [("PyTriton HTTP binary", pt, "binary"), ("PyTriton HTTP JSON", pt, "json")]
        else:
            notes.append(f"PyTriton not measured: {PYTRITON_PY} missing (python3 -m venv .venv-pytriton && "
                         ".venv-pytriton/bin/pip install nvidia-pytriton onnxruntime)")
    series = Series()
    by_target: dict[str, list[tuple[str, str]]] = {}
    order: list[Target] = []
    for label, target, kind in targets:
        if target.name not in by_target:
            order.append(target)
        by_target.setdefault(target.name, []).append((label, kind))
    for repeat in range(args.repeats):
        for target in order:
            try:
                server = RunningServer(target, [MLP.name], work / "logs").__enter__()
            except Exception as exc:  # a peer that cannot start here is reported, not fatal
                notes.append(str(exc).splitlines()[0])
                del by_target[target.name]
                continue
            try:
                for label, kind in by_target.get(target.name, []):
                    for level in args.levels:
                        if kind == "grpc":
                            response_bytes = check_unary(target.port, request, expected).response_bytes
                            load = Load(clients=min(level, 8), streams=max(1, level // min(level, 8)))
                            warm_up(target.port, UNARY_PATH, grpc_body, load)
                            result = run_h2load(target.port, UNARY_PATH, grpc_body, load, args.duration,
                                                response_bytes=response_bytes)
                            rate, errors = result.requests_per_s, result.failed + result.grpc_errors
                        else:
                            workload = binary if kind == "binary" else plain
                            wait_http(target.http_port, None, path="/v2/health/ready")
                            check_rest(target.http_port, workload, expected)
                            rate, errors = measure_rest(target.http_port, workload, level, args.duration)
                        series.add(label, level, rate, errors)
                        print(f"  repeat {repeat + 1}: {label:22s} {level:4d} in flight: {rate:8.0f} req/s"
                              f"{f'  ({errors} errors)' if errors else ''}", flush=True)
            finally:
                server.stop()
        order = [t for t in order if t.name in by_target]
    labels = [label for label, target, _ in targets if target.name in by_target]
    return {"rates": series.rates, "errors": series.errors,
            "median": {label: {lv: series.median(label, lv) for lv in args.levels} for label in labels}}


def _head(first: str, levels: list[int], last: str) -> list[str]:
    return [f"| {first} | " + " | ".join(f"{lv} in flight" for lv in levels) + f" | {last} |",
            "|---|" + "---:|" * (len(levels) + 1)]


def print_tables(results: dict, args: argparse.Namespace) -> str:
    lines: list[str] = []
    levels = args.levels
    if "servers" in results:
        med = results["servers"]["median"]
        lines += ["", f"HTTP server A/B: the same lockgate app, REST binary infer, req/s (median of {args.repeats})", "",
                  *_head("server", levels, "vs uvicorn")]
        for kind, rates in med.items():
            ratio = " / ".join(f"{rates[lv] / med['uvicorn'][lv]:.2f}" for lv in levels) if "uvicorn" in med else "-"
            lines.append(f"| {kind} | " + " | ".join(f"{rates[lv]:,.0f}" for lv in levels) + f" | {ratio} |")
    if "comparison" in results:
        med = results["comparison"]["median"]
        lines += ["", f"REST and gRPC, batch-1 mlp, one lockgate process, req/s (median of {args.repeats})", "",
                  *_head("target", levels, "errors")]
        for label, rates in med.items():
            lines.append(f"| {label} | " + " | ".join(f"{rates[lv]:,.0f}" for lv in levels)
                         + f" | {results['comparison']['errors'].get(label, 0)} |")
        ratios = [("lockgate REST binary / MLServer REST JSON", "lockgate REST binary", "MLServer REST JSON", 2.0),
                  ("lockgate REST JSON / MLServer REST JSON", "lockgate REST JSON", "MLServer REST JSON", None),
                  ("lockgate REST binary / PyTriton HTTP binary", "lockgate REST binary", "PyTriton HTTP binary", None),
                  ("lockgate REST JSON / lockgate REST binary", "lockgate REST JSON", "lockgate REST binary", None),
                  ("lockgate gRPC / baseline gRPC", "lockgate gRPC", "baseline gRPC", 0.98)]
        lines += ["", *_head("ratio", levels, "target")]
        for title, a, b, goal in ratios:
            if a in med and b in med:
                lines.append(f"| {title} | " + " | ".join(f"{med[a][lv] / med[b][lv]:.2f}" for lv in levels)
                             + f" | {'≥ ' + str(goal) if goal else 'report'} |")
    for note in results.get("notes", []):
        lines.append(f"\nnote: {note}")
    text = "\n".join(lines)
    print(text)
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", nargs="?", default="run", choices=["run", "serve"])
    parser.add_argument("--server", choices=SERVERS, default="uvicorn")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--repo", type=Path)
    parser.add_argument("--state", type=Path)
    parser.add_argument("--only", default="servers,comparison")
    parser.add_argument("--servers", type=lambda s: s.split(","), default=list(SERVERS))
    parser.add_argument("--peers", type=lambda s: s.split(","), default=["mlserver", "pytriton"])
    parser.add_argument("--levels", type=lambda s: [int(x) for x in s.split(",")], default=[1, 128])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--duration", type=float, default=3.0)
    parser.add_argument("--baseline-src", default=None, help="a tree (with built extensions) whose gRPC is the baseline")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "bench-results")
    args = parser.parse_args(argv)
    if args.mode == "serve":
        try:
            import uvloop

            uvloop.install()
        except ImportError:
            pass
        asyncio.run(_serve(args))
        return 0
    if args.quick:
        args.repeats, args.duration = 1, 1.5
    install_cleanup()
    only = set(args.only.split(","))
    results: dict = {"command": " ".join([sys.executable, *sys.argv]), "notes": []}
    with tempfile.TemporaryDirectory(prefix="bench-rest-") as tmp:
        work = Path(tmp)
        (work / "logs").mkdir()
        repo = write_repository(work / "repo", specs=(MLP,))
        model_path = write_model(MLP, work / "mlp.onnx")
        data = sample_input(MLP)
        expected = session(model_path, 1).run(None, {MLP.input_name: data})[0]
        workloads = rest_bodies(work, MLP.name, MLP.input_name, data)
        if "servers" in only:
            print("HTTP server A/B ...", flush=True)
            results["servers"] = server_ab(args, work, repo, workloads[0], expected)
        if "comparison" in only:
            print("REST and gRPC comparison ...", flush=True)
            results["comparison"] = comparison(args, work, repo, model_path, workloads, expected, results["notes"])
    results["tables"] = print_tables(results, args)
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / f"rest-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(results, indent=2, default=str))
    print(f"\nwrote {out}")
    errors = sum(results.get("comparison", {}).get("errors", {}).values()) + sum(results.get("servers", {}).get("errors", {}).values())
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
