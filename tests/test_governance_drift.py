"""Detection power, false-alarm rate, categorical shift, sketches and the drift CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
from datasketches import kll_floats_sketch
from typer.testing import CliRunner

from lockgate.governance.cli import drift_app, profile_app
from lockgate.governance.config import GovernanceConfig
from lockgate.governance.drift import DRIFT, OK, subscribe_all
from lockgate.governance.statistics import chi2_homogeneity, chi2_sf, js_distance, ks_from_bins, psi
from lockgate.governance.engine import GovernanceEngine
from lockgate.governance.profile import ReferenceProfile, build_profile
from lockgate.governance.state import WindowState, merge_all

F = 4
N_REF = 50_000
WINDOW = 10_000


def _reference(rng: np.random.Generator, n: int) -> np.ndarray:
    x = rng.normal(size=(n, F)).astype(np.float32)
    x[:, 3] = rng.choice(4, size=n, p=[0.4, 0.3, 0.2, 0.1])
    return x


@pytest.fixture(scope="module")
def profile() -> ReferenceProfile:
    rng = np.random.default_rng(7)
    return build_profile({"x": _reference(rng, N_REF)}, {"x": ["a", "b", "c", "cat"]}, {"x": ["cat"]}, model="m", version="1")


def _engine(profile: ReferenceProfile, **kw) -> GovernanceEngine:
    config = GovernanceConfig.model_validate({"drift": {"window_rows": WINDOW}, "payload_log": {"enabled": False}})
    return GovernanceEngine("m", "1", config, ["x"], profile, background=False, **kw)


def _feed(engine: GovernanceEngine, x: np.ndarray, batch: int = 500) -> None:
    for start in range(0, len(x), batch):
        engine.inspect({"x": x[start : start + batch]}, f"r{start}")


def test_half_sigma_shift_is_drift_within_one_window(profile):
    engine = _engine(profile)
    events = []
    engine.subscribe(events.append)
    x = _reference(np.random.default_rng(1), WINDOW)
    x[:, 1] += 0.5
    _feed(engine, x)
    report = engine.close_window()
    by_name = {f.feature: f for f in report.features}
    assert by_name["b"].status == DRIFT, by_name["b"]
    assert by_name["b"].psi >= 0.2 and by_name["b"].js >= 0.1
    assert 0.35 < by_name["b"].wasserstein < 0.65  # about half a standard deviation moved
    assert by_name["b"].ks > 0.15
    assert all(by_name[n].status == OK for n in ("a", "c", "cat"))
    assert report.status == DRIFT
    assert len(events) == 1 and events[0].status == DRIFT
    audit = events[0].to_audit()
    assert audit["type"] == "governance.drift" and [f["feature"] for f in audit["features"]] == ["b"]
    engine.close(final_window=False)


def test_twenty_reference_windows_raise_no_drift(profile):
    engine = _engine(profile)
    rng = np.random.default_rng(2)
    statuses = []
    for _ in range(20):
        _feed(engine, _reference(rng, WINDOW), batch=2_000)
        report = engine.close_window()
        statuses.extend(f.status for f in report.features)
    assert DRIFT not in statuses
    assert engine.monitor.windows_closed == 20
    engine.close(final_window=False)


def test_categorical_shift_is_detected(profile):
    engine = _engine(profile)
    rng = np.random.default_rng(3)
    x = _reference(rng, WINDOW)
    x[:, 3] = rng.choice(4, size=WINDOW, p=[0.1, 0.2, 0.3, 0.4])
    _feed(engine, x)
    report = engine.close_window()
    cat = next(f for f in report.features if f.feature == "cat")
    assert cat.categorical and cat.status == DRIFT
    assert cat.chi2_p is not None and cat.chi2_p < 1e-10
    # live fractions per category come straight from the kernel's bins; a bin below code 0 and
    # one above code 3 hold the codes the reference never had (none here)
    assert cat.bin_labels == ["new < 0", "0", "1", "2", "3", "new > 3"]
    np.testing.assert_allclose(cat.live_fractions, [0, 0.1, 0.2, 0.3, 0.4, 0], atol=0.02)
    assert cat.new_share == 0.0 and cat.decided_by[0]["rule"] == "distribution"
    engine.close(final_window=False)


def test_classifier_output_class_shift(profile):
    rng = np.random.default_rng(4)
    ref_out = rng.dirichlet([5, 1, 1], size=20_000).astype(np.float32)
    prof = build_profile(
        {"x": _reference(rng, 20_000)}, outputs={"probs": ref_out}, classifier_outputs=["probs"], model="m", version="1"
    )
    assert prof.tensors["probs"].classes is not None
    engine = _engine(prof)
    live_out = rng.dirichlet([1, 5, 1], size=WINDOW).astype(np.float32)
    for start in range(0, WINDOW, 1000):
        engine.inspect({"x": _reference(rng, 1000)}, "r")
        engine.observe_outputs({"probs": live_out[start : start + 1000]})
    report = engine.close_window()
    classes = next(f for f in report.features if f.tensor == "probs" and f.index == -1)
    assert classes.status == DRIFT and classes.kind == "output"
    engine.close(final_window=False)


def test_statistics_basics():
    p = np.full(10, 0.1)
    assert psi(p, p) == pytest.approx(0.0) and js_distance(p, p) == pytest.approx(0.0)
    assert js_distance([1, 0], [0, 1]) == pytest.approx(1.0)
    assert ks_from_bins([0.5, 0.5, 0], [0, 0.5, 0.5]) == pytest.approx(0.5)
    # chi-squared tail values known to every table
    assert chi2_sf(3.841458820694124, 1) == pytest.approx(0.05, rel=1e-6)
    assert chi2_sf(18.307038053275146, 10) == pytest.approx(0.05, rel=1e-6)
    result = chi2_homogeneity([100, 100], [100, 100])
    assert result.statistic == pytest.approx(0.0) and result.p_value == pytest.approx(1.0)


def test_kll_sketches_serialise_and_merge():
    rng = np.random.default_rng(5)
    a, b = rng.normal(size=30_000).astype(np.float32), rng.normal(2, size=30_000).astype(np.float32)
    ska, skb, both = kll_floats_sketch(200), kll_floats_sketch(200), kll_floats_sketch(200)
    ska.update(a)
    skb.update(b)
    both.update(np.concatenate([a, b]))
    merged = kll_floats_sketch.deserialize(ska.serialize())
    merged.merge(kll_floats_sketch.deserialize(skb.serialize()))
    assert merged.n == both.n == 60_000
    eps = merged.normalized_rank_error(False)
    for q in (0.1, 0.5, 0.9):
        exact = np.quantile(np.concatenate([a, b]), q)
        assert abs(merged.get_rank(float(exact)) - q) < 2 * eps


def test_engine_window_snapshots_merge_with_sketches(profile):
    rng = np.random.default_rng(6)
    replicas = [_engine(profile) for _ in range(3)]
    for replica in replicas:
        _feed(replica, _reference(rng, 3_000))
    merged = merge_all([WindowState.from_bytes(r.snapshot()) for r in replicas])
    x = merged.tensors["x"]
    assert x.rows == 9_000 and x.count.tolist() == [9_000] * F
    assert [s.n for s in x.sketches.kll[:3]] == [9_000] * 3
    assert x.sketches.frequent[3].total_weight == 9_000
    for replica in replicas:
        replica.close(final_window=False)


def test_subscribe_all_and_persisted_report_cli(tmp_path, profile):
    rng = np.random.default_rng(8)
    repo, state = tmp_path / "models", tmp_path / "state"
    (repo / "m" / "1").mkdir(parents=True)
    data = tmp_path / "ref.npy"
    np.save(data, _reference(rng, 20_000))
    runner = CliRunner()
    built = runner.invoke(profile_app, ["build", "--model", "m", "--version", "1", "--data", str(data), "--model-repository", str(repo), "--input", "x"])
    assert built.exit_code == 0, built.output
    prof = ReferenceProfile.load(ReferenceProfile.path_for(repo, "m", "1"))
    assert prof.tensors["x"].features[0].edges and len(prof.tensors["x"].features[0].fractions) == 20
    events = []
    unsubscribe = subscribe_all(events.append)
    try:
        engine = _engine(prof, state_dir=state)
        x = _reference(rng, WINDOW)
        x[:, 0] -= 1.0
        _feed(engine, x)
        engine.close(final_window=True)  # closes and persists the window
    finally:
        unsubscribe()
    assert events and events[-1].model == "m"
    assert list((state / "drift" / "m" / "1").glob("window-*.bin"))
    html = tmp_path / "report.html"
    result = runner.invoke(
        drift_app,
        ["report", "--model", "m", "--state-dir", str(state), "--model-repository", str(repo), "--html", str(html)],
        env={"COLUMNS": "200"},
    )
    assert result.exit_code == 0, result.output
    assert "DRIFT" in result.output and "f0" in result.output
    page = html.read_text()
    assert page.count("<svg") == F and "reference" in page and "DRIFT" in page
    missing = runner.invoke(drift_app, ["report", "--model", "nope", "--state-dir", str(state), "--model-repository", str(repo)])
    assert missing.exit_code == 1


def test_profile_roundtrip(tmp_path, profile):
    path = profile.save(tmp_path / "p.json")
    loaded = ReferenceProfile.load(path)
    assert loaded.tensors["x"].feature_names == ["a", "b", "c", "cat"]
    assert loaded.tensors["x"].features[3].categorical
    assert loaded.tensors["x"].features[3].edges == [-0.5, 0.5, 1.5, 2.5, 3.5]
    assert loaded.tensors["x"].features[3].values == [0, 1, 2, 3]
    assert loaded.digest() == profile.digest()
    assert loaded.tensors["x"].features[0].sketch().n == N_REF
    assert json.loads(path.read_text())["format"] == "lockgate.reference_profile"


def test_background_worker_closes_row_windows(profile, tmp_path):
    import time

    config = GovernanceConfig.model_validate({"drift": {"window_rows": 1_000, "min_rows": 100}, "payload_log": {"enabled": False}})
    engine = GovernanceEngine("m", "1", config, ["x"], profile, state_dir=tmp_path, feed_interval=0.02)
    rng = np.random.default_rng(9)
    for _ in range(3):
        inspection = engine.inspect({"x": _reference(rng, 1_000)}, "r")
        engine.observe_outputs({}, inspection)  # answered: the closed window need not wait for it
        deadline = time.monotonic() + 20
        before = engine.monitor.windows_closed
        while engine.monitor.windows_closed == before and time.monotonic() < deadline:
            time.sleep(0.01)
    engine.close(final_window=False)
    assert engine.monitor.windows_closed == 3
    assert len(list((tmp_path / "drift" / "m" / "1").glob("window-*.bin"))) == 3
    assert engine.stats()["window_errors"] == 0 and engine.monitor.last_report.rows == 1_000
