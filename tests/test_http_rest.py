"""KServe v2 REST on the HTTP port: ``tritonclient.http`` unchanged, ``curl``-style JSON from the
KServe docs, Triton's binary tensor extension, and parity with gRPC (same results, same error
messages, same statistics) because both transports go down one pipeline."""

from __future__ import annotations

import gzip
import json
import threading
import urllib.error
import urllib.request
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from conftest import DATATYPES, credit_rows
from test_dataplane_tensors import BAD_REQUESTS, _credit_request, sample

HTTP_OF_GRPC = {
    grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.NOT_FOUND: 404, grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.UNAUTHENTICATED: 401, grpc.StatusCode.RESOURCE_EXHAUSTED: 429, grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}


@pytest.fixture()
def http(server):
    c = httpclient.InferenceServerClient(server.http_url, network_timeout=60, concurrency=4)
    yield c
    c.close()


def post(server, path: str, body: bytes | dict, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    request = urllib.request.Request(f"http://{server.http_url}{path}", data=data, method="POST", headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


def get(server, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://{server.http_url}{path}", timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


# ------------------------------------------------------------------------ health & metadata
def test_health_and_metadata(http):
    assert http.is_server_live() and http.is_server_ready()
    assert http.is_model_ready("credit") and http.is_model_ready("credit", "2")
    assert not http.is_model_ready("credit", "9") and not http.is_model_ready("missing")
    meta = http.get_server_metadata()
    assert meta["name"] == "lockgate" and "model_repository" in meta["extensions"] and "binary_tensor_data" in meta["extensions"]
    md = http.get_model_metadata("credit")
    assert md["name"] == "credit" and md["versions"] == ["1", "2"] and md["platform"] == "onnxruntime_onnx"
    assert md["inputs"] == [{"name": "features", "datatype": "FP32", "shape": [-1, 8]}]
    assert md["outputs"] == [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 3]}]
    assert http.get_model_metadata("credit", "2")["versions"] == ["1", "2"]


def test_model_config_is_the_grpc_config_in_json(http, client):
    cfg = http.get_model_config("credit")
    assert cfg["max_batch_size"] == 64
    assert cfg["input"][0]["dims"] == [8] and cfg["input"][0]["data_type"] == "TYPE_FP32"
    assert cfg["dynamic_batching"]["preferred_batch_size"] == [16, 32, 64]
    assert cfg["dynamic_batching"]["max_queue_delay_microseconds"] == 100
    assert cfg["parameters"]["device"]["string_value"] == "cpu"
    assert cfg["instance_group"][0]["kind"] == "KIND_CPU"
    from google.protobuf import json_format

    # the same message: parsing the JSON back gives gRPC's ModelConfig field for field
    from tritonclient.grpc import model_config_pb2

    assert json_format.ParseDict(cfg, model_config_pb2.ModelConfig()) == client.get_model_config("credit").config


def test_curl_style_json_from_the_kserve_docs(server):
    """Flat and nested ``data`` both work; the response carries id, version and route."""
    x = credit_rows(2)
    for data in (x.ravel().tolist(), x.tolist()):
        status, headers, body = post(server, "/v2/models/credit/infer", {
            "id": "docs-1", "inputs": [{"name": "features", "shape": [2, 8], "datatype": "FP32", "data": data}]})
        assert status == 200, body
        answer = json.loads(body)
        assert answer["id"] == "docs-1" and answer["model_name"] == "credit" and answer["model_version"] == "1"
        assert answer["parameters"]["lockgate_route"] == "default"
        (out,) = answer["outputs"]
        assert out["name"] == "probabilities" and out["datatype"] == "FP32" and out["shape"] == [2, 3]
        assert len(out["data"]) == 6 and abs(sum(out["data"][:3]) - 1) < 1e-5
    status, _, body = post(server, "/v2/models/credit/versions/2/infer", {
        "inputs": [{"name": "features", "shape": [1, 8], "datatype": "FP32", "data": x[:1].tolist()}]})
    assert status == 200 and json.loads(body)["model_version"] == "2"


# ------------------------------------------------------------------------------------ infer
@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
@pytest.mark.parametrize("dt", DATATYPES)
def test_datatype_round_trip(http, dt, binary):
    x = sample(dt)
    inp = httpclient.InferInput("INPUT0", list(x.shape), dt)
    inp.set_data_from_numpy(x, binary_data=binary)
    out_spec = httpclient.InferRequestedOutput("OUTPUT0", binary_data=binary)
    result = http.infer(f"identity_{dt.lower()}", [inp], outputs=[out_spec])
    out = result.as_numpy("OUTPUT0")
    assert result.get_output("OUTPUT0")["datatype"] == dt
    if dt == "BYTES":
        assert [[v if isinstance(v, bytes) else v.encode() for v in row] for row in out.tolist()] == x.tolist()
    else:
        assert out.dtype == x.dtype
        np.testing.assert_array_equal(out, x)


def test_binary_and_json_outputs_in_one_response(server):
    """Inputs as binary, one output binary and one as JSON data, per output parameters."""
    model = "identity_fp32"
    x = sample("FP32")
    header = json.dumps({
        "inputs": [{"name": "INPUT0", "shape": list(x.shape), "datatype": "FP32",
                    "parameters": {"binary_data_size": x.nbytes}}],
        "outputs": [{"name": "OUTPUT0", "parameters": {"binary_data": True}}],
    }).encode()
    status, headers, body = post(server, f"/v2/models/{model}/infer", header + x.tobytes(),
                                 {"Inference-Header-Content-Length": str(len(header)), "Content-Type": "application/octet-stream"})
    assert status == 200, body
    size = int(headers["inference-header-content-length"] if "inference-header-content-length" in headers
               else headers["Inference-Header-Content-Length"])
    answer = json.loads(body[:size])
    assert answer["outputs"][0]["parameters"]["binary_data_size"] == x.nbytes
    np.testing.assert_array_equal(np.frombuffer(body[size:], np.float32).reshape(x.shape), x)
    # the same request asking for JSON data back
    header = json.dumps({"inputs": [{"name": "INPUT0", "shape": list(x.shape), "datatype": "FP32",
                                     "parameters": {"binary_data_size": x.nbytes}}]}).encode()
    status, headers, body = post(server, f"/v2/models/{model}/infer", header + x.tobytes(),
                                 {"Inference-Header-Content-Length": str(len(header))})
    assert status == 200 and "data" in json.loads(body)["outputs"][0]


def test_compressed_request_body(http):
    x = credit_rows(3)
    inp = httpclient.InferInput("features", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    for algorithm in ("gzip", "deflate"):
        result = http.infer("credit", [inp], request_compression_algorithm=algorithm)
        assert result.as_numpy("probabilities").shape == (3, 3)


def test_request_parameters_and_requested_outputs(http):
    x = credit_rows(1)
    inp = httpclient.InferInput("features", [1, 8], "FP32")
    inp.set_data_from_numpy(x)
    result = http.infer("credit", [inp], request_id="p-1", parameters={"note": "hello", "n": 3},
                        outputs=[httpclient.InferRequestedOutput("probabilities")])
    assert result.get_response()["id"] == "p-1" and result.as_numpy("probabilities").shape == (1, 3)
    with pytest.raises(InferenceServerException) as err:
        http.infer("credit", [inp], outputs=[httpclient.InferRequestedOutput("logits_nope")])
    assert err.value.status() == "400" and "requested output 'logits_nope'" in err.value.message()


# ------------------------------------------------------------------------- errors, parity
def _rest_body(request: service_pb2.ModelInferRequest) -> tuple[str, bytes, dict[str, str]]:
    """The gRPC request as a REST body with binary tensors (the same bytes, the same shapes)."""
    inputs = []
    for index, tensor in enumerate(request.inputs):
        spec: dict[str, Any] = {"name": tensor.name, "datatype": tensor.datatype, "shape": list(tensor.shape)}
        if request.raw_input_contents:
            spec["parameters"] = {"binary_data_size": len(request.raw_input_contents[index])}
        inputs.append(spec)
    header: dict[str, Any] = {"inputs": inputs}
    if request.outputs:
        header["outputs"] = [{"name": o.name} for o in request.outputs]
    text = json.dumps(header).encode()
    path = f"/v2/models/{request.model_name}" + (f"/versions/{request.model_version}" if request.model_version else "") + "/infer"
    return path, text + b"".join(request.raw_input_contents), {"Inference-Header-Content-Length": str(len(text))}


SAME_ON_BOTH = [b for b in BAD_REQUESTS if b[0] not in ("raw count", "typed count", "missing input")]


@pytest.mark.parametrize("label,overrides,code,message", SAME_ON_BOTH, ids=[b[0] for b in SAME_ON_BOTH])
def test_bad_request_same_message_as_grpc(server, label, overrides, code, message):
    request = _credit_request(**{k: v for k, v in overrides.items() if k != "t"})
    if "t" in overrides:
        overrides["t"](request, request.inputs[0] if request.inputs else None)
    with grpc.insecure_channel(server.url) as channel, pytest.raises(grpc.RpcError) as err:
        service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request)
    path, body, headers = _rest_body(request)
    status, _, answer = post(server, path, body, headers)
    assert status == HTTP_OF_GRPC[code]
    assert json.loads(answer) == {"error": err.value.details()}
    assert message in err.value.details()
    good_path, good_body, good_headers = _rest_body(_credit_request())
    assert post(server, good_path, good_body, good_headers)[0] == 200


@pytest.mark.parametrize("body,message", [
    (b"{not json", "the request body is not valid JSON"),
    (b'{"inputs": []}', "'inputs' must be a non-empty list"),
    (b'{"inputs": [{"name": "features", "datatype": "FP32", "shape": [1, 8], "data": [1, 2]}]}',
     "input 'features': data holds 2 elements, expected 8 for shape [1, 8]"),
    (b'{"inputs": [{"name": "features", "datatype": "FP32", "shape": [1, 8], "data": [[1, 2], [3]]}]}',
     "input 'features': data is a ragged nested list"),
    (b'{"inputs": [{"name": "features", "datatype": "FP32", "shape": [1, 8], "data": ["a","b","c","d","e","f","g","h"]}]}',
     "input 'features': FP32 data must be numbers"),
    (b'{"inputs": [{"name": "features", "datatype": "FP32", "shape": [1, 2147483648]}]}',
     "input 'features' has neither 'data' nor parameters.binary_data_size"),
    (b'{"inputs": [{"name": "features", "datatype": "FP32", "shape": [1, 8], "parameters": {"binary_data_size": 32}}]}',
     "input 'features': binary_data_size 32 runs past the 0 binary bytes of the body"),
    (b'{"inputs": [{"name": "features", "datatype": "FP32", "shape": [4611686018427387904, 8], "data": [1]}]}',
     "data holds 1 elements, expected 36893488147419103232"),
])
def test_malformed_json_bodies_get_400_naming_the_problem(server, body, message):
    status, _, answer = post(server, "/v2/models/credit/infer", body)
    assert status == 400, answer
    assert message in json.loads(answer)["error"]


def test_unknown_model_and_endpoint_are_404(http, server):
    inp = httpclient.InferInput("features", [1, 8], "FP32")
    inp.set_data_from_numpy(credit_rows(1))
    with pytest.raises(InferenceServerException) as err:
        http.infer("nope", [inp])
    assert err.value.status() == "404" and "model 'nope' is not loaded" in err.value.message()
    assert get(server, "/v2/models/nope")[0] == 404
    assert get(server, "/v2/nothing/here")[0] == 404
    status, _, _ = post(server, "/v2/models/credit", {})
    assert status == 405


def test_queue_full_is_429_and_deadline_is_504(server):
    """The slow model queues 3 requests; beyond that RESOURCE_EXHAUSTED -> 429. A ``timeout``
    parameter (µs) shorter than the queue wait -> DEADLINE_EXCEEDED -> 504."""
    x = np.zeros((1, 384), np.float32)
    body = {"inputs": [{"name": "INPUT0", "shape": [1, 384], "datatype": "FP32", "data": x.ravel().tolist()}]}
    statuses: list[int] = []
    lock = threading.Lock()

    def call() -> None:
        status, _, _ = post(server, "/v2/models/slow/infer", body)
        with lock:
            statuses.append(status)

    threads = [threading.Thread(target=call) for _ in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert 200 in statuses and 429 in statuses, statuses
    assert set(statuses) <= {200, 429}
    statuses.clear()
    timed = {**body, "parameters": {"timeout": 1}}

    def timed_call() -> None:
        status, _, answer = post(server, "/v2/models/slow/infer", timed)
        with lock:
            statuses.append(status)

    blockers = [threading.Thread(target=call) for _ in range(2)]
    for t in blockers:
        t.start()
    late = [threading.Thread(target=timed_call) for _ in range(3)]
    for t in late:
        t.start()
    for t in blockers + late:
        t.join(120)
    assert 504 in statuses, statuses


# -------------------------------------------------------------------- statistics & parity
def _counts(client: grpcclient.InferenceServerClient, model: str) -> tuple[int, int, int]:
    stats = client.get_inference_statistics(model).model_stats[0]
    return stats.inference_count, stats.inference_stats.success.count, stats.inference_stats.fail.count


def _serve_all(module, client, model: str, rows: list[np.ndarray]) -> list[np.ndarray]:
    """Send ``rows`` and one bad request (wrong width) with a tritonclient module (grpc or http)."""
    outputs = []
    for x in [*rows, np.zeros((1, 31), np.float32)]:
        inp = module.InferInput("INPUT0", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        if x.shape[1] == 31:
            with pytest.raises(InferenceServerException):
                client.infer(model, [inp])
        else:
            outputs.append(client.infer(model, [inp]).as_numpy("OUTPUT0"))
    return outputs


def test_grpc_and_http_give_equal_results_and_equal_statistics(server, client, http):
    model = "mlp"
    rng = np.random.default_rng(5)
    rows = [rng.standard_normal((n, 32)).astype(np.float32) for n in (1, 3, 7)]
    before = _counts(client, model)
    grpc_out = _serve_all(grpcclient, client, model, rows)
    middle = _counts(client, model)
    http_out = _serve_all(httpclient, http, model, rows)
    after = _counts(client, model)
    for g, h in zip(grpc_out, http_out):
        np.testing.assert_array_equal(g, h)
    grpc_delta = tuple(m - b for m, b in zip(middle, before))
    http_delta = tuple(a - m for a, m in zip(after, middle))
    assert grpc_delta == http_delta == (11, 3, 1)
    # and the REST statistics endpoint reports the same counters as gRPC's
    rest_stats = http.get_inference_statistics(model)["model_stats"][0]
    grpc_stats = client.get_inference_statistics(model).model_stats[0]
    assert rest_stats["inference_count"] == grpc_stats.inference_count
    assert rest_stats["inference_stats"]["success"]["count"] == grpc_stats.inference_stats.success.count


def test_repository_index(http):
    index = http.get_model_repository_index()
    states = {(m["name"], m["version"]): m["state"] for m in index}
    assert states[("credit", "1")] == "READY" and states[("identity_fp32", "1")] == "READY"
