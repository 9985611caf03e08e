"""Schema of a model's ``outcomes:`` section in ``config.yaml``.

Only a model with this section is recorded in the prediction ledger; everything but ``task``
has a default. Unknown keys are errors: a typo in a fairness bound must not silently
disable it.

Example::

    outcomes:
      task: multiclass                      # binary | multiclass | classification | regression
      prediction: {output: probabilities}   # kind: probabilities (default) | label | value
      class_names: [approve, review, decline]
      positive_class: approve               # binary metrics and one-vs-rest views
      favourable_outcome: approve           # what a fair selection rate counts
      segments:
        age_band: {input: features, feature: age, bins: [30, 45, 65]}
        region: {input: features, feature: region, categories: [0, 1, 2, 3, 4]}
        gender: {parameter: gender, categories: [f, m, x]}   # never given to the model
      protected: [gender, age_band]
      fairness: {max_depth: 2, min_group_size: 30, spd_bound: 0.1, dir_bounds: [0.8, 1.25]}
      retention: {max_age_s: 1209600, max_rows: 10000000}
      windows: {seconds: 300}
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PredictionConfig(_Strict):
    """Which output holds the prediction, and how to read it."""

    output: str | None = Field(None, description="output tensor name [the model's first output]")
    kind: Literal["probabilities", "label", "value"] | None = Field(
        None,
        description="probabilities: [N, K] class probabilities (binary also [N] or [N, 1] = P(positive)); "
        "label: a class index per row; value: a regression value per row [probabilities, or value for regression]",
    )
    threshold: float = Field(0.5, gt=0.0, lt=1.0, description="binary: P(positive) at or above this predicts the positive class")


class SegmentConfig(_Strict):
    """A segment: from an input feature (binned or categorical) or from a request parameter.

    A parameter segment reads ``parameters[<name>]`` of the inference request, which the
    model never sees, so a protected attribute need not be a model input. ``per_row: true``
    reads one comma-separated value per row of the request.
    """

    input: str | None = None
    feature: int | str | None = Field(None, description="column of the input's last axis, by index or by name")
    parameter: str | None = None
    per_row: bool = False
    bins: list[float] | None = Field(None, description="ascending cut points: groups <b0, [b0, b1), ..., >=bn")
    categories: list[str | int | float] | None = None
    labels: list[str] | None = Field(None, description="display names of the groups (bins + 1, or one per category)")

    @model_validator(mode="after")
    def _check(self) -> "SegmentConfig":
        from_input = self.input is not None or self.feature is not None
        if from_input == (self.parameter is not None):
            raise ValueError("a segment reads either an input feature (input + feature) or a request parameter")
        if from_input and (self.input is None or self.feature is None):
            raise ValueError("an input segment needs both input and feature")
        if (self.bins is None) == (self.categories is None):
            raise ValueError("a segment has either bins or categories")
        if self.bins is not None:
            if not self.bins or any(not math.isfinite(b) for b in self.bins):
                raise ValueError("bins must be finite numbers")
            if any(b <= a for a, b in zip(self.bins, self.bins[1:])):
                raise ValueError(f"bins must be strictly ascending, got {self.bins}")
        if self.categories is not None:
            if not self.categories:
                raise ValueError("categories must not be empty")
            if len({str(c) for c in self.categories}) != len(self.categories):
                raise ValueError("categories must be distinct")
        expected = len(self.bins) + 1 if self.bins is not None else len(self.categories or [])
        if self.labels is not None and len(self.labels) != expected:
            raise ValueError(f"labels must name {expected} groups, got {len(self.labels)}")
        if self.per_row and self.parameter is None:
            raise ValueError("per_row applies to parameter segments only")
        return self


class FairnessConfig(_Strict):
    """Bounds of the fairness figures; a group smaller than ``min_group_size`` never alerts."""

    max_depth: int = Field(1, ge=1, le=3, description="intersections of up to this many protected segments")
    min_group_size: int = Field(30, ge=1)
    spd_bound: float = Field(0.1, gt=0.0, lt=1.0, description="|statistical parity difference| above this breaches")
    dir_bounds: tuple[float, float] = Field((0.8, 1.25), description="disparate impact ratio outside [low, high] breaches")
    confidence: float = Field(0.95, gt=0.5, lt=1.0, description="confidence level of the Wilson / Newcombe intervals")
    reference: dict[str, str] = Field(
        default_factory=dict, description="segment -> reference (privileged) group; default: the largest group"
    )

    @field_validator("dir_bounds")
    @classmethod
    def _bounds(cls, value: tuple[float, float]) -> tuple[float, float]:
        low, high = value
        if not 0.0 < low < 1.0 < high:
            raise ValueError(f"dir_bounds must satisfy 0 < low < 1 < high, got {list(value)}")
        return value


class RetentionConfig(_Strict):
    """How long predictions wait for their label in the ledger."""

    max_age_s: float = Field(14 * 86400.0, gt=0, description="predictions older than this are evicted (14 days)")
    max_rows: int = Field(10_000_000, ge=1, description="at most this many predictions of the model are kept")
    remember_expired_s: float | None = Field(
        None, gt=0, description="evicted keys are remembered this long, so a late label counts as expired [max_age_s]")
    history_s: float = Field(90 * 86400.0, gt=0, description="window states (quality/fairness history) are kept this long")
    check_interval_s: float = Field(60.0, gt=0, description="how often retention runs")


class WindowsConfig(_Strict):
    """Tumbling windows by prediction time, aligned to the wall clock (every replica agrees)."""

    seconds: float = Field(300.0, ge=1.0)
    evaluate: int = Field(12, ge=1, description="the newest this many windows make the exported gauges")


class QualityConfig(_Strict):
    score_bins: int = Field(200, ge=10, le=10_000, description="score histogram bins (AUC)")
    calibration_bins: int = Field(10, ge=2, le=100, description="reliability diagram / ECE bins")

    @field_validator("calibration_bins")
    @classmethod
    def _even(cls, value: int) -> int:
        if value % 2:
            raise ValueError("calibration_bins must be even (binary top-label bins fold at 0.5)")
        return value


class LedgerConfig(_Strict):
    """The bounded queue between the request path and the ledger writer."""

    queue_rows: int = Field(65_536, ge=1, description="rows waiting to be written; beyond this, dropped and counted")
    queue_bytes: int = Field(64 * 1024 * 1024, ge=1024,
                             description="bytes of outputs and segment inputs the queue may hold on to; beyond, dropped and counted")
    batch_rows: int = Field(4096, ge=1, description="rows per write transaction")
    flush_interval_s: float = Field(
        0.5, gt=0, le=10, description="a partial batch is written after this long (feedback for a prediction "
        "still queued flushes it first; each write transaction has a fixed cost, so fewer, larger ones are cheaper)")


class OutcomesConfig(_Strict):
    enabled: bool = True
    task: Literal["binary", "multiclass", "classification", "regression"]
    prediction: PredictionConfig = Field(default_factory=PredictionConfig)
    class_names: list[str] | None = None
    positive_class: str | int | None = None
    favourable_outcome: str | int | None = Field(None, description="class whose prediction is favourable [positive class]")
    segments: dict[str, SegmentConfig] = Field(default_factory=dict)
    protected: list[str] = Field(default_factory=list)
    max_cells: int = Field(4096, ge=1, le=65_536, description="bound on the joint segment groups kept per window")
    fairness: FairnessConfig = Field(default_factory=FairnessConfig)
    quality: QualityConfig = Field(default_factory=QualityConfig)
    retention: RetentionConfig = Field(default_factory=RetentionConfig)
    windows: WindowsConfig = Field(default_factory=WindowsConfig)
    ledger: LedgerConfig = Field(default_factory=LedgerConfig)

    @model_validator(mode="after")
    def _check(self) -> "OutcomesConfig":
        unknown = [name for name in self.protected if name not in self.segments]
        if unknown:
            raise ValueError(f"protected names undeclared segment(s) {unknown}; declared: {sorted(self.segments)}")
        if len(set(self.protected)) != len(self.protected):
            raise ValueError("protected segments must be distinct")
        if self.class_names is not None:
            if len(set(self.class_names)) != len(self.class_names):
                raise ValueError("class_names must be distinct")
            if self.task == "binary" and len(self.class_names) != 2:
                raise ValueError(f"a binary task has 2 class names, got {len(self.class_names)}")
            if self.task == "multiclass" and len(self.class_names) < 3:
                raise ValueError("a multiclass task has at least 3 class names")
        if self.task == "regression":
            if self.prediction.kind not in (None, "value"):
                raise ValueError("a regression task reads a value output (prediction.kind: value)")
            if self.class_names or self.positive_class is not None or self.favourable_outcome is not None:
                raise ValueError("class_names, positive_class and favourable_outcome apply to classification only")
        elif self.prediction.kind == "value":
            raise ValueError("a classification task reads probabilities or a label, not a value")
        return self
