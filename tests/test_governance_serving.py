"""Issue 15 §5-§9 on one real gated server: health tells the truth, loading a version keeps the
one in service, guardrails fail closed, an inconclusive canary resumes by itself, and the
small things (abort status, shadow state, stale agreements, unknown-version failures, the
verify and leader metrics, per-version tamper refusal).

The tests share one server and run in file order: the first looks at the server before
anything is approved.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.grpc import service_pb2, service_pb2_grpc

from conftest import write_model
from lockgate._proto.lockgate import admin_pb2 as pb
from lockgate._proto.lockgate import admin_pb2_grpc as pb_grpc
from lockgate.demo import DEMO_CARD, mlp_model
from lockgate.governance.profile import ReferenceProfile, build_profile
from lockgate_process import LockgateProcess
from replica_helpers import wait_for

TOKENS = "alice:admin:tok-a,bob:approver:tok-b,olga:operator:tok-o,vic:viewer:tok-v"
WIDTH = 6
LATEST = "max_batch_size: 16\nversion_policy: {latest: 1}\ndynamic_batching: {max_queue_delay_us: 0}\n"
ALL = "max_batch_size: 16\nversion_policy: {all: {}}\ndynamic_batching: {max_queue_delay_us: 0}\n"
DRIFT = ALL + "governance: {mode: flag, sampling: {rate: 0.0}, drift: {window_rows: 100000, min_rows: 50, persist: false}}\n"
CLI = [sys.executable, "-m", "lockgate.cli"]
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING

pytestmark = pytest.mark.timeout(300)


def mlp(seed: int):
    return mlp_model([WIDTH, 16, 3], seed=seed, input_name="INPUT0", output_name="OUTPUT0")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    repo = tmp_path_factory.mktemp("govserve") / "models"
    for version in (1, 2):
        write_model(repo, "live", version, mlp(version), LATEST)  # latest: 1 -> only 2 loads
        write_model(repo, "pair", version, mlp(10 + version), ALL)
        write_model(repo, "tamper", version, mlp(20 + version), ALL)
    write_model(repo, "needsprofile", 1, mlp(30), DRIFT)
    env = {"LOCKGATE_TOKENS": TOKENS, "LOCKGATE_CANARY_TICK_S": "0.2"}
    with LockgateProcess(repo, gated=True, env=env) as proc:
        yield proc


@pytest.fixture(scope="module")
def channel(server: LockgateProcess):
    with grpc.insecure_channel(server.url) as ch:
        yield ch


class Admin:
    def __init__(self, channel: grpc.Channel) -> None:
        self.stub = pb_grpc.AdminServiceStub(channel)

    def __call__(self, token: str, method: str, request):
        return getattr(self.stub, method)(request, metadata=(("authorization", f"Bearer {token}"),), timeout=120)


@pytest.fixture(scope="module")
def admin(channel: grpc.Channel) -> Admin:
    return Admin(channel)


def refused(fn) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        fn()
    return info.value


def approve(admin: Admin, model: str, version: str) -> None:
    report = admin("tok-a", "ValidateVersion", pb.ValidateVersionRequest(model=model, version=version))
    assert report.passed, report.report_json
    admin("tok-a", "SetModelCard", pb.SetModelCardRequest(model=model, version=version, card_json=json.dumps(DEMO_CARD)))
    admin("tok-b", "ApproveVersion", pb.ApproveVersionRequest(model=model, version=version, reason="reviewed"))


def health(channel: grpc.Channel, service: str) -> int:
    return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status


def infer(server: LockgateProcess, model: str, version: str = "", x: np.ndarray | None = None) -> grpcclient.InferResult:
    with grpcclient.InferenceServerClient(server.url) as client:
        inp = grpcclient.InferInput("INPUT0", [1, WIDTH], "FP32")
        inp.set_data_from_numpy(np.ones((1, WIDTH), np.float32) if x is None else x.reshape(1, WIDTH).astype(np.float32))
        return client.infer(model, [inp], model_version=version)


def model_ready(server: LockgateProcess, model: str, version: str = "") -> bool:
    with grpcclient.InferenceServerClient(server.url) as client:
        return client.is_model_ready(model, version)


def metrics(server: LockgateProcess) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10).read().decode()


def cli(*args: str, token: str = "tok-a") -> subprocess.CompletedProcess:
    run = subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "LOCKGATE_TOKEN": token})
    assert "Traceback" not in run.stderr, run.stderr
    return run


def rest_ready(server: LockgateProcess, path: str) -> int:
    """The HTTP status of a KServe v2 REST readiness endpoint (200 ready, 503 not)."""
    try:
        with urllib.request.urlopen(f"http://{server.http_url}{path}", timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def traffic(admin: Admin, model: str) -> pb.TrafficStatus:
    return admin("tok-v", "GetTraffic", pb.GetTrafficRequest(model=model))


# ------------------------------------------------------------------------------ §6 health
def test_health_tells_the_truth_before_anything_is_approved(server: LockgateProcess, channel, admin: Admin) -> None:
    for model in ("live", "pair", "tamper", "needsprofile"):
        assert health(channel, model) == NOT_SERVING, model
        assert not model_ready(server, model)
    # The overall service follows the rule: no model can take live traffic -> NOT_SERVING.
    assert health(channel, "") == NOT_SERVING
    assert health(channel, "inference.GRPCInferenceService") == NOT_SERVING
    # ... while the liveness service says the process is up (probes must not restart the pod),
    # and REST readiness agrees with gRPC ModelReady.
    assert health(channel, "lockgate.live") == SERVING
    assert rest_ready(server, "/v2/models/live/ready") == 503
    assert rest_ready(server, "/v2/models/live/versions/2/ready") == 503
    log = server.log()
    for model in ("live", "pair"):
        assert f"model '{model}' has no version that may take live traffic" in log
    assert "--allow-unapproved" in log and "lockgate models approve live" in log
    # Metrics that used to appear only later are there from the start.
    text = metrics(server)
    assert "lockgate_audit_verify_ok 1.0" in text
    assert 'lockgate_leader{replica="' in text and "lockgate_audit_head " in text

    approve(admin, "live", "2")
    wait_for(lambda: health(channel, "live") == SERVING, 30, what="live SERVING after approval")
    assert model_ready(server, "live") and model_ready(server, "live", "2")
    assert rest_ready(server, "/v2/models/live/ready") == 200 and rest_ready(server, "/v2/models/live/versions/2/ready") == 200
    assert rest_ready(server, "/v2/models/live/versions/1/ready") == 503  # not loaded (latest: 1)
    assert health(channel, "") == SERVING and health(channel, "pair") == NOT_SERVING
    assert not model_ready(server, "pair")
    assert infer(server, "live").get_response().model_version == "2"


# ------------------------------------------------------------------------------ §5 load beside
def test_loading_a_new_version_keeps_the_approved_one_serving(server: LockgateProcess, channel, admin: Admin) -> None:
    """latest: 1 with approved version 2 serving; version 3 copied in and loaded."""
    states = {v.version: v.state for v in admin("tok-v", "ListVersions", pb.ListVersionsRequest(model="live")).versions}
    if states.get("2") not in ("approved", "serving"):  # run on its own: approve what the health test approves
        approve(admin, "live", "2")
        wait_for(lambda: health(channel, "live") == SERVING, 30, what="live SERVING after approval")
    write_model(server.repo, "live", 3, mlp(3))
    service_pb2_grpc.GRPCInferenceServiceStub(channel).RepositoryModelLoad(
        service_pb2.RepositoryModelLoadRequest(model_name="live"), metadata=(("authorization", "Bearer tok-a"),), timeout=60)
    index = {(m.name, m.version): m.state for m in service_pb2_grpc.GRPCInferenceServiceStub(channel).RepositoryIndex(
        service_pb2.RepositoryIndexRequest(), timeout=30).models}
    assert index[("live", "2")] == "READY" and index[("live", "3")] == "READY"
    assert infer(server, "live").get_response().model_version == "2"  # no PERMISSION_DENIED
    assert health(channel, "live") == SERVING
    versions = {v.version: v for v in admin("tok-v", "ListVersions", pb.ListVersionsRequest(model="live")).versions}
    assert versions["3"].state == "registered" and versions["3"].registered_by == "system:lockgate"

    # `lockgate models load M V`: a new version beside the others, registered and validated by the caller.
    write_model(server.repo, "live", 4, mlp(4))
    run = cli("models", "load", "live", "4", "--server", server.url, "--json")
    assert run.returncode == 0, run.stderr
    loaded = json.loads(run.stdout)
    assert loaded["registered"] and loaded["validated"] and loaded["state"] == "validated"
    # 3 took no traffic and the version policy (latest: 1) now picks 4: only 2 is kept beside it.
    assert loaded["registered_by"] == "alice" and loaded["loaded_versions"] == ["2", "4"]
    entries = admin("tok-v", "AuditLog", pb.AuditLogRequest(model="live")).entries
    assert [(e.actor, e.action) for e in entries if e.subject == "live/4"][:3] == [
        ("alice", "model.register"), ("alice", "model.load"), ("alice", "model.validate")]

    # The version in service cannot be unloaded; an idle one can.
    refusal = cli("models", "unload", "live", "2", "--server", server.url)
    assert refusal.returncode == 1 and "FAILED_PRECONDITION" in refusal.stderr and "requests" in refusal.stderr
    gone = cli("models", "unload", "live", "4", "--server", server.url, "--json")
    assert gone.returncode == 0, gone.stderr
    assert json.loads(gone.stdout)["loaded_versions"] == ["2"]
    entries = admin("tok-v", "AuditLog", pb.AuditLogRequest(model="live")).entries
    assert [(e.actor, e.action) for e in entries if e.subject == "live/4"][-1] == ("alice", "model.unload")
    assert infer(server, "live").get_response().model_version == "2"
    # Triton's unload would take every version out at once: it needs a token with `load`.
    stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
    for metadata, code in (((), grpc.StatusCode.UNAUTHENTICATED),
                           ((("authorization", "Bearer tok-v"),), grpc.StatusCode.PERMISSION_DENIED)):
        err = refused(lambda: stub.RepositoryModelUnload(service_pb2.RepositoryModelUnloadRequest(model_name="live"),
                                                         metadata=metadata, timeout=60))
        assert err.code() is code, err.details()
    assert infer(server, "live").get_response().model_version == "2"


# ------------------------------------------------------------------------------ §7 fail closed
def test_validation_reports_a_missing_profile_and_approval_needs_one(server: LockgateProcess, admin: Admin) -> None:
    report = admin("tok-a", "ValidateVersion", pb.ValidateVersionRequest(model="needsprofile", version="1"))
    assert not report.passed and "reference_profile" in report.failed_checks
    check = next(c for c in json.loads(report.report_json)["checks"] if c["name"] == "reference_profile")
    assert "drift cannot be evaluated" in check["detail"] and "enables drift" in check["detail"]
    profile = np.random.default_rng(0).standard_normal((500, WIDTH)).astype(np.float32)
    build_profile(profile, model="needsprofile", version="1", input_name="INPUT0").save(
        ReferenceProfile.path_for(server.repo, "needsprofile", "1"))
    approve(admin, "needsprofile", "1")  # with the profile beside it, it validates and is approved


def test_a_canary_with_a_guardrail_it_cannot_evaluate_is_refused(server: LockgateProcess, admin: Admin) -> None:
    approve(admin, "pair", "1")
    approve(admin, "pair", "2")
    admin("tok-o", "SetWeights", pb.SetWeightsRequest(model="pair", weights={"1": 100}))
    err = refused(lambda: admin("tok-o", "StartCanary", pb.StartCanaryRequest(model="pair", version="2")))
    assert err.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert "drift guardrail cannot be evaluated" in err.details() and "--ignore-drift" in err.details()
    assert traffic(admin, "pair").revision == 1


def test_disagreement_is_measured_over_the_mirror_the_canary_sets_up(server: LockgateProcess, admin: Admin) -> None:
    """Issue §7: a canary with --max-disagreement and no mirror went to 100 % at 21 % agreement."""
    guardrails = pb.Guardrails(max_disagreement=0.1, min_requests=20, min_comparisons=20, mirror_percent=50,
                               fail_on_drift=False, disable=["max_p99_ratio"])
    started = admin("tok-o", "StartCanary", pb.StartCanaryRequest(
        model="pair", version="2", steps=[20, 100], interval_s=1.0, failure_limit=1, guardrails=guardrails))
    assert (started.shadow.version, started.shadow.percent) == ("2", 50.0)
    rng = np.random.default_rng(5)
    status = started
    deadline = time.monotonic() + 90
    i = 0
    while status.canary.state in ("progressing", "inconclusive") and time.monotonic() < deadline:
        for _ in range(20):
            infer(server, "pair", x=rng.standard_normal(WIDTH) * 3)
            i += 1
        status = traffic(admin, "pair")
    assert status.canary.state == "rolled_back", status
    assert [(w.version, w.weight) for w in status.weights if w.weight] == [("1", 100)]
    assert not status.HasField("shadow")  # the mirror went with the canary
    entries = admin("tok-v", "AuditLog", pb.AuditLogRequest(model="pair")).entries
    evidence = json.loads(next(e for e in reversed(entries) if e.action == "traffic.canary.rolled_back").details_json)
    assert evidence["guardrail"] == "disagreement" and evidence["observed"] > 0.1


# ------------------------------------------------------------------------------ §8 auto-resume
def test_an_inconclusive_canary_resumes_when_the_evidence_arrives(server: LockgateProcess, admin: Admin) -> None:
    guardrails = pb.Guardrails(min_requests=30, fail_on_drift=False, disable=["max_disagreement", "max_p99_ratio"])
    admin("tok-o", "SetWeights", pb.SetWeightsRequest(model="pair", weights={"1": 100}))
    admin("tok-o", "StartCanary", pb.StartCanaryRequest(
        model="pair", version="2", steps=[50, 100], interval_s=0.5, failure_limit=2, guardrails=guardrails))
    status = wait_for(lambda: (s := traffic(admin, "pair")).canary.state == "inconclusive" and s, 30,
                      what="the canary to wait for evidence")
    assert "0 canary requests < min_requests 30" in status.canary.reason
    for i in range(80):
        infer(server, "pair")
    status = traffic(admin, "pair")
    assert "canary requests" in status.canary.waiting_for or status.canary.state != "inconclusive"
    status = wait_for(lambda: (s := traffic(admin, "pair")).canary.step_index >= 1 or
                      s.canary.state == "promoted" and s, 30, what="the canary to resume by itself")
    entries = list(admin("tok-v", "AuditLog", pb.AuditLogRequest(model="pair")).entries)
    started = max(e.seq for e in entries if e.action == "traffic.canary.started")
    since = [e for e in entries if e.seq > started and e.action.startswith("traffic.")]
    assert [e.action for e in since][:2] == ["traffic.canary.inconclusive", "traffic.canary.advanced"], \
        [e.action for e in since]
    assert json.loads(since[1].details_json)["resumed_from"] == "inconclusive"
    assert since[1].actor == "system:canary"  # nobody had to resume it
    if traffic(admin, "pair").canary.state in ("progressing", "inconclusive"):
        admin("tok-o", "AbortCanary", pb.CanaryCommand(model="pair", reason="done"))


# ------------------------------------------------------------------------------ §9 small things
def test_abort_without_a_canary_is_failed_precondition(server: LockgateProcess, admin: Admin) -> None:
    err = refused(lambda: admin("tok-o", "AbortCanary", pb.CanaryCommand(model="live")))
    assert err.code() is grpc.StatusCode.FAILED_PRECONDITION and "no canary in progress" in err.details()


def test_shadow_state_and_no_stale_agreement(server: LockgateProcess, admin: Admin) -> None:
    admin("tok-o", "SetWeights", pb.SetWeightsRequest(model="live", weights={"2": 100}))
    loaded = json.loads(cli("models", "load", "live", "3", "--server", server.url, "--json").stdout)
    assert loaded["validated"] and not loaded["registered"] and loaded["loaded_versions"] == ["2", "3"]
    admin("tok-o", "SetShadow", pb.SetShadowRequest(model="live", version="3", percent=100))
    listed = json.loads(cli("models", "list", "--server", server.url, "--model", "live", "--json", token="tok-v").stdout)
    assert {v["version"]: v["state"] for v in listed}["3"] == "shadow"  # not "approved"
    for _ in range(10):
        infer(server, "live")
    wait_for(lambda: [a for a in traffic(admin, "live").agreements if a.shadow == "3" and a.count], 15, what="agreement rows")
    admin("tok-o", "SetShadow", pb.SetShadowRequest(model="live", percent=0))
    status = traffic(admin, "live")
    assert not [a for a in status.agreements if a.shadow == "3"], "stale shadow-agreement row"
    versions = {v.version: v.state for v in admin("tok-v", "ListVersions", pb.ListVersionsRequest(model="live")).versions}
    assert versions["3"] == "validated"
    assert 'shadow_version="3"' not in metrics(server)


def test_requests_for_an_unknown_version_are_counted(server: LockgateProcess) -> None:
    with pytest.raises(Exception):
        infer(server, "live", version="77")
    line = next(l for l in metrics(server).splitlines()
                if l.startswith("lockgate_inference_request_failure_total") and 'model="live"' in l and 'version=""' in l
                and 'reason="not_found"' in l)
    assert float(line.rsplit(" ", 1)[1]) >= 1


def test_leader_in_metrics_and_admin_api(server: LockgateProcess) -> None:
    run = cli("status", "--server", server.url, "--json", token="tok-v")
    assert run.returncode == 0, run.stderr
    status = json.loads(run.stdout)
    assert status["leader"] is True and status["replica_id"] and status["audit_verify_ok"] is True
    assert status["checkpoint_seq"] >= 0 and status["checkpoint_file"] == str(server.checkpoint_file)
    assert f'lockgate_leader{{replica="{status["replica_id"]}"}} 1.0' in metrics(server)


def test_a_tampered_version_alone_is_refused_on_restart(server: LockgateProcess, admin: Admin,
                                                         tmp_path_factory: pytest.TempPathFactory) -> None:
    """Runs last: restarts the server. Version 1 of 'tamper' was swapped on disk while it was down."""
    approve(admin, "tamper", "1")
    approve(admin, "tamper", "2")
    assert server.terminate() == 0
    write_model(server.repo, "tamper", 1, mlp(99))  # same signature, other weights
    again = LockgateProcess(server.repo, gated=True, state_dir=server.state_dir,
                            env={"LOCKGATE_TOKENS": TOKENS}, log_path=server.log_path.with_suffix(".restart.log"))
    with again:
        with grpc.insecure_channel(again.url) as ch:
            assert health(ch, "tamper") == SERVING  # version 2 serves
            index = {(m.name, m.version): (m.state, m.reason) for m in service_pb2_grpc.GRPCInferenceServiceStub(ch)
                     .RepositoryIndex(service_pb2.RepositoryIndexRequest(), timeout=30).models}
            assert index[("tamper", "2")][0] == "READY"
            assert index[("tamper", "1")][0] == "UNAVAILABLE" and "sha256 mismatch" in index[("tamper", "1")][1]
            assert infer(again, "tamper", version="2").get_response().model_version == "2"
            with pytest.raises(Exception, match="NOT_FOUND|has no loaded version 1"):
                infer(again, "tamper", version="1")
            entries = Admin(ch)("tok-v", "AuditLog", pb.AuditLogRequest(model="tamper")).entries
            assert any(e.action == "artifact.tampered" and e.subject == "tamper/1" for e in entries)
            assert infer(again, "live").get_response().model_version == "2"
