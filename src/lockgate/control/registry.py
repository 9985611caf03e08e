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
racing on one version cannot both win, and every change is committed in one transaction
with its audit entry (``AuditTrail.record``): nothing happens that is not audited.

The audit trail is the authority on a version's approval-relevant state
(``attestation``): a version whose registry row disagrees with its authenticated history
takes no traffic, cannot be approved or loaded, and the disagreement is audited once.

Four eyes: the approver must differ from every human who acted on the version (registered
it, validated it, or wrote its card); ``system:*`` actors never count as humans, so a
version found on disk needs two people.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import asdict
from enum import StrEnum
from pathlib import Path
from typing import Any

from lockgate.control.actor import SYSTEM_ACTOR
from lockgate.control.attestation import (
    Attestation,
    attest,
    disagreements,
    document_digest,
    is_system_actor,
    latest_card,
)
from lockgate.control.audit import Action, AuditTrail, Entry, model_subject
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
from lockgate.control.store import (
    AddRecord,
    CreateVersion,
    RecordKind,
    Store,
    StoredRecord,
    UpdateVersion,
    VersionRecord,
    utc_now_iso,
)
from lockgate.control.validation import (
    Arrays,
    CheckResult,
    Signature,
    Tolerance,
    ValidationReport,
    drift_required,
    profile_problem,
    run_checks,
    sha256_file,
)

