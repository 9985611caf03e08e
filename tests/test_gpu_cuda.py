"""The CUDA path: provider choice, IO binding through pinned host buffers, a real server on a GPU.

Without a usable GPU (CI, this project's build machines) the first two tests check the logged
CPU fallback and the pinned-buffer refusal, and the GPU-only tests skip, saying why. On a
machine with a GPU and onnxruntime-gpu (``pip install .[gpu]``) every test here runs:
``pytest tests/test_gpu_cuda.py``.
"""

from __future__ import annotations

import logging
import threading
import urllib.request
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import tritonclient.grpc as grpcclient

from conftest import write_model
from lockgate.config import RuntimeConfig
from lockgate.demo import mlp_model
from lockgate.serving.cuda_staging import PinnedStaging
from lockgate.serving.runtime import OrtRuntime
from lockgate_process import LockgateProcess

# The GPU runs float32 MatMuls with TF32 by default: close to, not equal to, the CPU.
ATOL = 2e-3


def _cuda_usable() -> bool:
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return False
    staging, _ = PinnedStaging.create()  # cheap probe: needs a driver and a device
    if staging is None:
        return False
    staging.close()
    return True


CUDA = _cuda_usable()
needs_gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU and onnxruntime-gpu (none here)")


def _write_mlp(tmp_path: Path) -> Path:
    path = tmp_path / "mlp.onnx"
    onnx.save(mlp_model([64, 512, 512, 8], seed=5), str(path))
    return path


