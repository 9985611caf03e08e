"""The keyed audit trail against someone who can write the database (but holds no key).

Every attack of issue 15 is done directly in the SQLite file, triggers dropped first, the
way an attacker with write access to the state directory would; each must fail
verification, naming the first bad entry. The chain is checked against signed
checkpoints by default, so truncation and deleting everything are caught too.
"""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

import pytest

from conftest import TEST_KEYRING
from lockgate.control.audit import (
    GENESIS_HASH,
    Action,
    AuditAnchor,
    AuditTrail,
    canonical_json,
    entry_mac,
    legacy_hash,
)
from lockgate.control.audit_key import AuditKey, AuditKeyring
from lockgate.control.checkpoint import Checkpoint, CheckpointLog, Checkpointer
from lockgate.control.store import AuditRow, RecordKind, utc_now_iso
from lockgate.control.sqlite_store import SQLiteStore
from lockgate.errors import FailedPrecondition, NotFound

TRIGGERS = ("audit_no_update", "audit_no_delete", "audit_at_head")


@pytest.fixture()
def trail(tmp_path: Path) -> AuditTrail:
    store = SQLiteStore(tmp_path / "state" / "lockgate.db")
    log_file = CheckpointLog(tmp_path / "outside" / "checkpoints.jsonl")
    trail = AuditTrail(store, TEST_KEYRING, None, log_file)
    trail.checkpoints = Checkpointer(log_file, TEST_KEYRING.current, store.audit_head, every=4, interval_s=3600)
    trail.checkpoints.write_head()  # seq 0: a fresh store's genesis checkpoint
    for i in range(1, 11):
        trail.append("alice" if i % 2 else "bob", "test.event", f"m{i % 3}/1", {"n": i, "note": f"event {i}"})
    yield trail
    store.close()


def _tamper(trail: AuditTrail, *statements: tuple[str, tuple[object, ...]]) -> None:
    """Edit the file behind the store's back, as an attacker with file access would."""
    path = trail.store.path  # type: ignore[attr-defined]
    conn = sqlite3.connect(path, isolation_level=None)
    for trigger in TRIGGERS:
        conn.execute(f"DROP TRIGGER IF EXISTS {trigger}")
    for sql, params in statements:
        conn.execute(sql, params)
    conn.close()


def _rows(trail: AuditTrail) -> list[AuditRow]:
    return trail.store.audit_entries()


def _row(trail: AuditTrail, seq: int) -> tuple[object, ...]:
    conn = sqlite3.connect(trail.store.path)  # type: ignore[attr-defined]
    row = conn.execute("SELECT * FROM audit WHERE seq = ?", (seq,)).fetchone()
    conn.close()
    return tuple(row)


def _rechain_from(trail: AuditTrail, start: int, rows: list[AuditRow], key: AuditKey | None) -> None:
    """Recompute every hash from ``start`` on, as a forger does: with a key of their own
    (``key``) or as the old plain SHA-256 chain (None)."""
    prev = next((r.hash for r in rows if r.seq == start - 1), GENESIS_HASH)
    statements = []
    for row in rows:
        if row.seq < start:
            continue
        if key is None:
            digest, key_id = legacy_hash(row.seq, row.time, row.actor, row.action, row.subject, row.details, prev), ""
        else:
            digest, key_id = entry_mac(key, row.seq, row.time, row.actor, row.action, row.subject, row.details, prev), key.key_id
        statements.append(("UPDATE audit SET prev_hash = ?, hash = ?, key_id = ? WHERE seq = ?",
                           (prev, digest, key_id, row.seq)))
        prev = digest
    _tamper(trail, *statements)


def test_intact_trail_verifies_against_its_checkpoints(trail: AuditTrail) -> None:
    result = trail.verify()
    assert result.ok and result.first_bad_seq is None and result.reason == ""
    assert result.checked == 10 and result.head_seq == 10
    assert result.checkpoint_seq == 8 and result.checkpoints_checked == 3  # seq 0, 4, 8
    entries = trail.log()
    assert entries[0].prev_hash == GENESIS_HASH
    assert all(b.prev_hash == a.hash for a, b in zip(entries, entries[1:]))
    assert all(e.key_id == TEST_KEYRING.current.key_id for e in entries)
    e = entries[3]
    assert e.hash == entry_mac(TEST_KEYRING.current, e.seq, e.time, e.actor, e.action, e.subject,
                               canonical_json(e.details), e.prev_hash)


