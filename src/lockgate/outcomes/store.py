"""The prediction ledger and outcome windows in the control-plane database.

SQLite by default (the state dir's ``lockgate.db``), PostgreSQL for a fleet, so a label can
reach any replica: the join runs in the shared database. ``OutcomeStore`` works over the
control plane's own ``SqlStore`` (its connections, transactions and error mapping: every
driver failure is a ``StoreError``) and keeps its tables apart from the control-plane
schema: ``outcome_*`` tables, their own migration list and version table, so neither schema
history has to know the other.

Row layout (why a prediction fits in well under 128 bytes on disk): rows are appended in
rowid order (cheap: a random-key primary key measured twice the insert cost), the join key
is a 63-bit hash of (request id, row) in a unique index, the model version is a small integer
(``outcome_series``), times are integer milliseconds, and only multiclass rows carry their
probability vector (float32). One more index, (series, time), serves retention by age and by
row cap.

* ``outcome_series``: (model, version) -> id, rows kept, and the newest evicted time.
* ``outcome_predictions``: key, series, time, predicted class, score (P(positive), top
  probability or regression value), probabilities (multiclass), joint segment cell, and the
  label with its arrival time once feedback joins it.
* ``outcome_expired``: keys evicted by retention, kept one more ``max_age`` so a late label
  is counted as expired rather than unknown.
* ``outcome_windows``: each replica's serialised window state per (model, version, window).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from lockgate.control.sql_store import SqlStore
from lockgate.control.store import Store, open_store, utc_now_iso
from lockgate.errors import StoreError

log = logging.getLogger("lockgate.outcomes.store")

T = TypeVar("T")

#: PostgreSQL advisory lock of the outcome migrations (the control plane's are ...0001-0003).
MIGRATION_LOCK = 0x6C6B6774_00000011
_CHUNK = 900  # keys per IN (...) list on SQLite

_SQLITE_MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE outcome_series (
            id INTEGER PRIMARY KEY,
            model TEXT NOT NULL,
            version TEXT NOT NULL,
            n_rows INTEGER NOT NULL DEFAULT 0,
            evicted_before INTEGER NOT NULL DEFAULT 0,
            UNIQUE (model, version)
        )""",
        """CREATE TABLE outcome_predictions (
            id INTEGER PRIMARY KEY,
            key INTEGER NOT NULL,
            series INTEGER NOT NULL,
            time INTEGER NOT NULL,
            predicted INTEGER,
            score REAL,
            probs BLOB,
            cell INTEGER NOT NULL,
            label REAL,
            label_time INTEGER
        )""",
        "CREATE UNIQUE INDEX outcome_predictions_by_key ON outcome_predictions (key)",
        "CREATE INDEX outcome_predictions_by_time ON outcome_predictions (series, time)",
        """CREATE TABLE outcome_expired (
            key INTEGER PRIMARY KEY,
            series INTEGER NOT NULL,
            evicted_at INTEGER NOT NULL
        )""",
        "CREATE INDEX outcome_expired_by_time ON outcome_expired (evicted_at)",
        """CREATE TABLE outcome_windows (
            model TEXT NOT NULL,
            version TEXT NOT NULL,
            span_ms INTEGER NOT NULL,
            window_id INTEGER NOT NULL,
            replica TEXT NOT NULL,
            payload BLOB NOT NULL,
            updated_at TEXT NOT NULL,
            PRIMARY KEY (model, version, span_ms, window_id, replica)
        )""",
    ),
)

