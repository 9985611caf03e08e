"""Configuration: server settings and per-model ``config.yaml``, as pydantic models.

Server settings come from (lowest to highest precedence) defaults, a YAML file given with
``--config``, ``LOCKGATE_*`` environment variables, and CLI flags. The state directory
defaults to ``<model_repository>/.lockgate``, so every command that is told the repository
(``serve``, ``demo``, ``drift report``) finds the same approvals, drift windows and payloads.
Model settings come from ``REPO/<model>/config.yaml``; every field is optional because the
ONNX graph already tells us the signature.
"""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from lockgate.protocol import codec
from lockgate.telemetry.config import TelemetrySettings

# A batch of 64 RGB 224x224 FP32 images is 64*3*224*224*4 = 38.5 MB; 64 MiB leaves headroom.
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024


STATE_DIR_NAME = ".lockgate"
#: ``lockgate demo --dir`` default (what ``make demo`` writes); the offline commands (``drift report``,
#: ``profile build``) look there when no repository is named and the default one lacks the model.
DEMO_REPOSITORY = Path("demo-repo")
TOKENS_FILE_NAME = "tokens.yaml"
AUDIT_KEY_DIR = ".audit"  # <model_repository>/.audit/audit.key: the demo's audit key


def default_state_dir(model_repository: Path | str) -> Path:
    """Where state lives unless told otherwise: inside the repository it governs.

    A dot-directory, so repository discovery never takes it for a model. ``serve``, ``demo``
    and the offline commands all derive it from the repository, so they agree.
    """
    return Path(model_repository) / STATE_DIR_NAME


def redact_url(location: str) -> str:
    """``postgresql://user:secret@host/db`` -> ``postgresql://user:***@host/db`` (for logs)."""
    return re.sub(r"(://[^/:@]*:)[^@/]*@", r"\1***@", location)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TLSSettings(_Strict):
    """Server-side TLS for every serving port: gRPC (inference and admin) and HTTP (REST, console)."""

    cert_file: Path
    key_file: Path
    client_ca_file: Path | None = Field(None, description="require and verify client certificates (mTLS)")


class RequestLimits(_Strict):
    """Bounds on one request, whatever it declares: checked before anything is allocated.

    A shape declares how much a request would need; these bound it, and the codec also checks
    the declared size against the bytes actually received, so no request can make the server
    allocate more than a small multiple of what it sent.
    """

    max_dims: int = Field(codec.MAX_DIMS, ge=1, description="dimensions of one input's shape")
    max_elements: int = Field(codec.MAX_ELEMENTS, ge=1, description="elements over all inputs of one request")
    max_bytes_elements: int = Field(
        codec.MAX_BYTES_ELEMENTS, ge=1,
        description="BYTES elements over all inputs of one request (each becomes a Python string, ~60 bytes)",
    )
    max_output_bytes: int | None = Field(
        None, ge=1, description="encoded outputs of one response; default: max_send_message_bytes"
    )

    def for_codec(self, max_send_message_bytes: int) -> codec.Limits:
        return codec.Limits(
            max_dims=self.max_dims, max_elements=self.max_elements, max_bytes_elements=self.max_bytes_elements,
            max_output_bytes=self.max_output_bytes or max_send_message_bytes,
        )


class TrustedSignerSettings(_Strict):
    """One signer whose ``model.sig`` bundles lockgate accepts, and who they are.

    Exactly one kind of trust anchor: an elliptic-curve public key (P-256/384/521, PEM file or
    inline PEM), a certificate chain (the CA certificates a signing certificate must chain
    to), or a Sigstore keyless identity (OIDC identity + issuer; needs the Sigstore trust root,
    so it is configurable but nothing in the tests uses it).
    """

    name: str = Field(..., min_length=1, description="how the signer is shown on cards, in the audit trail and in `models show`")
    vendor: str = Field(..., min_length=1, description="the organisation the signer signs for")
    public_key: Path | None = Field(None, description="PEM public key file (key-signed bundles)")
    public_key_pem: str | None = Field(None, description="the same, inline")
    certificate_chain: list[Path] = Field(default_factory=list, description="CA certificates (certificate-signed bundles)")
    sigstore_identity: str | None = Field(None, description="Sigstore keyless: the signer's identity (e.g. an e-mail)")
    sigstore_issuer: str | None = Field(None, description="Sigstore keyless: the OIDC issuer of that identity")
    sigstore_trust_config: Path | None = Field(None, description="Sigstore keyless: a custom trust root (offline/private instance)")

    @model_validator(mode="after")
    def _one_anchor(self) -> "TrustedSignerSettings":
        kinds = [bool(self.public_key or self.public_key_pem), bool(self.certificate_chain),
                 bool(self.sigstore_identity or self.sigstore_issuer)]
        if sum(kinds) != 1 or (self.public_key and self.public_key_pem):
            raise ValueError(f"trusted signer {self.name!r}: give exactly one of public_key, public_key_pem, "
                             "certificate_chain, or sigstore_identity + sigstore_issuer")
        if kinds[2] and not (self.sigstore_identity and self.sigstore_issuer):
            raise ValueError(f"trusted signer {self.name!r}: Sigstore needs both sigstore_identity and sigstore_issuer")
        return self


