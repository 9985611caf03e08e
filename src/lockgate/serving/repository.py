"""The model repository: find models on disk, load the versions the policy selects, and
swap them at run time without failing in-flight requests.

Layout: ``REPO/<model>/config.yaml`` and/or Triton's ``config.pbtxt`` (both optional, see
``serving.model_config``) and ``REPO/<model>/<version>/model.onnx`` with integer versions. A loaded model is an immutable ``LoadedModel``; reload builds a new
one and swaps it in a single assignment, so a request sees either the old or the new set of
versions, never a mix. Versions that leave the set drain: their queues finish everything
already accepted before their sessions are released.

Every load and reload hashes each selected version (``digester``) and runs the verifiers
before the version may serve, whether or not it was loaded before. A version whose artifact
is refused (``ArtifactTamperedError``: a changed artifact, a signature that does not hold) is
refused alone: the model's other versions load and keep serving, a copy of the refused version
that is already loaded keeps serving the verified bytes it was built from, and the load
reports the refusal (FAILED_PRECONDITION) once the rest is swapped in.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from lockgate.config import ModelConfigFile
from lockgate.errors import ArtifactTamperedError, InvalidArgument, LockgateError, NotFound, Unavailable
from lockgate.protocol.codec import Signature
from lockgate.serving.batcher import DynamicBatcher
from lockgate.serving.model_config import ModelConfigError, declared_signature, read_model_config
from lockgate.serving.runtime import OrtRuntime
from lockgate.serving.stats import VersionStats

log = logging.getLogger("lockgate.repository")

MODEL_FILENAME = "model.onnx"

# Hashes a version before it is verified: (model, version, artifact path) -> the artifact's
# SHA-256. The control plane installs one that verifies the version directory's signature over
# the manifest it hashes, and returns the artifact's digest from that manifest (one pass over
# the bytes for both checks); it raises ArtifactTamperedError to refuse the version.
VersionDigester = Callable[[str, str, Path], str]
# Called with that digest before a version may serve (new or reused); raises to refuse it (the
# control plane checks the artifact's SHA-256 against the registry here).
ArtifactVerifier = Callable[[str, str, Path, str], None]
# Called after the set of loaded versions changes: (model, loaded_versions, removed_versions).
ModelListener = Callable[[str, list[str], list[str]], None]
# Called with a version once it is built but before it can take requests (attach per-version
# state such as the governance engine), and after it has drained (release that state).
VersionHook = Callable[["ModelVersion"], None]


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(slots=True)
class ModelVersion:
    """One loaded version: its session, signature, queue and counters."""

    model: str
    version: str
    path: Path
    sha256: str
    config: ModelConfigFile
    runtime: OrtRuntime
    signature: Signature
    batcher: DynamicBatcher
    stats: VersionStats
    loaded_at: float = field(default_factory=time.time)
    # Attached later by the pipeline (governance engine per version); kept generic here.
    extensions: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"model '{self.model}' version {self.version}"


@dataclass(frozen=True, slots=True)
class LoadedModel:
    name: str
    config: ModelConfigFile
    versions: dict[str, ModelVersion]
    default_version: str

    def get(self, version: str) -> ModelVersion:
        if not version:
            return self.versions[self.default_version]
        found = self.versions.get(version)
        if found is None:
            loaded = ", ".join(sorted(self.versions, key=int))
            raise NotFound(f"model '{self.name}' has no loaded version {version}; loaded versions: {loaded}")
        return found


@dataclass(slots=True)
class IndexEntry:
    name: str
    version: str
    state: str
    reason: str = ""


class ModelRepository:
    """Owns every loaded model; the only place sessions are created or released."""

    def __init__(self, root: Path, *, drain_timeout_s: float = 30.0) -> None:
        self.root = Path(root)
        self.drain_timeout_s = drain_timeout_s
        self._models: dict[str, LoadedModel] = {}
        self._failed: dict[str, str] = {}  # model -> why its last load failed
        self._refused: dict[str, dict[str, str]] = {}  # model -> version -> why its artifact was refused
        self._locks: dict[str, asyncio.Lock] = {}
        self._draining: set[asyncio.Task] = set()
        # Hooks other packages register through the methods below; called in registration order
        # (releases in reverse: a hook prepared after another may use it until its own release).
        self._digester: VersionDigester = lambda model, version, path: sha256_file(path)
        self._verifiers: list[ArtifactVerifier] = []
        self._listeners: list[ModelListener] = []
        self._preparers: list[VersionHook] = []
        self._releasers: list[VersionHook] = []

    # -- hooks ----------------------------------------------------------------------
    def set_digester(self, digester: VersionDigester) -> None:
        """``digester(model, version, path)`` -> the artifact's SHA-256 (the control plane's
        verifies the signature in the same pass); plain SHA-256 of the file by default."""
        self._digester = digester

    def add_verifier(self, verify: ArtifactVerifier) -> None:
        """``verify(model, version, path, sha256)`` runs before a version's session is built;
        raising refuses the load (the control plane checks the registered digest here)."""
        self._verifiers.append(verify)

    def add_version_hooks(self, prepare: VersionHook, release: VersionHook | None = None) -> None:
        """``prepare(version)`` runs once a version is built, before it can take a request
        (raising refuses the load); ``release(version)`` once it has drained after unload.
        Prepares run in registration order, releases in reverse (like a stack), so a hook
        that builds on an earlier one's state is released while that state still exists."""
        self._preparers.append(prepare)
        if release is not None:
            self._releasers.append(release)

    def subscribe(self, listener: ModelListener) -> None:
        """``listener(model, loaded_versions, removed_versions)`` after every load and unload."""
        self._listeners.append(listener)

    # -- lookups (hot path) ---------------------------------------------------------
    def get(self, name: str) -> LoadedModel:
        model = self._models.get(name)
        if model is None:
            if name in self._failed:
                raise Unavailable(f"model '{name}' is not ready: {self._failed[name]}")
            raise NotFound(f"model '{name}' is not loaded; available models: {', '.join(sorted(self._models)) or '(none)'}")
        return model

    def models(self) -> dict[str, LoadedModel]:
        return dict(self._models)

    def is_ready(self, name: str, version: str = "") -> bool:
        model = self._models.get(name)
        return model is not None and (not version or version in model.versions)

    def discover(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))

    def index(self) -> list[IndexEntry]:
        entries = []
        for name in self.discover():
            model = self._models.get(name)
            on_disk = self._versions_on_disk(self.root / name)
            refused = self._refused.get(name, {})
            for v in on_disk:
                if model and str(v) in model.versions:
                    entries.append(IndexEntry(name, str(v), "READY", refused.get(str(v), "")))
                elif str(v) in refused:
                    entries.append(IndexEntry(name, str(v), "UNAVAILABLE", refused[str(v)]))
                elif name in self._failed:
                    entries.append(IndexEntry(name, str(v), "UNAVAILABLE", self._failed[name]))
                else:
                    entries.append(IndexEntry(name, str(v), "UNAVAILABLE", "unloaded" if model is None else "not selected by the version policy"))
            if not on_disk:
                entries.append(IndexEntry(name, "", "UNAVAILABLE", self._failed.get(name, "no version directories")))
        return entries

    # -- load / unload ---------------------------------------------------------------
    @staticmethod
    def _versions_on_disk(model_dir: Path) -> list[int]:
        if not model_dir.is_dir():
            return []
        return sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit() and (p / MODEL_FILENAME).exists())

    def _lock(self, name: str) -> asyncio.Lock:
        return self._locks.setdefault(name, asyncio.Lock())

    def _model_dir(self, name: str) -> Path:
        """``REPO/<name>`` for a name that is one directory entry of the repository: a caller's
        name never reaches outside it ("..", "a/b", "") nor into a hidden directory."""
        if not name or name.startswith(".") or "/" in name or "\\" in name or "\0" in name:
            raise InvalidArgument(f"model name {name[:256]!r} is not a model directory name of the repository")
        return self.root / name

    async def load_all(self) -> None:
        for name in self.discover():
            try:
                await self.load(name)
            except LockgateError as exc:
                log.error("model '%s' failed to load: %s", name, exc.message)

    async def load(self, name: str) -> LoadedModel:
        """Load (or reload) a model: new versions are loaded first, then swapped in."""
        model_dir = self._model_dir(name)
        async with self._lock(name):
            if not model_dir.is_dir():
                raise NotFound(f"model '{name}' is not in the repository {self.root}")
            try:
                config = read_model_config(model_dir)
                selected = config.version_policy.select(self._versions_on_disk(model_dir))
                if not selected:
                    raise Unavailable(f"model '{name}': no version directory with {MODEL_FILENAME} matches the version policy")
                current = self._models.get(name)
                versions: dict[str, ModelVersion] = {}
                refusals: dict[str, ArtifactTamperedError] = {}
                for v in selected:
                    key = str(v)
                    path = model_dir / key / MODEL_FILENAME
                    old = current.versions.get(key) if current else None
                    try:
                        digest = await asyncio.to_thread(self._verified_digest, name, key, path)
                    except ArtifactTamperedError as exc:  # this version only; audited by the verifier
                        refusals[key] = exc
                        if old is not None:
                            versions[key] = old  # keeps serving the verified bytes it was built from
                        continue
                    if old is not None and old.sha256 == digest and old.config == config:
                        versions[key] = old
                        continue
                    versions[key] = await self._load_version(name, key, path, digest, config)
                if not versions:
                    raise next(iter(refusals.values()))
                default = str(config.default_version) if config.default_version is not None else max(versions, key=int)
                if default not in versions and default in refusals:
                    fallback = max(versions, key=int)
                    log.error("model '%s': default_version %s is refused; version %s is the default until it is restored",
                              name, default, fallback)
                    default = fallback
                if default not in versions:
                    raise Unavailable(f"model '{name}': default_version {default} is not among the loaded versions {sorted(versions)}")
            except LockgateError as exc:
                self._failed[name] = exc.message
                raise
            except ModelConfigError as exc:  # names the file and the setting: no traceback needed
                self._failed[name] = str(exc)
                raise Unavailable(f"model '{name}' failed to load: {exc}") from exc
            except Exception as exc:  # bad YAML, ORT refused the graph, ...
                self._failed[name] = f"{type(exc).__name__}: {exc}"
                log.exception("model '%s' failed to load", name)
                raise Unavailable(f"model '{name}' failed to load: {exc}") from exc
            loaded = LoadedModel(name, config, versions, default)
            self._models[name] = loaded  # atomic swap
            self._failed.pop(name, None)
            self._refused[name] = {version: exc.message for version, exc in refusals.items()}
            removed = [v for v in (current.versions.values() if current else []) if versions.get(v.version) is not v]
            for old in removed:
                self._drain_later(old)
            log.info("model '%s' ready: versions %s (default %s)", name, ", ".join(sorted(versions, key=int)), default)
            for listener in self._listeners:
                listener(name, sorted(versions, key=int), [v.version for v in removed])
            if refusals:
                raise ArtifactTamperedError(
                    f"model '{name}': version(s) {', '.join(refusals)} refused, versions "
                    f"{', '.join(sorted(versions, key=int))} serve: " + "; ".join(e.message for e in refusals.values())
                )
            return loaded

    def _verified_digest(self, name: str, version: str, path: Path) -> str:
        """Hash (and verify the signature of) one version, then run every verifier (thread)."""
        digest = self._digester(name, version, path)
        for verify in self._verifiers:
            verify(name, version, path, digest)
        return digest

    async def _load_version(self, name: str, version: str, path: Path, digest: str, config: ModelConfigFile) -> ModelVersion:
        label = f"model '{name}' version {version}"
        runtime = await asyncio.to_thread(OrtRuntime, path, config.runtime, label=label)
        signature = declared_signature(runtime.signature(config.max_batch_size), config, label)
        await asyncio.to_thread(runtime.warm_up, signature)
        stats = VersionStats()
        batcher = DynamicBatcher(
            runtime,
            label=label,
            max_batch_size=signature.max_batch_size,
            batching=config.dynamic_batching,
            stats=stats,
            instances=config.runtime.instances,
        )
        loaded = ModelVersion(name, version, path, digest, config, runtime, signature, batcher, stats)
        try:
            for prepare in self._preparers:
                prepare(loaded)
        except Exception:
            await batcher.drain(0)
            raise
        return loaded

    async def unload(self, name: str) -> None:
        async with self._lock(name):
            model = self._models.pop(name, None)
            self._failed.pop(name, None)
            self._refused.pop(name, None)
            if model is None:
                raise NotFound(f"model '{name}' is not loaded")
            await asyncio.gather(*(self._drain(v) for v in model.versions.values()))
            for listener in self._listeners:
                listener(name, [], list(model.versions))
            log.info("model '%s' unloaded", name)

    def _drain_later(self, version: ModelVersion) -> None:
        task = asyncio.get_running_loop().create_task(self._drain(version))
        self._draining.add(task)
        task.add_done_callback(self._draining.discard)

    async def _drain(self, version: ModelVersion) -> None:
        finished = await version.batcher.drain(self.drain_timeout_s)
        if not finished:
            log.warning("%s: drain timed out after %.0fs", version.label, self.drain_timeout_s)
        else:
            version.runtime.close()  # a batch still running after a timeout keeps its buffers
        for release in reversed(self._releasers):
            try:
                release(version)
            except Exception:
                log.exception("%s: releasing per-version state failed", version.label)
        log.info("%s unloaded (drained)", version.label)

    async def close(self) -> None:
        """Drain every model (SIGTERM path)."""
        models = list(self._models.values())
        self._models.clear()
        await asyncio.gather(*(self._drain(v) for m in models for v in m.versions.values()), *self._draining)
