"""Explanations beside predictions: the pipeline hook, the pool, deadlines and permission.

The request path pays one cheap test for this feature: the pipeline calls ``admit`` only when
a request carries parameters at all. A request with ``lockgate_explain: true`` is admitted
into its version's bounded explain queue (``explain.max_queue``; full: RESOURCE_EXHAUSTED at
once, before any inference), served as usual, then explained in the pool with its own
deadline (``explain.timeout_s``, capped by the request's), and answered with two extra
outputs, ``lockgate_attributions`` FP32 ``[rows, features, outputs]`` and
``lockgate_base_value`` FP32 ``[outputs]``, plus parameters naming the method, the space, the
features and the outputs.

The pool is a process pool of its own (``worker``): an explanation never holds the serving
process's GIL or its batcher, so unexplained requests are not delayed by it. When tokens are
configured, explanations need the ``explain`` permission (they can leak model internals).

A share of the sampled payloads (``explain.sample_share``) is explained in the background and
the attributions go into the payload log entry, redacted as the payload is; every one that
cannot be explained is logged without attributions, with the reason, and counted. Those jobs
have a queue of their own (``explain.sample_max_queue``), so background explanations of plain
traffic never take the places of callers who asked for one.
"""

from __future__ import annotations

import asyncio
import json
import logging
import multiprocessing
import time
import zlib
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping

import numpy as np

from lockgate.control.auth import Authenticator, Permission
from lockgate.errors import (ExplainDeadlineExceeded, ExplainQueueFull, ExplainUnavailable, InvalidArgument,
                             LockgateError, Unavailable)
from lockgate.explain import worker
from lockgate.explain.background import background_path, from_profile, load_background
from lockgate.explain.config import ExplainConfig
from lockgate.explain.importance import ImportanceTracker, importance_shift

if TYPE_CHECKING:
    from lockgate.pipeline import RequestContext
    from lockgate.serving.repository import ModelVersion

log = logging.getLogger("lockgate.explain")

KEY = "explain"
EXPLAIN_PARAMETER = "lockgate_explain"
ATTRIBUTIONS_OUTPUT = "lockgate_attributions"
BASE_VALUE_OUTPUT = "lockgate_base_value"
AUTHORIZATION = "authorization"
_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off", ""}


def explain_requested(request: Any) -> bool:
    """Whether ``lockgate_explain`` asks for an explanation (bool, or a string/int spelling of one)."""
    param = request.parameters.get(EXPLAIN_PARAMETER)
    if param is None:
        return False
    which = param.WhichOneof("parameter_choice")
    if which == "bool_param":
        return param.bool_param
    if which == "int64_param":
        return param.int64_param != 0
    if which == "string_param":
        text = param.string_param.strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
    raise InvalidArgument(f"parameter '{EXPLAIN_PARAMETER}' must be a bool (true/false), got {which or 'nothing'}")


class VersionExplain:
    """Per loaded version: its config, the job spec, its queue and its counters."""

    def __init__(self, version: "ModelVersion", config: ExplainConfig, spec: worker.JobSpec | None,
                 input_name: str | None, unavailable: str | None, tracker: ImportanceTracker | None) -> None:
        self.model = version.model
        self.version = version.version
        self.label = version.label
        self.config = config
        self.spec = spec
        self.input_name = input_name
        self.unavailable = unavailable
        self.tracker = tracker
        self.in_flight = 0  # on-demand explanations admitted (bounded by explain.max_queue)
        self.sampled_in_flight = 0  # sampled payloads being explained (explain.sample_max_queue)
        self.outcomes: dict[str, int] = {}  # on demand: ok, queue_full, deadline_exceeded, failed, refused, ...
        self.sampled: dict[str, int] = {}  # sampled payloads: explained, queue_full, failed, ...
        self.description: dict[str, Any] | None = None
        self.pending: set["_PendingSample"] = set()

    def count(self, table: dict[str, int], outcome: str) -> None:
        table[outcome] = table.get(outcome, 0) + 1


