"""Opening the audit trail for a server: key, checkpoints, and the checks made before serving.

The server refuses to start (``FailedPrecondition`` with the fix in the message) when:

* no ``audit_key_file`` is configured, or it or the checkpoint file lies inside
  ``state_dir`` (whoever can write the state directory could then forge or truncate);
* the trail holds entries written before audit keys that no ``audit.sealed`` entry pins
  (an older state directory: an operator checks and seals them once with
  ``lockgate audit seal``; they are never accepted silently);
* the chain does not verify against its signed checkpoints.

A registry row that disagrees with the trail does not stop the server: that version is
refused (by the gates and at load) and the verdict shows in ``lockgate_audit_verify_ok``.
A missing checkpoint file (first start, a new replica) is started at the verified head,
with a warning and an ``audit.checkpoints_started`` entry, so its disappearance later is
visible in the trail.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from lockgate.control.audit import Action, AuditTrail, VerifyResult
from lockgate.control.audit_key import AuditKeyring, outside
from lockgate.control.checkpoint import CheckpointLog, Checkpointer
from lockgate.control.actor import SYSTEM_ACTOR
from lockgate.control.store import Store
from lockgate.errors import FailedPrecondition

log = logging.getLogger("lockgate.audit")


def load_keyring(key_file: Path | None, previous: Sequence[Path], *, state_dir: Path,
                 checkpoint_file: Path | None) -> AuditKeyring:
    """The configured keys, after checking that neither they nor the checkpoints live in ``state_dir``."""
    if key_file is None:
        raise FailedPrecondition(
            "audit_key_file is not set: the audit trail must be authenticated with a key kept outside the state "
            "directory; create one with `lockgate audit keygen --out /etc/lockgate/audit.key` and pass "
            "--audit-key-file (or LOCKGATE_AUDIT_KEY_FILE)")
    for what, path in (("audit_key_file", key_file), ("audit_checkpoint_file", checkpoint_file),
                       *(("audit_previous_key_files", p) for p in previous)):
        if path is not None and not outside(path, state_dir):
            raise FailedPrecondition(
                f"{what} {path} lies inside state_dir {state_dir}: whoever can write the state directory could then "
                "forge or truncate the audit trail; keep it elsewhere")
    return AuditKeyring.load(key_file, previous)


def open_audit(
    store: Store,
    keyring: AuditKeyring,
    checkpoint_file: Path,
    *,
    every: int = 100,
    interval_s: float = 10.0,
    where: str = "",
) -> tuple[AuditTrail, VerifyResult]:
    """The server's trail, verified, with its checkpointer running; and the verdict."""
    log_file = CheckpointLog(checkpoint_file)
    trail = AuditTrail(store, keyring, None, log_file)
    unsealed = trail.unsealed_legacy()
    if unsealed:
        raise FailedPrecondition(
            f"the audit trail{where} holds {unsealed} entries written before audit keys (an unkeyed SHA-256 chain "
            "that anyone able to write the database could have rewritten); check them with `lockgate audit log`, "
            "then seal them under the key with `lockgate audit seal --store STORE --key-file KEY "
            "--checkpoint-file FILE --actor NAME --reason TEXT`")
    starting = not log_file.exists()
    result = trail.verify(checkpoints=not starting and log_file)
    if result.first_bad_seq is not None or (not result.ok and not result.registry_problems):
        raise FailedPrecondition(f"refusing to start: the audit trail{where} does not verify: {result.reason}")
    if result.registry_problems:
        log.error("the registry disagrees with the audit trail; those versions take no traffic: %s",
                  "; ".join(result.registry_problems))
    for warning in result.warnings:
        log.warning("audit trail: %s", warning)
    checkpointer = Checkpointer(log_file, keyring.current, store.audit_head, every=every, interval_s=interval_s)
    trail.checkpoints = checkpointer
    checkpointer.write_head()
    if starting:
        log.warning("audit checkpoint file %s did not exist: started it at seq %d (truncation before that point "
                    "cannot be detected from this file)", checkpoint_file, result.head_seq)
        trail.append(SYSTEM_ACTOR, Action.CHECKPOINTS_STARTED, "audit",
                     {"file": str(checkpoint_file), "head_seq": result.head_seq, "head_hash": result.head_hash})
    checkpointer.start()
    return trail, result
