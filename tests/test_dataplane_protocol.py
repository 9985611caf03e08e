"""tritonclient, unchanged, against a real lockgate: metadata, config, infer, streaming,
health, reflection, and the wire contract compared field by field with Triton's stubs."""

from __future__ import annotations

import queue
from functools import partial

import grpc
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from conftest import credit_rows


def reference(repo, model: str, version: int, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(str(repo / model / str(version) / "model.onnx"), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def test_health_and_metadata(client):
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("credit")
    assert client.is_model_ready("credit", "2")
    assert not client.is_model_ready("credit", "9")
    assert not client.is_model_ready("missing")
    meta = client.get_server_metadata()
    assert meta.name == "lockgate" and "model_repository" in meta.extensions
    md = client.get_model_metadata("credit")
    assert md.name == "credit" and list(md.versions) == ["1", "2"] and md.platform == "onnxruntime_onnx"
    assert [(t.name, t.datatype, list(t.shape)) for t in md.inputs] == [("features", "FP32", [-1, 8])]
    assert [(t.name, t.datatype, list(t.shape)) for t in md.outputs] == [("probabilities", "FP32", [-1, 3])]


def test_model_config_shows_batching_and_provider(client):
    cfg = client.get_model_config("credit").config
    assert cfg.max_batch_size == 64
    assert list(cfg.input[0].dims) == [8] and cfg.input[0].data_type == 11  # TYPE_FP32
    assert list(cfg.dynamic_batching.preferred_batch_size) == [16, 32, 64]
    assert cfg.dynamic_batching.max_queue_delay_microseconds == 100
    assert cfg.parameters["device"].string_value == "cpu"
    assert cfg.parameters["execution_providers"].string_value == "CPUExecutionProvider"
    # No GPU here: the fallback is explained, not silent.
    assert "CUDAExecutionProvider" in cfg.parameters["provider_fallback"].string_value
    assert cfg.instance_group[0].kind == 2  # KIND_CPU


def test_infer_raw_matches_onnxruntime(client, dataplane_repo):
    x = credit_rows(5, seed=0)
    inp = grpcclient.InferInput("features", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    result = client.infer("credit", [inp], request_id="req-1")
    np.testing.assert_allclose(result.as_numpy("probabilities"), reference(dataplane_repo, "credit", 1, x), rtol=1e-6)
    response = result.get_response()
    assert response.id == "req-1" and response.model_version == "1"
    assert response.parameters["lockgate_route"].string_param == "default"
    pinned = client.infer("credit", [inp], model_version="2")
    assert pinned.get_response().model_version == "2"
    np.testing.assert_allclose(pinned.as_numpy("probabilities"), reference(dataplane_repo, "credit", 2, x), rtol=1e-6)


def test_infer_typed_contents(server, dataplane_repo):
    x = credit_rows(2, seed=1)
    request = service_pb2.ModelInferRequest(model_name="credit")
    tensor = request.inputs.add(name="features", datatype="FP32", shape=[2, 8])
    tensor.contents.fp32_contents.extend(x.ravel().tolist())
    with grpc.insecure_channel(server.url) as channel:
        response = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request)
    out = np.frombuffer(response.raw_output_contents[0], dtype=np.float32).reshape(2, 3)
    np.testing.assert_allclose(out, reference(dataplane_repo, "credit", 1, x), rtol=1e-6)


def test_requested_output_subset(client):
    x = credit_rows(1)
    inp = grpcclient.InferInput("features", [1, 8], "FP32")
    inp.set_data_from_numpy(x)
    result = client.infer("credit", [inp], outputs=[grpcclient.InferRequestedOutput("probabilities")])
    assert result.as_numpy("probabilities").shape == (1, 3)
    with pytest.raises(InferenceServerException) as err:
        client.infer("credit", [inp], outputs=[grpcclient.InferRequestedOutput("logits_nope")])
    assert err.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "requested output 'logits_nope'" in err.value.message()


def test_stream_infer_100_messages_with_error_in_the_middle(client, dataplane_repo):
    results: queue.Queue = queue.Queue()
    client.start_stream(callback=partial(lambda q, result, error: q.put((result, error)), results))
    rng = np.random.default_rng(2)
    sent = {}
    try:
        for i in range(100):
            if i == 50:  # a bad message: wrong width. It must not close the stream.
                bad = grpcclient.InferInput("features", [1, 7], "FP32")
                bad.set_data_from_numpy(np.zeros((1, 7), np.float32))
                client.async_stream_infer("credit", [bad], request_id="bad")
                continue
            x = credit_rows(1, seed=100 + i)
            sent[str(i)] = x
            inp = grpcclient.InferInput("features", [1, 8], "FP32")
            inp.set_data_from_numpy(x)
            client.async_stream_infer("credit", [inp], request_id=str(i))
        got = [results.get(timeout=30) for _ in range(100)]
    finally:
        client.stop_stream()
    errors = [e for r, e in got if e is not None]
    assert len(errors) == 1 and "input 'features'" in str(errors[0])
    ok = [r for r, e in got if e is None]
    assert len(ok) == 99
    for r in ok:
        rid = r.get_response().id
        np.testing.assert_allclose(r.as_numpy("probabilities"), reference(dataplane_repo, "credit", 1, sent[rid]), rtol=1e-6)


def test_grpc_health_service(server):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(server.url) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        SERVING = health_pb2.HealthCheckResponse.SERVING
        assert stub.Check(health_pb2.HealthCheckRequest(service="")).status == SERVING
        assert stub.Check(health_pb2.HealthCheckRequest(service="inference.GRPCInferenceService")).status == SERVING
        assert stub.Check(health_pb2.HealthCheckRequest(service="credit")).status == SERVING
        with pytest.raises(grpc.RpcError) as err:
            stub.Check(health_pb2.HealthCheckRequest(service="no-such-model"))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_server_reflection_lists_services_and_resolves_files(server):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(server.url) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        reqs = [reflection_pb2.ServerReflectionRequest(list_services=""),
                reflection_pb2.ServerReflectionRequest(file_containing_symbol="inference.GRPCInferenceService")]
        responses = list(stub.ServerReflectionInfo(iter(reqs)))
    names = {s.name for s in responses[0].list_services_response.service}
    assert {"inference.GRPCInferenceService", "grpc.health.v1.Health"} <= names
    assert responses[1].file_descriptor_response.file_descriptor_proto, responses[1]


def test_repository_index(client):
    index = client.get_model_repository_index()
    states = {(m.name, m.version): m.state for m in index.models}
    assert states[("credit", "1")] == "READY" and states[("identity_fp32", "1")] == "READY"


def _repeated(field) -> bool:
    # protobuf 7 dropped FieldDescriptor.label in favour of is_repeated.
    return field.is_repeated if hasattr(field, "is_repeated") else field.label == 3


def _fields(descriptor):
    return {f.name: (f.number, f.type, _repeated(f), f.message_type.full_name if f.message_type else None) for f in descriptor.fields}


def test_wire_contract_matches_triton():
    """Every message and field we define has Triton's number, type and label."""
    from tritonclient.grpc import model_config_pb2 as triton_mc
    from tritonclient.grpc import service_pb2 as triton_svc

    from lockgate._proto import inference_pb2 as ours

    checked = 0
    for name, desc in ours.DESCRIPTOR.message_types_by_name.items():
        theirs = triton_svc.DESCRIPTOR.message_types_by_name.get(name) or triton_mc.DESCRIPTOR.message_types_by_name[name]
        stack = [(desc, theirs)]
        while stack:
            a, b = stack.pop()
            fa, fb = _fields(a), _fields(b)
            for field, spec in fa.items():
                assert fb[field] == spec, f"{a.full_name}.{field}: ours {spec} vs Triton {fb[field]}"
                checked += 1
            for nested in a.nested_types:
                stack.append((nested, b.nested_types_by_name[nested.name]))
    assert checked > 150
    ours_svc = ours.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    theirs_svc = triton_svc.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    for method in ours_svc.methods:
        t = theirs_svc.methods_by_name[method.name]
        assert (method.input_type.full_name, method.output_type.full_name) == (t.input_type.full_name, t.output_type.full_name)


@pytest.mark.parametrize(
    "servicer, generated",
    [
        ("lockgate.transport.grpc.inference:InferenceService", "lockgate._proto.inference_pb2_grpc:GRPCInferenceServiceServicer"),
        ("lockgate.transport.grpc.admin:AdminService", "lockgate._proto.lockgate.admin_pb2_grpc:AdminServiceServicer"),
    ],
)
def test_every_rpc_is_implemented(servicer, generated):
    """grpcio-tools generates a base class whose methods raise NotImplementedError (the client
    sees UNIMPLEMENTED). lockgate's services must override every one of them."""
    import importlib

    def load(path):
        module, name = path.split(":")
        return getattr(importlib.import_module(module), name)

    ours, base = load(servicer), load(generated)
    rpcs = [name for name in vars(base) if name[:1].isupper() and callable(getattr(base, name))]
    assert rpcs, "no RPCs found in the generated servicer"
    missing = [name for name in rpcs if getattr(ours, name) is getattr(base, name)]
    assert missing == [], f"{ours.__name__} leaves {missing} to the generated NotImplementedError stub"


def test_models_built_in_code_load_in_older_onnxruntime(dataplane_repo):
    """onnx >= 1.23 writes IR 14 by default, which onnxruntime < 1.32 (onnxruntime-gpu 1.31 on
    the GPU machine) refuses; the demo and test models are written at IR 9 (ORT >= 1.17)."""
    import onnx

    paths = sorted(dataplane_repo.glob("*/*/model.onnx"))
    assert len(paths) > 10
    for path in paths:
        assert onnx.load(str(path), load_external_data=False).ir_version <= 9, path
