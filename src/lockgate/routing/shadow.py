"""Agreement between a primary version and its shadow, accumulated per version pair.

Recorded off the request path, when the shadow's answer arrives (the caller already has the
primary's). The numbers feed operators (`traffic show`) and the canary's disagreement
guardrail.

Per output tensor:
* float outputs with a class axis (ndim >= 2, last dim > 1): top class = argmax of the last
  axis, compared per row; integer, bool and string outputs: compared element by element
  (they are labels);
* numeric outputs: max and mean absolute difference (NaN on one side only counts as inf).

An output missing on one side, or with a different shape, counts all its rows as
disagreeing and is tallied in `mismatched`, so a broken shadow cannot look agreeable.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np


@dataclass(slots=True)
class _OutputStats:
    compared: int = 0
    agreed: int = 0
    elements: int = 0
    abs_sum: float = 0.0
    abs_max: float = 0.0
    mismatched: int = 0

    def add_diff(self, diff: np.ndarray) -> None:
        if diff.size == 0:
            return
        self.elements += int(diff.size)
        total = float(diff.sum())
        self.abs_sum += total
        self.abs_max = max(self.abs_max, float(diff.max()))


@dataclass(frozen=True, slots=True)
class AgreementSnapshot:
    """Numbers for one (primary, shadow) pair; rates are None until something was compared."""

    model: str
    primary: str
    shadow: str
    count: int
    compared_rows: int
    agreed_rows: int
    mismatched: int
    max_abs_diff: float | None
    mean_abs_diff: float | None
    per_output: Mapping[str, Mapping[str, float | int | None]] = field(default_factory=dict)

    @property
    def agreement_rate(self) -> float | None:
        return self.agreed_rows / self.compared_rows if self.compared_rows else None

    @property
    def disagreement_rate(self) -> float | None:
        rate = self.agreement_rate
        return None if rate is None else 1.0 - rate

    def to_dict(self) -> dict[str, object]:
        return {
            "model": self.model,
            "primary": self.primary,
            "shadow": self.shadow,
            "count": self.count,
            "compared_rows": self.compared_rows,
            "agreed_rows": self.agreed_rows,
            "agreement_rate": self.agreement_rate,
            "mismatched": self.mismatched,
            "max_abs_diff": self.max_abs_diff,
            "mean_abs_diff": self.mean_abs_diff,
            "per_output": {k: dict(v) for k, v in self.per_output.items()},
        }


def _rows(array: np.ndarray) -> int:
    return int(array.shape[0]) if array.ndim >= 1 else 1


def _abs_diff(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a64 = a.astype(np.float64, copy=False)
    b64 = b.astype(np.float64, copy=False)
    with np.errstate(invalid="ignore", over="ignore"):
        diff = np.where(a64 == b64, 0.0, np.abs(a64 - b64))  # inf == inf agrees (not inf - inf = NaN)
    nan_a, nan_b = np.isnan(a64), np.isnan(b64)
    if nan_a.any() or nan_b.any():
        diff = np.where(nan_a & nan_b, 0.0, np.where(nan_a | nan_b, np.inf, diff))
    return diff


class ShadowAgreement:
    """Accumulates agreement for one (model, primary version, shadow version) pair. Thread-safe."""

    def __init__(self, model: str, primary: str, shadow: str) -> None:
        self.model = model
        self.primary = primary
        self.shadow = shadow
        self._lock = threading.Lock()
        self._count = 0
        self._outputs: dict[str, _OutputStats] = {}

    def record(self, primary_outputs: Mapping[str, np.ndarray], shadow_outputs: Mapping[str, np.ndarray]) -> None:
        """Compare one request's outputs (name → array) from the primary and the shadow."""
        with self._lock:
            self._count += 1
            for name in primary_outputs.keys() | shadow_outputs.keys():
                stats = self._outputs.get(name)
                if stats is None:
                    stats = self._outputs[name] = _OutputStats()
                self._compare(stats, primary_outputs.get(name), shadow_outputs.get(name))

    @staticmethod
    def _compare(stats: _OutputStats, primary: np.ndarray | None, shadow: np.ndarray | None) -> None:
        if primary is None or shadow is None:
            present = primary if primary is not None else shadow
            stats.mismatched += 1
            stats.compared += _rows(np.asarray(present))
            return
        a, b = np.asarray(primary), np.asarray(shadow)
        if a.shape != b.shape:
            stats.mismatched += 1
            stats.compared += max(_rows(a), _rows(b))
            return
        kind = a.dtype.kind
        numeric = kind in "biuf" and b.dtype.kind in "biuf"
        if kind == "f" and a.ndim >= 2 and a.shape[-1] > 1:
            top_a = np.argmax(a, axis=-1)
            top_b = np.argmax(b, axis=-1)
            stats.compared += int(top_a.size)
            stats.agreed += int(np.count_nonzero(top_a == top_b))
        elif kind in "biuOSU":
            equal = a == b
            stats.compared += int(np.size(equal))
            stats.agreed += int(np.count_nonzero(equal))
        if numeric:
            stats.add_diff(_abs_diff(a, b))

    def snapshot(self) -> AgreementSnapshot:
        with self._lock:
            compared = sum(s.compared for s in self._outputs.values())
            agreed = sum(s.agreed for s in self._outputs.values())
            mismatched = sum(s.mismatched for s in self._outputs.values())
            elements = sum(s.elements for s in self._outputs.values())
            abs_sum = sum(s.abs_sum for s in self._outputs.values())
            max_abs = max((s.abs_max for s in self._outputs.values() if s.elements), default=None)
            per_output = {
                name: {
                    "compared_rows": s.compared,
                    "agreed_rows": s.agreed,
                    "mismatched": s.mismatched,
                    "max_abs_diff": s.abs_max if s.elements else None,
                    "mean_abs_diff": s.abs_sum / s.elements if s.elements else None,
                }
                for name, s in sorted(self._outputs.items())
            }
            mean = abs_sum / elements if elements else None
            if mean is not None and math.isnan(mean):
                mean = math.inf
            return AgreementSnapshot(
                model=self.model,
                primary=self.primary,
                shadow=self.shadow,
                count=self._count,
                compared_rows=compared,
                agreed_rows=agreed,
                mismatched=mismatched,
                max_abs_diff=max_abs,
                mean_abs_diff=mean,
                per_output=per_output,
            )

    def reset(self) -> None:
        with self._lock:
            self._count = 0
            self._outputs.clear()


