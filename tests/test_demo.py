"""The demo an operator meets first: a model whose answers make sense, a second version that
is measurably better, people with tokens, serve's options and variables honoured, one state
directory that ``demo`` and ``serve`` both find, quiet logs, and an install with only what
the demo needs."""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import stat
import subprocess
import sys
import tomllib
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest

from lockgate._proto import inference_pb2 as pb
from lockgate._proto import inference_pb2_grpc as pb_grpc
from lockgate.demo import (
    DEMO_CLASSES, DEMO_FEATURES, DEMO_VERSIONS, HOLDOUT_ROWS, HOLDOUT_SEED, TRAIN_ROWS, TRAIN_SEED, demo_labels,
    evaluate, reference_sample, risk_score, train_classifier,
)
from lockgate_process import free_port, wait_server_ready

ROOT = Path(__file__).resolve().parent.parent
# The README's four applicants: the third is the riskiest (high debt, late payments, utilisation).
APPLICANTS = np.array([[35, 52.0, 0.30, 4, 0, 0.40, 60, 1],
                       [52, 81.5, 0.15, 7, 1, 0.20, 120, 3],
                       [23, 28.0, 0.55, 2, 2, 0.90, 8, 0],
                       [41, 45.0, 0.25, 5, 0, 0.35, 44, 4]], dtype=np.float32)
TEST_ONLY = {"pytest", "pytest-timeout", "hypothesis", "tritonclient", "psycopg", "psycopg-binary",
             "kubernetes-validate", "cython", "grpcio-tools"}


def _lockgate(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lockgate.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


# ---------------------------------------------------------------------- the model's story
def test_the_demo_model_follows_the_known_rule_and_version_2_is_better() -> None:
    x = reference_sample(TRAIN_ROWS, seed=TRAIN_SEED)
    y = demo_labels(x, seed=TRAIN_SEED + 1)
    holdout = reference_sample(HOLDOUT_ROWS, seed=HOLDOUT_SEED)
    truth = demo_labels(holdout, seed=HOLDOUT_SEED + 1)
    metrics = {}
    for version, spec in DEMO_VERSIONS.items():
        model = train_classifier(x, y, spec.features)
        metrics[version] = evaluate(model, holdout, truth)
        session = ort.InferenceSession(model.to_onnx().SerializeToString(), providers=["CPUExecutionProvider"])
        probabilities = session.run(None, {"features": APPLICANTS})[0]
        np.testing.assert_allclose(probabilities, model.predict(APPLICANTS), atol=1e-5)  # ONNX computes what was trained
        decisions = [DEMO_CLASSES[i] for i in probabilities.argmax(axis=1)]
        assert decisions[2] == "decline" and probabilities[2, 0] < 0.05, (version, probabilities[2])
        assert decisions[1] == "approve", (version, probabilities[1])
        unused = [DEMO_FEATURES.index(f) for f in DEMO_FEATURES if f not in spec.features]
        assert not model.weights[unused].any()  # version 1 really cannot see utilisation or tenure
    assert risk_score(APPLICANTS).argmax() == 2
    assert metrics[2]["accuracy"] >= metrics[1]["accuracy"] + 0.1, metrics
    assert metrics[2]["accuracy"] > 0.85 and metrics[2]["recall_decline"] > metrics[1]["recall_decline"], metrics


def test_demo_build_writes_people_tokens_and_is_idempotent(tmp_path: Path) -> None:
    repo = tmp_path / "demo-repo"
    first = json.loads(_lockgate("demo", "--dir", str(repo), "--build-only", "--json", "--grpc-port", "18555").stdout)
    env_file = Path(first["tokens_env_file"])
    assert env_file == repo / "demo-tokens.env" and stat.S_IMODE(env_file.stat().st_mode) == 0o600
    text = env_file.read_text()
    tokens = dict(re.findall(r"export (\w+_TOKEN)=(lgt_\S+)", text))
    assert set(tokens) == {"RITA_TOKEN", "ALEX_TOKEN", "OSCAR_TOKEN", "VERA_TOKEN"}
    assert "export LOCKGATE_SERVER=127.0.0.1:18555" in text
    hashed = (repo / ".lockgate" / "tokens.yaml").read_text()
    assert not any(token in hashed for token in tokens.values())  # the server's file holds hashes only
    card = (repo / ".candidates" / "credit" / "2" / "card.yaml").read_text()
    assert "accuracy" in card and (repo / ".candidates" / "credit" / "2" / "golden_outputs.npz").exists()
    assert "labels: [approve, review, decline]" in (repo / "credit" / "config.yaml").read_text()
    artifact = (repo / "credit" / "1" / "model.onnx").read_bytes()
    second = json.loads(_lockgate("demo", "--dir", str(repo), "--build-only", "--json", "--grpc-port", "18555").stdout)
    assert second["approved_versions"] == ["1"] and dict(re.findall(r"export (\w+_TOKEN)=(lgt_\S+)", env_file.read_text())) == tokens
    assert (repo / "credit" / "1" / "model.onnx").read_bytes() == artifact  # approvals stay valid


# ---------------------------------------------------------------------- serve's options, one state dir
def _infer(url: str) -> str:
    request = pb.ModelInferRequest(model_name="credit")
    request.inputs.add(name="features", datatype="FP32", shape=list(APPLICANTS.shape))
    request.raw_input_contents.append(APPLICANTS.tobytes())
    with grpc.insecure_channel(url) as channel:
        response = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30)
    probabilities = np.frombuffer(response.raw_output_contents[0], np.float32).reshape(4, 3)
    return ",".join(DEMO_CLASSES[i] for i in probabilities.argmax(axis=1)) + f"@{response.model_version}"


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    proc.wait(60)


