"""``lockgate.admin.v1.AdminService``: the registry, traffic policy and audit trail over gRPC.

Served on the inference port. Every call authenticates the ``authorization: Bearer``
metadata and checks one permission before doing anything; the principal's name is the
actor in the audit trail. Store writes (SQLite with ``synchronous=FULL``) and validation
(an ONNX Runtime session) run in worker threads so an admin call never stalls inference on
the event loop. Errors map to one precise status each, through ``transport.grpc.status``:
every ``LockgateError`` (control plane, routing and data plane alike) carries its own code;
anything unexpected is INTERNAL (logged).

Tokens never reach a log line or an error message.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import grpc
import numpy as np

from lockgate._proto.lockgate import admin_pb2 as pb
from lockgate._proto.lockgate import admin_pb2_grpc as pb_grpc
from lockgate.control.auth import PERMISSIONS, Permission, Principal
from lockgate.control.evidence import evidence_bundle, render
from lockgate.control.provenance import Provenance, TrustedSigner
from lockgate.errors import InvalidArgument, NotFound
from lockgate.control.store import VersionRecord, parse_time
from lockgate.control.validation import config_signature, onnx_signature
from lockgate.errors import LockgateError, error_for_code
from lockgate.transport.grpc.call_metadata import authorization
from lockgate.transport.grpc.status import abort, grpc_code, message_of
from lockgate.routing.changes import NotServable
from lockgate.routing.router import default_version
from lockgate.routing.policy import CanarySpec, Guardrails, PolicyError, StaleRevision, TrafficPolicy

if TYPE_CHECKING:
    from lockgate.control.plane import ControlPlane
    from lockgate.serving.repository import ModelRepository

log = logging.getLogger("lockgate.admin")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["AdminService"].full_name
_GUARDRAIL_FIELDS = (
    "max_error_rate", "max_error_ratio", "max_p99_ratio", "max_p99_ms", "max_disagreement",
    "min_requests", "fail_on_drift", "error_rate_floor", "p99_floor_ms",
)
_DISABLEABLE = frozenset({"max_error_rate", "max_error_ratio", "max_p99_ratio", "max_p99_ms", "max_disagreement"})

T = TypeVar("T")


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The gRPC status one admin failure maps to (the one mapping in ``status``)."""
    return grpc_code(exc), message_of(exc)


