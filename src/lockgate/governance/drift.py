"""Drift of a closed window against the reference profile: the report, and the monitor.

For every feature of every profiled tensor (inputs, model outputs, and a classifier's class
distribution) :func:`evaluate` gathers the evidence -- bin counts against the reference's,
NaN/Inf and new-value shares, PSI, Jensen-Shannon, KS and W1 from the KLL CDFs, the
chi-squared test -- and :mod:`lockgate.governance.decision` turns it into a status with the
rule that decided it. The numbers themselves are in :mod:`lockgate.governance.statistics`.

* PSI, JS and chi-squared compare the bins of the values the reference knows; for
  categorical and discrete features the bins the reference never filled are the *new values*
  (their share is its own rule, and the report names them from the sketches).
* KS and W1 come from the reference's KLL sketch and the window's, at every reference point
  and 257 window quantiles (within 0.01 of the exact KS at 10,000 rows with k=400).
* W1 is normalised by the reference standard deviation (``W1/sigma``). A constant reference
  has none: W1 is then divided by the constant's magnitude (``W1/|x_ref|``: 3 -> 5 reads
  0.67), or reported raw when the constant is 0 (``W1``); the report names the unit.
* A window binned with another profile than the one it is evaluated against (a profile
  built after serving began, or rebuilt) is re-binned from its sketches: KLL CDFs for
  numeric features, frequent-items counts for categorical ones. The report says so.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from datasketches import frequent_items_error_type

from .config import DriftConfig
from .decision import (
    DISTRIBUTION,
    DRIFT,
    INCONCLUSIVE,
    INF_RATE,
    NAN_RATE,
    NEW_VALUES,
    OK,
    WARN,
    RuleResult,
    decide,
    deciding,
    distribution_effects,
    Effect,
    worst,
)
from .profile import CATEGORICAL, FeatureProfile, ReferenceProfile, TensorProfile, class_names
from .sketches import top_items
from .state import TensorState, WindowState
from .statistics import (
    backend,
    cdf_distances,
    chi2_homogeneity,
    fractions,
    js_distance,
    ks_from_bins,
    psi,
    psi_noise_floor,
    rate_test,
    reference_cdf,
)

log = logging.getLogger("lockgate.governance.drift")

__all__ = [
    "DRIFT", "INCONCLUSIVE", "OK", "WARN", "DriftEvent", "DriftMonitor", "DriftReport", "FeatureDrift",
    "evaluate", "latest_report", "load_windows", "subscribe_all", "window_dir",
]  # fmt: skip

CLASSES = "classes"  # value_kind of a classifier's class distribution
NEW_VALUES_LISTED = 20


# ---------------------------------------------------------------- reports
@dataclass(slots=True)
class FeatureDrift:
    """Everything a window says about one feature, and what was decided from it."""

    tensor: str
    kind: str  # "input" | "output"
    feature: str
    index: int  # -1 for a classifier's class distribution
    categorical: bool
    value_kind: str  # continuous | discrete | categorical | classes
    rows: int  # values in the window: finite + NaN + Inf
    status: str  # OK | WARN | DRIFT | INCONCLUSIVE
    reason: str  # the deciding rule in one line ("" when OK)
    psi: float
    psi_noise: float  # E0[PSI] at this window's size
    js: float
    ks: float | None
    wasserstein: float | None
    wasserstein_unit: str  # "sigma" | "|x_ref|" | "raw"
    chi2: float | None
    chi2_dof: int | None
    chi2_p: float | None
    psi_threshold: float
    js_threshold: float | None
    nan: int = 0
    inf: int = 0
    nan_share: float = 0.0
    inf_share: float = 0.0
    reference_nan_share: float = 0.0
    reference_inf_share: float = 0.0
    new_share: float = 0.0  # share of finite values the reference never had
    new_values: list[dict] = field(default_factory=list)  # [{"value": "7", "count": n, "exact": bool}]
    mean: float | None = None
    reference_mean: float | None = None
    reference_std: float | None = None
    edges: list[float] = field(default_factory=list)
    bin_labels: list[str] = field(default_factory=list)
    reference_fractions: list[float] = field(default_factory=list)
    live_fractions: list[float] = field(default_factory=list)
    live_counts: list[float] = field(default_factory=list)
    binned_from: str = "kernel"  # "kernel" (exact counts) | "sketch" (re-binned: approximate)
    rules: list[dict] = field(default_factory=list)  # RuleResult.as_dict() of every rule
    decided_by: list[dict] = field(default_factory=list)  # the rules that set the status

    @property
    def missing_share(self) -> float:
        return self.nan_share + self.inf_share

    @property
    def reference_missing_share(self) -> float:
        return self.reference_nan_share + self.reference_inf_share

    def p_value(self, rule: str, adjusted: bool = False) -> float | None:
        found = next((r for r in self.rules if r["rule"] == rule), None)
        return None if found is None else found["adjusted_p" if adjusted else "p_value"]


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
    alpha: float = 0.01
    correction: str = "holm"
    tests: int = 0  # p-values corrected together
    min_rows: int = 0
    accounting: dict[str, int] = field(default_factory=dict)
    profile_digest: str = ""
    profile_rows: int = 0
    profile_created: float = 0.0
    window_profile: str = ""  # digest the window's bins were cut with ("" = not recorded)
    windows: int = 1  # windows (or replica snapshots) merged into this one
    notes: list[str] = field(default_factory=list)  # what could not be evaluated, and why
    p_value_backend: str = ""

    def to_dict(self) -> dict:
        return asdict(self)

    def drifted(self) -> list[FeatureDrift]:
        return [f for f in self.features if f.status == DRIFT]

    def alerts(self) -> list[FeatureDrift]:
        return [f for f in self.features if f.status in (WARN, DRIFT)]


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
            "alpha": self.report.alpha,
            "correction": self.report.correction,
            "profile": self.report.profile_digest,
            "features": self.features,
        }


def alert_entry(f: FeatureDrift) -> dict:
    """One flagged feature in an alert: which rule and statistic decided, with the numbers."""
    decided = f.decided_by[0] if f.decided_by else {}
    effect = next((e for e in decided.get("effects", []) if e["statistic"] == decided.get("decided_by")), {})
    return {
        "tensor": f.tensor, "feature": f.feature, "index": f.index, "status": f.status,
        "rule": decided.get("rule"), "statistic": effect.get("statistic"), "value": effect.get("value"),
        "threshold": effect.get("threshold"), "p_value": decided.get("p_value"), "adjusted_p": decided.get("adjusted_p"),
        "reason": f.reason, "psi": round(f.psi, 6), "js": round(f.js, 6),
        "ks": None if f.ks is None else round(f.ks, 6),
    }  # fmt: skip


# ---------------------------------------------------------------- evidence
@dataclass(slots=True)
class _Bins:
    counts: np.ndarray  # live counts per profile bin
    source: str  # "kernel" | "sketch"


def _bins_match(tensor: TensorState, profile: TensorProfile, state_profile: str, digest: str) -> bool:
    """Were the window's bins cut with this profile's edges?"""
    if state_profile:
        return state_profile == digest
    counts = np.diff(tensor.edge_offsets)
    return counts.tolist() == [len(f.edges) for f in profile.features]


def _rebin(tensor: TensorState, j: int, ref: FeatureProfile) -> np.ndarray:
    """Counts in the profile's bins estimated from the window's sketches (another profile cut
    its bins): frequent-items counts for a categorical feature, the KLL CDF otherwise."""
    edges = np.asarray(ref.edges, dtype=np.float64)
    finite = float(tensor.count[j])
    frequent = tensor.sketches.frequent.get(j)
    if ref.kind == CATEGORICAL and frequent is not None and not frequent.is_empty():
        counts = np.zeros(edges.size + 1)
        for item, estimate in top_items(frequent, limit=1 << 20):
            counts[np.searchsorted(edges, float(item), side="right")] += estimate
        total = counts.sum()
        return counts * (finite / total) if total > 0 else counts
    sketch = tensor.sketches.kll[j]
    if sketch.is_empty():
        return np.zeros(edges.size + 1)
    below = np.asarray(sketch.get_cdf(edges.tolist(), False)[:-1], dtype=np.float64) if edges.size else np.empty(0)
    return np.diff(np.concatenate([[0.0], below, [1.0]])) * finite


def _new_values(tensor: TensorState, j: int, ref: FeatureProfile) -> list[dict]:
    """The values the reference never had, most frequent first, named from the sketches."""
    known = {float(v) for v, seen in zip(ref.values, ref.known_bins()[ref.value_bins()]) if seen}
    frequent = tensor.sketches.frequent.get(j)
    if frequent is not None and not frequent.is_empty():
        items = frequent.get_frequent_items(frequent_items_error_type.NO_FALSE_NEGATIVES)
        return [{"value": item, "count": int(estimate), "exact": lower == upper}
                for item, estimate, lower, upper in items if float(item) not in known][:NEW_VALUES_LISTED]  # fmt: skip
    sketch = tensor.sketches.kll[j]
    if sketch.is_empty():
        return []
    items = np.array(list(sketch), dtype=np.float64).reshape(-1, 2)
    edges = np.asarray(ref.edges, dtype=np.float64)
    known_mask = ref.known_bins()
    fresh = items[~known_mask[np.searchsorted(edges, items[:, 0], side="right")]]
    if not fresh.size:
        return []
    values, inverse = np.unique(fresh[:, 0], return_inverse=True)
    weights = np.bincount(inverse, weights=fresh[:, 1])
    order = np.argsort(-weights, kind="stable")[:NEW_VALUES_LISTED]
    exact = not sketch.is_estimation_mode()
    return [{"value": f"{values[i]:.6g}", "count": int(round(weights[i])), "exact": exact} for i in order]


def _wasserstein(ref: FeatureProfile, w1: float) -> tuple[float, str]:
    """W1 in reference standard deviations; for a constant reference, relative to the constant."""
    if ref.std > 0:
        return w1 / ref.std, "sigma"
    scale = abs(ref.mean) if np.isfinite(ref.mean) else 0.0
    return (w1 / scale, "|x_ref|") if scale > 0 else (w1, "raw")


def _rate_rules(ref: FeatureProfile, nan: int, inf: int, rows: int, limit: float) -> list[RuleResult]:
    out = []
    for rule, statistic, ref_hits, hits in ((NAN_RATE, "nan_share_change", ref.nan, nan), (INF_RATE, "inf_share_change", ref.inf, inf)):
        share = hits / rows if rows else 0.0
        ref_share = ref_hits / ref.rows if ref.rows else 0.0
        out.append(RuleResult(rule, "binomial, two-sided", rate_test(ref_hits, ref.rows, hits, rows),
                              [Effect(statistic, abs(share - ref_share), limit, ref_share, share)]))  # fmt: skip
    return out


def _feature(tensor: TensorState, j: int, ref: FeatureProfile, bins: _Bins, config: DriftConfig) -> tuple[FeatureDrift, list[RuleResult]]:
    limits = config.thresholds.limits(tensor.name, ref.name)
    finite, nan, inf = int(tensor.count[j]), int(tensor.nan[j]), int(tensor.inf[j])
    rows = finite + nan + inf
    ref_fracs = np.asarray(ref.fractions, dtype=np.float64)
    live = np.asarray(bins.counts, dtype=np.float64)
    if live.size != ref_fracs.size:
        raise ValueError(f"{tensor.name}/{ref.name}: live bins do not match the profile's edges")
    known = ref.known_bins()
    ref_known, live_known = ref_fracs[known], live[known]
    n_known = float(live_known.sum())
    new_count = float(live[~known].sum())
    p = psi(fractions(ref_known), fractions(live_known)) if n_known else 0.0
    js = js_distance(ref_known, live_known) if n_known else 0.0
    noise = psi_noise_floor(int((ref_known > 0).sum()), int(round(n_known)), ref.count)
    chi2 = chi2_homogeneity(ref_known * ref.count, live_known) if n_known else None
    ks = w1 = None
    unit = "sigma"
    reference = reference_cdf(ref.kll) if ref.kind != CATEGORICAL else None
    sketch = tensor.sketches.kll[j]
    if reference is not None and not sketch.is_empty():
        ks, raw_w1 = cdf_distances(reference, sketch)
        w1, unit = _wasserstein(ref, raw_w1)
    elif ref.kind != CATEGORICAL and n_known:
        ks = ks_from_bins(ref_fracs, live)
    rules = [RuleResult(DISTRIBUTION, f"chi-squared homogeneity, {chi2.dof} dof" if chi2 else "chi-squared homogeneity",
                        chi2.p_value if chi2 else None, distribution_effects(limits, max(0.0, p - noise), w1, js))]  # fmt: skip
    rules += _rate_rules(ref, nan, inf, rows, limits.missing_rate)
    if ref.has_value_bins:
        share = new_count / finite if finite else 0.0
        rules.append(RuleResult(NEW_VALUES, "binomial, one-sided", rate_test(0, ref.count, int(round(new_count)), finite, alternative="greater"),
                                [Effect("new_share", share, limits.new_values)]))  # fmt: skip
    feature = FeatureDrift(
        tensor=tensor.name, kind=tensor.kind, feature=ref.name, index=j, categorical=ref.categorical,
        value_kind=ref.kind, rows=rows, status=OK, reason="", psi=p, psi_noise=noise, js=js, ks=ks,
        wasserstein=w1, wasserstein_unit=unit, chi2=chi2.statistic if chi2 else None,
        chi2_dof=chi2.dof if chi2 else None, chi2_p=chi2.p_value if chi2 else None,
        psi_threshold=limits.psi, js_threshold=limits.js, nan=nan, inf=inf,
        nan_share=nan / rows if rows else 0.0, inf_share=inf / rows if rows else 0.0,
        reference_nan_share=ref.nan / ref.rows if ref.rows else 0.0,
        reference_inf_share=ref.inf / ref.rows if ref.rows else 0.0,
        new_share=new_count / finite if finite else 0.0,
        new_values=_new_values(tensor, j, ref) if new_count > 0 else [],
        mean=float(tensor.mean()[j]) if finite else None, reference_mean=ref.mean, reference_std=ref.std,
        edges=list(ref.edges), bin_labels=ref.bin_labels(), reference_fractions=ref_fracs.tolist(),
        live_fractions=fractions(live).tolist(), live_counts=live.tolist(), binned_from=bins.source,
    )  # fmt: skip
    return feature, rules


def _classes(tensor: TensorState, profile: TensorProfile, config: DriftConfig, class_names: list[str] | None) -> tuple[FeatureDrift, list[RuleResult]] | None:
    counts = tensor.sketches.class_counts
    if counts is None or profile.classes is None or len(profile.classes) != counts.size:
        return None
    limits = config.thresholds.limits(tensor.name, "class")
    ref = np.asarray(profile.classes, dtype=np.float64)
    live = np.asarray(counts, dtype=np.float64)
    n = float(live.sum())
    ref_rows = profile.features[0].count if profile.features else 0
    p = psi(ref, fractions(live)) if n else 0.0
    js = js_distance(ref, live) if n else 0.0
    noise = psi_noise_floor(int((ref > 0).sum()), int(n), ref_rows)
    chi2 = chi2_homogeneity(ref * ref_rows, live) if n else None
    names = class_names if class_names and len(class_names) == counts.size else [str(i) for i in range(counts.size)]
    rules = [RuleResult(DISTRIBUTION, f"chi-squared homogeneity, {chi2.dof} dof" if chi2 else "chi-squared homogeneity",
                        chi2.p_value if chi2 else None, distribution_effects(limits, max(0.0, p - noise), None, js))]  # fmt: skip
    feature = FeatureDrift(
        tensor=tensor.name, kind=tensor.kind, feature="class", index=-1, categorical=True, value_kind=CLASSES,
        rows=int(n), status=OK, reason="", psi=p, psi_noise=noise, js=js, ks=None, wasserstein=None,
        wasserstein_unit="", chi2=chi2.statistic if chi2 else None, chi2_dof=chi2.dof if chi2 else None,
        chi2_p=chi2.p_value if chi2 else None, psi_threshold=limits.psi, js_threshold=limits.js,
        edges=[i + 0.5 for i in range(counts.size - 1)], bin_labels=names, reference_fractions=ref.tolist(),
        live_fractions=fractions(live).tolist(), live_counts=live.tolist(),
    )  # fmt: skip
    return feature, rules


def evaluate(
    state: WindowState, profile: ReferenceProfile, config: DriftConfig, window: int = 0,
    class_names: dict[str, list[str]] | None = None,
) -> DriftReport:
    """Compare a (merged) window with the reference profile and decide every feature.

    ``class_names``: per output tensor, the names of its classes (from the model config),
    used to label a classifier's class bins."""
    evaluated = state.rows >= config.min_rows
    digest = profile.digest()
    notes: list[str] = []
    pairs: list[tuple[FeatureDrift, list[RuleResult]]] = []
    for name, tensor in state.tensors.items():
        tprofile = profile.tensors.get(name)
        if tprofile is None:
            notes.append(f"{tensor.kind} '{name}' is not in the reference profile: not evaluated")
            continue
        if len(tprofile.features) != tensor.n_features:
            notes.append(f"{tensor.kind} '{name}': the window has {tensor.n_features} features, the profile "
                         f"{len(tprofile.features)}: not evaluated (rebuild the profile for this model version)")  # fmt: skip
            continue
        matched = _bins_match(tensor, tprofile, state.profile, digest)
        if not matched:
            notes.append(f"{tensor.kind} '{name}': the window was binned with another profile; its bins were "
                         "re-estimated from the window's sketches (approximate counts)")  # fmt: skip
        names = (class_names or {}).get(name)
        for j, ref in enumerate(tprofile.features):
            bins = _Bins(tensor.feature_bins(j), "kernel") if matched else _Bins(_rebin(tensor, j, ref), "sketch")
            found = _feature(tensor, j, ref, bins, config)
            if names and len(names) == tensor.n_features and tensor.kind == "output":
                found[0].feature = names[j]  # a classifier's score columns, by class name
            pairs.append(found)
        classes = _classes(tensor, tprofile, config, (class_names or {}).get(name))
        if classes is not None:
            pairs.append(classes)
    for name in profile.tensors:
        if name not in state.tensors:
            notes.append(f"'{name}' is in the profile but the window holds no rows of it: not evaluated")
    statuses = decide([rules for _, rules in pairs], config)
    features = []
    for (feature, rules), status in zip(pairs, statuses):
        if not evaluated or feature.rows == 0:
            status = INCONCLUSIVE
        feature.status = status
        feature.rules = [r.as_dict() for r in rules]
        chosen = deciding(rules, status)
        feature.decided_by = [r.as_dict() for r in chosen]
        if chosen:
            feature.reason = chosen[0].describe(config.alpha)
        elif status == INCONCLUSIVE:
            feature.reason = (f"window of {state.rows} rows is below min_rows {config.min_rows}" if not evaluated
                              else "no rows of this feature in the window")  # fmt: skip
        features.append(feature)
    status = worst(f.status for f in features) if features else INCONCLUSIVE
    if notes and status == OK:
        status = INCONCLUSIVE  # part of the model could not be checked: never a plain OK
    return DriftReport(
        model=state.model, version=state.version, window=window, start=state.start, end=state.end,
        rows=state.rows, evaluated=evaluated, status=status, features=features, alpha=config.alpha,
        correction=config.correction, tests=sum(1 for _, rules in pairs for r in rules if r.p_value is not None),
        min_rows=config.min_rows, accounting=dict(state.accounting), profile_digest=digest,
        profile_rows=profile.rows, profile_created=profile.created, window_profile=state.profile,
        windows=state.windows, notes=notes, p_value_backend=backend(),
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
        self, model: str, version: str, config: DriftConfig, profile: ReferenceProfile | None, state_dir: str | Path | None = None,
        *, labels: Mapping[str, Sequence[str]] | None = None,
        profile_source: Callable[[], ReferenceProfile | None] | None = None,
    ) -> None:
        """``labels``: class names per output (the model config's), for labelling class bins.
        ``profile_source``: where to look for a profile when the version started without one
        (a profile built after serving began); asked once per closed window until it answers."""
        self.model = model
        self.version = version
        self.config = config
        self.profile = profile
        self.state_dir = Path(state_dir) if state_dir is not None else None
        self._labels = dict(labels or {})
        self._profile_source = profile_source
        self.class_names: dict[str, list[str]] = class_names(self._labels, profile)  # per output tensor
        self.unevaluated = 0  # windows closed without a profile to judge them against
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
        """Persist and evaluate a closed window; alert on WARN/DRIFT. Never raises.

        Report listeners hear every evaluated window (not one below ``min_rows``)."""
        with self._lock:
            index = self._next_index
            self._next_index += 1
            self.windows_closed += 1
        if self.state_dir is not None and self.config.persist:
            self._persist(state, index)
        if self.profile is None and not self._late_profile():
            self.unevaluated += 1
            return None
        try:
            report = evaluate(state, self.profile, self.config, window=index, class_names=self.class_names)
        except Exception:  # a broken profile must never take the server down
            log.exception("drift evaluation failed for %s/%s window %d", self.model, self.version, index)
            return None
        self.last_report = report
        with _registry_lock:
            _latest[(self.model, self.version)] = report
        if report.evaluated and report.status in (WARN, DRIFT):
            self._alert(report)
        if report.evaluated:
            for listener in list(self._report_listeners):
                try:
                    listener(report)
                except Exception:
                    self.subscriber_errors += 1
                    log.exception("drift report listener %r failed", listener)
        return report

    def _late_profile(self) -> bool:
        """Take up a profile built after this version began serving. Its windows were binned
        without one, so :func:`evaluate` re-bins them from their sketches (and says so)."""
        if self._profile_source is None:
            return False
        try:
            profile = self._profile_source()
        except Exception:  # an unreadable profile leaves the window unevaluated, and says why
            log.exception("reference profile of %s/%s could not be read", self.model, self.version)
            return False
        if profile is None:
            return False
        self.profile, self.class_names = profile, class_names(self._labels, profile)
        log.info("reference profile of %s/%s found after serving began: its windows are evaluated from now on, "
                 "re-binned from their sketches until the version reloads", self.model, self.version)  # fmt: skip
        return True

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
        flagged = report.alerts()
        event = DriftEvent(
            model=self.model,
            version=self.version,
            window=report.window,
            status=report.status,
            rows=report.rows,
            time=time.time(),
            features=[alert_entry(f) for f in flagged],
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
