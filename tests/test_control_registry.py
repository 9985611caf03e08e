"""Registry gates on real ONNX files: validation, four-eyes approval with a model
card, lifecycle transitions, and artifact tamper detection at load."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from lockgate.control.audit import Action, AuditTrail
from lockgate.errors import (
    AlreadyExists,
    ApprovalError,
    ArtifactTamperedError,
    InvalidArgument,
    LifecycleError,
    NotFound,
)
from lockgate.control.registry import Registry, State
from lockgate.control.sqlite_store import SQLiteStore
from lockgate.control.store import RecordKind

BIAS = np.array([1.0, 2.0, 3.0, 4.0], dtype=np.float32)
CARD = {
    "owner": "risk-team",
    "intended_use": "flag iris species for the demo",
    "training_data": "s3://datasets/iris/v3",
    "evaluation_metrics": {"accuracy": 0.97},
    "limitations": "not for production botany",
}
SIGNATURE = {
    "inputs": [{"name": "X", "datatype": "FP32", "shape": [-1, 4]}],
    "outputs": [{"name": "Y", "datatype": "TYPE_FP32", "shape": [-1, 4]}],
}


def write_add_model(path: Path, bias: np.ndarray = BIAS) -> Path:
    """Y = X + bias, X: float32 [N, 4]."""
    graph = helper.make_graph(
        [helper.make_node("Add", ["X", "B"], ["Y"])],
        "add",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["N", 4])],
        initializer=[numpy_helper.from_array(bias, name="B")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


@pytest.fixture()
def env(tmp_path: Path) -> tuple[Registry, Path]:
    store = SQLiteStore(tmp_path / "state")
    repo = tmp_path / "repo"
    write_add_model(repo / "iris" / "1" / "model.onnx")
    registry = Registry(store, AuditTrail(store), repository=repo)
    yield registry, repo
    store.close()


def _validated(registry: Registry, version: str = "1") -> None:
    registry.register("iris", version, None, "alice")
    report = registry.validate("iris", version, "alice", expected_signature=SIGNATURE, latency_runs=2)
    assert report.passed, report.checks


def test_full_lifecycle_and_audit(env: tuple[Registry, Path]) -> None:
    registry, repo = env
    record = registry.register("iris", "1", None, "alice", metadata={"framework": "sklearn"})
    assert record.state == "registered" and len(record.sha256) == 64
    assert record.artifact_path == str((repo / "iris" / "1" / "model.onnx").resolve())
    assert not registry.can_serve("iris", "1") and not registry.can_shadow("iris", "1")

    report = registry.validate("iris", "1", "alice", expected_signature=SIGNATURE, latency_runs=3)
    statuses = {c.name: c.status for c in report.checks}
    assert statuses == {
        "provenance": "not_applicable", "sha256": "passed", "onnx_checker": "passed", "signature": "passed",
        "smoke_inference": "passed", "golden_outputs": "not_applicable", "latency": "passed",
    }
    assert report.passed and report.latency_ms["median"] > 0 and report.latency_ms["runs"] == 3
    assert report.signature is not None and report.signature.inputs[0].shape == (-1, 4)
    assert registry.get("iris", "1").state == "validated"
    assert registry.latest_report("iris", "1") == report
    assert registry.can_shadow("iris", "1") and not registry.can_serve("iris", "1")

    approval = registry.approve("iris", "1", "bob", "reviewed the eval", CARD)
    assert approval.body["approver"] == "bob" and approval.body["reason"] == "reviewed the eval"
    assert registry.get("iris", "1").state == "approved" and registry.can_serve("iris", "1")
    assert registry.latest_card("iris", "1").owner == "risk-team"  # type: ignore[union-attr]

    assert registry.servable_versions("iris") == {"1"} and registry.shadowable_versions("iris") == {"1"}
    registry.transition("iris", "1", State.SERVING, "ops", reason="go live")
    assert registry.get("iris", "1").state == "serving" and registry.can_serve("iris", "1")
    registry.verify_artifact("iris", "1")  # intact: no exception

    shown = registry.show("iris", "1")
    assert shown["can_serve"] and len(shown["validation_reports"]) == 1 and len(shown["approvals"]) == 1

    entries = registry.audit.log(model="iris")
    assert [e.action for e in entries] == [
        Action.MODEL_REGISTER, Action.MODEL_VALIDATE, Action.MODEL_CARD, Action.MODEL_APPROVE, Action.MODEL_TRANSITION,
    ]
    assert [e.actor for e in entries] == ["alice", "alice", "bob", "bob", "ops"]
    assert entries[-1].details["from"] == "approved" and entries[-1].details["to"] == "serving"
    assert registry.audit.verify().ok


def test_unvalidated_or_unapproved_cannot_serve(env: tuple[Registry, Path]) -> None:
    registry, _ = env
    registry.register("iris", "1", None, "alice")
    assert "registered" in (registry.serve_denial_reason("iris", "1") or "")
    for target in (State.SERVING, State.CANARY, State.SHADOW):
        with pytest.raises(LifecycleError):
            registry.transition("iris", "1", target, "ops")
    with pytest.raises(LifecycleError):
        registry.approve("iris", "1", "bob", "looks fine", CARD)
    registry.validate("iris", "1", "alice", latency_runs=1)
    assert not registry.can_serve("iris", "1")
    assert "not approved" in (registry.serve_denial_reason("iris", "1") or "")
    for target in (State.SERVING, State.CANARY, State.APPROVED):
        with pytest.raises(LifecycleError):
            registry.transition("iris", "1", target, "ops")
    assert registry.get("iris", "1").state == "validated"
    assert registry.serve_denial_reason("iris", "9") is not None and not registry.can_serve("nope", "1")


def test_approval_by_registrant_refused(env: tuple[Registry, Path]) -> None:
    registry, _ = env
    _validated(registry)
    with pytest.raises(ApprovalError, match="four-eyes"):
        registry.approve("iris", "1", "alice", "I trust myself", CARD)
    assert registry.get("iris", "1").state == "validated"
    assert registry.store.list_records(RecordKind.APPROVAL, "iris", "1") == []


def test_approval_needs_reason_and_complete_card(env: tuple[Registry, Path]) -> None:
    registry, _ = env
    _validated(registry)
    with pytest.raises(ApprovalError, match="reason"):
        registry.approve("iris", "1", "bob", "   ", CARD)
    with pytest.raises(ApprovalError, match="no model card"):
        registry.approve("iris", "1", "bob", "ok")
    incomplete = {k: v for k, v in CARD.items() if k != "limitations"} | {"owner": "  ", "evaluation_metrics": {}}
    with pytest.raises(ApprovalError) as info:
        registry.approve("iris", "1", "bob", "ok", incomplete)
    message = str(info.value)
    assert "limitations is missing" in message and "owner is empty" in message and "evaluation_metrics" in message
    assert registry.get("iris", "1").state == "validated"
    registry.set_card("iris", "1", CARD, "alice")  # a stored card is used when none is passed
    registry.approve("iris", "1", "bob", "ok")
    assert registry.get("iris", "1").state == "approved"


def test_tampered_artifact_refuses_load_and_is_audited(env: tuple[Registry, Path]) -> None:
    registry, repo = env
    _validated(registry)
    registry.approve("iris", "1", "bob", "ok", CARD)
    artifact = repo / "iris" / "1" / "model.onnx"
    write_add_model(artifact, bias=np.array([9.0, 9.0, 9.0, 9.0], dtype=np.float32))  # swapped weights
    with pytest.raises(ArtifactTamperedError, match="sha256 mismatch") as info:
        registry.verify_artifact("iris", "1", actor="server")
    assert info.value.code == "FAILED_PRECONDITION"
    tampered = [e for e in registry.audit.log(model="iris") if e.action == Action.ARTIFACT_TAMPERED]
    assert len(tampered) == 1 and tampered[0].actor == "server"
    assert tampered[0].details["expected_sha256"] == registry.get("iris", "1").sha256
    assert tampered[0].details["actual_sha256"] != tampered[0].details["expected_sha256"]
    artifact.unlink()
    with pytest.raises(ArtifactTamperedError, match="unreadable"):
        registry.verify_artifact("iris", "1")
    assert registry.audit.verify().ok


def test_tampered_before_validation_fails_report(env: tuple[Registry, Path]) -> None:
    registry, repo = env
    registry.register("iris", "1", None, "alice")
    write_add_model(repo / "iris" / "1" / "model.onnx", bias=np.zeros(4, dtype=np.float32))
    report = registry.validate("iris", "1", "alice", latency_runs=1)
    assert not report.passed and report.failed_checks() == ["sha256"]
    assert registry.get("iris", "1").state == "registered"
    assert registry.audit.log(model="iris")[-1].details["passed"] is False


def test_tampered_between_validation_and_approval_refused(env: tuple[Registry, Path]) -> None:
    registry, repo = env
    _validated(registry)
    write_add_model(repo / "iris" / "1" / "model.onnx", bias=np.zeros(4, dtype=np.float32))
    with pytest.raises(ArtifactTamperedError):
        registry.approve("iris", "1", "bob", "ok", CARD)
    assert registry.get("iris", "1").state == "validated"


def test_signature_mismatch_fails_validation(env: tuple[Registry, Path]) -> None:
    registry, _ = env
    registry.register("iris", "1", None, "alice")
    wrong = {
        "inputs": [{"name": "X", "datatype": "INT64", "shape": [-1, 3]}],
        "outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 4]}],
    }
    report = registry.validate("iris", "1", "alice", expected_signature=wrong, latency_runs=1)
    assert not report.passed and report.failed_checks() == ["signature"]
    detail = next(c.detail for c in report.checks if c.name == "signature")
    assert "datatype FP32, expected INT64" in detail and "shape" in detail and "output 'probabilities' of the expected signature is not in the model" in detail
    assert registry.get("iris", "1").state == "registered"


def test_golden_outputs_beside_model(env: tuple[Registry, Path]) -> None:
    registry, repo = env
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    directory = repo / "iris" / "2"
    write_add_model(directory / "model.onnx")
    np.savez(directory / "golden_inputs.npz", X=x)
    np.savez(directory / "golden_outputs.npz", Y=x + BIAS)
    registry.register("iris", "2", None, "alice")
    report = registry.validate("iris", "2", "alice", latency_runs=1)
    golden = next(c for c in report.checks if c.name == "golden_outputs")
    assert golden.status == "passed" and golden.data["max_abs_diff"]["Y"] == 0.0

    directory = repo / "iris" / "3"
    write_add_model(directory / "model.onnx")
    registry.register("iris", "3", None, "alice")
    report = registry.validate("iris", "3", "alice", golden=({"X": x}, {"Y": x + BIAS + 0.5}), latency_runs=1)
    assert not report.passed and report.failed_checks() == ["golden_outputs"]


def test_invalid_onnx_fails_checker_and_smoke(env: tuple[Registry, Path]) -> None:
    registry, repo = env
    bad = repo / "iris" / "4" / "model.onnx"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"this is not a protobuf model")
    registry.register("iris", "4", None, "alice")
    report = registry.validate("iris", "4", "alice", latency_runs=1)
    failed = set(report.failed_checks())
    assert {"onnx_checker", "smoke_inference"} <= failed and not report.passed


def test_shadow_then_approve_then_serve(env: tuple[Registry, Path]) -> None:
    registry, _ = env
    _validated(registry)
    registry.transition("iris", "1", State.SHADOW, "ops")
    assert registry.can_shadow("iris", "1") and not registry.can_serve("iris", "1")
    with pytest.raises(LifecycleError, match="not approved"):
        registry.transition("iris", "1", State.CANARY, "ops")
    registry.approve("iris", "1", "bob", "shadow results look good", CARD)
    assert registry.get("iris", "1").state == "shadow" and registry.can_serve("iris", "1")
    registry.transition("iris", "1", State.VALIDATED, "ops")  # leaving shadow keeps the approval
    assert registry.get("iris", "1").state == "approved"
    registry.transition("iris", "1", State.CANARY, "ops")
    registry.transition("iris", "1", State.APPROVED, "lockgate", reason="rollback")
    assert registry.get("iris", "1").state == "approved"


def test_retire_rules(env: tuple[Registry, Path]) -> None:
    registry, _ = env
    _validated(registry)
    registry.approve("iris", "1", "bob", "ok", CARD)
    registry.transition("iris", "1", State.SERVING, "ops")
    with pytest.raises(LifecycleError, match="move its traffic"):
        registry.retire("iris", "1", "admin")
    registry.transition("iris", "1", State.APPROVED, "ops")
    registry.retire("iris", "1", "admin", reason="superseded")
    assert registry.get("iris", "1").state == "retired" and not registry.can_serve("iris", "1")
    assert not registry.can_shadow("iris", "1")
    assert registry.servable_versions("iris") == frozenset() == registry.shadowable_versions("iris")
    with pytest.raises(LifecycleError):
        registry.transition("iris", "1", State.SERVING, "ops")
    with pytest.raises(LifecycleError, match="already retired"):
        registry.retire("iris", "1", "admin")


def test_register_errors(env: tuple[Registry, Path]) -> None:
    registry, _ = env
    registry.register("iris", "1", None, "alice")
    with pytest.raises(AlreadyExists):
        registry.register("iris", "1", None, "alice")
    for model, version in (("../etc", "1"), ("iris", "v1"), ("iris", "0"), ("", "1")):
        with pytest.raises(InvalidArgument):
            registry.register(model, version, None, "alice")
    with pytest.raises(NotFound, match="does not exist"):
        registry.register("iris", "7", None, "alice")


def test_one_signature_type_from_graph_to_stored_report(env: tuple[Registry, Path]) -> None:
    """Validation, the codec and the runtime share one Signature: a report's signature is the
    codec's type (datatype objects, tuple shapes) and survives the store's JSON round trip."""
    from lockgate.control.validation import ValidationReport
    from lockgate.protocol import datatypes
    from lockgate.protocol.codec import Signature

    registry, _ = env
    registry.register("iris", "1", None, "alice")
    report = registry.validate("iris", "1", "alice", expected_signature=SIGNATURE, latency_runs=1)
    assert isinstance(report.signature, Signature)
    assert report.signature.inputs[0].datatype is datatypes.BY_NAME["FP32"]
    stored = ValidationReport.model_validate_json(report.model_dump_json())
    assert stored.signature == report.signature
    assert report.model_dump(mode="json")["signature"]["inputs"] == [{"name": "X", "datatype": "FP32", "shape": [-1, 4]}]
    # aliases in an expected signature read as the same datatype; unknown ones are refused by name
    assert Signature.from_dict(SIGNATURE).outputs[0].datatype is datatypes.BY_NAME["FP32"]
    from lockgate.errors import InvalidArgument
    with pytest.raises(InvalidArgument, match="'BF17' is not supported"):
        Signature.from_dict({"inputs": [{"name": "X", "datatype": "BF17", "shape": [1]}], "outputs": []})


def test_reject_retires_a_pending_version_with_four_eyes_and_audit(env: tuple[Registry, Path]) -> None:
    registry, _ = env
    registry.register("iris", "1", None, "alice")
    registry.validate("iris", "1", "carol", expected_signature=SIGNATURE, latency_runs=1)
    with pytest.raises(ApprovalError, match="four-eyes rule: 'alice' registered"):
        registry.reject("iris", "1", "alice", "not good")
    with pytest.raises(ApprovalError, match="non-empty reason"):
        registry.reject("iris", "1", "bob", "  ")
    record = registry.reject("iris", "1", "bob", "bias found in review")
    assert record.state == "retired" and record.metadata["rejected_by"] == "bob"
    with pytest.raises(LifecycleError):
        registry.approve("iris", "1", "bob", "changed my mind")
    entry = registry.audit.log(model="iris")[-1]
    assert (entry.actor, entry.action, entry.details["reason"]) == ("bob", "model.reject", "bias found in review")
