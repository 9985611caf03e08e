"""Drift statistics, window evaluation, and alerts.

Per feature (and per output column, and per classifier's class distribution) a closed
window is compared with the reference profile:

* **PSI** over the profile's bins, with both fractions floored at 1e-4 so empty bins stay
  finite;
* **Jensen–Shannon distance** (square root of the base-2 JS divergence, in [0, 1]);
* **KS statistic**: the largest gap between the two CDFs at the bin edges (exact counts);
* **normalised Wasserstein**: W1 between the reference and live quantile functions, sampled
  at 100 probabilities (reference: exact quantiles; live: the window's KLL sketch), divided
  by the reference standard deviation (IQR/1.349 if the std is 0), so 0.5 means "half a
  standard deviation of mass moved";
* **chi-squared** two-sample test (reference vs window bin counts) for categoricals; the
  p-value uses SciPy when installed, else the regularised upper incomplete gamma below.

Status: DRIFT when PSI or JS reaches its threshold, WARN when either reaches
``warn_fraction`` of it (or a categorical's chi-squared p-value is below ``chi2_alpha``),
else OK. Windows with fewer than ``min_rows`` rows are reported but never alert.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .config import DriftConfig
from .profile import QUANTILE_GRID, FeatureProfile, ReferenceProfile, TensorProfile
from .state import TensorState, WindowState

log = logging.getLogger("lockgate.governance.drift")

OK, WARN, DRIFT = "OK", "WARN", "DRIFT"
_RANK = {OK: 0, WARN: 1, DRIFT: 2}
_FLOOR = 1e-4


# ---------------------------------------------------------------- statistics
def _fractions(counts: np.ndarray) -> np.ndarray:
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum()
    return counts / total if total > 0 else np.zeros_like(counts)


def psi(reference: np.ndarray, live: np.ndarray) -> float:
    """Population stability index of two distributions over the same bins (fractions)."""
    p = np.maximum(np.asarray(reference, dtype=np.float64), _FLOOR)
    q = np.maximum(np.asarray(live, dtype=np.float64), _FLOOR)
    return float(np.sum((q - p) * np.log(q / p)))


def js_distance(reference: np.ndarray, live: np.ndarray) -> float:
    """Jensen–Shannon distance, base 2 (0 = same, 1 = disjoint)."""
    p = _fractions(reference)
    q = _fractions(live)
    m = (p + q) / 2.0
    with np.errstate(divide="ignore", invalid="ignore"):
        kl_p = np.where(p > 0, p * np.log2(p / m), 0.0).sum()
        kl_q = np.where(q > 0, q * np.log2(q / m), 0.0).sum()
    return float(math.sqrt(max(0.0, (kl_p + kl_q) / 2.0)))


def ks_statistic(reference: np.ndarray, live: np.ndarray) -> float:
    """Largest CDF gap at the bin edges."""
    return float(np.max(np.abs(np.cumsum(_fractions(reference)) - np.cumsum(_fractions(live))), initial=0.0))


def wasserstein_normalised(reference_quantiles: np.ndarray, live_quantiles: np.ndarray, scale: float) -> float:
    """Mean absolute gap of two quantile functions on a common probability grid, / scale."""
    gap = float(np.mean(np.abs(np.asarray(reference_quantiles) - np.asarray(live_quantiles))))
    return gap / scale if scale > 0 else gap


def _gammaincc(a: float, x: float) -> float:
    """Regularised upper incomplete gamma Q(a, x) (series / Lentz continued fraction)."""
    if x <= 0:
        return 1.0
    if x < a + 1.0:
        term = total = 1.0 / a
        ap = a
        for _ in range(10_000):
            ap += 1.0
            term *= x / ap
            total += term
            if abs(term) < abs(total) * 1e-15:
                break
        return max(0.0, 1.0 - total * math.exp(-x + a * math.log(x) - math.lgamma(a)))
    tiny = 1e-300
    b = x + 1.0 - a
    c = 1.0 / tiny
    d = 1.0 / b
    h = d
    for i in range(1, 10_000):
        an = -i * (i - a)
        b += 2.0
        d = an * d + b
        d = tiny if abs(d) < tiny else d
        c = b + an / c
        c = tiny if abs(c) < tiny else c
        d = 1.0 / d
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-15:
            break
    return min(1.0, math.exp(-x + a * math.log(x) - math.lgamma(a)) * h)


def chi2_sf(statistic: float, dof: int) -> float:
    """P(X >= statistic) for X ~ chi-squared(dof)."""
    if dof <= 0:
        return 1.0
    try:
        from scipy.stats import chi2  # optional: exact same answer, faster
    except ImportError:
        return _gammaincc(dof / 2.0, statistic / 2.0)
    return float(chi2.sf(statistic, dof))


def chi2_two_sample(reference_counts: np.ndarray, live_counts: np.ndarray) -> tuple[float, float]:
    """Chi-squared test of homogeneity on a 2 x B table; returns (statistic, p-value)."""
    table = np.vstack([np.asarray(reference_counts, dtype=np.float64), np.asarray(live_counts, dtype=np.float64)])
    table = table[:, table.sum(axis=0) > 0]
    if table.shape[1] < 2 or (table.sum(axis=1) == 0).any():
        return 0.0, 1.0
    expected = table.sum(axis=1, keepdims=True) * table.sum(axis=0, keepdims=True) / table.sum()
    statistic = float(((table - expected) ** 2 / expected).sum())
    return statistic, chi2_sf(statistic, table.shape[1] - 1)


# ---------------------------------------------------------------- reports
@dataclass(slots=True)
class FeatureDrift:
    tensor: str
    kind: str  # "input" | "output"
    feature: str
    index: int  # -1 for a classifier's class distribution
    categorical: bool
    rows: int
    psi: float
    js: float
    ks: float
    wasserstein: float | None
    chi2: float | None
    chi2_p: float | None
    psi_threshold: float
    js_threshold: float
    status: str
    nan: int = 0
    inf: int = 0
    mean: float | None = None
    reference_mean: float | None = None
    edges: list[float] = field(default_factory=list)
    reference_fractions: list[float] = field(default_factory=list)
    live_fractions: list[float] = field(default_factory=list)


@dataclass(slots=True)
class DriftReport:
    model: str
    version: str
    window: int
    start: float
    end: float
    rows: int
    evaluated: bool  # False when the window had fewer than min_rows rows
    status: str
    features: list[FeatureDrift]

    def to_dict(self) -> dict:
        return asdict(self)

    def drifted(self) -> list[FeatureDrift]:
        return [f for f in self.features if f.status == DRIFT]


@dataclass(slots=True)
class DriftEvent:
    """What an alert carries: for the audit trail and for rollout subscribers."""

    model: str
    version: str
    window: int
    status: str
    rows: int
    time: float
    features: list[dict]
    report: DriftReport

    def to_audit(self) -> dict:
        return {
            "type": "governance.drift",
            "model": self.model,
            "version": self.version,
            "window": self.window,
            "status": self.status,
            "rows": self.rows,
            "time": self.time,
            "features": self.features,
        }


def _status(psi_value: float, js_value: float, psi_thr: float, js_thr: float, warn_fraction: float) -> str:
    if psi_value >= psi_thr or js_value >= js_thr:
        return DRIFT
    if psi_value >= warn_fraction * psi_thr or js_value >= warn_fraction * js_thr:
        return WARN
    return OK


def _feature_drift(
    tensor: TensorState, profile: TensorProfile, j: int, config: DriftConfig, evaluated: bool
) -> FeatureDrift:
    ref: FeatureProfile = profile.features[j]
    live_counts = tensor.feature_bins(j)
    ref_fracs = np.asarray(ref.fractions, dtype=np.float64)
    if ref_fracs.size != live_counts.size:
        raise ValueError(f"{tensor.name}/{ref.name}: live bins do not match the profile's edges")
    live_fracs = _fractions(live_counts)
    psi_thr, js_thr = config.thresholds.limits(tensor.name, ref.name)
    n = int(tensor.count[j])
    p = psi(ref_fracs, live_fracs) if n else 0.0
    js = js_distance(ref_fracs, live_fracs) if n else 0.0
    ks = ks_statistic(ref_fracs, live_fracs) if n else 0.0
    wass = None
    sketch = tensor.sketches.kll[j]
    if not ref.categorical and ref.quantiles and not sketch.is_empty():
        scale = ref.std if ref.std > 0 else ref.iqr / 1.349
        wass = wasserstein_normalised(np.asarray(ref.quantiles), np.asarray(sketch.get_quantiles(QUANTILE_GRID.tolist())), scale)
    chi2 = chi2_p = None
    status = _status(p, js, psi_thr, js_thr, config.thresholds.warn_fraction) if n else OK
    if ref.categorical and n:
        chi2, chi2_p = chi2_two_sample(ref_fracs * ref.count, live_counts)
        if status == OK and chi2_p < config.thresholds.chi2_alpha:
            status = WARN
    return FeatureDrift(
        tensor=tensor.name,
        kind=tensor.kind,
        feature=ref.name,
        index=j,
        categorical=ref.categorical,
        rows=n,
        psi=p,
        js=js,
        ks=ks,
        wasserstein=wass,
        chi2=chi2,
        chi2_p=chi2_p,
        psi_threshold=psi_thr,
        js_threshold=js_thr,
        status=status if evaluated else OK,
        nan=int(tensor.nan[j]),
        inf=int(tensor.inf[j]),
        mean=float(tensor.mean()[j]) if n else None,
        reference_mean=ref.mean,
        edges=list(ref.edges),
        reference_fractions=ref_fracs.tolist(),
        live_fractions=live_fracs.tolist(),
    )


def _class_drift(tensor: TensorState, profile: TensorProfile, config: DriftConfig, evaluated: bool) -> FeatureDrift | None:
    counts = tensor.sketches.class_counts
    if counts is None or profile.classes is None or len(profile.classes) != counts.size or counts.sum() == 0:
        return None
    ref = np.asarray(profile.classes)
    live = _fractions(counts)
    psi_thr, js_thr = config.thresholds.limits(tensor.name, "class")
    p, js = psi(ref, live), js_distance(ref, live)
    ref_rows = profile.features[0].count if profile.features else 0
    chi2, chi2_p = chi2_two_sample(ref * ref_rows, counts)
    status = _status(p, js, psi_thr, js_thr, config.thresholds.warn_fraction)
    if status == OK and chi2_p < config.thresholds.chi2_alpha:
        status = WARN
    return FeatureDrift(
        tensor=tensor.name, kind=tensor.kind, feature="class", index=-1, categorical=True, rows=int(counts.sum()),
        psi=p, js=js, ks=ks_statistic(ref, live), wasserstein=None, chi2=chi2, chi2_p=chi2_p,
        psi_threshold=psi_thr, js_threshold=js_thr, status=status if evaluated else OK,
        edges=[i + 0.5 for i in range(counts.size - 1)], reference_fractions=ref.tolist(), live_fractions=live.tolist(),
    )  # fmt: skip


def evaluate(state: WindowState, profile: ReferenceProfile, config: DriftConfig, window: int = 0) -> DriftReport:
    """Compare a (merged) window with the reference profile."""
    evaluated = state.rows >= config.min_rows
    features: list[FeatureDrift] = []
    for name, tensor in state.tensors.items():
        tprofile = profile.tensors.get(name)
        if tprofile is None or len(tprofile.features) != tensor.n_features:
            continue
        features.extend(_feature_drift(tensor, tprofile, j, config, evaluated) for j in range(tensor.n_features))
        classes = _class_drift(tensor, tprofile, config, evaluated)
        if classes is not None:
            features.append(classes)
    worst = max((f.status for f in features), key=_RANK.__getitem__, default=OK)
    return DriftReport(
        model=state.model, version=state.version, window=window, start=state.start, end=state.end,
        rows=state.rows, evaluated=evaluated, status=worst, features=features,
    )  # fmt: skip


# ---------------------------------------------------------------- monitor
Subscriber = Callable[[DriftEvent], None]
_global_subscribers: list[Subscriber] = []
_latest: dict[tuple[str, str], DriftReport] = {}
_registry_lock = threading.Lock()


def subscribe_all(callback: Subscriber) -> Callable[[], None]:
    """Receive WARN/DRIFT events of every model version; returns an unsubscribe function."""
    with _registry_lock:
        _global_subscribers.append(callback)

    def unsubscribe() -> None:
        with _registry_lock:
            if callback in _global_subscribers:
                _global_subscribers.remove(callback)

    return unsubscribe


def latest_report(model: str, version: str) -> DriftReport | None:
    """The last closed window's report of a model version in this process."""
    with _registry_lock:
        return _latest.get((model, version))


