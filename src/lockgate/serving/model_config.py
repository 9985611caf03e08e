"""A model's configuration from ``config.yaml`` (lockgate's) and ``config.pbtxt`` (Triton's).

Triton users bring repositories with ``config.pbtxt``. It is parsed with protobuf's text
format against the ``ModelConfig`` messages of ``proto/inference.proto`` (Triton's
model_config.proto names and field numbers, for the fields lockgate serves), so its syntax
is exactly Triton's. Honoured:

* ``max_batch_size`` (absent means 0, as in Triton);
* ``input`` / ``output``: ``name``, ``data_type``, ``dims`` (checked against the ONNX graph at
  load; a fixed size narrows a free graph dimension), ``label_filename`` (class names);
* ``dynamic_batching``: ``max_queue_delay_microseconds``, ``preferred_batch_size``,
  ``default_queue_policy.max_queue_size`` (0, Triton's "unbounded", keeps lockgate's bound);
  without a ``dynamic_batching`` block there is no dynamic batcher, as in Triton;
* ``version_policy`` (``latest``, ``all``, ``specific``);
* ``instance_group``: ``count`` (concurrent executions), ``kind`` (KIND_GPU asks for CUDA
  explicitly, KIND_CPU for the CPU), ``gpus`` (one device);
* ``parameters`` (string values) and ``optimization.input_pinned_memory``.

Informational fields that change nothing here are accepted: ``name`` (must match the
directory), ``platform: "onnxruntime_onnx"`` / ``backend: "onnxruntime"``, ``input.format``,
``dynamic_batching.preserve_ordering``, ``optimization.output_pinned_memory``. Anything else
refuses the load with the field named, rather than being dropped: a setting that changes
behaviour must never vanish silently.

Both files: each setting may come from either file; a setting present in both must have the
same value, else the load is refused naming the setting and both values (no precedence to
remember). Settings only lockgate has (``governance``, ``runtime`` threads and execution,
``default_version``, labels given inline) live in ``config.yaml``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from google.protobuf import text_format

from lockgate.config import ModelConfigFile, TensorConfig, VersionPolicy
from lockgate.protocol import datatypes
from lockgate.protocol.codec import Signature, TensorSpec

YAML_NAME = "config.yaml"
PBTXT_NAME = "config.pbtxt"

# The config.pbtxt fields read above, for the message that refuses any other.
READ_FIELDS = (
    "name", "platform", "backend", "max_batch_size", "input", "output", "dynamic_batching", "version_policy",
    "instance_group", "parameters", "optimization.input_pinned_memory", "default_model_filename",
)
_PLATFORMS = {"", "onnxruntime_onnx"}
_BACKENDS = {"", "onnxruntime"}


class ModelConfigError(ValueError):
    """A model's configuration cannot be honoured; the message names the file and the field."""


def read_model_config(model_dir: Path) -> ModelConfigFile:
    """The model's settings from ``config.yaml`` and/or ``config.pbtxt`` (module docstring)."""
    model_dir = Path(model_dir)
    yaml_path, pbtxt_path = model_dir / YAML_NAME, model_dir / PBTXT_NAME
    native: dict[str, Any] = {}
    if yaml_path.exists():
        loaded = yaml.safe_load(yaml_path.read_text(encoding="utf-8")) or {}
        if not isinstance(loaded, dict):
            raise ModelConfigError(f"{yaml_path}: expected a mapping of settings")
        native = loaded
    if not pbtxt_path.exists():
        return ModelConfigFile.model_validate(native)
    triton = pbtxt_settings(pbtxt_path.read_text(encoding="utf-8"), model_dir, source=str(pbtxt_path))
    merged = merge_settings(triton, native, pbtxt_path.name, yaml_path.name)
    if "dynamic_batching" not in merged:
        merged["dynamic_batching"] = False  # Triton: no dynamic_batching block, no dynamic batcher
    if "max_batch_size" not in merged:
        merged["max_batch_size"] = 0  # Triton: absent means 0
    return ModelConfigFile.model_validate(merged)


