"""``SqlStore``: the ``Store`` logic shared by ``SQLiteStore`` and ``PostgresStore``.

Both stores keep the same tables and columns and run the same queries; only the
SQL dialect and the way guarantees are obtained differ. This base holds every
shared query, CAS check, error message and row conversion once (SQL written with
``?`` placeholders), so a fix cannot land in one store and miss the other. Each
concrete store supplies only what genuinely differs:

* ``_q(sql)``: placeholder translation (psycopg wants ``%s``);
* ``_transact(work, feed=..., audit=...)``: run ``work(conn)`` in one serialised write
  transaction; with ``feed=True`` the transaction appends to the change feed and
  must commit revisions in revision order, with ``audit=True`` it appends to the
  audit chain and must hold its head (SQLite: ``BEGIN IMMEDIATE``, several callers'
  units grouped into one commit; PostgreSQL: ``CHANGES_LOCK`` then ``AUDIT_LOCK``
  taken first, one retry before COMMIT is sent);
* ``_read(sql, params)``: one read, driver errors as ``StoreError``;
* ``_record_change(conn, ...)``: the change row (plus NOTIFY on PostgreSQL);
* ``_wake()``: wake this process's ``wait_for_changes`` after a commit;
* ``_insert_id(conn, sql, params)``: the id of the row just inserted;
* dialect SQL: ``_FOR_UPDATE``, ``_LATEST_POLICIES_SQL``, ``_UPSERT_SNAPSHOT_SQL``;
* ``_UNIQUE_VIOLATION``: the driver's unique-key error that ``create_version``
  reports as ``AlreadyExists`` (empty where serialisation rules it out).

Every write, the audit append included, is one ``apply``: writes and audit entries
in one transaction. Connections, migrations (DDL, version bookkeeping and the
migration lock; the shared loop is ``apply_migrations``), transactions and their
locks, waiting for changes and closing stay in each store.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import replace
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, Protocol, Self, TypeVar

from lockgate.errors import AlreadyExists, ConflictError, NotFound, StoreError
from lockgate.control.store import (
    AddRecord,
    Applied,
    AuditBuilder,
    AuditDraft,
    AuditRow,
    Change,
    ChangeKind,
    CreateVersion,
    PolicyRecord,
    RecordKind,
    SetPolicy,
    StoredRecord,
    UpdateVersion,
    VersionRecord,
    WindowSnapshot,
    Write,
    sorted_versions,
    utc_now_iso,
)

T = TypeVar("T")


class SqlCursor(Protocol):
    """What the shared code uses of a DB-API cursor (sqlite3 and psycopg alike)."""

    @property
    def rowcount(self) -> int: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...


class SqlConnection(Protocol):
    """What the shared code uses of a connection: ``execute`` returning a cursor."""

    def execute(self, sql: Any, params: Any = ..., /) -> SqlCursor: ...


def _dumps(value: Mapping[str, Any]) -> str:
    """Canonical JSON (sorted keys, compact) so stored documents compare byte-wise."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def apply_migrations(
    conn: SqlConnection,
    current: int,
    migrations: Sequence[Sequence[str]],
    mark: Callable[[int], object],
) -> None:
    """Run ``migrations[current:]`` in order, calling ``mark(n)`` once schema version
    ``n`` is in place; refuse a schema newer than this code.

    The caller holds its store's migration lock inside one transaction, so
    replicas or processes opening a fresh database at once migrate it exactly once.
    """
    if current > len(migrations):
        raise StoreError(
            f"database schema version {current} is newer than this lockgate "
            f"understands ({len(migrations)}); upgrade lockgate"
        )
    for index in range(current, len(migrations)):
        for statement in migrations[index]:
            conn.execute(statement)  # fixed, trusted DDL
        mark(index + 1)


