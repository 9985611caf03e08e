"""``PostgresStore``: the control-plane store shared by many replicas (psycopg 3).

Same semantics as ``SQLiteStore`` (the contract tests run against both); what differs
is how the guarantees are obtained across machines:

* **Change feed.** Every registry/record/policy write inserts a ``changes`` row and
  runs ``NOTIFY lockgate_changes, '<revision>'`` in the same transaction (delivered on
  commit). The write first takes ``pg_advisory_xact_lock(CHANGES_LOCK)``, so revisions
  commit in revision order and ``changes_since`` can never skip a revision that commits
  late. A listener thread (one ``LISTEN`` connection per store) wakes
  ``wait_for_changes``; a short poll remains as the safety net for lost notifications.
* **Audit chain.** A unit that appends to the chain (``apply`` with audit drafts, and so
  ``append_audit``) takes ``pg_advisory_xact_lock(AUDIT_LOCK)`` before reading the head,
  so appends from any number of replicas form one linear chain; a governance change and
  its audit entry commit in one transaction.
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

import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

import psycopg
from psycopg import sql as pgsql

from lockgate.errors import StoreError
from lockgate.control.sql_store import SqlStore, apply_migrations
from lockgate.control.store import Change, ChangeKind, utc_now_iso

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
    (
        # Keyed entries: ``hash`` is an HMAC under the key named here ('' = written before
        # audit keys, plain SHA-256). Inserts go at the head only: seq = max + 1, so a
        # gap cannot be filled in later and an upsert cannot land on an existing row.
        "ALTER TABLE audit ADD COLUMN key_id TEXT NOT NULL DEFAULT ''",
        """CREATE FUNCTION lockgate_audit_at_head() RETURNS trigger
           LANGUAGE plpgsql AS $$
           BEGIN
             IF NEW.seq <> (SELECT COALESCE(MAX(seq), 0) + 1 FROM audit) THEN
               RAISE EXCEPTION 'audit trail is append-only: entry seq % is not at the head', NEW.seq;
             END IF;
             RETURN NEW;
           END $$""",
        """CREATE TRIGGER audit_at_head BEFORE INSERT ON audit
           FOR EACH ROW EXECUTE FUNCTION lockgate_audit_at_head()""",
    ),
)

SCHEMA_VERSION = len(MIGRATIONS)


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
        apply_migrations(
            conn,
            current,
            migrations,
            lambda version: conn.execute(
                "INSERT INTO schema_migrations (version, applied_at) VALUES (%s, %s)",
                (version, utc_now_iso()),
            ),
        )
    return len(migrations)


class _CommitFailed(Exception):
    """Internal: the connection failed while COMMIT was in flight (outcome unknown)."""

    def __init__(self, cause: psycopg.Error) -> None:
        super().__init__(str(cause))
        self.cause = cause


class PostgresStore(SqlStore):
    """PostgreSQL implementation of ``lockgate.control.store.Store``.

    ``url`` is a libpq URL (``postgresql://user:pass@host:5432/db``). ``pool_size``
    bounds concurrent connections; ``connect_timeout`` bounds how long an unreachable
    server can block a call; ``poll_interval`` is the safety-net re-read of
    ``wait_for_changes`` when a notification is lost. The queries live in
    ``SqlStore``; this class owns connections, transactions, locks and LISTEN/NOTIFY.
    """

    _FOR_UPDATE = " FOR UPDATE"
    _LATEST_POLICIES_SQL = (
        "SELECT DISTINCT ON (model) model, revision, document, actor, time FROM policies "
        "ORDER BY model, revision DESC"
    )
    _UPSERT_SNAPSHOT_SQL = (
        "INSERT INTO snapshots (model, version, window_id, replica, payload, time) "
        "VALUES (?, ?, ?, ?, ?, ?) "
        "ON CONFLICT (model, version, window_id, replica) "
        "DO UPDATE SET payload = EXCLUDED.payload, time = EXCLUDED.time"
    )
    # The exists check runs under CHANGES_LOCK, so this fires only if a writer
    # bypassed the lock; it still means "already registered".
    _UNIQUE_VIOLATION = (psycopg.errors.UniqueViolation,)

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

    def _transact(
        self, work: Callable[[psycopg.Connection[Any]], T], *, feed: bool = False, audit: bool = False
    ) -> T:
        """``work`` in one transaction (``_run``: one retry if the connection is lost before COMMIT).

        ``feed``: take ``CHANGES_LOCK`` first. An identity column alone would let a later
        revision commit before an earlier one, and ``changes_since`` could then skip the
        late one; holding the lock from the transaction's start makes revisions commit in
        revision order (and serialises policy revision numbering per model).
        ``audit``: take ``AUDIT_LOCK`` (after ``CHANGES_LOCK``, always in that order, so two
        units never wait on each other) before the chain head is read, so appends from any
        number of replicas form one linear chain.
        """
        locks = ([CHANGES_LOCK] if feed else []) + ([AUDIT_LOCK] if audit else [])
        if not locks:
            return self._run(work, write=True)

        def locked(conn: psycopg.Connection[Any]) -> T:
            for lock in locks:
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (lock,))
            return work(conn)

        return self._run(locked, write=True)

    def _q(self, sql: str) -> str:
        """psycopg uses ``%s`` placeholders (the shared SQL has no literal ``?`` or ``%``)."""
        return sql.replace("?", "%s")

    def _read(self, query: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        return self._run(lambda conn: list(conn.execute(query, params).fetchall()), write=False)  # type: ignore[arg-type]

    def _wake(self) -> None:
        with self._changed:
            self._events += 1
            self._changed.notify_all()

    def _record_change(
        self, conn: psycopg.Connection[Any], kind: ChangeKind, model: str, version: str | None
    ) -> None:
        """Insert the change row and queue its NOTIFY (sent on commit).

        Runs inside ``_transact(feed=True)``, which holds ``CHANGES_LOCK`` from the start.
        """
        row = conn.execute(
            "INSERT INTO changes (kind, model, version) VALUES (%s, %s, %s) RETURNING revision",
            (kind.value, model, version),
        ).fetchone()
        assert row is not None
        conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, str(int(row[0]))))

    def _insert_id(self, conn: psycopg.Connection[Any], sql: str, params: Sequence[Any]) -> int:
        row = conn.execute(self._q(sql) + " RETURNING id", params).fetchone()  # type: ignore[arg-type]
        assert row is not None
        return int(row[0])

    # -- change feed -------------------------------------------------------------------
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