def window_dir(state_dir: str | Path, model: str, version: str) -> Path:
    return Path(state_dir) / "drift" / model / str(version)


class DriftMonitor:
    """Evaluates each closed window of one model version, persists it, and raises alerts."""

    def __init__(
        self, model: str, version: str, config: DriftConfig, profile: ReferenceProfile | None, state_dir: str | Path | None = None
    ) -> None:
        self.model = model
        self.version = version
        self.config = config
        self.profile = profile
        self.state_dir = Path(state_dir) if state_dir is not None else None
        self.windows_closed = 0
        self.alerts = 0
        self.subscriber_errors = 0
        self.persist_errors = 0
        self.last_report: DriftReport | None = None
        self._subscribers: list[Subscriber] = []
        # Called with every evaluated report, OK included, so consumers that latch an alert
        # (the canary analysis) also learn when a version is back to normal.
        self._report_listeners: list[Callable[[DriftReport], None]] = []
        self._lock = threading.Lock()
        self._next_index = self._first_free_index()

    def _first_free_index(self) -> int:
        if self.state_dir is None:
            return 0
        existing = sorted(window_dir(self.state_dir, self.model, self.version).glob("window-*.bin"))
        indices = [int(p.stem.split("-", 1)[1]) for p in existing if p.stem.split("-", 1)[1].isdigit()]
        return max(indices) + 1 if indices else 0

    def on_report(self, listener: Callable[[DriftReport], None]) -> None:
        """Receive every evaluated report of this version, OK included."""
        with self._lock:
            self._report_listeners.append(listener)

    def subscribe(self, callback: Subscriber) -> Callable[[], None]:
        """Receive this version's WARN/DRIFT events; returns an unsubscribe function."""
        with self._lock:
            self._subscribers.append(callback)

        def unsubscribe() -> None:
            with self._lock:
                if callback in self._subscribers:
                    self._subscribers.remove(callback)

        return unsubscribe

    def close_window(self, state: WindowState) -> DriftReport | None:
        """Persist and evaluate a closed window; alert on WARN/DRIFT. Never raises."""
        with self._lock:
            index = self._next_index
            self._next_index += 1
            self.windows_closed += 1
        if self.state_dir is not None and self.config.persist:
            self._persist(state, index)
        if self.profile is None:
            return None
        try:
            report = evaluate(state, self.profile, self.config, window=index)
        except Exception:  # a broken profile must never take the server down
            log.exception("drift evaluation failed for %s/%s window %d", self.model, self.version, index)
            return None
        self.last_report = report
        with _registry_lock:
            _latest[(self.model, self.version)] = report
        if report.evaluated and report.status != OK:
            self._alert(report)
        if report.evaluated:
            for listener in list(self._report_listeners):
                try:
                    listener(report)
                except Exception:
                    self.subscriber_errors += 1
                    log.exception("drift report listener %r failed", listener)
        return report

    def _persist(self, state: WindowState, index: int) -> None:
        folder = window_dir(self.state_dir, self.model, self.version)  # type: ignore[arg-type]
        try:
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"window-{index:08d}.bin"
            tmp = path.with_suffix(".tmp")
            tmp.write_bytes(state.to_bytes())
            tmp.replace(path)
            for old in sorted(folder.glob("window-*.bin"))[: -self.config.keep_windows]:
                old.unlink(missing_ok=True)
        except OSError:
            self.persist_errors += 1
            log.exception("cannot persist drift window %d of %s/%s", index, self.model, self.version)

    def _alert(self, report: DriftReport) -> None:
        flagged = [f for f in report.features if f.status != OK]
        event = DriftEvent(
            model=self.model,
            version=self.version,
            window=report.window,
            status=report.status,
            rows=report.rows,
            time=time.time(),
            features=[
                {"tensor": f.tensor, "feature": f.feature, "index": f.index, "status": f.status,
                 "psi": round(f.psi, 6), "js": round(f.js, 6), "ks": round(f.ks, 6)}
                for f in flagged
            ],  # fmt: skip
            report=report,
        )
        self.alerts += 1
        level = logging.WARNING if report.status == DRIFT else logging.INFO
        log.log(level, json.dumps({"event": "drift_alert", **event.to_audit()}))
        with self._lock:
            local = list(self._subscribers)
        with _registry_lock:
            shared = list(_global_subscribers)
        for callback in [*local, *shared]:
            try:
                callback(event)
            except Exception:
                self.subscriber_errors += 1
                log.exception("drift subscriber %r failed", callback)


def load_windows(state_dir: str | Path, model: str, version: str, last: int | None = 1) -> list[WindowState]:
    """Read persisted windows (the newest ``last`` of them; all when ``last`` is None)."""
    paths = sorted(window_dir(state_dir, model, version).glob("window-*.bin"))
    if last is not None:
        paths = paths[-last:]
    return [WindowState.from_bytes(p.read_bytes()) for p in paths]