def test_demo_honours_lockgate_variables_and_serve_finds_its_state(tmp_path: Path) -> None:
    repo = tmp_path / "demo-repo"
    port, metrics = free_port(), free_port()
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("LOCKGATE_")},
           "LOCKGATE_GRPC_PORT": str(port), "LOCKGATE_METRICS_PORT": str(metrics), "LOCKGATE_HOST": "127.0.0.1"}
    log = tmp_path / "demo.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "lockgate.cli", "demo", "--dir", str(repo)], env=env,
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_server_ready(f"127.0.0.1:{port}", proc, log, timeout=120)
        assert _infer(f"127.0.0.1:{port}").startswith("approve,approve,decline")
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=10) as page:
            assert b"lockgate_inference_request_success_total" in page.read()
    finally:
        _stop(proc)
    text = log.read_text()
    assert f"state directory {repo.resolve() / '.lockgate'}" in text
    assert f"principal(s) from {repo / '.lockgate' / 'tokens.yaml'}" in text
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        assert " WARNING " not in text, text  # CPU-only by default is not news; nor is a clean shutdown
        assert "running on the CPU" in text
    assert "leadership lost" not in text and "stepping down as leader" in text

    # `lockgate serve` on the same repository, told nothing else (no --state-dir, no tokens file),
    # finds the approvals and the people.
    port = free_port()
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "lockgate.cli", "serve", "--model-repository", str(repo),
                                 "--grpc-port", str(port), "--metrics-port", str(free_port()), "--host", "127.0.0.1"],
                                env={k: v for k, v in os.environ.items() if not k.startswith("LOCKGATE_")},
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_server_ready(f"127.0.0.1:{port}", proc, log, timeout=120)
        assert _infer(f"127.0.0.1:{port}").endswith("@1")  # approved in the demo's state: served, gated
        rita = re.search(r"export RITA_TOKEN=(\S+)", (repo / "demo-tokens.env").read_text()).group(1)
        whoami = _lockgate("tokens", "whoami", "--json", "--server", f"127.0.0.1:{port}", "--token", rita)
        assert json.loads(whoami.stdout)["name"] == "rita", whoami.stderr
    finally:
        _stop(proc)
    assert f"state directory {repo.resolve() / '.lockgate'}" in log.read_text()


def test_runtime_logs_cpu_by_default_at_info_and_an_explicit_gpu_request_at_warning(tmp_path: Path, caplog) -> None:
    import logging

    import onnx

    from lockgate.config import RuntimeConfig
    from lockgate.demo import mlp_model
    from lockgate.serving.runtime import OrtRuntime

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu is installed: a CPU run is then a fallback worth a warning")
    path = tmp_path / "m.onnx"
    onnx.save(mlp_model([4, 8, 2], seed=1), str(path))
    caplog.set_level(logging.INFO, logger="lockgate.runtime")
    OrtRuntime(path, RuntimeConfig(), label="default").close()
    OrtRuntime(path, RuntimeConfig(providers=["cuda", "cpu"]), label="explicit").close()
    levels = {(r.getMessage().split(":")[0], r.levelname) for r in caplog.records if "CPU" in r.getMessage()}
    assert ("default", "INFO") in levels and ("explicit", "WARNING") in levels, levels
    assert ("default", "WARNING") not in levels


