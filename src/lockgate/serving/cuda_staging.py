"""Page-locked (pinned) host staging buffers for CUDA input copies.

Why: a host-to-device copy from pageable memory goes through the driver's bounce buffer and
blocks; from page-locked memory it is one DMA on the session's stream. Triton stages inputs
the same way (``input_pinned_memory``). onnxruntime's Python API has no portable call for
page-locked host memory, so the buffers come from the CUDA runtime library that
onnxruntime-gpu loads anyway (``cudaHostAlloc`` through ctypes). Each worker thread has its own
buffers, grown to the next power of two and reused, so a batch never waits on another's copy.
"""

from __future__ import annotations

import ctypes
import logging
import threading

import numpy as np

log = logging.getLogger("lockgate.runtime")

# onnxruntime-gpu 1.2x links libcudart.so.12, 1.3x libcudart.so.13; the unversioned name last.
CUDART_NAMES = ("libcudart.so.13", "libcudart.so.12", "libcudart.so")
CUDA_HOST_ALLOC_PORTABLE = 1  # pinned for every CUDA context, not only the current device's
CUDA_MEMORY_TYPE_HOST = 1  # cudaPointerAttributes.type for page-locked host memory
_MIN_CAPACITY = 4096


class _PointerAttributes(ctypes.Structure):
    # cudaPointerAttributes: type, device, devicePointer, hostPointer, then ``long reserved[8]``
    # since CUDA 12. The runtime writes the whole struct: the spare room keeps a later CUDA that
    # grows it from writing past ours.
    _fields_ = [("type", ctypes.c_int), ("device", ctypes.c_int),
                ("devicePointer", ctypes.c_void_p), ("hostPointer", ctypes.c_void_p),
                ("reserved", ctypes.c_long * 32)]


def _load_cudart() -> ctypes.CDLL | None:
    for name in CUDART_NAMES:
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        lib.cudaHostAlloc.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_size_t, ctypes.c_uint]
        lib.cudaHostAlloc.restype = ctypes.c_int
        lib.cudaFreeHost.argtypes = [ctypes.c_void_p]
        lib.cudaFreeHost.restype = ctypes.c_int
        lib.cudaGetErrorString.argtypes = [ctypes.c_int]
        lib.cudaGetErrorString.restype = ctypes.c_char_p
        lib.cudaPointerGetAttributes.argtypes = [ctypes.POINTER(_PointerAttributes), ctypes.c_void_p]
        lib.cudaPointerGetAttributes.restype = ctypes.c_int
        return lib
    return None


class PinnedStaging:
    """Per-thread page-locked buffers that inputs are copied into before binding."""

    def __init__(self, cudart: ctypes.CDLL) -> None:
        self._cudart = cudart
        self._local = threading.local()
        self._lock = threading.Lock()
        self._owned: list[int] = []  # every pointer handed out, freed by close()

    @classmethod
    def create(cls) -> tuple["PinnedStaging | None", str | None]:
        """A working stager, or None and the reason (logged by the caller, never silent)."""
        cudart = _load_cudart()
        if cudart is None:
            return None, f"no CUDA runtime library ({', '.join(CUDART_NAMES)}) could be loaded"
        staging = cls(cudart)
        try:
            staging._allocate(_MIN_CAPACITY)  # probe: fails at once without a usable device
        except RuntimeError as exc:
            return None, str(exc)
        return staging, None

    def _allocate(self, capacity: int) -> np.ndarray:
        ptr = ctypes.c_void_p()
        rc = self._cudart.cudaHostAlloc(ctypes.byref(ptr), capacity, CUDA_HOST_ALLOC_PORTABLE)
        if rc != 0:
            message = self._cudart.cudaGetErrorString(rc).decode(errors="replace")
            raise RuntimeError(f"cudaHostAlloc({capacity} bytes) failed: CUDA error {rc} ({message})")
        with self._lock:
            self._owned.append(ptr.value)
        return np.frombuffer((ctypes.c_uint8 * capacity).from_address(ptr.value), dtype=np.uint8)

    def stage(self, name: str, array: np.ndarray) -> np.ndarray:
        """Copy ``array`` into this thread's pinned buffer for ``name``; return the pinned view.

        The view stays valid until this thread stages ``name`` again, which is after the
        synchronous run that consumed it.
        """
        buffers: dict[str, np.ndarray] | None = getattr(self._local, "buffers", None)
        if buffers is None:
            buffers = self._local.buffers = {}
        nbytes = array.nbytes
        buffer = buffers.get(name)
        if buffer is None or buffer.nbytes < nbytes:
            capacity = max(_MIN_CAPACITY, 1 << max(nbytes - 1, 1).bit_length())
            buffer = buffers[name] = self._allocate(capacity)  # the smaller one is freed at close()
        view = buffer[:nbytes].view(array.dtype).reshape(array.shape)
        np.copyto(view, array, casting="no")
        return view

    def is_pinned(self, view: np.ndarray) -> bool:
        """True when CUDA reports ``view``'s memory as page-locked host memory."""
        attrs = _PointerAttributes()
        rc = self._cudart.cudaPointerGetAttributes(ctypes.byref(attrs), ctypes.c_void_p(view.ctypes.data))
        return rc == 0 and attrs.type == CUDA_MEMORY_TYPE_HOST

    def close(self) -> None:
        """Free every buffer; only after the session that read them has stopped running."""
        with self._lock:
            owned, self._owned = self._owned, []
        for ptr in owned:
            self._cudart.cudaFreeHost(ctypes.c_void_p(ptr))
        self._local = threading.local()
