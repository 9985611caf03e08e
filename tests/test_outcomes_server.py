"""Outcome governance end to end: a real lockgate server, tritonclient predictions, labels
through the real feedback API, the canary rolled back on quality, fairness against fairlearn,
label outcomes counted, retention, restart, bad labels, the CLI and the metrics.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pandas as pd
import pytest
from fairlearn.metrics import (
    MetricFrame,
    demographic_parity_difference,
    demographic_parity_ratio,
    equalized_odds_difference,
    false_positive_rate,
    selection_rate,
    true_positive_rate,
)
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from onnx import TensorProto, helper, numpy_helper
from sklearn import metrics as skm

from conftest import write_model
from lockgate._proto.lockgate import admin_pb2 as apb
from lockgate._proto.lockgate import admin_pb2_grpc as apb_grpc
from lockgate._proto.lockgate import feedback_pb2 as fpb
from lockgate._proto.lockgate import feedback_pb2_grpc as fpb_grpc
from lockgate.control.sqlite_store import SQLiteStore
from lockgate.demo import mlp_model, onnx_model
from lockgate.outcomes.store import OutcomeStore
from lockgate_process import LOCKGATE, LockgateProcess
from replica_helpers import wait_for

pytestmark = pytest.mark.timeout(600)

TOKENS = "alice:admin:tok-a,olga:operator:tok-o,vic:viewer:tok-v,lena:labeler:tok-l"
ENV = {"LOCKGATE_TOKENS": TOKENS, "LOCKGATE_CANARY_TICK_S": "0.2", "LOCKGATE_OUTCOMES_REFRESH_S": "0.5"}
BATCHING = "max_batch_size: 64\nversion_policy: {all: {}}\ndynamic_batching: {max_queue_delay_us: 0, max_queue_size: 4096}\n"


# ------------------------------------------------------------------------------------- models
def linear_classifier(weights: list[list[float]], bias: list[float]):
    """softmax(X @ W + b): [batch, F] -> OUTPUT0 [batch, K] class probabilities."""
    w = np.asarray(weights, np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["INPUT0", "W", "B"], ["logits"]),
         helper.make_node("Softmax", ["logits"], ["OUTPUT0"], axis=1)],
        "linear",
        [helper.make_tensor_value_info("INPUT0", TensorProto.FLOAT, ["batch", w.shape[0]])],
        [helper.make_tensor_value_info("OUTPUT0", TensorProto.FLOAT, ["batch", w.shape[1]])],
        initializer=[numpy_helper.from_array(w, "W"), numpy_helper.from_array(np.asarray(bias, np.float32), "B")],
    )
    return onnx_model(graph)


def linear_regressor(weights: list[float]):
    w = np.asarray(weights, np.float32).reshape(-1, 1)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["INPUT0", "W"], ["OUTPUT0"])], "regressor",
        [helper.make_tensor_value_info("INPUT0", TensorProto.FLOAT, ["batch", w.shape[0]])],
        [helper.make_tensor_value_info("OUTPUT0", TensorProto.FLOAT, ["batch", 1])],
        initializer=[numpy_helper.from_array(w, "W")],
    )
    return onnx_model(graph)


CANARY_CONFIG = BATCHING + """outcomes:
  task: binary
  class_names: [deny, approve]
  windows: {seconds: 3600}
"""
FAIR_CONFIG = BATCHING + """outcomes:
  task: binary
  class_names: [deny, approve]
  favourable_outcome: approve
  segments:
    gender: {parameter: gender, per_row: true, categories: [f, m, x]}
    grp: {input: INPUT0, feature: 2, categories: [0, 1]}
    band: {input: INPUT0, feature: 0, bins: [-0.5, 0.5]}
  protected: [gender, grp, band]
  fairness: {max_depth: 2, min_group_size: 1}
  windows: {seconds: 3600}
"""
MULTI_CONFIG = BATCHING + """outcomes:
  task: multiclass
  class_names: [approve, review, decline]
  positive_class: approve
"""
REG_CONFIG = BATCHING + "outcomes: {task: regression}\n"
TINY_QUEUE = BATCHING + "outcomes: {task: binary, ledger: {queue_rows: 1}}\n"
LEDGER_CONFIG = BATCHING + """outcomes:
  task: binary
  retention: {max_rows: 100, check_interval_s: 0.3}
"""
AGED_CONFIG = BATCHING + """outcomes:
  task: binary
  retention: {max_age_s: 1.0, remember_expired_s: 600, check_interval_s: 0.3}
