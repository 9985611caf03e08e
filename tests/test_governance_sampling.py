"""Deterministic sampling, the rate cap, redaction, rotation and the never-blocking payload log."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np
import pytest

from lockgate.governance.config import GovernanceConfig, SamplingConfig
from lockgate.governance.engine import GovernanceEngine
from lockgate.governance.payload_log import REDACTED, PayloadLog, Redactor
from lockgate.governance.sampling import Sampler, TokenBucket, hash_selects, stable_hash64

IDS = [f"req-{i}" for i in range(50_000)]


@pytest.mark.parametrize("rate", [0.01, 0.1, 0.5])
def test_sampled_fraction_within_ten_percent_of_rate(rate):
    sampler = Sampler(SamplingConfig(rate=rate, max_per_second=1e12, follow_trace=False))
    chosen = sum(sampler.decide(i) for i in IDS)
    assert abs(chosen / len(IDS) - rate) <= 0.1 * rate
    assert sampler.sampled == chosen and sampler.capped == 0


@pytest.mark.parametrize("rate", [0.01, 0.1])
def test_requests_without_an_id_are_sampled_at_the_rate(rate):
    """tritonclient sends id="" by default: those requests must not share one decision."""
    sampler = Sampler(SamplingConfig(rate=rate, max_per_second=1e12, follow_trace=False))
    chosen = sum(sampler.decide("") for _ in range(50_000))
    assert abs(chosen / 50_000 - rate) <= 0.15 * rate


def test_same_id_same_decision_in_two_processes():
    ids = IDS[:2000]
    script = (
        "import sys, json\n"
        "from lockgate.governance.sampling import hash_selects, stable_hash64\n"
        "ids = json.loads(sys.stdin.read())\n"
        "print(json.dumps([[hash_selects(i, 0.1) for i in ids], [stable_hash64(i) for i in ids[:50]]]))\n"
    )
    outputs = []
    for seed in ("1", "2"):  # different hash seeds: Python's own hash() would differ
        done = subprocess.run(
            [sys.executable, "-c", script], input=json.dumps(ids), capture_output=True, text=True, check=True,
            env={"PYTHONHASHSEED": seed, "PATH": "/usr/bin:/bin"}, timeout=60,
        )  # fmt: skip
        outputs.append(json.loads(done.stdout))
    assert outputs[0] == outputs[1]
    assert outputs[0][0] == [hash_selects(i, 0.1) for i in ids]
    assert outputs[0][1] == [stable_hash64(i) for i in ids[:50]]
    assert 100 < sum(outputs[0][0]) < 300


def test_trace_id_and_trace_decision_are_followed():
    sampler = Sampler(SamplingConfig(rate=0.5, max_per_second=1e9, follow_trace=True))
    trace = next(t for t in (f"t{i}" for i in range(100)) if hash_selects(t, 0.5))
    assert all(sampler.decide(f"r{i}", trace_id=trace) for i in range(20))
    assert not sampler.decide("x", trace_id=trace, trace_sampled=False)
    assert sampler.decide("x", trace_sampled=True)
    # by default the request id decides, whatever the trace says
    default = Sampler(SamplingConfig(rate=0.5, max_per_second=1e9))
    keep = next(i for i in (f"r{i}" for i in range(100)) if hash_selects(i, 0.5))
    assert default.decide(keep, trace_id=trace, trace_sampled=False)


def test_token_bucket_caps_samples():
    now = [0.0]
    sampler = Sampler(SamplingConfig(rate=1.0, max_per_second=10, burst=5), clock=lambda: now[0])
    assert sum(sampler.decide(f"r{i}") for i in range(100)) == 5  # the burst
    now[0] += 1.0
    assert sum(sampler.decide(f"s{i}") for i in range(100)) == 5  # refilled 10, capped at burst 5
    assert sampler.capped == 190
    bucket = TokenBucket(2.0, 1.0, clock=lambda: now[0])
    assert bucket.take() and not bucket.take()


def test_rejected_requests_always_sampled(tmp_path):
    config = GovernanceConfig.model_validate(
        {"sampling": {"rate": 0.0, "max_per_second": 1e-3, "burst": 1}, "inputs": {"x": {"features": {0: {"max": 1}}}}}
    )
    engine = GovernanceEngine("m", "1", config, ["x"], None, state_dir=tmp_path, background=False)
    for i in range(200):
        inspection = engine.inspect({"x": np.array([[5.0]])}, f"bad-{i}")
        assert inspection.reject and inspection.sampled
        engine.log_payload(inspection, {"x": np.array([[5.0]])}, None, "default", "1")
        assert not engine.inspect({"x": np.array([[0.5]])}, f"good-{i}").sampled
    assert engine.payload_log is not None and engine.payload_log.flush()
    lines = (tmp_path / "payloads" / "m" / "1" / "payloads.jsonl").read_text().splitlines()
    assert len(lines) == 200
    record = json.loads(lines[0])
    assert record["violations"][0]["rule"] == "max" and record["route"] == "default" and record["model"] == "m"
    assert engine.stats()["sampled_violations"] == 200
    engine.close(final_window=False)


def test_redacted_fields_never_reach_the_file(tmp_path):
    secret_value = 987654.5
    config = GovernanceConfig.model_validate(
        {
            "sampling": {"rate": 1.0},
            "payload_log": {"redact": ["ssn", "income", "trace_id"]},
            "inputs": {"x": {"feature_names": ["age", "income"]}},
        }
    )
    engine = GovernanceEngine("m", "1", config, ["x", "ssn"], None, state_dir=tmp_path, background=False)
    inputs = {"x": np.array([[33.0, secret_value]]), "ssn": np.array([[123456789]])}
    inspection = engine.inspect(inputs, "r1", trace_id="trace-secret")
    assert inspection.sampled
    engine.log_payload(inspection, inputs, {"score": np.array([[0.25]])}, "canary", "2")
    assert engine.payload_log.flush()
    text = (tmp_path / "payloads" / "m" / "1" / "payloads.jsonl").read_text()
    assert "987654" not in text and "123456789" not in text and "trace-secret" not in text
    record = json.loads(text)
    assert record["inputs"]["ssn"] == REDACTED
    assert record["inputs"]["x"] == [[33.0, REDACTED]]
    assert record["outputs"]["score"] == [[0.25]] and record["version"] == "2" and record["route"] == "canary"
    engine.close(final_window=False)


def test_nonfinite_values_stay_valid_json(tmp_path):
    log = PayloadLog(tmp_path, redactor=Redactor(()))
    log.submit({"inputs": {"x": np.array([np.nan, np.inf, 1.0])}, "outputs": {}})
    assert log.flush()
    log.close()
    record = json.loads((tmp_path / "payloads.jsonl").read_text(), parse_constant=lambda c: pytest.fail(f"bare {c}"))
    assert record["inputs"]["x"] == ["nan", "inf", 1.0]


def test_rotation_respects_size_and_count(tmp_path):
    log = PayloadLog(tmp_path, max_bytes=2_000, max_files=3)
    for i in range(300):
        while not log.submit({"i": i, "pad": "x" * 50}):
            time.sleep(0.001)
    assert log.flush()
    log.close()
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["payloads.jsonl", "payloads.jsonl.1", "payloads.jsonl.2"]
    assert all((tmp_path / f).stat().st_size <= 2_000 for f in files)
    newest = [json.loads(line)["i"] for line in (tmp_path / "payloads.jsonl").read_text().splitlines()]
    assert newest[-1] == 299


class _SlowRedactor(Redactor):
    """Simulates a slow disk: every record takes the writer `delay` seconds."""

    def __init__(self, delay: float) -> None:
        super().__init__(())
        self.delay = delay

    def record(self, record):
        time.sleep(self.delay)
        return super().record(record)


def test_overload_drops_are_counted_and_never_block(tmp_path):
    delay = 0.2
    slow = _SlowRedactor(delay)
    log = PayloadLog(tmp_path, queue_size=4, redactor=slow)
    config = GovernanceConfig.model_validate({"sampling": {"rate": 1.0, "max_per_second": 1e9}})
    engine = GovernanceEngine("m", "1", config, ["x"], None, background=False)
    engine.payload_log = log
    x = {"x": np.ones((1, 8), dtype=np.float32)}
    durations = []
    burst = 500
    for i in range(burst):
        inspection = engine.inspect(x, f"r{i}")
        start = time.perf_counter()
        engine.log_payload(inspection, x, {"y": np.zeros((1, 1))}, "default", "1")
        durations.append(time.perf_counter() - start)
    stats = log.stats()
    # everything accepted is either queued/written or counted as dropped
    assert stats["submitted"] + stats["dropped"] == burst
    assert stats["dropped"] >= burst - 4 - 10  # the queue holds 4; the writer finishes very few meanwhile
    assert engine.stats()["payload_dropped"] == stats["dropped"]
    # the slowest call is far below the time the writer needs for one record
    assert max(durations) < delay / 2
    log.close(timeout=5)
    engine.close(final_window=False)
