"""``SQLiteStore``: the embedded control-plane store, one file in the state dir.

Concurrency model (why it is safe):

* **Threads**: every thread gets its own ``sqlite3`` connection (thread-local),
  so no connection is ever shared mid-statement. WAL lets readers run while
  one writer writes.
* **Processes**: several lockgate workers may open the same file. Every write
  runs in ``BEGIN IMMEDIATE``, which takes SQLite's single RESERVED lock up
  front; the audit append reads the chain head and inserts the next entry
  inside that one transaction, so the chain stays linear across processes.
  Waiting writers block in SQLite's busy handler (``busy_timeout``).
* **Schema**: ``PRAGMA user_version`` records how many entries of
  ``MIGRATIONS`` were applied. Opening applies the missing ones, in order,
  inside ``BEGIN IMMEDIATE`` (re-checking the version under the lock), so two
  processes opening a fresh file at once migrate it exactly once.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lockgate.control.errors import (
    AlreadyExistsError,
    ConflictError,
    NotFoundError,
    StoreError,
)
from lockgate.control.store import (
    AuditBuilder,
    AuditRow,
    Change,
    ChangeKind,
    PolicyRecord,
    RecordKind,
    StoredRecord,
    VersionRecord,
    WindowSnapshot,
    sorted_versions,
    utc_now_iso,
)

DB_FILENAME = "lockgate.db"

# Ordered schema migrations: entry i brings user_version from i to i + 1.
# Never edit an applied entry; append a new one.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE versions (
            model TEXT NOT NULL,
            version TEXT NOT NULL,
            state TEXT NOT NULL,
            artifact_path TEXT NOT NULL,
            sha256 TEXT NOT NULL,
            registered_by TEXT NOT NULL,
            registered_at TEXT NOT NULL,
            updated_at TEXT NOT NULL,
            metadata TEXT NOT NULL DEFAULT '{}',
            PRIMARY KEY (model, version)
        )""",
        """CREATE TABLE records (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            kind TEXT NOT NULL,
            model TEXT NOT NULL,
            version TEXT NOT NULL,
            actor TEXT NOT NULL,
            time TEXT NOT NULL,
            body TEXT NOT NULL
        )""",
        "CREATE INDEX records_by_version ON records (model, version, kind)",
        """CREATE TABLE policies (
            model TEXT NOT NULL,
            revision INTEGER NOT NULL,
            document TEXT NOT NULL,
            actor TEXT NOT NULL,
            time TEXT NOT NULL,
            PRIMARY KEY (model, revision)
        )""",
        """CREATE TABLE changes (
            revision INTEGER PRIMARY KEY AUTOINCREMENT,
            kind TEXT NOT NULL,
            model TEXT NOT NULL,
            version TEXT
        )""",
        """CREATE TABLE audit (
            seq INTEGER PRIMARY KEY,
            time TEXT NOT NULL,
            actor TEXT NOT NULL,
            action TEXT NOT NULL,
            subject TEXT NOT NULL,
            details TEXT NOT NULL,
            prev_hash TEXT NOT NULL,
            hash TEXT NOT NULL
        )""",
        "CREATE INDEX audit_by_subject ON audit (subject)",
        "CREATE INDEX audit_by_time ON audit (time)",
        """CREATE TABLE snapshots (
            model TEXT NOT NULL,
            version TEXT NOT NULL,
            window_id INTEGER NOT NULL,
            replica TEXT NOT NULL,
            payload BLOB NOT NULL,
            time TEXT NOT NULL,
            PRIMARY KEY (model, version, window_id, replica)
        )""",
    ),
    (
        # Append-only at the database level: ordinary code paths cannot
        # rewrite history. (Someone with file access can drop these; the hash
        # chain is what detects that.)
        """CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit
           BEGIN SELECT RAISE(ABORT, 'audit trail is append-only'); END""",
        """CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit
           BEGIN SELECT RAISE(ABORT, 'audit trail is append-only'); END""",
    ),
)

SCHEMA_VERSION = len(MIGRATIONS)


def resolve_db_path(path: str | Path) -> Path:
    """A directory (existing, or a not-yet-created path without suffix) means ``<dir>/lockgate.db``."""
    target = Path(path)
    if target.is_dir() or (not target.exists() and target.suffix == ""):
        return target / DB_FILENAME
    return target


