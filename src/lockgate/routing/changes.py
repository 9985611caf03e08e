"""Every policy change goes through here: validate, publish the new snapshot, emit one event.

One path for operator changes (`traffic set`, `traffic shadow`) and for the canary
controller's automatic ones means every change bumps the revision exactly once, is gated on
the registry's approval state, and produces exactly one audit event.

Events are plain dicts ``{"action", "subject", "actor", "details"}`` handed to the `emit`
callback together with the new `TrafficPolicy`; the lead wires it to the Store (persist the
snapshot) and the audit trail. The subject is the model name; versions are in the details.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

from lockgate.routing.policy import (
    PolicyBook,
    PolicyError,
    ShadowSpec,
    TrafficPolicy,
    version_sort_key,
)

log = logging.getLogger(__name__)

Event = dict[str, Any]
#: Called after each publish with (event, new snapshot). It must not raise; if it does, the
#: failure is logged and counted (`PolicyChanges.emit_failures`), the change stays published.
EmitFn = Callable[[Event, TrafficPolicy], None]
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
        emit: EmitFn | None = None,
        *,
        servable: GateFn | None = None,
        shadowable: GateFn | None = None,
    ) -> None:
        """
        Args:
            book: the live snapshots.
            emit: receives each change's audit event and new snapshot.
            servable: gate for live traffic (approved or better); None allows any version.
            shadowable: gate for shadow traffic (validated or better); defaults to `servable`.
        """
        self.book = book
        self._emit = emit
        self._servable = servable
        self._shadowable = shadowable or servable
        self.emit_failures = 0

    # ------------------------------------------------------------------ plumbing
    def commit(
        self,
        old: TrafficPolicy | None,
        new: TrafficPolicy,
        action: str,
        actor: str,
        details: Mapping[str, Any] | None = None,
    ) -> Event:
        """Publish `new` (compare-and-swap against `old`) and emit its event."""
        self.book.replace(new, expect_revision=None if old is None else old.revision)
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
        if self._emit is not None:
            try:
                self._emit(event, new)
            except Exception:  # the change is live; never let an audit hiccup kill the caller
                self.emit_failures += 1
                log.exception("traffic event %s for model %s could not be emitted", action, new.model)
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
