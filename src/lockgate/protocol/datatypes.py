"""One table relating the protocol's datatype names to numpy, ONNX Runtime and Triton enums.

Everything that converts between representations reads this table, so adding a datatype is a
one-line change and the codec never disagrees with ModelMetadata or ModelConfig.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, slots=True)
class DataType:
    name: str  # Open Inference Protocol name, e.g. "FP32"
    numpy: np.dtype  # element type of the decoded array (object for BYTES)
    ort: str  # onnxruntime type string, e.g. "tensor(float)"
    triton_enum: int  # inference.DataType value used in ModelConfig
    contents_field: str | None  # InferTensorContents field for typed contents, None if raw only
    itemsize: int  # bytes per element in raw_input_contents; 0 for BYTES (length-prefixed)


_TABLE = [
    DataType("BOOL", np.dtype(np.bool_), "tensor(bool)", 1, "bool_contents", 1),
    DataType("UINT8", np.dtype(np.uint8), "tensor(uint8)", 2, "uint_contents", 1),
    DataType("UINT16", np.dtype(np.uint16), "tensor(uint16)", 3, "uint_contents", 2),
    DataType("UINT32", np.dtype(np.uint32), "tensor(uint32)", 4, "uint_contents", 4),
    DataType("UINT64", np.dtype(np.uint64), "tensor(uint64)", 5, "uint64_contents", 8),
    DataType("INT8", np.dtype(np.int8), "tensor(int8)", 6, "int_contents", 1),
    DataType("INT16", np.dtype(np.int16), "tensor(int16)", 7, "int_contents", 2),
    DataType("INT32", np.dtype(np.int32), "tensor(int32)", 8, "int_contents", 4),
    DataType("INT64", np.dtype(np.int64), "tensor(int64)", 9, "int64_contents", 8),
    DataType("FP16", np.dtype(np.float16), "tensor(float16)", 10, None, 2),
    DataType("FP32", np.dtype(np.float32), "tensor(float)", 11, "fp32_contents", 4),
    DataType("FP64", np.dtype(np.float64), "tensor(double)", 12, "fp64_contents", 8),
    DataType("BYTES", np.dtype(object), "tensor(string)", 13, "bytes_contents", 0),
]

BY_NAME: dict[str, DataType] = {dt.name: dt for dt in _TABLE}
BY_ORT: dict[str, DataType] = {dt.ort: dt for dt in _TABLE}
SUPPORTED_NAMES: tuple[str, ...] = tuple(BY_NAME)


# Other spellings of the same datatypes: Triton config (TYPE_FP32 is handled by prefix), numpy
# and ONNX names, so a signature written by hand in any of them reads the same.
_ALIASES: dict[str, str] = {
    "FLOAT": "FP32", "FLOAT32": "FP32", "FLOAT16": "FP16", "HALF": "FP16",
    "FLOAT64": "FP64", "DOUBLE": "FP64", "STRING": "BYTES", "STR": "BYTES",
}


def parse(name: str) -> DataType:
    """The datatype a name means, accepting OIP (FP32), Triton config (TYPE_FP32) and numpy
    (float32) spellings; ValueError naming the supported ones otherwise."""
    upper = name.strip().upper().removeprefix("TYPE_")
    dt = BY_NAME.get(_ALIASES.get(upper, upper))
    if dt is None:
        raise ValueError(f"datatype {name!r} is not supported (supported: {', '.join(SUPPORTED_NAMES)})")
    return dt


def from_numpy(dtype: np.dtype) -> DataType:
    """Protocol datatype of a numpy array (strings and bytes map to BYTES)."""
    if dtype.kind in ("O", "U", "S"):
        return BY_NAME["BYTES"]
    for dt in _TABLE:
        if dt.numpy == dtype:
            return dt
    raise KeyError(f"numpy dtype {dtype} has no Open Inference Protocol datatype")
