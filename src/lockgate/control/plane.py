"""The control plane as one object: what the server, the admin API and the router share.

It owns the store, registry, audit trail and auth, the live policy book with its router,
policy writer and canary controller, and the in-memory gate caches the hot path reads
(servable/shadowable versions per model), refreshed whenever the store reports a change.
Routing never touches the store on a request.

Every traffic change is recorded before it is live: `PolicyChanges` calls
``_persist_change``, which commits the policy revision, its audit entry and the lifecycle
moves it implies (canary -> canary state, promoted -> serving, ...) in one store
transaction; only then is the snapshot published to the router.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterator, Mapping, Sequence

from lockgate.control.actor import SYSTEM_ACTOR, current_actor
from lockgate.control.audit import Action, AuditTrail, Entry, model_subject
from lockgate.control.auth import Authenticator
from lockgate.config import ProvenanceSettings
from lockgate.control.leader import LocalLeader
from lockgate.control.provenance import ProvenanceGate
from lockgate.control.registry import Registry, State
from lockgate.control.store import Change, ChangeKind, SetPolicy, Store, UpdateVersion
from lockgate.control.watch import ChangeWatcher
from lockgate.errors import AlreadyExists, ConflictError, LifecycleError, LockgateError, NotFound, StoreError
from lockgate.routing.changes import PolicyChanges
from lockgate.routing.policy import PolicyBook, TrafficPolicy
from lockgate.routing.rollout import CanaryController, TrafficStats
from lockgate.routing.router import Router, default_version
from lockgate.routing.shadow import AgreementBook

log = logging.getLogger("lockgate.control")

#: Registry states in which a version takes (or mirrors) traffic: never unloaded by a reload.
_LIVE_REGISTRY_STATES = frozenset({State.SERVING.value, State.CANARY.value, State.SHADOW.value})


class ControlPlane:
    def __init__(
        self,
        store: Store,
        *,
        audit: AuditTrail,
        repository_root: Path,
        authenticator: Authenticator,
        require_approval: bool = True,
        canary_tick_s: float = 1.0,
        replica_id: str = "",
        leader_factory: Callable[[Callable[[], Any], Callable[[], Any]], Any] = LocalLeader,
        provenance: ProvenanceSettings | None = None,
    ) -> None:
        """``leader_factory(on_elected, on_lost)`` builds the leader elector: a local one for
        one process, a PostgreSQL advisory-lock one for a fleet."""
        self.store = store
        self.audit = audit
        self.provenance = ProvenanceGate(store, self.audit, provenance)
        self.registry = Registry(store, self.audit, repository=repository_root, provenance=self.provenance)
        self.auth = authenticator
        self.require_approval = require_approval
        self.canary_tick_s = canary_tick_s
        self.replica_id = replica_id
        self.book = PolicyBook()
        self.agreements = AgreementBook()
        self.traffic_stats = TrafficStats(self.agreements)
        self.changes = PolicyChanges(self.book, self._persist_change, servable=self.can_serve, shadowable=self.can_shadow)
        self.changes.published.append(self._after_change)
        #: (model, version) -> why drift cannot be evaluated for it (``set_drift_check``).
        self._drift_check: Callable[[str, str], str | None] | None = None
        self.canary = CanaryController(self.book, changes=self.changes, drift_unavailable=self._drift_unavailable)
        self.router = Router(self.book, state_of=self._state_of)
        # Gate caches read on every request: model -> versions. Replaced wholesale (atomic).
        self._servable: dict[str, frozenset[str]] = {}
        self._shadowable: dict[str, frozenset[str]] = {}
        self._loaded: dict[str, frozenset[str]] = {}
        self._states: dict[str, dict[str, str]] = {}
        self._refresh_lock = threading.Lock()
        self._watcher: ChangeWatcher | None = None
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        # Leader-only work (canary analysis, fleet drift merge): started when this replica is
        # elected, cancelled when it loses the lease, so each decision is made and audited once.
        self.leader: Any = None  # LeaderElector | LocalLeader, built in start()
        self._leader_factory = leader_factory
        self._leader_jobs: list[Callable[[asyncio.Event], Awaitable[None]]] = [self._canary_job]
        self._leader_stop: asyncio.Event | None = None
        self._leader_tasks: list[asyncio.Task] = []
        self.rollbacks_by_version: dict[tuple[str, str], int] = {}
        self.last_verify_ok: bool | None = None  # set by every verification (startup, periodic, AuditVerify)
        self._rollback_listeners: list[Callable[[str, str, str, str], Any]] = []
        # Extra sections of a model's evidence bundle (``audit export``): name -> model -> section.
        self._evidence_sources: dict[str, Callable[[str], Any]] = {}
        self._gate_listeners: list[Callable[[list[str]], None]] = []
        self._moved: dict[int, bool] = {}  # id(new policy) -> its recorded change moved lifecycle states

    def add_leader_job(self, job: Callable[[asyncio.Event], Awaitable[None]]) -> None:
        """Run ``job(stop)`` while this replica leads (started on election, stopped on loss)."""
        self._leader_jobs.append(job)

    def add_rollback_listener(self, listener: Callable[[str, str, str, str], Any]) -> None:
        """``listener(model, from_version, to_version, reason)`` on every canary rollback
        (telemetry turns these into span events and log records)."""
        self._rollback_listeners.append(listener)

    def add_evidence_source(self, name: str, source: Callable[[str], Any]) -> None:
        """``source(model)`` becomes section ``name`` of the model's evidence bundle
        (``audit export``), e.g. the outcomes' quality and fairness history."""
        self._evidence_sources[name] = source

    @property
    def evidence_sources(self) -> Mapping[str, Callable[[str], Any]]:
        return dict(self._evidence_sources)

    @classmethod
    def open(cls, location: str | Path, **kwargs: Any) -> "ControlPlane":
        return cls(open_store(location), **kwargs)

    def add_gate_listener(self, listener: Callable[[list[str]], None]) -> None:
        """``listener(models)`` after the gates of those models were refreshed (health follows
        them); may be called on an admin or store-watcher thread."""
        self._gate_listeners.append(listener)

    def set_drift_check(self, check: Callable[[str, str], str | None]) -> None:
        """``check(model, version)`` -> why drift cannot be evaluated for that version, or None
        (governance knows: no reference profile, drift off); the canary's drift guardrail is
        inconclusive, never passed, while it says why."""
        self._drift_check = check

    # -- gates (hot path: dict lookups only) ------------------------------------------
    def can_serve(self, model: str, version: str) -> bool:
        if not self.require_approval:
            return version in self._loaded.get(model, ())
        return version in self._servable.get(model, ())

    def can_shadow(self, model: str, version: str) -> bool:
        if not self.require_approval:
            return version in self._loaded.get(model, ())
        return version in self._shadowable.get(model, ())

    def _state_of(self, model: str, version: str) -> str | None:
        """Lifecycle state from the cached view: a refusal must not need the store (it may be down)."""
        return self._states.get(model, {}).get(version)

    def servable_loaded(self, model: str) -> list[str]:
        """Loaded versions of ``model`` that may take live traffic now (health and readiness)."""
        return sorted((v for v in self._loaded.get(model, ()) if self.can_serve(model, v)), key=int)

    def refresh_gates(self, models: Sequence[str] | None = None) -> None:
        """Re-read approval state from the store (on start, on change, on the watcher's resync)."""
        with self._refresh_lock:
            names = set(models) if models else {r.model for r in self.registry.list_versions()} | set(self._loaded)
            servable = dict(self._servable)
            shadowable = dict(self._shadowable)
            states = dict(self._states)
            for name in names:
                servable[name], shadowable[name], states[name] = self.registry.gates(name)
            self._servable, self._shadowable, self._states = servable, shadowable, states
        for listener in self._gate_listeners:
            try:
                listener(sorted(names))
            except Exception:
                log.exception("gate listener failed")

    def refresh_policies(self) -> None:
        """Install the store's policies that are newer than the live ones."""
        fresh = []
        for record in self.store.list_policies():
            policy = TrafficPolicy.from_dict(record.document)
            current = self.book.get(policy.model)
            if current is None or policy.revision > current.revision:
                fresh.append((current, policy))
        if fresh:
            self.book.load([policy for _, policy in fresh])
            for current, policy in fresh:
                self._forget_stale_agreements(policy, current)

    def _on_store_changes(self, changes: Sequence[Change]) -> None:
        models = sorted({c.model for c in changes if c.kind in (ChangeKind.VERSION, ChangeKind.RECORD) and c.model})
        if not changes or models:
            self.refresh_gates(models or None)
        if not changes or any(c.kind == ChangeKind.POLICY for c in changes):
            self.refresh_policies()

    # -- repository hooks ---------------------------------------------------------------
    def digest_for_load(self, model: str, version: str, path: Path) -> str:
        """Verify the version directory's signature (audited refusal) and return the artifact's
        SHA-256, from the verified manifest when it has it: the bytes are hashed once."""
        card, card_known = None, True
        try:
            card = self.registry.latest_card(model, version)
        except StoreError as exc:  # a third_party rule cannot be decided without it: fails closed
            log.warning("model %s version %s: card unavailable for the signature policy: %s", model, version, exc)
            card_known = False
        provenance = self.provenance.verify(model, version, path.parent, stage="load", card=card, card_known=card_known)
        return provenance.artifact_digest(path)

    def verify_artifact(self, model: str, version: str, path: Path, digest: str) -> None:
        """Before a version loads: register it if it is new, else refuse it (audited) when its
        artifact differs from the audited registration. Unverifiable (store down) refuses too."""
        try:
            self.registry.get(model, version)
        except NotFound:
            try:
                self._register_discovered(model, version)
            except StoreError as exc:  # store down: it loads unregistered, so it cannot serve when gated
                log.warning("model %s version %s not registered (control-plane store unavailable): %s",
                            model, version, exc)
            return
        self.registry.verify_artifact(model, version, path, actor=SYSTEM_ACTOR, actual_sha256=digest)

    def on_models_changed(self, model: str, loaded: list[str], removed: list[str]) -> None:
        previous = self._loaded.get(model, frozenset())
        actor = current_actor()  # the caller of RepositoryModelLoad/Unload, else the system
        # Audit appends are spooled by a ResilientStore while the store is down.
        for version in sorted(set(loaded) - previous, key=int):
            self.audit.append(actor, Action.MODEL_LOAD, model_subject(model, version), {})
        for version in removed:
            if version not in loaded:
                self.audit.append(actor, Action.MODEL_UNLOAD, model_subject(model, version), {})
        self._loaded = {**self._loaded, model: frozenset(loaded)}
        try:
            self.refresh_gates([model])
        except StoreError as exc:  # keep the last gates; the watcher's resync refreshes them later
            log.warning("gates of model %s not refreshed (control-plane store unavailable): %s", model, exc)

    def _register_discovered(self, model: str, version: str) -> None:
        try:
            self.registry.register(model, version, None, SYSTEM_ACTOR, metadata={"discovered": True})
        except AlreadyExists:
            # Another replica sharing the store registered it first (both saw it at start):
            # our artifact must still match the hash it recorded.
            self.registry.verify_artifact(model, version, self.registry.artifact_path(model, version), actor=SYSTEM_ACTOR)

    def retained_versions(self, model: str, default: str | None = None) -> set[str]:
        """Versions a reload must keep loaded: they serve, canary or mirror now (by the live
        policy, by the registry, or as the default route: ``default`` is the model's default
        the router starts from, ``routing.router.default_version`` decides). Only retiring
        them or a policy moving their traffic away lets them go."""
        keep: set[str] = set()
        policy = self.book.get(model)
        if policy is not None:
            keep.update(v for v, w in policy.weights.items() if w > 0)
            if policy.canary is not None and policy.canary.state.active:
                keep.update((policy.canary.stable, policy.canary.canary))
            if policy.shadow is not None:
                keep.add(policy.shadow.version)
        keep.update(v for v, state in self._states.get(model, {}).items() if state in _LIVE_REGISTRY_STATES)
        if policy is None:
            route = self._default_route(model, default)
            if route is not None:
                keep.add(route)
        return keep

    def _default_route(self, model: str, default: str | None) -> str | None:
        """The loaded version a request naming none goes to without a policy (None: none may serve)."""
        route = default_version(default, self._loaded.get(model, ()), lambda v: self.can_serve(model, v))
        return route if route is not None and self.can_serve(model, route) else None

    def traffic_of(self, model: str, version: str, default: str | None = None) -> str | None:
        """Why ``version`` takes traffic now (for refusing to unload it), or None."""
        policy = self.book.get(model)
        if policy is not None:
            weight = policy.weights.get(version, 0)
            if weight > 0:
                return f"it has {policy.percent_of(version):g}% of the traffic (policy revision {policy.revision})"
            canary = policy.canary
            if canary is not None and canary.state.active and version in (canary.stable, canary.canary):
                return f"it is in the {canary.state.value} canary ({canary.stable} -> {canary.canary})"
            if policy.shadow is not None and policy.shadow.version == version:
                return f"it takes {policy.shadow.percent:g}% of the requests as a shadow"
        elif version == self._default_route(model, default):
            return "it is the version requests without a pinned version go to"
        state = self._states.get(model, {}).get(version)
        if state in _LIVE_REGISTRY_STATES:
            return f"it is {state} in the registry"
        return None

    # -- policy changes: recorded first, published after ----------------------------------
    def _persist_change(self, event: Mapping[str, Any], new: TrafficPolicy, old: TrafficPolicy | None) -> None:
        """Commit the policy revision, its audit entry and the lifecycle moves it implies in
        one transaction; raises (and nothing is published) when that is impossible."""
        actor = str(event["actor"])
        action = str(event["action"])
        writes: list[Any] = [SetPolicy(new.model, new.to_dict(), actor,
                                       expected_revision=old.revision if old is not None else 0)]
        entries = [Entry(actor, action, str(event["subject"]), dict(event["details"]))]
        steps = self._lifecycle_steps(action, actor, new, old)
        for write, entry in steps:
            writes.append(write)
            entries.append(entry)
        try:
            applied = self.audit.record(writes, entries)
        except ConflictError:
            self.refresh_policies()  # another writer (replica) got there first: catch up for the retry
            raise
        self._moved[id(new)] = bool(steps)
        stored = applied.results[0].revision
        if stored != new.revision:  # cannot happen with the CAS above; never publish a stranger
            raise ConflictError(f"policy of model '{new.model}' was stored as revision {stored}, not {new.revision}")

    def _lifecycle_steps(
        self, action: str, actor: str, new: TrafficPolicy, old: TrafficPolicy | None
    ) -> list[tuple[UpdateVersion, Entry]]:
        """The registry moves a policy change implies (committed with it)."""
        canary = new.canary
        targets: dict[str, State] = {}
        if canary is not None:
            if action.endswith("canary.started"):
                targets[canary.canary] = State.CANARY
            elif action.endswith(("rolled_back", "aborted")):
                targets[canary.canary] = State.APPROVED
            elif action.endswith("promoted"):
                targets[canary.canary] = State.SERVING
                targets[canary.stable] = State.APPROVED
        live = set(new.versions)
        for version in sorted(live):
            if canary is None or not canary.state.active or version != canary.canary:
                targets.setdefault(version, State.SERVING)
        for version in sorted(set(old.versions if old is not None else ()) - live):
            targets.setdefault(version, State.APPROVED)  # its traffic moved away
        new_shadow = new.shadow.version if new.shadow is not None else None
        old_shadow = old.shadow.version if old is not None and old.shadow is not None else None
        if new_shadow is not None and new_shadow not in live:
            targets.setdefault(new_shadow, State.SHADOW)
        if old_shadow is not None and old_shadow != new_shadow and old_shadow not in live:
            targets.setdefault(old_shadow, State.VALIDATED)  # leaves shadow (approved ones as approved)
        steps = []
        records = {r.version: r for r in self.store.list_versions(new.model)} if targets else {}
        for version, target in targets.items():
            record = records.get(version)
            if record is None:
                continue
            try:
                to = self.registry.plan_transition(record, target)
            except LifecycleError as exc:
                log.info("lifecycle of %s/%s not moved to %s: %s", new.model, version, target.value, exc)
                continue
            if to is not None:
                steps.append(self.registry.transition_step(
                    record, to, actor, reason=f"{action} (policy revision {new.revision})",
                    details={"revision": new.revision}))
        return steps

    def _after_change(self, event: Mapping[str, Any], new: TrafficPolicy, old: TrafficPolicy | None) -> None:
        """After a recorded change went live: gates, rollback telemetry, stale agreement rows."""
        action = str(event["action"])
        canary = new.canary
        if action.endswith("rolled_back") and canary is not None:
            key = (new.model, canary.canary)
            self.rollbacks_by_version[key] = self.rollbacks_by_version.get(key, 0) + 1
            for listener in self._rollback_listeners:
                listener(new.model, canary.canary, canary.stable, str(event["details"].get("reason", "")))
            log.warning("canary of model '%s' rolled back: %s", new.model, event["details"].get("reason"))
        self._forget_stale_agreements(new, old)
        if self._moved.pop(id(new), True):  # lifecycle states changed with it: the gates follow
            self.refresh_gates([new.model])

    def _forget_stale_agreements(self, new: TrafficPolicy, old: TrafficPolicy | None) -> None:
        old_shadow = old.shadow.version if old is not None and old.shadow is not None else None
        if old_shadow is not None and (new.shadow is None or new.shadow.version != old_shadow):
            self.agreements.forget(new.model, old_shadow)

    def _drift_unavailable(self, model: str, version: str) -> str | None:
        check = self._drift_check
        return check(model, version) if check is not None else None

    # -- background -------------------------------------------------------------------
    async def start(self) -> None:
        self.refresh_gates()
        self.refresh_policies()
        loop = asyncio.get_running_loop()

        def deliver(changes: Sequence[Change]) -> None:
            loop.call_soon_threadsafe(self._on_store_changes, list(changes))

        self._watcher = ChangeWatcher(self.store, deliver)
        self._watcher.start()
        self.leader = self._leader_factory(
            lambda: loop.call_soon_threadsafe(self._became_leader),
            lambda: loop.call_soon_threadsafe(self._lost_leadership),
        )
        self.leader.start()

    async def _canary_job(self, stop: asyncio.Event) -> None:
        await self.canary.run(self.traffic_stats, tick_s=self.canary_tick_s, stop=stop)

    def _became_leader(self) -> None:
        if self._leader_stop is not None or self._stop.is_set():
            return
        log.info("this replica is the leader: running canary analysis and fleet drift merges")
        self.refresh_policies()
        self._leader_stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        self._leader_tasks = [loop.create_task(job(self._leader_stop)) for job in self._leader_jobs]

    def _lost_leadership(self, *, stepping_down: bool = False) -> None:
        if self._leader_stop is None:
            return
        if stepping_down:  # our own shutdown: expected, not news
            log.info("stepping down as leader (shutting down): stopping leader-only work")
        else:
            log.warning("leadership lost: stopping leader-only work")
        self._leader_stop.set()
        for task in self._leader_tasks:
            task.cancel()
        self._leader_stop, self._leader_tasks = None, []

    @property
    def is_leader(self) -> bool:
        return self._leader_stop is not None

    @property
    def degraded(self) -> bool:
        """True while the store is unreachable and writes are being spooled."""
        return bool(getattr(self.store, "degraded", False))

    def on_drift_event(self, event: Any) -> None:
        """Governance alert listener (a ``DriftEvent``): latched for the canary, DRIFT audited."""
        self.on_drift_alert(event.model, event.version, event.status, event.to_audit())

    def on_drift_report(self, report: Any) -> None:
        """Governance report listener: an OK window clears a latched DRIFT in the canary
        analysis (alerts alone never would)."""
        if report.status == "OK":
            self.canary.on_drift_alert(report.model, report.version, "OK")

    def on_drift_alert(self, model: str, version: str, status: object, details: Mapping[str, Any] | None = None) -> None:
        """Governance hook: latch the status for canary analysis and audit DRIFT alerts."""
        self.canary.on_drift_alert(model, version, status)
        name = getattr(status, "name", None) or getattr(status, "value", None) or str(status)
        if str(name).upper() == "DRIFT":
            try:
                self.audit.append("system:governance", Action.DRIFT_ALERT, model_subject(model, version), dict(details or {}))
            except LockgateError:
                log.exception("drift alert for %s/%s could not be audited", model, version)

    def verify_audit(self) -> Any:
        """Verify the whole trail (chain, checkpoints, registry) and remember the verdict."""
        result = self.audit.verify()
        self.last_verify_ok = result.ok
        if not result.ok:
            log.error("audit trail verification FAILED at seq %s: %s", result.first_bad_seq, result.reason)
        return result

    # -- metrics (read at scrape time, on the metrics thread) ---------------------------------
    def metric_samples(self) -> Iterator[Any]:
        from lockgate.telemetry.metrics import CANARY_STATE, Sample

        for model, policy in self.book.items():
            total = sum(policy.weights.values()) or 1
            for version, weight in policy.weights.items():
                yield Sample("lockgate_traffic_weight", {"model": model, "version": version}, weight / total)
            canary = policy.canary
            if canary is not None:
                state = CANARY_STATE.get(canary.state.value, 0)
                yield Sample("lockgate_canary_state", {"model": model, "version": canary.canary}, state)
        for snap in self.agreements.snapshots():
            if snap.agreement_rate is None:
                continue
            yield Sample("lockgate_shadow_agreement",
                         {"model": snap.model, "version": snap.primary, "shadow_version": snap.shadow}, snap.agreement_rate)
        for (model, version), count in list(self.rollbacks_by_version.items()):
            yield Sample("lockgate_rollbacks", {"model": model, "version": version}, count)
        yield Sample("lockgate_leader", {"replica": self.replica_id}, 1.0 if self.is_leader else 0.0)
        head = self.store.audit_head()
        yield Sample("lockgate_audit_entries", {"action": "all"}, head.seq if head is not None else 0)
        if self.last_verify_ok is not None:
            yield Sample("lockgate_audit_verify_ok", {}, 1.0 if self.last_verify_ok else 0.0)
        checkpoints = self.audit.checkpoints
        if checkpoints is not None:
            last = checkpoints.last
            yield Sample("lockgate_audit_head", {}, float(last.seq) if last is not None else 0.0)
            yield Sample("lockgate_audit_checkpoints", {}, float(checkpoints.written))
            yield Sample("lockgate_audit_checkpoint_failures", {}, float(checkpoints.failures))

    async def close(self) -> None:
        self._stop.set()
        leader_tasks = list(self._leader_tasks)
        self._lost_leadership(stepping_down=True)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, *leader_tasks, return_exceptions=True)
        if self.leader is not None:
            await asyncio.to_thread(self.leader.release)  # another replica takes over at once
        if self._watcher is not None:
            await asyncio.to_thread(self._watcher.stop)
        if self.audit.checkpoints is not None:
            await asyncio.to_thread(self.audit.checkpoints.close)
        self.store.close()


__all__ = ["ControlPlane", "SYSTEM_ACTOR"]