def test_database_refuses_ordinary_rewrites_and_replace(trail: AuditTrail) -> None:
    conn = sqlite3.connect(trail.store.path)  # type: ignore[attr-defined]
    statements = [
        "UPDATE audit SET actor = 'mallory' WHERE seq = 3",
        "DELETE FROM audit WHERE seq = 3",
        "INSERT OR REPLACE INTO audit (seq, time, actor, action, subject, details, prev_hash, hash) "
        "SELECT seq, time, 'mallory', action, subject, details, prev_hash, hash FROM audit WHERE seq = 3",
        "REPLACE INTO audit (seq, time, actor, action, subject, details, prev_hash, hash) "
        "SELECT seq, time, 'mallory', action, subject, details, prev_hash, hash FROM audit WHERE seq = 3",
        "INSERT INTO audit (seq, time, actor, action, subject, details, prev_hash, hash) "
        "SELECT seq, time, 'mallory', action, subject, details, prev_hash, hash FROM audit WHERE seq = 3 "
        "ON CONFLICT(seq) DO UPDATE SET actor = 'mallory'",
        "INSERT INTO audit (seq, time, actor, action, subject, details, prev_hash, hash) "
        "VALUES (42, 't', 'mallory', 'x', 'm', '{}', 'p', 'h')",  # not at the head
    ]
    for statement in statements:
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            conn.execute(statement)
    conn.close()
    assert _rows(trail)[2].actor == "alice" and trail.verify().ok


def test_modified_details_detected(trail: AuditTrail) -> None:
    _tamper(trail, ("UPDATE audit SET details = ? WHERE seq = 7", ('{"n":700,"note":"event 7"}',)))
    result = trail.verify()
    assert (result.ok, result.first_bad_seq, result.checked) == (False, 7, 6)
    assert result.reason == "entry seq 7: MAC mismatch (modified or forged)"


@pytest.mark.parametrize("forger_key", [None, AuditKey(b"mallory's own key, 32 bytes long!!")], ids=["sha256", "own-key"])
def test_replaced_and_rechained_to_the_head_detected(trail: AuditTrail, forger_key: AuditKey | None) -> None:
    """REPLACE an entry, then re-chain every later row: the keyless forgery fails at the entry."""
    rows = _rows(trail)
    _tamper(trail, ("UPDATE audit SET details = ? WHERE seq = 4", ('{"n":4,"note":"nothing happened"}',)))
    _rechain_from(trail, 4, _rows(trail), forger_key)
    result = trail.verify(checkpoints=False)  # the checkpoints would catch it too: the chain alone must
    assert not result.ok and result.first_bad_seq == 4, result
    assert ("unkeyed after keyed" in result.reason) if forger_key is None else ("not configured" in result.reason)
    assert rows[3].hash != _rows(trail)[3].hash


def test_forged_approval_at_the_head_detected_even_with_an_anchor(trail: AuditTrail) -> None:
    head = trail.head()
    assert head is not None
    anchor = AuditAnchor(head.seq, head.hash)
    forger = AuditKey(b"mallory's own key, 32 bytes long!!")
    now = utc_now_iso()
    details = '{"approval_id":1,"reason":"ship it"}'
    forged = entry_mac(forger, 11, now, "mallory", "model.approve", "m1/1", details, head.hash)
    _tamper(trail, ("INSERT INTO audit VALUES (11, ?, 'mallory', 'model.approve', 'm1/1', ?, ?, ?, ?)",
                    (now, details, head.hash, forged, forger.key_id)))
    result = trail.verify(anchor=anchor)
    assert (result.ok, result.first_bad_seq) == (False, 11)
    assert "not configured" in result.reason
    # The same forgery claiming our key id fails its MAC.
    _tamper(trail, ("UPDATE audit SET key_id = ? WHERE seq = 11", (TEST_KEYRING.current.key_id,)))
    assert "MAC mismatch" in trail.verify().reason


