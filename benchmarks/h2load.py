"""h2load driver: gRPC request bodies, one load run, and parsing of what h2load reports.

h2load speaks plain HTTP/2, so a gRPC call is a POST whose body is gRPC length-prefixed
frames (1-byte compressed flag, 4-byte big-endian length, serialized message). Unary calls
carry one frame to ``.../ModelInfer``; streaming calls carry K frames to
``.../ModelStreamInfer`` and get K response messages back on the same HTTP/2 stream.

h2load counts HTTP 200 as success even when the gRPC status in the trailers is an error.
Failed gRPC calls come back as trailers-only responses with no DATA, so each run checks the
DATA bytes received against ``succeeded x bytes-per-good-response`` (measured beforehand by
a real gRPC call, see ``benchmarks/checks.py``); the shortfall is reported as gRPC errors.
"""

from __future__ import annotations

import math
import re
import shutil
import struct
import subprocess
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tritonclient.grpc import service_pb2 as pb

SERVICE = "inference.GRPCInferenceService"
UNARY_PATH = f"/{SERVICE}/ModelInfer"
STREAM_PATH = f"/{SERVICE}/ModelStreamInfer"


def ensure_h2load() -> str:
    """Path to h2load; installs Debian's nghttp2-client when missing (needs root + apt)."""
    found = shutil.which("h2load")
    if found:
        return found
    install = ["apt-get", "install", "-y", "nghttp2-client"]
    if subprocess.run(install, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update"], capture_output=True, check=True)
        subprocess.run(install, capture_output=True, check=True)
    found = shutil.which("h2load")
    if not found:
        raise RuntimeError("h2load not found after installing nghttp2-client")
    return found


def grpc_frame(message: bytes) -> bytes:
    """One uncompressed gRPC length-prefixed message."""
    return b"\x00" + struct.pack(">I", len(message)) + message


def infer_request(model_name: str, input_name: str, data: np.ndarray) -> pb.ModelInferRequest:
    """A ModelInferRequest with the tensor in ``raw_input_contents`` (the fast path clients use)."""
    request = pb.ModelInferRequest(model_name=model_name)
    tensor = request.inputs.add()
    tensor.name = input_name
    tensor.datatype = "FP32"
    tensor.shape.extend(data.shape)
    request.raw_input_contents.append(np.ascontiguousarray(data, dtype=np.float32).tobytes())
    return request


def write_body(path: Path, request: pb.ModelInferRequest, frames: int = 1) -> Path:
    """Write ``frames`` copies of the framed request: 1 for unary, K for a streaming call."""
    path.write_bytes(grpc_frame(request.SerializeToString()) * frames)
    return path


@dataclass(frozen=True)
class Load:
    """Offered load: h2load ``-c clients`` x ``-m streams`` = requests in flight."""

    clients: int
    streams: int

    @property
    def in_flight(self) -> int:
        return self.clients * self.streams

    def __str__(self) -> str:
        return f"{self.in_flight} ({self.clients}x{self.streams})"


@dataclass
class H2LoadResult:
    """One h2load run. Rates are HTTP/2 requests (calls); multiply by frames for messages."""

    requests_per_s: float
    messages_per_s: float
    succeeded: int
    failed: int  # h2load-level failures (connection, HTTP status, timeouts)
    grpc_errors: int  # calls that returned 200 but no response data (gRPC error in trailers)
    data_bytes: int
    duration_s: float
    p50_ms: float
    p99_ms: float
    mean_ms: float
    max_ms: float
    # CPU time (user + system, every thread, worker processes included) the server spent per
    # succeeded request during the run; NaN when not measured. Less sensitive than req/s to
    # other work on a shared machine taking the cores away.
    server_cpu_us_per_request: float = float("nan")
    # Good calls per second over the run minus its first ``steady_after_s`` seconds (NaN when
    # not asked for): the steady state of a server whose first responses wait for a full batch.
    steady_requests_per_s: float = float("nan")
    steady_after_s: float = 0.0

    def as_dict(self) -> dict:
        return asdict(self)


_FINISHED = re.compile(r"finished in ([\d.]+)(us|ms|s), ([\d.]+) req/s")
_REQUESTS = re.compile(
    r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored, (\d+) timeout"
)
_TRAFFIC = re.compile(r"traffic: .*?\((\d+)\) total, .*?\((\d+)\) headers .*?\((\d+)\) data")
_UNIT = {"us": 1e-6, "ms": 1e-3, "s": 1.0}


def parse_output(text: str) -> dict[str, float]:
    """Pick the numbers we use out of h2load's summary (raises if the run did not finish)."""
    finished = _FINISHED.search(text)
    requests = _REQUESTS.search(text)
    traffic = _TRAFFIC.search(text)
    if not (finished and requests and traffic):
        raise RuntimeError(f"unexpected h2load output:\n{text[-2000:]}")
    return {
        "duration_s": float(finished.group(1)) * _UNIT[finished.group(2)],
        "requests_per_s": float(finished.group(3)),
        "done": int(requests.group(3)),
        "succeeded": int(requests.group(4)),
        "failed": int(requests.group(5)) + int(requests.group(6)) + int(requests.group(7)),
        "data_bytes": int(traffic.group(3)),
    }


def read_log(log_file: Path) -> tuple[np.ndarray, np.ndarray]:
    """Start times and durations (µs) of the HTTP-200 calls in h2load's per-request log
    (columns: start as µs since the epoch, status, µs until the end of the response)."""
    starts, durations = [], []
    for line in log_file.read_text().splitlines():
        parts = line.split("\t")
        if len(parts) >= 3 and parts[1] == "200":
            starts.append(int(parts[0]))
            durations.append(int(parts[2]))
    return np.asarray(starts, dtype=np.float64), np.asarray(durations, dtype=np.float64)


def latency_percentiles_ms(durations_us: np.ndarray) -> tuple[float, float, float, float]:
    """p50, p99, mean, max of per-call durations (µs) in ms."""
    if not durations_us.size:
        return (math.nan,) * 4  # type: ignore[return-value]
    p50, p99 = np.percentile(durations_us, [50, 99])
    return p50 / 1e3, p99 / 1e3, float(durations_us.mean()) / 1e3, float(durations_us.max()) / 1e3


def steady_rate(starts_us: np.ndarray, durations_us: np.ndarray, duration_s: float, after_s: float) -> float:
    """Calls/s that ended between ``after_s`` and ``duration_s`` after the first call started."""
    if not starts_us.size or duration_s <= after_s:
        return math.nan
    ends = (starts_us + durations_us - starts_us.min()) / 1e6
    return float(np.count_nonzero((ends >= after_s) & (ends <= duration_s))) / (duration_s - after_s)


GRPC_HEADERS = ("content-type: application/grpc", "te: trailers")


def run_h2load(
    port: int,
    path: str,
    body: Path,
    load: Load,
    duration_s: float,
    response_bytes: int,
    frames: int = 1,
    threads: int = 1,
    host: str = "127.0.0.1",
    timeout_s: float | None = None,
    steady_after_s: float = 0.0,
    headers: tuple[str, ...] = GRPC_HEADERS,
    http1: bool = False,
) -> H2LoadResult:
    """Run h2load for ``duration_s`` at ``load`` against ``host:port`` + ``path``.

    ``response_bytes`` is the DATA size of one good response (all frames of it), used to
    detect gRPC errors hidden behind HTTP 200. No h2load warm-up phase is used: it would
    count warm-up DATA bytes in the totals; callers warm up with a separate short run.
    ``steady_after_s`` > 0 also counts, from the per-call log, the rate after that many seconds
    (``steady_requests_per_s``), scaled by the share of calls that carried a good response.
    ``http1`` drives HTTP/1.1 (``--h1``: REST servers; ``load.clients`` connections with
    ``load.streams`` pipelined requests each) with ``headers`` instead of gRPC's; HTTP/1.1 errors
    are non-2xx statuses, which h2load itself counts as failed.
    """
    binary = ensure_h2load()
    with tempfile.TemporaryDirectory(prefix="h2load-") as tmp:
        log_file = Path(tmp) / "requests.tsv"
        cmd = [
            binary,
            "-D", f"{round(duration_s * 1000)}ms",
            "-c", str(load.clients),
            "-m", str(load.streams),
            "-t", str(min(threads, load.clients)),
            *[arg for header in headers for arg in ("--header", header)],
            *(["--h1"] if http1 else []),
            "-d", str(body),
            "--log-file", str(log_file),
            f"http://{host}:{port}{path}",
        ]  # fmt: skip
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout_s or duration_s + 30, check=False
        )
        if proc.returncode != 0:
            raise RuntimeError(f"h2load exited {proc.returncode}: {proc.stderr[-1000:]}{proc.stdout[-1000:]}")
        summary = parse_output(proc.stdout)
        starts, durations = read_log(log_file)
        p50, p99, mean, mx = latency_percentiles_ms(durations)
    expected = summary["succeeded"] * response_bytes
    missing = max(0, expected - summary["data_bytes"])
    grpc_errors = math.ceil(missing / response_bytes) if response_bytes else 0
    good = summary["succeeded"] - grpc_errors
    duration = summary["duration_s"] or duration_s
    steady = math.nan
    if steady_after_s > 0:
        good_share = good / summary["succeeded"] if summary["succeeded"] else 0.0
        steady = steady_rate(starts, durations, duration, steady_after_s) * good_share
    return H2LoadResult(
        requests_per_s=good / duration,
        messages_per_s=good * frames / duration,
        succeeded=good,
        failed=summary["failed"],
        grpc_errors=grpc_errors,
        data_bytes=summary["data_bytes"],
        duration_s=duration,
        p50_ms=p50,
        p99_ms=p99,
        mean_ms=mean,
        max_ms=mx,
        steady_requests_per_s=steady,
        steady_after_s=steady_after_s,
    )


def warm_up(port: int, path: str, body: Path, load: Load, requests: int = 200, host: str = "127.0.0.1",
            headers: tuple[str, ...] = GRPC_HEADERS, http1: bool = False) -> None:
    """A short untimed run: opens connections, fills caches, lets lazy initialisation happen."""
    binary = ensure_h2load()
    cmd = [
        binary, "-n", str(max(requests, load.in_flight)), "-c", str(load.clients), "-m", str(load.streams),
        *[arg for header in headers for arg in ("--header", header)], *(["--h1"] if http1 else []),
        "-d", str(body), f"http://{host}:{port}{path}",
    ]  # fmt: skip
    subprocess.run(cmd, capture_output=True, timeout=120, check=False)
