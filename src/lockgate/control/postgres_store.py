"""``PostgresStore``: the control-plane store shared by many replicas (psycopg 3).

Same semantics as ``SQLiteStore`` (the contract tests run against both); what differs
is how the guarantees are obtained across machines:

* **Change feed.** Every registry/record/policy write inserts a ``changes`` row and
  runs ``NOTIFY lockgate_changes, '<revision>'`` in the same transaction (delivered on
  commit). The write first takes ``pg_advisory_xact_lock(CHANGES_LOCK)``, so revisions
  commit in revision order and ``changes_since`` can never skip a revision that commits
  late. A listener thread (one ``LISTEN`` connection per store) wakes
  ``wait_for_changes``; a short poll remains as the safety net for lost notifications.
* **Audit chain.** ``append_audit`` takes ``pg_advisory_xact_lock(AUDIT_LOCK)`` before
  reading the head, so appends from any number of replicas form one linear chain.
* **Schema.** ``schema_migrations`` lists applied versions; opening applies the missing
  entries of ``MIGRATIONS`` under ``pg_advisory_xact_lock(MIGRATION_LOCK)``.
* **Text order.** Text columns use ``COLLATE "C"`` so ordering and the subject range
  filter compare bytes, exactly like SQLite, whatever the database locale.
* **Connections.** A small pool of autocommit connections: bounded, failing fast with
  ``StoreError`` when the server is unreachable (callers such as ``ResilientStore``
  decide what to do), and dropping every idle connection after a connection error so a
  restarted server is reconnected to at once. Work that failed before ``COMMIT`` was
  sent is retried once on a fresh connection; a failure during ``COMMIT`` is not (the
  outcome is unknown) and surfaces as ``StoreError``.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

import psycopg
from psycopg import sql as pgsql

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

log = logging.getLogger(__name__)

T = TypeVar("T")

CHANNEL = "lockgate_changes"
# Advisory lock keys (arbitrary, fixed, distinct; "lockgate" in ASCII as a prefix).
MIGRATION_LOCK = 0x6C6B6774_00000001
CHANGES_LOCK = 0x6C6B6774_00000002
AUDIT_LOCK = 0x6C6B6774_00000003

# Ordered schema migrations: entry i is schema version i + 1. Never edit an applied
# entry; append a new one.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE versions (
            model TEXT COLLATE "C" NOT NULL,
            version TEXT COLLATE "C" NOT NULL,
            state TEXT NOT NULL,
            artifact_path TEXT NOT NULL,
            sha256 TEXT NOT NULL,
            registered_by TEXT NOT NULL,
            registered_at TEXT COLLATE "C" NOT NULL,
            updated_at TEXT COLLATE "C" NOT NULL,
            metadata TEXT NOT NULL DEFAULT '{}',
            PRIMARY KEY (model, version)
        )""",
        """CREATE TABLE records (
            id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            kind TEXT NOT NULL,
            model TEXT COLLATE "C" NOT NULL,
            version TEXT COLLATE "C" NOT NULL,
            actor TEXT NOT NULL,
            time TEXT COLLATE "C" NOT NULL,
            body TEXT NOT NULL
        )""",
        "CREATE INDEX records_by_version ON records (model, version, kind)",
        """CREATE TABLE policies (
            model TEXT COLLATE "C" NOT NULL,
            revision BIGINT NOT NULL,
            document TEXT NOT NULL,
            actor TEXT NOT NULL,
            time TEXT COLLATE "C" NOT NULL,
            PRIMARY KEY (model, revision)
        )""",
        """CREATE TABLE changes (
            revision BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            kind TEXT NOT NULL,
            model TEXT COLLATE "C" NOT NULL,
            version TEXT COLLATE "C"
        )""",
        """CREATE TABLE audit (
            seq BIGINT PRIMARY KEY,
            time TEXT COLLATE "C" NOT NULL,
            actor TEXT NOT NULL,
            action TEXT NOT NULL,
            subject TEXT COLLATE "C" NOT NULL,
            details TEXT NOT NULL,
            prev_hash TEXT NOT NULL,
            hash TEXT NOT NULL
        )""",
        "CREATE INDEX audit_by_subject ON audit (subject)",
        "CREATE INDEX audit_by_time ON audit (time)",
        """CREATE TABLE snapshots (
            model TEXT COLLATE "C" NOT NULL,
            version TEXT COLLATE "C" NOT NULL,
            window_id BIGINT NOT NULL,
            replica TEXT COLLATE "C" NOT NULL,
            payload BYTEA NOT NULL,
            time TEXT COLLATE "C" NOT NULL,
            PRIMARY KEY (model, version, window_id, replica)
        )""",
    ),
    (
        # Append-only at the database level (the hash chain detects what bypasses it).
        """CREATE FUNCTION lockgate_audit_append_only() RETURNS trigger
           LANGUAGE plpgsql AS $$
           BEGIN RAISE EXCEPTION 'audit trail is append-only'; END $$""",
        """CREATE TRIGGER audit_no_update BEFORE UPDATE OR DELETE ON audit
           FOR EACH ROW EXECUTE FUNCTION lockgate_audit_append_only()""",
        """CREATE TRIGGER audit_no_truncate BEFORE TRUNCATE ON audit
           FOR EACH STATEMENT EXECUTE FUNCTION lockgate_audit_append_only()""",
    ),
)