def test_truncating_the_tail_is_caught_by_the_checkpoint(trail: AuditTrail) -> None:
    _tamper(trail, ("DELETE FROM audit WHERE seq >= 7", ()))
    assert trail.verify(checkpoints=False).ok  # a truncated chain is self-consistent ...
    result = trail.verify()  # ... but not against the signed checkpoint (without being told to)
    assert not result.ok and result.first_bad_seq == 7
    assert "truncated" in result.reason and "recorded seq 8" in result.reason


def test_deleting_everything_is_caught_by_the_checkpoint(trail: AuditTrail) -> None:
    _tamper(trail, ("DELETE FROM audit", ()))
    result = trail.verify()
    assert not result.ok and result.checked == 0 and result.head_seq == 0
    assert "truncated" in result.reason


def test_dropping_tampered_alerts_and_rechaining_detected(trail: AuditTrail) -> None:
    for _ in range(2):
        trail.append("system:lockgate", Action.ARTIFACT_TAMPERED, "m1/2", {"problem": "sha256 mismatch"})
    trail.append("bob", "test.event", "m1/1", {"n": 13})
    rows = [r for r in _rows(trail) if r.action != Action.ARTIFACT_TAMPERED]
    renumbered = []
    for new_seq, row in enumerate(rows, start=1):
        renumbered.append(AuditRow(new_seq, row.time, row.actor, row.action, row.subject, row.details, "", "", ""))
    _tamper(trail, ("DELETE FROM audit", ()), *[
        ("INSERT INTO audit VALUES (?, ?, ?, ?, ?, ?, '', '', '')",
         (r.seq, r.time, r.actor, r.action, r.subject, r.details)) for r in renumbered])
    _rechain_from(trail, 1, _rows(trail), None)
    result = trail.verify()
    assert not result.ok
    assert "never sealed" in result.reason or "not authenticated" in result.reason or "checkpoint" in result.reason


def test_deleted_middle_row_detected(trail: AuditTrail) -> None:
    _tamper(trail, ("DELETE FROM audit WHERE seq = 5", ()))
    result = trail.verify()
    assert (result.ok, result.first_bad_seq) == (False, 5)
    assert result.reason == "seq 5 missing after 4 (deleted)"


def test_deleted_first_row_detected(trail: AuditTrail) -> None:
    _tamper(trail, ("DELETE FROM audit WHERE seq = 1", ()))
    result = trail.verify()
    assert (result.ok, result.first_bad_seq) == (False, 1)
    assert "deleted" in result.reason


def test_swapped_rows_detected(trail: AuditTrail) -> None:
    _tamper(
        trail,
        ("UPDATE audit SET seq = -1 WHERE seq = 5", ()),
        ("UPDATE audit SET seq = 5 WHERE seq = 6", ()),
        ("UPDATE audit SET seq = 6 WHERE seq = -1", ()),
    )
    result = trail.verify()
    assert (result.ok, result.first_bad_seq) == (False, 5)
    assert result.reason == "entry seq 5: prev_hash does not match entry 4 (inserted or reordered)"


def test_verify_needs_a_checkpoint_unless_told_otherwise(trail: AuditTrail, tmp_path: Path) -> None:
    elsewhere = AuditTrail(trail.store, TEST_KEYRING, None, CheckpointLog(tmp_path / "missing.jsonl"))
    result = elsewhere.verify()
    assert not result.ok and "no signed checkpoint" in result.reason
    assert not AuditTrail(trail.store, TEST_KEYRING).verify().ok  # none configured: not silently passed
    assert elsewhere.verify(checkpoints=False).ok
    assert not AuditTrail(trail.store).verify(checkpoints=False).ok  # no key: nothing can be authenticated


def test_forged_or_rewritten_checkpoints_detected(trail: AuditTrail) -> None:
    path = trail.checkpoint_log.path  # type: ignore[union-attr]
    original = path.read_text()
    forged = Checkpoint.sign(AuditKey(b"mallory's own key, 32 bytes long!!"), 3, "ab" * 32)
    path.write_text(original + forged.to_json() + "\n")
    assert "not configured" in trail.verify().reason
    lines = original.splitlines()
    doc = json.loads(lines[-1])
    doc["seq"] = 2  # a real checkpoint moved to another entry: its MAC no longer matches
    path.write_text("\n".join(lines[:-1] + [json.dumps(doc)]) + "\n")
    assert "invalid MAC" in trail.verify().reason
    # A correctly signed checkpoint that names another hash: the entry was rewritten.
    path.write_text(original + Checkpoint.sign(TEST_KEYRING.current, 9, "cd" * 32).to_json() + "\n")
    result = trail.verify()
    assert result.first_bad_seq == 9 and "differs from the signed checkpoint" in result.reason


