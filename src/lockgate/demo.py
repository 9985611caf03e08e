"""Demo and test models built in code with the ``onnx`` package: nothing is downloaded.

``build_demo_repository`` writes two versions of a tabular credit-risk classifier (8
features, 3 classes) plus a reference data sample for drift profiling.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
# IR 9 loads in every onnxruntime lockgate supports (>= 1.17). onnx >= 1.23 writes a newer IR by
# default, which older runtimes refuse ("Unsupported model IR version: 14"; onnxruntime-gpu 1.31).
IR_VERSION = 9


def onnx_model(graph: onnx.GraphProto) -> onnx.ModelProto:
    """A model around ``graph`` at lockgate's opset and IR version."""
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="lockgate",
                             ir_version=IR_VERSION)


DEMO_MODEL = "credit"
DEMO_FEATURES = ["age", "income", "debt_ratio", "credit_lines", "late_payments", "utilization", "tenure_months", "region"]
DEMO_CLASSES = ["approve", "review", "decline"]


def _save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def mlp_model(sizes: list[int], *, seed: int, input_name: str = "features", output_name: str = "probabilities",
              softmax: bool = True, standardise: tuple[np.ndarray, np.ndarray] | None = None) -> onnx.ModelProto:
    """A ReLU MLP with the given layer sizes, FP32, batch dimension -1.

    ``standardise=(mean, std)`` puts ``(x - mean) / std`` in front, as a trained tabular model
    would have, so raw feature scales (income in thousands, ages) do not saturate the output.
    """
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    current = input_name
    if standardise is not None:
        mean, std = (np.asarray(a, np.float32) for a in standardise)
        inits += [numpy_helper.from_array(mean, "mean"), numpy_helper.from_array(np.where(std > 0, std, 1).astype(np.float32), "std")]
        nodes += [helper.make_node("Sub", [input_name, "mean"], ["centred"]), helper.make_node("Div", ["centred", "std"], ["scaled"])]
        current = "scaled"
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        w = (rng.standard_normal((fan_in, fan_out)) / np.sqrt(fan_in)).astype(np.float32)
        b = (rng.standard_normal(fan_out) * 0.1).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"W{i}"), numpy_helper.from_array(b, f"B{i}")]
        last = i == len(sizes) - 2
        out = ("logits" if softmax else output_name) if last else f"h{i}"
        nodes.append(helper.make_node("Gemm", [current, f"W{i}", f"B{i}"], [out if last else f"g{i}"]))
        if not last:
            nodes.append(helper.make_node("Relu", [f"g{i}"], [out]))
        current = out
    if softmax:
        nodes.append(helper.make_node("Softmax", ["logits"], [output_name], axis=1))
    graph = helper.make_graph(
        nodes, "mlp",
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, ["batch", sizes[0]])],
        [helper.make_tensor_value_info(output_name, TensorProto.FLOAT, ["batch", sizes[-1]])],
        initializer=inits,
    )
    return onnx_model(graph)


ONNX_TYPES = {
    "BOOL": TensorProto.BOOL, "UINT8": TensorProto.UINT8, "UINT16": TensorProto.UINT16, "UINT32": TensorProto.UINT32,
    "UINT64": TensorProto.UINT64, "INT8": TensorProto.INT8, "INT16": TensorProto.INT16, "INT32": TensorProto.INT32,
    "INT64": TensorProto.INT64, "FP16": TensorProto.FLOAT16, "FP32": TensorProto.FLOAT, "FP64": TensorProto.DOUBLE,
    "BYTES": TensorProto.STRING,
}


def identity_model(datatype: str, width: int = 4) -> onnx.ModelProto:
    """INPUT0 -> OUTPUT0 of one datatype, shape [batch, width]: round-trips any tensor."""
    t = ONNX_TYPES[datatype]
    graph = helper.make_graph(
        [helper.make_node("Identity", ["INPUT0"], ["OUTPUT0"])], f"identity_{datatype.lower()}",
        [helper.make_tensor_value_info("INPUT0", t, ["batch", width])],
        [helper.make_tensor_value_info("OUTPUT0", t, ["batch", width])],
    )
    return onnx_model(graph)


def reference_sample(rows: int = 5000, seed: int = 7) -> np.ndarray:
    """Synthetic training-like data for the demo classifier (the drift reference)."""
    rng = np.random.default_rng(seed)
    return np.column_stack([
        rng.normal(42, 12, rows).clip(18, 95),        # age
        rng.lognormal(10.8, 0.5, rows) / 1000.0,       # income (k)
        rng.beta(2, 5, rows),                          # debt_ratio
        rng.poisson(4, rows),                          # credit_lines
        rng.poisson(0.5, rows),                        # late_payments
        rng.beta(2, 3, rows),                          # utilization
        rng.gamma(3, 20, rows),                        # tenure_months
        rng.integers(0, 5, rows),                      # region (categorical 0..4)
    ]).astype(np.float32)