def _json_object(text: str, what: str) -> dict[str, Any]:
    """Parse a JSON-object request field; empty text is an empty object."""
    if not text.strip():
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidArgument(f"{what} is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise InvalidArgument(f"{what} must be a JSON object")
    return value


def _dumps(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str, allow_nan=True)


def _required(value: str, what: str) -> str:
    if not value:
        raise InvalidArgument(f"{what} is required")
    return value


def _finite_or_none(value: float | None) -> float | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


class DirectCall:
    """The context of an admin call that did not arrive over gRPC (the REST binding, the
    console): it carries the caller's ``authorization`` value, and a refusal raises the
    ``LockgateError`` of its status instead of aborting an RPC. The call runs the servicer's own
    method, so its authentication, role check, four-eyes rules and audit are the same."""

    def __init__(self, authorization: str | None = None, principal: Principal | None = None) -> None:
        self.authorization = authorization
        #: a caller already authenticated by its transport (a console session): only the
        #: permission is checked
        self.principal = principal

    async def abort(self, code: grpc.StatusCode, message: str) -> NoReturn:
        raise error_for_code(code.name, message)

    async def abort_with_status(self, status: Any) -> NoReturn:
        """What ``transport.grpc.status.abort`` calls: the status as the error it names."""
        raise error_for_code(status.code.name, status.details)


#: The admin RPCs by name, with their request and response message classes.
METHODS: dict[str, tuple[Any, Any]] = {
    method.name: (getattr(pb, method.input_type.name), getattr(pb, method.output_type.name))
    for method in pb.DESCRIPTOR.services_by_name["AdminService"].methods
}


class AdminService(pb_grpc.AdminServiceServicer):
    """The servicer: the control plane it governs and the repository it checks loads against."""

    async def call(self, method: str, request: Any, authorization: str | None = None, *,
                   principal: Principal | None = None) -> Any:
        """Run admin RPC ``method`` in process, as the holder of ``authorization`` (or as an
        already authenticated ``principal``)."""
        if method not in METHODS:
            raise NotFound(f"the admin API has no method {method!r}")
        return await getattr(self, method)(request, DirectCall(authorization, principal))

    def __init__(self, plane: "ControlPlane", repository: "ModelRepository") -> None:
        self._plane = plane
        self.repository = repository

    @property
    def plane(self) -> "ControlPlane":
        return self._plane

    # ------------------------------------------------------------------ plumbing
    async def _serve(
        self,
        context: grpc.aio.ServicerContext,
        method: str,
        permission: Permission | None,
        body: Callable[[Principal], T],
    ) -> T | None:
        """Authenticate, authorise, run ``body`` in a thread, map failures to statuses."""
        direct = isinstance(context, DirectCall)
        header = context.authorization if direct else authorization(context)
        try:
            auth = self.plane.auth
            known = context.principal if direct else None
            principal = known if known is not None else auth.authenticate(header)
            if permission is not None:
                auth.authorize(principal, permission)
        except LockgateError as exc:
            log.info("admin %s refused: %s", method, message_of(exc))
            await abort(context, exc)
            return None  # grpc finishes the aborted call
        try:
            result = await asyncio.to_thread(body, principal)
        except Exception as exc:
            code, message = status_of(exc)
            if code is grpc.StatusCode.INTERNAL:
                log.exception("admin %s by %s failed", method, principal.name)
            else:
                log.info("admin %s by %s: %s: %s", method, principal.name, code.name, message)
            await abort(context, exc)
            return None
        # Changes are worth a line each; reads (polled by dashboards and scripts) are not.
        log.log(logging.DEBUG if permission in (None, Permission.READ) else logging.INFO,
                "admin %s by %s: ok", method, principal.name)
        return result

    def _loaded_versions(self, model: str) -> dict[str, Any]:
        loaded = self.repository.models().get(model)
        return dict(loaded.versions) if loaded is not None else {}

    def _version_info(self, record: VersionRecord) -> pb.VersionInfo:
        denial = self.plane.registry.serve_denial_reason(record.model, record.version)
        return pb.VersionInfo(
            model=record.model,
            version=record.version,
            state=record.state,
            artifact_path=record.artifact_path,
            sha256=record.sha256,
            registered_by=record.registered_by,
            registered_at=record.registered_at,
            updated_at=record.updated_at,
            metadata_json=_dumps(record.metadata),
            can_serve=denial is None,
            serve_denial=denial or "",
            can_shadow=self.plane.registry.can_shadow(record.model, record.version),
            loaded=record.version in self._loaded_versions(record.model),
            provenance=_provenance(Provenance.from_dict(record.metadata.get("provenance"))),
        )

    def _refresh(self, model: str) -> None:
        """Make routing see a registry change at once (not at the watcher's next poll)."""
        self.plane.refresh_gates([model])

    # ------------------------------------------------------------------ identity
    async def WhoAmI(self, request: Any, context: Any) -> Any:
        def body(principal: Principal) -> Any:
            return pb.WhoAmIResponse(
                name=principal.name,
                role=principal.role.value,
                permissions=sorted(p.value for p in PERMISSIONS[principal.role]),
            )

        return await self._serve(context, "WhoAmI", None, body)

    # ------------------------------------------------------------------ registry
    async def RegisterVersion(self, request: Any, context: Any) -> Any:
        def body(principal: Principal) -> Any:
            model = _required(request.model, "model")
            version = _required(request.version, "version")
            metadata = _json_object(request.metadata_json, "metadata_json")
            record = self.plane.registry.register(
                model, version, request.artifact_path or None, principal.name, metadata=metadata
            )
            self._refresh(model)
            return self._version_info(record)

        return await self._serve(context, "RegisterVersion", Permission.REGISTER, body)

    def _reference_version(self, model: str, version: str) -> str | None:
        """The version clients of ``model`` are served now (largest live weight, else a serving one)."""
        policy = self.plane.book.get(model)
        if policy is not None:
            live = sorted((w, v) for v, w in policy.weights.items() if w > 0 and v != version)
            if live:
                return live[-1][1]
        serving = [r.version for r in self.plane.registry.list_versions(model) if r.state == "serving" and r.version != version]
        if serving:
            return serving[-1]
        loaded = self.repository.models().get(model)  # no policy: the default version serves
        if loaded is not None:
            default = default_version(loaded.default_version, loaded.versions,
                                      lambda v: self.plane.can_serve(model, v))
            if default is not None and default != version and self.plane.can_serve(model, default):
                return default
        return None

    def _expected_signature(self, model: str, version: str, text: str) -> tuple[dict[str, Any] | None, str]:
        """What the new version must look like, and where that came from: the request's
        signature, else the version clients are served now, else the inputs and outputs the
        model's config declares (None: nothing to compare with)."""
        if text.strip():
            return _json_object(text, "expected_signature_json"), "the expected signature given"
        reference = self._reference_version(model, version)
        if reference is None:
            declared = config_signature(self.repository.root / model)
            return declared, "the inputs and outputs the model's config declares"
        loaded = self._loaded_versions(model).get(reference)
        if loaded is not None:
            return loaded.signature.to_dict(), f"version {reference}, which serves now"
        graph = onnx_signature(self.plane.registry.get(model, reference).artifact_path)
        return graph.to_dict(), f"version {reference}, which serves now"

    @staticmethod
    def _sample(artifact: str, text: str) -> dict[str, np.ndarray] | None:
        """Decode ``{"input": nested list}`` with each input's datatype from the graph."""
        data = _json_object(text, "sample_json")
        if not data:
            return None
        try:
            types = {spec.name: spec.datatype for spec in onnx_signature(artifact).inputs}
        except ValueError as exc:  # an element type lockgate cannot serve: nothing to decode into
            raise InvalidArgument(f"sample_json cannot be decoded: {exc}") from None
        sample: dict[str, np.ndarray] = {}
        for name, value in data.items():
            dt = types.get(name)
            if dt is None:
                raise InvalidArgument(f"sample_json names {name!r}, which is not a supported input of the model")
            try:
                sample[name] = np.asarray(value, dtype=dt.numpy)
            except (TypeError, ValueError) as exc:
                raise InvalidArgument(f"sample_json[{name!r}] is not a {dt.name} array: {exc}") from None
        return sample

    async def ValidateVersion(self, request: Any, context: Any) -> Any:
        def body(principal: Principal) -> Any:
            model = _required(request.model, "model")
            version = _required(request.version, "version")
            record = self.plane.registry.get(model, version)
            expected, source = self._expected_signature(model, version, request.expected_signature_json)
            report = self.plane.registry.validate(
                model,
                version,
                principal.name,
                expected_signature=expected,
                signature_source=source,
                sample=self._sample(record.artifact_path, request.sample_json),
                latency_runs=request.latency_runs or 5,
            )
            self._refresh(model)
            return pb.ValidateVersionResponse(
                passed=report.passed,
                failed_checks=report.failed_checks(),
                report_json=report.model_dump_json(),
                version=self._version_info(self.plane.registry.get(model, version)),
            )

        return await self._serve(context, "ValidateVersion", Permission.VALIDATE, body)

    async def SetModelCard(self, request: Any, context: Any) -> Any:
        def body(principal: Principal) -> Any:
            model = _required(request.model, "model")
            card = _json_object(request.card_json, "card_json")
            stored = self.plane.registry.set_card(model, _required(request.version, "version"), card, principal.name)
            return pb.SetModelCardResponse(card_id=stored.id)

        return await self._serve(context, "SetModelCard", Permission.APPROVE, body)

    async def ApproveVersion(self, request: Any, context: Any) -> Any:
        def body(principal: Principal) -> Any:
            model = _required(request.model, "model")
            version = _required(request.version, "version")
            card = _json_object(request.card_json, "card_json") or None
            approval = self.plane.registry.approve(model, version, principal.name, request.reason, card)
            self._refresh(model)
            return pb.ApproveVersionResponse(
                approval_id=approval.id, version=self._version_info(self.plane.registry.get(model, version))
            )

        return await self._serve(context, "ApproveVersion", Permission.APPROVE, body)

    async def RejectVersion(self, request: Any, context: Any) -> Any:
        def body(principal: Principal) -> Any:
            model = _required(request.model, "model")
            record = self.plane.registry.reject(model, _required(request.version, "version"), principal.name, request.reason)
            self._refresh(model)
            return self._version_info(record)

        return await self._serve(context, "RejectVersion", Permission.APPROVE, body)

    async def RetireVersion(self, request: Any, context: Any) -> Any:
        def body(principal: Principal) -> Any:
            model = _required(request.model, "model")
            record = self.plane.registry.retire(
                model, _required(request.version, "version"), principal.name, reason=request.reason, force=request.force
            )
            self._refresh(model)
            return self._version_info(record)

        return await self._serve(context, "RetireVersion", Permission.RETIRE, body)

    async def ListVersions(self, request: Any, context: Any) -> Any:
        def body(principal: Principal) -> Any:
            records = self.plane.registry.list_versions(request.model or None)
            return pb.ListVersionsResponse(versions=[self._version_info(r) for r in records])

        return await self._serve(context, "ListVersions", Permission.READ, body)

    async def ShowVersion(self, request: Any, context: Any) -> Any:
        def body(principal: Principal) -> Any:
            model = _required(request.model, "model")
            version = _required(request.version, "version")
            shown = self.plane.registry.show(model, version)
            details = {k: shown[k] for k in ("validation_reports", "approvals", "cards")}
            return pb.ShowVersionResponse(
                version=self._version_info(self.plane.registry.get(model, version)), details_json=_dumps(details)
            )

        return await self._serve(context, "ShowVersion", Permission.READ, body)

    async def VerifyVersion(self, request: Any, context: Any) -> Any:
        def body(principal: Principal) -> Any:
            model = _required(request.model, "model")
            version = _required(request.version, "version")
            record = self.plane.registry.get(model, version)
            provenance = self.plane.provenance.verify(
                model, version, Path(record.artifact_path).parent, stage="verify", actor=principal.name,
                card=self.plane.registry.latest_card(model, version),
            )
            return pb.VerifyVersionResponse(provenance=_provenance(provenance))

        return await self._serve(context, "VerifyVersion", Permission.READ, body)

    # ------------------------------------------------------------------ trust policy
    async def ListTrustedSigners(self, request: Any, context: Any) -> Any:
        def body(principal: Principal) -> Any:
            gate = self.plane.provenance
            return pb.ListTrustedSignersResponse(
                signers=[_signer(s) for s in gate.trusted_signers()],
                require_signature=gate.settings.require_signature,
                allowed_licenses=gate.allowed_licenses,
            )

        return await self._serve(context, "ListTrustedSigners", Permission.READ, body)

    async def AddTrustedSigner(self, request: Any, context: Any) -> Any:
        def body(principal: Principal) -> Any:
            signer = self.plane.provenance.add_signer(
                _required(request.name, "name"), _required(request.vendor, "vendor"), principal.name,
                reason=request.reason, public_key_pem=request.public_key_pem,
                certificate_chain_pem=list(request.certificate_chain_pem),
                sigstore_identity=request.sigstore_identity, sigstore_issuer=request.sigstore_issuer,
            )
            return _signer(signer)

        return await self._serve(context, "AddTrustedSigner", Permission.ADMIN, body)

    async def RemoveTrustedSigner(self, request: Any, context: Any) -> Any:
        def body(principal: Principal) -> Any:
            return _signer(self.plane.provenance.remove_signer(_required(request.name, "name"), principal.name,
                                                               reason=request.reason))

        return await self._serve(context, "RemoveTrustedSigner", Permission.ADMIN, body)

    # ------------------------------------------------------------------ traffic
    def _traffic(self, model: str) -> Any:
        plane = self.plane
        policy = plane.book.get(model)
        loaded = self.repository.models().get(model)
        if policy is None and loaded is None and not plane.registry.list_versions(model):
            raise NotFound(f"model {model!r} has no traffic policy, is not loaded and is not registered")
        status = pb.TrafficStatus(model=model, has_policy=policy is not None)
        named: set[str] = set(loaded.versions) if loaded is not None else set()
        if policy is None:
            if loaded is not None:
                status.default_version = default_version(
                    loaded.default_version, loaded.versions, lambda v: plane.can_serve(model, v)) or ""
        else:
            status.revision = policy.revision
            status.sticky = policy.sticky
            status.policy_json = policy.to_json()
            for version, weight in policy.to_dict()["weights"].items():
                status.weights.add(version=version, weight=weight, percent=policy.percent_of(version))
                named.add(version)
            if policy.shadow is not None:
                status.shadow.version = policy.shadow.version
                status.shadow.percent = policy.shadow.percent
                named.add(policy.shadow.version)
            if policy.canary is not None:
                self._fill_canary(status.canary, policy.canary)
                named.update((policy.canary.stable, policy.canary.canary))
        for snap in plane.agreements.snapshots(model):
            agreement = status.agreements.add(
                primary=snap.primary, shadow=snap.shadow, count=snap.count, compared_rows=snap.compared_rows,
                agreed_rows=snap.agreed_rows, mismatched=snap.mismatched,
            )
            for field in ("agreement_rate", "max_abs_diff", "mean_abs_diff"):
                value = _finite_or_none(getattr(snap, field))
                if value is not None:
                    setattr(agreement, field, value)
        for version in named:
            drift = plane.canary.drift_status(model, version)
            if drift is not None:
                status.drift[version] = drift
        return status

    @staticmethod
    def _fill_canary(target: Any, spec: CanarySpec) -> None:
        target.stable = spec.stable
        target.canary = spec.canary
        target.steps.extend(spec.steps)
        target.interval_s = spec.interval_s
        target.step_index = spec.step_index
        target.percent = spec.percent
        target.failures = spec.failures
        target.failure_limit = spec.failure_limit
        target.state = spec.state.value
        target.reason = spec.reason or ""
        target.guardrails_json = _dumps(spec.guardrails.to_dict())
        target.started_at = spec.started_at

    def _require_loaded(self, model: str, versions: list[str]) -> None:
        """A live version that is not loaded here would fail every request routed to it."""
        loaded = self._loaded_versions(model)
        missing = [v for v in versions if v not in loaded]
        if missing:
            raise NotServable(
                f"version(s) {', '.join(missing)} of model '{model}' are not loaded in this server "
                f"(loaded: {', '.join(sorted(loaded, key=int)) or 'none'}); {self._how_to_load(model, missing)}"
            )

    def _how_to_load(self, model: str, versions: list[str]) -> str:
        """What the operator runs next: the load command, or where the artifact must go first."""
        absent = [v for v in versions if not (self.repository.root / model / v / "model.onnx").is_file()]
        if absent:
            where = ", ".join(str(self.repository.root / model / v / "model.onnx") for v in absent)
            return f"put the artifact at {where}, then run `lockgate models load {model} {absent[0]}`"
        return "run " + " and ".join(f"`lockgate models load {model} {v}`" for v in versions)

    async def GetTraffic(self, request: Any, context: Any) -> Any:
        return await self._serve(
            context, "GetTraffic", Permission.READ, lambda p: self._traffic(_required(request.model, "model"))
        )

    async def SetWeights(self, request: Any, context: Any) -> Any:
        def body(principal: Principal) -> Any:
            model = _required(request.model, "model")
            weights = {str(v): int(w) for v, w in request.weights.items()}
            if not weights:
                raise InvalidArgument("weights are required, e.g. {'1': 90, '2': 10}")
            if request.HasField("expected_revision"):
                current = self.plane.book.get(model)
                revision = current.revision if current is not None else 0
                if revision != request.expected_revision:
                    raise StaleRevision(
                        f"policy of model '{model}' is at revision {revision}, expected {request.expected_revision}"
                    )
            live = [v for v, w in weights.items() if w > 0]
            self.plane.changes.check_servable(model, live)
            self._require_loaded(model, live)
            sticky = request.sticky if request.HasField("sticky") else None
            self.plane.changes.set_weights(model, weights, actor=principal.name, sticky=sticky)
            return self._traffic(model)

        return await self._serve(context, "SetWeights", Permission.TRAFFIC, body)

    async def SetShadow(self, request: Any, context: Any) -> Any:
        def body(principal: Principal) -> Any:
            model = _required(request.model, "model")
            if request.percent == 0:
                self.plane.changes.clear_shadow(model, actor=principal.name)
            else:
                version = _required(request.version, "version")
                self.plane.changes.check_shadowable(model, version)
                self._require_loaded(model, [version])
                self.plane.changes.set_shadow(model, version, request.percent, actor=principal.name)
            return self._traffic(model)

        return await self._serve(context, "SetShadow", Permission.TRAFFIC, body)

    @staticmethod
    def _guardrails(message: Any, present: bool) -> Guardrails:
        if not present:
            return Guardrails()
        values: dict[str, Any] = {}
        for name in _GUARDRAIL_FIELDS:
            if message.HasField(name):
                values[name] = getattr(message, name)
        for name in message.disable:
            if name not in _DISABLEABLE:
                raise PolicyError(f"cannot disable guardrail {name!r}; use one of {sorted(_DISABLEABLE)}")
            values[name] = None
        if "min_requests" in values:
            values["min_requests"] = int(values["min_requests"])
        return Guardrails(**values)

    async def StartCanary(self, request: Any, context: Any) -> Any:
        def body(principal: Principal) -> Any:
            model = _required(request.model, "model")
            version = _required(request.version, "version")
            guardrails = self._guardrails(request.guardrails, request.HasField("guardrails"))
            self._require_loaded(model, [version, *([request.stable] if request.stable else [])])
            kwargs: dict[str, Any] = {"guardrails": guardrails}
            if request.steps:
                kwargs["steps"] = tuple(int(s) for s in request.steps)
            if request.interval_s:
                kwargs["interval_s"] = request.interval_s
            if request.failure_limit:
                kwargs["failure_limit"] = int(request.failure_limit)
            self.plane.canary.start(
                model, version, actor=principal.name, stable=request.stable or None, now=time.time(), **kwargs
            )
            return self._traffic(model)

        return await self._serve(context, "StartCanary", Permission.TRAFFIC, body)

    def _command(self, context: Any, request: Any, method: str, run: Callable[..., Any]) -> Any:
        def body(principal: Principal) -> Any:
            model = _required(request.model, "model")
            kwargs = {"reason": request.reason} if request.reason else {}
            run(model, actor=principal.name, **kwargs)
            return self._traffic(model)

        return self._serve(context, method, Permission.TRAFFIC, body)

    async def PromoteCanary(self, request: Any, context: Any) -> Any:
        return await self._command(context, request, "PromoteCanary", self.plane.canary.promote)

    async def AbortCanary(self, request: Any, context: Any) -> Any:
        return await self._command(context, request, "AbortCanary", self.plane.canary.abort)

    async def PauseCanary(self, request: Any, context: Any) -> Any:
        return await self._command(context, request, "PauseCanary", self.plane.canary.pause)

    async def ResumeCanary(self, request: Any, context: Any) -> Any:
        def resume(model: str, *, actor: str, reason: str = "") -> Any:
            return self.plane.canary.resume(model, actor=actor)

        return await self._command(context, request, "ResumeCanary", resume)

    # ------------------------------------------------------------------ audit
    async def AuditVerify(self, request: Any, context: Any) -> Any:
        from lockgate.control.audit import AuditAnchor

        def body(principal: Principal) -> Any:
            anchor = AuditAnchor(int(request.anchor_seq), request.anchor_hash) if request.anchor_seq else None
            result = self.plane.audit.verify(anchor)
            return pb.AuditVerifyResponse(
                ok=result.ok, checked=result.checked, first_bad_seq=result.first_bad_seq or 0,
                reason=result.reason, head_seq=result.head_seq, head_hash=result.head_hash,
            )

        return await self._serve(context, "AuditVerify", Permission.READ, body)

    async def AuditLog(self, request: Any, context: Any) -> Any:
        def body(principal: Principal) -> Any:
            since = None
            if request.since:
                try:
                    since = parse_time(request.since)
                except ValueError as exc:
                    raise InvalidArgument(str(exc)) from None
            entries = self.plane.audit.log(model=request.model or None, since=since, limit=request.limit or None)
            return pb.AuditLogResponse(entries=[_entry(e.to_dict()) for e in entries])

        return await self._serve(context, "AuditLog", Permission.READ, body)

    async def AuditExport(self, request: Any, context: Any) -> Any:
        def body(principal: Principal) -> Any:
            bundle = evidence_bundle(self.plane.audit, _required(request.model, "model"))
            return pb.AuditExportResponse(bundle_json=render(bundle))

        return await self._serve(context, "AuditExport", Permission.READ, body)


def _provenance(provenance: Provenance | None) -> Any:
    if provenance is None:
        return pb.Provenance(summary="not verified yet")
    return pb.Provenance(
        signed=provenance.signed, signer=provenance.signer, vendor=provenance.vendor, identity=provenance.identity,
        manifest_digest=provenance.manifest_digest, files=list(provenance.files), verified_at=provenance.verified_at,
        summary=provenance.summary,
    )


def _signer(signer: TrustedSigner) -> Any:
    return pb.TrustedSigner(
        name=signer.name, vendor=signer.vendor, kind=signer.kind, identity=signer.identity, origin=signer.origin,
        public_key_pem=signer.public_key_pem, certificate_chain_pem=list(signer.certificate_chain_pem),
        sigstore_identity=signer.sigstore_identity, sigstore_issuer=signer.sigstore_issuer,
        added_by=signer.added_by, added_at=signer.added_at,
    )


def _entry(entry: Mapping[str, Any]) -> Any:
    return pb.AuditEntry(
        seq=entry["seq"], time=entry["time"], actor=entry["actor"], action=entry["action"],
        subject=entry["subject"], details_json=_dumps(entry["details"]), prev_hash=entry["prev_hash"],
        hash=entry["hash"],
    )


def policy_from_status(status: Any) -> TrafficPolicy | None:
    """The live ``TrafficPolicy`` carried in a ``TrafficStatus`` (for clients and tests)."""
    return TrafficPolicy.from_json(status.policy_json) if status.policy_json else None


def add_admin_service(server: grpc.aio.Server, service: AdminService) -> str:
    """Register the admin servicer on ``server``; returns its full name for reflection."""
    pb_grpc.add_AdminServiceServicer_to_server(service, server)
    return SERVICE_NAME


__all__ = ["AdminService", "DirectCall", "METHODS", "SERVICE_NAME", "add_admin_service", "policy_from_status", "status_of"]