log = logging.getLogger("lockgate.control")


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
    State.SERVING: frozenset({State.CANARY, State.APPROVED, State.RETIRED}),  # canary: a weighted version becomes the canary
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
    """Lifecycle operations over a ``Store``, each committed with its audit entry.

    ``repository`` is the model repository root (``REPO/<model>/<version>/model.onnx``);
    it is only needed when ``register`` is called without an explicit path. ``provenance``
    verifies the version directory's ``model.sig`` at register, validate and approve (the
    default gate: no signature required, any present signature must verify).
    """

    def __init__(
        self,
        store: Store,
        audit: AuditTrail,
        *,
        repository: str | Path | None = None,
        provenance: ProvenanceGate | None = None,
    ) -> None:
        self.store = store
        self.audit = audit
        self.repository = Path(repository) if repository is not None else None
        self.provenance = provenance or ProvenanceGate(store, self.audit)
        self._reported: set[tuple[str, str, tuple[str, ...]]] = set()  # disagreements already audited

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
        problems = self.integrity_problems(record)

        def bodies(kind: RecordKind) -> list[dict[str, Any]]:
            return [
                {"id": r.id, "actor": r.actor, "time": r.time, **r.body}
                for r in self.store.list_records(kind=kind, model=model, version=version)
            ]

        return {
            **asdict(record),
            "can_serve": self._serve_denial(record, problems) is None,
            "can_shadow": not problems and State(record.state) in SHADOWABLE_STATES,
            "audit_disagreements": problems,
            "validation_reports": bodies(RecordKind.VALIDATION),
            "approvals": bodies(RecordKind.APPROVAL),
            "cards": bodies(RecordKind.CARD),
        }

    def latest_report(self, model: str, version: str) -> ValidationReport | None:
        records = self.store.list_records(RecordKind.VALIDATION, model, version)
        return ValidationReport.model_validate(records[-1].body) if records else None

    def latest_card(self, model: str, version: str) -> ModelCard | None:
        card = latest_card(self.store, model, version)
        return ModelCard.model_validate(card.body) if card is not None else None

    # -- the audit trail's word ------------------------------------------------
    def attestation(self, model: str, version: str) -> tuple[Attestation, list[str]]:
        """The version's attested state, and the entries that failed to authenticate."""
        entries, problems = self.audit.authentic(model_subject(model, version))
        return attest(model, version, entries), problems

    def integrity_problems(self, record: VersionRecord) -> list[str]:
        """Every way the registry row disagrees with the authenticated audit trail ([] if none)."""
        attestation, problems = self.attestation(record.model, record.version)
        return problems + disagreements(record, latest_card(self.store, record.model, record.version), attestation)

    def _report(self, record: VersionRecord, problems: list[str]) -> None:
        """Audit (once per distinct finding per process) and log a registry/trail disagreement."""
        key = (record.model, record.version, tuple(problems))
        if key in self._reported:
            return
        self._reported.add(key)
        log.error("model %s version %s takes no traffic: the registry disagrees with the audit trail: %s",
                  record.model, record.version, "; ".join(problems))
        try:
            self.audit.append(SYSTEM_ACTOR, Action.REGISTRY_MISMATCH, model_subject(record.model, record.version),
                              {"problems": problems, "row": asdict(record)})
        except Exception:  # the refusal stands whether or not it could be recorded
            log.exception("registry mismatch of %s/%s could not be audited", record.model, record.version)

    @staticmethod
    def _serve_denial(record: VersionRecord, problems: list[str] | None = None) -> str | None:
        if problems:
            return (f"model {record.model!r} version {record.version!r} takes no traffic: the registry disagrees "
                    f"with the audit trail ({problems[0]})")
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
        return self._serve_denial(record, self.integrity_problems(record))

    def can_serve(self, model: str, version: str) -> bool:
        """Approved, serving or canary (or approved while shadowing), and attested."""
        return self.serve_denial_reason(model, version) is None

    def can_shadow(self, model: str, version: str) -> bool:
        """Validated or better, not retired, and attested."""
        record = self.store.get_version(model, version)
        return (record is not None and State(record.state) in SHADOWABLE_STATES
                and not self.integrity_problems(record))

    def gates(self, model: str) -> tuple[frozenset[str], frozenset[str], dict[str, str]]:
        """(servable, shadowable, state by version): the router's cached view.

        A version whose row disagrees with its attested history is in neither set, and
        the disagreement is audited.
        """
        servable: set[str] = set()
        shadowable: set[str] = set()
        states: dict[str, str] = {}
        for record in self.store.list_versions(model):
            states[record.version] = str(record.state)
            problems = self.integrity_problems(record)
            if problems:
                self._report(record, problems)
                continue
            if self._serve_denial(record) is None:
                servable.add(record.version)
            if State(record.state) in SHADOWABLE_STATES:
                shadowable.add(record.version)
        return frozenset(servable), frozenset(shadowable), states

    def servable_versions(self, model: str) -> frozenset[str]:
        """Versions that may take live traffic (attested and approved or better)."""
        return self.gates(model)[0]

    def shadowable_versions(self, model: str) -> frozenset[str]:
        return self.gates(model)[1]

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
        self.audit.record(
            [CreateVersion(record)],
            [Entry(actor, Action.MODEL_REGISTER, model_subject(model, version),
                   {"artifact_path": record.artifact_path, "sha256": digest, "metadata": record.metadata,
                    "to": State.REGISTERED.value})],
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
        body = report.model_dump(mode="json")
        new_state = State.VALIDATED if report.passed else State.REGISTERED
        writes: list[Any] = [AddRecord(RecordKind.VALIDATION, model, version, actor, body)]
        if report.passed:
            writes.append(UpdateVersion(
                model, version, new_state.value, expected_state=State.REGISTERED.value,
                metadata={"provenance": provenance.to_dict()} if provenance is not None else None))
        self.audit.record(writes, [Entry(actor, Action.MODEL_VALIDATE, model_subject(model, version), lambda r: {
            "passed": report.passed,
            "failed_checks": report.failed_checks(),
            "report_id": r[0].id,
            "report_sha256": document_digest(body),
            "sha256": record.sha256,
            "latency_ms": latency,
            "from": record.state,
            "to": new_state.value,
        })])
        return report

    # -- card and approval ----------------------------------------------------
    def set_card(self, model: str, version: str, card: ModelCard | Mapping[str, Any], actor: str) -> StoredRecord:
        """Store (a new revision of) the version's model card; it must be complete."""
        record = self.get(model, version)
        if record.state == State.RETIRED:
            raise LifecycleError(f"model {model!r} version {version!r} is retired")
        filled = self.provenance.fill_card(parse_card(card), Provenance.from_dict(record.metadata.get("provenance")))
        write, entry = self._card_step(model, version, filled, actor)
        stored: StoredRecord = self.audit.record([write], [entry]).results[0]
        return stored

    @staticmethod
    def _card_step(model: str, version: str, card: ModelCard, actor: str, index: int = 0) -> tuple[AddRecord, Entry]:
        """The write and audit entry of one card (``index``: the write's place in its unit)."""
        body = card.model_dump(mode="json")
        return AddRecord(RecordKind.CARD, model, version, actor, body), Entry(
            actor, Action.MODEL_CARD, model_subject(model, version),
            lambda r: {"card_id": r[index].id, "card_sha256": document_digest(body), "owner": card.owner,
                       "signer": card.signer, "manifest_digest": card.manifest_digest, "license": card.license})

    def _decision(self, model: str, version: str, person: str, reason: str, kind: str) -> tuple[VersionRecord, State]:
        """The rules an approval and a rejection share: the version awaits approval (validated,
        or shadowing unapproved), its registry row agrees with the audit trail, the person did
        not act on it (four eyes), and a reason is given."""
        record = self.get(model, version)
        state = State(record.state)
        if not (state is State.VALIDATED or (state is State.SHADOW and not _is_approved(record))):
            raise LifecycleError(
                f"model {model!r} version {version!r} is {state.value}; only validated versions can be "
                + ("approved" if kind == "approval" else "rejected")
            )
        if not reason or not reason.strip():
            raise ApprovalError(f"an {kind} needs a non-empty reason" if kind == "approval" else f"a {kind} needs a non-empty reason")
        attestation, problems = self.attestation(model, version)
        problems += disagreements(record, latest_card(self.store, model, version), attestation)
        if problems:
            self._report(record, problems)
            raise ApprovalError(f"model {model!r} version {version!r} cannot be "
                                f"{'approved' if kind == 'approval' else 'rejected'}: the registry disagrees "
                                f"with the audit trail ({problems[0]})")
        refusal = self.four_eyes_problem(attestation, person, kind)
        if refusal is not None:
            raise ApprovalError(refusal)
        return record, state

    def four_eyes_problem(self, attestation: Attestation, person: str, kind: str = "approval") -> str | None:
        """Why ``person`` may not approve (or reject) this version under the four-eyes rule, or None."""
        subject = f"model {attestation.model!r} version {attestation.version!r}"
        verb = "approve" if kind == "approval" else "reject"
        if is_system_actor(person):
            return f"four-eyes rule: {person!r} is lockgate itself; a person must {verb} {subject}"
        humans = attestation.humans()
        acts = humans.get(person)
        if acts:
            others = ", ".join(f"{name} {' and '.join(what)}" for name, what in humans.items()) or "nobody"
            return (f"four-eyes rule: the {'approver' if kind == 'approval' else 'rejecter'} must differ from every "
                    f"person who acted on {subject} (registered it, validated it or wrote its card); "
                    f"{person!r} {' and '.join(acts)} (actors: {others})")
        return None

    def approve(
        self,
        model: str,
        version: str,
        approver: str,
        reason: str,
        card: ModelCard | Mapping[str, Any] | None = None,
    ) -> StoredRecord:
        """Approve a validated version for live traffic; returns the approval record.

        Refused (``ApprovalError``) when the approver acted on the version (four eyes), the
        reason is blank, the approver brings the card (writing the card is acting on it),
        no complete card is stored, the model's config enables drift but the version has no
        reference profile, the provenance policy is not met (signature, trusted signer,
        licence, vendor assessment), or the registry disagrees with the audit trail;
        ``LifecycleError`` when the version is not validated.
        """
        if card is not None:
            raise ApprovalError(
                f"four-eyes rule: the approver may not supply the model card of model {model!r} version {version!r} "
                "(writing the card is acting on the version); have someone else attach it with `lockgate models card`"
            )
        record, state = self._decision(model, version, approver, reason, "approval")
        stored_card = latest_card(self.store, model, version)
        if stored_card is None:
            raise ApprovalError(f"model {model!r} version {version!r} has no model card; someone other than the "
                                "approver must attach one (`lockgate models card`)")
        model_dir = Path(record.artifact_path).parent.parent
        if drift_required(model_dir):
            missing = profile_problem(record.artifact_path)
            if missing is not None:
                raise ApprovalError(f"model {model!r} version {version!r} cannot be approved: {missing}, and the "
                                    "model's governance config enables drift (build one with `lockgate profile build`)")
        # Its signer fields were lockgate's: they are refreshed from this verification.
        parsed = ModelCard.model_validate(stored_card.body).model_copy(update={"signer": "", "manifest_digest": ""})
        try:
            provenance, filled, policy_problems = self.provenance.check_approval(
                model, version, Path(record.artifact_path).parent, parsed, actor=approver)
        except (ArtifactSignatureError, InvalidArgument) as exc:
            raise ApprovalError(f"cannot approve: {exc.message}") from exc
        if policy_problems:
            raise ApprovalError(f"cannot approve model {model!r} version {version!r}: " + "; ".join(policy_problems))
        self.verify_artifact(model, version, actor=approver,
                             actual_sha256=provenance.artifact_digest(Path(record.artifact_path)))
        target = State.APPROVED if state is State.VALIDATED else State.SHADOW
        now = utc_now_iso()
        reports = [r for r in self.store.list_records(RecordKind.VALIDATION, model, version) if r.body.get("passed")]
        writes: list[Any] = [UpdateVersion(model, version, target.value, expected_state=state.value,
                                           metadata={"approved_by": approver, "approved_at": now,
                                                     "provenance": provenance.to_dict()})]
        entries: list[Entry] = []
        # The card approved is the one stating what was verified now (lockgate fills its signer
        # fields): when they changed, the refreshed card is stored with the approval.
        refreshed = stored_card.body != filled.model_dump(mode="json")
        if refreshed:
            write, entry = self._card_step(model, version, filled, approver, index=1)
            writes.append(write)
            entries.append(entry)
        card_digest = document_digest(filled.model_dump(mode="json") if refreshed else stored_card.body)

        def card_id(results: Any) -> int:
            return int(results[1].id) if refreshed else stored_card.id

        body_of = {
            "approver": approver,
            "reason": reason.strip(),
            "card_sha256": card_digest,
            "sha256": record.sha256,
            "validation_id": reports[-1].id if reports else None,
            "registered_by": record.registered_by,
            "provenance": provenance.to_dict(),
        }
        approval_index = len(writes)
        writes.append(AddRecord(RecordKind.APPROVAL, model, version, approver, body_of))
        entries.append(Entry(approver, Action.MODEL_APPROVE, model_subject(model, version), lambda r: {
            "reason": reason.strip(), "approval_id": r[approval_index].id, "card_id": card_id(r),
            "card_sha256": card_digest, "sha256": record.sha256, "from": state.value, "to": target.value,
            "provenance": provenance.summary,
        }))
        applied = self.audit.record(writes, entries)
        approval: StoredRecord = applied.results[approval_index]
        return approval

    def reject(self, model: str, version: str, rejecter: str, reason: str) -> VersionRecord:
        """Refuse a version awaiting approval: it is retired, so it can never be approved.

        The same hands and rules as ``approve``: four eyes, a reason, only a validated
        (pending) version.
        """
        record, state = self._decision(model, version, rejecter, reason, "rejection")
        applied = self.audit.record(
            [UpdateVersion(model, version, State.RETIRED.value, expected_state=state.value,
                           metadata={"rejected_by": rejecter, "rejected_at": utc_now_iso()})],
            [Entry(rejecter, Action.MODEL_REJECT, model_subject(model, version),
                   {"reason": reason.strip(), "sha256": record.sha256, "from": state.value, "to": State.RETIRED.value})],
        )
        updated: VersionRecord = applied.results[0]
        return updated

    # -- traffic states and retirement ------------------------------------------
    def plan_transition(self, record: VersionRecord, target: State | str) -> State | None:
        """The state a traffic change moves ``record`` to (None: already there).

        Raises ``LifecycleError`` for a move the lifecycle does not allow.
        """
        model, version = record.model, record.version
        to = State(target)
        current = State(record.state)
        if to not in _TRAFFIC_TARGETS or (to is State.VALIDATED and current is not State.SHADOW):
            raise LifecycleError(
                f"cannot move model {model!r} version {version!r} to {to.value} with a traffic change; "
                + {State.VALIDATED: "use validate()", State.RETIRED: "use retire()"}.get(to, "not a traffic state")
            )
        if to is current:
            return None
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
        return to

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
        record = self.get(model, version)
        to = self.plan_transition(record, target)
        if to is None:
            return record
        write, entry = self.transition_step(record, to, actor, reason=reason, details=details)
        updated: VersionRecord = self.audit.record([write], [entry]).results[0]
        return updated

    @staticmethod
    def transition_step(
        record: VersionRecord, to: State, actor: str, *, reason: str = "", details: Mapping[str, Any] | None = None
    ) -> tuple[UpdateVersion, Entry]:
        """The write and audit entry of one planned move (to commit with other writes)."""
        write = UpdateVersion(record.model, record.version, to.value, expected_state=record.state)
        entry = Entry(actor, Action.MODEL_TRANSITION, model_subject(record.model, record.version),
                      {"from": record.state, "to": to.value, "reason": reason, **dict(details or {})})
        return write, entry

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
        applied = self.audit.record(
            [UpdateVersion(model, version, State.RETIRED.value, expected_state=current.value)],
            [Entry(actor, Action.MODEL_RETIRE, model_subject(model, version),
                   {"from": current.value, "to": State.RETIRED.value, "reason": reason, "forced": force})],
        )
        updated: VersionRecord = applied.results[0]
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
        """Re-hash the artifact (call at every load) against the registry *and* the audited
        registration; any mismatch is audited and refused.

        ``actual_sha256``: the digest the caller just took of ``path`` (the load's, or the
        verified manifest's), so the artifact is not hashed a second time.
        """
        record = self.get(model, version)
        attestation, problems = self.attestation(model, version)
        target = Path(path) if path is not None else Path(record.artifact_path)
        expected = attestation.sha256 if attestation.registered else record.sha256
        issues = list(problems)
        if not attestation.registered:
            issues.append("its registration is not in the audit trail")
        elif attestation.sha256 != record.sha256:
            issues.append(f"the registry's digest {record.sha256[:16]}… was changed from the audited "
                          f"{str(attestation.sha256)[:16]}…")
        try:
            actual: str | None = actual_sha256 if actual_sha256 is not None else sha256_file(target)
            if actual != expected or actual != record.sha256:
                issues.insert(0, "sha256 mismatch")
        except OSError as exc:
            actual = None
            issues.insert(0, f"unreadable: {exc.strerror or exc}")
        if not issues:
            return
        problem = "; ".join(issues)
        self.audit.append(
            actor,
            Action.ARTIFACT_TAMPERED,
            model_subject(model, version),
            {"path": str(target), "expected_sha256": expected, "registry_sha256": record.sha256,
             "actual_sha256": actual, "problem": problem},
        )
        raise ArtifactTamperedError(
            f"refusing to load model {model!r} version {version!r}: artifact {target} {problem} "
            f"(audited sha256 {str(expected)[:16]}…, found {actual[:16] + '…' if actual else 'none'})"
        )
