"""Configuration: server settings and per-model ``config.yaml``, as pydantic models.

Server settings come from (lowest to highest precedence) defaults, a YAML file given with
``--config``, ``LOCKGATE_*`` environment variables, and CLI flags. Model settings come from
``REPO/<model>/config.yaml``; every field is optional because the ONNX graph already tells us
the signature.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from lockgate.telemetry.config import TelemetrySettings

# A batch of 64 RGB 224x224 FP32 images is 64*3*224*224*4 = 38.5 MB; 64 MiB leaves headroom.
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TLSSettings(_Strict):
    """Server-side TLS for both the inference and admin APIs (same port)."""

    cert_file: Path
    key_file: Path
    client_ca_file: Path | None = Field(None, description="require and verify client certificates (mTLS)")


class ServerSettings(_Strict):
    model_repository: Path = Path("models")
    host: str = "0.0.0.0"
    grpc_port: int = 8001
    metrics_port: int = 8002
    workers: int = Field(1, ge=1)
    state_dir: Path = Path(".lockgate")
    max_receive_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    max_send_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    drain_timeout_s: float = Field(30.0, ge=0, description="SIGTERM waits this long for in-flight requests")
    tls: TLSSettings | None = None
    log_level: str = "INFO"
    telemetry: TelemetrySettings = Field(default_factory=TelemetrySettings)
    store: str | None = Field(None, description="control-plane store: a postgresql:// URL, or SQLite (default <state_dir>/lockgate.db)")
    require_approval: bool = Field(True, description="only approved versions take live traffic; false is for development")
    tokens_file: Path | None = Field(None, description="admin API tokens (YAML/JSON, hashed); also LOCKGATE_TOKENS")
    canary_tick_s: float = Field(1.0, gt=0, description="how often canary analyses are due-checked")
    replica_id: str | None = Field(None, description="this replica's name in the shared store [hostname-pid]")
    spool_dir: Path | None = Field(None, description="where audit entries/snapshots wait while PostgreSQL is down [<state_dir>/spool]")
    fleet_window_s: float = Field(60.0, gt=0, description="drift window length when replicas share a PostgreSQL store")
    leader_lease_s: float = Field(2.0, gt=0, description="leader election poll period (failover within one lease)")
    audit_key_file: Path | None = Field(
        None, description="HMAC key that authenticates the audit trail; required, outside state_dir "
        "(create with `lockgate audit keygen --out FILE`)")
    audit_previous_key_files: list[Path] = Field(
        default_factory=list, description="rotated-out audit keys, still accepted when verifying the entries they wrote")
    audit_checkpoint_file: Path | None = Field(
        None, description="append-only file of signed chain-head checkpoints, outside state_dir "
        "[audit-checkpoints.jsonl beside audit_key_file]")
    audit_checkpoint_every: int = Field(100, ge=1, description="checkpoint at least every N entries this process appends")
    audit_checkpoint_interval_s: float = Field(10.0, gt=0, description="and every T seconds while the head moved")
    audit_verify_interval_s: float = Field(300.0, gt=0, description="re-verify the whole trail this often (lockgate_audit_verify_ok)")

    def replica(self) -> str:
        return self.replica_id or f"{socket.gethostname()}-{os.getpid()}"

    def is_shared_store(self) -> bool:
        return (self.store or "").startswith(("postgresql://", "postgres://"))

    def store_location(self) -> str:
        return self.store or str(self.state_dir / "lockgate.db")

    def checkpoint_file(self) -> Path | None:
        """Where signed audit checkpoints go (None without a key file)."""
        if self.audit_checkpoint_file is not None:
            return self.audit_checkpoint_file
        if self.audit_key_file is None:
            return None
        return self.audit_key_file.parent / "audit-checkpoints.jsonl"

    @classmethod
    def load(cls, config_file: Path | None = None, **overrides: Any) -> "ServerSettings":
        data: dict[str, Any] = {}
        if config_file is not None:
            loaded = yaml.safe_load(Path(config_file).read_text()) or {}
            data.update(loaded.get("server", loaded))
        for field in cls.model_fields:
            env = os.environ.get(f"LOCKGATE_{field.upper()}")
            if env is not None and field not in ("tls", "telemetry"):
                data[field] = env.split(os.pathsep) if field == "audit_previous_key_files" else env
        data.update({k: v for k, v in overrides.items() if v is not None})
        return cls.model_validate(data)


class DynamicBatchingConfig(_Strict):
    max_queue_delay_us: int = Field(0, ge=0, description="wait up to this long to fill a batch")
    preferred_batch_sizes: list[int] = Field(default_factory=list)
    max_queue_size: int = Field(1024, ge=1, description="requests waiting beyond this get RESOURCE_EXHAUSTED")


class VersionPolicy(_Strict):
    """Which versions found on disk are loaded: all, the latest N, or a specific list."""

    policy: Literal["all", "latest", "specific"] = "latest"
    latest: int = Field(1, ge=1)
    versions: list[int] = Field(default_factory=list)

    @model_validator(mode="before")
    @classmethod
    def _short_forms(cls, value: Any) -> Any:
        # Accept Triton-like short forms: {latest: 2}, {all: {}}, {specific: [1, 3]}, "all".
        if value == "all":
            return {"policy": "all"}
        if isinstance(value, dict) and "policy" not in value:
            if "all" in value:
                return {"policy": "all"}
            if "specific" in value:
                spec = value["specific"]
                versions = spec.get("versions", spec) if isinstance(spec, dict) else spec
                return {"policy": "specific", "versions": versions}
            if "latest" in value:
                latest = value["latest"]
                n = latest.get("num_versions", 1) if isinstance(latest, dict) else latest
                return {"policy": "latest", "latest": n}
        return value

    def select(self, available: list[int]) -> list[int]:
        ordered = sorted(available)
        if self.policy == "all":
            return ordered
        if self.policy == "specific":
            return [v for v in ordered if v in set(self.versions)]
        return ordered[-self.latest :]


class RuntimeConfig(_Strict):
    """ONNX Runtime session settings for one model."""

    providers: list[Literal["cuda", "cpu"]] = Field(default_factory=lambda: ["cuda", "cpu"])
    device_id: int = 0
    intra_op_threads: int = Field(1, ge=0, description="0 lets ONNX Runtime decide")
    inter_op_threads: int = Field(1, ge=0)
    graph_optimization: Literal["disable", "basic", "extended", "all"] = "all"
    io_binding: bool = Field(True, description="bind inputs/outputs explicitly on CUDA; outputs stay on the device until one copy back")
    pinned_memory: bool = Field(True, description="with io_binding, stage inputs through page-locked host buffers (Triton's input_pinned_memory)")
    instances: int = Field(1, ge=1, description="concurrent batch executions per version (Triton instance_group count)")
    execution: Literal["auto", "inline", "thread"] = Field(
        "auto",
        description="inline runs ORT on the event loop (cheapest for tiny models); thread hands it to a "
        "worker thread; auto picks inline when a warm-up run takes under 300 µs",
    )
    warmup_runs: int = Field(3, ge=0)


class ModelConfigFile(_Strict):
    """Contents of ``REPO/<model>/config.yaml``."""

    max_batch_size: int | None = Field(None, ge=0, description="None: 64 if the graph has a free batch dim, else 0")
    dynamic_batching: DynamicBatchingConfig | None = Field(default_factory=DynamicBatchingConfig)
    version_policy: VersionPolicy = Field(default_factory=VersionPolicy)
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)
    default_version: int | None = Field(None, description="served when a request names no version; default: highest")
    # Owned by the governance package; validated there to keep this module free of its details.
    governance: dict[str, Any] | None = None
    # Free-form labels shown in ModelConfig.parameters.
    parameters: dict[str, str] = Field(default_factory=dict)

    @field_validator("dynamic_batching", mode="before")
    @classmethod
    def _disabled(cls, value: Any) -> Any:
        return None if value is False else value

    @classmethod
    def load(cls, path: Path) -> "ModelConfigFile":
        if not path.exists():
            return cls()
        return cls.model_validate(yaml.safe_load(path.read_text()) or {})