class AgreementBook:
    """All `ShadowAgreement` accumulators, keyed by (model, primary, shadow)."""

    def __init__(self) -> None:
        self._pairs: dict[tuple[str, str, str], ShadowAgreement] = {}
        self._lock = threading.Lock()

    def pair(self, model: str, primary: str, shadow: str) -> ShadowAgreement:
        """The accumulator for a pair, created on first use."""
        key = (model, primary, shadow)
        found = self._pairs.get(key)
        if found is not None:
            return found
        with self._lock:
            return self._pairs.setdefault(key, ShadowAgreement(model, primary, shadow))

    def record(
        self,
        model: str,
        primary: str,
        shadow: str,
        primary_outputs: Mapping[str, np.ndarray],
        shadow_outputs: Mapping[str, np.ndarray],
    ) -> None:
        self.pair(model, primary, shadow).record(primary_outputs, shadow_outputs)

    def snapshots(self, model: str | None = None) -> list[AgreementSnapshot]:
        with self._lock:
            pairs = sorted(self._pairs.items())
        return [acc.snapshot() for (m, _, _), acc in pairs if model is None or m == model]

    def comparison(self, model: str, a: str, b: str) -> tuple[int, int]:
        """(rows compared, rows agreeing) between versions `a` and `b`, whichever was the primary."""
        compared = agreed = 0
        for key in ((model, a, b), (model, b, a)):
            acc = self._pairs.get(key)
            if acc is not None:
                snap = acc.snapshot()
                compared += snap.compared_rows
                agreed += snap.agreed_rows
        return compared, agreed

    def disagreement(self, model: str, a: str, b: str) -> float | None:
        """Top-class disagreement between versions `a` and `b`, whichever was the primary."""
        compared, agreed = self.comparison(model, a, b)
        return None if compared == 0 else 1.0 - agreed / compared

    def forget(self, model: str, version: str) -> None:
        """Drop every pair of `model` that involves `version` (its shadow was removed)."""
        with self._lock:
            for key in [k for k in self._pairs if k[0] == model and version in (k[1], k[2])]:
                del self._pairs[key]

    def reset(self, model: str, a: str, b: str) -> None:
        """Start a fresh window for the pair (both directions), e.g. at each canary step."""
        for key in ((model, a, b), (model, b, a)):
            acc = self._pairs.get(key)
            if acc is not None:
                acc.reset()
