"""Automatic validation of an ONNX artifact before it may be approved.

Each check is independent and recorded as passed, failed or not applicable,
always with the reason in ``detail``, so a report explains *why* a version was
refused instead of stopping at the first problem, and a check that could not
run is never shown as passed (nor left out). Every report has the same rows:
``CHECK_NAMES``. Inference runs on CPU with one thread: this
is a gate, not a benchmark, and must not starve the serving threads.
"""

from __future__ import annotations

import hashlib
import statistics
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, Field, PlainSerializer, PlainValidator, WithJsonSchema

from lockgate.errors import InvalidArgument
from lockgate.protocol import datatypes
from lockgate.protocol.codec import Signature, TensorSpec

GOLDEN_INPUTS = "golden_inputs.npz"
GOLDEN_OUTPUTS = "golden_outputs.npz"

CheckStatus = Literal["passed", "failed", "not_applicable"]
# Every report carries these rows, in this order (the registry puts the provenance row first).
CHECK_NAMES: tuple[str, ...] = (
    "provenance", "sha256", "onnx_checker", "signature", "smoke_inference", "golden_outputs", "latency",
)
# Reports stored before "not_applicable" existed said "skipped".
LEGACY_STATUS = {"skipped": "not_applicable"}
Arrays = Mapping[str, np.ndarray]

# ONNX TensorProto element type -> Open Inference Protocol datatype (what lockgate can serve).
_ONNX_TO_OIP: dict[int, str] = {
    1: "FP32", 2: "UINT8", 3: "INT8", 4: "UINT16", 5: "INT16", 6: "INT32", 7: "INT64",
    8: "BYTES", 9: "BOOL", 10: "FP16", 11: "FP64", 12: "UINT32", 13: "UINT64",
}
# onnxruntime type string -> numpy dtype for generated samples.
_ORT_TO_NUMPY: dict[str, Any] = {
    "tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16,
    "tensor(int8)": np.int8, "tensor(int16)": np.int16, "tensor(int32)": np.int32,
    "tensor(int64)": np.int64, "tensor(uint8)": np.uint8, "tensor(uint16)": np.uint16,
    "tensor(uint32)": np.uint32, "tensor(uint64)": np.uint64, "tensor(bool)": np.bool_,
    "tensor(string)": np.object_,
}

# Stored in the report as its JSON form (``Signature.to_dict``) and read back from it.
StoredSignature = Annotated[
    Signature,
    PlainValidator(Signature.from_dict),
    PlainSerializer(Signature.to_dict, return_type=dict),
    WithJsonSchema({"type": "object"}),
]


class Tolerance(BaseModel):
    """``numpy.allclose`` tolerances for golden outputs."""

    rtol: float = 1e-4
    atol: float = 1e-5


class CheckResult(BaseModel):
    name: str
    status: CheckStatus
    detail: str = ""
    data: dict[str, Any] = Field(default_factory=dict)


class ValidationReport(BaseModel):
    """Stored as the ``validation`` record of a version; ``passed`` gates the lifecycle."""

    model: str
    version: str
    validator: str
    passed: bool
    sha256: str
    checks: list[CheckResult]
    signature: StoredSignature | None = None
    latency_ms: dict[str, float] = Field(default_factory=dict)
    started_at: str
    finished_at: str

    def failed_checks(self) -> list[str]:
        return [c.name for c in self.checks if c.status == "failed"]


def sha256_file(path: str | Path) -> str:
    """Streamed SHA-256 so large artifacts never sit in memory twice."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def onnx_signature(path: str | Path) -> Signature:
    """Graph inputs (initializers excluded) and outputs of an ONNX file.

    ValueError names a tensor whose element type lockgate cannot serve."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    initializers = {init.name for init in model.graph.initializer}

    def spec(value: Any) -> TensorSpec:
        tensor = value.type.tensor_type
        name = _ONNX_TO_OIP.get(tensor.elem_type)
        if name is None:
            type_name = onnx.TensorProto.DataType.Name(tensor.elem_type) if tensor.elem_type else "undefined"
            raise ValueError(f"tensor {value.name!r} has element type {type_name}, which lockgate does not serve")
        dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else -1 for d in tensor.shape.dim]
        return TensorSpec(value.name, datatypes.BY_NAME[name], tuple(dims))

    return Signature(
        tuple(spec(v) for v in model.graph.input if v.name not in initializers),
        tuple(spec(v) for v in model.graph.output),
    )


