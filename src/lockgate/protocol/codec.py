"""Decode Open Inference Protocol requests into numpy arrays, and encode results back.

Decoding is zero-copy for raw_input_contents (``np.frombuffer`` over the bytes protobuf hands
us) and checks every input against the model's signature before anything reaches the runtime,
so a malformed request fails with INVALID_ARGUMENT naming the input and what was expected.

Nothing is allocated from what a request *declares*: the rank, the element count and the
bytes each input needs are checked against the bytes actually sent and against ``Limits``
first, in O(1) per input (RESOURCE_EXHAUSTED for a configured limit, INVALID_ARGUMENT for a
request that contradicts itself or the model). Messages quote at most a few hundred
characters of anything the caller sent.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import numpy as np

from lockgate.errors import InvalidArgument, ResourceExhausted
from lockgate.protocol import datatypes
from lockgate.protocol._bytes_codec import decode_bytes_tensor, encode_bytes_tensor
from lockgate.protocol.datatypes import DataType

# Defaults of ``Limits`` (and of the server's ``limits:`` settings, which document them).
MAX_DIMS = 16
MAX_ELEMENTS = 64 * 1024 * 1024
MAX_BYTES_ELEMENTS = 1024 * 1024
MAX_OUTPUT_BYTES = 64 * 1024 * 1024
# How much of a caller's string (a name, a datatype) an error message quotes.
_QUOTE_CHARS = 128


class LimitExceeded(ResourceExhausted):
    """A request larger than a configured limit (not a full queue)."""

    reason = "limit_exceeded"


@dataclass(frozen=True, slots=True)
class Limits:
    """Per-request bounds that hold whatever a request declares (set by the server config)."""

    max_dims: int = MAX_DIMS  # dimensions of one input's shape
    max_elements: int = MAX_ELEMENTS  # elements over all inputs of one request
    max_bytes_elements: int = MAX_BYTES_ELEMENTS  # BYTES elements over all inputs (each one a Python str)
    max_output_bytes: int = MAX_OUTPUT_BYTES  # encoded outputs of one response


DEFAULT_LIMITS = Limits()


def _quote(text: str) -> str:
    """A caller's string for an error message, cut to a readable length."""
    return repr(text) if len(text) <= _QUOTE_CHARS else repr(text[:_QUOTE_CHARS]) + f"... ({len(text)} chars)"


def _clip(text: str) -> str:
    """Like ``_quote``, but a short string stays as it is (datatype names)."""
    return text if len(text) <= 32 and text.isprintable() else _quote(text)


def _shape_text(shape: Any) -> str:
    """A declared shape for a message: every dim when short, the head and the rank when not."""
    if len(shape) <= 8:
        return "[" + ", ".join(str(d) for d in shape) + "]"
    return "[" + ", ".join(str(d) for d in list(shape[:4])) + f", ...] (rank {len(shape)})"


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """One input or output of a model: name, datatype and full shape (-1 = variable).

    The one tensor description in lockgate: the codec checks requests against it, the runtime
    derives it from the graph, and validation compares an expected one with the artifact's.
    """

    name: str
    datatype: DataType
    shape: tuple[int, ...]
    # The fixed trailing dims when only dim 0 may vary (the usual batched tensor): lets the
    # codec accept a matching shape with one tuple comparison. None: check dim by dim.
    fixed_tail: tuple[int, ...] | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        tail = self.shape[1:]
        fixed = bool(self.shape) and all(d >= 0 for d in tail)
        object.__setattr__(self, "fixed_tail", tail if fixed else None)

    def shape_text(self) -> str:
        return "[" + ", ".join(str(d) for d in self.shape) + "]"

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype.name, "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "TensorSpec":
        """From ``{"name", "datatype", "shape"}``; any datatype spelling ``datatypes.parse`` reads."""
        missing = [key for key in ("name", "datatype") if key not in data]
        if missing:
            raise InvalidArgument(f"tensor spec {dict(data)!r} lacks {', '.join(repr(m) for m in missing)}")
        try:
            return cls(str(data["name"]), datatypes.parse(str(data["datatype"])),
                       tuple(int(d) for d in data.get("shape", ())))
        except (TypeError, ValueError) as exc:
            raise InvalidArgument(f"tensor spec {data['name']!r}: {exc}") from None


