"""Schema of the per-model ``explain:`` section of ``config.yaml``.

Every field has a default, so ``ExplainConfig()`` serves on-demand explanations with the
method detected from the graph. Example::

    explain:
      method: auto            # auto | kernel | linear | tree
      input: features         # the input whose features are explained (default: the only input)
      output: probabilities   # the output explained (default: the first float output)
      outputs: [0, 2]         # columns of that output (default: all)
      features: [age, income] # reported features; the others are summed into "(other)"
      background_size: 100    # rows of the stored background used
      nsamples: 512           # KernelSHAP coalitions per explained row
      timeout_s: 10
      max_queue: 8
      sample_share: 0.1       # share of sampled payloads explained into the payload log
      sample_max_queue: 2     # of those, queued at once (never taking an on-demand place)
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

METHODS = ("auto", "kernel", "linear", "tree")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ImportanceConfig(_Strict):
    """Tumbling windows of mean |attribution| per feature, fed by the sampled explanations."""

    window_rows: int = Field(default=1000, gt=0, description="explained rows per window")
    window_seconds: float | None = Field(default=300.0, gt=0, description="a window with rows closes after this long")
    keep_windows: int = Field(default=100, ge=1)


class ExplainConfig(_Strict):
    enabled: bool = True
    method: Literal["auto", "kernel", "linear", "tree"] = "auto"
    input: str | None = Field(default=None, description="input tensor explained; default: the model's only input")
    output: str | None = Field(default=None, description="output tensor explained; default: the first float output")
    outputs: list[int] | None = Field(default=None, description="columns of the output explained; default: all")
    features: list[int | str] | None = Field(
        default=None, description="features reported (names or indices); the rest are summed into one '(other)' column"
    )
    feature_names: list[str] | None = Field(default=None, description="default: the governance names, else f<i>")
    link: Literal["auto", "identity", "logit"] = Field(
        default="auto", description="linear method: logit explains the pre-activation of a sigmoid/softmax output"
    )
    background_size: int = Field(default=100, ge=1, le=10_000)
    nsamples: int | Literal["auto"] = Field(default=512, description="KernelSHAP coalitions per row; auto = 2M + 2048")
    l1_reg: str | float | bool = Field(
        default=False, description="KernelSHAP feature selection (shap's l1_reg); off keeps every feature"
    )
    seed: int = Field(default=0, description="KernelSHAP sampling seed: the same request gets the same explanation")
    max_rows: int = Field(default=64, ge=1, description="rows one request may ask to explain")
    max_evaluations: int = Field(
        default=4_000_000, ge=1, description="model rows one explanation may evaluate (rows x nsamples x background)"
    )
    timeout_s: float = Field(default=10.0, gt=0, description="deadline of one explanation (capped by the request's)")
    max_queue: int = Field(default=8, ge=1, description="explanations admitted at once for this version; more: RESOURCE_EXHAUSTED")
    sample_share: float = Field(default=0.0, ge=0.0, le=1.0, description="share of sampled payloads explained")
    sample_max_queue: int = Field(
        default=2, ge=1, description="sampled explanations queued at once (a queue of their own, so background work "
        "never takes an on-demand place); more are logged without attributions and counted"
    )
    importance: ImportanceConfig = Field(default_factory=ImportanceConfig)

    @field_validator("nsamples")
    @classmethod
    def _positive(cls, value: int | str) -> int | str:
        if isinstance(value, int) and value < 2:
            raise ValueError("nsamples must be at least 2")
        return value

    def fingerprint(self) -> str:
        """What the process-side explainer cache is keyed by (with the artifact's digest)."""
        return self.model_dump_json()
