"""Global importance: mean |attribution| per feature, per window, per version, and its shift.

Fed by the sampled explanations (an unbiased sample of live traffic; on-demand ones are
chosen by callers and left out). A window keeps the *sum* of |attribution| per feature and
output and its row count, so windows (and replicas' windows) merge exactly by addition,
like the drift windows. Closed windows are written to
``<state_dir>/explain/<model>/<version>/importance-<n>.json``.

The shift between two importance vectors is the total variation distance between their
normalised shares (0: the same ranking of influence, 1: disjoint), with the per-feature
share change beside it. Baselines: the reference importance stored with the background
(``lockgate profile build``), and the other versions of the model (canary vs stable).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lockgate.explain.config import ImportanceConfig

log = logging.getLogger("lockgate.explain.importance")


@dataclass(slots=True)
class ImportanceWindow:
    model: str
    version: str
    index: int
    start: float
    end: float
    rows: int
    method: str
    features: list[str]
    outputs: list[str]
    sum_abs: np.ndarray  # (features, outputs)

    def mean_abs(self) -> np.ndarray:
        return self.sum_abs / max(self.rows, 1)

    def per_feature(self) -> dict[str, float]:
        """Mean |attribution| per feature, summed over the explained outputs."""
        return dict(zip(self.features, self.mean_abs().sum(axis=1).tolist()))

    def merge(self, other: "ImportanceWindow") -> "ImportanceWindow":
        if other.features != self.features or other.outputs != self.outputs:
            raise ValueError("importance windows over different features or outputs do not merge")
        return ImportanceWindow(self.model, self.version, max(self.index, other.index), min(self.start, other.start),
                                max(self.end, other.end), self.rows + other.rows, self.method, list(self.features),
                                list(self.outputs), self.sum_abs + other.sum_abs)

    def to_dict(self) -> dict[str, Any]:
        return {"format": "lockgate.importance", "version": 1, "model": self.model, "model_version": self.version,
                "index": self.index, "start": self.start, "end": self.end, "rows": self.rows, "method": self.method,
                "features": self.features, "outputs": self.outputs, "sum_abs": self.sum_abs.tolist(),
                "mean_abs": self.mean_abs().tolist()}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "ImportanceWindow":
        if raw.get("format") != "lockgate.importance":
            raise ValueError("not a lockgate importance window")
        return cls(raw["model"], raw["model_version"], int(raw["index"]), float(raw["start"]), float(raw["end"]),
                   int(raw["rows"]), raw["method"], list(raw["features"]), list(raw["outputs"]),
                   np.asarray(raw["sum_abs"], dtype=np.float64))


def reference_per_feature(reference: dict[str, Any] | None) -> dict[str, float] | None:
    """The stored reference importance as {feature: mean |attribution| summed over outputs}."""
    if not reference:
        return None
    mean_abs = np.asarray(reference["mean_abs"], dtype=np.float64)
    return dict(zip(reference["features"], mean_abs.reshape(len(reference["features"]), -1).sum(axis=1).tolist()))


def importance_shift(live: dict[str, float], baseline: dict[str, float] | None) -> dict[str, Any] | None:
    """Total variation distance of the normalised importances over the shared features, and the
    per-feature share change; None when there is nothing to compare (inconclusive, not zero)."""
    if not baseline:
        return None
    shared = [f for f in live if f in baseline]
    if not shared:
        return None
    a = np.array([live[f] for f in shared], dtype=np.float64)
    b = np.array([baseline[f] for f in shared], dtype=np.float64)
    if a.sum() <= 0 or b.sum() <= 0:
        return None
    p, q = a / a.sum(), b / b.sum()
    return {"shift": float(0.5 * np.abs(p - q).sum()),
            "features": {f: {"share": float(p[i]), "baseline_share": float(q[i]), "delta": float(p[i] - q[i])}
                         for i, f in enumerate(shared)}}


def window_dir(state_dir: str | Path, model: str, version: str) -> Path:
    return Path(state_dir) / "explain" / model / str(version)


def load_windows(state_dir: str | Path, model: str, version: str, last: int | None = 1) -> list[ImportanceWindow]:
    paths = sorted(window_dir(state_dir, model, version).glob("importance-*.json"))
    if last is not None:
        paths = paths[-last:]
    return [ImportanceWindow.from_dict(json.loads(p.read_text())) for p in paths]


class ImportanceTracker:
    """The open window of one version, closed by rows or time; closed ones persisted."""

    def __init__(self, model: str, version: str, config: ImportanceConfig, state_dir: str | Path | None,
                 reference: dict[str, Any] | None = None) -> None:
        self.model = model
        self.version = version
        self.config = config
        self.state_dir = Path(state_dir) if state_dir is not None else None
        self.reference = reference_per_feature(reference)
        self.last: ImportanceWindow | None = None
        self.windows_closed = 0
        self.persist_errors = 0
        self._lock = threading.Lock()
        self._open: ImportanceWindow | None = None
        self._next = self._first_free_index()

    def _first_free_index(self) -> int:
        if self.state_dir is None:
            return 0
        found = [int(p.stem.split("-", 1)[1]) for p in window_dir(self.state_dir, self.model, self.version).glob("importance-*.json")
                 if p.stem.split("-", 1)[1].isdigit()]
        return max(found) + 1 if found else 0

    def add(self, attributions: np.ndarray, method: str, features: list[str], outputs: list[str]) -> None:
        now = time.time()
        rows = int(attributions.shape[0])
        sums = np.abs(np.asarray(attributions, dtype=np.float64)).sum(axis=0)
        with self._lock:
            window = self._open
            if window is not None and (window.features != features or window.outputs != outputs):
                self._close_locked(now)  # the explained layout changed (config reload): new window
                window = None
            if window is None:
                window = self._open = ImportanceWindow(self.model, self.version, self._next, now, now, 0, method,
                                                       list(features), list(outputs), np.zeros_like(sums))
                self._next += 1
            window.rows += rows
            window.sum_abs = window.sum_abs + sums
            window.end = now
        self.maybe_close(now)

    def maybe_close(self, now: float | None = None) -> ImportanceWindow | None:
        now = time.time() if now is None else now
        with self._lock:
            window = self._open
            if window is None:
                return None
            due = window.rows >= self.config.window_rows or (
                self.config.window_seconds is not None and now - window.start >= self.config.window_seconds)
            return self._close_locked(now) if due else None

    def close_window(self) -> ImportanceWindow | None:
        with self._lock:
            return self._close_locked(time.time()) if self._open is not None and self._open.rows else None

    def _close_locked(self, now: float) -> ImportanceWindow | None:
        window, self._open = self._open, None
        if window is None:
            return None
        window.end = now
        self.last = window
        self.windows_closed += 1
        if self.state_dir is not None:
            folder = window_dir(self.state_dir, self.model, self.version)
            try:
                folder.mkdir(parents=True, exist_ok=True)
                path = folder / f"importance-{window.index:08d}.json"
                tmp = path.with_suffix(".tmp")
                tmp.write_text(json.dumps(window.to_dict()))
                tmp.replace(path)
                for old in sorted(folder.glob("importance-*.json"))[: -self.config.keep_windows]:
                    old.unlink(missing_ok=True)
            except OSError:
                self.persist_errors += 1
                log.exception("cannot persist importance window %d of %s/%s", window.index, self.model, self.version)
        return window
