"""Outcome state and figures against the reference implementations (scikit-learn, fairlearn).

The streaming state is exact where it counts: confusion matrices, selection rates and the
fairness gaps equal fairlearn / scikit-learn on the same rows to 1e-9, and a merge of any
split of the rows (replicas) equals one state that saw them all.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from fairlearn.metrics import (
    MetricFrame,
    demographic_parity_difference,
    demographic_parity_ratio,
    equalized_odds_difference,
    false_positive_rate,
    selection_rate,
    true_positive_rate,
)
from pydantic import ValidationError
from sklearn import metrics as skm

from lockgate.outcomes.config import OutcomesConfig
from lockgate.outcomes.fairness import fairness, newcombe
from lockgate.outcomes.quality import quality, wilson
from lockgate.outcomes.spec import OutcomeConfigError, OutcomeSpec, row_key
from lockgate.outcomes.state import OutcomeWindow, merge_windows
from lockgate.routing.policy import Guardrails, PolicyError
from lockgate.outcomes.guardrails import evaluate

EXACT = 1e-9


def binary_spec(**overrides) -> OutcomeSpec:
    section = {
        "task": "binary", "class_names": ["deny", "approve"],
        "segments": {"gender": {"parameter": "gender", "categories": ["f", "m", "x"]},
                     "age": {"input": "x", "feature": 0, "bins": [30, 50]}},
        "protected": ["gender", "age"], "fairness": {"max_depth": 2, "min_group_size": 1},
        **overrides,
    }
    return OutcomeSpec.build("m", OutcomesConfig.model_validate(section), [("p", (-1, 2))], [("x", (-1, 3))])


def biased_rows(n: int = 6000, seed: int = 0):
    rng = np.random.default_rng(seed)
    gender = rng.choice(3, n, p=[0.45, 0.45, 0.10])
    age = rng.uniform(18, 80, n)
    signal = rng.standard_normal(n)
    y = (signal + 0.5 * rng.standard_normal(n) > 0).astype(int)
    # the model favours gender 1 and penalises the young: a biased model
    p = 1 / (1 + np.exp(-(2 * signal + 1.2 * (gender == 1) - 0.8 * (age < 30))))
    pred = (p >= 0.5).astype(int)
    return gender, age, y, p, pred


def fill(spec: OutcomeSpec, gender, age, y, p, pred, parts: int = 1) -> list[OutcomeWindow]:
    cells = (np.array([spec.segments[0].code_of_text(["f", "m", "x"][g]) for g in gender]) * spec.strides[0]
             + spec.segments[1].codes_of_values(age) * spec.strides[1])
    states = []
    for idx in np.array_split(np.arange(len(y)), parts):
        w = OutcomeWindow.empty(spec, "1", 7)
        w.add_predictions(cells[idx], pred[idx])
        w.add_labels(spec, cells[idx], y[idx], pred[idx], p[idx], np.full(len(idx), 30.0))
        states.append(w)
    return states


def test_binary_quality_equals_sklearn_and_merges_exactly() -> None:
    spec = binary_spec()
    gender, age, y, p, pred = biased_rows()
    whole = fill(spec, gender, age, y, p, pred)[0]
    split = merge_windows(OutcomeWindow.from_bytes(s.to_bytes()) for s in fill(spec, gender, age, y, p, pred, parts=5))
    for name in ("predicted", "confusion", "hist", "calib_count", "calib_hit", "scored", "delay_hist"):
        assert np.array_equal(whole[name], split[name]), name
    np.testing.assert_allclose(whole["loss"], split["loss"], rtol=1e-12)
    m = quality(split, spec)["metrics"]
    assert abs(m["accuracy"]["value"] - skm.accuracy_score(y, pred)) < EXACT
    assert abs(m["precision"]["value"] - skm.precision_score(y, pred)) < EXACT
    assert abs(m["recall"]["value"] - skm.recall_score(y, pred)) < EXACT
    assert abs(m["f1"]["value"] - skm.f1_score(y, pred)) < EXACT
    assert abs(m["specificity"]["value"] - skm.recall_score(y, pred, pos_label=0)) < EXACT
    assert abs(m["log_loss"]["value"] - skm.log_loss(y, p)) < 1e-9
    assert abs(m["brier"]["value"] - skm.brier_score_loss(y, p)) < 1e-9
    assert abs(m["auc"]["value"] - skm.roc_auc_score(y, p)) < 2e-3  # 200-bin histogram
    assert m["confusion_matrix"]["rows_true_columns_predicted"] == skm.confusion_matrix(y, pred).tolist()
    lo, hi = m["accuracy"]["ci"]
    assert lo < m["accuracy"]["value"] < hi
    # ECE from the folded reliability bins equals a direct top-label computation
    conf = np.maximum(p, 1 - p)
    bins = np.minimum((conf * 10).astype(int), 9)
    correct = (pred == y)
    ece = sum(abs(correct[bins == b].sum() - conf[bins == b].sum()) for b in range(10)) / len(y)
    assert abs(m["ece"]["value"] - ece) < 1e-9
    cov = quality(split, spec)
    assert cov["coverage"] == 1.0 and cov["delay_s"]["p50"] == 32.0


def test_fairness_equals_fairlearn_per_segment_and_intersection() -> None:
    spec = binary_spec()
    gender, age, y, p, pred = biased_rows()
    state = fill(spec, gender, age, y, p, pred, parts=3)
    report = {s["segment"]: s for s in fairness(merge_windows(state), spec)}
    assert set(report) == {"gender", "age", "gender & age"}
    gender_names = np.array(["f", "m", "x"])[gender]
    age_names = np.array(spec.segments[1].groups)[spec.segments[1].codes_of_values(age)]
    features = {"gender": gender_names, "age": age_names,
                "gender & age": pd.DataFrame({"gender": gender_names, "age": age_names})}
    for name, sf in features.items():
        segment = report[name]
        summary = segment["summary"]
        assert abs(summary["demographic_parity_difference"]["value"] - demographic_parity_difference(y, pred, sensitive_features=sf)) < EXACT
        assert abs(summary["demographic_parity_ratio"]["value"] - demographic_parity_ratio(y, pred, sensitive_features=sf)) < EXACT
        assert abs(summary["equalized_odds_difference"]["value"] - equalized_odds_difference(y, pred, sensitive_features=sf)) < EXACT
        # every figure carries its interval, around its value
        for key in ("demographic_parity_difference", "demographic_parity_ratio", "equalized_odds_difference",
                    "tpr_gap", "fpr_gap", "accuracy_gap"):
            lo, hi = summary[key]["ci"]
            assert lo <= summary[key]["value"] <= hi, (name, key)
        frame = MetricFrame(metrics={"sr": selection_rate, "tpr": true_positive_rate, "fpr": false_positive_rate,
                                     "acc": skm.accuracy_score}, y_true=y, y_pred=pred, sensitive_features=sf)
        by_group = frame.by_group
        groups = {g["group"]: g for g in segment["groups"]}
        assert len(groups) == len(by_group)
        for key, row in by_group.iterrows():
            label = " & ".join(key) if isinstance(key, tuple) else key
            g = groups[label]
            assert abs(g["selection_rate"]["value"] - row["sr"]) < EXACT
            assert abs(g["tpr"]["value"] - row["tpr"]) < EXACT
            assert abs(g["fpr"]["value"] - row["fpr"]) < EXACT
            assert abs(g["accuracy"]["value"] - row["acc"]) < EXACT
            ref = groups[segment["reference"]]
            if g is not ref:
                assert abs(g["spd"]["value"] - (row["sr"] - ref["selection_rate"]["value"])) < EXACT
                assert abs(g["dir"]["value"] - row["sr"] / ref["selection_rate"]["value"]) < EXACT
                for key in ("spd", "dir"):
                    lo, hi = g[key]["ci"]
                    assert lo <= g[key]["value"] <= hi, (name, label, key)
    # the reference is the largest group; the biased model breaches SPD and DIR for the others
    assert report["gender"]["reference"] in ("f", "m")
    assert {b["group"] for b in report["gender"]["breaches"]} & {"f", "m"}


def test_small_groups_never_alert() -> None:
    spec = binary_spec(fairness={"max_depth": 1, "min_group_size": 700})
    gender, age, y, p, pred = biased_rows()
    report = {s["segment"]: s for s in fairness(fill(spec, gender, age, y, p, pred)[0], spec)}
    x = next(g for g in report["gender"]["groups"] if g["group"] == "x")  # ~600 rows: below 700
    assert x["n"] < 700 and not x["selection_rate"]["eligible"] and not x["spd"]["eligible"]
    assert all(b["group"] != "x" for b in report["gender"]["breaches"])
    # a gap is judged over eligible groups only
    assert "x" not in report["gender"]["summary"]["demographic_parity_difference"]["groups"]


def test_multiclass_and_regression_quality_equal_sklearn() -> None:
    cfg = OutcomesConfig.model_validate({"task": "multiclass", "class_names": ["a", "b", "c"], "positive_class": "a"})
    spec = OutcomeSpec.build("m", cfg, [("p", (-1, 3))], [])
    rng = np.random.default_rng(3)
    logits = rng.standard_normal((3000, 3))
    probs = (np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)).astype(np.float32).astype(np.float64)
    probs /= probs.sum(axis=1, keepdims=True)  # float32 rounding left sums 1 +- 1e-7: sklearn warns
    y = (rng.uniform(size=(3000, 1)) > np.cumsum(probs, axis=1)[:, :2]).sum(axis=1)
    pred = probs.argmax(axis=1)
    w = OutcomeWindow.empty(spec, "1", 0)
    w.add_predictions(np.zeros(3000, np.int64), pred)
    w.add_labels(spec, np.zeros(3000, np.int64), y, pred, probs, np.zeros(3000))
    m = quality(w, spec)["metrics"]
    assert abs(m["accuracy"]["value"] - skm.accuracy_score(y, pred)) < EXACT
    assert abs(m["precision"]["value"] - skm.precision_score(y, pred, average="macro")) < EXACT
    assert abs(m["recall"]["value"] - skm.recall_score(y, pred, average="macro")) < EXACT
    assert abs(m["f1"]["value"] - skm.f1_score(y, pred, average="macro")) < EXACT
    assert abs(m["log_loss"]["value"] - skm.log_loss(y, probs)) < 1e-6
    onehot = np.eye(3)[y]
    assert abs(m["brier"]["value"] - ((probs - onehot) ** 2).sum(axis=1).mean()) < 1e-9
    assert abs(m["auc"]["value"] - skm.roc_auc_score(y, probs, multi_class="ovr", average="macro")) < 3e-3

    rcfg = OutcomesConfig.model_validate({"task": "regression", "segments": {"s": {"input": "x", "feature": 0, "bins": [0]}}})
    rspec = OutcomeSpec.build("r", rcfg, [("v", (-1, 1))], [("x", (-1, 2))])
    yt = rng.normal(5, 2, 4000)
    yp = yt + rng.normal(0, 1, 4000)
    cells = rng.integers(0, rspec.n_cells, 4000)
    parts = []
    for idx in np.array_split(np.arange(4000), 4):
        s = OutcomeWindow.empty(rspec, "1", 0)
        s.add_predictions(cells[idx], None)
        s.add_labels(rspec, cells[idx], yt[idx], yp[idx], None, np.zeros(len(idx)))
        parts.append(s)
    r = quality(merge_windows(parts), rspec)["metrics"]
    assert abs(r["mae"]["value"] - skm.mean_absolute_error(yt, yp)) < 1e-9
    assert abs(r["rmse"]["value"] - np.sqrt(skm.mean_squared_error(yt, yp))) < 1e-9
    assert abs(r["mape"]["value"] - skm.mean_absolute_percentage_error(yt, yp)) < 1e-9
    assert abs(r["r2"]["value"] - skm.r2_score(yt, yp)) < 1e-9


def test_wilson_and_newcombe_known_values() -> None:
    # Newcombe (1998), Table II: 56/70 vs 48/80 -> difference 0.2, 95% CI 0.0524 to 0.3339
    lo, hi = newcombe(56, 70, 48, 80, 0.95)
    assert abs(lo - 0.0524) < 5e-4 and abs(hi - 0.3339) < 5e-4
    lo, hi = wilson(81, 263, 0.95)  # Wilson interval of 81/263: 0.2553 .. 0.3662
    assert abs(lo - 0.2553) < 5e-4 and abs(hi - 0.3662) < 5e-4
    assert wilson(0, 0) is None


def test_config_and_spec_errors_name_the_problem() -> None:
    with pytest.raises(ValidationError, match="protected names undeclared"):
        OutcomesConfig.model_validate({"task": "binary", "protected": ["gender"]})
    with pytest.raises(ValidationError, match="either an input feature"):
        OutcomesConfig.model_validate({"task": "binary", "segments": {"g": {"categories": ["a"]}}})
    with pytest.raises(ValidationError, match="strictly ascending"):
        OutcomesConfig.model_validate({"task": "binary", "segments": {"g": {"parameter": "g", "bins": [2, 1]}}})
    with pytest.raises(ValidationError, match="extra"):
        OutcomesConfig.model_validate({"task": "binary", "fairnes": {}})
    cfg = OutcomesConfig.model_validate({"task": "binary", "prediction": {"output": "nope"}})
    with pytest.raises(OutcomeConfigError, match="prediction output 'nope'"):
        OutcomeSpec.build("m", cfg, [("p", (-1, 2))], [])
    cfg = OutcomesConfig.model_validate({"task": "multiclass", "class_names": ["a", "b", "c"]})
    with pytest.raises(OutcomeConfigError, match="2 columns for 3 classes"):
        OutcomeSpec.build("m", cfg, [("p", (-1, 2))], [])
    cfg = OutcomesConfig.model_validate({"task": "binary", "segments": {"a": {"input": "x", "feature": 5, "bins": [0]}}})
    with pytest.raises(OutcomeConfigError, match="feature column 5"):
        OutcomeSpec.build("m", cfg, [("p", (-1, 2))], [("x", (-1, 3))])


def test_row_keys_are_stable_positive_and_distinct() -> None:
    keys = {row_key(f"r-{i}", row) for i in range(2000) for row in range(5)}
    assert len(keys) == 10_000 and min(keys) > 0 and max(keys) < 2**63
    assert row_key("abc", 3) == row_key("abc", 3)


def test_outcome_guardrails_fail_closed_and_judge_the_drop() -> None:
    spec = binary_spec()
    gender, age, y, p, pred = biased_rows()
    good = fill(spec, gender, age, y, p, pred)[0]
    rng = np.random.default_rng(9)
    worse_pred = np.where(rng.uniform(size=len(y)) < 0.3, 1 - pred, pred)
    worse = fill(spec, gender, age, y, p, worse_pred)[0]
    g = Guardrails(max_quality_drop={"accuracy": 0.05}, min_label_coverage=0.5, min_labels=100)
    verdicts = {r.name: r for r in evaluate(g, spec, good, worse, {})}
    assert verdicts["quality_drop:accuracy"].status == "fail"
    assert verdicts["quality_drop:accuracy"].evidence["stable_value"] > verdicts["quality_drop:accuracy"].evidence["canary_value"]
    assert verdicts["label_coverage"].status == "pass"
    assert {r.status for r in evaluate(g, spec, good, good, {})} == {"pass"}
    unlabeled = OutcomeWindow.empty(spec, "2", 7)
    unlabeled.add_predictions(np.zeros(500, np.int64), np.ones(500, np.int64))
    assert {r.status for r in evaluate(g, spec, good, unlabeled, {})} == {"inconclusive"}  # never passed
    assert {r.status for r in evaluate(g, None, good, good, {})} == {"inconclusive"}
    assert evaluate(Guardrails(), spec, good, worse, {}) == []
    fair = evaluate(Guardrails(max_fairness_gap=0.1), spec, good, good, {})
    assert fair[0].name == "fairness_gap" and fair[0].status == "fail" and fair[0].observed > 0.1
    with pytest.raises(PolicyError, match="max_quality_drop"):
        Guardrails(max_quality_drop={"accuracy": -1})
    assert Guardrails.from_dict(g.to_dict()) == g and g.to_dict()["max_quality_drop"] == {"accuracy": 0.05}


def test_alert_rules_and_dashboard_cover_the_outcome_families() -> None:
    """The shipped alerting rules (and the kustomize copy) and the Grafana row use the families lockgate exports."""
    from pathlib import Path

    import yaml

    from lockgate.telemetry.metrics import FAMILIES

    root = Path(__file__).resolve().parent.parent / "deploy"
    rules = yaml.safe_load((root / "prometheus" / "alerts.yml").read_text())
    assert (root / "prometheus" / "alerts.yml").read_text() == (root / "k8s" / "monitoring" / "alerts.yml").read_text()
    group = next(g for g in rules["groups"] if g["name"] == "lockgate-outcomes")
    names = {r["alert"] for r in group["rules"]}
    assert {"LockgateFairnessBreach", "LockgateQualityBelowOtherVersion", "LockgateLowLabelCoverage",
            "LockgateOutcomeRecordsDropped"} <= names
    exprs = " ".join(r["expr"] for r in group["rules"])
    dashboard = (root / "grafana" / "lockgate-dashboard.json").read_text()
    for family in ("lockgate_model_quality", "lockgate_fairness", "lockgate_label_coverage", "lockgate_outcome_dropped"):
        assert family in FAMILIES
        assert family in exprs and family in dashboard


def test_demo_model_compiles_its_outcomes_section(tmp_path) -> None:
    import yaml

    from lockgate.control.validation import onnx_signature
    from lockgate.demo import build_demo_repository
    from lockgate.outcomes.service import compile_spec

    root = build_demo_repository(tmp_path / "demo")
    config = yaml.safe_load((root / "credit" / "config.yaml").read_text())
    signature = onnx_signature(root / "credit" / "1" / "model.onnx")
    spec = compile_spec("credit", config["outcomes"], [(s.name, s.shape) for s in signature.outputs],
                        [(s.name, s.shape) for s in signature.inputs], config["governance"])
    assert spec.task == "multiclass" and spec.classes[spec.favourable] == "approve"
    assert [s.name for s in spec.segments] == ["age_band", "region", "gender"] and spec.segments[0].column == 0
    assert [c for c in spec.protected_combinations()] == [(2,), (0,), (2, 0)]
