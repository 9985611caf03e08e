"""Triton's config.pbtxt is read, not ignored: the common fields are honoured by a real server,
conflicts with config.yaml and fields lockgate cannot honour refuse the load, naming the field."""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from conftest import write_model
from lockgate.config import ModelConfigFile
from lockgate.demo import mlp_model
from lockgate.serving.model_config import ModelConfigError, declared_signature, pbtxt_settings, read_model_config
from lockgate_process import LockgateProcess

TRITON_CONFIG = """
name: "tri"
platform: "onnxruntime_onnx"
max_batch_size: 8
input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ 6 ] } ]
output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 3 ] label_filename: "labels.txt" } ]
dynamic_batching {
  max_queue_delay_microseconds: 100
  preferred_batch_size: [ 4, 8 ]
  default_queue_policy { max_queue_size: 16 }
}
instance_group [ { count: 2 kind: KIND_CPU } ]
version_policy: { latest: { num_versions: 1 } }
parameters { key: "team" value: { string_value: "risk" } }
"""


def _model(seed: int):
    return mlp_model([6, 8, 3], seed=seed, input_name="INPUT0", output_name="OUTPUT0")


def _triton_model(root: Path, name: str = "tri", config: str = TRITON_CONFIG, versions=(1, 2)) -> Path:
    for version in versions:
        write_model(root, name, version, _model(version))
    (root / name / "config.pbtxt").write_text(config)
    (root / name / "labels.txt").write_text("approve\nreview\ndecline\n")
    return root / name


def test_common_fields_become_lockgate_settings(tmp_path: Path) -> None:
    config = read_model_config(_triton_model(tmp_path))
    assert config.max_batch_size == 8
    assert config.dynamic_batching is not None
    assert config.dynamic_batching.max_queue_delay_us == 100
    assert config.dynamic_batching.preferred_batch_sizes == [4, 8] and config.dynamic_batching.max_queue_size == 16
    assert config.version_policy.policy == "latest" and config.version_policy.latest == 1
    assert config.runtime.instances == 2 and config.runtime.providers == ["cpu"]
    assert "providers" in config.runtime.model_fields_set  # KIND_CPU is an explicit choice
    assert config.parameters == {"team": "risk"}
    assert [(t.name, t.datatype, t.dims) for t in config.inputs] == [("INPUT0", "FP32", [6])]
    assert config.labels() == {"OUTPUT0": ["approve", "review", "decline"]}


def test_triton_defaults_when_fields_are_absent(tmp_path: Path) -> None:
    """No max_batch_size means 0, no dynamic_batching block means no dynamic batcher (Triton)."""
    write_model(tmp_path, "plain", 1, _model(1))
    (tmp_path / "plain" / "config.pbtxt").write_text('platform: "onnxruntime_onnx"\n')
    config = read_model_config(tmp_path / "plain")
    assert config.max_batch_size == 0 and config.dynamic_batching is None


@pytest.mark.parametrize("text, named", [
    ("sequence_batching { }", "sequence_batching"),
    ('platform: "tensorrt_plan"', "platform 'tensorrt_plan'"),
    ("instance_group [ { kind: KIND_GPU gpus: [ 0, 1 ] } ]", "gpus [0, 1]"),
    ('optimization { execution_accelerators { gpu_execution_accelerator [ { name: "tensorrt" } ] } }', "tensorrt"),
    ('input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ 6 ] optional: true } ]', "optional"),
    ('input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ 6 ] reshape { shape: [ 2, 3 ] } } ]', "reshape"),
    ("dynamic_batching { priority_levels: 2 }", "priority levels"),
    ('name: "other"', "differs from the model directory"),
])
def test_fields_lockgate_cannot_honour_are_refused_by_name(tmp_path: Path, text: str, named: str) -> None:
    with pytest.raises(ModelConfigError) as info:
        pbtxt_settings(text, tmp_path / "tri", source="tri/config.pbtxt")
    assert named in str(info.value) and "tri/config.pbtxt" in str(info.value)


def test_both_files_may_set_a_field_only_to_the_same_value(tmp_path: Path) -> None:
    model_dir = _triton_model(tmp_path)
    (model_dir / "config.yaml").write_text("max_batch_size: 8\nruntime: {intra_op_threads: 2}\n")
    config = read_model_config(model_dir)  # same value: fine; lockgate-only settings merge in
    assert config.max_batch_size == 8 and config.runtime.intra_op_threads == 2 and config.runtime.instances == 2
    (model_dir / "config.yaml").write_text("max_batch_size: 64\n")
    with pytest.raises(ModelConfigError, match=r"max_batch_size is 8 in config.pbtxt but 64 in config.yaml"):
        read_model_config(model_dir)
    (model_dir / "config.yaml").write_text("dynamic_batching: {max_queue_delay_us: 500}\n")
    with pytest.raises(ModelConfigError, match=r"dynamic_batching.max_queue_delay_us is 100 in config.pbtxt but 500"):
        read_model_config(model_dir)
    (model_dir / "config.yaml").write_text("version_policy: {latest: 1}\noutputs: [{name: OUTPUT0, datatype: TYPE_FP32}]\n")
    assert read_model_config(model_dir).version_policy.latest == 1  # spelled differently, same value


