"""Exact attributions for affine models: linear regression, logistic and softmax regression.

A graph is affine up to its last activation when the path from the input to the explained
output is a chain of ``MatMul``/``Gemm`` with constant weights, elementwise ``Add``/``Sub``/
``Mul``/``Div`` by constants (standardisation), ``Identity``/``Flatten``/``Cast``, optionally
ended by ``Sigmoid`` or ``Softmax``; or an ONNX-ML ``LinearRegressor``/``LinearClassifier``.
Walking that chain composes it into ``z = x·A + c`` in float64, where ``z`` is the output, or
the logits in front of the activation (attributions then live in logit space).

For such a model with independent features, the interventional Shapley values are exact:
``phi_j = A_j · (x_j − E[x_j])`` with the expectation over the background, and the base value
is ``z(E[x])``; base plus the sum of attributions equals ``z`` up to float rounding.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

ACTIVATIONS = {"Sigmoid", "Softmax"}
_PASSTHROUGH = {"Identity", "Flatten", "Cast"}
_ELEMENTWISE = {"Add", "Sub", "Mul", "Div"}


class NotAffine(ValueError):
    """The graph is not a chain this module can compose exactly; the message says where."""


@dataclass(frozen=True, slots=True)
class AffineModel:
    coef: np.ndarray  # (features, outputs) float64
    intercept: np.ndarray  # (outputs,)
    link: str  # "identity" | "logit"
    activation: str | None  # "Sigmoid" | "Softmax" | LinearClassifier post_transform | None

    def margin(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(x, dtype=np.float64) @ self.coef + self.intercept

    def attributions(self, x: np.ndarray, background_mean: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(phi (rows, features, outputs), base (outputs,))."""
        x = np.asarray(x, dtype=np.float64)
        mean = np.asarray(background_mean, dtype=np.float64)
        phi = (x - mean)[:, :, None] * self.coef[None, :, :]
        return phi, mean @ self.coef + self.intercept


def _constants(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    values = {init.name: numpy_helper.to_array(init).astype(np.float64) for init in graph.initializer
              if init.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16,
                                    onnx.TensorProto.INT64, onnx.TensorProto.INT32)}
    for node in graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    values[node.output[0]] = numpy_helper.to_array(attr.t).astype(np.float64)
    return values


def _attr(node: onnx.NodeProto, name: str, default=None):
    for attr in node.attribute:
        if attr.name == name:
            return onnx.helper.get_attribute_value(attr)
    return default


def _vector(value: np.ndarray, width: int, what: str) -> np.ndarray:
    flat = np.asarray(value, dtype=np.float64).reshape(-1)
    if flat.size == 1:
        return np.full(width, flat[0])
    if flat.size == width and (value.ndim <= 1 or all(d == 1 for d in value.shape[:-1])):
        return flat
    raise NotAffine(f"{what}: constant of shape {list(value.shape)} does not broadcast along the {width} features")


def _ml_linear(node: onnx.NodeProto, n_features: int) -> AffineModel:
    coef = np.asarray(_attr(node, "coefficients"), dtype=np.float64)
    intercepts = np.asarray(_attr(node, "intercepts", []) or [], dtype=np.float64)
    post = (_attr(node, "post_transform", b"NONE") or b"NONE")
    post = post.decode() if isinstance(post, bytes) else str(post)
    if node.op_type == "LinearRegressor":
        targets = int(_attr(node, "targets", 1) or 1)
        if post != "NONE":
            raise NotAffine(f"LinearRegressor post_transform {post} is not supported")
        classes = targets
    else:
        labels = _attr(node, "classlabels_ints") or _attr(node, "classlabels_strings") or []
        classes = coef.size // max(n_features, 1)
        if classes != len(labels):
            raise NotAffine(f"LinearClassifier with {classes} coefficient rows for {len(labels)} labels (binary form) "
                            "is not supported; use method: kernel")
        if post not in ("NONE", "LOGISTIC", "SOFTMAX"):
            raise NotAffine(f"LinearClassifier post_transform {post} is not supported")
    if coef.size != classes * n_features:
        raise NotAffine(f"{node.op_type}: {coef.size} coefficients for {n_features} features")
    intercept = intercepts if intercepts.size == classes else np.zeros(classes)
    return AffineModel(coef.reshape(classes, n_features).T.copy(), intercept.copy(),
                       "identity" if post == "NONE" else "logit", None if post == "NONE" else post)


