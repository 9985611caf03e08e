"""The outcomes stage of a serving process: ledger, feedback, live figures and evidence.

One ``OutcomeService`` per process. Repository hooks compile each loaded version's
``outcomes:`` section (``prepare``; a section that does not fit the model fails the load)
and attach a ``VersionRecorder`` that the pipeline hands every served response to
(``record``). Feedback joins labels (``feedback``), the canary analysis asks for verdicts
(``canary_guardrails``), and a background thread refreshes the figures that ``/metrics``
exports, so a scrape only reads a cached summary.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Sequence

from lockgate.errors import FailedPrecondition, NotFound, StoreError
from lockgate.outcomes.config import OutcomesConfig
from lockgate.outcomes.fairness import fairness
from lockgate.outcomes.feedback import FeedbackIngest
from lockgate.outcomes.guardrails import OutcomeGuardrailResult, evaluate
from lockgate.outcomes.ledger import PredictionLedger, VersionRecorder
from lockgate.outcomes.quality import quality
from lockgate.outcomes.spec import OutcomeConfigError, OutcomeSpec
from lockgate.outcomes.store import OutcomeStore
from lockgate.outcomes.windows import WindowBook, merged

if TYPE_CHECKING:
    import numpy as np

    from lockgate.routing.policy import CanarySpec
    from lockgate.routing.rollout import GuardrailResult
    from lockgate.serving.repository import ModelVersion

log = logging.getLogger("lockgate.outcomes")

EXTENSION_KEY = "outcomes"
AuditFn = Callable[[str, str, str, Mapping[str, Any]], Any]  # actor, action, subject, details


def feature_names_of(governance: Mapping[str, Any] | None) -> dict[str, list[str]]:
    """Feature names per input declared under ``governance.inputs`` (segments may use them)."""
    out: dict[str, list[str]] = {}
    for name, spec in ((governance or {}).get("inputs") or {}).items():
        if isinstance(spec, Mapping) and spec.get("feature_names"):
            out[name] = [str(n) for n in spec["feature_names"]]
    return out


def compile_spec(model: str, config: Mapping[str, Any], outputs: Sequence[tuple[str, Sequence[int]]],
                 inputs: Sequence[tuple[str, Sequence[int]]], governance: Mapping[str, Any] | None = None) -> OutcomeSpec | None:
    """The compiled ``outcomes:`` section of a model, or None when it is disabled."""
    parsed = OutcomesConfig.model_validate(dict(config))
    if not parsed.enabled:
        return None
    return OutcomeSpec.build(model, parsed, [(n, tuple(s)) for n, s in outputs], [(n, tuple(s)) for n, s in inputs],
                             feature_names_of(governance))


def _rounded(value: Any) -> Any:
    return round(value, 12) if isinstance(value, float) else value


class OutcomeService:
    def __init__(self, store: OutcomeStore, *, replica: str, audit: AuditFn | None = None,
                 refresh_s: float = 5.0) -> None:
        self.store = store
        self.replica = replica
        self._audit = audit
        self.book = WindowBook(store, replica)
        self.ledger = PredictionLedger(store, self.book)
        self.feedback = FeedbackIngest(self)
        self._specs: dict[str, OutcomeSpec] = {}
        self._without: set[str] = set()  # loaded models without an outcomes section
        self._labels: dict[str, Counter] = {}
        self._summaries: dict[str, dict[str, Any]] = {}
        self.refresh_s = refresh_s
        self.refresh_errors = 0
        self._stop = threading.Event()
        self._refresher: threading.Thread | None = None

    # -- repository hooks --------------------------------------------------------------------
    def prepare(self, version: "ModelVersion") -> None:
        section = version.config.outcomes
        if section is None:
            self._without.add(version.model)
            return
        try:
            spec = compile_spec(version.model, section,
                                [(s.name, s.shape) for s in version.signature.outputs],
                                [(s.name, s.shape) for s in version.signature.inputs],
                                version.config.governance)
        except OutcomeConfigError:
            raise
        except ValueError as exc:  # pydantic's validation error names the field
            raise OutcomeConfigError(f"model '{version.model}' outcomes: {exc}") from exc
        if spec is None:
            self._without.add(version.model)
            return
        recorder = VersionRecorder(spec, version.version)
        version.extensions[EXTENSION_KEY] = recorder
        self.ledger.attach(recorder)
        self._specs[version.model] = spec
        self._without.discard(version.model)

    def release(self, version: "ModelVersion") -> None:
        recorder = version.extensions.pop(EXTENSION_KEY, None)
        if recorder is not None:
            self.ledger.detach(recorder)

    # -- request path ----------------------------------------------------------------------------
    def record(self, version: "ModelVersion", request_id: str, request: Any,
               inputs: dict[str, "np.ndarray"], outputs: dict[str, "np.ndarray"]) -> None:
        recorder = version.extensions.get(EXTENSION_KEY)
        if recorder is not None:
            self.ledger.record(recorder, request_id, request, inputs, outputs)

    # -- lookups ---------------------------------------------------------------------------------
    def spec_for(self, model: str) -> OutcomeSpec:
        spec = self._specs.get(model)
        if spec is not None:
            return spec
        if not model:
            from lockgate.errors import InvalidArgument

            raise InvalidArgument("model is required")
        if model in self._without:
            raise FailedPrecondition(f"model '{model}' has no outcomes: section in its config.yaml, "
                                     "so its predictions are not recorded and cannot take labels")
        raise NotFound(f"model '{model}' is not loaded on this server")

    def specs(self) -> dict[str, OutcomeSpec]:
        return dict(self._specs)

    def count_labels(self, model: str, statuses: Sequence[str]) -> None:
        self._labels.setdefault(model, Counter()).update(statuses)

    def audit(self, actor: str, action: str, subject: str, details: Mapping[str, Any]) -> None:
        if self._audit is not None:
            self._audit(actor, action, subject, details)

    # -- figures ------------------------------------------------------------------------------------
    def report(self, model: str, version: str | None = None, since: float | None = None,
               spec: OutcomeSpec | None = None) -> dict[str, Any]:
        """Per version: every window's quality and fairness, and the total over them."""
        return build_report(self.store, spec or self.spec_for(model), version, since)

    def canary_guardrails(self, model: str, canary: "CanarySpec", now: float) -> Sequence["GuardrailResult"]:
        """The hook ``CanaryController.set_outcome_guardrails`` installs at each analysis."""
        spec = self._specs.get(model)
        window = {"since": canary.started_at, "until": now, "versions": [canary.stable, canary.canary]}
        try:
            self.ledger.flush(timeout=2.0)
            states = merged(self.store, spec, since=canary.started_at, until=now + spec.span_s) if spec else {}
        except StoreError as exc:
            return [OutcomeGuardrailResult("outcomes", "inconclusive", None, None,
                                           f"the outcome store is unavailable: {exc}", {"window": window})]
        stable = states.get(canary.stable)
        candidate = states.get(canary.canary)
        if spec is not None:
            window.update(window_seconds=spec.span_s, windows=len(candidate.windows) if candidate else 0)
        return evaluate(canary.guardrails, spec, stable.total() if stable else None,
                        candidate.total() if candidate else None, window)

    # -- metrics -----------------------------------------------------------------------------------------
    def start(self) -> None:
        if self._refresher is None:
            self._refresher = threading.Thread(target=self._refresh_loop, name="lockgate-outcome-figures", daemon=True)
            self._refresher.start()

    def _refresh_loop(self) -> None:
        while not self._stop.wait(self.refresh_s):
            self.refresh()

    def refresh(self) -> None:
        """Recompute the exported figures (the newest ``windows.evaluate`` windows, merged)."""
        for model, spec in list(self._specs.items()):
            try:
                since = time.time() - spec.config.windows.evaluate * spec.span_s
                states = merged(self.store, spec, since=since)
                summary: dict[str, Any] = {}
                for version, windows in states.items():
                    total = windows.total()
                    if total is None:
                        continue
                    summary[version] = {"quality": quality(total, spec, spec.config.fairness.confidence),
                                        "fairness": fairness(total, spec)}
                self._summaries[model] = summary
            except Exception:  # noqa: BLE001 -- a failed refresh keeps the last figures
                self.refresh_errors += 1
                log.exception("outcome figures of model %s not refreshed", model)

    def metric_samples(self) -> Iterator[Any]:
        from lockgate.telemetry.metrics import Sample

        for recorder in self.ledger.recorders():
            mv = {"model": recorder.model, "version": recorder.version}
            yield Sample("lockgate_outcome_predictions", mv, recorder.written)
            for reason, count in recorder.dropped.items():
                yield Sample("lockgate_outcome_dropped", {**mv, "reason": reason}, count)
        for model, count in list(self.ledger.evicted.items()):
            yield Sample("lockgate_outcome_evicted", {"model": model}, count)
        for model, counts in list(self._labels.items()):
            for result, count in counts.items():
                yield Sample("lockgate_feedback_labels", {"model": model, "result": result}, count)
        for model, per_version in list(self._summaries.items()):
            for version, figures in per_version.items():
                mv = {"model": model, "version": version}
                q = figures["quality"]
                if q["coverage"] is not None:
                    yield Sample("lockgate_label_coverage", mv, q["coverage"])
                for metric, entry in q["metrics"].items():
                    value = entry.get("value") if isinstance(entry, dict) else None
                    if isinstance(value, (int, float)) and metric not in ("per_class",):
                        yield Sample("lockgate_model_quality", {**mv, "metric": metric}, float(value))
                for segment in figures["fairness"]:
                    yield from _fairness_samples(mv, segment)

    def close(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self.ledger.close(timeout)
        if self._refresher is not None:
            self._refresher.join(timeout=5.0)
        self.store.close()


def _fairness_samples(mv: dict[str, str], segment: dict[str, Any]) -> Iterator[Any]:
    from lockgate.telemetry.metrics import Sample

    name = segment["segment"]
    for key, entry in segment["summary"].items():
        if entry is not None and entry.get("value") is not None:
            yield Sample("lockgate_fairness", {**mv, "segment": name, "metric": key}, float(entry["value"]))
    yield Sample("lockgate_fairness", {**mv, "segment": name, "metric": "breaches"}, float(len(segment["breaches"])))
    for group in segment["groups"]:
        label = f"{name}={group['group']}"
        yield Sample("lockgate_fairness", {**mv, "segment": label, "metric": "group_size"}, float(group["n"]))
        for key in ("selection_rate", "tpr", "fpr", "accuracy"):
            entry = group[key]
            if entry["value"] is not None and entry["eligible"]:
                yield Sample("lockgate_fairness", {**mv, "segment": label, "metric": key}, float(entry["value"]))
        for key in ("spd", "dir"):
            entry = group.get(key)
            if entry is not None and entry.get("value") is not None and entry.get("eligible"):
                yield Sample("lockgate_fairness", {**mv, "segment": label, "metric": key}, float(entry["value"]))


def build_report(store: OutcomeStore, spec: OutcomeSpec, version: str | None = None,
                 since: float | None = None) -> dict[str, Any]:
    """The outcomes report document (``GetOutcomes``, ``lockgate outcomes report``, evidence)."""
    from lockgate.control.store import format_time
    from datetime import datetime, timezone

    def iso(t: float) -> str:
        return format_time(datetime.fromtimestamp(t, timezone.utc))

    confidence = spec.config.fairness.confidence
    versions: dict[str, Any] = {}
    for name, states in merged(store, spec, version=version, since=since).items():
        windows = []
        for state in states.windows:
            windows.append({"window": state.window, "start": iso(state.start), "end": iso(state.end),
                            "quality": quality(state, spec, confidence), "fairness": fairness(state, spec)})
        total = states.total()
        versions[name] = {
            "windows": windows,
            "total": {"quality": quality(total, spec, confidence), "fairness": fairness(total, spec)} if total else None,
        }
    return {
        "format": "lockgate.outcomes/v1",
        "model": spec.model,
        "task": spec.task,
        "classes": list(spec.classes),
        "positive_class": spec.classes[spec.positive] if spec.classification else None,
        "favourable_outcome": spec.classes[spec.favourable] if spec.classification else None,
        "protected": [spec.segments[i].name for i in spec.protected],
        "window_seconds": spec.span_s,
        "fairness_bounds": {"spd": spec.config.fairness.spd_bound, "dir": list(spec.config.fairness.dir_bounds),
                            "min_group_size": spec.config.fairness.min_group_size, "confidence": confidence},
        "versions": versions,
    }


def evidence(report: dict[str, Any]) -> dict[str, Any]:
    """The compact history for ``audit export``: per version and window, coverage, every
    metric's value and the fairness gaps and breaches (not the curves or the groups)."""
    def metrics(q: dict[str, Any]) -> dict[str, Any]:
        return {k: _rounded(v.get("value")) for k, v in q["metrics"].items() if isinstance(v, dict) and "value" in v}

    def gaps(f: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{"segment": s["segment"], "reference": s["reference"],
                 **{k: (_rounded(v.get("value")) if isinstance(v, dict) else None) for k, v in s["summary"].items()},
                 "breaches": s["breaches"]} for s in f]

    history = {}
    for version, data in report["versions"].items():
        history[version] = [
            {"window": w["window"], "start": w["start"], "end": w["end"], "predictions": w["quality"]["predictions"],
             "labeled": w["quality"]["labeled"], "coverage": w["quality"]["coverage"],
             "metrics": metrics(w["quality"]), "fairness": gaps(w["fairness"])}
            for w in data["windows"]
        ]
    return {"format": "lockgate.outcomes.history/v1", "window_seconds": report["window_seconds"],
            "task": report["task"], "protected": report["protected"], "history": history}


def guardrail_decisions(entries: Sequence[Any]) -> list[dict[str, Any]]:
    """Every canary analysis verdict in an audit log (the entries that carry guardrail results)."""
    out = []
    for entry in entries:
        details = entry.details if hasattr(entry, "details") else entry.get("details", {})
        if isinstance(details, Mapping) and "guardrails" in details:
            out.append({"seq": entry.seq, "time": entry.time, "action": entry.action, "actor": entry.actor,
                        "outcome": details.get("outcome"), "reason": details.get("reason"),
                        "guardrails": details["guardrails"]})
    return out


def evidence_section(store: OutcomeStore, spec: OutcomeSpec | None, audit_entries: Sequence[Any]) -> dict[str, Any]:
    """The ``outcomes`` section of a model's evidence bundle: the quality and fairness history
    of every window still kept, and every guardrail decision of its canaries."""
    section = evidence(build_report(store, spec)) if spec is not None else {"history": {}}
    section["guardrail_decisions"] = guardrail_decisions(audit_entries)
    return section
