"""Attribution methods in process: exactness, additivity, agreement with shap, and the limits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import shap
from onnx import TensorProto, helper, numpy_helper

from explain_models import TREE_FEATURES, _model, logistic_model, shap_trees, tree_classifier
from lockgate.demo import mlp_model
from lockgate.errors import ExplainUnavailable, InvalidArgument
from lockgate.explain.background import Background, from_profile, load_background, sample_rows, save_background
from lockgate.explain.config import ExplainConfig
from lockgate.explain.explainer import OTHER_FEATURES, build_explainer
from lockgate.explain.importance import ImportanceTracker, importance_shift, load_windows
from lockgate.explain.config import ImportanceConfig
from lockgate.explain.kernel import BatchedKernelExplainer
from lockgate.governance.payload_log import REDACTED, Redactor

RNG = np.random.default_rng(11)


def _save(tmp_path: Path, name: str, model: onnx.ModelProto) -> Path:
    path = tmp_path / f"{name}.onnx"
    onnx.save(model, str(path))
    return path


def _run(path: Path, x: np.ndarray, output: str | None = None) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run([output] if output else None, {session.get_inputs()[0].name: x.astype(np.float32)})[0]


def test_logistic_regression_exact_coef_times_centred_x_in_logit_space(tmp_path: Path) -> None:
    coef = RNG.normal(size=7)
    mean, std = RNG.normal(size=7), RNG.uniform(0.5, 2.0, size=7)
    path = _save(tmp_path, "lr", logistic_model(coef, 0.25, standardise=(mean, std)))
    bg = RNG.normal(1.0, 2.0, size=(60, 7)).astype(np.float32)
    explainer = build_explainer(path, ExplainConfig(), Background({"features": bg}, "sample"))
    assert explainer.method == "linear" and explainer.space == "logit"
    x = RNG.normal(size=(9, 7)).astype(np.float32)
    out = explainer.explain(x)
    effective = coef / std.astype(np.float32)  # the standardisation folds into the coefficients
    expected = effective * (x.astype(np.float64) - bg.astype(np.float64).mean(axis=0))
    np.testing.assert_allclose(out.attributions[:, :, 0], expected, atol=1e-5)
    p = _run(path, x)[:, 0].astype(np.float64)
    np.testing.assert_allclose(out.base_value[0] + out.attributions[:, :, 0].sum(axis=1), np.log(p / (1 - p)), atol=1e-4)


def test_softmax_regression_via_gemm_and_ml_linear_regressor_add_up(tmp_path: Path) -> None:
    w, b = RNG.normal(size=(5, 3)).astype(np.float32), RNG.normal(size=3).astype(np.float32)
    gemm = helper.make_graph(
        [helper.make_node("Gemm", ["x", "W", "B"], ["logits"], transB=1),
         helper.make_node("Softmax", ["logits"], ["p"], axis=1)], "softmax",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 5])],
        [helper.make_tensor_value_info("p", TensorProto.FLOAT, ["n", 3])],
        initializer=[numpy_helper.from_array(w.T.copy(), "W"), numpy_helper.from_array(b, "B")])
    regressor = helper.make_graph(
        [helper.make_node("LinearRegressor", ["x"], ["y"], domain="ai.onnx.ml", coefficients=w[:, 0].tolist(),
                          intercepts=[0.5], targets=1)], "ml_linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 1])])
    bg = RNG.normal(size=(30, 5)).astype(np.float32)
    x = RNG.normal(size=(4, 5)).astype(np.float32)
    for name, graph, margin in (("gemm", _model(gemm), x @ w + b), ("ml", _model(regressor, ml=True), x @ w[:, :1] + 0.5)):
        path = _save(tmp_path, name, graph)
        explainer = build_explainer(path, ExplainConfig(), Background({"x": bg}, "sample"))
        assert explainer.method == "linear", explainer.skipped
        out = explainer.explain(x)
        np.testing.assert_allclose(out.base_value + out.attributions.sum(axis=1), margin, atol=1e-4)


def test_kernel_shap_equals_shap_kernel_explainer_with_one_model_run(tmp_path: Path) -> None:
    path = _save(tmp_path, "mlp", mlp_model([32, 16, 3], seed=4))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    calls: list[int] = []

    def model(a: np.ndarray) -> np.ndarray:
        calls.append(len(a))
        return session.run(None, {"features": a.astype(np.float32)})[0].astype(np.float64)

    bg = RNG.normal(size=(100, 32)).astype(np.float32)
    x = RNG.normal(size=(3, 32)).astype(np.float32)
    ours = BatchedKernelExplainer(model, bg, nsamples=200, seed=7)
    calls.clear()
    phi = ours.explain_rows(x)
    assert len(calls) == 1 and calls[0] == ours.evaluations  # the rows and every perturbation in one run
    np.random.seed(7)
    theirs = shap.KernelExplainer(lambda a: session.run(None, {"features": a.astype(np.float32)})[0], bg)
    expected = np.asarray(theirs.shap_values(x, nsamples=200, l1_reg=False, silent=True))
    np.testing.assert_allclose(phi, expected, atol=1e-5)
    np.testing.assert_allclose(ours.expected_value + phi.sum(axis=1), model(x), atol=1e-4)


def test_kernel_shap_rows_with_zero_or_one_varying_feature(tmp_path: Path) -> None:
    path = _save(tmp_path, "mlp", mlp_model([6, 8, 2], seed=8))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    f = lambda a: session.run(None, {"features": a.astype(np.float32)})[0]  # noqa: E731
    bg = np.tile(RNG.normal(size=6).astype(np.float32), (10, 1))
    bg[:, 2] = RNG.normal(size=10)  # only feature 2 varies in the background
    x = np.vstack([bg[0], bg[0], RNG.normal(size=6)]).astype(np.float32)
    x[0, 2] = 5.0  # one varying feature: it takes the whole difference
    x[1, 2] = bg[0, 2]  # ... still one (the background varies there); row 2: every feature varies
    phi = BatchedKernelExplainer(f, bg, nsamples=60, seed=1).explain_rows(x)
    np.random.seed(1)
    expected = np.asarray(shap.KernelExplainer(f, bg).shap_values(x, nsamples=60, l1_reg=False, silent=True))
    np.testing.assert_allclose(phi, expected, atol=1e-5)
    assert np.count_nonzero(np.abs(phi[0]).sum(axis=1)) == 1


def test_kernel_shap_with_l1_selection_matches_too(tmp_path: Path) -> None:
    path = _save(tmp_path, "mlp", mlp_model([12, 8, 2], seed=5))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    f = lambda a: session.run(None, {"features": a.astype(np.float32)})[0]  # noqa: E731
    bg = RNG.normal(size=(20, 12)).astype(np.float32)
    x = RNG.normal(size=(2, 12)).astype(np.float32)
    phi = BatchedKernelExplainer(f, bg, nsamples=300, l1_reg="num_features(5)", seed=3).explain_rows(x)
    np.random.seed(3)
    expected = np.asarray(shap.KernelExplainer(f, bg).shap_values(x, nsamples=300, l1_reg="num_features(5)", silent=True))
    np.testing.assert_allclose(phi, expected, atol=1e-5)


def test_tree_ensemble_classifier_matches_shap_tree_explainer(tmp_path: Path) -> None:
    path = _save(tmp_path, "trees", tree_classifier())
    bg = RNG.normal(size=(50, TREE_FEATURES)).astype(np.float32)
    explainer = build_explainer(path, ExplainConfig(method="tree"), Background({"features": bg}, "sample"))
    x = RNG.normal(size=(16, TREE_FEATURES)).astype(np.float32)
    x[0, 2] = 0.5  # exactly on a BRANCH_LT threshold: x < t is false, so the false branch
    x[1, 0] = 0.0  # exactly on a BRANCH_LEQ threshold
    x[2, 3] = np.float32(0.1)  # exactly on a BRANCH_GTE threshold: x >= t is true
    out = explainer.explain(x)
    reference = shap.TreeExplainer(shap_trees(), data=bg.astype(np.float64), feature_perturbation="interventional",
                                   model_output="raw")
    expected = np.asarray(reference.shap_values(x.astype(np.float64), check_additivity=False))
    np.testing.assert_allclose(out.attributions[3:], expected[3:], atol=1e-6)
    # on the ties the ONNX modes decide, and the translation keeps them: additivity against ORT holds
    np.testing.assert_allclose(out.base_value + out.attributions.sum(axis=1), _run(path, x, "scores"), atol=1e-4)


def test_feature_subset_sums_the_rest_into_other(tmp_path: Path) -> None:
    path = _save(tmp_path, "lr", logistic_model(RNG.normal(size=5), 0.0))
    bg = RNG.normal(size=(20, 5)).astype(np.float32)
    config = ExplainConfig(features=["b", 0], feature_names=["a", "b", "c", "d", "e"])
    explainer = build_explainer(path, config, Background({"features": bg}, "sample"))
    x = RNG.normal(size=(3, 5)).astype(np.float32)
    out = explainer.explain(x)
    full = build_explainer(path, ExplainConfig(), Background({"features": bg}, "sample")).explain(x)
    assert out.features == ["b", "a", OTHER_FEATURES]
    np.testing.assert_allclose(out.attributions[:, 0], full.attributions[:, 1], atol=1e-6)
    np.testing.assert_allclose(out.attributions.sum(axis=1), full.attributions.sum(axis=1), atol=1e-5)


def test_limits_and_refusals(tmp_path: Path) -> None:
    mlp = _save(tmp_path, "mlp", mlp_model([8, 8, 2], seed=6))
    bg = Background({"features": RNG.normal(size=(50, 8)).astype(np.float32)}, "sample")
    explainer = build_explainer(mlp, ExplainConfig(nsamples=200, max_evaluations=20_000), bg)
    assert set(explainer.skipped) == {"tree", "linear"}
    with pytest.raises(InvalidArgument, match="max_evaluations 20000"):
        explainer.explain(np.zeros((4, 8), np.float32))
    with pytest.raises(ExplainUnavailable, match="not affine"):
        build_explainer(mlp, ExplainConfig(method="linear"), bg)
    with pytest.raises(ExplainUnavailable, match="not a single TreeEnsemble"):
        build_explainer(mlp, ExplainConfig(method="tree"), bg)
    with pytest.raises(ExplainUnavailable, match="profile build"):
        build_explainer(mlp, ExplainConfig(), None)
    with pytest.raises(InvalidArgument, match="max_rows 2"):
        build_explainer(mlp, ExplainConfig(max_rows=2), bg).explain(np.zeros((3, 8), np.float32))


def test_background_file_roundtrip_and_profile_fallback(tmp_path: Path) -> None:
    data = RNG.normal(size=(500, 4))
    data[3, 1] = np.nan  # never part of a background
    sample = sample_rows(data, 100, seed=1)
    assert sample.shape == (100, 4) and np.isfinite(sample).all()
    np.testing.assert_array_equal(sample, sample_rows(data, 100, seed=1))
    path = save_background(tmp_path / "bg.npz", {"x": sample}, reference_importance={"features": ["a"], "mean_abs": [[1.0]]})
    loaded = load_background(path)
    np.testing.assert_array_equal(loaded.arrays["x"], sample)
    assert loaded.reference_importance["features"] == ["a"]
    from lockgate.governance.profile import build_profile

    means = from_profile(build_profile(data, model="m", version="1", input_name="x")).arrays["x"]
    np.testing.assert_allclose(means[0], np.nanmean(data, axis=0), atol=1e-9)


def test_attributions_are_redacted_like_the_payload() -> None:
    redactor = Redactor(["income", "secret_input"], {"x": ["age", "income", "region"]})
    phi = np.arange(12, dtype=np.float32).reshape(2, 3, 2)
    record = redactor.record({"inputs": {"x": np.ones((2, 3))}, "attributions": {"x": phi, "secret_input": phi},
                              "explanation": {"features": ["age", "income", "region"]}})
    assert record["attributions"]["secret_input"] == REDACTED
    assert all(row[1] == [REDACTED, REDACTED] for row in record["attributions"]["x"])
    assert record["attributions"]["x"][0][0] == [0.0, 1.0]
    subset = redactor.record({"attributions": {"x": phi}, "explanation": {"features": ["income", "age", "(other)"]}})
    assert all(row[0] == [REDACTED, REDACTED] and row[1] != [REDACTED, REDACTED] for row in subset["attributions"]["x"])


def test_importance_windows_merge_persist_and_shift(tmp_path: Path) -> None:
    reference = {"features": ["a", "b"], "outputs": ["y[0]"], "mean_abs": [[1.0], [1.0]]}
    tracker = ImportanceTracker("m", "1", ImportanceConfig(window_rows=4, window_seconds=None), tmp_path, reference)
    tracker.add(np.array([[[3.0], [-1.0]], [[-3.0], [1.0]]]), "linear", ["a", "b"], ["y[0]"])
    assert tracker.last is None
    tracker.add(np.array([[[3.0], [1.0]], [[3.0], [-1.0]]]), "linear", ["a", "b"], ["y[0]"])
    window = tracker.last
    assert window is not None and window.rows == 4 and window.per_feature() == {"a": 3.0, "b": 1.0}
    shift = importance_shift(window.per_feature(), tracker.reference)
    assert shift["shift"] == pytest.approx(0.25)  # shares 0.75/0.25 against 0.5/0.5
    assert shift["features"]["a"]["delta"] == pytest.approx(0.25)
    [persisted] = load_windows(tmp_path, "m", "1")
    assert persisted.per_feature() == window.per_feature()
    merged = persisted.merge(window)
    assert merged.rows == 8 and merged.per_feature() == window.per_feature()
    assert importance_shift({"a": 1.0}, None) is None and importance_shift({"a": 1.0}, {"z": 1.0}) is None


def test_worker_checks_the_artifact_keeps_its_cpu_budget_and_refuses_late_jobs(tmp_path: Path) -> None:
    import hashlib
    import time

    from lockgate.errors import ArtifactTamperedError, ExplainDeadlineExceeded
    from lockgate.explain import worker

    path = _save(tmp_path, "lr", logistic_model(RNG.normal(size=3), 0.0))
    bg_path = save_background(tmp_path / "bg.npz", {"features": RNG.normal(size=(10, 3)).astype(np.float32)})
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    spec = worker.JobSpec("model 'lr' version 1", str(path), digest, ExplainConfig().fingerprint(), str(bg_path), None, None)
    tampered = worker.JobSpec("model 'lr' version 1", str(path), "0" * 64, spec.config_json, str(bg_path), None, None)
    x = np.ones((2, 3), np.float32)
    saved = dict(worker._budget)
    try:
        worker._budget.update(share=0.5, rest_until=0.0)
        with pytest.raises(ArtifactTamperedError):
            worker.explain_job(tampered, x, None)
        before = time.monotonic()
        assert worker.explain_job(spec, x, None).attributions.shape == (2, 3, 1)
        assert worker._budget["rest_until"] > before  # it rests as long as it worked (share 0.5)
        worker._budget["rest_until"] = time.monotonic() + 30.0
        with pytest.raises(ExplainDeadlineExceeded, match="CPU budget"):
            worker.explain_job(spec, x, time.monotonic() + 0.05)
        worker._budget["rest_until"] = 0.0
        with pytest.raises(ExplainDeadlineExceeded, match="queued"):
            worker.explain_job(spec, x, time.monotonic() - 1.0)
    finally:
        worker._budget.update(saved)
