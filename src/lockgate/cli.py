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
) -> None:
    """Serve the models in a repository."""
    from pydantic import ValidationError

    from lockgate.errors import ConfigError
    from lockgate.transport.server import run

    try:
        settings = ServerSettings.load(
            config, model_repository=model_repository, grpc_port=grpc_port, metrics_port=metrics_port,
            workers=workers, state_dir=state_dir, host=host, store=store, tokens_file=tokens_file,
            require_approval=False if allow_unapproved else None,
        )
        run(settings)
    except (ConfigError, ValidationError) as exc:
        typer.echo(f"lockgate: configuration error: {getattr(exc, 'message', exc)}", err=True)
        raise typer.Exit(2) from None


@app.command()
def demo(
    dir: Path = typer.Option(Path("demo-repo"), "--dir", help="where to write the demo model repository"),
    grpc_port: int = typer.Option(8001, "--grpc-port"),
    metrics_port: int = typer.Option(8002, "--metrics-port"),
    build_only: bool = typer.Option(False, "--build-only", help="write the models and exit"),
) -> None:
    """Build the demo models in code (no downloads) and serve them."""
    from lockgate.demo import approve_demo_versions, build_demo_repository
    from lockgate.transport.server import run

    root = build_demo_repository(dir)
    settings = ServerSettings.load(None, model_repository=root, grpc_port=grpc_port, metrics_port=metrics_port,
                                   state_dir=root / ".lockgate")
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    approved = approve_demo_versions(root, settings.store_location())
    typer.echo(f"demo repository written to {root.resolve()}; approved versions {', '.join(approved)} of 'credit'")
    if build_only:
        return
    run(settings)


from lockgate.operator_cli import audit_app, models_app, tokens_app, traffic_app, trust_app  # noqa: E402

app.add_typer(models_app, name="models")
app.add_typer(traffic_app, name="traffic")
app.add_typer(audit_app, name="audit")
app.add_typer(trust_app, name="trust")
app.add_typer(tokens_app, name="tokens")

from lockgate.governance.cli import drift_app, profile_app  # noqa: E402

app.add_typer(profile_app, name="profile", help="reference profiles for drift detection")
app.add_typer(drift_app, name="drift", help="drift reports")

if __name__ == "__main__":
    app()
