"""PostgresStore against a real PostgreSQL: the Store contract (shared with SQLiteStore),
migrations, LISTEN/NOTIFY, concurrent audit appends from two processes, leader election,
and the spool that keeps audit entries and snapshots through an outage."""

from __future__ import annotations

import multiprocessing
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest

sys.path.insert(0, str(Path(__file__).parent))

from pg_server import PgServer, pg_dsn, pg_server  # noqa: E402,F401  (fixtures)

from conftest import TEST_KEYRING  # noqa: E402
from lockgate.control.audit import AuditTrail  # noqa: E402
from lockgate.errors import (  # noqa: E402
    AlreadyExists,
    ConflictError,
    NotFound,
    StoreError,
)
from lockgate.control.postgres_store import MIGRATIONS, SCHEMA_VERSION, PostgresStore, migrate  # noqa: E402
from lockgate.control.sqlite_store import SQLiteStore  # noqa: E402
from lockgate.control.audit import Entry  # noqa: E402
from lockgate.control.store import (  # noqa: E402
    SetPolicy,
    ChangeKind,
    RecordKind,
    Store,
    VersionRecord,
    format_time,
    open_store,
    utc_now_iso,
)

Opener = Callable[[], Store]


def _version(model: str = "iris", version: str = "1", state: str = "registered") -> VersionRecord:
    now = utc_now_iso()
    return VersionRecord(model, version, state, f"/repo/{model}/{version}/model.onnx", "ab" * 32, "alice", now, now, {"k": 1})


