"""Choose the attribution method for one model version, and run it.

``build_explainer`` reads the ONNX graph once: ``method: auto`` takes TreeSHAP for a single
ONNX-ML tree ensemble, the exact method for an affine graph, and KernelSHAP otherwise, and
records why a faster method was passed over. Every method is checked against ONNX Runtime on
the background before it is used, so a translation that does not reproduce the model is
refused (``ExplainUnavailable``), never served. This runs in the explain pool's processes.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from lockgate.errors import ExplainUnavailable, InvalidArgument
from lockgate.explain.background import Background
from lockgate.explain.config import ExplainConfig
from lockgate.explain.linear import AffineModel, NotAffine, affine_model, probe_affine
from lockgate.explain.trees import ParsedEnsemble, UnsupportedTrees, parse_ensemble, predict_raw, tree_node

log = logging.getLogger("lockgate.explain")

OTHER_FEATURES = "(other)"
_FLOAT_TYPES = ("tensor(float)", "tensor(double)")
_CHECK_ROWS = 32
_TOLERANCE = 1e-4


@dataclass(slots=True)
class Explanation:
    attributions: np.ndarray  # float32 (rows, features, outputs)
    base_value: np.ndarray  # float32 (outputs,)
    method: str  # "linear" | "tree" | "kernel"
    space: str  # "output" | "logit" | "raw_score"
    input: str
    output: str
    features: list[str]
    outputs: list[str]
    evaluations: int = 0
    seconds: float = 0.0

    def summary(self) -> dict[str, Any]:
        """What a payload record keeps besides the attributions themselves."""
        return {"method": self.method, "space": self.space, "input": self.input, "output": self.output,
                "features": self.features, "outputs": self.outputs, "base_value": self.base_value.tolist()}


@dataclass(slots=True)
class Explainer:
    method: str
    space: str
    input: str
    output: str
    n_features: int
    columns: list[int]
    feature_names: list[str]
    config: ExplainConfig
    background: np.ndarray
    skipped: dict[str, str] = field(default_factory=dict)  # method -> why it was not used
    _affine: AffineModel | None = None
    _trees: Any = None  # shap.TreeExplainer
    _tree_base: np.ndarray | None = None
    _kernel: Any = None  # BatchedKernelExplainer

    # -- reporting layout ------------------------------------------------------------
    def _reported(self) -> tuple[list[int], bool]:
        if not self.config.features:
            return list(range(self.n_features)), False
        picked = []
        for key in self.config.features:
            if isinstance(key, int):
                index = key
            elif key in self.feature_names:
                index = self.feature_names.index(key)
            else:
                raise ExplainUnavailable(f"explain.features names {key!r}, which is not a feature "
                                         f"(features: {self.feature_names})")
            if not 0 <= index < self.n_features:
                raise ExplainUnavailable(f"explain.features index {index} is outside 0..{self.n_features - 1}")
            picked.append(index)
        return picked, len(set(picked)) < self.n_features

    def describe(self) -> dict[str, Any]:
        picked, other = self._reported()
        return {"method": self.method, "space": self.space, "input": self.input, "output": self.output,
                "features": [self.feature_names[j] for j in picked] + ([OTHER_FEATURES] if other else []),
                "outputs": [f"{self.output}[{k}]" for k in self.columns], "background_rows": len(self.background),
                "skipped": dict(self.skipped)}

    # -- the work ----------------------------------------------------------------------
    def explain(self, x: np.ndarray) -> Explanation:
        start = time.perf_counter()
        x = np.asarray(x)
        if x.ndim != 2 or x.shape[1] != self.n_features:
            raise InvalidArgument(f"input '{self.input}': explanations need rows x {self.n_features} features, "
                                  f"got shape {list(x.shape)}")
        if len(x) > self.config.max_rows:
            raise InvalidArgument(f"input '{self.input}': {len(x)} rows to explain exceeds explain.max_rows "
                                  f"{self.config.max_rows}")
        evaluations = 0
        if self.method == "linear":
            phi, base = self._affine.attributions(x, self.background.astype(np.float64).mean(axis=0))
            phi, base = phi[:, :, self.columns], base[self.columns]
        elif self.method == "tree":
            values = np.asarray(self._trees.shap_values(np.asarray(x, dtype=np.float64), check_additivity=False))
            if values.ndim == 2:
                values = values[:, :, None]
            phi, base = values[:, :, self.columns], self._tree_base[self.columns]
        else:
            bound = self._kernel.max_evaluations(len(x))
            if bound > self.config.max_evaluations:
                raise InvalidArgument(
                    f"input '{self.input}': explaining {len(x)} rows with KernelSHAP evaluates up to {bound} model rows "
                    f"({self.config.nsamples} coalitions x {len(self.background)} background rows each), over "
                    f"explain.max_evaluations {self.config.max_evaluations}; send fewer rows"
                )
            phi = self._kernel.explain_rows(np.asarray(x, dtype=np.float32))
            base = np.atleast_1d(np.asarray(self._kernel.expected_value, dtype=np.float64))
            evaluations = self._kernel.evaluations
        picked, other = self._reported()
        columns = [phi[:, picked, :]]
        if other:
            rest = np.setdiff1d(np.arange(self.n_features), picked)
            columns.append(phi[:, rest, :].sum(axis=1, keepdims=True))
        out = np.ascontiguousarray(np.concatenate(columns, axis=1), dtype=np.float32)
        layout = self.describe()
        return Explanation(out, np.asarray(base, dtype=np.float32), self.method, self.space, self.input, self.output,
                           layout["features"], layout["outputs"], evaluations, time.perf_counter() - start)


def _session(model_path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(model_path), sess_options=options, providers=["CPUExecutionProvider"])


def _named(nodes: list[Any], name: str, what: str) -> Any:
    for node in nodes:
        if node.name == name:
            return node
    raise ExplainUnavailable(f"explain.{what} {name!r} is not an {what} of the model ({[n.name for n in nodes]})")


def _pick_tensors(session, config: ExplainConfig) -> tuple[Any, Any]:
    inputs = session.get_inputs()
    if config.input is not None:
        inp = _named(inputs, config.input, "input")
        if len(inputs) > 1:
            raise ExplainUnavailable("explanations hold every other input fixed, which is not supported yet: "
                                     f"the model has {len(inputs)} inputs")
    elif len(inputs) == 1:
        inp = inputs[0]
    else:
        raise ExplainUnavailable(f"the model has {len(inputs)} inputs; explanations need a single tabular input")
    if inp.type not in _FLOAT_TYPES or len(inp.shape) != 2 or not isinstance(inp.shape[1], int):
        raise ExplainUnavailable(f"input '{inp.name}' is {inp.type} {inp.shape}; explanations need "
                                 "a float tensor [rows, features] with a fixed feature count")
    outputs = session.get_outputs()
    if config.output is not None:
        out = _named(outputs, config.output, "output")
    else:
        candidates = [o for o in outputs if o.type in _FLOAT_TYPES and len(o.shape) in (1, 2)]
        if not candidates:
            raise ExplainUnavailable("the model has no float output of shape [rows] or [rows, outputs] to explain")
        out = candidates[0]
    if out.type not in _FLOAT_TYPES or len(out.shape) not in (1, 2):
        raise ExplainUnavailable(f"output '{out.name}' is {out.type} {out.shape}; explanations need float [rows, outputs]")
    return inp, out


def build_explainer(model_path: str | Path, config: ExplainConfig, background: Background | None,
                    feature_names: list[str] | None = None) -> Explainer:
    """The explainer of one model version (raises ``ExplainUnavailable`` with the reason)."""
    model_path = Path(model_path)
    session = _session(model_path)
    inp, out = _pick_tensors(session, config)
    n_features = int(inp.shape[1])
    if background is None or inp.name not in background.arrays:
        raise ExplainUnavailable(f"no explanation background for input '{inp.name}': build one with "
                                 "`lockgate profile build` (it stores a background sample beside the reference profile)")
    bg = np.asarray(background.rows(inp.name, config.background_size), dtype=np.float32)
    if bg.ndim != 2 or bg.shape[1] != n_features or len(bg) == 0:
        raise ExplainUnavailable(f"the background of input '{inp.name}' has shape {list(bg.shape)}, "
                                 f"the model takes {n_features} features")
    names = list(config.feature_names or feature_names or [])
    names = names[:n_features] + [f"f{j}" for j in range(len(names), n_features)]

    def run(x: np.ndarray) -> np.ndarray:
        value = session.run([out.name], {inp.name: np.ascontiguousarray(x, dtype=np.float32)
                                         if inp.type == "tensor(float)" else np.asarray(x, dtype=np.float64)})[0]
        value = np.asarray(value, dtype=np.float64)
        return value.reshape(len(value), -1)

    check = bg[:_CHECK_ROWS]
    served = run(check)
    n_out = served.shape[1]
    columns = list(config.outputs) if config.outputs is not None else list(range(n_out))
    bad = [k for k in columns if not 0 <= k < n_out]
    if bad:
        raise ExplainUnavailable(f"explain.outputs {bad} are outside output '{out.name}' columns 0..{n_out - 1}")
    common = dict(input=inp.name, output=out.name, n_features=n_features, columns=columns, feature_names=names,
                  config=config, background=bg)
    skipped: dict[str, str] = {}
    graph = onnx.load(str(model_path), load_external_data=False)

    if config.method in ("auto", "tree"):
        try:
            return _tree_explainer(graph, inp.name, out.name, check, served, common, skipped)
        except (UnsupportedTrees, NotAffine) as exc:
            skipped["tree"] = str(exc)
            if config.method == "tree":
                raise ExplainUnavailable(f"method tree: {exc}") from exc
    if config.method in ("auto", "linear"):
        try:
            affine = affine_model(graph, inp.name, out.name, n_features)
            if config.link == "identity" and affine.link == "logit":
                raise NotAffine("explain.link is identity but the output passes a sigmoid/softmax")
        except NotAffine as exc:
            if config.method != "linear":
                skipped["linear"] = str(exc)
                affine = None
            else:  # declared linear: measure the coefficients, then check them on the background
                try:
                    affine = probe_affine(run, n_features, check.astype(np.float64))
                except NotAffine as probe:
                    raise ExplainUnavailable(f"method linear: {exc}; {probe}") from probe
        if affine is not None:
            _check_affine(affine, check, served)
            return Explainer("linear", "logit" if affine.link == "logit" else "output", **common,
                             skipped=skipped, _affine=affine)
    try:
        from lockgate.explain.kernel import BatchedKernelExplainer
    except ImportError as exc:
        raise ExplainUnavailable(f"KernelSHAP needs the shap library: pip install 'lockgate[explain]' ({exc})") from exc

    # KernelSHAP sees only the explained columns: fewer outputs to solve for
    kernel = BatchedKernelExplainer(lambda x: run(x)[:, columns], bg, nsamples=config.nsamples,
                                    l1_reg=config.l1_reg, seed=config.seed)
    return Explainer("kernel", "output", **common, skipped=skipped, _kernel=kernel)


def _check_affine(affine: AffineModel, rows: np.ndarray, served: np.ndarray) -> None:
    margin = affine.margin(rows)
    if affine.activation in ("Sigmoid", "LOGISTIC"):
        shown = 1.0 / (1.0 + np.exp(-margin))
    elif affine.activation in ("Softmax", "SOFTMAX"):
        e = np.exp(margin - margin.max(axis=1, keepdims=True))
        shown = e / e.sum(axis=1, keepdims=True)
    else:
        shown = margin
    if shown.shape != served.shape:
        raise ExplainUnavailable(f"the linear reading gives {shown.shape[1]} outputs, the model {served.shape[1]}")
    err = float(np.max(np.abs(shown - served)))
    if err > _TOLERANCE * max(1.0, float(np.max(np.abs(served)))):
        raise ExplainUnavailable(f"the linear reading of the graph does not reproduce the model (max error {err:.3g})")


def _tree_explainer(graph: onnx.ModelProto, input_name: str, output_name: str, check: np.ndarray,
                    served: np.ndarray, common: dict, skipped: dict) -> Explainer:
    node = tree_node(graph)
    if node is None:
        raise UnsupportedTrees("the graph is not a single TreeEnsemble node")
    parsed: ParsedEnsemble = parse_ensemble(node)
    if node.input[0] != input_name or node.output[parsed.output_index] != output_name:
        raise UnsupportedTrees(f"the explained output '{output_name}' is not the ensemble's scores")
    raw = predict_raw(parsed, check)
    if parsed.post_transform == "NONE":
        shown = raw
    elif parsed.post_transform == "LOGISTIC":
        shown = 1.0 / (1.0 + np.exp(-raw))
    elif parsed.post_transform == "SOFTMAX":
        e = np.exp(raw - raw.max(axis=1, keepdims=True))
        shown = e / e.sum(axis=1, keepdims=True)
    else:
        raise UnsupportedTrees(f"post_transform {parsed.post_transform}")
    err = float(np.max(np.abs(shown - served))) if shown.shape == served.shape else float("inf")
    if err > _TOLERANCE * max(1.0, float(np.max(np.abs(served)))):
        raise UnsupportedTrees(f"the parsed trees do not reproduce the model (max error {err:.3g})")
    try:
        import shap
    except ImportError as exc:
        raise ExplainUnavailable(f"TreeSHAP needs the shap library: pip install 'lockgate[explain]' ({exc})") from exc
    background = np.asarray(common["background"], dtype=np.float64)
    explainer = shap.TreeExplainer(parsed.shap_model(), data=background, feature_perturbation="interventional",
                                   model_output="raw")
    base = np.atleast_1d(np.asarray(explainer.expected_value, dtype=np.float64)) + parsed.base_values
    return Explainer("tree", "output" if parsed.post_transform == "NONE" else "raw_score", **common,
                     skipped=skipped, _trees=explainer, _tree_base=base)


def explain_many(explainer: Explainer, rows: np.ndarray) -> Explanation:
    """Explain any number of rows in chunks that respect ``max_rows`` and ``max_evaluations``."""
    rows = np.asarray(rows)
    chunk = explainer.config.max_rows
    if explainer._kernel is not None:
        per_row = max(1, explainer._kernel.max_evaluations(1))
        chunk = max(1, min(chunk, explainer.config.max_evaluations // per_row))
    parts = [explainer.explain(rows[i : i + chunk]) for i in range(0, len(rows), chunk)]
    first = parts[0]
    first.attributions = np.concatenate([p.attributions for p in parts])
    first.evaluations = sum(p.evaluations for p in parts)
    first.seconds = sum(p.seconds for p in parts)
    return first


def reference_importance(explainer: Explainer, rows: np.ndarray) -> dict[str, Any]:
    """Mean |attribution| per feature and output over reference rows: the importance baseline."""
    explained = explain_many(explainer, rows)
    return {"method": explained.method, "space": explained.space, "rows": int(len(rows)),
            "features": explained.features, "outputs": explained.outputs,
            "mean_abs": np.abs(explained.attributions.astype(np.float64)).mean(axis=0).tolist()}
