"""Governance that no request can size, skip or slip past, against a real server: the feature
count comes from the model or the config (never from the first request), a request of another
width is refused naming the governed width, and NaN/±Inf are refused on every feature of a
governed input, named in a rule or not."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from onnx import TensorProto
from tritonclient.grpc import service_pb2, service_pb2_grpc

from conftest import credit_rows, write_model
from lockgate.demo import build_demo_repository
from lockgate_process import LockgateProcess
from test_dataplane_hostile import free_identity, memory, status_of

RULED = """\
max_batch_size: 0
governance:
  mode: reject
  inputs:
    INPUT0:
      features: {0: {min: 0}}
"""
COUNTED = """\
max_batch_size: 0
governance:
  inputs:
    INPUT0: {feature_count: 4}
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    repo = build_demo_repository(tmp_path_factory.mktemp("width") / "models")
    write_model(repo, "free", 1, free_identity(TensorProto.FLOAT, "free"), "max_batch_size: 0\n")
    write_model(repo, "ruled", 1, free_identity(TensorProto.FLOAT, "ruled"), RULED)
    write_model(repo, "counted", 1, free_identity(TensorProto.FLOAT, "counted"), COUNTED)
    with LockgateProcess(repo) as proc:
        yield proc


@pytest.fixture(scope="module")
def stub(server: LockgateProcess):
    with grpc.insecure_channel(server.url, options=[("grpc.max_send_message_length", 80 << 20),
                                                    ("grpc.max_receive_message_length", 80 << 20)]) as channel:
        yield service_pb2_grpc.GRPCInferenceServiceStub(channel)


def fp32(model: str, x: np.ndarray, name: str = "INPUT0") -> service_pb2.ModelInferRequest:
    request = service_pb2.ModelInferRequest(model_name=model)
    request.inputs.add(name=name, datatype="FP32", shape=list(x.shape))
    request.raw_input_contents.append(np.ascontiguousarray(x, np.float32).tobytes())
    return request


def test_a_free_feature_dimension_is_not_sized_by_the_first_request(server: LockgateProcess, stub) -> None:
    """Before: a 1 MiB first request (262,144 features) asked for ~16 GiB of per-feature state
    and got INTERNAL; a 64 MiB one left GBs resident."""
    before = memory(server.proc.pid)
    for width in (262_144, 3, 4_000_000):
        x = np.ones((1, width), np.float32)
        reply = stub.ModelInfer(fp32("free", x), timeout=120)
        assert len(reply.raw_output_contents[0]) == x.nbytes
    after = memory(server.proc.pid)
    # A 16 MB identity round trip holds the request and the response a few times each (grpc,
    # protobuf, the arrays); no per-feature state (64 KiB per feature before) appears.
    assert after["VmHWM"] - before["VmHWM"] < 8 * 16_000_000, (before, after)
    # With feature_count in the config the input is profiled at that width, and another width
    # is refused naming it.
    assert stub.ModelInfer(fp32("counted", np.ones((2, 4))), timeout=60).raw_output_contents
    code, details = status_of(stub.ModelInfer, fp32("counted", np.ones((1, 5000))), timeout=60)
    assert code is grpc.StatusCode.INVALID_ARGUMENT and "4 features per row" in details, details


@pytest.mark.parametrize("width", [2, 32])
def test_rules_cannot_be_skipped_by_reshaping(stub, width: int) -> None:
    bad_narrow = np.array([[-5.0]])
    code, details = status_of(stub.ModelInfer, fp32("ruled", bad_narrow), timeout=60)
    assert code is grpc.StatusCode.INVALID_ARGUMENT and "breaks rule min=0" in details
    # The same value in feature 0 of a wider row: refused too, naming the governed width.
    wide = np.ones((1, width), np.float32)
    wide[0, 0] = -5.0
    code, details = status_of(stub.ModelInfer, fp32("ruled", wide), timeout=60)
    assert code is grpc.StatusCode.INVALID_ARGUMENT, (code, details)
    assert "does not give 1 feature per row" in details and f"[1, {width}]" in details, details
    # A valid request of the governed width is served.
    assert stub.ModelInfer(fp32("ruled", np.array([[3.0], [4.0]])), timeout=60).raw_output_contents


@pytest.mark.parametrize("feature, value, rule", [
    ("credit_lines", np.nan, "allow_nan=false"),
    ("tenure_months", np.inf, "allow_inf=false"),
    ("late_payments", -np.inf, "allow_inf=false"),
])
def test_nan_and_inf_are_refused_on_features_without_a_rule(stub, feature: str, value: float, rule: str) -> None:
    from lockgate.demo import DEMO_FEATURES

    x = credit_rows(3)
    x[1, DEMO_FEATURES.index(feature)] = value
    code, details = status_of(stub.ModelInfer, fp32("credit", x, "features"), timeout=60)
    assert code is grpc.StatusCode.INVALID_ARGUMENT, (code, details)
    assert f"row 1 feature '{feature}'" in details and rule in details, details
    assert stub.ModelInfer(fp32("credit", credit_rows(3), "features"), timeout=60).raw_output_contents


def test_rest_requests_meet_the_same_width_and_nan_rules(server: LockgateProcess) -> None:
    """REST builds the ModelInferRequest gRPC would carry: the width and NaN/Inf rules hold
    there too, with the same messages."""
    from lockgate.demo import DEMO_FEATURES
    from test_dataplane_hostile import rest_post

    wide = [[-5.0] + [1.0] * 31]
    status, reply = rest_post(server, "/v2/models/ruled/infer",
                              {"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [1, 32], "data": wide}]})
    assert status == 400 and "does not give 1 feature per row" in reply["error"], (status, reply)
    x = credit_rows(2)
    x[0, DEMO_FEATURES.index("credit_lines")] = np.nan
    header = {"inputs": [{"name": "features", "datatype": "FP32", "shape": list(x.shape),
                          "parameters": {"binary_data_size": x.nbytes}}]}
    import json

    head = json.dumps(header).encode()
    status, reply = rest_post(server, "/v2/models/credit/infer", head + np.ascontiguousarray(x, np.float32).tobytes(),
                              {"Inference-Header-Content-Length": str(len(head))})
    assert status == 400 and "feature 'credit_lines'" in reply["error"] and "allow_nan=false" in reply["error"], reply
