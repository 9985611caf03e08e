"""Model quality from a (merged) outcome window: classification and regression metrics.

Everything is computed from the window's counts and sums, so the figures of a fleet's merged
window are those of one process that saw every row. Proportions carry a Wilson score
interval. Conventions follow scikit-learn where it has one: binary precision/recall/F1 are of
the positive class; multiclass ones are macro averages over the classes (one-vs-rest);
undefined ratios (0/0) are None rather than 0, so "no data" never reads as "bad".
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from lockgate.outcomes.spec import OutcomeSpec
from lockgate.outcomes.state import OutcomeWindow, delay_quantile

#: Metrics where a higher value is better (the others -- losses and errors -- are lower-better).
HIGHER_IS_BETTER = frozenset({"accuracy", "precision", "recall", "f1", "specificity", "auc", "r2"})
CLASSIFICATION_METRICS = ("accuracy", "precision", "recall", "f1", "specificity", "log_loss", "brier", "auc", "ece")
REGRESSION_METRICS = ("mae", "rmse", "mape", "r2")


def z_value(confidence: float) -> float:
    """Two-sided standard normal quantile for ``confidence`` (e.g. 1.96 for 0.95)."""
    from statistics import NormalDist

    return NormalDist().inv_cdf(0.5 + confidence / 2.0)


def wilson(successes: int, total: int, confidence: float = 0.95) -> tuple[float, float] | None:
    """Wilson score interval of a proportion; None when there is no trial."""
    if total <= 0:
        return None
    z = z_value(confidence)
    p = successes / total
    denom = 1.0 + z * z / total
    centre = (p + z * z / (2 * total)) / denom
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def _ratio(num: float, den: float) -> float | None:
    return float(num) / float(den) if den else None


def _proportion(successes: int, total: int, confidence: float) -> dict[str, Any]:
    interval = wilson(int(successes), int(total), confidence)
    return {"value": _ratio(successes, total), "ci": list(interval) if interval else None, "n": int(total)}


def confusion_metrics(confusion: np.ndarray, spec: OutcomeSpec, confidence: float = 0.95) -> dict[str, Any]:
    """Accuracy, precision, recall, F1, specificity (with Wilson intervals) from a K x K confusion."""
    cm = confusion.astype(np.int64)
    n = int(cm.sum())
    out: dict[str, Any] = {"accuracy": _proportion(int(np.trace(cm)), n, confidence)}
    tp = np.diag(cm)
    fp = cm.sum(axis=0) - tp
    fn = cm.sum(axis=1) - tp
    tn = n - tp - fp - fn
    per_class: dict[str, dict[str, Any]] = {}
    for k, name in enumerate(spec.classes):
        precision = _ratio(tp[k], tp[k] + fp[k])
        recall = _ratio(tp[k], tp[k] + fn[k])
        f1 = _ratio(2 * tp[k], 2 * tp[k] + fp[k] + fn[k]) if (tp[k] + fp[k] + fn[k]) else None
        per_class[name] = {
            "precision": _proportion(tp[k], tp[k] + fp[k], confidence),
            "recall": _proportion(tp[k], tp[k] + fn[k], confidence),
            "specificity": _proportion(tn[k], tn[k] + fp[k], confidence),
            "f1": {"value": f1},
            "support": int(tp[k] + fn[k]),
            "_values": (precision, recall, f1, _ratio(tn[k], tn[k] + fp[k])),
        }
    if spec.task == "binary":
        chosen = per_class[spec.classes[spec.positive]]
        for metric in ("precision", "recall", "specificity", "f1"):
            out[metric] = chosen[metric]
    else:
        for i, metric in enumerate(("precision", "recall", "f1", "specificity")):
            values = [c["_values"][i] for c in per_class.values()]
            defined = [v for v in values if v is not None]
            out[metric] = {"value": float(np.mean(defined)) if len(defined) == len(values) and defined else None,
                           "average": "macro"}
    for c in per_class.values():
        c.pop("_values")
    out["per_class"] = per_class
    return out


def auc_from_histogram(negatives: np.ndarray, positives: np.ndarray) -> float | None:
    """P(score of a positive > score of a negative), ties (same bin) counted half."""
    neg = negatives.astype(np.float64)
    pos = positives.astype(np.float64)
    n_neg, n_pos = neg.sum(), pos.sum()
    if n_neg == 0 or n_pos == 0:
        return None
    below = np.concatenate([[0.0], np.cumsum(neg)[:-1]])
    return float((pos * (below + 0.5 * neg)).sum() / (n_pos * n_neg))


def calibration(state: OutcomeWindow, spec: OutcomeSpec) -> dict[str, Any]:
    """Reliability curve and expected calibration error (top-label, equal-width bins)."""
    count = state["calib_count"].astype(np.float64)
    conf = state["calib_conf"].astype(np.float64)
    hit = state["calib_hit"].astype(np.float64)
    e = len(count)
    edges = np.linspace(0.0, 1.0, e + 1)
    curve = [
        {"bin": [float(edges[i]), float(edges[i + 1])], "count": int(count[i]),
         "mean_predicted": _ratio(conf[i], count[i]), "observed": _ratio(hit[i], count[i])}
        for i in range(e)
    ]
    if spec.task == "binary":
        # Bins of P(positive): fold bin i (< 0.5) onto the top-label bin of 1 - p.
        half = e // 2
        low, high = slice(0, half), slice(half, e)
        top_count = count[high] + count[low][::-1]
        top_conf = conf[high] + (count[low] - conf[low])[::-1]
        top_hit = hit[high] + (count[low] - hit[low])[::-1]
    else:
        top_count, top_conf, top_hit = count, conf, hit
    total = top_count.sum()
    ece = None
    if total:
        ece = float(np.sum(np.abs(top_hit - top_conf)) / total)
    return {"curve": curve, "ece": ece, "kind": "P(positive) vs observed positives" if spec.task == "binary"
            else "top-label confidence vs accuracy"}


def classification_quality(state: OutcomeWindow, spec: OutcomeSpec, confidence: float = 0.95) -> dict[str, Any]:
    confusion = state["confusion"].sum(axis=0)
    metrics = confusion_metrics(confusion, spec, confidence)
    out: dict[str, Any] = {name: metrics[name] for name in ("accuracy", "precision", "recall", "f1", "specificity")}
    out["per_class"] = metrics["per_class"]
    out["confusion_matrix"] = {"classes": list(spec.classes), "rows_true_columns_predicted": confusion.astype(int).tolist()}
    if "hist" in state.arrays:
        scored = int(state["scored"][0])
        out["log_loss"] = {"value": _ratio(state["loss"][0], scored), "n": scored}
        out["brier"] = {"value": _ratio(state["loss"][1], scored), "n": scored}
        hist = state["hist"]
        if spec.task == "binary":
            out["auc"] = {"value": auc_from_histogram(hist[0, 0], hist[0, 1]), "bins": int(hist.shape[2])}
        else:
            per = [auc_from_histogram(hist[k, 0], hist[k, 1]) for k in range(hist.shape[0])]
            out["auc"] = {"value": float(np.mean(per)) if per and all(v is not None for v in per) else None,
                          "average": "macro one-vs-rest", "per_class": dict(zip(spec.classes, per)),
                          "bins": int(hist.shape[2])}
        cal = calibration(state, spec)
        out["ece"] = {"value": cal["ece"], "bins": len(cal["curve"])}
        out["calibration"] = cal
    return out


def _combine_moments(n: np.ndarray, mean: np.ndarray, m2: np.ndarray) -> tuple[int, float, float]:
    """Chan's combination of per-cell (n, mean, M2) into one."""
    total, mu, acc = 0.0, 0.0, 0.0
    for nb, mb, m2b in zip(n.astype(np.float64), mean, m2):
        if nb == 0:
            continue
        both = total + nb
        delta = mb - mu
        mu += delta * nb / both
        acc += m2b + delta * delta * total * nb / both
        total = both
    return int(total), mu, acc


