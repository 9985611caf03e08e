"""Traffic policy: one immutable snapshot per model, swapped atomically in a `PolicyBook`.

Why immutable: the router reads the snapshot on every request without taking a lock. A change
builds a whole new `TrafficPolicy` (revision + 1) and publishes it with a single reference
swap, so an in-flight request holds either the old or the new snapshot, never a mix.

The routing tables (cumulative weight bounds, version order) are precomputed once in
``__post_init__`` so the hot path only hashes and bisects.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from enum import Enum
from types import MappingProxyType
from typing import Any

from lockgate.errors import InvalidArgument

#: The routing space: a key or request id is mapped to a point in ``[0, SPACE)``.
#: Weights are percentages, so one percent is 100 points and 0.01 % is the finest split.
SPACE = 10_000


class PolicyError(InvalidArgument, ValueError):
    """A traffic policy is malformed (bad weights, unknown version, percent out of range)."""

    reason = "invalid_policy"


class StaleRevision(PolicyError):
    """A compare-and-swap on the `PolicyBook` lost the race against another writer."""

    code = "ABORTED"
    reason = "stale_revision"


class NoActiveCanary(PolicyError):
    """A canary command (promote, abort, pause, resume) for a model with no canary running."""

    code = "FAILED_PRECONDITION"
    reason = "no_canary"


class CanaryState(str, Enum):
    """Where a progressive canary stands. Terminal states keep the spec for the record.

    ``inconclusive`` is the automatic pause for lack of evidence: the split holds, the
    analysis re-runs on every tick over the growing window, and the canary resumes by
    itself (advances, fails or rolls back) as soon as the evidence is conclusive.
    ``paused`` is an operator's pause and waits for an operator.
    """

    PROGRESSING = "progressing"
    INCONCLUSIVE = "inconclusive"
    PAUSED = "paused"
    PROMOTED = "promoted"
    ROLLED_BACK = "rolled_back"
    ABORTED = "aborted"

    @property
    def active(self) -> bool:
        """True while the canary still takes a share of traffic under analysis."""
        return self in (CanaryState.PROGRESSING, CanaryState.INCONCLUSIVE, CanaryState.PAUSED)

    @property
    def analysed(self) -> bool:
        """True while the controller analyses it (progressing, or waiting for evidence)."""
        return self in (CanaryState.PROGRESSING, CanaryState.INCONCLUSIVE)


def version_sort_key(version: str) -> tuple[int, int, str]:
    """Deterministic version order: numeric ids numerically ("2" < "10"), then the rest by text.

    The router lays weight ranges out in this order, so it must never depend on dict order,
    insertion history or anything else that differs between replicas or restarts.
    """
    if version.isdigit():
        return (0, int(version), "")
    return (1, 0, version)


def _check_version(version: object, what: str) -> str:
    if not isinstance(version, str) or not version or version.strip() != version:
        raise PolicyError(f"{what} must be a non-empty version id without spaces, got {version!r}")
    return version


def _check_percent(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise PolicyError(f"{what} must be a number in [0, 100], got {value!r}")
    number = float(value)
    if not 0.0 <= number <= 100.0:  # also rejects NaN
        raise PolicyError(f"{what} must be in [0, 100], got {value!r}")
    return number


@dataclass(frozen=True, slots=True)
class ShadowSpec:
    """Mirror `percent` % of requests to `version` as well; the caller only sees the primary."""

    version: str
    percent: float
    #: Precomputed: a request is mirrored when its 64-bit shadow hash is below this.
    threshold: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _check_version(self.version, "shadow version")
        percent = _check_percent(self.percent, "shadow percent")
        object.__setattr__(self, "percent", percent)
        object.__setattr__(self, "threshold", int(percent / 100.0 * (1 << 64)))

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.version, "percent": self.percent}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ShadowSpec:
        return cls(version=str(data["version"]), percent=data["percent"])


@dataclass(frozen=True, slots=True)
class Guardrails:
    """Thresholds a canary window must meet against the stable window to advance.

    ``None`` disables a check. Ratios compare with the stable baseline; absolute limits
    stand alone. A window with fewer than `min_requests` canary requests is inconclusive
    unless the canary has already spent its whole error budget (see `rollout.analyse`).
    """

    max_error_rate: float | None = 0.05
    max_error_ratio: float | None = None
    #: Stable error rates below this count as this much in the ratio, so a clean stable
    #: does not make a single canary error an infinite ratio.
    error_rate_floor: float = 0.001
    max_p99_ratio: float | None = 1.5
    max_p99_ms: float | None = None
    #: Stable p99 below this counts as this much in the ratio (sub-ms timings are noise).
    p99_floor_ms: float = 1.0
    fail_on_drift: bool = True
    max_disagreement: float | None = 0.05
    min_requests: int = 50
    #: Outcome guardrails (``lockgate.outcomes.guardrails``): per metric, the largest drop of
    #: the canary against stable over the same windows, as sorted (metric, drop) pairs ...
    max_quality_drop: tuple[tuple[str, float], ...] | None = None
    #: ... the largest between-group fairness gap the canary may show ...
    max_fairness_gap: float | None = None
    #: ... and the label coverage both versions need before either is judged (else inconclusive).
    min_label_coverage: float | None = None
    #: Labeled rows each version needs before its quality is judged.
    min_labels: int = 100

    #: With the disagreement guardrail on, this share (%) of stable's requests is mirrored
    #: to the canary (the policy's shadow) so that the two can be compared at all.
    mirror_percent: float = 10.0
    #: Fewer mirrored rows compared than this leave the disagreement guardrail inconclusive.
    min_comparisons: int = 50

    @property
    def uses_outcomes(self) -> bool:
        return bool(self.max_quality_drop) or self.max_fairness_gap is not None or self.min_label_coverage is not None

    def __post_init__(self) -> None:
        _outcome_guardrails(self)
        for name in ("max_error_rate", "max_disagreement"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= float(value) <= 1.0:
                raise PolicyError(f"guardrail {name} must be a rate in [0, 1], got {value!r}")
        for name in ("max_error_ratio", "max_p99_ratio", "max_p99_ms"):
            value = getattr(self, name)
            if value is not None and not float(value) > 0.0:
                raise PolicyError(f"guardrail {name} must be > 0, got {value!r}")
        # Canonical floats, so to_json() of equal guardrails gives equal bytes (audit hashes).
        for name in ("max_error_rate", "max_disagreement", "max_error_ratio", "max_p99_ratio", "max_p99_ms"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, float(value))
        object.__setattr__(self, "error_rate_floor", float(self.error_rate_floor))
        object.__setattr__(self, "p99_floor_ms", float(self.p99_floor_ms))
        if not self.error_rate_floor >= 0.0 or not self.p99_floor_ms >= 0.0:
            raise PolicyError("guardrail floors must be >= 0")
        if isinstance(self.min_requests, bool) or not isinstance(self.min_requests, int) or self.min_requests < 1:
            raise PolicyError(f"guardrail min_requests must be an integer >= 1, got {self.min_requests!r}")
        object.__setattr__(self, "mirror_percent", _check_percent(self.mirror_percent, "guardrail mirror_percent"))
        if isinstance(self.min_comparisons, bool) or not isinstance(self.min_comparisons, int) or self.min_comparisons < 1:
            raise PolicyError(f"guardrail min_comparisons must be an integer >= 1, got {self.min_comparisons!r}")

    def to_dict(self) -> dict[str, Any]:
        out = {name: getattr(self, name) for name in self.__dataclass_fields__}
        out["max_quality_drop"] = dict(self.max_quality_drop) if self.max_quality_drop is not None else None
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Guardrails:
        known = cls.__dataclass_fields__
        unknown = set(data) - set(known)
        if unknown:
            raise PolicyError(f"unknown guardrail field(s): {sorted(unknown)}")
        return cls(**dict(data))


def _outcome_guardrails(g: Guardrails) -> None:
    """Check and canonicalise the outcome guardrail fields (a mapping becomes sorted pairs)."""
    drops = g.max_quality_drop
    if drops is not None:
        items = drops.items() if isinstance(drops, Mapping) else drops
        pairs: list[tuple[str, float]] = []
        for item in items:
            metric, bound = item
            if isinstance(bound, bool) or not isinstance(bound, (int, float)) or not float(bound) >= 0.0:
                raise PolicyError(f"guardrail max_quality_drop[{metric!r}] must be a number >= 0, got {bound!r}")
            pairs.append((str(metric), float(bound)))
        object.__setattr__(g, "max_quality_drop", tuple(sorted(pairs)) or None)
    for name in ("max_fairness_gap", "min_label_coverage"):
        value = getattr(g, name)
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
                raise PolicyError(f"guardrail {name} must be in [0, 1], got {value!r}")
            object.__setattr__(g, name, float(value))
    if isinstance(g.min_labels, bool) or not isinstance(g.min_labels, int) or g.min_labels < 1:
        raise PolicyError(f"guardrail min_labels must be an integer >= 1, got {g.min_labels!r}")


@dataclass(frozen=True, slots=True)
class CanarySpec:
    """A progressive canary: `canary` takes ``steps[step_index]`` % of traffic from `stable`."""

    stable: str
    canary: str
    steps: tuple[int, ...] = (5, 25, 50, 100)
    interval_s: float = 60.0
    guardrails: Guardrails = field(default_factory=Guardrails)
    failure_limit: int = 3
    step_index: int = 0
    failures: int = 0
    state: CanaryState = CanaryState.PROGRESSING
    #: Why the canary is paused / rolled back / aborted, for operators (None while healthy).
    reason: str | None = None
    #: Wall-clock seconds when the canary was started (for the record and the audit trail).
    started_at: float = 0.0

    def __post_init__(self) -> None:
        _check_version(self.stable, "canary stable version")
        _check_version(self.canary, "canary version")
        if self.stable == self.canary:
            raise PolicyError(f"canary version {self.canary} is already the stable version")
        steps = tuple(self.steps)
        if not steps:
            raise PolicyError("canary steps must not be empty")
        for step in steps:
            if isinstance(step, bool) or not isinstance(step, int) or not 0 < step <= 100:
                raise PolicyError(f"canary steps must be integers in (0, 100], got {list(steps)}")
        if any(b <= a for a, b in zip(steps, steps[1:])):
            raise PolicyError(f"canary steps must be strictly increasing, got {list(steps)}")
        object.__setattr__(self, "steps", steps)
        object.__setattr__(self, "interval_s", float(self.interval_s))
        object.__setattr__(self, "started_at", float(self.started_at))
        if not self.interval_s > 0:
            raise PolicyError(f"canary analysis interval must be > 0 s, got {self.interval_s!r}")
        if isinstance(self.failure_limit, bool) or not isinstance(self.failure_limit, int) or self.failure_limit < 1:
            raise PolicyError(f"canary failure_limit must be an integer >= 1, got {self.failure_limit!r}")
        if not 0 <= self.step_index < len(steps):
            raise PolicyError(f"canary step_index {self.step_index} outside steps {list(steps)}")
        if self.failures < 0:
            raise PolicyError("canary failures must be >= 0")
        object.__setattr__(self, "state", CanaryState(self.state))

    @property
    def percent(self) -> int:
        """The canary's share at the current step."""
        return self.steps[self.step_index]

    @property
    def last_step(self) -> bool:
        return self.step_index == len(self.steps) - 1

    def to_dict(self) -> dict[str, Any]:
        return {
            "stable": self.stable,
            "canary": self.canary,
            "steps": list(self.steps),
            "interval_s": self.interval_s,
            "guardrails": self.guardrails.to_dict(),
            "failure_limit": self.failure_limit,
            "step_index": self.step_index,
            "failures": self.failures,
            "state": self.state.value,
            "reason": self.reason,
            "started_at": self.started_at,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CanarySpec:
        state = CanaryState(data.get("state", CanaryState.PROGRESSING.value))
        reason = data.get("reason")
        if state is CanaryState.PAUSED and str(reason or "").startswith("inconclusive:"):
            state = CanaryState.INCONCLUSIVE  # stored before the two pauses were told apart
        return cls(
            stable=str(data["stable"]),
            canary=str(data["canary"]),
            steps=tuple(data.get("steps", (5, 25, 50, 100))),
            interval_s=float(data.get("interval_s", 60.0)),
            guardrails=Guardrails.from_dict(data.get("guardrails") or {}),
            failure_limit=int(data.get("failure_limit", 3)),
            step_index=int(data.get("step_index", 0)),
            failures=int(data.get("failures", 0)),
            state=state,
            reason=reason,
            started_at=float(data.get("started_at", 0.0)),
        )


def _normalise(weights: Mapping[str, int]) -> dict[str, int]:
    """Scale weights to points summing to `SPACE` (largest remainder, ties by version order)."""
    total = sum(weights.values())
    if total <= 0:
        raise PolicyError("traffic weights must not all be zero")
    ordered = sorted(weights, key=version_sort_key)
    exact = {v: weights[v] * SPACE / total for v in ordered}
    points = {v: int(exact[v]) for v in ordered}
    short = SPACE - sum(points.values())
    by_remainder = sorted(ordered, key=lambda v: (-(exact[v] - points[v]), version_sort_key(v)))
    for version in by_remainder[:short]:
        points[version] += 1
    return points


@dataclass(frozen=True, slots=True)
class TrafficPolicy:
    """The whole routing state of one model at one revision. Never mutated: see `evolve`.

    `weights` maps version → non-negative integer weight; they are normalised, so 90/10 and
    9/1 mean the same split. A version with weight 0 is listed but takes no traffic.
    """

    model: str
    revision: int
    weights: Mapping[str, int]
    sticky: bool = True
    shadow: ShadowSpec | None = None
    canary: CanarySpec | None = None
    # ---- precomputed routing tables (not part of the identity) ----
    #: Versions in routing-layout order (see `router` for the monotonicity invariant).
    order: tuple[str, ...] = field(init=False, repr=False, compare=False)
    #: Exclusive upper bound of each version's range in ``[0, SPACE)``, same order as `order`.
    bounds: tuple[int, ...] = field(init=False, repr=False, compare=False)
    #: Routing points per version (weights scaled to `SPACE`).
    points: Mapping[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model:
            raise PolicyError(f"policy model must be a non-empty name, got {self.model!r}")
        if isinstance(self.revision, bool) or not isinstance(self.revision, int) or self.revision < 0:
            raise PolicyError(f"policy revision must be an integer >= 0, got {self.revision!r}")
        if not self.weights:
            raise PolicyError(f"policy for model '{self.model}' has no versions")
        clean: dict[str, int] = {}
        for version, weight in self.weights.items():
            _check_version(version, "weighted version")
            if isinstance(weight, bool) or not isinstance(weight, int) or weight < 0:
                raise PolicyError(f"weight of version {version} must be a non-negative integer, got {weight!r}")
            clean[version] = weight
        points = _normalise(clean)
        canary = self.canary
        if canary is not None and canary.state.active:
            for role, version in (("stable", canary.stable), ("canary", canary.canary)):
                if version not in clean:
                    raise PolicyError(f"active canary {role} version {version} has no weight entry")
        # Layout: an active canary's range starts at 0 and grows from there; everything else
        # follows in version order. See `router.Router` for why this makes stickiness monotone.
        rest = sorted(clean, key=version_sort_key)
        if canary is not None and canary.state.active:
            rest.remove(canary.canary)
            order = [canary.canary, *rest]
        else:
            order = rest
        cumulative = 0
        bounds = []
        for version in order:
            cumulative += points[version]
            bounds.append(cumulative)
        object.__setattr__(self, "weights", MappingProxyType(clean))
        object.__setattr__(self, "order", tuple(order))
        object.__setattr__(self, "bounds", tuple(bounds))
        object.__setattr__(self, "points", MappingProxyType(points))

    # ---- derived views ----
    @property
    def versions(self) -> tuple[str, ...]:
        """Versions that take live traffic (weight > 0), in version order."""
        return tuple(v for v in sorted(self.weights, key=version_sort_key) if self.weights[v] > 0)

    def percent_of(self, version: str) -> float:
        """The share of traffic `version` gets, in percent."""
        return self.points.get(version, 0) * 100.0 / SPACE

    def evolve(self, **changes: Any) -> TrafficPolicy:
        """A new snapshot with `changes` applied and the revision bumped by one."""
        changes.setdefault("revision", self.revision + 1)
        return replace(self, **changes)

    # ---- (de)serialisation ----
    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "revision": self.revision,
            "weights": dict(sorted(self.weights.items(), key=lambda kv: version_sort_key(kv[0]))),
            "sticky": self.sticky,
            "shadow": self.shadow.to_dict() if self.shadow else None,
            "canary": self.canary.to_dict() if self.canary else None,
        }

    def to_json(self) -> str:
        """Canonical JSON (sorted keys): equal policies give equal bytes, good for the audit hash."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrafficPolicy:
        try:
            weights = data["weights"]
            if not isinstance(weights, Mapping):
                raise PolicyError("policy weights must be an object of version → weight")
            return cls(
                model=data["model"],
                revision=data.get("revision", 0),
                weights={str(k): v for k, v in weights.items()},
                sticky=bool(data.get("sticky", True)),
                shadow=ShadowSpec.from_dict(data["shadow"]) if data.get("shadow") else None,
                canary=CanarySpec.from_dict(data["canary"]) if data.get("canary") else None,
            )
        except KeyError as exc:
            raise PolicyError(f"policy is missing field {exc.args[0]!r}") from None
        except (TypeError, ValueError) as exc:
            if isinstance(exc, PolicyError):
                raise
            raise PolicyError(f"malformed policy: {exc}") from None

    @classmethod
    def from_json(cls, text: str | bytes) -> TrafficPolicy:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise PolicyError(f"policy is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise PolicyError("policy JSON must be an object")
        return cls.from_dict(data)

    def check_versions(self, known: Mapping[str, object] | frozenset[str] | set[str]) -> None:
        """Raise `PolicyError` if the policy names a version not in `known` (the registry's)."""
        named = set(self.weights)
        if self.shadow is not None:
            named.add(self.shadow.version)
        if self.canary is not None:
            named.update((self.canary.stable, self.canary.canary))
        missing = sorted(named - set(known), key=version_sort_key)
        if missing:
            raise PolicyError(f"model '{self.model}' has no version(s) {', '.join(missing)}")


def single_version(model: str, version: str, revision: int = 0) -> TrafficPolicy:
    """The simplest policy: all traffic to one version."""
    return TrafficPolicy(model=model, revision=revision, weights={version: 100})


class PolicyBook:
    """The current `TrafficPolicy` per model, swapped atomically.

    Readers (`get`) take no lock: they read one dict slot, which under the GIL (and under
    free-threaded CPython's per-dict locking) returns a complete reference to an immutable
    snapshot, either the old one or the new one. Writers serialise on a lock only so that a
    compare-and-swap on the revision is race-free; a reader is never blocked by it.
    """

    def __init__(self) -> None:
        self._policies: dict[str, TrafficPolicy] = {}
        self._write_lock = threading.Lock()

    def get(self, model: str) -> TrafficPolicy | None:
        """The current snapshot for `model`, or None if it has no policy."""
        return self._policies.get(model)

    def replace(self, policy: TrafficPolicy, *, expect_revision: int | None = None) -> TrafficPolicy:
        """Publish `policy` as the current snapshot of its model.

        The revision must grow (a stale writer cannot roll a newer policy back); with
        `expect_revision`, the swap happens only if the current revision is exactly that.
        Returns `policy`, so callers can chain ``book.replace(p.evolve(...))``.
        """
        with self._write_lock:
            current = self._policies.get(policy.model)
            current_revision = -1 if current is None else current.revision
            if expect_revision is not None and current_revision != expect_revision:
                raise StaleRevision(
                    f"policy of model '{policy.model}' is at revision {current_revision}, "
                    f"expected {expect_revision}"
                )
            if policy.revision <= current_revision:
                raise StaleRevision(
                    f"policy revision {policy.revision} for model '{policy.model}' is not newer "
                    f"than the current revision {current_revision}"
                )
            self._policies[policy.model] = policy  # the one atomic publish
            return policy

    def publish(self, policy: TrafficPolicy) -> TrafficPolicy:
        """Install a policy that was just persisted, unless a newer or equal revision is live.

        The change feed may install the stored revision first (the watcher reads it back
        from the store); the store's compare-and-set guarantees that one revision number
        means one document, so an equal revision is this very policy.
        """
        with self._write_lock:
            current = self._policies.get(policy.model)
            if current is None or current.revision < policy.revision:
                self._policies[policy.model] = policy
                return policy
            return current

    def remove(self, model: str) -> TrafficPolicy | None:
        """Drop the policy of `model` (it falls back to the router's default version)."""
        with self._write_lock:
            return self._policies.pop(model, None)

    def load(self, policies: Iterator[TrafficPolicy] | list[TrafficPolicy]) -> None:
        """Install persisted snapshots at start-up (no revision check: the store is the truth)."""
        with self._write_lock:
            for policy in policies:
                self._policies[policy.model] = policy

    def models(self) -> list[str]:
        return sorted(self._policies)

    def items(self) -> list[tuple[str, TrafficPolicy]]:
        """A consistent copy of (model, snapshot) pairs, for background tasks to iterate."""
        return sorted(self._policies.copy().items())

    def __len__(self) -> int:
        return len(self._policies)

    def __contains__(self, model: object) -> bool:
        return model in self._policies
