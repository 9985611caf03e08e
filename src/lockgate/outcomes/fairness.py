"""Fairness per protected segment and intersection, from a (merged) outcome window.

For every protected segment, and every intersection of up to ``fairness.max_depth`` of them,
the window's joint cells are summed onto the segment's groups. Per group, without labels:
the selection rate (share of predictions of the favourable outcome); with labels: true and
false positive rates of the favourable outcome and accuracy. Each carries a Wilson interval.

Against the reference group (configured, else the largest): statistical parity difference
``SR_g - SR_ref`` (Newcombe's hybrid score interval) and disparate impact ratio
``SR_g / SR_ref`` (Katz log interval). Per segment, the between-group gaps are fairlearn's
definitions -- ``demographic_parity_difference`` (max - min selection rate),
``demographic_parity_ratio`` (min / max) and ``equalized_odds_difference`` (the larger of the
TPR and FPR gaps) -- over the groups large enough to judge.

A group is judged only when it is large enough for the figure (``min_group_size``
predictions for the selection rate, as many actual positives for the TPR, negatives for the
FPR, labeled rows for accuracy), so a small group can never raise an alert.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from lockgate.outcomes.quality import wilson, z_value
from lockgate.outcomes.spec import OutcomeSpec
from lockgate.outcomes.state import OutcomeWindow


def newcombe(x1: int, n1: int, x2: int, n2: int, confidence: float) -> list[float] | None:
    """Newcombe's hybrid score interval for p1 - p2 (method 10), from two Wilson intervals."""
    a, b = wilson(x1, n1, confidence), wilson(x2, n2, confidence)
    if a is None or b is None:
        return None
    p1, p2 = x1 / n1, x2 / n2
    d = p1 - p2
    return [d - math.sqrt((p1 - a[0]) ** 2 + (b[1] - p2) ** 2), d + math.sqrt((a[1] - p1) ** 2 + (p2 - b[0]) ** 2)]


def katz(x1: int, n1: int, x2: int, n2: int, confidence: float) -> list[float] | None:
    """Katz log interval for the ratio p1 / p2 (None when either count is 0)."""
    if x1 <= 0 or x2 <= 0 or n1 <= 0 or n2 <= 0:
        return None
    z = z_value(confidence)
    ratio = (x1 / n1) / (x2 / n2)
    se = math.sqrt(1 / x1 - 1 / n1 + 1 / x2 - 1 / n2)
    return [ratio * math.exp(-z * se), ratio * math.exp(z * se)]


def _rate(x: int, n: int, confidence: float, min_n: int) -> dict[str, Any]:
    interval = wilson(int(x), int(n), confidence)
    return {"value": x / n if n else None, "ci": list(interval) if interval else None, "n": int(n), "eligible": n >= min_n}


def _group_counts(state: OutcomeWindow, spec: OutcomeSpec, combo: tuple[int, ...]) -> tuple[list[str], dict[str, np.ndarray]]:
    """Per group of the intersection ``combo``: predictions, favourable, labeled, TP, FN, FP, TN, correct."""
    cells = np.arange(spec.n_cells)
    group = np.zeros(spec.n_cells, dtype=np.int64)
    radix = 1
    names: list[list[str]] = [[]]
    for index in combo:
        segment = spec.segments[index]
        group += spec.cell_codes(cells, index) * radix
        radix *= segment.n_groups
        names = [prev + [g] for g in segment.groups for prev in names]
    labels = [" & ".join(parts) for parts in names]
    f = spec.favourable
    predicted = state["predicted"]
    confusion = state["confusion"]
    k = confusion.shape[1]
    tp = confusion[:, f, f]
    actual_pos = confusion[:, f, :].sum(axis=1)
    predicted_pos = confusion[:, :, f].sum(axis=1)
    labeled = confusion.sum(axis=(1, 2))
    correct = confusion[:, np.arange(k), np.arange(k)].sum(axis=1)
    per_cell = {
        "n": predicted.sum(axis=1), "favourable": predicted[:, f], "labeled": labeled, "tp": tp,
        "fn": actual_pos - tp, "fp": predicted_pos - tp, "tn": labeled - actual_pos - predicted_pos + tp, "correct": correct,
    }
    return labels, {key: np.bincount(group, value, minlength=radix).astype(np.int64) for key, value in per_cell.items()}


def _gap(groups: list[dict[str, Any]], metric: str, numerator: str, denominator: str,
         counts: dict[str, np.ndarray], confidence: float) -> dict[str, Any] | None:
    eligible = [g for g in groups if g[metric]["eligible"] and g[metric]["value"] is not None]
    if len(eligible) < 2:
        return None
    high = max(eligible, key=lambda g: g[metric]["value"])
    low = min(eligible, key=lambda g: g[metric]["value"])
    hi, lo = high["_index"], low["_index"]
    x_hi, n_hi = int(counts[numerator][hi]), int(counts[denominator][hi])
    x_lo, n_lo = int(counts[numerator][lo]), int(counts[denominator][lo])
    return {"value": high[metric]["value"] - low[metric]["value"], "ci": newcombe(x_hi, n_hi, x_lo, n_lo, confidence),
            "groups": [high["group"], low["group"]],
            "ratio": (low[metric]["value"] / high[metric]["value"]) if high[metric]["value"] else None,
            "ratio_ci": katz(x_lo, n_lo, x_hi, n_hi, confidence)}


