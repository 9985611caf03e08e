# cython: language_level=3, boundscheck=False, wraparound=False
"""BYTES tensors in the Open Inference Protocol raw format: each element is a 4-byte
little-endian length followed by that many bytes. A Python loop over elements costs ~1 µs
each; this loop runs in C and only touches Python to build the element objects."""

import numpy as np
cimport numpy as cnp
from libc.stdint cimport uint32_t
from libc.string cimport memcpy

cnp.import_array()


def decode_bytes_tensor(const unsigned char[::1] buf, Py_ssize_t count):
    """Split a raw BYTES buffer into an object array of ``count`` str objects.

    ONNX Runtime's string tensors take Python ``str``, so elements are decoded as UTF-8 here,
    once; an element that is not UTF-8 is refused with its index.

    Raises ValueError naming the element when the buffer is truncated or has trailing bytes.
    """
    cdef Py_ssize_t n = buf.shape[0]
    cdef Py_ssize_t pos = 0
    cdef Py_ssize_t i
    cdef uint32_t length
    out = np.empty(count, dtype=object)
    cdef object[:] view = out
    for i in range(count):
        if pos + 4 > n:
            raise ValueError(f"BYTES element {i}: buffer ends before its 4-byte length prefix")
        memcpy(&length, &buf[pos], 4)  # little-endian hosts only (x86_64, aarch64)
        pos += 4
        if pos + <Py_ssize_t>length > n:
            raise ValueError(f"BYTES element {i}: declares {length} bytes but only {n - pos} remain")
        try:
            view[i] = (<const char*>&buf[pos])[:length].decode("utf-8") if length else ""
        except UnicodeDecodeError as exc:
            raise ValueError(f"BYTES element {i} is not valid UTF-8 ({exc.reason} at byte {exc.start}); "
                             "ONNX Runtime string tensors hold text") from None
        pos += length
    if pos != n:
        raise ValueError(f"BYTES buffer has {n - pos} trailing bytes after {count} elements")
    return out


def encode_bytes_tensor(object arr):
    """Serialise an array of bytes/str elements (any shape, C order) to the raw format."""
    cdef list parts = []
    cdef object item
    for item in np.asarray(arr, dtype=object).ravel(order="C"):
        if isinstance(item, str):
            item = (<str>item).encode("utf-8")
        elif not isinstance(item, (bytes, bytearray)):
            item = str(item).encode("utf-8")
        parts.append(len(item).to_bytes(4, "little"))
        parts.append(item)
    return b"".join(parts)
