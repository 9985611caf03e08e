"""The control-plane ``Store`` interface and its record types.

Callers (registry, audit trail, router, admin API, drift leader) depend only on
this Protocol; ``SQLiteStore`` is the embedded default and a PostgreSQL store
can implement the same methods for several replicas (LISTEN/NOTIFY behind
``wait_for_changes``, ``SELECT ... FOR UPDATE`` / an advisory transaction lock
behind ``append_audit``) without any caller changing.

The interface is deliberately generic: versions, a typed document log
(validation reports, approvals, model cards), versioned traffic policies, the
audit chain, window snapshots, and one change feed.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from lockgate.errors import StoreError

JSONDict = dict[str, Any]


def utc_now_iso() -> str:
    """Current UTC time as fixed-width ISO-8601 (sorts lexicographically)."""
    return format_time(datetime.now(timezone.utc))


def format_time(moment: datetime) -> str:
    """Render ``moment`` as ``YYYY-MM-DDTHH:MM:SS.ffffffZ`` in UTC.

    One fixed width for every row so string comparison equals time order,
    which lets ``since`` filters run as plain SQL comparisons.
    """
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_time(value: str | datetime) -> str:
    """Normalise a user-given time (ISO string or datetime) to ``format_time``."""
    if isinstance(value, datetime):
        return format_time(value)
    text = value.strip()
    if text.endswith("Z"):
        text = text[:-1] + "+00:00"
    try:
        return format_time(datetime.fromisoformat(text))
    except ValueError as exc:
        raise ValueError(f"not an ISO-8601 time: {value!r}") from exc


class RecordKind(StrEnum):
    """Kinds of documents kept in the record log (append-only, per version)."""

    VALIDATION = "validation"
    APPROVAL = "approval"
    CARD = "card"
    TRUST = "trust"  # trusted-signer additions/removals (model and version are "")


class ChangeKind(StrEnum):
    """What a change-feed entry is about."""

    VERSION = "version"
    POLICY = "policy"
    RECORD = "record"


@dataclass(frozen=True, slots=True)
class VersionRecord:
    """One registered model version (a row of the registry)."""

    model: str
    version: str
    state: str
    artifact_path: str
    sha256: str
    registered_by: str
    registered_at: str
    updated_at: str
    metadata: JSONDict = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class StoredRecord:
    """A document attached to a model version (report, approval, card)."""

    id: int
    kind: RecordKind
    model: str
    version: str
    actor: str
    time: str
    body: JSONDict


@dataclass(frozen=True, slots=True)
class PolicyRecord:
    """One revision of a model's traffic policy; revisions start at 1 per model."""

    model: str
    revision: int
    document: JSONDict
    actor: str
    time: str


@dataclass(frozen=True, slots=True)
class Change:
    """An entry of the change feed; ``revision`` increases store-wide."""

    revision: int
    kind: ChangeKind
    model: str
    version: str | None


@dataclass(frozen=True, slots=True)
class AuditRow:
    """A stored audit entry exactly as persisted (``details`` is canonical JSON text)."""

    seq: int
    time: str
    actor: str
    action: str
    subject: str
    details: str
    prev_hash: str
    hash: str


@dataclass(frozen=True, slots=True)
class WindowSnapshot:
    """A serialised governance window from one replica."""

    model: str
    version: str
    window: int
    replica: str
    payload: bytes
    time: str


AuditBuilder = Callable[[AuditRow | None], AuditRow]
"""Given the current chain head (None when empty), return the row to append."""


