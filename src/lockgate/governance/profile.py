"""Reference profile: what "normal" looks like for each input and output of a model version.

Stored as ``<model-repository>/<model>/<version>/reference_profile.json`` (human-readable
JSON; KLL sketches base64-encoded), beside the ONNX file, so it is versioned with the model
and shipped with it. Per feature it holds

* ``edges``: interior quantile cut points (``bins - 1`` of them, duplicates removed) that
  the kernel bins live values with, and ``fractions``: the reference share of each of the
  ``len(edges) + 1`` bins (the first and last are the open-ended overflow bins);
* for categorical features, edges at the midpoints between the sorted category codes, so
  each bin holds exactly one category, plus the category frequencies;
* moments (count, mean, std, min, max), NaN/Inf counts, exact quantiles at 1% steps
  (for the normalised Wasserstein distance) and the KLL sketch.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from datasketches import kll_floats_sketch

PROFILE_FILE = "reference_profile.json"
FORMAT = "lockgate.reference_profile"
VERSION = 1
MAX_EDGES = 254  # the kernel's limit per feature
QUANTILE_GRID = np.linspace(0.005, 0.995, 100)


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

    def sketch(self) -> kll_floats_sketch | None:
        return kll_floats_sketch.deserialize(base64.b64decode(self.kll)) if self.kll else None

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

    @staticmethod
    def path_for(model_repository: str | Path, model: str, version: str) -> Path:
        return Path(model_repository) / model / str(version) / PROFILE_FILE

    def to_dict(self) -> dict:
        return {"format": FORMAT, "format_version": VERSION, **asdict(self)}

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
        if raw.get("format_version") != VERSION:
            raise ValueError(f"{path}: unsupported profile format version {raw.get('format_version')!r}")
        tensors = {
            name: TensorProfile(
                name=t["name"],
                kind=t["kind"],
                features=[FeatureProfile(**f) for f in t["features"]],
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


def _quantile_edges(values: np.ndarray, bins: int) -> np.ndarray:
    if values.size == 0:
        return np.empty(0)
    edges = np.unique(np.quantile(values, np.arange(1, bins) / bins))
    return edges[:MAX_EDGES]


def _category_edges(categories: np.ndarray) -> np.ndarray:
    categories = np.unique(categories)
    if categories.size > MAX_EDGES + 1:
        raise ValueError(f"{categories.size} categories; at most {MAX_EDGES + 1} are supported")
    return (categories[:-1] + categories[1:]) / 2.0


def profile_feature(
    name: str, column: np.ndarray, *, categorical: bool, bins: int, kll_k: int, allowed: Iterable[int] | None = None
) -> FeatureProfile:
    column = np.asarray(column, dtype=np.float64)
    nan = int(np.isnan(column).sum())
    inf = int(np.isinf(column).sum())
    finite = column[np.isfinite(column)]
    categories: dict[str, float] = {}
    if categorical:
        codes = np.unique(np.concatenate([finite, np.asarray(list(allowed or []), dtype=np.float64)]))
        edges = _category_edges(codes) if codes.size else np.empty(0)
        if finite.size:
            values, counts = np.unique(finite, return_counts=True)
            categories = {str(int(v)): c / finite.size for v, c in zip(values.tolist(), counts.tolist())}
    else:
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
    kll_k: int = 200,
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
    kll_k: int = 200,
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
