"""Schema of the per-model ``governance:`` section of ``config.yaml``.

The lead embeds :class:`GovernanceConfig` as an optional field of the model config, so
every default here must give a working, safe configuration: ``GovernanceConfig()`` profiles
every input, validates nothing, samples 1% of payloads and closes drift windows every
10,000 rows.

Example::

    governance:
      mode: reject
      inputs:
        features:
          feature_names: [age, income, segment]
          features:
            0: {min: 0, max: 130}
            income: {min: 0, allow_nan: true}
            2: {allowed: [0, 1, 2, 3]}
      sampling: {rate: 0.01, max_per_second: 50}
      payload_log: {redact: [income]}
      drift: {window_rows: 10000, thresholds: {psi: 0.2, js: 0.1, features: {age: {psi: 0.3}}}}
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class _Strict(BaseModel):
    """Unknown keys are errors: a typo in a governance rule must not silently disable it."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class FeatureRule(_Strict):
    """Constraints on one feature (one column of the input's last axis)."""

    name: str | None = None
    min: float | None = None
    max: float | None = None
    allow_nan: bool = False
    allow_inf: bool = False
    allowed: list[int] | None = Field(default=None, description="allowed integer codes of a categorical feature")

    @model_validator(mode="after")
    def _check(self) -> "FeatureRule":
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min {self.min} is greater than max {self.max}")
        for bound in (self.min, self.max):
            if bound is not None and math.isnan(bound):
                raise ValueError("min/max must not be NaN")
        if self.allowed is not None and not self.allowed:
            raise ValueError("allowed must list at least one value")
        return self

    @property
    def categorical(self) -> bool:
        return self.allowed is not None


class InputConstraints(_Strict):
    """Constraints of one input tensor, whose last axis holds the features.

    ``features`` is keyed by feature index or by feature name; a name resolves through
    ``feature_names`` or through another rule's ``name``.

    A governed input has one width: ``feature_count``, else the model's declared last
    dimension, else the features the names and rules imply. A request of another width is a
    violation (rule ``feature_count``), so no rule can be skipped by reshaping. ``allow_nan``
    and ``allow_inf`` here are the defaults of every feature without a rule of its own (and of
    a rule that does not set them).
    """

    feature_names: list[str] | None = None
    feature_count: int | None = Field(
        default=None, ge=1, le=65536,
        description="features per row, for a model whose last dimension is free (default: the model's, "
        "else the features the names and rules imply)",
    )
    allow_nan: bool = False
    allow_inf: bool = False
    features: dict[int | str, FeatureRule] = Field(default_factory=dict)
    categorical: list[int | str] = Field(
        default_factory=list,
        description="features profiled as categorical although they declare no allowed set",
    )

    @model_validator(mode="after")
    def _fits_feature_count(self) -> "InputConstraints":
        if self.feature_count is not None:
            implied = len(self.feature_names or [])
            for key in [*self.features, *self.categorical]:
                if isinstance(key, int):
                    implied = max(implied, key + 1)
            if implied > self.feature_count:
                raise ValueError(f"feature_count {self.feature_count} is smaller than the {implied} features "
                                 "the names and rules refer to")
        return self

    def allows(self, rule: FeatureRule | None, which: str) -> bool:
        """``allow_nan``/``allow_inf`` of one feature: its rule's if set there, else this input's."""
        if rule is not None and which in rule.model_fields_set:
            return bool(getattr(rule, which))
        return bool(getattr(self, which))

    def names(self, n_features: int) -> list[str]:
        """Feature names for ``n_features`` columns: declared names, rule names, else ``f<i>``."""
        out = [f"f{i}" for i in range(n_features)]
        if self.feature_names:
            for i, name in enumerate(self.feature_names[:n_features]):
                out[i] = name
        for key, rule in self.features.items():
            if isinstance(key, int) and rule.name and 0 <= key < n_features:
                out[key] = rule.name
        return out

    def _index(self, key: int | str, n_features: int) -> int:
        if isinstance(key, int):
            index = key
        else:
            names = self.names(n_features)
            if key not in names:
                raise ValueError(f"feature {key!r} is not a declared feature name (names: {names})")
            index = names.index(key)
        if not 0 <= index < n_features:
            raise ValueError(f"feature index {index} is outside 0..{n_features - 1}")
        return index

    def resolve(self, n_features: int) -> dict[int, FeatureRule]:
        """Rules by feature index for a tensor with ``n_features`` columns."""
        out: dict[int, FeatureRule] = {}
        for key, rule in self.features.items():
            index = self._index(key, n_features)
            if index in out:
                raise ValueError(f"feature {index} has two rules (keys resolve to the same index)")
            out[index] = rule
        return out

    def categorical_indices(self, n_features: int) -> set[int]:
        found = {i for i, r in self.resolve(n_features).items() if r.categorical}
        found.update(self._index(k, n_features) for k in self.categorical)
        return found

    def min_features(self) -> int:
        """Smallest feature count consistent with the declared indices and names."""
        if self.feature_count is not None:
            return self.feature_count
        n = len(self.feature_names or [])
        for key in [*self.features, *self.categorical]:
            if isinstance(key, int):
                n = max(n, key + 1)
        return n


