"""``lockgate audit verify|log|export`` through the real CLI, and tampering done directly in SQLite.

The attacker of issue 15 §1 has write access to the state directory (the database file),
not to the audit key or the checkpoint file; every forgery must give rc 1 from the
default ``audit verify``, which checks the signed checkpoints without being told to."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from conftest import write_model
from lockgate._proto.lockgate import admin_pb2 as pb
from lockgate._proto.lockgate import admin_pb2_grpc as pb_grpc
from lockgate.control.audit import entry_mac, legacy_hash
from lockgate.control.audit_key import AuditKey
from lockgate.demo import DEMO_CARD, mlp_model
from lockgate_process import LockgateProcess

TOKENS = "alice:admin:tok-a,bob:approver:tok-b,olga:operator:tok-o,vic:viewer:tok-v"
CONFIG = "max_batch_size: 16\nversion_policy: {all: {}}\n"
CLI = [sys.executable, "-m", "lockgate.cli"]


def lockgate(*args: str, token: str = "tok-v", check: bool = True) -> subprocess.CompletedProcess:
    run = subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "LOCKGATE_TOKEN": token})
    assert "Traceback" not in run.stderr, run.stderr
    if check:
        assert run.returncode == 0, run.stderr
    return run


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    repo = tmp_path_factory.mktemp("audit") / "models"
    for version in (1, 2):
        write_model(repo, "alpha", version, mlp_model([4, 8, 2], seed=version, input_name="INPUT0", output_name="OUTPUT0"), CONFIG)
    write_model(repo, "beta", 1, mlp_model([4, 8, 2], seed=5, input_name="INPUT0", output_name="OUTPUT0"), CONFIG)
    env = {"LOCKGATE_TOKENS": TOKENS, "LOCKGATE_AUDIT_CHECKPOINT_INTERVAL_S": "0.2"}
    with LockgateProcess(repo, gated=True, env=env) as proc:
        with grpc.insecure_channel(proc.url) as channel:
            stub = pb_grpc.AdminServiceStub(channel)

            def as_(token: str):
                return (("authorization", f"Bearer {token}"),)

            for model, version in (("alpha", "1"), ("alpha", "2"), ("beta", "1")):
                stub.ValidateVersion(pb.ValidateVersionRequest(model=model, version=version), metadata=as_("tok-a"))
                stub.SetModelCard(pb.SetModelCardRequest(model=model, version=version, card_json=json.dumps(DEMO_CARD)),
                                  metadata=as_("tok-a"))
                stub.ApproveVersion(pb.ApproveVersionRequest(model=model, version=version, reason="reviewed"),
                                    metadata=as_("tok-b"))
            stub.SetWeights(pb.SetWeightsRequest(model="alpha", weights={"1": 80, "2": 20}), metadata=as_("tok-o"))
            stub.SetWeights(pb.SetWeightsRequest(model="beta", weights={"1": 100}), metadata=as_("tok-o"))
            status = pb_grpc.AdminServiceStub(channel).ControlStatus(pb.ControlStatusRequest(), metadata=as_("tok-v"))
            deadline = time.monotonic() + 30  # the checkpoint timer covers the head
            while status.checkpoint_seq < status.audit_head_seq and time.monotonic() < deadline:
                time.sleep(0.05)
                status = stub.ControlStatus(pb.ControlStatusRequest(), metadata=as_("tok-v"))
            assert status.checkpoint_seq == status.audit_head_seq, status
        yield proc


def db_path(server: LockgateProcess) -> Path:
    return server.state_dir / "lockgate.db"


def snapshot(server: LockgateProcess, target: Path) -> Path:
    """A consistent copy of the live store (the backup API copes with WAL), with the
    server's checkpoints beside it (``.cp``): the offline verifier reads both."""
    with sqlite3.connect(db_path(server)) as source, sqlite3.connect(target) as copy:
        source.backup(copy)
    checkpoints(target).write_bytes(server.checkpoint_file.read_bytes())
    KEYS[target] = server.audit_key_file
    return target


KEYS: dict[Path, Path] = {}


def checkpoints(path: Path) -> Path:
    return path.with_suffix(".cp")


def attack(path: Path, *statements: str, params: tuple = ()) -> None:
    """Rewrite the audit table as someone with file access would: triggers dropped first."""
    conn = sqlite3.connect(path)
    try:
        for trigger in ("audit_no_update", "audit_no_delete", "audit_at_head"):
            conn.execute(f"DROP TRIGGER IF EXISTS {trigger}")
        for statement in statements:
            conn.execute(statement, params if "?" in statement else ())
        conn.commit()
    finally:
        conn.close()


