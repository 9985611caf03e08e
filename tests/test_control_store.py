"""SQLiteStore: migrations, persistence, change feed, cross-process audit chain."""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

import pytest

from conftest import TEST_KEYRING
from lockgate.control.audit import AuditTrail
from lockgate.errors import AlreadyExists, ConflictError, NotFound, StoreError
from lockgate.control.sqlite_store import MIGRATIONS, SCHEMA_VERSION, SQLiteStore, migrate
from lockgate.control.store import (
    ChangeKind,
    RecordKind,
    Store,
    VersionRecord,
    open_store,
    utc_now_iso,
)


def _version(model: str = "iris", version: str = "1", state: str = "registered") -> VersionRecord:
    now = utc_now_iso()
    return VersionRecord(model, version, state, f"/repo/{model}/{version}/model.onnx", "ab" * 32, "alice", now, now, {"k": 1})


def test_implements_store_protocol(tmp_path: Path) -> None:
    with SQLiteStore(tmp_path) as store:
        assert isinstance(store, Store)
        assert store.path == tmp_path / "lockgate.db"


def test_migrations_idempotent_and_reopen_keeps_data(tmp_path: Path) -> None:
    db = tmp_path / "state" / "lockgate.db"
    store = SQLiteStore(db)
    assert store.schema_version() == SCHEMA_VERSION == len(MIGRATIONS)
    store.create_version(_version())
    store.set_policy("iris", {"weights": {"1": 100}}, "op")
    AuditTrail(store, TEST_KEYRING).append("alice", "model.register", "iris/1", {"x": 1})
    store.close()

    for _ in range(2):  # reopening re-runs migrate(): nothing applied twice, nothing lost
        store = SQLiteStore(db)
        assert store.schema_version() == SCHEMA_VERSION
        record = store.get_version("iris", "1")
        assert record is not None and record.metadata == {"k": 1}
        policy = store.get_policy("iris")
        assert policy is not None and policy.revision == 1 and policy.document == {"weights": {"1": 100}}
        assert AuditTrail(store, TEST_KEYRING).verify(checkpoints=False, registry=False).checked == 1
        store.close()
    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()


def test_old_schema_is_upgraded_in_order(tmp_path: Path) -> None:
    db = tmp_path / "old.db"
    conn = sqlite3.connect(db, isolation_level=None)
    assert migrate(conn, MIGRATIONS[:1]) == 1
    conn.execute(
        "INSERT INTO audit VALUES (1, 't', 'a', 'x', 's', '{}', 'p', 'h')"
    )
    conn.execute("UPDATE audit SET actor = 'b'")  # allowed before migration 2 adds triggers
    conn.close()
    with SQLiteStore(db) as store:
        assert store.schema_version() == SCHEMA_VERSION
        raw = sqlite3.connect(db)
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            raw.execute("UPDATE audit SET actor = 'c'")
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            raw.execute("DELETE FROM audit")
        raw.close()


def test_newer_schema_refused(tmp_path: Path) -> None:
    db = tmp_path / "new.db"
    conn = sqlite3.connect(db)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 5}")
    conn.close()
    with pytest.raises(StoreError, match="newer"):
        SQLiteStore(db)


def test_versions_cas_and_errors(tmp_path: Path) -> None:
    with SQLiteStore(tmp_path) as store:
        store.create_version(_version("m", "2"))
        store.create_version(_version("m", "10"))
        with pytest.raises(AlreadyExists):
            store.create_version(_version("m", "2"))
        assert [v.version for v in store.list_versions("m")] == ["2", "10"]
        updated = store.update_version("m", "2", state="validated", expected_state="registered", metadata={"x": 2})
        assert updated.state == "validated" and updated.metadata == {"k": 1, "x": 2}
        with pytest.raises(ConflictError):
            store.update_version("m", "2", state="approved", expected_state="registered")
        with pytest.raises(NotFound):
            store.update_version("m", "3", state="validated")


def test_records_policies_and_change_feed(tmp_path: Path) -> None:
    with SQLiteStore(tmp_path) as store:
        start = store.current_revision()
        rec = store.add_record(RecordKind.VALIDATION, "m", "1", "bob", {"passed": True})
        assert store.list_records(kind=RecordKind.VALIDATION, model="m") == [rec]
        assert store.list_records(kind=RecordKind.APPROVAL, model="m") == []
        p1 = store.set_policy("m", {"weights": {"1": 100}}, "op")
        p2 = store.set_policy("m", {"weights": {"1": 90, "2": 10}}, "op", expected_revision=1)
        assert (p1.revision, p2.revision) == (1, 2)
        with pytest.raises(ConflictError):
            store.set_policy("m", {}, "op", expected_revision=1)
        store.set_policy("other", {"weights": {"1": 100}}, "op")
        assert [p.model for p in store.list_policies()] == ["m", "other"]
        assert store.get_policy("m") == p2
        assert [p.revision for p in store.policy_history("m")] == [1, 2]
        changes = store.changes_since(start)
        assert [c.kind for c in changes] == [ChangeKind.RECORD, ChangeKind.POLICY, ChangeKind.POLICY, ChangeKind.POLICY]
        assert [c.revision for c in changes] == sorted(c.revision for c in changes)
        assert store.changes_since(changes[-1].revision) == []


