"""Explanations over a real lockgate server with tritonclient: the three methods, additivity,
the bounded explain queue under a flood, sampled explanations in the payload log, importance
gauges, and the explain permission."""

from __future__ import annotations

import json
import statistics
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import shap
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException
from typer.testing import CliRunner

from conftest import write_model
from explain_models import TREE_FEATURES, logistic_model, shap_trees, tree_classifier
from lockgate.cli import app
from lockgate.demo import mlp_model
from lockgate.explain.background import background_path, load_background
from lockgate_process import LockgateProcess

EXPLAIN = {"lockgate_explain": True}
MLP_FEATURES = 32
MLP_CONFIG = """\
max_batch_size: 64
dynamic_batching: {max_queue_delay_us: 0}
runtime: {execution: thread}
governance:
  mode: flag
  inputs:
    features:
      feature_names: [%s]
  sampling: {rate: 1.0, max_per_second: 10000}
  payload_log: {redact: [f3]}
explain:
  nsamples: 128
  background_size: 20
  max_rows: 16
  max_queue: 4
  sample_share: 1.0
  timeout_s: 60
  importance: {window_rows: 16, window_seconds: null}
""" % ", ".join(f"f{j}" for j in range(MLP_FEATURES))
LR_COEF = np.array([0.8, -1.2, 0.3, 2.0, -0.5, 0.05])
LR_INTERCEPT = -0.4


def _profile(repo: Path, model: str, data: np.ndarray, *extra: str) -> None:
    path = repo.parent / f"{model}-reference.npy"
    np.save(path, data.astype(np.float32))
    result = CliRunner().invoke(app, ["profile", "build", "--model", model, "--version", "1", "--data", str(path),
                                      "--model-repository", str(repo), *extra])
    assert result.exit_code == 0, result.output
    assert "explanation background" in result.output


@pytest.fixture(scope="module")
def explain_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("explain") / "models"
    rng = np.random.default_rng(5)
    write_model(repo, "mlp", 1, mlp_model([MLP_FEATURES, 64, 3], seed=2), MLP_CONFIG)
    _profile(repo, "mlp", rng.normal(size=(400, MLP_FEATURES)), "--background", "20", "--importance-rows", "8")
    write_model(repo, "lr", 1, logistic_model(LR_COEF, LR_INTERCEPT), "max_batch_size: 64\nexplain: {}\n")
    _profile(repo, "lr", rng.normal(2.0, 1.5, size=(400, len(LR_COEF))), "--background", "50")
    write_model(repo, "trees", 1, tree_classifier(), "max_batch_size: 64\nexplain: {method: tree}\n")
    _profile(repo, "trees", rng.normal(size=(400, TREE_FEATURES)), "--background", "40")
    return repo


@pytest.fixture(scope="module")
def server(explain_repo: Path):
    with LockgateProcess(explain_repo) as proc:
        yield proc


# ``client`` is conftest's: a tritonclient on this module's ``server``


def _infer(client, model: str, x: np.ndarray, output: str, **kwargs):
    inp = grpcclient.InferInput("features", list(x.shape), "FP32")
    inp.set_data_from_numpy(x.astype(np.float32))
    return client.infer(model, [inp], **kwargs)


def _background(repo: Path, model: str, rows: int | None = None) -> np.ndarray:
    bg = load_background(background_path(repo, model, "1")).arrays["features"]
    return bg if rows is None else bg[:rows]