def regression_quality(state: OutcomeWindow) -> dict[str, Any]:
    n = int(state["labeled"].sum())
    if n == 0:
        return {name: {"value": None, "n": 0} for name in REGRESSION_METRICS}
    sse = float(state["sq_err"].sum())
    _, _, sst = _combine_moments(state["labeled"], state["y_mean"], state["y_m2"])
    return {
        "mae": {"value": float(state["abs_err"].sum()) / n, "n": n},
        "rmse": {"value": math.sqrt(sse / n), "n": n},
        "mape": {"value": float(state["ape"].sum()) / n, "n": n},
        "r2": {"value": (1.0 - sse / sst) if sst > 0 else None, "n": n},
    }


def coverage(state: OutcomeWindow) -> dict[str, Any]:
    """Label coverage and label delay of the window."""
    predictions, labeled = state.predictions, state.labeled
    hist = state["delay_hist"]
    return {
        "predictions": predictions,
        "labeled": labeled,
        "coverage": _ratio(labeled, predictions),
        "delay_s": {
            "mean": _ratio(float(state["delay_sum"][0]), labeled),
            "p50": delay_quantile(hist, 0.5),
            "p90": delay_quantile(hist, 0.9),
            "histogram_log2_s": hist.astype(int).tolist(),
        },
    }


def quality(state: OutcomeWindow, spec: OutcomeSpec, confidence: float = 0.95) -> dict[str, Any]:
    """Coverage plus every quality metric of the spec's task."""
    out = coverage(state)
    out["metrics"] = classification_quality(state, spec, confidence) if spec.classification else regression_quality(state)
    return out


def metric_value(report: dict[str, Any], metric: str) -> float | None:
    """One metric's point value from ``quality()``'s output."""
    entry = report.get("metrics", {}).get(metric)
    return entry.get("value") if isinstance(entry, dict) else None
