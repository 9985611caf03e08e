"""Append-only, hash-chained audit trail.

Every entry's ``hash`` is SHA-256 over a canonical JSON encoding of
``[seq, time, actor, action, subject, details, prev_hash]`` and ``prev_hash``
is the previous entry's ``hash`` (``GENESIS_HASH`` for seq 1). Changing,
deleting, inserting or reordering any stored entry therefore breaks either the
entry's own hash, the seq sequence, or the next entry's link, and ``verify``
names the first entry where that happens.

The chain is only as strong as its head: truncating the newest entries leaves
a valid shorter chain. Pass a previously recorded ``anchor`` (seq, hash) to
``verify`` to detect that too.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from datetime import date, datetime
from enum import Enum, StrEnum
from pathlib import PurePath
from typing import Any

from lockgate.errors import NotFound
from lockgate.control.store import (
    AuditRow,
    JSONDict,
    RecordKind,
    Store,
    parse_time,
    utc_now_iso,
)

GENESIS_HASH = "0" * 64
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


def entry_hash(
    seq: int, time: str, actor: str, action: str, subject: str, details: str, prev_hash: str
) -> str:
    """SHA-256 (hex) of the canonical encoding of one entry's fields."""
    payload = json.dumps(
        [seq, time, actor, action, subject, details, prev_hash],
        separators=(",", ":"),
        ensure_ascii=False,
    )
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


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

    @classmethod
    def from_row(cls, row: AuditRow) -> AuditEntry:
        try:
            details = json.loads(row.details)
        except ValueError:
            details = {"_undecodable": row.details}
        if not isinstance(details, dict):
            details = {"_value": details}
        return cls(row.seq, row.time, row.actor, row.action, row.subject, details, row.prev_hash, row.hash)

    def to_dict(self) -> JSONDict:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class VerifyResult:
    """Outcome of ``AuditTrail.verify``; ``first_bad_seq`` names the first bad entry."""

    ok: bool
    checked: int
    first_bad_seq: int | None = None
    reason: str = ""
    head_seq: int = 0
    head_hash: str = GENESIS_HASH

    def to_dict(self) -> JSONDict:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class AuditAnchor:
    """A (seq, hash) pair recorded elsewhere, to detect truncation of the tail."""

    seq: int
    hash: str


def model_subject(model: str, version: str | None = None) -> str:
    """The subject convention that ``log(model=...)`` filters on: ``M`` or ``M/V``."""
    return model if version is None else f"{model}/{version}"


@dataclass(slots=True)
class AuditTrail:
    """Append to, read and verify the chain kept in a ``Store``."""

    store: Store
    batch_size: int = field(default=1000)

    def append(
        self,
        actor: str,
        action: str,
        subject: str,
        details: Mapping[str, Any] | None = None,
    ) -> AuditEntry:
        """Append one entry; secret-looking keys in ``details`` are redacted."""
        details_text = canonical_json(redact(dict(details or {})))
        action_text = str(action)

        def build(head: AuditRow | None) -> AuditRow:
            seq = head.seq + 1 if head is not None else 1
            prev_hash = head.hash if head is not None else GENESIS_HASH
            time = utc_now_iso()
            digest = entry_hash(seq, time, actor, action_text, subject, details_text, prev_hash)
            return AuditRow(seq, time, actor, action_text, subject, details_text, prev_hash, digest)

        return AuditEntry.from_row(self.store.append_audit(build))

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

    def verify(self, anchor: AuditAnchor | None = None) -> VerifyResult:
        """Walk the whole chain; stop at the first entry that does not check out."""
        checked = 0
        prev: AuditRow | None = None
        anchor_seen = anchor is None
        after = 0
        while True:
            rows = self.store.audit_entries(after_seq=after, limit=self.batch_size)
            if not rows:
                break
            for row in rows:
                problem = self._check(prev, row)
                if problem is not None:
                    bad_seq, reason = problem
                    return VerifyResult(False, checked, bad_seq, reason, *self._head_of(prev))
                if anchor is not None and row.seq == anchor.seq:
                    if row.hash != anchor.hash:
                        return VerifyResult(
                            False, checked, row.seq,
                            f"entry seq {row.seq}: hash differs from the recorded anchor (rewritten)",
                            *self._head_of(prev),
                        )
                    anchor_seen = True
                checked += 1
                prev = row
            after = rows[-1].seq
        head_seq, head_hash = self._head_of(prev)
        if not anchor_seen and anchor is not None:
            return VerifyResult(
                False, checked, head_seq + 1,
                f"seq {head_seq + 1} missing after {head_seq}: anchor seq {anchor.seq} "
                "is beyond the head (truncated)",
                head_seq, head_hash,
            )
        return VerifyResult(True, checked, None, "", head_seq, head_hash)

    @staticmethod
    def _head_of(row: AuditRow | None) -> tuple[int, str]:
        return (row.seq, row.hash) if row is not None else (0, GENESIS_HASH)

    @staticmethod
    def _check(prev: AuditRow | None, row: AuditRow) -> tuple[int, str] | None:
        expected_seq = prev.seq + 1 if prev is not None else 1
        if row.seq != expected_seq:
            if prev is None:
                return expected_seq, f"seq {expected_seq} missing: the trail starts at seq {row.seq} (deleted)"
            return expected_seq, f"seq {expected_seq} missing after {prev.seq} (deleted)"
        expected_prev = prev.hash if prev is not None else GENESIS_HASH
        if row.prev_hash != expected_prev:
            if prev is None:
                return row.seq, f"entry seq {row.seq}: prev_hash is not the genesis hash (inserted or reordered)"
            return row.seq, (
                f"entry seq {row.seq}: prev_hash does not match entry {prev.seq} (inserted or reordered)"
            )
        actual = entry_hash(
            row.seq, row.time, row.actor, row.action, row.subject, row.details, row.prev_hash
        )
        if actual != row.hash:
            return row.seq, f"entry seq {row.seq}: hash mismatch (modified)"
        return None

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

        result = self.verify()
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
