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
      drift: {window_rows: 10000, alpha: 0.01, thresholds: {psi: 0.2, features: {age: {psi: 0.3}}}}
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .profile import DEFAULT_KLL_K


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
    """Per-feature overrides of the materiality thresholds (``None`` keeps the default)."""

    psi: float | None = Field(default=None, gt=0)
    js: float | None = Field(default=None, gt=0)
    wasserstein: float | None = Field(default=None, gt=0)
    missing_rate: float | None = Field(default=None, gt=0, le=1)
    new_values: float | None = Field(default=None, gt=0, le=1)


class Limits(NamedTuple):
    """The DRIFT thresholds that apply to one feature (WARN is ``warn_fraction`` of each)."""

    psi: float
    js: float | None
    wasserstein: float
    missing_rate: float
    new_values: float


class DriftThresholds(_Strict):
    """When a difference is *material*: DRIFT at or above a threshold, WARN at or above
    ``warn_fraction`` of it. A rule only decides when its test is also *significant* (see
    ``DriftConfig.alpha``); lockgate.governance.decision documents every rule.

    * ``psi``: PSI minus its no-change expectation, over the bins of the values the
      reference knows (every feature, and a classifier's classes);
    * ``wasserstein``: W1 between the CDFs in reference standard deviations (numeric
      features; a 0.5 sigma mean shift is 0.5). Any-of with ``psi``: for a pure mean shift
      W1 decides from 0.25 sigma, PSI 0.2 only from ~0.45 sigma; PSI decides shape changes
      that move little mass far;
    * ``js``: optional Jensen-Shannon distance threshold, any-of with the others (off by
      default: JS 0.1 is reached near PSI 0.055, so it would override PSI's threshold);
    * ``missing_rate``: absolute change of the NaN share, or of the Inf share;
    * ``new_values``: share of values the reference never had (unseen categorical codes;
      for discrete features, any value off the known ones).
    """

    psi: float = Field(default=0.2, gt=0)
    js: float | None = Field(default=None, gt=0)
    wasserstein: float = Field(default=0.25, gt=0)
    missing_rate: float = Field(default=0.05, gt=0, le=1)
    new_values: float = Field(default=0.01, gt=0, le=1)
    warn_fraction: float = Field(default=0.5, gt=0, le=1)
    features: dict[str, DriftLimit] = Field(
        default_factory=dict, description="overrides keyed by '<tensor>/<feature>' or '<feature>'"
    )

    @model_validator(mode="before")
    @classmethod
    def _moved_chi2_alpha(cls, value: Any) -> Any:
        if isinstance(value, dict) and "chi2_alpha" in value:
            raise ValueError(
                "thresholds.chi2_alpha is gone: every test (chi-squared included) now shares the family-wise "
                "false-alarm rate drift.alpha (default 0.01, Holm-corrected across features)"
            )
        return value

    def limits(self, tensor: str, feature: str) -> Limits:
        override = self.features.get(f"{tensor}/{feature}") or self.features.get(feature) or DriftLimit()
        pick = lambda name: getattr(override, name) if getattr(override, name) is not None else getattr(self, name)  # noqa: E731
        return Limits(pick("psi"), pick("js"), pick("wasserstein"), pick("missing_rate"), pick("new_values"))


class DriftConfig(_Strict):
    """Tumbling windows: a window closes at ``window_rows`` rows or ``window_seconds``, whichever first.

    A window's decision controls false alarms: every feature's tests (bin counts, NaN and Inf
    shares, new values) are corrected together (``correction``), so a window of unchanged
    data raises any WARN or DRIFT with probability at most ``alpha``.
    """

    enabled: bool = True
    window_rows: int | None = Field(default=10_000, gt=0)
    window_seconds: float | None = Field(default=None, gt=0)
    min_rows: int = Field(default=100, ge=1, description="windows with fewer rows are INCONCLUSIVE: reported, never alerted")
    alpha: float = Field(default=0.01, gt=0, lt=1, description="family-wise false-alarm rate per window")
    correction: Literal["holm", "bonferroni", "none"] = Field(default="holm", description="multiple-testing correction across a window's tests")
    thresholds: DriftThresholds = Field(default_factory=DriftThresholds)
    output_grace_s: float = Field(
        default=10.0, ge=0,
        description="a closed window waits this long for the outputs of requests it inspected before it is evaluated",
    )
    kll_k: int = Field(default=DEFAULT_KLL_K, ge=8, le=65535)
    sketch_buffer_rows: int = Field(default=16_384, ge=16, description="rows buffered for the off-path sketch feeder")
    frequent_lg_max_k: int = Field(default=8, ge=3, le=20, description="frequent-items map size 2^k (names up to 0.75 * 2^k distinct codes exactly)")
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
