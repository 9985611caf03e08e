"""ONNX-ML ``TreeEnsembleRegressor`` / ``TreeEnsembleClassifier`` as shap's tree format.

shap's ``TreeExplainer`` takes a dict ``{"trees": [...]}``, each tree given by arrays
``children_left/right/default``, ``features``, ``thresholds``, ``values`` and
``node_sample_weight``, and walks left when ``x <= threshold`` (NaN goes to the default
child). The ONNX node attributes are translated into exactly that:

* ``BRANCH_LEQ``: left = true branch; ``BRANCH_LT`` (x < t): the same with t moved to the
  next float32 below (for float32 inputs, ``x < t`` iff ``x <= prev(t)``);
* ``BRANCH_GT`` / ``BRANCH_GTE``: the negations of LEQ / LT, so left = the false branch;
* NaN follows the true branch when ``nodes_missing_value_tracks_true`` says so, else the
  false branch, as ONNX Runtime does;
* leaf values are the summed target/class weights per output (divided by the tree count for
  ``aggregate_function: AVERAGE``); ``base_values`` are added to the base value.

Attributions are interventional TreeSHAP over the background and explain the raw scores,
before ``post_transform`` (for ``NONE`` that is the served output). ``BRANCH_EQ``/``NEQ``/
``MEMBER`` modes, ``MIN``/``MAX`` aggregation and ONNX Runtime's two-label binary form are
refused with the reason, and ``method: auto`` falls back to KernelSHAP.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

TREE_OPS = ("TreeEnsembleRegressor", "TreeEnsembleClassifier")
_TRUE_LEFT = {"BRANCH_LEQ": False, "BRANCH_LT": True}  # mode -> threshold moves down one float
_TRUE_RIGHT = {"BRANCH_GT": False, "BRANCH_GTE": True}


class UnsupportedTrees(ValueError):
    """The ensemble uses a feature this translation does not reproduce exactly."""


@dataclass(frozen=True, slots=True)
class ParsedEnsemble:
    trees: list[dict]
    base_values: np.ndarray  # (outputs,)
    n_outputs: int
    post_transform: str
    output_index: int  # which node output holds the scores (1 for the classifier's Z)

    def shap_model(self) -> dict:
        return {"trees": self.trees}


def _attr(node: onnx.NodeProto, name: str, default=None):
    for attr in node.attribute:
        if attr.name == name:
            value = onnx.helper.get_attribute_value(attr)
            if name.endswith("_as_tensor"):
                value = onnx.numpy_helper.to_array(value)
            return value
    return default


def _text(value, default: str) -> str:
    if value is None:
        return default
    return value.decode() if isinstance(value, bytes) else str(value)


def tree_node(model: onnx.ModelProto) -> onnx.NodeProto | None:
    nodes = [n for n in model.graph.node if n.op_type in TREE_OPS]
    return nodes[0] if len(nodes) == 1 else None


def parse_ensemble(node: onnx.NodeProto) -> ParsedEnsemble:
    classifier = node.op_type == "TreeEnsembleClassifier"
    prefix = "class" if classifier else "target"
    tree_ids = list(_attr(node, "nodes_treeids", []))
    node_ids = list(_attr(node, "nodes_nodeids", []))
    features = list(_attr(node, "nodes_featureids", []))
    values = _attr(node, "nodes_values")
    if values is None:
        values = _attr(node, "nodes_values_as_tensor")
    thresholds = np.asarray(values if values is not None else [], dtype=np.float32)
    modes = [_text(m, "") for m in _attr(node, "nodes_modes", [])]
    true_ids = list(_attr(node, "nodes_truenodeids", []))
    false_ids = list(_attr(node, "nodes_falsenodeids", []))
    missing = list(_attr(node, "nodes_missing_value_tracks_true", []) or [0] * len(node_ids))
    w_tree = list(_attr(node, f"{prefix}_treeids", []))
    w_node = list(_attr(node, f"{prefix}_nodeids", []))
    w_out = list(_attr(node, f"{prefix}_ids", []))
    weights = _attr(node, f"{prefix}_weights")
    if weights is None:
        weights = _attr(node, f"{prefix}_weights_as_tensor")
    weights = np.asarray(weights if weights is not None else [], dtype=np.float64)
    post = _text(_attr(node, "post_transform"), "NONE")
    base = _attr(node, "base_values")
    if base is None:
        base = _attr(node, "base_values_as_tensor")
    if classifier:
        labels = list(_attr(node, "classlabels_int64s", []) or _attr(node, "classlabels_strings", []) or [])
        n_outputs = len(labels)
        if n_outputs == 2 and len(set(w_out)) == 1:
            raise UnsupportedTrees("a two-label classifier with weights for one class (ONNX Runtime's binary form)")
        aggregate = "SUM"
    else:
        n_outputs = int(_attr(node, "n_targets", 1) or 1)
        aggregate = _text(_attr(node, "aggregate_function"), "SUM")
        if aggregate not in ("SUM", "AVERAGE"):
            raise UnsupportedTrees(f"aggregate_function {aggregate}")
    lengths = {len(node_ids), len(tree_ids), len(features), len(thresholds), len(modes), len(true_ids), len(false_ids)}
    if len(lengths) != 1:
        raise UnsupportedTrees("node attribute lists differ in length")
    base_values = np.zeros(n_outputs)
    if base is not None and len(base):
        base_arr = np.asarray(base, dtype=np.float64)
        if base_arr.size != n_outputs:
            raise UnsupportedTrees(f"{base_arr.size} base_values for {n_outputs} outputs")
        base_values = base_arr

    by_tree: dict[int, list[int]] = {}
    for position, tree in enumerate(tree_ids):
        by_tree.setdefault(int(tree), []).append(position)
    leaf_values: dict[tuple[int, int], np.ndarray] = {}
    for tree, nid, out, weight in zip(w_tree, w_node, w_out, weights):
        if not 0 <= int(out) < n_outputs:
            raise UnsupportedTrees(f"weight for output {out} of {n_outputs}")
        leaf_values.setdefault((int(tree), int(nid)), np.zeros(n_outputs))[int(out)] += weight
    scale = 1.0 / len(by_tree) if aggregate == "AVERAGE" and by_tree else 1.0
    parsed = []
    for tree, positions in sorted(by_tree.items()):
        children = {int(true_ids[p]) for p in positions if modes[p] != "LEAF"} | {
            int(false_ids[p]) for p in positions if modes[p] != "LEAF"}
        roots = [p for p in positions if int(node_ids[p]) not in children]
        if len(roots) != 1:
            raise UnsupportedTrees(f"tree {tree} has {len(roots)} roots")
        positions = roots + [p for p in positions if p != roots[0]]  # shap starts at node 0
        index = {int(node_ids[p]): i for i, p in enumerate(positions)}
        n = len(positions)
        left = np.full(n, -1, dtype=np.int32)
        right = np.full(n, -1, dtype=np.int32)
        default = np.full(n, -1, dtype=np.int32)
        feat = np.full(n, -2, dtype=np.int32)
        thr = np.zeros(n, dtype=np.float64)
        vals = np.zeros((n, n_outputs), dtype=np.float64)
        for i, p in enumerate(positions):
            mode = modes[p]
            if mode == "LEAF":
                vals[i] = leaf_values.get((tree, int(node_ids[p])), np.zeros(n_outputs)) * scale
                continue
            if mode not in _TRUE_LEFT and mode not in _TRUE_RIGHT:
                raise UnsupportedTrees(f"tree {tree} node {node_ids[p]}: mode {mode}")
            try:
                t_child, f_child = index[int(true_ids[p])], index[int(false_ids[p])]
            except KeyError:
                raise UnsupportedTrees(f"tree {tree} node {node_ids[p]}: a child is not in the tree") from None
            t = np.float32(thresholds[p])
            strict = _TRUE_LEFT.get(mode, _TRUE_RIGHT.get(mode))
            if strict:
                t = np.nextafter(t, np.float32(-np.inf), dtype=np.float32)
            thr[i] = float(t)
            feat[i] = int(features[p])
            if mode in _TRUE_LEFT:
                left[i], right[i] = t_child, f_child
            else:
                left[i], right[i] = f_child, t_child
            default[i] = t_child if missing[p] else f_child
        parsed.append({
            "children_left": left, "children_right": right, "children_default": default,
            "features": feat, "thresholds": thr, "values": vals, "node_sample_weight": np.ones(n),
        })
    if not parsed:
        raise UnsupportedTrees("the ensemble has no trees")
    return ParsedEnsemble(parsed, base_values, n_outputs, post, 1 if classifier else 0)


def predict_raw(ensemble: ParsedEnsemble, x: np.ndarray) -> np.ndarray:
    """Raw scores by walking the parsed trees (checks the translation against ONNX Runtime)."""
    x = np.asarray(x, dtype=np.float64)
    out = np.tile(ensemble.base_values, (len(x), 1))
    for tree in ensemble.trees:
        for r, row in enumerate(x):
            i = 0
            while tree["children_left"][i] >= 0:
                v = row[tree["features"][i]]
                if np.isnan(v):
                    i = tree["children_default"][i]
                else:
                    i = tree["children_left"][i] if v <= tree["thresholds"][i] else tree["children_right"][i]
            out[r] += tree["values"][i]
    return out
