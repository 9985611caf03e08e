"""Mergeable outcome state of one model version over one window of prediction time.

What every replica can count alone and the fleet adds up exactly (the design of
``governance.state``, for outcomes):

* per joint segment cell: predictions by predicted class; labeled rows as a confusion
  matrix ``[cell, true, predicted]`` (classification), or counts, absolute / squared /
  percentage error sums and the label's mean and M2 (regression, combined with Chan's
  formula);
* score histograms by true class (AUC from the histogram, ties within a bin counted half),
  reliability bins (count, summed confidence, hits: the calibration curve and ECE), summed
  log loss and Brier score;
* label delay: a log2 histogram of seconds and their sum.

Counts are integers, so a merge of any split of the rows equals one process that saw them
all; the float sums agree to rounding. A window is written by the replica that served a
prediction (prediction counts) and by the replica that joined its label (everything
labeled), each under its own replica id, so nothing is counted twice.

Bytes: ``MAGIC``, a 4-byte little-endian header length, UTF-8 JSON (layout fingerprint,
window, array names, dtypes and shapes), then the arrays' raw little-endian bytes.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np

from lockgate.outcomes.spec import OutcomeSpec

MAGIC = b"LGOUTW1\n"
DELAY_BINS = 40  # bin 0: under 1 s; bin i: [2^(i-1), 2^i) s; the last bin holds the rest
LOG_EPS = 1e-15  # probabilities are clipped to [eps, 1 - eps] for log loss (as scikit-learn did)


def _layout_arrays(spec: OutcomeSpec) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Name -> (dtype, shape) of every array of a window of this spec."""
    c = spec.n_cells
    arrays: dict[str, tuple[str, tuple[int, ...]]] = {
        "delay_hist": ("<i8", (DELAY_BINS,)),
        "delay_sum": ("<f8", (1,)),
    }
    if spec.classification:
        k = spec.n_classes
        arrays.update(predicted=("<i8", (c, k)), confusion=("<i8", (c, k, k)))
        if spec.scored:
            curves = 1 if spec.task == "binary" else k
            e = spec.calibration_bins
            arrays.update(
                hist=("<i8", (curves, 2, spec.score_bins)),
                calib_count=("<i8", (e,)), calib_conf=("<f8", (e,)), calib_hit=("<i8", (e,)),
                loss=("<f8", (2,)),  # summed log loss, summed Brier score
                scored=("<i8", (1,)),
            )
    else:
        for name in ("count", "labeled"):
            arrays[name] = ("<i8", (c,))
        for name in ("abs_err", "sq_err", "ape", "y_mean", "y_m2"):
            arrays[name] = ("<f8", (c,))
    return arrays


