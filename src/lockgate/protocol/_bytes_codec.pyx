# cython: language_level=3, boundscheck=False, wraparound=False
"""BYTES tensors in the Open Inference Protocol raw format: each element is a 4-byte
little-endian length followed by that many bytes. A Python loop over elements costs ~1 µs
each; these loops run in C and only touch Python to build (or read) the element objects.

Both directions are bounded before they allocate: decoding refuses a ``count`` the buffer
cannot hold (every element takes at least its 4-byte prefix), so the object array is never
larger than twice the bytes received; encoding measures the whole result first and refuses
one larger than ``max_bytes``, then writes it into one buffer."""

import numpy as np
cimport numpy as cnp
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.unicode cimport PyUnicode_Check
from cpython.bytes cimport PyBytes_Check
from libc.stdint cimport uint32_t
from libc.string cimport memcpy

cnp.import_array()

cdef extern from "Python.h":
    const char* PyUnicode_AsUTF8AndSize(object unicode, Py_ssize_t* size) except NULL
    const Py_ssize_t PY_SSIZE_T_MAX


def decode_bytes_tensor(const unsigned char[::1] buf, Py_ssize_t count):
    """Split a raw BYTES buffer into an object array of ``count`` str objects.

    ONNX Runtime's string tensors take Python ``str``, so elements are decoded as UTF-8 here,
    once; an element that is not UTF-8 is refused with its index.

    Raises ValueError naming the element when the buffer is truncated or has trailing bytes,
    and before allocating anything when ``count`` elements cannot fit in the buffer.
    """
    cdef Py_ssize_t n = buf.shape[0]
    cdef Py_ssize_t pos = 0
    cdef Py_ssize_t i
    cdef uint32_t length
    if count < 0:
        raise ValueError(f"BYTES element count {count} is negative")
    if count > n // 4:
        raise ValueError(f"{n} bytes cannot hold {count} BYTES elements (each needs a 4-byte length prefix)")
    out = np.empty(count, dtype=object)
    cdef object[:] view = out
    for i in range(count):
        if pos + 4 > n:
            raise ValueError(f"BYTES element {i}: buffer ends before its 4-byte length prefix")
        memcpy(&length, &buf[pos], 4)  # little-endian hosts only (x86_64, aarch64)
        pos += 4
        if <Py_ssize_t>length > n - pos:
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


def encoded_bytes_size(object arr):
    """Bytes the raw encoding of ``arr`` takes (a first pass of ``encode_bytes_tensor``)."""
    return _encode(arr, PY_SSIZE_T_MAX, False)


def encode_bytes_tensor(object arr, Py_ssize_t max_bytes=PY_SSIZE_T_MAX):
    """Serialise an array of bytes/str elements (any shape, C order) to the raw format.

    Raises OverflowError, before allocating the result, when it would exceed ``max_bytes``.
    """
    return _encode(arr, max_bytes, True)


cdef object _encode(object arr, Py_ssize_t max_bytes, bint write):
    cdef cnp.ndarray flat = np.ascontiguousarray(np.asarray(arr, dtype=object).reshape(-1))
    cdef object[:] items = flat
    cdef Py_ssize_t n = items.shape[0], i, size, total = 0, pos = 0
    cdef const char* data
    cdef uint32_t length
    cdef object item
    # Elements neither str nor bytes (numbers from a model's string cast) are converted once.
    cdef dict converted = {}
    if n > (PY_SSIZE_T_MAX >> 3):
        raise OverflowError(f"{n} BYTES elements")
    total = 4 * n
    for i in range(n):
        item = items[i]
        if PyUnicode_Check(item):
            PyUnicode_AsUTF8AndSize(item, &size)
        elif PyBytes_Check(item):
            size = PyBytes_GET_SIZE(item)
        else:
            item = converted[i] = (item.decode("utf-8", "replace") if isinstance(item, bytearray) else str(item)).encode("utf-8")
            size = PyBytes_GET_SIZE(item)
        if size > 0xFFFFFFFF:
            raise OverflowError(f"BYTES element {i} has {size} bytes; the format's length prefix holds 4 bytes")
        total += size
        if total > max_bytes:
            raise OverflowError(f"the BYTES output takes more than {max_bytes} bytes")
    if not write:
        return total
    out = PyBytes_FromStringAndSize(NULL, total)
    cdef char* dst = PyBytes_AS_STRING(out)
    for i in range(n):
        item = converted.get(i, items[i]) if converted else items[i]
        if PyUnicode_Check(item):
            data = PyUnicode_AsUTF8AndSize(item, &size)
        else:
            data = PyBytes_AS_STRING(item)
            size = PyBytes_GET_SIZE(item)
        length = <uint32_t>size
        memcpy(dst + pos, &length, 4)
        pos += 4
        if size:
            memcpy(dst + pos, data, size)
            pos += size
    return out
