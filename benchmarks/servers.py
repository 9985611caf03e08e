"""Start, wait for, and always stop the servers under test (lockgate, thin server, MLServer).

Each target is a recipe for one subprocess command on 127.0.0.1 free ports. Processes run in
their own session so the whole tree (``--workers`` children, MLServer's worker pool) is
stopped through its process-group id; an ``atexit`` hook and SIGTERM/SIGINT handlers make sure
nothing outlives the benchmark, even when it fails half-way.
"""

from __future__ import annotations

import atexit
import functools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import grpc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

REPO_ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = REPO_ROOT / "benchmarks"
LOCKGATE_BIN = REPO_ROOT / ".venv" / "bin" / "lockgate"
MLSERVER_BIN = REPO_ROOT / ".venv-mlserver" / "bin" / "mlserver"
MLSERVER_RUNTIME_DIR = BENCH_DIR / "mlserver_runtime"


def free_port() -> int:
    """A port the kernel just handed out on 127.0.0.1 (tiny race, fine for a benchmark)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Target:
    """How to launch one server under test.

    ``stream_wrapped``: Triton-style servers answer ModelStreamInfer with
    ``ModelStreamInferResponse`` (error_message + infer_response); MLServer streams bare
    ``ModelInferResponse`` messages. The correctness check needs to know which.
    """

    name: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    cwd: Path | None = None
    stream_wrapped: bool = True
    processes: int = 1
    ready_timeout_s: float = 90.0
    port: int = 0
    http_port: int = 0  # the REST port, where the server has one

    def describe(self) -> str:
        return " ".join(self.argv)


def audit_key_for(state_dir: Path) -> Path:
    """The audit key a benchmark server uses: outside its state dir (lockgate wants it there),
    in a folder of its own, so that the checkpoint file lockgate keeps beside the key is this
    server's alone (two servers sharing one would refuse each other's checkpoints)."""
    from lockgate.control.audit_key import AuditKey

    key = Path(state_dir).parent / f"{Path(state_dir).name}.audit" / "audit.key"
    key.parent.mkdir(parents=True, exist_ok=True)
    if not key.exists():
        AuditKey.generate(key)
    return key


@functools.cache
def _lockgate_serve_help(pythonpath: str | None = None) -> str:
    """``serve --help`` of the lockgate that runs (a baseline tree's with its PYTHONPATH)."""
    env = {**os.environ, "PYTHONPATH": pythonpath} if pythonpath else None
    proc = subprocess.run([str(LOCKGATE_BIN), "serve", "--help"], capture_output=True, text=True, check=False, env=env)
    return proc.stdout + proc.stderr


def lockgate_target(
    repo: Path,
    state_dir: Path,
    workers: int = 1,
    name: str = "lockgate",
    extra_args: tuple[str, ...] = (),
    env: dict[str, str] | None = None,
    allow_unapproved: bool = True,
    http: bool = True,
) -> Target:
    """``lockgate serve`` on a free gRPC port, a free metrics port and (``http``) a free HTTP port.

    ``extra_args`` / ``env`` are how other benchmarks run lockgate variants (a ``--config``
    with governance or telemetry switched on or off) through the same harness.
    ``allow_unapproved``: the benchmark's fresh state dir has no approved versions, so the
    approval gate would refuse every request; the data-plane benchmark serves them anyway.
    ``http=False`` leaves the flag out, for a baseline tree (``env`` with PYTHONPATH) whose
    ``serve`` has no HTTP port.
    """
    port = free_port()
    serve_help = _lockgate_serve_help((env or {}).get("PYTHONPATH"))
    if allow_unapproved and "--allow-unapproved" in serve_help:
        extra_args = ("--allow-unapproved", *extra_args)
    if "--audit-key-file" in serve_help and "--audit-key-file" not in extra_args:
        extra_args = ("--audit-key-file", str(audit_key_for(state_dir)), *extra_args)
    http_port = 0
    if http and "--http-port" in serve_help and not any(a.startswith("--http-port") or a == "--no-http" for a in extra_args):
        http_port = free_port()
        extra_args = ("--http-port", str(http_port), *extra_args)
    argv = [
        str(LOCKGATE_BIN), "serve",
        "--model-repository", str(repo),
        "--grpc-port", str(port),
        "--metrics-port", str(free_port()),
        "--workers", str(workers),
        "--state-dir", str(state_dir),
        *extra_args,
    ]  # fmt: skip
    return Target(name=name, argv=argv, env=dict(env or {}), port=port, processes=workers, http_port=http_port)


def thin_target(
    model_path: Path, model_name: str, workers: int = 1, mode: str = "inline", threads: int = 1, name: str = "thin"
) -> Target:
    """The transport-ceiling server (benchmarks/thin_server.py) with the same process count."""
    port = free_port()
    argv = [
        sys.executable, str(BENCH_DIR / "thin_server.py"),
        "--model", str(model_path),
        "--model-name", model_name,
        "--port", str(port),
        "--workers", str(workers),
        "--mode", mode,
        "--intra-op-threads", str(threads),
    ]  # fmt: skip
    return Target(name=name, argv=argv, port=port, processes=workers)


def mlserver_target(
    model_path: Path,
    model_name: str,
    workdir: Path,
    parallel_workers: int = 0,
    threads: int = 1,
    name: str = "mlserver",
) -> Target:
    """MLServer 1.7 with the custom runtime in benchmarks/mlserver_runtime/.

    The committed settings.json / model-settings.json are templates: ports, worker count and
    the model file are filled in here, in a private copy under ``workdir``.
    """
    if not MLSERVER_BIN.exists():
        raise FileNotFoundError(
            f"{MLSERVER_BIN} missing: python3 -m venv .venv-mlserver && "
            ".venv-mlserver/bin/pip install 'mlserver==1.7.*' onnxruntime numpy"
        )
    folder = workdir / model_name  # MLServer warns when the folder name differs from the model name
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    shutil.copy(MLSERVER_RUNTIME_DIR / "ort_runtime.py", folder / "ort_runtime.py")
    shutil.copy(model_path, folder / "model.onnx")
    port = free_port()
    http_port = free_port()
    settings = json.loads((MLSERVER_RUNTIME_DIR / "settings.json").read_text())
    settings.update(
        grpc_port=port,
        http_port=http_port,
        metrics_port=free_port(),
        parallel_workers=parallel_workers,
    )
    (folder / "settings.json").write_text(json.dumps(settings, indent=2))
    model_settings = json.loads((MLSERVER_RUNTIME_DIR / "model-settings.json").read_text())
    model_settings["name"] = model_name
    model_settings["parameters"]["extra"].update(intra_op_threads=threads)
    (folder / "model-settings.json").write_text(json.dumps(model_settings, indent=2))
    return Target(
        name=name,
        argv=[str(MLSERVER_BIN), "start", str(folder)],
        env={"PYTHONPATH": str(folder)},
        cwd=folder,
        stream_wrapped=False,
        port=port,
        http_port=http_port,
        processes=1 + parallel_workers,
    )


_RUNNING: dict[int, subprocess.Popen] = {}


def _kill_group(proc: subprocess.Popen, grace_s: float = 5.0) -> None:
    """SIGTERM the process group we created, then SIGKILL it if it does not go."""
    if proc.poll() is not None:
        _RUNNING.pop(proc.pid, None)
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=grace_s)
    except ProcessLookupError:
        pass
    _RUNNING.pop(proc.pid, None)