def config_signature(model_dir: str | Path) -> dict[str, Any] | None:
    """The expected signature the model's config declares (``inputs``/``outputs`` with datatype
    and dims, in config.yaml or config.pbtxt), or None if it declares none or cannot be read
    (a config that cannot be read fails the load, where the error is reported)."""
    from lockgate.serving.model_config import ModelConfigError, datatypes_name, read_model_config

    try:
        config = read_model_config(Path(model_dir))
    except (ModelConfigError, ValueError, OSError):
        return None
    batched = config.max_batch_size is None or config.max_batch_size > 0

    def specs(declared: list[Any]) -> list[dict[str, Any]] | None:
        out = []
        for tensor in declared:
            if tensor.datatype is None or tensor.dims is None:
                return None  # only a full declaration is an expectation
            out.append({"name": tensor.name, "datatype": datatypes_name(tensor.datatype),
                        "shape": ([-1] if batched else []) + list(tensor.dims)})
        return out

    inputs, outputs = specs(config.inputs), specs(config.outputs)
    if not config.inputs or inputs is None or outputs is None:
        return None
    return {"inputs": inputs, "outputs": outputs}


def parse_signature(data: Signature | Mapping[str, Any]) -> Signature:
    return Signature.from_dict(data)


def _compare_specs(kind: str, expected: Sequence[TensorSpec], actual: Sequence[TensorSpec], exact: bool,
                   source: str = "the config") -> list[str]:
    problems: list[str] = []
    by_name = {s.name: s for s in actual}
    for want in expected:
        have = by_name.get(want.name)
        if have is None:
            problems.append(f"{kind} {want.name!r} of {source} is not in the model (its {kind}s: {', '.join(by_name) or 'none'})")
            continue
        if want.datatype != have.datatype:
            problems.append(f"{kind} {want.name!r}: datatype {have.datatype.name}, expected {want.datatype.name}")
        if len(want.shape) != len(have.shape) or any(
            w != h and w != -1 and h != -1 for w, h in zip(want.shape, have.shape)
        ):
            problems.append(f"{kind} {want.name!r}: shape {list(have.shape)}, expected {list(want.shape)}")
    if exact:
        extra = sorted(set(by_name) - {s.name for s in expected})
        if extra:
            problems.append(f"model has {kind}s not in {source}: {', '.join(extra)}")
    return problems


def check_signature(expected: Signature, actual: Signature, source: str = "the config") -> list[str]:
    """Every model input must be expected; expected outputs must exist. ``source`` names what
    the expectation came from (the serving version, the config, a file) in the messages."""
    return _compare_specs("input", expected.inputs, actual.inputs, exact=True, source=source) + _compare_specs(
        "output", expected.outputs, actual.outputs, exact=False, source=source
    )


def generate_sample(session: Any, seed: int = 0) -> dict[str, np.ndarray]:
    """A deterministic one-row sample: normal floats, zero ints/bools, empty strings."""
    rng = np.random.default_rng(seed)
    sample: dict[str, np.ndarray] = {}
    for value in session.get_inputs():
        dtype = _ORT_TO_NUMPY.get(value.type)
        if dtype is None:
            raise InvalidArgument(f"cannot generate a sample for input {value.name!r} of type {value.type}")
        shape = tuple(d if isinstance(d, int) and d > 0 else 1 for d in value.shape)
        if dtype is np.object_:
            sample[value.name] = np.full(shape, "", dtype=object)
        elif np.issubdtype(dtype, np.floating):
            sample[value.name] = rng.standard_normal(shape).astype(dtype)
        else:
            sample[value.name] = np.zeros(shape, dtype=dtype)
    return sample


