"""The admin API and Triton's repository endpoints over REST, with the same tokens, roles,
four-eyes rule and audit as gRPC; sticky routing keys from a header; TLS on the HTTP port."""

from __future__ import annotations

import json
import ssl
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from conftest import write_model
from lockgate._proto.lockgate import admin_pb2 as pb
from lockgate._proto.lockgate import admin_pb2_grpc as pb_grpc
from lockgate.demo import DEMO_CARD, mlp_model
from lockgate_process import LockgateProcess

TOKENS = "alice:admin:tok-a,bob:approver:tok-b,olga:operator:tok-o,vic:viewer:tok-v"
CONFIG = "max_batch_size: 16\nversion_policy: {all: {}}\ndynamic_batching: {max_queue_delay_us: 0}\n"
WIDTH = 6


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    repo = tmp_path_factory.mktemp("http-admin") / "models"
    for version in (1, 2):
        write_model(repo, "gate", version, mlp_model([WIDTH, 16, 3], seed=version, input_name="INPUT0",
                                                     output_name="OUTPUT0"), CONFIG)
    write_model(repo, "spare", 1, mlp_model([WIDTH, 8, 3], seed=9, input_name="INPUT0", output_name="OUTPUT0"), CONFIG)
    with LockgateProcess(repo, gated=True, env={"LOCKGATE_TOKENS": TOKENS}) as proc:
        yield proc


def call(server: LockgateProcess, path: str, body: dict | None = None, token: str | None = None,
         headers: dict[str, str] | None = None) -> tuple[int, Any]:
    return server.post(path, body, token, headers)


def grpc_refusal(server: LockgateProcess, method: str, request: Any, token: str | None) -> grpc.RpcError:
    with grpc.insecure_channel(server.url) as channel:
        stub = pb_grpc.AdminServiceStub(channel)
        metadata = [("authorization", f"Bearer {token}")] if token is not None else []
        with pytest.raises(grpc.RpcError) as err:
            getattr(stub, method)(request, metadata=metadata)
    return err.value


def infer_http(server: LockgateProcess, model: str, headers: dict[str, str] | None = None) -> Any:
    client = httpclient.InferenceServerClient(server.http_url)
    try:
        inp = httpclient.InferInput("INPUT0", [1, WIDTH], "FP32")
        inp.set_data_from_numpy(np.ones((1, WIDTH), np.float32))
        return client.infer(model, [inp], headers=headers)
    finally:
        client.close()


def test_tokens_and_roles_are_the_admin_apis(server: LockgateProcess) -> None:
    status, me = call(server, "/admin/v1/WhoAmI", token="tok-v")
    assert status == 200 and (me["name"], me["role"], me["permissions"]) == ("vic", "viewer", ["read"])
    for token in (None, "nope"):
        status, body = call(server, "/admin/v1/ListVersions", token=token)
        err = grpc_refusal(server, "ListVersions", pb.ListVersionsRequest(), token)
        assert status == 401 and err.code() is grpc.StatusCode.UNAUTHENTICATED and body == {"error": err.details()}
    status, body = call(server, "/admin/v1/SetWeights", {"model": "gate", "weights": {"1": 100}}, token="tok-v")
    err = grpc_refusal(server, "SetWeights", pb.SetWeightsRequest(model="gate", weights={"1": 100}), "tok-v")
    assert status == 403 and err.code() is grpc.StatusCode.PERMISSION_DENIED and body == {"error": err.details()}
    assert call(server, "/admin/v1/NoSuchMethod", token="tok-a")[0] == 404
    status, body = call(server, "/admin/v1/SetWeights", {"model": "gate", "weigths": {}}, token="tok-o")
    assert status == 400 and "SetWeightsRequest" in body["error"]
    assert "tok-" not in server.log()


def test_unapproved_version_is_refused_over_rest_with_grpcs_message(server: LockgateProcess) -> None:
    with pytest.raises(InferenceServerException) as over_http:
        infer_http(server, "gate")
    with grpcclient.InferenceServerClient(server.url) as client, pytest.raises(InferenceServerException) as over_grpc:
        inp = grpcclient.InferInput("INPUT0", [1, WIDTH], "FP32")
        inp.set_data_from_numpy(np.ones((1, WIDTH), np.float32))
        client.infer("gate", [inp])
    assert over_http.value.status() == "403" and "not approved" in over_http.value.message()
    assert over_http.value.message() == over_grpc.value.message()


