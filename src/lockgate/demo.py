"""Demo and test models built in code with the ``onnx`` package: nothing is downloaded.

The demo tells a true story. Applicants for credit are drawn from a synthetic population
(``reference_sample``) and labelled by a known rule (``risk_score``: debt ratio, late
payments and utilisation raise the risk; income and tenure lower it; age and region play no
part), with some noise, into approve / review / decline. Two versions of the ``credit``
classifier are trained on that data in code (multinomial logistic regression in numpy):
version 1 sees four features, version 2 all eight, so version 2 is measurably more
accurate; each version's model card states its accuracy on held-out applicants, and its
golden outputs are the trainer's own predictions, so validation checks that the ONNX export
computes what was trained.

``prepare_demo`` writes the repository (version 1 approved; version 2 waiting in
``<repo>/.candidates`` for the walkthrough in ``docs/walkthrough.md``), gives four people
tokens, and records version 1's registration, validation, card and approval in the audit
trail, as those people would have through the admin API.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
import yaml
from onnx import TensorProto, helper, numpy_helper

if TYPE_CHECKING:
    from rich.console import Console

    from lockgate.config import ServerSettings

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


# ---------------------------------------------------------------------- the known rule
#: Weights of the rule that labels the synthetic applicants: risk = sum(weight * feature).
RISK_WEIGHTS: dict[str, float] = {
    "debt_ratio": 3.0, "late_payments": 0.9, "utilization": 2.0, "income": -0.02, "tenure_months": -0.008,
}
#: risk < 0.75: approve; 0.75 <= risk < 1.6: review; risk >= 1.6: decline (about 60/24/16 %).
RISK_THRESHOLDS = (0.75, 1.6)
#: Standard deviation of the noise added to the risk before thresholding (what no model can learn).
LABEL_NOISE = 0.25
TRAIN_ROWS, HOLDOUT_ROWS = 8000, 5000
TRAIN_SEED, HOLDOUT_SEED = 7, 99


def risk_score(x: np.ndarray) -> np.ndarray:
    """The known rule: the risk of each applicant (rows of ``DEMO_FEATURES``), without noise."""
    x = np.asarray(x, dtype=np.float64)
    return sum(x[:, DEMO_FEATURES.index(name)] * weight for name, weight in RISK_WEIGHTS.items())


def demo_labels(x: np.ndarray, seed: int) -> np.ndarray:
    """Class index (0 approve, 1 review, 2 decline) of each applicant: the rule plus noise."""
    noise = np.random.default_rng(seed).normal(0.0, LABEL_NOISE, len(x))
    return np.digitize(risk_score(x) + noise, RISK_THRESHOLDS)


# ---------------------------------------------------------------------- training
@dataclass(frozen=True)
class DemoVersion:
    """One version of the demo classifier: which features its training could see."""

    version: int
    features: tuple[str, ...]
    summary: str


DEMO_VERSIONS: dict[int, DemoVersion] = {
    1: DemoVersion(1, ("age", "income", "debt_ratio", "late_payments"),
                   "logistic regression on age, income, debt ratio and late payments"),
    2: DemoVersion(2, tuple(DEMO_FEATURES),
                   "logistic regression on all eight features (adds utilisation, tenure, credit lines, region)"),
}


@dataclass
class TrainedClassifier:
    """Softmax regression on standardised features: ``softmax(((x - mean) / std) @ w + b)``."""

    mean: np.ndarray
    std: np.ndarray
    weights: np.ndarray  # [features, classes]; zero rows for features the version does not use
    bias: np.ndarray
    metrics: dict[str, float] = field(default_factory=dict)

    def predict(self, x: np.ndarray) -> np.ndarray:
        logits = ((np.asarray(x, np.float64) - self.mean) / self.std) @ self.weights + self.bias
        logits -= logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        return (p / p.sum(axis=1, keepdims=True)).astype(np.float32)

    def to_onnx(self) -> onnx.ModelProto:
        f32 = np.float32
        graph = helper.make_graph(
            [helper.make_node("Sub", ["features", "mean"], ["centred"]),
             helper.make_node("Div", ["centred", "std"], ["scaled"]),
             helper.make_node("Gemm", ["scaled", "W", "B"], ["logits"]),
             helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1)],
            "credit",
            [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", len(DEMO_FEATURES)])],
            [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", len(DEMO_CLASSES)])],
            initializer=[numpy_helper.from_array(self.mean.astype(f32), "mean"),
                         numpy_helper.from_array(self.std.astype(f32), "std"),
                         numpy_helper.from_array(self.weights.astype(f32), "W"),
                         numpy_helper.from_array(self.bias.astype(f32), "B")],
        )
        return onnx_model(graph)


def train_classifier(x: np.ndarray, y: np.ndarray, features: tuple[str, ...], *, iterations: int = 150,
                     rate: float = 2.0, l2: float = 1e-3) -> TrainedClassifier:
    """Full-batch gradient descent on the cross-entropy; features outside ``features`` stay at 0."""
    x = np.asarray(x, np.float64)
    mean, std = x.mean(axis=0), x.std(axis=0)
    std = np.where(std > 0, std, 1.0)
    mask = np.array([name in features for name in DEMO_FEATURES], dtype=np.float64)
    z = (x - mean) / std * mask
    onehot = np.eye(len(DEMO_CLASSES))[y]
    w = np.zeros((x.shape[1], len(DEMO_CLASSES)))
    b = np.zeros(len(DEMO_CLASSES))
    for _ in range(iterations):
        logits = z @ w + b
        logits -= logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        p /= p.sum(axis=1, keepdims=True)
        grad = (p - onehot) / len(x)
        w -= rate * (z.T @ grad + l2 * w)
        b -= rate * grad.sum(axis=0)
        w *= mask[:, None]
    return TrainedClassifier(mean, std, w, b)


def evaluate(model: TrainedClassifier, x: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """Accuracy and per-class recall on held-out applicants (rounded: the card is for people)."""
    predicted = model.predict(x).argmax(axis=1)
    metrics = {"accuracy": round(float((predicted == y).mean()), 3)}
    for index, name in enumerate(DEMO_CLASSES):
        mask = y == index
        metrics[f"recall_{name}"] = round(float((predicted[mask] == index).mean()) if mask.any() else 0.0, 3)
    metrics["holdout_rows"] = float(len(y))
    return metrics


DEMO_CONFIG = """\
# Demo credit-risk classifier (lockgate.demo): dynamic batching, declared tensors, governance.
max_batch_size: 64
dynamic_batching:
  max_queue_delay_us: 100
  preferred_batch_sizes: [16, 32, 64]
  max_queue_size: 2048