def rows(path: Path) -> list[tuple]:
    with sqlite3.connect(path) as conn:
        return conn.execute("SELECT seq, time, actor, action, subject, details, prev_hash, hash FROM audit ORDER BY seq").fetchall()


def rechain(path: Path, start: int, key: AuditKey | None = None) -> None:
    """Recompute every hash from ``start`` on, as a forger without the audit key can:
    plain SHA-256 (the old chain), or an HMAC under a key of their own."""
    all_rows = rows(path)
    prev = all_rows[start - 2][7] if start > 1 else "0" * 64
    statements, values = [], []
    for seq, when, actor, action, subject, details, _prev, _hash in all_rows:
        if seq < start:
            continue
        if key is None:
            digest, key_id = legacy_hash(seq, when, actor, action, subject, details, prev), ""
        else:
            digest, key_id = entry_mac(key, seq, when, actor, action, subject, details, prev), key.key_id
        statements.append("UPDATE audit SET prev_hash = ?, hash = ?, key_id = ? WHERE seq = ?")
        values.append((prev, digest, key_id, seq))
        prev = digest
    conn = sqlite3.connect(path)
    for statement, value in zip(statements, values):
        conn.execute(statement, value)
    conn.commit()
    conn.close()


def verify_offline(path: Path, human: bool = False, *extra: str) -> tuple[int, dict, str]:
    """Exit code, the JSON verdict, and (with ``human``) the table output's text."""
    keyed = ["--key-file", str(KEYS[path]), "--checkpoint-file", str(checkpoints(path)), *extra]
    run = lockgate("audit", "verify", "--store", str(path), "--json", *keyed, check=False)
    text = ""
    if human:
        shown = lockgate("audit", "verify", "--store", str(path), *keyed, check=False)
        assert shown.returncode == run.returncode
        text = shown.stderr + shown.stdout
    return run.returncode, json.loads(run.stdout), text


def test_verify_passes_on_intact_trail(server: LockgateProcess, tmp_path: Path) -> None:
    online = lockgate("audit", "verify", "--server", server.url)
    assert "intact" in online.stdout
    code, result, _ = verify_offline(snapshot(server, tmp_path / "copy.db"))
    assert code == 0 and result["ok"] and result["checked"] >= 15 and result["first_bad_seq"] == 0
    assert result["checkpoint_seq"] >= 1 and not result["registry_problems"]
    # Without the key nothing can be authenticated: not an "ok".
    keyless = lockgate("audit", "verify", "--store", str(tmp_path / "copy.db"), "--json", check=False)
    assert keyless.returncode == 1 and "no audit key" in json.loads(keyless.stdout)["reason"]


def test_the_store_refuses_ordinary_rewrites(server: LockgateProcess, tmp_path: Path) -> None:
    path = snapshot(server, tmp_path / "copy.db")
    with sqlite3.connect(path) as conn:
        for statement in ("UPDATE audit SET actor = 'mallory' WHERE seq = 3", "DELETE FROM audit WHERE seq = 3",
                          "INSERT OR REPLACE INTO audit (seq, time, actor, action, subject, details, prev_hash, hash) "
                          "SELECT seq, time, 'mallory', action, subject, details, prev_hash, hash FROM audit WHERE seq = 3"):
            with pytest.raises(sqlite3.DatabaseError, match="append-only"):
                conn.execute(statement)


def test_replace_then_rechain_every_later_row_is_refused(server: LockgateProcess, tmp_path: Path) -> None:
    for name, key in (("sha", None), ("own", AuditKey(b"mallory's own key, 32 bytes long!!"))):
        path = snapshot(server, tmp_path / f"{name}.db")
        attack(path, "UPDATE audit SET actor = 'mallory' WHERE seq = 3")  # the REPLACE, triggers dropped
        rechain(path, 3, key)
        code, result, _ = verify_offline(path)
        assert code == 1 and result["first_bad_seq"] == 3, result


def test_a_forged_approval_at_the_head_is_refused_even_with_an_anchor(server: LockgateProcess, tmp_path: Path) -> None:
    path = snapshot(server, tmp_path / "copy.db")
    head = rows(path)[-1]
    anchor = f"{head[0]}:{head[7]}"
    forged = legacy_hash(head[0] + 1, head[1], "mallory", "model.approve", "alpha/2", '{"reason":"ok"}', head[7])
    attack(path, "INSERT INTO audit VALUES (?, ?, 'mallory', 'model.approve', 'alpha/2', '{\"reason\":\"ok\"}', ?, ?, '')",
           params=(head[0] + 1, head[1], head[7], forged))
    code, result, _ = verify_offline(path, False, "--anchor", anchor)
    assert code == 1 and result["first_bad_seq"] == head[0] + 1 and "unkeyed after keyed" in result["reason"]


