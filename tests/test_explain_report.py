"""The importance section of ``lockgate drift report``: shift against the reference importance
stored by ``lockgate profile build`` and against the model's other version (canary vs stable)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import write_model
from explain_models import logistic_model
from lockgate.cli import app
from lockgate.control.store import open_store
from lockgate.explain.config import ExplainConfig, ImportanceConfig
from lockgate.explain.importance import ImportanceTracker
from lockgate.explain.report import importance_section, traffic_roles
from lockgate.explain.service import ExplainService, VersionExplain
from lockgate.governance.config import GovernanceConfig
from lockgate.governance.engine import GovernanceEngine
from lockgate.governance.profile import ReferenceProfile

FEATURES = ["age", "income", "debt"]


def test_drift_report_shows_importance_shift_vs_reference_and_other_version(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    repo, state = tmp_path / "models", tmp_path / "state"
    coef = np.array([2.0, 0.5, -0.2])
    config = "max_batch_size: 64\ngovernance: {inputs: {features: {feature_names: [age, income, debt]}}}\n"
    for version in ("1", "2"):
        write_model(repo, "m", int(version), logistic_model(coef, 0.1), config)
    data = tmp_path / "ref.npy"
    np.save(data, rng.normal(size=(300, 3)).astype(np.float32))
    runner = CliRunner()
    for version in ("1", "2"):
        built = runner.invoke(app, ["profile", "build", "--model", "m", "--version", version, "--data", str(data),
                                    "--model-repository", str(repo), "--background", "50", "--importance-rows", "40"])
        assert built.exit_code == 0, built.output
        assert "reference importance by linear over 40 rows" in built.output
    profile = ReferenceProfile.load(ReferenceProfile.path_for(repo, "m", "1"))
    engine = GovernanceEngine("m", "1", GovernanceConfig.model_validate({}), ["features"], profile, state_dir=state,
                              background=False)
    engine.inspect({"features": rng.normal(size=(600, 3)).astype(np.float32)}, "r")
    engine.close(final_window=True)
    live = {"1": np.array([[0.2], [3.0], [0.1]]), "2": np.array([[2.0], [0.5], [0.2]])}  # v1: income dominates now
    for version, per_row in live.items():
        tracker = ImportanceTracker("m", version, ImportanceConfig(window_rows=10, window_seconds=None), state)
        tracker.add(np.tile(per_row, (10, 1, 1)), "linear", FEATURES, ["probability[0]"])
        assert tracker.last is not None
    section = importance_section(repo, state, "m", "1")
    assert section is not None and set(section.shifts) == {"reference", "version 2"}
    assert section.shifts["version 2"]["shift"] > 0.5 and section.shifts["reference"]["shift"] > 0.5
    html = tmp_path / "report.html"
    result = runner.invoke(app, ["drift", "report", "--model", "m", "--version", "1", "--state-dir", str(state),
                                 "--model-repository", str(repo), "--html", str(html)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "Feature importance" in result.output and "shift vs reference" in result.output
    assert "shift vs version 2" in result.output and "income" in result.output
    page = html.read_text()
    assert "<section id='importance'><h2>Feature importance</h2>" in page and "shift vs version 2" in page
    assert page.index("id='features'") < page.index("id='importance'")  # after the drift features
    document = runner.invoke(app, ["drift", "report", "--model", "m", "--version", "1", "--state-dir", str(state),
                                   "--model-repository", str(repo), "--json"])
    assert document.exit_code == 0, document.output
    importance = json.loads(document.output)["importance"]
    assert importance["version"] == "1" and importance["shift"]["version 2"] > 0.5
    assert max(importance["importance"], key=importance["importance"].get) == "income"
    # with a canary of v2 against v1 in the control-plane store, the report names the roles
    store = open_store(state)
    try:
        store.set_policy("m", {"model": "m", "weights": {"1": 95, "2": 5},
                               "canary": {"stable": "1", "canary": "2", "steps": [5, 50, 100]}}, "op")
    finally:
        store.close()
    assert traffic_roles(state, "m") == {"1": "stable", "2": "canary"}
    result = runner.invoke(app, ["drift", "report", "--model", "m", "--version", "1", "--state-dir", str(state),
                                 "--model-repository", str(repo)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "shift vs version 2 (canary)" in result.output
    assert set(importance_section(repo, state, "m", "2", roles={"1": "stable", "2": "canary"}).shifts) == {
        "reference", "version 1 (stable)"}


def test_importance_gauges_per_version_and_canary_vs_stable() -> None:
    """lockgate_feature_importance{feature} per version, and the shift gauges against the
    reference, the other version, and (while a canary runs) the stable version by name."""
    canary: dict[str, tuple[str, str]] = {}
    service = ExplainService(repository_root=Path("."), state_dir=None, canary_of=canary.get)
    live = {"1": [3.0, 1.0, 1.0], "2": [1.0, 3.0, 1.0]}
    for version, per_feature in live.items():
        tracker = ImportanceTracker("m", version, ImportanceConfig(window_rows=4, window_seconds=None), None,
                                    reference={"features": FEATURES, "mean_abs": [[1.0], [1.0], [1.0]]})
        tracker.add(np.tile(np.array(per_feature)[:, None], (4, 1, 1)), "kernel", FEATURES, ["p[0]"])
        version_stub = SimpleNamespace(model="m", version=version, label=f"model 'm' version {version}")
        service._states[("m", version)] = VersionExplain(version_stub, ExplainConfig(), None, "features", None, tracker)

    def gauges() -> dict[tuple, float]:
        return {(s.family, tuple(sorted(s.labels.items()))): s.value for s in service.metric_samples()
                if s.family.startswith("lockgate_feature_importance")}

    found = gauges()
    importance = {k[1]: v for k, v in found.items() if k[0] == "lockgate_feature_importance"}
    assert importance[(("feature", "age"), ("model", "m"), ("version", "1"))] == pytest.approx(3.0)
    assert importance[(("feature", "income"), ("model", "m"), ("version", "2"))] == pytest.approx(3.0)
    shift = {dict(k[1])["version"] + ":" + dict(k[1])["baseline"]: v for k, v in found.items()
             if k[0] == "lockgate_feature_importance_shift"}
    assert set(shift) == {"1:reference", "1:version 2", "2:reference", "2:version 1"}
    assert shift["2:version 1"] == pytest.approx(0.4)  # shares .6/.2/.2 vs .2/.6/.2
    canary["m"] = ("1", "2")
    shift = {dict(k[1])["version"] + ":" + dict(k[1])["baseline"]: v for k, v in gauges().items()
             if k[0] == "lockgate_feature_importance_shift"}
    assert shift["2:stable"] == pytest.approx(0.4) and "1:stable" not in shift