# ---------------------------------------------------------------------- config.pbtxt
def _present_fields(text: str) -> set[str]:
    """Top-level field names written in the text (proto3 scalars have no presence of their own)."""
    tokenizer = text_format.Tokenizer(text.splitlines())
    names: set[str] = set()
    depth = 0
    previous = ""
    while not tokenizer.AtEnd():
        token = tokenizer.token
        if token in ("{", "<", "["):
            depth += 1
        elif token in ("}", ">", "]"):
            depth -= 1
        elif depth == 0 and previous != ":" and (token[:1].isalpha() or token[:1] == "_"):
            names.add(token)
        previous = token
        tokenizer.NextToken()
    return names


def _datatype_name(value: int, where: str) -> str:
    for dt in datatypes.BY_NAME.values():
        if dt.triton_enum == value:
            return dt.name
    raise ModelConfigError(f"{where}: data_type {value} is not one lockgate serves ({', '.join(datatypes.SUPPORTED_NAMES)})")


def _labels(model_dir: Path, filename: str, where: str) -> list[str]:
    path = model_dir / filename
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ModelConfigError(f"{where}: label_filename {filename!r}: cannot read {path}: {exc.strerror or exc}") from None
    return [line.strip() for line in lines if line.strip()]


def pbtxt_settings(text: str, model_dir: Path, *, source: str = PBTXT_NAME) -> dict[str, Any]:
    """Triton's ``config.pbtxt`` as lockgate settings (the ``config.yaml`` form); refuses the unknown."""
    from lockgate._proto import inference_pb2 as pb

    config = pb.ModelConfig()
    try:
        text_format.Parse(text, config)
    except text_format.ParseError as exc:
        raise ModelConfigError(
            f"{source}: {str(exc).rstrip('.')}. lockgate reads these config.pbtxt fields: {', '.join(READ_FIELDS)}; "
            f"remove the others, or put lockgate's own settings in {YAML_NAME}"
        ) from None
    present = _present_fields(text)
    refused: list[str] = []
    out: dict[str, Any] = {}
    model_name = Path(model_dir).name
    if config.name and config.name != model_name:
        refused.append(f"name {config.name!r} differs from the model directory {model_name!r}")
    if config.platform not in _PLATFORMS:
        refused.append(f"platform {config.platform!r} (lockgate serves onnxruntime_onnx)")
    if config.backend not in _BACKENDS:
        refused.append(f"backend {config.backend!r} (lockgate serves onnxruntime)")
    if config.default_model_filename not in ("", "model.onnx"):
        refused.append(f"default_model_filename {config.default_model_filename!r} (lockgate loads model.onnx)")
    if "max_batch_size" in present:
        out["max_batch_size"] = config.max_batch_size

    def tensor(item: Any, kind: str) -> dict[str, Any]:
        where = f"{source}: {kind} {item.name!r}"
        if not item.name:
            refused.append(f"an {kind} without a name")
        declared: dict[str, Any] = {"name": item.name, "dims": [int(d) for d in item.dims]}
        if item.data_type:
            declared["datatype"] = _datatype_name(item.data_type, where)
        else:
            refused.append(f"{kind} {item.name!r} has no data_type")
        if item.HasField("reshape"):
            refused.append(f"{kind} {item.name!r}: reshape (lockgate does not reshape tensors)")
        if item.is_shape_tensor:
            refused.append(f"{kind} {item.name!r}: is_shape_tensor")
        if kind == "input":
            if item.allow_ragged_batch:
                refused.append(f"input {item.name!r}: allow_ragged_batch")
            if item.optional:
                refused.append(f"input {item.name!r}: optional (every input is required here)")
        elif item.label_filename:
            declared["labels"] = _labels(Path(model_dir), item.label_filename, where)
        return declared

    if config.input:
        out["inputs"] = [tensor(i, "input") for i in config.input]
    if config.output:
        out["outputs"] = [tensor(o, "output") for o in config.output]

    if config.HasField("dynamic_batching"):
        batching = config.dynamic_batching
        section: dict[str, Any] = {
            "max_queue_delay_us": int(batching.max_queue_delay_microseconds),
            "preferred_batch_sizes": [int(b) for b in batching.preferred_batch_size],
        }
        if batching.priority_levels or batching.default_priority_level:
            refused.append("dynamic_batching priority levels")
        queue = batching.default_queue_policy
        if queue.max_queue_size:
            section["max_queue_size"] = int(queue.max_queue_size)
        if queue.timeout_action or queue.default_timeout_microseconds or queue.allow_timeout_override:
            refused.append("dynamic_batching.default_queue_policy timeouts (lockgate honours each request's deadline)")
        out["dynamic_batching"] = section

    if config.HasField("version_policy"):
        choice = config.version_policy.WhichOneof("policy_choice")
        if choice == "all":
            out["version_policy"] = {"all": {}}
        elif choice == "specific":
            out["version_policy"] = {"specific": [int(v) for v in config.version_policy.specific.versions]}
        elif choice == "latest":
            out["version_policy"] = {"latest": int(config.version_policy.latest.num_versions or 1)}

    runtime: dict[str, Any] = {}
    if config.instance_group:
        kinds = {g.kind for g in config.instance_group}
        gpus = sorted({gpu for g in config.instance_group for gpu in g.gpus})
        if pb.ModelInstanceGroup.KIND_MODEL in kinds:
            refused.append("instance_group kind KIND_MODEL")
        if len(kinds) > 1:
            refused.append("instance_group with several kinds (lockgate runs a model on one device)")
        if len(gpus) > 1:
            refused.append(f"instance_group gpus {gpus} (lockgate runs a model on one device)")
        runtime["instances"] = sum(g.count or 1 for g in config.instance_group)
        kind = next(iter(kinds))
        if kind == pb.ModelInstanceGroup.KIND_GPU:
            runtime["providers"] = ["cuda"]
        elif kind == pb.ModelInstanceGroup.KIND_CPU:
            runtime["providers"] = ["cpu"]
        if gpus:
            runtime["device_id"] = gpus[0]
    if config.HasField("optimization"):
        optimization = config.optimization
        accelerators = optimization.execution_accelerators
        names = [a.name for a in (*accelerators.gpu_execution_accelerator, *accelerators.cpu_execution_accelerator)]
        if names:
            refused.append(f"optimization.execution_accelerators {names} (lockgate runs ONNX Runtime's CUDA or CPU provider)")
        if optimization.HasField("input_pinned_memory"):
            runtime["pinned_memory"] = bool(optimization.input_pinned_memory.enable)
    if runtime:
        out["runtime"] = runtime
    if config.parameters:
        out["parameters"] = {key: value.string_value for key, value in config.parameters.items()}
    if refused:
        raise ModelConfigError(f"{source}: lockgate cannot honour " + "; ".join(refused) + f" (see {YAML_NAME} for lockgate's settings)")
    return out


