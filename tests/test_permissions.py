"""Authorization of every RPC the gRPC port serves and every endpoint of the HTTP port, walked
from the README's permission tables against a real server whose tokens cover every role; and
the repository calls (Triton's ``load_model``/``unload_model``, over gRPC and REST) refused
without the ``load`` permission, with the real caller as the audit trail's actor."""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2
from tritonclient.utils import InferenceServerException

from conftest import write_model
from lockgate._proto import inference_pb2
from lockgate._proto.lockgate import admin_pb2
from lockgate.control.auth import PERMISSIONS, Permission, Role
from lockgate.demo import mlp_model
from lockgate_process import LockgateProcess

README = Path(__file__).resolve().parent.parent / "README.md"
TOKENS = {Role.ADMIN: "tok-admin", Role.OPERATOR: "tok-oper", Role.APPROVER: "tok-appr", Role.VIEWER: "tok-view"}
NAMES = {Role.ADMIN: "ada", Role.OPERATOR: "otto", Role.APPROVER: "ann", Role.VIEWER: "val"}
MODULES = {  # service -> the module holding its descriptors and message classes
    "inference.GRPCInferenceService": inference_pb2,
    "lockgate.admin.v1.AdminService": admin_pb2,
    "grpc.health.v1.Health": health_pb2,
    "grpc.reflection.v1alpha.ServerReflection": reflection_pb2,
}
REFUSED = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)


def readme_table() -> dict[tuple[str, str], str]:
    """(service, rpc) -> permission cell ("none", "token" or a permission name)."""
    section = README.read_text().split("### Permissions per RPC", 1)[1].split("\n#", 1)[0]
    rows = {}
    for service, rpc, cell in re.findall(r"^\| `([\w.]+)` \| `(\w+)` \| ([^|]+?) \|$", section, re.M):
        match = re.match(r"`(\w+)`", cell)
        rows[(service, rpc)] = match.group(1) if match else cell.strip()
    return rows


def readme_http_table() -> list[tuple[str, str, str]]:
    """(HTTP method, path template, permission cell) of the HTTP port's table."""
    section = README.read_text().split("### Permissions per RPC", 1)[1].split("\n#", 1)[0]
    return [(method, path, (re.match(r"`(\w+)`", cell) or re.match(r"(.*)", cell)).group(1).strip())
            for method, path, cell in re.findall(r"^\| `(GET|POST)` \| `(/[^`]*)` \| ([^|]+?) \|$", section, re.M)]


def served_rpcs() -> set[tuple[str, str]]:
    return {(name, m.name) for name, module in MODULES.items()
            for m in module.DESCRIPTOR.services_by_name[name.rsplit(".", 1)[1]].methods}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    repo = tmp_path_factory.mktemp("perms") / "models"
    write_model(repo, "clf", 1, mlp_model([4, 8, 2], seed=1), "max_batch_size: 8\n")
    write_model(repo, "spare", 1, mlp_model([4, 8, 2], seed=2), "max_batch_size: 8\n")
    tokens = ",".join(f"{NAMES[r]}:{r.value}:{t}" for r, t in TOKENS.items())
    with LockgateProcess(repo, env={"LOCKGATE_TOKENS": tokens}) as proc:
        yield proc


def _call(channel: grpc.Channel, service: str, rpc: str, token: str | None) -> grpc.StatusCode:
    """Call one RPC with an empty request; the status it ends with (OK included)."""
    method = MODULES[service].DESCRIPTOR.services_by_name[service.rsplit(".", 1)[1]].methods_by_name[rpc]
    module = MODULES[service]
    request_type = getattr(module, method.input_type.name)
    response_type = getattr(module, method.output_type.name)
    path = f"/{service}/{rpc}"
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    ser, de = request_type.SerializeToString, response_type.FromString
    try:
        if method.client_streaming or method.server_streaming:
            stream = channel.stream_stream(path, request_serializer=ser, response_deserializer=de)
            if not method.client_streaming:
                stream = channel.unary_stream(path, request_serializer=ser, response_deserializer=de)
                responses = stream(request_type(), metadata=metadata, timeout=30)
            else:
                responses = stream(iter([request_type()]), metadata=metadata, timeout=30)
            next(iter(responses))  # one answer is enough; the call ends with the channel
            responses.cancel()
            return grpc.StatusCode.OK
        channel.unary_unary(path, request_serializer=ser, response_deserializer=de)(
            request_type(), metadata=metadata, timeout=30)
        return grpc.StatusCode.OK
    except grpc.RpcError as exc:
        return exc.code()


