"""Append-only, keyed, hash-chained audit trail.

Every entry is MAC'd: ``hash`` is HMAC-SHA256, under the audit key named by ``key_id``,
of the canonical JSON ``["lockgate.audit/2", key_id, seq, time, actor, action, subject,
details, prev_hash]``, and ``prev_hash`` is the previous entry's ``hash`` (``GENESIS_HASH``
for seq 1). Without the key (kept outside ``state_dir``, see ``audit_key``) nobody can
change, insert or re-chain an entry so that it still verifies; ``verify`` names the first
entry where the chain breaks.

Truncation leaves a valid shorter chain, so ``verify`` also checks the chain against the
signed checkpoints of its head (``checkpoint``) and fails when the chain ends before the
newest one, or differs from any of them.

Entries written before audit keys existed (``key_id`` empty, a plain SHA-256 chain:
``legacy_hash``) are accepted only as a prefix sealed by a keyed ``audit.sealed`` entry
that names their head; ``verify`` reports them every time as unauthenticated before the
seal. An unsealed legacy chain fails verification.

``verify`` finally checks the registry against the trail: every version's approval-relevant
state (artifact digest, state, approver, card digest) must be what its audited history says
(``attestation``), so a database edit of the registry alone shows up here too.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import date, datetime
from enum import Enum, StrEnum
from pathlib import PurePath
from typing import Any

from lockgate.control.audit_key import AuditKey, AuditKeyring
from lockgate.control.checkpoint import CheckpointLog, Checkpointer, CheckpointRead
from lockgate.control.store import (
    Applied,
    AuditBuilder,
    AuditDraft,
    AuditRow,
    JSONDict,
    RecordKind,
    Store,
    Write,
    parse_time,
    utc_now_iso,
)
from lockgate.errors import FailedPrecondition, NotFound

GENESIS_HASH = "0" * 64
ENTRY_FORMAT = "lockgate.audit/2"
REDACTED = "[REDACTED]"
_SECRET_MARKERS = ("token", "password", "passwd", "secret", "authorization", "api_key", "apikey", "credential", "private_key")


class Action(StrEnum):
    """Well-known audit actions (``append`` accepts any string)."""

    MODEL_REGISTER = "model.register"
    MODEL_VALIDATE = "model.validate"
    MODEL_CARD = "model.card"
    MODEL_APPROVE = "model.approve"
    MODEL_REJECT = "model.reject"
    MODEL_TRANSITION = "model.transition"
    MODEL_RETIRE = "model.retire"
    MODEL_LOAD = "model.load"
    MODEL_UNLOAD = "model.unload"
    ARTIFACT_TAMPERED = "artifact.tampered"
    # Emitted by lockgate.control.provenance.
    ARTIFACT_SIGNATURE_INVALID = "artifact.signature_invalid"
    TRUST_ADD = "trust.signer_added"
    TRUST_REMOVE = "trust.signer_removed"
    # Emitted by lockgate.routing (changes.py / rollout.py) and lockgate.governance.
    POLICY_SET = "traffic.set"
    SHADOW_SET = "traffic.shadow"
    SHADOW_CLEARED = "traffic.shadow_cleared"
    CANARY_START = "traffic.canary.started"
    CANARY_STEP = "traffic.canary.advanced"
    CANARY_PAUSE = "traffic.canary.paused"
    CANARY_RESUME = "traffic.canary.resumed"
    CANARY_PROMOTE = "traffic.canary.promoted"
    CANARY_ABORT = "traffic.canary.aborted"
    CANARY_ROLLBACK = "traffic.canary.rolled_back"
    DRIFT_ALERT = "governance.drift"
    # The trail's own events.
    AUDIT_SEALED = "audit.sealed"
    CHECKPOINTS_STARTED = "audit.checkpoints_started"
    SPOOL_REJECTED = "audit.spool_rejected"
    REGISTRY_MISMATCH = "registry.mismatch"


def is_rollback_action(action: str) -> bool:
    """Rollbacks and aborts, whoever named them (``traffic.canary.rolled_back``, ``*.rollback``)."""
    return action.endswith(("rolled_back", "rollback", "aborted", "abort"))


def is_drift_action(action: str) -> bool:
    """Drift alerts (``governance.drift``, ``drift.alert``, ...)."""
    return "drift" in action


def _json_default(value: Any) -> Any:
    """Make common non-JSON values (numpy scalars/arrays, paths, times) encodable."""
    if hasattr(value, "tolist"):  # numpy scalar or array
        return value.tolist()
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, (set, frozenset)):
        return sorted(value, key=str)
    if hasattr(value, "model_dump"):  # pydantic model
        return value.model_dump(mode="json")
    return str(value)


def _finite(value: Any) -> Any:
    """Replace NaN/Inf (not valid JSON) with strings so every store accepts them."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, Mapping):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def canonical_json(value: Any) -> str:
    """Deterministic JSON: sorted keys, compact separators, UTF-8 text."""
    plain = json.loads(json.dumps(value, default=_json_default))
    return json.dumps(_finite(plain), sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def _is_secret_key(key: str) -> bool:
    lowered = key.lower()
    return any(marker in lowered for marker in _SECRET_MARKERS)


def redact(value: Any) -> Any:
    """Replace values under secret-looking keys (token, password, secret, ...)."""
    if isinstance(value, Mapping):
        return {
            str(k): (REDACTED if _is_secret_key(str(k)) else redact(v)) for k, v in value.items()
        }
    if isinstance(value, (list, tuple)):
        return [redact(v) for v in value]
    return value


def legacy_hash(
    seq: int, time: str, actor: str, action: str, subject: str, details: str, prev_hash: str
) -> str:
    """SHA-256 (hex) of one entry as written before audit keys (``key_id`` empty)."""
    payload = json.dumps(
        [seq, time, actor, action, subject, details, prev_hash],
        separators=(",", ":"),
        ensure_ascii=False,
    )
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def _mac_payload(key_id: str, seq: int, time: str, actor: str, action: str, subject: str, details: str,
                 prev_hash: str) -> bytes:
    return json.dumps(
        [ENTRY_FORMAT, key_id, seq, time, actor, action, subject, details, prev_hash],
        separators=(",", ":"),
        ensure_ascii=False,
    ).encode("utf-8")


def entry_mac(key: AuditKey, seq: int, time: str, actor: str, action: str, subject: str, details: str,
              prev_hash: str) -> str:
    """The ``hash`` of a keyed entry: HMAC-SHA256 under ``key`` of its canonical fields."""
    return key.mac(_mac_payload(key.key_id, seq, time, actor, action, subject, details, prev_hash))


def signed_builder(key: AuditKey, actor: str, action: str, subject: str, details_text: str) -> AuditBuilder:
    """A builder that appends the entry after whatever the head is, MAC'd under ``key``."""

    def build(head: AuditRow | None) -> AuditRow:
        seq = head.seq + 1 if head is not None else 1
        prev_hash = head.hash if head is not None else GENESIS_HASH
        time = utc_now_iso()
        digest = entry_mac(key, seq, time, actor, action, subject, details_text, prev_hash)
        return AuditRow(seq, time, actor, action, subject, details_text, prev_hash, digest, key.key_id)

    return build


def authenticate(row: AuditRow, keyring: AuditKeyring | None) -> str | None:
    """None when ``row``'s own MAC (or, for a legacy row, SHA-256) checks out, else why not.

    Only the entry itself: its place in the chain is ``AuditTrail.verify``'s business.
    """
    if not row.key_id:
        if row.hash != legacy_hash(row.seq, row.time, row.actor, row.action, row.subject, row.details, row.prev_hash):
            return f"entry seq {row.seq}: hash mismatch (modified)"
        return None
    key = keyring.get(row.key_id) if keyring is not None else None
    if key is None:
        return (f"entry seq {row.seq}: written with audit key {row.key_id}, which is not configured "
                "(forged, or that key is missing from audit_key_file / audit_previous_key_files)")
    payload = _mac_payload(row.key_id, row.seq, row.time, row.actor, row.action, row.subject, row.details, row.prev_hash)
    if not key.check(payload, row.hash):
        return f"entry seq {row.seq}: MAC mismatch (modified or forged)"
    return None


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """One audit entry with ``details`` decoded."""

    seq: int
    time: str
    actor: str
    action: str
    subject: str
    details: JSONDict
    prev_hash: str
    hash: str
    key_id: str = ""

    @classmethod
    def from_row(cls, row: AuditRow) -> AuditEntry:
        try:
            details = json.loads(row.details)
        except ValueError:
            details = {"_undecodable": row.details}
        if not isinstance(details, dict):
            details = {"_value": details}
        return cls(row.seq, row.time, row.actor, row.action, row.subject, details, row.prev_hash, row.hash, row.key_id)

    def to_dict(self) -> JSONDict:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class VerifyResult:
    """Outcome of ``AuditTrail.verify``; ``first_bad_seq`` names the first bad entry.

    ``checkpoint_seq`` is the newest signed checkpoint the chain was checked against (None:
    none was used); ``unkeyed_entries`` counts sealed entries from before audit keys, which
    ``warnings`` describes; ``registry_problems`` lists registry rows that disagree with
    the trail (each one also fails the verification).
    """

    ok: bool
    checked: int
    first_bad_seq: int | None = None
    reason: str = ""
    head_seq: int = 0
    head_hash: str = GENESIS_HASH
    checkpoint_seq: int | None = None
    checkpoints_checked: int = 0
    unkeyed_entries: int = 0
    warnings: tuple[str, ...] = ()
    registry_problems: tuple[str, ...] = ()

    def to_dict(self) -> JSONDict:
        result = asdict(self)
        result["warnings"] = list(self.warnings)
        result["registry_problems"] = list(self.registry_problems)
        return result


@dataclass(frozen=True, slots=True)
class AuditAnchor:
    """A (seq, hash) pair recorded elsewhere, to detect truncation of the tail."""

    seq: int
    hash: str


def model_subject(model: str, version: str | None = None) -> str:
    """The subject convention that ``log(model=...)`` filters on: ``M`` or ``M/V``."""
    return model if version is None else f"{model}/{version}"


Details = Mapping[str, Any] | Callable[[Sequence[Any]], Mapping[str, Any]]


@dataclass(frozen=True, slots=True)
class Entry:
    """An audit entry to append with a unit of work; callable ``details`` receive the
    results of the unit's writes (e.g. the id of the record just inserted)."""

    actor: str
    action: str
    subject: str
    details: Details = field(default_factory=dict)


def _details_text(details: Mapping[str, Any] | None) -> str:
    return canonical_json(redact(dict(details or {})))


@dataclass(slots=True)
class AuditTrail:
    """Append to, read and verify the keyed chain kept in a ``Store``.

    ``keyring`` signs new entries and authenticates old ones; without it the trail can be
    read but not appended to or verified. ``checkpoints`` (optional) is told about every
    committed entry and checkpoints the head; ``checkpoint_log`` is what ``verify`` checks
    against by default.
    """

    store: Store
    keyring: AuditKeyring | None = None
    checkpoints: Checkpointer | None = None
    checkpoint_log: CheckpointLog | None = None
    batch_size: int = field(default=1000)

    @property
    def key(self) -> AuditKey:
        if self.keyring is None:
            raise FailedPrecondition(
                "no audit key configured: set audit_key_file (create one with `lockgate audit keygen --out FILE`, "
                "outside the state directory)"
            )
        return self.keyring.current

    # -- appending ------------------------------------------------------------------------
    def builder(self, actor: str, action: str, subject: str, details: Mapping[str, Any] | None = None) -> AuditBuilder:
        """The signed builder of one entry (for ``Store.append_audit``)."""
        return signed_builder(self.key, actor, str(action), subject, _details_text(details))

    def append(
        self,
        actor: str,
        action: str,
        subject: str,
        details: Mapping[str, Any] | None = None,
    ) -> AuditEntry:
        """Append one entry; secret-looking keys in ``details`` are redacted."""
        row = self.store.append_audit(self.builder(actor, action, subject, details))
        self._committed((row,))
        return AuditEntry.from_row(row)

    def record(self, writes: Sequence[Write], entries: Sequence[Entry]) -> Applied:
        """Commit ``writes`` and their audit ``entries`` in one transaction (``Store.apply``).

        This is how every governance change is made: it is durable and audited, or it did
        not happen; the caller makes it live only after this returns.
        """
        key = self.key

        def draft(entry: Entry) -> AuditDraft:
            def build(results: Sequence[Any], head: AuditRow | None) -> AuditRow:
                details = entry.details(results) if callable(entry.details) else entry.details
                return signed_builder(key, entry.actor, str(entry.action), entry.subject, _details_text(details))(head)

            return build

        applied = self.store.apply(writes, [draft(e) for e in entries])
        self._committed(applied.entries)
        return applied

    def _committed(self, rows: Sequence[AuditRow]) -> None:
        if self.checkpoints is not None:
            for row in rows:
                self.checkpoints.appended(row)

    # -- reading --------------------------------------------------------------------------
    def head(self) -> AuditEntry | None:
        row = self.store.audit_head()
        return AuditEntry.from_row(row) if row is not None else None

    def log(
        self,
        model: str | None = None,
        since: str | datetime | None = None,
        limit: int | None = None,
    ) -> list[AuditEntry]:
        """Entries in order, optionally for one model and/or from a time on."""
        rows = self.store.audit_entries(
            model=model, since=parse_time(since) if since is not None else None, limit=limit
        )
        return [AuditEntry.from_row(r) for r in rows]

    def authentic(self, subject: str) -> tuple[list[AuditEntry], list[str]]:
        """One subject's entries, each authenticated on its own, and the ones that fail.

        This is what the registry's gates read: an entry whose MAC fails never counts.
        (Whether entries were deleted around it is ``verify``'s to tell.)
        """
        entries: list[AuditEntry] = []
        problems: list[str] = []
        for row in self.store.audit_entries(subject=subject):
            problem = authenticate(row, self.keyring)
            if problem is None and not row.key_id and not self._legacy_allowed(row.seq):
                problem = f"entry seq {row.seq} is unkeyed and not covered by an audit.sealed entry"
            if problem is None:
                entries.append(AuditEntry.from_row(row))
            else:
                problems.append(problem)
        return entries, problems

    def _legacy_allowed(self, seq: int) -> bool:
        seal = self.legacy_seal()
        return seal is not None and seq <= int(seal.details.get("legacy_head_seq", 0))

    def legacy_seal(self) -> AuditEntry | None:
        """The keyed ``audit.sealed`` entry that pins the unkeyed prefix, if there is one."""
        first_keyed = self.store.audit_entries(limit=1, after_seq=self._legacy_prefix_length())
        if not first_keyed:
            return None
        row = first_keyed[0]
        if row.key_id and row.action == Action.AUDIT_SEALED and authenticate(row, self.keyring) is None:
            return AuditEntry.from_row(row)
        return None

    def _legacy_prefix_length(self) -> int:
        """How many entries from seq 1 on are unkeyed (0 for a chain born keyed)."""
        first = self.store.audit_entries(limit=1)
        if not first or first[0].key_id:
            return 0
        count = 0
        while True:
            rows = self.store.audit_entries(after_seq=count, limit=self.batch_size)
            for row in rows:
                if row.key_id:
                    return count
                count = row.seq
            if len(rows) < self.batch_size:
                return count

    def unsealed_legacy(self) -> int:
        """Unkeyed entries not pinned by a seal (the server refuses to start on these)."""
        prefix = self._legacy_prefix_length()
        return prefix if prefix and self.legacy_seal() is None else 0

    # -- sealing the entries from before audit keys ----------------------------------------
    def seal_legacy(self, actor: str, reason: str) -> AuditEntry:
        """Pin the unkeyed prefix under the key: verify it as a plain chain first."""
        prefix = self._legacy_prefix_length()
        if prefix == 0:
            raise FailedPrecondition("the audit trail has no unkeyed entries to seal")
        if self.legacy_seal() is not None:
            raise FailedPrecondition("the unkeyed entries are already sealed")
        head_seq, head_hash = 0, GENESIS_HASH
        after = 0
        while after < prefix:
            rows = self.store.audit_entries(after_seq=after, limit=self.batch_size)
            for row in rows:
                if row.seq > prefix:
                    break
                problem = _link_problem(head_seq, head_hash, row) or authenticate(row, None)
                if problem is not None:
                    raise FailedPrecondition(f"refusing to seal a broken chain: {problem}")
                head_seq, head_hash = row.seq, row.hash
            after = rows[-1].seq if rows else prefix
        return self.append(actor, Action.AUDIT_SEALED, "audit", {
            "legacy_entries": prefix, "legacy_head_seq": head_seq, "legacy_head_hash": head_hash,
            "reason": reason, "key_id": self.key.key_id,
        })

    # -- verification -----------------------------------------------------------------------
    def verify(
        self,
        anchor: AuditAnchor | None = None,
        *,
        checkpoints: CheckpointLog | None | bool = True,
        registry: bool = True,
    ) -> VerifyResult:
        """Walk the whole chain, then check it against the checkpoints and the registry.

        ``checkpoints``: True (default) uses ``checkpoint_log`` and fails when there is none
        (truncation could not be ruled out); a ``CheckpointLog`` uses that file; False or
        None checks the chain alone (only when asked).
        """
        if self.keyring is None:
            return VerifyResult(False, 0, None, "no audit key configured: the entries cannot be authenticated "
                                "(pass the audit key file)")
        cp_read: CheckpointRead | None = None
        if checkpoints is True:
            if self.checkpoint_log is None:
                return VerifyResult(False, 0, None, "no checkpoint file given: truncation of the trail cannot be "
                                    "ruled out (pass the checkpoint file, or explicitly skip the checkpoint check)")
            checkpoints = self.checkpoint_log
        if isinstance(checkpoints, CheckpointLog):
            cp_read = checkpoints.read(self.keyring)
            if cp_read.problems:
                return VerifyResult(False, 0, None, cp_read.problems[0])
            if not cp_read.exists or not cp_read.checkpoints:
                return VerifyResult(False, 0, None, f"no signed checkpoint in {cp_read.path}: truncation of the trail "
                                    "cannot be ruled out")
        expected: dict[int, list[Any]] = {}
        for cp in (cp_read.checkpoints if cp_read is not None else ()):
            expected.setdefault(cp.seq, []).append(cp)
        newest = cp_read.newest if cp_read is not None else None

        from lockgate.control.attestation import ATTESTED_ACTIONS, registry_disagreements

        checked = 0
        unkeyed = 0
        seal: AuditRow | None = None
        head_seq, head_hash = 0, GENESIS_HASH
        anchor_seen = anchor is None
        histories: dict[str, list[AuditEntry]] = {}
        after = 0

        def fail(seq: int, reason: str) -> VerifyResult:
            return VerifyResult(False, checked, seq, reason, head_seq, head_hash,
                                newest.seq if newest is not None else None, len(expected), unkeyed)

        for cp in expected.get(0, ()):  # an empty chain's checkpoint names the genesis hash
            if cp.hash != GENESIS_HASH:
                return fail(1, f"the signed checkpoint of {cp.time} names seq 0 with a hash other than genesis")
        while True:
            rows = self.store.audit_entries(after_seq=after, limit=self.batch_size)
            if not rows:
                break
            for row in rows:
                problem = _link_problem(head_seq, head_hash, row)
                if problem is not None:
                    return fail(head_seq + 1 if "missing" in problem else row.seq, problem)
                if not row.key_id:
                    if seal is not None or checked > unkeyed:
                        return fail(row.seq, f"entry seq {row.seq} is unkeyed after keyed entries (forged or inserted "
                                             "by someone without the audit key)")
                    unkeyed += 1
                problem = authenticate(row, self.keyring)
                if problem is not None:
                    return fail(row.seq, problem)
                if row.key_id and unkeyed and seal is None:
                    details = AuditEntry.from_row(row).details
                    if (row.action != Action.AUDIT_SEALED or details.get("legacy_head_seq") != head_seq
                            or details.get("legacy_head_hash") != head_hash):
                        return fail(row.seq, f"entries 1..{head_seq} were written before audit keys and were never "
                                             "sealed (run `lockgate audit seal` after checking them)")
                    seal = row
                for cp in expected.get(row.seq, ()):
                    if cp.hash != row.hash:
                        return fail(row.seq, f"entry seq {row.seq} differs from the signed checkpoint of {cp.time} "
                                             "(rewritten)")
                if anchor is not None and row.seq == anchor.seq:
                    if row.hash != anchor.hash:
                        return fail(row.seq, f"entry seq {row.seq}: hash differs from the recorded anchor (rewritten)")
                    anchor_seen = True
                if row.action in ATTESTED_ACTIONS and "/" in row.subject:
                    histories.setdefault(row.subject, []).append(AuditEntry.from_row(row))
                checked += 1
                head_seq, head_hash = row.seq, row.hash
            after = rows[-1].seq
        if unkeyed and seal is None:
            return fail(1, f"the trail holds {unkeyed} entries written before audit keys and no audit.sealed entry: "
                           "they are not authenticated (run `lockgate audit seal` after checking them)")
        if newest is not None and newest.seq > head_seq:
            return fail(head_seq + 1, f"the trail ends at seq {head_seq} but the signed checkpoint of {newest.time} "
                                      f"recorded seq {newest.seq} (truncated: entries {head_seq + 1}..{newest.seq} deleted)")
        if not anchor_seen and anchor is not None:
            return fail(head_seq + 1, f"seq {head_seq + 1} missing after {head_seq}: anchor seq {anchor.seq} "
                                      "is beyond the head (truncated)")
        warnings: list[str] = []
        if unkeyed and seal is not None:
            sealed = AuditEntry.from_row(seal)
            warnings.append(
                f"entries 1..{unkeyed} were written before audit keys (plain SHA-256): they are authenticated only "
                f"from their seal on (seq {seal.seq}, by {sealed.actor} at {sealed.time}); a database writer could have "
                "rewritten them before that")
        problems: tuple[str, ...] = ()
        if registry:
            problems = tuple(registry_disagreements(self.store, histories))
        result = VerifyResult(not problems, checked, None, "", head_seq, head_hash,
                              newest.seq if newest is not None else None, len(expected), unkeyed,
                              tuple(warnings), problems)
        if problems:
            return VerifyResult(False, checked, None, f"the registry disagrees with the audit trail: {problems[0]}",
                                head_seq, head_hash, result.checkpoint_seq, result.checkpoints_checked, unkeyed,
                                tuple(warnings), problems)
        return result

    def export(self, model: str) -> JSONDict:
        """Evidence bundle for one model: card, reports, approvals, traffic, rollbacks, drift."""
        versions = self.store.list_versions(model)
        policies = self.store.policy_history(model)
        entries = self.log(model=model)
        if not versions and not policies and not entries:
            raise NotFound(f"no registry, policy or audit data for model {model!r}")

        def records(kind: RecordKind) -> list[JSONDict]:
            return [
                {"id": r.id, "version": r.version, "actor": r.actor, "time": r.time, "body": r.body}
                for r in self.store.list_records(kind=kind, model=model)
            ]

        result = self.verify(checkpoints=self.checkpoint_log is not None and self.keyring is not None)
        return {
            "format": "lockgate.evidence/v1",
            "model": model,
            "generated_at": utc_now_iso(),
            "versions": [asdict(v) for v in versions],
            "cards": records(RecordKind.CARD),
            "validation_reports": records(RecordKind.VALIDATION),
            "approvals": records(RecordKind.APPROVAL),
            "traffic_history": [asdict(p) for p in policies],
            "rollbacks": [e.to_dict() for e in entries if is_rollback_action(e.action)],
            "drift_alerts": [e.to_dict() for e in entries if is_drift_action(e.action)],
            "audit_entries": [e.to_dict() for e in entries],
            "chain": result.to_dict(),
        }


def _link_problem(head_seq: int, head_hash: str, row: AuditRow) -> str | None:
    """Why ``row`` cannot follow the head (seq, hash), or None."""
    expected_seq = head_seq + 1
    if row.seq != expected_seq:
        if head_seq == 0:
            return f"seq {expected_seq} missing: the trail starts at seq {row.seq} (deleted)"
        return f"seq {expected_seq} missing after {head_seq} (deleted)"
    if row.prev_hash != head_hash:
        if head_seq == 0:
            return f"entry seq {row.seq}: prev_hash is not the genesis hash (inserted or reordered)"
        return f"entry seq {row.seq}: prev_hash does not match entry {head_seq} (inserted or reordered)"
    return None