def _dumps(value: Mapping[str, Any]) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def migrate(
    conn: sqlite3.Connection, migrations: Sequence[Sequence[str]] = MIGRATIONS
) -> int:
    """Apply the missing ``migrations`` to ``conn``; return the resulting version.

    ``conn`` must be in autocommit mode (``isolation_level=None``).
    """
    conn.execute("BEGIN IMMEDIATE")
    try:
        current = int(conn.execute("PRAGMA user_version").fetchone()[0])
        if current > len(migrations):
            raise StoreError(
                f"database schema version {current} is newer than this lockgate "
                f"understands ({len(migrations)}); upgrade lockgate"
            )
        for index in range(current, len(migrations)):
            for statement in migrations[index]:
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {index + 1}")
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return len(migrations)


class SQLiteStore:
    """SQLite implementation of ``lockgate.control.store.Store``.

    ``path`` is the database file, or a directory (the ``--state-dir``, created
    if missing) in which ``lockgate.db`` is used. ``poll_interval`` bounds how long
    ``wait_for_changes`` takes to notice a change made by another process.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        busy_timeout: float = 30.0,
        poll_interval: float = 0.1,
    ) -> None:
        target = resolve_db_path(path)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create state directory {target.parent}: {exc}") from exc
        self.path = target
        self._busy_timeout = busy_timeout
        self._poll_interval = poll_interval
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._connections_lock = threading.Lock()
        self._changed = threading.Condition()
        self._closed = False
        conn = self._conn()
        try:
            migrate(conn)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot migrate {self.path}: {exc}") from exc

    # -- connections ----------------------------------------------------
    def _conn(self) -> sqlite3.Connection:
        if self._closed:
            raise StoreError("store is closed")
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is not None:
            return conn
        try:
            conn = sqlite3.connect(
                str(self.path),
                timeout=self._busy_timeout,
                isolation_level=None,
                check_same_thread=False,  # only so close() may close it
            )
            conn.execute("PRAGMA journal_mode = WAL")
            # FULL: control-plane writes are rare and the audit must survive power loss.
            conn.execute("PRAGMA synchronous = FULL")
            conn.execute("PRAGMA foreign_keys = ON")
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open {self.path}: {exc}") from exc
        self._local.conn = conn
        with self._connections_lock:
            self._connections.append(conn)
        return conn

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One serialised write transaction (``BEGIN IMMEDIATE``)."""
        conn = self._conn()
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise StoreError(f"cannot start write transaction on {self.path}: {exc}") from exc
        try:
            yield conn
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            self._rollback(conn)
            raise StoreError(f"write failed on {self.path}: {exc}") from exc
        except BaseException:
            self._rollback(conn)
            raise

    @staticmethod
    def _rollback(conn: sqlite3.Connection) -> None:
        if conn.in_transaction:
            conn.execute("ROLLBACK")

    def _read(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        conn = self._conn()
        try:
            return list(conn.execute(sql, params).fetchall())
        except sqlite3.Error as exc:
            raise StoreError(f"read failed on {self.path}: {exc}") from exc

    def _notify(self) -> None:
        with self._changed:
            self._changed.notify_all()

    @staticmethod
    def _record_change(
        conn: sqlite3.Connection, kind: ChangeKind, model: str, version: str | None
    ) -> None:
        conn.execute(
            "INSERT INTO changes (kind, model, version) VALUES (?, ?, ?)",
            (kind.value, model, version),
        )

    # -- model versions -------------------------------------------------
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

    _VERSION_COLUMNS = (
        "model, version, state, artifact_path, sha256, registered_by, "
        "registered_at, updated_at, metadata"
    )

    def create_version(self, record: VersionRecord) -> None:
        with self._write() as conn:
            exists = conn.execute(
                "SELECT 1 FROM versions WHERE model = ? AND version = ?",
                (record.model, record.version),
            ).fetchone()
            if exists:
                raise AlreadyExistsError(
                    f"model {record.model!r} version {record.version!r} is already registered"
                )
            conn.execute(
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
        self._notify()

    def update_version(
        self,
        model: str,
        version: str,
        *,
        state: str,
        expected_state: str | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> VersionRecord:
        with self._write() as conn:
            row = conn.execute(
                f"SELECT {self._VERSION_COLUMNS} FROM versions WHERE model = ? AND version = ?",
                (model, version),
            ).fetchone()
            if row is None:
                raise NotFoundError(f"model {model!r} version {version!r} is not registered")
            current = self._version(row)
            if expected_state is not None and current.state != expected_state:
                raise ConflictError(
                    f"model {model!r} version {version!r} is {current.state!r}, "
                    f"expected {expected_state!r} (changed concurrently)"
                )
            merged = dict(current.metadata)
            if metadata:
                merged.update(metadata)
            now = utc_now_iso()
            conn.execute(
                "UPDATE versions SET state = ?, metadata = ?, updated_at = ? "
                "WHERE model = ? AND version = ?",
                (state, _dumps(merged), now, model, version),
            )
            self._record_change(conn, ChangeKind.VERSION, model, version)
        self._notify()
        return VersionRecord(
            model=current.model,
            version=current.version,
            state=state,
            artifact_path=current.artifact_path,
            sha256=current.sha256,
            registered_by=current.registered_by,
            registered_at=current.registered_at,
            updated_at=now,
            metadata=merged,
        )

    def get_version(self, model: str, version: str) -> VersionRecord | None:
        rows = self._read(
            f"SELECT {self._VERSION_COLUMNS} FROM versions WHERE model = ? AND version = ?",
            (model, version),
        )
        return self._version(rows[0]) if rows else None

    def list_versions(self, model: str | None = None) -> list[VersionRecord]:
        if model is None:
            rows = self._read(f"SELECT {self._VERSION_COLUMNS} FROM versions")
        else:
            rows = self._read(
                f"SELECT {self._VERSION_COLUMNS} FROM versions WHERE model = ?", (model,)
            )
        return sorted_versions([self._version(r) for r in rows])

    # -- records ----------------------------------------------------------
    def add_record(
        self, kind: RecordKind, model: str, version: str, actor: str, body: Mapping[str, Any]
    ) -> StoredRecord:
        now = utc_now_iso()
        text = _dumps(body)
        with self._write() as conn:
            cursor = conn.execute(
                "INSERT INTO records (kind, model, version, actor, time, body) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (RecordKind(kind).value, model, version, actor, now, text),
            )
            record_id = int(cursor.lastrowid or 0)
            self._record_change(conn, ChangeKind.RECORD, model, version)
        self._notify()
        return StoredRecord(record_id, RecordKind(kind), model, version, actor, now, json.loads(text))

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
        rows = self._read(
            f"SELECT id, kind, model, version, actor, time, body FROM records {where} ORDER BY id",
            params,
        )
        return [
            StoredRecord(r[0], RecordKind(r[1]), r[2], r[3], r[4], r[5], json.loads(r[6]))
            for r in rows
        ]

    # -- policies ---------------------------------------------------------
    @staticmethod
    def _policy(row: Sequence[Any]) -> PolicyRecord:
        return PolicyRecord(
            model=row[0], revision=int(row[1]), document=json.loads(row[2]), actor=row[3], time=row[4]
        )

    def set_policy(
        self,
        model: str,
        document: Mapping[str, Any],
        actor: str,
        expected_revision: int | None = None,
    ) -> PolicyRecord:
        text = _dumps(document)
        now = utc_now_iso()
        with self._write() as conn:
            current = int(
                conn.execute(
                    "SELECT COALESCE(MAX(revision), 0) FROM policies WHERE model = ?", (model,)
                ).fetchone()[0]
            )
            if expected_revision is not None and expected_revision != current:
                raise ConflictError(
                    f"traffic policy of {model!r} is at revision {current}, "
                    f"expected {expected_revision} (changed concurrently)"
                )
            revision = current + 1
            conn.execute(
                "INSERT INTO policies (model, revision, document, actor, time) VALUES (?, ?, ?, ?, ?)",
                (model, revision, text, actor, now),
            )
            self._record_change(conn, ChangeKind.POLICY, model, None)
        self._notify()
        return PolicyRecord(model, revision, json.loads(text), actor, now)

    def get_policy(self, model: str) -> PolicyRecord | None:
        rows = self._read(
            "SELECT model, revision, document, actor, time FROM policies "
            "WHERE model = ? ORDER BY revision DESC LIMIT 1",
            (model,),
        )
        return self._policy(rows[0]) if rows else None

    def list_policies(self) -> list[PolicyRecord]:
        rows = self._read(
            "SELECT p.model, p.revision, p.document, p.actor, p.time FROM policies p "
            "JOIN (SELECT model, MAX(revision) AS revision FROM policies GROUP BY model) latest "
            "ON p.model = latest.model AND p.revision = latest.revision ORDER BY p.model"
        )
        return [self._policy(r) for r in rows]

    def policy_history(self, model: str) -> list[PolicyRecord]:
        rows = self._read(
            "SELECT model, revision, document, actor, time FROM policies "
            "WHERE model = ? ORDER BY revision",
            (model,),
        )
        return [self._policy(r) for r in rows]

    # -- change feed --------------------------------------------------------
    def current_revision(self) -> int:
        return int(self._read("SELECT COALESCE(MAX(revision), 0) FROM changes")[0][0])

    def changes_since(self, revision: int) -> list[Change]:
        rows = self._read(
            "SELECT revision, kind, model, version FROM changes WHERE revision > ? ORDER BY revision",
            (revision,),
        )
        return [Change(int(r[0]), ChangeKind(r[1]), r[2], r[3]) for r in rows]

    def wait_for_changes(self, revision: int, timeout: float) -> list[Change]:
        """Wake at once on writes from this process; poll for other processes."""
        deadline = time.monotonic() + max(0.0, timeout)
        while True:
            changes = self.changes_since(revision)
            remaining = deadline - time.monotonic()
            if changes or remaining <= 0:
                return changes
            with self._changed:
                self._changed.wait(min(remaining, self._poll_interval))

    # -- audit ----------------------------------------------------------------
    _AUDIT_COLUMNS = "seq, time, actor, action, subject, details, prev_hash, hash"

    @staticmethod
    def _audit(row: Sequence[Any]) -> AuditRow:
        return AuditRow(int(row[0]), row[1], row[2], row[3], row[4], row[5], row[6], row[7])

    def append_audit(self, build: AuditBuilder) -> AuditRow:
        with self._write() as conn:
            row = conn.execute(
                f"SELECT {self._AUDIT_COLUMNS} FROM audit ORDER BY seq DESC LIMIT 1"
            ).fetchone()
            entry = build(self._audit(row) if row else None)
            conn.execute(
                f"INSERT INTO audit ({self._AUDIT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    entry.seq,
                    entry.time,
                    entry.actor,
                    entry.action,
                    entry.subject,
                    entry.details,
                    entry.prev_hash,
                    entry.hash,
                ),
            )
        return entry

    def audit_head(self) -> AuditRow | None:
        rows = self._read(f"SELECT {self._AUDIT_COLUMNS} FROM audit ORDER BY seq DESC LIMIT 1")
        return self._audit(rows[0]) if rows else None

    def audit_entries(
        self,
        *,
        after_seq: int = 0,
        limit: int | None = None,
        model: str | None = None,
        since: str | None = None,
    ) -> list[AuditRow]:
        clauses = ["seq > ?"]
        params: list[Any] = [after_seq]
        if model is not None:
            # "M" or "M/...": a case-sensitive range ('/' + 1 == '0'), unlike LIKE.
            clauses.append("(subject = ? OR (subject >= ? AND subject < ?))")
            params.extend([model, model + "/", model + "0"])
        if since is not None:
            clauses.append("time >= ?")
            params.append(since)
        sql = f"SELECT {self._AUDIT_COLUMNS} FROM audit WHERE {' AND '.join(clauses)} ORDER BY seq"
        if limit is not None:
            sql += " LIMIT ?"
            params.append(int(limit))
        return [self._audit(r) for r in self._read(sql, params)]

    # -- window snapshots -------------------------------------------------------
    def put_snapshot(
        self, model: str, version: str, window: int, replica: str, payload: bytes
    ) -> None:
        with self._write() as conn:
            conn.execute(
                "INSERT OR REPLACE INTO snapshots (model, version, window_id, replica, payload, time) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (model, version, int(window), replica, bytes(payload), utc_now_iso()),
            )

    def get_snapshots(self, model: str, version: str, window: int) -> list[WindowSnapshot]:
        rows = self._read(
            "SELECT model, version, window_id, replica, payload, time FROM snapshots "
            "WHERE model = ? AND version = ? AND window_id = ? ORDER BY replica",
            (model, version, int(window)),
        )
        return [WindowSnapshot(r[0], r[1], int(r[2]), r[3], bytes(r[4]), r[5]) for r in rows]

    def latest_window(self, model: str, version: str) -> int | None:
        value = self._read(
            "SELECT MAX(window_id) FROM snapshots WHERE model = ? AND version = ?",
            (model, version),
        )[0][0]
        return None if value is None else int(value)

    def prune_snapshots(self, before_window: int) -> int:
        with self._write() as conn:
            cursor = conn.execute("DELETE FROM snapshots WHERE window_id < ?", (int(before_window),))
            return int(cursor.rowcount)

    # -- lifecycle --------------------------------------------------------------
    def schema_version(self) -> int:
        return int(self._read("PRAGMA user_version")[0][0])

    def close(self) -> None:
        """Close every thread's connection; the store is unusable afterwards."""
        self._closed = True
        with self._connections_lock:
            connections, self._connections = self._connections, []
        for conn in connections:
            try:
                conn.close()
            except sqlite3.Error:
                pass
        self._local = threading.local()
        self._notify()

    def __enter__(self) -> SQLiteStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
