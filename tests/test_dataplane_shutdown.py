"""The process's edges against real servers: SIGTERM under load loses no accepted request
(gRPC unary or streamed, REST) and refuses new connections on both ports while it drains, and
the ports are this lockgate's own (a stranger on the gRPC or the HTTP port, or a metrics port
already taken, is a one-line startup error)."""

from __future__ import annotations

import collections
import errno
import http.client
import json
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.grpc import service_pb2, service_pb2_grpc

from conftest import write_model
from lockgate.demo import mlp_model
from lockgate_process import LOCKGATE, LockgateProcess, free_port

LOSSES = {"CANCELLED", "INTERNAL", "UNKNOWN", "DEADLINE_EXCEEDED"}


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("shutdown") / "models"
    write_model(repo, "clf", 1, mlp_model([8, 64, 3], seed=1),
                "max_batch_size: 8\ndynamic_batching: {max_queue_delay_us: 200}\n")
    return repo


def _request() -> service_pb2.ModelInferRequest:
    request = service_pb2.ModelInferRequest(model_name="clf")
    request.inputs.add(name="features", datatype="FP32", shape=[1, 8])
    request.raw_input_contents.append(np.ones((1, 8), np.float32).tobytes())
    return request


def _unary_client(url: str, outcomes: collections.Counter, started: threading.Barrier) -> None:
    """Calls until refused, as a client that moves to another replica would."""
    client = grpcclient.InferenceServerClient(url)
    x = grpcclient.InferInput("features", [1, 8], "FP32")
    x.set_data_from_numpy(np.ones((1, 8), np.float32))
    client.infer("clf", [x])
    started.wait()
    while True:
        try:
            assert client.infer("clf", [x]).as_numpy("probabilities").shape == (1, 3)
            outcomes["OK"] += 1
        except grpcclient.InferenceServerException as exc:
            outcomes[str(exc.status()).removeprefix("StatusCode.")] += 1
            break


def _stream_client(url: str, outcomes: collections.Counter, started: threading.Barrier) -> None:
    """A stream that keeps sending until its replies stop: every reply is an answer or a refusal."""
    replies: list = []
    done = threading.Event()

    def messages():
        for _ in range(200_000):
            if done.is_set():
                return
            yield _request()
            time.sleep(0.002)

    with grpc.insecure_channel(url) as channel:
        stream = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer(messages(), timeout=120)
        started.wait()
        try:
            for reply in stream:
                replies.append(reply)
            outcomes["stream_end_OK"] += 1
        except grpc.RpcError as exc:
            outcomes[f"stream_end_{exc.code().name}"] += 1
        finally:
            done.set()
    for reply in replies:
        if reply.error_message:
            assert "shutting down" in reply.error_message, reply.error_message
            outcomes["stream_refused"] += 1
        else:
            assert len(reply.infer_response.raw_output_contents[0]) == 12
            outcomes["stream_OK"] += 1


REST_BODY = json.dumps({"inputs": [{"name": "features", "datatype": "FP32", "shape": [1, 8], "data": [1.0] * 8}]})


def _rest_client(address: str, outcomes: collections.Counter, started: threading.Barrier) -> None:
    """A keep-alive REST client that calls until refused: 200s, then a 503 on its open
    connection or a refused new connection. A request sent that gets no answer is a loss."""
    host, port = address.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=60)

    def call() -> int:
        conn.request("POST", "/v2/models/clf/infer", REST_BODY, {"Content-Type": "application/json"})
        response = conn.getresponse()
        body = response.read()
        if response.status == 200:
            assert len(json.loads(body)["outputs"][0]["data"]) == 3
        return response.status

    call()
    started.wait()
    while True:
        try:
            status = call()
        except ConnectionRefusedError:
            outcomes["rest_connect_refused"] += 1  # a new connection during the drain: nothing was sent
            break
        except (http.client.HTTPException, OSError) as exc:
            outcomes[f"rest_LOST_{type(exc).__name__}"] += 1
            break
        if status == 200:
            outcomes["rest_OK"] += 1
            continue
        outcomes[f"rest_{status}"] += 1
        break
    conn.close()


def _watch_listeners(ports: list[int], proc, refused: dict[int, bool], stop: threading.Event) -> None:
    """After SIGTERM: does a new connection to each port get refused while the process lives?"""
    while not stop.is_set() and not all(refused.values()):
        for port in ports:
            if refused[port]:
                continue
            with socket.socket() as sock:
                sock.settimeout(5)
                code = sock.connect_ex(("127.0.0.1", port))
            if code == errno.ECONNREFUSED and proc.poll() is None:
                refused[port] = True
        time.sleep(0.002)