version_policy: {all: {}}
default_version: 1
inputs:
  - {name: features, datatype: FP32, dims: [8]}
outputs:
  - {name: probabilities, datatype: FP32, dims: [3], labels: [approve, review, decline]}
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
"""


def demo_card(version: int, metrics: dict[str, float]) -> dict[str, Any]:
    """The model card the trainer hands over with a version: its measured metrics, its limits."""
    spec = DEMO_VERSIONS[version]
    return {
        "owner": "risk-ml@example.com",
        "intended_use": "Demo: triage of consumer credit applications into approve / review / decline.",
        "training_data": f"{TRAIN_ROWS} synthetic applicants, lockgate.demo.reference_sample(seed={TRAIN_SEED}), "
                         "labelled by lockgate.demo.risk_score plus noise",
        "evaluation_metrics": metrics,
        "limitations": "Synthetic data and a known rule; not for real credit decisions. Age and region play no part "
                       "in the rule" + ("; this version cannot see utilisation or tenure." if version == 1 else "."),
        "description": spec.summary,
    }


#: Card used by tests that need any complete card.
DEMO_CARD = {
    "owner": "risk-ml@example.com",
    "intended_use": "Demo: triage of consumer credit applications into approve / review / decline.",
    "training_data": "synthetic sample built by lockgate.demo.reference_sample(seed=7)",
    "evaluation_metrics": {"auc": 0.81, "calibration_error": 0.04},
    "limitations": "Synthetic weights; not for real credit decisions.",
}


def write_reference_profile(root: Path, version: str, model_path: Path, sample: np.ndarray) -> Path:
    """The drift reference shipped with a version: inputs and the model's outputs on them,
    the outputs' columns named by class."""
    import onnxruntime as ort

    from lockgate.governance.profile import ReferenceProfile, build_profile

    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    outputs = {"probabilities": session.run(None, {"features": sample})[0]}
    profile = build_profile(
        sample, DEMO_FEATURES, ["region"], model=DEMO_MODEL, version=version, input_name="features",
        outputs=outputs, classifier_outputs=["probabilities"], output_feature_names={"probabilities": DEMO_CLASSES},
    )
    return profile.save(ReferenceProfile.path_for(root, DEMO_MODEL, version))


def write_explain_background(root: Path, version: str, sample: np.ndarray) -> Path:
    """The background of the demo's explanations (``lockgate_explain: true``), as profile build writes it."""
    from lockgate.explain.background import background_path, sample_rows, save_background

    return save_background(background_path(root, DEMO_MODEL, version), {"features": sample_rows(sample, 100)})