def test_deleting_the_tail_or_everything_is_refused_without_an_anchor(server: LockgateProcess, tmp_path: Path) -> None:
    tail = snapshot(server, tmp_path / "tail.db")
    attack(tail, f"DELETE FROM audit WHERE seq > {len(rows(tail)) - 3}")
    code, result, _ = verify_offline(tail)
    assert code == 1 and "truncated" in result["reason"], result
    everything = snapshot(server, tmp_path / "all.db")
    attack(everything, "DELETE FROM audit")
    code, result, text = verify_offline(everything, True)
    assert code == 1 and result["checked"] == 0 and "truncated" in result["reason"] and "BROKEN" in text
    # Even with the checkpoint check skipped (it must be asked for), the registry still
    # names versions whose audited history is gone.
    code, result, _ = verify_offline(everything, False, "--no-checkpoint")
    assert code == 1 and result["checkpoint_seq"] == -1
    assert "the audit trail has no registration" in result["reason"]
    intact = snapshot(server, tmp_path / "intact.db")
    code, result, text = verify_offline(intact, True, "--no-checkpoint")
    assert code == 0 and "NOT checked against a checkpoint" in " ".join(text.split())


def test_dropping_tampered_entries_and_rechaining_is_refused(server: LockgateProcess, tmp_path: Path) -> None:
    path = snapshot(server, tmp_path / "copy.db")
    first = rows(path)[4][0]
    attack(path, f"DELETE FROM audit WHERE seq IN ({first}, {first + 1})",
           f"UPDATE audit SET seq = seq - 2 WHERE seq > {first + 1}")
    rechain(path, first)
    code, result, _ = verify_offline(path)
    assert code == 1 and result["first_bad_seq"] == first, result


def test_a_registry_edit_shows_in_verify(server: LockgateProcess, tmp_path: Path) -> None:
    """Issue 15 §2: the registry is checked against the trail by ``audit verify``."""
    path = snapshot(server, tmp_path / "copy.db")
    attack(path, "UPDATE versions SET sha256 = 'aaaa' || substr(sha256, 5) WHERE model = 'beta'",
           "UPDATE versions SET state = 'approved', metadata = '{}' WHERE model = 'alpha' AND version = '2'")
    code, result, text = verify_offline(path, True)
    assert code == 1 and result["first_bad_seq"] == 0
    problems = " | ".join(result["registry_problems"])
    assert "beta/1: the registry's artifact digest aaaa" in problems
    assert "alpha/2" in problems and "approver" in problems
    assert "registry disagrees with the audit trail" in text


def test_modified_entry_is_named(server: LockgateProcess, tmp_path: Path) -> None:
    path = snapshot(server, tmp_path / "copy.db")
    attack(path, "UPDATE audit SET details = '{\"reason\":\"nothing to see\"}' WHERE seq = 7")
    code, result, text = verify_offline(path, human=True)
    assert code == 1 and result["first_bad_seq"] == 7 and "modified" in result["reason"]
    assert "seq 7" in text and "BROKEN" in text


def test_deleted_entry_is_named(server: LockgateProcess, tmp_path: Path) -> None:
    path = snapshot(server, tmp_path / "copy.db")
    attack(path, "DELETE FROM audit WHERE seq = 5")
    code, result, _ = verify_offline(path)
    assert code == 1 and result["first_bad_seq"] == 5 and "deleted" in result["reason"]
    assert "seq 5" in result["reason"]


def test_inserted_entries_are_named(server: LockgateProcess, tmp_path: Path) -> None:
    # A careless forger appends a row with a made-up hash.
    naive = snapshot(server, tmp_path / "naive.db")
    head = rows(naive)[-1]
    attack(naive, "INSERT INTO audit VALUES (?, ?, 'mallory', 'model.approve', 'alpha/2', '{}', ?, ?, '')",
           params=(head[0] + 1, head[1], head[7], "f" * 64))
    code, result, _ = verify_offline(naive)
    assert code == 1 and result["first_bad_seq"] == head[0] + 1

    # A careful one slips an entry in after seq 4 and renumbers the rest: without the key
    # it cannot be MAC'd, and the entry after it no longer links either.
    careful = snapshot(server, tmp_path / "careful.db")
    before = rows(careful)[3]  # seq 4
    forged_details = '{"reason":"approved by nobody"}'
    forged_hash = legacy_hash(5, before[1], "mallory", "model.approve", "alpha/2", forged_details, before[7])
    attack(
        careful,
        "UPDATE audit SET seq = -(seq + 1) WHERE seq >= 5",
        "UPDATE audit SET seq = -seq WHERE seq < 0",
        "INSERT INTO audit VALUES (5, ?, 'mallory', 'model.approve', 'alpha/2', ?, ?, ?, '')",
        params=(before[1], forged_details, before[7], forged_hash),
    )
    code, result, _ = verify_offline(careful)
    assert code == 1 and result["first_bad_seq"] == 5 and "unkeyed" in result["reason"]