"""


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("outcomes") / "models"
    # ground truth: approve iff x0 + x1 > 0 (plus noise); v1 follows it, v2 half ignores x1
    write_model(root, "canary", 1, linear_classifier([[0, 3], [0, 3]], [0, 0]), CANARY_CONFIG)
    write_model(root, "canary", 2, linear_classifier([[0, 3], [0, -0.5]], [0, 0]), CANARY_CONFIG)
    write_model(root, "unlabeled", 1, linear_classifier([[0, 3], [0, 3]], [0, 0]), CANARY_CONFIG)
    write_model(root, "unlabeled", 2, linear_classifier([[0, 3], [0, -0.5]], [0, 0]), CANARY_CONFIG)
    # a biased model: the group feature x2 raises the odds of approval
    write_model(root, "fair", 1, linear_classifier([[0, 2], [0, 2], [0, 1.5]], [0.4, 0]), FAIR_CONFIG)
    write_model(root, "multi", 1, mlp_model([4, 8, 3], seed=5, input_name="INPUT0", output_name="OUTPUT0"), MULTI_CONFIG)
    write_model(root, "reg", 1, linear_regressor([1.0, 2.0]), REG_CONFIG)
    write_model(root, "tiny", 1, linear_classifier([[0, 1], [0, 1]], [0, 0]), TINY_QUEUE)
    write_model(root, "plain", 1, linear_classifier([[0, 1], [0, 1]], [0, 0]), BATCHING)
    return root


@pytest.fixture(scope="module")
def server(repo: Path):
    with LockgateProcess(repo, env=ENV) as proc:
        yield proc


def feedback_stub(url: str):
    return fpb_grpc.FeedbackServiceStub(grpc.insecure_channel(url))


def auth(token: str) -> tuple:
    return (("authorization", f"Bearer {token}"),)


def admin(url: str, method: str, request, token: str = "tok-a"):
    stub = apb_grpc.AdminServiceStub(grpc.insecure_channel(url))
    return getattr(stub, method)(request, metadata=auth(token), timeout=60)


def outcomes(url: str, model: str, **kwargs) -> dict:
    report = feedback_stub(url).GetOutcomes(fpb.OutcomesRequest(model=model, **kwargs), metadata=auth("tok-v"), timeout=60)
    return json.loads(report.report_json)


def label(request_id: str, row: int, value) -> fpb.Label:
    msg = fpb.Label(request_id=request_id, row=row)
    if isinstance(value, bool):
        msg.flag = value
    elif isinstance(value, str):
        msg.class_name = value
    elif isinstance(value, int):
        msg.class_index = value
    else:
        msg.number = float(value)
    return msg


async def predict_all(url: str, model: str, batches: list[np.ndarray], parameters: list[dict] | None = None,
                      ids: list[str] | None = None, concurrency: int = 16) -> list[tuple[str, str, np.ndarray]]:
    """(response id, served version, OUTPUT0) per request, through tritonclient's asyncio client."""
    import tritonclient.grpc.aio as aioclient
    import tritonclient.grpc as grpcclient

    client = aioclient.InferenceServerClient(url)
    results: list = [None] * len(batches)
    todo = iter(range(len(batches)))

    async def worker() -> None:
        for i in todo:
            x = batches[i]
            inp = grpcclient.InferInput("INPUT0", list(x.shape), "FP32")
            inp.set_data_from_numpy(x)
            kwargs = {}
            if parameters is not None:
                kwargs["parameters"] = parameters[i]
            response = await client.infer(model, [inp], request_id=ids[i] if ids else "", **kwargs)
            results[i] = (response.get_response().id, response.get_response().model_version, response.as_numpy("OUTPUT0"))

    try:
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    finally:
        await client.close()
    return results


