"""The C per-version counters and histograms (lockgate.serving._stats) against plain Python.

They back ModelStatistics and the Prometheus families, so each recording method is checked
field by field against what the Python code they replaced computed.
"""

from __future__ import annotations

from bisect import bisect_left

import pytest

from lockgate.serving.stats import Histogram, VersionStats

BOUNDS = (0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 1.0)


def test_histogram_buckets_match_bisect_left_on_and_around_every_bound() -> None:
    h = Histogram(reversed(BOUNDS))  # unsorted input is sorted, like the Python version
    assert h.bounds == BOUNDS
    values = [0.0, -1.0, 2.0, 1e9]  # the last two land in +Inf
    for b in BOUNDS:
        values += [b, b * (1 - 1e-12), b * (1 + 1e-12)]
    expected = [0] * (len(BOUNDS) + 1)
    for v in values:
        h.observe(v)
        expected[bisect_left(BOUNDS, v)] += 1
    assert h.counts == expected
    assert h.sum == pytest.approx(sum(values))


def test_histogram_sum_and_exemplars() -> None:
    h = Histogram(BOUNDS)
    h.observe(0.002)
    h.observe_with_exemplar(0.02, "ab" * 16)
    assert h.sum == pytest.approx(0.022)
    ex = h.exemplars
    i = bisect_left(BOUNDS, 0.02)
    assert ex[i][0] == "ab" * 16 and ex[i][1] == pytest.approx(0.02)
    assert all(e is None for j, e in enumerate(ex) if j != i)
    ex[i] = None  # a copy: the reader cannot change the histogram
    assert h.exemplars[i] is not None


def test_record_batch_counts_like_tritons_statistics() -> None:
    s = VersionStats()
    seen = []
    s.listeners.append(lambda rows, queue, compute: seen.append((rows, tuple(queue), compute)))
    s.record_batch(5, [100, 300], 10, 1000, 20)
    s.record_batch(5, [50], 1, 500, 2)
    assert (s.execution_count, s.inference_count) == (2, 10)
    assert (s.queue.count, s.queue.ns) == (3, 450)
    assert (s.compute_input.count, s.compute_input.ns) == (3, 11)
    assert (s.compute_infer.count, s.compute_infer.ns) == (3, 1500)
    assert (s.compute_output.count, s.compute_output.ns) == (3, 22)
    b = s.batch_stats[5]
    assert (b.compute_infer.count, b.compute_infer.ns) == (2, 1500)
    assert (b.compute_input.count, b.compute_output.count) == (2, 2)
    assert s.last_inference_ms > 0
    assert seen == [(5, (100, 300), 1030), (5, (50,), 503)]


def test_record_direct_equals_a_batch_with_no_queue_wait() -> None:
    hists = lambda: [Histogram(BOUNDS), Histogram(BOUNDS), Histogram((1, 2, 4, 8))]  # noqa: E731
    direct, batch = VersionStats(), VersionStats()
    for s in (direct, batch):
        s.queue_hist, s.compute_hist, s.batch_hist = hists()
    direct.record_direct(3, 70_000)
    batch.record_batch(3, (0,), 0, 70_000, 0)

    def snapshot(s: VersionStats) -> tuple:
        durations = [(d.count, d.ns) for d in (s.queue, s.compute_input, s.compute_infer, s.compute_output)]
        per_size = {k: (v.compute_infer.count, v.compute_infer.ns) for k, v in s.batch_stats.items()}
        h = [(x.counts, x.sum) for x in (s.queue_hist, s.compute_hist, s.batch_hist)]
        return s.execution_count, s.inference_count, durations, per_size, h

    assert snapshot(direct) == snapshot(batch)
    assert direct.batch_hist.counts[bisect_left((1, 2, 4, 8), 3)] == 1
    assert direct.compute_hist.sum == pytest.approx(70e-6)


def test_record_request_outcomes_decisions_and_exemplars() -> None:
    s = VersionStats()
    s.record_request(True, 2_000_000, "", "default", None)  # no histogram attached: counters only
    s.request_hist = Histogram(BOUNDS)
    s.record_request(True, 3_000_000, "", "weighted", "cd" * 16)  # exemplars off: plain observe
    s.exemplars = True
    s.record_request(True, 20_000_000, "", "weighted", "ef" * 16)
    s.record_request(False, 7_000, "invalid_argument", "weighted", "01" * 16)
    s.record_request(False, 9_000, "invalid_argument", None)
    s.record_request(False, 1_000, "internal")
    assert (s.success.count, s.success.ns) == (3, 25_000_000)
    assert (s.fail.count, s.fail.ns) == (3, 17_000)
    assert s.failures_by_reason == {"invalid_argument": 2, "internal": 1}
    assert s.decisions == {"default": 1, "weighted": 3}
    h = s.request_hist
    assert sum(h.counts) == 2  # successes only, and only once attached
    assert h.sum == pytest.approx(0.023)
    assert [e[0] for e in h.exemplars if e is not None] == ["ef" * 16]


def test_pending_is_writable_by_the_batcher() -> None:
    s = VersionStats()
    s.pending += 4
    s.pending -= 1
    assert s.pending == 3


def test_a_request_cancelled_mid_run_is_a_failure_named_cancelled(tmp_path) -> None:
    """The pipeline records every request's outcome once: a caller that goes away while its
    request waits on the model counts as a failure with reason ``cancelled``."""
    import asyncio

    import numpy as np

    from conftest import slow_model, write_model
    from lockgate._proto import inference_pb2 as pb
    from lockgate.pipeline import InferencePipeline, RequestContext
    from lockgate.serving.repository import ModelRepository

    write_model(tmp_path, "slow", 1, slow_model(), "max_batch_size: 0\nruntime: {execution: thread}\n")

    async def scenario() -> VersionStats:
        repository = ModelRepository(tmp_path)
        await repository.load_all()
        try:
            pipeline = InferencePipeline(repository)
            request = pb.ModelInferRequest(model_name="slow")
            request.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 384])
            request.raw_input_contents.append(np.ones((1, 384), np.float32).tobytes())
            await pipeline.infer(request, pb.ModelInferResponse, RequestContext())  # one success
            task = asyncio.ensure_future(pipeline.infer(request, pb.ModelInferResponse, RequestContext()))
            await asyncio.sleep(0)  # one loop turn: the request is now waiting on the worker thread
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            return repository.get("slow").get("1").stats
        finally:
            await repository.close()

    stats = asyncio.run(scenario())
    assert stats.success.count == 1
    assert stats.fail.count == 1 and stats.failures_by_reason == {"cancelled": 1}
    assert stats.decisions == {"default": 2}