_POSTGRES_MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE outcome_series (
            id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            model TEXT COLLATE "C" NOT NULL,
            version TEXT COLLATE "C" NOT NULL,
            n_rows BIGINT NOT NULL DEFAULT 0,
            evicted_before BIGINT NOT NULL DEFAULT 0,
            UNIQUE (model, version)
        )""",
        """CREATE TABLE outcome_predictions (
            id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            key BIGINT NOT NULL,
            series INTEGER NOT NULL,
            time BIGINT NOT NULL,
            predicted SMALLINT,
            score DOUBLE PRECISION,
            probs BYTEA,
            cell INTEGER NOT NULL,
            label DOUBLE PRECISION,
            label_time BIGINT
        )""",
        "CREATE UNIQUE INDEX outcome_predictions_by_key ON outcome_predictions (key)",
        "CREATE INDEX outcome_predictions_by_time ON outcome_predictions (series, time)",
        """CREATE TABLE outcome_expired (
            key BIGINT PRIMARY KEY,
            series INTEGER NOT NULL,
            evicted_at BIGINT NOT NULL
        )""",
        "CREATE INDEX outcome_expired_by_time ON outcome_expired (evicted_at)",
        """CREATE TABLE outcome_windows (
            model TEXT COLLATE "C" NOT NULL,
            version TEXT COLLATE "C" NOT NULL,
            span_ms BIGINT NOT NULL,
            window_id BIGINT NOT NULL,
            replica TEXT COLLATE "C" NOT NULL,
            payload BYTEA NOT NULL,
            updated_at TEXT NOT NULL,
            PRIMARY KEY (model, version, span_ms, window_id, replica)
        )""",
    ),
)

_UPSERT_WINDOW = (
    "INSERT INTO outcome_windows (model, version, span_ms, window_id, replica, payload, updated_at) "
    "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (model, version, span_ms, window_id, replica) "
    "DO UPDATE SET payload = excluded.payload, updated_at = excluded.updated_at"
)
_INSERT_PREDICTION = (
    "INSERT INTO outcome_predictions (key, series, time, predicted, score, probs, cell) "
    "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (key) DO NOTHING"
)


class KeyConflict(Exception):
    """Internal: some keys of a ledger batch are already stored (the batch was rolled back)."""


@dataclass(frozen=True, slots=True)
class WindowRow:
    """One replica's stored state of one window."""

    version: str
    window: int
    replica: str
    payload: bytes


@dataclass(frozen=True, slots=True)
class JoinedRow:
    """A stored prediction a label was joined to, in the order of the batch."""

    index: int  # position of the label in the batch
    series: int
    time_ms: int
    predicted: int | None
    score: float | None
    probs: bytes | None
    cell: int


LabelStatus = str  # "accepted" | "duplicate" | "unknown" | "expired" | "model_mismatch"
WindowUpsert = tuple[str, str, int, int, str, bytes]  # model, version, span_ms, window, replica, payload


