"""DataSketches per tensor, fed in bulk off the request path.

The kernel copies every row it sees into a bounded buffer (non-finite values as NaN). A
:class:`SketchSet` turns a drained block of rows into sketch updates with a handful of
vectorised calls: one ``kll_floats_sketch.update(ndarray)`` per numeric feature (KLL skips
NaN), one weighted ``frequent_strings_sketch.update`` per distinct category, and one
``bincount`` of the argmax for classifier outputs. Every replica uses the same ``k`` so the
sketches merge.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from datasketches import frequent_items_error_type, frequent_strings_sketch, kll_floats_sketch


def new_kll(k: int) -> kll_floats_sketch:
    return kll_floats_sketch(k)


def new_frequent(lg_max_k: int) -> frequent_strings_sketch:
    return frequent_strings_sketch(lg_max_k)


def category_key(value: float) -> str:
    """Canonical string of an integer category code ("3", never "3.0")."""
    return str(int(value))


def top_items(sketch: frequent_strings_sketch, limit: int = 20) -> list[tuple[str, int]]:
    """Most frequent categories with their estimates (no false negatives)."""
    items = sketch.get_frequent_items(frequent_items_error_type.NO_FALSE_NEGATIVES)
    return [(item, int(estimate)) for item, estimate, _lower, _upper in items[:limit]]


class SketchSet:
    """The sketches of one tensor for one window."""

    __slots__ = ("k", "lg_max_k", "kll", "frequent", "categorical", "class_counts", "classifier")

    def __init__(
        self,
        n_features: int,
        *,
        k: int = 200,
        categorical: Iterable[int] = (),
        classifier: bool = False,
        lg_max_k: int = 6,
    ) -> None:
        self.k = k
        self.lg_max_k = lg_max_k
        self.categorical = frozenset(categorical)
        self.classifier = classifier
        self.kll: list[kll_floats_sketch] = [new_kll(k) for _ in range(n_features)]
        self.frequent: dict[int, frequent_strings_sketch] = {j: new_frequent(lg_max_k) for j in sorted(self.categorical)}
        self.class_counts: np.ndarray | None = np.zeros(n_features, dtype=np.int64) if classifier else None

    def feed(self, rows: np.ndarray) -> None:
        """Add a (rows x features) float32 block; NaN marks missing/non-finite values."""
        if rows.size == 0:
            return
        columns = np.ascontiguousarray(rows.T, dtype=np.float32)
        for j, sketch in enumerate(self.kll):
            if j not in self.categorical:
                sketch.update(columns[j])
        for j, sketch in self.frequent.items():
            col = columns[j]
            values, counts = np.unique(col[~np.isnan(col)], return_counts=True)
            for value, count in zip(values.tolist(), counts.tolist()):
                sketch.update(category_key(value), int(count))
        if self.class_counts is not None and rows.shape[1] > 1:
            complete = rows[~np.isnan(rows).any(axis=1)]
            if complete.size:
                self.class_counts += np.bincount(np.argmax(complete, axis=1), minlength=rows.shape[1])

    def fresh(self) -> "SketchSet":
        """An empty set with the same shape, for the next window."""
        return SketchSet(
            len(self.kll), k=self.k, categorical=self.categorical, classifier=self.classifier, lg_max_k=self.lg_max_k
        )
