"""Provenance in the registry: model.sig verified with model-signing at register, validate and
approve; the trust policy (trusted signers, require_signature, licences, vendor assessment);
card fields filled in by lockgate; trusted signers added and removed, audited."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np
import pytest

from lockgate.config import ProvenanceSettings, TrustedSignerSettings
from lockgate.control.audit import Action, AuditTrail
from lockgate.control.provenance import ProvenanceGate, Reason, verify_directory
from lockgate.control.registry import Registry
from lockgate.control.sqlite_store import SQLiteStore
from lockgate.control.store import RecordKind
from lockgate.errors import AlreadyExists, ApprovalError, ArtifactSignatureError, ConfigError, FailedPrecondition, InvalidArgument
from signing_keys import KeyPair, flip_byte, make_ca_and_leaf, make_key, sign_version, sign_version_with_certificate
from test_control_registry import CARD, SIGNATURE, write_add_model

THIRD_PARTY_CARD = {
    **CARD, "vendor": "Acme Models", "license": "apache-2.0", "source": "https://models.example.com/acme/iris@3",
    "third_party": True, "vendor_assessment": {"reference": "VA-2025-017", "date": "2025-03-01"},
}


@pytest.fixture()
def keys(tmp_path: Path) -> dict[str, KeyPair]:
    return {name: make_key(tmp_path / "keys", name) for name in ("acme", "internal", "stranger")}


def build(tmp_path: Path, keys: dict[str, KeyPair], **policy) -> tuple[Registry, Path]:
    store = SQLiteStore(tmp_path / "state")
    audit = AuditTrail(store)
    settings = ProvenanceSettings(trusted_signers=[
        TrustedSignerSettings(name="acme-release", vendor="Acme Models", public_key=keys["acme"].public),
    ], **policy)
    registry = Registry(store, audit, repository=tmp_path / "repo", provenance=ProvenanceGate(store, audit, settings))
    return registry, tmp_path / "repo"


def version_dir(repo: Path, version: str = "1", *, extra: bool = True) -> Path:
    directory = repo / "iris" / version
    write_add_model(directory / "model.onnx")
    if extra:
        (directory / "tokenizer.json").write_text('{"vocab": ["a", "b"]}')
    return directory


def validated(registry: Registry, version: str = "1") -> None:
    registry.register("iris", version, None, "alice")
    report = registry.validate("iris", version, "alice", expected_signature=SIGNATURE, latency_runs=1)
    assert report.passed, report.checks


def refusals(registry: Registry) -> list:
    return [e for e in registry.audit.log(model="iris") if e.action == Action.ARTIFACT_SIGNATURE_INVALID]


def test_signed_by_trusted_key_registers_validates_approves(tmp_path: Path, keys) -> None:
    registry, repo = build(tmp_path, keys, require_signature="always", allowed_licenses=["Apache-2.0", "MIT"])
    sign_version(version_dir(repo), keys["acme"])
    record = registry.register("iris", "1", None, "alice")
    provenance = record.metadata["provenance"]
    assert provenance["signed"] and provenance["signer"] == "acme-release" and provenance["vendor"] == "Acme Models"
    assert provenance["files"] == ["model.onnx", "tokenizer.json"]
    # The registry's artifact digest is the signed manifest's (hashed once), and it is the file's SHA-256.
    import hashlib
    assert record.sha256 == hashlib.sha256((repo / "iris" / "1" / "model.onnx").read_bytes()).hexdigest()
    report = registry.validate("iris", "1", "alice", expected_signature=SIGNATURE, latency_runs=1)
    check = next(c for c in report.checks if c.name == "provenance")
    assert report.passed and check.status == "passed" and "acme-release" in check.detail
    approval = registry.approve("iris", "1", "bob", "vendor assessed", THIRD_PARTY_CARD)
    card = registry.latest_card("iris", "1")
    assert card.signer.startswith("acme-release (Acme Models), key sha256:")
    assert card.manifest_digest == provenance["manifest_digest"] and card.manifest_digest.startswith("sha256:")
    assert card.license == "Apache-2.0"  # canonical SPDX case
    assert approval.body["provenance"]["manifest_digest"] == card.manifest_digest
    assert registry.get("iris", "1").state == "approved"
    assert registry.audit.verify().ok and not refusals(registry)


@pytest.mark.parametrize("change", ["one_byte", "added_file", "removed_file"])
def test_changed_directory_is_refused_and_audited(tmp_path: Path, keys, change: str) -> None:
    registry, repo = build(tmp_path, keys)
    directory = version_dir(repo)
    sign_version(directory, keys["acme"])
    validated(registry)
    if change == "one_byte":
        flip_byte(directory / "model.onnx", offset=-2)
        expected = "changed: model.onnx"
    elif change == "added_file":
        (directory / "extra.py").write_text("import os\n")
        expected = "added: extra.py"
    else:
        (directory / "tokenizer.json").unlink()
        expected = "removed: tokenizer.json"
    with pytest.raises(ApprovalError, match=expected) as info:
        registry.approve("iris", "1", "bob", "ok", CARD)
    assert info.value.code == "FAILED_PRECONDITION"
    audited = refusals(registry)
    assert len(audited) == 1 and audited[0].actor == "bob"
    assert audited[0].details["reason"] == Reason.MANIFEST_MISMATCH and audited[0].details["stage"] == "approve"
    assert expected in audited[0].details["detail"]
    assert registry.get("iris", "1").state == "validated"


def test_untrusted_key_is_refused_at_registration(tmp_path: Path, keys) -> None:
    registry, repo = build(tmp_path, keys)
    sign_version(version_dir(repo), keys["stranger"])
    with pytest.raises(ArtifactSignatureError, match="not a trusted signer") as info:
        registry.register("iris", "1", None, "alice")
    assert info.value.cause == Reason.UNTRUSTED_SIGNER
    assert refusals(registry)[0].details["reason"] == "untrusted_signer"


def test_valid_signature_from_a_key_no_longer_trusted_refuses_approval(tmp_path: Path, keys) -> None:
    registry, repo = build(tmp_path, keys)
    gate = registry.provenance
    gate.add_signer("contractor", "Contract Co", "alice", reason="pilot", public_key_pem=keys["stranger"].public_pem)
    sign_version(version_dir(repo), keys["stranger"])
    validated(registry)
    removed = gate.remove_signer("contractor", "alice", reason="contract ended")
    assert removed.vendor == "Contract Co"
    with pytest.raises(ApprovalError, match=r"cannot approve: .*not a trusted signer \(trusted: acme-release\)"):
        registry.approve("iris", "1", "bob", "ok", CARD)
    actions = [e.action for e in registry.audit.log()]
    assert Action.TRUST_ADD in actions and Action.TRUST_REMOVE in actions
    trust = [e for e in registry.audit.log(model="trust")]
    assert [e.details["name"] for e in trust] == ["contractor", "contractor"]
    assert trust[1].details["reason"] == "contract ended"


def test_trust_rules(tmp_path: Path, keys) -> None:
    registry, _ = build(tmp_path, keys)
    gate = registry.provenance
    with pytest.raises(AlreadyExists):
        gate.add_signer("acme-release", "X", "alice", public_key_pem=keys["internal"].public_pem)
    with pytest.raises(FailedPrecondition, match="comes from the server config"):
        gate.remove_signer("acme-release", "alice")
    with pytest.raises(InvalidArgument, match="not a PEM public key"):
        gate.add_signer("bad", "X", "alice", public_key_pem="-----BEGIN PUBLIC KEY-----\nnope\n-----END PUBLIC KEY-----")
    with pytest.raises(InvalidArgument, match="exactly one"):
        gate.add_signer("none", "X", "alice")
    gate.add_signer("internal", "Us", "alice", public_key_pem=keys["internal"].public_pem)
    assert [s.name for s in gate.trusted_signers()] == ["acme-release", "internal"]
    assert len(registry.store.list_records(kind=RecordKind.TRUST)) == 1  # persisted, not only in memory


def test_no_signature_under_always_is_refused(tmp_path: Path, keys) -> None:
    registry, repo = build(tmp_path, keys, require_signature="always")
    version_dir(repo)
    with pytest.raises(ArtifactSignatureError, match=r"no signature \(model.sig\) and provenance.require_signature is 'always'"):
        registry.register("iris", "1", None, "alice")
    # A version that got in before the policy changed is refused at approval, precisely.
    registry.provenance.settings = ProvenanceSettings(require_signature="never")
    validated(registry)
    registry.provenance.settings = ProvenanceSettings(require_signature="always")
    with pytest.raises(ApprovalError, match=r"no signature \(model.sig\)"):
        registry.approve("iris", "1", "bob", "ok", CARD)
    assert [e.details["reason"] for e in refusals(registry)] == ["unsigned", "unsigned"]


def test_no_signature_under_never_is_allowed_and_the_card_says_unsigned(tmp_path: Path, keys) -> None:
    registry, repo = build(tmp_path, keys, require_signature="never")
    version_dir(repo)
    validated(registry)
    report = registry.latest_report("iris", "1")
    assert next(c for c in report.checks if c.name == "provenance").status == "not_applicable"
    registry.approve("iris", "1", "bob", "ok", CARD)
    card = registry.latest_card("iris", "1")
    assert card.signer == "unsigned" and card.manifest_digest == ""
    assert registry.show("iris", "1")["metadata"]["provenance"]["summary"] == "unsigned"


def test_third_party_policy(tmp_path: Path, keys) -> None:
    registry, repo = build(tmp_path, keys, require_signature="third_party", allowed_licenses=["Apache-2.0"])
    version_dir(repo)
    validated(registry)  # unsigned is fine until the card says third party
    bare = {**CARD, "third_party": True}
    with pytest.raises(ApprovalError) as info:
        registry.approve("iris", "1", "bob", "ok", bare)
    message = str(info.value)
    for rule in ("no signature (model.sig) and its card says third_party",
                 "the model card has no license; provenance.allowed_licenses requires one of Apache-2.0",
                 "needs its vendor", "needs a vendor_assessment (reference and date)"):
        assert rule in message, message
    with pytest.raises(ApprovalError, match=r"license 'MIT' is not in provenance.allowed_licenses \(Apache-2.0\)"):
        registry.approve("iris", "1", "bob", "ok", {**CARD, "license": "MIT"})
    with pytest.raises(ApprovalError, match="in the future"):
        registry.approve("iris", "1", "bob", "ok", {**THIRD_PARTY_CARD, "vendor_assessment": {"reference": "VA", "date": "2999-01-01"}})


def test_card_signer_fields_are_lockgates(tmp_path: Path, keys) -> None:
    registry, repo = build(tmp_path, keys)
    sign_version(version_dir(repo), keys["acme"])
    registry.register("iris", "1", None, "alice")
    with pytest.raises(InvalidArgument, match="signer is filled in by lockgate"):
        registry.set_card("iris", "1", {**CARD, "signer": "Totally Legit Inc"}, "alice")
    with pytest.raises(InvalidArgument, match="not an SPDX licence"):
        registry.set_card("iris", "1", {**CARD, "license": "do-what-you-want"}, "alice")
    stored = registry.set_card("iris", "1", CARD, "alice")
    assert stored.body["signer"].startswith("acme-release (Acme Models)")
    # Re-submitting the card as shown (with lockgate's values) is accepted.
    registry.set_card("iris", "1", stored.body, "alice")


def test_invalid_and_malformed_signatures(tmp_path: Path, keys) -> None:
    registry, repo = build(tmp_path, keys)
    directory = version_dir(repo)
    signature = sign_version(directory, keys["acme"])
    bundle = json.loads(signature.read_text())
    sig = bytearray(base64.b64decode(bundle["dsseEnvelope"]["signatures"][0]["sig"]))
    sig[-1] ^= 1
    bundle["dsseEnvelope"]["signatures"][0]["sig"] = base64.b64encode(bytes(sig)).decode()
    signature.write_text(json.dumps(bundle))
    with pytest.raises(ArtifactSignatureError) as info:
        verify_directory(directory, registry.provenance.trusted_signers())
    assert info.value.cause == Reason.INVALID_SIGNATURE
    signature.write_text("{not json")
    with pytest.raises(ArtifactSignatureError) as info:
        verify_directory(directory, registry.provenance.trusted_signers())
    assert info.value.cause == Reason.MALFORMED_SIGNATURE


def test_a_manifest_that_leaves_files_out_is_refused(tmp_path: Path, keys) -> None:
    registry, repo = build(tmp_path, keys)
    directory = version_dir(repo)
    sign_version(directory, keys["acme"], ignore=("tokenizer.json",))
    with pytest.raises(ArtifactSignatureError, match="leaves tokenizer.json out of its manifest"):
        verify_directory(directory, registry.provenance.trusted_signers())
    sign_version(directory, keys["acme"])
    (directory / ".gitattributes").write_text("* binary\n")  # model-signing skips git files by default
    with pytest.raises(ArtifactSignatureError, match=r"added: .gitattributes"):
        verify_directory(directory, registry.provenance.trusted_signers())


def test_policy_that_cannot_work_fails_at_startup(tmp_path: Path, keys) -> None:
    store = SQLiteStore(tmp_path / "s")
    with pytest.raises(ConfigError, match="allowed_licenses: not an SPDX"):
        ProvenanceGate(store, settings=ProvenanceSettings(allowed_licenses=["Apache-2"]))
    with pytest.raises(ConfigError, match="cannot read"):
        ProvenanceGate(store, settings=ProvenanceSettings(trusted_signers=[
            TrustedSignerSettings(name="x", vendor="y", public_key=tmp_path / "missing.pub")]))
    with pytest.raises(ConfigError, match="duplicate"):
        ProvenanceGate(store, settings=ProvenanceSettings(trusted_signers=[
            TrustedSignerSettings(name="x", vendor="y", public_key=keys["acme"].public),
            TrustedSignerSettings(name="x", vendor="z", public_key=keys["internal"].public)]))
    store.close()


def test_certificate_signed_version_verifies_against_its_ca(tmp_path: Path, keys) -> None:
    ca, leaf, leaf_key = make_ca_and_leaf(tmp_path / "pki", "acme")
    other_ca, other_leaf, other_key = make_ca_and_leaf(tmp_path / "pki", "rogue")
    store = SQLiteStore(tmp_path / "state")
    gate = ProvenanceGate(store, settings=ProvenanceSettings(trusted_signers=[
        TrustedSignerSettings(name="acme-pki", vendor="Acme Models", certificate_chain=[ca])]))
    directory = version_dir(tmp_path / "repo")
    sign_version_with_certificate(directory, leaf, leaf_key, ca)
    provenance = gate.verify("iris", "1", directory, stage="verify")
    assert provenance.signed and provenance.signer == "acme-pki" and provenance.identity.startswith("certificate chain CN=acme root CA")
    sign_version_with_certificate(directory, other_leaf, other_key, other_ca)
    with pytest.raises(ArtifactSignatureError, match="no trusted signer verifies") as info:
        gate.verify("iris", "1", directory, stage="verify")
    assert info.value.cause == Reason.UNTRUSTED_SIGNER
    store.close()