# ---------------------------------------------------------------------- both files
def _normal(path: str, value: Any) -> Any:
    """A comparable form of one setting (both files spell some settings differently)."""
    if path == "version_policy":
        return VersionPolicy.model_validate(value)
    if path.endswith(".datatype") and isinstance(value, str):
        return datatypes_name(value)
    return value


def merge_settings(triton: dict[str, Any], native: dict[str, Any], triton_name: str, native_name: str,
                   path: str = "") -> dict[str, Any]:
    """Union of both files' settings; a setting in both with different values is refused."""
    merged = dict(native)
    for key, value in triton.items():
        where = f"{path}{key}"
        if key not in native:
            merged[key] = value
            continue
        other = native[key]
        if key in ("inputs", "outputs") and not path and isinstance(other, list):
            merged[key] = _merge_tensors(value, other, triton_name, native_name, where)
        elif isinstance(value, dict) and isinstance(other, dict) and key != "version_policy":
            merged[key] = merge_settings(value, other, triton_name, native_name, f"{where}.")
        elif _normal(where, value) != _normal(where, other):
            raise ModelConfigError(
                f"{where} is {value!r} in {triton_name} but {other!r} in {native_name}: "
                "set it in one file, or to the same value in both"
            )
    return merged


def _merge_tensors(triton: list[dict[str, Any]], native: list[Any], triton_name: str, native_name: str,
                   where: str) -> list[dict[str, Any]]:
    by_name: dict[str, dict[str, Any]] = {}
    for item in native:
        if not isinstance(item, dict) or "name" not in item:
            raise ModelConfigError(f"{native_name}: every entry of {where} needs a name")
        by_name[str(item["name"])] = dict(item)
    for item in triton:
        name = item["name"]
        if name in by_name:
            by_name[name] = merge_settings(item, by_name[name], triton_name, native_name, f"{where}[{name}].")
        else:
            by_name[name] = item
    return list(by_name.values())