def stop_all() -> None:
    for proc in list(_RUNNING.values()):
        _kill_group(proc)


def _on_signal(signum: int, _frame: object) -> None:
    stop_all()
    sys.exit(128 + signum)


def install_cleanup() -> None:
    """Stop every started server on normal exit, on SIGTERM and on Ctrl-C (call from main)."""
    atexit.register(stop_all)
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)


def wait_ready(port: int, model_name: str, proc: subprocess.Popen, timeout_s: float, connections: int = 4) -> None:
    """ServerReady + ModelReady over several fresh connections (reaches every SO_REUSEPORT worker
    that is already listening), failing early with the log tail if the process died."""
    deadline = time.monotonic() + timeout_s
    ok_in_a_row = 0
    last_error = ""
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before becoming ready")
        try:
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = pb_grpc.GRPCInferenceServiceStub(channel)
                ready = stub.ServerReady(pb.ServerReadyRequest(), timeout=2).ready
                ready = ready and stub.ModelReady(pb.ModelReadyRequest(name=model_name), timeout=2).ready
            ok_in_a_row = ok_in_a_row + 1 if ready else 0
            if ok_in_a_row >= connections:
                return
        except grpc.RpcError as exc:
            ok_in_a_row = 0
            last_error = f"{exc.code()}: {exc.details()}"
        time.sleep(0.2)
    raise TimeoutError(f"server on port {port} not ready after {timeout_s:.0f}s ({last_error})")


class RunningServer:
    """Context manager: start ``target``, wait until ``model_names`` are ready, stop on exit."""

    def __init__(self, target: Target, model_names: list[str], log_dir: Path) -> None:
        self.target = target
        self.model_names = model_names
        self.log_path = log_dir / f"{target.name}.log"
        self._log: IO[bytes] | None = None
        self.proc: subprocess.Popen | None = None

    @property
    def port(self) -> int:
        return self.target.port

    def __enter__(self) -> RunningServer:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("wb")
        env = {**os.environ, **self.target.env}
        self.proc = subprocess.Popen(
            self.target.argv,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=self.target.cwd,
            env=env,
            start_new_session=True,
        )
        _RUNNING[self.proc.pid] = self.proc
        try:
            for model in self.model_names:
                wait_ready(self.port, model, self.proc, self.target.ready_timeout_s)
        except Exception as exc:
            self.stop()
            tail = self.log_path.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"{self.target.name} failed to start: {exc}\n--- {self.log_path} ---\n{tail}") from exc
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.proc is not None:
            _kill_group(self.proc)
        if self._log is not None:
            self._log.close()
            self._log = None

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