def write_demo_version(root: Path, version: int) -> dict[str, float]:
    """Train version ``version`` and write ``root/credit/<version>/``: model.onnx, its reference
    sample and profile, golden inputs/outputs (the trainer's own predictions) and card.yaml."""
    spec = DEMO_VERSIONS[version]
    x = reference_sample(TRAIN_ROWS, seed=TRAIN_SEED)
    model = train_classifier(x, demo_labels(x, seed=TRAIN_SEED + 1), spec.features)
    holdout = reference_sample(HOLDOUT_ROWS, seed=HOLDOUT_SEED)
    model.metrics = evaluate(model, holdout, demo_labels(holdout, seed=HOLDOUT_SEED + 1))
    version_dir = Path(root) / DEMO_MODEL / str(version)
    path = _save(model.to_onnx(), version_dir / "model.onnx")
    sample = reference_sample(5000, seed=TRAIN_SEED)
    np.save(version_dir / "reference_sample.npy", sample)
    write_reference_profile(Path(root), str(version), path, sample)
    write_explain_background(Path(root), str(version), sample)
    golden = holdout[:32]
    np.savez(version_dir / "golden_inputs.npz", features=golden)
    np.savez(version_dir / "golden_outputs.npz", probabilities=model.predict(golden))
    (version_dir / "card.yaml").write_text(yaml.safe_dump(demo_card(version, model.metrics), sort_keys=False))
    return model.metrics


def build_demo_repository(root: Path, versions: tuple[int, ...] = (1, 2)) -> Path:
    """A repository with the demo model's ``versions`` and its config (tests use both versions)."""
    root = Path(root)
    for version in versions:
        write_demo_version(root, version)
    (root / DEMO_MODEL / "config.yaml").write_text(DEMO_CONFIG)
    return root


# ---------------------------------------------------------------------- the demo's people
@dataclass(frozen=True)
class DemoPerson:
    name: str
    role: str
    env: str  # the shell variable the token is exported as
    duties: str


DEMO_PEOPLE: tuple[DemoPerson, ...] = (
    DemoPerson("rita", "admin", "RITA_TOKEN", "registers and validates versions, writes model cards"),
    DemoPerson("alex", "approver", "ALEX_TOKEN", "approves versions that others registered and validated (four eyes)"),
    DemoPerson("oscar", "operator", "OSCAR_TOKEN", "moves traffic: weights, shadow, canary"),
    DemoPerson("vera", "viewer", "VERA_TOKEN", "reads: models, traffic, audit trail and exports"),
)
CANDIDATES_DIR = ".candidates"
TOKENS_ENV_FILE = "demo-tokens.env"


def _read_env_file(path: Path) -> dict[str, str]:
    values: dict[str, str] = {}
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            line = line.split("#", 1)[0].strip().removeprefix("export ").strip()
            name, sep, value = line.partition("=")
            if sep:
                values[name.strip()] = value.strip()
    return values


def demo_tokens(env_file: Path, server: str) -> dict[str, str]:
    """Each person's token: the ones already in ``env_file`` (so exported shells keep working),
    new ones for anyone missing. Rewrites the file, readable by its owner only."""
    from lockgate.control.auth import generate_token

    known = _read_env_file(env_file)
    tokens = {p.name: known.get(p.env) or generate_token().token for p in DEMO_PEOPLE}
    lines = [
        "# lockgate demo: the people of docs/walkthrough.md and their admin tokens (plain text: demo only).",
        f"# Load them into a shell with:  source {env_file}",
        f"export LOCKGATE_SERVER={server}",
        *(f"export {p.env}={tokens[p.name]}  # {p.name}, {p.role}: {p.duties}" for p in DEMO_PEOPLE),
    ]
    env_file.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(env_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write("\n".join(lines) + "\n")
    os.chmod(env_file, 0o600)
    return tokens


def write_hashed_tokens(path: Path, tokens: dict[str, str]) -> Path:
    """The server's side: names, roles and SHA-256 hashes only."""
    from lockgate.control.auth import hash_token

    roles = {p.name: p.role for p in DEMO_PEOPLE}
    document = {"tokens": {name: {"role": roles[name], "token_sha256": hash_token(token)} for name, token in tokens.items()}}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(document, sort_keys=True), encoding="utf-8")
    return path


def approve_demo_versions(repo_root: Path, store_location: str, versions: tuple[str, ...] = ("1",)) -> list[str]:
    """Register, validate, card and approve ``versions`` as rita (admin) and alex (approver).

    Idempotent: versions already past a step skip it. Every step is in the audit trail,
    exactly as if those people had done it through the admin API.
    """
    from lockgate.control.audit import AuditTrail
    from lockgate.control.registry import Registry, State
    from lockgate.control.store import open_store
    from lockgate.control.validation import config_signature
    from lockgate.errors import NotFound

    store = open_store(store_location)
    try:
        registry = Registry(store, AuditTrail(store), repository=repo_root)
        model_dir = Path(repo_root) / DEMO_MODEL
        for version in versions:
            try:
                state = registry.get(DEMO_MODEL, version).state
            except NotFound:
                registry.register(DEMO_MODEL, version, None, "rita")
                state = State.REGISTERED
            if state == State.REGISTERED:
                sample = np.load(model_dir / version / "reference_sample.npy")[:64]
                report = registry.validate(DEMO_MODEL, version, "rita", sample={"features": sample},
                                           expected_signature=config_signature(model_dir),
                                           signature_source="the inputs and outputs the model's config declares")
                if not report.passed:
                    raise RuntimeError(f"demo version {version} failed validation: {report.failed_checks()}")
                state = State.VALIDATED
            if state == State.VALIDATED:
                card = yaml.safe_load((model_dir / version / "card.yaml").read_text())
                registry.set_card(DEMO_MODEL, version, card, "rita")
                registry.approve(DEMO_MODEL, version, "alex", "demo: the version in production before the walkthrough")
        return list(versions)
    finally:
        store.close()


