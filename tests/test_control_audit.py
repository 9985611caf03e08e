"""Hash-chained audit trail: verify passes intact, and names the first bad entry
after each kind of tampering done directly in the SQLite file."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from lockgate.control.audit import (
    GENESIS_HASH,
    Action,
    AuditAnchor,
    AuditTrail,
    canonical_json,
    entry_hash,
)
from lockgate.errors import NotFound
from lockgate.control.sqlite_store import SQLiteStore
from lockgate.control.store import RecordKind, utc_now_iso


@pytest.fixture()
def trail(tmp_path: Path) -> AuditTrail:
    store = SQLiteStore(tmp_path / "lockgate.db")
    trail = AuditTrail(store)
    for i in range(1, 11):
        trail.append("alice" if i % 2 else "bob", "test.event", f"m{i % 3}/1", {"n": i, "note": f"event {i}"})
    yield trail
    store.close()


def _tamper(trail: AuditTrail, *statements: tuple[str, tuple[object, ...]]) -> None:
    """Edit the file behind the store's back, as an attacker with file access would."""
    path = trail.store.path  # type: ignore[attr-defined]
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("DROP TRIGGER IF EXISTS audit_no_update")
    conn.execute("DROP TRIGGER IF EXISTS audit_no_delete")
    for sql, params in statements:
        conn.execute(sql, params)
    conn.close()


def _row(trail: AuditTrail, seq: int) -> tuple[object, ...]:
    conn = sqlite3.connect(trail.store.path)  # type: ignore[attr-defined]
    row = conn.execute("SELECT * FROM audit WHERE seq = ?", (seq,)).fetchone()
    conn.close()
    return tuple(row)


def test_intact_trail_verifies(trail: AuditTrail) -> None:
    result = trail.verify()
    assert result.ok and result.first_bad_seq is None and result.reason == ""
    assert result.checked == 10 and result.head_seq == 10
    entries = trail.log()
    assert entries[0].prev_hash == GENESIS_HASH
    assert all(b.prev_hash == a.hash for a, b in zip(entries, entries[1:]))
    e = entries[3]
    assert e.hash == entry_hash(e.seq, e.time, e.actor, e.action, e.subject, canonical_json(e.details), e.prev_hash)
    assert e.time.endswith("Z") and "T" in e.time


def test_database_refuses_ordinary_rewrites(trail: AuditTrail) -> None:
    conn = sqlite3.connect(trail.store.path)  # type: ignore[attr-defined]
    with pytest.raises(sqlite3.IntegrityError):
        conn.execute("UPDATE audit SET actor = 'mallory' WHERE seq = 3")
    with pytest.raises(sqlite3.IntegrityError):
        conn.execute("DELETE FROM audit WHERE seq = 3")
    conn.close()
    assert trail.verify().ok


def test_modified_details_detected(trail: AuditTrail) -> None:
    _tamper(trail, ("UPDATE audit SET details = ? WHERE seq = 7", ('{"n":700,"note":"event 7"}',)))
    result = trail.verify()
    assert not result.ok
    assert result.first_bad_seq == 7
    assert result.reason == "entry seq 7: hash mismatch (modified)"
    assert result.checked == 6


def test_modified_then_rehashed_detected_at_next(trail: AuditTrail) -> None:
    seq, time, actor, action, subject, _details, prev, _h = _row(trail, 4)
    forged = '{"n":4,"note":"nothing happened"}'
    new_hash = entry_hash(seq, time, actor, action, subject, forged, prev)  # type: ignore[arg-type]
    _tamper(trail, ("UPDATE audit SET details = ?, hash = ? WHERE seq = 4", (forged, new_hash)))
    result = trail.verify()
    assert (result.ok, result.first_bad_seq) == (False, 5)
    assert "prev_hash does not match entry 4" in result.reason


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


def test_inserted_forged_row_detected(trail: AuditTrail) -> None:
    # A careful forger: renumber 5..10 to 6..11 and insert a row at 5 with a
    # correct hash chained to entry 4. The original entry 5 no longer links.
    prev_hash = _row(trail, 4)[7]
    time = utc_now_iso()
    details = '{"n":0,"note":"forged approval"}'
    forged_hash = entry_hash(5, time, "mallory", "model.approve", "m1/1", details, prev_hash)  # type: ignore[arg-type]
    _tamper(
        trail,
        ("UPDATE audit SET seq = -seq WHERE seq >= 5", ()),
        ("UPDATE audit SET seq = 1 - seq WHERE seq < 0", ()),
        ("INSERT INTO audit VALUES (5, ?, 'mallory', 'model.approve', 'm1/1', ?, ?, ?)", (time, details, prev_hash, forged_hash)),
    )
    result = trail.verify()
    assert (result.ok, result.first_bad_seq) == (False, 6)
    assert result.reason == "entry seq 6: prev_hash does not match entry 5 (inserted or reordered)"


def test_appended_forged_row_with_bad_hash_detected(trail: AuditTrail) -> None:
    head = trail.head()
    assert head is not None
    _tamper(trail, ("INSERT INTO audit VALUES (11, ?, 'mallory', 'x', 'm', '{}', ?, ?)", (utc_now_iso(), head.hash, "f" * 64)))
    result = trail.verify()
    assert (result.ok, result.first_bad_seq) == (False, 11)
    assert "hash mismatch" in result.reason


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


def test_truncation_detected_with_anchor(trail: AuditTrail) -> None:
    head = trail.head()
    assert head is not None
    anchor = AuditAnchor(head.seq, head.hash)
    _tamper(trail, ("DELETE FROM audit WHERE seq >= 9", ()))
    assert trail.verify().ok  # a truncated chain is self-consistent ...
    result = trail.verify(anchor=anchor)  # ... but not against a recorded head
    assert not result.ok and result.first_bad_seq == 9 and "truncated" in result.reason


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
        trail = AuditTrail(store)
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
