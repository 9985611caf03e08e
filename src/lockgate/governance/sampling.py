"""Deterministic payload sampling with a rate cap.

Every replica must make the same keep/skip decision for a request, so the decision is a
stable 64-bit hash of the request id (or trace id) — FNV-1a with MurmurHash3's fmix64
finaliser, in the Cython module — compared with ``rate * 2**64``; never Python's ``hash``,
which is salted per process. A token bucket then caps the samples per
second. Requests that broke a rule are always recorded: they bypass the bucket (they are
already bounded by the payload log's queue, whose drops are counted), so an operator never
misses a rejected payload because healthy traffic spent the budget.

A request with neither an id nor a trace id (tritonclient sends ``id=""`` unless told
otherwise) has nothing to agree on across replicas; hashing the empty string would give every
such request the same decision -- all sampled or none. Those get an independent random draw
at the same rate instead.
"""

from __future__ import annotations

import threading
import time
from random import getrandbits

from ._kernels import stable_hash64
from .config import SamplingConfig

__all__ = ["Sampler", "TokenBucket", "hash_selects", "stable_hash64"]

_TWO_64 = float(1 << 64)


def hash_selects(key: str, rate: float) -> bool:
    """True for a fraction ``rate`` of keys, the same in every process."""
    if rate >= 1.0:
        return True
    if rate <= 0.0:
        return False
    return stable_hash64(key) < int(rate * _TWO_64)


class TokenBucket:
    """``rate`` tokens per second, at most ``burst`` banked. Thread-safe."""

    __slots__ = ("rate", "burst", "_tokens", "_stamp", "_lock", "_clock")

    def __init__(self, rate: float, burst: float, clock=time.monotonic) -> None:
        self.rate = rate
        self.burst = burst
        self._tokens = burst
        self._clock = clock
        self._stamp = clock()
        self._lock = threading.Lock()

    def take(self) -> bool:
        with self._lock:
            now = self._clock()
            self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
            self._stamp = now
            if self._tokens >= 1.0:
                self._tokens -= 1.0
                return True
            return False


class Sampler:
    """Decides which requests' payloads are recorded; counts every decision."""

    def __init__(self, config: SamplingConfig, clock=time.monotonic) -> None:
        self.config = config
        self._threshold = int(config.rate * _TWO_64) if config.rate < 1.0 else None
        burst = config.burst if config.burst is not None else max(1.0, config.max_per_second)
        self.bucket = TokenBucket(config.max_per_second, burst, clock)
        self.selected = 0  # chosen by hash or trace
        self.sampled = 0  # recorded (selected and within the cap, or a violation)
        self.capped = 0  # selected but over the rate cap
        self.violations_sampled = 0

    def decide(self, request_id: str, trace_id: str | None = None, trace_sampled: bool | None = None, violated: bool = False) -> bool:
        if violated and self.config.always_sample_violations:
            self.sampled += 1
            self.violations_sampled += 1
            return True
        if self.config.follow_trace and trace_sampled is not None:
            chosen = trace_sampled
        else:
            key = trace_id if (self.config.follow_trace and trace_id) else request_id
            threshold = self._threshold
            if threshold is None:
                chosen = True
            elif key:
                chosen = stable_hash64(key) < threshold
            else:  # no id to agree on: a random draw, not one fixed decision for all of them
                chosen = getrandbits(64) < threshold
        if not chosen:
            return False
        self.selected += 1
        if self.bucket.take():
            self.sampled += 1
            return True
        self.capped += 1
        return False