class SqlStore(ABC):
    """Shared implementation of ``lockgate.control.store.Store`` over a SQL database.

    Subclasses provide the dialect hooks listed in the module docstring plus
    ``wait_for_changes``, ``schema_version`` and ``close``.
    """

    _VERSION_COLUMNS: ClassVar[str] = (
        "model, version, state, artifact_path, sha256, registered_by, "
        "registered_at, updated_at, metadata"
    )
    _AUDIT_COLUMNS: ClassVar[str] = "seq, time, actor, action, subject, details, prev_hash, hash, key_id"

    # -- dialect ----------------------------------------------------------------
    _FOR_UPDATE: ClassVar[str] = ""
    """Suffix that row-locks the version read by ``update_version``."""
    _LATEST_POLICIES_SQL: ClassVar[str]
    """Latest revision of every model's policy, ordered by model (5 policy columns)."""
    _UPSERT_SNAPSHOT_SQL: ClassVar[str]
    """Insert-or-replace one snapshot row (model, version, window_id, replica, payload, time)."""
    _UNIQUE_VIOLATION: ClassVar[tuple[type[Exception], ...]] = ()
    """Driver errors that ``create_version`` reports as ``AlreadyExists``."""

    def _q(self, sql: str) -> str:
        """``sql`` (``?`` placeholders) in this driver's placeholder style."""
        return sql

    @abstractmethod
    def _transact(self, work: Callable[[Any], T], *, feed: bool = False, audit: bool = False) -> T:
        """Run ``work(conn)`` in one serialised write transaction and return its result.

        ``feed=True``: the transaction appends to the change feed, so revisions must
        commit in revision order (``changes_since`` may never skip a late commit).
        ``audit=True``: it appends to the audit chain, so it holds the chain head from
        its start. Driver errors surface as ``StoreError``; ``work``'s own errors roll
        back and propagate unchanged.
        """

    @abstractmethod
    def _read(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        """Rows of one query (already in the driver's placeholder style)."""

    @abstractmethod
    def _record_change(self, conn: Any, kind: ChangeKind, model: str, version: str | None) -> None:
        """Append one change-feed row inside a ``feed=True`` transaction."""

    @abstractmethod
    def _wake(self) -> None:
        """Wake this process's ``wait_for_changes`` callers after a committed write."""

    @abstractmethod
    def _insert_id(self, conn: Any, sql: str, params: Sequence[Any]) -> int:
        """Run an ``INSERT`` (``?`` placeholders) and return the new row's ``id``."""

    # -- helpers ----------------------------------------------------------------
    def _exec(self, conn: SqlConnection, sql: str, params: Sequence[Any] | None = None) -> SqlCursor:
        if params is None:
            return conn.execute(self._q(sql))
        return conn.execute(self._q(sql), params)

    def _select(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        return self._read(self._q(sql), params)

    # -- row conversions ------------------------------------------------------------
    @staticmethod
    def _version(row: Sequence[Any]) -> VersionRecord:
        return VersionRecord(
            model=row[0],
            version=row[1],
            state=row[2],
            artifact_path=row[3],
            sha256=row[4],
            registered_by=row[5],
            registered_at=row[6],
            updated_at=row[7],
            metadata=json.loads(row[8]),
        )

    @staticmethod
    def _record(row: Sequence[Any]) -> StoredRecord:
        return StoredRecord(
            int(row[0]), RecordKind(row[1]), row[2], row[3], row[4], row[5], json.loads(row[6])
        )

    @staticmethod
    def _policy(row: Sequence[Any]) -> PolicyRecord:
        return PolicyRecord(
            model=row[0], revision=int(row[1]), document=json.loads(row[2]), actor=row[3], time=row[4]
        )

    @staticmethod
    def _change(row: Sequence[Any]) -> Change:
        return Change(int(row[0]), ChangeKind(row[1]), row[2], row[3])

    @staticmethod
    def _audit(row: Sequence[Any]) -> AuditRow:
        return AuditRow(int(row[0]), row[1], row[2], row[3], row[4], row[5], row[6], row[7], row[8] or "")

    @staticmethod
    def _snapshot(row: Sequence[Any]) -> WindowSnapshot:
        return WindowSnapshot(row[0], row[1], int(row[2]), row[3], bytes(row[4]), row[5])

    # -- one unit of work -------------------------------------------------------------
    def apply(self, writes: Sequence[Write], audit: Sequence[AuditDraft] = ()) -> Applied:
        """Every write, then every audit entry, in one transaction (see ``Store.apply``).

        The transaction holds the change-feed serialisation (``feed``) and the audit-chain
        serialisation (``audit``) from its start, so a policy revision and the audit entry
        that records it are numbered in the same critical section: per model, audit order
        is revision order, whatever the number of writers, processes or replicas.
        """
        writes = tuple(writes)
        drafts = tuple(audit)

        def work(conn: SqlConnection) -> Applied:
            results = tuple(self._write_in(conn, write) for write in writes)
            entries = tuple(
                self._append_audit_in(conn, lambda head, draft=draft: draft(results, head)) for draft in drafts
            )
            return Applied(results, entries)

        try:
            applied = self._transact(work, feed=bool(writes), audit=bool(drafts))
        except self._UNIQUE_VIOLATION as exc:  # only if a writer bypassed the serialisation
            if any(isinstance(w, CreateVersion) for w in writes):
                raise AlreadyExists(f"a concurrent writer registered the same version: {exc}") from exc
            raise ConflictError(f"a concurrent writer bypassed the store's serialisation: {exc}") from exc
        if writes:
            self._wake()
        return applied

    def _write_in(self, conn: SqlConnection, write: Write) -> Any:
        if isinstance(write, SetPolicy):
            return self._set_policy_in(conn, write)
        if isinstance(write, UpdateVersion):
            return self._update_version_in(conn, write)
        if isinstance(write, AddRecord):
            return self._add_record_in(conn, write)
        if isinstance(write, CreateVersion):
            return self._create_version_in(conn, write.record)
        raise TypeError(f"not a store write: {write!r}")

    # -- model versions -------------------------------------------------------------
    def create_version(self, record: VersionRecord) -> None:
        self.apply([CreateVersion(record)])

    def _create_version_in(self, conn: SqlConnection, record: VersionRecord) -> None:
        exists = self._exec(
            conn,
            "SELECT 1 FROM versions WHERE model = ? AND version = ?",
            (record.model, record.version),
        ).fetchone()
        if exists:
            raise AlreadyExists(
                f"model {record.model!r} version {record.version!r} is already registered"
            )
        self._exec(
            conn,
            f"INSERT INTO versions ({self._VERSION_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                record.model,
                record.version,
                record.state,
                record.artifact_path,
                record.sha256,
                record.registered_by,
                record.registered_at,
                record.updated_at,
                _dumps(record.metadata),
            ),
        )
        self._record_change(conn, ChangeKind.VERSION, record.model, record.version)

    def update_version(
        self,
        model: str,
        version: str,
        *,
        state: str,
        expected_state: str | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> VersionRecord:
        result: VersionRecord = self.apply(
            [UpdateVersion(model, version, state, expected_state, metadata)]
        ).results[0]
        return result

    def _update_version_in(self, conn: SqlConnection, write: UpdateVersion) -> VersionRecord:
        model, version = write.model, write.version
        row = self._exec(
            conn,
            f"SELECT {self._VERSION_COLUMNS} FROM versions WHERE model = ? AND version = ?"
            f"{self._FOR_UPDATE}",
            (model, version),
        ).fetchone()
        if row is None:
            raise NotFound(f"model {model!r} version {version!r} is not registered")
        current = self._version(row)
        if write.expected_state is not None and current.state != write.expected_state:
            raise ConflictError(
                f"model {model!r} version {version!r} is {current.state!r}, "
                f"expected {write.expected_state!r} (changed concurrently)"
            )
        merged = dict(current.metadata)
        if write.metadata:
            merged.update(write.metadata)
        now = utc_now_iso()
        self._exec(
            conn,
            "UPDATE versions SET state = ?, metadata = ?, updated_at = ? "
            "WHERE model = ? AND version = ?",
            (write.state, _dumps(merged), now, model, version),
        )
        self._record_change(conn, ChangeKind.VERSION, model, version)
        return replace(current, state=write.state, updated_at=now, metadata=merged)

    def get_version(self, model: str, version: str) -> VersionRecord | None:
        rows = self._select(
            f"SELECT {self._VERSION_COLUMNS} FROM versions WHERE model = ? AND version = ?",
            (model, version),
        )
        return self._version(rows[0]) if rows else None

    def list_versions(self, model: str | None = None) -> list[VersionRecord]:
        if model is None:
            rows = self._select(f"SELECT {self._VERSION_COLUMNS} FROM versions")
        else:
            rows = self._select(
                f"SELECT {self._VERSION_COLUMNS} FROM versions WHERE model = ?", (model,)
            )
        return sorted_versions([self._version(r) for r in rows])

    # -- records ----------------------------------------------------------------------
    def add_record(
        self, kind: RecordKind, model: str, version: str, actor: str, body: Mapping[str, Any]
    ) -> StoredRecord:
        result: StoredRecord = self.apply([AddRecord(RecordKind(kind), model, version, actor, body)]).results[0]
        return result

    def _add_record_in(self, conn: SqlConnection, write: AddRecord) -> StoredRecord:
        now = utc_now_iso()
        text = _dumps(write.body)
        kind = RecordKind(write.kind)
        record_id = self._insert_id(
            conn,
            "INSERT INTO records (kind, model, version, actor, time, body) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (kind.value, write.model, write.version, write.actor, now, text),
        )
        self._record_change(conn, ChangeKind.RECORD, write.model, write.version)
        return StoredRecord(record_id, kind, write.model, write.version, write.actor, now, json.loads(text))

    def list_records(
        self,
        kind: RecordKind | None = None,
        model: str | None = None,
        version: str | None = None,
    ) -> list[StoredRecord]:
        clauses: list[str] = []
        params: list[Any] = []
        for column, value in (("kind", kind), ("model", model), ("version", version)):
            if value is not None:
                clauses.append(f"{column} = ?")
                params.append(str(value))
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        rows = self._select(
            f"SELECT id, kind, model, version, actor, time, body FROM records {where} ORDER BY id",
            params,
        )
        return [self._record(r) for r in rows]

    # -- policies ---------------------------------------------------------------------
    def set_policy(
        self,
        model: str,
        document: Mapping[str, Any],
        actor: str,
        expected_revision: int | None = None,
    ) -> PolicyRecord:
        result: PolicyRecord = self.apply([SetPolicy(model, document, actor, expected_revision)]).results[0]
        return result

    def _set_policy_in(self, conn: SqlConnection, write: SetPolicy) -> PolicyRecord:
        text = _dumps(write.document)
        now = utc_now_iso()
        # The change-feed serialisation (``feed=True``) also serialises revision
        # numbering per model, so read-max-then-insert cannot race.
        row = self._exec(
            conn, "SELECT COALESCE(MAX(revision), 0) FROM policies WHERE model = ?", (write.model,)
        ).fetchone()
        current = int(row[0]) if row else 0
        if write.expected_revision is not None and write.expected_revision != current:
            raise ConflictError(
                f"traffic policy of {write.model!r} is at revision {current}, "
                f"expected {write.expected_revision} (changed concurrently)"
            )
        self._exec(
            conn,
            "INSERT INTO policies (model, revision, document, actor, time) VALUES (?, ?, ?, ?, ?)",
            (write.model, current + 1, text, write.actor, now),
        )
        self._record_change(conn, ChangeKind.POLICY, write.model, None)
        return PolicyRecord(write.model, current + 1, json.loads(text), write.actor, now)

    def get_policy(self, model: str) -> PolicyRecord | None:
        rows = self._select(
            "SELECT model, revision, document, actor, time FROM policies "
            "WHERE model = ? ORDER BY revision DESC LIMIT 1",
            (model,),
        )
        return self._policy(rows[0]) if rows else None

    def list_policies(self) -> list[PolicyRecord]:
        return [self._policy(r) for r in self._select(self._LATEST_POLICIES_SQL)]

    def policy_history(self, model: str) -> list[PolicyRecord]:
        rows = self._select(
            "SELECT model, revision, document, actor, time FROM policies "
            "WHERE model = ? ORDER BY revision",
            (model,),
        )
        return [self._policy(r) for r in rows]

    # -- change feed ----------------------------------------------------------------------
    def current_revision(self) -> int:
        return int(self._select("SELECT COALESCE(MAX(revision), 0) FROM changes")[0][0])

    def changes_since(self, revision: int) -> list[Change]:
        rows = self._select(
            "SELECT revision, kind, model, version FROM changes WHERE revision > ? ORDER BY revision",
            (int(revision),),
        )
        return [self._change(r) for r in rows]

    # -- audit --------------------------------------------------------------------------------
    def append_audit(self, build: AuditBuilder) -> AuditRow:
        """One entry on its own (a ``Store.apply`` with no writes)."""
        entry: AuditRow = self.apply((), [lambda _results, head: build(head)]).entries[0]
        return entry

    def _append_audit_in(self, conn: SqlConnection, build: AuditBuilder) -> AuditRow:
        """Read the head, build the next entry, insert it.

        Correct only inside the store's audit serialisation (``_transact(audit=True)``),
        which keeps the chain linear across writers.
        """
        row = self._exec(
            conn, f"SELECT {self._AUDIT_COLUMNS} FROM audit ORDER BY seq DESC LIMIT 1"
        ).fetchone()
        entry = build(self._audit(row) if row else None)
        self._exec(
            conn,
            f"INSERT INTO audit ({self._AUDIT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                entry.seq,
                entry.time,
                entry.actor,
                entry.action,
                entry.subject,
                entry.details,
                entry.prev_hash,
                entry.hash,
                entry.key_id,
            ),
        )
        return entry

    def audit_head(self) -> AuditRow | None:
        rows = self._select(f"SELECT {self._AUDIT_COLUMNS} FROM audit ORDER BY seq DESC LIMIT 1")
        return self._audit(rows[0]) if rows else None

    def audit_entries(
        self,
        *,
        after_seq: int = 0,
        limit: int | None = None,
        model: str | None = None,
        since: str | None = None,
        subject: str | None = None,
    ) -> list[AuditRow]:
        clauses = ["seq > ?"]
        params: list[Any] = [int(after_seq)]
        if model is not None:
            # "M" or "M/...": a case-sensitive, byte-wise range ('/' + 1 == '0'),
            # unlike LIKE (PostgreSQL columns are COLLATE "C" for this).
            clauses.append("(subject = ? OR (subject >= ? AND subject < ?))")
            params.extend([model, model + "/", model + "0"])
        if subject is not None:
            clauses.append("subject = ?")
            params.append(subject)
        if since is not None:
            clauses.append("time >= ?")
            params.append(since)
        sql = f"SELECT {self._AUDIT_COLUMNS} FROM audit WHERE {' AND '.join(clauses)} ORDER BY seq"
        if limit is not None:
            sql += " LIMIT ?"
            params.append(int(limit))
        return [self._audit(r) for r in self._select(sql, params)]

    # -- window snapshots -------------------------------------------------------------------
    def put_snapshot(
        self, model: str, version: str, window: int, replica: str, payload: bytes
    ) -> None:
        def work(conn: SqlConnection) -> None:
            self._exec(
                conn,
                self._UPSERT_SNAPSHOT_SQL,
                (model, version, int(window), replica, bytes(payload), utc_now_iso()),
            )

        self._transact(work)

    def get_snapshots(self, model: str, version: str, window: int) -> list[WindowSnapshot]:
        rows = self._select(
            "SELECT model, version, window_id, replica, payload, time FROM snapshots "
            "WHERE model = ? AND version = ? AND window_id = ? ORDER BY replica",
            (model, version, int(window)),
        )
        return [self._snapshot(r) for r in rows]

    def latest_window(self, model: str, version: str) -> int | None:
        value = self._select(
            "SELECT MAX(window_id) FROM snapshots WHERE model = ? AND version = ?",
            (model, version),
        )[0][0]
        return None if value is None else int(value)

    def prune_snapshots(self, before_window: int) -> int:
        def work(conn: SqlConnection) -> int:
            cursor = self._exec(
                conn, "DELETE FROM snapshots WHERE window_id < ?", (int(before_window),)
            )
            return int(cursor.rowcount)

        return self._transact(work)

    # -- lifecycle ----------------------------------------------------------------------------
    @abstractmethod
    def close(self) -> None:
        """Release connections (and threads); the store is unusable afterwards."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