class ProvenanceSettings(_Strict):
    """The trust policy for model artifacts (``provenance:`` in the server config)."""

    require_signature: Literal["never", "third_party", "always"] = Field(
        "never", description="which versions must carry a valid model.sig to load and be approved "
        "(third_party: those whose card says third_party: true)")
    trusted_signers: list[TrustedSignerSettings] = Field(default_factory=list)
    allowed_licenses: list[str] = Field(
        default_factory=list, description="SPDX ids (or expressions) a card's license must be one of; empty: any valid SPDX licence")
    assessment_max_age_days: int | None = Field(
        None, ge=1, description="a third-party vendor assessment older than this refuses approval")

    @property
    def enabled(self) -> bool:
        """True when the policy asks for anything that needs the model-signing library."""
        return self.require_signature != "never" or bool(self.trusted_signers)


class ServerSettings(_Strict):
    model_repository: Path = Path("models")
    host: str = "0.0.0.0"
    grpc_port: int = 8001
    metrics_port: int = 8002
    http_port: int = Field(8000, ge=0, description="KServe v2 REST, the admin API over REST and the console (0: any free port)")
    http_enabled: bool = Field(True, description="serve the HTTP port (needs the [http] extra)")
    console_session_key: str | None = Field(
        None, repr=False, min_length=16,
        description="signs console session cookies; default: random per start, shared by --workers siblings")
    workers: int = Field(1, ge=1)
    state_dir: Path | None = Field(None, description="control-plane state, drift windows, payload log [<model_repository>/.lockgate]")
    max_receive_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    max_send_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    drain_timeout_s: float = Field(30.0, ge=0, description="SIGTERM waits this long for in-flight requests")
    limits: RequestLimits = Field(default_factory=RequestLimits)
    tls: TLSSettings | None = None
    log_level: str = "INFO"
    log_format: Literal["text", "json"] = Field("text", description="json: one JSON object per log line (for log shippers)")
    telemetry: TelemetrySettings = Field(default_factory=TelemetrySettings)
    provenance: ProvenanceSettings = Field(default_factory=ProvenanceSettings)
    store: str | None = Field(None, description="control-plane store: a postgresql:// URL, or SQLite (default <state_dir>/lockgate.db)")
    require_approval: bool = Field(True, description="only approved versions take live traffic; false is for development")
    tokens_file: Path | None = Field(
        None, description="admin API tokens (YAML/JSON, hashed); also LOCKGATE_TOKENS [<state_dir>/tokens.yaml if it exists]"
    )
    canary_tick_s: float = Field(1.0, gt=0, description="how often canary analyses are due-checked")
    replica_id: str | None = Field(None, description="this replica's name in the shared store [hostname-pid]")
    spool_dir: Path | None = Field(None, description="where audit entries/snapshots wait while PostgreSQL is down [<state_dir>/spool]")
    fleet_window_s: float = Field(60.0, gt=0, description="drift window length when replicas share a PostgreSQL store")
    outcomes_refresh_s: float = Field(5.0, gt=0, description="how often the exported quality/fairness figures are recomputed")
    leader_lease_s: float = Field(2.0, gt=0, description="leader election poll period (failover within one lease)")
    audit_key_file: Path | None = Field(
        None, description="HMAC key that authenticates the audit trail, outside state_dir (create with "
        "`lockgate audit keygen --out FILE`) [<model_repository>/.audit/audit.key if it exists; else required]")
    audit_previous_key_files: list[Path] = Field(
        default_factory=list, description="rotated-out audit keys, still accepted when verifying the entries they wrote")
    audit_checkpoint_file: Path | None = Field(
        None, description="append-only file of signed chain-head checkpoints, outside state_dir "
        "[audit-checkpoints.jsonl beside audit_key_file]")
    audit_checkpoint_every: int = Field(100, ge=1, description="checkpoint at least every N entries this process appends")
    audit_checkpoint_interval_s: float = Field(10.0, gt=0, description="and every T seconds while the head moved")
    audit_verify_interval_s: float = Field(300.0, gt=0, description="re-verify the whole trail this often (lockgate_audit_verify_ok)")
    explain_workers: int = Field(1, ge=1, description="processes of the explain pool (per serving process)")
    explain_nice: int = Field(19, ge=0, le=19, description="scheduling priority of the explain pool (19: only CPU serving leaves)")
    explain_cpu_share: float = Field(0.25, gt=0, le=1, description="share of one core each explain worker may use")

    @model_validator(mode="after")
    def _state_beside_repository(self) -> "ServerSettings":
        if self.state_dir is None:
            self.state_dir = default_state_dir(self.model_repository)
        return self

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
        key = self.key_file()
        return key.parent / "audit-checkpoints.jsonl" if key is not None else None

    def key_file(self) -> Path | None:
        """The audit key in use: the configured one, else ``<model_repository>/.audit/audit.key``
        if it exists (where ``lockgate demo`` keeps its key); None refuses to serve."""
        if self.audit_key_file is not None:
            return self.audit_key_file
        candidate = Path(self.model_repository) / AUDIT_KEY_DIR / "audit.key"
        return candidate if candidate.is_file() else None

    def tokens_path(self) -> Path | None:
        """The tokens file in use: the configured one, else ``<state_dir>/tokens.yaml`` if present
        (where ``lockgate demo`` writes its people's hashed tokens)."""
        if self.tokens_file is not None:
            return self.tokens_file
        candidate = self.state_dir / TOKENS_FILE_NAME
        return candidate if candidate.is_file() else None

    def store_for_logs(self) -> str:
        """The store location with any password in a URL replaced by ``***``."""
        return redact_url(self.store_location())

    @classmethod
    def load(cls, config_file: Path | None = None, **overrides: Any) -> "ServerSettings":
        data: dict[str, Any] = {}
        if config_file is not None:
            loaded = yaml.safe_load(Path(config_file).read_text()) or {}
            data.update(loaded.get("server", loaded))
        for field in cls.model_fields:
            env = os.environ.get(f"LOCKGATE_{field.upper()}")
            if env is not None and field not in ("tls", "telemetry", "limits", "provenance"):
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


