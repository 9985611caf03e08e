"""Reference profile: what "normal" looks like for each input and output of a model version.

Stored as ``<model-repository>/<model>/<version>/reference_profile.json`` (human-readable
JSON; KLL sketches base64-encoded), beside the ONNX file, so it is versioned with the model
and shipped with it. Per feature it holds ``edges`` (the cut points the kernel bins live
values with, ``bisect_right``: bin ``i`` is ``[edges[i-1], edges[i])``) and ``fractions``
(the reference share of each of the ``len(edges) + 1`` bins), laid out by the feature's
``kind``:

* ``continuous``: interior quantile cut points (``bins - 1`` of them, duplicates removed);
  the first and last bins are open-ended;
* ``categorical`` (declared): one bin ``[c - 0.5, c + 0.5)`` per known integer code ``c``
  (codes seen in the reference, plus the allowed set), and a bin of its own for every gap
  between codes and below/above them, so an unseen code never lands in a known code's bin;
* ``discrete``: a numeric feature with at most ``bins`` distinct reference values (and at
  least ten rows per value) -- a constant, a flag, a small count -- gets the same layout with
  a narrow bin ``[v - tol, v + tol)`` per value (``tol`` = 1e-6 |v|, at most a quarter of the
  gap to the next value), so any move off a known value, up or down, is a move to a bin the
  reference never filled.

Bins the reference never filled hold the *new values*; ``values`` lists the known ones.
Also: moments (count, mean, std, min, max), NaN/Inf counts, exact quantiles at 1% steps and
the KLL sketch (the reference CDF for KS and Wasserstein). Format version 1 profiles
(categorical bins cut at the midpoints between codes) are converted when loaded.
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from datasketches import kll_floats_sketch

PROFILE_FILE = "reference_profile.json"
FORMAT = "lockgate.reference_profile"
VERSION = 2
READABLE_VERSIONS = (1, 2)
MAX_EDGES = 254  # the kernel's limit per feature
QUANTILE_GRID = np.linspace(0.005, 0.995, 100)
DEFAULT_KLL_K = 400  # KS within 0.01 of the exact statistic at 10,000 rows (see statistics.cdf_distances)
DISCRETE_ROWS_PER_VALUE = 10
CONTINUOUS, DISCRETE, CATEGORICAL = "continuous", "discrete", "categorical"


@dataclass(slots=True)
class FeatureProfile:
    name: str
    categorical: bool
    edges: list[float]
    fractions: list[float]
    count: int
    nan: int
    inf: int
    mean: float
    std: float
    min: float
    max: float
    quantiles: list[float]
    categories: dict[str, float] = field(default_factory=dict)
    kll: str = ""  # base64 of kll_floats_sketch.serialize()
    kind: str = CONTINUOUS  # continuous | discrete | categorical
    values: list[float] = field(default_factory=list)  # discrete/categorical: the values with a bin of their own

    def sketch(self) -> kll_floats_sketch | None:
        return kll_floats_sketch.deserialize(base64.b64decode(self.kll)) if self.kll else None

    @property
    def rows(self) -> int:
        """Reference rows of this feature: finite values plus NaN and Inf."""
        return self.count + self.nan + self.inf

    @property
    def has_value_bins(self) -> bool:
        """Each known value has its own bin (categorical and discrete features)."""
        return self.kind != CONTINUOUS

    def value_bins(self) -> np.ndarray:
        """Bin index of each known value (``values``), in the layout of ``edges``."""
        return np.searchsorted(np.asarray(self.edges, dtype=np.float64), np.asarray(self.values, dtype=np.float64), side="right")

    def known_bins(self) -> np.ndarray:
        """Boolean mask over the bins: True where the reference has values. For categorical and
        discrete features the other bins hold *new values* (codes of the allowed set the
        reference never had included); every bin of a continuous feature is known."""
        n_bins = len(self.edges) + 1
        if not self.has_value_bins:
            return np.ones(n_bins, dtype=bool)
        return np.asarray(self.fractions, dtype=np.float64) > 0

    def bin_labels(self, names: Sequence[str] | None = None) -> list[str]:
        """A label per bin: ``[a, b)`` ranges for continuous features; the value (or its
        name from ``names``, e.g. class names) for a known value; ``new: ...`` for the rest."""
        key = (self.kind, tuple(self.edges), tuple(self.values), tuple(f > 0 for f in self.fractions), tuple(names or ()))
        return list(_cached_labels(key, self))

    def _bin_labels(self, names: Sequence[str] | None) -> list[str]:
        edges = list(self.edges)
        n_bins = len(edges) + 1
        if not self.has_value_bins:
            out = []
            for i in range(n_bins):
                lo = "-inf" if i == 0 else _fmt_edge(edges[i - 1])
                hi = "+inf" if i == n_bins - 1 else _fmt_edge(edges[i])
                out.append(f"[{lo}, {hi})")
            return out
        labels = ["new"] * n_bins
        known = dict(zip(self.value_bins().tolist(), self.values))
        seen = self.known_bins()
        for i in range(n_bins):
            if i in known:
                value = known[i]
                if names is not None and float(value).is_integer() and 0 <= int(value) < len(names):
                    labels[i] = f"{names[int(value)]} ({_fmt_edge(value)})"
                else:
                    labels[i] = _fmt_edge(value)
                if not seen[i]:
                    labels[i] += " (new)"
                continue
            below = [v for b, v in known.items() if b < i]
            above = [v for b, v in known.items() if b > i]
            if not below:
                labels[i] = f"new < {_fmt_edge(above[0])}" if above else "new"
            elif not above:
                labels[i] = f"new > {_fmt_edge(below[-1])}"
            else:
                labels[i] = f"new in ({_fmt_edge(max(below))}, {_fmt_edge(min(above))})"
        return labels

    @property
    def iqr(self) -> float:
        if len(self.quantiles) < 100:
            return 0.0
        # grid points 0.005 + 0.01 i: i=25 -> 0.255, i=74 -> 0.745
        return float(self.quantiles[74] - self.quantiles[25])


@dataclass(slots=True)
class TensorProfile:
    name: str
    kind: str  # "input" | "output"
    features: list[FeatureProfile]
    classes: list[float] | None = None  # class (argmax) fractions of a classifier output

    @property
    def feature_names(self) -> list[str]:
        return [f.name for f in self.features]

    def edges(self) -> list[np.ndarray]:
        return [np.asarray(f.edges, dtype=np.float64) for f in self.features]

    def categorical_indices(self) -> set[int]:
        return {j for j, f in enumerate(self.features) if f.categorical}


@dataclass(slots=True)
class ReferenceProfile:
    model: str
    version: str
    rows: int
    kll_k: int
    tensors: dict[str, TensorProfile]
    created: float = field(default_factory=time.time)
    _digest: str = field(default="", repr=False, compare=False)

    def digest(self) -> str:
        """SHA-256 of the profile's canonical JSON: what a window and a report are tied to."""
        if not self._digest:
            text = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"), allow_nan=True)
            self._digest = hashlib.sha256(text.encode()).hexdigest()
        return self._digest

    @staticmethod
    def path_for(model_repository: str | Path, model: str, version: str) -> Path:
        return Path(model_repository) / model / str(version) / PROFILE_FILE

    def to_dict(self) -> dict:
        out = {"format": FORMAT, "format_version": VERSION, **asdict(self)}
        out.pop("_digest", None)
        return out

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), allow_nan=True))
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "ReferenceProfile":
        raw = json.loads(Path(path).read_text())
        if raw.get("format") != FORMAT:
            raise ValueError(f"{path}: not a lockgate reference profile")
        version = raw.get("format_version")
        if version not in READABLE_VERSIONS:
            raise ValueError(
                f"{path}: unsupported profile format version {version!r} (this build reads {READABLE_VERSIONS}); "
                "rebuild it with `lockgate profile build`"
            )
        tensors = {
            name: TensorProfile(
                name=t["name"],
                kind=t["kind"],
                features=[FeatureProfile(**f) if version == VERSION else _from_v1(FeatureProfile(**f)) for f in t["features"]],
                classes=t.get("classes"),
            )
            for name, t in raw["tensors"].items()
        }
        return cls(
            model=raw["model"], version=raw["version"], rows=raw["rows"], kll_k=raw["kll_k"], tensors=tensors, created=raw["created"]
        )

    @classmethod
    def load_if_present(cls, model_repository: str | Path, model: str, version: str) -> "ReferenceProfile | None":
        path = cls.path_for(model_repository, model, version)
        return cls.load(path) if path.exists() else None