class SamplingConfig(_Strict):
    """Payload sampling: deterministic by id, capped by a token bucket."""

    rate: float = Field(default=0.01, ge=0.0, le=1.0)
    max_per_second: float = Field(default=100.0, gt=0.0)
    burst: float | None = Field(default=None, gt=0.0, description="bucket size; default max(1, max_per_second)")
    follow_trace: bool = Field(
        default=False,
        description="opt in: hash the trace id (not the request id) when there is one, and follow an "
        "explicit trace sampling decision, so payload samples line up with sampled traces (with tracing "
        "at 100% every request is then a candidate, up to max_per_second)",
    )
    always_sample_violations: bool = True


class PayloadLogConfig(_Strict):
    """Rotating JSON-lines payload log."""

    enabled: bool = True
    dir: Path | None = Field(default=None, description="default: <state_dir>/payloads/<model>/<version>")
    max_bytes: int = Field(default=64 * 1024 * 1024, gt=0)
    max_files: int = Field(default=10, ge=1)
    redact: list[str] = Field(default_factory=list, description="input/output names or feature names to redact")
    queue_size: int = Field(default=1024, ge=1)


class DriftLimit(_Strict):
    psi: float | None = Field(default=None, gt=0)
    js: float | None = Field(default=None, gt=0)


class DriftThresholds(_Strict):
    """DRIFT at or above a threshold, WARN at or above ``warn_fraction`` of it."""

    psi: float = Field(default=0.2, gt=0)
    js: float = Field(default=0.1, gt=0)
    warn_fraction: float = Field(default=0.5, gt=0, le=1)
    chi2_alpha: float = Field(default=1e-3, gt=0, lt=1, description="chi-squared p-value below which a categorical is WARN")
    features: dict[str, DriftLimit] = Field(
        default_factory=dict, description="overrides keyed by '<tensor>/<feature>' or '<feature>'"
    )

    def limits(self, tensor: str, feature: str) -> tuple[float, float]:
        override = self.features.get(f"{tensor}/{feature}") or self.features.get(feature)
        psi = override.psi if override and override.psi is not None else self.psi
        js = override.js if override and override.js is not None else self.js
        return psi, js


class DriftConfig(_Strict):
    """Tumbling windows: a window closes at ``window_rows`` rows or ``window_seconds``, whichever first."""

    enabled: bool = True
    window_rows: int | None = Field(default=10_000, gt=0)
    window_seconds: float | None = Field(default=None, gt=0)
    min_rows: int = Field(default=500, ge=1, description="windows with fewer rows are reported but never alert")
    thresholds: DriftThresholds = Field(default_factory=DriftThresholds)
    kll_k: int = Field(default=200, ge=8, le=65535)
    sketch_buffer_rows: int = Field(default=16_384, ge=16, description="rows buffered for the off-path sketch feeder")
    frequent_lg_max_k: int = Field(default=6, ge=3, le=20)
    persist: bool = Field(default=True, description="write each closed window to <state_dir>/drift/...")
    keep_windows: int = Field(default=100, ge=1)

    @model_validator(mode="after")
    def _some_window(self) -> "DriftConfig":
        if self.window_rows is None and self.window_seconds is None:
            raise ValueError("drift needs window_rows or window_seconds")
        return self


class GovernanceConfig(_Strict):
    """Per-model governance section."""

    enabled: bool = True
    mode: Literal["reject", "flag"] = "reject"
    inputs: dict[str, InputConstraints] = Field(default_factory=dict)
    max_violations: int = Field(default=50, ge=1, le=10_000, description="violations detailed per request")
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    payload_log: PayloadLogConfig = Field(default_factory=PayloadLogConfig)
    drift: DriftConfig = Field(default_factory=DriftConfig)

    @field_validator("inputs")
    @classmethod
    def _names_unique(cls, value: dict[str, InputConstraints]) -> dict[str, InputConstraints]:
        for name, spec in value.items():
            if spec.feature_names and len(set(spec.feature_names)) != len(spec.feature_names):
                raise ValueError(f"input {name!r}: feature_names are not unique")
        return value
