"""The model repository: find models on disk, load the versions the policy selects, and
swap them at run time without failing in-flight requests.

Layout: ``REPO/<model>/config.yaml`` and/or Triton's ``config.pbtxt`` (both optional, see
``serving.model_config``) and ``REPO/<model>/<version>/model.onnx`` with integer versions. A loaded model is an immutable ``LoadedModel``; reload builds a new
one and swaps it in a single assignment, so a request sees either the old or the new set of
versions, never a mix. Versions that leave the set drain: their queues finish everything
already accepted before their sessions are released.

Which versions load: those the version policy selects, plus those loaded on request
(``load_version``), minus those unloaded on request (``unload_version``), plus whatever a
*retainer* says must stay (the control plane: versions that serve, canary or shadow now),
so loading a new version never takes the one in service out.

Every load and reload hashes each of those versions (``digester``) and runs the verifiers
before the version may serve, whether or not it was loaded before. A version that is refused
(``ArtifactTamperedError``: a changed artifact, a signature that does not hold; or ORT refusing
the graph) is refused alone: the model's other versions load and keep serving, a copy of the
refused version that is already loaded keeps serving the verified bytes it was built from, the
refusal shows per version in the repository index, and the load reports it once the rest is
swapped in.
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
from lockgate.errors import ArtifactTamperedError, InvalidArgument, LockgateError, NotFound, Unavailable, error_for_code
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
# Called with a model name and the default version requests are routed from now (None before
# the first load): versions that must stay loaded across a reload (they take traffic).
Retainer = Callable[[str, "str | None"], "set[str]"]


def _refusal(first: LockgateError, message: str) -> LockgateError:
    """The error a load reports for its refused versions: the first refusal's status
    (FAILED_PRECONDITION for a changed or unsigned artifact), with every version named."""
    if isinstance(first, ArtifactTamperedError):
        return ArtifactTamperedError(message)
    return error_for_code(first.code, message)


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
        self._refused: dict[str, dict[str, str]] = {}  # model -> version -> why it was refused
        self._requested: dict[str, set[str]] = {}  # loaded on request beside the version policy's
        self._excluded: dict[str, set[str]] = {}  # unloaded on request
        self._locks: dict[str, asyncio.Lock] = {}
        self._draining: set[asyncio.Task] = set()
        # Hooks other packages register through the methods below; called in registration order
        # (releases in reverse: a hook prepared after another may use it until its own release).
        self._digester: VersionDigester = lambda model, version, path: sha256_file(path)
        self._verifiers: list[ArtifactVerifier] = []
        self._listeners: list[ModelListener] = []
        self._preparers: list[VersionHook] = []
        self._releasers: list[VersionHook] = []
        self._retainers: list[Retainer] = []
        #: Requests refused before a version was known (unknown model or version, ...), by
        #: (model or "" when unknown, reason): counted in the failure metric with version "".
        self.unrouted_failures: dict[tuple[str, str], int] = {}

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

    def add_retainer(self, retainer: Retainer) -> None:
        """``retainer(model, default)`` -> versions that must stay loaded across a reload (they
        take traffic now), whatever the version policy selects."""
        self._retainers.append(retainer)

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

    def count_unrouted(self, model: str, reason: str) -> None:
        """Count a request refused before it reached a version (the label set stays bounded:
        only loaded model names, else "")."""
        key = (model if model in self._models else "", reason)
        self.unrouted_failures[key] = self.unrouted_failures.get(key, 0) + 1

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
                log.error("model '%s' %s: %s", name, "is partly loaded" if name in self._models else "failed to load",
                          exc.message)

    async def load(self, name: str) -> LoadedModel:
        """Load (or reload) a model: new versions are loaded first, then swapped in."""
        model_dir = self._model_dir(name)
        async with self._lock(name):
            if not model_dir.is_dir():
                raise NotFound(f"model '{name}' is not in the repository {self.root}")
            current = self._models.get(name)
            refusals: dict[str, LockgateError] = {}
            try:
                config = read_model_config(model_dir)
                on_disk = {str(v) for v in self._versions_on_disk(model_dir)}
                wanted = {str(v) for v in config.version_policy.select([int(v) for v in on_disk])}
                wanted |= self._requested.get(name, set()) & on_disk
                wanted -= self._excluded.get(name, set())
                default_now = current.default_version if current is not None else None
                retained = set().union(*(set(r(name, default_now)) for r in self._retainers))
                wanted |= retained & (on_disk | set(current.versions if current else ()))
                if not wanted:
                    raise Unavailable(f"model '{name}': no version directory with {MODEL_FILENAME} matches the version policy")
                versions: dict[str, ModelVersion] = {}
                for key in sorted(wanted, key=int):
                    old = current.versions.get(key) if current else None
                    try:
                        versions[key] = await self._version_for(name, key, model_dir / key / MODEL_FILENAME, config, old)
                    except Exception as exc:  # this version alone is refused; audited by the verifier
                        refusal = exc if isinstance(exc, LockgateError) else Unavailable(f"{type(exc).__name__}: {exc}")
                        refusals[key] = refusal
                        if old is not None:  # keeps serving the verified bytes it was built from
                            versions[key] = old
                            log.error("%s could not be reloaded (%s); it keeps serving the loaded copy", old.label,
                                      refusal.message)
                        else:
                            log.error("model '%s' version %s refused: %s", name, key, refusal.message)
                self._refused[name] = {version: exc.message for version, exc in refusals.items()}
                if not versions:
                    first = next(iter(refusals.values()))
                    if len(refusals) == 1:
                        raise first
                    raise _refusal(first, f"model '{name}': no version could be loaded: "
                                   + "; ".join(f"version {v}: {e.message}" for v, e in refusals.items()))
                if config.default_version is not None and str(config.default_version) in versions:
                    default = str(config.default_version)
                else:
                    default = max(versions, key=int)
                    if config.default_version is not None:
                        (log.error if str(config.default_version) in refusals else log.warning)(
                            "model '%s': default_version %s is not loaded (%s); version %s is the default meanwhile",
                            name, config.default_version,
                            refusals[str(config.default_version)].message if str(config.default_version) in refusals
                            else "not selected", default)
            except LockgateError as exc:
                self._failed[name] = exc.message
                raise
            except ModelConfigError as exc:  # names the file and the setting: no traceback needed
                self._failed[name] = str(exc)
                raise Unavailable(f"model '{name}' failed to load: {exc}") from exc
            except Exception as exc:  # bad YAML, ...
                self._failed[name] = f"{type(exc).__name__}: {exc}"
                log.exception("model '%s' failed to load", name)
                raise Unavailable(f"model '{name}' failed to load: {exc}") from exc
            loaded = LoadedModel(name, config, versions, default)
            self._models[name] = loaded  # atomic swap
            self._failed.pop(name, None)
            removed = [v for v in (current.versions.values() if current else []) if versions.get(v.version) is not v]
            for old in removed:
                self._drain_later(old)
            log.info("model '%s' ready: versions %s (default %s)", name, ", ".join(sorted(versions, key=int)), default)
            for listener in self._listeners:
                listener(name, sorted(versions, key=int), [v.version for v in removed])
            if refusals:  # the others serve; the caller still learns what was refused, precisely
                first = next(iter(refusals.values()))
                raise _refusal(first,
                    f"model '{name}': version(s) {', '.join(refusals)} refused, versions "
                    f"{', '.join(sorted(versions, key=int))} serve: " + "; ".join(e.message for e in refusals.values())
                ) from first
            return loaded

    async def _version_for(self, name: str, key: str, path: Path, config: ModelConfigFile,
                           old: ModelVersion | None) -> ModelVersion:
        """The loaded version to keep (unchanged artifact and config) or a freshly loaded one."""
        if old is not None and not path.exists():
            log.warning("%s: %s was removed from disk; serving the loaded copy until it is retired or unloaded",
                        old.label, path)
            return old
        digest = await asyncio.to_thread(self._verified_digest, name, key, path)
        if old is not None and old.sha256 == digest and old.config == config:
            return old
        return await self._load_version(name, key, path, digest, config)

    async def load_version(self, name: str, version: str) -> LoadedModel:
        """Load one version beside the loaded ones (``lockgate models load M V``)."""
        if not version.isdigit():
            raise InvalidArgument(f"version {version[:64]!r} of model '{name}' is not a version directory name")
        if not (self._model_dir(name) / version / MODEL_FILENAME).is_file():
            raise NotFound(f"model '{name}' has no version {version} in the repository {self.root}")
        self._requested.setdefault(name, set()).add(version)
        self._excluded.get(name, set()).discard(version)
        try:
            loaded = await self.load(name)
        except LockgateError:
            if version in self._refused.get(name, {}) or name not in self._models:
                raise
            loaded = self._models[name]  # another version was refused; this one is what was asked
        if version not in loaded.versions:
            raise Unavailable(f"model '{name}' version {version} did not load: "
                              f"{self._refused.get(name, {}).get(version, 'unknown reason')}")
        return loaded

    async def unload_version(self, name: str, version: str) -> None:
        """Unload one version (drained first); the model stays with the others."""
        model = self.get(name)
        if version not in model.versions:
            raise NotFound(f"model '{name}' has no loaded version {version}")
        self._excluded.setdefault(name, set()).add(version)
        self._requested.get(name, set()).discard(version)
        if set(model.versions) == {version}:
            await self.unload(name)
            return
        await self.load(name)

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