def test_wait_for_changes_wakes_on_write(tmp_path: Path) -> None:
    with SQLiteStore(tmp_path) as store:
        revision = store.current_revision()
        assert store.wait_for_changes(revision, 0.05) == []
        threading.Timer(0.2, lambda: store.set_policy("m", {"w": 1}, "op")).start()
        changes = store.wait_for_changes(revision, 10.0)
        assert len(changes) == 1 and changes[0].model == "m"


def test_change_from_other_connection_is_seen(tmp_path: Path) -> None:
    a, b = SQLiteStore(tmp_path), SQLiteStore(tmp_path)  # as two processes would
    try:
        revision = a.current_revision()
        b.set_policy("m", {"w": 2}, "op")
        changes = a.wait_for_changes(revision, 5.0)
        assert [c.kind for c in changes] == [ChangeKind.POLICY]
        assert a.get_policy("m").document == {"w": 2}  # type: ignore[union-attr]
    finally:
        a.close()
        b.close()


def test_snapshots(tmp_path: Path) -> None:
    with SQLiteStore(tmp_path) as store:
        assert store.latest_window("m", "1") is None
        store.put_snapshot("m", "1", 7, "r-b", b"\x00bb")
        store.put_snapshot("m", "1", 7, "r-a", b"aa")
        store.put_snapshot("m", "1", 7, "r-a", b"aa2")  # replace
        store.put_snapshot("m", "1", 8, "r-a", b"next")
        snaps = store.get_snapshots("m", "1", 7)
        assert [(s.replica, s.payload) for s in snaps] == [("r-a", b"aa2"), ("r-b", b"\x00bb")]
        assert store.latest_window("m", "1") == 8
        assert store.prune_snapshots(8) == 2
        assert store.get_snapshots("m", "1", 7) == []


def test_threads_share_store(tmp_path: Path) -> None:
    with SQLiteStore(tmp_path) as store:
        trail = AuditTrail(store, TEST_KEYRING)
        errors: list[BaseException] = []

        def work(n: int) -> None:
            try:
                for i in range(15):
                    trail.append(f"t{n}", "test.append", "m", {"i": i})
            except BaseException as exc:  # surfaced below
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        result = trail.verify(checkpoints=False, registry=False)
        assert result.ok, result.reason
        assert result.checked == 60


def test_open_store_locations(tmp_path: Path) -> None:
    with open_store(tmp_path) as store:  # type: ignore[attr-defined]
        assert store.path == tmp_path / "lockgate.db"
    fresh = open_store(tmp_path / "new-state-dir")
    assert isinstance(fresh, SQLiteStore) and fresh.path == tmp_path / "new-state-dir" / "lockgate.db"
    fresh.close()
    direct = open_store(f"sqlite:///{tmp_path / 'x.db'}")
    assert isinstance(direct, SQLiteStore) and direct.path == tmp_path / "x.db"
    direct.close()


def test_change_watcher_delivers_and_resyncs(tmp_path: Path) -> None:
    from lockgate.control.watch import ChangeWatcher

    writer, reader = SQLiteStore(tmp_path), SQLiteStore(tmp_path)
    seen: list[list[str]] = []
    got = threading.Event()

    def on_change(changes: object) -> None:
        seen.append([c.model for c in changes])  # type: ignore[attr-defined]
        if any(seen):
            got.set()

    watcher = ChangeWatcher(reader, on_change, wait_s=0.05, resync_s=0.1)
    watcher.start()
    try:
        deadline = time.time() + 10
        while watcher.revision is None and time.time() < deadline:
            time.sleep(0.01)
        writer.set_policy("fraud", {"weights": {"1": 100}}, "op")
        assert got.wait(10.0)
        assert ["fraud"] in seen
        deadline = time.time() + 10
        while [] not in seen and time.time() < deadline:  # the periodic safety-net re-read
            time.sleep(0.02)
        assert [] in seen
        assert watcher.revision == writer.current_revision()
    finally:
        watcher.stop()
        writer.close()
        reader.close()


def test_change_watcher_survives_store_errors(tmp_path: Path) -> None:
    from lockgate.control.watch import ChangeWatcher

    store = SQLiteStore(tmp_path)
    watcher = ChangeWatcher(store, lambda changes: None, start_revision=0, wait_s=0.05, max_backoff_s=0.1)
    store.close()  # every read now raises StoreError
    watcher.start()
    try:
        deadline = time.time() + 10
        while watcher.store_errors < 2 and time.time() < deadline:
            time.sleep(0.02)
        assert watcher.store_errors >= 2  # retried with backoff, thread still alive
        assert watcher._thread.is_alive()
    finally:
        watcher.stop()


def test_server_and_cli_import_without_the_postgres_extra() -> None:
    """psycopg is the [postgres] extra: a base install must still serve (SQLite, one leader)."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['psycopg'] = None  # as if not installed: import raises\n"
        "import lockgate.transport.server, lockgate.cli\n"
        "from lockgate.control.leader import LeaderElector\n"
        "try:\n"
        "    LeaderElector('postgresql://127.0.0.1/x', 'k')\n"
        "except RuntimeError as exc:\n"
        "    print(exc)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "lockgate[postgres]" in done.stdout
