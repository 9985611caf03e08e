"""Model registry: lifecycle, validation and approval gates, artifact integrity.

Lifecycle (every edge is listed in ``LIFECYCLE``; anything else raises
``LifecycleError``)::

    registered -> validated -> approved -> serving | canary | shadow -> retired

* ``validate`` is the only way into *validated* (the automatic report must pass);
* ``approve`` is the only way into *approved* (four eyes, reason, complete card);
* ``transition`` moves between the traffic states;
* ``retire`` ends a version (refused while it takes live traffic unless forced).

A validated version may take shadow traffic; approving it while in shadow
keeps it in shadow and marks it approved (``metadata["approved_by"]``), so it
may then move to serving/canary directly.

Every state change is a compare-and-set on the stored state, so two admins
racing on one version cannot both win, and every change is audited.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import asdict
from enum import StrEnum
from pathlib import Path
from typing import Any

from lockgate.control.audit import Action, AuditTrail, model_subject
from lockgate.control.card import ModelCard, parse_card
from lockgate.control.provenance import Provenance, ProvenanceGate
from lockgate.errors import (
    ApprovalError,
    ArtifactSignatureError,
    ArtifactTamperedError,
    InvalidArgument,
    LifecycleError,
    NotFound,
)
from lockgate.control.store import RecordKind, Store, StoredRecord, VersionRecord, utc_now_iso
from lockgate.control.validation import (
    Arrays,
    CheckResult,
    Signature,
    Tolerance,
    ValidationReport,
    run_checks,
    sha256_file,
)

ARTIFACT_FILENAME = "model.onnx"
_MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_VERSION_ID = re.compile(r"^[1-9][0-9]{0,17}$")


class State(StrEnum):
    REGISTERED = "registered"
    VALIDATED = "validated"
    APPROVED = "approved"
    SERVING = "serving"
    CANARY = "canary"
    SHADOW = "shadow"
    RETIRED = "retired"


LIFECYCLE: Mapping[State, frozenset[State]] = {
    State.REGISTERED: frozenset({State.VALIDATED, State.RETIRED}),
    State.VALIDATED: frozenset({State.APPROVED, State.SHADOW, State.RETIRED}),
    State.APPROVED: frozenset({State.SERVING, State.CANARY, State.SHADOW, State.RETIRED}),
    State.SERVING: frozenset({State.APPROVED, State.RETIRED}),
    State.CANARY: frozenset({State.SERVING, State.APPROVED, State.RETIRED}),
    State.SHADOW: frozenset({State.VALIDATED, State.APPROVED, State.SERVING, State.CANARY, State.RETIRED}),
    State.RETIRED: frozenset(),
}
LIVE_STATES = frozenset({State.SERVING, State.CANARY})
SERVABLE_STATES = frozenset({State.APPROVED, State.SERVING, State.CANARY})
SHADOWABLE_STATES = frozenset({State.VALIDATED, State.APPROVED, State.SERVING, State.CANARY, State.SHADOW})
# Targets ``transition`` may reach; validated/approved/retired have their own methods.
_TRAFFIC_TARGETS = frozenset({State.SERVING, State.CANARY, State.SHADOW, State.APPROVED, State.VALIDATED})


def check_names(model: str, version: str) -> None:
    """Model names are path-safe identifiers; versions are positive integers as strings."""
    if not _MODEL_NAME.match(model):
        raise InvalidArgument(
            f"invalid model name {model!r}: use letters, digits, '_', '.', '-' (max 128)"
        )
    if not _VERSION_ID.match(version):
        raise InvalidArgument(f"invalid version {version!r}: must be a positive integer such as '1'")


def _is_approved(record: VersionRecord) -> bool:
    return bool(record.metadata.get("approved_by"))


class Registry:
    """Lifecycle operations over a ``Store``, each audited through ``AuditTrail``.

    ``repository`` is the model repository root (``REPO/<model>/<version>/model.onnx``);
    it is only needed when ``register`` is called without an explicit path. ``provenance``
    verifies the version directory's ``model.sig`` at register, validate and approve (the
    default gate: no signature required, any present signature must verify).
    """

    def __init__(
        self,
        store: Store,
        audit: AuditTrail | None = None,
        *,
        repository: str | Path | None = None,
        provenance: ProvenanceGate | None = None,
    ) -> None:
        self.store = store
        self.audit = audit or AuditTrail(store)
        self.repository = Path(repository) if repository is not None else None
        self.provenance = provenance or ProvenanceGate(store, self.audit)

    # -- queries ------------------------------------------------------------
    def get(self, model: str, version: str) -> VersionRecord:
        record = self.store.get_version(model, version)
        if record is None:
            raise NotFound(f"model {model!r} version {version!r} is not registered")
        return record

    def list_versions(self, model: str | None = None) -> list[VersionRecord]:
        """All versions (of one model), for ``models list``."""
        return self.store.list_versions(model)

    def show(self, model: str, version: str) -> dict[str, Any]:
        """Version row plus its reports, approvals and cards (for ``models show``)."""
        record = self.get(model, version)

        def bodies(kind: RecordKind) -> list[dict[str, Any]]:
            return [
                {"id": r.id, "actor": r.actor, "time": r.time, **r.body}
                for r in self.store.list_records(kind=kind, model=model, version=version)
            ]

        return {
            **asdict(record),
            "can_serve": self._serve_denial(record) is None,
            "can_shadow": State(record.state) in SHADOWABLE_STATES,
            "validation_reports": bodies(RecordKind.VALIDATION),
            "approvals": bodies(RecordKind.APPROVAL),
            "cards": bodies(RecordKind.CARD),
        }

    def latest_report(self, model: str, version: str) -> ValidationReport | None:
        records = self.store.list_records(RecordKind.VALIDATION, model, version)
        return ValidationReport.model_validate(records[-1].body) if records else None

    def latest_card(self, model: str, version: str) -> ModelCard | None:
        records = self.store.list_records(RecordKind.CARD, model, version)
        return ModelCard.model_validate(records[-1].body) if records else None

    @staticmethod
    def _serve_denial(record: VersionRecord) -> str | None:
        state = State(record.state)
        if state in SERVABLE_STATES or (state is State.SHADOW and _is_approved(record)):
            return None
        return (
            f"model {record.model!r} version {record.version!r} is {state.value}"
            + ("" if state is State.RETIRED else ", not approved")
            + "; only approved versions may take live traffic"
        )

    def serve_denial_reason(self, model: str, version: str) -> str | None:
        """None when the version may take live traffic, else the reason (for PERMISSION_DENIED)."""
        record = self.store.get_version(model, version)
        if record is None:
            return f"model {model!r} version {version!r} is not registered"
        return self._serve_denial(record)

    def can_serve(self, model: str, version: str) -> bool:
        """Approved, serving or canary (or approved while shadowing)."""
        return self.serve_denial_reason(model, version) is None

    def can_shadow(self, model: str, version: str) -> bool:
        """Validated or better and not retired."""
        record = self.store.get_version(model, version)
        return record is not None and State(record.state) in SHADOWABLE_STATES

    def gates(self, model: str) -> tuple[frozenset[str], frozenset[str], dict[str, str]]:
        """(servable, shadowable, state by version) from one read: the router's cached view."""
        records = self.store.list_versions(model)
        return (
            frozenset(r.version for r in records if self._serve_denial(r) is None),
            frozenset(r.version for r in records if State(r.state) in SHADOWABLE_STATES),
            {r.version: str(r.state) for r in records},
        )

    def servable_versions(self, model: str) -> frozenset[str]:
        """Versions that may take live traffic: for the router's snapshot (refresh on VERSION changes)."""
        return frozenset(r.version for r in self.store.list_versions(model) if self._serve_denial(r) is None)

    def shadowable_versions(self, model: str) -> frozenset[str]:
        return frozenset(
            r.version for r in self.store.list_versions(model) if State(r.state) in SHADOWABLE_STATES
        )

    # -- register -----------------------------------------------------------
    def artifact_path(self, model: str, version: str) -> Path:
        if self.repository is None:
            raise InvalidArgument("no artifact path given and no model repository configured")
        return self.repository / model / version / ARTIFACT_FILENAME

    def register(
        self,
        model: str,
        version: str,
        artifact_path: str | Path | None,
        actor: str,
        *,
        metadata: Mapping[str, Any] | None = None,
    ) -> VersionRecord:
        """Record a new version and the SHA-256 of its artifact as it is now."""
        check_names(model, version)
        path = Path(artifact_path) if artifact_path is not None else self.artifact_path(model, version)
        if not path.is_file():
            raise NotFound(f"artifact {path} does not exist")
        provenance = self.provenance.verify(model, version, path.parent, stage="register", actor=actor)
        digest = provenance.artifact_digest(path)
        now = utc_now_iso()
        record = VersionRecord(
            model=model,
            version=version,
            state=State.REGISTERED.value,
            artifact_path=str(path.resolve()),
            sha256=digest,
            registered_by=actor,
            registered_at=now,
            updated_at=now,
            metadata={**dict(metadata or {}), "provenance": provenance.to_dict()},
        )
        self.store.create_version(record)
        self.audit.append(
            actor,
            Action.MODEL_REGISTER,
            model_subject(model, version),
            {"artifact_path": record.artifact_path, "sha256": digest, "metadata": record.metadata},
        )
        return record

    def _provenance_check(self, record: VersionRecord, actor: str) -> tuple[CheckResult, Provenance | None]:
        """Verification of ``model.sig`` as one validation check (a refusal fails the report)."""
        try:
            provenance = self.provenance.verify(
                record.model, record.version, Path(record.artifact_path).parent, stage="validate", actor=actor,
                card=self.latest_card(record.model, record.version),
            )
        except ArtifactSignatureError as exc:
            return CheckResult(name="provenance", status="failed", detail=exc.message, data={"reason": exc.cause}), None
        if not provenance.signed:  # allowed unsigned by the policy (verify refuses it otherwise)
            return CheckResult(name="provenance", status="not_applicable", detail=f"unsigned (no model.sig); "
                               f"provenance.require_signature is {self.provenance.settings.require_signature!r}",
                               data=provenance.to_dict()), provenance
        return CheckResult(name="provenance", status="passed", detail=provenance.summary, data=provenance.to_dict()), provenance

    # -- validate -----------------------------------------------------------
    def validate(
        self,
        model: str,
        version: str,
        actor: str,
        *,
        expected_signature: Signature | Mapping[str, Any] | None = None,
        sample: Arrays | None = None,
        golden: tuple[Arrays, Arrays] | None = None,
        tolerance: Tolerance | None = None,
        latency_runs: int = 5,
        signature_source: str = "the expected signature",
    ) -> ValidationReport:
        """Run the automatic checks, store the report, and move to *validated* if it passed.

        A failed report is stored and audited too; the version stays *registered*.
        """
        record = self.get(model, version)
        if record.state != State.REGISTERED:
            raise LifecycleError(
                f"model {model!r} version {version!r} is {record.state}; only registered versions are validated"
            )
        started = utc_now_iso()
        provenance_check, provenance = self._provenance_check(record, actor)
        checks, signature, latency = run_checks(
            record.artifact_path,
            expected_sha256=record.sha256,
            expected_signature=expected_signature,
            sample=sample,
            golden=golden,
            tolerance=tolerance,
            latency_runs=latency_runs,
            signature_source=signature_source,
        )
        checks.insert(0, provenance_check)
        report = ValidationReport(
            model=model,
            version=version,
            validator=actor,
            passed=all(c.status != "failed" for c in checks),
            sha256=record.sha256,
            checks=checks,
            signature=signature,
            latency_ms=latency,
            started_at=started,
            finished_at=utc_now_iso(),
        )
        stored = self.store.add_record(RecordKind.VALIDATION, model, version, actor, report.model_dump(mode="json"))
        new_state = State.VALIDATED if report.passed else State.REGISTERED
        if report.passed:
            self.store.update_version(
                model, version, state=new_state.value, expected_state=State.REGISTERED.value,
                metadata={"validation_id": stored.id,
                          **({"provenance": provenance.to_dict()} if provenance is not None else {})},
            )
        self.audit.append(
            actor,
            Action.MODEL_VALIDATE,
            model_subject(model, version),
            {
                "passed": report.passed,
                "failed_checks": report.failed_checks(),
                "report_id": stored.id,
                "sha256": record.sha256,
                "latency_ms": latency,
                "from": record.state,
                "to": new_state.value,
            },
        )
        return report

    # -- card and approval ----------------------------------------------------
    def set_card(self, model: str, version: str, card: ModelCard | Mapping[str, Any], actor: str) -> StoredRecord:
        """Store (a new revision of) the version's model card; it must be complete."""
        record = self.get(model, version)
        if record.state == State.RETIRED:
            raise LifecycleError(f"model {model!r} version {version!r} is retired")
        filled = self.provenance.fill_card(parse_card(card), Provenance.from_dict(record.metadata.get("provenance")))
        return self._store_card(model, version, filled, actor)

    def _store_card(self, model: str, version: str, card: ModelCard, actor: str) -> StoredRecord:
        stored = self.store.add_record(RecordKind.CARD, model, version, actor, card.model_dump(mode="json"))
        self.audit.append(actor, Action.MODEL_CARD, model_subject(model, version),
                          {"card_id": stored.id, "owner": card.owner, "signer": card.signer,
                           "manifest_digest": card.manifest_digest, "license": card.license})
        return stored

    def _decision(self, model: str, version: str, person: str, reason: str, kind: str) -> tuple[VersionRecord, State]:
        """The rules an approval and a rejection share: the version awaits approval (validated,
        or shadowing unapproved), the person did not register it (four eyes), a reason is given."""
        record = self.get(model, version)
        state = State(record.state)
        if not (state is State.VALIDATED or (state is State.SHADOW and not _is_approved(record))):
            raise LifecycleError(
                f"model {model!r} version {version!r} is {state.value}; only validated versions can be "
                + ("approved" if kind == "approval" else "rejected")
            )
        if person.strip() == record.registered_by.strip():
            raise ApprovalError(
                f"four-eyes rule: {person!r} registered model {model!r} version {version!r} "
                + ("and cannot also approve it" if kind == "approval" else "and cannot also decide on its approval")
            )
        if not reason or not reason.strip():
            raise ApprovalError(f"an {kind} needs a non-empty reason" if kind == "approval" else f"a {kind} needs a non-empty reason")
        return record, state

    def approve(
        self,
        model: str,
        version: str,
        approver: str,
        reason: str,
        card: ModelCard | Mapping[str, Any] | None = None,
    ) -> StoredRecord:
        """Approve a validated version for live traffic; returns the approval record.

        Refused (``ApprovalError``) when the approver registered the version,
        the reason is blank, no complete model card is given or stored, or the
        provenance policy is not met (signature, trusted signer, licence, vendor
        assessment); ``LifecycleError`` when the version is not validated.
        """
        record, state = self._decision(model, version, approver, reason, "approval")
        stored_card: StoredRecord | None = None
        if card is not None:
            try:
                parsed = parse_card(card)
            except InvalidArgument as exc:
                raise ApprovalError(str(exc)) from exc
        else:
            cards = self.store.list_records(RecordKind.CARD, model, version)
            if not cards:
                raise ApprovalError(f"model {model!r} version {version!r} has no model card; provide one to approve")
            stored_card = cards[-1]
            # Its signer fields were lockgate's: they are refreshed from this verification.
            parsed = ModelCard.model_validate(stored_card.body).model_copy(update={"signer": "", "manifest_digest": ""})
        try:
            provenance, filled, problems = self.provenance.check_approval(
                model, version, Path(record.artifact_path).parent, parsed, actor=approver)
        except (ArtifactSignatureError, InvalidArgument) as exc:
            raise ApprovalError(f"cannot approve: {exc.message}") from exc
        if problems:
            raise ApprovalError(f"cannot approve model {model!r} version {version!r}: " + "; ".join(problems))
        self.verify_artifact(model, version, actor=approver,
                             actual_sha256=provenance.artifact_digest(Path(record.artifact_path)))
        # The card approved is the one stating what was verified now.
        if stored_card is not None and stored_card.body == filled.model_dump(mode="json"):
            card_record = stored_card
        else:
            card_record = self._store_card(model, version, filled, approver)
        target = State.APPROVED if state is State.VALIDATED else State.SHADOW
        now = utc_now_iso()
        self.store.update_version(
            model, version, state=target.value, expected_state=state.value,
            metadata={"approved_by": approver, "approved_at": now, "provenance": provenance.to_dict()},
        )
        approval = self.store.add_record(
            RecordKind.APPROVAL, model, version, approver,
            {
                "approver": approver,
                "reason": reason.strip(),
                "card_id": card_record.id,
                "sha256": record.sha256,
                "validation_id": record.metadata.get("validation_id"),
                "registered_by": record.registered_by,
                "provenance": provenance.to_dict(),
            },
        )
        self.audit.append(
            approver,
            Action.MODEL_APPROVE,
            model_subject(model, version),
            {"reason": reason.strip(), "approval_id": approval.id, "card_id": card_record.id,
             "sha256": record.sha256, "from": state.value, "to": target.value, "provenance": provenance.summary},
        )
        return approval

    def reject(self, model: str, version: str, rejecter: str, reason: str) -> VersionRecord:
        """Refuse a version awaiting approval: it is retired, so it can never be approved.

        The same hands and rules as ``approve``: the rejecter did not register it, and the
        reason is not blank; only a validated (pending) version can be rejected.
        """
        record, state = self._decision(model, version, rejecter, reason, "rejection")
        updated = self.store.update_version(model, version, state=State.RETIRED.value, expected_state=state.value,
                                            metadata={"rejected_by": rejecter, "rejected_at": utc_now_iso()})
        self.audit.append(
            rejecter, Action.MODEL_REJECT, model_subject(model, version),
            {"reason": reason.strip(), "sha256": record.sha256, "from": state.value, "to": State.RETIRED.value},
        )
        return updated

    # -- traffic states and retirement ------------------------------------------
    def transition(
        self,
        model: str,
        version: str,
        target: State | str,
        actor: str,
        *,
        reason: str = "",
        details: Mapping[str, Any] | None = None,
    ) -> VersionRecord:
        """Move between traffic states (serving, canary, shadow, back to approved/validated)."""
        to = State(target)
        record = self.get(model, version)
        current = State(record.state)
        if to not in _TRAFFIC_TARGETS or (to is State.VALIDATED and current is not State.SHADOW):
            raise LifecycleError(
                f"cannot move model {model!r} version {version!r} to {to.value} with a traffic change; "
                + {State.VALIDATED: "use validate()", State.RETIRED: "use retire()"}.get(to, "not a traffic state")
            )
        if to is State.APPROVED and current is State.VALIDATED:
            raise LifecycleError(f"model {model!r} version {version!r} is validated; approval requires approve()")
        if to not in LIFECYCLE[current]:
            allowed = ", ".join(sorted(s.value for s in LIFECYCLE[current])) or "none"
            raise LifecycleError(
                f"illegal transition {current.value} -> {to.value} for model {model!r} version {version!r} "
                f"(allowed: {allowed})"
            )
        if current is State.SHADOW:
            if to in SERVABLE_STATES and not _is_approved(record):
                raise LifecycleError(
                    f"model {model!r} version {version!r} is shadowing but not approved; it cannot go {to.value}"
                )
            if to is State.VALIDATED and _is_approved(record):
                to = State.APPROVED  # an approved version leaves shadow as approved
        updated = self.store.update_version(model, version, state=to.value, expected_state=current.value)
        self.audit.append(
            actor,
            Action.MODEL_TRANSITION,
            model_subject(model, version),
            {"from": current.value, "to": to.value, "reason": reason, **dict(details or {})},
        )
        return updated

    def retire(self, model: str, version: str, actor: str, *, reason: str = "", force: bool = False) -> VersionRecord:
        """End a version; refused while it serves or canaries unless ``force``."""
        record = self.get(model, version)
        current = State(record.state)
        if current is State.RETIRED:
            raise LifecycleError(f"model {model!r} version {version!r} is already retired")
        if current in LIVE_STATES and not force:
            raise LifecycleError(
                f"model {model!r} version {version!r} is {current.value}; move its traffic away first (or force)"
            )
        updated = self.store.update_version(model, version, state=State.RETIRED.value, expected_state=current.value)
        self.audit.append(
            actor, Action.MODEL_RETIRE, model_subject(model, version),
            {"from": current.value, "to": State.RETIRED.value, "reason": reason, "forced": force},
        )
        return updated

    # -- integrity ----------------------------------------------------------------
    def verify_artifact(
        self,
        model: str,
        version: str,
        path: str | Path | None = None,
        *,
        actor: str = "lockgate",
        actual_sha256: str | None = None,
    ) -> None:
        """Re-hash the artifact (call at every load); a mismatch is audited and refused.

        ``actual_sha256``: the digest the caller just took of ``path`` (the load's, or the
        verified manifest's), so the artifact is not hashed a second time.
        """
        record = self.get(model, version)
        target = Path(path) if path is not None else Path(record.artifact_path)
        try:
            actual: str | None = actual_sha256 if actual_sha256 is not None else sha256_file(target)
            problem = None if actual == record.sha256 else "sha256 mismatch"
        except OSError as exc:
            actual, problem = None, f"unreadable: {exc.strerror or exc}"
        if problem is None:
            return
        self.audit.append(
            actor,
            Action.ARTIFACT_TAMPERED,
            model_subject(model, version),
            {"path": str(target), "expected_sha256": record.sha256, "actual_sha256": actual, "problem": problem},
        )
        raise ArtifactTamperedError(
            f"refusing to load model {model!r} version {version!r}: artifact {target} {problem} "
            f"(registered sha256 {record.sha256[:16]}…, found {actual[:16] + '…' if actual else 'none'})"
        )
