"""Operator commands: ``lockgate models|traffic|audit|trust|tokens ...``, a thin layer over the admin API.

Each command makes one admin call (``--server HOST:PORT --token T``, or ``LOCKGATE_SERVER`` /
``LOCKGATE_TOKEN``) and prints a rich table, or JSON with ``--json`` (``lockgate.cli_common``
holds the output helper and the shared options). A refused call prints its gRPC status and
message and exits 1, never a traceback. ``audit verify|log|export`` also
work offline on the store itself (``--store PATH``: a state dir, a ``.db`` file or a
``postgresql://`` URL), because checking a trail must not depend on the server that wrote it.
``tokens create`` is local: it prints the new token once and the hashed entry for the file.
``models sign`` (and ``models verify --key``, ``audit verify-export``) work offline on files with
the ``model-signing`` library, so a vendor or an auditor needs no server.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Optional, TypeVar

import grpc
import typer
import yaml
from rich.table import Table

from lockgate._proto.lockgate import admin_pb2 as pb
from lockgate._proto.lockgate import admin_pb2_grpc as pb_grpc
from lockgate.cli_common import (
    DEFAULT_SERVER, CaOpt, JsonOpt, Output, ServerOpt, StoreOpt, TokenOpt, console, err_console, fail, print_json,
    make_table, with_default,
)
from lockgate.routing.policy import CanarySpec, Guardrails

T = TypeVar("T")

ModelArg = Annotated[str, typer.Argument(help="Model name (its directory in the repository).", show_default=False)]
VersionArg = Annotated[str, typer.Argument(help="Version (its numbered directory).", show_default=False)]

models_app = typer.Typer(help="Model registry: register, validate, card, approve, retire, load, list, show, sign, verify.",
                         no_args_is_help=True)
traffic_app = typer.Typer(help="Traffic policy: weights, shadow, canary.", no_args_is_help=True)
canary_app = typer.Typer(help="Progressive canary with automatic rollback.", no_args_is_help=True)
audit_app = typer.Typer(help="Hash-chained audit trail: verify, log, export (signed), verify-export.", no_args_is_help=True)
tokens_app = typer.Typer(help="Admin API tokens: create (local, no server) and whoami.", no_args_is_help=True)
trust_app = typer.Typer(help="Trusted signers of model.sig bundles: list, add, remove (audited).", no_args_is_help=True)
traffic_app.add_typer(canary_app, name="canary")


# ---------------------------------------------------------------------- plumbing
class Client:
    """One channel to the admin API with the bearer token on every call."""

    def __init__(self, server: str, token: str, ca_file: Path | None = None) -> None:
        if not token:
            fail("no token: pass --token or set LOCKGATE_TOKEN")
        if ca_file is not None:
            creds = grpc.ssl_channel_credentials(root_certificates=ca_file.read_bytes())
            self.channel = grpc.secure_channel(server, creds)
        else:
            self.channel = grpc.insecure_channel(server)
        self.stub = pb_grpc.AdminServiceStub(self.channel)
        self.metadata = (("authorization", f"Bearer {token}"),)
        self.server = server

    def call(self, method: str, request: Any, timeout: float = 120.0) -> Any:
        return getattr(self.stub, method)(request, metadata=self.metadata, timeout=timeout)


@contextmanager
def _client(server: str, token: str, ca_file: Path | None) -> Iterator[Client]:
    client = Client(server, token, ca_file)
    try:
        yield client
    except grpc.RpcError as exc:
        code = exc.code() if hasattr(exc, "code") else None
        details = exc.details() if hasattr(exc, "details") else str(exc)
        name = code.name if code is not None else "UNKNOWN"
        if code is grpc.StatusCode.UNAVAILABLE:
            details = f"{details} (is lockgate serving on {server}?)"
        fail(f"{name}: {details}")
    finally:
        client.channel.close()


def call(server: str, token: str, ca_file: Path | None, method: str, request: Any) -> Any:
    with _client(server, token, ca_file) as client:
        return client.call(method, request)
    raise AssertionError("unreachable")  # pragma: no cover (fail() exits)


def _read_document(path: Path) -> dict[str, Any]:
    """A JSON or YAML mapping from a file (cards, signatures)."""
    try:
        text = path.read_text(encoding="utf-8")
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (OSError, ValueError, yaml.YAMLError) as exc:
        fail(f"cannot read {path}: {exc}")
    if not isinstance(data, dict):
        fail(f"{path} must contain a mapping")
    return data


def _read_sample(path: Path) -> str:
    """A reference sample as ``{"input": nested list}`` JSON, from .json/.yaml or .npz."""
    if path.suffix == ".npz":
        import numpy as np

        try:
            with np.load(path, allow_pickle=False) as data:
                return json.dumps({name: data[name].tolist() for name in data.files})
        except (OSError, ValueError) as exc:
            fail(f"cannot read {path}: {exc}")
    return json.dumps(_read_document(path))


def parse_duration(text: str) -> float:
    """``60s``, ``1m``, ``500ms``, ``1h`` or plain seconds."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(ms|s|m|h)?\s*", text)
    if not match:
        raise typer.BadParameter(f"not a duration: {text!r} (use e.g. 60s, 1m, 500ms)")
    value = float(match.group(1))
    return value * {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}[match.group(2)]


_print_json = print_json
_CHECK_STATUS = {"skipped": "not_applicable"}  # reports stored before not_applicable existed
_GUARDRAILS = Guardrails()
_CANARY = CanarySpec(stable="1", canary="2")
_CANARY_STEPS = ",".join(str(s) for s in _CANARY.steps)
_CANARY_INTERVAL = f"{_CANARY.interval_s:g}s"


def _default(name: str) -> str:
    """A guardrail's server-side default, for the help text (``off`` when it is disabled)."""
    value = getattr(_GUARDRAILS, name)
    return "off" if value is None else f"{value:g}" if isinstance(value, float) else str(value)