# ------------------------------------------------------------------------------------- canary
def test_canary_rolls_back_on_quality_and_the_audit_shows_why(server: LockgateProcess) -> None:
    url = server.url
    admin(url, "SetWeights", apb.SetWeightsRequest(model="canary", weights={"1": 100}), "tok-o")
    guardrails = apb.Guardrails(disable=["max_error_rate", "max_p99_ratio", "max_disagreement"], fail_on_drift=False,
                                max_quality_drop={"accuracy": 0.05}, min_label_coverage=0.5, min_labels=500)
    admin(url, "StartCanary", apb.StartCanaryRequest(model="canary", version="2", steps=[50, 100], interval_s=15,
                                                     failure_limit=1, guardrails=guardrails), "tok-o")
    rng = np.random.default_rng(11)
    batches = [rng.standard_normal((20, 2)).astype(np.float32) for _ in range(1000)]  # 20,000 predictions
    served = asyncio.run(predict_all(url, "canary", batches))
    assert all(rid for rid, _, _ in served), "every response carries the id the server generated"
    assert len({rid for rid, _, _ in served}) == 1000
    versions = {v for _, v, _ in served}
    assert versions == {"1", "2"}
    truth = [((x[:, 0] + x[:, 1] + 0.3 * rng.standard_normal(len(x))) > 0).astype(int) for x in batches]
    labels = [label(rid, row, "approve" if y else "deny") for (rid, _, _), ys in zip(served, truth) for row, y in enumerate(ys)]
    stream = (fpb.FeedbackBatch(model="canary" if i == 0 else "", labels=labels[i : i + 2000]) for i in range(0, 20_000, 2000))
    summary = feedback_stub(url).StreamFeedback(stream, metadata=auth("tok-l"), timeout=120)
    assert (summary.received, summary.accepted, summary.duplicate, summary.unknown) == (20_000, 20_000, 0, 0)

    def state() -> str | None:  # labels still on their way at an analysis leave it inconclusive; it resumes by itself
        status = admin(url, "GetTraffic", apb.GetTrafficRequest(model="canary"), "tok-v")
        return status.canary.state if status.canary.state == "rolled_back" else None

    wait_for(state, 120, what="the canary to roll back")
    entries = admin(url, "AuditLog", apb.AuditLogRequest(model="canary"), "tok-v").entries
    rollback = next(json.loads(e.details_json) for e in entries if e.action == "traffic.canary.rolled_back")
    assert rollback["guardrail"] == "quality_drop:accuracy", rollback
    verdict = next(g for g in rollback["guardrails"] if g["guardrail"] == "quality_drop:accuracy")
    assert verdict["status"] == "fail" and verdict["observed"] > 0.05
    evidence = verdict["evidence"]
    assert evidence["stable_value"] - evidence["canary_value"] == pytest.approx(verdict["observed"])
    assert evidence["canary"]["labeled"] + evidence["stable"]["labeled"] == 20_000
    assert "accuracy" in rollback["reason"]
    assert next(g for g in rollback["guardrails"] if g["guardrail"] == "label_coverage")["status"] == "pass"
    fed = [json.loads(e.details_json) for e in entries if e.action == "outcomes.feedback"]
    assert sum(f["accepted"] for f in fed) == 20_000 and fed[0]["via"] == "grpc.StreamFeedback"
    assert all(e.actor == "lena" for e in entries if e.action == "outcomes.feedback")
    report = outcomes(url, "canary")["versions"]
    acc = {v: report[v]["total"]["quality"]["metrics"]["accuracy"]["value"] for v in ("1", "2")}
    assert acc["1"] > acc["2"] + 0.05
    bundle = json.loads(admin(url, "AuditExport", apb.AuditExportRequest(model="canary"), "tok-v").bundle_json)
    history = bundle["outcomes"]["history"]
    assert history["1"][0]["metrics"]["accuracy"] == pytest.approx(acc["1"])
    decisions = bundle["outcomes"]["guardrail_decisions"]
    assert any(d["action"] == "traffic.canary.rolled_back" for d in decisions)
    assert all("guardrails" in d for d in decisions)


def test_outcome_guardrails_without_labels_are_inconclusive_and_pause_the_canary(server: LockgateProcess) -> None:
    """No label ever arrives: the outcome guardrails cannot be judged, so the canary waits
    inconclusive (audited once, with the evidence), never advances or promotes on them."""
    url = server.url
    admin(url, "SetWeights", apb.SetWeightsRequest(model="unlabeled", weights={"1": 100}), "tok-o")
    guardrails = apb.Guardrails(disable=["max_error_rate", "max_p99_ratio", "max_disagreement"], fail_on_drift=False,
                                max_quality_drop={"accuracy": 0.05}, min_label_coverage=0.5, max_fairness_gap=0.1,
                                min_labels=10)
    admin(url, "StartCanary", apb.StartCanaryRequest(model="unlabeled", version="2", steps=[50, 100], interval_s=1,
                                                     failure_limit=1, guardrails=guardrails), "tok-o")
    rng = np.random.default_rng(3)
    served = asyncio.run(predict_all(url, "unlabeled", [rng.standard_normal((5, 2)).astype(np.float32) for _ in range(200)]))
    assert {v for _, v, _ in served} == {"1", "2"}

    def waiting() -> str | None:
        canary = admin(url, "GetTraffic", apb.GetTrafficRequest(model="unlabeled"), "tok-v").canary
        return canary.reason if canary.state == "inconclusive" else None

    reason = wait_for(waiting, 60, what="the canary to wait inconclusive")
    assert "label" in reason, reason
    entries = admin(url, "AuditLog", apb.AuditLogRequest(model="unlabeled"), "tok-v").entries
    actions = [e.action for e in entries]
    assert actions.count("traffic.canary.inconclusive") == 1, actions
    assert not {"traffic.canary.advanced", "traffic.canary.promoted", "traffic.canary.rolled_back"} & set(actions)
    pause = next(json.loads(e.details_json) for e in entries if e.action == "traffic.canary.inconclusive")
    verdicts = {g["guardrail"]: g for g in pause["guardrails"]}
    for name in ("label_coverage", "quality_drop:accuracy", "fairness_gap"):
        assert verdicts[name]["status"] == "inconclusive", verdicts[name]
    evidence = verdicts["label_coverage"]["evidence"]
    assert evidence["canary"]["labeled"] == 0 and evidence["canary"]["predictions"] > 0
    assert "labeled rows < min_labels" in verdicts["quality_drop:accuracy"]["detail"]
    assert "no protected segments" in verdicts["fairness_gap"]["detail"]