class Ticket:
    """A reserved place in one of a version's two explain queues (on demand, or sampled
    payloads), released once the worker is done with it."""

    __slots__ = ("state", "sampled", "released", "submitted")

    def __init__(self, state: VersionExplain, sampled: bool = False) -> None:
        self.state = state
        self.sampled = sampled
        self.released = False
        self.submitted = False
        if sampled:
            state.sampled_in_flight += 1
        else:
            state.in_flight += 1

    def release(self) -> None:
        if not self.released:
            self.released = True
            if self.sampled:
                self.state.sampled_in_flight -= 1
            else:
                self.state.in_flight -= 1

    def abandon(self) -> None:
        """The request ended before its job was submitted: give the place back now."""
        if not self.submitted:
            self.release()


class _PendingSample:
    __slots__ = ("engine", "inspection", "inputs", "outputs", "route", "version", "logged")

    def __init__(self, engine: Any, inspection: Any, inputs: dict, outputs: dict, route: str, version: str) -> None:
        self.engine, self.inspection, self.inputs, self.outputs = engine, inspection, inputs, outputs
        self.route, self.version, self.logged = route, version, False

    def log(self, extra: dict[str, Any]) -> None:
        if not self.logged:
            self.logged = True
            self.engine.log_payload(self.inspection, self.inputs, self.outputs, self.route, self.version, extra=extra)


def _chosen(request_id: str, share: float) -> bool:
    """Deterministic by request id (every replica agrees), like payload sampling itself."""
    if share >= 1.0:
        return True
    return (zlib.crc32(request_id.encode()) & 0xFFFFFFFF) < share * 2**32 if request_id else np.random.random() < share