def _export_counts(bundle: dict[str, Any]) -> str:
    parts = [f"{k.replace('_', ' ')} {len(v)}" for k, v in bundle.items() if isinstance(v, list)]
    return ", ".join(parts) or "empty"


def _export_summary(model: str, out: Path, bundle: dict[str, Any]) -> dict[str, Any]:
    return {"model": model, "path": str(out), "bytes": out.stat().st_size,
            "counts": {k: len(v) for k, v in bundle.items() if isinstance(v, list)}}


def _version_dict(info: Any) -> dict[str, Any]:
    return {
        "model": info.model, "version": info.version, "state": info.state, "artifact_path": info.artifact_path,
        "sha256": info.sha256, "registered_by": info.registered_by, "registered_at": info.registered_at,
        "updated_at": info.updated_at, "metadata": json.loads(info.metadata_json or "{}"),
        "can_serve": info.can_serve, "serve_denial": info.serve_denial, "can_shadow": info.can_shadow,
        "loaded": info.loaded, "provenance": _provenance_dict(info.provenance),
    }


def _provenance_dict(p: Any) -> dict[str, Any]:
    return {"signed": p.signed, "signer": p.signer, "vendor": p.vendor, "identity": p.identity,
            "manifest_digest": p.manifest_digest, "files": list(p.files), "verified_at": p.verified_at,
            "summary": p.summary}


def _versions_table(infos: list[Any], title: str) -> Table:
    table = make_table(title=title)
    for column in ("model", "version", "state", "serve", "loaded", "registered by", "sha256", "updated"):
        table.add_column(column)
    for info in infos:
        table.add_row(
            info.model, info.version, info.state, "yes" if info.can_serve else "[red]no[/]",
            "yes" if info.loaded else "no", info.registered_by, info.sha256[:12], info.updated_at,
        )
    return table


def _print_version(info: Any) -> None:
    table = make_table(show_header=False, title=f"{info.model} / {info.version}")
    table.add_column("field", style="bold")
    table.add_column("value")
    for key, value in _version_dict(info).items():
        if key == "provenance":
            value = value["summary"] + (f" (verified {value['verified_at']})" if value["verified_at"] else "")
        elif key == "metadata" and isinstance(value.get("provenance"), dict):
            # shown as its own row above; the full record is in --json
            value = {k: v for k, v in value.items() if k != "provenance"}
        table.add_row(key, json.dumps(value) if isinstance(value, dict) else str(value))
    console.print(table)


# ---------------------------------------------------------------------- models
@models_app.command("register")
def models_register(
    model: ModelArg, version: VersionArg, server: ServerOpt = DEFAULT_SERVER, token: TokenOpt = "", ca_file: CaOpt = None,
    artifact: Annotated[Optional[str], typer.Option(
        "--artifact", help=with_default("Artifact path on the server.", "REPO/MODEL/VERSION/model.onnx"))] = None,
    metadata: Annotated[Optional[str], typer.Option("--metadata", help=with_default("JSON object kept with the version.", "{}"))] = None,
    as_json: JsonOpt = False,
) -> None:
    """Register a version and the SHA-256 of its artifact."""
    info = call(server, token, ca_file, "RegisterVersion", pb.RegisterVersionRequest(
        model=model, version=version, artifact_path=artifact or "", metadata_json=metadata or ""))
    if as_json:
        _print_json(_version_dict(info))
    else:
        _print_version(info)


@models_app.command("validate")
def models_validate(
    model: ModelArg, version: VersionArg, server: ServerOpt = DEFAULT_SERVER, token: TokenOpt = "", ca_file: CaOpt = None,
    sample: Annotated[Optional[Path], typer.Option(
        "--sample", help=with_default("Smoke-test rows: .npz, or .json/.yaml {input: rows}.", "golden inputs, else one generated row"))] = None,
    signature: Annotated[Optional[Path], typer.Option(
        "--signature", help=with_default("Expected signature (.json/.yaml).", "the serving version's, else the config's"))] = None,
    as_json: JsonOpt = False,
) -> None:
    """Run the automatic validation; exit 1 if it fails (the report is stored either way)."""
    response = call(server, token, ca_file, "ValidateVersion", pb.ValidateVersionRequest(
        model=model, version=version, sample_json=_read_sample(sample) if sample else "",
        expected_signature_json=json.dumps(_read_document(signature)) if signature else ""))
    report = json.loads(response.report_json)
    if as_json:
        _print_json(report)
    else:
        table = make_table(title=f"validation of {model} / {version}: " + ("[green]passed[/]" if response.passed else "[red]failed[/]"))
        for column in ("check", "status", "detail"):
            table.add_column(column)
        for check in report.get("checks", []):
            status = _CHECK_STATUS.get(check["status"], check["status"])
            style = {"passed": "green", "failed": "red"}.get(status, "yellow")
            table.add_row(check["name"], f"[{style}]{status.replace('_', ' ')}[/]", check.get("detail", ""))
        console.print(table)
    if not response.passed:
        raise typer.Exit(1)


@models_app.command("card")
def models_card(
    model: ModelArg, version: VersionArg,
    file: Annotated[Path, typer.Option("--file", help="Model card (.yaml/.json): owner, intended_use, training_data, evaluation_metrics, limitations.")],
    server: ServerOpt = DEFAULT_SERVER, token: TokenOpt = "", ca_file: CaOpt = None, as_json: JsonOpt = False,
) -> None:
    """Attach (a new revision of) the model card."""
    card = _read_document(file)
    response = call(server, token, ca_file, "SetModelCard", pb.SetModelCardRequest(
        model=model, version=version, card_json=json.dumps(card)))
    Output(as_json).message({"model": model, "version": version, "card_id": response.card_id, "owner": card.get("owner")},
                            f"card {response.card_id} stored for {model} / {version} (owner {card.get('owner')})")