def test_governance_flow_over_rest_with_four_eyes_and_audit(server: LockgateProcess) -> None:
    for version in ("1", "2"):
        status, report = call(server, "/admin/v1/ValidateVersion", {"model": "gate", "version": version,
                                                                   "sample_json": json.dumps({"INPUT0": [[0.0] * WIDTH]})},
                              token="tok-a")
        assert status == 200 and report["passed"], report
    card = json.dumps(DEMO_CARD)
    status, body = call(server, "/admin/v1/ApproveVersion", {"model": "gate", "version": "1", "reason": "",
                                                            "card_json": card}, token="tok-b")
    err = grpc_refusal(server, "ApproveVersion", pb.ApproveVersionRequest(model="gate", version="1", card_json=card), "tok-b")
    assert status == 400 and body == {"error": err.details()}  # the approval rules are the admin API's
    for version in ("1", "2"):
        status, body = call(server, "/admin/v1/ApproveVersion", {"model": "gate", "version": version,
                                                                "reason": "reviewed", "card_json": card}, token="tok-b")
        assert status == 200, body
    status, traffic = call(server, "/admin/v1/SetWeights", {"model": "gate", "weights": {"1": 50, "2": 50},
                                                           "sticky": True}, token="tok-o")
    assert status == 200 and {w["version"]: w["weight"] for w in traffic["weights"]} == {"1": 50, "2": 50}
    assert infer_http(server, "gate").get_response()["model_version"] in ("1", "2")
    status, log = call(server, "/admin/v1/AuditLog", {"model": "gate"}, token="tok-v")
    entries = [(e["actor"], e["action"]) for e in log["entries"]]
    assert ("bob", "model.approve") in entries and ("olga", "traffic.set") in entries, entries
    status, verified = call(server, "/admin/v1/AuditVerify", {}, token="tok-v")
    assert status == 200 and verified["ok"]
    # sticky routing: the same x-lockgate-routing-key goes to the same version over either transport
    seen = {}
    with grpcclient.InferenceServerClient(server.url) as client:
        for i in range(24):
            key = f"customer-{i}"
            via_http = infer_http(server, "gate", {"x-lockgate-routing-key": key}).get_response()
            inp = grpcclient.InferInput("INPUT0", [1, WIDTH], "FP32")
            inp.set_data_from_numpy(np.ones((1, WIDTH), np.float32))
            via_grpc = client.infer("gate", [inp], headers={"x-lockgate-routing-key": key}).get_response()
            assert via_http["parameters"]["lockgate_route"] == "sticky"
            assert via_http["model_version"] == via_grpc.model_version
            seen[key] = via_http["model_version"]
    assert set(seen.values()) == {"1", "2"}  # 24 keys on a 50/50 split reach both


def test_repository_load_and_unload_need_the_load_permission(server: LockgateProcess) -> None:
    status, body = call(server, "/v2/repository/models/spare/unload")
    assert status == 401 and "bearer" in body["error"]
    status, body = call(server, "/v2/repository/models/spare/unload", token="tok-v")
    assert status == 403 and "'load' permission" in body["error"]
    assert call(server, "/v2/repository/models/spare/unload", token="tok-a")[0] == 200
    client = httpclient.InferenceServerClient(server.http_url)
    try:
        assert not client.is_model_ready("spare")
        client.load_model("spare", headers={"Authorization": "Bearer tok-a"})
        assert client.is_model_ready("spare")
        with pytest.raises(InferenceServerException) as err:
            client.unload_model("spare")
        assert err.value.status() == "401"
    finally:
        client.close()


def _self_signed(directory: Path) -> tuple[Path, Path]:
    key, cert = directory / "key.pem", directory / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    return key, cert


def test_tls_on_the_http_port_as_on_grpc(tmp_path: Path) -> None:
    repo = tmp_path / "models"
    write_model(repo, "plain", 1, mlp_model([WIDTH, 8, 3], seed=3, input_name="INPUT0", output_name="OUTPUT0"), CONFIG)
    key, cert = _self_signed(tmp_path)
    config = tmp_path / "server.yaml"
    config.write_text(f"tls: {{cert_file: {cert}, key_file: {key}}}\n")
    proc = LockgateProcess(repo, args=["--config", str(config)])
    try:
        context = ssl.create_default_context(cafile=str(cert))
        deadline_ok = False
        import time

        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"https://{proc.http_url}/v2/health/ready", context=context, timeout=2) as r:
                    deadline_ok = r.status == 200
                    break
            except (urllib.error.URLError, ConnectionError, ssl.SSLError):
                time.sleep(0.2)
        assert deadline_ok, proc.log()
        body = json.dumps({"inputs": [{"name": "INPUT0", "shape": [1, WIDTH], "datatype": "FP32",
                                       "data": [0.5] * WIDTH}]}).encode()
        request = urllib.request.Request(f"https://{proc.http_url}/v2/models/plain/infer", data=body, method="POST")
        with urllib.request.urlopen(request, context=context, timeout=30) as r:
            assert json.loads(r.read())["outputs"][0]["shape"] == [1, 3]
        with pytest.raises((urllib.error.URLError, ConnectionError)):  # plain HTTP is not served on a TLS port
            urllib.request.urlopen(f"http://{proc.http_url}/v2/health/ready", timeout=5).read()
        creds = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
        with grpc.secure_channel(proc.url, creds) as channel:
            from tritonclient.grpc import service_pb2, service_pb2_grpc

            assert service_pb2_grpc.GRPCInferenceServiceStub(channel).ServerReady(service_pb2.ServerReadyRequest(), timeout=10).ready
    finally:
        proc.terminate()
