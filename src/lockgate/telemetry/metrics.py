"""Prometheus metrics: serving families read at scrape time, governance families from sources.

Why this shape:

* **Counters cost nothing per request.** ``VersionStats`` already counts successes, failures
  by reason, inferences, executions and pending requests (for ModelStatistics). A custom
  collector reads them when Prometheus scrapes, iterating ``repository.models()``.
* **Histograms cost a C bisect + two adds.** prometheus_client's ``Histogram.observe`` takes a
  mutex per increment (~3.5 us measured here, ~7.7 us with an exemplar). Every writer runs on
  the event loop thread, so the histograms are lock-free C bucket arrays
  (``lockgate.serving.stats.Histogram``) that ``attach`` hands to the version's
  ``VersionStats``: recording a request or a batch updates counters and histograms in one C
  call, with no per-request metrics hook. They are exposed at scrape time as
  ``HistogramMetricFamily`` (exemplars included).
* **Governance, routing and audit are other packages.** They register *sources*: callables
  that yield ``Sample(family, labels, value)`` at scrape time, for families declared in
  ``FAMILIES`` (or added with ``define_family``). A broken source is counted and logged, and
  never fails the scrape.

Instruments for a model version live in ``ModelVersion.extensions[EXTENSION_KEY]`` so their
lifetime is exactly the version's: a reload with a new artifact starts fresh series, like
the ``VersionStats`` counters it sits next to.

With ``--workers N`` each worker serves its own registry on ``metrics_port + index``
(``LOCKGATE_WORKER_INDEX``); Prometheus scrapes all N targets and ``sum by (model, version)``
aggregates. prometheus_client's multiprocess mode cannot expose collector-read in-memory
state, so per-worker ports are the simple, correct choice.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, Literal, Mapping, NamedTuple

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.samples import Exemplar

import lockgate
from lockgate.serving.stats import Histogram
from lockgate.telemetry.config import MetricsSettings

if TYPE_CHECKING:
    from lockgate.serving.repository import ModelRepository, ModelVersion

log = logging.getLogger("lockgate.telemetry.metrics")

EXTENSION_KEY = "lockgate.telemetry"
WORKER_INDEX_ENV = "LOCKGATE_WORKER_INDEX"

# Numeric encodings of state gauges (one series per feature / version, easy to alert on).
DRIFT_STATUS = {"inconclusive": -1, "ok": 0, "warning": 1, "drift": 2}
CANARY_STATE = {"none": 0, "progressing": 1, "paused": 2, "promoted": 3, "rolled_back": 4, "inconclusive": 5, "aborted": 6}


class Sample(NamedTuple):
    """One value a source reports: ``family`` must be declared; missing labels read as ""."""

    family: str
    labels: Mapping[str, str]
    value: float


Source = Callable[[], Iterable[Sample]]


@dataclass(frozen=True, slots=True)
class FamilySpec:
    kind: Literal["counter", "gauge"]
    help: str
    labels: tuple[str, ...]


MV = ("model", "version")

# Families filled by sources registered by other subsystems (names without ``_total``;
# counters get it on exposition).
FAMILIES: dict[str, FamilySpec] = {
    # governance
    "lockgate_validation_violations": FamilySpec("counter", "Validation violations by input, feature and rule", (*MV, "input", "feature", "rule")),
    "lockgate_payload_samples": FamilySpec("counter", "Request/response payloads sampled into the payload log", MV),
    "lockgate_payload_dropped": FamilySpec("counter", "Payload records dropped (sink full or failed), by reason", (*MV, "reason")),
    "lockgate_drift_statistic": FamilySpec("gauge", "Drift statistic per feature (e.g. psi, ks) against the reference profile", (*MV, "feature", "statistic")),
    "lockgate_drift_status": FamilySpec("gauge", "Drift status per feature of the last window: -1 inconclusive, 0 ok, 1 warning, 2 drift", (*MV, "feature")),
    "lockgate_drift_chi2_p_value": FamilySpec("gauge", "Chi-squared homogeneity p-value of a feature's bin counts in the last window (uncorrected)", (*MV, "feature")),
    "lockgate_drift_adjusted_p_value": FamilySpec("gauge", "p-value of a drift rule's test, corrected across the window's tests (compare with lockgate_drift_alpha)", (*MV, "feature", "rule")),
    "lockgate_drift_alpha": FamilySpec("gauge", "Family-wise false-alarm rate of a version's drift windows", MV),
    "lockgate_drift_missing_rate": FamilySpec("gauge", "Share of a feature's values that are NaN or Inf (value), in the last window or the reference (source)", (*MV, "feature", "value", "source")),
    "lockgate_drift_new_category_rate": FamilySpec("gauge", "Share of a categorical or discrete feature's values the reference never had, in the last window", (*MV, "feature")),
    "lockgate_drift_window_rows": FamilySpec("gauge", "Rows in the last evaluated drift window", MV),
    "lockgate_drift_late_outputs": FamilySpec("counter", "Outputs that arrived after their drift window was evaluated (counted in no window)", MV),
    "lockgate_drift_windows_unevaluated": FamilySpec("counter", "Drift windows closed but not evaluated: the version has no reference profile", MV),
    # explanations (lockgate.explain)
    "lockgate_explanations": FamilySpec("counter", "On-demand explanations by outcome (ok, queue_full, deadline_exceeded, refused, ...)", (*MV, "outcome")),
    "lockgate_explanations_sampled": FamilySpec("counter", "Sampled payloads chosen for explanation, by outcome (ok, explain_queue_full, failed, ...)", (*MV, "outcome")),
    "lockgate_explain_in_flight": FamilySpec("gauge", "Explanations queued or running for a version, by queue (on_demand, sampled)", (*MV, "queue")),
    "lockgate_feature_importance": FamilySpec("gauge", "Mean |attribution| per feature in the last closed importance window", (*MV, "feature")),
    "lockgate_feature_importance_shift": FamilySpec("gauge", "Total variation distance of normalised importance against a baseline (reference, or another version)", (*MV, "baseline")),
    # routing
    "lockgate_traffic_weight": FamilySpec("gauge", "Configured traffic weight of a version (0..1)", MV),
    "lockgate_shadow_agreement": FamilySpec("gauge", "Share of shadow responses agreeing with the primary (0..1)", (*MV, "shadow_version")),
    "lockgate_canary_state": FamilySpec("gauge", "Canary state: 0 none, 1 progressing, 2 paused (operator), 3 promoted, 4 rolled_back, 5 inconclusive (waiting for evidence), 6 aborted", MV),
    "lockgate_rollbacks": FamilySpec("counter", "Automatic or manual rollbacks of a version", MV),
    # outcomes (prediction ledger, feedback, live quality and fairness; lockgate.outcomes)
    "lockgate_outcome_predictions": FamilySpec("counter", "Predictions written to the outcome ledger", MV),
    "lockgate_outcome_dropped": FamilySpec("counter", "Predictions not recorded in the outcome ledger, by reason", (*MV, "reason")),
    "lockgate_outcome_evicted": FamilySpec("counter", "Predictions evicted from the outcome ledger by retention (age or row cap)", ("model",)),
    "lockgate_feedback_labels": FamilySpec("counter", "Labels received by the feedback API, by result (accepted, duplicate, unknown, expired, model_mismatch)", ("model", "result")),
    "lockgate_model_quality": FamilySpec("gauge", "Live model quality per version over the newest windows (accuracy, f1, auc, rmse, ...)", (*MV, "metric")),
    "lockgate_fairness": FamilySpec("gauge", "Fairness per protected segment (gaps) and group (rates, spd, dir, group_size), judged groups only", (*MV, "segment", "metric")),
    "lockgate_label_coverage": FamilySpec("gauge", "Share of predictions with a label over the newest windows (0..1)", MV),
    # control plane
    "lockgate_audit_entries": FamilySpec("counter", "Entries appended to the hash-chained audit trail", ("action",)),
    "lockgate_audit_verify_ok": FamilySpec("gauge", "1 if the last audit verification (chain, checkpoints, registry) passed, 0 if it failed", ()),
    "lockgate_audit_head": FamilySpec("gauge", "Seq of the audit chain head in the last signed checkpoint", ()),
    "lockgate_audit_checkpoints": FamilySpec("counter", "Signed audit checkpoints written by this process", ()),
    "lockgate_audit_checkpoint_failures": FamilySpec("counter", "Audit checkpoints that could not be written", ()),
    "lockgate_leader": FamilySpec("gauge", "1 while this replica is the leader (canary analysis, fleet drift merge)", ("replica",)),
    # transport (filled by lockgate.transport.grpc.inference and the HTTP app)
    "lockgate_grpc_events": FamilySpec("counter", "Inference calls answered outside the request path, by cause: undecodable, ended_before_reply, refused_draining, internal", ("cause",)),
    "lockgate_http_events": FamilySpec("counter", "HTTP requests answered outside the request path, by cause: undecodable, refused_draining, internal", ("cause",)),
    "lockgate_artifact_verify_failures": FamilySpec("counter", "Version signature (model.sig) verifications refused, by reason", (*MV, "reason")),
    # telemetry itself (filled by lockgate.telemetry.tracing)
    "lockgate_otel_spans_exported": FamilySpec("counter", "Spans the OTLP exporter delivered", ()),
    "lockgate_otel_spans_dropped": FamilySpec("counter", "Spans dropped: queue_full or export_failed", ("reason",)),
}


def _buckets(h: Histogram) -> tuple[list[tuple], float]:
    """Cumulative ``(le, count[, exemplar])`` samples of one histogram, from one snapshot."""
    counts = h.counts  # one copy, then consistent cumulative sums
    total_sum = h.sum
    exemplars = h.exemplars
    bounds = h.bounds
    out: list[tuple] = []
    running = 0
    for i, count in enumerate(counts):
        running += count
        le = "+Inf" if i == len(bounds) else _fmt(bounds[i])
        ex = exemplars[i]
        if ex is not None:
            out.append((le, running, Exemplar({"trace_id": ex[0]}, ex[1], ex[2])))
        else:
            out.append((le, running))
    return out, total_sum


def _fmt(bound: float) -> str:
    return str(int(bound)) if bound.is_integer() and bound >= 1 else repr(bound)


class VersionInstruments:
    """The histograms of one loaded model version (written by its ``VersionStats``)."""

    __slots__ = ("request", "queue", "compute", "batch")

    def __init__(self, settings: MetricsSettings) -> None:
        self.request = Histogram(settings.latency_buckets)
        self.queue = Histogram(settings.latency_buckets)
        self.compute = Histogram(settings.latency_buckets)
        self.batch = Histogram(settings.batch_size_buckets)


class GatewayMetrics:
    """The collector behind ``/metrics``: reads the repository, instruments and sources."""

    def __init__(self, repository: "ModelRepository", settings: MetricsSettings | None = None) -> None:
        self.repository = repository
        self.settings = settings or MetricsSettings()
        self.registry = CollectorRegistry(auto_describe=False)
        self.families: dict[str, FamilySpec] = dict(FAMILIES)
        self._sources: dict[str, Source] = {}
        self._source_errors: dict[str, int] = {}
        self._logged_errors: set[tuple[str, str]] = set()
        self.registry.register(self)
        if self.settings.process:
            ProcessCollector(registry=self.registry)
            PlatformCollector(registry=self.registry)
            GCCollector(registry=self.registry)
        if self.settings.gpu:
            from lockgate.telemetry.gpu import GpuCollector

            gpu = GpuCollector.create()
            if gpu is not None:
                self.registry.register(gpu)
        for model in repository.models().values():
            for version in model.versions.values():
                self.attach(version)
        repository.subscribe(self._on_models_changed)

    # -- wiring ----------------------------------------------------------------------
    def attach(self, version: "ModelVersion") -> VersionInstruments:
        """Create (once) the instruments of a version and subscribe them to its batches."""
        inst = version.extensions.get(EXTENSION_KEY)
        if inst is None:
            inst = version.extensions[EXTENSION_KEY] = VersionInstruments(self.settings)
            stats = version.stats
            stats.request_hist, stats.queue_hist = inst.request, inst.queue
            stats.compute_hist, stats.batch_hist = inst.compute, inst.batch
            stats.exemplars = self.settings.exemplars
        return inst

    def _on_models_changed(self, model: str, loaded: list[str], removed: list[str]) -> None:
        current = self.repository.models().get(model)
        if current is not None:
            for version in current.versions.values():
                self.attach(version)

    # -- sources ---------------------------------------------------------------------
    def define_family(self, name: str, kind: Literal["counter", "gauge"], help: str, labels: Iterable[str]) -> None:
        """Declare a family a source may report (idempotent for an identical spec)."""
        spec = FamilySpec(kind, help, tuple(labels))
        existing = self.families.get(name)
        if existing is not None and existing != spec:
            raise ValueError(f"metric family {name} is already defined as {existing}")
        self.families[name] = spec

    def register_source(self, name: str, source: Source) -> None:
        """Call ``source()`` at every scrape; it yields ``Sample``s of declared families.

        Sources run on the metrics server thread: they must only read (copy) state.
        """
        if name in self._sources:
            raise ValueError(f"a metrics source named {name!r} is already registered")
        self._sources[name] = source
        self._source_errors.setdefault(name, 0)

    def unregister_source(self, name: str) -> None:
        self._sources.pop(name, None)

    def _source_error(self, source: str, what: str) -> None:
        self._source_errors[source] = self._source_errors.get(source, 0) + 1
        if (source, what) not in self._logged_errors:
            self._logged_errors.add((source, what))
            log.error("metrics source %r: %s (counted in lockgate_telemetry_source_errors_total; logged once)", source, what)

    # -- scrape ----------------------------------------------------------------------
    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        yield from self._serving()
        yield from self._from_sources()
        info = GaugeMetricFamily("lockgate_build_info", "lockgate version and worker", labels=["version", "worker"])
        info.add_metric([lockgate.__version__, os.environ.get(WORKER_INDEX_ENV, "0")], 1)
        yield info
        errors = CounterMetricFamily("lockgate_telemetry_source_errors", "Metrics sources that raised or reported bad samples", labels=["source"])
        for name, count in list(self._source_errors.items()):
            errors.add_metric([name], count)
        yield errors

    def _serving(self) -> Iterator[Metric]:
        labels = ["model", "version"]
        success = CounterMetricFamily("lockgate_inference_request_success", "Successful inference requests (nv_inference_request_success)", labels=labels)
        failure = CounterMetricFamily("lockgate_inference_request_failure", "Failed inference requests by reason (nv_inference_request_failure)", labels=[*labels, "reason"])
        count = CounterMetricFamily("lockgate_inference_count", "Inferences performed: batch rows (nv_inference_count)", labels=labels)
        execs = CounterMetricFamily("lockgate_inference_exec_count", "Model executions: batches (nv_inference_exec_count)", labels=labels)
        pending = GaugeMetricFamily("lockgate_inference_pending_request_count", "Requests queued or executing (nv_inference_pending_request_count)", labels=labels)
        req_us = CounterMetricFamily("lockgate_inference_request_duration_us", "Cumulative request time, successful requests (nv_inference_request_duration_us)", labels=labels)
        queue_us = CounterMetricFamily("lockgate_inference_queue_duration_us", "Cumulative queue time (nv_inference_queue_duration_us)", labels=labels)
        cin_us = CounterMetricFamily("lockgate_inference_compute_input_duration_us", "Cumulative input preparation time (nv_inference_compute_input_duration_us)", labels=labels)
        cinf_us = CounterMetricFamily("lockgate_inference_compute_infer_duration_us", "Cumulative model execution time (nv_inference_compute_infer_duration_us)", labels=labels)
        cout_us = CounterMetricFamily("lockgate_inference_compute_output_duration_us", "Cumulative output extraction time (nv_inference_compute_output_duration_us)", labels=labels)
        decisions = CounterMetricFamily("lockgate_route_decisions", "Requests by route decision (default, pinned, weighted, sticky, ...)", labels=[*labels, "decision"])
        hists = {
            "request": HistogramMetricFamily("lockgate_request_duration_seconds", "Successful request latency, receipt to response", labels=labels),
            "queue": HistogramMetricFamily("lockgate_queue_duration_seconds", "Time a request waited in the batch queue", labels=labels),
            "compute": HistogramMetricFamily("lockgate_compute_duration_seconds", "Model execution time per batch (input + infer + output)", labels=labels),
            "batch": HistogramMetricFamily("lockgate_batch_size", "Rows per model execution", labels=labels),
        }
        for model in self.repository.models().values():
            for version in list(model.versions.values()):
                lv = [model.name, version.version]
                s = version.stats
                success.add_metric(lv, s.success.count)
                for reason, n in dict(s.failures_by_reason).items():
                    failure.add_metric([*lv, reason], n)
                count.add_metric(lv, s.inference_count)
                execs.add_metric(lv, s.execution_count)
                pending.add_metric(lv, s.pending)
                req_us.add_metric(lv, s.success.ns / 1000)
                queue_us.add_metric(lv, s.queue.ns / 1000)
                cin_us.add_metric(lv, s.compute_input.ns / 1000)
                cinf_us.add_metric(lv, s.compute_infer.ns / 1000)
                cout_us.add_metric(lv, s.compute_output.ns / 1000)
                for decision, n in dict(s.decisions).items():
                    decisions.add_metric([*lv, decision], n)
                inst = version.extensions.get(EXTENSION_KEY)
                if inst is None:
                    continue
                for attr, family in hists.items():
                    buckets, total = _buckets(getattr(inst, attr))
                    family.add_metric(lv, buckets, total)
        for (model_name, reason), n in list(self.repository.unrouted_failures.items()):
            failure.add_metric([model_name, "", reason], n)  # refused before a version was known
        yield from (success, failure, count, execs, pending, req_us, queue_us, cin_us, cinf_us, cout_us, decisions)
        yield from hists.values()

    def _from_sources(self) -> Iterator[Metric]:
        values: dict[str, dict[tuple[str, ...], float]] = {name: {} for name in self.families}
        for source_name, source in list(self._sources.items()):
            try:
                samples = list(source())
            except Exception as exc:  # noqa: BLE001 -- a broken source must not fail the scrape
                self._source_error(source_name, f"raised {type(exc).__name__}: {exc}")
                continue
            for sample in samples:
                spec = self.families.get(sample.family)
                if spec is None:
                    self._source_error(source_name, f"unknown family {sample.family!r}")
                    continue
                extra = set(sample.labels) - set(spec.labels)
                if extra:
                    self._source_error(source_name, f"{sample.family}: unknown labels {sorted(extra)}")
                    continue
                key = tuple(str(sample.labels.get(label, "")) for label in spec.labels)
                series = values[sample.family]
                # Two sources reporting one series: counters add up, gauges keep the last.
                series[key] = series.get(key, 0.0) + sample.value if spec.kind == "counter" else sample.value
        for name, spec in self.families.items():
            cls = CounterMetricFamily if spec.kind == "counter" else GaugeMetricFamily
            family = cls(name, spec.help, labels=list(spec.labels))
            for key, value in values[name].items():
                family.add_metric(list(key), value)
            yield family


class MetricsServer:
    """The ``/metrics`` HTTP endpoint (a daemon thread); OpenMetrics when the scraper asks."""

    def __init__(self, registry: CollectorRegistry, port: int, host: str = "0.0.0.0") -> None:
        self._server, self._thread = start_http_server(port, addr=host, registry=registry)
        self.host = host
        self.port = int(self._server.server_port)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def worker_metrics_port(base_port: int) -> int:
    """``metrics_port + LOCKGATE_WORKER_INDEX``: one scrape target per worker process."""
    if base_port == 0:
        return 0
    return base_port + int(os.environ.get(WORKER_INDEX_ENV, "0") or 0)


def start_metrics_server(registry: CollectorRegistry, port: int, host: str = "0.0.0.0") -> MetricsServer:
    return MetricsServer(registry, port, host)
