"""The control plane as one object: what the server, the admin API and the router share.

It owns the store, registry, audit trail and auth, the live policy book with its router,
policy writer and canary controller, and the in-memory gate caches the hot path reads
(servable/shadowable versions per model), refreshed whenever the store reports a change.
Routing never touches the store on a request.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterator, Mapping, Sequence

from lockgate.control.actor import SYSTEM_ACTOR, current_actor
from lockgate.control.audit import Action, AuditTrail, model_subject
from lockgate.control.auth import Authenticator
from lockgate.errors import AlreadyExists, LifecycleError, LockgateError, NotFound, StoreError
from lockgate.config import ProvenanceSettings
from lockgate.control.leader import LocalLeader
from lockgate.control.provenance import ProvenanceGate
from lockgate.control.registry import Registry, State
from lockgate.control.store import Change, ChangeKind, Store, open_store
from lockgate.control.watch import ChangeWatcher
from lockgate.routing.changes import PolicyChanges
from lockgate.routing.policy import PolicyBook, TrafficPolicy
from lockgate.routing.rollout import CanaryController, TrafficStats
from lockgate.routing.router import Router
from lockgate.routing.shadow import AgreementBook

log = logging.getLogger("lockgate.control")


class ControlPlane:
    def __init__(
        self,
        store: Store,
        *,
        repository_root: Path,
        authenticator: Authenticator,
        require_approval: bool = True,
        canary_tick_s: float = 1.0,
        leader_factory: Callable[[Callable[[], Any], Callable[[], Any]], Any] = LocalLeader,
        provenance: ProvenanceSettings | None = None,
    ) -> None:
        """``leader_factory(on_elected, on_lost)`` builds the leader elector: a local one for
        one process, a PostgreSQL advisory-lock one for a fleet."""
        self.store = store
        self.audit = AuditTrail(store)
        self.provenance = ProvenanceGate(store, self.audit, provenance)
        self.registry = Registry(store, self.audit, repository=repository_root, provenance=self.provenance)
        self.auth = authenticator
        self.require_approval = require_approval
        self.canary_tick_s = canary_tick_s
        self.book = PolicyBook()
        self.agreements = AgreementBook()
        self.traffic_stats = TrafficStats(self.agreements)
        self.changes = PolicyChanges(self.book, self._emit, servable=self.can_serve, shadowable=self.can_shadow)
        self.canary = CanaryController(self.book, changes=self.changes)
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
        self.last_verify_ok: bool | None = None  # set by AuditVerify calls
        self._rollback_listeners: list[Callable[[str, str, str, str], Any]] = []

    def add_leader_job(self, job: Callable[[asyncio.Event], Awaitable[None]]) -> None:
        """Run ``job(stop)`` while this replica leads (started on election, stopped on loss)."""
        self._leader_jobs.append(job)

    def add_rollback_listener(self, listener: Callable[[str, str, str, str], Any]) -> None:
        """``listener(model, from_version, to_version, reason)`` on every canary rollback
        (telemetry turns these into span events and log records)."""
        self._rollback_listeners.append(listener)

    @classmethod
    def open(cls, location: str | Path, **kwargs: Any) -> "ControlPlane":
        return cls(open_store(location), **kwargs)

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

    def refresh_policies(self) -> None:
        """Install the store's policies that are newer than the live ones."""
        fresh = []
        for record in self.store.list_policies():
            policy = TrafficPolicy.from_dict(record.document)
            current = self.book.get(policy.model)
            if current is None or policy.revision > current.revision:
                fresh.append(policy)
        if fresh:
            self.book.load(fresh)

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
        """Refuse a load whose artifact differs from what was registered (audited)."""
        try:
            self.registry.get(model, version)
        except NotFound:
            return  # first sight: registered (with this hash) right after the load
        self.registry.verify_artifact(model, version, path, actor=SYSTEM_ACTOR, actual_sha256=digest)

    def on_models_changed(self, model: str, loaded: list[str], removed: list[str]) -> None:
        for version in loaded:
            try:
                self._register_discovered(model, version)
            except StoreError as exc:  # store down: serving goes on; the version stays unregistered
                log.warning("model %s version %s not registered (control-plane store unavailable): %s",
                            model, version, exc)
        previous = self._loaded.get(model, frozenset())
        actor = current_actor()  # the caller of RepositoryModelLoad/Unload, else the system
        # Audit appends are spooled by a ResilientStore while the store is down.
        for version in sorted(set(loaded) - previous):
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
            self.registry.get(model, version)
            return
        except NotFound:
            pass
        try:
            self.registry.register(model, version, None, SYSTEM_ACTOR, metadata={"discovered": True})
        except AlreadyExists:
            # Another replica sharing the store registered it first (both saw it at start):
            # our artifact must still match the hash it recorded.
            self.registry.verify_artifact(model, version, self.registry.artifact_path(model, version), actor=SYSTEM_ACTOR)

    # -- policy events -------------------------------------------------------------------
    def _emit(self, event: Mapping[str, Any], policy: TrafficPolicy) -> None:
        """Persist a published policy and audit the change; keep lifecycle states in step."""
        self.store.set_policy(policy.model, policy.to_dict(), event["actor"])
        self.audit.append(event["actor"], event["action"], event["subject"], dict(event["details"]))
        action = str(event["action"])
        canary = policy.canary
        if action.endswith("rolled_back") and canary is not None:
            key = (policy.model, canary.canary)
            self.rollbacks_by_version[key] = self.rollbacks_by_version.get(key, 0) + 1
            for listener in self._rollback_listeners:
                listener(policy.model, canary.canary, canary.stable, str(event["details"].get("reason", "")))
            log.warning("canary of model '%s' rolled back: %s", policy.model, event["details"].get("reason"))
        if canary is not None:
            if action.endswith("canary.started"):
                self._transition(policy.model, canary.canary, State.CANARY, event["actor"])
            elif action.endswith(("rolled_back", "aborted")):
                self._transition(policy.model, canary.canary, State.APPROVED, event["actor"])
            elif action.endswith("promoted"):
                self._transition(policy.model, canary.canary, State.SERVING, event["actor"])
                self._transition(policy.model, canary.stable, State.APPROVED, event["actor"])
        for version, weight in policy.weights.items():
            if weight > 0 and (canary is None or not canary.state.active or version != canary.canary):
                self._transition(policy.model, version, State.SERVING, event["actor"], quiet=True)

    def _transition(self, model: str, version: str, target: State, actor: str, *, quiet: bool = False) -> None:
        try:
            record = self.registry.get(model, version)
            if record.state != target:
                self.registry.transition(model, version, target, actor)
        except (LifecycleError, NotFound) as exc:
            if not quiet:
                log.info("lifecycle of %s/%s not moved to %s: %s", model, version, target, exc)
        self.refresh_gates([model])

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
        head = self.store.audit_head()
        yield Sample("lockgate_audit_entries", {"action": "all"}, head.seq if head is not None else 0)
        if self.last_verify_ok is not None:
            yield Sample("lockgate_audit_verify_ok", {}, 1.0 if self.last_verify_ok else 0.0)

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
        self.store.close()