@pytest.mark.parametrize("run", range(5))
def test_sigterm_under_load_loses_no_accepted_request(repo: Path, run: int) -> None:
    """Before: 4-15 of 16 in-flight requests CANCELLED per SIGTERM (grpc cancels what its core
    had received but not handed over), and the process exited 0.1-0.5 s later."""
    proc = LockgateProcess(repo).wait_ready()
    outcomes: collections.Counter = collections.Counter()
    started = threading.Barrier(16 + 2 + 4 + 1)
    threads = [threading.Thread(target=_unary_client, args=(proc.url, outcomes, started)) for _ in range(16)]
    threads += [threading.Thread(target=_stream_client, args=(proc.url, outcomes, started)) for _ in range(2)]
    threads += [threading.Thread(target=_rest_client, args=(proc.http_url, outcomes, started)) for _ in range(4)]
    for thread in threads:
        thread.start()
    started.wait(timeout=60)
    time.sleep(0.5)  # under load
    refused = {proc.port: False, proc.http_port: False}
    stop = threading.Event()
    watcher = threading.Thread(target=_watch_listeners, args=(list(refused), proc.proc, refused, stop))
    proc.proc.send_signal(signal.SIGTERM)
    watcher.start()
    for thread in threads:
        thread.join(120)
    code = proc.proc.wait(60)
    stop.set()
    watcher.join(30)
    log = proc.log()
    proc.terminate()
    assert code == 0, log[-3000:]
    assert not LOSSES & set(outcomes), (dict(outcomes), log[-3000:])
    assert not [k for k in outcomes if "LOST" in k], (dict(outcomes), log[-3000:])
    assert outcomes["OK"] > 16 and outcomes["stream_OK"] > 0 and outcomes["rest_OK"] > 4, dict(outcomes)
    # Every REST client ends with a refusal: a 503 on its connection, or a refused new one.
    assert outcomes["rest_503"] + outcomes["rest_connect_refused"] == 4, dict(outcomes)
    # While it drained, the kernel refused new connections on both ports.
    assert all(refused.values()), refused
    # Every unary client ends with a refusal, never a lost call; streams end OK or UNAVAILABLE.
    assert outcomes["UNAVAILABLE"] == 16, dict(outcomes)
    assert outcomes["stream_end_OK"] + outcomes["stream_end_UNAVAILABLE"] == 2, dict(outcomes)
    assert "drain complete" in log and "Traceback" not in log, log[-3000:]


def _lockgate(repo: Path, grpc_port: int, metrics_port: int, tmp: Path, *extra: str,
              http_port: int | None = None) -> subprocess.Popen:
    http_port = free_port() if http_port is None else http_port
    return subprocess.Popen(
        [*LOCKGATE, "serve", "--model-repository", str(repo), "--grpc-port", str(grpc_port), "--metrics-port",
         str(metrics_port), "--http-port", str(http_port), "--host", "127.0.0.1",
         "--state-dir", str(tmp / f"state-{grpc_port}-{metrics_port}"), "--allow-unapproved", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _pids_answering(url: str, connections: int) -> set[str]:
    pids: set[str] = set()
    for _ in range(connections):  # a new connection each: the kernel picks a listener per connection
        with grpc.insecure_channel(url, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            _, call = stub.ServerMetadata.with_call(service_pb2.ServerMetadataRequest(), timeout=30)
            pids.update(v for k, v in call.trailing_metadata() if k == "lockgate-worker-pid")
    return pids


def test_a_second_server_cannot_take_a_port_that_is_serving(repo: Path, tmp_path: Path) -> None:
    with LockgateProcess(repo) as first:
        stranger = _lockgate(repo, first.port, free_port(), tmp_path)
        out, _ = stranger.communicate(timeout=120)
        assert stranger.returncode == 2, out
        assert f"gRPC port {first.port} on 127.0.0.1 is already in use by another process" in out, out
        assert "Traceback" not in out and "lockgate ready on" not in out, out
        assert _pids_answering(first.url, 30) == {str(first.proc.pid)}  # no traffic went astray
        # The same on the HTTP port: a stranger with a gRPC port of its own still cannot share it.
        stranger = _lockgate(repo, free_port(), free_port(), tmp_path, http_port=first.http_port)
        out, _ = stranger.communicate(timeout=120)
        assert stranger.returncode == 2, out
        assert f"HTTP port {first.http_port} on 127.0.0.1 is already in use by another process" in out, out
        assert "Traceback" not in out and "lockgate ready on" not in out, out
        status, _ = first.post("/v2/repository/index")
        assert status == 200
        # --workers siblings still share the ports: the owner claims them for them.
        port, http_port = free_port(), free_port()
        workers = _lockgate(repo, port, free_port(), tmp_path, "--workers", "2", http_port=http_port)
        try:
            deadline = time.monotonic() + 90
            pids: set[str] = set()
            while len(pids) < 2 and time.monotonic() < deadline:
                try:
                    pids |= _pids_answering(f"127.0.0.1:{port}", 10)
                except grpc.RpcError:
                    time.sleep(0.2)
            assert len(pids) == 2, pids
            for _ in range(10):  # the workers serve REST on the one HTTP port too
                with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/v2", timeout=30) as reply:
                    assert reply.status == 200
            late = _lockgate(repo, port, free_port(), tmp_path)
            out, _ = late.communicate(timeout=120)
            assert late.returncode == 2 and "already in use by another process" in out, out
            late = _lockgate(repo, free_port(), free_port(), tmp_path, http_port=http_port)
            out, _ = late.communicate(timeout=120)
            assert late.returncode == 2 and f"HTTP port {http_port}" in out, out
        finally:
            workers.send_signal(signal.SIGTERM)
            assert workers.wait(120) == 0


def test_a_taken_metrics_port_is_a_one_line_error(repo: Path, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = _lockgate(repo, free_port(), port, tmp_path)
        out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2, out
    errors = [line for line in out.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and f"metrics port {port}" in errors[0], out
    assert "Traceback" not in out and "nanobind" not in out and "leaked" not in out, out