@dataclass
class PreparedDemo:
    """What ``lockgate demo`` wrote, for its summary (text or ``--json``)."""

    repository: Path
    state_dir: Path
    tokens_env: Path
    tokens_file: Path | None
    server: str
    approved: list[str]
    candidates: list[str]
    metrics: dict[str, dict[str, float]]

    def to_dict(self) -> dict[str, Any]:
        return {
            "repository": str(self.repository.resolve()), "state_dir": str(self.state_dir.resolve()),
            "tokens_env_file": str(self.tokens_env), "tokens_file": str(self.tokens_file) if self.tokens_file else None,
            "server": self.server, "model": DEMO_MODEL, "approved_versions": self.approved,
            "candidate_versions": self.candidates,
            "people": [{"name": p.name, "role": p.role, "env": p.env, "duties": p.duties} for p in DEMO_PEOPLE],
            "holdout_metrics": {str(k): v for k, v in self.metrics.items()},
        }

    def render(self, console: "Console") -> None:
        from lockgate.cli_common import make_table

        console.print(f"demo repository {self.repository}: model '{DEMO_MODEL}' version(s) "
                      f"{', '.join(self.approved)} approved; state in {self.state_dir}")
        for version, m in sorted(self.metrics.items()):
            console.print(f"  version {version}: {DEMO_VERSIONS[version].summary}; held-out accuracy {m['accuracy']:.3f}")
        if self.candidates:
            console.print(f"  new version(s) {', '.join(self.candidates)} waiting in "
                          f"{self.repository / CANDIDATES_DIR / DEMO_MODEL} for the walkthrough (docs/walkthrough.md)")
        table = make_table(title=f"demo people: tokens in {self.tokens_env} (source it)")
        for column in ("name", "role", "token variable", "may"):
            table.add_column(column)
        for person in DEMO_PEOPLE:
            table.add_row(person.name, person.role, f"${person.env}", person.duties)
        console.print(table)
        if self.tokens_file is None:
            console.print("note: --tokens-file replaces the demo people's tokens on the server")


def prepare_demo(settings: "ServerSettings", tokens_out: Path | None = None) -> PreparedDemo:
    """Everything ``lockgate demo`` does before serving (idempotent: an existing repository,
    its artifacts and its people's tokens are kept, so approvals stay valid)."""
    from lockgate.config import TOKENS_FILE_NAME

    root = Path(settings.model_repository)
    metrics: dict[int, dict[str, float]] = {}
    if not (root / DEMO_MODEL / "1" / "model.onnx").exists():
        metrics[1] = write_demo_version(root, 1)
    candidates_root = root / CANDIDATES_DIR
    if not (root / DEMO_MODEL / "2").exists() and not (candidates_root / DEMO_MODEL / "2" / "model.onnx").exists():
        metrics[2] = write_demo_version(candidates_root, 2)
    for version in (1, 2):
        if version not in metrics:
            for base in (root, candidates_root):
                card = base / DEMO_MODEL / str(version) / "card.yaml"
                if card.exists():
                    metrics[version] = yaml.safe_load(card.read_text())["evaluation_metrics"]
                    break
    config_path = root / DEMO_MODEL / "config.yaml"
    if not config_path.exists():
        config_path.write_text(DEMO_CONFIG)
    state_dir = Path(settings.state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::", "") else settings.host
    server = f"{host}:{settings.grpc_port}"
    env_file = tokens_out or root / TOKENS_ENV_FILE
    tokens = demo_tokens(env_file, server)
    hashed = write_hashed_tokens(state_dir / TOKENS_FILE_NAME, tokens)
    approved = approve_demo_versions(root, settings.store_location())
    waiting = sorted(p.name for p in (candidates_root / DEMO_MODEL).glob("*") if p.is_dir()
                     and not (root / DEMO_MODEL / p.name).exists()) if (candidates_root / DEMO_MODEL).is_dir() else []
    return PreparedDemo(root, state_dir, env_file, hashed if settings.tokens_file is None else None, server,
                        approved, waiting, metrics)