class TensorConfig(_Strict):
    """One declared input or output (Triton's ``input``/``output``), checked against the graph at load.

    ``dims`` follow Triton: without the batch dimension when ``max_batch_size > 0``; -1 is any
    size. A declared fixed size where the graph has a free one narrows what requests may send.
    """

    name: str
    datatype: str | None = Field(None, description="FP32, INT64, BYTES, ... (Triton's TYPE_FP32 is accepted)")
    dims: list[int] | None = None
    labels: list[str] | None = Field(None, description="class names of a classifier output, in index order")

    @field_validator("dims")
    @classmethod
    def _dims(cls, value: list[int] | None) -> list[int] | None:
        if value is not None and any(d < -1 or d == 0 for d in value):
            raise ValueError(f"dims must be positive sizes or -1 (any), got {value}")
        return value

    @field_validator("labels")
    @classmethod
    def _labels(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and (not value or len(set(value)) != len(value) or not all(v.strip() for v in value)):
            raise ValueError("labels must be distinct, non-empty class names")
        return value


class ModelConfigFile(_Strict):
    """A model's configuration: ``REPO/<model>/config.yaml`` and/or Triton's ``config.pbtxt``
    (``lockgate.serving.model_config`` reads both and refuses conflicts)."""

    max_batch_size: int | None = Field(None, ge=0, description="None: 64 if the graph has a free batch dim, else 0")
    dynamic_batching: DynamicBatchingConfig | None = Field(default_factory=DynamicBatchingConfig)
    version_policy: VersionPolicy = Field(default_factory=VersionPolicy)
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)
    default_version: int | None = Field(None, description="served when a request names no version; default: highest")
    inputs: list[TensorConfig] = Field(default_factory=list, description="declared inputs; none: the graph's, unchecked")
    outputs: list[TensorConfig] = Field(default_factory=list, description="declared outputs (and class labels)")
    # Owned by the governance package; validated there to keep this module free of its details.
    governance: dict[str, Any] | None = None
    # Owned by the outcomes package (prediction ledger, quality, fairness); validated there.
    outcomes: dict[str, Any] | None = None
    # Owned by lockgate.explain (the optional extra lockgate[explain]); validated there.
    explain: dict[str, Any] | None = None
    # Free-form labels shown in ModelConfig.parameters.
    parameters: dict[str, str] = Field(default_factory=dict)

    @field_validator("dynamic_batching", mode="before")
    @classmethod
    def _disabled(cls, value: Any) -> Any:
        return None if value is False else value

    @field_validator("inputs", "outputs")
    @classmethod
    def _unique_names(cls, value: list[TensorConfig]) -> list[TensorConfig]:
        names = [t.name for t in value]
        duplicated = sorted({n for n in names if names.count(n) > 1})
        if duplicated:
            raise ValueError(f"declared more than once: {', '.join(duplicated)}")
        return value

    def labels(self) -> dict[str, list[str]]:
        """Class names by output name (for drift reports, profiles and metrics)."""
        return {t.name: list(t.labels) for t in self.outputs if t.labels}

    @classmethod
    def load(cls, path: Path) -> "ModelConfigFile":
        """``config.yaml`` alone; ``serving.model_config.read_model_config`` also reads config.pbtxt."""
        if not path.exists():
            return cls()
        return cls.model_validate(yaml.safe_load(path.read_text()) or {})
