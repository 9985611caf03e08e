"""Every datatype round-trips, raw and typed; every kind of bad request gets the precise
status and a message naming the input, and the server keeps answering."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from conftest import DATATYPES, credit_rows


def sample(dt: str, rows: int = 3, width: int = 4) -> np.ndarray:
    rng = np.random.default_rng(sum(dt.encode()))  # stable across runs (hash() is salted)
    if dt == "BOOL":
        return rng.random((rows, width)) > 0.5
    if dt == "BYTES":
        return np.array([[f"row{r}-col{c}-é".encode() for c in range(width)] for r in range(rows)], dtype=object)
    if dt.startswith("FP"):
        dtype = {"FP16": np.float16, "FP32": np.float32, "FP64": np.float64}[dt]
        return (rng.standard_normal((rows, width)) * 100).astype(dtype)
    dtype = np.dtype(dt.lower())
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max, (rows, width), dtype=dtype, endpoint=True)


@pytest.mark.parametrize("dt", DATATYPES)
def test_datatype_round_trip_raw(client, dt):
    x = sample(dt)
    inp = grpcclient.InferInput("INPUT0", list(x.shape), dt)
    inp.set_data_from_numpy(x)
    result = client.infer(f"identity_{dt.lower()}", [inp])
    out = result.as_numpy("OUTPUT0")
    assert result.get_output("OUTPUT0").datatype == dt
    if dt == "BYTES":
        assert out.tolist() == x.tolist()
    else:
        assert out.dtype == x.dtype
        np.testing.assert_array_equal(out, x)


TYPED_FIELDS = {"BOOL": "bool_contents", "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents",
                "UINT64": "uint64_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
                "INT64": "int64_contents", "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents"}


@pytest.mark.parametrize("dt", sorted(TYPED_FIELDS))
def test_datatype_round_trip_typed_contents(server, dt):
    x = sample(dt)
    request = service_pb2.ModelInferRequest(model_name=f"identity_{dt.lower()}")
    tensor = request.inputs.add(name="INPUT0", datatype=dt, shape=list(x.shape))
    getattr(tensor.contents, TYPED_FIELDS[dt]).extend(x.ravel().tolist())
    with grpc.insecure_channel(server.url) as channel:
        response = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request)
    assert response.outputs[0].datatype == dt
    raw = response.raw_output_contents[0]
    if dt == "BYTES":
        from tritonclient.utils import deserialize_bytes_tensor

        assert deserialize_bytes_tensor(raw).reshape(x.shape).tolist() == x.tolist()
    else:
        np.testing.assert_array_equal(np.frombuffer(raw, dtype=x.dtype).reshape(x.shape), x)


def test_fp16_has_no_typed_field(server):
    request = service_pb2.ModelInferRequest(model_name="identity_fp16")
    request.inputs.add(name="INPUT0", datatype="FP16", shape=[1, 4])
    with grpc.insecure_channel(server.url) as channel, pytest.raises(grpc.RpcError) as err:
        service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "input 'INPUT0': datatype FP16 has no typed contents field" in err.value.details()


def _credit_request(**overrides) -> service_pb2.ModelInferRequest:
    request = service_pb2.ModelInferRequest(model_name="credit")
    tensor = request.inputs.add(name="features", datatype="FP32", shape=[2, 8])
    request.raw_input_contents.append(credit_rows(2).tobytes())
    for key, value in overrides.items():
        value(request, tensor) if callable(value) else setattr(request, key, value)
    return request


def _set(attr, value):
    def apply(request, tensor):
        if attr == "shape":
            del tensor.shape[:]
            tensor.shape.extend(value)
        else:
            setattr(tensor, attr, value)
    return apply


def _raw(data: bytes):
    def apply(request, tensor):
        request.raw_input_contents[0] = data
    return apply


def _extra_input(request, tensor):
    request.inputs.add(name="features", datatype="FP32", shape=[2, 8])
    request.raw_input_contents.append(credit_rows(2).tobytes())


def _typed_wrong_count(request, tensor):
    del request.raw_input_contents[:]
    tensor.contents.fp32_contents.extend([0.0] * 15)


def _no_inputs(request, tensor):
    del request.inputs[:]
    del request.raw_input_contents[:]


def _raw_count(request, tensor):
    request.raw_input_contents.append(b"")


def _bad_output(request, tensor):
    request.outputs.add(name="nope")


BAD_REQUESTS = [
    ("wrong datatype", {"t": _set("datatype", "FP64")}, grpc.StatusCode.INVALID_ARGUMENT, "input 'features': datatype FP64 does not match the model's FP32"),
    ("wrong rank", {"t": _set("shape", [16])}, grpc.StatusCode.INVALID_ARGUMENT, "input 'features': shape [16] has rank 1, expected rank 2"),
    ("wrong dim", {"t": _set("shape", [2, 9])}, grpc.StatusCode.INVALID_ARGUMENT, "dimension 1 must be 8"),
    ("byte length", {"t": _raw(b"\0" * 60)}, grpc.StatusCode.INVALID_ARGUMENT, "input 'features': raw_input_contents holds 60 bytes, expected 64"),
    ("unknown input", {"t": _set("name", "feature")}, grpc.StatusCode.INVALID_ARGUMENT, "input 'feature' is not an input of this model; expected 'features'"),
    ("missing input", {"t": _no_inputs}, grpc.StatusCode.INVALID_ARGUMENT, "missing input 'features'"),
    ("duplicate input", {"t": _extra_input}, grpc.StatusCode.INVALID_ARGUMENT, "input 'features' appears more than once"),
    ("raw count", {"t": _raw_count}, grpc.StatusCode.INVALID_ARGUMENT, "raw_input_contents has 2 entries but the request has 1 inputs"),
    ("typed count", {"t": _typed_wrong_count}, grpc.StatusCode.INVALID_ARGUMENT, "input 'features': contents.fp32_contents holds 15 elements, expected 16"),
    ("batch too big", {"t": _set("shape", [65, 8])}, grpc.StatusCode.INVALID_ARGUMENT, "batch size 65 exceeds the model's max_batch_size 64"),
    ("unknown output", {"t": _bad_output}, grpc.StatusCode.INVALID_ARGUMENT, "requested output 'nope' is not an output of this model"),
    ("unknown model", {"model_name": "nope"}, grpc.StatusCode.NOT_FOUND, "model 'nope' is not loaded"),
    ("unknown version", {"model_version": "7"}, grpc.StatusCode.NOT_FOUND, "model 'credit' has no loaded version 7"),
]


@pytest.mark.parametrize("label,overrides,code,message", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_request_precise_status_then_server_still_answers(server, label, overrides, code, message):
    request = _credit_request(**{k: v for k, v in overrides.items() if k != "t"})
    if "t" in overrides:
        overrides["t"](request, request.inputs[0] if request.inputs else None)
    with grpc.insecure_channel(server.url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            stub.ModelInfer(request)
        assert err.value.code() == code
        assert message in err.value.details(), err.value.details()
        good = stub.ModelInfer(_credit_request())
        assert np.frombuffer(good.raw_output_contents[0], np.float32).shape == (6,)


def test_malformed_bytes_tensor(server):
    request = service_pb2.ModelInferRequest(model_name="identity_bytes")
    request.inputs.add(name="INPUT0", datatype="BYTES", shape=[1, 4])
    request.raw_input_contents.append(b"\x64\x00\x00\x00" + b"abc" * 4)  # 4 elements need >= 16 bytes
    with grpc.insecure_channel(server.url) as channel, pytest.raises(grpc.RpcError) as err:
        service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "input 'INPUT0': BYTES element 0: declares 100 bytes but only 12 remain" in err.value.details()


def test_tritonclient_sees_invalid_argument(client):
    inp = grpcclient.InferInput("features", [1, 8], "INT32")
    inp.set_data_from_numpy(np.zeros((1, 8), np.int32))
    with pytest.raises(InferenceServerException) as err:
        client.infer("credit", [inp])
    assert err.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "datatype INT32 does not match the model's FP32" in err.value.message()
