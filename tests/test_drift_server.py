"""Drift through a real server: tritonclient sends drifted traffic (a mean shift, NaN, a new
category) from several threads; every window the server closes holds the outputs of exactly
its own requests, and the statuses and gauges it exports equal the in-process evaluation of
the window it persisted. The drift alert rules fire on such gauges (promtool test rules)."""

from __future__ import annotations

import re
import shutil
import subprocess
import threading
import urllib.request
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as grpcclient
import yaml

from conftest import write_model
from lockgate.demo import mlp_model
from lockgate.governance.config import GovernanceConfig
from lockgate.governance.drift import evaluate, load_windows
from lockgate.governance.profile import ReferenceProfile, build_profile
from lockgate.governance.report import evaluation_basis
from lockgate.governance.stage import STATUS_CODE
from lockgate_process import LockgateProcess
from replica_helpers import wait_for
from test_telemetry_metrics import ensure_prometheus

ROOT = Path(__file__).resolve().parent.parent
NAMES = ["amount", "segment", "score", "tenure"]
CONFIG = """
max_batch_size: 16
dynamic_batching: {max_queue_delay_us: 200}
inputs:
  - {name: x, datatype: FP32, dims: [4]}
outputs:
  - {name: probs, datatype: FP32, dims: [3], labels: [approve, review, decline]}
governance:
  mode: flag
  sampling: {rate: 0.0}
  inputs:
    x:
      feature_names: [amount, segment, score, tenure]
      categorical: [segment]
      features:
        score: {allow_nan: true}
  drift: {window_rows: 300, min_rows: 100, output_grace_s: 30, keep_windows: 1000}
"""


def reference(rng: np.random.Generator, n: int) -> np.ndarray:
    x = np.column_stack([
        rng.normal(100, 15, n), rng.choice(4, size=n, p=[0.4, 0.3, 0.2, 0.1]),
        np.where(rng.random(n) < 0.05, np.nan, rng.normal(size=n)), rng.gamma(3, 10, n),
    ])  # fmt: skip
    return x.astype(np.float32)


def drifted(rng: np.random.Generator, n: int) -> np.ndarray:
    x = reference(rng, n)
    x[:, 0] += 15  # one sigma
    x[rng.random(n) < 0.25, 1] = 7  # a category the reference never had
    x[rng.random(n) < 0.4, 2] = np.nan  # 40% missing, reference 5%
    return x


def governed_model(repo: Path, name: str) -> ReferenceProfile:
    """The classifier served as ``name`` with CONFIG, and its reference profile (not saved)."""
    path = write_model(repo, name, 1, mlp_model([4, 16, 3], seed=5, input_name="x", output_name="probs",
                                                standardise=(np.array([100, 1.5, 0, 30]), np.array([15, 1, 1, 17]))), CONFIG)  # fmt: skip
    ref = reference(np.random.default_rng(0), 20_000)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    outputs = {"probs": session.run(None, {"x": np.nan_to_num(ref)})[0]}
    return build_profile({"x": ref}, {"x": NAMES}, {"x": ["segment"]}, model=name, version="1",
                         outputs=outputs, classifier_outputs=["probs"])  # fmt: skip


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory):
    """One server: "m" with its profile, and "late", whose profile is built while it serves."""
    repo = tmp_path_factory.mktemp("drift-server") / "models"
    governed_model(repo, "m").save(ReferenceProfile.path_for(repo, "m", "1"))
    late = governed_model(repo, "late")
    with LockgateProcess(repo, env={"LOCKGATE_TOKENS": "vic:viewer:tok-vic-1"}) as proc:
        yield proc, repo, ReferenceProfile.load(ReferenceProfile.path_for(repo, "m", "1")), late