# ------------------------------------------------------------------------------------- fairness
def test_fairness_of_a_biased_model_equals_fairlearn(server: LockgateProcess) -> None:
    rng = np.random.default_rng(5)
    n_requests, rows = 300, 10
    batches, params, genders = [], [], []
    for _ in range(n_requests):
        x = rng.standard_normal((rows, 3)).astype(np.float32)
        x[:, 2] = rng.integers(0, 2, rows)
        g = rng.choice(["f", "m", "x"], rows, p=[0.45, 0.45, 0.1])
        batches.append(x)
        params.append({"gender": ",".join(g)})  # a protected attribute the model never sees
        genders.append(g)
    served = asyncio.run(predict_all(server.url, "fair", batches, params))
    x_all = np.concatenate(batches)
    probs = np.concatenate([out for _, _, out in served])
    pred = (probs[:, 1] >= 0.5).astype(int)
    y = ((x_all[:, 0] + x_all[:, 1] + 0.5 * rng.standard_normal(len(x_all))) > 0).astype(int)
    labels = [label(rid, r, bool(y[i * rows + r])) for i, (rid, _, _) in enumerate(served) for r in range(rows)]
    summary = feedback_stub(server.url).SendFeedback(fpb.FeedbackBatch(model="fair", labels=labels), metadata=auth("tok-l"))
    assert summary.accepted == len(labels)
    total = outcomes(server.url, "fair")["versions"]["1"]["total"]
    m = total["quality"]["metrics"]
    assert abs(m["accuracy"]["value"] - skm.accuracy_score(y, pred)) < 1e-9
    assert abs(m["f1"]["value"] - skm.f1_score(y, pred)) < 1e-9
    assert abs(m["log_loss"]["value"] - skm.log_loss(y, probs[:, 1].astype(np.float64))) < 1e-9
    assert m["confusion_matrix"]["rows_true_columns_predicted"] == skm.confusion_matrix(y, pred).tolist()
    gender = np.concatenate(genders)
    grp = x_all[:, 2].astype(int).astype(str)
    band = np.array(["<-0.5", "[-0.5, 0.5)", ">=0.5"])[np.searchsorted([-0.5, 0.5], x_all[:, 0], side="right")]
    features = {"gender": gender, "grp": grp, "band": band,
                "gender & grp": pd.DataFrame({"gender": gender, "grp": grp}),
                "gender & band": pd.DataFrame({"gender": gender, "band": band}),
                "grp & band": pd.DataFrame({"grp": grp, "band": band})}
    report = {s["segment"]: s for s in total["fairness"]}
    assert {"gender", "grp", "band", "gender & grp", "gender & band", "grp & band"} == set(report)
    for name, sf in features.items():
        summary = report[name]["summary"]
        assert abs(summary["demographic_parity_difference"]["value"] - demographic_parity_difference(y, pred, sensitive_features=sf)) < 1e-9
        assert abs(summary["demographic_parity_ratio"]["value"] - demographic_parity_ratio(y, pred, sensitive_features=sf)) < 1e-9
        assert abs(summary["equalized_odds_difference"]["value"] - equalized_odds_difference(y, pred, sensitive_features=sf)) < 1e-9
        frame = MetricFrame(metrics={"sr": selection_rate, "tpr": true_positive_rate, "fpr": false_positive_rate,
                                     "acc": skm.accuracy_score},
                            y_true=y, y_pred=pred, sensitive_features=sf).by_group
        groups = {g["group"]: g for g in report[name]["groups"]}
        assert len(groups) == len(frame), (name, sorted(groups))
        ref = groups[report[name]["reference"]]
        for key, row in frame.iterrows():
            g = groups[" & ".join(key) if isinstance(key, tuple) else key]
            for ours, theirs in (("selection_rate", "sr"), ("tpr", "tpr"), ("fpr", "fpr"), ("accuracy", "acc")):
                assert abs(g[ours]["value"] - row[theirs]) < 1e-9, (name, key, ours)
            if g is not ref:  # SPD and DIR against the reference group, from MetricFrame's rates
                assert abs(g["spd"]["value"] - (row["sr"] - ref["selection_rate"]["value"])) < 1e-9, (name, key)
                assert abs(g["dir"]["value"] - row["sr"] / ref["selection_rate"]["value"]) < 1e-9, (name, key)
            lo, hi = g["selection_rate"]["ci"]
            assert lo <= g["selection_rate"]["value"] <= hi
    # the bias is in the group feature: a parity breach for grp, none for gender (the model never saw it)
    assert any(b["metric"] == "spd" for b in report["grp"]["breaches"])
    assert report["gender"]["summary"]["demographic_parity_difference"]["value"] < report["grp"]["summary"]["demographic_parity_difference"]["value"]

    def exported() -> str | None:
        text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10).read().decode()
        return text if 'lockgate_fairness{metric="demographic_parity_difference",model="fair",segment="grp",version="1"}' in text else None

    text = wait_for(exported, 30, what="fairness gauges")
    assert 'lockgate_model_quality{metric="accuracy",model="fair",version="1"}' in text
    assert 'lockgate_label_coverage{model="fair",version="1"} 1.0' in text


