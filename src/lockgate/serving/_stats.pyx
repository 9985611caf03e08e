# cython: language_level=3
"""Per-version serving counters and latency histograms, updated in C.

Why C: every request records its outcome and every model execution its batch (Triton's
ModelStatistics counters plus the Prometheus histograms). In Python that bookkeeping was
~450 bytecodes per batch-1 request, the largest single item of lockgate's own per-request
work (counted with a bytecode tracer and callgrind against the thin server). Here it is one
call per execution and one per request, with no allocation.

Everything is written only from the event loop thread, so there are no locks; readers (the
ModelStatistics RPC, the metrics collector on its HTTP thread) copy a consistent-enough
snapshot, exactly as with the plain Python attributes these replace.
"""

from libc.stdlib cimport free, malloc
from libc.string cimport memset

import time


cdef class Duration:
    """A count and a total in nanoseconds (Triton's StatisticDuration)."""

    cdef public long long count
    cdef public long long ns

    def add(self, long long ns, long long count=1):
        self.count += count
        self.ns += ns

    def __repr__(self):
        return f"Duration(count={self.count}, ns={self.ns})"


cdef class BatchStat:
    """Compute durations of the executions of one batch size."""

    cdef public Duration compute_input
    cdef public Duration compute_infer
    cdef public Duration compute_output

    def __cinit__(self):
        self.compute_input = Duration()
        self.compute_infer = Duration()
        self.compute_output = Duration()

    cdef inline void add(self, long long input_ns, long long infer_ns, long long output_ns):
        self.compute_input.count += 1
        self.compute_input.ns += input_ns
        self.compute_infer.count += 1
        self.compute_infer.ns += infer_ns
        self.compute_output.count += 1
        self.compute_output.ns += output_ns


cdef class Histogram:
    """Bucket counts (cumulated at scrape time) and a sum; the last bucket is +Inf.

    ``counts`` and ``exemplars`` are copies, taken on the reader's thread.
    """

    cdef readonly tuple bounds
    cdef double *_bounds
    cdef long long *_counts
    cdef Py_ssize_t _n  # number of finite bounds
    cdef public double sum
    cdef list _exemplars

    def __cinit__(self, bounds):
        cdef Py_ssize_t i
        self.bounds = tuple(sorted(float(b) for b in bounds))
        self._n = len(self.bounds)
        self._bounds = <double *> malloc(max(self._n, 1) * sizeof(double))
        self._counts = <long long *> malloc((self._n + 1) * sizeof(long long))
        if self._bounds == NULL or self._counts == NULL:
            raise MemoryError()
        for i in range(self._n):
            self._bounds[i] = self.bounds[i]
        memset(self._counts, 0, (self._n + 1) * sizeof(long long))
        self.sum = 0.0
        self._exemplars = [None] * (self._n + 1)

    def __dealloc__(self):
        free(self._bounds)
        free(self._counts)

    cdef inline Py_ssize_t _bucket(self, double value) noexcept:
        # first bound >= value (bisect_left): Prometheus buckets are "le"
        cdef Py_ssize_t lo = 0, hi = self._n, mid
        while lo < hi:
            mid = (lo + hi) >> 1
            if self._bounds[mid] < value:
                lo = mid + 1
            else:
                hi = mid
        return lo

    cdef inline void _observe(self, double value) noexcept:
        self._counts[self._bucket(value)] += 1
        self.sum += value

    def observe(self, double value):
        self._observe(value)

    def observe_with_exemplar(self, double value, str trace_id):
        cdef Py_ssize_t i = self._bucket(value)
        self._counts[i] += 1
        self.sum += value
        self._exemplars[i] = (trace_id, value, time.time())

    @property
    def counts(self):
        cdef Py_ssize_t i
        return [self._counts[i] for i in range(self._n + 1)]

    @property
    def exemplars(self):
        return list(self._exemplars)


