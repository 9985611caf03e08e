"""Inline validation through a real server: each rule refused with INVALID_ARGUMENT and a
google.rpc.BadRequest naming input, row, feature and rule; flag mode serves and counts."""

from __future__ import annotations

import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from tritonclient.grpc import service_pb2, service_pb2_grpc

from conftest import write_model
from lockgate.demo import mlp_model
from lockgate_process import LockgateProcess

GOVERNANCE = """
governance:
  mode: {mode}
  sampling: {{rate: 0.0}}
  inputs:
    features:
      feature_names: [age, income, ratio, region]
      features:
        age: {{min: 18, max: 120}}
        income: {{min: 0, allow_inf: false}}
        ratio: {{allow_nan: false}}
        region: {{allowed: [0, 1, 2]}}
"""


@pytest.fixture(scope="module")
def governed(tmp_path_factory: pytest.TempPathFactory):
    repo = tmp_path_factory.mktemp("gov") / "models"
    for name, mode in (("strict", "reject"), ("lenient", "flag")):
        write_model(repo, name, 1, mlp_model([4, 8, 2], seed=3), "max_batch_size: 16\n" + GOVERNANCE.format(mode=mode))
    with LockgateProcess(repo) as proc:
        yield proc


GOOD = [30.0, 1000.0, 0.5, 1.0]
CASES = [
    ("below min", 0, "age", 10.0, "min"),
    ("above max", 0, "age", 200.0, "max"),
    ("infinity", 1, "income", float("inf"), "inf"),
    ("nan", 2, "ratio", float("nan"), "nan"),
    ("not allowed", 3, "region", 7.0, "allowed"),
]


def _request(model: str, rows: np.ndarray) -> service_pb2.ModelInferRequest:
    request = service_pb2.ModelInferRequest(model_name=model, id="gov-1")
    request.inputs.add(name="features", datatype="FP32", shape=list(rows.shape))
    request.raw_input_contents.append(rows.astype(np.float32).tobytes())
    return request


@pytest.mark.parametrize("label,index,feature,value,rule", CASES, ids=[c[0] for c in CASES])
def test_each_rule_rejects_with_details(governed, label, index, feature, value, rule):
    rows = np.array([GOOD, GOOD, GOOD], dtype=np.float32)
    rows[2, index] = value
    with grpc.insecure_channel(governed.url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            stub.ModelInfer(_request("strict", rows))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        message = err.value.details()
        assert "input 'features'" in message and "row 2" in message, message
        assert f"'{feature}'" in message and f"index {index}" in message, message
        status = rpc_status.from_call(err.value)
        assert status is not None and status.details, "BadRequest details missing"
        bad = error_details_pb2.BadRequest()
        assert status.details[0].Unpack(bad)
        assert len(bad.field_violations) == 1
        violation = bad.field_violations[0]
        assert violation.field == f"inputs[features][2][{index}]"
        assert f"feature '{feature}'" in violation.description and rule in violation.description.lower()
        # the same server keeps answering good requests
        ok = stub.ModelInfer(_request("strict", np.array([GOOD], np.float32)))
        assert len(ok.raw_output_contents[0]) == 8


def test_many_violations_are_capped_in_details(governed):
    rows = np.tile(np.array([[5.0, -1.0, np.nan, 9.0]], np.float32), (16, 1))
    with grpc.insecure_channel(governed.url) as channel, pytest.raises(grpc.RpcError) as err:
        service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(_request("strict", rows))
    bad = error_details_pb2.BadRequest()
    rpc_status.from_call(err.value).details[0].Unpack(bad)
    assert 0 < len(bad.field_violations) <= 50
    assert len(bad.field_violations) >= 50 or len(bad.field_violations) == 64


def _metric(url: str, name: str, **labels: str) -> float:
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_flag_mode_serves_and_counts(governed):
    metrics = f"http://127.0.0.1:{governed.metrics_port}/metrics"
    before = _metric(metrics, "lockgate_validation_violations_total", model="lenient", feature="age", rule="min")
    rows = np.array([GOOD, GOOD], dtype=np.float32)
    rows[1, 0] = 3.0
    with grpc.insecure_channel(governed.url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        for _ in range(5):
            response = stub.ModelInfer(_request("lenient", rows))
            assert np.frombuffer(response.raw_output_contents[0], np.float32).shape == (4,)
    after = _metric(metrics, "lockgate_validation_violations_total", model="lenient", feature="age", rule="min")
    assert after - before == 5
    # flagged requests are always sampled into the payload log
    assert _metric(metrics, "lockgate_payload_samples_total", model="lenient") >= 5
