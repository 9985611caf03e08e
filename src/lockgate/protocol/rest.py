"""The Open Inference Protocol's REST body (KServe v2 JSON, Triton's binary tensor extension)
to and from the protocol's own messages.

A REST ``infer`` body becomes the same ``ModelInferRequest`` a gRPC client sends: JSON
``data`` (flat or nested) is checked against its declared datatype and shape and packed into
``raw_input_contents``; binary tensors (``parameters.binary_data_size``, after the JSON header
of ``Inference-Header-Content-Length`` bytes) are sliced into it as they are. The pipeline then
decodes, checks and serves it exactly as it would over gRPC, so both transports give the same
results and the same error messages. On the way back the ``ModelInferResponse`` becomes JSON
``data`` or binary output tensors, as the request asked.

Every allocation here is bounded by the bytes received: a declared shape is compared with the
data that came before anything is built from it.
"""

from __future__ import annotations

import json
import math
from typing import Any, Mapping, Sequence

import numpy as np

from lockgate.errors import InvalidArgument
from lockgate.protocol import datatypes
from lockgate.protocol.codec import LimitExceeded
from lockgate.protocol._bytes_codec import decode_bytes_tensor, encode_bytes_tensor

#: Header naming the length of the JSON part of a body that carries binary tensors.
HEADER_LENGTH = "inference-header-content-length"
BINARY_DATA_SIZE = "binary_data_size"
BINARY_DATA = "binary_data"
BINARY_DATA_OUTPUT = "binary_data_output"
#: Most dimensions a declared shape may have (Triton allows 64 too).
MAX_DIMS = 64
#: Largest dimension: the protocol's shapes are int64.
MAX_DIM = 2**63 - 1
#: Most JSON text one output element can take: a float64's repr ("-1.2345678901234567e-308"),
#: an int64's digits, "false"; BYTES elements take their escaped text instead (``_json_bound``).
_JSON_CHARS_PER_ELEMENT = 25


def split_body(body: bytes, header_length: str | None) -> tuple[Any, memoryview]:
    """The parsed JSON header of an infer body and the binary part after it."""
    view = memoryview(body)
    if header_length is None:
        return parse_json(body), view[len(body):]
    try:
        size = int(header_length)
    except ValueError:
        raise InvalidArgument(f"Inference-Header-Content-Length is not an integer: {header_length[:40]!r}") from None
    if size < 0 or size > len(body):
        raise InvalidArgument(f"Inference-Header-Content-Length {size} is outside the body of {len(body)} bytes")
    return parse_json(view[:size]), view[size:]


def parse_json(data: bytes | memoryview) -> Any:
    try:
        return json.loads(bytes(data))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidArgument(f"the request body is not valid JSON: {exc}") from None