def cpu_reference(path: Path, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def test_pinned_staging_allocates_page_locked_memory_or_says_why() -> None:
    staging, reason = PinnedStaging.create()
    if staging is None:
        assert not CUDA, f"a GPU is usable but no pinned buffer could be allocated: {reason}"
        assert "cudaHostAlloc" in reason or "CUDA runtime library" in reason, reason
        return
    try:
        small = np.arange(12, dtype=np.float32).reshape(3, 4)
        view = staging.stage("x", small)
        np.testing.assert_array_equal(view, small)
        assert staging.is_pinned(view), "the staged copy is not in page-locked memory"
        assert not staging.is_pinned(small), "ordinary numpy memory reported as page-locked"
        big = np.arange(4 * 5000, dtype=np.float32).reshape(4, 5000)[:, ::2]  # non-contiguous, larger
        view = staging.stage("x", big)
        np.testing.assert_array_equal(view, big)
        assert view.flags.c_contiguous and staging.is_pinned(view)
    finally:
        staging.close()


def test_runtime_provider_choice_is_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = _write_mlp(tmp_path)
    caplog.set_level(logging.INFO, logger="lockgate.runtime")
    runtime = OrtRuntime(path, RuntimeConfig(providers=["cuda", "cpu"], execution="thread"), label="m:1")
    x = np.random.default_rng(0).standard_normal((16, 64)).astype(np.float32)
    out = runtime.run({"features": x})["probabilities"]
    np.testing.assert_allclose(out, cpu_reference(path, x), atol=ATOL)
    messages = [r.getMessage() for r in caplog.records]
    if CUDA:
        assert runtime.on_cuda and runtime.provider.device == "cuda:0" and runtime.provider.fallback_reason is None
        assert runtime.provider.active[0] == "CUDAExecutionProvider"
        assert runtime.staging is not None and any("pinned host buffers" in m for m in messages)
    else:
        assert not runtime.on_cuda and runtime.provider.device == "cpu" and runtime.staging is None
        assert "CUDAExecutionProvider" in runtime.provider.fallback_reason
        assert any("provider fallback to CPU" in m and "CUDAExecutionProvider" in m for m in messages)
    runtime.close()


@needs_gpu
@pytest.mark.parametrize("pinned", [True, False])
def test_io_binding_matches_plain_run_on_gpu(tmp_path: Path, pinned: bool) -> None:
    path = _write_mlp(tmp_path)
    bound = OrtRuntime(path, RuntimeConfig(io_binding=True, pinned_memory=pinned, execution="thread"), label="bound")
    plain = OrtRuntime(path, RuntimeConfig(io_binding=False, execution="thread"), label="plain")
    assert (bound.staging is not None) is pinned
    rng = np.random.default_rng(1)
    for batch in (1, 7, 64, 3):  # shrinking after growing reuses the larger pinned buffer
        x = rng.standard_normal((batch, 64)).astype(np.float32)
        got = bound.run({"features": x})["probabilities"]
        assert got.shape == (batch, 8)
        np.testing.assert_allclose(got, plain.run({"features": x})["probabilities"], atol=1e-5)
        np.testing.assert_allclose(got, cpu_reference(path, x), atol=ATOL)
    bound.close()


@pytest.fixture(scope="module")
def gpu_server(tmp_path_factory: pytest.TempPathFactory):
    # Only the @needs_gpu tests below use it: without a GPU they are skipped before it is built.
    repo = tmp_path_factory.mktemp("gpu") / "models"
    write_model(repo, "wide", 1, mlp_model([64, 512, 512, 8], seed=5),
                "max_batch_size: 64\ndynamic_batching: {max_queue_delay_us: 2000}\n"
                "runtime: {providers: [cuda, cpu], instances: 2}\n")
    write_model(repo, "pageable", 1, mlp_model([64, 512, 512, 8], seed=5),
                "max_batch_size: 64\nruntime: {providers: [cuda, cpu], pinned_memory: false}\n")
    with LockgateProcess(repo) as proc:
        yield proc, repo


@needs_gpu
def test_real_server_reports_the_gpu_in_model_config(gpu_server) -> None:
    proc, _ = gpu_server
    client = grpcclient.InferenceServerClient(proc.url)
    cfg = client.get_model_config("wide").config
    assert cfg.instance_group[0].kind == 1 and list(cfg.instance_group[0].gpus) == [0]  # KIND_GPU
    assert cfg.instance_group[0].count == 2
    assert cfg.parameters["device"].string_value == "cuda:0"
    assert cfg.parameters["execution_providers"].string_value.startswith("CUDAExecutionProvider")
    assert "provider_fallback" not in cfg.parameters
    assert cfg.optimization.execution_accelerators.gpu_execution_accelerator[0].name == "cuda"
    assert cfg.optimization.input_pinned_memory.enable
    assert not client.get_model_config("pageable").config.optimization.input_pinned_memory.enable
    client.close()


@needs_gpu
def test_real_server_on_gpu_batches_and_returns_each_callers_rows(gpu_server) -> None:
    proc, repo = gpu_server
    path = repo / "wide" / "1" / "model.onnx"
    rows = np.random.default_rng(2).standard_normal((256, 64)).astype(np.float32)
    expected = cpu_reference(path, rows)
    results: dict[int, np.ndarray] = {}
    errors: list[BaseException] = []

    def call(first: int) -> None:
        client = grpcclient.InferenceServerClient(proc.url)
        try:
            for i in range(first, first + 8):
                inp = grpcclient.InferInput("features", [1, 64], "FP32")
                inp.set_data_from_numpy(rows[i:i + 1])
                results[i] = client.infer("wide", [inp]).as_numpy("probabilities")[0]
        except BaseException as exc:  # noqa: BLE001 -- reported below
            errors.append(exc)
        finally:
            client.close()

    threads = [threading.Thread(target=call, args=(first,)) for first in range(0, 256, 8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    got = np.stack([results[i] for i in range(256)])
    np.testing.assert_allclose(got, expected, atol=ATOL)
    client = grpcclient.InferenceServerClient(proc.url)
    stats = client.get_inference_statistics("wide").model_stats[0]
    assert stats.inference_count >= 256 and stats.execution_count < stats.inference_count  # merged on the GPU
    inp = grpcclient.InferInput("features", [4, 64], "FP32")
    inp.set_data_from_numpy(rows[:4])
    np.testing.assert_allclose(client.infer("pageable", [inp]).as_numpy("probabilities"), expected[:4], atol=ATOL)
    client.close()


@needs_gpu
def test_real_server_exports_gpu_metrics(gpu_server) -> None:
    pytest.importorskip("pynvml", reason="GPU metrics come from nvidia-ml-py (lockgate[gpu])")
    proc, _ = gpu_server
    body = urllib.request.urlopen(f"http://127.0.0.1:{proc.metrics_port}/metrics", timeout=10).read().decode()
    used = [line for line in body.splitlines() if line.startswith("lockgate_gpu_memory_used_bytes{")]
    assert used and float(used[0].rsplit(" ", 1)[1]) > 0, body[-2000:]

