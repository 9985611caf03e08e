"""Server and model descriptions as Triton's messages, for every transport.

gRPC answers with these messages; the REST binding answers with their JSON form (Triton's
REST bodies are the same messages in JSON), so metadata, config and statistics can never
differ between the two.
"""

from __future__ import annotations

from typing import Any

from google.protobuf.descriptor import FieldDescriptor

import lockgate
from lockgate._proto import inference_pb2 as pb
from lockgate.serving.repository import LoadedModel, ModelRepository, ModelVersion

PLATFORM = "onnxruntime_onnx"
EXTENSIONS = ["model_repository", "statistics", "health", "reflection", "binary_tensor_data", "lockgate_governance"]


def server_metadata() -> Any:
    return pb.ServerMetadataResponse(name="lockgate", version=lockgate.__version__, extensions=EXTENSIONS)


def _model_and_version(repository: ModelRepository, name: str, version: str) -> tuple[LoadedModel, ModelVersion]:
    model = repository.get(name)
    return model, model.get(version)


def metadata(repository: ModelRepository, name: str, version: str = "") -> Any:
    """ModelMetadataResponse: versions, platform, inputs and outputs (NOT_FOUND if unknown)."""
    model, mv = _model_and_version(repository, name, version)
    response = pb.ModelMetadataResponse(name=model.name, platform=PLATFORM, versions=sorted(model.versions, key=int))
    for spec in mv.signature.inputs:
        response.inputs.add(name=spec.name, datatype=spec.datatype.name, shape=spec.shape)
    for spec in mv.signature.outputs:
        response.outputs.add(name=spec.name, datatype=spec.datatype.name, shape=spec.shape)
    return response


def config(repository: ModelRepository, name: str, version: str = "") -> Any:
    """ModelConfigResponse: batching, version policy, instance group, providers, SHA-256."""
    model, mv = _model_and_version(repository, name, version)
    sig = mv.signature
    cfg = pb.ModelConfig(
        name=model.name,
        platform=PLATFORM,
        backend="onnxruntime",
        max_batch_size=sig.max_batch_size,
        default_model_filename="model.onnx",
    )
    policy = model.config.version_policy
    if policy.policy == "all":
        cfg.version_policy.all.SetInParent()
    elif policy.policy == "specific":
        cfg.version_policy.specific.versions.extend(policy.versions)
    else:
        cfg.version_policy.latest.num_versions = policy.latest
    skip = 1 if sig.max_batch_size > 0 else 0  # Triton's dims exclude the batch dimension
    for spec in sig.inputs:
        cfg.input.add(name=spec.name, data_type=spec.datatype.triton_enum, dims=spec.shape[skip:])
    for spec in sig.outputs:
        cfg.output.add(name=spec.name, data_type=spec.datatype.triton_enum, dims=spec.shape[skip:])
    batching = model.config.dynamic_batching
    if batching is not None and sig.max_batch_size > 0:
        cfg.dynamic_batching.preferred_batch_size.extend(batching.preferred_batch_sizes)
        cfg.dynamic_batching.max_queue_delay_microseconds = batching.max_queue_delay_us
        cfg.dynamic_batching.default_queue_policy.max_queue_size = batching.max_queue_size
    provider = mv.runtime.provider
    group = cfg.instance_group.add(name=f"{model.name}_0", count=model.config.runtime.instances)
    if mv.runtime.on_cuda:
        group.kind = pb.ModelInstanceGroup.KIND_GPU
        group.gpus.append(model.config.runtime.device_id)
        acc = cfg.optimization.execution_accelerators.gpu_execution_accelerator.add(name="cuda")
        acc.parameters["io_binding"] = str(model.config.runtime.io_binding).lower()
        cfg.optimization.input_pinned_memory.enable = mv.runtime.staging is not None
    else:
        group.kind = pb.ModelInstanceGroup.KIND_CPU
        cfg.optimization.execution_accelerators.cpu_execution_accelerator.add(name="cpu")
    cfg.parameters["execution_providers"].string_value = ",".join(provider.active)
    cfg.parameters["device"].string_value = provider.device
    cfg.parameters["execution"].string_value = "inline" if mv.runtime.inline else "thread"
    if provider.fallback_reason:
        cfg.parameters["provider_fallback"].string_value = provider.fallback_reason
    cfg.parameters["sha256"].string_value = mv.sha256
    for key, value in model.config.parameters.items():
        cfg.parameters[key].string_value = value
    return pb.ModelConfigResponse(config=cfg)


def _duration(d: Any, target: Any) -> None:
    target.count = d.count
    target.ns = d.ns


def statistics(repository: ModelRepository, name: str = "", version: str = "") -> Any:
    """ModelStatisticsResponse for one version, every version of a model, or every model."""
    response = pb.ModelStatisticsResponse()
    if name:
        model = repository.get(name)
        selected = [(model, model.get(version))] if version else [(model, v) for v in model.versions.values()]
    else:
        selected = [(m, v) for m in repository.models().values() for v in m.versions.values()]
    for model, mv in selected:
        s = mv.stats
        out = response.model_stats.add(
            name=model.name, version=mv.version, last_inference=s.last_inference_ms,
            inference_count=s.inference_count, execution_count=s.execution_count,
        )
        st = out.inference_stats
        for src, dst in ((s.success, st.success), (s.fail, st.fail), (s.queue, st.queue),
                         (s.compute_input, st.compute_input), (s.compute_infer, st.compute_infer),
                         (s.compute_output, st.compute_output)):
            _duration(src, dst)
        for size in sorted(s.batch_stats):
            b = s.batch_stats[size]
            bs = out.batch_stats.add(batch_size=size)
            _duration(b.compute_input, bs.compute_input)
            _duration(b.compute_infer, bs.compute_infer)
            _duration(b.compute_output, bs.compute_output)
    return response


_INT64 = {FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_SINT64,
          FieldDescriptor.TYPE_FIXED64, FieldDescriptor.TYPE_SFIXED64}


def to_json(message: Any) -> dict[str, Any]:
    """A message as Triton's REST JSON: proto field names, enum names, 64-bit integers as
    numbers (protobuf's JSON mapping writes them as strings, which Triton's does not)."""
    out: dict[str, Any] = {}
    for field in message.DESCRIPTOR.fields:
        singular_message = field.type == FieldDescriptor.TYPE_MESSAGE and not _repeated(field)
        if (singular_message or field.containing_oneof is not None) and not message.HasField(field.name):
            continue  # unset sub-messages and oneof members are left out; scalars keep defaults
        out[field.name] = _value(field, getattr(message, field.name))
    return out


def _value(field: Any, value: Any) -> Any:
    if field.message_type is not None and field.message_type.GetOptions().map_entry:
        value_field = field.message_type.fields_by_name["value"]
        return {key: _scalar(value_field, item) for key, item in value.items()}
    if _repeated(field):
        return [_scalar(field, item) for item in value]
    return _scalar(field, value)


def _repeated(field: Any) -> bool:
    # protobuf 7 dropped FieldDescriptor.label in favour of is_repeated.
    return field.is_repeated if hasattr(field, "is_repeated") else field.label == FieldDescriptor.LABEL_REPEATED


def _scalar(field: Any, value: Any) -> Any:
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        return to_json(value)
    if field.type == FieldDescriptor.TYPE_ENUM:
        return field.enum_type.values_by_number[value].name if value in field.enum_type.values_by_number else value
    if field.type == FieldDescriptor.TYPE_BYTES:
        import base64

        return base64.b64encode(value).decode("ascii")
    if field.type in _INT64:
        return int(value)
    return value
