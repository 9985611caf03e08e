"""lockgate.control: the control plane (store, registry, audit trail, auth).

The admin API, the router and the CLI use only the names exported here.
"""

from lockgate.control.audit import (
    Action,
    AuditAnchor,
    AuditEntry,
    AuditTrail,
    Entry,
    VerifyResult,
    model_subject,
    redact,
)
from lockgate.control.audit_key import AuditKey, AuditKeyring
from lockgate.control.checkpoint import Checkpoint, CheckpointLog, Checkpointer
from lockgate.control.auth import (
    Authenticator,
    IssuedToken,
    Permission,
    PERMISSIONS,
    Principal,
    Role,
    generate_token,
    hash_token,
    tokens_file_entry,
)
from lockgate.control.card import REQUIRED_CARD_FIELDS, ModelCard, parse_card
from lockgate.errors import (
    LockgateError,
    AlreadyExists,
    ApprovalError,
    ArtifactTamperedError,
    ConflictError,
    InvalidArgument,
    LifecycleError,
    NotFound,
    PermissionDenied,
    StoreError,
    Unauthenticated,
)
from lockgate.control.registry import LIFECYCLE, Registry, State
from lockgate.control.sqlite_store import SQLiteStore
from lockgate.control.store import (
    Change,
    ChangeKind,
    PolicyRecord,
    RecordKind,
    Store,
    StoredRecord,
    VersionRecord,
    WindowSnapshot,
    open_store,
)
from lockgate.control.validation import Signature, TensorSpec, Tolerance, ValidationReport
from lockgate.control.watch import ChangeWatcher

__all__ = [
    "AuditKey", "AuditKeyring", "Checkpoint", "CheckpointLog", "Checkpointer", "Entry",
    "Action", "AlreadyExists", "ApprovalError", "ArtifactTamperedError", "AuditAnchor",
    "AuditEntry", "AuditTrail", "Authenticator", "Change", "ChangeKind", "ChangeWatcher",
    "ConflictError", "InvalidArgument", "LockgateError", "IssuedToken", "LIFECYCLE",
    "LifecycleError", "ModelCard", "NotFound", "PERMISSIONS", "Permission",
    "PermissionDenied", "PolicyRecord", "Principal", "REQUIRED_CARD_FIELDS", "RecordKind",
    "Registry", "Role", "SQLiteStore", "Signature", "State", "Store", "StoreError",
    "StoredRecord", "TensorSpec", "Tolerance", "Unauthenticated", "ValidationReport",
    "VerifyResult", "VersionRecord", "WindowSnapshot", "generate_token", "hash_token",
    "model_subject", "open_store", "parse_card", "redact", "tokens_file_entry",
]