def segment_fairness(state: OutcomeWindow, spec: OutcomeSpec, combo: tuple[int, ...]) -> dict[str, Any]:
    cfg = spec.config.fairness
    conf, min_n = cfg.confidence, cfg.min_group_size
    labels, counts = _group_counts(state, spec, combo)
    name = " & ".join(spec.segments[i].name for i in combo)
    groups: list[dict[str, Any]] = []
    for index, label in enumerate(labels):
        n = int(counts["n"][index])
        labeled = int(counts["labeled"][index])
        if n == 0 and labeled == 0:
            continue
        pos = int(counts["tp"][index] + counts["fn"][index])
        neg = int(counts["fp"][index] + counts["tn"][index])
        groups.append({
            "group": label, "_index": index, "n": n, "labeled": labeled,
            "selection_rate": _rate(int(counts["favourable"][index]), n, conf, min_n),
            "tpr": _rate(int(counts["tp"][index]), pos, conf, min_n),
            "fpr": _rate(int(counts["fp"][index]), neg, conf, min_n),
            "accuracy": _rate(int(counts["correct"][index]), labeled, conf, min_n),
        })
    configured = cfg.reference.get(name) if len(combo) == 1 else None
    candidates = [g for g in groups if g["selection_rate"]["eligible"]]
    reference = next((g for g in groups if g["group"] == configured), None) if configured else None
    if reference is None and candidates:
        reference = max(candidates, key=lambda g: (g["n"], g["group"]))
    low, high = cfg.dir_bounds
    breaches: list[dict[str, Any]] = []
    for g in groups:
        g["spd"] = g["dir"] = None
        if reference is None or g is reference:
            continue
        ri = reference["_index"]
        x1, n1 = int(counts["favourable"][g["_index"]]), g["n"]
        x2, n2 = int(counts["favourable"][ri]), reference["n"]
        if n1 == 0 or n2 == 0:
            continue
        p1, p2 = x1 / n1, x2 / n2
        judged = g["selection_rate"]["eligible"] and reference["selection_rate"]["eligible"]
        g["spd"] = {"value": p1 - p2, "ci": newcombe(x1, n1, x2, n2, conf), "eligible": judged}
        g["dir"] = {"value": p1 / p2 if p2 else None, "ci": katz(x1, n1, x2, n2, conf), "eligible": judged}
        if not judged:
            continue
        if abs(p1 - p2) > cfg.spd_bound:
            breaches.append({"group": g["group"], "metric": "spd", "value": p1 - p2, "bound": cfg.spd_bound})
        ratio = g["dir"]["value"]
        if ratio is not None and not low <= ratio <= high:
            breaches.append({"group": g["group"], "metric": "dir", "value": ratio, "bounds": [low, high]})
    summary = {
        "demographic_parity_difference": _gap(groups, "selection_rate", "favourable", "n", counts, conf),
        "tpr_gap": _gap(groups, "tpr", "tp", "_pos", {**counts, "_pos": counts["tp"] + counts["fn"]}, conf),
        "fpr_gap": _gap(groups, "fpr", "fp", "_neg", {**counts, "_neg": counts["fp"] + counts["tn"]}, conf),
        "accuracy_gap": _gap(groups, "accuracy", "correct", "labeled", counts, conf),
    }
    dpd = summary["demographic_parity_difference"]
    summary["demographic_parity_ratio"] = (
        {"value": dpd["ratio"], "ci": dpd["ratio_ci"], "groups": dpd["groups"]} if dpd else None)
    # fairlearn's equalized-odds difference: the larger of the two gaps, with that gap's interval
    if summary["tpr_gap"] is not None and summary["fpr_gap"] is not None:
        larger = "tpr_gap" if summary["tpr_gap"]["value"] >= summary["fpr_gap"]["value"] else "fpr_gap"
        chosen = summary[larger]
        summary["equalized_odds_difference"] = {"value": chosen["value"], "ci": chosen["ci"], "from": larger,
                                                "groups": chosen["groups"]}
    else:
        summary["equalized_odds_difference"] = None
    for g in groups:
        g.pop("_index")
    return {
        "segment": name,
        "segments": [spec.segments[i].name for i in combo],
        "reference": reference["group"] if reference is not None else None,
        "groups": groups,
        "summary": summary,
        "breaches": breaches,
    }


def fairness(state: OutcomeWindow, spec: OutcomeSpec) -> list[dict[str, Any]]:
    """Every protected segment and intersection (classification only; [] otherwise)."""
    if not spec.classification or not spec.protected:
        return []
    return [segment_fairness(state, spec, combo) for combo in spec.protected_combinations()]


def largest_gap(report: list[dict[str, Any]]) -> tuple[float, str] | None:
    """The largest parity or equalized-odds gap over judged groups, and where it is."""
    best: tuple[float, str] | None = None
    for segment in report:
        for key in ("demographic_parity_difference", "equalized_odds_difference"):
            entry = segment["summary"].get(key)
            if entry is None or entry.get("value") is None:
                continue
            if best is None or entry["value"] > best[0]:
                best = (float(entry["value"]), f"{segment['segment']}: {key}")
    return best
