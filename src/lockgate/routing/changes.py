"""Every policy change goes through here: validate, persist and audit, then publish.

One path for operator changes (`traffic set`, `traffic shadow`) and for the canary
controller's automatic ones means every change bumps the revision exactly once, is gated on
the registry's approval state, and produces exactly one audit event.

The order is the guarantee: `persist` (the control plane: the policy revision and its audit
entry in one store transaction) runs first, and the new snapshot is published to the router
only after it returned. A change that cannot be recorded raises (UNAVAILABLE with the
store's reason; ABORTED when another writer got that revision first) and never goes live,
so a revision is never reused and nothing routes on a policy the store does not hold.
`published` listeners run after the swap (metrics, rollback events); they may fail without
undoing anything.

Events are plain dicts ``{"action", "subject", "actor", "details"}``; the subject is the
model name, versions are in the details.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from typing import Any

from lockgate.routing.policy import (
    PolicyBook,
    PolicyError,
    ShadowSpec,
    StaleRevision,
    TrafficPolicy,
    version_sort_key,
)

log = logging.getLogger(__name__)

Event = dict[str, Any]
#: Called before each publish with (event, new snapshot, previous snapshot or None). It makes
#: the change durable and audited, and raises if it cannot: the change is then refused.
PersistFn = Callable[[Event, TrafficPolicy, "TrafficPolicy | None"], None]
#: Called after each publish with (event, new snapshot, previous snapshot or None). Failures
#: are logged and counted (`PolicyChanges.listener_failures`); the change stays published.
PublishedFn = Callable[[Event, TrafficPolicy, "TrafficPolicy | None"], None]
#: (model, version) → may it take this kind of traffic?
GateFn = Callable[[str, str], bool]

SYSTEM_ACTOR = "system:canary"


class NotServable(PolicyError):
    """A change would give traffic to a version its lifecycle state does not allow."""

    code = "FAILED_PRECONDITION"
    reason = "not_servable"


class PolicyChanges:
    """Validated, audited writes to a `PolicyBook`."""

    def __init__(
        self,
        book: PolicyBook,
        persist: PersistFn | None = None,
        *,
        servable: GateFn | None = None,
        shadowable: GateFn | None = None,
    ) -> None:
        """
        Args:
            book: the live snapshots.
            persist: makes each change durable and audited before it is published (raises
                to refuse it). None publishes without recording (tests of routing alone).
            servable: gate for live traffic (approved or better); None allows any version.
            shadowable: gate for shadow traffic (validated or better); defaults to `servable`.
        """
        self.book = book
        self._persist = persist
        self._servable = servable
        self._shadowable = shadowable or servable
        self.published: list[PublishedFn] = []
        self.listener_failures = 0
        self.refused = 0  # changes refused because they could not be recorded
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()

    # ------------------------------------------------------------------ plumbing
    def _lock(self, model: str) -> threading.Lock:
        """One writer per model at a time in this process (other models commit in parallel)."""
        with self._locks_guard:
            return self._locks.setdefault(model, threading.Lock())

    def commit(
        self,
        old: TrafficPolicy | None,
        new: TrafficPolicy,
        action: str,
        actor: str,
        details: Mapping[str, Any] | None = None,
    ) -> Event:
        """Persist and audit `new`, then publish it (compare-and-swap against `old`).

        Raises `StaleRevision` when the live policy is no longer `old`, and whatever
        `persist` raises when the change cannot be recorded; either way nothing is published.
        """
        event: Event = {
            "action": action,
            "subject": new.model,
            "actor": actor,
            "details": {
                **(details or {}),
                "revision": new.revision,
                "previous_revision": None if old is None else old.revision,
                "policy": new.to_dict(),
            },
        }
        with self._lock(new.model):
            current = self.book.get(new.model)
            expected = None if old is None else old.revision
            if (None if current is None else current.revision) != expected:
                raise StaleRevision(
                    f"policy of model '{new.model}' is at revision "
                    f"{'none' if current is None else current.revision}, expected {expected if expected is not None else 'none'}"
                )
            if self._persist is not None:
                try:
                    self._persist(event, new, old)
                except Exception:
                    self.refused += 1
                    raise
            self.book.publish(new)
        for listener in self.published:
            try:
                listener(event, new, old)
            except Exception:  # the change is durable and live; a listener cannot undo it
                self.listener_failures += 1
                log.exception("listener of traffic event %s for model %s failed", action, new.model)
        return event

    def check_servable(self, model: str, versions: list[str] | tuple[str, ...]) -> None:
        if self._servable is None:
            return
        for version in versions:
            if not self._servable(model, version):
                raise NotServable(f"version {version} of model '{model}' is not approved to serve")

    def check_shadowable(self, model: str, version: str) -> None:
        if self._shadowable is not None and not self._shadowable(model, version):
            raise NotServable(f"version {version} of model '{model}' may not take shadow traffic")

    # ------------------------------------------------------------------ operator changes
    def set_weights(self, model: str, weights: Mapping[str, int], *, actor: str, sticky: bool | None = None) -> TrafficPolicy:
        """`traffic set MODEL 1=90 2=10`: replace the split. Refused while a canary is active."""
        old = self.book.get(model)
        if old is not None and old.canary is not None and old.canary.state.active:
            raise PolicyError(
                f"model '{model}' has a canary of version {old.canary.canary} in progress; promote or abort it first"
            )
        live = sorted((v for v, w in weights.items() if w > 0), key=version_sort_key)
        self.check_servable(model, live)
        # A finished canary's spec is dropped here: its outcome is in the audit trail.
        base: dict[str, Any] = {"sticky": old.sticky, "shadow": old.shadow} if old is not None else {}
        if sticky is not None:
            base["sticky"] = sticky
        new = TrafficPolicy(
            model=model,
            revision=(old.revision + 1) if old is not None else 1,
            weights=dict(weights),
            **base,
        )
        self.commit(old, new, "traffic.set", actor, {"weights": dict(new.weights)})
        return new

    def set_shadow(self, model: str, version: str, percent: float, *, actor: str) -> TrafficPolicy:
        """`traffic shadow MODEL V --percent P`: mirror P % of requests to V (0 removes it)."""
        old = self._require(model)
        if percent == 0:
            return self.clear_shadow(model, actor=actor)
        if version in old.versions:
            raise PolicyError(f"version {version} of model '{model}' already takes live traffic; it cannot shadow")
        self.check_shadowable(model, version)
        new = old.evolve(shadow=ShadowSpec(version=version, percent=percent))
        self.commit(old, new, "traffic.shadow", actor, {"version": version, "percent": new.shadow.percent if new.shadow else 0})
        return new

    def clear_shadow(self, model: str, *, actor: str) -> TrafficPolicy:
        old = self._require(model)
        new = old.evolve(shadow=None)
        self.commit(old, new, "traffic.shadow_cleared", actor, {"was": old.shadow.to_dict() if old.shadow else None})
        return new

    def _require(self, model: str) -> TrafficPolicy:
        policy = self.book.get(model)
        if policy is None:
            raise PolicyError(f"model '{model}' has no traffic policy; set weights first")
        return policy
