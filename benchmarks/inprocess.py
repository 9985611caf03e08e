"""In-process onnxruntime throughput: the ceiling that dynamic batching is measured against.

No transport at all: one session (same thread settings as the served model) called in a loop
with a pre-built batch, for each batch size. The best rows/s over all batch sizes is what an
application that batches perfectly could get; a server fed batch-1 requests approaches it
only by batching them.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

DEFAULT_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def session(model_path: Path, intra_op_threads: int, inter_op_threads: int = 1) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads
    options.inter_op_num_threads = inter_op_threads
    return ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])


def rows_per_second(sess: ort.InferenceSession, batch: np.ndarray, seconds: float) -> float:
    """Rows/s of ``sess.run`` on ``batch`` for about ``seconds`` (after two warm-up runs)."""
    feeds = {sess.get_inputs()[0].name: batch}
    outputs = [sess.get_outputs()[0].name]
    for _ in range(2):
        sess.run(outputs, feeds)
    runs = 0
    start = time.perf_counter()
    deadline = start + seconds
    while True:
        sess.run(outputs, feeds)
        runs += 1
        now = time.perf_counter()
        if now >= deadline:
            return runs * batch.shape[0] / (now - start)


def sweep(
    model_path: Path,
    row_shape: int | tuple[int, ...],
    intra_op_threads: int,
    batch_sizes: tuple[int, ...] = DEFAULT_BATCH_SIZES,
    seconds: float = 0.5,
) -> dict[int, float]:
    """Rows/s for each batch size (same random input for every size); ``row_shape`` is one
    row's shape (or the feature count of a 2-D input)."""
    sess = session(model_path, intra_op_threads)
    rng = np.random.default_rng(7)
    shape = (row_shape,) if isinstance(row_shape, int) else tuple(row_shape)
    return {
        size: rows_per_second(sess, rng.standard_normal((size, *shape)).astype(np.float32), seconds)
        for size in batch_sizes
    }