class ExplainService:
    def __init__(self, *, repository_root: Path, state_dir: Path | None, authenticator: Authenticator | None = None,
                 workers: int = 1, nice: int = worker.WORKER_NICE, cpu_share: float = worker.CPU_SHARE,
                 canary_of: Callable[[str], tuple[str, str] | None] | None = None) -> None:
        """``canary_of(model)`` -> ``(stable, canary)`` while a canary runs: the canary's
        importance shift against the stable version is then also exposed as baseline "stable"."""
        self.repository_root = Path(repository_root)
        self.canary_of = canary_of
        self.nice = nice
        self.cpu_share = cpu_share
        self.state_dir = Path(state_dir) if state_dir is not None else None
        self.authenticator = authenticator
        self.workers = workers
        self._executor_: ProcessPoolExecutor | None = None
        self._states: dict[tuple[str, str], VersionExplain] = {}
        self._tasks: set[asyncio.Task] = set()
        self.pool_restarts = 0

    # -- the pool ----------------------------------------------------------------------
    def _executor(self) -> ProcessPoolExecutor:
        if self._executor_ is None:
            self._executor_ = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"),
                                                  initializer=worker.initialise, initargs=(self.nice, self.cpu_share))
        return self._executor_

    def _reset_pool(self) -> None:
        broken, self._executor_ = self._executor_, None
        self.pool_restarts += 1
        if broken is not None:
            broken.shutdown(wait=False, cancel_futures=True)

    # -- lifecycle (repository hooks) ----------------------------------------------------
    def prepare(self, version: "ModelVersion") -> None:
        raw = getattr(version.config, "explain", None)
        config = ExplainConfig.model_validate(raw or {})
        if not config.enabled:
            return
        input_name, unavailable = self._input_of(version, config)
        bg_path = background_path(self.repository_root, version.model, version.version)
        fallback = None
        reference = None
        if bg_path.exists():
            try:
                reference = load_background(bg_path).reference_importance
            except ValueError as exc:
                unavailable = unavailable or f"{version.label}: unreadable explanation background: {exc}"
        else:
            from lockgate.governance.profile import ReferenceProfile

            try:
                profile = ReferenceProfile.load_if_present(self.repository_root, version.model, version.version)
            except (OSError, ValueError):
                profile = None
            if profile is not None:
                fallback = from_profile(profile).arrays
        spec = worker.JobSpec(version.label, str(version.path), version.sha256, config.fingerprint(),
                              str(bg_path) if bg_path.exists() else None, fallback,
                              tuple(self._feature_names(version, input_name) or ()) or None)
        tracker = ImportanceTracker(version.model, version.version, config.importance, self.state_dir, reference)
        state = VersionExplain(version, config, spec, input_name, unavailable, tracker)
        version.extensions[KEY] = state
        self._states[(version.model, version.version)] = state
        if (raw is not None or bg_path.exists()) and unavailable is None:  # explanations are expected here
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return
            task = loop.create_task(self._warm_up(state))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _warm_up(self, state: VersionExplain) -> None:
        """Build the explainer in the pool at load, so configuration errors show in the log now."""
        try:
            future = self._executor().submit(worker.describe_job, state.spec)
            state.description = await asyncio.wrap_future(future)
            log.info("%s: explanations by %s", state.label, json.dumps(state.description))
        except LockgateError as exc:
            log.error("%s: explanations unavailable: %s", state.label, exc.message)
        except Exception as exc:  # noqa: BLE001 -- logged; requests get the error themselves
            log.error("%s: explainer failed to build: %s: %s", state.label, type(exc).__name__, exc)

    @staticmethod
    def _input_of(version: "ModelVersion", config: ExplainConfig) -> tuple[str | None, str | None]:
        inputs = version.signature.inputs
        if config.input is not None:
            spec = version.signature.input(config.input)
            if spec is None:
                return None, f"{version.label}: explain.input {config.input!r} is not an input of the model"
        elif len(inputs) == 1:
            spec = inputs[0]
        else:
            return None, f"{version.label} has {len(inputs)} inputs; explanations need a single tabular input"
        if len(spec.shape) != 2 or spec.shape[1] < 0 or spec.datatype.name not in ("FP32", "FP64"):
            return spec.name, (f"{version.label}: input '{spec.name}' is {spec.datatype.name} {spec.shape_text()}; "
                               "explanations need FP32/FP64 [rows, features]")
        return spec.name, None

    @staticmethod
    def _feature_names(version: "ModelVersion", input_name: str | None) -> list[str] | None:
        engine = version.extensions.get("governance")
        tensor = getattr(engine, "inputs", {}).get(input_name) if engine is not None else None
        return list(tensor.feature_names) if tensor is not None else None

    def release(self, version: "ModelVersion") -> None:
        state = version.extensions.pop(KEY, None)
        if state is None:
            return
        if self._states.get((state.model, state.version)) is state:
            del self._states[(state.model, state.version)]
        for pending in list(state.pending):  # never lost: logged now, without attributions
            pending.log({"explanation": {"status": "unfinished", "reason": "version unloaded"}})
            state.count(state.sampled, "unfinished")
        if state.tracker is not None:
            state.tracker.close_window()

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        executor, self._executor_ = self._executor_, None
        if executor is not None:
            processes = list(getattr(executor, "_processes", {}).values())
            executor.shutdown(wait=False, cancel_futures=True)
            for process in processes:  # a running KernelSHAP job cannot be interrupted otherwise
                process.terminate()
            for process in processes:
                process.join(5)

    # -- on demand ---------------------------------------------------------------------
    def admit(self, version: "ModelVersion", request: Any, inputs: Mapping[str, np.ndarray],
              ctx: "RequestContext") -> Ticket | None:
        """None unless the request asks for an explanation; else a queue place (or the error)."""
        if not explain_requested(request):
            return None
        state: VersionExplain | None = version.extensions.get(KEY)
        if state is None:
            raise ExplainUnavailable(f"{version.label} has explanations turned off (explain.enabled: false)")
        try:
            self._authorize(ctx)
        except LockgateError:
            state.count(state.outcomes, "refused")
            raise
        if state.unavailable:
            state.count(state.outcomes, "unavailable")
            raise ExplainUnavailable(state.unavailable)
        rows = inputs[state.input_name]
        if len(rows) > state.config.max_rows:
            state.count(state.outcomes, "invalid")
            raise InvalidArgument(f"input '{state.input_name}': {len(rows)} rows to explain exceeds explain.max_rows "
                                  f"{state.config.max_rows} of {version.label}")
        if state.in_flight >= state.config.max_queue:
            state.count(state.outcomes, "queue_full")
            raise ExplainQueueFull(f"{version.label}: {state.in_flight} explanations in progress fill its explain "
                                   f"queue (explain.max_queue {state.config.max_queue}); retry later or without "
                                   f"'{EXPLAIN_PARAMETER}'")
        return Ticket(state)

    def _authorize(self, ctx: "RequestContext") -> None:
        auth = self.authenticator
        if auth is None or len(auth) == 0:
            return
        auth.check(ctx.metadata.get(AUTHORIZATION), Permission.EXPLAIN)

    async def attach(self, ticket: Ticket, inputs: Mapping[str, np.ndarray], response: Any,
                     ctx: "RequestContext") -> None:
        """Explain the request's rows and add the attribution outputs to ``response``."""
        state = ticket.state
        explanation = await self._run(ticket, inputs[state.input_name], ctx.deadline, state.outcomes)
        encode_explanation(response, explanation)

    async def _run(self, ticket: Ticket, rows: np.ndarray, deadline: float | None, table: dict[str, int]) -> Any:
        state = ticket.state
        limit = time.monotonic() + state.config.timeout_s
        deadline = limit if deadline is None else min(deadline, limit)
        rows = np.array(rows, copy=True)
        loop = asyncio.get_running_loop()
        try:
            future = self._executor().submit(worker.explain_job, state.spec, rows, deadline)
        except (BrokenProcessPool, RuntimeError) as exc:
            self._reset_pool()
            state.count(table, "failed")
            raise Unavailable(f"{state.label}: the explain pool is restarting ({exc}); retry") from None
        ticket.submitted = True

        def done(_future: Any) -> None:
            try:
                loop.call_soon_threadsafe(ticket.release)
            except RuntimeError:  # the loop is gone (shutdown): nothing left to admit
                ticket.release()

        future.add_done_callback(done)
        try:
            result = await asyncio.wait_for(asyncio.wrap_future(future), max(0.0, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            state.count(table, "deadline_exceeded")
            raise ExplainDeadlineExceeded(f"{state.label}: the explanation did not finish within its deadline "
                                          f"(explain.timeout_s {state.config.timeout_s:g}, or the request's)") from None
        except BrokenProcessPool:
            self._reset_pool()
            state.count(table, "failed")
            raise Unavailable(f"{state.label}: an explain worker died; the pool was restarted, retry") from None
        except ExplainDeadlineExceeded:
            state.count(table, "deadline_exceeded")
            raise
        except LockgateError as exc:
            state.count(table, "invalid" if exc.code == "INVALID_ARGUMENT" else "failed")
            raise
        except Exception as exc:  # a bug or a library error in the worker: named, never a bare crash
            state.count(table, "failed")
            log.exception("%s: explanation failed", state.label)
            raise ExplainUnavailable(f"{state.label}: the explanation failed: {type(exc).__name__}: {exc}") from None
        state.count(table, "ok")
        return result

    # -- sampled payloads (the governance stage's hook) ------------------------------------
    def sample(self, version: "ModelVersion", engine: Any, inspection: Any, inputs: Mapping[str, np.ndarray],
               outputs: Mapping[str, np.ndarray], route: str) -> bool:
        """Take over logging a sampled payload when its explanation is due; False: log it as usual."""
        state: VersionExplain | None = version.extensions.get(KEY)
        if state is None or state.config.sample_share <= 0 or not _chosen(inspection.request_id, state.config.sample_share):
            return False
        pending = _PendingSample(engine, inspection, {k: np.array(v, copy=True) for k, v in inputs.items()},
                                 {k: np.array(v, copy=True) for k, v in outputs.items()}, route, version.version)
        reason = None
        if state.unavailable:
            reason = "explain_unavailable"
        elif state.input_name not in inputs or len(inputs[state.input_name]) > state.config.max_rows:
            reason = "too_many_rows"
        elif state.sampled_in_flight >= state.config.sample_max_queue:
            reason = "explain_queue_full"
        if reason is not None:
            state.count(state.sampled, reason)
            pending.log({"explanation": {"status": "skipped", "reason": reason}})
            return True
        ticket = Ticket(state, sampled=True)
        state.pending.add(pending)
        task = asyncio.get_running_loop().create_task(self._explain_sample(ticket, pending))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return True

    async def _explain_sample(self, ticket: Ticket, pending: _PendingSample) -> None:
        state = ticket.state
        try:
            explanation = await self._run(ticket, pending.inputs[state.input_name], None, state.sampled)
        except asyncio.CancelledError:
            pending.log({"explanation": {"status": "unfinished", "reason": "shutting down"}})
            raise
        except LockgateError as exc:
            pending.log({"explanation": {"status": "failed", "reason": exc.reason, "message": exc.message}})
            return
        finally:
            ticket.abandon()
            state.pending.discard(pending)
        pending.log({"explanation": {"status": "ok", **explanation.summary()},
                     "attributions": {explanation.input: explanation.attributions}})
        if state.tracker is not None:
            state.tracker.add(explanation.attributions, explanation.method, explanation.features, explanation.outputs)

    # -- metrics (the metrics thread, at scrape time) ----------------------------------------
    def metric_samples(self) -> Iterator[Any]:
        from lockgate.telemetry.metrics import Sample

        states = list(self._states.values())
        latest: dict[tuple[str, str], Any] = {}
        for state in states:
            mv = {"model": state.model, "version": state.version}
            for outcome, n in list(state.outcomes.items()):
                yield Sample("lockgate_explanations", {**mv, "outcome": outcome}, n)
            for outcome, n in list(state.sampled.items()):
                yield Sample("lockgate_explanations_sampled", {**mv, "outcome": outcome}, n)
            yield Sample("lockgate_explain_in_flight", {**mv, "queue": "on_demand"}, state.in_flight)
            yield Sample("lockgate_explain_in_flight", {**mv, "queue": "sampled"}, state.sampled_in_flight)
            if state.tracker is not None:
                state.tracker.maybe_close()
                if state.tracker.last is not None:
                    latest[(state.model, state.version)] = state
        for (model, version), state in latest.items():
            mv = {"model": model, "version": version}
            live = state.tracker.last.per_feature()
            for feature, value in live.items():
                yield Sample("lockgate_feature_importance", {**mv, "feature": feature}, value)
            baselines = {"reference": state.tracker.reference}
            for (other_model, other_version), other in latest.items():
                if other_model == model and other_version != version:
                    baselines[f"version {other_version}"] = other.tracker.last.per_feature()
            pair = self.canary_of(model) if self.canary_of is not None else None
            if pair is not None and version == pair[1] and f"version {pair[0]}" in baselines:
                baselines["stable"] = baselines[f"version {pair[0]}"]  # one series to alert on
            for name, baseline in baselines.items():
                shift = importance_shift(live, baseline)
                if shift is not None:
                    yield Sample("lockgate_feature_importance_shift", {**mv, "baseline": name}, shift["shift"])


def _add_output(response: Any, name: str, array: np.ndarray) -> None:
    out = response.outputs.add()
    out.name = name
    out.datatype = "FP32"
    out.shape.extend(array.shape)
    response.raw_output_contents.append(array.tobytes())


def encode_explanation(response: Any, explanation: Any) -> None:
    """The two extra outputs (raw FP32, like every output) and the parameters that label them."""
    _add_output(response, ATTRIBUTIONS_OUTPUT, explanation.attributions)
    _add_output(response, BASE_VALUE_OUTPUT, explanation.base_value)
    params = response.parameters
    params["lockgate_explain_method"].string_param = explanation.method
    params["lockgate_explain_space"].string_param = explanation.space
    params["lockgate_explained_output"].string_param = explanation.output
    params["lockgate_attribution_features"].string_param = json.dumps(explanation.features)
    params["lockgate_attribution_outputs"].string_param = json.dumps(explanation.outputs)
