"""Mergeable window state, and its versioned byte format.

A window's state is what every replica can compute alone and the fleet can add up:
exact counts (rows, values, NaN, Inf, out-of-range, bins, classes), sums and M2 combined
with Chan et al.'s pairwise formula (so merging equals one stream up to float rounding),
min/max, and DataSketches KLL/frequent-items sketches that merge by design.

A window also carries its request accounting (``accounting``: requests inspected, answered,
rejected, failed, and those whose outputs had not arrived when it was evaluated -- counts that
add up across replicas) and the digest of the reference profile its bins were cut with
(``profile``), so a report can tell bins that match the profile from bins that do not.

Bytes: an uncompressed ``.npz`` (numpy's own container, no pickle) whose ``__meta__`` entry
is UTF-8 JSON ``{"format": "lockgate.window", "version": 1, ...}``; sketches are stored as
their DataSketches ``serialize()`` bytes. ``accounting`` and ``profile`` are optional keys
(absent in windows written before they existed: read as empty).
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from datasketches import frequent_strings_sketch, kll_floats_sketch

from .sketches import SketchSet

FORMAT = "lockgate.window"
VERSION = 1
MIXED_PROFILES = "mixed"  # the merged windows were binned with different profiles

_COUNTS = ("count", "nan", "inf", "below", "above", "bins")
_ARRAYS = (*_COUNTS, "sum", "m2", "min", "max")


@dataclass(slots=True)
class TensorState:
    """Window state of one tensor (an input, or a model output) with ``F`` features."""

    name: str
    kind: str  # "input" | "output"
    feature_names: list[str]
    edge_offsets: np.ndarray  # (F + 1,): feature j owns bins[edge_offsets[j] + j : edge_offsets[j + 1] + j + 1]
    rows: int
    count: np.ndarray
    nan: np.ndarray
    inf: np.ndarray
    below: np.ndarray
    above: np.ndarray
    sum: np.ndarray
    m2: np.ndarray
    min: np.ndarray
    max: np.ndarray
    bins: np.ndarray
    sketches: SketchSet

    @property
    def n_features(self) -> int:
        return len(self.feature_names)

    def feature_bins(self, j: int) -> np.ndarray:
        lo, hi = int(self.edge_offsets[j]), int(self.edge_offsets[j + 1])
        return self.bins[lo + j : hi + j + 1]

    def mean(self) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.count > 0, self.sum / np.maximum(self.count, 1), np.nan)

    def variance(self) -> np.ndarray:
        """Population variance of the finite values."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.count > 0, self.m2 / np.maximum(self.count, 1), np.nan)

    @classmethod
    def from_kernel(
        cls, name: str, kind: str, feature_names: list[str], edge_offsets: np.ndarray, taken: dict[str, Any], sketches: SketchSet
    ) -> "TensorState":
        return cls(
            name=name,
            kind=kind,
            feature_names=list(feature_names),
            edge_offsets=np.asarray(edge_offsets, dtype=np.int64),
            rows=int(taken["rows"]),
            sketches=sketches,
            **{key: np.asarray(taken[key]) for key in _ARRAYS},
        )

    def merge(self, other: "TensorState") -> "TensorState":
        """Combine two windows of the same tensor (same features and bin edges)."""
        if other.feature_names != self.feature_names or not np.array_equal(other.edge_offsets, self.edge_offsets):
            raise ValueError(f"tensor {self.name!r}: cannot merge states with different features or bins")
        if other.sketches.k != self.sketches.k:
            raise ValueError(f"tensor {self.name!r}: KLL k differs ({self.sketches.k} vs {other.sketches.k})")
        na, nb = self.count.astype(np.float64), other.count.astype(np.float64)
        n = na + nb
        with np.errstate(invalid="ignore", divide="ignore"):
            mean_a = np.where(na > 0, self.sum / np.maximum(na, 1), 0.0)
            mean_b = np.where(nb > 0, other.sum / np.maximum(nb, 1), 0.0)
            delta = mean_b - mean_a
            cross = np.where((na > 0) & (nb > 0), delta * delta * na * nb / np.maximum(n, 1), 0.0)
        sketches = self.sketches.fresh()
        for mine, theirs, out in zip(self.sketches.kll, other.sketches.kll, sketches.kll):
            out.merge(mine)
            out.merge(theirs)
        for j, out in sketches.frequent.items():
            out.merge(self.sketches.frequent[j])
            out.merge(other.sketches.frequent[j])
        if sketches.class_counts is not None:
            sketches.class_counts = self.sketches.class_counts + other.sketches.class_counts  # type: ignore[operator]
        return TensorState(
            name=self.name,
            kind=self.kind,
            feature_names=list(self.feature_names),
            edge_offsets=self.edge_offsets.copy(),
            rows=self.rows + other.rows,
            count=self.count + other.count,
            nan=self.nan + other.nan,
            inf=self.inf + other.inf,
            below=self.below + other.below,
            above=self.above + other.above,
            bins=self.bins + other.bins,
            sum=self.sum + other.sum,
            m2=self.m2 + other.m2 + cross,
            min=np.minimum(self.min, other.min),
            max=np.maximum(self.max, other.max),
            sketches=sketches,
        )