def affine_model(model: onnx.ModelProto, input_name: str, output_name: str, n_features: int) -> AffineModel:
    """Compose the path input -> output into ``z = x·A + c``; ``NotAffine`` says why not."""
    graph = model.graph
    constants = _constants(graph)
    producer = {out: node for node in graph.node for out in node.output}
    path: list[onnx.NodeProto] = []
    current = output_name
    while current != input_name:
        node = producer.get(current)
        if node is None:
            raise NotAffine(f"tensor '{current}' is neither produced by a node nor the input '{input_name}'")
        variable = [name for name in node.input if name and name not in constants]
        if len(variable) != 1:
            raise NotAffine(f"node '{node.name or node.op_type}' ({node.op_type}) combines {len(variable)} non-constant inputs")
        path.append(node)
        current = variable[0]
    path.reverse()
    if not path:
        raise NotAffine("the output is the input itself")
    if len(path) == 1 and path[0].op_type in ("LinearRegressor", "LinearClassifier"):
        return _ml_linear(path[0], n_features)
    activation = None
    if path[-1].op_type in ACTIVATIONS:
        activation = path[-1].op_type
        if activation == "Softmax" and _attr(path[-1], "axis", -1) not in (-1, 1):
            raise NotAffine("Softmax over an axis other than the last")
        path = path[:-1]
    coef = np.eye(n_features)
    intercept = np.zeros(n_features)
    for node in path:
        op = node.op_type
        where = f"node '{node.name or op}' ({op})"
        if op in _PASSTHROUGH:
            continue
        if op in _ELEMENTWISE:
            first_variable = node.input[0] not in constants
            k = _vector(constants[node.input[1] if first_variable else node.input[0]], coef.shape[1], where)
            if op == "Add":
                intercept = intercept + k
            elif op == "Sub":
                if first_variable:
                    intercept = intercept - k
                else:
                    coef, intercept = -coef, k - intercept
            elif op == "Mul":
                coef, intercept = coef * k, intercept * k
            else:
                if not first_variable:
                    raise NotAffine(f"{where}: a constant divided by the input is not affine")
                coef, intercept = coef / k, intercept / k
        elif op == "MatMul":
            if node.input[0] in constants:
                raise NotAffine(f"{where}: weights on the left of the input are not supported")
            w = constants[node.input[1]]
            if w.ndim != 2 or w.shape[0] != coef.shape[1]:
                raise NotAffine(f"{where}: weights of shape {list(w.shape)}")
            coef, intercept = coef @ w, intercept @ w
        elif op == "Gemm":
            if node.input[0] in constants or _attr(node, "transA", 0):
                raise NotAffine(f"{where}: the input must be Gemm's A without transA")
            b = constants[node.input[1]]
            b = b.T if _attr(node, "transB", 0) else b
            alpha, beta = float(_attr(node, "alpha", 1.0)), float(_attr(node, "beta", 1.0))
            if b.ndim != 2 or b.shape[0] != coef.shape[1]:
                raise NotAffine(f"{where}: weights of shape {list(b.shape)}")
            coef, intercept = alpha * (coef @ b), alpha * (intercept @ b)
            if len(node.input) > 2 and node.input[2]:
                intercept = intercept + beta * _vector(constants[node.input[2]], b.shape[1], where)
        else:
            raise NotAffine(f"{where} is not an affine operation")
    return AffineModel(coef, intercept, "logit" if activation else "identity", activation)


def probe_affine(run, n_features: int, check_rows: np.ndarray, tolerance: float = 1e-4) -> AffineModel:
    """For ``method: linear`` declared on a graph the walker cannot read: measure ``A`` and ``c``
    from the model itself (``f(0)`` and ``f(e_j)``), then check ``f`` is affine on real rows."""
    basis = np.vstack([np.zeros(n_features), np.eye(n_features)]).astype(np.float32)
    out = np.asarray(run(basis), dtype=np.float64)
    intercept = out[0]
    coef = out[1:] - intercept
    model = AffineModel(coef, intercept, "identity", None)
    if len(check_rows):
        want = np.asarray(run(np.asarray(check_rows, dtype=np.float32)), dtype=np.float64)
        err = float(np.max(np.abs(model.margin(check_rows) - want)))
        scale = max(1.0, float(np.max(np.abs(want))))
        if err > tolerance * scale:
            raise NotAffine(f"declared linear, but the model is not affine on the background (max error {err:.3g})")
    return model