class OutcomeStore:
    """Ledger and outcome windows over a control-plane ``SqlStore`` (see the module docstring)."""

    def __init__(self, sql: SqlStore) -> None:
        if not isinstance(sql, SqlStore):
            raise StoreError(f"the outcome ledger needs a SQL control-plane store, got {type(sql).__name__}")
        self.sql = sql
        self.postgres = sql._q("?") != "?"
        self._series: dict[tuple[str, str], int] = {}
        self._migrate()

    @classmethod
    def open(cls, location: str) -> "OutcomeStore":
        """A store of its own on ``location`` (own connections; no outage spool: the ledger counts its drops)."""
        store: Store = open_store(location)
        return cls(store)  # type: ignore[arg-type]

    def close(self) -> None:
        self.sql.close()

    # -- plumbing ------------------------------------------------------------------------
    def _transact(self, work: Callable[[Any], T]) -> T:
        """``work`` in one transaction, durable when this returns. On SQLite it runs on the
        calling thread's own connection (``BEGIN IMMEDIATE``: SQLite's write lock orders it
        with the control plane's group commits), not in the control plane's group commit:
        the ledger writer's connection is tuned for bulk inserts (``tune_writer``), and its
        batches are already grouped, so handing them to the committer's ``synchronous =
        FULL`` connection would cost an fsync and a thread hand-off per batch for nothing."""
        if self.postgres:
            return self.sql._transact(work)
        with self.sql._write() as conn:  # type: ignore[attr-defined]
            return work(conn)

    def _exec(self, conn: Any, sql: str, params: Sequence[Any] = ()) -> Any:
        return conn.execute(self.sql._q(sql), params)

    def _many(self, conn: Any, sql: str, rows: Sequence[Sequence[Any]]) -> int:
        """executemany; returns the rows it changed."""
        if not rows:
            return 0
        query = self.sql._q(sql)
        if self.postgres:
            with conn.cursor() as cursor:
                cursor.executemany(query, rows)
                return int(cursor.rowcount)
        cursor = conn.executemany(query, rows)
        return int(cursor.rowcount)

    def _read(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        return self.sql._read(self.sql._q(sql), params)

    def _in(self, column: str, values: Sequence[int]) -> tuple[str, list[Any]]:
        if self.postgres:
            return f"{column} = ANY(?)", [list(values)]
        return f"{column} IN ({','.join('?' * len(values))})", list(values)

    def _chunks(self, values: Sequence[int]) -> Iterable[Sequence[int]]:
        step = 50_000 if self.postgres else _CHUNK
        for start in range(0, len(values), step):
            yield values[start : start + step]

    def _migrate(self) -> None:
        migrations = _POSTGRES_MIGRATIONS if self.postgres else _SQLITE_MIGRATIONS

        def work(conn: Any) -> None:
            if self.postgres:
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
            self._exec(conn, "CREATE TABLE IF NOT EXISTS outcome_schema (version INTEGER NOT NULL)")
            row = self._exec(conn, "SELECT MAX(version) FROM outcome_schema").fetchone()
            current = int(row[0]) if row and row[0] is not None else 0
            if current > len(migrations):
                raise StoreError(f"outcome ledger schema version {current} is newer than this lockgate "
                                 f"understands ({len(migrations)}); upgrade lockgate")
            for index in range(current, len(migrations)):
                for statement in migrations[index]:
                    self._exec(conn, statement)
                self._exec(conn, "INSERT INTO outcome_schema (version) VALUES (?)", (index + 1,))

        self._transact(work)

    # -- series ------------------------------------------------------------------------------
    def series_id(self, model: str, version: str) -> int:
        """The small integer naming (model, version) in ledger rows (created on first use)."""
        key = (model, version)
        found = self._series.get(key)
        if found is not None:
            return found

        def work(conn: Any) -> int:
            self._exec(conn, "INSERT INTO outcome_series (model, version) VALUES (?, ?) "
                             "ON CONFLICT (model, version) DO NOTHING", (model, version))
            row = self._exec(conn, "SELECT id FROM outcome_series WHERE model = ? AND version = ?",
                             (model, version)).fetchone()
            return int(row[0])

        series = self._transact(work)
        self._series[key] = series
        return series

    def series_of(self, model: str) -> dict[int, str]:
        """Series id -> version of every version of ``model`` the ledger has seen."""
        rows = self._read("SELECT id, version FROM outcome_series WHERE model = ?", (model,))
        out = {int(r[0]): str(r[1]) for r in rows}
        for series, version in out.items():
            self._series[(model, version)] = series
        return out

    # -- predictions -----------------------------------------------------------------------------
    def write_predictions(self, rows: Sequence[tuple], counts: dict[int, int], windows: Sequence[WindowUpsert],
                          *, skip_existing: bool = False) -> int:
        """Insert ledger rows and upsert window states in one transaction; returns rows inserted.

        ``counts``: rows per series in ``rows``. A key already stored (a reused request id, or a
        hash collision) raises ``KeyConflict`` and nothing is written, unless ``skip_existing``:
        then the caller has already removed those rows (``existing_keys``) and the insert
        keeps the first prediction of a key.
        """
        def work(conn: Any) -> int:
            inserted = self._many(conn, _INSERT_PREDICTION, rows)
            if inserted != len(rows) and not skip_existing:
                raise KeyConflict(f"{len(rows) - inserted} of {len(rows)} keys already stored")
            for series, n in counts.items():
                self._exec(conn, "UPDATE outcome_series SET n_rows = n_rows + ? WHERE id = ?", (n, series))
            self._put_windows(conn, windows)
            return inserted

        return self._transact(work)

    def tune_writer(self) -> None:
        """On the ledger writer's own connection (SQLite): a larger page cache for the random
        key-index inserts, and ``synchronous = NORMAL`` (WAL: a power cut may lose the last
        batches of predictions, never corrupt the file; control-plane writes keep FULL)."""
        if not self.postgres:
            conn = self.sql._conn()  # type: ignore[attr-defined]
            conn.execute("PRAGMA cache_size = -65536")
            conn.execute("PRAGMA synchronous = NORMAL")

    def existing_keys(self, keys: Sequence[int]) -> set[int]:
        found: set[int] = set()
        for chunk in self._chunks(keys):
            clause, params = self._in("key", chunk)
            found.update(int(r[0]) for r in self._read(f"SELECT key FROM outcome_predictions WHERE {clause}", params))
        return found

    def _put_windows(self, conn: Any, windows: Sequence[WindowUpsert]) -> None:
        now = utc_now_iso()
        self._many(conn, _UPSERT_WINDOW, [(*w[:5], bytes(w[5]), now) for w in windows])

    # -- labels ------------------------------------------------------------------------------------
    def join_labels(
        self,
        series: dict[int, str],
        keys: Sequence[int],
        labels: Sequence[float],
        label_time_ms: int,
        contribute: Callable[[list[JoinedRow], list[float]], Sequence[WindowUpsert]],
    ) -> list[LabelStatus]:
        """Join a batch of labels with their predictions, exactly once, in one transaction.

        ``series``: the model's series (id -> version); a key of another model's prediction
        is ``model_mismatch``. Each newly joined row gets its label; ``contribute`` turns them
        into this replica's window updates, written in the same transaction, so a label is
        counted in the windows if and only if it is stored. Concurrent joins of the same key
        (threads, processes, replicas) serialise on the row (SQLite's write lock; PostgreSQL
        ``FOR UPDATE``): one accepts, the other sees a duplicate.
        """
        def work(conn: Any) -> list[LabelStatus]:
            found: dict[int, tuple] = {}
            lock = " FOR UPDATE" if self.postgres else ""
            unique = list(dict.fromkeys(keys))
            for chunk in self._chunks(unique):
                clause, params = self._in("key", chunk)
                for r in self._exec(conn, "SELECT key, series, time, predicted, score, probs, cell, label "
                                          f"FROM outcome_predictions WHERE {clause}{lock}", params).fetchall():
                    found[int(r[0])] = tuple(r)
            missing = [k for k in unique if k not in found]
            expired: set[int] = set()
            for chunk in self._chunks(missing):
                clause, params = self._in("key", chunk)
                expired.update(int(r[0]) for r in self._exec(
                    conn, f"SELECT key FROM outcome_expired WHERE {clause}", params).fetchall())
            statuses: list[LabelStatus] = []
            joined: list[JoinedRow] = []
            joined_labels: list[float] = []
            updates: list[tuple[float, int, int]] = []
            taken: set[int] = set()
            for index, (key, label) in enumerate(zip(keys, labels)):
                row = found.get(key)
                if row is None:
                    statuses.append("expired" if key in expired else "unknown")
                elif int(row[1]) not in series:
                    statuses.append("model_mismatch")
                elif row[7] is not None or key in taken:
                    statuses.append("duplicate")
                else:
                    taken.add(key)
                    statuses.append("accepted")
                    joined.append(JoinedRow(index, int(row[1]), int(row[2]), None if row[3] is None else int(row[3]),
                                            None if row[4] is None else float(row[4]),
                                            None if row[5] is None else bytes(row[5]), int(row[6])))
                    joined_labels.append(float(label))
                    updates.append((float(label), label_time_ms, key))
            self._many(conn, "UPDATE outcome_predictions SET label = ?, label_time = ? WHERE key = ?", updates)
            if joined:
                self._put_windows(conn, contribute(joined, joined_labels))
            return statuses

        return self._transact(work)

    # -- windows -----------------------------------------------------------------------------------
    def windows(self, model: str, span_ms: int, version: str | None = None, since_window: int | None = None) -> list[WindowRow]:
        clauses = ["model = ?", "span_ms = ?"]
        params: list[Any] = [model, int(span_ms)]
        if version is not None:
            clauses.append("version = ?")
            params.append(version)
        if since_window is not None:
            clauses.append("window_id >= ?")
            params.append(int(since_window))
        rows = self._read(
            f"SELECT version, window_id, replica, payload FROM outcome_windows WHERE {' AND '.join(clauses)} "
            "ORDER BY version, window_id, replica", params)
        return [WindowRow(str(r[0]), int(r[1]), str(r[2]), bytes(r[3])) for r in rows]

    def window_payload(self, model: str, version: str, span_ms: int, window: int, replica: str) -> bytes | None:
        rows = self._read("SELECT payload FROM outcome_windows WHERE model = ? AND version = ? AND span_ms = ? "
                          "AND window_id = ? AND replica = ?", (model, version, int(span_ms), int(window), replica))
        return bytes(rows[0][0]) if rows else None

    def window_spans(self, model: str) -> list[int]:
        return [int(r[0]) for r in self._read("SELECT DISTINCT span_ms FROM outcome_windows WHERE model = ?", (model,))]

    def put_windows(self, windows: Sequence[WindowUpsert]) -> None:
        self._transact(lambda conn: self._put_windows(conn, windows))

    # -- retention -------------------------------------------------------------------------------
    def evict(self, model: str, *, older_than_ms: int, max_rows: int, now_ms: int, tombstone_ms: int,
              history_before_ms: int, span_ms: int) -> int:
        """Retention for one model: by age, then by row cap; evicted keys become tombstones
        (``outcome_expired``) for ``tombstone_ms``; window states older than the history go.
        Returns the predictions evicted."""
        series = list(self.series_of(model))
        if not series:
            return 0

        def work(conn: Any) -> int:
            clause, params = self._in("series", series)
            evicted = self._evict_where(conn, clause, params, older_than_ms, now_ms)
            row = self._exec(conn, f"SELECT COALESCE(SUM(n_rows), 0) FROM outcome_series WHERE {clause.replace('series', 'id', 1)}",
                             params).fetchone()
            excess = int(row[0]) - max_rows
            if excess > 0:
                cut = self._exec(conn, f"SELECT time FROM outcome_predictions WHERE {clause} ORDER BY time LIMIT 1 OFFSET ?",
                                 [*params, excess - 1]).fetchone()
                if cut is not None:
                    evicted += self._evict_where(conn, clause, params, int(cut[0]) + 1, now_ms)
            self._exec(conn, "DELETE FROM outcome_expired WHERE evicted_at < ?", (now_ms - tombstone_ms,))
            self._exec(conn, "DELETE FROM outcome_windows WHERE model = ? AND span_ms = ? AND window_id < ?",
                       (model, span_ms, history_before_ms // max(span_ms, 1)))
            return evicted

        return self._transact(work)

    def _evict_where(self, conn: Any, clause: str, params: list[Any], before_ms: int, now_ms: int) -> int:
        """Move predictions with time < ``before_ms`` to the tombstones; keep the counts in step."""
        where = f"{clause} AND time < ?"
        counts = self._exec(conn, f"SELECT series, COUNT(*), MAX(time) FROM outcome_predictions WHERE {where} GROUP BY series",
                            [*params, before_ms]).fetchall()
        if not counts:
            return 0
        self._exec(conn, f"INSERT INTO outcome_expired (key, series, evicted_at) SELECT key, series, ? "
                         f"FROM outcome_predictions WHERE {where} ON CONFLICT (key) DO NOTHING", [now_ms, *params, before_ms])
        self._exec(conn, f"DELETE FROM outcome_predictions WHERE {where}", [*params, before_ms])
        for series, n, newest in counts:
            self._exec(conn, "UPDATE outcome_series SET n_rows = n_rows - ?, "
                             "evicted_before = CASE WHEN evicted_before > ? THEN evicted_before ELSE ? END WHERE id = ?",
                       (int(n), int(newest), int(newest), int(series)))
        return sum(int(n) for _, n, _ in counts)

    # -- inspection (tests, benchmarks, the report) ---------------------------------------------------
    def count_predictions(self, model: str, labeled: bool | None = None) -> int:
        series = list(self.series_of(model))
        if not series:
            return 0
        clause, params = self._in("series", series)
        if labeled is not None:
            clause += " AND label IS NOT NULL" if labeled else " AND label IS NULL"
        return int(self._read(f"SELECT COUNT(*) FROM outcome_predictions WHERE {clause}", params)[0][0])

    def rows_kept(self, model: str) -> dict[str, int]:
        return {str(r[0]): int(r[1]) for r in self._read(
            "SELECT version, n_rows FROM outcome_series WHERE model = ? ORDER BY version", (model,))}