def as_rows(array: np.ndarray) -> np.ndarray:
    """The governance layout: last axis = features, everything before it = rows."""
    array = np.asarray(array)
    if array.ndim == 0:
        return array.reshape(1, 1)
    if array.ndim == 1:
        return array.reshape(-1, 1)
    return array.reshape(-1, array.shape[-1])


_LABELS: dict[tuple, tuple[str, ...]] = {}


def _cached_labels(key: tuple, feature: FeatureProfile) -> tuple[str, ...]:
    """Labels depend only on the layout: computed once per profile feature, not per window."""
    found = _LABELS.get(key)
    if found is None:
        if len(_LABELS) > 65536:
            _LABELS.clear()
        found = _LABELS[key] = tuple(feature._bin_labels(key[4] or None))
    return found


def _fmt_edge(value: float) -> str:
    value = float(value)
    if value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return f"{value:.6g}"


def _quantile_edges(values: np.ndarray, bins: int) -> np.ndarray:
    if values.size == 0:
        return np.empty(0)
    edges = np.unique(np.quantile(values, np.arange(1, bins) / bins))
    return edges[:MAX_EDGES]


def _value_edges(values: np.ndarray, half_widths: np.ndarray) -> np.ndarray:
    """Edges giving each value ``v`` the bin ``[v - h, v + h)``, and every gap its own bin;
    adjacent bins share an edge (consecutive integer codes need one edge each)."""
    lo, hi = values - half_widths, values + half_widths
    edges: list[float] = []
    for a, b in zip(lo.tolist(), hi.tolist()):
        if not edges or edges[-1] < a:
            edges.append(a)
        edges.append(b)
    if len(edges) > MAX_EDGES:
        raise ValueError(f"{values.size} distinct values need {len(edges)} bin edges; at most {MAX_EDGES} are supported")
    return np.asarray(edges, dtype=np.float64)