@dataclass(frozen=True, slots=True)
class Signature:
    """A model version's inputs and outputs as the protocol sees them."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    max_batch_size: int = 0  # 0: the model takes no batch dimension; >0: dim 0 is the batch
    # Derived once here rather than per request: both are read on every request.
    output_names: tuple[str, ...] = field(init=False)
    _inputs_by_name: dict[str, TensorSpec] = field(init=False, repr=False, compare=False)
    # (name, datatype, shape) of raw inputs already checked once -> (numpy dtype, byte length, elements):
    # a request that repeats a known-good header decodes with one lookup and a length check.
    _raw_plans: dict[tuple, tuple[np.dtype, int, int]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "output_names", tuple(spec.name for spec in self.outputs))
        object.__setattr__(self, "_inputs_by_name", {spec.name: spec for spec in self.inputs})
        object.__setattr__(self, "_raw_plans", {})

    def input(self, name: str) -> TensorSpec | None:
        return self._inputs_by_name.get(name)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form stored in validation reports and sent as an expected signature."""
        return {
            "inputs": [spec.to_dict() for spec in self.inputs],
            "outputs": [spec.to_dict() for spec in self.outputs],
            "max_batch_size": self.max_batch_size,
        }

    @classmethod
    def from_dict(cls, data: "Signature | Mapping[str, Any]") -> "Signature":
        """From the JSON form (``max_batch_size`` optional); INVALID_ARGUMENT naming what is wrong."""
        if isinstance(data, Signature):
            return data
        if not isinstance(data, Mapping) or not isinstance(data.get("inputs", []), list) \
                or not isinstance(data.get("outputs", []), list):
            raise InvalidArgument("a signature is an object with 'inputs' and 'outputs' lists of {name, datatype, shape}")
        return cls(
            tuple(TensorSpec.from_dict(spec) for spec in data.get("inputs", [])),
            tuple(TensorSpec.from_dict(spec) for spec in data.get("outputs", [])),
            int(data.get("max_batch_size") or 0),
        )


def parameter_value(param: Any) -> Any:
    """The value held by an InferParameter's oneof."""
    which = param.WhichOneof("parameter_choice")
    return getattr(param, which) if which else None


def request_parameters(request: Any) -> dict[str, Any]:
    """The request-level ``parameters`` map as plain Python values."""
    return {key: parameter_value(value) for key, value in request.parameters.items()}


def _check_shape(spec: TensorSpec, shape: tuple[int, ...], max_batch_size: int) -> None:
    tail = spec.fixed_tail
    if (tail is not None and len(shape) == len(spec.shape) and shape[1:] == tail and shape[0] >= 0
            and (spec.shape[0] < 0 or shape[0] == spec.shape[0])
            and (max_batch_size <= 0 or shape[0] <= max_batch_size)):
        return  # fast path; anything else takes the checks below, which name the problem
    if len(shape) != len(spec.shape):
        raise InvalidArgument(
            f"input '{spec.name}': shape {_shape_text(shape)} has rank {len(shape)}, "
            f"expected rank {len(spec.shape)} matching {spec.shape_text()}"
        )
    for axis, (got, want) in enumerate(zip(shape, spec.shape)):
        if got < 0:
            raise InvalidArgument(f"input '{spec.name}': dimension {axis} is negative ({got})")
        if want >= 0 and got != want:
            raise InvalidArgument(
                f"input '{spec.name}': shape {_shape_text(shape)} does not match {spec.shape_text()} "
                f"(dimension {axis} must be {want})"
            )
    if max_batch_size > 0 and shape and shape[0] > max_batch_size:
        raise InvalidArgument(
            f"input '{spec.name}': batch size {shape[0]} exceeds the model's max_batch_size {max_batch_size}"
        )


def _decode_typed(spec: TensorSpec, tensor: Any, shape: tuple[int, ...], count: int) -> np.ndarray:
    dt = spec.datatype
    if dt.contents_field is None:
        raise InvalidArgument(
            f"input '{spec.name}': datatype {dt.name} has no typed contents field; send it in raw_input_contents"
        )
    values = getattr(tensor.contents, dt.contents_field)
    if len(values) != count:
        raise InvalidArgument(
            f"input '{spec.name}': contents.{dt.contents_field} holds {len(values)} elements, "
            f"expected {count} for shape {_shape_text(shape)}"
        )
    if dt.name == "BYTES":
        arr = np.empty(count, dtype=object)
        try:
            arr[:] = [v.decode("utf-8") for v in values]
        except UnicodeDecodeError as exc:
            raise InvalidArgument(f"input '{spec.name}': a BYTES element is not valid UTF-8 ({exc.reason}); "
                                  "ONNX Runtime string tensors hold text") from None
        return arr.reshape(shape)
    try:
        return np.asarray(values, dtype=dt.numpy).reshape(shape)
    except OverflowError as exc:
        raise InvalidArgument(f"input '{spec.name}': a value does not fit {dt.name} ({exc})") from None