def scrape(port: int) -> dict[tuple[str, frozenset], float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out = {}
    for line in text.splitlines():
        if not line.startswith("lockgate_drift_") or "{" not in line:
            continue
        name, rest = line.split("{", 1)
        labels, value = rest.rsplit("} ", 1)
        pairs = frozenset(tuple(item.split("=", 1)) for item in labels.replace('"', "").split(",") if item)
        out[(name, pairs)] = float(value)
    return out


def gauge(metrics, name: str, **labels: str) -> float | None:
    want = {(k, v) for k, v in labels.items()}
    found = [v for (n, pairs), v in metrics.items() if n == name and want <= pairs]
    assert len(found) <= 1, (name, labels, found)
    return found[0] if found else None


def send_all(url: str, rows: np.ndarray, threads: int = 6, model: str = "m") -> int:
    """Batches of 1..8 rows from several threads at once, as independent clients would."""
    rng = np.random.default_rng(1)
    cuts = np.cumsum(rng.integers(1, 9, size=len(rows)))
    batches = np.split(rows, cuts[cuts < len(rows)])
    errors = []

    def worker(part: list[np.ndarray]) -> None:
        client = grpcclient.InferenceServerClient(url)
        try:
            for batch in part:
                inp = grpcclient.InferInput("x", list(batch.shape), "FP32")
                inp.set_data_from_numpy(np.ascontiguousarray(batch))
                client.infer(model, [inp])
        except Exception as exc:  # noqa: BLE001 -- reported below
            errors.append(exc)
        finally:
            client.close()

    pool = [threading.Thread(target=worker, args=(batches[i::threads],)) for i in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    assert not errors, errors[:3]
    return len(batches)


def test_served_windows_statuses_and_gauges_match_in_process(served):
    proc, repo, profile, _late = served
    rows = drifted(np.random.default_rng(2), 2_000)
    requests = send_all(proc.url, rows)
    window_dir = proc.state_dir / "drift" / "m" / "1"
    # 2,000 rows at window_rows 300: several windows close (the last rows stay in the open one);
    # wait until no more close
    seen: list[int] = []

    def stable() -> bool:
        seen.append(len(list(window_dir.glob("window-*.bin"))))
        return len(seen) > 20 and seen[-1] >= 3 and len(set(seen[-20:])) == 1

    try:
        wait_for(stable, 90, what="the windows to close")
    except AssertionError as exc:  # say what was seen: too few windows, or windows still closing
        raise AssertionError(f"{exc}; window files seen (last 40 polls): {seen[-40:]}; "
                             f"files now: {sorted(p.name for p in window_dir.iterdir()) if window_dir.exists() else None}; "
                             f"server log tail: {proc.log_path.read_text()[-2000:]}") from None
    windows = load_windows(proc.state_dir, "m", "1", last=None)
    assert sum(w.rows for w in windows) >= 2_000 - 300
    assert sum(w.accounting["inspected"] for w in windows) <= requests
    for w in windows:
        x, probs = w.tensors["x"], w.tensors["probs"]
        out_rows = int(probs.count[0] + probs.nan[0] + probs.inf[0])
        assert out_rows == x.rows == w.rows >= 300, (w.rows, out_rows, w.accounting)  # same requests, all of them
        assert w.accounting["answered"] == w.accounting["inspected"] and w.accounting["outputs_missing"] == 0
        assert w.profile == profile.digest()
    basis = evaluation_basis(repo, "m", "1")  # what `lockgate drift report` and the console judge with
    assert basis.config == GovernanceConfig.model_validate(yaml.safe_load(CONFIG)["governance"]).drift
    assert basis.class_names == {"probs": ["approve", "review", "decline"]}
    newest = windows[-1]
    expected = evaluate(newest, profile, basis.config, class_names=basis.class_names)

    def settled():
        """The gauges are the newest window's: its row count and every feature's p-value (a
        window of the same size evaluated before it would differ in them)."""
        metrics = scrape(proc.metrics_port)
        if gauge(metrics, "lockgate_drift_window_rows", model="m") != newest.rows:
            return None
        for f in expected.features:
            if f.chi2_p is not None and gauge(metrics, "lockgate_drift_chi2_p_value", model="m",
                                              feature=f"{f.tensor}/{f.feature}") != pytest.approx(f.chi2_p, rel=1e-9, abs=1e-300):
                return None
        return metrics

    metrics = wait_for(settled, 60, what="gauges of the newest window")
    statuses = {f.feature: f.status for f in expected.features}
    assert statuses["amount"] == "DRIFT" and statuses["segment"] == "DRIFT" and statuses["score"] == "DRIFT"
    assert statuses["tenure"] == "OK"
    for f in expected.features:
        name = f"{f.tensor}/{f.feature}"
        assert gauge(metrics, "lockgate_drift_status", model="m", feature=name) == STATUS_CODE[f.status], name
        if f.chi2_p is not None:
            assert gauge(metrics, "lockgate_drift_chi2_p_value", model="m", feature=name) == pytest.approx(f.chi2_p, rel=1e-9, abs=1e-300)
        if f.index >= 0:
            assert gauge(metrics, "lockgate_drift_missing_rate", model="m", feature=name, value="nan", source="live") == pytest.approx(f.nan_share)
            assert gauge(metrics, "lockgate_drift_missing_rate", model="m", feature=name, value="nan", source="reference") == pytest.approx(f.reference_nan_share)
        if f.value_kind == "categorical":
            assert gauge(metrics, "lockgate_drift_new_category_rate", model="m", feature=name) == pytest.approx(f.new_share)
        for rule in f.rules:
            if rule["adjusted_p"] is not None:
                got = gauge(metrics, "lockgate_drift_adjusted_p_value", model="m", feature=name, rule=rule["rule"])
                assert got == pytest.approx(rule["adjusted_p"], rel=1e-9, abs=1e-300)
    segment = next(f for f in expected.features if f.feature == "segment")
    assert segment.new_values[0]["value"] == "7" and segment.decided_by[0]["rule"] == "new_values"
    score = next(f for f in expected.features if f.feature == "score")
    assert score.nan_share == pytest.approx(0.4, abs=0.1) and score.decided_by[0]["rule"] == "nan_rate"
    # outputs are named by the config's classes
    assert {f.feature for f in expected.features if f.tensor == "probs"} == {"approve", "review", "decline", "class"}
    assert gauge(metrics, "lockgate_drift_alpha", model="m") == 0.01
    # the console's drift page judges the newest window as the report does: same statuses and rules
    cookie, _csrf = proc.console_session("tok-vic-1")
    page, _ = proc.console_page("/console/drift/m", cookie)
    latest = page[page.index("Latest window of version 1"):]
    shown = re.findall(r'<th scope="row">([^<]+)</th><td><span class="check check-\w+">(\w+)</span></td>\s*<td>([^<]+)</td>',
                       latest)  # fmt: skip
    for f in expected.features:
        name = f"{f.tensor}/{f.feature}" if f.index >= 0 else f"{f.tensor}/(classes)"
        rule = f.decided_by[0]["rule"] if f.decided_by else "-"
        assert re.search(rf'<th scope="row">{re.escape(name)}</th><td><span class="check check-{f.status.lower()}">'
                         rf'{f.status}</span></td>\s*<td>{re.escape(rule)}</td>', latest), (name, f.status, rule)
    assert len(shown) == len(expected.features)


def test_a_profile_built_after_serving_began_is_taken_up(served):
    """"late" serves without a profile: its windows close unevaluated and are counted (the
    alert rule's counter), never shown as OK; once a profile is built the next window is
    evaluated by the server, re-binned from its sketches, as `drift report` evaluates it."""
    proc, repo, _profile, late = served
    send_all(proc.url, drifted(np.random.default_rng(3), 400), model="late")
    wait_for(lambda: (gauge(scrape(proc.metrics_port), "lockgate_drift_windows_unevaluated_total", model="late") or 0) >= 1,
             60, what="a window closed without a profile")  # fmt: skip
    assert gauge(scrape(proc.metrics_port), "lockgate_drift_status", model="late", feature="x/amount") is None
    late.save(ReferenceProfile.path_for(repo, "late", "1"))
    send_all(proc.url, drifted(np.random.default_rng(4), 400), model="late")
    metrics = wait_for(lambda: (m := scrape(proc.metrics_port)) and gauge(m, "lockgate_drift_status", model="late",
                                                                         feature="x/amount") is not None and m,
                       60, what="the first window judged against the new profile")  # fmt: skip
    unevaluated = gauge(metrics, "lockgate_drift_windows_unevaluated_total", model="late")
    windows = load_windows(proc.state_dir, "late", "1", last=None)
    judged = windows[int(unevaluated)]  # the first window closed after the profile appeared
    basis = evaluation_basis(repo, "late", "1")
    expected = evaluate(judged, basis.profile, basis.config, class_names=basis.class_names)
    assert any("re-estimated from the window's sketches" in note for note in expected.notes)
    assert {f.binned_from for f in expected.features if f.index >= 0} == {"sketch"}
    statuses = {f.feature: f.status for f in expected.features}
    assert statuses["amount"] == statuses["segment"] == statuses["score"] == "DRIFT"
    for f in expected.features:
        name = f"{f.tensor}/{f.feature}"
        assert gauge(metrics, "lockgate_drift_status", model="late", feature=name) == STATUS_CODE[f.status], name
    assert "found after serving began" in proc.log()


def test_drift_alert_rules_fire_on_the_exported_gauges():
    _, promtool = ensure_prometheus()
    assert shutil.which(promtool)
    result = subprocess.run([promtool, "test", "rules", "drift_alerts_test.yml"], cwd=ROOT / "tests" / "prometheus",
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    # the k8s monitoring stack ships the same rules (kustomize loads files below its directory only)
    assert (ROOT / "deploy" / "k8s" / "monitoring" / "alerts.yml").read_text() == (ROOT / "deploy" / "prometheus" / "alerts.yml").read_text()