# ------------------------------------------------------------------------------------- bad input
def invalid(call) -> tuple[str, list[str]]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    status = rpc_status.from_call(info.value)
    fields = []
    for detail in status.details:
        bad = error_details_pb2.BadRequest()
        detail.Unpack(bad)
        fields.extend(v.field for v in bad.field_violations)
    return info.value.details(), fields


def test_bad_labels_get_invalid_argument_naming_row_and_field(server: LockgateProcess) -> None:
    stub = feedback_stub(server.url)
    served = asyncio.run(predict_all(server.url, "multi", [np.ones((2, 4), np.float32)] * 3))
    rid = served[0][0]
    send = lambda model, labels, **kw: stub.SendFeedback(fpb.FeedbackBatch(model=model, labels=labels, **kw),  # noqa: E731
                                                         metadata=auth("tok-l"))
    message, fields = invalid(lambda: send("multi", [label(rid, 0, "approve"), label(rid, 1, "maybe")]))
    assert "label 1" in message and f"'{rid}' row 1" in message and "'class_name'" in message and "maybe" in message
    assert fields == ["labels[1].class_name"]
    message, fields = invalid(lambda: send("multi", [label(rid, 0, 7)]))
    assert "class index 7 is outside 0..2" in message and fields == ["labels[0].class_index"]
    message, fields = invalid(lambda: send("multi", [label(rid, 0, 1.5), label(rid, 1, True)]))
    assert "not a class index" in message and fields == ["labels[0].number", "labels[1].flag"]
    reg = asyncio.run(predict_all(server.url, "reg", [np.ones((1, 2), np.float32)]))[0][0]
    message, fields = invalid(lambda: send("reg", [label(reg, 0, float("nan"))]))
    assert "not a finite number" in message and fields == ["labels[0].number"]
    message, fields = invalid(lambda: send("reg", [label(reg, 0, "high")]))
    assert "regression" in message and fields == ["labels[0].class_name"]
    message, fields = invalid(lambda: send("multi", [fpb.Label(request_id=rid, row=0)]))
    assert "no value" in message and fields == ["labels[0].label"]
    # nothing of a refused batch was stored: the good label is still unlabeled
    assert send("multi", [label(rid, 0, "approve")]).accepted == 1
    # skip_invalid: counted as rejected, with reasons
    counts = send("multi", [label(rid, 1, "maybe"), label(rid, 1, "review"), label(reg, 0, "decline")], skip_invalid=True)
    assert (counts.received, counts.accepted, counts.rejected) == (3, 1, 2)
    assert dict(counts.rejected_by_reason) == {"unknown_class": 1, "model_mismatch": 1}
    assert {r.reason for r in counts.rejections} == {"unknown_class", "model_mismatch"}
    # a stream names the label by its position in the whole call and says what came before
    stream = iter([fpb.FeedbackBatch(model="multi", labels=[label(served[1][0], 0, "review")]),
                   fpb.FeedbackBatch(labels=[label(served[1][0], 1, float("nan"))])])
    message, fields = invalid(lambda: stub.StreamFeedback(stream, metadata=auth("tok-l")))
    assert "label 1 " in message and "field 'number'" in message
    with pytest.raises(grpc.RpcError) as info:
        send("plain", [label("x", 0, 1)])
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "no outcomes" in info.value.details()
    with pytest.raises(grpc.RpcError) as info:
        send("nope", [label("x", 0, 1)])
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_feedback_needs_the_feedback_permission(server: LockgateProcess) -> None:
    stub = feedback_stub(server.url)
    batch = fpb.FeedbackBatch(model="multi", labels=[label("unknown-id", 0, "approve")])
    with pytest.raises(grpc.RpcError) as info:
        stub.SendFeedback(batch)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    for token in ("tok-v", "tok-o"):
        with pytest.raises(grpc.RpcError) as info:
            stub.SendFeedback(batch, metadata=auth(token))
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED and "'feedback'" in info.value.details()
    for token in ("tok-l", "tok-a"):
        assert stub.SendFeedback(batch, metadata=auth(token)).unknown == 1
    with pytest.raises(grpc.RpcError) as info:
        stub.GetOutcomes(fpb.OutcomesRequest(model="multi"), metadata=auth("tok-l"))
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_feedback_over_rest_names_the_same_permission_counts_and_audit(server: LockgateProcess) -> None:
    """KServe v2 REST infer without an id gets the server's id; labels for it go through
    POST /feedback/v1/SendFeedback with the gRPC API's permission, counts, errors and audit."""
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(server.http_url)
    x = np.ones((2, 4), np.float32)
    inp = httpclient.InferInput("INPUT0", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    rid = client.infer("multi", [inp]).get_response()["id"]
    assert rid  # server-generated, so feedback can name the prediction
    body = {"model": "multi", "labels": [{"request_id": rid, "row": 0, "class_name": "review"},
                                         {"request_id": rid, "row": 1, "class_index": 2},
                                         {"request_id": "never-served", "row": 0, "class_name": "approve"}]}
    assert server.post("/feedback/v1/SendFeedback", body)[0] == 401
    status, answer = server.post("/feedback/v1/SendFeedback", body, token="tok-v")
    assert status == 403 and "'feedback'" in answer["error"]
    status, answer = server.post("/feedback/v1/SendFeedback", body, token="tok-l")
    assert status == 200, answer
    assert (answer["received"], answer["accepted"], answer["unknown"]) == (3, 2, 1)
    assert server.post("/feedback/v1/SendFeedback", body, token="tok-l")[1]["duplicate"] == 2
    bad = {"model": "multi", "labels": [{"request_id": rid, "row": 0, "class_name": "maybe"}]}
    status, answer = server.post("/feedback/v1/SendFeedback", bad, token="tok-l")
    assert status == 400 and "label 0" in answer["error"] and "'class_name'" in answer["error"]
    status, answer = server.post("/feedback/v1/SendFeedback", {"model": "multi", "labels": [{"row": "x"}]}, token="tok-l")
    assert status == 400 and "FeedbackBatch" in answer["error"]
    status, report = server.post("/feedback/v1/GetOutcomes", {"model": "multi"}, token="tok-v")
    assert status == 200 and report["format"] == "lockgate.outcomes/v1" and report["versions"]["1"]["total"]
    assert server.post("/feedback/v1/GetOutcomes", {"model": "multi"}, token="tok-l")[0] == 403
    assert server.post("/feedback/v1/StreamFeedback", body, token="tok-l")[0] == 404
    entries = admin(server.url, "AuditLog", apb.AuditLogRequest(model="multi"), "tok-v").entries
    via = [json.loads(e.details_json) for e in entries if e.action == "outcomes.feedback"]
    assert any(d["via"] == "rest.SendFeedback" and d["accepted"] == 2 and d["unknown"] == 1 for d in via)


def test_queue_drops_are_counted_never_silent(server: LockgateProcess) -> None:
    asyncio.run(predict_all(server.url, "tiny", [np.ones((2, 2), np.float32)] * 25, concurrency=4))

    dropped = lambda: scrape(server, 'lockgate_outcome_dropped_total{model="tiny",reason="queue_full",version="1"}')  # noqa: E731
    assert wait_for(dropped, 10, what="the drop counter") == 50.0  # 2 rows per request > a queue of 1 row


def scrape(server: LockgateProcess, series: str) -> float | None:
    """The value of one exported series (``name{labels}``), or None while it is absent."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10).read().decode()
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.split()[-1])
    return None


# ------------------------------------------------------------------------------------- CLI
def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*LOCKGATE, *args], capture_output=True, text=True, timeout=300)


def test_cli_feedback_send_files_and_outcomes_report(server: LockgateProcess, tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    served = asyncio.run(predict_all(server.url, "multi", [rng.standard_normal((3, 4)).astype(np.float32) for _ in range(40)]))
    classes = ["approve", "review", "decline"]
    rows = [(rid, r, classes[int(rng.integers(0, 3))]) for rid, _, _ in served for r in range(3)]
    csv_file = tmp_path / "labels.csv"
    csv_file.write_text("request_id,row,label,event_time\n" + "".join(f"{a},{b},{c},2030-01-01T00:00:00Z\n" for a, b, c in rows[:40]))
    jsonl = tmp_path / "labels.jsonl"
    jsonl.write_text("".join(json.dumps({"request_id": a, "row": b, "label": classes.index(c)}) + "\n" for a, b, c in rows[40:80]))
    import pyarrow as pa
    import pyarrow.parquet as pq

    parquet = tmp_path / "labels.parquet"
    pq.write_table(pa.table({"request_id": [r[0] for r in rows[80:]], "row": [r[1] for r in rows[80:]],
                             "label": [r[2] for r in rows[80:]]}), parquet)
    common = ["--server", server.url, "--token", "tok-l", "--model", "multi"]
    for path, n in ((csv_file, 40), (jsonl, 40), (parquet, 40)):
        result = run_cli("feedback", "send", *common, "--file", str(path), "--json")
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["accepted"] == n
    again = run_cli("feedback", "send", *common, "--file", str(csv_file))
    assert again.returncode == 0 and "duplicate" in again.stdout and "40" in again.stdout
    bad = tmp_path / "bad.csv"
    bad.write_text("request_id,row,label\nr-1,0,approve\nr-2,0,maybe\n")
    result = run_cli("feedback", "send", *common, "--file", str(bad))
    assert result.returncode == 1 and "INVALID_ARGUMENT" in result.stderr and "bad.csv line 3" in result.stderr
    html = tmp_path / "report.html"
    result = run_cli("outcomes", "report", "--model", "multi", "--server", server.url, "--token", "tok-v",
                     "--json", "--html", str(html))
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["versions"]["1"]["total"]["quality"]["labeled"] >= 120
    page = html.read_text()
    assert page.count("<svg") >= 3 and "<script" not in page and "<link" not in page
    assert "confusion" in page and "Calibration" in page
    # offline, from the store itself
    result = run_cli("outcomes", "report", "--model", "multi", "--store", str(server.state_dir),
                     "--model-repository", str(server.repo), "--json")
    assert result.returncode == 0, result.stderr
    offline = json.loads(result.stdout)["versions"]["1"]["total"]["quality"]
    assert offline["labeled"] == report["versions"]["1"]["total"]["quality"]["labeled"]
    render_offline(html, tmp_path)


def render_offline(page: Path, tmp_path: Path) -> None:
    """Chromium (headless, every network request refused) renders the report's charts."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None and shutil.which("apt-get"):
        subprocess.run(["apt-get", "install", "-y", "-q", "chromium"], capture_output=True, timeout=900)
        browser = shutil.which("chromium")
    if browser is None:
        pytest.fail("chromium missing and apt-get could not install it (needs root and apt)")
    shot = tmp_path / "report.png"
    result = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--proxy-server=127.0.0.1:9",
         "--window-size=1400,2000", f"--screenshot={shot}", f"--user-data-dir={tmp_path / 'chrome'}", page.as_uri()],
        capture_output=True, text=True, timeout=180)
    assert shot.exists() and shot.stat().st_size > 20_000, result.stderr[-2000:]


