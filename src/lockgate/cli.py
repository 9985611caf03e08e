"""The ``lockgate`` command line: serve, demo, and the operator sub-commands.

``serve`` and ``demo`` take the same server options (declared once below) and build their
settings the same way, so ``LOCKGATE_*`` variables, ``--config`` and flags mean the same in
both. ``main()`` is the console script: it applies the help conventions of
``lockgate.cli_common`` to the whole command tree before running it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from lockgate.cli_common import JsonOpt, Output, conventional, with_default
from lockgate.config import DEMO_REPOSITORY, ServerSettings

app = typer.Typer(help="lockgate: Open Inference Protocol gateway for ONNX models with inline governance.",
                  no_args_is_help=True, pretty_exceptions_enable=False)

# -------------------------------------------------- server options shared by serve and demo
GrpcPortOpt = Annotated[Optional[int], typer.Option(
    "--grpc-port", help=with_default("Inference, health, reflection and admin gRPC port.", "8001; env LOCKGATE_GRPC_PORT"))]
MetricsPortOpt = Annotated[Optional[int], typer.Option(
    "--metrics-port", help=with_default("Prometheus /metrics port (worker i serves on port + i).", "8002; env LOCKGATE_METRICS_PORT"))]
HttpPortOpt = Annotated[Optional[int], typer.Option(
    "--http-port", help=with_default("KServe v2 REST, admin API over REST and the console.", "8000; env LOCKGATE_HTTP_PORT"))]
NoHttpOpt = Annotated[bool, typer.Option("--no-http", help="Serve gRPC only (no REST port, no console).")]
WorkersOpt = Annotated[Optional[int], typer.Option(
    "--workers", help=with_default("Processes sharing the gRPC port (SO_REUSEPORT).", "1"))]
StateDirOpt = Annotated[Optional[Path], typer.Option(
    "--state-dir", help=with_default("Control-plane state, drift windows, payload log.", "<model repository>/.lockgate"))]
ConfigOpt = Annotated[Optional[Path], typer.Option(
    "--config", help=with_default("Server YAML config file (flags and LOCKGATE_* variables win over it).", "none"))]
HostOpt = Annotated[Optional[str], typer.Option("--host", help=with_default("Bind address.", "0.0.0.0"))]
StoreOpt = Annotated[Optional[str], typer.Option(
    "--store", help=with_default("Control-plane store: postgresql://... or a SQLite path.", "<state dir>/lockgate.db"))]
TokensFileOpt = Annotated[Optional[Path], typer.Option(
    "--tokens-file", help=with_default("Admin API tokens (YAML, SHA-256 hashes), plus LOCKGATE_TOKENS.",
                                       "<state dir>/tokens.yaml if it exists"))]
AllowUnapprovedOpt = Annotated[bool, typer.Option(
    "--allow-unapproved", help="Development only: every loaded version may take live traffic without approval.")]
LogJsonOpt = Annotated[bool, typer.Option("--json", help="Write log lines as JSON objects (one per line) instead of text.")]
AuditKeyOpt = Annotated[Optional[Path], typer.Option(
    "--audit-key-file", help=with_default("HMAC key of the audit trail, outside the state dir (`lockgate audit keygen`).",
                                          "<model repository>/.audit/audit.key if it exists; env LOCKGATE_AUDIT_KEY_FILE"))]
AuditCheckpointOpt = Annotated[Optional[Path], typer.Option(
    "--audit-checkpoint-file", help=with_default("Signed checkpoints of the audit chain's head, outside the state dir.",
                                                 "audit-checkpoints.jsonl beside the key"))]


@contextmanager
def configuration_errors() -> Iterator[None]:
    """A configuration that cannot be honoured: one line on stderr and exit status 2."""
    from pydantic import ValidationError

    from lockgate.errors import ConfigError

    try:
        yield
    except (ConfigError, ValidationError) as exc:
        typer.echo(f"lockgate: configuration error: {getattr(exc, 'message', exc)}", err=True)
        raise typer.Exit(2) from None


def server_settings(config: Path | None, **flags: Any) -> ServerSettings:
    """Defaults < ``--config`` < ``LOCKGATE_*`` < flags: the one way both commands build settings."""
    if flags.pop("allow_unapproved", False):
        flags["require_approval"] = False
    if flags.pop("no_http", False):
        flags["http_enabled"] = False
    if flags.pop("log_json", False):
        flags["log_format"] = "json"
    return ServerSettings.load(config, **flags)


@app.command()
def serve(
    model_repository: Annotated[Path, typer.Option("--model-repository", help="Repository root: REPO/<model>/<version>/model.onnx.")],
    grpc_port: GrpcPortOpt = None, metrics_port: MetricsPortOpt = None, http_port: HttpPortOpt = None,
    no_http: NoHttpOpt = False, workers: WorkersOpt = None,
    state_dir: StateDirOpt = None, config: ConfigOpt = None, host: HostOpt = None, store: StoreOpt = None,
    tokens_file: TokensFileOpt = None, allow_unapproved: AllowUnapprovedOpt = False, log_json: LogJsonOpt = False,
    audit_key_file: AuditKeyOpt = None, audit_checkpoint_file: AuditCheckpointOpt = None,
) -> None:
    """Serve the models in a repository."""
    from lockgate.transport.server import run

    with configuration_errors():
        run(server_settings(
            config, model_repository=model_repository, grpc_port=grpc_port, metrics_port=metrics_port,
            http_port=http_port, no_http=no_http, workers=workers,
            state_dir=state_dir, host=host, store=store, tokens_file=tokens_file, allow_unapproved=allow_unapproved,
            log_json=log_json, audit_key_file=audit_key_file, audit_checkpoint_file=audit_checkpoint_file,
        ))


@app.command()
def demo(
    dir: Annotated[Path, typer.Option("--dir", help="Where to write the demo model repository.")] = DEMO_REPOSITORY,
    build_only: Annotated[bool, typer.Option("--build-only", help="Write the models, tokens and approvals, then exit.")] = False,
    tokens_out: Annotated[Optional[Path], typer.Option(
        "--tokens-out", help=with_default("Where to write the demo people's tokens (shell exports).", "<dir>/demo-tokens.env"))] = None,
    grpc_port: GrpcPortOpt = None, metrics_port: MetricsPortOpt = None, http_port: HttpPortOpt = None,
    no_http: NoHttpOpt = False, workers: WorkersOpt = None,
    state_dir: StateDirOpt = None, config: ConfigOpt = None, host: HostOpt = None, store: StoreOpt = None,
    tokens_file: TokensFileOpt = None, allow_unapproved: AllowUnapprovedOpt = False, as_json: JsonOpt = False,
) -> None:
    """Train the demo models in code (no downloads), give four people tokens, and serve."""
    from lockgate.demo import prepare_demo
    from lockgate.transport.server import run

    with configuration_errors():
        settings = server_settings(
            config, model_repository=dir, grpc_port=grpc_port, metrics_port=metrics_port,
            http_port=http_port, no_http=no_http, workers=workers,
            state_dir=state_dir, host=host, store=store, tokens_file=tokens_file, allow_unapproved=allow_unapproved,
            log_json=as_json,
        )
        prepared = prepare_demo(settings, tokens_out)
        Output(as_json).emit(prepared.to_dict(), prepared.render)
        if not build_only:
            run(settings)


def _mount() -> None:
    from lockgate.governance.cli import drift_app, profile_app
    from lockgate.operator_cli import audit_app, models_app, status_command, tokens_app, traffic_app, trust_app

    app.command("status")(status_command)

    app.add_typer(models_app, name="models")
    app.add_typer(traffic_app, name="traffic")
    app.add_typer(audit_app, name="audit")
    app.add_typer(trust_app, name="trust")
    app.add_typer(tokens_app, name="tokens")
    app.add_typer(profile_app, name="profile")
    app.add_typer(drift_app, name="drift")
    from lockgate.outcomes.cli import feedback_app, outcomes_app

    app.add_typer(feedback_app, name="feedback")
    app.add_typer(outcomes_app, name="outcomes")


_mount()


def command() -> Any:
    """The whole command tree as click builds it, with lockgate's help conventions applied."""
    return conventional(typer.main.get_command(app))


def main() -> None:
    command()(prog_name="lockgate")


if __name__ == "__main__":
    main()