def test_checkpoints_every_n_entries_and_every_t_seconds(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "state")
    log_file = CheckpointLog(tmp_path / "cp.jsonl")
    try:
        trail = AuditTrail(store, TEST_KEYRING, None, log_file)
        trail.checkpoints = Checkpointer(log_file, TEST_KEYRING.current, store.audit_head, every=5, interval_s=0.2)
        for i in range(12):
            trail.append("a", "e", "m", {"i": i})
        read = log_file.read(TEST_KEYRING)
        assert [c.seq for c in read.checkpoints] == [5, 10] and not read.problems
        trail.checkpoints.start()
        other = AuditTrail(store, TEST_KEYRING)  # another writer: its entries are checkpointed on the timer
        other.append("b", "e", "m", {})
        deadline = time.monotonic() + 20
        while trail.checkpoints.last.seq < 13 and time.monotonic() < deadline:  # type: ignore[union-attr]
            time.sleep(0.05)
        assert trail.checkpoints.last.seq == 13  # type: ignore[union-attr]
        trail.checkpoints.close()
        assert trail.verify().ok and trail.verify().checkpoint_seq == 13
    finally:
        store.close()


def _legacy_store(tmp_path: Path, n: int = 5) -> SQLiteStore:
    """A trail as lockgate wrote it before audit keys: the plain SHA-256 chain."""
    store = SQLiteStore(tmp_path / "old-state")
    prev = GENESIS_HASH
    for seq in range(1, n + 1):
        now, details = utc_now_iso(), canonical_json({"n": seq})
        digest = legacy_hash(seq, now, "alice", "test.event", "m/1", details, prev)
        row = AuditRow(seq, now, "alice", "test.event", "m/1", details, prev, digest, "")
        store.append_audit(lambda head, row=row: row)
        prev = digest
    return store


def test_an_unkeyed_chain_is_reported_not_accepted_until_sealed(tmp_path: Path) -> None:
    store = _legacy_store(tmp_path)
    log_file = CheckpointLog(tmp_path / "cp.jsonl")
    try:
        trail = AuditTrail(store, TEST_KEYRING, None, log_file)
        assert trail.unsealed_legacy() == 5
        result = trail.verify(checkpoints=False)
        assert not result.ok and "written before audit keys" in result.reason
        seal = trail.seal_legacy("carol", "reviewed the 5 entries of the old trail")
        assert seal.seq == 6 and seal.details["legacy_head_seq"] == 5
        Checkpointer(log_file, TEST_KEYRING.current, store.audit_head).write_head()
        trail.append("bob", "test.event", "m/1", {"n": 7})
        result = trail.verify()
        assert result.ok and result.unkeyed_entries == 5 and trail.unsealed_legacy() == 0
        assert "before audit keys" in result.warnings[0] and "carol" in result.warnings[0]
        with pytest.raises(FailedPrecondition, match="already sealed"):
            trail.seal_legacy("carol", "again")
        # Rewriting a sealed legacy entry (even re-hashed) breaks its link to the seal.
        rows = store.audit_entries()
        _tamper(trail, ("UPDATE audit SET details = ? WHERE seq = 3", ('{"n":33}',)))
        _rechain_from(trail, 3, [r for r in store.audit_entries() if r.seq <= 5], None)
        assert rows[2].hash != store.audit_entries()[2].hash
        assert not trail.verify().ok and trail.verify().first_bad_seq == 6
    finally:
        store.close()


def test_a_broken_legacy_chain_is_not_sealed(tmp_path: Path) -> None:
    store = _legacy_store(tmp_path)
    try:
        trail = AuditTrail(store, TEST_KEYRING)
        _tamper(trail, ("UPDATE audit SET actor = 'mallory' WHERE seq = 2", ()))
        with pytest.raises(FailedPrecondition, match="seq 2"):
            trail.seal_legacy("carol", "oops")
    finally:
        store.close()