DEMO_CONFIG = """\
# Demo credit-risk classifier: two versions, dynamic batching, governance constraints.
max_batch_size: 64
dynamic_batching:
  max_queue_delay_us: 100
  preferred_batch_sizes: [16, 32, 64]
  max_queue_size: 2048
version_policy: {all: {}}
default_version: 1
runtime:
  intra_op_threads: 1
governance:
  mode: reject
  inputs:
    features:
      feature_names: [age, income, debt_ratio, credit_lines, late_payments, utilization, tenure_months, region]
      categorical: [region]
      features:
        age: {min: 18, max: 120}
        income: {min: 0}
        debt_ratio: {min: 0, max: 1}
        utilization: {min: 0, max: 1.5}
        region: {allowed: [0, 1, 2, 3, 4]}
  sampling: {rate: 0.01, max_per_second: 50}
  drift:
    window_rows: 10000
    window_seconds: 300
parameters:
  task: tabular-classification
  classes: approve,review,decline
"""


def write_reference_profile(root: Path, version: str, model_path: Path, sample: np.ndarray) -> Path:
    """The drift reference shipped with the demo: inputs and the model's outputs on them."""
    import onnxruntime as ort

    from lockgate.governance.profile import ReferenceProfile, build_profile

    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    outputs = {"probabilities": session.run(None, {"features": sample})[0]}
    profile = build_profile(
        sample, DEMO_FEATURES, ["region"], model=DEMO_MODEL, version=version, input_name="features",
        outputs=outputs, classifier_outputs=["probabilities"],
    )
    return profile.save(ReferenceProfile.path_for(root, DEMO_MODEL, version))


DEFAULT_DIR = Path("demo-repo")  # `lockgate demo --dir` default (lockgate.cli); its state is DEFAULT_DIR/.lockgate


def build_demo_repository(root: Path) -> Path:
    root = Path(root)
    model_dir = root / DEMO_MODEL
    sample = reference_sample()
    for version, seed in ((1, 11), (2, 12)):
        model = mlp_model([len(DEMO_FEATURES), 32, len(DEMO_CLASSES)], seed=seed,
                          standardise=(sample.mean(axis=0), sample.std(axis=0)))
        path = _save(model, model_dir / str(version) / "model.onnx")
        np.save(model_dir / str(version) / "reference_sample.npy", sample)
        write_reference_profile(root, str(version), path, sample)
    (model_dir / "config.yaml").write_text(DEMO_CONFIG)
    return root


DEMO_CARD = {
    "owner": "risk-ml@example.com",
    "intended_use": "Demo: triage of consumer credit applications into approve / review / decline.",
    "training_data": "synthetic sample built by lockgate.demo.reference_sample(seed=7)",
    "evaluation_metrics": {"auc": 0.81, "calibration_error": 0.04},
    "limitations": "Synthetic weights; not for real credit decisions.",
}


def approve_demo_versions(repo_root: Path, store_location: str) -> list[str]:
    """Register, validate and approve the demo versions (four eyes: two demo identities).

    Idempotent: versions already approved are left alone. Every step is in the audit trail,
    exactly as if operators had done it through the admin API.
    """
    from lockgate.control.audit import AuditTrail
    from lockgate.errors import NotFound
    from lockgate.control.registry import Registry, State
    from lockgate.control.store import open_store

    store = open_store(store_location)
    try:
        registry = Registry(store, AuditTrail(store), repository=repo_root)
        done = []
        model_dir = Path(repo_root) / DEMO_MODEL
        for version in sorted((p.name for p in model_dir.iterdir() if p.name.isdigit()), key=int):
            try:
                state = registry.get(DEMO_MODEL, version).state
            except NotFound:
                registry.register(DEMO_MODEL, version, None, "demo-registrant")
                state = State.REGISTERED
            if state == State.REGISTERED:
                sample = np.load(model_dir / version / "reference_sample.npy")[:64]
                report = registry.validate(DEMO_MODEL, version, "demo-registrant", sample={"features": sample})
                if not report.passed:
                    raise RuntimeError(f"demo version {version} failed validation: {report}")
                state = State.VALIDATED
            if state == State.VALIDATED:
                registry.approve(DEMO_MODEL, version, "demo-approver", "demo: synthetic model, approved for the walkthrough", DEMO_CARD)
            done.append(version)
        return done
    finally:
        store.close()
