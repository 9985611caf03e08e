"""The background sample of an explanation, kept beside the reference profile.

``REPO/<model>/<version>/explain_background.npz`` (written by ``lockgate profile build``)
holds a seeded sample of the reference rows per input and, when the explain extra was
installed at build time, the reference importance (mean |attribution| per feature over
explained reference rows), the baseline that live importance windows are compared with.
An ``.npz`` has no pickle: ``np.load(allow_pickle=False)`` reads it safely.

Without the file, the reference profile's feature means are a one-row background: exact
for linear models, and the classic "baseline" game for KernelSHAP and TreeSHAP.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

BACKGROUND_FILE = "explain_background.npz"
FORMAT = "lockgate.explain_background"
VERSION = 1


@dataclass(slots=True)
class Background:
    arrays: dict[str, np.ndarray]  # by input name: (rows, features)
    source: str  # "sample" | "profile means"
    reference_importance: dict[str, Any] | None = None  # {"input", "features", "outputs", "mean_abs": [F][K]}
    meta: dict[str, Any] = field(default_factory=dict)

    def rows(self, input_name: str, limit: int | None = None) -> np.ndarray:
        array = self.arrays[input_name]
        return array if limit is None else array[:limit]


def background_path(model_repository: str | Path, model: str, version: str) -> Path:
    return Path(model_repository) / model / str(version) / BACKGROUND_FILE


def sample_rows(array: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """``n`` rows drawn without replacement (all when there are fewer), in a seeded order."""
    rows = np.asarray(array)
    if rows.ndim == 1:
        rows = rows.reshape(-1, 1)
    rows = rows.reshape(-1, rows.shape[-1])
    finite = rows[np.isfinite(rows.astype(np.float64)).all(axis=1)]
    if len(finite) <= n:
        return finite.copy()
    picked = np.random.default_rng(seed).choice(len(finite), n, replace=False)
    return finite[np.sort(picked)].copy()


def save_background(path: str | Path, arrays: Mapping[str, np.ndarray], *, reference_importance: dict | None = None,
                    meta: Mapping[str, Any] | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    info = {"format": FORMAT, "version": VERSION, "inputs": list(arrays), **(meta or {})}
    if reference_importance is not None:
        info["reference_importance"] = reference_importance
    payload = {f"input.{i}": np.ascontiguousarray(a) for i, a in enumerate(arrays.values())}
    payload["__meta__"] = np.frombuffer(json.dumps(info).encode(), dtype=np.uint8)
    buffer = io.BytesIO()
    np.savez(buffer, **payload)
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(buffer.getvalue())
    tmp.replace(path)
    return path


def load_background(path: str | Path) -> Background:
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as archive:
            info = json.loads(bytes(archive["__meta__"]).decode())
            if info.get("format") != FORMAT:
                raise ValueError("not a lockgate explanation background")
            if info.get("version") != VERSION:
                raise ValueError(f"unsupported background format version {info.get('version')!r}")
            arrays = {name: np.array(archive[f"input.{i}"]) for i, name in enumerate(info["inputs"])}
    except (OSError, KeyError, ValueError) as exc:
        raise ValueError(f"{path}: {exc}") from exc
    return Background(arrays, "sample", info.get("reference_importance"), info)


def from_profile(profile: Any) -> Background:
    """One row of reference feature means per input (NaN means, from empty columns, become 0)."""
    arrays = {}
    for name, tensor in profile.tensors.items():
        if tensor.kind != "input":
            continue
        means = np.array([f.mean for f in tensor.features], dtype=np.float64)
        arrays[name] = np.nan_to_num(means, nan=0.0).reshape(1, -1)
    return Background(arrays, "profile means")


def file_digest(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()