@dataclass(slots=True)
class WindowState:
    """All tensors of one model version over one tumbling window."""

    model: str
    version: str
    start: float
    end: float
    tensors: dict[str, TensorState] = field(default_factory=dict)
    windows: int = 1  # how many windows (or replicas' windows) were merged into this one
    accounting: dict[str, int] = field(default_factory=dict)  # request counts; merged by addition
    profile: str = ""  # digest of the reference profile the bins were cut with ("" = not recorded)

    @property
    def rows(self) -> int:
        inputs = [t.rows for t in self.tensors.values() if t.kind == "input"]
        return max(inputs) if inputs else max((t.rows for t in self.tensors.values()), default=0)

    def merge(self, other: "WindowState") -> "WindowState":
        if (other.model, other.version) != (self.model, self.version):
            raise ValueError(f"cannot merge {other.model}/{other.version} into {self.model}/{self.version}")
        tensors = dict(self.tensors)
        for name, state in other.tensors.items():
            tensors[name] = tensors[name].merge(state) if name in tensors else state
        accounting = dict(self.accounting)
        for key, count in other.accounting.items():
            accounting[key] = accounting.get(key, 0) + count
        return WindowState(
            model=self.model,
            version=self.version,
            start=min(self.start, other.start),
            end=max(self.end, other.end),
            tensors=tensors,
            windows=self.windows + other.windows,
            accounting=accounting,
            profile=self.profile if self.profile == other.profile else MIXED_PROFILES,
        )

    def to_bytes(self) -> bytes:
        arrays: dict[str, np.ndarray] = {}
        tensors_meta = []
        for t_index, (name, t) in enumerate(self.tensors.items()):
            prefix = f"t{t_index}"
            for key in _ARRAYS:
                arrays[f"{prefix}.{key}"] = getattr(t, key)
            arrays[f"{prefix}.edge_offsets"] = t.edge_offsets
            for j, sketch in enumerate(t.sketches.kll):
                arrays[f"{prefix}.kll.{j}"] = np.frombuffer(sketch.serialize(), dtype=np.uint8)
            for j, sketch in t.sketches.frequent.items():
                arrays[f"{prefix}.freq.{j}"] = np.frombuffer(sketch.serialize(), dtype=np.uint8)
            if t.sketches.class_counts is not None:
                arrays[f"{prefix}.classes"] = t.sketches.class_counts
            tensors_meta.append(
                {
                    "name": name,
                    "kind": t.kind,
                    "prefix": prefix,
                    "feature_names": t.feature_names,
                    "rows": t.rows,
                    "k": t.sketches.k,
                    "lg_max_k": t.sketches.lg_max_k,
                    "categorical": sorted(t.sketches.categorical),
                    "classifier": t.sketches.classifier,
                }
            )
        meta = {
            "format": FORMAT,
            "version": VERSION,
            "model": self.model,
            "model_version": self.version,
            "start": self.start,
            "end": self.end,
            "windows": self.windows,
            "tensors": tensors_meta,
            "accounting": self.accounting,
            "profile": self.profile,
        }
        arrays["__meta__"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> "WindowState":
        try:
            archive = np.load(io.BytesIO(data), allow_pickle=False)
            meta = json.loads(bytes(archive["__meta__"]).decode())
        except (ValueError, KeyError, OSError) as exc:
            raise ValueError(f"not a lockgate window state: {exc}") from exc
        if meta.get("format") != FORMAT:
            raise ValueError(f"not a lockgate window state (format {meta.get('format')!r})")
        if meta.get("version") != VERSION:
            raise ValueError(f"unsupported window state version {meta.get('version')!r} (this build reads {VERSION})")
        tensors: dict[str, TensorState] = {}
        for tm in meta["tensors"]:
            p = tm["prefix"]
            n_features = len(tm["feature_names"])
            sketches = SketchSet(
                n_features, k=tm["k"], categorical=tm["categorical"], classifier=tm["classifier"], lg_max_k=tm["lg_max_k"]
            )
            sketches.kll = [kll_floats_sketch.deserialize(bytes(archive[f"{p}.kll.{j}"])) for j in range(n_features)]
            sketches.frequent = {
                j: frequent_strings_sketch.deserialize(bytes(archive[f"{p}.freq.{j}"])) for j in tm["categorical"]
            }
            if tm["classifier"]:
                sketches.class_counts = np.array(archive[f"{p}.classes"])
            tensors[tm["name"]] = TensorState(
                name=tm["name"],
                kind=tm["kind"],
                feature_names=list(tm["feature_names"]),
                edge_offsets=np.array(archive[f"{p}.edge_offsets"]),
                rows=int(tm["rows"]),
                sketches=sketches,
                **{key: np.array(archive[f"{p}.{key}"]) for key in _ARRAYS},
            )
        return cls(
            model=meta["model"],
            version=meta["model_version"],
            start=float(meta["start"]),
            end=float(meta["end"]),
            tensors=tensors,
            windows=int(meta.get("windows", 1)),
            accounting={str(k): int(v) for k, v in (meta.get("accounting") or {}).items()},
            profile=str(meta.get("profile") or ""),
        )


def merge_all(states: list[WindowState]) -> WindowState:
    """Merge several windows (or replicas' snapshots of one window)."""
    if not states:
        raise ValueError("nothing to merge")
    out = states[0]
    for state in states[1:]:
        out = out.merge(state)
    return out