# ---------------------------------------------------------------------- install
def test_the_demo_install_has_no_test_packages_and_bounds_that_do_not_wander() -> None:
    base = [r for r in importlib.metadata.requires("lockgate") or [] if "extra ==" not in r]
    names = {re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0].lower() for r in base}
    assert not names & TEST_ONLY, names & TEST_ONLY
    makefile = (ROOT / "Makefile").read_text()
    demo_install = re.search(r"^\$\(VENV\)/\.installed-demo:.*\n((?:\t.*\n)+)", makefile, re.M).group(1)
    # the demo serves REST and the console too: the [http] extra, and no other
    assert "pip install -e '.[http]'\n" in demo_install.replace("$(PIP)", "pip"), demo_install
    assert re.search(r"^demo: install-demo$", makefile, re.M)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["project"]["license"] == "Apache-2.0"  # SPDX string: no setuptools deprecation warning
    client = project["project"]["optional-dependencies"]["client"]
    assert any(r.startswith("tritonclient[grpc,http]>=2.73") for r in client) and "protobuf>=6.33.5,<7" in client
    build = project["build-system"]["requires"]
    assert any(r.startswith("grpcio-tools") and "<1.82" in r for r in build)  # gencode runs on protobuf 6 and 7
    generated = (ROOT / "src" / "lockgate" / "_proto" / "inference_pb2.py").read_text()
    major = int(re.search(r"Domain\.PUBLIC,\s*(\d+),", generated).group(1))
    assert major == 6, "generated code must run on the protobuf 6 that tritonclient needs"


@pytest.mark.fresh_venv
def test_make_demo_serves_from_a_fresh_venv_with_only_the_demo_dependencies(tmp_path: Path) -> None:
    """The demo's dependency set, installed alone into a new virtual environment, serves.

    The venv gets exactly lockgate's base and ``[http]`` requirements (from its metadata, as
    ``make demo``'s ``pip install -e '.[http]'`` resolves them) and this checkout's source with its built extensions
    on the path; the probe below runs from the test environment, since the fresh one has no
    client."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    base = [r.split(";")[0].strip() for r in importlib.metadata.requires("lockgate") or []
            if "extra ==" not in r or 'extra == "http"' in r]  # what `make demo` installs
    installed = subprocess.run([str(python), "-m", "pip", "install", "-q", *base], capture_output=True, text=True,
                               timeout=1200)
    assert installed.returncode == 0, installed.stdout + installed.stderr
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    (Path(site) / "lockgate-checkout.pth").write_text(str(ROOT / "src") + "\n")
    listed = subprocess.run([str(python), "-m", "pip", "list", "--format=json"], capture_output=True, text=True, check=True)
    packages = {p["name"].lower() for p in json.loads(listed.stdout)}
    assert not packages & TEST_ONLY, packages & TEST_ONLY
    port = free_port()
    log = tmp_path / "demo.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(python), "-m", "lockgate.cli", "demo", "--dir", str(tmp_path / "demo-repo"),
                                 "--grpc-port", str(port), "--metrics-port", str(free_port()), "--host", "127.0.0.1"],
                                stdout=out, stderr=subprocess.STDOUT, env={"PATH": os.environ.get("PATH", "")})
    try:
        wait_server_ready(f"127.0.0.1:{port}", proc, log, timeout=300)
        assert _infer(f"127.0.0.1:{port}") == "approve,approve,decline,approve@1"
        # the README's explanation works without the explain extra: the demo's softmax regression
        # is explained exactly from its graph (shap is needed only for KernelSHAP and TreeSHAP)
        assert "shap" not in packages
        rita = re.search(r"export RITA_TOKEN=(\S+)", (tmp_path / "demo-repo" / "demo-tokens.env").read_text()).group(1)
        request = pb.ModelInferRequest(model_name="credit")
        request.inputs.add(name="features", datatype="FP32", shape=list(APPLICANTS.shape))
        request.raw_input_contents.append(APPLICANTS.tobytes())
        request.parameters["lockgate_explain"].bool_param = True
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            response = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
                request, timeout=60, metadata=[("authorization", f"Bearer {rita}")])
        assert response.parameters["lockgate_explain_method"].string_param == "linear"
        assert [o.name for o in response.outputs][-2:] == ["lockgate_attributions", "lockgate_base_value"]
        assert list(response.outputs[-2].shape) == [len(APPLICANTS), APPLICANTS.shape[1], 3]
    finally:
        _stop(proc)