cdef class VersionStats:
    """Triton's per-version statistics, plus the histograms metrics attach.

    ``request_hist``/``queue_hist``/``compute_hist``/``batch_hist`` stay None until the
    telemetry layer attaches its ``Histogram``s (seconds; rows for the batch size), so the
    serving package needs no knowledge of metrics backends. ``listeners`` get
    ``(rows, queue_ns_per_request, compute_ns)`` after each execution, for other observers.
    """

    cdef public Duration success
    cdef public Duration fail
    cdef public Duration queue
    cdef public Duration compute_input
    cdef public Duration compute_infer
    cdef public Duration compute_output
    cdef public long long inference_count  # rows (batch elements) inferred
    cdef public long long execution_count  # model executions (batches)
    cdef public long long last_inference_ms
    cdef public long long pending
    cdef public dict failures_by_reason
    cdef public dict batch_stats
    cdef public dict decisions  # requests by route decision
    cdef public list listeners
    cdef public Histogram request_hist
    cdef public Histogram queue_hist
    cdef public Histogram compute_hist
    cdef public Histogram batch_hist
    cdef public bint exemplars  # attach trace-id exemplars to request_hist for sampled requests

    def __cinit__(self):
        self.success = Duration()
        self.fail = Duration()
        self.queue = Duration()
        self.compute_input = Duration()
        self.compute_infer = Duration()
        self.compute_output = Duration()
        self.failures_by_reason = {}
        self.batch_stats = {}
        self.decisions = {}
        self.listeners = []
        self.request_hist = None
        self.queue_hist = None
        self.compute_hist = None
        self.batch_hist = None
        self.exemplars = False

    cdef inline BatchStat _batch_stat(self, long long rows):
        stat = self.batch_stats.get(rows)
        if stat is None:
            stat = self.batch_stats[rows] = BatchStat()
        return <BatchStat> stat

    cdef void _compute(self, long long rows, long long requests, long long input_ns, long long infer_ns,
                       long long output_ns) except *:
        self.execution_count += 1
        self.inference_count += rows
        self.last_inference_ms = time.time_ns() // 1_000_000
        self.compute_input.count += requests
        self.compute_input.ns += input_ns
        self.compute_infer.count += requests
        self.compute_infer.ns += infer_ns
        self.compute_output.count += requests
        self.compute_output.ns += output_ns
        self._batch_stat(rows).add(input_ns, infer_ns, output_ns)
        if self.compute_hist is not None:
            self.compute_hist._observe((input_ns + infer_ns + output_ns) * 1e-9)
        if self.batch_hist is not None:
            self.batch_hist._observe(<double> rows)

    def record_batch(self, long long rows, queue_ns, long long input_ns, long long infer_ns, long long output_ns):
        """One execution of ``len(queue_ns)`` queued requests (``rows`` rows in all)."""
        cdef long long ns
        cdef long long requests = 0
        cdef Histogram qh = self.queue_hist
        for q in queue_ns:
            ns = q
            requests += 1
            self.queue.count += 1
            self.queue.ns += ns
            if qh is not None:
                qh._observe(ns * 1e-9)
        self._compute(rows, requests, input_ns, infer_ns, output_ns)
        if self.listeners:
            for listener in self.listeners:
                listener(rows, queue_ns, input_ns + infer_ns + output_ns)

    def record_direct(self, long long rows, long long infer_ns):
        """A lone request run at once in its caller: no queue wait, one execution."""
        self.queue.count += 1
        if self.queue_hist is not None:
            self.queue_hist._observe(0.0)
        self._compute(rows, 1, 0, infer_ns, 0)
        if self.listeners:
            for listener in self.listeners:
                listener(rows, (0,), infer_ns)

    def record_request(self, bint ok, long long duration_ns, str reason="", str decision=None, str trace_id=None):
        """A request's outcome. Successes feed the request histogram (Triton's meaning:
        failures are counted by reason); ``trace_id`` (sampled requests) becomes its exemplar."""
        cdef double seconds
        if decision is not None:
            self.decisions[decision] = self.decisions.get(decision, 0) + 1
        if ok:
            self.success.count += 1
            self.success.ns += duration_ns
            if self.request_hist is not None:
                seconds = duration_ns * 1e-9
                if trace_id is not None and self.exemplars:
                    self.request_hist.observe_with_exemplar(seconds, trace_id)
                else:
                    self.request_hist._observe(seconds)
        else:
            self.fail.count += 1
            self.fail.ns += duration_ns
            self.failures_by_reason[reason] = self.failures_by_reason.get(reason, 0) + 1
