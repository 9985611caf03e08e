"""Leader election among replicas: one replica runs drift merging and canary analysis.

``LeaderElector`` holds a PostgreSQL *session-level* advisory lock on a dedicated
connection. Why that primitive: PostgreSQL releases it by itself when the holder's
session ends (process killed, pod deleted, connection cut), so no lease table, clock
or fencing token is needed; the others poll ``pg_try_advisory_lock`` every ``lease_s``
and one of them takes over within one lease period. The holder also pings its
connection every ``lease_s`` and steps down (``on_lost``) as soon as it fails, because
from that moment another replica may hold the lock.

``LocalLeader`` is the same interface for the embedded SQLite store (one machine:
always the leader).
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Callable
from typing import Protocol

try:
    import psycopg
except ImportError:  # the [postgres] extra is not installed: only LocalLeader can be used
    psycopg = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

Callback = Callable[[], None]


def lock_key(key: str | int) -> int:
    """A signed 64-bit advisory-lock key; strings are hashed so any name can be used."""
    if isinstance(key, int):
        if not -(1 << 63) <= key < (1 << 63):
            raise ValueError(f"advisory lock key {key} does not fit in 64 bits")
        return key
    digest = hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


class Leadership(Protocol):
    """What the server needs from an elector."""

    @property
    def is_leader(self) -> bool: ...

    def start(self) -> None: ...

    def wait_elected(self, timeout: float) -> bool: ...

    def release(self) -> None: ...


class _Callbacks:
    """Run the user's callbacks so that a failing one never stops the elector."""

    def __init__(self, on_elected: Callback | None, on_lost: Callback | None) -> None:
        self._on_elected = on_elected
        self._on_lost = on_lost
        self.callback_errors = 0

    def call(self, which: str) -> None:
        callback = self._on_elected if which == "elected" else self._on_lost
        if callback is None:
            return
        try:
            callback()
        except Exception:
            self.callback_errors += 1
            log.exception("leadership %s callback failed", which)


class LocalLeader:
    """Single-machine leadership: elected on ``start()``, lost on ``release()``."""

    def __init__(
        self,
        on_elected: Callback | None = None,
        on_lost: Callback | None = None,
    ) -> None:
        self._callbacks = _Callbacks(on_elected, on_lost)
        self._leader = threading.Event()

    @property
    def is_leader(self) -> bool:
        return self._leader.is_set()

    def start(self) -> None:
        if not self._leader.is_set():
            self._leader.set()
            self._callbacks.call("elected")

    def wait_elected(self, timeout: float) -> bool:
        return self._leader.wait(timeout)

    def release(self) -> None:
        if self._leader.is_set():
            self._leader.clear()
            self._callbacks.call("lost")


class LeaderElector:
    """PostgreSQL advisory-lock leader election, polled every ``lease_s`` on a thread.

    ``on_elected``/``on_lost`` run on the elector's thread; keep them short (start or
    stop a task). ``release()`` gives the lock back at once (on SIGTERM) so another
    replica takes over without waiting for the connection to time out.
    """

    def __init__(
        self,
        dsn: str,
        key: str | int,
        on_elected: Callback | None = None,
        on_lost: Callback | None = None,
        *,
        lease_s: float = 2.0,
        name: str = "lockgate-leader",
    ) -> None:
        if lease_s <= 0:
            raise ValueError("lease_s must be positive")
        if psycopg is None:
            raise RuntimeError("leader election over PostgreSQL needs psycopg: pip install 'lockgate[postgres]'")
        self.dsn = dsn
        self.key = lock_key(key)
        self.lease_s = lease_s
        self._callbacks = _Callbacks(on_elected, on_lost)
        self._leader = threading.Event()
        self._stop = threading.Event()
        self._conn: psycopg.Connection[object] | None = None
        self._conn_lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.terms = 0  # how many times this replica became leader
        self.errors = 0  # connection failures seen (each one is a lost term or a failed try)

    @property
    def is_leader(self) -> bool:
        return self._leader.is_set()

    @property
    def callback_errors(self) -> int:
        return self._callbacks.callback_errors

    def start(self) -> None:
        self._thread.start()

    def wait_elected(self, timeout: float) -> bool:
        return self._leader.wait(timeout)

    # -- the poll loop ----------------------------------------------------
    def _connect(self) -> psycopg.Connection[object]:
        timeout = max(1, int(round(self.lease_s)))
        return psycopg.connect(
            self.dsn,
            autocommit=True,
            connect_timeout=timeout,
            application_name="lockgate-leader",
            keepalives=1,
            keepalives_idle=max(1, timeout),
            keepalives_interval=max(1, timeout),
            keepalives_count=2,
        )

    def _step(self) -> None:
        """One poll: connect if needed, then try for the lock or check we still hold it."""
        with self._conn_lock:
            if self._stop.is_set():
                return
            if self._conn is None or self._conn.closed:
                self._conn = self._connect()
            conn = self._conn
            if self._leader.is_set():
                row = conn.execute(
                    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted "
                    "AND pid = pg_backend_pid() AND objid = (%s::bigint & 4294967295)::oid "
                    "AND classid = ((%s::bigint >> 32) & 4294967295)::oid",
                    (self.key, self.key),
                ).fetchone()
                held = bool(row and row[0])
                if not held:  # someone ran pg_advisory_unlock_all on us, or similar
                    self._lose("lock no longer held")
                return
            row = conn.execute("SELECT pg_try_advisory_lock(%s)", (self.key,)).fetchone()
            won = bool(row and row[0])
        if won:
            self.terms += 1
            self._leader.set()
            log.info("became leader (advisory lock %d)", self.key)
            self._callbacks.call("elected")

    def _lose(self, reason: str) -> None:
        if self._leader.is_set():
            self._leader.clear()
            log.warning("lost leadership: %s", reason)
            self._callbacks.call("lost")

    def _drop_connection(self) -> None:
        with self._conn_lock:
            conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._step()
            except psycopg.Error as exc:
                # The session (and so the lock) is gone or unknowable: step down now.
                self.errors += 1
                self._drop_connection()
                self._lose(f"connection failed: {exc}")
                log.debug("leader election poll failed: %s", exc)
            self._stop.wait(self.lease_s)

    def release(self, timeout: float = 5.0) -> None:
        """Stop polling, unlock and close the session; ``on_lost`` runs if we were leader."""
        self._stop.set()
        with self._conn_lock:
            conn, self._conn = self._conn, None
            if conn is not None:
                try:
                    if self._leader.is_set():
                        conn.execute("SELECT pg_advisory_unlock(%s)", (self.key,))
                except psycopg.Error:
                    pass  # closing the session releases the lock anyway
                conn.close()
        self._lose("released")
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)


def elector_for(
    store_location: str,
    key: str | int,
    on_elected: Callback | None = None,
    on_lost: Callback | None = None,
    *,
    lease_s: float = 2.0,
) -> LeaderElector | LocalLeader:
    """The elector that fits the store: PostgreSQL advisory lock, or always-leader locally."""
    if store_location.startswith(("postgresql://", "postgres://")):
        return LeaderElector(store_location, key, on_elected, on_lost, lease_s=lease_s)
    return LocalLeader(on_elected, on_lost)