def test_batch_of_8_rows_kernel_shap_matches_shap_and_adds_up(client, explain_repo: Path) -> None:
    x = np.random.default_rng(1).normal(size=(8, MLP_FEATURES)).astype(np.float32)
    result = _infer(client, "mlp", x, "probabilities", parameters=EXPLAIN, client_timeout=120)
    phi = result.as_numpy("lockgate_attributions")
    base = result.as_numpy("lockgate_base_value")
    probabilities = result.as_numpy("probabilities")
    assert phi.dtype == np.float32 and phi.shape == (8, MLP_FEATURES, 3)
    assert base.shape == (3,)
    params = result.get_response().parameters
    assert params["lockgate_explain_method"].string_param == "kernel"
    assert json.loads(params["lockgate_attribution_features"].string_param) == [f"f{j}" for j in range(MLP_FEATURES)]
    np.testing.assert_allclose(base + phi.sum(axis=1), probabilities, atol=1e-4)
    # the same model, background and seed through shap.KernelExplainer calling ONNX Runtime row by row
    session = ort.InferenceSession(str(explain_repo / "mlp" / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    np.random.seed(0)
    reference = shap.KernelExplainer(lambda a: session.run(None, {"features": a.astype(np.float32)})[0],
                                     _background(explain_repo, "mlp", 20))
    expected = np.asarray(reference.shap_values(x, nsamples=128, l1_reg=False, silent=True))
    np.testing.assert_allclose(phi, expected, atol=1e-5)
    np.testing.assert_allclose(base, reference.expected_value, atol=1e-5)


def test_logistic_regression_is_exact_in_logit_space(client, explain_repo: Path) -> None:
    x = np.random.default_rng(2).normal(2.0, 1.5, size=(5, len(LR_COEF))).astype(np.float32)
    result = _infer(client, "lr", x, "probability", parameters=EXPLAIN)
    phi = result.as_numpy("lockgate_attributions")[:, :, 0]
    base = result.as_numpy("lockgate_base_value")[0]
    params = result.get_response().parameters
    assert params["lockgate_explain_method"].string_param == "linear"
    assert params["lockgate_explain_space"].string_param == "logit"
    mean = _background(explain_repo, "lr").astype(np.float64).mean(axis=0)
    np.testing.assert_allclose(phi, LR_COEF * (x.astype(np.float64) - mean), atol=1e-5)
    p = result.as_numpy("probability")[:, 0].astype(np.float64)
    np.testing.assert_allclose(base + phi.sum(axis=1), np.log(p / (1 - p)), atol=1e-4)


def test_tree_ensemble_classifier_matches_shap_tree_explainer(client, explain_repo: Path) -> None:
    x = np.random.default_rng(3).normal(size=(8, TREE_FEATURES)).astype(np.float32)
    result = _infer(client, "trees", x, "scores", parameters=EXPLAIN)
    phi = result.as_numpy("lockgate_attributions")
    base = result.as_numpy("lockgate_base_value")
    assert result.get_response().parameters["lockgate_explain_method"].string_param == "tree"
    reference = shap.TreeExplainer(shap_trees(), data=_background(explain_repo, "trees").astype(np.float64),
                                   feature_perturbation="interventional", model_output="raw")
    expected = np.asarray(reference.shap_values(x.astype(np.float64), check_additivity=False))
    np.testing.assert_allclose(phi, expected, atol=1e-5)
    np.testing.assert_allclose(base + phi.sum(axis=1), result.as_numpy("scores"), atol=1e-4)


def test_rest_with_tritonclient_http_explains_like_grpc(client, server: LockgateProcess) -> None:
    """REST builds the same ModelInferRequest: a batch of 8 explained over tritonclient.http
    equals the gRPC answer, whether the requested output is binary or JSON."""
    x = np.random.default_rng(7).normal(size=(8, TREE_FEATURES)).astype(np.float32)
    over_grpc = _infer(client, "trees", x, "scores", parameters=EXPLAIN)
    http = httpclient.InferenceServerClient(server.http_url, network_timeout=120)
    try:
        for binary in (True, False):
            inp = httpclient.InferInput("features", list(x.shape), "FP32")
            inp.set_data_from_numpy(x, binary_data=binary)
            result = http.infer("trees", [inp], parameters=EXPLAIN,
                                outputs=[httpclient.InferRequestedOutput("scores", binary_data=binary)])
            phi = result.as_numpy("lockgate_attributions")
            assert phi.dtype == np.float32 and phi.shape == (8, TREE_FEATURES, 3)
            np.testing.assert_array_equal(phi, over_grpc.as_numpy("lockgate_attributions"))
            np.testing.assert_array_equal(result.as_numpy("lockgate_base_value"), over_grpc.as_numpy("lockgate_base_value"))
            assert result.get_response()["parameters"]["lockgate_explain_method"] == "tree"
            np.testing.assert_allclose(result.as_numpy("lockgate_base_value") + phi.sum(axis=1),
                                       result.as_numpy("scores"), atol=1e-4)
    finally:
        http.close()


def test_rest_plain_json_explanation_and_its_errors(server: LockgateProcess) -> None:
    x = np.random.default_rng(8).normal(2.0, 1.5, size=(3, len(LR_COEF))).astype(np.float32)
    body = {"id": "json-1", "parameters": {"lockgate_explain": True},
            "inputs": [{"name": "features", "shape": list(x.shape), "datatype": "FP32", "data": x.tolist()}]}
    status, answer = server.post("/v2/models/lr/infer", body)
    assert status == 200, answer
    outputs = {o["name"]: o for o in answer["outputs"]}
    attributions = outputs["lockgate_attributions"]
    assert attributions["datatype"] == "FP32" and attributions["shape"] == [3, len(LR_COEF), 1]
    phi = np.array(attributions["data"], dtype=np.float64).reshape(attributions["shape"])[:, :, 0]
    assert answer["parameters"]["lockgate_explain_method"] == "linear"
    assert json.loads(answer["parameters"]["lockgate_attribution_features"]) == [f"f{j}" for j in range(len(LR_COEF))]
    base = outputs["lockgate_base_value"]["data"][0]
    p = np.array(outputs["probability"]["data"], dtype=np.float64)
    np.testing.assert_allclose(base + phi.sum(axis=1), np.log(p / (1 - p)), atol=1e-4)
    # a bad parameter and too many rows: 400 naming the parameter / the limit, as INVALID_ARGUMENT over gRPC
    status, answer = server.post("/v2/models/lr/infer", {**body, "parameters": {"lockgate_explain": "maybe"}})
    assert status == 400 and "lockgate_explain" in answer["error"]
    many = np.zeros((20, MLP_FEATURES), np.float32)
    status, answer = server.post("/v2/models/mlp/infer", {"parameters": {"lockgate_explain": True}, "inputs": [
        {"name": "features", "shape": list(many.shape), "datatype": "FP32", "data": many.tolist()}]})
    assert status == 400 and "max_rows 16" in answer["error"]


def test_unexplained_requests_get_no_extra_outputs(client) -> None:
    x = np.zeros((2, len(LR_COEF)), np.float32)
    for parameters in (None, {"lockgate_explain": False}, {"routing_key": "k"}):
        result = _infer(client, "lr", x, "probability", parameters=parameters)
        names = [o.name for o in result.get_response().outputs]
        assert names == ["probability"]


def test_bad_explain_parameter_and_too_many_rows_are_invalid_argument(client) -> None:
    with pytest.raises(InferenceServerException) as bad:
        _infer(client, "lr", np.zeros((1, len(LR_COEF))), "probability", parameters={"lockgate_explain": "maybe"})
    assert "StatusCode.INVALID_ARGUMENT" in str(bad.value.status()) and "lockgate_explain" in bad.value.message()
    with pytest.raises(InferenceServerException) as many:
        _infer(client, "mlp", np.zeros((20, MLP_FEATURES)), "probabilities", parameters=EXPLAIN)
    assert "StatusCode.INVALID_ARGUMENT" in str(many.value.status())
    assert "20 rows" in many.value.message() and "max_rows 16" in many.value.message()


def _p50(client, x: np.ndarray, n: int) -> float:
    times = []
    for _ in range(n):
        start = time.perf_counter()
        _infer(client, "mlp", x, "probabilities")
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def test_explain_flood_is_bounded_and_plain_latency_holds(server: LockgateProcess) -> None:
    """Explain requests beyond max_queue get RESOURCE_EXHAUSTED at once; plain requests to the
    same version keep their latency (compared within this run, alternating phases)."""
    x_plain = np.random.default_rng(4).normal(size=(1, MLP_FEATURES)).astype(np.float32)
    x_explain = np.random.default_rng(5).normal(size=(8, MLP_FEATURES)).astype(np.float32)
    outcomes: dict[str, int] = {"ok": 0, "exhausted": 0, "other": 0}
    lock = threading.Lock()
    flooding = threading.Event()
    stop = threading.Event()

    def flood() -> None:
        c = grpcclient.InferenceServerClient(server.url)
        try:
            while not stop.is_set():
                if not flooding.wait(0.05):
                    continue
                try:
                    _infer(c, "mlp", x_explain, "probabilities", parameters=EXPLAIN, client_timeout=120)
                    key = "ok"
                except InferenceServerException as exc:
                    key = "exhausted" if "RESOURCE_EXHAUSTED" in str(exc.status()) else "other"
                    time.sleep(0.005)  # a client backing off, as a real one would
                with lock:
                    outcomes[key] += 1
        finally:
            c.close()

    threads = [threading.Thread(target=flood, daemon=True) for _ in range(8)]
    for t in threads:
        t.start()
    client = grpcclient.InferenceServerClient(server.url)
    base, loaded = [], []
    try:
        _p50(client, x_plain, 20)  # warm
        for _ in range(3):
            base.append(_p50(client, x_plain, 40))
            flooding.set()
            deadline = time.monotonic() + 60
            while outcomes["exhausted"] == 0 and time.monotonic() < deadline:  # the queue is full now
                time.sleep(0.01)
            loaded.append(_p50(client, x_plain, 40))
            flooding.clear()
            time.sleep(0.2)
    finally:
        stop.set()
        for t in threads:
            t.join(180)
        client.close()
    assert outcomes["other"] == 0, outcomes
    assert outcomes["exhausted"] > 0 and outcomes["ok"] > 0, outcomes
    b, f = statistics.median(base), statistics.median(loaded)
    assert f <= 3.0 * b + 0.002, f"plain p50 {f * 1e3:.2f} ms under an explain flood vs {b * 1e3:.2f} ms without"


def _series(server: LockgateProcess, name: str, **labels: str) -> list[float]:
    """Values of one family's series whose labels include ``labels`` (label order as exposed)."""
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10).read().decode()
    return [s.value for family in text_string_to_metric_families(text) for s in family.samples
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]


def _wait(condition, timeout: float = 120.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_sampled_payloads_carry_redacted_attributions_and_feed_importance(server: LockgateProcess, client) -> None:
    rng = np.random.default_rng(6)
    for i in range(12):
        _infer(client, "mlp", rng.normal(size=(2, MLP_FEATURES)).astype(np.float32), "probabilities",
               request_id=f"sampled-{i}")
    log_file = server.state_dir / "payloads" / "mlp" / "1" / "payloads.jsonl"

    def explained() -> list[dict]:
        if not log_file.exists():
            return []
        records = [json.loads(line) for line in log_file.read_text().splitlines() if line.strip()]
        return [r for r in records if r.get("request_id", "").startswith("sampled-") and "explanation" in r]

    records = _wait(lambda: len(explained()) >= 12 and explained(), what="12 sampled payloads in the payload log")
    ok = [r for r in records if r["explanation"]["status"] == "ok"]
    skipped = [r for r in records if r["explanation"]["status"] != "ok"]
    assert ok and all(r["explanation"]["reason"] == "explain_queue_full" for r in skipped)
    for record in ok:
        attributions = record["attributions"]["features"]
        assert len(attributions) == 2 and len(attributions[0]) == MLP_FEATURES and len(attributions[0][0]) == 3
        assert all(row[3] == ["[REDACTED]"] * 3 for row in attributions)  # f3, as in the inputs
        assert all(row[3] == "[REDACTED]" for row in record["inputs"]["features"])
        phi = np.array([[c for j, c in enumerate(row) if j != 3] for row in attributions], dtype=float)
        assert np.isfinite(phi).all() and np.abs(phi).sum() > 0
    # 16 explained rows close an importance window: per-feature gauges and the shift vs the reference
    for i in range(16):  # paced so they are explained, not skipped for a full queue
        _infer(client, "mlp", rng.normal(size=(2, MLP_FEATURES)).astype(np.float32), "probabilities",
               request_id=f"more-{i}")
        _wait(lambda: not _series(server, "lockgate_explain_in_flight", model="mlp", version="1", queue="sampled")[0] >= 2,
              what="room in the explain queue")
    mv = {"model": "mlp", "version": "1"}
    shift = _wait(lambda: _series(server, "lockgate_feature_importance_shift", **mv, baseline="reference"),
                  what="the importance shift gauge")
    assert 0.0 <= shift[0] <= 1.0
    assert _series(server, "lockgate_feature_importance", **mv, feature="f0")[0] > 0
    assert _series(server, "lockgate_explanations_sampled_total", **mv, outcome="ok")[0] >= 8
    assert any(p.name.startswith("importance-") for p in (server.state_dir / "explain" / "mlp" / "1").iterdir())


def test_explanations_need_the_explain_permission_when_tokens_are_set(explain_repo: Path) -> None:
    tokens = "ana:analyst:lgt_ana,vic:viewer:lgt_vic"
    x = np.ones((1, len(LR_COEF)), np.float32)
    with LockgateProcess(explain_repo, env={"LOCKGATE_TOKENS": tokens}) as proc:
        c = grpcclient.InferenceServerClient(proc.url)
        try:
            assert _infer(c, "lr", x, "probability").as_numpy("probability").shape == (1, 1)  # plain: no token
            with pytest.raises(InferenceServerException) as none:
                _infer(c, "lr", x, "probability", parameters=EXPLAIN)
            assert "UNAUTHENTICATED" in str(none.value.status())
            with pytest.raises(InferenceServerException) as viewer:
                _infer(c, "lr", x, "probability", parameters=EXPLAIN, headers={"authorization": "Bearer lgt_vic"})
            assert "PERMISSION_DENIED" in str(viewer.value.status()) and "explain" in viewer.value.message()
            ok = _infer(c, "lr", x, "probability", parameters=EXPLAIN, headers={"authorization": "Bearer lgt_ana"})
            assert ok.as_numpy("lockgate_attributions").shape == (1, len(LR_COEF), 1)
        finally:
            c.close()
        # the same permission over REST (the Authorization header reaches the pipeline as metadata)
        body = {"parameters": {"lockgate_explain": True},
                "inputs": [{"name": "features", "shape": [1, len(LR_COEF)], "datatype": "FP32", "data": x.tolist()}]}
        status, answer = proc.post("/v2/models/lr/infer", {"inputs": body["inputs"]})
        assert status == 200 and [o["name"] for o in answer["outputs"]] == ["probability"]  # plain: no token
        status, answer = proc.post("/v2/models/lr/infer", body)
        assert status == 401, answer
        status, answer = proc.post("/v2/models/lr/infer", body, token="lgt_vic")
        assert status == 403 and "explain" in answer["error"], answer
        status, answer = proc.post("/v2/models/lr/infer", body, token="lgt_ana")
        assert status == 200 and "lockgate_attributions" in [o["name"] for o in answer["outputs"]]
