"""A drift window's inputs and outputs are the same requests, whatever is in flight when it
closes; every request of a window is accounted for (answered, rejected, failed, missing)."""

from __future__ import annotations

import collections
import threading
import time

import numpy as np
import pytest

from lockgate.governance.config import GovernanceConfig
from lockgate.governance.engine import GovernanceEngine
from lockgate.governance.profile import build_profile
from lockgate.governance.state import WindowState, merge_all
from replica_helpers import wait_for


@pytest.fixture(scope="module")
def profile():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(20_000, 3)).astype(np.float32)
    probs = rng.dirichlet([3, 2, 1], size=20_000).astype(np.float32)
    return build_profile({"x": x}, outputs={"probs": probs}, classifier_outputs=["probs"], model="m", version="1")


def engine_for(profile, tmp_path=None, background=True, **drift):
    config = GovernanceConfig.model_validate({
        "mode": "reject", "inputs": {"x": {"features": {0: {"max": 100.0}}}},
        "drift": {"window_rows": 300, "min_rows": 10, **drift}, "payload_log": {"enabled": False},
    })  # fmt: skip
    return GovernanceEngine("m", "1", config, ["x"], profile, state_dir=tmp_path, background=background, feed_interval=0.01)


def served(engine, rng, rows: int):
    x = rng.normal(size=(rows, 3)).astype(np.float32)
    inspection = engine.inspect({"x": x}, "r")
    return inspection, rng.dirichlet([3, 2, 1], size=rows).astype(np.float32)


def test_outputs_land_in_the_window_of_their_inputs(profile):
    """Windows close (background thread) while up to 40 requests are in flight, as on a
    served path; every window's class counts equal its input rows, and every request is
    answered in the window it was inspected in."""
    engine = engine_for(profile)
    reports = []
    engine.monitor.on_report(reports.append)
    rng = np.random.default_rng(1)
    in_flight: collections.deque = collections.deque()
    for i in range(3_000):
        in_flight.append(served(engine, rng, int(rng.integers(1, 9))))
        if len(in_flight) > 40 or (i % 7 == 0 and in_flight):
            inspection, outputs = in_flight.popleft()
            engine.observe_outputs({"probs": outputs}, inspection)
        if i % 50 == 0:
            time.sleep(0.002)  # let the window thread cut while requests are in flight
    while in_flight:
        inspection, outputs = in_flight.popleft()
        engine.observe_outputs({"probs": outputs}, inspection)
    engine.close()
    assert len(reports) >= 10
    for report in reports:
        classes = next(f for f in report.features if f.tensor == "probs" and f.index == -1)
        inputs = next(f for f in report.features if f.tensor == "x")
        assert classes.rows == inputs.rows == report.rows, (report.window, classes.rows, report.rows)
        assert report.accounting["answered"] == report.accounting["inspected"]
        assert report.accounting["outputs_missing"] == report.accounting["failed"] == 0
    assert engine.late_outputs == 0


def test_failed_and_rejected_requests_do_not_hold_a_window(profile):
    engine = engine_for(profile, background=False)
    rng = np.random.default_rng(2)
    answered = [served(engine, rng, 10) for _ in range(5)]
    failed = served(engine, rng, 10)
    rejected = engine.inspect({"x": np.full((4, 3), 500.0, np.float32)}, "bad")  # breaks max=100
    assert rejected.reject
    for inspection, outputs in answered:
        engine.observe_outputs({"probs": outputs}, inspection)
    engine.abandon(failed[0])
    started = time.monotonic()
    report = engine.close_window(wait_s=30.0)  # nothing left to wait for: returns at once
    assert time.monotonic() - started < 5.0
    engine.close(final_window=False)
    assert report.accounting == {"inspected": 7, "answered": 5, "rejected": 1, "failed": 1, "outputs_missing": 0}
    assert report.rows == 64  # inputs of every inspected request, the rejected one included
    classes = next(f for f in report.features if f.index == -1)
    assert classes.rows == 50


def test_late_outputs_are_counted_and_never_misplaced(profile):
    """Past output_grace_s the window is evaluated without the missing outputs (counted);
    when they come they are added to no window."""
    engine = engine_for(profile, output_grace_s=0.05)
    rng = np.random.default_rng(3)
    reports = []
    engine.monitor.on_report(reports.append)
    slow = served(engine, rng, 300)  # reaches window_rows: the thread cuts the window
    wait_for(lambda: reports, 30.0, what="the window evaluated after its grace period")
    assert reports[0].accounting["outputs_missing"] == 1
    engine.observe_outputs({"probs": slow[1]}, slow[0])
    assert engine.late_outputs == 1
    later = served(engine, rng, 300)
    engine.observe_outputs({"probs": later[1]}, later[0])
    wait_for(lambda: len(reports) == 2, 30.0, what="the next window")
    classes = next(f for f in reports[1].features if f.index == -1)
    assert classes.rows == 300 and reports[1].accounting["answered"] == 1
    engine.close(final_window=False)


def test_take_window_waits_for_outputs_in_flight(profile):
    """Fleet mode ships take_window(): it waits (up to wait_s) for the outputs of requests
    the window inspected."""
    engine = engine_for(profile, background=False)
    rng = np.random.default_rng(4)
    inspection, outputs = served(engine, rng, 20)
    timer = threading.Timer(0.2, engine.observe_outputs, args=({"probs": outputs}, inspection))
    timer.start()
    state = engine.take_window(wait_s=10.0)
    timer.join()
    assert state.tensors["probs"].sketches.class_counts.sum() == 20 == state.tensors["x"].rows
    assert state.accounting["answered"] == 1 and state.accounting["outputs_missing"] == 0
    engine.close(final_window=False)


def test_accounting_survives_bytes_and_adds_up_across_replicas(profile):
    rng = np.random.default_rng(5)
    states = []
    for _ in range(3):
        engine = engine_for(profile, background=False)
        for _ in range(4):
            inspection, outputs = served(engine, rng, 5)
            engine.observe_outputs({"probs": outputs}, inspection)
        served(engine, rng, 5)  # one still in flight
        states.append(WindowState.from_bytes(engine.take_window().to_bytes()))
        engine.close(final_window=False)
    merged = merge_all(states)
    assert merged.accounting == {"inspected": 15, "answered": 12, "rejected": 0, "failed": 0, "outputs_missing": 3}
    assert merged.profile == profile.digest()
    assert merged.tensors["probs"].sketches.class_counts.sum() == 60