def category_edges(codes: np.ndarray) -> np.ndarray:
    """Bins of a categorical feature: ``[c - 0.5, c + 0.5)`` per integer code."""
    codes = np.unique(np.asarray(codes, dtype=np.float64))
    return _value_edges(codes, np.full(codes.size, 0.5)) if codes.size else np.empty(0)


def discrete_edges(values: np.ndarray) -> np.ndarray:
    """Bins of a discrete numeric feature: a narrow bin around each distinct value.

    The half-width is 1e-6 of the value's magnitude (float32 rounding of a float64 reference
    value stays inside, any real move does not), at most a quarter of the gap to a neighbour.
    """
    values = np.unique(np.asarray(values, dtype=np.float64))
    if values.size == 0:
        return np.empty(0)
    half = np.maximum(1e-6 * np.abs(values), 1e-30)
    if values.size > 1:
        gaps = np.diff(values)
        room = np.minimum(np.r_[np.inf, gaps], np.r_[gaps, np.inf]) / 4.0
        half = np.minimum(half, room)
    return _value_edges(values, half)


def _from_v1(feature: FeatureProfile) -> FeatureProfile:
    """Format 1 cut categorical bins at the midpoints between codes (an unseen code fell into
    a neighbour's bin) and gave a constant feature one edge: rebuild both layouts."""
    if feature.categorical:
        seen = sorted(float(c) for c in feature.categories)
        old = np.asarray(feature.edges, dtype=np.float64)
        codes = np.full(old.size + 1, np.nan)
        if seen:
            anchor = int(np.searchsorted(old, seen[0], side="right"))
            codes[anchor] = seen[0]
            for i in range(anchor, old.size):
                codes[i + 1] = 2 * old[i] - codes[i]
            for i in range(anchor - 1, -1, -1):
                codes[i] = 2 * old[i] - codes[i + 1]
        old_fractions = list(feature.fractions)
        feature.kind, feature.values = CATEGORICAL, [] if not seen else np.round(codes).tolist()
        edges = category_edges(np.asarray(feature.values)) if feature.values else np.empty(0)
        fractions = np.zeros(edges.size + 1)
        if feature.values:
            fractions[np.searchsorted(edges, feature.values, side="right")] = old_fractions
        feature.edges, feature.fractions = edges.tolist(), fractions.tolist()
    elif feature.count and feature.std == 0 and len(feature.edges) <= 1:
        feature.kind, feature.values = DISCRETE, [float(feature.min)]
        edges = discrete_edges(np.asarray(feature.values))
        feature.edges, feature.fractions = edges.tolist(), [0.0, 1.0, 0.0]
    return feature


