"""`lockgate drift report` as evidence: right after the demo's layout it finds the repository,
state and serving version by itself; --json carries the provenance and the summary; the
HTML renders in headless Chromium (Debian's, driven by Playwright, installed when missing)
with the summary table and a readable chart per feature, and its screenshot is kept under
test-artifacts/drift-report/."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from browser import artifact_dir, chromium_executable
from drift_traffic import demo_traffic, serve_windows
from lockgate.demo import build_demo_repository
from lockgate.governance.cli import drift_app
from lockgate.governance.profile import ReferenceProfile

RUNNER = CliRunner()


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What `make demo` leaves in its directory (`lockgate demo` with its defaults, here
    without serving): demo-repo/ with its state in demo-repo/.lockgate; then the windows its
    server writes there."""
    cwd = tmp_path_factory.mktemp("after-make-demo")
    subprocess.run([sys.executable, "-m", "lockgate.cli", "demo", "--build-only"], cwd=cwd, check=True,
                   capture_output=True, timeout=300)
    root = cwd / "demo-repo"
    assert (root / ".lockgate" / "lockgate.db").is_file()
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
    assert p["approval_id"] and p["approver"] == "alex" and len(p["card_digest"]) == 64
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
    assert "features/age" in result.output and "DRIFT" in result.output and "alex" in result.output
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


def test_html_report_renders_in_headless_chromium(demo):
    from playwright.sync_api import sync_playwright

    shots = artifact_dir("drift-report")
    page_path = shots / "drift-report.html"
    result = run_report(demo, "--html", str(page_path))
    assert result.exit_code == 0, result.output
    text = page_path.read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?https?:|url\(\s*["']?https?:|<script|<link""", text)  # works offline
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium_executable(), headless=True,
                                             args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1600})
            page.goto(page_path.as_uri())
            sections = page.eval_on_selector_all("body > section", "els => els.map(e => e.id)")
            assert sections[:4] == ["provenance", "summary", "explanations", "features"]
            rows = page.locator("#summary-table tbody tr")
            features = page.locator("article.feature")
            assert rows.count() == features.count() >= 12
            assert rows.first.get_attribute("data-status") == "DRIFT"
            head = page.locator("#summary-table thead th").all_inner_texts()
            assert head[:3] == ["feature", "status", "deciding rule"] and "new-category share" in head
            charts = page.locator("figure.chart-box svg")
            assert charts.count() == features.count()
            for i in range(charts.count()):
                box = charts.nth(i).bounding_box()
                assert box and box["width"] > 300 and box["height"] > 150  # drawn, not an empty box
            source = page.content()
            assert source.count("share of values") >= charts.count()  # every chart has its y axis label
            assert "quantile bins of the reference" in source and "category code" in source and "class (names" in source
            provenance = page.locator("#provenance").inner_text()
            assert "artifact SHA-256" in provenance and "alex" in provenance
            shot = shots / "drift-report.png"
            page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 50_000
            print(f"screenshot kept at {shot}")
        finally:
            browser.close()
