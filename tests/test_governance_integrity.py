"""Issue 15 §1-§4 on real servers: the keyed trail at start-up, changes recorded before they
go live (disk full, SIGKILL in a stream of writes, concurrent writers), the registry checked
against the trail, and the role table of the README against the code."""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time
import urllib.request
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.grpc import service_pb2, service_pb2_grpc

from conftest import write_model
from lockgate._proto.lockgate import admin_pb2 as pb
from lockgate._proto.lockgate import admin_pb2_grpc as pb_grpc
from lockgate.control.audit import GENESIS_HASH, AuditTrail, canonical_json, legacy_hash
from lockgate.control.audit_key import AuditKey, AuditKeyring
from lockgate.control.checkpoint import CheckpointLog
from lockgate.control.sqlite_store import SQLiteStore
from lockgate.control.store import AuditRow, utc_now_iso
from lockgate.control.validation import sha256_file
from lockgate.demo import DEMO_CARD, mlp_model
from lockgate_process import LOCKGATE, LockgateProcess, free_port

TOKENS = "alice:admin:tok-a,bob:approver:tok-b,olga:operator:tok-o,vic:viewer:tok-v"
WIDTH = 4
CONFIG = "max_batch_size: 8\nversion_policy: {all: {}}\ndynamic_batching: {max_queue_delay_us: 0}\n"
ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.timeout(600)


def mlp(seed: int):
    return mlp_model([WIDTH, 8, 3], seed=seed, input_name="INPUT0", output_name="OUTPUT0")


def repository(root: Path, models: tuple[str, ...] = ("m",)) -> Path:
    repo = root / "models"
    for name in models:
        for version in (1, 2):
            write_model(repo, name, version, mlp(version + 10 * len(name)), CONFIG)
    return repo


class Admin:
    def __init__(self, url: str) -> None:
        self.channel = grpc.insecure_channel(url)
        self.stub = pb_grpc.AdminServiceStub(self.channel)

    def __call__(self, method: str, request, token: str = "tok-o"):
        return getattr(self.stub, method)(request, metadata=(("authorization", f"Bearer {token}"),), timeout=60)

    def weights(self, model: str, weights: dict[str, int]) -> pb.TrafficStatus:
        return self("SetWeights", pb.SetWeightsRequest(model=model, weights=weights))

    def close(self) -> None:
        self.channel.close()


def offline_trail(proc: LockgateProcess) -> tuple[SQLiteStore, AuditTrail]:
    store = SQLiteStore(proc.state_dir)
    keyring = AuditKeyring.load(proc.audit_key_file)
    return store, AuditTrail(store, keyring, None, CheckpointLog(proc.checkpoint_file))


def policy_entries(trail: AuditTrail, model: str) -> list:
    return [e for e in trail.log(model=model) if e.subject == model and e.action.startswith("traffic.")]


def serve_cmd(repo: Path, state_dir: Path, *args: str) -> list[str]:
    return [*LOCKGATE, "serve", "--model-repository", str(repo), "--grpc-port", str(free_port()),
            "--metrics-port", str(free_port()), "--host", "127.0.0.1", "--state-dir", str(state_dir), *args]