def profile_feature(
    name: str, column: np.ndarray, *, categorical: bool, bins: int, kll_k: int, allowed: Iterable[int] | None = None
) -> FeatureProfile:
    column = np.asarray(column, dtype=np.float64)
    nan = int(np.isnan(column).sum())
    inf = int(np.isinf(column).sum())
    finite = column[np.isfinite(column)]
    categories: dict[str, float] = {}
    distinct = np.unique(finite)
    if categorical:
        codes = np.unique(np.concatenate([distinct, np.asarray(list(allowed or []), dtype=np.float64)]))
        if codes.size and not np.all(codes == np.round(codes)):
            bad = codes[codes != np.round(codes)][0]
            raise ValueError(f"categorical feature {name!r} holds the non-integer value {bad!r}; categories must be integer codes")
        kind, values = CATEGORICAL, codes
        edges = category_edges(codes)
        if finite.size:
            seen, counts = np.unique(finite, return_counts=True)
            categories = {str(int(v)): c / finite.size for v, c in zip(seen.tolist(), counts.tolist())}
    elif 0 < distinct.size <= bins and finite.size >= DISCRETE_ROWS_PER_VALUE * distinct.size:
        kind, values = DISCRETE, distinct
        edges = discrete_edges(distinct)
    else:
        kind, values = CONTINUOUS, np.empty(0)
        edges = _quantile_edges(finite, bins)
    counts = np.bincount(np.searchsorted(edges, finite, side="right"), minlength=edges.size + 1)
    fractions = counts / finite.size if finite.size else np.zeros(edges.size + 1)
    sketch = kll_floats_sketch(kll_k)
    if finite.size:
        sketch.update(finite.astype(np.float32))
    return FeatureProfile(
        name=name,
        categorical=categorical,
        edges=edges.tolist(),
        fractions=fractions.tolist(),
        count=int(finite.size),
        nan=nan,
        inf=inf,
        mean=float(finite.mean()) if finite.size else float("nan"),
        std=float(finite.std()) if finite.size else float("nan"),
        min=float(finite.min()) if finite.size else float("nan"),
        max=float(finite.max()) if finite.size else float("nan"),
        quantiles=np.quantile(finite, QUANTILE_GRID).tolist() if finite.size else [],
        categories=categories,
        kll=base64.b64encode(sketch.serialize()).decode(),
        kind=kind,
        values=values.tolist(),
    )


def profile_tensor(
    name: str,
    data: np.ndarray,
    *,
    kind: str = "input",
    feature_names: Sequence[str] | None = None,
    categorical: Iterable[int | str] = (),
    allowed: Mapping[int, Iterable[int]] | None = None,
    classifier: bool = False,
    bins: int = 20,
    kll_k: int = DEFAULT_KLL_K,
    progress: Callable[[str], None] | None = None,
) -> TensorProfile:
    rows = as_rows(data)
    n_features = rows.shape[1]
    names = list(feature_names) if feature_names else [f"f{j}" for j in range(n_features)]
    if len(names) != n_features:
        raise ValueError(f"tensor {name!r}: {len(names)} feature names for {n_features} features")
    cat = {names.index(c) if isinstance(c, str) else int(c) for c in categorical}
    features = []
    for j in range(n_features):
        features.append(
            profile_feature(
                names[j], rows[:, j], categorical=j in cat, bins=bins, kll_k=kll_k, allowed=(allowed or {}).get(j)
            )
        )
        if progress:
            progress(f"{name}/{names[j]}")
    classes = None
    if classifier and n_features > 1:
        complete = rows[~np.isnan(rows.astype(np.float64)).any(axis=1)]
        counts = np.bincount(np.argmax(complete, axis=1), minlength=n_features) if complete.size else np.zeros(n_features)
        classes = (counts / max(1, counts.sum())).tolist()
    return TensorProfile(name=name, kind=kind, features=features, classes=classes)