@models_app.command("approve")
def models_approve(
    model: ModelArg, version: VersionArg,
    reason: Annotated[str, typer.Option("--reason", help="Why this version may take live traffic (kept in the audit trail).")],
    server: ServerOpt = DEFAULT_SERVER, token: TokenOpt = "", ca_file: CaOpt = None,
    card: Annotated[Optional[Path], typer.Option(
        "--card", help=with_default("Model card to attach with the approval.", "the card stored with `models card`"))] = None,
    as_json: JsonOpt = False,
) -> None:
    """Approve a validated version (four eyes: not by its registrant)."""
    response = call(server, token, ca_file, "ApproveVersion", pb.ApproveVersionRequest(
        model=model, version=version, reason=reason, card_json=json.dumps(_read_document(card)) if card else ""))
    Output(as_json).message(
        {"approval_id": response.approval_id, "reason": reason, **_version_dict(response.version)},
        f"approved {model} / {version} (approval {response.approval_id}); state {response.version.state}")


@models_app.command("reject")
def models_reject(
    model: ModelArg, version: VersionArg,
    reason: Annotated[str, typer.Option("--reason", help="Why this version may not take traffic (kept in the audit trail).")],
    server: ServerOpt = DEFAULT_SERVER, token: TokenOpt = "", ca_file: CaOpt = None, as_json: JsonOpt = False,
) -> None:
    """Reject a version awaiting approval (it is retired; four eyes as for approve)."""
    info = call(server, token, ca_file, "RejectVersion", pb.RejectVersionRequest(model=model, version=version, reason=reason))
    Output(as_json).message({"reason": reason, **_version_dict(info)}, f"rejected {info.model} / {info.version}; state {info.state}")


