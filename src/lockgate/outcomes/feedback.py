"""Ground-truth labels in: validate, join with the ledger, count, update quality state.

Transport-agnostic: the gRPC servicer (``transport.grpc.feedback``) and any other adapter
turn their wire format into ``LabelIn`` values and call ``FeedbackIngest.ingest``; the
outcome per label is one of

* ``accepted``: joined with its prediction (exactly once, fleet-wide) and counted in this
  replica's window of the prediction's time;
* ``duplicate``: that (request id, row) already has a label (the first one stands);
* ``unknown``: no prediction with that (request id, row) was recorded;
* ``expired``: its prediction was evicted by retention;
* ``rejected``: malformed (only with ``skip_invalid``; otherwise the whole batch is refused
  with INVALID_ARGUMENT naming the label and field), or the prediction belongs to another
  model (``model_mismatch``).

Ingestion is audited per call, as counts (``outcomes.feedback``), never per label.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import numpy as np
from google.rpc import error_details_pb2

from lockgate.errors import InvalidArgument
from lockgate.outcomes.spec import OutcomeSpec, request_hash, row_keys
from lockgate.outcomes.store import JoinedRow

if TYPE_CHECKING:
    from lockgate.outcomes.service import OutcomeService
    from lockgate.outcomes.windows import WindowKey
    from lockgate.outcomes.state import OutcomeWindow

AUDIT_ACTION = "outcomes.feedback"
#: Labels per join transaction (a unary batch may hold many more).
JOIN_CHUNK = 10_000
MAX_REJECTIONS = 20
MAX_VIOLATIONS = 50
LABEL_KINDS = ("class_name", "class_index", "number", "flag")


@dataclass(slots=True)
class LabelIn:
    """One label as any transport hands it over."""

    request_id: str
    row: int
    kind: str | None  # one of LABEL_KINDS, None when the label has no value
    value: Any
    event_time: float | None = None  # Unix seconds


@dataclass(slots=True)
class FeedbackCounts:
    received: int = 0
    accepted: int = 0
    duplicate: int = 0
    unknown: int = 0
    expired: int = 0
    rejected: int = 0
    reasons: Counter = field(default_factory=Counter)
    rejections: list[dict[str, Any]] = field(default_factory=list)

    def add(self, other: "FeedbackCounts") -> None:
        for name in ("received", "accepted", "duplicate", "unknown", "expired", "rejected"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.reasons.update(other.reasons)
        self.rejections.extend(other.rejections[: max(0, MAX_REJECTIONS - len(self.rejections))])

    def reject(self, index: int, label: LabelIn, reason: str, message: str) -> None:
        self.rejected += 1
        self.reasons[reason] += 1
        if len(self.rejections) < MAX_REJECTIONS:
            self.rejections.append({"index": index, "request_id": label.request_id, "row": label.row,
                                    "reason": reason, "message": message})

    def to_dict(self) -> dict[str, Any]:
        return {"received": self.received, "accepted": self.accepted, "duplicate": self.duplicate,
                "unknown": self.unknown, "expired": self.expired, "rejected": self.rejected,
                "rejected_by_reason": dict(sorted(self.reasons.items()))}

    def describe(self) -> str:
        return (f"{self.received} received: {self.accepted} accepted, {self.duplicate} duplicate, "
                f"{self.unknown} unknown, {self.expired} expired, {self.rejected} rejected")


@dataclass(frozen=True, slots=True)
class Problem:
    index: int
    label: LabelIn
    reason: str
    field: str
    message: str


def label_value(spec: OutcomeSpec, label: LabelIn) -> float | tuple[str, str, str]:
    """The label as a float (class index or regression target), or (reason, field, why not)."""
    if not label.request_id:
        return "no_request_id", "request_id", "request_id is empty"
    kind, value = label.kind, label.value
    if kind is None:
        return "no_value", "label", "has no value (set one of class_name, class_index, number, flag)"
    if isinstance(label.row, bool) or not isinstance(label.row, int) or label.row < 0:
        return "bad_row", "row", f"row must be an integer >= 0, got {label.row!r}"
    if spec.task == "regression":
        if kind != "number":
            return "wrong_type", kind, f"{kind} {value!r} given, but model '{spec.model}' is a regression: send a number"
        number = float(value)
        if not math.isfinite(number):
            return "not_finite", "number", f"{number} is not a finite number"
        return number
    classes = spec.classes
    if kind == "class_name":
        if str(value) in classes:
            return float(classes.index(str(value)))
        return "unknown_class", kind, f"{value!r} is not a class of model '{spec.model}' ({', '.join(classes)})"
    if kind == "flag":
        if spec.task != "binary":
            return "wrong_type", kind, f"a true/false label needs a binary model; '{spec.model}' has {len(classes)} classes"
        return float(spec.positive if value else 1 - spec.positive)
    if kind == "number":
        number = float(value)
        if not math.isfinite(number):
            return "not_finite", kind, f"{number} is not a finite number"
        if number != math.floor(number):
            return "wrong_type", kind, f"{number} is not a class index (classification labels are class names or integers)"
        value = int(number)
    if kind in ("number", "class_index"):
        index = int(value)
        if 0 <= index < len(classes):
            return float(index)
        return "unknown_class", kind, f"class index {index} is outside 0..{len(classes) - 1} of model '{spec.model}'"
    return "wrong_type", kind, f"unknown label kind {kind!r}"


def _invalid(problems: list[Problem], offset_note: str) -> InvalidArgument:
    first = problems[0]
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    details = error_details_pb2.BadRequest()
    for p in problems[:MAX_VIOLATIONS]:
        details.field_violations.add(field=f"labels[{p.index}].{p.field}", description=p.message)
    message = (f"label {first.index} (request '{first.label.request_id}' row {first.label.row}) "
               f"field '{first.field}': {first.message}{more}{offset_note}")
    return InvalidArgument(message, details=details)


class FeedbackIngest:
    """Validates, joins and counts labels for the models of one ``OutcomeService``."""

    def __init__(self, service: "OutcomeService") -> None:
        self.service = service

    def ingest(self, model: str, labels: Sequence[LabelIn], *, skip_invalid: bool = False, offset: int = 0,
               before: FeedbackCounts | None = None) -> FeedbackCounts:
        """Count and join ``labels`` of ``model``; ``offset`` numbers them within a stream.

        Without ``skip_invalid`` a malformed label raises ``InvalidArgument`` before anything of
        this batch is stored; ``before`` (what earlier batches of the call were counted as) is
        named in the message, so nothing is lost silently.
        """
        spec = self.service.spec_for(model)
        counts = FeedbackCounts(received=len(labels))
        values: list[float] = []
        valid: list[int] = []
        problems: list[Problem] = []
        for position, label in enumerate(labels):
            result = label_value(spec, label)
            if isinstance(result, tuple):
                problems.append(Problem(offset + position, label, *result))
            else:
                values.append(result)
                valid.append(position)
        if problems and not skip_invalid:
            note = f"; nothing of this batch was stored; earlier labels of this call: {before.describe()}" if before else \
                "; nothing was stored"
            raise _invalid(problems, note)
        for p in problems:
            counts.reject(p.index, p.label, p.reason, p.message)
        self.service.ledger.flush(timeout=5.0)  # a label right after its prediction joins
        for start in range(0, len(valid), JOIN_CHUNK):
            chunk = valid[start : start + JOIN_CHUNK]
            self._join(spec, [labels[i] for i in chunk], values[start : start + JOIN_CHUNK],
                       [offset + i for i in chunk], counts)
        return counts

    def _join(self, spec: OutcomeSpec, labels: list[LabelIn], values: list[float], indices: list[int],
              counts: FeedbackCounts) -> None:
        service = self.service
        store, book = service.store, service.book
        series = store.series_of(spec.model)
        hashes = np.array([request_hash(label.request_id) for label in labels], dtype=np.uint64)
        keys = row_keys(hashes, np.array([label.row for label in labels], dtype=np.uint64)).tolist()
        now = time.time()
        events = [label.event_time for label in labels]
        staged: dict[WindowKey, OutcomeWindow] = {}

        def contribute(joined: list[JoinedRow], truth: list[float]) -> list:
            staged.clear()
            groups: dict[tuple[int, int], list[int]] = {}
            for i, row in enumerate(joined):
                groups.setdefault((row.series, spec.window_of(row.time_ms)), []).append(i)
            for (series_id, window), members in groups.items():
                state = book.stage(spec, series[series_id], window, staged)
                rows = [joined[i] for i in members]
                cells = np.array([r.cell for r in rows], dtype=np.int64)
                y = np.array([truth[i] for i in members], dtype=np.float64)
                when = np.array([events[joined[i].index] or now for i in members], dtype=np.float64)
                delays = when - np.array([r.time_ms for r in rows], dtype=np.float64) / 1000.0
                if spec.classification:
                    predicted = np.array([r.predicted for r in rows], dtype=np.int64)
                    scores = _scores(spec, rows)
                else:
                    predicted = np.array([r.score for r in rows], dtype=np.float64)
                    scores = None
                state.add_labels(spec, cells, y, predicted, scores, delays)
            return book.upserts(staged)

        with book.lock:
            statuses = store.join_labels(series, keys, values, int(now * 1000), contribute)
            book.adopt(staged)
        for status, label, index in zip(statuses, labels, indices):
            if status == "model_mismatch":
                counts.reject(index, label, "model_mismatch", f"request '{label.request_id}' row {label.row} was "
                              f"served by another model than '{spec.model}'")
            else:
                setattr(counts, status, getattr(counts, status) + 1)
        service.count_labels(spec.model, statuses)

    def audit(self, actor: str, model: str, counts: FeedbackCounts, via: str, error: str | None = None) -> None:
        """One audit entry per call: the counts, never the labels."""
        details: dict[str, Any] = {**counts.to_dict(), "via": via}
        if error:
            details["error"] = error
        self.service.audit(actor, AUDIT_ACTION, model, details)


def _scores(spec: OutcomeSpec, rows: list[JoinedRow]) -> np.ndarray | None:
    if not spec.scored:
        return None
    if spec.task == "binary":
        return np.array([r.score for r in rows], dtype=np.float64)
    return np.stack([np.frombuffer(r.probs, dtype=np.float32) for r in rows]).astype(np.float64)  # type: ignore[arg-type]


def labels_of(rows: Iterable[tuple[str, int, Any, float | None]]) -> list[LabelIn]:
    """``LabelIn`` values from plain (request_id, row, value, event_time) tuples: strings are
    class names, bools flags, numbers numbers (an integral number is a class index for a
    classifier, the target for a regression)."""
    out: list[LabelIn] = []
    for request_id, row, value, event_time in rows:
        if value is None:
            kind = None
        elif isinstance(value, (bool, np.bool_)):
            kind, value = "flag", bool(value)
        elif isinstance(value, str):
            kind = "class_name"
        else:
            kind, value = "number", float(value)
        out.append(LabelIn(str(request_id), row, kind, value, event_time))
    return out
