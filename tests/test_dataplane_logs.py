"""Logs under attack, against a real server: problems that can repeat on every request are
counted per cause and logged at most once a while, never a traceback per request."""

from __future__ import annotations

import asyncio
import random
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
from tritonclient.grpc import service_pb2, service_pb2_grpc

from conftest import slow_model, write_model
from lockgate.demo import mlp_model
from lockgate_process import LockgateProcess
from replica_helpers import wait_for


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("logs")
    blocker = root / "not-a-directory"
    blocker.write_text("a file where the payload log wants a directory")
    repo = root / "models"
    write_model(repo, "logged", 1, mlp_model([4, 8, 2], seed=1),
                "max_batch_size: 8\ngovernance:\n  sampling: {rate: 1.0, max_per_second: 100000}\n"
                f"  payload_log: {{dir: {blocker / 'payloads'}}}\n")
    write_model(repo, "slow", 1, slow_model(width=256, depth=24),
                "max_batch_size: 8\ndynamic_batching: {max_queue_size: 1024, max_queue_delay_us: 1000}\n"
                "runtime: {execution: inline}\n")
    with LockgateProcess(repo) as proc:
        yield proc


def scrape(server: LockgateProcess) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=30).read().decode()


def series(text: str, name: str, **labels: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_payload_log_write_failures_are_counted_not_traced(server: LockgateProcess) -> None:
    """Before: a traceback in the log for every sampled request while the disk refused writes."""
    request = service_pb2.ModelInferRequest(model_name="logged", id="r")
    request.inputs.add(name="features", datatype="FP32", shape=[1, 4])
    request.raw_input_contents.append(np.ones((1, 4), np.float32).tobytes())
    with grpc.insecure_channel(server.url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        for i in range(300):
            request.id = f"r{i}"
            assert stub.ModelInfer(request, timeout=30).raw_output_contents  # serving goes on
    wait_for(lambda: series(scrape(server), "lockgate_payload_dropped_total", model="logged",
                            reason="write_failed") >= 300, 60, 0.1, "300 write_failed drops counted")
    log = server.log()
    assert "Traceback" not in log, log[-3000:]
    assert 1 <= log.count("payload log write failed") <= 3, log[-3000:]


def test_expired_calls_are_counted_not_traced(server: LockgateProcess) -> None:
    """Calls whose deadline passes while queued or running behind a model that holds the event
    loop: answered DEADLINE_EXCEEDED or dropped by the caller, never a traceback."""
    request = service_pb2.ModelInferRequest(model_name="slow")
    request.inputs.add(name="INPUT0", datatype="FP32", shape=[4, 256])
    request.raw_input_contents.append(np.full((4, 256), 0.01, np.float32).tobytes())

    async def flood() -> dict[str, int]:
        counts: dict[str, int] = {}
        async with grpc.aio.insecure_channel(server.url) as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)

            async def one() -> None:
                try:
                    await stub.ModelInfer(request, timeout=random.uniform(0.001, 0.03))
                    code = "OK"
                except grpc.RpcError as exc:
                    code = exc.code().name
                counts[code] = counts.get(code, 0) + 1

            for _ in range(10):
                await asyncio.gather(*(one() for _ in range(64)))
        return counts

    counts = asyncio.run(flood())
    assert set(counts) <= {"OK", "DEADLINE_EXCEEDED", "CANCELLED"}, counts
    assert counts.get("DEADLINE_EXCEEDED", 0) > 100, counts
    time.sleep(1.0)  # any late log line of the expired calls
    log = server.log()
    assert "Traceback" not in log and "ExecuteBatchError" not in log, log[-3000:]
    text = scrape(server)
    assert series(text, "lockgate_inference_request_failure_total", model="slow", reason="deadline_exceeded") > 0
    # Still serving.
    with grpc.insecure_channel(server.url) as channel:
        assert service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=60).raw_output_contents


def test_cause_log_counts_every_occurrence_and_logs_once_per_interval(caplog: pytest.LogCaptureFixture) -> None:
    import logging

    from lockgate.telemetry.logs import CauseLog

    now = [0.0]
    events = CauseLog(logging.getLogger("lockgate.test"), interval_s=10, clock=lambda: now[0])
    with caplog.at_level(logging.INFO, logger="lockgate.test"):
        for i in range(100):
            now[0] = i * 0.5  # 50 s of one failure every 0.5 s
            events.record("disk", "write failed (%d)", i)
        events.record("other", "another cause")
    assert events.counts() == {"disk": 100, "other": 1}
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 6 and lines[0] == "write failed (0)" and lines[-1] == "another cause"
    assert "19 more since the last report" in lines[1], lines
