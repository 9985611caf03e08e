"""Serving behaviour under load: batching, a full queue, deadlines, live load/unload,
SIGTERM draining and multi-process workers, each against a real server."""

from __future__ import annotations

import asyncio
import shutil
import signal
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aioclient
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from conftest import slow_model, write_model
from lockgate.demo import mlp_model
from lockgate_process import LockgateProcess


def _stats(client, model: str):
    return client.get_inference_statistics(model).model_stats[0]


def test_concurrent_requests_are_batched_and_split_back(server, client, dataplane_repo):
    sess = ort.InferenceSession(str(dataplane_repo / "mlp" / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(5)
    xs = [rng.standard_normal((1 + i % 3, 32)).astype(np.float32) for i in range(96)]
    before = _stats(client, "mlp").execution_count

    async def run() -> list[np.ndarray]:
        c = aioclient.InferenceServerClient(server.url)
        try:
            async def one(i: int, x: np.ndarray) -> np.ndarray:
                inp = aioclient.InferInput("INPUT0", list(x.shape), "FP32")
                inp.set_data_from_numpy(x)
                result = await c.infer("mlp", [inp], request_id=str(i))
                assert result.get_response().id == str(i)
                return result.as_numpy("OUTPUT0")
            return await asyncio.gather(*(one(i, x) for i, x in enumerate(xs)))
        finally:
            await c.close()

    outputs = asyncio.run(run())
    for x, out in zip(xs, outputs):
        assert out.shape == (x.shape[0], 4)
        np.testing.assert_allclose(out, sess.run(None, {"INPUT0": x})[0], rtol=1e-5, atol=1e-6)
    stats = _stats(client, "mlp")
    executions = stats.execution_count - before
    assert executions < len(xs), f"{executions} executions for {len(xs)} concurrent requests: nothing was batched"
    assert max(b.batch_size for b in stats.batch_stats) > 3  # rows from several requests in one run


def _slow_request(rows: int) -> tuple[list, np.ndarray]:
    x = np.ones((rows, 384), np.float32) * 0.01
    inp = grpcclient.InferInput("INPUT0", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    return [inp], x


def _concurrently(fns):
    results: list = [None] * len(fns)

    def call(i, fn):
        try:
            results[i] = fn()
        except Exception as exc:  # collected and asserted on by the caller
            results[i] = exc

    threads = [threading.Thread(target=call, args=(i, fn)) for i, fn in enumerate(fns)]
    for t in threads:
        t.start()
        time.sleep(0.005)
    for t in threads:
        t.join()
    return results


def test_full_queue_gives_resource_exhausted_at_once(server, client):
    inputs, _ = _slow_request(512)

    def call():
        start = time.monotonic()
        try:
            grpcclient.InferenceServerClient(server.url).infer("slow", inputs)
            return ("ok", time.monotonic() - start)
        except InferenceServerException as exc:
            return (exc.status(), time.monotonic() - start, exc.message())

    results = _concurrently([call] * 12)
    refused = [r for r in results if r[0] == "StatusCode.RESOURCE_EXHAUSTED"]
    served = [r for r in results if r[0] == "ok"]
    assert refused and served, results
    assert len(refused) + len(served) == len(results), results
    assert "queue is full" in refused[0][2] and "max_queue_size 3" in refused[0][2]
    # Refusals do not wait for the queue: they come back faster than the slowest success.
    assert max(r[1] for r in refused) < max(r[1] for r in served)


def test_expired_deadline_is_never_run(server, client):
    inputs, _ = _slow_request(768)
    before = _stats(client, "slow").execution_count

    def long_call():
        return grpcclient.InferenceServerClient(server.url).infer("slow", inputs).as_numpy("OUTPUT0").shape

    def short_call():
        try:
            grpcclient.InferenceServerClient(server.url).infer("slow", inputs, client_timeout=0.1)
            return "ok"
        except InferenceServerException as exc:
            return exc.status()

    results = _concurrently([long_call, long_call, short_call])
    assert results[:2] == [(768, 384), (768, 384)]
    assert results[2] == "StatusCode.DEADLINE_EXCEEDED"
    time.sleep(0.5)
    assert _stats(client, "slow").execution_count - before == 2  # the expired request never ran


@pytest.fixture()
def private_repo(tmp_path: Path) -> Path:
    repo = tmp_path / "models"
    cfg = "max_batch_size: 16\ndynamic_batching: {max_queue_delay_us: 0}\nversion_policy: {all: {}}\n"
    write_model(repo, "clf", 1, mlp_model([8, 16, 3], seed=1), cfg)
    write_model(repo, "other", 1, mlp_model([8, 16, 3], seed=2), cfg)
    return repo


def test_load_and_unload_under_load_fail_nothing(private_repo: Path, tmp_path: Path):
    with LockgateProcess(private_repo) as proc:
        stop = threading.Event()
        counts = {"ok": 0, "versions": set(), "errors": []}

        def load_loop():
            c = grpcclient.InferenceServerClient(proc.url)
            x = np.ones((1, 8), np.float32)
            inp = grpcclient.InferInput("features", [1, 8], "FP32")
            inp.set_data_from_numpy(x)
            while not stop.is_set():
                try:
                    r = c.infer("clf", [inp])
                    counts["ok"] += 1
                    counts["versions"].add(r.get_response().model_version)
                except Exception as exc:
                    counts["errors"].append(repr(exc))

        threads = [threading.Thread(target=load_loop) for _ in range(4)]
        for t in threads:
            t.start()
        admin = grpcclient.InferenceServerClient(proc.url)
        time.sleep(0.5)
        shutil.copytree(private_repo / "clf" / "1", private_repo / "clf" / "2")
        admin.load_model("clf")  # adds version 2, which becomes the default
        time.sleep(0.5)
        shutil.rmtree(private_repo / "clf" / "1")
        admin.load_model("clf")  # version 1 leaves and drains
        time.sleep(0.5)
        admin.unload_model("other")
        admin.load_model("other")
        time.sleep(0.3)
        stop.set()
        for t in threads:
            t.join()
        assert counts["errors"] == []
        assert counts["ok"] > 50
        assert counts["versions"] == {"1", "2"}
        assert [m.version for m in admin.get_model_repository_index().models if m.name == "clf"] == ["2"]
        assert admin.is_model_ready("clf", "2") and not admin.is_model_ready("clf", "1")
        assert "model 'clf' version 1 unloaded (drained)" in proc.log()


def test_unload_then_request_is_not_found(private_repo: Path):
    with LockgateProcess(private_repo) as proc:
        c = grpcclient.InferenceServerClient(proc.url)
        c.unload_model("other")
        inp = grpcclient.InferInput("features", [1, 8], "FP32")
        inp.set_data_from_numpy(np.ones((1, 8), np.float32))
        with pytest.raises(InferenceServerException) as err:
            c.infer("other", [inp])
        assert err.value.status() == "StatusCode.NOT_FOUND"
        with pytest.raises(InferenceServerException) as err:
            c.load_model("never-existed")
        assert err.value.status() == "StatusCode.NOT_FOUND"


def test_sigterm_drains_every_accepted_request(tmp_path: Path):
    repo = tmp_path / "models"
    write_model(repo, "slow", 1, slow_model(), "max_batch_size: 0\ndynamic_batching: {max_queue_size: 64}\nruntime: {execution: thread}\n")
    proc = LockgateProcess(repo).wait_ready()
    inputs, _ = _slow_request(256)
    results: list = []

    def call():
        try:
            results.append(grpcclient.InferenceServerClient(proc.url).infer("slow", inputs).as_numpy("OUTPUT0").shape)
        except Exception as exc:
            results.append(exc)

    threads = [threading.Thread(target=call) for _ in range(6)]
    for t in threads:
        t.start()
    # All six are accepted (queued or running) well before the last one can finish.
    deadline = time.monotonic() + 10
    with grpc.insecure_channel(proc.url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        while time.monotonic() < deadline:
            s = stub.ModelStatistics(service_pb2.ModelStatisticsRequest(name="slow")).model_stats[0]
            if s.execution_count >= 1:
                break
            time.sleep(0.01)
    proc.proc.send_signal(signal.SIGTERM)
    for t in threads:
        t.join()
    code = proc.proc.wait(60)
    log = proc.log()
    proc.terminate()
    assert results == [(256, 384)] * 6, log
    assert code == 0, log
    assert "draining in-flight requests" in log


def test_workers_share_one_port(tmp_path: Path):
    repo = tmp_path / "models"
    write_model(repo, "clf", 1, mlp_model([8, 16, 3], seed=1), "max_batch_size: 8\n")
    with LockgateProcess(repo, args=["--workers", "2"]) as proc:
        pids: set[str] = set()
        # Readiness is one worker answering; the other may still be loading its models, and
        # until it listens the kernel hands every connection to the first. New connections
        # until both have answered (or the deadline says the second never came up).
        deadline = time.monotonic() + 60
        connections = 0
        while (len(pids) < 2 or connections < 40) and time.monotonic() < deadline:
            connections += 1
            with grpc.insecure_channel(proc.url) as channel:
                stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
                _, call = stub.ServerMetadata.with_call(service_pb2.ServerMetadataRequest())
                pids.update(v for k, v in call.trailing_metadata() if k == "lockgate-worker-pid")
                inp = service_pb2.ModelInferRequest(model_name="clf")
                inp.inputs.add(name="features", datatype="FP32", shape=[1, 8])
                inp.raw_input_contents.append(np.ones((1, 8), np.float32).tobytes())
                assert len(stub.ModelInfer(inp).raw_output_contents[0]) == 12
        assert len(pids) == 2, pids
        assert str(proc.proc.pid) not in pids  # the parent only supervises
    assert proc.proc.returncode == 0
