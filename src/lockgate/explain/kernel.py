"""KernelSHAP through the ``shap`` library, with one batched model run per request.

``shap.KernelExplainer.explain`` handles one row at a time and calls the model twice per row
(the row itself, then its perturbation set). ``BatchedKernelExplainer`` keeps shap's own
coalition sampling, kernel weights and weighted least squares, and only moves the model
calls: for every row it lets shap draw the coalitions and build the synthetic rows, stops
it before the model runs, then runs the rows and all their perturbations through ONNX
Runtime in one call and lets shap solve each row with its share of the outputs.

Sampling draws from NumPy's global generator, exactly as shap does; it is seeded once per
request, so an explanation equals ``np.random.seed(seed); KernelExplainer(...).shap_values(X)``
on the same model and background (tested), and the same request gets the same answer.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import shap

ModelFn = Callable[[np.ndarray], np.ndarray]

_STATE = ("M", "varyingInds", "varyingFeatureGroups", "nsamples", "max_samples", "l1_reg", "maskMatrix",
          "kernelWeights", "nsamplesAdded", "synth_data")


class _Deferred(Exception):
    """Raised from ``run`` while collecting: shap stops right before it would run the model."""


class BatchedKernelExplainer(shap.KernelExplainer):
    def __init__(self, model: ModelFn, background: np.ndarray, *, nsamples: int | str = "auto",
                 l1_reg: Any = False, seed: int = 0) -> None:
        self._fn = model
        self._collecting = False
        self._width = 0
        super().__init__(self._call, background, link="identity")
        self.nsamples_setting = nsamples
        self.l1_setting = l1_reg
        self.seed = seed
        self.evaluations = 0  # model rows evaluated by the last explain_rows call

    def _call(self, x: np.ndarray) -> np.ndarray:
        if self._collecting:  # shap's f(x) of the row: answered after the one batched run
            return np.zeros((len(x), self._width))
        out = self._fn(x)
        self._width = out.shape[1] if out.ndim > 1 else 1
        return out

    def run(self) -> None:
        if self._collecting:
            raise _Deferred
        super().run()

    def max_evaluations(self, rows: int) -> int:
        """An upper bound on the model rows ``explain_rows`` evaluates for ``rows`` rows."""
        m = self.data.data.shape[1]
        n = 2 * m + 2**11 if self.nsamples_setting == "auto" else int(self.nsamples_setting)
        if m <= 30:
            n = min(n, 2**m - 2)
        return rows * (1 + max(n, 0) * self.N)

    def explain_rows(self, x: np.ndarray) -> np.ndarray:
        """Attributions of every row of ``x``: (rows, features, outputs), one model run."""
        x = np.ascontiguousarray(x, dtype=self.data.data.dtype)
        np.random.seed(self.seed)
        rows = []
        self._collecting = True
        try:
            for r in range(len(x)):
                try:
                    self.explain(x[r : r + 1], nsamples=self.nsamples_setting, l1_reg=self.l1_setting)
                    rows.append({"M": self.M, "varyingInds": self.varyingInds})  # 0 or 1 varying feature
                except _Deferred:
                    rows.append({key: getattr(self, key) for key in _STATE})
        finally:
            self._collecting = False
        parts = [x] + [s["synth_data"][: s["nsamplesAdded"] * self.N] for s in rows if "synth_data" in s]
        out = np.asarray(self._fn(np.concatenate(parts) if len(parts) > 1 else x), dtype=np.float64)
        out = out.reshape(len(out), -1)
        self.evaluations = len(out)
        phi = np.zeros((len(x), self.data.groups_size, self.D))
        offset = len(x)
        for r, state in enumerate(rows):
            fx = out[r]
            if "synth_data" not in state:
                if state["M"] == 1:
                    phi[r, state["varyingInds"][0], :] = fx - self.fnull
                continue
            for key, value in state.items():
                setattr(self, key, value)
            n = state["nsamplesAdded"] * self.N
            self.fx = fx
            self.y = out[offset : offset + n]
            offset += n
            # E[f] over the background per coalition, as shap's run() computes it (weighted sum)
            ey = np.zeros((self.nsamples, self.D))
            ey[: self.nsamplesAdded] = np.einsum("snd,n->sd", self.y.reshape(self.nsamplesAdded, self.N, self.D),
                                                 self.data.weights)
            self.ey, self.nsamplesRun = ey, self.nsamplesAdded
            for d in range(self.D):
                vphi, _ = self.solve(self.nsamples / self.max_samples, d)
                phi[r, self.varyingInds, d] = vphi
        self.synth_data = None  # the perturbation set is the largest thing held: let it go now
        return phi