# ---------------------------------------------------------------------- declared vs graph
def datatypes_name(text: str) -> str:
    """``FP32``, Triton's ``TYPE_FP32`` and ``TYPE_STRING`` -> the protocol's name."""
    name = text.strip().upper().removeprefix("TYPE_")
    return {"STRING": "BYTES", "FLOAT32": "FP32", "FLOAT": "FP32", "DOUBLE": "FP64"}.get(name, name)


def _declared_spec(spec: TensorSpec, declared: TensorConfig, skip: int, label: str, kind: str) -> TensorSpec:
    if declared.datatype is not None and datatypes_name(declared.datatype) != spec.datatype.name:
        raise ModelConfigError(
            f"{label}: {kind} {spec.name!r} is {spec.datatype.name} in the graph but {declared.datatype} in the config"
        )
    shape = spec.shape
    if declared.dims is not None:
        graph = spec.shape[skip:]
        if len(graph) != len(declared.dims) or any(g != d and -1 not in (g, d) for g, d in zip(graph, declared.dims)):
            batch = " (without the batch dimension, since max_batch_size > 0)" if skip else ""
            raise ModelConfigError(
                f"{label}: {kind} {spec.name!r} has dims {list(graph)} in the graph but {declared.dims} in the config{batch}"
            )
        shape = (*spec.shape[:skip], *(d if g == -1 else g for g, d in zip(graph, declared.dims)))
    if declared.labels is not None and shape and shape[-1] not in (-1, len(declared.labels)):
        raise ModelConfigError(
            f"{label}: output {spec.name!r} has {shape[-1]} classes but {len(declared.labels)} labels"
        )
    return TensorSpec(spec.name, spec.datatype, tuple(shape))


def declared_signature(signature: Signature, config: ModelConfigFile, label: str) -> Signature:
    """The graph's signature checked against the declared inputs and outputs (and narrowed)."""
    if not config.inputs and not config.outputs:
        return signature
    skip = 1 if signature.max_batch_size > 0 else 0

    def resolve(specs: tuple[TensorSpec, ...], declared: list[TensorConfig], kind: str, exact: bool) -> tuple[TensorSpec, ...]:
        if not declared:
            return specs
        graph = {s.name: s for s in specs}
        missing = [d.name for d in declared if d.name not in graph]
        if missing:
            raise ModelConfigError(
                f"{label}: the config declares {kind}(s) {', '.join(missing)}, but the graph's {kind}s are "
                f"{', '.join(graph) or 'none'}"
            )
        undeclared = [name for name in graph if name not in {d.name for d in declared}]
        if exact and undeclared:
            raise ModelConfigError(f"{label}: the graph has {kind}(s) {', '.join(undeclared)} that the config does not declare")
        by_name = {d.name: d for d in declared}
        return tuple(_declared_spec(s, by_name[s.name], skip, label, kind) if s.name in by_name else s for s in specs)

    return Signature(
        resolve(signature.inputs, config.inputs, "input", exact=True),
        resolve(signature.outputs, config.outputs, "output", exact=False),
        signature.max_batch_size,
    )