@models_app.command("retire")
def models_retire(
    model: ModelArg, version: VersionArg, server: ServerOpt = DEFAULT_SERVER, token: TokenOpt = "", ca_file: CaOpt = None,
    reason: Annotated[str, typer.Option("--reason", help=with_default("Why it is retired (kept in the audit trail).", "none"))] = "",
    force: Annotated[bool, typer.Option("--force", help="Retire even while it takes live traffic.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Retire a version for good."""
    info = call(server, token, ca_file, "RetireVersion", pb.RetireVersionRequest(
        model=model, version=version, reason=reason, force=force))
    Output(as_json).message(_version_dict(info), f"retired {info.model} / {info.version}")


@models_app.command("list")
def models_list(
    server: ServerOpt = DEFAULT_SERVER, token: TokenOpt = "", ca_file: CaOpt = None,
    model: Annotated[Optional[str], typer.Option("--model", help=with_default("Only this model.", "all models"))] = None,
    as_json: JsonOpt = False,
) -> None:
    """Registered versions and their lifecycle state."""
    response = call(server, token, ca_file, "ListVersions", pb.ListVersionsRequest(model=model or ""))
    if as_json:
        _print_json([_version_dict(v) for v in response.versions])
    else:
        console.print(_versions_table(list(response.versions), "model versions"))


@models_app.command("load")
def models_load(
    model: ModelArg, version: VersionArg, server: ServerOpt = DEFAULT_SERVER, token: TokenOpt = "", ca_file: CaOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Load a version that is in the repository, beside the ones already serving."""
    with _client(server, token, ca_file) as client:
        result = load_version(client, model, version)
    Output(as_json).message(result, f"loaded {model} / {version}; loaded versions now {', '.join(result['loaded_versions'])}")


def load_version(client: Client, model: str, version: str) -> dict[str, Any]:
    """Minimal load: reload the model from the repository (Triton's RepositoryModelLoad: every
    version the version policy selects), then check ``version`` is among the loaded ones."""
    from lockgate._proto import inference_pb2 as ipb
    from lockgate._proto import inference_pb2_grpc as ipb_grpc

    stub = ipb_grpc.GRPCInferenceServiceStub(client.channel)
    stub.RepositoryModelLoad(ipb.RepositoryModelLoadRequest(model_name=model), metadata=client.metadata, timeout=300)
    index = stub.RepositoryIndex(ipb.RepositoryIndexRequest(), metadata=client.metadata, timeout=60)
    entries = {m.version: m for m in index.models if m.name == model}
    loaded = sorted((v for v, m in entries.items() if m.state == "READY"), key=lambda v: int(v) if v.isdigit() else 0)
    if version not in loaded:
        entry = entries.get(version)
        why = (f"{entry.state}: {entry.reason}" if entry is not None
               else f"there is no {model}/{version}/model.onnx in the server's repository")
        fail(f"FAILED_PRECONDITION: {model} / {version} is not loaded after the reload ({why})")
    return {"model": model, "version": version, "loaded": True, "loaded_versions": loaded}


@models_app.command("show")
def models_show(
    model: ModelArg, version: VersionArg, server: ServerOpt = DEFAULT_SERVER, token: TokenOpt = "", ca_file: CaOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """One version with its validation reports, approvals and cards."""
    response = call(server, token, ca_file, "ShowVersion", pb.ShowVersionRequest(model=model, version=version))
    details = json.loads(response.details_json or "{}")
    if as_json:
        _print_json({**_version_dict(response.version), **details})
        return
    _print_version(response.version)
    for report in details.get("validation_reports", []):
        console.print(f"validation {report.get('id')} by {report.get('actor')}: "
                      + ("passed" if report.get("passed") else f"failed {report.get('failed_checks', '')}"))
    for approval in details.get("approvals", []):
        console.print(f"approved by {approval.get('approver')} at {approval.get('time')}: {approval.get('reason')}")
    for card in details.get("cards", [])[-1:]:
        console.print(f"card (owner {card.get('owner')}): {card.get('intended_use')}")
        assessment = card.get("vendor_assessment") or {}
        console.print(
            f"provenance on the card: signer {card.get('signer') or 'unsigned'}; manifest {card.get('manifest_digest') or '-'}; "
            f"license {card.get('license') or '-'}; vendor {card.get('vendor') or '-'}; "
            f"third_party {'yes' if card.get('third_party') else 'no'}; source {card.get('source') or '-'}; "
            "vendor assessment " + (f"{assessment.get('reference')} ({assessment.get('date')})" if assessment else "-"),
            highlight=False, soft_wrap=True,
        )


RepoOpt = Annotated[Path, typer.Option("--model-repository", envvar="LOCKGATE_MODEL_REPOSITORY",
                                       help="Offline: the model repository root (REPO/<model>/<version>/).")]


def _version_dir(repository: Path, model: str, version: str) -> Path:
    directory = repository / model / version
    if not directory.is_dir():
        fail(f"NOT_FOUND: no version directory {directory}")
    return directory


@models_app.command("sign")
def models_sign(
    model: ModelArg, version: VersionArg,
    key: Annotated[Path, typer.Option("--key", help="EC private key (PEM, P-256/384/521) to sign with.")],
    model_repository: RepoOpt = Path("models"),
    password_env: Annotated[Optional[str], typer.Option(
        "--password-env", help=with_default("Environment variable holding the key's password.", "no password"))] = None,
    as_json: JsonOpt = False,
) -> None:
    """Sign a version directory offline with model-signing: writes REPO/M/V/model.sig over every file."""
    import os

    from lockgate.control.provenance import sign_directory
    from lockgate.errors import LockgateError

    directory = _version_dir(model_repository, model, version)
    password = os.environ.get(password_env) if password_env else None
    try:
        target = sign_directory(directory, key, password=password)
    except (LockgateError, OSError) as exc:
        fail(f"{getattr(exc, 'code', 'INVALID_ARGUMENT')}: {getattr(exc, 'message', exc)}")
    Output(as_json).message({"model": model, "version": version, "signature": str(target)},
                            f"signed {model} / {version}: {target}")


@models_app.command("verify")
def models_verify(
    model: ModelArg, version: VersionArg, server: ServerOpt = DEFAULT_SERVER, token: TokenOpt = "", ca_file: CaOpt = None,
    key: Annotated[Optional[Path], typer.Option(
        "--key", help=with_default("Offline: verify with this public key instead of asking the server.", "ask the server"))] = None,
    model_repository: RepoOpt = Path("models"),
    as_json: JsonOpt = False,
) -> None:
    """Verify a version's model.sig over its whole directory (exit 1 unless signed and valid).

    Without --key the server verifies it against its trust policy (a refusal is audited there).
    """
    if key is not None:
        from lockgate.control.provenance import TrustedSigner, verify_directory
        from lockgate.errors import LockgateError

        try:
            signer = TrustedSigner.build(str(key), "(given with --key)", public_key_pem=key.read_text(encoding="ascii"))
            result = _provenance_dict_of(verify_directory(_version_dir(model_repository, model, version), [signer]))
        except (LockgateError, OSError) as exc:
            fail(f"{getattr(exc, 'code', 'INVALID_ARGUMENT')}: {getattr(exc, 'message', exc)}")
    else:
        response = call(server, token, ca_file, "VerifyVersion", pb.VerifyVersionRequest(model=model, version=version))
        result = _provenance_dict(response.provenance)
    if as_json:
        _print_json(result)
    elif result["signed"]:
        console.print(f"[green]verified[/] {model} / {version}: {result['summary']}", highlight=False, soft_wrap=True)
    if not result["signed"]:
        fail(f"{model} / {version} is unsigned: no model.sig in its version directory")


def _provenance_dict_of(provenance: Any) -> dict[str, Any]:
    data = provenance.to_dict()
    return {k: data.get(k, "") for k in ("signed", "signer", "vendor", "identity", "manifest_digest", "files",
                                          "verified_at", "summary")}


# ---------------------------------------------------------------------- traffic
def _traffic_dict(status: Any) -> dict[str, Any]:
    result: dict[str, Any] = {
        "model": status.model, "has_policy": status.has_policy, "revision": status.revision,
        "sticky": status.sticky, "default_version": status.default_version,
        "weights": {w.version: {"weight": w.weight, "percent": w.percent} for w in status.weights},
        "shadow": {"version": status.shadow.version, "percent": status.shadow.percent} if status.HasField("shadow") else None,
        "canary": None,
        "agreements": [
            {"primary": a.primary, "shadow": a.shadow, "count": a.count, "compared_rows": a.compared_rows,
             "agreed_rows": a.agreed_rows, "mismatched": a.mismatched,
             "agreement_rate": a.agreement_rate if a.HasField("agreement_rate") else None,
             "max_abs_diff": a.max_abs_diff if a.HasField("max_abs_diff") else None,
             "mean_abs_diff": a.mean_abs_diff if a.HasField("mean_abs_diff") else None}
            for a in status.agreements
        ],
        "drift": dict(status.drift),
    }
    if status.HasField("canary"):
        c = status.canary
        result["canary"] = {
            "stable": c.stable, "canary": c.canary, "steps": list(c.steps), "interval_s": c.interval_s,
            "step_index": c.step_index, "percent": c.percent, "failures": c.failures,
            "failure_limit": c.failure_limit, "state": c.state, "reason": c.reason,
            "guardrails": json.loads(c.guardrails_json or "{}"), "started_at": c.started_at,
        }
    return result


def _print_traffic(status: Any, as_json: bool) -> None:
    if as_json:
        _print_json(_traffic_dict(status))
        return
    if not status.has_policy:
        console.print(f"model {status.model}: no traffic policy; requests go to the default version "
                      f"{status.default_version or '(none servable)'}")
    else:
        table = make_table(title=f"traffic of {status.model} (revision {status.revision}, sticky {'on' if status.sticky else 'off'})")
        for column in ("version", "weight", "share %", "role"):
            table.add_column(column)
        canary = status.canary if status.HasField("canary") else None
        for w in status.weights:
            role = ""
            if canary is not None and canary.state in ("progressing", "paused"):
                role = "canary" if w.version == canary.canary else "stable" if w.version == canary.stable else ""
            table.add_row(w.version, str(w.weight), f"{w.percent:.2f}", role)
        if status.HasField("shadow"):
            table.add_row(status.shadow.version, "-", f"{status.shadow.percent:.2f} (mirrored)", "shadow")
        console.print(table)
        if canary is not None:
            console.print(
                f"canary {canary.canary} vs stable {canary.stable}: [bold]{canary.state}[/] at step "
                f"{canary.step_index + 1}/{len(canary.steps)} ({canary.percent}%), steps {list(canary.steps)}, "
                f"interval {canary.interval_s:g}s, failures {canary.failures}/{canary.failure_limit}"
                + (f"; {canary.reason}" if canary.reason else ""), highlight=False)
    if status.agreements:
        table = make_table(title="shadow agreement")
        for column in ("primary", "shadow", "compared", "agreement", "max |diff|", "mean |diff|"):
            table.add_column(column)
        for a in status.agreements:
            table.add_row(
                a.primary, a.shadow, str(a.count),
                f"{a.agreement_rate:.4f}" if a.HasField("agreement_rate") else "-",
                f"{a.max_abs_diff:.4g}" if a.HasField("max_abs_diff") else "-",
                f"{a.mean_abs_diff:.4g}" if a.HasField("mean_abs_diff") else "-",
            )
        console.print(table)
    for version, drift in sorted(status.drift.items()):
        console.print(f"drift status of version {version}: {drift}")


@traffic_app.command("show")
def traffic_show(
    model: ModelArg, server: ServerOpt = DEFAULT_SERVER, token: TokenOpt = "", ca_file: CaOpt = None, as_json: JsonOpt = False,
) -> None:
    """The live policy, canary state and shadow agreement of a model."""
    _print_traffic(call(server, token, ca_file, "GetTraffic", pb.GetTrafficRequest(model=model)), as_json)


@traffic_app.command("set")
def traffic_set(
    model: ModelArg,
    weights: Annotated[list[str], typer.Argument(help="VERSION=WEIGHT pairs, e.g. 1=90 2=10.", metavar="VERSION=WEIGHT")],
    server: ServerOpt = DEFAULT_SERVER, token: TokenOpt = "", ca_file: CaOpt = None,
    sticky: Annotated[Optional[bool], typer.Option(
        "--sticky/--no-sticky", help=with_default("Route by the request's routing key, so a caller stays on one version.", "unchanged"))] = None,
    expect_revision: Annotated[Optional[int], typer.Option(
        "--expect-revision", help=with_default("Apply only if the policy is still at this revision.", "any"))] = None,
    as_json: JsonOpt = False,
) -> None:
    """Replace the traffic split (applied at once, without a restart)."""
    parsed: dict[str, int] = {}
    for item in weights:
        version, sep, weight = item.partition("=")
        if not sep or not version or not weight.strip().isdigit():
            raise typer.BadParameter(f"{item!r}: use VERSION=WEIGHT, e.g. 1=90")
        parsed[version.strip()] = int(weight)
    request = pb.SetWeightsRequest(model=model, weights=parsed)
    if sticky is not None:
        request.sticky = sticky
    if expect_revision is not None:
        request.expected_revision = expect_revision
    _print_traffic(call(server, token, ca_file, "SetWeights", request), as_json)


@traffic_app.command("shadow")
def traffic_shadow(
    model: ModelArg, version: VersionArg,
    percent: Annotated[float, typer.Option("--percent", help="Share of requests mirrored, in percent; 0 removes the shadow.")],
    server: ServerOpt = DEFAULT_SERVER, token: TokenOpt = "", ca_file: CaOpt = None, as_json: JsonOpt = False,
) -> None:
    """Mirror a share of requests to a version (the caller only sees the primary)."""
    _print_traffic(call(server, token, ca_file, "SetShadow", pb.SetShadowRequest(model=model, version=version, percent=percent)), as_json)


@canary_app.command("start")
def canary_start(
    model: ModelArg, version: VersionArg,
    server: ServerOpt = DEFAULT_SERVER, token: TokenOpt = "", ca_file: CaOpt = None,
    steps: Annotated[str, typer.Option("--steps", help="Canary traffic percentages, step by step.")] = _CANARY_STEPS,
    interval: Annotated[str, typer.Option("--interval", help="Analysis interval per step, e.g. 60s, 5m.")] = _CANARY_INTERVAL,
    stable: Annotated[Optional[str], typer.Option("--stable", help=with_default("Stable version.", "the only live one"))] = None,
    failure_limit: Annotated[Optional[int], typer.Option(
        "--failure-limit", help=with_default("Failed analyses before the automatic rollback.", str(_CANARY.failure_limit)))] = None,
    max_error_rate: Annotated[Optional[float], typer.Option(
        "--max-error-rate", help=with_default("Highest canary error rate (0-1) an analysis passes.", _default("max_error_rate")))] = None,
    max_error_ratio: Annotated[Optional[float], typer.Option(
        "--max-error-ratio", help=with_default("Highest canary / stable error-rate ratio.", _default("max_error_ratio")))] = None,
    max_p99_ratio: Annotated[Optional[float], typer.Option(
        "--max-p99-ratio", help=with_default("Highest canary / stable p99 latency ratio.", _default("max_p99_ratio")))] = None,
    max_p99_ms: Annotated[Optional[float], typer.Option(
        "--max-p99-ms", help=with_default("Highest canary p99 latency in milliseconds.", _default("max_p99_ms")))] = None,
    max_disagreement: Annotated[Optional[float], typer.Option(
        "--max-disagreement", help=with_default("Highest share (0-1) of mirrored requests where the versions' top class differs.", _default("max_disagreement")))] = None,
    min_requests: Annotated[Optional[int], typer.Option(
        "--min-requests", help=with_default("Fewest canary requests an analysis needs; fewer is inconclusive (the canary pauses).", _default("min_requests")))] = None,
    fail_on_drift: Annotated[Optional[bool], typer.Option(
        "--fail-on-drift/--ignore-drift", help=with_default("Whether a DRIFT status of the canary fails the analysis.", "fail-on-drift" if _GUARDRAILS.fail_on_drift else "ignore-drift"))] = None,
    disable: Annotated[Optional[list[str]], typer.Option(
        "--disable", help=with_default("Switch a guardrail off, e.g. --disable max_p99_ratio (repeatable).", "none"))] = None,
    as_json: JsonOpt = False,
) -> None:
    """Start a progressive canary; guardrail failures roll it back automatically."""
    try:
        step_list = [int(s) for s in steps.split(",") if s.strip()]
    except ValueError:
        raise typer.BadParameter(f"--steps {steps!r}: use comma-separated integers, e.g. 5,25,50,100") from None
    guardrails = pb.Guardrails(disable=disable or [])
    for name, value in (("max_error_rate", max_error_rate), ("max_error_ratio", max_error_ratio),
                        ("max_p99_ratio", max_p99_ratio), ("max_p99_ms", max_p99_ms),
                        ("max_disagreement", max_disagreement), ("min_requests", min_requests),
                        ("fail_on_drift", fail_on_drift)):
        if value is not None:
            setattr(guardrails, name, value)
    request = pb.StartCanaryRequest(
        model=model, version=version, stable=stable or "", steps=step_list, interval_s=parse_duration(interval),
        failure_limit=failure_limit or 0, guardrails=guardrails,
    )
    _print_traffic(call(server, token, ca_file, "StartCanary", request), as_json)


def _canary_command(method: str, help_text: str) -> Callable[..., None]:
    def command(
        model: ModelArg, server: ServerOpt = DEFAULT_SERVER, token: TokenOpt = "", ca_file: CaOpt = None,
        reason: Annotated[str, typer.Option("--reason", help=with_default("Why (kept in the audit trail).", "none"))] = "",
        as_json: JsonOpt = False,
    ) -> None:
        _print_traffic(call(server, token, ca_file, method, pb.CanaryCommand(model=model, reason=reason)), as_json)

    command.__doc__ = help_text
    return command


canary_app.command("promote")(_canary_command("PromoteCanary", "Give the canary all traffic now."))
canary_app.command("abort")(_canary_command("AbortCanary", "Send all traffic back to stable now."))
canary_app.command("pause")(_canary_command("PauseCanary", "Hold the current step."))
canary_app.command("resume")(_canary_command("ResumeCanary", "Continue a paused canary."))


# ---------------------------------------------------------------------- audit


@contextmanager
def _local_trail(store: str) -> Iterator[Any]:
    from lockgate.control.audit import AuditTrail
    from lockgate.errors import LockgateError
    from lockgate.control.sqlite_store import resolve_db_path
    from lockgate.control.store import open_store

    if not store.startswith(("postgres://", "postgresql://")) and not resolve_db_path(store).exists():
        fail(f"no control-plane store at {store}")
    try:
        opened = open_store(store)
    except LockgateError as exc:
        fail(f"{exc.code}: {exc}")
    try:
        yield AuditTrail(opened)
    except LockgateError as exc:
        fail(f"{exc.code}: {exc}")
    finally:
        opened.close()


@audit_app.command("verify")
def audit_verify(
    server: ServerOpt = DEFAULT_SERVER, token: TokenOpt = "", ca_file: CaOpt = None, store: StoreOpt = None,
    anchor: Annotated[Optional[str], typer.Option(
        "--anchor", help=with_default("SEQ:HASH recorded earlier (detects truncation).", "none"))] = None,
    as_json: JsonOpt = False,
) -> None:
    """Check the whole hash chain; exit 1 naming the first bad entry."""
    anchor_seq, anchor_hash = 0, ""
    if anchor:
        seq_text, _, anchor_hash = anchor.partition(":")
        if not seq_text.isdigit() or not anchor_hash:
            raise typer.BadParameter("--anchor must look like SEQ:HASH")
        anchor_seq = int(seq_text)
    if store is not None:
        from lockgate.control.audit import AuditAnchor

        with _local_trail(store) as trail:
            r = trail.verify(AuditAnchor(anchor_seq, anchor_hash) if anchor_seq else None)
        result = {"ok": r.ok, "checked": r.checked, "first_bad_seq": r.first_bad_seq or 0, "reason": r.reason,
                  "head_seq": r.head_seq, "head_hash": r.head_hash}
    else:
        response = call(server, token, ca_file, "AuditVerify", pb.AuditVerifyRequest(anchor_seq=anchor_seq, anchor_hash=anchor_hash))
        result = {"ok": response.ok, "checked": response.checked, "first_bad_seq": response.first_bad_seq,
                  "reason": response.reason, "head_seq": response.head_seq, "head_hash": response.head_hash}
    if as_json:
        _print_json(result)
    elif result["ok"]:
        console.print(f"[green]audit trail intact[/]: {result['checked']} entries, head seq {result['head_seq']} "
                      f"hash {result['head_hash']}", highlight=False)
    else:
        err_console.print(f"[bold red]audit trail BROKEN[/] at entry seq {result['first_bad_seq']}: {result['reason']} "
                          f"({result['checked']} entries verified before it)", highlight=False, soft_wrap=True)
    if not result["ok"]:
        raise typer.Exit(1)


def _entries_table(entries: list[dict[str, Any]]) -> Table:
    table = make_table(title="audit trail")
    for column in ("seq", "time", "actor", "action", "subject", "details"):
        table.add_column(column, overflow="fold")
    for e in entries:
        details = json.dumps(e["details"], sort_keys=True)
        table.add_row(str(e["seq"]), e["time"], e["actor"], e["action"], e["subject"],
                      details if len(details) <= 160 else details[:157] + "...")
    return table


@audit_app.command("log")
def audit_log(
    server: ServerOpt = DEFAULT_SERVER, token: TokenOpt = "", ca_file: CaOpt = None, store: StoreOpt = None,
    model: Annotated[Optional[str], typer.Option("--model", help=with_default("Only entries about this model.", "all"))] = None,
    since: Annotated[Optional[str], typer.Option(
        "--since", help=with_default("Only entries from this ISO-8601 time, e.g. 2025-01-31T12:00:00Z.", "the beginning"))] = None,
    limit: Annotated[int, typer.Option("--limit", help="At most this many entries (0: all).")] = 0,
    as_json: JsonOpt = False,
) -> None:
    """Show the audit trail, oldest first."""
    if store is not None:
        with _local_trail(store) as trail:
            try:
                entries = [e.to_dict() for e in trail.log(model=model, since=since, limit=limit or None)]
            except ValueError as exc:
                fail(f"INVALID_ARGUMENT: {exc}")
    else:
        response = call(server, token, ca_file, "AuditLog", pb.AuditLogRequest(model=model or "", since=since or "", limit=limit))
        entries = [
            {"seq": e.seq, "time": e.time, "actor": e.actor, "action": e.action, "subject": e.subject,
             "details": json.loads(e.details_json or "{}"), "prev_hash": e.prev_hash, "hash": e.hash}
            for e in response.entries
        ]
    if as_json:
        _print_json(entries)
    else:
        console.print(_entries_table(entries))


@audit_app.command("export")
def audit_export(
    model: Annotated[str, typer.Option("--model", help="The model whose evidence bundle to export.")],
    server: ServerOpt = DEFAULT_SERVER, token: TokenOpt = "", ca_file: CaOpt = None, store: StoreOpt = None,
    out: Annotated[Optional[Path], typer.Option("--out", help=with_default("Write the JSON bundle to this file.", "stdout"))] = None,
    sign: Annotated[Optional[Path], typer.Option(
        "--sign", help=with_default("EC private key: also write OUT.sig, a detached model-signing signature.", "unsigned"))] = None,
    as_json: JsonOpt = False,
) -> None:
    """Evidence bundle of one model: cards with provenance, reports, approvals, traffic, rollbacks, drift.

    The bundle is JSON either way; with --out, a summary line (or, with --json, a JSON
    summary) says what was written."""
    from lockgate.control.evidence import evidence_bundle, render, sign_evidence

    if sign is not None and out is None:
        fail("--sign needs --out FILE: the detached signature is written beside it as FILE.sig")
    if store is not None:
        with _local_trail(store) as trail:
            text = render(evidence_bundle(trail, model))
    else:
        text = call(server, token, ca_file, "AuditExport", pb.AuditExportRequest(model=model)).bundle_json
    text = text if text.endswith("\n") else text + "\n"
    if out is None:
        sys.stdout.write(text)
        return
    out.write_text(text, encoding="utf-8")
    signature: Path | None = None
    if sign is not None:
        from lockgate.errors import LockgateError

        try:
            signature = sign_evidence(out, sign)
        except (LockgateError, OSError) as exc:
            fail(f"{getattr(exc, 'code', 'INVALID_ARGUMENT')}: {getattr(exc, 'message', exc)}")
    bundle = json.loads(text)
    summary = {**_export_summary(model, out, bundle), "signature": str(signature) if signature else None}
    Output(as_json).message(summary, f"evidence bundle for {model} written to {out}: {_export_counts(bundle)}"
                            + (f"; detached signature written to {signature}" if signature else ""))


@audit_app.command("verify-export")
def audit_verify_export(
    file: Annotated[Path, typer.Argument(help="The exported evidence bundle (JSON).", show_default=False)],
    key: Annotated[Path, typer.Option("--key", help="The signer's public key (PEM).")],
    signature: Annotated[Optional[Path], typer.Option("--signature", help=with_default("Detached signature.", "FILE.sig"))] = None,
    as_json: JsonOpt = False,
) -> None:
    """Check an exported evidence bundle offline against its detached signature; exit 1 if it fails."""
    from lockgate.control.evidence import verify_evidence
    from lockgate.errors import LockgateError

    if not file.is_file():
        fail(f"NOT_FOUND: no evidence bundle at {file}")
    try:
        check = verify_evidence(file, key, signature)
    except LockgateError as exc:
        fail(f"{exc.code}: {exc.message}")
    result = {"ok": check.ok, "signature_ok": check.signature_ok, "problems": check.problems,
              "model": check.model, "audit_entries": check.entries}
    if as_json:
        _print_json(result)
    elif check.ok:
        console.print(f"[green]evidence intact[/]: {file} is signed by {key} (model {check.model}, "
                      f"{check.entries} audit entries)", highlight=False)
    else:
        err_console.print(f"[bold red]evidence NOT verified[/]: " + "; ".join(check.problems), highlight=False, soft_wrap=True)
    if not check.ok:
        raise typer.Exit(1)


# ---------------------------------------------------------------------- tokens
@tokens_app.command("create")
def tokens_create(
    name: Annotated[str, typer.Argument(help="Who the token is for: the actor name in the audit trail.", show_default=False)],
    role: Annotated[str, typer.Option("--role", help="Role: viewer, operator, approver, analyst or admin.")],
    file: Annotated[Optional[Path], typer.Option(
        "--file", help=with_default("Also add the hashed entry to this tokens file (YAML).", "print it only"))] = None,
    as_json: JsonOpt = False,
) -> None:
    """Generate a token: printed once; only its SHA-256 goes into the tokens file."""
    from lockgate.control.auth import generate_token, tokens_file_entry
    from lockgate.errors import InvalidArgument

    issued = generate_token()
    try:
        entry = tokens_file_entry(name, role, issued)
    except InvalidArgument as exc:
        fail(f"INVALID_ARGUMENT: {exc}")
    if file is not None:
        existing: dict[str, Any] = {}
        if file.exists():
            loaded = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
            if not isinstance(loaded, dict):
                fail(f"{file} is not a tokens mapping")
            existing = loaded.get("tokens", loaded) if isinstance(loaded.get("tokens", loaded), dict) else {}
        if name in existing:
            fail(f"{file} already has a token named {name!r}")
        existing.update(entry)
        file.write_text(yaml.safe_dump({"tokens": existing}, sort_keys=True), encoding="utf-8")
    if as_json:
        print_json({"name": name, "role": entry[name]["role"], "token": issued.token, "token_sha256": issued.sha256,
                    "file": str(file) if file is not None else None})
        return
    sys.stdout.write(f"token: {issued.token}\n")
    sys.stdout.write("(shown once; store it now. The server keeps only its hash.)\n")
    sys.stdout.write(yaml.safe_dump({"tokens": entry}, sort_keys=True))


@tokens_app.command("whoami")
def tokens_whoami(server: ServerOpt = DEFAULT_SERVER, token: TokenOpt = "", ca_file: CaOpt = None,
                  as_json: JsonOpt = False) -> None:
    """Ask the server who the token belongs to and what it may do."""
    me = call(server, token, ca_file, "WhoAmI", pb.WhoAmIRequest())
    Output(as_json).message({"name": me.name, "role": me.role, "permissions": list(me.permissions)},
                            f"{me.name} (role {me.role}): {', '.join(me.permissions)}")


# ---------------------------------------------------------------------- trust
def _signer_dict(signer: Any) -> dict[str, Any]:
    return {"name": signer.name, "vendor": signer.vendor, "kind": signer.kind, "identity": signer.identity,
            "origin": signer.origin, "added_by": signer.added_by, "added_at": signer.added_at}


@trust_app.command("list")
def trust_list(server: ServerOpt = DEFAULT_SERVER, token: TokenOpt = "", ca_file: CaOpt = None, as_json: JsonOpt = False) -> None:
    """The trusted signers and the signature policy the server applies."""
    response = call(server, token, ca_file, "ListTrustedSigners", pb.ListTrustedSignersRequest())
    if as_json:
        _print_json({"require_signature": response.require_signature, "allowed_licenses": list(response.allowed_licenses),
                     "signers": [_signer_dict(s) for s in response.signers]})
        return
    table = make_table(title=f"trusted signers (require_signature: {response.require_signature}; allowed licences: "
                        f"{', '.join(response.allowed_licenses) or 'any SPDX'})")
    for column in ("name", "vendor", "kind", "identity", "origin", "added by", "added at"):
        table.add_column(column, overflow="fold")
    for s in response.signers:
        table.add_row(s.name, s.vendor, s.kind, s.identity, s.origin, s.added_by or "-", s.added_at or "-")
    console.print(table)


@trust_app.command("add")
def trust_add(
    name: Annotated[str, typer.Argument(help="The signer's name (how approvals and the audit trail refer to it).", show_default=False)],
    vendor: Annotated[str, typer.Option("--vendor", help="The organisation this signer signs for.")],
    server: ServerOpt = DEFAULT_SERVER, token: TokenOpt = "", ca_file: CaOpt = None,
    key: Annotated[Optional[Path], typer.Option(
        "--key", help=with_default("The signer's EC public key (PEM); one of --key, --cert-chain, --sigstore-identity.", "none"))] = None,
    cert_chain: Annotated[Optional[list[Path]], typer.Option(
        "--cert-chain", help=with_default("CA certificate (PEM) signing certificates chain to (repeatable).", "none"))] = None,
    sigstore_identity: Annotated[Optional[str], typer.Option(
        "--sigstore-identity", help=with_default("Sigstore keyless: the signer's identity.", "none"))] = None,
    sigstore_issuer: Annotated[Optional[str], typer.Option(
        "--sigstore-issuer", help=with_default("Sigstore keyless: its OIDC issuer.", "none"))] = None,
    reason: Annotated[str, typer.Option("--reason", help=with_default("Why this signer is trusted (audited).", "none"))] = "",
    as_json: JsonOpt = False,
) -> None:
    """Trust a signer (admin); persisted and audited before it counts."""
    try:
        pem = key.read_text(encoding="ascii") if key is not None else ""
        chain = [p.read_text(encoding="ascii") for p in cert_chain or []]
    except (OSError, UnicodeDecodeError) as exc:
        fail(f"cannot read {getattr(exc, 'filename', '') or 'the key'}: {exc}")
    signer = call(server, token, ca_file, "AddTrustedSigner", pb.AddTrustedSignerRequest(
        name=name, vendor=vendor, public_key_pem=pem, certificate_chain_pem=chain,
        sigstore_identity=sigstore_identity or "", sigstore_issuer=sigstore_issuer or "", reason=reason))
    if as_json:
        _print_json(_signer_dict(signer))
    else:
        console.print(f"trusted {signer.name} ({signer.vendor}): {signer.identity}", highlight=False, soft_wrap=True)


@trust_app.command("remove")
def trust_remove(
    name: Annotated[str, typer.Argument(help="The signer's name.", show_default=False)],
    server: ServerOpt = DEFAULT_SERVER, token: TokenOpt = "", ca_file: CaOpt = None,
    reason: Annotated[str, typer.Option("--reason", help=with_default("Why (audited).", "none"))] = "",
    as_json: JsonOpt = False,
) -> None:
    """Stop trusting a signer (admin): versions it signed are refused from their next load or approval."""
    signer = call(server, token, ca_file, "RemoveTrustedSigner", pb.RemoveTrustedSignerRequest(name=name, reason=reason))
    Output(as_json).message(_signer_dict(signer),
                            f"no longer trusted: {signer.name} ({signer.vendor}), {signer.identity}")