SCHEMA_VERSION = len(MIGRATIONS)


def _dumps(value: Mapping[str, Any]) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _redact_dsn(dsn: str) -> str:
    """The DSN without its password, for error messages."""
    try:
        info = psycopg.conninfo.conninfo_to_dict(dsn)
    except psycopg.Error:
        return "<unparsable dsn>"
    host = info.get("host", "localhost")
    return f"postgresql://{info.get('user', '')}@{host}:{info.get('port', 5432)}/{info.get('dbname', '')}"


def migrate(conn: psycopg.Connection[Any], migrations: Sequence[Sequence[str]] = MIGRATIONS) -> int:
    """Apply the missing ``migrations`` (once, even with several replicas starting)."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
        conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            "version INTEGER PRIMARY KEY, applied_at TEXT NOT NULL)"
        )
        row = conn.execute("SELECT COALESCE(MAX(version), 0) FROM schema_migrations").fetchone()
        current = int(row[0]) if row else 0
        if current > len(migrations):
            raise StoreError(
                f"database schema version {current} is newer than this lockgate "
                f"understands ({len(migrations)}); upgrade lockgate"
            )
        for index in range(current, len(migrations)):
            for statement in migrations[index]:
                conn.execute(statement)  # type: ignore[arg-type]  # fixed, trusted DDL
            conn.execute(
                "INSERT INTO schema_migrations (version, applied_at) VALUES (%s, %s)",
                (index + 1, utc_now_iso()),
            )
    return len(migrations)


class _CommitFailed(Exception):
    """Internal: the connection failed while COMMIT was in flight (outcome unknown)."""

    def __init__(self, cause: psycopg.Error) -> None:
        super().__init__(str(cause))
        self.cause = cause


class PostgresStore:
    """PostgreSQL implementation of ``lockgate.control.store.Store``.

    ``url`` is a libpq URL (``postgresql://user:pass@host:5432/db``). ``pool_size``
    bounds concurrent connections; ``connect_timeout`` bounds how long an unreachable
    server can block a call; ``poll_interval`` is the safety-net re-read of
    ``wait_for_changes`` when a notification is lost.
    """

    def __init__(
        self,
        url: str,
        *,
        pool_size: int = 8,
        connect_timeout: float = 5.0,
        acquire_timeout: float = 30.0,
        poll_interval: float = 0.5,
        application_name: str = "lockgate",
    ) -> None:
        self.url = url
        self.display_url = _redact_dsn(url)
        self._connect_kwargs: dict[str, Any] = {
            "connect_timeout": max(1, int(round(connect_timeout))),
            "application_name": application_name,
            # Notice a dead peer (and let the server notice us) instead of hanging.
            "keepalives": 1,
            "keepalives_idle": 10,
            "keepalives_interval": 5,
            "keepalives_count": 3,
        }
        self._acquire_timeout = acquire_timeout
        self._poll_interval = poll_interval
        self._slots = threading.BoundedSemaphore(pool_size)
        self._idle: list[psycopg.Connection[Any]] = []
        self._idle_lock = threading.Lock()
        self._closed = False
        self._changed = threading.Condition()
        self._events = 0  # bumped by the listener and by local writes
        self._listener: threading.Thread | None = None
        self._listener_lock = threading.Lock()
        self._stop = threading.Event()
        self.listener_errors = 0
        with self._connection() as conn:
            try:
                migrate(conn)
            except psycopg.Error as exc:
                raise StoreError(f"cannot migrate {self.display_url}: {exc}") from exc

    # -- connections ---------------------------------------------------------
    def _connect(self) -> psycopg.Connection[Any]:
        try:
            return psycopg.connect(self.url, autocommit=True, **self._connect_kwargs)
        except psycopg.Error as exc:
            raise StoreError(f"PostgreSQL unreachable at {self.display_url}: {exc}") from exc

    def _drop_idle(self) -> None:
        with self._idle_lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    @contextmanager
    def _connection(self) -> Iterator[psycopg.Connection[Any]]:
        """Borrow a connection; a broken one is discarded (with every idle one)."""
        if self._closed:
            raise StoreError("store is closed")
        if not self._slots.acquire(timeout=self._acquire_timeout):
            raise StoreError(f"no free PostgreSQL connection after {self._acquire_timeout}s")
        conn: psycopg.Connection[Any] | None = None
        try:
            with self._idle_lock:
                conn = self._idle.pop() if self._idle else None
            if conn is None or conn.closed:
                conn = self._connect()
            yield conn
        except (psycopg.OperationalError, psycopg.InterfaceError, _CommitFailed):
            if conn is not None:
                conn.close()
            self._drop_idle()
            raise
        finally:
            if conn is not None and not conn.closed:
                if conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE and not self._closed:
                    with self._idle_lock:
                        self._idle.append(conn)
                else:
                    conn.close()
            self._slots.release()

    def _run(self, work: Callable[[psycopg.Connection[Any]], T], *, write: bool) -> T:
        """Run ``work`` (in one transaction when ``write``), retrying once on a lost connection."""
        for attempt in (1, 2):
            try:
                with self._connection() as conn:
                    if not write:
                        return work(conn)
                    tx = conn.transaction()
                    tx.__enter__()
                    try:
                        result = work(conn)
                    except BaseException as exc:
                        try:
                            tx.__exit__(type(exc), exc, exc.__traceback__)
                        except psycopg.Error:
                            pass  # the connection is gone: the original error tells more
                        raise
                    try:
                        tx.__exit__(None, None, None)
                    except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
                        raise _CommitFailed(exc) from exc
                    return result
            except _CommitFailed as exc:
                raise StoreError(
                    f"connection to {self.display_url} lost during commit; outcome unknown: {exc.cause}"
                ) from exc.cause
            except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
                if attempt == 2 or self._closed:
                    raise StoreError(f"PostgreSQL at {self.display_url} failed: {exc}") from exc
                log.info("PostgreSQL connection lost (%s); retrying on a fresh connection", exc)
            except psycopg.errors.UniqueViolation:
                raise
            except psycopg.Error as exc:
                raise StoreError(f"PostgreSQL at {self.display_url} failed: {exc}") from exc
        raise StoreError("unreachable")  # pragma: no cover - the loop always returns or raises

    def _read(self, query: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        return self._run(lambda conn: list(conn.execute(query, params).fetchall()), write=False)  # type: ignore[arg-type]

    def _wake(self) -> None:
        with self._changed:
            self._events += 1
            self._changed.notify_all()

    @staticmethod
    def _record_change(
        conn: psycopg.Connection[Any], kind: ChangeKind, model: str, version: str | None
    ) -> None:
        """Insert the change row and queue its NOTIFY (sent on commit).

        Callers hold ``CHANGES_LOCK`` (``_lock_changes``) from the transaction's start.
        """
        row = conn.execute(
            "INSERT INTO changes (kind, model, version) VALUES (%s, %s, %s) RETURNING revision",
            (kind.value, model, version),
        ).fetchone()
        assert row is not None
        conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, str(int(row[0]))))

    @staticmethod
    def _lock_changes(conn: psycopg.Connection[Any]) -> None:
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (CHANGES_LOCK,))

    # -- model versions ---------------------------------------------------------
    _VERSION_COLUMNS = (
        "model, version, state, artifact_path, sha256, registered_by, "
        "registered_at, updated_at, metadata"
    )

    @staticmethod
    def _version(row: Sequence[Any]) -> VersionRecord:
        return VersionRecord(
            model=row[0], version=row[1], state=row[2], artifact_path=row[3], sha256=row[4],
            registered_by=row[5], registered_at=row[6], updated_at=row[7], metadata=json.loads(row[8]),
        )

    def create_version(self, record: VersionRecord) -> None:
        def work(conn: psycopg.Connection[Any]) -> None:
            self._lock_changes(conn)
            exists = conn.execute(
                "SELECT 1 FROM versions WHERE model = %s AND version = %s",
                (record.model, record.version),
            ).fetchone()
            if exists:
                raise AlreadyExistsError(
                    f"model {record.model!r} version {record.version!r} is already registered"
                )
            conn.execute(
                f"INSERT INTO versions ({self._VERSION_COLUMNS}) "
                "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)",
                (
                    record.model, record.version, record.state, record.artifact_path, record.sha256,
                    record.registered_by, record.registered_at, record.updated_at, _dumps(record.metadata),
                ),
            )
            self._record_change(conn, ChangeKind.VERSION, record.model, record.version)

        try:
            self._run(work, write=True)
        except psycopg.errors.UniqueViolation as exc:
            raise AlreadyExistsError(
                f"model {record.model!r} version {record.version!r} is already registered"
            ) from exc
        self._wake()

    def update_version(
        self,
        model: str,
        version: str,
        *,
        state: str,
        expected_state: str | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> VersionRecord:
        def work(conn: psycopg.Connection[Any]) -> VersionRecord:
            self._lock_changes(conn)
            row = conn.execute(
                f"SELECT {self._VERSION_COLUMNS} FROM versions WHERE model = %s AND version = %s FOR UPDATE",
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
                "UPDATE versions SET state = %s, metadata = %s, updated_at = %s "
                "WHERE model = %s AND version = %s",
                (state, _dumps(merged), now, model, version),
            )
            self._record_change(conn, ChangeKind.VERSION, model, version)
            return VersionRecord(
                model=current.model, version=current.version, state=state,
                artifact_path=current.artifact_path, sha256=current.sha256,
                registered_by=current.registered_by, registered_at=current.registered_at,
                updated_at=now, metadata=merged,
            )

        result = self._run(work, write=True)
        self._wake()
        return result

    def get_version(self, model: str, version: str) -> VersionRecord | None:
        rows = self._read(
            f"SELECT {self._VERSION_COLUMNS} FROM versions WHERE model = %s AND version = %s",
            (model, version),
        )
        return self._version(rows[0]) if rows else None

    def list_versions(self, model: str | None = None) -> list[VersionRecord]:
        if model is None:
            rows = self._read(f"SELECT {self._VERSION_COLUMNS} FROM versions")
        else:
            rows = self._read(f"SELECT {self._VERSION_COLUMNS} FROM versions WHERE model = %s", (model,))
        return sorted_versions([self._version(r) for r in rows])

    # -- records ------------------------------------------------------------------
    def add_record(
        self, kind: RecordKind, model: str, version: str, actor: str, body: Mapping[str, Any]
    ) -> StoredRecord:
        now = utc_now_iso()
        text = _dumps(body)
        kind = RecordKind(kind)

        def work(conn: psycopg.Connection[Any]) -> int:
            self._lock_changes(conn)
            row = conn.execute(
                "INSERT INTO records (kind, model, version, actor, time, body) "
                "VALUES (%s, %s, %s, %s, %s, %s) RETURNING id",
                (kind.value, model, version, actor, now, text),
            ).fetchone()
            assert row is not None
            self._record_change(conn, ChangeKind.RECORD, model, version)
            return int(row[0])

        record_id = self._run(work, write=True)
        self._wake()
        return StoredRecord(record_id, kind, model, version, actor, now, json.loads(text))

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
                clauses.append(f"{column} = %s")
                params.append(str(value))
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        rows = self._read(
            f"SELECT id, kind, model, version, actor, time, body FROM records {where} ORDER BY id", params
        )
        return [
            StoredRecord(int(r[0]), RecordKind(r[1]), r[2], r[3], r[4], r[5], json.loads(r[6])) for r in rows
        ]

    # -- policies -------------------------------------------------------------------
    @staticmethod
    def _policy(row: Sequence[Any]) -> PolicyRecord:
        return PolicyRecord(model=row[0], revision=int(row[1]), document=json.loads(row[2]), actor=row[3], time=row[4])

    def set_policy(
        self,
        model: str,
        document: Mapping[str, Any],
        actor: str,
        expected_revision: int | None = None,
    ) -> PolicyRecord:
        text = _dumps(document)
        now = utc_now_iso()

        def work(conn: psycopg.Connection[Any]) -> int:
            self._lock_changes(conn)  # also serialises revision numbering per model
            row = conn.execute(
                "SELECT COALESCE(MAX(revision), 0) FROM policies WHERE model = %s", (model,)
            ).fetchone()
            current = int(row[0]) if row else 0
            if expected_revision is not None and expected_revision != current:
                raise ConflictError(
                    f"traffic policy of {model!r} is at revision {current}, "
                    f"expected {expected_revision} (changed concurrently)"
                )
            conn.execute(
                "INSERT INTO policies (model, revision, document, actor, time) VALUES (%s, %s, %s, %s, %s)",
                (model, current + 1, text, actor, now),
            )
            self._record_change(conn, ChangeKind.POLICY, model, None)
            return current + 1

        revision = self._run(work, write=True)
        self._wake()
        return PolicyRecord(model, revision, json.loads(text), actor, now)

    def get_policy(self, model: str) -> PolicyRecord | None:
        rows = self._read(
            "SELECT model, revision, document, actor, time FROM policies "
            "WHERE model = %s ORDER BY revision DESC LIMIT 1",
            (model,),
        )
        return self._policy(rows[0]) if rows else None

    def list_policies(self) -> list[PolicyRecord]:
        rows = self._read(
            "SELECT DISTINCT ON (model) model, revision, document, actor, time FROM policies "
            "ORDER BY model, revision DESC"
        )
        return [self._policy(r) for r in rows]

    def policy_history(self, model: str) -> list[PolicyRecord]:
        rows = self._read(
            "SELECT model, revision, document, actor, time FROM policies WHERE model = %s ORDER BY revision",
            (model,),
        )
        return [self._policy(r) for r in rows]

    # -- change feed -------------------------------------------------------------------
    def current_revision(self) -> int:
        return int(self._read("SELECT COALESCE(MAX(revision), 0) FROM changes")[0][0])

    def changes_since(self, revision: int) -> list[Change]:
        rows = self._read(
            "SELECT revision, kind, model, version FROM changes WHERE revision > %s ORDER BY revision",
            (int(revision),),
        )
        return [Change(int(r[0]), ChangeKind(r[1]), r[2], r[3]) for r in rows]

    def wait_for_changes(self, revision: int, timeout: float) -> list[Change]:
        """Wake on NOTIFY (any replica) or a local write; re-read every ``poll_interval``."""
        self._ensure_listener()
        deadline = time.monotonic() + max(0.0, timeout)
        while True:
            with self._changed:
                seen = self._events
            changes = self.changes_since(revision)
            remaining = deadline - time.monotonic()
            if changes or remaining <= 0:
                return changes
            with self._changed:
                if self._events == seen and not self._closed:
                    self._changed.wait(min(remaining, self._poll_interval))

    def _ensure_listener(self) -> None:
        with self._listener_lock:
            if self._listener is None and not self._closed:
                self._listener = threading.Thread(target=self._listen, name="lockgate-pg-listen", daemon=True)
                self._listener.start()

    def _listen(self) -> None:
        """Own one LISTEN connection; reconnect with backoff when it drops."""
        backoff = 0.0
        while not self._stop.is_set():
            try:
                conn = psycopg.connect(self.url, autocommit=True, **self._connect_kwargs)
            except psycopg.Error as exc:
                self.listener_errors += 1
                backoff = min(5.0, max(0.1, backoff * 2))
                log.debug("LISTEN connection failed (%s); retrying in %.1fs", exc, backoff)
                self._stop.wait(backoff)
                continue
            try:
                conn.execute(pgsql.SQL("LISTEN {}").format(pgsql.Identifier(CHANNEL)))
                backoff = 0.0
                self._wake()  # anything committed while we were not listening: re-read
                while not self._stop.is_set():
                    for _ in conn.notifies(timeout=1.0, stop_after=1):
                        self._wake()
            except psycopg.Error as exc:
                if not self._stop.is_set():
                    self.listener_errors += 1
                    log.debug("LISTEN connection lost (%s)", exc)
                    self._stop.wait(0.2)
            finally:
                conn.close()

    # -- audit ----------------------------------------------------------------------------
    _AUDIT_COLUMNS = "seq, time, actor, action, subject, details, prev_hash, hash"

    @staticmethod
    def _audit(row: Sequence[Any]) -> AuditRow:
        return AuditRow(int(row[0]), row[1], row[2], row[3], row[4], row[5], row[6], row[7])

    def append_audit(self, build: AuditBuilder) -> AuditRow:
        def work(conn: psycopg.Connection[Any]) -> AuditRow:
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (AUDIT_LOCK,))
            row = conn.execute(
                f"SELECT {self._AUDIT_COLUMNS} FROM audit ORDER BY seq DESC LIMIT 1"
            ).fetchone()
            entry = build(self._audit(row) if row else None)
            conn.execute(
                f"INSERT INTO audit ({self._AUDIT_COLUMNS}) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
                (entry.seq, entry.time, entry.actor, entry.action, entry.subject,
                 entry.details, entry.prev_hash, entry.hash),
            )
            return entry

        try:
            return self._run(work, write=True)
        except psycopg.errors.UniqueViolation as exc:  # only if someone bypassed the lock
            raise ConflictError(f"audit chain head moved concurrently: {exc}") from exc

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
        clauses = ["seq > %s"]
        params: list[Any] = [int(after_seq)]
        if model is not None:
            # "M" or "M/...": a byte-wise range ('/' + 1 == '0') under COLLATE "C".
            clauses.append("(subject = %s OR (subject >= %s AND subject < %s))")
            params.extend([model, model + "/", model + "0"])
        if since is not None:
            clauses.append("time >= %s")
            params.append(since)
        query = f"SELECT {self._AUDIT_COLUMNS} FROM audit WHERE {' AND '.join(clauses)} ORDER BY seq"
        if limit is not None:
            query += " LIMIT %s"
            params.append(int(limit))
        return [self._audit(r) for r in self._read(query, params)]

    # -- window snapshots ---------------------------------------------------------------------
    def put_snapshot(self, model: str, version: str, window: int, replica: str, payload: bytes) -> None:
        def work(conn: psycopg.Connection[Any]) -> None:
            conn.execute(
                "INSERT INTO snapshots (model, version, window_id, replica, payload, time) "
                "VALUES (%s, %s, %s, %s, %s, %s) "
                "ON CONFLICT (model, version, window_id, replica) "
                "DO UPDATE SET payload = EXCLUDED.payload, time = EXCLUDED.time",
                (model, version, int(window), replica, bytes(payload), utc_now_iso()),
            )

        self._run(work, write=True)

    def get_snapshots(self, model: str, version: str, window: int) -> list[WindowSnapshot]:
        rows = self._read(
            "SELECT model, version, window_id, replica, payload, time FROM snapshots "
            "WHERE model = %s AND version = %s AND window_id = %s ORDER BY replica",
            (model, version, int(window)),
        )
        return [WindowSnapshot(r[0], r[1], int(r[2]), r[3], bytes(r[4]), r[5]) for r in rows]

    def latest_window(self, model: str, version: str) -> int | None:
        value = self._read(
            "SELECT MAX(window_id) FROM snapshots WHERE model = %s AND version = %s", (model, version)
        )[0][0]
        return None if value is None else int(value)

    def prune_snapshots(self, before_window: int) -> int:
        def work(conn: psycopg.Connection[Any]) -> int:
            cursor = conn.execute("DELETE FROM snapshots WHERE window_id < %s", (int(before_window),))
            return int(cursor.rowcount)

        return self._run(work, write=True)

    # -- lifecycle -------------------------------------------------------------------------------
    def schema_version(self) -> int:
        return int(self._read("SELECT COALESCE(MAX(version), 0) FROM schema_migrations")[0][0])

    def close(self) -> None:
        """Stop the listener and close every idle connection; the store is unusable afterwards."""
        self._closed = True
        self._stop.set()
        if self._listener is not None:
            self._listener.join(timeout=5.0)
        self._drop_idle()
        self._wake()

    def __enter__(self) -> PostgresStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