def build_profile(
    data: np.ndarray | Mapping[str, np.ndarray],
    feature_names: Sequence[str] | Mapping[str, Sequence[str]] | None = None,
    categorical_features: Iterable[int | str] | Mapping[str, Iterable[int | str]] = (),
    *,
    model: str = "",
    version: str = "",
    input_name: str = "input",
    outputs: Mapping[str, np.ndarray] | None = None,
    classifier_outputs: Iterable[str] = (),
    allowed: Mapping[str, Mapping[int, Iterable[int]]] | None = None,
    bins: int = 20,
    kll_k: int = DEFAULT_KLL_K,
    progress: Callable[[str], None] | None = None,
    output_feature_names: Mapping[str, Sequence[str]] | None = None,
) -> ReferenceProfile:
    """Profile reference inputs (one array, or one per input name) and optional outputs.

    ``feature_names``/``categorical_features`` apply to the single input, or are mappings by
    input name. ``output_feature_names`` names an output's columns (a classifier's class
    labels from the model config), so reports and metrics say ``approve``, not ``f0``.
    ``bins`` equal-frequency bins per numeric feature (default 20).
    """
    if not 2 <= bins <= MAX_EDGES + 1:
        raise ValueError(f"bins must be in 2..{MAX_EDGES + 1}")
    inputs = dict(data) if isinstance(data, Mapping) else {input_name: np.asarray(data)}

    def per(value, name, default):
        if isinstance(value, Mapping):
            return value.get(name, default)
        return value if len(inputs) == 1 else default

    tensors: dict[str, TensorProfile] = {}
    rows = 0
    for name, array in inputs.items():
        tensors[name] = profile_tensor(
            name,
            array,
            kind="input",
            feature_names=per(feature_names, name, None),
            categorical=per(categorical_features, name, ()),
            allowed=(allowed or {}).get(name),
            bins=bins,
            kll_k=kll_k,
            progress=progress,
        )
        rows = max(rows, as_rows(array).shape[0])
    classifiers = set(classifier_outputs)
    for name, array in (outputs or {}).items():
        tensors[name] = profile_tensor(
            name, array, kind="output", classifier=name in classifiers, bins=bins, kll_k=kll_k, progress=progress,
            feature_names=(output_feature_names or {}).get(name),
        )
    return ReferenceProfile(model=model, version=str(version), rows=rows, kll_k=kll_k, tensors=tensors)


@dataclass(slots=True)
class LoadedData:
    arrays: dict[str, np.ndarray]  # by input name; a single unnamed array is keyed ""
    feature_names: list[str] | None = None


def load_data(path: str | Path) -> LoadedData:
    """Read reference data from ``.npy``, ``.npz``, ``.csv`` (header optional) or ``.parquet``."""
    path = Path(path)
    suffix = path.suffix.lower()
    if not path.exists():
        raise FileNotFoundError(f"reference data {path} does not exist")
    if suffix == ".npy":
        return LoadedData({"": np.load(path, allow_pickle=False)})
    if suffix == ".npz":
        with np.load(path, allow_pickle=False) as archive:
            return LoadedData({key: archive[key] for key in archive.files})
    if suffix == ".csv":
        with path.open() as handle:
            first = handle.readline().strip().split(",")
        try:
            [float(token) for token in first if token.strip()]
            header = None
        except ValueError:
            header = [token.strip().strip('"') for token in first]
        array = np.loadtxt(path, delimiter=",", skiprows=1 if header else 0, ndmin=2, dtype=np.float64)
        return LoadedData({"": array}, header)
    if suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError as exc:
            raise RuntimeError(
                "reading .parquet needs pyarrow: pip install 'lockgate[parquet]' (or convert the data to .npy/.csv)"
            ) from exc
        table = pq.read_table(path)
        columns = [np.asarray(table.column(i).to_numpy(zero_copy_only=False), dtype=np.float64) for i in range(table.num_columns)]
        return LoadedData({"": np.column_stack(columns)}, list(table.column_names))
    raise ValueError(f"unsupported reference data format {suffix!r}: use .npy, .npz, .csv or .parquet")


def class_names(labels: Mapping[str, Sequence[str]] | None, profile: ReferenceProfile | None) -> dict[str, list[str]]:
    """Class names of a profile's classifier outputs, from the model config's output
    ``labels`` (``ModelConfigFile.labels()``), for labelling their class bins and columns."""
    if not labels or profile is None:
        return {}
    return {name: list(labels[name]) for name, tp in profile.tensors.items()
            if tp.kind == "output" and name in labels and len(labels[name]) == len(tp.features)}
