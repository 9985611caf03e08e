"""The importance section of ``lockgate drift report``: shift against the reference importance
stored by ``lockgate profile build`` and against the model's other version (canary vs stable)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from typer.testing import CliRunner

from conftest import write_model
from explain_models import logistic_model
from lockgate.cli import app
from lockgate.explain.config import ImportanceConfig
from lockgate.explain.importance import ImportanceTracker
from lockgate.explain.report import importance_section
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
    assert "<h2>Feature importance</h2>" in page and "shift vs version 2" in page
