"""The ``lockgate`` command line: serve, demo, and the operator sub-commands."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from lockgate.config import ServerSettings

app = typer.Typer(help="lockgate: Open Inference Protocol gateway for ONNX models with inline governance.",
                  no_args_is_help=True, pretty_exceptions_enable=False)


@app.command()
def serve(
    model_repository: Path = typer.Option(..., "--model-repository", help="REPO/<model>/<version>/model.onnx"),
    grpc_port: Optional[int] = typer.Option(None, "--grpc-port", help="inference + admin gRPC port [8001]"),
    metrics_port: Optional[int] = typer.Option(None, "--metrics-port", help="Prometheus port [8002]"),
    workers: Optional[int] = typer.Option(None, "--workers", help="processes sharing the port (SO_REUSEPORT) [1]"),
    state_dir: Optional[Path] = typer.Option(None, "--state-dir", help="control-plane state [.lockgate]"),
    config: Optional[Path] = typer.Option(None, "--config", help="server YAML config file"),
    host: Optional[str] = typer.Option(None, "--host", help="bind address [0.0.0.0]"),
    store: Optional[str] = typer.Option(None, "--store", help="postgresql://... or SQLite path [<state-dir>/lockgate.db]"),
    tokens_file: Optional[Path] = typer.Option(None, "--tokens-file", help="admin API tokens file (hashed)"),
    allow_unapproved: bool = typer.Option(False, "--allow-unapproved", help="development: serve versions without approval"),
    audit_key_file: Optional[Path] = typer.Option(
        None, "--audit-key-file", help="HMAC key of the audit trail, outside the state dir (lockgate audit keygen)"),
    audit_checkpoint_file: Optional[Path] = typer.Option(
        None, "--audit-checkpoint-file", help="signed chain-head checkpoints, outside the state dir [beside the key]"),
) -> None:
    """Serve the models in a repository."""
    from lockgate.transport.server import run

    settings = ServerSettings.load(
        config, model_repository=model_repository, grpc_port=grpc_port, metrics_port=metrics_port,
        workers=workers, state_dir=state_dir, host=host, store=store, tokens_file=tokens_file,
        require_approval=False if allow_unapproved else None,
        audit_key_file=audit_key_file, audit_checkpoint_file=audit_checkpoint_file,
    )
    run(settings)


@app.command()
def demo(
    dir: Path = typer.Option(Path("demo-repo"), "--dir", help="where to write the demo model repository"),
    grpc_port: int = typer.Option(8001, "--grpc-port"),
    metrics_port: int = typer.Option(8002, "--metrics-port"),
    build_only: bool = typer.Option(False, "--build-only", help="write the models and exit"),
) -> None:
    """Build the demo models in code (no downloads) and serve them."""
    from lockgate.demo import approve_demo_versions, build_demo_repository, demo_audit_key
    from lockgate.transport.server import run

    root = build_demo_repository(dir)
    key_file = demo_audit_key(root)
    settings = ServerSettings.load(None, model_repository=root, grpc_port=grpc_port, metrics_port=metrics_port,
                                   state_dir=root / ".lockgate", audit_key_file=key_file)
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    approved = approve_demo_versions(root, settings.store_location(), key_file)
    typer.echo(f"demo repository written to {root.resolve()}; approved versions {', '.join(approved)} of 'credit'")
    if build_only:
        return
    run(settings)


from lockgate.operator_cli import audit_app, models_app, status_command, tokens_app, traffic_app  # noqa: E402

app.command("status")(status_command)
app.add_typer(models_app, name="models")
app.add_typer(traffic_app, name="traffic")
app.add_typer(audit_app, name="audit")
app.add_typer(tokens_app, name="tokens")

from lockgate.governance.cli import drift_app, profile_app  # noqa: E402

app.add_typer(profile_app, name="profile", help="reference profiles for drift detection")
app.add_typer(drift_app, name="drift", help="drift reports")

if __name__ == "__main__":
    app()
