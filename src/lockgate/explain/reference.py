"""What ``lockgate profile build`` stores for explanations: the background sample and the
reference importance, beside the reference profile."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np

from lockgate.errors import LockgateError
from lockgate.explain.background import Background, background_path, sample_rows, save_background
from lockgate.explain.config import ExplainConfig


def write_background(model_repository: str | Path, model: str, version: str, arrays: Mapping[str, np.ndarray], *,
                     rows: int = 100, importance_rows: int = 100, model_file: Path | None = None,
                     explain_section: Mapping[str, Any] | None = None,
                     feature_names: Mapping[str, list[str]] | None = None, seed: int = 0) -> tuple[Path, str]:
    """Sample ``rows`` reference rows per input into ``explain_background.npz``; with the explain
    extra installed, also explain ``importance_rows`` other reference rows with the model's
    configured method for the reference importance. Returns the path and a note for the user."""
    sample = {name: sample_rows(a, rows, seed) for name, a in arrays.items()
              if np.asarray(a).dtype.kind in "biuf" and np.asarray(a).ndim == 2}
    if not sample:
        raise ValueError("no numeric [rows, features] input to sample a background from")
    reference = None
    note = "no reference importance (--importance-rows 0)"
    if importance_rows > 0 and model_file is not None:
        try:
            from lockgate.explain.explainer import build_explainer, reference_importance

            config = ExplainConfig.model_validate(dict(explain_section or {}))
            explainer = build_explainer(model_file, config, Background(sample, "sample"),
                                        (feature_names or {}).get(next(iter(sample))))
            picked = sample_rows(arrays[explainer.input], importance_rows, seed + 1)
            reference = reference_importance(explainer, picked)
            note = f"reference importance by {reference['method']} over {reference['rows']} rows"
        except (ImportError, LockgateError, ValueError) as exc:
            note = f"no reference importance: {getattr(exc, 'message', exc)}"
    path = save_background(background_path(model_repository, model, version), sample, reference_importance=reference,
                           meta={"model": model, "model_version": str(version), "rows": rows, "seed": seed})
    return path, note
