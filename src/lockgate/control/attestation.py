"""A version's approval-relevant state, as its authenticated audit history tells it.

The registry's ``versions`` and ``records`` tables are what the server reads quickly, but
anyone who can write the database can edit them: ``UPDATE versions SET sha256 = ...``
would make a tampered artifact load, and ``SET state = 'approved'`` would skip the gate.
Every lifecycle step is also an audit entry (written in the same transaction, MAC'd with
the audit key), so the trail is the authority and the tables are a cache of it. This
module is the one place that derives, from a version's entries,

* the artifact digest registered, who registered it, its lifecycle state,
* who approved it (and which card, by digest),
* the humans who acted on it (the four-eyes rule reads this),

and compares a registry row with it. The registry's gates, the artifact check at load,
four eyes and ``audit verify`` all use it, so they cannot disagree about what was approved.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from lockgate.control.audit import Action, canonical_json
from lockgate.control.store import RecordKind, Store, StoredRecord, VersionRecord

MODEL_REGISTER = Action.MODEL_REGISTER.value
MODEL_VALIDATE = Action.MODEL_VALIDATE.value
MODEL_CARD = Action.MODEL_CARD.value
MODEL_APPROVE = Action.MODEL_APPROVE.value
MODEL_TRANSITION = Action.MODEL_TRANSITION.value
MODEL_RETIRE = Action.MODEL_RETIRE.value
MODEL_REJECT = Action.MODEL_REJECT.value
#: The actions whose entries make up a version's attested history.
ATTESTED_ACTIONS = frozenset({MODEL_REGISTER, MODEL_VALIDATE, MODEL_CARD, MODEL_APPROVE, MODEL_REJECT,
                              MODEL_TRANSITION, MODEL_RETIRE})

SYSTEM_PREFIX = "system:"


def is_system_actor(actor: str) -> bool:
    """Actors lockgate itself acts as (``system:lockgate``, ``system:canary``): never a human."""
    return actor.startswith(SYSTEM_PREFIX)


def document_digest(body: Mapping[str, Any]) -> str:
    """SHA-256 of a stored document (a model card) in the audit trail's canonical JSON."""
    return hashlib.sha256(canonical_json(dict(body)).encode("utf-8")).hexdigest()


@dataclass(frozen=True, slots=True)
class Attestation:
    """What the audit trail says about one version (None: the trail does not say)."""

    model: str
    version: str
    registered: bool = False
    sha256: str | None = None
    registered_by: str | None = None
    state: str | None = None
    approved_by: str | None = None
    card_id: int | None = None
    card_sha256: str | None = None
    #: (actor, what they did) for every register, validate and card entry, in order.
    acts: tuple[tuple[str, str], ...] = field(default=())

    def humans(self) -> dict[str, list[str]]:
        """Human actors and what each did (registered / validated / wrote the card)."""
        found: dict[str, list[str]] = {}
        for actor, act in self.acts:
            if not is_system_actor(actor):
                found.setdefault(actor, [])
                if act not in found[actor]:
                    found[actor].append(act)
        return found


def attest(model: str, version: str, entries: Iterable[Any]) -> Attestation:
    """Replay a version's authenticated entries (``AuditEntry``, oldest first)."""
    registered = False
    sha256 = registered_by = state = approved_by = card_sha256 = None
    card_id: int | None = None
    acts: list[tuple[str, str]] = []
    for entry in entries:
        action, details = entry.action, entry.details
        if action == MODEL_REGISTER:
            registered, sha256, registered_by, state = True, details.get("sha256"), entry.actor, "registered"
            acts.append((entry.actor, "registered it"))
        elif action == MODEL_VALIDATE:
            state = details.get("to", state)
            acts.append((entry.actor, "validated it"))
        elif action == MODEL_CARD:
            card_id, card_sha256 = details.get("card_id"), details.get("card_sha256")
            acts.append((entry.actor, "wrote its card"))
        elif action == MODEL_APPROVE:
            approved_by, state = entry.actor, details.get("to", state)
        elif action in (MODEL_TRANSITION, MODEL_RETIRE, MODEL_REJECT):
            state = details.get("to", "retired" if action != MODEL_TRANSITION else state)
    return Attestation(model, version, registered, sha256, registered_by, state, approved_by, card_id, card_sha256,
                       tuple(acts))


def disagreements(record: VersionRecord, card: StoredRecord | None, attestation: Attestation) -> list[str]:
    """How a registry row (and its latest card) differs from the attested history."""
    name = f"{record.model}/{record.version}"
    if not attestation.registered:
        return [f"{name} is in the registry but the audit trail has no registration of it"]
    problems: list[str] = []
    if record.sha256 != attestation.sha256:
        problems.append(f"{name}: the registry's artifact digest {record.sha256[:16]}… is not the audited "
                        f"registration's {str(attestation.sha256)[:16]}…")
    if record.registered_by != attestation.registered_by:
        problems.append(f"{name}: the registry says registered by {record.registered_by!r}, the audit trail "
                        f"{attestation.registered_by!r}")
    if record.state != attestation.state:
        problems.append(f"{name}: the registry's state {record.state!r} is not the audited state {attestation.state!r}")
    approved_by = record.metadata.get("approved_by") or None
    if approved_by != attestation.approved_by:
        problems.append(f"{name}: the registry's approver {approved_by!r} is not the audited approver "
                        f"{attestation.approved_by!r}")
    if attestation.card_id is not None or card is not None:
        if card is None:
            problems.append(f"{name}: the audited model card {attestation.card_id} is missing from the registry")
        elif card.id != attestation.card_id:
            problems.append(f"{name}: the registry's latest card is {card.id}, the audit trail's {attestation.card_id}")
        elif attestation.card_sha256 is not None and document_digest(card.body) != attestation.card_sha256:
            problems.append(f"{name}: model card {card.id} differs from the audited card digest (modified)")
    return problems


def latest_card(store: Store, model: str, version: str) -> StoredRecord | None:
    cards = store.list_records(RecordKind.CARD, model, version)
    return cards[-1] if cards else None


def registry_disagreements(store: Store, histories: Mapping[str, Sequence[Any]]) -> list[str]:
    """Every registry row checked against its attested history (``audit verify``)."""
    problems: list[str] = []
    seen: set[str] = set()
    for record in store.list_versions():
        subject = f"{record.model}/{record.version}"
        seen.add(subject)
        attestation = attest(record.model, record.version, histories.get(subject, ()))
        problems.extend(disagreements(record, latest_card(store, record.model, record.version), attestation))
    for subject, entries in sorted(histories.items()):
        if subject not in seen and any(e.action == MODEL_REGISTER for e in entries):
            problems.append(f"{subject} is registered in the audit trail but missing from the registry (deleted)")
    return problems