def test_readme_table_covers_every_rpc_served(server: LockgateProcess) -> None:
    table = readme_table()
    assert set(table) == served_rpcs(), "README permission table and the served RPCs differ"
    known = {p.value for p in Permission} | {"none", "token"}
    assert set(table.values()) <= known, set(table.values()) - known
    # Reflection names no service the table leaves out.
    with grpc.insecure_channel(server.url) as channel:
        stub = channel.stream_stream("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
                                     request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
                                     response_deserializer=reflection_pb2.ServerReflectionResponse.FromString)
        reply = next(iter(stub(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=30)))
    assert {s.name for s in reply.list_services_response.service} == {service for service, _ in table}


def test_every_rpc_needs_exactly_the_permission_in_the_readme(server: LockgateProcess) -> None:
    wrong: list[str] = []
    with grpc.insecure_channel(server.url) as channel:
        for (service, rpc), needed in sorted(readme_table().items()):
            if needed == "none":
                for token in (None, "not-a-token", TOKENS[Role.VIEWER]):
                    code = _call(channel, service, rpc, token)
                    if code in REFUSED:
                        wrong.append(f"{rpc} with {token!r}: {code.name}, expected no auth")
                continue
            for token in (None, "not-a-token"):
                code = _call(channel, service, rpc, token)
                if code is not grpc.StatusCode.UNAUTHENTICATED:
                    wrong.append(f"{rpc} with {token!r}: {code.name}, expected UNAUTHENTICATED")
            for role, token in TOKENS.items():
                allowed = needed == "token" or Permission(needed) in PERMISSIONS[role]
                code = _call(channel, service, rpc, token)
                if allowed and code in REFUSED:
                    wrong.append(f"{rpc} as {role.value}: {code.name}, expected it allowed")
                if not allowed and code is not grpc.StatusCode.PERMISSION_DENIED:
                    wrong.append(f"{rpc} as {role.value}: {code.name}, expected PERMISSION_DENIED")
    assert wrong == []


def _infer_ok(url: str, model: str) -> bool:
    with grpcclient.InferenceServerClient(url) as client:
        x = grpcclient.InferInput("features", [1, 4], "FP32")
        x.set_data_from_numpy(np.ones((1, 4), np.float32))
        return client.infer(model, [x]).as_numpy("probabilities").shape == (1, 2)


def test_repository_load_and_unload_need_the_load_permission(server: LockgateProcess) -> None:
    client = grpcclient.InferenceServerClient(server.url)
    for call in (client.unload_model, client.load_model):
        with pytest.raises(InferenceServerException) as info:
            call("spare")
        assert info.value.status() == "StatusCode.UNAUTHENTICATED", info.value
        for role in (Role.VIEWER, Role.OPERATOR, Role.APPROVER):
            with pytest.raises(InferenceServerException) as info:
                call("spare", headers={"authorization": f"Bearer {TOKENS[role]}"})
            assert info.value.status() == "StatusCode.PERMISSION_DENIED", (role, info.value)
            assert "'load'" in info.value.message()
    assert _infer_ok(server.url, "spare"), "a refused unload took the model away"

    admin = {"authorization": f"Bearer {TOKENS[Role.ADMIN]}"}
    client.unload_model("spare", headers=admin)
    assert not client.is_model_ready("spare")
    client.load_model("spare", headers=admin)
    assert client.is_model_ready("spare") and _infer_ok(server.url, "spare")
    # A name outside the repository is refused before anything is touched.
    for name in ("..", "../models", "", ".hidden"):
        with pytest.raises(InferenceServerException) as info:
            client.load_model(name, headers=admin)
        assert info.value.status() == "StatusCode.INVALID_ARGUMENT", (name, info.value)

    with grpc.insecure_channel(server.url) as channel:
        stub = channel.unary_unary("/lockgate.admin.v1.AdminService/AuditLog",
                                   request_serializer=admin_pb2.AuditLogRequest.SerializeToString,
                                   response_deserializer=admin_pb2.AuditLogResponse.FromString)
        entries = stub(admin_pb2.AuditLogRequest(model="spare"), timeout=30,
                       metadata=(("authorization", f"Bearer {TOKENS[Role.VIEWER]}"),)).entries
    trail = [(e.actor, e.action) for e in entries]
    assert ("system:lockgate", "model.load") in trail  # the load at start-up: nobody asked
    assert (NAMES[Role.ADMIN], "model.unload") in trail and (NAMES[Role.ADMIN], "model.load") in trail, trail
    assert not [a for a, action in trail if action == "model.unload" and a != NAMES[Role.ADMIN]], trail
    assert "tok-" not in server.log()  # tokens never reach the log
    client.close()


