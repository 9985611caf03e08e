"""Traffic control end to end on a real gated server: split, stickiness, shadow, canary rollback, live policy."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from tritonclient.grpc import service_pb2, service_pb2_grpc

from conftest import write_model
from lockgate._proto.lockgate import admin_pb2 as pb
from lockgate._proto.lockgate import admin_pb2_grpc as pb_grpc
from lockgate.demo import DEMO_CARD, mlp_model, onnx_model
from lockgate.routing import router as routing_router
from lockgate.routing.policy import SPACE
from lockgate_process import LockgateProcess

TOKENS = "alice:admin:tok-a,bob:approver:tok-b,olga:operator:tok-o,vic:viewer:tok-v"
WIDTH = 8
CONFIG = "max_batch_size: 32\nversion_policy: {all: {}}\ndynamic_batching: {max_queue_delay_us: 100, max_queue_size: 4096}\n"
DRIFT_CONFIG = CONFIG + "governance: {mode: flag, drift: {window_rows: 100, min_rows: 50, persist: false}}\n"


def mlp(seed: int) -> onnx.ModelProto:
    return mlp_model([WIDTH, 16, 3], seed=seed, input_name="INPUT0", output_name="OUTPUT0")


def failing_model() -> onnx.ModelProto:
    """Gathers row int(max(x)) of a 10-row table: fine on validation-sized values, an ORT error on every real one."""
    table = numpy_helper.from_array(np.linspace(0, 1, 30, dtype=np.float32).reshape(10, 3), "TABLE")
    nodes = [
        helper.make_node("ReduceMax", ["INPUT0"], ["m"], keepdims=0),
        helper.make_node("Cast", ["m"], ["idx"], to=TensorProto.INT64),
        helper.make_node("Gather", ["TABLE", "idx"], ["OUTPUT0"], axis=0),
    ]
    graph = helper.make_graph(
        nodes, "failing",
        [helper.make_tensor_value_info("INPUT0", TensorProto.FLOAT, ["batch", WIDTH])],
        [helper.make_tensor_value_info("OUTPUT0", TensorProto.FLOAT, ["batch", 3])],
        initializer=[table],
    )
    return onnx_model(graph)


def slow_model(width: int = 640, depth: int = 64) -> onnx.ModelProto:
    """Same signature as the MLPs, but a long MatMul chain: milliseconds per row."""
    rng = np.random.default_rng(3)
    weights = {
        "A": (rng.standard_normal((WIDTH, width)) / np.sqrt(WIDTH)).astype(np.float32),
        "W": (rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32),
        "B": (rng.standard_normal((width, 3)) / np.sqrt(width)).astype(np.float32),
    }
    nodes = [helper.make_node("MatMul", ["INPUT0", "A"], ["h0"])]
    for i in range(depth):
        nodes.append(helper.make_node("MatMul", [f"h{i}", "W"], [f"h{i + 1}"]))
    nodes.append(helper.make_node("MatMul", [f"h{depth}", "B"], ["OUTPUT0"]))
    graph = helper.make_graph(
        nodes, "slow",
        [helper.make_tensor_value_info("INPUT0", TensorProto.FLOAT, ["batch", WIDTH])],
        [helper.make_tensor_value_info("OUTPUT0", TensorProto.FLOAT, ["batch", 3])],
        initializer=[numpy_helper.from_array(v, k) for k, v in weights.items()],
    )
    return onnx_model(graph)


# ---------------------------------------------------------------------------------- fixtures
class Admin:
    def __init__(self, channel: grpc.Channel) -> None:
        self.stub = pb_grpc.AdminServiceStub(channel)

    def call(self, token: str, method: str, request):
        return getattr(self.stub, method)(request, metadata=(("authorization", f"Bearer {token}"),), timeout=60)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    repo = tmp_path_factory.mktemp("traffic") / "models"
    models = {
        "split": (mlp(1), mlp(2)),
        "mirror": (mlp(3), mlp(4)),
        "failing": (mlp(5), failing_model()),
        "slow": (mlp(6), slow_model()),
    }
    for name, versions in models.items():
        for number, model in enumerate(versions, start=1):
            write_model(repo, name, number, model, CONFIG)
    from lockgate.governance.profile import ReferenceProfile, build_profile

    reference = np.random.default_rng(0).standard_normal((4000, WIDTH)).astype(np.float32)
    for number, model in ((1, mlp(7)), (2, mlp(8))):
        write_model(repo, "drift", number, model, DRIFT_CONFIG)
        build_profile(reference, model="drift", version=str(number), input_name="INPUT0").save(
            ReferenceProfile.path_for(repo, "drift", str(number)))
    env = {"LOCKGATE_TOKENS": TOKENS, "LOCKGATE_CANARY_TICK_S": "0.2"}
    with LockgateProcess(repo, gated=True, env=env) as proc:
        with grpc.insecure_channel(proc.url) as channel:
            admin = Admin(channel)
            for name in [*models, "drift"]:
                for version in ("1", "2"):
                    sample = json.dumps({"INPUT0": [[0.0] * WIDTH]})
                    report = admin.call("tok-a", "ValidateVersion", pb.ValidateVersionRequest(
                        model=name, version=version, sample_json=sample))
                    assert report.passed, report.report_json
                    if (name, version) != ("mirror", "2"):  # the shadow stays validated only
                        admin.call("tok-b", "ApproveVersion", pb.ApproveVersionRequest(
                            model=name, version=version, reason="e2e", card_json=json.dumps(DEMO_CARD)))
        yield proc


@pytest.fixture(scope="module")
def admin(server: LockgateProcess):
    with grpc.insecure_channel(server.url) as channel:
        yield Admin(channel)


def set_weights(admin: Admin, model: str, **weights: int) -> pb.TrafficStatus:
    return admin.call("tok-o", "SetWeights", pb.SetWeightsRequest(model=model, weights={k.lstrip("v"): w for k, w in weights.items()}))


# ---------------------------------------------------------------------------------- load
@dataclass(frozen=True, slots=True)
class Outcome:
    id: str
    code: grpc.StatusCode | None
    version: str = ""
    route: str = ""
    output: bytes = b""
    message: str = ""


def request(model: str, rid: str, x: np.ndarray | float = 1.0, key: str | None = None) -> service_pb2.ModelInferRequest:
    data = np.full((1, WIDTH), x, np.float32) if np.isscalar(x) else np.asarray(x, np.float32).reshape(1, WIDTH)
    req = service_pb2.ModelInferRequest(model_name=model, id=rid)
    req.inputs.add(name="INPUT0", datatype="FP32", shape=[1, WIDTH])
    req.raw_input_contents.append(data.tobytes())
    if key is not None:
        req.parameters["routing_key"].string_param = key
    return req


async def send(stub, req, metadata=None) -> Outcome:
    try:
        resp = await stub.ModelInfer(req, metadata=metadata, timeout=30)
    except grpc.aio.AioRpcError as exc:
        return Outcome(req.id, exc.code(), message=exc.details() or "")
    return Outcome(req.id, None, resp.model_version, resp.parameters["lockgate_route"].string_param,
                   b"".join(resp.raw_output_contents))


async def fire_async(url: str, requests: list, concurrency: int = 48, metadata: list | None = None) -> list[Outcome]:
    results: list[Outcome | None] = [None] * len(requests)
    todo = iter(range(len(requests)))
    async with grpc.aio.insecure_channel(url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)

        async def worker() -> None:
            for i in todo:
                results[i] = await send(stub, requests[i], metadata[i] if metadata else None)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return results  # type: ignore[return-value]


def fire(url: str, requests: list, **kwargs) -> list[Outcome]:
    return asyncio.run(fire_async(url, requests, **kwargs))


async def stream_async(url: str, requests: list, streams: int = 4) -> list[Outcome]:
    """Send over a few ModelStreamInfer streams: the same pipeline and routing per message,
    at a fraction of the client-side cost of unary calls (this machine has two cores)."""
    async with grpc.aio.insecure_channel(url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)

        async def one(chunk: list) -> list[Outcome]:
            out = []
            async for resp in stub.ModelStreamInfer(iter(chunk), timeout=120):
                r = resp.infer_response
                if resp.error_message:
                    out.append(Outcome(r.id, grpc.StatusCode.UNKNOWN, message=resp.error_message))
                else:
                    out.append(Outcome(r.id, None, r.model_version, r.parameters["lockgate_route"].string_param))
            return out

        parts = await asyncio.gather(*(one(requests[i::streams]) for i in range(streams)))
    return [o for part in parts for o in part]


def draw_point(request_id: str) -> int:
    """Where the router's weighted draw puts a request id (the canary's range starts at 0)."""
    return routing_router.hash64(request_id, routing_router._PERSON_DRAW) % SPACE


# ---------------------------------------------------------------------------------- split / sticky
def test_weighted_split_90_10(server: LockgateProcess, admin: Admin) -> None:
    set_weights(admin, "split", v1=90, v2=10)
    outcomes = asyncio.run(stream_async(server.url, [request("split", f"split-{i}") for i in range(20_000)]))
    assert len(outcomes) == 20_000 and len({o.id for o in outcomes}) == 20_000
    assert all(o.code is None for o in outcomes), Counter(o.message for o in outcomes if o.code)
    assert {o.route for o in outcomes} == {"weighted"}
    share = Counter(o.version for o in outcomes)["2"] / len(outcomes) * 100
    assert abs(share - 10.0) <= 1.5, share


def test_sticky_keys(server: LockgateProcess, admin: Admin) -> None:
    keys = [f"user-{i}" for i in range(400)]

    def by_parameter(tag: str) -> dict[str, str]:
        out = fire(server.url, [request("split", f"{tag}-{k}", key=k) for k in keys])
        assert all(o.code is None and o.route == "sticky" for o in out)
        return {k: o.version for k, o in zip(keys, out)}

    def by_header(tag: str) -> dict[str, str]:
        out = fire(server.url, [request("split", f"{tag}-{k}") for k in keys],
                   metadata=[(("x-lockgate-routing-key", k),) for k in keys])
        assert all(o.code is None and o.route == "sticky" for o in out)
        return {k: o.version for k, o in zip(keys, out)}

    set_weights(admin, "split", v1=80, v2=20)
    first = by_parameter("a")
    assert set(first.values()) == {"1", "2"}
    # Unchanged weights: every key stays, whether sent again, by header, or after a new revision.
    assert by_parameter("b") == first
    assert by_header("c") == first
    set_weights(admin, "split", v1=80, v2=20)
    assert by_parameter("d") == first

    previous = first
    for stable, canary in ((60, 40), (35, 65), (10, 90)):
        set_weights(admin, "split", v1=stable, v2=canary)
        now = by_parameter(f"w{canary}")
        moved = {k for k in keys if now[k] != previous[k]}
        assert moved, f"raising the weight to {canary} moved no key"
        assert all(previous[k] == "1" and now[k] == "2" for k in moved), "a key moved back to stable"
        assert by_header(f"h{canary}") == now
        previous = now


def test_policy_change_under_load_fails_nothing(server: LockgateProcess, admin: Admin) -> None:
    set_weights(admin, "split", v1=100)

    async def scenario() -> tuple[list[Outcome], list[int]]:
        stop = asyncio.Event()
        outcomes: list[Outcome] = []
        revisions: list[int] = []
        async with grpc.aio.insecure_channel(server.url) as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            admin_aio = pb_grpc.AdminServiceStub(channel)
            auth = (("authorization", "Bearer tok-o"),)

            async def client(n: int) -> None:
                i = 0
                while not stop.is_set():
                    outcomes.append(await send(stub, request("split", f"live-{n}-{i}", key=f"k{i % 50}" if n % 2 else None)))
                    i += 1

            async def operator() -> None:
                await asyncio.sleep(0.3)
                for weights, sticky in (({"1": 50, "2": 50}, True), ({"2": 100}, True), ({"1": 30, "2": 70}, False),
                                        ({"1": 100, "2": 0}, True), ({"1": 10, "2": 90}, True), ({"1": 100}, True)):
                    status = await admin_aio.SetWeights(pb.SetWeightsRequest(model="split", weights=weights, sticky=sticky),
                                                        metadata=auth, timeout=30)
                    revisions.append(status.revision)
                    await asyncio.sleep(0.25)
                await admin_aio.SetShadow(pb.SetShadowRequest(model="split", version="2", percent=50), metadata=auth)
                await asyncio.sleep(0.25)
                await admin_aio.SetShadow(pb.SetShadowRequest(model="split", percent=0), metadata=auth)
                await asyncio.sleep(0.25)
                stop.set()

            await asyncio.gather(operator(), *(client(n) for n in range(8)))
        return outcomes, revisions

    outcomes, revisions = asyncio.run(scenario())
    failed = [o for o in outcomes if o.code is not None]
    assert not failed, Counter((o.code, o.message) for o in failed)
    assert len(outcomes) > 200 and {o.version for o in outcomes} == {"1", "2"}
    assert revisions == sorted(revisions) and len(set(revisions)) == len(revisions)


# ---------------------------------------------------------------------------------- shadow
def test_shadow_leaves_results_unchanged_and_records_agreement(server: LockgateProcess, admin: Admin) -> None:
    set_weights(admin, "mirror", v1=100)
    rng = np.random.default_rng(42)
    inputs = rng.standard_normal((300, WIDTH)).astype(np.float32)

    def run() -> list[Outcome]:
        out = fire(server.url, [request("mirror", f"mirror-{i}", x) for i, x in enumerate(inputs)], concurrency=16)
        assert all(o.code is None and o.version == "1" for o in out)
        return out

    without = run()
    status = admin.call("tok-o", "SetShadow", pb.SetShadowRequest(model="mirror", version="2", percent=100))
    assert (status.shadow.version, status.shadow.percent) == ("2", 100.0)
    with_shadow = run()
    assert [o.output for o in with_shadow] == [o.output for o in without]
    assert [(o.version, o.route) for o in with_shadow] == [(o.version, o.route) for o in without]

    deadline = time.monotonic() + 15
    agreement = None
    while agreement is None and time.monotonic() < deadline:
        status = admin.call("tok-v", "GetTraffic", pb.GetTrafficRequest(model="mirror"))
        pairs = [a for a in status.agreements if (a.primary, a.shadow) == ("1", "2") and a.count > 0]
        agreement = pairs[0] if pairs else None
        if agreement is None:
            time.sleep(0.2)
    assert agreement is not None, "no shadow agreement recorded"
    assert agreement.compared_rows > 0 and agreement.HasField("agreement_rate") and agreement.HasField("max_abs_diff")
    cleared = admin.call("tok-o", "SetShadow", pb.SetShadowRequest(model="mirror", percent=0))
    assert not cleared.HasField("shadow")


# ---------------------------------------------------------------------------------- canary rollback
CANARY_STEPS = (20, 60, 100)


def canary_until_settled(server: LockgateProcess, admin: Admin, model: str, guardrails: pb.Guardrails,
                         x: float, failure_limit: int = 2, interval_s: float = 1.0,
                         timeout_s: float = 45.0) -> tuple[list[Outcome], pb.TrafficStatus]:
    """Start a canary of version 2 against 1 and drive steady traffic until it leaves 'progressing'."""
    set_weights(admin, model, v1=100)
    started = admin.call("tok-o", "StartCanary", pb.StartCanaryRequest(
        model=model, version="2", steps=CANARY_STEPS, interval_s=interval_s, failure_limit=failure_limit, guardrails=guardrails))
    assert (started.canary.state, started.canary.percent) == ("progressing", CANARY_STEPS[0])

    async def scenario() -> tuple[list[Outcome], pb.TrafficStatus]:
        stop = asyncio.Event()
        outcomes: list[Outcome] = []
        async with grpc.aio.insecure_channel(server.url) as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            admin_aio = pb_grpc.AdminServiceStub(channel)

            async def client(n: int) -> None:
                i = 0
                while not stop.is_set():
                    outcomes.append(await send(stub, request(model, f"{model}-{n}-{i}", x)))
                    i += 1

            async def watch() -> pb.TrafficStatus:
                loop = asyncio.get_running_loop()
                deadline = loop.time() + timeout_s
                try:
                    while True:
                        status = await admin_aio.GetTraffic(pb.GetTrafficRequest(model=model),
                                                            metadata=(("authorization", "Bearer tok-v"),), timeout=30)
                        if status.canary.state != "progressing" or loop.time() > deadline:
                            return status
                        await asyncio.sleep(0.1)
                finally:
                    stop.set()

            status, *_ = await asyncio.gather(watch(), *(client(n) for n in range(6)))
        return outcomes, status

    return asyncio.run(scenario())


def assert_rolled_back(server: LockgateProcess, admin: Admin, model: str, status: pb.TrafficStatus,
                       guardrail: str, failure_limit: int, x: float) -> dict:
    """Rolled back at the first step, all traffic on stable, evidence in the audit trail."""
    assert status.canary.state == "rolled_back", status
    assert [(w.version, w.weight) for w in status.weights] == [("1", 100)]
    trail = admin.call("tok-v", "AuditLog", pb.AuditLogRequest(model=model)).entries
    started = max(e.seq for e in trail if e.action == "traffic.canary.started")
    since_start = [e for e in trail if e.seq > started]
    assert not [e for e in since_start if e.action == "traffic.canary.advanced"], "the canary advanced before rollback"
    assert len([e for e in since_start if e.action == "traffic.canary.analysis_failed"]) == failure_limit - 1
    rollbacks = [e for e in since_start if e.action == "traffic.canary.rolled_back"]
    assert len(rollbacks) == 1 and rollbacks[0].actor == "system:canary"
    evidence = json.loads(rollbacks[0].details_json)
    assert evidence["guardrail"] == guardrail and evidence["failures"] == failure_limit and evidence["step"] == 0
    assert evidence["percent"] == CANARY_STEPS[0] and evidence["window"]["canary"]["requests"] > 0
    failing = [g for g in evidence["guardrails"] if g["status"] == "fail"]
    assert failing and failing[0]["guardrail"] == guardrail
    versions = {v.version: v.state for v in admin.call("tok-v", "ListVersions", pb.ListVersionsRequest(model=model)).versions}
    assert versions["2"] == "approved"  # back from canary, still approved
    after = fire(server.url, [request(model, f"{model}-after-{i}", x) for i in range(100)], concurrency=8)
    assert all(o.code is None and o.version == "1" for o in after)
    return evidence


def test_failing_canary_rolls_back(server: LockgateProcess, admin: Admin) -> None:
    guardrails = pb.Guardrails(max_error_rate=0.05, min_requests=10, disable=["max_disagreement", "max_p99_ratio"])
    outcomes, status = canary_until_settled(server, admin, "failing", guardrails, x=50.0)
    evidence = assert_rolled_back(server, admin, "failing", status, "error_rate", 2, x=50.0)
    assert evidence["observed"] > 0.05
    failed = [o for o in outcomes if o.code is not None]
    assert failed, "the failing canary produced no errors"
    # Callers only failed on the canary's share: ids the weighted draw put in its range.
    canary_range = CANARY_STEPS[0] * SPACE // 100
    assert all(draw_point(o.id) < canary_range for o in failed), "a request outside the canary's share failed"
    assert all(o.version == "1" for o in outcomes if o.code is None and draw_point(o.id) >= canary_range)


def test_slow_canary_rolls_back(server: LockgateProcess, admin: Admin) -> None:
    guardrails = pb.Guardrails(max_p99_ratio=2.0, min_requests=10, disable=["max_disagreement"])
    outcomes, status = canary_until_settled(server, admin, "slow", guardrails, x=1.0)
    evidence = assert_rolled_back(server, admin, "slow", status, "p99_ratio", 2, x=1.0)
    assert evidence["observed"] > evidence["threshold"]
    assert all(o.code is None for o in outcomes), Counter(o.message for o in outcomes if o.code)


def test_drifting_canary_rolls_back(server: LockgateProcess, admin: Admin) -> None:
    guardrails = pb.Guardrails(fail_on_drift=True, min_requests=10, disable=["max_disagreement", "max_p99_ratio"])
    # Reference inputs are N(0, 1); these are shifted far away, so governance reports DRIFT.
    # Governance needs a window of canary rows (100) before it can say DRIFT, so this analysis
    # interval is longer than the others: the first analysis must already see the alert.
    outcomes, status = canary_until_settled(server, admin, "drift", guardrails, x=6.0, failure_limit=1,
                                            interval_s=3.0, timeout_s=60)
    evidence = assert_rolled_back(server, admin, "drift", status, "drift", 1, x=6.0)
    assert evidence["observed"] in ("drift", "critical", "alert")
    assert all(o.code is None for o in outcomes)
    drift_alerts = [e for e in admin.call("tok-v", "AuditLog", pb.AuditLogRequest(model="drift")).entries
                    if e.action == "governance.drift"]
    assert drift_alerts, "the drift alert itself must be audited"
