"""The evidence bundle of one model, and its detached signature for auditors.

``evidence_bundle`` is the audit trail's export (cards, reports, approvals, traffic history,
rollbacks, drift, the model's audit entries and the chain's state) plus each version's
provenance (signer, manifest digest), so the document handed to an auditor says who produced
every version as well as who approved it.

``sign_evidence`` signs the exported file with the same OpenSSF model-signing format as models
(a DSSE envelope over an in-toto statement of the file's SHA-256, EC key, offline), written
beside it as ``FILE.sig``. ``verify_evidence`` checks it offline with the signer's public key
— lockgate's CLI or the model-signing CLI itself (``model_signing verify key FILE --signature
FILE.sig --public_key PUB``), and reports a bundle whose own chain check had failed when it
was exported.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lockgate.control.audit import AuditTrail
from lockgate.control.card import UNSIGNED
from lockgate.errors import InvalidArgument

EVIDENCE_FORMAT = "lockgate.evidence/v1"
SIGNATURE_SUFFIX = ".sig"


def evidence_bundle(trail: AuditTrail, model: str) -> dict[str, Any]:
    """The export of ``model`` with a ``provenance`` section per version."""
    bundle = trail.export(model)
    bundle["provenance"] = {
        str(v["version"]): (v.get("metadata") or {}).get("provenance") or {"signed": False, "summary": UNSIGNED}
        for v in bundle["versions"]
    }
    return bundle


def render(bundle: dict[str, Any]) -> str:
    """The bytes that are written and signed (stable key order)."""
    return json.dumps(bundle, indent=2, sort_keys=True, default=str) + "\n"


def signature_path(bundle_path: Path) -> Path:
    return bundle_path.with_name(bundle_path.name + SIGNATURE_SUFFIX)


def sign_evidence(bundle_path: Path, private_key: Path, *, password: str | None = None) -> Path:
    """Write ``FILE.sig``, a model-signing bundle over ``FILE``; returns its path."""
    from lockgate.control.provenance import _require_library

    _require_library("signing evidence")
    from model_signing import signing

    target = signature_path(bundle_path)
    try:
        signing.Config().use_elliptic_key_signer(private_key=private_key, password=password).sign(bundle_path, target)
    except (ValueError, TypeError) as exc:
        raise InvalidArgument(f"cannot sign with {private_key}: {exc}") from None
    return target


@dataclass(slots=True)
class EvidenceCheck:
    """Outcome of ``verify_evidence``: ``ok`` only when every problem list is empty."""

    signature_ok: bool
    problems: list[str] = field(default_factory=list)
    model: str = ""
    entries: int = 0

    @property
    def ok(self) -> bool:
        return self.signature_ok and not self.problems


def verify_evidence(bundle_path: Path, public_key: Path, signature: Path | None = None) -> EvidenceCheck:
    """Check ``FILE.sig`` over ``FILE`` with ``public_key`` (offline), then the bundle itself."""
    from lockgate.control.provenance import _require_library

    _require_library("verifying evidence")
    from cryptography.exceptions import InvalidSignature
    from model_signing import verifying

    signature = signature or signature_path(bundle_path)
    if not signature.is_file():
        return EvidenceCheck(False, [f"no detached signature at {signature}"])
    try:
        verifying.Config().use_elliptic_key_verifier(public_key=public_key).verify(bundle_path, signature)
    except InvalidSignature:
        return EvidenceCheck(False, [f"{signature} is not a valid signature by {public_key}"])
    except ValueError as exc:
        text = str(exc)
        if text.startswith("Signature mismatch"):
            text = f"{bundle_path.name} changed after it was signed (its SHA-256 differs from the signed one)"
        return EvidenceCheck(False, [text])
    except (OSError, KeyError, TypeError) as exc:
        return EvidenceCheck(False, [f"cannot read the signature or key: {type(exc).__name__}: {exc}"])
    try:
        bundle = json.loads(bundle_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return EvidenceCheck(True, [f"{bundle_path} is not a JSON evidence bundle: {exc}"])
    return EvidenceCheck(True, _bundle_problems(bundle), str(bundle.get("model", "")), len(bundle.get("audit_entries") or []))


def _bundle_problems(bundle: Any) -> list[str]:
    """What the (authentic) bundle itself says is wrong: not evidence, or a broken chain."""
    if not isinstance(bundle, dict) or bundle.get("format") != EVIDENCE_FORMAT:
        return [f"not a {EVIDENCE_FORMAT} bundle"]
    chain = bundle.get("chain") or {}
    if not chain.get("ok", False):
        return [f"the audit chain did not verify when this bundle was exported: {chain.get('reason') or 'no chain result'}"]
    return []