def test_reordered_entries_are_named(server: LockgateProcess, tmp_path: Path) -> None:
    path = snapshot(server, tmp_path / "copy.db")
    attack(
        path,
        "UPDATE audit SET seq = -1 WHERE seq = 4",
        "UPDATE audit SET seq = 4 WHERE seq = 9",
        "UPDATE audit SET seq = 9 WHERE seq = -1",
    )
    code, result, _ = verify_offline(path)
    assert code == 1 and result["first_bad_seq"] == 4 and "reordered" in result["reason"]
    assert "seq 4" in result["reason"]


def test_log_by_model_and_since(server: LockgateProcess) -> None:
    everything = json.loads(lockgate("audit", "log", "--server", server.url, "--json").stdout)
    alpha = json.loads(lockgate("audit", "log", "--server", server.url, "--model", "alpha", "--json").stdout)
    assert alpha and all(e["subject"] == "alpha" or e["subject"].startswith("alpha/") for e in alpha)
    assert {("olga", "traffic.set"), ("bob", "model.approve"), ("alice", "model.validate")} <= {(e["actor"], e["action"]) for e in alpha}
    assert len(alpha) < len(everything)
    cut = everything[len(everything) // 2]
    later = json.loads(lockgate("audit", "log", "--server", server.url, "--since", cut["time"], "--json").stdout)
    assert later and later[0]["seq"] <= cut["seq"] and all(e["time"] >= cut["time"] for e in later)
    assert later[-1]["seq"] == everything[-1]["seq"]
    table = lockgate("audit", "log", "--server", server.url, "--model", "beta", "--limit", "3")
    assert "audit trail" in table.stdout and "beta" in table.stdout
    bad = lockgate("audit", "log", "--server", server.url, "--since", "yesterday", check=False)
    assert bad.returncode == 1 and "INVALID_ARGUMENT" in bad.stderr


def test_export_bundle(server: LockgateProcess, tmp_path: Path) -> None:
    out = tmp_path / "alpha.json"
    lockgate("audit", "export", "--server", server.url, "--model", "alpha", "--out", str(out))
    bundle = json.loads(out.read_text())
    assert bundle["format"] == "lockgate.evidence/v1" and bundle["model"] == "alpha"
    assert {v["version"] for v in bundle["versions"]} == {"1", "2"}
    assert {a["body"]["approver"] for a in bundle["approvals"]} == {"bob"}
    assert len(bundle["validation_reports"]) == 2 and bundle["cards"][0]["body"]["owner"] == DEMO_CARD["owner"]
    assert bundle["traffic_history"][-1]["document"]["weights"] == {"1": 80, "2": 20}
    assert bundle["chain"]["ok"] and all(e["subject"].startswith("alpha") for e in bundle["audit_entries"])
    # The same bundle offline, straight from the state dir.
    offline = json.loads(lockgate("audit", "export", "--store", str(server.state_dir), "--model", "alpha",
                                  "--key-file", str(server.audit_key_file),
                                  "--checkpoint-file", str(server.checkpoint_file)).stdout)
    assert offline["chain"]["ok"], offline["chain"]
    assert offline["approvals"] == bundle["approvals"]
    missing = lockgate("audit", "export", "--server", server.url, "--model", "nope", check=False)
    assert missing.returncode == 1 and "NOT_FOUND" in missing.stderr


def test_server_side_verify_catches_tampering_of_the_live_store(server: LockgateProcess) -> None:
    """Last in the module: it breaks the live server's chain."""
    attack(db_path(server), "UPDATE audit SET actor = 'mallory' WHERE seq = 2")
    run = lockgate("audit", "verify", "--server", server.url, "--json", check=False)
    assert run.returncode == 1
    result = json.loads(run.stdout)
    assert result["first_bad_seq"] == 2 and "MAC mismatch" in result["reason"]
