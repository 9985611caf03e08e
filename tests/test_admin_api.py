"""Admin API against a real gated server: auth, roles, approval gates, four eyes, tampering."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from conftest import write_model
from lockgate._proto.lockgate import admin_pb2 as pb
from lockgate._proto.lockgate import admin_pb2_grpc as pb_grpc
from lockgate.demo import DEMO_CARD, mlp_model
from lockgate_process import LockgateProcess

TOKENS = "alice:admin:tok-a,bob:approver:tok-b,olga:operator:tok-o,vic:viewer:tok-v"
CONFIG = "max_batch_size: 16\nversion_policy: {all: {}}\ndynamic_batching: {max_queue_delay_us: 0}\n"
WIDTH = 6


def mlp(seed: int):
    return mlp_model([WIDTH, 16, 3], seed=seed, input_name="INPUT0", output_name="OUTPUT0")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("admin")
    repo = root / "models"
    for version in (1, 2):
        write_model(repo, "gate", version, mlp(version), CONFIG)
    write_model(repo, "tamper", 1, mlp(7), CONFIG)
    with LockgateProcess(repo, gated=True, env={"LOCKGATE_TOKENS": TOKENS}) as proc:
        yield proc


@pytest.fixture(scope="module")
def channel(server: LockgateProcess):
    with grpc.insecure_channel(server.url) as ch:
        yield ch


@pytest.fixture(scope="module")
def admin(channel: grpc.Channel) -> "Admin":
    return Admin(channel)


class Admin:
    """Calls the admin API as a named principal: ``admin.as_("tok-a").SetWeights(...)``."""

    def __init__(self, channel: grpc.Channel) -> None:
        self.stub = pb_grpc.AdminServiceStub(channel)

    def as_(self, token: str | None, scheme: str = "Bearer") -> "_Caller":
        return _Caller(self.stub, token, scheme)


class _Caller:
    def __init__(self, stub: pb_grpc.AdminServiceStub, token: str | None, scheme: str) -> None:
        self._stub = stub
        self._metadata = () if token is None else (("authorization", f"{scheme} {token}"),)

    def __getattr__(self, method: str):
        rpc = getattr(self._stub, method)
        return lambda request: rpc(request, metadata=self._metadata, timeout=60)


def refused(fn, request) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        fn(request)
    return info.value


def approve(admin: Admin, model: str, version: str) -> None:
    """Validate as alice (admin), approve as bob (approver): four eyes."""
    report = admin.as_("tok-a").ValidateVersion(pb.ValidateVersionRequest(model=model, version=version))
    assert report.passed, report.report_json
    admin.as_("tok-b").ApproveVersion(
        pb.ApproveVersionRequest(model=model, version=version, reason="passed review", card_json=json.dumps(DEMO_CARD))
    )


def infer(url: str, model: str, version: str = "") -> grpcclient.InferResult:
    with grpcclient.InferenceServerClient(url) as client:
        x = grpcclient.InferInput("INPUT0", [1, WIDTH], "FP32")
        x.set_data_from_numpy(np.ones((1, WIDTH), np.float32))
        return client.infer(model, [x], model_version=version)


def actions(admin: Admin, model: str) -> list[pb.AuditEntry]:
    return list(admin.as_("tok-v").AuditLog(pb.AuditLogRequest(model=model)).entries)


def test_missing_or_wrong_token_is_unauthenticated(admin: Admin, server: LockgateProcess) -> None:
    for caller in (admin.as_(None), admin.as_("nope"), admin.as_("tok-a", scheme="Basic"), admin.as_("")):
        err = refused(caller.ListVersions, pb.ListVersionsRequest())
        assert err.code() is grpc.StatusCode.UNAUTHENTICATED, err
        err = refused(caller.SetWeights, pb.SetWeightsRequest(model="gate", weights={"1": 100}))
        assert err.code() is grpc.StatusCode.UNAUTHENTICATED
    me = admin.as_("tok-v").WhoAmI(pb.WhoAmIRequest())
    assert (me.name, me.role, list(me.permissions)) == ("vic", "viewer", ["read"])
    assert "tok-" not in server.log()  # tokens never reach the log


def test_wrong_role_is_permission_denied(admin: Admin) -> None:
    cases = [
        ("tok-v", "SetWeights", pb.SetWeightsRequest(model="gate", weights={"1": 100})),
        ("tok-v", "StartCanary", pb.StartCanaryRequest(model="gate", version="2")),
        ("tok-o", "ApproveVersion", pb.ApproveVersionRequest(model="gate", version="1", reason="ship it")),
        ("tok-o", "RegisterVersion", pb.RegisterVersionRequest(model="gate", version="9")),
        ("tok-b", "SetWeights", pb.SetWeightsRequest(model="gate", weights={"1": 100})),
        ("tok-b", "ValidateVersion", pb.ValidateVersionRequest(model="gate", version="1")),
        ("tok-v", "RetireVersion", pb.RetireVersionRequest(model="gate", version="1")),
    ]
    for token, method, request in cases:
        err = refused(getattr(admin.as_(token), method), request)
        assert err.code() is grpc.StatusCode.PERMISSION_DENIED, (token, method, err)
        assert "lacks" in err.details()
    # Reading is open to every role.
    listed = admin.as_("tok-v").ListVersions(pb.ListVersionsRequest(model="gate")).versions
    assert sorted(v.version for v in listed) == ["1", "2"]


def test_unapproved_version_gets_no_traffic(admin: Admin, server: LockgateProcess) -> None:
    versions = {v.version: v for v in admin.as_("tok-v").ListVersions(pb.ListVersionsRequest(model="gate")).versions}
    assert versions["1"].state == "registered" and not versions["1"].can_serve and versions["1"].loaded
    # No version is approved: even the default route is refused, with the reason.
    with pytest.raises(InferenceServerException) as info:
        infer(server.url, "gate")
    assert "PERMISSION_DENIED" in str(info.value.status()) and "not approved" in info.value.message()
    err = refused(admin.as_("tok-o").SetWeights, pb.SetWeightsRequest(model="gate", weights={"1": 100}))
    assert err.code() is grpc.StatusCode.FAILED_PRECONDITION and "not approved" in err.details()

    approve(admin, "gate", "1")
    status = admin.as_("tok-o").SetWeights(pb.SetWeightsRequest(model="gate", weights={"1": 100}))
    assert status.revision == 1 and [(w.version, w.weight) for w in status.weights] == [("1", 100)]
    assert infer(server.url, "gate").get_response().model_version == "1"

    # Version 2 is still only registered: no weight, no pin, no shadow.
    err = refused(admin.as_("tok-o").SetWeights, pb.SetWeightsRequest(model="gate", weights={"1": 50, "2": 50}))
    assert err.code() is grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(InferenceServerException) as info:
        infer(server.url, "gate", version="2")
    assert "PERMISSION_DENIED" in str(info.value.status())
    assert "version 2" in info.value.message() and "registered" in info.value.message()
    err = refused(admin.as_("tok-o").SetShadow, pb.SetShadowRequest(model="gate", version="2", percent=50))
    assert err.code() is grpc.StatusCode.FAILED_PRECONDITION
    err = refused(admin.as_("tok-o").StartCanary, pb.StartCanaryRequest(model="gate", version="2"))
    assert err.code() is grpc.StatusCode.FAILED_PRECONDITION
    # Bad requests are INVALID_ARGUMENT; a stale compare-and-set is ABORTED.
    err = refused(admin.as_("tok-o").SetShadow, pb.SetShadowRequest(model="gate", version="1", percent=150))
    assert err.code() is grpc.StatusCode.INVALID_ARGUMENT
    err = refused(admin.as_("tok-o").SetWeights,
                  pb.SetWeightsRequest(model="gate", weights={"1": 100}, expected_revision=7))
    assert err.code() is grpc.StatusCode.ABORTED
    err = refused(admin.as_("tok-v").ShowVersion, pb.ShowVersionRequest(model="gate", version="42"))
    assert err.code() is grpc.StatusCode.NOT_FOUND

    # The actors are in the trail.
    trail = [(e.actor, e.action) for e in actions(admin, "gate")]
    assert ("alice", "model.validate") in trail and ("bob", "model.approve") in trail
    assert ("olga", "traffic.set") in trail


def test_registrant_cannot_approve(admin: Admin, server: LockgateProcess) -> None:
    write_model(server.repo, "gate", 3, mlp(3))
    info = admin.as_("tok-a").RegisterVersion(pb.RegisterVersionRequest(model="gate", version="3"))
    assert (info.state, info.registered_by, info.loaded) == ("registered", "alice", False)
    err = refused(admin.as_("tok-a").RegisterVersion, pb.RegisterVersionRequest(model="gate", version="3"))
    assert err.code() is grpc.StatusCode.ALREADY_EXISTS
    # Approval before validation is a lifecycle error.
    err = refused(admin.as_("tok-b").ApproveVersion,
                  pb.ApproveVersionRequest(model="gate", version="3", reason="r", card_json=json.dumps(DEMO_CARD)))
    assert err.code() is grpc.StatusCode.FAILED_PRECONDITION and "only validated" in err.details()
    report = admin.as_("tok-a").ValidateVersion(pb.ValidateVersionRequest(model="gate", version="3"))
    assert report.passed and report.version.state == "validated"
    assert {c["name"] for c in json.loads(report.report_json)["checks"]} >= {"sha256", "onnx_checker", "signature", "smoke_inference", "latency"}

    err = refused(admin.as_("tok-a").ApproveVersion,
                  pb.ApproveVersionRequest(model="gate", version="3", reason="mine", card_json=json.dumps(DEMO_CARD)))
    assert err.code() is grpc.StatusCode.FAILED_PRECONDITION and "four-eyes" in err.details()
    incomplete = {k: v for k, v in DEMO_CARD.items() if k != "limitations"}
    err = refused(admin.as_("tok-b").ApproveVersion,
                  pb.ApproveVersionRequest(model="gate", version="3", reason="ok", card_json=json.dumps(incomplete)))
    assert err.code() is grpc.StatusCode.FAILED_PRECONDITION and "limitations is missing" in err.details()
    err = refused(admin.as_("tok-b").ApproveVersion,
                  pb.ApproveVersionRequest(model="gate", version="3", reason=" ", card_json=json.dumps(DEMO_CARD)))
    assert err.code() is grpc.StatusCode.FAILED_PRECONDITION

    done = admin.as_("tok-b").ApproveVersion(
        pb.ApproveVersionRequest(model="gate", version="3", reason="reviewed by bob", card_json=json.dumps(DEMO_CARD)))
    assert done.version.state == "approved" and done.version.can_serve
    shown = admin.as_("tok-v").ShowVersion(pb.ShowVersionRequest(model="gate", version="3"))
    details = json.loads(shown.details_json)
    assert details["approvals"][0]["approver"] == "bob" and details["approvals"][0]["registered_by"] == "alice"
    assert details["cards"][-1]["owner"] == DEMO_CARD["owner"]


def test_tampered_artifact_refuses_to_load_and_is_audited(admin: Admin, server: LockgateProcess, channel) -> None:
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    approve(admin, "tamper", "1")
    assert infer(server.url, "tamper").get_response().model_version == "1"
    artifact = Path(server.repo) / "tamper" / "1" / "model.onnx"
    write_model(server.repo, "tamper", 1, mlp(8))  # same signature, different bytes
    inference = service_pb2_grpc.GRPCInferenceServiceStub(channel)
    with pytest.raises(grpc.RpcError) as info:  # loading needs the 'load' permission (alice: admin)
        inference.RepositoryModelLoad(service_pb2.RepositoryModelLoadRequest(model_name="tamper"), timeout=60,
                                      metadata=(("authorization", "Bearer tok-a"),))
    # FAILED_PRECONDITION, not UNAVAILABLE: retrying cannot help until the artifact is restored.
    assert info.value.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert "refusing to load" in info.value.details() and "sha256 mismatch" in info.value.details()
    tampered = [e for e in actions(admin, "tamper") if e.action == "artifact.tampered"]
    assert tampered, "the refused load must be audited"
    details = json.loads(tampered[-1].details_json)
    assert details["path"] == str(artifact) and details["expected_sha256"] != details["actual_sha256"]
    # The verified bytes already loaded keep serving.
    assert infer(server.url, "tamper").get_response().model_version == "1"


def test_cli_prints_status_without_traceback(server: LockgateProcess) -> None:
    cli = [sys.executable, "-m", "lockgate.cli"]
    me = subprocess.run([*cli, "tokens", "whoami", "--server", server.url, "--token", "tok-o"], capture_output=True,
                        text=True, timeout=60)
    assert me.returncode == 0 and "olga (role operator)" in me.stdout, me.stderr
    ok = subprocess.run([*cli, "models", "list", "--server", server.url, "--json"], capture_output=True, text=True,
                        env={**os.environ, "LOCKGATE_TOKEN": "tok-v"}, timeout=60)
    assert ok.returncode == 0, ok.stderr
    assert {v["model"] for v in json.loads(ok.stdout)} == {"gate", "tamper"}
    for token, args, code in (
        ("wrong", ["models", "list"], "UNAUTHENTICATED"),
        ("tok-v", ["traffic", "set", "gate", "1=100"], "PERMISSION_DENIED"),
        ("tok-o", ["traffic", "set", "gate", "2=100"], "FAILED_PRECONDITION"),
    ):
        run = subprocess.run([*cli, *args, "--server", server.url, "--token", token], capture_output=True, text=True, timeout=60)
        assert run.returncode == 1, run
        assert code in run.stderr and "Traceback" not in run.stderr + run.stdout


def test_tokens_create_stores_only_the_hash(tmp_path: Path) -> None:
    import yaml

    from lockgate.control.auth import Authenticator, hash_token

    file = tmp_path / "tokens.yaml"
    run = subprocess.run([sys.executable, "-m", "lockgate.cli", "tokens", "create", "ci-bot", "--role", "operator",
                          "--file", str(file)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    token = run.stdout.splitlines()[0].removeprefix("token: ")
    assert token.startswith("lgt_") and token not in file.read_text()
    entry = yaml.safe_load(file.read_text())["tokens"]["ci-bot"]
    assert entry == {"role": "operator", "token_sha256": hash_token(token)}
    principal = Authenticator.load(tokens_file=file, env={}).authenticate(f"Bearer {token}")
    assert (principal.name, principal.role.value) == ("ci-bot", "operator")