# ------------------------------------------------------------------------------ §1 start-up
def test_the_server_refuses_to_start_without_a_key_outside_the_state_dir(tmp_path: Path) -> None:
    repo = repository(tmp_path)
    state = tmp_path / "state"
    run = subprocess.run(serve_cmd(repo, state), capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "audit_key_file is not set" in run.stderr and "lockgate audit keygen" in run.stderr
    state.mkdir(exist_ok=True)
    AuditKey.generate(state / "audit.key")
    run = subprocess.run(serve_cmd(repo, state, "--audit-key-file", str(state / "audit.key")),
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "lies inside state_dir" in run.stderr
    assert "Traceback" not in run.stderr


def _legacy_state(state: Path, entries: int = 4) -> None:
    """An older state dir: a trail written as the plain SHA-256 chain, before audit keys."""
    store = SQLiteStore(state)
    prev = GENESIS_HASH
    for seq in range(1, entries + 1):
        now, details = utc_now_iso(), canonical_json({"n": seq})
        digest = legacy_hash(seq, now, "alice", "traffic.set", "m", details, prev)
        store.append_audit(lambda head, row=AuditRow(seq, now, "alice", "traffic.set", "m", details, prev, digest): row)
        prev = digest
    store.close()


def test_an_unkeyed_state_dir_is_reported_and_starts_only_once_sealed(tmp_path: Path) -> None:
    repo = repository(tmp_path)
    state = tmp_path / "state"
    _legacy_state(state)
    first = LockgateProcess(repo, state_dir=state, env={"LOCKGATE_TOKENS": TOKENS})
    assert first.proc.wait(120) == 2
    log = first.log()
    first.terminate()
    assert "holds 4 entries written before audit keys" in log and "lockgate audit seal" in log
    seal = subprocess.run([*LOCKGATE, "audit", "seal", "--store", str(state), "--key-file", str(first.audit_key_file),
                           "--checkpoint-file", str(first.checkpoint_file), "--actor", "carol",
                           "--reason", "checked the 4 entries of the old trail"],
                          capture_output=True, text=True, timeout=120)
    assert seal.returncode == 0, seal.stderr
    assert "sealed 4 unkeyed entries at seq 5" in seal.stdout
    with LockgateProcess(repo, state_dir=state, env={"LOCKGATE_TOKENS": TOKENS}) as proc:
        verify = subprocess.run([*LOCKGATE, "audit", "verify", "--server", proc.url, "--token", "tok-v", "--json"],
                                capture_output=True, text=True, timeout=120)
        result = json.loads(verify.stdout)
        assert verify.returncode == 0 and result["ok"] and result["unkeyed_entries"] == 4
        assert "before audit keys" in result["warnings"][0]
        shown = subprocess.run([*LOCKGATE, "audit", "verify", "--server", proc.url, "--token", "tok-v"],
                               capture_output=True, text=True, timeout=120)
        assert "warning" in shown.stderr and "carol" in shown.stderr


def test_checkpoints_go_to_the_file_the_log_and_the_metric(tmp_path: Path) -> None:
    repo = repository(tmp_path)
    env = {"LOCKGATE_TOKENS": TOKENS, "LOCKGATE_AUDIT_CHECKPOINT_EVERY": "3"}
    with LockgateProcess(repo, env=env) as proc:
        admin = Admin(proc.url)
        try:
            for i in range(7):
                admin.weights("m", {"1": 100 - i, "2": i})
            status = admin("ControlStatus", pb.ControlStatusRequest(), token="tok-v")
        finally:
            admin.close()
        read = CheckpointLog(proc.checkpoint_file).read(AuditKeyring.load(proc.audit_key_file))
        assert not read.problems and read.newest is not None and read.newest.seq == status.checkpoint_seq > 0
        assert len(read.checkpoints) >= 3  # start-up, then every 3 entries this process appended
        logged = [json.loads(line.split("audit checkpoint ", 1)[1]) for line in proc.log().splitlines()
                  if "audit checkpoint {" in line]
        assert logged[-1]["seq"] == read.newest.seq and logged[-1]["mac"] == read.newest.mac
        body = urllib.request.urlopen(f"http://127.0.0.1:{proc.metrics_port}/metrics", timeout=10).read().decode()
        assert f"lockgate_audit_head {float(read.newest.seq)}" in body
        assert "lockgate_audit_checkpoints_total" in body and "lockgate_audit_checkpoint_failures_total 0.0" in body


# ------------------------------------------------------------------------------ §2 registry in the chain
def test_a_registry_edit_cannot_make_a_tampered_model_serve(tmp_path: Path) -> None:
    """UPDATE versions SET sha256 = <hash of the tampered artifact>: refused, audited, in verify."""
    import sqlite3

    repo = repository(tmp_path)
    with LockgateProcess(repo, gated=True, env={"LOCKGATE_TOKENS": TOKENS}) as proc:
        admin = Admin(proc.url)
        try:
            admin("ValidateVersion", pb.ValidateVersionRequest(model="m", version="1"), token="tok-a")
            admin("SetModelCard", pb.SetModelCardRequest(model="m", version="1", card_json=json.dumps(DEMO_CARD)), token="tok-a")
            admin("ApproveVersion", pb.ApproveVersionRequest(model="m", version="1", reason="ok"), token="tok-b")
            admin.weights("m", {"1": 100})
            artifact = repo / "m" / "1" / "model.onnx"
            write_model(repo, "m", 1, mlp(77))  # the tampered model
            with sqlite3.connect(proc.state_dir / "lockgate.db") as conn:  # and the registry "fixed" to match it
                conn.execute("UPDATE versions SET sha256 = ? WHERE model = 'm' AND version = '1'", (sha256_file(artifact),))
            inference = service_pb2_grpc.GRPCInferenceServiceStub(admin.channel)
            with pytest.raises(grpc.RpcError) as info:
                inference.RepositoryModelLoad(service_pb2.RepositoryModelLoadRequest(model_name="m"), metadata=(("authorization", "Bearer tok-a"),), timeout=60)
            assert info.value.code() is grpc.StatusCode.FAILED_PRECONDITION
            assert "changed from the audited" in info.value.details()
            entries = admin("AuditLog", pb.AuditLogRequest(model="m"), token="tok-v").entries
            actions = [(e.action, e.subject) for e in entries]
            assert ("artifact.tampered", "m/1") in actions and ("registry.mismatch", "m/1") in actions
            # The version takes no traffic at all now (the registry row cannot be trusted).
            with grpcclient.InferenceServerClient(proc.url) as client:
                x = grpcclient.InferInput("INPUT0", [1, WIDTH], "FP32")
                x.set_data_from_numpy(np.ones((1, WIDTH), np.float32))
                with pytest.raises(Exception, match="PERMISSION_DENIED|disagrees with the audit trail"):
                    client.infer("m", [x])
            verdict = admin("AuditVerify", pb.AuditVerifyRequest(), token="tok-v")
            assert not verdict.ok and verdict.first_bad_seq == 0
            assert any("artifact digest" in p and "m/1" in p for p in verdict.registry_problems)
            body = urllib.request.urlopen(f"http://127.0.0.1:{proc.metrics_port}/metrics", timeout=10).read().decode()
            assert "lockgate_audit_verify_ok 0.0" in body
        finally:
            admin.close()


# ------------------------------------------------------------------------------ §3 persisted before live
@contextmanager
def small_filesystem(path: Path, size: str = "3m") -> Iterator[Path]:
    """A tmpfs of ``size`` at ``path``: the state directory's disk, which the test fills."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def fill(directory: Path) -> Path:
    filler = directory / "filler"
    with open(filler, "wb") as handle:
        try:
            while True:
                handle.write(b"\0" * 65536)
                handle.flush()
        except OSError:
            pass
    return filler


def test_a_full_disk_refuses_the_change_and_nothing_goes_live(tmp_path: Path) -> None:
    repo = repository(tmp_path)
    with small_filesystem(tmp_path / "statefs") as state:
        proc = LockgateProcess(repo, state_dir=state, env={"LOCKGATE_TOKENS": TOKENS}).wait_ready()
        admin = Admin(proc.url)
        acked: dict[int, dict[str, int]] = {}
        refusals: list[str] = []
        try:
            first = admin.weights("m", {"1": 100})
            acked[first.revision] = {"1": 100}
            filler = fill(state)
            for i in range(400):
                split = {"1": 30, "2": 70} if i % 2 == 0 else {"1": 70, "2": 30}
                try:
                    status = admin.weights("m", split)
                    acked[status.revision] = split
                except grpc.RpcError as exc:
                    assert exc.code() is grpc.StatusCode.UNAVAILABLE, exc
                    refusals.append(exc.details())
                    live = admin("GetTraffic", pb.GetTrafficRequest(model="m"), token="tok-v")
                    assert live.revision == max(acked), "a refused change went live"
                    assert {w.version: w.weight for w in live.weights if w.weight} == {
                        v: w for v, w in acked[max(acked)].items() if w}
                    if len(refusals) == 3:
                        break
            assert len(refusals) == 3, f"the full disk never refused a write ({len(acked)} acknowledged)"
            assert all("full" in r for r in refusals), refusals
            filler.unlink()
            after = admin.weights("m", {"1": 50, "2": 50})
            assert after.revision == max(acked) + 1  # the refused changes took no revision
            acked[after.revision] = {"1": 50, "2": 50}
        finally:
            admin.close()
            proc.terminate()
        again = LockgateProcess(repo, state_dir=state, env={"LOCKGATE_TOKENS": TOKENS}).wait_ready()
        try:
            admin = Admin(again.url)
            live = admin("GetTraffic", pb.GetTrafficRequest(model="m"), token="tok-v")
            assert live.revision == max(acked) and {w.version: w.weight for w in live.weights} == acked[max(acked)]
            admin.close()
        finally:
            again.terminate()
        store, trail = offline_trail(again)
        try:
            assert [p.revision for p in store.policy_history("m")] == sorted(acked)
            assert [e.details["revision"] for e in policy_entries(trail, "m")] == sorted(acked)
            assert trail.verify().ok
        finally:
            store.close()


def test_sigkill_in_a_stream_of_writes_loses_nothing_acknowledged(tmp_path: Path) -> None:
    repo = repository(tmp_path)
    state = tmp_path / "state"
    acked: dict[int, dict[str, int]] = {}
    for run, kill_after in enumerate((0.4, 0.9, 1.5)):
        proc = LockgateProcess(repo, state_dir=state, env={"LOCKGATE_TOKENS": TOKENS},
                               log_path=tmp_path / f"run-{run}.log").wait_ready()
        admin = Admin(proc.url)
        stop = threading.Event()
        in_flight: list[dict[str, int]] = []

        def writer() -> None:
            i = 0
            while not stop.is_set():
                split = {"1": 1 + i % 99, "2": 99 - i % 99}
                in_flight[:] = [split]
                try:
                    status = admin.weights("m", split)
                except grpc.RpcError:
                    return  # the server died mid-call: this one may or may not have committed
                acked[status.revision] = split
                i += 1

        thread = threading.Thread(target=writer)
        thread.start()
        time.sleep(kill_after)
        proc.proc.send_signal(signal.SIGKILL)
        proc.proc.wait(30)
        stop.set()
        thread.join(60)
        admin.close()
        proc.terminate()
        store, trail = offline_trail(proc)
        try:
            persisted = {p.revision: p.document for p in store.policy_history("m")}
            audited = [e.details["revision"] for e in policy_entries(trail, "m")]
        finally:
            store.close()
        assert sorted(persisted) == list(range(1, len(persisted) + 1)), "a revision was skipped or reused"
        assert set(acked) <= set(persisted), "an acknowledged change was lost"
        unacked = set(persisted) - set(acked)
        assert len(unacked) <= 1 and all(r == max(persisted) for r in unacked), unacked  # at most the in-flight one
        for revision, split in acked.items():
            assert persisted[revision]["weights"] == split, revision
        assert audited == sorted(persisted), "audit order differs from revision order, or an entry is missing"
        acked.update({r: persisted[r]["weights"] for r in unacked})
    with LockgateProcess(repo, state_dir=state, env={"LOCKGATE_TOKENS": TOKENS}) as proc:
        admin = Admin(proc.url)
        try:
            live = admin("GetTraffic", pb.GetTrafficRequest(model="m"), token="tok-v")
            assert live.revision == max(acked) and {w.version: w.weight for w in live.weights} == acked[max(acked)]
            assert admin.weights("m", {"1": 100}).revision == max(acked) + 1  # never reused
            assert admin("AuditVerify", pb.AuditVerifyRequest(), token="tok-v").ok
        finally:
            admin.close()


def test_concurrent_writers_audit_in_revision_order(tmp_path: Path) -> None:
    repo = repository(tmp_path, ("a", "b"))
    with LockgateProcess(repo, env={"LOCKGATE_TOKENS": TOKENS}) as proc:
        results: dict[str, list[int]] = {"a": [], "b": []}
        aborted = Counter()
        lock = threading.Lock()

        def writer(model: str, n: int) -> None:
            admin = Admin(proc.url)
            try:
                for i in range(15):
                    try:
                        status = admin.weights(model, {"1": 1 + (i * 7 + n) % 98, "2": 50})
                    except grpc.RpcError as exc:
                        assert exc.code() is grpc.StatusCode.ABORTED, exc  # a lost compare-and-set, said so
                        with lock:
                            aborted[model] += 1
                        continue
                    with lock:
                        results[model].append(status.revision)
            finally:
                admin.close()

        threads = [threading.Thread(target=writer, args=(m, n)) for m in ("a", "b") for n in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(300)
        store, trail = offline_trail(proc)
        try:
            for model in ("a", "b"):
                acked = sorted(results[model])
                assert len(acked) == len(set(acked)), "two writers were told the same revision"
                history = [p.revision for p in store.policy_history(model)]
                assert history == acked == list(range(1, len(acked) + 1))
                assert [e.details["revision"] for e in policy_entries(trail, model)] == history
        finally:
            store.close()
        assert sum(len(r) for r in results.values()) + sum(aborted.values()) == 8 * 15


# ------------------------------------------------------------------------------ §4 the role table
def _readme_roles() -> dict[str, set[str]]:
    """permission -> the roles the README's role table grants it to."""
    text = (ROOT / "README.md").read_text()
    table = text.split("<!-- roles:begin -->", 1)[1].split("<!-- roles:end -->", 1)[0]
    lines = [line for line in table.splitlines() if line.startswith("|")]
    roles = [c.strip() for c in lines[0].strip().strip("|").split("|")][1:]
    parsed = {}
    for row in lines[2:]:
        cells = [c.strip() for c in row.strip().strip("|").split("|")]
        parsed[cells[0].strip("`")] = {role for role, cell in zip(roles, cells[1:]) if cell == "yes"}
    return parsed


def test_the_readme_role_table_matches_the_code() -> None:
    """Which roles hold which permission; which RPC needs which permission is the README's
    per-RPC table, walked against a real server by tests/test_permissions.py."""
    from lockgate.control.auth import PERMISSIONS, Permission, Role

    readme = _readme_roles()
    assert set(readme) == {p.value for p in Permission}
    for permission in Permission:
        assert readme[permission.value] == {role.value for role, granted in PERMISSIONS.items()
                                            if permission in granted}, permission
    header = (ROOT / "README.md").read_text().split("<!-- roles:begin -->", 1)[1].splitlines()[1]
    assert {c.strip() for c in header.strip("|").split("|")[1:]} == {r.value for r in Role}