@dataclass(slots=True)
class OutcomeWindow:
    """One (model, version, window) of outcome state; see the module docstring."""

    model: str
    version: str
    window: int
    span_s: float
    fingerprint: str
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    replicas: int = 1  # how many replicas' states were merged into this one

    @classmethod
    def empty(cls, spec: OutcomeSpec, version: str, window: int) -> "OutcomeWindow":
        arrays = {name: np.zeros(shape, dtype=dtype) for name, (dtype, shape) in _layout_arrays(spec).items()}
        return cls(spec.model, version, int(window), spec.span_s, spec.fingerprint, arrays)

    def copy(self) -> "OutcomeWindow":
        return OutcomeWindow(self.model, self.version, self.window, self.span_s, self.fingerprint,
                             {k: v.copy() for k, v in self.arrays.items()}, self.replicas)

    def __getitem__(self, name: str) -> np.ndarray:
        return self.arrays[name]

    # -- totals ------------------------------------------------------------------------
    @property
    def predictions(self) -> int:
        a = self.arrays
        return int(a["predicted"].sum()) if "predicted" in a else int(a["count"].sum())

    @property
    def labeled(self) -> int:
        a = self.arrays
        return int(a["confusion"].sum()) if "confusion" in a else int(a["labeled"].sum())

    @property
    def start(self) -> float:
        return self.window * self.span_s

    @property
    def end(self) -> float:
        return (self.window + 1) * self.span_s

    # -- updates (the caller holds the replica's state lock) -------------------------------
    def add_predictions(self, cells: np.ndarray, predicted: np.ndarray | None) -> None:
        """Served rows: their cells and (classification) predicted class indices."""
        a = self.arrays
        if "predicted" in a:
            k = a["predicted"].shape[1]
            a["predicted"] += np.bincount(cells * k + predicted, minlength=a["predicted"].size).reshape(a["predicted"].shape)
        else:
            a["count"] += np.bincount(cells, minlength=a["count"].size)

    def add_labels(self, spec: OutcomeSpec, cells: np.ndarray, truth: np.ndarray, predicted: np.ndarray,
                   scores: np.ndarray | None, delays_s: np.ndarray) -> None:
        """Joined rows: cell, true label, prediction (class index or value), scores, label delay.

        ``scores``: binary P(positive) per row; multiclass [n, K] probabilities; None when the
        rows carry no probabilities.
        """
        a = self.arrays
        self._add_delays(delays_s)
        if spec.classification:
            truth = truth.astype(np.int64)
            predicted = predicted.astype(np.int64)
            conf = a["confusion"]
            k = conf.shape[1]
            conf += np.bincount((cells * k + truth) * k + predicted, minlength=conf.size).reshape(conf.shape)
            if scores is not None and "hist" in a:
                self._add_scores(spec, truth, predicted, scores)
            return
        y = truth.astype(np.float64)
        err = predicted.astype(np.float64) - y
        n_cells = a["count"].size
        n = np.bincount(cells, minlength=n_cells)
        a["abs_err"] += np.bincount(cells, np.abs(err), minlength=n_cells)
        a["sq_err"] += np.bincount(cells, err * err, minlength=n_cells)
        # scikit-learn's MAPE: |error| / max(|y|, eps)
        a["ape"] += np.bincount(cells, np.abs(err) / np.maximum(np.abs(y), np.finfo(np.float64).eps), minlength=n_cells)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = np.where(n > 0, np.bincount(cells, y, minlength=n_cells) / np.maximum(n, 1), 0.0)
        dev = y - mean[cells]
        m2 = np.bincount(cells, dev * dev, minlength=n_cells)
        self._chan(n, mean, m2)

    def _chan(self, nb: np.ndarray, mean_b: np.ndarray, m2_b: np.ndarray) -> None:
        a = self.arrays
        na = a["labeled"].astype(np.float64)
        nbf = nb.astype(np.float64)
        total = na + nbf
        with np.errstate(invalid="ignore", divide="ignore"):
            delta = mean_b - a["y_mean"]
            share = np.where(total > 0, nbf / np.maximum(total, 1), 0.0)
            a["y_mean"] = np.where(nbf > 0, a["y_mean"] + delta * share, a["y_mean"])
            a["y_m2"] = a["y_m2"] + m2_b + np.where(total > 0, delta * delta * na * nbf / np.maximum(total, 1), 0.0)
        a["labeled"] += nb

    def _add_delays(self, delays_s: np.ndarray) -> None:
        delays = np.maximum(np.asarray(delays_s, dtype=np.float64), 0.0)
        bins = np.zeros(delays.shape, dtype=np.int64)
        positive = delays >= 1.0
        bins[positive] = np.minimum(np.floor(np.log2(delays[positive])).astype(np.int64) + 1, DELAY_BINS - 1)
        self.arrays["delay_hist"] += np.bincount(bins, minlength=DELAY_BINS)
        self.arrays["delay_sum"][0] += float(delays.sum())

    def _add_scores(self, spec: OutcomeSpec, truth: np.ndarray, predicted: np.ndarray, scores: np.ndarray) -> None:
        a = self.arrays
        b = spec.score_bins
        e = spec.calibration_bins
        if spec.task == "binary":
            p = np.clip(np.asarray(scores, dtype=np.float64).reshape(-1), 0.0, 1.0)
            y = (truth == spec.positive).astype(np.int64)
            a["hist"][0] += np.bincount(y * b + _bin(p, b), minlength=2 * b).reshape(2, b)
            cb = _bin(p, e)  # reliability by P(positive): folded into top-label bins for ECE
            a["calib_count"] += np.bincount(cb, minlength=e)
            a["calib_conf"] += np.bincount(cb, p, minlength=e)
            a["calib_hit"] += np.bincount(cb[y == 1], minlength=e)
            q = np.clip(p, LOG_EPS, 1 - LOG_EPS)
            a["loss"][0] += float(-(y * np.log(q) + (1 - y) * np.log(1 - q)).sum())
            a["loss"][1] += float(((p - y) ** 2).sum())
        else:
            probs = np.clip(np.asarray(scores, dtype=np.float64), 0.0, 1.0)
            n, k = probs.shape
            onehot = np.zeros((n, k), dtype=np.int64)
            onehot[np.arange(n), truth] = 1
            bins = _bin(probs, b)  # [n, k]
            flat = (np.arange(k)[None, :] * 2 + onehot) * b + bins
            a["hist"] += np.bincount(flat.reshape(-1), minlength=k * 2 * b).reshape(k, 2, b)
            top = probs.max(axis=1)
            cb = _bin(top, e)
            a["calib_count"] += np.bincount(cb, minlength=e)
            a["calib_conf"] += np.bincount(cb, top, minlength=e)
            a["calib_hit"] += np.bincount(cb[predicted == truth], minlength=e)
            p_true = np.clip(probs[np.arange(n), truth], LOG_EPS, 1 - LOG_EPS)
            a["loss"][0] += float(-np.log(p_true).sum())
            a["loss"][1] += float(((probs - onehot) ** 2).sum())
        a["scored"][0] += len(truth)

    # -- merging -------------------------------------------------------------------------
    def merge(self, other: "OutcomeWindow") -> "OutcomeWindow":
        """This window plus another replica's share of it (same layout, same window)."""
        if other.fingerprint != self.fingerprint:
            raise ValueError(f"{self.model}/{self.version} window {self.window}: layouts differ "
                             f"({self.fingerprint} vs {other.fingerprint}); the outcomes config changed")
        if (other.model, other.version, other.window) != (self.model, self.version, self.window):
            raise ValueError(f"cannot merge {other.model}/{other.version} window {other.window} "
                             f"into {self.model}/{self.version} window {self.window}")
        out = self.copy()
        out.add(other)
        out.replicas = self.replicas + other.replicas
        return out

    def add(self, other: "OutcomeWindow") -> None:
        """In place: add ``other``'s counts (any window of the same layout; regression by Chan)."""
        if other.fingerprint != self.fingerprint:
            raise ValueError(f"{self.model}/{self.version}: window layouts differ ({self.fingerprint} vs {other.fingerprint})")
        a, b = self.arrays, other.arrays
        if "y_mean" in a:
            self._chan(b["labeled"], b["y_mean"], b["y_m2"])
            skip = {"labeled", "y_mean", "y_m2"}
        else:
            skip = set()
        for name, value in b.items():
            if name not in skip:
                a[name] = a[name] + value

    # -- bytes ---------------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        names = sorted(self.arrays)
        header = {
            "model": self.model, "version": self.version, "window": self.window, "span_s": self.span_s,
            "fingerprint": self.fingerprint, "replicas": self.replicas,
            "arrays": [[n, self.arrays[n].dtype.str, list(self.arrays[n].shape)] for n in names],
        }
        text = json.dumps(header, separators=(",", ":")).encode()
        body = b"".join(np.ascontiguousarray(self.arrays[n]).tobytes() for n in names)
        return MAGIC + struct.pack("<I", len(text)) + text + body

    @classmethod
    def from_bytes(cls, data: bytes) -> "OutcomeWindow":
        data = bytes(data)
        if not data.startswith(MAGIC) or len(data) < len(MAGIC) + 4:
            raise ValueError("not a lockgate outcome window")
        (length,) = struct.unpack_from("<I", data, len(MAGIC))
        start = len(MAGIC) + 4
        try:
            header = json.loads(data[start : start + length])
        except ValueError as exc:
            raise ValueError(f"corrupt outcome window header: {exc}") from exc
        offset = start + length
        arrays: dict[str, np.ndarray] = {}
        for name, dtype, shape in header["arrays"]:
            dt = np.dtype(dtype)
            size = int(np.prod(shape)) * dt.itemsize
            if offset + size > len(data):
                raise ValueError(f"outcome window truncated in array {name!r}")
            arrays[name] = np.frombuffer(data, dtype=dt, count=int(np.prod(shape)), offset=offset).reshape(shape).copy()
            offset += size
        return cls(header["model"], header["version"], int(header["window"]), float(header["span_s"]),
                   header["fingerprint"], arrays, int(header.get("replicas", 1)))


def _bin(values: np.ndarray, bins: int) -> np.ndarray:
    """Equal-width bin of values in [0, 1] (1.0 falls in the last bin)."""
    return np.minimum((np.asarray(values, dtype=np.float64) * bins).astype(np.int64), bins - 1)


def merge_windows(states: Iterable[OutcomeWindow]) -> OutcomeWindow | None:
    """Sum several windows (of one layout) into one; None if there are none."""
    out: OutcomeWindow | None = None
    for state in states:
        if out is None:
            out = state.copy()
        else:
            out.add(state)
            out.replicas += state.replicas
    return out


def delay_quantile(hist: np.ndarray, q: float) -> float | None:
    """Approximate quantile (upper bin edge, seconds) of the label-delay histogram."""
    total = int(hist.sum())
    if total == 0:
        return None
    rank = q * total
    running = 0
    for index, count in enumerate(hist):
        running += int(count)
        if running >= rank:
            return 1.0 if index == 0 else float(2.0 ** index)
    return float(2.0 ** (len(hist) - 1))


def describe(state: OutcomeWindow) -> dict[str, Any]:
    return {"model": state.model, "version": state.version, "window": state.window,
            "start": state.start, "end": state.end, "predictions": state.predictions, "labeled": state.labeled}