def test_rotated_keys_verify_the_entries_they_wrote(trail: AuditTrail) -> None:
    new = AuditKey(b"the next audit key, 32 bytes long!")
    rotated = AuditTrail(trail.store, AuditKeyring(new, (TEST_KEYRING.current,)), None, trail.checkpoint_log)
    rotated.append("alice", "audit.key_rotated", "audit", {"from": TEST_KEYRING.current.key_id})
    assert rotated.verify(checkpoints=False).ok
    assert "not configured" in AuditTrail(trail.store, AuditKeyring(new)).verify(checkpoints=False).reason


def test_secrets_redacted(trail: AuditTrail) -> None:
    entry = trail.append(
        "alice", "token.create", "tokens",
        {"name": "ci", "token": "lgt_plain", "nested": {"db_password": "pw", "list": [{"client_secret": "s"}]}},
    )
    raw = json.dumps(_row(trail, entry.seq))
    for secret in ("lgt_plain", '"pw"', '"s"'):
        assert secret not in raw
    assert entry.details["token"] == "[REDACTED]"
    assert entry.details["nested"]["db_password"] == "[REDACTED]"
    assert entry.details["nested"]["list"][0]["client_secret"] == "[REDACTED]"
    assert entry.details["name"] == "ci"
    assert trail.verify().ok


def test_log_filters_by_model_and_time(trail: AuditTrail) -> None:
    m1 = trail.log(model="m1")
    assert [e.details["n"] for e in m1] == [1, 4, 7, 10]
    assert trail.log(model="m") == []  # prefix of another name must not match
    assert trail.log(model="m1%") == [] and trail.log(model="m_") == []  # no wildcards
    assert trail.log(model="M1") == []  # model names are case-sensitive
    cut = trail.log()[6].time
    assert [e.seq for e in trail.log(since=cut)] == [7, 8, 9, 10]
    assert [e.seq for e in trail.log(since=cut.replace("Z", "+00:00"))] == [7, 8, 9, 10]
    assert len(trail.log(limit=3)) == 3


def test_export_bundle(tmp_path: Path) -> None:
    with SQLiteStore(tmp_path) as store:
        trail = AuditTrail(store, TEST_KEYRING)
        with pytest.raises(NotFound):
            trail.export("fraud")
        store.add_record(RecordKind.CARD, "fraud", "2", "carol", {"owner": "risk-team"})
        store.add_record(RecordKind.VALIDATION, "fraud", "2", "bob", {"passed": True})
        store.add_record(RecordKind.APPROVAL, "fraud", "2", "carol", {"reason": "ok"})
        store.add_record(RecordKind.CARD, "other", "1", "carol", {"owner": "x"})
        store.set_policy("fraud", {"weights": {"1": 100}}, "op")
        store.set_policy("fraud", {"weights": {"1": 95, "2": 5}}, "op")
        trail.append("op", Action.CANARY_START, "fraud/2", {"steps": [5, 25]})
        trail.append("lockgate", Action.DRIFT_ALERT, "fraud/2", {"feature": "amount", "psi": 0.4})
        trail.append("lockgate", Action.CANARY_ROLLBACK, "fraud/2", {"guardrail": "drift", "evidence": {"psi": 0.4}})
        trail.append("op", Action.CANARY_ABORT, "fraud/3", {"reason": "operator"})
        trail.append("op", "test.event", "other/1", {})
        bundle = trail.export("fraud")
        assert bundle["model"] == "fraud"
        assert [c["body"]["owner"] for c in bundle["cards"]] == ["risk-team"]
        assert len(bundle["validation_reports"]) == 1 and len(bundle["approvals"]) == 1
        assert [p["revision"] for p in bundle["traffic_history"]] == [1, 2]
        assert [r["action"] for r in bundle["rollbacks"]] == [Action.CANARY_ROLLBACK, Action.CANARY_ABORT]
        assert bundle["rollbacks"][0]["details"]["evidence"] == {"psi": 0.4}
        assert [d["details"]["feature"] for d in bundle["drift_alerts"]] == ["amount"]
        assert len(bundle["audit_entries"]) == 4
        assert bundle["chain"]["ok"] is True
        json.dumps(bundle)  # the CLI writes it as JSON
