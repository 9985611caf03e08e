"""Shared fixtures: model repositories built in code, and real lockgate servers on loopback."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).parent))

from lockgate.control.audit_key import AuditKey, AuditKeyring  # noqa: E402
from lockgate.demo import build_demo_repository, identity_model, mlp_model, onnx_model, reference_sample  # noqa: E402
from lockgate_process import LockgateProcess  # noqa: E402

#: The audit key of in-process tests (servers get a key file of their own: LockgateProcess).
TEST_KEYRING = AuditKeyring(AuditKey(b"lockgate-tests-audit-key-0123456789abcdef"))

def credit_rows(n: int, seed: int = 0) -> np.ndarray:
    """Valid rows for the demo 'credit' model (its governance constraints reject e.g. age 0)."""
    return reference_sample(max(n, 16), seed=seed)[:n].copy()


DATATYPES = ["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP16", "FP32", "FP64", "BYTES"]


def slow_model(width: int = 384, depth: int = 48) -> onnx.ModelProto:
    """A chain of MatMuls: several milliseconds per row, for queue/deadline/drain tests."""
    rng = np.random.default_rng(3)
    w = (rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32)
    nodes, current = [], "INPUT0"
    for i in range(depth):
        out = "OUTPUT0" if i == depth - 1 else f"h{i}"
        nodes.append(helper.make_node("MatMul", [current, "W"], [out]))
        current = out
    graph = helper.make_graph(
        nodes, "slow",
        [helper.make_tensor_value_info("INPUT0", TensorProto.FLOAT, ["batch", width])],
        [helper.make_tensor_value_info("OUTPUT0", TensorProto.FLOAT, ["batch", width])],
        initializer=[numpy_helper.from_array(w, "W")],
    )
    return onnx_model(graph)


def write_model(repo: Path, name: str, version: int, model: onnx.ModelProto, config: str | None = None) -> Path:
    path = repo / name / str(version) / "model.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    if config is not None:
        (repo / name / "config.yaml").write_text(config)
    return path


@pytest.fixture(scope="session")
def dataplane_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = build_demo_repository(tmp_path_factory.mktemp("dataplane") / "models")
    for dt in DATATYPES:
        write_model(repo, f"identity_{dt.lower()}", 1, identity_model(dt),
                    "max_batch_size: 8\ndynamic_batching: {max_queue_delay_us: 0}\n")
    write_model(repo, "mlp", 1, mlp_model([32, 256, 4], seed=1, input_name="INPUT0", output_name="OUTPUT0", softmax=False),
                "max_batch_size: 64\ndynamic_batching: {max_queue_delay_us: 500, max_queue_size: 4096}\n"
                "runtime: {execution: thread}\n")
    write_model(repo, "slow", 1, slow_model(),
                "max_batch_size: 0\ndynamic_batching: {max_queue_size: 3}\nruntime: {execution: thread}\n")
    return repo


@pytest.fixture(scope="session")
def server(dataplane_repo: Path):
    with LockgateProcess(dataplane_repo) as proc:
        yield proc


@pytest.fixture()
def client(server: LockgateProcess):
    import tritonclient.grpc as grpcclient

    c = grpcclient.InferenceServerClient(server.url)
    yield c
    c.close()
