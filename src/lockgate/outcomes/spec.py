"""An ``outcomes:`` section compiled against a model's signature: what the ledger records.

Compiling once at load does every lookup the request path would otherwise repeat (output
name, feature columns, class indices), checks the section against the model (an output
that does not exist, a feature column outside the input) so a bad configuration fails the
load with a precise message, and fixes the layout of the mergeable window state (classes,
segment groups, bins). The layout's fingerprint travels with every stored window, so states
of different layouts are never added together.

Segments are coded per row into one joint *cell* (mixed radix over every segment's groups),
so any segment or intersection of segments is a marginal sum over cells: exact, and
mergeable by addition.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from itertools import combinations
from typing import Any, Literal, Sequence

import numpy as np

from lockgate.outcomes.config import OutcomesConfig, SegmentConfig

Task = Literal["binary", "multiclass", "regression"]
MISSING = "missing"
OTHER = "other"
_KEY_PERSON = b"lockgate-ledger"
_ROW_STEP = np.uint64(0x9E3779B97F4A7C15)  # odd: row r of a request moves its key by r * step (mod 2^64)


class OutcomeConfigError(ValueError):
    """The ``outcomes:`` section does not fit the model (raised at load; the load fails)."""


_HASH_PROTO = hashlib.blake2b(digest_size=8, person=_KEY_PERSON)


def request_hash(request_id: str) -> int:
    """64-bit BLAKE2b of a request id: every replica computes the same value."""
    state = _HASH_PROTO.copy()  # ~2x cheaper than building a keyed state per call
    state.update(request_id.encode("utf-8", "surrogatepass"))
    return int.from_bytes(state.digest(), "little")



def row_keys(hashes: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Ledger keys (positive int64) of ``(request hash, row)`` pairs, vectorised.

    63 bits: SQLite and PostgreSQL integers are signed. Two different pairs collide only by
    hash chance (~n^2 / 2^64 over n retained rows); a collision is refused at insert and
    counted, never silently merged.
    """
    mixed = hashes.astype(np.uint64) + rows.astype(np.uint64) * _ROW_STEP
    return (mixed >> np.uint64(1)).astype(np.int64)


def row_key(request_id: str, row: int) -> int:
    return int(row_keys(np.array([request_hash(request_id)], np.uint64), np.array([row], np.uint64))[0])


@dataclass(frozen=True, slots=True)
class Segment:
    """One compiled segment: where its value comes from and how a value becomes a group."""

    name: str
    input: str | None
    column: int | None
    parameter: str | None
    per_row: bool
    bins: np.ndarray | None  # float64 cut points
    categories: tuple[str, ...] | None
    numeric_categories: np.ndarray | None  # float64 values of the categories when all are numbers
    groups: tuple[str, ...]

    @property
    def n_groups(self) -> int:
        return len(self.groups)

    @property
    def missing(self) -> int:
        return len(self.groups) - 1

    def codes_of_values(self, values: np.ndarray) -> np.ndarray:
        """Group codes of numeric feature values (NaN -> missing)."""
        values = np.asarray(values, dtype=np.float64)
        nan = np.isnan(values)
        if self.bins is not None:
            codes = np.searchsorted(self.bins, values, side="right").astype(np.int64)
        else:
            codes = np.full(values.shape, len(self.categories or ()), dtype=np.int64)  # other
            if self.numeric_categories is not None:
                order = np.argsort(self.numeric_categories, kind="stable")
                cats = self.numeric_categories[order]
                pos = np.clip(np.searchsorted(cats, values), 0, len(cats) - 1)
                hit = cats[pos] == values
                codes[hit] = order[pos[hit]]
        codes[nan] = self.missing
        return codes

    def code_of_text(self, value: Any) -> int:
        """Group code of one parameter value (None -> missing)."""
        if value is None:
            return self.missing
        text = str(value).strip()
        if self.bins is not None:
            try:
                number = float(text)
            except ValueError:
                return self.missing
            if math.isnan(number):
                return self.missing
            return int(np.searchsorted(self.bins, number, side="right"))
        assert self.categories is not None
        try:
            return self.categories.index(text)
        except ValueError:
            return len(self.categories)  # other


def _group_names(name: str, config: SegmentConfig) -> tuple[tuple[str, ...], tuple[str, ...] | None]:
    if config.bins is not None:
        edges = config.bins
        names = config.labels or (
            [f"<{edges[0]:g}"] + [f"[{a:g}, {b:g})" for a, b in zip(edges, edges[1:])] + [f">={edges[-1]:g}"]
        )
        return (*names, MISSING), None
    categories = tuple(_category_text(c) for c in config.categories or ())
    names = config.labels or list(categories)
    return (*names, OTHER, MISSING), categories