def load_npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as data:
        return {name: data[name] for name in data.files}


def find_golden(artifact: Path) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]] | None:
    """``golden_inputs.npz`` + ``golden_outputs.npz`` beside the artifact, if present."""
    inputs, outputs = artifact.parent / GOLDEN_INPUTS, artifact.parent / GOLDEN_OUTPUTS
    if not inputs.exists() and not outputs.exists():
        return None
    if not (inputs.exists() and outputs.exists()):
        missing = GOLDEN_OUTPUTS if inputs.exists() else GOLDEN_INPUTS
        raise InvalidArgument(f"{missing} missing beside {artifact}")
    return load_npz(inputs), load_npz(outputs)


def _compare_golden(outputs: dict[str, np.ndarray], golden: Arrays, tolerance: Tolerance) -> CheckResult:
    problems: list[str] = []
    diffs: dict[str, float] = {}
    for name, want in golden.items():
        got = outputs.get(name)
        if got is None:
            problems.append(f"output {name!r} not produced")
            continue
        if got.shape != want.shape:
            problems.append(f"output {name!r}: shape {list(got.shape)}, golden {list(want.shape)}")
            continue
        if np.issubdtype(want.dtype, np.number) and np.issubdtype(got.dtype, np.number):
            diff = float(np.max(np.abs(got.astype(np.float64) - want.astype(np.float64)))) if want.size else 0.0
            diffs[name] = diff
            if not np.allclose(got, want, rtol=tolerance.rtol, atol=tolerance.atol, equal_nan=True):
                problems.append(f"output {name!r}: max abs diff {diff:.3g} beyond rtol={tolerance.rtol}, atol={tolerance.atol}")
        elif not np.array_equal(got, want):
            problems.append(f"output {name!r} differs from golden")
    return CheckResult(
        name="golden_outputs",
        status="failed" if problems else "passed",
        detail="; ".join(problems) or (
            f"{', '.join(golden)} within rtol={tolerance.rtol:g}, atol={tolerance.atol:g} of {GOLDEN_OUTPUTS}"
            + (f" (max |diff| {max(diffs.values()):.2g})" if diffs else "")
        ),
        data={"max_abs_diff": diffs, "rtol": tolerance.rtol, "atol": tolerance.atol},
    )


def _rows(feed: Arrays) -> int:
    shapes = [np.shape(a) for a in feed.values()]
    return int(shapes[0][0]) if shapes and shapes[0] else 1