@pytest.fixture(params=["sqlite", "postgres"])
def store_location(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """One fresh store location per backend; every contract test runs against both."""
    if request.param == "sqlite":
        return str(tmp_path / "lockgate.db")
    return request.getfixturevalue("pg_dsn")


@pytest.fixture()
def opener(store_location: str) -> Iterator[Opener]:
    """Opens stores on one shared location."""
    opened: list[Store] = []
    location = store_location

    def make() -> Store:
        store = open_store(location)
        opened.append(store)
        return store

    yield make
    for store in opened:
        store.close()


# -- the shared Store contract ------------------------------------------------------


def test_contract_protocol_and_backend(opener: Opener) -> None:
    store = opener()
    assert isinstance(store, Store)


def test_contract_versions_cas_and_errors(opener: Opener) -> None:
    store = opener()
    store.create_version(_version("m", "2"))
    store.create_version(_version("m", "10"))
    store.create_version(_version("a", "1"))
    with pytest.raises(AlreadyExists):
        store.create_version(_version("m", "2"))
    assert [(v.model, v.version) for v in store.list_versions()] == [("a", "1"), ("m", "2"), ("m", "10")]
    assert [v.version for v in store.list_versions("m")] == ["2", "10"]
    updated = store.update_version("m", "2", state="validated", expected_state="registered", metadata={"x": 2})
    assert updated.state == "validated" and updated.metadata == {"k": 1, "x": 2}
    assert store.get_version("m", "2") == updated
    assert store.get_version("m", "3") is None
    with pytest.raises(ConflictError):
        store.update_version("m", "2", state="approved", expected_state="registered")
    with pytest.raises(NotFound):
        store.update_version("m", "3", state="validated")


def test_contract_records_policies_and_change_feed(opener: Opener) -> None:
    store = opener()
    start = store.current_revision()
    assert start == 0
    rec = store.add_record(RecordKind.VALIDATION, "m", "1", "bob", {"passed": True, "ü": [1, 2.5]})
    assert store.list_records(kind=RecordKind.VALIDATION, model="m") == [rec]
    assert store.list_records(kind=RecordKind.APPROVAL, model="m") == []
    assert store.list_records(version="1") == [rec]
    p1 = store.set_policy("m", {"weights": {"1": 100}}, "op")
    p2 = store.set_policy("m", {"weights": {"1": 90, "2": 10}}, "op", expected_revision=1)
    assert (p1.revision, p2.revision) == (1, 2)
    with pytest.raises(ConflictError):
        store.set_policy("m", {}, "op", expected_revision=1)
    with pytest.raises(ConflictError):
        store.set_policy("new", {}, "op", expected_revision=3)
    store.set_policy("other", {"weights": {"1": 100}}, "op", expected_revision=0)
    store.set_policy("M", {"weights": {"1": 100}}, "op")  # byte order: "M" < "m" < "other"
    assert [p.model for p in store.list_policies()] == ["M", "m", "other"]
    assert store.get_policy("m") == p2
    assert store.get_policy("none") is None
    assert [p.revision for p in store.policy_history("m")] == [1, 2]
    changes = store.changes_since(start)
    assert [c.kind for c in changes] == [ChangeKind.RECORD] + [ChangeKind.POLICY] * 4
    assert [c.revision for c in changes] == sorted(c.revision for c in changes)
    assert changes[0].version == "1" and changes[1].version is None
    assert store.current_revision() == changes[-1].revision
    assert store.changes_since(changes[-1].revision) == []
    assert store.changes_since(changes[0].revision) == changes[1:]


def test_contract_wait_for_changes_wakes_on_write(opener: Opener) -> None:
    store = opener()
    revision = store.current_revision()
    assert store.wait_for_changes(revision, 0.05) == []
    timer = threading.Timer(0.2, lambda: store.set_policy("m", {"w": 1}, "op"))
    timer.start()
    changes = store.wait_for_changes(revision, 10.0)
    timer.join()
    assert len(changes) == 1 and changes[0].model == "m"


def test_contract_change_from_other_instance_is_seen(opener: Opener) -> None:
    a, b = opener(), opener()  # as two replicas would
    revision = a.current_revision()
    b.set_policy("m", {"w": 2}, "op")
    changes = a.wait_for_changes(revision, 5.0)
    assert [c.kind for c in changes] == [ChangeKind.POLICY]
    policy = a.get_policy("m")
    assert policy is not None and policy.document == {"w": 2}


def test_contract_snapshots(opener: Opener) -> None:
    store = opener()
    assert store.latest_window("m", "1") is None
    store.put_snapshot("m", "1", 7, "r-b", b"\x00bb")
    store.put_snapshot("m", "1", 7, "r-a", b"aa")
    store.put_snapshot("m", "1", 7, "r-a", b"aa2")  # replace
    store.put_snapshot("m", "1", 8, "r-a", b"next")
    store.put_snapshot("m", "2", 9, "r-a", b"other version")
    snaps = store.get_snapshots("m", "1", 7)
    assert [(s.replica, s.payload, s.window) for s in snaps] == [("r-a", b"aa2", 7), ("r-b", b"\x00bb", 7)]
    assert store.latest_window("m", "1") == 8
    assert store.prune_snapshots(8) == 2
    assert store.get_snapshots("m", "1", 7) == []
    assert store.latest_window("m", "2") == 9


def test_contract_audit_filters_and_threads(opener: Opener) -> None:
    store = opener()
    trail = AuditTrail(store, TEST_KEYRING)
    assert store.audit_head() is None
    errors: list[BaseException] = []

    def work(n: int) -> None:
        try:
            for i in range(8):
                trail.append(f"t{n}", "test.append", ["m", "m/1", "m2/1", "mx"][i % 4], {"i": i})
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    result = trail.verify(checkpoints=False, registry=False)
    assert result.ok and result.checked == 24, result.reason
    head = store.audit_head()
    assert head is not None and head.seq == 24
    assert {r.subject for r in store.audit_entries(model="m")} == {"m", "m/1"}
    assert len(store.audit_entries(model="m")) == 12
    assert [r.seq for r in store.audit_entries(after_seq=20)] == [21, 22, 23, 24]
    assert [r.seq for r in store.audit_entries(after_seq=2, limit=3)] == [3, 4, 5]
    assert store.audit_entries(since=format_time(time_in_future())) == []
    assert len(store.audit_entries(since=store.audit_entries()[10].time)) >= 14


def time_in_future():  # type: ignore[no-untyped-def]
    from datetime import datetime, timedelta, timezone

    return datetime.now(timezone.utc) + timedelta(days=1)


def test_contract_reopen_keeps_data(opener: Opener) -> None:
    store = opener()
    store.create_version(_version())
    store.set_policy("iris", {"weights": {"1": 100}}, "op")
    AuditTrail(store, TEST_KEYRING).append("alice", "model.register", "iris/1", {"x": 1})
    store.close()
    for _ in range(2):  # reopening re-runs the migrations: nothing applied twice, nothing lost
        again = opener()
        record = again.get_version("iris", "1")
        assert record is not None and record.metadata == {"k": 1}
        policy = again.get_policy("iris")
        assert policy is not None and policy.revision == 1
        assert AuditTrail(again, TEST_KEYRING).verify(checkpoints=False, registry=False).checked == 1
        again.close()


# -- PostgreSQL specifics ----------------------------------------------------------------


def test_pg_migrations_versioned_and_newer_refused(pg_dsn: str) -> None:
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        assert migrate(conn, MIGRATIONS[:1]) == 1
        conn.execute("INSERT INTO audit VALUES (1, 't', 'a', 'x', 's', '{}', 'p', 'h')")
        conn.execute("UPDATE audit SET actor = 'b'")  # allowed before migration 2
    with PostgresStore(pg_dsn) as store:
        assert store.schema_version() == SCHEMA_VERSION == len(MIGRATIONS)
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        versions = [r[0] for r in conn.execute("SELECT version FROM schema_migrations ORDER BY version")]
        assert versions == list(range(1, SCHEMA_VERSION + 1))
        for statement in ("UPDATE audit SET actor = 'c'", "DELETE FROM audit", "TRUNCATE audit"):
            with pytest.raises(psycopg.errors.RaiseException, match="append-only"):
                conn.execute(statement)
        conn.execute("INSERT INTO schema_migrations VALUES (%s, 'later')", (SCHEMA_VERSION + 5,))
    with pytest.raises(StoreError, match="newer"):
        PostgresStore(pg_dsn)


def test_pg_unreachable_raises_store_error() -> None:
    from pg_server import _free_port

    with pytest.raises(StoreError, match="unreachable"):
        PostgresStore(f"postgresql://postgres:s3cret@127.0.0.1:{_free_port()}/x", connect_timeout=2)
    try:
        PostgresStore(f"postgresql://postgres:s3cret@127.0.0.1:{_free_port()}/x", connect_timeout=2)
    except StoreError as exc:
        assert "s3cret" not in str(exc)  # the password never reaches logs


def test_pg_notify_wakes_other_replica_without_polling(pg_dsn: str) -> None:
    reader = PostgresStore(pg_dsn, poll_interval=60.0)  # only NOTIFY can wake it in time
    writer = PostgresStore(pg_dsn)
    try:
        revision = reader.current_revision()
        assert reader.wait_for_changes(revision, 0.3) == []  # listener is up now
        timer = threading.Timer(0.3, lambda: writer.set_policy("fraud", {"w": 3}, "op"))
        timer.start()
        started = time.monotonic()
        changes = reader.wait_for_changes(revision, 20.0)
        timer.join()
        assert [c.model for c in changes] == ["fraud"]
        assert time.monotonic() - started < 15.0  # woken by the notification, not the 60 s poll
    finally:
        reader.close()
        writer.close()


def _append_many(location: str, worker: int, count: int, start: float) -> None:
    while time.time() < start:  # line the processes up so their appends interleave
        time.sleep(0.005)
    store = open_store(location)
    trail = AuditTrail(store, TEST_KEYRING)
    for i in range(count):
        trail.append(f"worker-{worker}", "test.append", "m", {"i": i})
    store.close()


def test_contract_two_processes_append_one_linear_chain(store_location: str) -> None:
    """SQLite serialises on BEGIN IMMEDIATE, PostgreSQL on an advisory lock: either way two
    processes appending at once must leave one linear chain that verifies."""
    open_store(store_location).close()
    ctx = multiprocessing.get_context("spawn")
    start = time.time() + 2.0
    procs = [ctx.Process(target=_append_many, args=(store_location, w, 40, start)) for w in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    with open_store(store_location) as store:  # type: ignore[attr-defined]
        trail = AuditTrail(store, TEST_KEYRING)
        result = trail.verify(checkpoints=False, registry=False)
        assert result.ok, result.reason
        assert result.checked == 80
        entries = trail.log()
        assert [e.seq for e in entries] == list(range(1, 81))
        for worker in range(2):
            mine = [e.details["i"] for e in entries if e.actor == f"worker-{worker}"]
            assert mine == list(range(40))
        actors = [e.actor for e in entries]
        switches = sum(1 for a, b in zip(actors, actors[1:]) if a != b)
        assert switches >= 1  # both wrote into the one chain


def test_pg_reconnects_after_server_restart() -> None:
    with PgServer() as server:
        store = PostgresStore(server.dsn(), connect_timeout=2)
        try:
            store.set_policy("m", {"w": 1}, "op")
            server.stop()
            with pytest.raises(StoreError):
                store.get_policy("m")
            server.start()
            policy = store.get_policy("m")  # stale pooled connections replaced transparently
            assert policy is not None and policy.document == {"w": 1}
            store.set_policy("m", {"w": 2}, "op")
            assert store.current_revision() == 2
        finally:
            store.close()


# -- leader election ------------------------------------------------------------------------


def _leader_process(dsn: str, flag: str) -> None:
    from lockgate.control.leader import LeaderElector

    elector = LeaderElector(dsn, "test-leader-kill", on_elected=lambda: Path(flag).write_text("leader"), lease_s=0.2)
    elector.start()
    time.sleep(600)  # killed by the test


def _wait(predicate: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def test_leader_one_at_a_time_and_handover_on_release(pg_dsn: str) -> None:
    from lockgate.control.leader import LeaderElector

    events: list[str] = []
    a = LeaderElector(pg_dsn, "lockgate/drift", lambda: events.append("a+"), lambda: events.append("a-"), lease_s=0.2)
    b = LeaderElector(pg_dsn, "lockgate/drift", lambda: events.append("b+"), lambda: events.append("b-"), lease_s=0.2)
    a.start()
    assert a.wait_elected(10.0)
    b.start()
    time.sleep(0.6)  # several polls: b must not win while a holds the lock
    assert a.is_leader and not b.is_leader
    a.release()
    assert not a.is_leader
    assert b.wait_elected(10.0)
    b.release()
    assert events == ["a+", "a-", "b+", "b-"]
    assert (a.terms, b.terms) == (1, 1)


def test_leader_steps_down_when_its_session_dies(pg_dsn: str) -> None:
    from lockgate.control.leader import LeaderElector

    lost = threading.Event()
    a = LeaderElector(pg_dsn, 42, on_lost=lost.set, lease_s=0.2)
    b = LeaderElector(pg_dsn, 42, lease_s=0.2)
    a.start()
    assert a.wait_elected(10.0)
    b.start()
    with psycopg.connect(pg_dsn, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'lockgate-leader' "
                      "AND pid IN (SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted)")
    assert lost.wait(10.0) and a.errors >= 1
    assert b.wait_elected(10.0)
    assert _wait(lambda: a.is_leader or b.is_leader, 5.0)
    time.sleep(0.5)
    assert not (a.is_leader and b.is_leader)  # a may win back only after b let go
    a.release()
    b.release()


def test_leader_killed_process_is_replaced(pg_dsn: str, tmp_path: Path) -> None:
    from lockgate.control.leader import LeaderElector

    flag = tmp_path / "elected"
    proc = multiprocessing.get_context("spawn").Process(target=_leader_process, args=(pg_dsn, str(flag)), daemon=True)
    proc.start()
    try:
        assert _wait(flag.exists, 60.0), "child never became leader"
        survivor = LeaderElector(pg_dsn, "test-leader-kill", lease_s=0.2)
        survivor.start()
        time.sleep(0.5)
        assert not survivor.is_leader
        proc.kill()  # SIGKILL: no release(); PostgreSQL frees the lock with the session
        proc.join(10)
        assert survivor.wait_elected(10.0)
        survivor.release()
    finally:
        if proc.is_alive():
            proc.kill()


def test_local_leader_and_factory(tmp_path: Path) -> None:
    from lockgate.control.leader import LeaderElector, LocalLeader, elector_for, lock_key

    events: list[str] = []
    local = elector_for(str(tmp_path / "lockgate.db"), "k", lambda: events.append("+"), lambda: events.append("-"))
    assert isinstance(local, LocalLeader) and not local.is_leader
    local.start()
    assert local.is_leader and local.wait_elected(0)
    local.release()
    local.release()
    assert events == ["+", "-"]
    assert isinstance(elector_for("postgresql://x@127.0.0.1/db", "k"), LeaderElector)
    assert lock_key("k") == lock_key("k") != lock_key("j")
    assert lock_key(7) == 7
    with pytest.raises(ValueError):
        lock_key(1 << 64)


# -- spool: outages never lose audit entries or snapshots -------------------------------------


def test_spool_through_a_real_outage(tmp_path: Path) -> None:
    from lockgate.control.spool import ResilientStore

    with PgServer() as server:
        store = ResilientStore(PostgresStore(server.dsn(), connect_timeout=2), tmp_path / "spool",
                               keyring=TEST_KEYRING, min_backoff_s=0.05, max_backoff_s=0.5)
        trail = AuditTrail(store, TEST_KEYRING)
        try:
            for i in range(3):
                trail.append("alice", "before", "m/1", {"i": i})
            store.set_policy("m", {"w": 1}, "op")
            assert not store.degraded
            server.stop()
            with pytest.raises(StoreError):
                store.get_policy("m")  # reads fail: callers keep their last snapshot
            assert store.degraded
            for i in range(5):
                entry = trail.append("bob", "during", "m/1", {"i": i, "token": "hidden"})
                assert entry.seq == 0  # spooled, not chained yet
            store.put_snapshot("m", "1", 4, "replica-a", b"\x00\xffsketch")
            with pytest.raises(StoreError):
                store.set_policy("m", {"w": 2}, "op")  # CAS writes cannot be deferred
            with pytest.raises(StoreError):  # nor can a governance change with its audit entry
                trail.record([SetPolicy("m", {"w": 3}, "op")], [Entry("op", "traffic.set", "m", {})])
            assert store.pending == 6 and store.degraded
            time.sleep(0.3)  # a few failed replay attempts with backoff
            assert store.replay_errors >= 1
            server.start()
            assert store.wait_drained(30.0), "spool was not replayed"
            assert not store.degraded and store.pending == 0
            trail.append("carol", "after", "m/1", {})
            result = trail.verify(checkpoints=False)
            assert result.ok, result.reason
            entries = trail.log()
            assert [e.action for e in entries] == ["before"] * 3 + ["during"] * 5 + ["after"]
            assert [e.details["i"] for e in entries if e.action == "during"] == list(range(5))
            during = [e for e in entries if e.action == "during"]
            assert all("spooled_at" in e.details and e.details["spooled_at"] <= e.time for e in during)
            assert all(e.details["token"] == "[REDACTED]" for e in during)
            snaps = store.get_snapshots("m", "1", 4)
            assert [(s.replica, s.payload) for s in snaps] == [("replica-a", b"\x00\xffsketch")]
            assert not (tmp_path / "spool" / "spool.jsonl").exists()
        finally:
            store.close()


def _signed(record: dict) -> dict:
    """A spool line as ResilientStore writes it (MAC'd with the audit key)."""
    from lockgate.control.spool import _spool_mac

    record = {**record, "key_id": TEST_KEYRING.current.key_id}
    return {**record, "mac": _spool_mac(TEST_KEYRING, record)}


def test_spool_left_by_a_crashed_process_is_replayed_in_order(tmp_path: Path) -> None:
    from lockgate.control.spool import ResilientStore, Spool

    spool_dir = tmp_path / "spool"
    spool = Spool(spool_dir)
    for i in range(3):
        spool.append(_signed({"op": "audit", "spooled_at": f"2024-01-01T00:00:0{i}.000000Z", "actor": "x",
                              "action": "a", "subject": "m", "details": canonical(i)}))
    spool.append(_signed({"op": "snapshot", "spooled_at": "t", "model": "m", "version": "1", "window": 1,
                          "replica": "r", "payload": "AAE="}))
    with open(spool_dir / "spool.jsonl", "ab") as handle:
        handle.write(b'{"op":"audit","torn')  # crash mid-write: never acknowledged
    store = ResilientStore(SQLiteStore(tmp_path / "db"), spool_dir, keyring=TEST_KEYRING)
    try:
        assert store.spool.corrupt_lines == 1
        assert store.wait_drained(20.0)
        trail = AuditTrail(store, TEST_KEYRING)
        assert trail.verify(checkpoints=False).ok
        assert [e.details["i"] for e in trail.log()] == [0, 1, 2]
        assert trail.log()[0].details["spooled_at"] == "2024-01-01T00:00:00.000000Z"
        assert store.get_snapshots("m", "1", 1)[0].payload == b"\x00\x01"
        assert store.replayed_total == 4
    finally:
        store.close()


def test_a_line_added_to_the_spool_without_the_key_is_never_signed(tmp_path: Path) -> None:
    """The spool sits in the state dir: an injected 'approve' must not become a signed entry."""
    from lockgate.control.spool import ResilientStore, Spool

    spool_dir = tmp_path / "spool"
    spool = Spool(spool_dir)
    spool.append(_signed({"op": "audit", "spooled_at": "2024-01-01T00:00:00.000000Z", "actor": "x",
                          "action": "model.load", "subject": "m/1", "details": canonical(0)}))
    forged = {"op": "audit", "spooled_at": "2024-01-01T00:00:01.000000Z", "actor": "mallory",
              "action": "model.approve", "subject": "m/1", "details": canonical(1)}
    spool.append({**forged, "key_id": TEST_KEYRING.current.key_id, "mac": "0" * 64})
    spool.append(forged)  # no MAC at all
    store = ResilientStore(SQLiteStore(tmp_path / "db"), spool_dir, keyring=TEST_KEYRING)
    try:
        assert store.wait_drained(20.0)
        trail = AuditTrail(store, TEST_KEYRING)
        assert trail.verify(checkpoints=False).ok
        actions = [e.action for e in trail.log()]
        assert actions == ["model.load", "audit.spool_rejected", "audit.spool_rejected"], actions
        assert "model.approve" not in actions and store.rejected_lines == 2
    finally:
        store.close()


def canonical(i: int) -> str:
    from lockgate.control.audit import canonical_json

    return canonical_json({"i": i})


def test_resilient_store_is_a_store_and_passes_through(tmp_path: Path) -> None:
    from lockgate.control.spool import ResilientStore

    with ResilientStore(SQLiteStore(tmp_path / "db"), tmp_path / "spool", keyring=TEST_KEYRING) as store:
        assert isinstance(store, Store)
        store.create_version(_version())
        assert store.list_versions()[0].version == "1"
        entry = AuditTrail(store, TEST_KEYRING).append("a", "b", "c", {})
        assert entry.seq == 1 and not store.degraded
        store.put_snapshot("m", "1", 1, "r", b"x")
        assert store.latest_window("m", "1") == 1


def test_pg_attacks_on_a_keyed_trail_are_detected(pg_dsn: str, tmp_path: Path) -> None:
    """Issue 15 §1-2 on PostgreSQL, by someone who can write the database but holds neither the
    audit key nor the checkpoint file: a registry edit, a forged approval at the head (a key of
    their own), and deleting the tail with the triggers off are each caught by verify."""
    from lockgate.control.audit import entry_mac
    from lockgate.control.audit_key import AuditKey
    from lockgate.control.checkpoint import Checkpointer, CheckpointLog
    from lockgate.control.registry import Registry
    from test_control_registry import CARD, SIGNATURE, write_add_model

    repo = tmp_path / "repo"
    write_add_model(repo / "iris" / "1" / "model.onnx")
    log_file = CheckpointLog(tmp_path / "checkpoints.jsonl")
    store = open_store(pg_dsn)
    try:
        trail = AuditTrail(store, TEST_KEYRING, Checkpointer(log_file, TEST_KEYRING.current, store.audit_head), log_file)
        registry = Registry(store, trail, repository=repo)
        registry.register("iris", "1", None, "alice")
        registry.validate("iris", "1", "alice", expected_signature=SIGNATURE, latency_runs=1)
        registry.set_card("iris", "1", CARD, "carol")
        registry.approve("iris", "1", "bob", "reviewed")
        trail.checkpoints.write_head()
        assert trail.verify().ok and registry.can_serve("iris", "1")
        head = store.audit_head()
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            conn.execute("UPDATE versions SET sha256 = %s WHERE model = 'iris' AND version = '1'", ("cd" * 32,))
            result = trail.verify()
            assert not result.ok and any("artifact digest cdcdcdcd" in p for p in result.registry_problems), result
            assert not registry.can_serve("iris", "1")
            audited = registry.attestation("iris", "1")[0].sha256
            conn.execute("UPDATE versions SET sha256 = %s WHERE model = 'iris' AND version = '1'", (audited,))
            assert trail.verify().ok
            # A forged "approve" appended at the head, MAC'd under a key of the forger's own.
            mallory = AuditKey(b"mallory-has-her-own-key-0123456789abcdef")
            seq, when, details = head.seq + 1, utc_now_iso(), '{"reason":"ok"}'
            forged = entry_mac(mallory, seq, when, "mallory", "model.approve", "iris/2", details, head.hash)
            conn.execute("INSERT INTO audit (seq, time, actor, action, subject, details, prev_hash, hash, key_id) "
                         "VALUES (%s, %s, 'mallory', 'model.approve', 'iris/2', %s, %s, %s, %s)",
                         (seq, when, details, head.hash, forged, mallory.key_id))
            result = trail.verify()
            assert not result.ok and result.first_bad_seq == seq, result
            # Deleting that entry and the tail, triggers off: the signed checkpoint still names the head.
            with conn.transaction():
                conn.execute("SET LOCAL session_replication_role = replica")
                conn.execute("DELETE FROM audit WHERE seq >= %s", (head.seq - 1,))
            result = trail.verify()
            assert not result.ok and "checkpoint" in result.reason, result
            assert trail.verify(checkpoints=False, registry=False).ok  # the chain alone cannot see it
    finally:
        store.close()
