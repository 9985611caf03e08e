"""The one entry point the request pipeline calls, per model version.

Request path (cheap, allocation-light): :meth:`GovernanceEngine.inspect` runs the fused
kernel once per input tensor and decides sampling; :meth:`observe_outputs` runs the same
kernel (without rules) over the outputs, into the window the request was inspected in
(:mod:`lockgate.governance.windowing`); :meth:`log_payload` queues a record without
blocking. Everything else — sketch feeding, window closing, drift evaluation, alerting,
persisting, writing payloads — happens on background threads.

Layout: the last axis of a tensor holds its features, every leading axis is rows
(``reshape(-1, last)``). A 1-D tensor is ``n rows x 1 feature`` unless the tensor has more
than one feature (known from the profile, the constraints, or a declared shape such as
``[32]``), in which case a 1-D array of exactly that many values is one row.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from google.rpc import error_details_pb2

from ._kernels import RULE_ALLOWED, RULE_INF, RULE_MAX, RULE_MIN, RULE_NAN, Accumulator
from .config import FeatureRule, GovernanceConfig, InputConstraints
from .drift import DriftEvent, DriftMonitor, DriftReport
from .payload_log import PayloadLog, Redactor
from .profile import ReferenceProfile, TensorProfile
from .sampling import Sampler
from .sketches import SketchSet
from .state import TensorState, WindowState, merge_all
from .windowing import Epoch

log = logging.getLogger("lockgate.governance")

RULE_NAMES = {RULE_NAN: "allow_nan", RULE_INF: "allow_inf", RULE_MIN: "min", RULE_MAX: "max", RULE_ALLOWED: "allowed"}
_KERNEL_DTYPES = frozenset({np.dtype(np.float32), np.dtype(np.float64), np.dtype(np.int32), np.dtype(np.int64)})
MESSAGE_LIMIT = 10
# A governed input whose rows are not the governed width (no per-value rule code: the kernel
# never sees such a tensor).
RULE_FEATURE_COUNT = "feature_count"


@dataclass(slots=True, frozen=True)
class Violation:
    input: str
    row: int
    feature: int
    feature_name: str
    rule: str  # allow_nan | allow_inf | min | max | allowed
    value: float
    limit: str  # the rule as declared, e.g. "min=0.0", "allow_nan=false"

    def describe(self) -> str:
        if self.rule == RULE_FEATURE_COUNT:
            return (f"input '{self.input}': {self.feature_name} does not give {self.limit} per row (the last axis), "
                    "so its rules cannot be checked; send rows of that width")
        return (
            f"input '{self.input}' row {self.row} feature '{self.feature_name}' (index {self.feature}): "
            f"value {_fmt(self.value)} breaks rule {self.limit}"
        )

    @property
    def field(self) -> str:
        """The request field a ``google.rpc.BadRequest`` names."""
        if self.rule == RULE_FEATURE_COUNT:
            return f"inputs[{self.input}]"
        return f"inputs[{self.input}][{self.row}][{self.feature}]"

    def as_dict(self) -> dict[str, Any]:
        value: Any = self.value if math.isfinite(self.value) else str(self.value)
        return {"input": self.input, "row": self.row, "feature": self.feature, "feature_name": self.feature_name,
                "rule": self.rule, "value": value, "limit": self.limit}  # fmt: skip


def _fmt(value: float) -> str:
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return repr(int(value)) if value == int(value) and abs(value) < 1e15 else repr(value)


@dataclass(frozen=True, slots=True)
class Inspection:
    violations: list[Violation]
    violation_count: int
    reject: bool
    sampled: bool
    request_id: str = ""
    trace_id: str | None = None
    timestamp: float = field(default_factory=time.time)
    epoch: Epoch | None = field(default=None, repr=False, compare=False)  # the drift window it was counted in

    def message(self, limit: int = MESSAGE_LIMIT) -> str:
        """One line naming input, row, feature (name and index), value and rule per problem."""
        if not self.violation_count:
            return ""
        shown = "; ".join(v.describe() for v in self.violations[:limit])
        more = self.violation_count - min(limit, len(self.violations))
        head = f"{self.violation_count} input constraint violation{'s' if self.violation_count != 1 else ''}: "
        return head + shown + (f"; and {more} more" if more > 0 else "")

    def bad_request(self, limit: int = 50) -> error_details_pb2.BadRequest:
        """``google.rpc.BadRequest`` with one field violation per problem (capped)."""
        detail = error_details_pb2.BadRequest()
        for v in self.violations[:limit]:
            detail.field_violations.add(field=v.field, description=v.describe())
        return detail


def _rule_limit(rule: FeatureRule | None, code: int) -> str:
    if code == RULE_NAN:
        return "allow_nan=false"
    if code == RULE_INF:
        return "allow_inf=false"
    if rule is None:
        return RULE_NAMES.get(code, str(code))
    if code == RULE_MIN:
        return f"min={_fmt(float(rule.min))}" if rule.min is not None else "min"
    if code == RULE_MAX:
        return f"max={_fmt(float(rule.max))}" if rule.max is not None else "max"
    allowed = sorted(rule.allowed or [])
    shown = ", ".join(str(a) for a in allowed[:10]) + (", ..." if len(allowed) > 10 else "")
    return f"allowed={{{shown}}}"


class _Tensor:
    """Kernel state and sketches of one tensor of one model version."""

    def __init__(
        self,
        name: str,
        kind: str,
        n_features: int,
        *,
        constraints: InputConstraints | None,
        profile: TensorProfile | None,
        config: GovernanceConfig,
        classifier: bool = False,
        categorical_default: bool = False,
    ) -> None:
        self.name = name
        self.kind = kind
        self.n_features = n_features
        rules: dict[int, FeatureRule] = constraints.resolve(n_features) if constraints else {}
        self.rules = rules
        if profile is not None and len(profile.features) == n_features:
            names = profile.feature_names
            edges: list[Any] = profile.edges()
            categorical = profile.categorical_indices()
            classifier = classifier or profile.classes is not None
        else:
            names = constraints.names(n_features) if constraints else [f"f{j}" for j in range(n_features)]
            edges = [[] for _ in range(n_features)]
            categorical = set(range(n_features)) if categorical_default else set()
        if constraints:
            categorical |= constraints.categorical_indices(n_features)
            declared = constraints.names(n_features)
            names = [declared[j] if declared[j] != f"f{j}" else names[j] for j in range(n_features)]
        self.feature_names = names
        self.categorical = categorical
        self.classifier = classifier
        # A governed input (one with constraints) checks every feature against the NaN/Inf
        # defaults, named in a rule or not; an input that is only profiled allows them.
        self.governed = constraints is not None
        lo = np.full(n_features, -np.inf)
        hi = np.full(n_features, np.inf)
        allow_nan = np.full(n_features, not self.governed or constraints.allow_nan, dtype=bool)
        allow_inf = np.full(n_features, not self.governed or constraints.allow_inf, dtype=bool)
        allowed: list[Any] = [None] * n_features
        for j, rule in rules.items():
            lo[j] = -np.inf if rule.min is None else rule.min
            hi[j] = np.inf if rule.max is None else rule.max
            allow_nan[j] = constraints.allows(rule, "allow_nan")
            allow_inf[j] = constraints.allows(rule, "allow_inf")
            allowed[j] = rule.allowed
        self.acc = Accumulator(
            n_features, lo=lo, hi=hi, allow_nan=allow_nan, allow_inf=allow_inf, allowed=allowed, edges=edges,
            max_violations=config.max_violations, buffer_rows=config.drift.sketch_buffer_rows,
        )  # fmt: skip
        self.sketches = self._new_sketches(config)
        self._config = config

    def _new_sketches(self, config: GovernanceConfig) -> SketchSet:
        return SketchSet(
            self.n_features, k=config.drift.kll_k, categorical=self.categorical, classifier=self.classifier,
            lg_max_k=config.drift.frequent_lg_max_k,
        )  # fmt: skip

    def update_reshaped(self, array: Any) -> Any:
        """The kernel's result for an array it refused as it is (other layout or dtype): 0 or
        the violations tuple, or None when the array cannot be viewed as (rows x features).
        Callers try ``acc.update(array)`` first; the kernel checks before touching any state."""
        rows = self.rows_of(np.asarray(array))
        return None if rows is None else self.acc.update(rows)

    def rows_of(self, array: np.ndarray) -> np.ndarray | None:
        """The (rows x features) kernel view of ``array``; None if it does not fit."""
        if array.dtype not in _KERNEL_DTYPES:
            if array.dtype.kind not in "biuf":
                return None
            array = array.astype(np.float64)
        F = self.n_features
        if array.ndim >= 2:
            if array.shape[-1] != F:
                return None
            if array.ndim > 2:
                array = array.reshape(-1, F)
        elif array.ndim == 1:
            if F == 1:
                array = array.reshape(-1, 1)
            elif array.shape[0] == F:
                array = array.reshape(1, F)
            else:
                return None
        else:
            if F != 1:
                return None
            array = array.reshape(1, 1)
        if not array.flags.c_contiguous or not array.dtype.isnative:
            array = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("="))
        return array

    def feed(self) -> None:
        """Move buffered rows into the sketches (background thread)."""
        block = self.acc.drain()
        if block.size:
            self.sketches.feed(block)

    def take(self, reset: bool) -> TensorState:
        taken = self.acc.take(reset)
        self.feed()
        sketches = self.sketches
        if reset:
            self.sketches = self._new_sketches(self._config)
        else:  # a copy, so the live sketches keep accumulating
            sketches = _copy_sketches(sketches)
        return TensorState.from_kernel(self.name, self.kind, self.feature_names, self.acc.edge_offsets, taken, sketches)

    def cut(self) -> tuple[dict[str, Any], np.ndarray, SketchSet]:
        """Take and reset the state, with the rows still buffered, and start fresh sketches.
        Cheap (copies, no sketch work): the engine calls it under the cut lock."""
        taken = self.acc.take(True)
        block = self.acc.drain()
        sketches, self.sketches = self.sketches, self._new_sketches(self._config)
        return taken, block, sketches

    def state_from_cut(self, cut: tuple[dict[str, Any], np.ndarray, SketchSet]) -> TensorState:
        """The window state of a :meth:`cut`, its buffered rows fed into its sketches."""
        taken, block, sketches = cut
        if block.size:
            sketches.feed(block)
        return TensorState.from_kernel(self.name, self.kind, self.feature_names, self.acc.edge_offsets, taken, sketches)


def _copy_sketches(sketches: SketchSet) -> SketchSet:
    out = sketches.fresh()
    for src, dst in zip(sketches.kll, out.kll):
        dst.merge(src)
    for j, dst in out.frequent.items():
        dst.merge(sketches.frequent[j])
    if sketches.class_counts is not None:
        out.class_counts = sketches.class_counts.copy()
    return out


def _declared_features(shape: Sequence[int] | None) -> int | None:
    if not shape:
        return None
    last = int(shape[-1])
    if len(shape) == 1:
        return last if last > 0 else 1
    return last if last > 0 else None


class GovernanceEngine:
    """Validation, profiling, drift and payload sampling for one model version."""

    def __init__(
        self,
        model: str,
        version: str,
        config: GovernanceConfig,
        input_names: list[str],
        profile: ReferenceProfile | None,
        *,
        input_shapes: Mapping[str, Sequence[int]] | None = None,
        output_shapes: Mapping[str, Sequence[int]] | None = None,
        state_dir: str | Path | None = None,
        background: bool = True,
        feed_interval: float = 0.25,
        labels: Mapping[str, Sequence[str]] | None = None,
        profile_source: Callable[[], ReferenceProfile | None] | None = None,
    ) -> None:
        """``input_shapes`` / ``output_shapes``: the model's declared shapes (``-1`` = variable),
        which fix the feature count of tensors without a profile or constraints. Given them (the
        server always does), a tensor whose feature count neither they, the config nor the
        profile fix is not profiled: its state is never sized by what a caller sends. Without
        them (offline use) a tensor is sized by the first array it sees. ``state_dir``: where closed drift windows
        (``drift/<model>/<version>/window-<n>.bin``) and, by default, payload logs
        (``payloads/<model>/<version>/``) go. ``background=False`` runs no threads: call
        :meth:`feed_sketches` / :meth:`close_window` yourself (tests, CLI). ``labels`` and
        ``profile_source``: see :class:`~lockgate.governance.drift.DriftMonitor`."""
        unknown = set(config.inputs) - set(input_names)
        if unknown:
            raise ValueError(f"governance constraints name unknown inputs {sorted(unknown)} (model inputs: {input_names})")
        self.model = model
        self.version = str(version)
        self.config = config
        self.input_names = list(input_names)
        self.profile = profile
        self.state_dir = Path(state_dir) if state_dir is not None else None
        self.enabled = config.enabled
        self.reject_mode = config.mode == "reject"
        self._shapes = dict(input_shapes or {})
        self._output_shapes = None if output_shapes is None else dict(output_shapes)
        self._signature_known = input_shapes is not None
        self._unprofiled: set[str] = set()  # tensors of unknown width: skipped and counted
        self._bind_lock = threading.Lock()
        self._window_lock = threading.RLock()
        # Held for the pointer swaps of a window cut, and by the request path around a
        # request's input update and its output update, so both land in the same window.
        self._cut_lock = threading.Lock()
        self.inputs: dict[str, _Tensor] = {}
        # Output tensors are made per window (epoch), from these specs: name -> _Tensor kwargs.
        self._output_specs: dict[str, dict[str, Any]] = {}
        for name in self.input_names:
            n = self._input_features(name)
            if n is not None:
                self.inputs[name] = self._make_input(name, n)
            elif name in config.inputs:  # a rule with no width to check it at: a config error
                raise ValueError(f"governance input {name!r} has constraints but no feature count: the model's "
                                 "last dimension is free, so set feature_count (or feature_names)")
            elif self._signature_known:
                self._unprofiled.add(name)
                log.info("%s/%s: input %r has no fixed feature count (shape %s); it is not profiled. Set "
                         "governance.inputs.%s.feature_count to profile it", model, self.version, name,
                         list(self._shapes.get(name) or []), name)
        if profile is not None:
            for name, tp in profile.tensors.items():
                if tp.kind == "output":
                    self._output_specs[name] = {"n_features": len(tp.features), "profile": tp}
        # The outcome of a request that broke no rule and was not sampled is shared and
        # immutable: each window (epoch) has one, which tells observe_outputs where the
        # request's outputs belong.
        self._epoch = self._new_epoch(0, time.time())
        self._clean = self._clean_for(self._epoch)
        self._closing: list[Epoch] = []  # cut, waiting for their requests' outputs
        self.late_outputs = 0  # outputs that came after their window was evaluated
        self.sampler = Sampler(config.sampling)
        self.monitor = DriftMonitor(model, self.version, config.drift, profile, state_dir if config.drift.persist else None,
                                    labels=labels, profile_source=profile_source)  # fmt: skip
        self.payload_log = self._make_payload_log()
        # counters
        self.requests = 0
        self.rejected = 0
        self.flagged = 0
        self.violations_total = 0
        self.skipped_tensors = 0  # tensors the kernel could not read (strings, mismatched feature count)
        self.width_violations: dict[str, int] = {}  # governed inputs sent at another width, by input
        self.payload_unlogged = 0  # sampled, but payload logging is off or has no directory
        self.window_errors = 0
        self._window_rows = config.drift.window_rows
        # False when several replicas share one drift status (lockgate.governance.fleet).
        self.local_windows = True
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        if background and config.enabled and config.drift.enabled:
            self._thread = threading.Thread(
                target=self._run, args=(feed_interval,), name=f"governance:{model}/{version}", daemon=True
            )
            self._thread.start()

    # ------------------------------------------------------------ construction helpers
    def _input_features(self, name: str) -> int | None:
        if self.profile is not None and name in self.profile.tensors:
            return len(self.profile.tensors[name].features)
        constraints = self.config.inputs.get(name)
        if constraints is not None and constraints.min_features():
            declared = _declared_features(self._shapes.get(name))
            return max(constraints.min_features(), declared or 0)
        return _declared_features(self._shapes.get(name))

    def _make_input(self, name: str, n_features: int) -> _Tensor:
        tp = self.profile.tensors.get(name) if self.profile is not None else None
        return _Tensor(name, "input", n_features, constraints=self.config.inputs.get(name), profile=tp, config=self.config)

    def _make_payload_log(self) -> PayloadLog | None:
        cfg = self.config.payload_log
        if not cfg.enabled:
            return None
        directory = cfg.dir
        if directory is None:
            if self.state_dir is None:
                return None
            directory = self.state_dir / "payloads" / self.model / self.version
        names = {n: t.feature_names for n, t in self.inputs.items()}
        return PayloadLog(
            directory, max_bytes=cfg.max_bytes, max_files=cfg.max_files, queue_size=cfg.queue_size,
            redactor=Redactor(cfg.redact, names),
        )  # fmt: skip

    def _bind(self, table: dict[str, _Tensor], name: str, array: np.ndarray, kind: str) -> _Tensor | None:
        """Create the state of a tensor first seen now (feature count from its last axis)."""
        with self._bind_lock:
            tensor = table.get(name)
            if tensor is not None:
                return tensor
            if array.dtype.kind not in "biuf":
                return None
            if kind == "input":
                shapes = self._shapes if self._signature_known else None
            else:
                shapes = self._output_shapes
            if shapes is None:
                n = int(array.shape[-1]) if array.ndim >= 2 else 1  # offline: sized by the first array
            else:
                n = _declared_features(shapes.get(name))  # never by what a caller sent
                if n is None:
                    self._unprofiled.add(name)
                    log.info("%s/%s: %s %r has no fixed feature count; it is not profiled", self.model,
                             self.version, kind, name)
                    return None
            if n < 1:
                return None
            if kind == "input":
                tensor = self._make_input(name, n)
            else:
                spec = self._output_specs.setdefault(name, {
                    "n_features": n, "profile": None, "classifier": array.dtype.kind == "f" and n > 1,
                    "categorical_default": array.dtype.kind in "biu",
                })  # fmt: skip
                tensor = self._make_output(name, spec)
            table[name] = tensor
            return tensor

    def _make_output(self, name: str, spec: dict[str, Any]) -> _Tensor:
        return _Tensor(name, "output", spec["n_features"], constraints=None, profile=spec["profile"], config=self.config,
                       classifier=spec.get("classifier", False), categorical_default=spec.get("categorical_default", False))  # fmt: skip

    def _new_epoch(self, index: int, start: float) -> Epoch:
        """A window's bookkeeping, with output tensors for every output known so far."""
        return Epoch(index, start, {name: self._make_output(name, spec) for name, spec in list(self._output_specs.items())})

    @staticmethod
    def _clean_for(epoch: Epoch) -> Inspection:
        """The open window's shared "nothing to report" inspection. The engine holds it, not the
        epoch: epoch -> inspection -> epoch would be a reference cycle that keeps the window's
        sketches alive until the garbage collector runs (or past interpreter exit)."""
        return Inspection([], 0, False, False, epoch=epoch)

    @property
    def outputs(self) -> dict[str, _Tensor]:
        """The output tensors of the open window."""
        return self._epoch.outputs

    # ------------------------------------------------------------ request path
    def inspect(
        self, inputs: Mapping[str, np.ndarray], request_id: str, trace_id: str | None = None, trace_sampled: bool | None = None
    ) -> Inspection:
        """Validate and profile one request's inputs; decide whether its payload is sampled."""
        if not self.enabled:
            return Inspection([], 0, False, False, request_id, trace_id)
        self.requests += 1
        count = 0
        violations: list[Violation] = []
        with self._cut_lock:  # the inputs and the window stamp of one request go together
            epoch, clean = self._epoch, self._clean
            for name, array in inputs.items():
                tensor = self.inputs.get(name)
                if tensor is None:
                    tensor = None if name in self._unprofiled else self._bind(self.inputs, name, array, "input")
                    if tensor is None:
                        self.skipped_tensors += 1
                        continue
                try:  # fast path: already (rows x features), C-contiguous, a kernel dtype
                    found = tensor.acc.update(array)
                except (TypeError, ValueError):
                    found = tensor.update_reshaped(array)
                if found is None:
                    if tensor.governed:  # its rules cannot be checked at this width: a violation, never a skip
                        count += 1
                        self._width_violation(tensor, np.asarray(array), violations)
                    else:
                        self.skipped_tensors += 1
                    continue
                if found:
                    count += found[0]
                    self._describe(tensor, found, violations)
            if count and self.reject_mode:
                epoch.rejected += 1  # refused: no outputs will follow
            else:
                epoch.pending += 1
        if count:
            self.violations_total += count
            if self.reject_mode:
                self.rejected += 1
            else:
                self.flagged += 1
        sampled = self.sampler.decide(request_id, trace_id, trace_sampled, violated=count > 0)
        if self._window_rows is not None and self.inputs:
            first = next(iter(self.inputs.values()))
            if first.acc.rows >= self._window_rows:
                self._wake.set()
        if not count and not sampled:
            return clean  # nearly every request: nothing to report or record, nothing to build
        return Inspection(violations, count, count > 0 and self.reject_mode, sampled, request_id, trace_id, epoch=epoch)

    def _width_violation(self, tensor: _Tensor, array: np.ndarray, out: list[Violation]) -> None:
        self.width_violations[tensor.name] = self.width_violations.get(tensor.name, 0) + 1
        if len(out) >= self.config.max_violations:
            return
        F = tensor.n_features
        if array.dtype.kind not in "biuf":
            got = f"datatype {array.dtype} (not numeric)"
        else:
            shape = list(array.shape[:4]) + (["..."] if array.ndim > 4 else [])
            got = f"shape {shape}".replace("'", "")
        out.append(Violation(
            input=tensor.name, row=-1, feature=-1, feature_name=got, rule=RULE_FEATURE_COUNT,
            value=float(array.shape[-1]) if array.ndim else 1.0, limit=f"{F} feature{'s' if F != 1 else ''}",
        ))

    def _describe(self, tensor: _Tensor, found: tuple, out: list[Violation]) -> None:
        _total, rows, feats, rules, values = found
        room = self.config.max_violations - len(out)
        for i in range(min(room, len(rows))):
            j = int(feats[i])
            code = int(rules[i])
            out.append(
                Violation(
                    input=tensor.name, row=int(rows[i]), feature=j, feature_name=tensor.feature_names[j],
                    rule=RULE_NAMES.get(code, str(code)), value=float(values[i]),
                    limit=_rule_limit(tensor.rules.get(j), code),
                )  # fmt: skip
            )

    def observe_outputs(self, outputs: Mapping[str, np.ndarray], inspection: Inspection | None = None) -> None:
        """Profile the outputs (same kernel, no rules) in the window the request's inputs were
        counted in (``inspection.epoch``; the open window without one). Sketches are fed off
        the request path."""
        if not self.enabled:
            return
        with self._cut_lock:
            epoch = inspection.epoch if inspection is not None and inspection.epoch is not None else None
            if epoch is None:
                epoch = self._epoch
            elif epoch.final:  # evaluated already (the grace period ran out): count, never misplace
                epoch.late += 1
                self.late_outputs += 1
                return
            table = epoch.outputs
            for name, array in outputs.items():
                tensor = table.get(name)
                if tensor is None:
                    tensor = None if name in self._unprofiled else self._bind(table, name, np.asarray(array), "output")
                    if tensor is None:
                        self.skipped_tensors += 1
                        continue
                try:  # fast path, as for inputs
                    tensor.acc.update(array)
                except (TypeError, ValueError):
                    if tensor.update_reshaped(array) is None:
                        self.skipped_tensors += 1
            if inspection is not None and inspection.epoch is not None:
                epoch.answered += 1
                epoch.settle()

    def abandon(self, inspection: Inspection) -> None:
        """The request was inspected and accepted but will have no outputs (inference failed,
        the deadline passed, the caller went away): its window stops waiting for it."""
        epoch = inspection.epoch
        if epoch is None or inspection.reject:
            return
        with self._cut_lock:
            if not epoch.final:
                epoch.failed += 1
                epoch.settle()

    def log_payload(
        self, inspection: Inspection, inputs: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray] | None,
        route: str, served_version: str, extra: Mapping[str, Any] | None = None,
    ) -> None:  # fmt: skip
        """Queue the request's record if it was sampled. Never blocks; drops are counted.
        ``extra``: more fields of the record (an explanation and its attributions)."""
        if not inspection.sampled:
            return
        if self.payload_log is None:
            self.payload_unlogged += 1
            return
        self.payload_log.submit(
            {
                "timestamp": inspection.timestamp,
                "model": self.model,
                "version": served_version,
                "route": route,
                "request_id": inspection.request_id,
                "trace_id": inspection.trace_id,
                "violation_count": inspection.violation_count,
                "violations": [v.as_dict() for v in inspection.violations],
                "inputs": {k: np.array(v, copy=True) for k, v in inputs.items()},
                "outputs": {k: np.array(v, copy=True) for k, v in (outputs or {}).items()},
                **(extra or {}),
            }
        )

    # ------------------------------------------------------------ windows
    def subscribe(self, callback: Callable[[DriftEvent], None]) -> Callable[[], None]:
        return self.monitor.subscribe(callback)

    def feed_sketches(self) -> None:
        with self._window_lock:
            for tensor in self.inputs.values():
                tensor.feed()
            for epoch in [*self._closing, self._epoch]:
                for tensor in list(epoch.outputs.values()):
                    tensor.feed()

    def snapshot(self) -> bytes:
        """Serialised state of the open window (not reset), for merging across replicas."""
        with self._window_lock, self._cut_lock:
            epoch = self._epoch
            tensors = {t.name: t.take(False) for t in [*self.inputs.values(), *epoch.outputs.values()]}
            state = WindowState(self.model, self.version, epoch.start, time.time(), tensors,
                                accounting=epoch.accounting(), profile=self._profile_digest())  # fmt: skip
        return state.to_bytes()

    def _profile_digest(self) -> str:
        return self.profile.digest() if self.profile is not None else ""

    def _cut(self) -> Epoch:
        """Close the open window to new requests; it then waits for its requests' outputs."""
        with self._window_lock:
            fresh = self._new_epoch(0, 0.0)  # built outside the cut lock: it may allocate a lot
            fresh_clean = self._clean_for(fresh)
            with self._cut_lock:
                old = self._epoch
                now = time.time()
                cuts = {name: tensor.cut() for name, tensor in self.inputs.items()}
                fresh.index, fresh.start = old.index + 1, now
                old.end, old.closed = now, True
                if old.pending <= 0:
                    old.drained.set()
                self._epoch, self._clean = fresh, fresh_clean
            old.inputs_state = {name: self.inputs[name].state_from_cut(cut) for name, cut in cuts.items()}
            self._closing.append(old)
            return old

    def _finalise(self, epoch: Epoch) -> WindowState:
        """The closed window's state: its inputs, and the outputs of its requests so far."""
        with self._window_lock:
            with self._cut_lock:
                epoch.final = True
                cuts = {name: tensor.cut() for name, tensor in epoch.outputs.items()}
                accounting = epoch.accounting()
            if epoch in self._closing:
                self._closing.remove(epoch)
            tensors = dict(epoch.inputs_state or {})
            tensors.update({name: epoch.outputs[name].state_from_cut(cut) for name, cut in cuts.items()})
            epoch.outputs = {}
            epoch.inputs_state = None
        return WindowState(self.model, self.version, epoch.start, epoch.end or time.time(), tensors,
                           accounting=accounting, profile=self._profile_digest())  # fmt: skip

    def _settled(self, wait_s: float) -> list[WindowState]:
        """Finalise the closed windows, oldest first: those whose requests are all settled, or
        (``wait_s`` < 0) those past the grace period; ``wait_s`` >= 0 waits that long for each."""
        out = []
        with self._window_lock:
            for epoch in list(self._closing):
                if wait_s >= 0:
                    epoch.drained.wait(wait_s)
                elif not epoch.drained.is_set() and time.time() - (epoch.end or 0.0) < self.config.drift.output_grace_s:
                    break  # keep windows in order: a later one waits for this one
                out.append(self._finalise(epoch))
        return out

    def close_window(self, wait_s: float = 0.0) -> DriftReport | None:
        """Close the current window now: persist, evaluate, alert. Returns its report.

        ``wait_s``: how long to wait for the outputs of requests still in flight (0: take the
        window as it is; requests still pending are counted as ``outputs_missing``)."""
        with self._window_lock:
            self._cut()
            report = None
            for state in self._settled(wait_s):
                report = self.monitor.close_window(state)
            return report

    def take_window(self, wait_s: float = 0.0) -> WindowState:
        """Take the open window's state and start a new one (fleet mode ships this to the store).
        Waits up to ``wait_s`` for the outputs of its requests still in flight."""
        with self._window_lock:
            self.feed_sketches()
            self._cut()
            states = self._settled(wait_s)
            return merge_all(states) if len(states) > 1 else states[0]

    def _due(self) -> bool:
        if not self.local_windows:
            return False  # fleet mode: windows are closed on the fleet's wall-clock schedule
        cfg = self.config.drift
        rows = max((t.acc.rows for t in self.inputs.values()), default=0)
        if cfg.window_rows is not None and rows >= cfg.window_rows:
            return True
        return cfg.window_seconds is not None and rows > 0 and time.time() - self._epoch.start >= cfg.window_seconds

    def _run(self, interval: float) -> None:
        while not self._stop.is_set():
            self._wake.wait(interval)
            self._wake.clear()
            try:
                self.feed_sketches()
                if self._due():
                    self._cut()
                for state in self._settled(-1.0):  # evaluated once their requests are answered
                    self.monitor.close_window(state)
            except Exception:  # the request path must never notice
                self.window_errors += 1
                log.exception("governance worker failed for %s/%s", self.model, self.version)

    # ------------------------------------------------------------ telemetry and shutdown
    def violation_counts(self) -> dict[str, dict[str, dict[str, int]]]:
        """Cumulative violations by input -> feature name -> rule."""
        out: dict[str, dict[str, dict[str, int]]] = {}
        for name, tensor in self.inputs.items():
            counts = tensor.acc.violation_counts()
            for j, k in zip(*np.nonzero(counts)):
                out.setdefault(name, {}).setdefault(tensor.feature_names[j], {})[RULE_NAMES[int(k)]] = int(counts[j, k])
        for name, n in list(self.width_violations.items()):  # the whole input, not one feature
            out.setdefault(name, {}).setdefault("*", {})[RULE_FEATURE_COUNT] = n
        return out

    def stats(self) -> dict[str, Any]:
        tensors = [*self.inputs.values(), *self.outputs.values()]
        return {
            "model": self.model,
            "version": self.version,
            "requests": self.requests,
            "rejected": self.rejected,
            "flagged": self.flagged,
            "violations": self.violations_total,
            "violations_by_feature": self.violation_counts(),
            "sampled": self.sampler.sampled,
            "sampled_violations": self.sampler.violations_sampled,
            "sampling_capped": self.sampler.capped,
            "payload": self.payload_log.stats() if self.payload_log else None,
            "payload_dropped": self.payload_log.dropped if self.payload_log else 0,
            "payload_unlogged": self.payload_unlogged,
            "sketch_rows_dropped": sum(t.acc.buffer_dropped for t in tensors),
            "skipped_tensors": self.skipped_tensors,
            "windows_closed": self.monitor.windows_closed,
            "drift_alerts": self.monitor.alerts,
            "drift_status": self.monitor.last_report.status if self.monitor.last_report else None,
            "window_errors": self.window_errors,
            "late_outputs": self.late_outputs,
        }

    def close(self, final_window: bool = True) -> None:
        """Stop the worker, close the open window (if it has rows), flush the payload log."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(5.0)
        try:
            if final_window and any(t.acc.rows for t in self.inputs.values()):
                self.close_window()
            elif final_window:  # windows already cut, waiting for outputs: evaluate what they have
                for state in self._settled(0.0):
                    self.monitor.close_window(state)
        except Exception:
            self.window_errors += 1
            log.exception("final drift window failed for %s/%s", self.model, self.version)
        if self.payload_log is not None:
            self.payload_log.close()