def run_checks(
    artifact: str | Path,
    *,
    expected_sha256: str,
    expected_signature: Signature | Mapping[str, Any] | None = None,
    sample: Arrays | None = None,
    golden: tuple[Arrays, Arrays] | None = None,
    tolerance: Tolerance | None = None,
    latency_runs: int = 5,
    signature_source: str = "the expected signature",
) -> tuple[list[CheckResult], Signature | None, dict[str, float]]:
    """Run every check; returns (checks in ``CHECK_NAMES`` order, observed signature, latency in ms).

    ``signature_source`` says where ``expected_signature`` came from (e.g. "version 1, which
    serves now"), so a mismatch names what the model was compared with.
    """
    path = Path(artifact)
    tolerance = tolerance or Tolerance()
    checks: list[CheckResult] = []
    latency: dict[str, float] = {}

    actual_sha = sha256_file(path)
    checks.append(
        CheckResult(
            name="sha256",
            status="passed" if actual_sha == expected_sha256 else "failed",
            detail="matches registration" if actual_sha == expected_sha256
            else f"artifact is {actual_sha}, registered {expected_sha256}",
            data={"sha256": actual_sha},
        )
    )

    try:
        import onnx

        onnx.checker.check_model(str(path))
        checks.append(CheckResult(name="onnx_checker", status="passed", detail="onnx.checker found no problems"))
    except Exception as exc:  # onnx raises several types; all mean "invalid model"
        checks.append(CheckResult(name="onnx_checker", status="failed", detail=str(exc)[:2000]))

    signature: Signature | None = None
    try:
        signature = onnx_signature(path)
    except Exception as exc:
        checks.append(CheckResult(name="signature", status="failed", detail=f"cannot read graph: {exc}"))
    if signature is not None:
        if expected_signature is None:
            checks.append(CheckResult(
                name="signature", status="not_applicable",
                detail="nothing to compare with: no version of this model serves yet, its config declares no "
                       "inputs or outputs, and no expected signature was given",
            ))
        else:
            problems = check_signature(parse_signature(expected_signature), signature, signature_source)
            checks.append(
                CheckResult(
                    name="signature",
                    status="failed" if problems else "passed",
                    detail=(f"compared with {signature_source}: " + "; ".join(problems)) if problems
                    else f"inputs and outputs match {signature_source}",
                    data={"compared_with": signature_source},
                )
            )

    if golden is None:
        try:
            golden = find_golden(path)
        except (InvalidArgument, OSError, ValueError) as exc:
            checks.append(CheckResult(name="golden_outputs", status="failed", detail=str(exc)))
            golden = None

    session = None
    try:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
        feed = dict(sample) if sample is not None else dict(golden[0]) if golden is not None else generate_sample(session)
        fed_from = "the sample given" if sample is not None else GOLDEN_INPUTS if golden is not None else "one generated row"
        missing = [i.name for i in session.get_inputs() if i.name not in feed]
        if missing:
            raise InvalidArgument(f"reference sample lacks input(s) {', '.join(missing)}")
        names = [o.name for o in session.get_outputs()]
        results = session.run(names, feed)
        non_finite = int(sum(int(np.size(r) - np.count_nonzero(np.isfinite(r))) for r in results
                             if isinstance(r, np.ndarray) and np.issubdtype(r.dtype, np.floating)))
        checks.append(
            CheckResult(
                name="smoke_inference",
                status="passed",
                detail=f"{_rows(feed)} row(s) from {fed_from} -> "
                + ", ".join(f"{n} {list(np.shape(r))}" for n, r in zip(names, results))
                + (f"; {non_finite} non-finite value(s)" if non_finite else ""),
                data={"output_shapes": {n: list(np.shape(r)) for n, r in zip(names, results)}, "non_finite": non_finite},
            )
        )
        if golden is not None:
            try:
                golden_run = results if sample is None else session.run(names, dict(golden[0]))
                checks.append(_compare_golden(dict(zip(names, golden_run)), golden[1], tolerance))
            except Exception as exc:  # bad golden inputs fail this check only
                checks.append(CheckResult(name="golden_outputs", status="failed", detail=f"{type(exc).__name__}: {exc}"[:2000]))
        timings: list[float] = []
        for _ in range(max(1, latency_runs)):
            start = time.perf_counter()
            session.run(names, feed)
            timings.append((time.perf_counter() - start) * 1000.0)
        latency = {"median": statistics.median(timings), "min": min(timings), "max": max(timings), "runs": float(len(timings))}
        checks.append(CheckResult(name="latency", status="passed", detail=f"median {latency['median']:.3f} ms over {len(timings)} runs", data=latency))
    except Exception as exc:  # any runtime failure is a failed smoke test, recorded
        checks.append(CheckResult(name="smoke_inference", status="failed", detail=f"{type(exc).__name__}: {exc}"[:2000]))
        if golden is not None and not any(c.name == "golden_outputs" for c in checks):
            checks.append(CheckResult(name="golden_outputs", status="not_applicable",
                                      detail="could not run: smoke inference failed"))
        checks.append(CheckResult(name="latency", status="not_applicable", detail="could not run: smoke inference failed"))
    if not any(c.name == "golden_outputs" for c in checks):
        checks.append(CheckResult(
            name="golden_outputs", status="not_applicable",
            detail=f"no {GOLDEN_INPUTS} and {GOLDEN_OUTPUTS} beside {path.name}, and none given",
        ))
    order = {name: i for i, name in enumerate(CHECK_NAMES)}
    checks.sort(key=lambda c: order.get(c.name, len(order)))
    return checks, signature, latency
