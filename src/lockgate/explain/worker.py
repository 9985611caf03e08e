"""The explain pool's process side: build explainers once, explain rows, honour deadlines.

Explanations run in processes of their own (``ProcessPoolExecutor``, spawn), so shap's Python
never takes the serving process's GIL and the kernel scheduler, not the event loop, shares
the CPU: workers run at the lowest priority (``nice`` 19 by default, ``explain_nice``) with one
BLAS/ORT thread each, so on a busy machine serving keeps the CPU and explanations wait (their
deadline and the bounded queue say so to the caller) rather than the other way round. A job
names the artifact and its SHA-256; the worker checks the digest before it builds anything
from the file, and keeps a few built explainers keyed by artifact, config and background.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lockgate.errors import ArtifactTamperedError, ExplainDeadlineExceeded, ExplainUnavailable

WORKER_NICE = 19
CPU_SHARE = 0.25
_CACHE_SIZE = 8
_cache: "OrderedDict[tuple, Any]" = OrderedDict()
_budget = {"share": CPU_SHARE, "rest_until": 0.0}


@dataclass(frozen=True, slots=True)
class JobSpec:
    """Everything a worker needs to build one version's explainer (small: sent with each job)."""

    label: str  # "model 'x' version 1"
    model_path: str
    sha256: str
    config_json: str
    background_path: str | None  # explain_background.npz, when there is one
    fallback: dict[str, np.ndarray] | None  # profile means, when there is none
    feature_names: tuple[str, ...] | None

    def key(self) -> tuple:
        stamp = None
        if self.background_path and os.path.exists(self.background_path):
            stat = os.stat(self.background_path)
            stamp = (stat.st_mtime_ns, stat.st_size)
        return (self.model_path, self.sha256, self.config_json, self.background_path, stamp)


def initialise(nice: int = WORKER_NICE, cpu_share: float = CPU_SHARE) -> None:
    """Pool initializer: lower priority, a CPU budget, one thread for BLAS (KernelSHAP's solves)."""
    _budget["share"] = cpu_share
    try:
        os.nice(nice)
    except OSError:
        pass
    # The worker stays in the server's session: with Linux's autogroup scheduling it then takes
    # only from the server's own share of the machine, at a low weight inside it. (Its own
    # session niced as a group, or SCHED_IDLE, starved it on a machine others keep busy.)
    # shap formats arrays into debug f-strings whether or not debug logging is on (a third of a
    # KernelSHAP row's time, profiled); nothing in this process prints arrays for a reader.
    np.set_printoptions(threshold=1, edgeitems=1)
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(1)
    except ImportError:
        pass


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def explainer_for(spec: JobSpec) -> Any:
    from lockgate.explain.background import Background, load_background
    from lockgate.explain.config import ExplainConfig
    from lockgate.explain.explainer import build_explainer

    key = spec.key()
    found = _cache.get(key)
    if found is not None:
        _cache.move_to_end(key)
        return found
    if _sha256(spec.model_path) != spec.sha256:
        raise ArtifactTamperedError(f"{spec.label}: the artifact changed since it was loaded; not explaining it")
    if spec.background_path and Path(spec.background_path).exists():
        background = load_background(spec.background_path)
    elif spec.fallback:
        background = Background(dict(spec.fallback), "profile means")
    else:
        background = None
    try:
        explainer = build_explainer(spec.model_path, ExplainConfig.model_validate_json(spec.config_json), background,
                                    list(spec.feature_names) if spec.feature_names else None)
    except ExplainUnavailable as exc:
        raise ExplainUnavailable(f"{spec.label}: {exc.message}") from None
    _cache[key] = explainer
    while len(_cache) > _CACHE_SIZE:
        _cache.popitem(last=False)
    return explainer


def describe_job(spec: JobSpec) -> dict[str, Any]:
    """Build (and cache) the explainer; what it will do, for the load log and tests."""
    return explainer_for(spec).describe()


def explain_job(spec: JobSpec, rows: np.ndarray, deadline: float | None) -> Any:
    """Explain ``rows``; refuse a job whose deadline passed while it queued (``time.monotonic``
    is one clock for every process of the machine).

    The CPU budget (``explain_cpu_share`` of one core per worker): after a job of ``t`` seconds
    the worker rests ``t * (1 / share - 1)`` before it starts the next one, so a flood of
    explanations fills the bounded queue (RESOURCE_EXHAUSTED) instead of the machine."""
    rest = _budget["rest_until"] - time.monotonic()
    if rest > 0:
        if deadline is not None and time.monotonic() + rest >= deadline:
            time.sleep(max(0.0, deadline - time.monotonic()))
            raise ExplainDeadlineExceeded(f"{spec.label}: the explanation's deadline passed while the explain pool "
                                          "kept within its CPU budget (explain_cpu_share)")
        time.sleep(rest)
    if deadline is not None and time.monotonic() >= deadline:
        raise ExplainDeadlineExceeded(f"{spec.label}: the explanation's deadline passed while it was queued")
    start = time.monotonic()
    try:
        return explainer_for(spec).explain(rows)
    finally:
        share = _budget["share"]
        if share < 1.0:
            _budget["rest_until"] = time.monotonic() + (time.monotonic() - start) * (1.0 / share - 1.0)
