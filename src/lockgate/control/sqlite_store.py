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
* **Group commit**: writes are durable at COMMIT (``synchronous = FULL``: one fsync of
  the WAL, ~1-5 ms on ordinary disks), so one transaction per write would cap every
  writer at a few hundred commits per second. Units of work from all threads go to one
  committer thread, which runs the units waiting at that moment in one transaction, each
  in its own SAVEPOINT (a unit that fails, e.g. a lost compare-and-set, rolls back alone)
  and commits them with one fsync. No caller returns before its unit is durable.
* **Schema**: ``PRAGMA user_version`` records how many entries of
  ``MIGRATIONS`` were applied. Opening applies the missing ones, in order,
  inside ``BEGIN IMMEDIATE`` (re-checking the version under the lock), so two
  processes opening a fresh file at once migrate it exactly once.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from lockgate.errors import StoreError
from lockgate.control.sql_store import SqlStore, apply_migrations
from lockgate.control.store import Change, ChangeKind

T = TypeVar("T")

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
    (
        # Keyed entries: ``hash`` is an HMAC under the key named here ('' = written before
        # audit keys, plain SHA-256). Inserts go at the head only (seq = max + 1): this
        # refuses INSERT OR REPLACE / REPLACE / UPSERT over an existing row (REPLACE's
        # implicit delete fires no DELETE trigger) and filling a gap after a deletion.
        "ALTER TABLE audit ADD COLUMN key_id TEXT NOT NULL DEFAULT ''",
        """CREATE TRIGGER audit_at_head BEFORE INSERT ON audit
           WHEN NEW.seq IS NOT (SELECT COALESCE(MAX(seq), 0) + 1 FROM audit)
           BEGIN SELECT RAISE(ABORT, 'audit trail is append-only: entries are added at the head'); END""",
    ),
)

SCHEMA_VERSION = len(MIGRATIONS)

#: Most units one group commit runs together (bounds how long the write lock is held).
MAX_GROUP = 256


def resolve_db_path(path: str | Path) -> Path:
    """A directory (existing, or a not-yet-created path without suffix) means ``<dir>/lockgate.db``."""
    target = Path(path)
    if target.is_dir() or (not target.exists() and target.suffix == ""):
        return target / DB_FILENAME
    return target


def migrate(
    conn: sqlite3.Connection, migrations: Sequence[Sequence[str]] = MIGRATIONS
) -> int:
    """Apply the missing ``migrations`` to ``conn``; return the resulting version.

    ``conn`` must be in autocommit mode (``isolation_level=None``).
    """
    conn.execute("BEGIN IMMEDIATE")
    try:
        current = int(conn.execute("PRAGMA user_version").fetchone()[0])
        apply_migrations(
            conn, current, migrations, lambda version: conn.execute(f"PRAGMA user_version = {version}")
        )
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return len(migrations)


class _Unit:
    """One caller's unit of work waiting for the next group commit."""

    __slots__ = ("work", "done", "result", "error")

    def __init__(self, work: Callable[[sqlite3.Connection], object]) -> None:
        self.work = work
        self.done = threading.Event()
        self.result: object = None
        self.error: BaseException | None = None