# ------------------------------------------------------------------------------------- ledger
def test_label_outcomes_counted_retention_evicts_and_restart_keeps_the_ledger(tmp_path: Path) -> None:
    repo = tmp_path / "models"
    write_model(repo, "ledger", 1, linear_classifier([[0, 1], [0, 1]], [0, 0]), LEDGER_CONFIG)
    write_model(repo, "aged", 1, linear_classifier([[0, 1], [0, 1]], [0, 0]), AGED_CONFIG)
    state = tmp_path / "state"
    x = [np.full((1, 2), 0.1 * (i % 7), np.float32) for i in range(150)]
    with LockgateProcess(repo, state_dir=state, env={"LOCKGATE_OUTCOMES_REFRESH_S": "0.5"}) as first:
        asyncio.run(predict_all(first.url, "ledger", x, ids=[f"L-{i}" for i in range(150)], concurrency=1))
        asyncio.run(predict_all(first.url, "aged", x[:10], ids=[f"A-{i}" for i in range(10)], concurrency=1))
        asyncio.run(predict_all(first.url, "ledger", x[:1], ids=["L-149"], concurrency=1))  # a reused id
        written = lambda model: scrape(first, f'lockgate_outcome_predictions_total{{model="{model}",version="1"}}')  # noqa: E731
        wait_for(lambda: written("ledger") == 150 and written("aged") == 10, 30, what="every prediction written")
        store = OutcomeStore(SQLiteStore(state))
        try:
            wait_for(lambda: store.rows_kept("ledger").get("1", 1e9) <= 100, 30, what="the row cap to evict")
            wait_for(lambda: store.count_predictions("aged") == 0, 30, what="the age limit to evict")
            assert store.count_predictions("ledger") == store.rows_kept("ledger")["1"]
        finally:
            store.close()
        stub = feedback_stub(first.url)
        labels = ([label(f"L-{i}", 0, 1) for i in range(40)] + [label(f"L-{i}", 0, 0) for i in range(140, 150)]
                  + [label("L-149", 0, 1), label("never-served", 0, 1), label("A-3", 0, 0)])
        counts = stub.SendFeedback(fpb.FeedbackBatch(model="ledger", labels=labels[:-1]))
        assert (counts.expired, counts.accepted, counts.duplicate, counts.unknown) == (40, 10, 1, 1)
        aged = stub.SendFeedback(fpb.FeedbackBatch(model="aged", labels=labels[-1:]))
        assert aged.expired == 1
        text = urllib.request.urlopen(f"http://127.0.0.1:{first.metrics_port}/metrics", timeout=10).read().decode()
        assert 'lockgate_outcome_dropped_total{model="ledger",reason="duplicate_id",version="1"} 1.0' in text
        assert scrape(first, 'lockgate_outcome_evicted_total{model="aged"}') == 10.0
        assert scrape(first, 'lockgate_outcome_evicted_total{model="ledger"}') >= 50.0  # the row cap, visible
        entries = [e for e in admin_log_local(state) if e["action"] == "outcomes.feedback"]
        assert [(e["details"]["accepted"], e["details"]["expired"]) for e in entries] == [(10, 40), (0, 1)]
        assert all(e["actor"] == "anonymous" for e in entries)  # no tokens configured on this server
    # restart on the same state: the ledger and the windows are still there
    with LockgateProcess(repo, state_dir=state) as second:
        stub = feedback_stub(second.url)
        counts = stub.SendFeedback(fpb.FeedbackBatch(model="ledger", labels=[label(f"L-{i}", 0, 1) for i in range(130, 140)]
                                                     + [label("L-140", 0, 1)]))
        assert (counts.accepted, counts.duplicate) == (10, 1)
        total = outcomes(second.url, "ledger")["versions"]["1"]["total"]["quality"]
        assert total["labeled"] == 20 and total["predictions"] == 150