def _category_text(value: str | int | float) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _numeric(categories: Sequence[str | int | float]) -> np.ndarray | None:
    try:
        return np.array([float(c) for c in categories], dtype=np.float64)
    except (TypeError, ValueError):
        return None


@dataclass(frozen=True, slots=True)
class OutcomeSpec:
    """Everything the ledger, the window state and the metrics need about one model."""

    model: str
    config: OutcomesConfig
    task: Task
    classes: tuple[str, ...]
    positive: int
    favourable: int
    output: str
    kind: Literal["probabilities", "label", "value"]
    threshold: float
    segments: tuple[Segment, ...]
    strides: tuple[int, ...]
    n_cells: int
    protected: tuple[int, ...]
    #: input name -> (segment indices, columns): what the request path copies per request
    input_columns: dict[str, tuple[tuple[int, ...], tuple[int, ...]]]
    #: (segment index, parameter name) of every parameter segment
    parameter_segments: tuple[tuple[int, str], ...]
    fingerprint: str = field(default="")

    # -- derived -------------------------------------------------------------------------
    @property
    def n_classes(self) -> int:
        return len(self.classes)

    @property
    def classification(self) -> bool:
        return self.task != "regression"

    @property
    def scored(self) -> bool:
        """True when rows carry class probabilities (log loss, Brier, AUC, ECE are defined)."""
        return self.classification and self.kind == "probabilities"

    @property
    def span_s(self) -> float:
        return self.config.windows.seconds

    @property
    def span_ms(self) -> int:
        return int(round(self.config.windows.seconds * 1000))

    @property
    def score_bins(self) -> int:
        return self.config.quality.score_bins

    @property
    def calibration_bins(self) -> int:
        return self.config.quality.calibration_bins

    def window_of(self, time_ms: int) -> int:
        return int(time_ms) // self.span_ms

    def cell_codes(self, cells: np.ndarray, segment: int) -> np.ndarray:
        """Group codes of one segment from joint cell codes."""
        return (np.asarray(cells) // self.strides[segment]) % self.segments[segment].n_groups

    def protected_combinations(self) -> list[tuple[int, ...]]:
        """Every protected segment and intersection up to ``fairness.max_depth`` (segment indices)."""
        depth = min(self.config.fairness.max_depth, len(self.protected))
        return [combo for size in range(1, depth + 1) for combo in combinations(self.protected, size)]

    def class_index(self, value: str | int | None, what: str) -> int | None:
        if value is None:
            return None
        if isinstance(value, int) and not isinstance(value, bool):
            if not 0 <= value < self.n_classes:
                raise OutcomeConfigError(f"model '{self.model}': {what} {value} is outside 0..{self.n_classes - 1}")
            return value
        if str(value) in self.classes:
            return self.classes.index(str(value))
        raise OutcomeConfigError(f"model '{self.model}': {what} {value!r} is not one of the classes {list(self.classes)}")

    def layout(self) -> dict[str, Any]:
        """What two window states must share to be added together."""
        return {
            "task": self.task,
            "classes": list(self.classes),
            "positive": self.positive,
            "scored": self.scored,
            "segments": [[s.name, list(s.groups)] for s in self.segments],
            "score_bins": self.score_bins,
            "calibration_bins": self.calibration_bins,
        }

    # -- building --------------------------------------------------------------------------
    @classmethod
    def build(
        cls,
        model: str,
        config: OutcomesConfig,
        outputs: Sequence[tuple[str, tuple[int, ...]]],
        inputs: Sequence[tuple[str, tuple[int, ...]]],
        feature_names: dict[str, list[str]] | None = None,
    ) -> "OutcomeSpec":
        """Compile ``config`` for a model with these (name, shape) outputs and inputs."""
        def fail(message: str) -> OutcomeConfigError:
            return OutcomeConfigError(f"model '{model}' outcomes: {message}")

        output_shapes = dict(outputs)
        if not output_shapes:
            raise fail("the model has no outputs")
        output = config.prediction.output or outputs[0][0]
        if output not in output_shapes:
            raise fail(f"prediction output {output!r} is not an output of the model ({sorted(output_shapes)})")
        shape = output_shapes[output]
        width = shape[-1] if len(shape) >= 2 and shape[-1] > 0 else (1 if len(shape) <= 1 else None)

        task: Task
        classes: tuple[str, ...] = ()
        kind = config.prediction.kind
        if config.task == "regression":
            task, kind = "regression", "value"
            if width not in (None, 1):
                raise fail(f"a regression output has one value per row; {output!r} has shape {list(shape)}")
        else:
            kind = kind or "probabilities"
            if config.class_names is not None:
                classes = tuple(config.class_names)
            elif kind == "probabilities" and width is not None and width >= 2:
                classes = tuple(str(i) for i in range(width))
            elif config.task == "binary":
                classes = ("0", "1")
            else:
                raise fail("class_names are required (the output's width does not tell the classes)")
            if config.task == "classification":
                task = "binary" if len(classes) == 2 else "multiclass"
            else:
                task = config.task  # type: ignore[assignment]
            if task == "binary" and len(classes) != 2:
                raise fail(f"a binary task has 2 classes, got {list(classes)}")
            if task == "multiclass" and len(classes) < 3:
                raise fail(f"a multiclass task has at least 3 classes, got {list(classes)}")
            if kind == "probabilities":
                if width is None:
                    raise fail(f"probabilities output {output!r} needs a fixed last dimension, has shape {list(shape)}")
                if not (width == len(classes) or (task == "binary" and width == 1)):
                    raise fail(f"output {output!r} has {width} columns for {len(classes)} classes")
            elif width not in (None, 1):
                raise fail(f"a label output has one class index per row; {output!r} has shape {list(shape)}")

        segments: list[Segment] = []
        input_shapes = dict(inputs)
        columns: dict[str, tuple[list[int], list[int]]] = {}
        parameters: list[tuple[int, str]] = []
        for index, (name, seg) in enumerate(config.segments.items()):
            groups, categories = _group_names(name, seg)
            column = None
            if seg.input is not None:
                if seg.input not in input_shapes:
                    raise fail(f"segment {name!r} reads input {seg.input!r}, which the model does not have ({sorted(input_shapes)})")
                in_shape = input_shapes[seg.input]
                if len(in_shape) != 2 or in_shape[-1] <= 0:
                    raise fail(f"segment {name!r}: input {seg.input!r} must be [batch, features], has shape {list(in_shape)}")
                if isinstance(seg.feature, int):
                    column = seg.feature
                else:
                    names = (feature_names or {}).get(seg.input) or []
                    if seg.feature not in names:
                        raise fail(f"segment {name!r}: feature {seg.feature!r} is not a declared feature name of "
                                   f"input {seg.input!r} ({names or 'none declared under governance.inputs'})")
                    column = names.index(str(seg.feature))
                if not 0 <= column < in_shape[-1]:
                    raise fail(f"segment {name!r}: feature column {column} is outside 0..{in_shape[-1] - 1}")
                idx, cols = columns.setdefault(seg.input, ([], []))
                idx.append(index)
                cols.append(column)
            else:
                parameters.append((index, str(seg.parameter)))
            segments.append(Segment(
                name=name, input=seg.input, column=column, parameter=seg.parameter, per_row=seg.per_row,
                bins=np.asarray(seg.bins, dtype=np.float64) if seg.bins is not None else None,
                categories=categories,
                numeric_categories=_numeric(seg.categories) if seg.categories is not None else None,
                groups=groups,
            ))
        strides: list[int] = []
        n_cells = 1
        for segment in segments:
            strides.append(n_cells)
            n_cells *= segment.n_groups
        if n_cells > config.max_cells:
            raise fail(f"the segments make {n_cells} joint groups, above max_cells {config.max_cells}; "
                       "use fewer segments, bins or categories")
        names = [s.name for s in segments]
        spec = cls(
            model=model, config=config, task=task, classes=classes, positive=0, favourable=0, output=output,
            kind=kind, threshold=config.prediction.threshold, segments=tuple(segments), strides=tuple(strides),
            n_cells=n_cells, protected=tuple(names.index(p) for p in config.protected),
            input_columns={k: (tuple(v[0]), tuple(v[1])) for k, v in columns.items()},
            parameter_segments=tuple(parameters),
        )
        if task != "regression":
            positive = spec.class_index(config.positive_class, "positive_class")
            positive = (1 if task == "binary" else 0) if positive is None else positive
            favourable = spec.class_index(config.favourable_outcome, "favourable_outcome")
            if favourable is None:
                if task == "multiclass" and config.positive_class is None and config.protected:
                    raise fail("a multiclass task with protected segments needs favourable_outcome (or positive_class)")
                favourable = positive
            object.__setattr__(spec, "positive", positive)
            object.__setattr__(spec, "favourable", favourable)
        for segment_name, group in config.fairness.reference.items():
            if segment_name not in config.protected:
                raise fail(f"fairness.reference names {segment_name!r}, which is not a protected segment")
            if group not in segments[names.index(segment_name)].groups:
                raise fail(f"fairness.reference[{segment_name!r}] = {group!r} is not one of its groups "
                           f"{list(segments[names.index(segment_name)].groups)}")
        digest = hashlib.sha256(json.dumps(spec.layout(), sort_keys=True).encode()).hexdigest()[:16]
        object.__setattr__(spec, "fingerprint", digest)
        return spec