@runtime_checkable
class Store(Protocol):
    """Persistence for the control plane. Implementations must be thread-safe."""

    # -- model versions -------------------------------------------------
    def create_version(self, record: VersionRecord) -> None:
        """Insert a version; ``AlreadyExists`` if (model, version) exists."""
        ...

    def update_version(
        self,
        model: str,
        version: str,
        *,
        state: str,
        expected_state: str | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> VersionRecord:
        """Set state (and merge ``metadata`` keys) atomically.

        ``expected_state`` makes it a compare-and-set: ``ConflictError`` when
        the stored state differs. ``NotFound`` if the version is unknown.
        """
        ...

    def get_version(self, model: str, version: str) -> VersionRecord | None: ...

    def list_versions(self, model: str | None = None) -> list[VersionRecord]:
        """All versions (of one model), ordered by model then numeric version."""
        ...

    # -- documents attached to versions --------------------------------
    def add_record(
        self, kind: RecordKind, model: str, version: str, actor: str, body: Mapping[str, Any]
    ) -> StoredRecord: ...

    def list_records(
        self,
        kind: RecordKind | None = None,
        model: str | None = None,
        version: str | None = None,
    ) -> list[StoredRecord]:
        """Matching records, oldest first."""
        ...

    # -- traffic policies -----------------------------------------------
    def set_policy(
        self,
        model: str,
        document: Mapping[str, Any],
        actor: str,
        expected_revision: int | None = None,
    ) -> PolicyRecord:
        """Store a new revision (previous + 1). ``expected_revision`` is a CAS
        on the current revision (0 = no policy yet); mismatch -> ``ConflictError``."""
        ...

    def get_policy(self, model: str) -> PolicyRecord | None:
        """The latest revision, or None."""
        ...

    def list_policies(self) -> list[PolicyRecord]:
        """The latest revision of every model's policy."""
        ...

    def policy_history(self, model: str) -> list[PolicyRecord]:
        """Every revision of one model's policy, oldest first."""
        ...

    # -- change feed ----------------------------------------------------
    def current_revision(self) -> int:
        """Revision of the newest change (0 when none)."""
        ...

    def changes_since(self, revision: int) -> list[Change]:
        """Changes with revision > ``revision``, oldest first."""
        ...

    def wait_for_changes(self, revision: int, timeout: float) -> list[Change]:
        """Block until there are changes after ``revision`` or ``timeout`` s pass."""
        ...

    # -- audit chain ----------------------------------------------------
    def append_audit(self, build: AuditBuilder) -> AuditRow:
        """Append one entry while holding the chain head exclusively.

        ``build`` is called inside the serialising transaction with the current
        head, so concurrent writers (threads, processes, replicas) always
        produce one linear chain.
        """
        ...

    def audit_head(self) -> AuditRow | None: ...

    def audit_entries(
        self,
        *,
        after_seq: int = 0,
        limit: int | None = None,
        model: str | None = None,
        since: str | None = None,
    ) -> list[AuditRow]:
        """Entries in seq order; ``model`` matches subject ``M`` or ``M/...``;
        ``since`` is a ``format_time`` string (inclusive)."""
        ...

    # -- governance window snapshots ------------------------------------
    def put_snapshot(
        self, model: str, version: str, window: int, replica: str, payload: bytes
    ) -> None:
        """Insert or replace one replica's snapshot of one window."""
        ...

    def get_snapshots(self, model: str, version: str, window: int) -> list[WindowSnapshot]: ...

    def latest_window(self, model: str, version: str) -> int | None:
        """The highest window id with at least one snapshot."""
        ...

    def prune_snapshots(self, before_window: int) -> int:
        """Delete snapshots of windows < ``before_window``; returns rows removed."""
        ...

    def close(self) -> None: ...


def open_store(location: str | Path) -> Store:
    """Open the store named by ``location``.

    * ``postgresql://...`` / ``postgres://...`` -> ``lockgate.control.postgres_store.PostgresStore``
    * ``sqlite:///path/file.db`` or a file path -> ``SQLiteStore`` on that file
    * a directory (the ``--state-dir``; existing, or a new path without a
      suffix) -> ``SQLiteStore`` on ``<dir>/lockgate.db``
    """
    text = str(location)
    if text.startswith(("postgresql://", "postgres://")):
        try:
            module = importlib.import_module("lockgate.control.postgres_store")
        except ImportError as exc:
            raise StoreError(
                f"PostgreSQL store requested but unavailable ({exc}); "
                "install the 'postgres' extra"
            ) from exc
        store: Store = module.PostgresStore(text)
        return store
    from lockgate.control.sqlite_store import SQLiteStore

    if text.startswith("sqlite:///"):
        return SQLiteStore(Path(text[len("sqlite:///") :]))
    return SQLiteStore(Path(text))


def version_sort_key(version: str) -> tuple[int, str]:
    """Order "2" before "10"; non-numeric ids sort after numeric ones."""
    return (int(version), "") if version.isdigit() else (1 << 62, version)


def sorted_versions(records: Sequence[VersionRecord]) -> list[VersionRecord]:
    return sorted(records, key=lambda r: (r.model, version_sort_key(r.version)))