class SQLiteStore(SqlStore):
    """SQLite implementation of ``lockgate.control.store.Store``.

    ``path`` is the database file, or a directory (the ``--state-dir``, created
    if missing) in which ``lockgate.db`` is used. ``poll_interval`` bounds how long
    ``wait_for_changes`` takes to notice a change made by another process.
    The queries live in ``SqlStore``; this class owns connections, transactions
    and waiting.
    """

    _LATEST_POLICIES_SQL = (
        "SELECT p.model, p.revision, p.document, p.actor, p.time FROM policies p "
        "JOIN (SELECT model, MAX(revision) AS revision FROM policies GROUP BY model) latest "
        "ON p.model = latest.model AND p.revision = latest.revision ORDER BY p.model"
    )
    _UPSERT_SNAPSHOT_SQL = (
        "INSERT OR REPLACE INTO snapshots (model, version, window_id, replica, payload, time) "
        "VALUES (?, ?, ?, ?, ?, ?)"
    )

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
        self._units: deque[_Unit] = deque()
        self._units_ready = threading.Condition()
        self._committer: threading.Thread | None = None
        self.group_commits = 0  # transactions committed by the committer thread
        self.grouped_units = 0  # units they carried
        conn = self._conn()
        try:
            migrate(conn)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot migrate {self.path}: {exc}") from exc

    # -- connections ----------------------------------------------------
    def _conn(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is not None:  # (the committer finishes its queue on close with its own)
            return conn
        if self._closed:
            raise StoreError("store is closed")
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

    def _transact(
        self, work: Callable[[sqlite3.Connection], T], *, feed: bool = False, audit: bool = False
    ) -> T:
        """``work`` in the next group commit; returns once it is durable (or raises).

        ``feed``/``audit`` need nothing more: ``BEGIN IMMEDIATE`` already holds SQLite's
        one write lock for the whole transaction, so change revisions commit in order and
        the chain head cannot move underneath.
        """
        if threading.current_thread() is self._committer:
            raise RuntimeError("a unit of work must not start another one")
        unit = _Unit(work)
        with self._units_ready:
            if self._closed:
                raise StoreError("store is closed")
            if self._committer is None:
                self._committer = threading.Thread(target=self._commit_loop, name="lockgate-sqlite-commit",
                                                   daemon=True)
                self._committer.start()
            self._units.append(unit)
            self._units_ready.notify()
        unit.done.wait()
        if unit.error is not None:
            raise unit.error
        return unit.result  # type: ignore[return-value]

    def _commit_loop(self) -> None:
        while True:
            with self._units_ready:
                while not self._units and not self._closed:
                    self._units_ready.wait()
                if not self._units:
                    return
                batch = [self._units.popleft() for _ in range(min(len(self._units), MAX_GROUP))]
            self._commit_group(batch)

    def _commit_group(self, batch: list[_Unit]) -> None:
        """Run ``batch`` in one transaction, each unit in a SAVEPOINT; commit once."""
        try:
            with self._write() as conn:
                for unit in batch:
                    conn.execute("SAVEPOINT lockgate_unit")
                    try:
                        unit.result = unit.work(conn)
                    except sqlite3.Error:
                        raise  # the database itself failed (disk full, I/O): the whole group fails
                    except BaseException as exc:  # the unit's own refusal: undo it alone
                        conn.execute("ROLLBACK TO lockgate_unit")
                        unit.error = exc
                    conn.execute("RELEASE lockgate_unit")
            self.group_commits += 1
            self.grouped_units += len(batch)
        except BaseException as exc:  # BEGIN, a statement or COMMIT failed: nothing is durable
            failure = exc if isinstance(exc, StoreError) else StoreError(f"write failed on {self.path}: {exc}")
            for unit in batch:
                if unit.error is None:
                    unit.error, unit.result = failure, None
        finally:
            for unit in batch:
                unit.done.set()

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

    def _wake(self) -> None:
        with self._changed:
            self._changed.notify_all()

    def _record_change(
        self, conn: sqlite3.Connection, kind: ChangeKind, model: str, version: str | None
    ) -> None:
        conn.execute(
            "INSERT INTO changes (kind, model, version) VALUES (?, ?, ?)",
            (kind.value, model, version),
        )

    def _insert_id(self, conn: sqlite3.Connection, sql: str, params: Sequence[Any]) -> int:
        return int(conn.execute(sql, params).lastrowid or 0)

    # -- change feed --------------------------------------------------------
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

    # -- lifecycle --------------------------------------------------------------
    def schema_version(self) -> int:
        return int(self._read("PRAGMA user_version")[0][0])

    def close(self) -> None:
        """Finish the queued units, then close every thread's connection; the store is
        unusable afterwards."""
        with self._units_ready:
            self._closed = True
            self._units_ready.notify_all()
            committer = self._committer
        if committer is not None and committer is not threading.current_thread():
            committer.join(timeout=60.0)
        with self._connections_lock:
            connections, self._connections = self._connections, []
        for conn in connections:
            try:
                conn.close()
            except sqlite3.Error:
                pass
        self._local = threading.local()
        self._wake()
