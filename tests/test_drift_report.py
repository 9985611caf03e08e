"""`lockgate drift report` as evidence: right after the demo's layout it finds the repository,
state and serving version by itself; --json carries the provenance and the summary; the
HTML renders in headless Chromium (Debian's, driven by Selenium) with the summary table and a
readable chart per feature, and its screenshot is kept under test-artifacts/."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from lockgate.demo import DEMO_CONFIG, build_demo_repository, approve_demo_versions, reference_sample
from lockgate.governance.cli import drift_app
from lockgate.governance.config import GovernanceConfig
from lockgate.governance.engine import GovernanceEngine
from lockgate.governance.profile import ReferenceProfile

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = Path(os.environ.get("LOCKGATE_TEST_ARTIFACTS", ROOT / "test-artifacts"))
RUNNER = CliRunner()


def demo_traffic(rows: int, seed: int) -> np.ndarray:
    """The demo's applicants, drifted: older, a region code the reference never had, and
    some missing credit lines."""
    x = reference_sample(rows, seed=seed).astype(np.float32)
    x[:, 0] = np.clip(x[:, 0] + 10, 18, 120)
    rng = np.random.default_rng(seed)
    x[rng.random(rows) < 0.2, 7] = 9
    x[rng.random(rows) < 0.1, 3] = np.nan
    return x


def serve_windows(root: Path, version: str, x: np.ndarray, profile: ReferenceProfile | None) -> None:
    """What `lockgate serve` leaves behind: closed windows of the demo's governed traffic in
    <repository>/.lockgate/drift (the demo's state directory), outputs included."""
    import onnxruntime as ort

    section = yaml.safe_load(DEMO_CONFIG)["governance"]
    section["mode"] = "flag"  # the drifted rows are served, as a flagging deployment would
    section["inputs"]["features"]["features"].pop("region")  # region 9 is new, not refused
    config = GovernanceConfig.model_validate(section)
    engine = GovernanceEngine("credit", version, config, ["features"], profile, state_dir=root / ".lockgate", background=False)
    session = ort.InferenceSession(str(root / "credit" / version / "model.onnx"), providers=["CPUExecutionProvider"])
    for start in range(0, len(x), 50):
        batch = x[start:start + 50]
        inspection = engine.inspect({"features": batch}, f"r{start}")
        engine.observe_outputs({"probabilities": session.run(None, {"features": batch})[0]}, inspection)
    engine.close()


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`make demo`'s layout in a fresh directory: demo-repo/ with its state in demo-repo/.lockgate."""
    cwd = tmp_path_factory.mktemp("after-make-demo")
    root = build_demo_repository(cwd / "demo-repo")
    approve_demo_versions(root, str(root / ".lockgate" / "lockgate.db"))
    profile = ReferenceProfile.load(ReferenceProfile.path_for(root, "credit", "1"))
    serve_windows(root, "1", demo_traffic(3_000, seed=1), profile)
    return cwd


def run_report(cwd: Path, *args: str):
    old = Path.cwd()
    os.chdir(cwd)
    try:
        return RUNNER.invoke(drift_app, ["report", "--model", "credit", *args], env={"COLUMNS": "220"})
    finally:
        os.chdir(old)


def test_json_report_after_make_demo_has_provenance_and_summary(demo):
    result = run_report(demo, "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    assert doc["version_choice"] == "the model config's default_version"
    p = doc["provenance"]
    artifact = demo / "demo-repo" / "credit" / "1" / "model.onnx"
    assert p["model"] == "credit" and p["version"] == "1"
    assert p["artifact_sha256"] == hashlib.sha256(artifact.read_bytes()).hexdigest() == p["registered_sha256"]
    assert p["approval_id"] and p["approver"] == "demo-approver" and len(p["card_digest"]) == 64
    profile = ReferenceProfile.load(ReferenceProfile.path_for(demo / "demo-repo", "credit", "1"))
    assert p["profile_digest"] == profile.digest() and p["profile_rows"] == 5_000 and p["profile_created"]
    assert p["window_start"] and p["window_end"] and p["generated_at"] and p["lockgate_version"]
    assert not p["missing"], p["missing"]
    summary = doc["summary"]
    assert summary[0]["status"] == "DRIFT" and {"feature", "status", "rule", "statistic", "rows", "missing_share", "new_share"} <= set(summary[0])
    by_name = {row["feature"]: row for row in summary}
    assert by_name["features/age"]["status"] == "DRIFT" and by_name["features/age"]["rule"] == "distribution"
    assert by_name["features/region"]["rule"] == "new_values" and by_name["features/region"]["new_share"] == pytest.approx(0.2, abs=0.03)
    assert by_name["features/credit_lines"]["missing_share"] == pytest.approx(0.1, abs=0.03)
    assert by_name["features/income"]["status"] == "OK"
    region = next(f for f in doc["features"] if f["feature"] == "region")
    assert region["new_values"][0]["value"] == "9" and "new > 4" in region["bin_labels"]
    # the classifier's outputs are named by the config's classes
    assert {"probabilities/approve", "probabilities/review", "probabilities/decline"} <= set(by_name)
    classes = next(f for f in doc["features"] if f["tensor"] == "probabilities" and f["index"] == -1)
    assert classes["bin_labels"] == ["approve", "review", "decline"]
    assert doc["window"]["accounting"]["answered"] == doc["window"]["accounting"]["inspected"] > 0
    assert set(doc["explanations"]) >= {"psi", "ks", "wasserstein", "chi2", "missing", "new_values", "significance"}


def test_table_report_and_exit_codes(demo):
    result = run_report(demo)
    assert result.exit_code == 0, result.output
    assert "features/age" in result.output and "DRIFT" in result.output and "demo-approver" in result.output
    assert run_report(demo, "--fail-on", "drift").exit_code == 2
    assert run_report(demo, "--version", "7").exit_code == 1
    missing = run_report(demo, "--state-dir", str(demo / "nowhere"))
    assert missing.exit_code == 1 and "no drift windows" in missing.output


def test_a_profile_built_after_serving_began_works(tmp_path):
    """Windows recorded while version 2 had no profile are re-binned from their sketches once
    one is built; before that, the report says how to build it."""
    root = build_demo_repository(tmp_path / "demo-repo")
    path = ReferenceProfile.path_for(root, "credit", "2")
    kept = path.read_bytes()
    path.unlink()
    serve_windows(root, "2", demo_traffic(2_000, seed=2), None)
    before = run_report(tmp_path, "--version", "2")
    assert before.exit_code == 1 and "lockgate profile build" in before.output
    path.write_bytes(kept)
    after = run_report(tmp_path, "--version", "2", "--json")
    assert after.exit_code == 0, after.output
    doc = json.loads(after.output)
    assert any("re-estimated from the window's sketches" in note for note in doc["notes"])
    by_name = {f["feature"]: f for f in doc["features"]}
    assert by_name["age"]["binned_from"] == "sketch" and by_name["age"]["status"] == "DRIFT"
    assert by_name["region"]["status"] == "DRIFT" and by_name["region"]["new_values"][0]["value"] == "9"
    assert doc["provenance"]["missing"]  # no store here: said, not guessed


def chrome_driver():
    """Selenium on Debian's chromium and chromedriver; installs them when missing (root + apt)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        install = ["apt-get", "install", "-y", "-q", "chromium", "chromium-driver"]
        if shutil.which("apt-get") and subprocess.run(install, capture_output=True, env=env).returncode != 0:
            subprocess.run(["apt-get", "update", "-q"], capture_output=True, env=env)
            subprocess.run(install, capture_output=True, env=env)
    browser, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (browser and driver):
        pytest.fail("chromium/chromedriver missing and apt-get could not install them (needs root and apt)")
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,1600"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(executable_path=driver), options=options)


def test_html_report_renders_in_headless_chromium(demo):
    from selenium.webdriver.common.by import By

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page = ARTIFACTS / "drift-report.html"
    result = run_report(demo, "--html", str(page))
    assert result.exit_code == 0, result.output
    text = page.read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?https?:|url\(\s*["']?https?:|<script|<link""", text)  # works offline
    driver = chrome_driver()
    try:
        driver.get(page.as_uri())
        sections = [s.get_attribute("id") for s in driver.find_elements(By.CSS_SELECTOR, "body > section")]
        assert sections[:4] == ["provenance", "summary", "explanations", "features"]
        rows = driver.find_elements(By.CSS_SELECTOR, "#summary-table tbody tr")
        features = driver.find_elements(By.CSS_SELECTOR, "article.feature")
        assert len(rows) == len(features) >= 12
        assert rows[0].get_attribute("data-status") == "DRIFT"
        head = [th.text for th in driver.find_elements(By.CSS_SELECTOR, "#summary-table thead th")]
        assert head[:3] == ["feature", "status", "deciding rule"] and "new-category share" in head
        charts = driver.find_elements(By.CSS_SELECTOR, "figure.chart-box svg")
        assert len(charts) == len(features)
        for chart in charts:
            assert chart.size["width"] > 300 and chart.size["height"] > 150  # drawn, not an empty box
        source = driver.page_source
        assert source.count("share of values") >= len(charts)  # every chart has its y axis label
        assert "quantile bins of the reference" in source and "category code" in source and "class (names" in source
        provenance = driver.find_element(By.ID, "provenance").text
        assert "artifact SHA-256" in provenance and "demo-approver" in provenance
        driver.set_window_size(1280, min(16_000, driver.execute_script("return document.body.scrollHeight") + 50))
        shot = ARTIFACTS / "drift-report.png"
        assert driver.save_screenshot(str(shot)) and shot.stat().st_size > 50_000
        print(f"screenshot kept at {shot}")
    finally:
        driver.quit()