def test_declared_dims_are_checked_against_the_graph(tmp_path: Path) -> None:
    from lockgate.protocol import datatypes
    from lockgate.protocol.codec import Signature, TensorSpec

    fp32 = datatypes.BY_NAME["FP32"]
    graph = Signature((TensorSpec("INPUT0", fp32, (-1, -1)),), (TensorSpec("OUTPUT0", fp32, (-1, 3)),), 8)
    narrowed = declared_signature(graph, ModelConfigFile(inputs=[{"name": "INPUT0", "dims": [6]}]), "m")
    assert narrowed.inputs[0].shape == (-1, 6)  # a fixed size in the config narrows a free dim
    for config, message in (
        ({"inputs": [{"name": "INPUT0", "dims": [6, 2]}]}, "dims [-1] in the graph but [6, 2]"),
        ({"inputs": [{"name": "INPUT0", "datatype": "INT64"}]}, "FP32 in the graph but INT64"),
        ({"inputs": [{"name": "X"}]}, "declares input(s) X"),
        ({"outputs": [{"name": "OUTPUT0", "labels": ["a", "b"]}]}, "3 classes but 2 labels"),
    ):
        with pytest.raises(ModelConfigError) as info:
            declared_signature(graph, ModelConfigFile.model_validate(config), "m")
        assert message in str(info.value)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("pbtxt") / "models"
    _triton_model(root)
    _triton_model(root, "unsupported", 'platform: "onnxruntime_onnx"\nmax_batch_size: 8\nmodel_warmup [ { name: "w" } ]\n',
                  versions=(1,))
    conflicted = _triton_model(root, "conflicted", TRITON_CONFIG.replace('name: "tri"', ""), versions=(1,))
    (conflicted / "config.yaml").write_text("max_batch_size: 32\n")
    wrong = TRITON_CONFIG.replace('name: "tri"', "").replace("dims: [ 6 ]", "dims: [ 5 ]")
    _triton_model(root, "wrongdims", wrong, versions=(1,))
    with LockgateProcess(root) as proc:
        yield proc


def test_a_real_server_honours_config_pbtxt(server: LockgateProcess) -> None:
    client = grpcclient.InferenceServerClient(server.url)
    cfg = client.get_model_config("tri").config
    assert cfg.max_batch_size == 8  # not the default 64
    assert cfg.dynamic_batching.max_queue_delay_microseconds == 100  # not 0
    assert list(cfg.dynamic_batching.preferred_batch_size) == [4, 8]
    assert cfg.dynamic_batching.default_queue_policy.max_queue_size == 16
    assert cfg.instance_group[0].count == 2 and cfg.instance_group[0].kind == 2  # KIND_CPU
    assert cfg.version_policy.latest.num_versions == 1
    assert cfg.parameters["team"].string_value == "risk"
    assert client.is_model_ready("tri", "2") and not client.is_model_ready("tri", "1")  # latest: 1
    x = np.ones((8, 6), np.float32)
    inp = grpcclient.InferInput("INPUT0", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    assert client.infer("tri", [inp]).as_numpy("OUTPUT0").shape == (8, 3)
    too_many = np.ones((9, 6), np.float32)  # beyond max_batch_size 8
    inp = grpcclient.InferInput("INPUT0", list(too_many.shape), "FP32")
    inp.set_data_from_numpy(too_many)
    with pytest.raises(InferenceServerException) as info:
        client.infer("tri", [inp])
    assert "StatusCode.INVALID_ARGUMENT" in str(info.value.status())
    client.close()


def test_refused_configs_say_why_in_the_repository_index(server: LockgateProcess) -> None:
    with grpc.insecure_channel(server.url) as channel:
        index = service_pb2_grpc.GRPCInferenceServiceStub(channel).RepositoryIndex(service_pb2.RepositoryIndexRequest())
    reasons = {m.name: m.reason for m in index.models if m.state != "READY"}
    assert "model_warmup" in reasons["unsupported"] and "config.yaml" in reasons["unsupported"]
    assert "max_batch_size is 8 in config.pbtxt but 32 in config.yaml" in reasons["conflicted"]
    assert "dims [6] in the graph but [5] in the config" in reasons["wrongdims"]