def _object(value: Any, what: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise InvalidArgument(f"{what} must be a JSON object")
    return value


def set_parameter(target: Any, key: str, value: Any, where: str) -> None:
    """One JSON parameter into an ``InferParameter`` map entry (bool, int, float or string)."""
    param = target[key]
    if isinstance(value, bool):
        param.bool_param = value
    elif isinstance(value, int):
        if -(2**63) <= value < 2**63:
            param.int64_param = value
        elif 0 <= value < 2**64:
            param.uint64_param = value
        else:
            raise InvalidArgument(f"{where} parameter '{key}': {value} does not fit 64 bits")
    elif isinstance(value, float):
        param.double_param = value
    elif isinstance(value, str):
        param.string_param = value
    else:
        raise InvalidArgument(f"{where} parameter '{key}' must be a boolean, a number or a string")


def parameters_dict(params: Any) -> dict[str, Any]:
    """An ``InferParameter`` map as JSON values."""
    out: dict[str, Any] = {}
    for key, param in params.items():
        which = param.WhichOneof("parameter_choice")
        if which is not None:
            out[key] = getattr(param, which)
    return out


def _shape(value: Any, name: str) -> list[int]:
    if not isinstance(value, list):
        raise InvalidArgument(f"input '{name}': 'shape' must be a list of integers")
    if len(value) > MAX_DIMS:  # before looking at each one
        raise InvalidArgument(f"input '{name}': shape has {len(value)} dimensions, at most {MAX_DIMS} are allowed")
    if not all(isinstance(d, int) and not isinstance(d, bool) for d in value):
        raise InvalidArgument(f"input '{name}': 'shape' must be a list of integers")
    if any(d < 0 for d in value):
        raise InvalidArgument(f"input '{name}': shape {value} has a negative dimension")
    if any(d > MAX_DIM for d in value):  # the wire's int64; JSON integers have no bound
        raise InvalidArgument(f"input '{name}': a dimension of shape {value} does not fit 64 bits")
    return value


def _json_tensor_bytes(name: str, datatype: str, shape: list[int], data: Any) -> bytes:
    """JSON ``data`` (flat or nested, row-major) as the raw bytes of its declared datatype."""
    dt = datatypes.BY_NAME.get(datatype)
    if dt is None:
        raise InvalidArgument(
            f"input '{name}': datatype {datatype or '(empty)'} is not one of {', '.join(datatypes.SUPPORTED_NAMES)}")
    if not isinstance(data, list):
        data = [data]
    expected = math.prod(shape)
    if dt.name == "BYTES":
        flat = _flatten(data, name)
        if len(flat) != expected:
            raise InvalidArgument(f"input '{name}': data holds {len(flat)} elements, expected {expected} for shape {shape}")
        if not all(isinstance(item, str) for item in flat):
            raise InvalidArgument(f"input '{name}': BYTES data must be strings")
        return encode_bytes_tensor(np.asarray(flat, dtype=object))
    try:
        arr = np.asarray(data)
    except (ValueError, OverflowError):
        arr = None  # ragged, or integers numpy cannot hold in one dtype: checked element by element
    if arr is not None and arr.dtype.kind != "O" and arr.size != expected:
        raise InvalidArgument(f"input '{name}': data holds {arr.size} elements, expected {expected} for shape {shape}")
    if dt.numpy.kind in "iu" and (arr is None or arr.dtype.kind not in "iu"):
        return _integers(name, dt, _flatten(data, name), expected, shape)
    if arr is None or arr.dtype.kind == "O":
        raise InvalidArgument(f"input '{name}': data is a ragged nested list; rows must have equal lengths")
    kind = arr.dtype.kind
    if dt.name == "BOOL":
        if kind != "b" and arr.size:
            raise InvalidArgument(f"input '{name}': BOOL data must be true/false")
    elif kind not in "biuf" and arr.size:
        raise InvalidArgument(f"input '{name}': {dt.name} data must be numbers")
    elif dt.numpy.kind in "iu":
        info = np.iinfo(dt.numpy)
        if arr.size and (int(arr.min()) < info.min or int(arr.max()) > info.max):
            raise InvalidArgument(f"input '{name}': a value does not fit {dt.name} ({info.min}..{info.max})")
    try:
        return np.ascontiguousarray(arr, dtype=dt.numpy).tobytes()
    except (OverflowError, ValueError, TypeError) as exc:
        raise InvalidArgument(f"input '{name}': data does not fit {dt.name} ({exc})") from None


def _integers(name: str, dt: datatypes.DataType, flat: list, expected: int, shape: list[int]) -> bytes:
    """Integer data numpy could not type at once (mixed magnitudes, floats, strings)."""
    if len(flat) != expected:
        raise InvalidArgument(f"input '{name}': data holds {len(flat)} elements, expected {expected} for shape {shape}")
    info = np.iinfo(dt.numpy)
    for value in flat:
        if isinstance(value, bool) or not isinstance(value, int):
            raise InvalidArgument(f"input '{name}': {dt.name} data must be integers")
        if value < info.min or value > info.max:
            raise InvalidArgument(f"input '{name}': a value does not fit {dt.name} ({info.min}..{info.max})")
    return np.array(flat, dtype=dt.numpy).tobytes()


def _flatten(data: list, name: str) -> list:
    out: list = []
    stack = [iter(data)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                if len(stack) > MAX_DIMS:
                    raise InvalidArgument(f"input '{name}': data nests deeper than {MAX_DIMS} levels")
                stack.append(iter(item))
                break
            out.append(item)
        else:
            stack.pop()
    return out


def build_request(body: Any, binary: memoryview, request: Any, model_name: str, model_version: str) -> bool:
    """Fill ``request`` (a ModelInferRequest) from a REST infer body.

    Returns whether every output should come back binary (``binary_data_output``).
    """
    body = _object(body, "the request body")
    request.model_name = model_name
    request.model_version = model_version
    request_id = body.get("id")
    if request_id is not None:
        if not isinstance(request_id, str):
            raise InvalidArgument("'id' must be a string")
        request.id = request_id
    all_binary = False
    params = body.get("parameters")
    if params is not None:
        for key, value in _object(params, "'parameters'").items():
            if key == BINARY_DATA_OUTPUT:
                all_binary = bool(value)
                continue
            set_parameter(request.parameters, key, value, "request")
    inputs = body.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise InvalidArgument("'inputs' must be a non-empty list of tensors")
    offset = 0
    raw = request.raw_input_contents
    for index, item in enumerate(inputs):
        item = _object(item, f"inputs[{index}]")
        name = item.get("name")
        if not isinstance(name, str) or not name:
            raise InvalidArgument(f"inputs[{index}] needs a 'name'")
        datatype = item.get("datatype")
        if not isinstance(datatype, str):
            raise InvalidArgument(f"input '{name}': 'datatype' must be a string")
        shape = _shape(item.get("shape"), name)
        tensor = request.inputs.add()
        tensor.name = name
        tensor.datatype = datatype
        tensor.shape.extend(shape)
        size = None
        tensor_params = item.get("parameters")
        if tensor_params is not None:
            for key, value in _object(tensor_params, f"input '{name}' parameters").items():
                if key == BINARY_DATA_SIZE:
                    size = value
                    continue
                set_parameter(tensor.parameters, key, value, f"input '{name}'")
        if size is not None:
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise InvalidArgument(f"input '{name}': binary_data_size must be a non-negative integer")
            if "data" in item:
                raise InvalidArgument(f"input '{name}' has both 'data' and binary_data_size")
            if offset + size > len(binary):
                raise InvalidArgument(
                    f"input '{name}': binary_data_size {size} runs past the {len(binary)} binary bytes of the body")
            raw.append(binary[offset:offset + size].tobytes())
            offset += size
        elif "data" in item:
            raw.append(_json_tensor_bytes(name, datatype, shape, item["data"]))
        else:
            raise InvalidArgument(f"input '{name}' has neither 'data' nor parameters.binary_data_size")
    if offset != len(binary):
        raise InvalidArgument(f"the body has {len(binary) - offset} binary bytes after the last binary input")
    outputs = body.get("outputs")
    if outputs is not None:
        if not isinstance(outputs, list):
            raise InvalidArgument("'outputs' must be a list")
        for index, item in enumerate(outputs):
            item = _object(item, f"outputs[{index}]")
            name = item.get("name")
            if not isinstance(name, str) or not name:
                raise InvalidArgument(f"outputs[{index}] needs a 'name'")
            out = request.outputs.add()
            out.name = name
            out_params = item.get("parameters")
            if out_params is not None:
                for key, value in _object(out_params, f"output '{name}' parameters").items():
                    if key == "classification":
                        raise InvalidArgument(f"output '{name}': the classification extension is not supported")
                    set_parameter(out.parameters, key, value, f"output '{name}'")
    return all_binary


def _wants_binary(request: Any, all_binary: bool) -> dict[str, bool]:
    wanted: dict[str, bool] = {}
    for out in request.outputs:
        param = out.parameters.get(BINARY_DATA)
        wanted[out.name] = param.bool_param if param is not None else all_binary
    return wanted


def _json_data(datatype: str, shape: Sequence[int], raw: bytes) -> list:
    if datatype == "BYTES":
        items = decode_bytes_tensor(raw, math.prod(shape)) if shape else decode_bytes_tensor(raw, 1)
        return list(items)
    return np.frombuffer(raw, dtype=datatypes.BY_NAME[datatype].numpy).tolist()


def _json_bound(datatype: str, shape: Sequence[int], raw: bytes) -> int:
    """At most how many bytes one output takes as JSON ``data``, from its header alone.

    A BYTES element can grow six-fold (``\\u00XX`` escapes) plus its quotes and comma.
    """
    count = math.prod(shape) if shape else 1
    if datatype == "BYTES":
        return 6 * len(raw) + 3 * count
    return _JSON_CHARS_PER_ELEMENT * count


def encode_response(request: Any, response: Any, all_binary: bool,
                    max_json_bytes: int | None = None) -> tuple[bytes, int | None]:
    """A ModelInferResponse as a REST body; the JSON header's length when binary tensors follow.

    JSON ``data`` costs a Python object per element and its text (~25 bytes per number, where
    the binary form takes 4): outputs to be rendered as JSON that could exceed
    ``max_json_bytes`` (the server's ``limits.max_output_bytes``) are refused before any of
    that is built, naming the binary form that carries them.
    """
    binary_of = _wants_binary(request, all_binary)
    if max_json_bytes is not None:
        bound = 0
        for out, raw in zip(response.outputs, response.raw_output_contents):
            if not binary_of.get(out.name, all_binary):
                bound += _json_bound(out.datatype, out.shape, raw)
                if bound > max_json_bytes:
                    raise LimitExceeded(
                        f"output '{out.name}' ({math.prod(out.shape)} {out.datatype} elements) as JSON could take more "
                        f"than the server's limits.max_output_bytes {max_json_bytes}; ask for binary output "
                        f"(request parameter binary_data_output, or the output's parameters.binary_data)")
    outputs = []
    chunks: list[bytes] = []
    for out, raw in zip(response.outputs, response.raw_output_contents):
        entry: dict[str, Any] = {"name": out.name, "datatype": out.datatype, "shape": list(out.shape)}
        params = parameters_dict(out.parameters)
        if binary_of.get(out.name, all_binary):
            params[BINARY_DATA_SIZE] = len(raw)
            chunks.append(raw)
        else:
            entry["data"] = _json_data(out.datatype, out.shape, raw)
        if params:
            entry["parameters"] = params
        outputs.append(entry)
    body: dict[str, Any] = {"model_name": response.model_name, "model_version": response.model_version}
    if response.id:
        body["id"] = response.id
    params = parameters_dict(response.parameters)
    if params:
        body["parameters"] = params
    body["outputs"] = outputs
    header = dumps(body)
    if not chunks:
        return header, None
    return b"".join([header, *chunks]), len(header)


def dumps(value: Any) -> bytes:
    """Compact JSON; NaN and infinities as Python's json writes them (tritonclient reads them)."""
    return json.dumps(value, separators=(",", ":"), default=_default).encode("utf-8")


def _default(value: Any) -> Any:
    if isinstance(value, (np.integer, np.floating, np.bool_)):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")