def _decode_raw(spec: TensorSpec, raw: bytes, shape: tuple[int, ...], count: int) -> np.ndarray:
    dt = spec.datatype
    if dt.name == "BYTES":
        if count > len(raw) // 4:  # before the object array: every element has a 4-byte prefix
            raise InvalidArgument(
                f"input '{spec.name}': raw_input_contents holds {len(raw)} bytes, too few for {count} BYTES "
                f"elements (shape {_shape_text(shape)}; each element takes a 4-byte length prefix)"
            )
        try:
            return decode_bytes_tensor(raw, count).reshape(shape)
        except ValueError as exc:
            raise InvalidArgument(f"input '{spec.name}': {exc}") from None
    expected = count * dt.itemsize
    if len(raw) != expected:
        raise InvalidArgument(
            f"input '{spec.name}': raw_input_contents holds {len(raw)} bytes, expected {expected} "
            f"({count} x {dt.name} for shape {_shape_text(shape)})"
        )
    # Zero-copy view over the request's bytes; read-only, which ONNX Runtime accepts.
    return np.frombuffer(raw, dtype=dt.numpy).reshape(shape)


_MAX_RAW_PLANS = 256  # distinct (input, datatype, shape) headers remembered per signature


def decode_inputs(request: Any, signature: Signature, limits: Limits = DEFAULT_LIMITS) -> dict[str, np.ndarray]:
    """Turn a ModelInferRequest's inputs into arrays keyed by input name, checking the signature
    and ``limits`` before allocating anything."""
    tensors = request.inputs
    raw_contents = request.raw_input_contents
    use_raw = len(raw_contents) > 0
    if use_raw and len(raw_contents) != len(tensors):
        raise InvalidArgument(
            f"raw_input_contents has {len(raw_contents)} entries but the request has {len(tensors)} inputs; "
            "when raw contents are used every input must have one"
        )
    arrays: dict[str, np.ndarray] = {}
    plans = signature._raw_plans
    max_dims = limits.max_dims
    elements = 0
    for index, tensor in enumerate(tensors):
        name = tensor.name
        dims = tensor.shape
        if len(dims) > max_dims:  # before the shape becomes a tuple (or a message)
            raise LimitExceeded(f"input {_quote(name)}: shape has {len(dims)} dimensions, more than the "
                                f"server's limits.max_dims {max_dims}")
        shape = tuple(dims)
        if use_raw:
            plan = plans.get((name, tensor.datatype, shape))
            if plan is not None and name not in arrays:
                raw = raw_contents[index]
                if len(raw) == plan[1]:
                    # Zero-copy view over the request's bytes; read-only, which ONNX Runtime accepts.
                    arrays[name] = np.frombuffer(raw, dtype=plan[0]).reshape(shape)
                    elements += plan[2]
                    continue
        spec = signature.input(name)
        if spec is None:
            expected = ", ".join(f"'{s.name}'" for s in signature.inputs)
            raise InvalidArgument(f"input {_quote(name)} is not an input of this model; expected {expected}")
        if name in arrays:
            raise InvalidArgument(f"input '{name}' appears more than once")
        if tensor.datatype != spec.datatype.name:
            raise InvalidArgument(
                f"input '{name}': datatype {_clip(tensor.datatype) if tensor.datatype else '(empty)'} "
                f"does not match the model's {spec.datatype.name}"
            )
        _check_shape(spec, shape, signature.max_batch_size)
        count = math.prod(shape)
        if count == 0 and shape and max(shape) > limits.max_elements:  # [0, 2**62]: empty, but not a shape numpy can hold
            raise LimitExceeded(f"input '{name}': dimension {max(shape)} of shape {_shape_text(shape)} is larger "
                                f"than the server's limits.max_elements {limits.max_elements}")
        elements += count
        if elements > limits.max_elements:
            raise LimitExceeded(f"input '{name}': shape {_shape_text(shape)} brings the request to {elements} "
                                f"elements, more than the server's limits.max_elements {limits.max_elements}")
        if spec.datatype.name == "BYTES":
            _check_bytes_elements(arrays, name, count, limits)
        if use_raw:
            arrays[name] = _decode_raw(spec, raw_contents[index], shape, count)
            if spec.datatype.name != "BYTES" and len(plans) < _MAX_RAW_PLANS:
                plans[(name, tensor.datatype, shape)] = (spec.datatype.numpy, count * spec.datatype.itemsize, count)
        else:
            arrays[name] = _decode_typed(spec, tensor, shape, count)
    if elements > limits.max_elements:  # inputs that each passed a remembered header
        raise LimitExceeded(f"the request holds {elements} elements, more than the server's "
                            f"limits.max_elements {limits.max_elements}")
    if len(arrays) != len(signature.inputs):
        missing = [s.name for s in signature.inputs if s.name not in arrays]
        raise InvalidArgument(
            "missing input " + ", ".join(f"'{m}'" for m in missing)
            + "; the model expects " + ", ".join(f"'{s.name}' {s.datatype.name} {s.shape_text()}" for s in signature.inputs)
        )
    if signature.max_batch_size > 0 and len(arrays) > 1:
        batch_sizes = {arr.shape[0] for arr in arrays.values()}
        if len(batch_sizes) > 1:
            raise InvalidArgument(f"inputs disagree on the batch size (dimension 0): {sorted(batch_sizes)}")
    return arrays


