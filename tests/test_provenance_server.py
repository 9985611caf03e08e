"""Provenance on a real server: signed versions load and approve; a changed, unsigned or
untrusted version is refused alone (audited, counted) while the others serve; the trust policy
through the CLI; signed evidence verified offline; startup without the model-signing extra."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import grpc
import pytest
from tritonclient.grpc import service_pb2, service_pb2_grpc

from conftest import write_model
from lockgate._proto.lockgate import admin_pb2 as pb
from lockgate._proto.lockgate import admin_pb2_grpc as pb_grpc
from lockgate.demo import DEMO_CARD
from lockgate_process import LOCKGATE, LockgateProcess
from signing_keys import flip_byte, make_key, sign_version
from test_admin_api import infer, mlp

TOKENS = "alice:admin:tok-a,bob:approver:tok-b,vic:viewer:tok-v"
CONFIG = "max_batch_size: 16\nversion_policy: {all: {}}\ndynamic_batching: {max_queue_delay_us: 0}\n"
VENDOR_CARD = {
    **DEMO_CARD, "vendor": "Acme Models", "license": "Apache-2.0", "source": "https://models.example.com/acme/scorer@2",
    "third_party": True, "vendor_assessment": {"reference": "VA-2025-017", "date": "2025-03-01"},
}


def server_config(path: Path, trusted_key: Path, require: str) -> Path:
    path.write_text(
        "provenance:\n"
        f"  require_signature: {require}\n"
        "  allowed_licenses: [Apache-2.0, MIT]\n"
        "  trusted_signers:\n"
        f"    - {{name: acme-release, vendor: Acme Models, public_key: {trusted_key}}}\n"
    )
    return path


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return response.read().decode()


def cli(*args: str, token: str = "tok-a", check: bool = True) -> subprocess.CompletedProcess:
    run = subprocess.run([*LOCKGATE, *args], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "LOCKGATE_TOKEN": token})
    assert "Traceback" not in run.stderr, run.stderr
    if check:
        assert run.returncode == 0, (run.stdout, run.stderr)
    return run


def audited(stub: pb_grpc.AdminServiceStub, model: str, action: str) -> list[dict]:
    entries = stub.AuditLog(pb.AuditLogRequest(model=model), metadata=(("authorization", "Bearer tok-v"),), timeout=30).entries
    return [json.loads(e.details_json) | {"_subject": e.subject, "_actor": e.actor} for e in entries if e.action == action]


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory):
    directory = tmp_path_factory.mktemp("keys")
    return {name: make_key(directory, name) for name in ("acme", "stranger", "auditor")}


@pytest.fixture(scope="module")
def gated(tmp_path_factory: pytest.TempPathFactory, keys):
    root = tmp_path_factory.mktemp("provenance")
    repo = root / "models"
    for version in (1, 2):
        write_model(repo, "scorer", version, mlp(version), CONFIG)
        sign_version(repo / "scorer" / str(version), keys["acme"])
    config = server_config(root / "server.yaml", keys["acme"].public, "third_party")
    with LockgateProcess(repo, gated=True, args=["--config", str(config)], env={"LOCKGATE_TOKENS": TOKENS}) as proc:
        with grpc.insecure_channel(proc.url) as channel:
            yield proc, pb_grpc.AdminServiceStub(channel), service_pb2_grpc.GRPCInferenceServiceStub(channel)


def as_(token: str):
    return (("authorization", f"Bearer {token}"),)


def test_signed_versions_load_approve_and_show_their_signer(gated) -> None:
    proc, admin, _ = gated
    for version in ("1", "2"):
        report = admin.ValidateVersion(pb.ValidateVersionRequest(model="scorer", version=version), metadata=as_("tok-a"))
        assert report.passed, report.report_json
        checks = {c["name"]: c for c in json.loads(report.report_json)["checks"]}
        assert checks["provenance"]["status"] == "passed"
        admin.ApproveVersion(pb.ApproveVersionRequest(model="scorer", version=version, reason="vendor assessed",
                                                      card_json=json.dumps(VENDOR_CARD)), metadata=as_("tok-b"))
    admin.SetWeights(pb.SetWeightsRequest(model="scorer", weights={"1": 50, "2": 50}), metadata=as_("tok-a"))
    assert infer(proc.url, "scorer", "1").get_response().model_version == "1"
    assert infer(proc.url, "scorer", "2").get_response().model_version == "2"
    shown = admin.ShowVersion(pb.ShowVersionRequest(model="scorer", version="2"), metadata=as_("tok-v"))
    provenance = shown.version.provenance
    assert provenance.signed and provenance.signer == "acme-release" and provenance.vendor == "Acme Models"
    assert provenance.manifest_digest.startswith("sha256:") and list(provenance.files) == ["model.onnx"]
    card = json.loads(shown.details_json)["cards"][-1]
    assert card["signer"].startswith("acme-release (Acme Models), key sha256:")
    assert card["manifest_digest"] == provenance.manifest_digest
    out = cli("models", "show", "scorer", "2", "--server", proc.url, token="tok-v").stdout
    assert "signed by acme-release (Acme Models)" in out and provenance.manifest_digest[:20] in out
    assert "license Apache-2.0" in out and "VA-2025-017" in out
    verified = cli("models", "verify", "scorer", "2", "--server", proc.url, token="tok-v").stdout
    assert "verified scorer / 2" in verified


def test_a_changed_version_is_refused_alone(gated) -> None:
    proc, admin, inference = gated
    artifact = proc.repo / "scorer" / "2" / "model.onnx"
    original = artifact.read_bytes()
    flip_byte(artifact, offset=-2)  # one byte of model.onnx
    try:
        with pytest.raises(grpc.RpcError) as info:
            inference.RepositoryModelLoad(service_pb2.RepositoryModelLoadRequest(model_name="scorer"), timeout=60,
                                          metadata=as_("tok-a"))
        assert info.value.code() is grpc.StatusCode.FAILED_PRECONDITION
        assert "version(s) 2 refused" in info.value.details() and "changed: model.onnx" in info.value.details()
        # Version 1 keeps serving (and so does the copy of version 2 built from the verified bytes).
        assert infer(proc.url, "scorer", "1").get_response().model_version == "1"
        refusals = audited(admin, "scorer", "artifact.signature_invalid")
        assert refusals and refusals[-1]["_subject"] == "scorer/2" and refusals[-1]["reason"] == "manifest_mismatch"
        assert refusals[-1]["stage"] == "load" and "changed: model.onnx" in refusals[-1]["detail"]
        metrics = scrape(proc.metrics_port)
        assert 'lockgate_artifact_verify_failures_total{model="scorer",reason="manifest_mismatch",version="2"}' in metrics
        index = inference.RepositoryIndex(service_pb2.RepositoryIndexRequest(), timeout=30)
        entry = next(m for m in index.models if m.name == "scorer" and m.version == "2")
        assert "changed: model.onnx" in entry.reason
    finally:
        artifact.write_bytes(original)
    (proc.repo / "scorer" / "1" / "notes.txt").write_text("added after signing\n")
    try:
        with pytest.raises(grpc.RpcError) as info:
            inference.RepositoryModelLoad(service_pb2.RepositoryModelLoadRequest(model_name="scorer"), timeout=60,
                                          metadata=as_("tok-a"))
        assert "version(s) 1 refused" in info.value.details() and "added: notes.txt" in info.value.details()
        assert infer(proc.url, "scorer", "2").get_response().model_version == "2"
        assert audited(admin, "scorer", "artifact.signature_invalid")[-1]["_subject"] == "scorer/1"
    finally:
        (proc.repo / "scorer" / "1" / "notes.txt").unlink()
    inference.RepositoryModelLoad(service_pb2.RepositoryModelLoadRequest(model_name="scorer"), timeout=60,
                                  metadata=as_("tok-a"))  # restored


def test_trust_policy_through_the_cli(gated, keys, tmp_path: Path) -> None:
    proc, admin, _ = gated
    listed = json.loads(cli("trust", "list", "--server", proc.url, "--json", token="tok-v").stdout)
    assert listed["require_signature"] == "third_party" and listed["allowed_licenses"] == ["Apache-2.0", "MIT"]
    assert [(s["name"], s["origin"]) for s in listed["signers"]] == [("acme-release", "config")]
    refused = cli("trust", "add", "contractor", "--vendor", "Contract Co", "--key", str(keys["stranger"].public),
                  "--server", proc.url, token="tok-b", check=False)
    assert refused.returncode == 1 and "PERMISSION_DENIED" in refused.stderr
    # A version signed by a key nobody trusts is refused at registration...
    write_model(proc.repo, "scorer", 3, mlp(3))
    version_dir = proc.repo / "scorer" / "3"
    cli("models", "sign", "scorer", "3", "--key", str(keys["stranger"].private), "--model-repository", str(proc.repo))
    denied = cli("models", "register", "scorer", "3", "--server", proc.url, check=False)
    assert denied.returncode == 1 and "FAILED_PRECONDITION" in denied.stderr and "not a trusted signer" in denied.stderr
    offline = cli("models", "verify", "scorer", "3", "--key", str(keys["stranger"].public), "--model-repository", str(proc.repo))
    assert "verified scorer / 3" in offline.stdout
    # ... until an admin trusts it (audited), and again after the trust is removed.
    added = cli("trust", "add", "contractor", "--vendor", "Contract Co", "--key", str(keys["stranger"].public),
                "--reason", "pilot contract", "--server", proc.url)
    assert "trusted contractor (Contract Co): key sha256:" in added.stdout
    cli("models", "register", "scorer", "3", "--server", proc.url)
    cli("models", "validate", "scorer", "3", "--server", proc.url)
    cli("trust", "remove", "contractor", "--reason", "contract ended", "--server", proc.url)
    approve = cli("models", "approve", "scorer", "3", "--reason", "ok", "--card", str(_card(tmp_path)),
                  "--server", proc.url, token="tok-b", check=False)
    assert approve.returncode == 1 and "FAILED_PRECONDITION" in approve.stderr and "not a trusted signer" in approve.stderr
    trail = audited(admin, "trust", "trust.signer_added") + audited(admin, "trust", "trust.signer_removed")
    assert [(e["name"], e["_actor"], e["reason"]) for e in trail] == [
        ("contractor", "alice", "pilot contract"), ("contractor", "alice", "contract ended")]
    shutil.rmtree(version_dir)


def _card(tmp_path: Path) -> Path:
    path = tmp_path / "card.json"
    path.write_text(json.dumps(VENDOR_CARD))
    return path


def test_signed_evidence_export_verifies_offline(gated, keys, tmp_path: Path) -> None:
    proc, _, _ = gated
    bundle = tmp_path / "scorer-evidence.json"
    cli("audit", "export", "--model", "scorer", "--out", str(bundle), "--sign", str(keys["auditor"].private),
        "--server", proc.url, token="tok-v")
    data = json.loads(bundle.read_text())
    assert data["provenance"]["2"]["signer"] == "acme-release" and data["provenance"]["2"]["manifest_digest"].startswith("sha256:")
    assert any(c["body"]["signer"].startswith("acme-release") for c in data["cards"])
    ok = cli("audit", "verify-export", str(bundle), "--key", str(keys["auditor"].public), "--json")
    assert json.loads(ok.stdout)["ok"] is True
    wrong_key = cli("audit", "verify-export", str(bundle), "--key", str(keys["acme"].public), check=False)
    assert wrong_key.returncode == 1
    flip_byte(bundle)  # one byte
    broken = cli("audit", "verify-export", str(bundle), "--key", str(keys["auditor"].public), check=False)
    assert broken.returncode == 1 and "changed after it was signed" in broken.stderr
    unsigned = cli("audit", "export", "--model", "scorer", "--sign", str(keys["auditor"].private), "--server", proc.url,
                   token="tok-v", check=False)
    assert unsigned.returncode == 1 and "--sign needs --out" in unsigned.stderr


def test_at_startup_only_the_refused_versions_stay_out(tmp_path: Path, keys) -> None:
    repo = tmp_path / "models"
    for version in (1, 2):
        write_model(repo, "scorer", version, mlp(version), CONFIG)
        sign_version(repo / "scorer" / str(version), keys["acme"])
    flip_byte(repo / "scorer" / "2" / "model.onnx", offset=-2)
    write_model(repo, "plain", 1, mlp(4), CONFIG)  # unsigned
    write_model(repo, "foreign", 1, mlp(5), CONFIG)
    sign_version(repo / "foreign" / "1", keys["stranger"])
    write_model(repo, "foreign", 2, mlp(6))
    sign_version(repo / "foreign" / "2", keys["acme"])
    config = server_config(tmp_path / "server.yaml", keys["acme"].public, "always")
    with LockgateProcess(repo, args=["--config", str(config)]) as proc:
        with grpc.insecure_channel(proc.url) as channel:
            inference = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            index = {(m.name, m.version): m for m in inference.RepositoryIndex(service_pb2.RepositoryIndexRequest(), timeout=30).models}
        assert index[("scorer", "1")].state == "READY" and index[("foreign", "2")].state == "READY"
        assert index[("scorer", "2")].state == "UNAVAILABLE" and "changed: model.onnx" in index[("scorer", "2")].reason
        assert "not a trusted signer" in index[("foreign", "1")].reason
        assert index[("plain", "1")].state == "UNAVAILABLE" and "require_signature is 'always'" in index[("plain", "1")].reason
        assert infer(proc.url, "scorer").get_response().model_version == "1"
        assert infer(proc.url, "foreign").get_response().model_version == "2"
        metrics = scrape(proc.metrics_port)
        for model, version, reason in (("scorer", "2", "manifest_mismatch"), ("foreign", "1", "untrusted_signer"),
                                       ("plain", "1", "unsigned")):
            assert f'lockgate_artifact_verify_failures_total{{model="{model}",reason="{reason}",version="{version}"}} 1.0' in metrics


def test_without_the_extra(tmp_path: Path, keys) -> None:
    """A policy that asks for signatures fails at startup; with provenance off the server runs."""
    blocker = tmp_path / "no-extra"
    (blocker / "model_signing").mkdir(parents=True)
    (blocker / "model_signing" / "__init__.py").write_text("raise ImportError('model-signing is not installed (simulated)')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(blocker), os.environ.get("PYTHONPATH", "")])}
    repo = tmp_path / "models"
    write_model(repo, "plain", 1, mlp(4), CONFIG)
    config = server_config(tmp_path / "server.yaml", keys["acme"].public, "always")
    run = subprocess.run([*LOCKGATE, "serve", "--model-repository", str(repo), "--config", str(config), "--grpc-port", "0",
                          "--state-dir", str(tmp_path / "state")], capture_output=True, text=True, timeout=120, env=env)
    assert run.returncode == 2, run.stderr
    assert "configuration error" in run.stderr and "lockgate[provenance]" in run.stderr and "Traceback" not in run.stderr
    write_model(repo, "signed", 1, mlp(5), CONFIG)
    sign_version(repo / "signed" / "1", keys["acme"])
    with LockgateProcess(repo, env={"PYTHONPATH": env["PYTHONPATH"]}) as proc:
        assert infer(proc.url, "plain").get_response().model_version == "1"
        with grpc.insecure_channel(proc.url) as channel:
            index = service_pb2_grpc.GRPCInferenceServiceStub(channel).RepositoryIndex(service_pb2.RepositoryIndexRequest(), timeout=30)
        signed = next(m for m in index.models if m.name == "signed")
        # A signature that cannot be checked is not a pass.
        assert signed.state == "UNAVAILABLE" and "model-signing library is not installed" in signed.reason
