"""The governance step of the request pipeline: one `GovernanceEngine` per loaded version.

Engines are built while a version loads (before it can take a request), so every request
of every version is inspected; they close after the version drains. Rejections become
INVALID_ARGUMENT with a ``google.rpc.BadRequest`` in the status details; the rejected
request is always sampled into the payload log first. Drift alerts go to the subscribers
(the control plane: audit trail and canary analysis) from the engines' background threads.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import numpy as np

from lockgate.errors import InvalidArgument
from lockgate.governance.config import GovernanceConfig
from lockgate.governance.drift import DriftEvent
from lockgate.governance.engine import GovernanceEngine, Inspection
from lockgate.governance.profile import ReferenceProfile

if TYPE_CHECKING:
    from lockgate.pipeline import RequestContext
    from lockgate.routing.router import RouteDecision
    from lockgate.serving.repository import ModelVersion

log = logging.getLogger("lockgate.governance")

ENGINE_KEY = "governance"
# lockgate_drift_status: -1 inconclusive (too few rows, or not evaluable), 0 ok, 1 warn, 2 drift
STATUS_CODE = {"INCONCLUSIVE": -1, "OK": 0, "WARN": 1, "DRIFT": 2}
PayloadExplainer = Callable[..., bool]


class GovernanceStage:
    def __init__(self, *, repository_root: Path, state_dir: Path, tracing_enabled: bool = False,
                 alert_listeners: Sequence[Callable[[DriftEvent], None]] = (),
                 report_listeners: Sequence[Callable[[Any], None]] = (),
                 payload_explainer: PayloadExplainer | None = None) -> None:
        """``alert_listeners`` get every WARN/DRIFT alert, ``report_listeners`` every evaluated
        window, of every version this stage prepares. ``payload_explainer(version, engine,
        inspection, inputs, outputs, route decision)`` returns True when it takes over logging a
        sampled payload (lockgate.explain adds the attributions to the entry first)."""
        self.repository_root = Path(repository_root)
        self.state_dir = Path(state_dir)
        self.tracing_enabled = tracing_enabled
        self._alert_listeners = tuple(alert_listeners)
        self._report_listeners = tuple(report_listeners)
        self._engines: dict[tuple[str, str], GovernanceEngine] = {}
        self._payload_explainer = payload_explainer

    # -- lifecycle (repository hooks) ------------------------------------------------------
    def prepare(self, version: "ModelVersion") -> None:
        """Build the version's engine from ``governance:`` in its config.yaml and its profile."""
        config = GovernanceConfig.model_validate(version.config.governance or {})
        profile = ReferenceProfile.load_if_present(self.repository_root, version.model, version.version)
        root, model, number = self.repository_root, version.model, version.version
        engine = GovernanceEngine(
            version.model, version.version, config,
            [spec.name for spec in version.signature.inputs], profile,
            input_shapes={spec.name: spec.shape for spec in version.signature.inputs},
            output_shapes={spec.name: spec.shape for spec in version.signature.outputs},
            state_dir=self.state_dir, labels=version.config.labels(),
            profile_source=None if profile is not None else lambda: ReferenceProfile.load_if_present(root, model, number),
        )
        for listener in self._alert_listeners:
            engine.subscribe(listener)
        for listener in self._report_listeners:
            engine.monitor.on_report(listener)
        version.extensions[ENGINE_KEY] = engine
        self._engines[(version.model, version.version)] = engine

    def release(self, version: "ModelVersion") -> None:
        engine = version.extensions.pop(ENGINE_KEY, None)
        if engine is not None:
            if self._engines.get((version.model, version.version)) is engine:
                del self._engines[(version.model, version.version)]
            engine.close()

    def engines(self) -> dict[tuple[str, str], GovernanceEngine]:
        return dict(self._engines)

    def drift_unavailable(self, model: str, version: str) -> str | None:
        """Why drift cannot be evaluated for a loaded version (the canary's drift guardrail
        is then inconclusive), or None when it can."""
        engine = self._engines.get((model, version))
        if engine is None:
            return f"version {version} of model '{model}' is not loaded"
        if not engine.config.enabled or not engine.config.drift.enabled:
            return "drift is disabled in the model's governance config"
        if engine.profile is None:
            return f"version {version} has no reference profile (reference_profile.json beside its model.onnx)"
        return None

    def close(self) -> None:
        for engine in list(self._engines.values()):
            engine.close()
        self._engines.clear()

    # -- request path -------------------------------------------------------------------
    def inspect(self, version: "ModelVersion", inputs: dict[str, np.ndarray], request_id: str,
                ctx: "RequestContext") -> Inspection | None:
        engine: GovernanceEngine | None = version.extensions.get(ENGINE_KEY)
        if engine is None or not engine.enabled:
            return None
        trace = ctx.trace
        if trace is None:  # the common case: no span to fill
            inspection = engine.inspect(inputs, request_id, None, False if self.tracing_enabled else None)
        else:
            t0 = time.perf_counter_ns()
            inspection = engine.inspect(inputs, request_id, trace.trace_id_hex, True if self.tracing_enabled else None)
            outcome = "rejected" if inspection.reject else ("flagged" if inspection.violation_count else "ok")
            trace.governance(t0, time.perf_counter_ns(), outcome=outcome, violations=inspection.violation_count,
                             payload_sampled=inspection.sampled)
        if inspection.reject:
            engine.log_payload(inspection, inputs, None, "rejected", version.version)
            raise InvalidArgument(inspection.message(), details=inspection.bad_request())
        return inspection

    def after_inference(self, version: "ModelVersion", inspection: Inspection | None, inputs: dict[str, np.ndarray],
                        outputs: dict[str, np.ndarray], route: "RouteDecision", ctx: "RequestContext") -> None:
        if inspection is None:
            return
        engine: GovernanceEngine = version.extensions[ENGINE_KEY]
        engine.observe_outputs(outputs, inspection)
        if inspection.sampled:
            explainer = self._payload_explainer
            if explainer is None or not explainer(version, engine, inspection, inputs, outputs, route.decision):
                engine.log_payload(inspection, inputs, outputs, route.decision, version.version)

    def abandoned(self, version: "ModelVersion", inspection: Inspection | None) -> None:
        """An inspected request ended without outputs: its drift window stops waiting for it."""
        engine: GovernanceEngine | None = version.extensions.get(ENGINE_KEY)
        if inspection is not None and engine is not None:
            engine.abandon(inspection)

    # -- metrics (read at scrape time, on the metrics thread) ---------------------------------
    def metric_samples(self) -> Iterator[Any]:
        from lockgate.telemetry.metrics import Sample

        for (model, version), engine in list(self._engines.items()):
            mv = {"model": model, "version": version}
            stats = engine.stats()
            for input_name, features in stats["violations_by_feature"].items():
                for feature, rules in features.items():
                    for rule, count in rules.items():
                        yield Sample("lockgate_validation_violations", {**mv, "input": input_name, "feature": feature, "rule": rule}, count)
            yield Sample("lockgate_payload_samples", mv, stats["sampled"])
            yield Sample("lockgate_payload_dropped", {**mv, "reason": "queue_full"}, stats["payload_dropped"])
            yield Sample("lockgate_payload_dropped", {**mv, "reason": "no_sink"}, stats["payload_unlogged"])
            payload = stats["payload"] or {}
            yield Sample("lockgate_payload_dropped", {**mv, "reason": "write_failed"}, payload.get("failed", 0))
            yield Sample("lockgate_drift_windows_unevaluated", mv, float(engine.monitor.unevaluated))
            report = engine.monitor.last_report
            if report is None:
                continue
            for feature in report.features:
                name = f"{feature.tensor}/{feature.feature}"
                labels = {**mv, "feature": name}
                yield Sample("lockgate_drift_status", labels, STATUS_CODE.get(feature.status.upper(), -1))
                for statistic in ("psi", "js", "ks", "wasserstein", "chi2"):
                    value = getattr(feature, statistic)
                    if value is not None:
                        yield Sample("lockgate_drift_statistic", {**labels, "statistic": statistic}, float(value))
                if feature.chi2_p is not None:
                    yield Sample("lockgate_drift_chi2_p_value", labels, float(feature.chi2_p))
                for rule in feature.rules:
                    if rule["adjusted_p"] is not None:
                        yield Sample("lockgate_drift_adjusted_p_value", {**labels, "rule": rule["rule"]}, float(rule["adjusted_p"]))
                if feature.index >= 0:  # a class distribution has no missing values
                    for value, live, ref in (("nan", feature.nan_share, feature.reference_nan_share),
                                             ("inf", feature.inf_share, feature.reference_inf_share)):
                        yield Sample("lockgate_drift_missing_rate", {**labels, "value": value, "source": "live"}, live)
                        yield Sample("lockgate_drift_missing_rate", {**labels, "value": value, "source": "reference"}, ref)
                if feature.value_kind in ("categorical", "discrete"):
                    yield Sample("lockgate_drift_new_category_rate", labels, feature.new_share)
            yield Sample("lockgate_drift_alpha", mv, report.alpha)
            yield Sample("lockgate_drift_window_rows", mv, float(report.rows))
            yield Sample("lockgate_drift_late_outputs", mv, float(engine.late_outputs))
