"""Dynamic batching per model version: merge concurrent requests into one ONNX Runtime run.

Requests wait in a bounded queue. Worker tasks (one per configured instance) take as many
compatible requests as fit ``max_batch_size``, optionally wait up to ``max_queue_delay_us``
to fill a preferred size, concatenate along the batch axis, run once, and split the results
back. A full queue refuses at once (RESOURCE_EXHAUSTED); a request whose deadline passed
while queued is never run (DEADLINE_EXCEEDED); closing drains everything already accepted.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING
import numpy as np

from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument as OrtInvalidArgument

from lockgate.config import DynamicBatchingConfig
from lockgate.errors import (
    DeadlineExceeded, InferenceFailed, InvalidArgument, LockgateError, ResourceExhausted, Unavailable,
)
from lockgate.serving.runtime import OrtRuntime
from lockgate.serving.stats import VersionStats
from lockgate.telemetry.logs import CauseLog

if TYPE_CHECKING:
    from lockgate.telemetry.tracing import RequestTrace

log = logging.getLogger("lockgate.batcher")

# Deadlines shorter than this are waited for with asyncio.sleep(0) spins; asyncio's timers
# have millisecond resolution, far coarser than a useful batching delay.
_SPIN_LIMIT_S = 0.002


@dataclass(slots=True)
class _Pending:
    inputs: dict[str, np.ndarray]
    rows: int
    shape_key: tuple
    future: asyncio.Future
    deadline: float | None  # time.monotonic() value, None for no deadline
    enqueued_ns: int
    trace: "RequestTrace | None" = None  # the trace of a sampled request


class DynamicBatcher:
    """The queue and executor for one model version."""

    def __init__(
        self,
        runtime: OrtRuntime,
        *,
        label: str,
        max_batch_size: int,
        batching: DynamicBatchingConfig | None,
        stats: VersionStats,
        instances: int = 1,
    ) -> None:
        self.runtime = runtime
        self.label = label
        self.stats = stats
        # Without a batch dimension (max_batch_size 0) or without dynamic batching, each
        # request runs on its own; the queue still bounds the work in flight.
        self._merge = max_batch_size > 0 and batching is not None
        self.max_batch_size = max(1, max_batch_size)
        cfg = batching or DynamicBatchingConfig()
        self.max_queue_size = cfg.max_queue_size
        self.max_delay_s = cfg.max_queue_delay_us / 1e6
        preferred = sorted(b for b in cfg.preferred_batch_sizes if 0 < b <= self.max_batch_size)
        self._target_rows = preferred[-1] if preferred else self.max_batch_size
        self._preferred = set(preferred)
        self._queue: deque[_Pending] = deque()
        self._wakeup = asyncio.Event()
        self._closing = False
        self._last_batch_requests = 0
        self._running = 0  # workers holding a batch (filling or executing) + direct runs
        self._direct_recent = False  # a lone request ran directly and the loop has not turned since
        self._idle = asyncio.Event()
        self._idle.set()
        self._loop = asyncio.get_running_loop()
        self._executor = None if runtime.inline else ThreadPoolExecutor(instances, thread_name_prefix=f"ort-{label}")
        self._events = CauseLog(log)  # failed executions: one line (and traceback) per cause per interval
        self._workers = [self._loop.create_task(self._work()) for _ in range(instances)]

    # -- request side ---------------------------------------------------------------
    def run_now(self, inputs: dict[str, np.ndarray], deadline: float | None, trace: "RequestTrace | None" = None) -> dict[str, np.ndarray] | None:
        """Run a lone request at once in the caller, or return None when it must queue (``submit``).

        Taken only when a worker would run it alone at once anyway: no future, no queue entry,
        no coroutine, no loop turn. That is: an inline runtime, nothing queued ahead of it, no
        worker holding a batch, the previous batch ran alone (so no fill wait is due), and no
        direct run yet in this loop turn. Once requests overlap, a batch of several forms and
        the workers take over until a batch runs alone again. Arrival gaps are no signal: one
        sequential client sends back to back without ever overlapping. Under gRPC load each
        request arrives in its own loop turn, so this is the path nearly every batch-1 request
        takes until requests really overlap.
        """
        if self._closing or self._executor is not None or self._queue or self._running:
            return None
        if self._merge and (self._direct_recent or self._last_batch_requests > 1):
            return None
        if deadline is not None and time.monotonic() >= deadline:
            raise DeadlineExceeded(f"{self.label}: the request's deadline passed before it was queued")
        if self._merge:
            self._direct_recent = True
            self._loop.call_soon(self._end_direct_turn)
        self._last_batch_requests = 1
        start_ns = time.perf_counter_ns()
        try:
            outputs = self.runtime.run(inputs)
        except Exception as exc:
            error = self._failure(exc, 1)
            if trace is not None:
                trace.batch(start_ns, start_ns, time.perf_counter_ns(), 1, error)
            raise error from None
        end_ns = time.perf_counter_ns()
        rows = next(iter(inputs.values())).shape[0] if self._merge else 1
        if trace is not None:
            trace.batch(start_ns, start_ns, end_ns, rows, None)
        self.stats.record_direct(rows, end_ns - start_ns)
        return outputs

    def _failure(self, exc: Exception, requests: int) -> LockgateError:
        """What the callers of a failed execution get: our own errors as they are; inputs ONNX
        Runtime refuses are INVALID_ARGUMENT; anything else it raised becomes INTERNAL for this
        batch only, and serving goes on. Logged at most once per cause per interval."""
        if isinstance(exc, LockgateError):
            return exc
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if isinstance(exc, OrtInvalidArgument):
            self._events.record("ort_invalid_argument", "%s: ONNX Runtime refused the inputs: %s", self.label,
                                first_line[:300], level=logging.INFO)
            return InvalidArgument(f"{self.label}: the model refused the inputs: {first_line[:300]}")
        self._events.record("inference_failed", "%s: inference failed for a batch of %d request(s)", self.label,
                            requests, exc_info=exc, level=logging.ERROR)
        return InferenceFailed(f"{self.label}: inference failed: {first_line[:300]}")

    async def submit(self, inputs: dict[str, np.ndarray], deadline: float | None, trace: "RequestTrace | None" = None) -> dict[str, np.ndarray]:
        """Queue one request and wait for its own rows of the batch result."""
        if self._closing:
            raise Unavailable(f"{self.label} is unloading and takes no new requests")
        if len(self._queue) >= self.max_queue_size:
            raise ResourceExhausted(
                f"{self.label}: queue is full ({len(self._queue)} requests waiting, max_queue_size "
                f"{self.max_queue_size}); retry later"
            )
        if deadline is not None and time.monotonic() >= deadline:
            raise DeadlineExceeded(f"{self.label}: the request's deadline passed before it was queued")
        outputs = self.run_now(inputs, deadline, trace)
        if outputs is not None:
            return outputs
        first = next(iter(inputs.values()))
        if self._merge:
            rows = first.shape[0]
            shape_key = tuple((name, arr.shape[1:], arr.dtype.str) for name, arr in inputs.items())
        else:
            rows, shape_key = 1, ()
        future = self._loop.create_future()
        pending = _Pending(inputs, rows, shape_key, future, deadline, time.perf_counter_ns(), trace)
        self._queue.append(pending)
        self.stats.pending += 1
        self._idle.clear()
        self._wakeup.set()
        return await future

    def _end_direct_turn(self) -> None:
        self._direct_recent = False

    # -- worker side ----------------------------------------------------------------
    def _take_batch(self, rows: int = 0, shape_key: tuple | None = None) -> list[_Pending]:
        """Pop a run of compatible requests from the queue front, dropping expired ones.

        ``rows`` and ``shape_key`` describe a batch already being filled, so the result never
        pushes it past max_batch_size nor mixes shapes.
        """
        batch: list[_Pending] = []
        now = time.monotonic()
        queue = self._queue
        while queue:
            item = queue[0]
            if item.future.done():  # caller went away (cancelled)
                queue.popleft()
                self.stats.pending -= 1
                continue
            if item.deadline is not None and now >= item.deadline:
                queue.popleft()
                self.stats.pending -= 1
                item.future.set_exception(
                    DeadlineExceeded(f"{self.label}: the request's deadline passed while it waited in the queue; it was not run")
                )
                continue
            if shape_key is None:
                shape_key = item.shape_key
            elif not self._merge or item.shape_key != shape_key or rows + item.rows > self.max_batch_size:
                break
            queue.popleft()
            batch.append(item)
            rows += item.rows
            if not self._merge:
                break
        return batch

    async def _fill(self, batch: list[_Pending]) -> list[_Pending]:
        """Wait up to max_queue_delay for more requests while the batch is below target size."""
        rows = sum(p.rows for p in batch)
        key = batch[0].shape_key
        deadline = time.monotonic() + self.max_delay_s
        while rows < self._target_rows and rows not in self._preferred and rows < self.max_batch_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self._closing:
                break
            await asyncio.sleep(0 if remaining < _SPIN_LIMIT_S else min(remaining, 0.001))
            if self._queue:
                more = self._take_batch(rows, key)
                if not more and self._queue and self._queue[0].shape_key != key:
                    break  # an incompatible request is next: run what we have
                batch.extend(more)
                rows += sum(p.rows for p in more)
        return batch

    async def _work(self) -> None:
        while True:
            if not self._queue:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            batch = self._take_batch()
            if not batch:
                self._maybe_idle()
                continue
            self._running += 1  # counted while filling too: a direct run must not overtake it
            try:
                # Waiting to fill a batch only pays when requests overlap: a lone request whose
                # predecessor also ran alone goes at once instead of paying max_queue_delay.
                if self._merge and self.max_delay_s > 0 and (self._queue or self._last_batch_requests > 1):
                    batch = await self._fill(batch)
                self._last_batch_requests = len(batch)
                await self._execute(batch)
            finally:
                self._running -= 1
                self.stats.pending -= len(batch)
                self._maybe_idle()

    def _maybe_idle(self) -> None:
        if not self._queue and self._running == 0:
            self._idle.set()

    async def _execute(self, batch: list[_Pending]) -> None:
        start_ns = time.perf_counter_ns()
        queue_ns = [start_ns - p.enqueued_ns for p in batch]
        try:
            if len(batch) == 1:
                feeds = batch[0].inputs
            else:
                names = batch[0].inputs.keys()
                feeds = {name: np.concatenate([p.inputs[name] for p in batch], axis=0) for name in names}
            input_done = time.perf_counter_ns()
            if self._executor is None:
                outputs = self.runtime.run(feeds)
            else:
                loop = asyncio.get_running_loop()
                outputs = await loop.run_in_executor(self._executor, self.runtime.run, feeds)
            infer_done = time.perf_counter_ns()
        except Exception as exc:
            if len(batch) > 1:  # one request's inputs must not fail the others merged with it
                await self._execute_alone(batch)
                return
            error = self._failure(exc, len(batch))
            self._trace_batch(batch, start_ns, len(batch), error)
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(error)
            return
        rows_total = 0
        if len(batch) == 1:
            p = batch[0]
            rows_total = p.rows
            if not p.future.done():
                p.future.set_result(outputs)
        else:
            offset = 0
            for p in batch:
                end = offset + p.rows
                if not p.future.done():
                    p.future.set_result({name: arr[offset:end] for name, arr in outputs.items()})
                offset = end
            rows_total = offset
        output_done = time.perf_counter_ns()
        self._trace_batch(batch, start_ns, rows_total, None, output_done)
        self.stats.record_batch(rows_total, queue_ns, input_done - start_ns, infer_done - input_done, output_done - infer_done)

    async def _execute_alone(self, batch: list[_Pending]) -> None:
        """A merged execution failed: run each of its requests on its own, so the failure stays
        with the request that caused it (rare: only after a failure)."""
        for p in batch:
            await self._execute([p])

    @staticmethod
    def _trace_batch(batch: list[_Pending], start_ns: int, rows: int, error: Exception | None, end_ns: int | None = None) -> None:
        end = end_ns or time.perf_counter_ns()
        for p in batch:
            if p.trace is not None:
                p.trace.batch(p.enqueued_ns, start_ns, end, rows, error)

    # -- lifecycle ------------------------------------------------------------------
    @property
    def queued(self) -> int:
        return len(self._queue)

    async def drain(self, timeout: float | None = None) -> bool:
        """Stop taking requests, finish every accepted one; True if all finished in time."""
        self._closing = True
        self._wakeup.set()
        try:
            await asyncio.wait_for(asyncio.gather(*self._workers, return_exceptions=True), timeout)
            finished = True
        except asyncio.TimeoutError:
            finished = False
            for task in self._workers:
                task.cancel()
            while self._queue:
                item = self._queue.popleft()
                if not item.future.done():
                    item.future.set_exception(Unavailable(f"{self.label} was unloaded before the request ran"))
        if self._executor is not None:
            self._executor.shutdown(wait=False)
        return finished