def _check_bytes_elements(arrays: Mapping[str, np.ndarray], name: str, count: int, limits: Limits) -> None:
    """BYTES elements each become a Python object: bounded on their own, over the request."""
    total = count + sum(a.size for a in arrays.values() if a.dtype.kind == "O")
    if total > limits.max_bytes_elements:
        raise LimitExceeded(f"input '{name}': the request holds {total} BYTES elements, more than the server's "
                            f"limits.max_bytes_elements {limits.max_bytes_elements}")


# numpy dtype -> protocol datatype; scanning the table per output cost ~1.5 us per request.
_DATATYPE_OF: dict[np.dtype, DataType] = {}


def _datatype_of(dtype: np.dtype) -> DataType:
    dt = _DATATYPE_OF.get(dtype)
    if dt is None:
        dt = datatypes.from_numpy(dtype)
        if dtype.kind not in ("O", "U", "S"):  # string dtypes vary in length: not cached
            _DATATYPE_OF[dtype] = dt
    return dt


def requested_outputs(request: Any, signature: Signature) -> tuple[str, ...]:
    """Names of the outputs to return: the requested subset, or all outputs in model order."""
    if not request.outputs:
        return signature.output_names
    known = set(signature.output_names)
    names = []
    for out in request.outputs:
        if out.name not in known:
            expected = ", ".join(f"'{n}'" for n in signature.output_names)
            raise InvalidArgument(f"requested output '{out.name}' is not an output of this model; expected {expected}")
        names.append(out.name)
    return tuple(names)


def encode_outputs(
    response: Any,
    outputs: Mapping[str, np.ndarray],
    names: Iterable[str],
    max_bytes: int = MAX_OUTPUT_BYTES,
) -> None:
    """Append the named outputs to a ModelInferResponse as raw_output_contents.

    The response's encoded outputs are bounded by ``max_bytes`` (``limits.max_output_bytes``):
    numeric outputs are measured by their header, BYTES outputs in a first pass in C, and a
    response that would exceed it is refused (RESOURCE_EXHAUSTED) before it is built.
    """
    names = tuple(names)
    budget = max_bytes
    for name in names:
        arr = outputs[name]
        if arr.dtype.kind not in ("O", "U", "S"):
            budget -= arr.nbytes
    if budget < 0:
        raise LimitExceeded(f"the outputs take {max_bytes - budget} bytes, more than the server's "
                            f"limits.max_output_bytes {max_bytes}")
    add_output = response.outputs.add
    raw = response.raw_output_contents
    for name in names:
        arr = outputs[name]
        dt = _datatype_of(arr.dtype)
        out = add_output()
        out.name = name
        out.datatype = dt.name
        out.shape.extend(arr.shape)
        if dt.name == "BYTES":
            try:
                encoded = encode_bytes_tensor(arr, budget)
            except OverflowError:
                raise LimitExceeded(f"output '{name}' ({arr.size} BYTES elements) takes more than the "
                                    f"{budget} bytes left of the server's limits.max_output_bytes "
                                    f"{max_bytes}") from None
            budget -= len(encoded)
            raw.append(encoded)
        else:
            raw.append(np.ascontiguousarray(arr).tobytes())
