"""Where a drift report's evidence comes from, and which version it is about.

A report is evidence only if a reader can tie it to one artifact and one approval: the
model version, the artifact's SHA-256, the approval (id, approver, time), the model card's
digest, the reference profile's digest with its row count and build time, the window
bounds, when the report was made and by which lockgate. Everything is read offline, from
the model repository and the control-plane store the server wrote (never through the
server); what cannot be found is reported as missing, never guessed.

:func:`serving_candidates` answers "which version is this about" when the operator names
none: the versions the traffic policy weights, else the registry's serving/canary ones,
else the config's ``default_version``, else every version -- in that order of preference.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import lockgate
from lockgate.config import ModelConfigFile
from lockgate.serving.repository import sha256_file

log = logging.getLogger("lockgate.governance.provenance")

MODEL_FILE = "model.onnx"


@dataclass(slots=True)
class Provenance:
    model: str
    version: str
    artifact: str = ""
    artifact_sha256: str = ""
    registered_sha256: str = ""  # what the registry recorded (must equal artifact_sha256)
    state: str = ""  # registry lifecycle state
    approval_id: int | None = None
    approver: str = ""
    approved_at: str = ""
    card_id: int | None = None
    card_digest: str = ""
    signer: str = ""  # who signed model.sig, as verified at registration (the card's signer field)
    manifest_digest: str = ""  # the signed manifest's digest
    profile_path: str = ""
    profile_digest: str = ""
    profile_rows: int = 0
    profile_created: str = ""
    window_start: str = ""
    window_end: str = ""
    windows: int = 0
    generated_at: str = field(default_factory=lambda: _iso(time.time()))
    lockgate_version: str = lockgate.__version__
    store: str = ""
    missing: list[str] = field(default_factory=list)  # what could not be established, and why

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def artifact_of(model_repository: Path, model: str, version: str) -> Path | None:
    folder = Path(model_repository) / model / str(version)
    preferred = folder / MODEL_FILE
    if preferred.exists():
        return preferred
    found = sorted(folder.glob("*.onnx"))
    return found[0] if found else None


def open_store_if_present(state_dir: Path, store: str | None = None):
    """The control-plane store, opened only if it exists (a report must not create one)."""
    from lockgate.control.store import open_store

    if store and store.startswith(("postgresql://", "postgres://")):
        return open_store(store)
    path = Path(store) if store else Path(state_dir) / "lockgate.db"
    return open_store(path) if path.exists() else None


def collect(
    model_repository: Path, state_dir: Path, model: str, version: str, *, profile: Any = None,
    profile_path: Path | None = None, window: Any = None, store: str | None = None,
) -> Provenance:
    """Gather the provenance of one model version's report (``window``: the DriftReport)."""
    from lockgate.control.audit import canonical_json
    from lockgate.control.store import RecordKind

    out = Provenance(model=model, version=str(version))
    artifact = artifact_of(model_repository, model, version)
    if artifact is None:
        out.missing.append(f"no ONNX artifact under {Path(model_repository) / model / str(version)}")
    else:
        out.artifact, out.artifact_sha256 = str(artifact), sha256_file(artifact)
    if profile is not None:
        out.profile_path = str(profile_path or "")
        out.profile_digest, out.profile_rows, out.profile_created = profile.digest(), profile.rows, _iso(profile.created)
    if window is not None:
        out.window_start, out.window_end, out.windows = _iso(window.start), _iso(window.end), window.windows
    try:
        opened = open_store_if_present(state_dir, store)
    except Exception as exc:  # noqa: BLE001 -- a report without the store still says why
        opened = None
        out.missing.append(f"control-plane store unreadable: {exc}")
    if opened is None:
        out.missing.append(f"no control-plane store in {state_dir}: artifact registration, approval and card unknown")
        return out
    out.store = store or str(Path(state_dir) / "lockgate.db")
    try:
        record = opened.get_version(model, str(version))
        if record is None:
            out.missing.append(f"{model} v{version} is not registered in the store")
            return out
        out.state, out.registered_sha256 = record.state, record.sha256
        if out.artifact_sha256 and record.sha256 != out.artifact_sha256:
            out.missing.append("the artifact on disk does not match the registered SHA-256")
        approvals = opened.list_records(RecordKind.APPROVAL, model, str(version))
        if approvals:
            last = approvals[-1]
            out.approval_id, out.approver, out.approved_at = last.id, str(last.body.get("approver", last.actor)), last.time
        else:
            out.missing.append(f"{model} v{version} has no approval record")
        cards = opened.list_records(RecordKind.CARD, model, str(version))
        if cards:
            out.card_id = cards[-1].id
            out.card_digest = hashlib.sha256(canonical_json(cards[-1].body).encode()).hexdigest()
            out.signer = str(cards[-1].body.get("signer") or "")
            out.manifest_digest = str(cards[-1].body.get("manifest_digest") or "")
        else:
            out.missing.append(f"{model} v{version} has no model card")
    finally:
        opened.close()
    return out


def serving_candidates(model_repository: Path, state_dir: Path, model: str, store: str | None = None) -> list[tuple[str, str]]:
    """Versions of ``model`` in the order a report should prefer them, each with why."""
    out: list[tuple[str, str]] = []

    def add(version: str, why: str) -> None:
        if version not in [v for v, _ in out]:
            out.append((version, why))

    try:
        opened = open_store_if_present(state_dir, store)
    except Exception:  # noqa: BLE001 -- the other sources still answer
        opened = None
    if opened is not None:
        try:
            policy = opened.get_policy(model)
            weights = dict((policy.document.get("weights") or {}) if policy is not None else {})
            for version, weight in sorted(weights.items(), key=lambda kv: -float(kv[1])):
                if float(weight) > 0:
                    add(str(version), f"takes {float(weight):g} of the traffic policy's weight")
            for record in opened.list_versions(model):
                if record.state in ("serving", "canary"):
                    add(record.version, f"registry state {record.state}")
        finally:
            opened.close()
    try:
        config = ModelConfigFile.load(Path(model_repository) / model / "config.yaml")
    except Exception:  # noqa: BLE001 -- an unreadable config is reported by serve, not here
        config = None
    if config is not None and config.default_version is not None:
        add(str(config.default_version), "the model config's default_version")
    folder = Path(model_repository) / model
    numeric = sorted((p.name for p in folder.iterdir() if p.is_dir() and p.name.isdigit()), key=int, reverse=True) if folder.is_dir() else []
    for version in numeric:
        add(version, "the highest version in the repository" if version == numeric[0] else "a version in the repository")
    return out