def _http(server: LockgateProcess, method: str, path: str, token: str | None, body: object = None) -> tuple[int, object]:
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    data = json.dumps(body if body is not None else {}).encode() if method == "POST" else None
    request = urllib.request.Request(f"http://{server.http_url}{path}", data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            status, text = response.status, response.read()
    except urllib.error.HTTPError as err:
        status, text = err.code, err.read()
    try:
        return status, json.loads(text) if text else None
    except ValueError:
        return status, text


INFER_BODY = {"inputs": [{"name": "features", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}]}
HTTP_REFUSED = {401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED"}


def test_every_http_endpoint_needs_exactly_the_permission_in_the_readme(server: LockgateProcess) -> None:
    table = readme_http_table()
    grpc_table = readme_table()
    assert len(table) >= 12, table
    rows: list[tuple[str, str, str]] = []
    for method, template, needed in table:
        if "{Method}" in template:  # the admin API over REST: each RPC's own row
            admin = sorted((rpc, cell) for (service, rpc), cell in grpc_table.items() if service.endswith("AdminService"))
            assert admin
            rows += [(method, template.replace("{Method}", rpc), cell) for rpc, cell in admin]
            continue
        assert needed == "none" or needed in {p.value for p in Permission}, (template, needed)
        model = "spare" if "/repository/models/" in template else "clf"
        rows.append((method, template.replace("{m}", model), needed))
        if template.startswith("/v2/models/{m}"):  # the versioned form asks the same
            rows.append((method, template.replace("{m}", f"{model}/versions/1"), needed))
    wrong: list[str] = []
    for method, path, needed in rows:
        body = INFER_BODY if path.endswith("/infer") else None
        if needed == "none":
            for token in (None, "not-a-token", TOKENS[Role.VIEWER]):
                status, reply = _http(server, method, path, token, body)
                if status in HTTP_REFUSED or status >= 500:
                    wrong.append(f"{method} {path} with {token!r}: {status} {reply}, expected no auth")
            continue
        for token in (None, "not-a-token"):
            status, reply = _http(server, method, path, token, body)
            if status != 401:
                wrong.append(f"{method} {path} with {token!r}: {status} {reply}, expected 401")
        for role, token in TOKENS.items():
            allowed = needed == "token" or Permission(needed) in PERMISSIONS[role]
            status, reply = _http(server, method, path, token, body)
            if allowed and (status in HTTP_REFUSED or status >= 500):
                wrong.append(f"{method} {path} as {role.value}: {status} {reply}, expected it allowed")
            if not allowed and status != 403:
                wrong.append(f"{method} {path} as {role.value}: {status} {reply}, expected 403")
    # the walk unloaded "spare" last (as admin): put it back for the other tests
    assert _http(server, "POST", "/v2/repository/models/spare/load", TOKENS[Role.ADMIN])[0] == 200
    assert wrong == [], wrong


def test_rest_repository_calls_name_the_real_caller_in_the_audit_trail(server: LockgateProcess) -> None:
    """Before: REST load/unload were checked for ``load`` but audited as ``system:lockgate``."""
    for action in ("unload", "load"):
        status, reply = _http(server, "POST", f"/v2/repository/models/spare/{action}", None)
        assert status == 401, reply
        status, reply = _http(server, "POST", f"/v2/repository/models/spare/{action}", TOKENS[Role.OPERATOR])
        assert status == 403 and "'load'" in reply["error"], reply
        status, reply = _http(server, "POST", f"/v2/repository/models/spare/{action}", TOKENS[Role.ADMIN])
        assert status == 200, reply
    status, reply = _http(server, "POST", "/v2/repository/models/%2E%2E/load", TOKENS[Role.ADMIN])
    assert status in (400, 404), reply
    status, reply = _http(server, "POST", "/admin/v1/AuditLog", TOKENS[Role.VIEWER], {"model": "spare"})
    assert status == 200, reply
    trail = [(e.get("actor"), e.get("action")) for e in reply.get("entries", [])]
    unloads = [actor for actor, action in trail if action == "model.unload"]
    loads = [actor for actor, action in trail if action == "model.load"]
    assert unloads and set(unloads) == {NAMES[Role.ADMIN]}, trail
    assert NAMES[Role.ADMIN] in loads and set(loads) <= {NAMES[Role.ADMIN], "system:lockgate"}, trail
    assert _infer_ok(server.url, "spare")
