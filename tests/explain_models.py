"""Models for the explanation tests, built in code with ``onnx`` helper nodes (nothing downloaded)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from lockgate.demo import IR_VERSION, OPSET

ML_OPSET = 3


def _model(graph: onnx.GraphProto, ml: bool = False) -> onnx.ModelProto:
    opsets = [helper.make_opsetid("", OPSET)] + ([helper.make_opsetid("ai.onnx.ml", ML_OPSET)] if ml else [])
    model = helper.make_model(graph, opset_imports=opsets, producer_name="lockgate-tests", ir_version=IR_VERSION)
    onnx.checker.check_model(model)
    return model


def logistic_model(coef: np.ndarray, intercept: float, *, standardise: tuple[np.ndarray, np.ndarray] | None = None) -> onnx.ModelProto:
    """x -> [(x - mean) / std] -> MatMul(coef) + b -> Sigmoid -> 'probability' [rows, 1]."""
    f = len(coef)
    inits = [numpy_helper.from_array(np.asarray(coef, np.float32).reshape(f, 1), "coef"),
             numpy_helper.from_array(np.asarray([intercept], np.float32), "intercept")]
    nodes, current = [], "features"
    if standardise is not None:
        inits += [numpy_helper.from_array(np.asarray(standardise[0], np.float32), "mean"),
                  numpy_helper.from_array(np.asarray(standardise[1], np.float32), "std")]
        nodes += [helper.make_node("Sub", ["features", "mean"], ["centred"]),
                  helper.make_node("Div", ["centred", "std"], ["scaled"])]
        current = "scaled"
    nodes += [helper.make_node("MatMul", [current, "coef"], ["xw"]),
              helper.make_node("Add", ["xw", "intercept"], ["logit"]),
              helper.make_node("Sigmoid", ["logit"], ["probability"])]
    graph = helper.make_graph(
        nodes, "logistic",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", f])],
        [helper.make_tensor_value_info("probability", TensorProto.FLOAT, ["batch", 1])],
        initializer=inits,
    )
    return _model(graph)


# Trees in shap's own convention (left when x <= threshold); the ONNX node below is written from the
# same lists with a mode per split, so both sides describe one model. -1 marks a leaf.
TREES = [
    {  # tree 0: root on f0, then f2 / f1
        "features": [0, 2, 1, -1, -1, -1, -1], "thresholds": [0.0, 0.5, -0.3, 0, 0, 0, 0],
        "left": [1, 3, 5, -1, -1, -1, -1], "right": [2, 4, 6, -1, -1, -1, -1],
        "modes": ["BRANCH_LEQ", "BRANCH_LT", "BRANCH_GT", "LEAF", "LEAF", "LEAF", "LEAF"],
        "values": [None, None, None, [0.2, -0.1, 0.4], [1.0, 0.3, -0.5], [-0.7, 0.6, 0.1], [0.05, -0.9, 0.8]],
    },
    {  # tree 1: f3 then f0
        "features": [3, 0, -1, -1, -1], "thresholds": [0.1, 0.8, 0, 0, 0],
        "left": [1, 3, -1, -1, -1], "right": [2, 4, -1, -1, -1],
        "modes": ["BRANCH_GTE", "BRANCH_LEQ", "LEAF", "LEAF", "LEAF"],
        "values": [None, None, [0.3, 0.3, -0.2], [-0.4, 0.9, 0.0], [0.6, -0.6, 0.25]],
    },
    {  # tree 2: a stump on f1
        "features": [1, -1, -1], "thresholds": [0.2, 0, 0], "left": [1, -1, -1], "right": [2, -1, -1],
        "modes": ["BRANCH_LEQ", "LEAF", "LEAF"], "values": [None, [0.15, 0.0, -0.1], [-0.2, 0.5, 0.35]],
    },
]
TREE_FEATURES = 4
TREE_CLASSES = 3
TREE_BASE = [0.1, -0.2, 0.05]


def shap_trees() -> dict:
    """The same trees as the dict shap.TreeExplainer accepts."""
    out = []
    for t in TREES:
        n = len(t["features"])
        values = np.array([v if v is not None else [0.0] * TREE_CLASSES for v in t["values"]], dtype=np.float64)
        out.append({
            "children_left": np.array(t["left"]), "children_right": np.array(t["right"]),
            "children_default": np.array(t["right"]), "features": np.array(t["features"]),
            "thresholds": np.array(t["thresholds"], dtype=np.float64), "values": values,
            "node_sample_weight": np.ones(n),
        })
    return {"trees": out}


def tree_classifier() -> onnx.ModelProto:
    """TreeEnsembleClassifier (ai.onnx.ml) from TREES: 'label' [rows] and 'scores' [rows, 3], no post_transform.

    For a GT/GTE split the ONNX true branch is shap's right child (x > t), for LEQ/LT its left one."""
    attrs: dict[str, list] = {k: [] for k in ("nodes_treeids", "nodes_nodeids", "nodes_featureids", "nodes_values",
                                               "nodes_modes", "nodes_truenodeids", "nodes_falsenodeids",
                                               "class_treeids", "class_nodeids", "class_ids", "class_weights")}
    for tree_id, t in enumerate(TREES):
        for i, mode in enumerate(t["modes"]):
            attrs["nodes_treeids"].append(tree_id)
            attrs["nodes_nodeids"].append(i)
            attrs["nodes_modes"].append(mode)
            if mode == "LEAF":
                attrs["nodes_featureids"].append(0)
                attrs["nodes_values"].append(0.0)
                attrs["nodes_truenodeids"].append(0)
                attrs["nodes_falsenodeids"].append(0)
                for c, w in enumerate(t["values"][i]):
                    attrs["class_treeids"].append(tree_id)
                    attrs["class_nodeids"].append(i)
                    attrs["class_ids"].append(c)
                    attrs["class_weights"].append(w)
                continue
            attrs["nodes_featureids"].append(t["features"][i])
            attrs["nodes_values"].append(t["thresholds"][i])
            left, right = t["left"][i], t["right"][i]
            true_child, false_child = (right, left) if mode in ("BRANCH_GT", "BRANCH_GTE") else (left, right)
            attrs["nodes_truenodeids"].append(true_child)
            attrs["nodes_falsenodeids"].append(false_child)
    node = helper.make_node(
        "TreeEnsembleClassifier", ["features"], ["label", "scores"], domain="ai.onnx.ml",
        classlabels_int64s=list(range(TREE_CLASSES)), post_transform="NONE", base_values=TREE_BASE, **attrs,
    )
    graph = helper.make_graph(
        [node], "trees",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", TREE_FEATURES])],
        [helper.make_tensor_value_info("label", TensorProto.INT64, ["batch"]),
         helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["batch", TREE_CLASSES])],
    )
    return _model(graph, ml=True)