def admin_log_local(state: Path) -> list[dict]:
    result = run_cli("audit", "log", "--store", str(state), "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


# ------------------------------------------------------------------------------------- the port's edges
def test_undecodable_feedback_is_invalid_argument_and_a_stream_drains_on_sigterm(tmp_path: Path) -> None:
    """The feedback service shares the inference port's edges: bytes that are not its messages
    are INVALID_ARGUMENT (grpc alone says UNKNOWN), and on SIGTERM an open label stream stops
    reading, ingests what it read and ends UNAVAILABLE with the counts (it held the drain until
    grpc cancelled it before)."""
    import threading
    import time

    repo = tmp_path / "models"
    write_model(repo, "m", 1, linear_classifier([[0, 1], [0, 1]], [0, 0]), CANARY_CONFIG)
    state = tmp_path / "state"
    proc = LockgateProcess(repo, state_dir=state, env={"LOCKGATE_OUTCOMES_REFRESH_S": "0.5"}).wait_ready()
    try:
        channel = grpc.insecure_channel(proc.url)
        raw = channel.unary_unary("/lockgate.feedback.v1.FeedbackService/SendFeedback",
                                  request_serializer=lambda b: b, response_deserializer=lambda b: b)
        with pytest.raises(grpc.RpcError) as info:
            raw(b"\x0a\xff\xff\xff\xff", timeout=30)  # a length prefix past the end
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value
        assert "FeedbackBatch" in info.value.details()
        raw_stream = channel.stream_unary("/lockgate.feedback.v1.FeedbackService/StreamFeedback",
                                          request_serializer=lambda b: b, response_deserializer=lambda b: b)
        good = fpb.FeedbackBatch(model="m", labels=[label("r", 0, 1)]).SerializeToString()
        with pytest.raises(grpc.RpcError) as info:
            raw_stream(iter([good, b"\x0a\xff\xff\xff\xff"]), timeout=30)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "stream message 1" in info.value.details()

        served = asyncio.run(predict_all(proc.url, "m", [np.ones((1, 2), np.float32)] * 10,
                                         ids=[f"D-{i}" for i in range(10)], concurrency=2))
        assert [rid for rid, _, _ in served] == [f"D-{i}" for i in range(10)]
        written = lambda: scrape(proc, 'lockgate_outcome_predictions_total{model="m",version="1"}')  # noqa: E731
        wait_for(lambda: written() == 10, 30, what="the predictions written")
        # one full stream batch (so it is ingested as soon as it is read), then the client waits
        known = [label(f"D-{i}", 0, 1) for i in range(10)]
        first = fpb.FeedbackBatch(model="m", labels=known + [label(f"nobody-{i}", 0, 1) for i in range(8192 - 10)])
        answered = threading.Event()

        def messages():
            yield first
            answered.wait(120)  # the open stream: nothing more to send until the server answers

        outcome: dict = {}

        def call() -> None:
            try:
                outcome["summary"] = feedback_stub(proc.url).StreamFeedback(messages(), timeout=120)
            except grpc.RpcError as exc:
                outcome["error"] = exc
            finally:
                answered.set()

        caller = threading.Thread(target=call)
        caller.start()
        seen = lambda: scrape(proc, 'lockgate_feedback_labels_total{model="m",result="unknown"}')  # noqa: E731
        wait_for(lambda: seen() == 8192 - 10, 60, what="the stream's first batch ingested")
        started = time.monotonic()
        assert proc.terminate(timeout=120) == 0
        took = time.monotonic() - started
        caller.join(60)
        error = outcome.get("error")
        assert error is not None and error.code() == grpc.StatusCode.UNAVAILABLE, outcome
        assert "shutting down" in error.details() and "8192 labels so far were ingested (accepted 10" in error.details()
        assert took < 30, f"the drain waited {took:.1f} s for the open stream"
    finally:
        proc.terminate()
    with LockgateProcess(repo, state_dir=state) as second:  # what the stream sent was kept: resending is safe
        counts = feedback_stub(second.url).SendFeedback(fpb.FeedbackBatch(model="m", labels=known))
        assert (counts.accepted, counts.duplicate) == (0, 10)
        entries = [e for e in admin_log_local(state) if e["action"] == "outcomes.feedback"]
        assert any(e["details"].get("error", "").startswith("lockgate is shutting down") for e in entries), entries
