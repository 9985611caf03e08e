"""Model provenance: who signed a version, whether they are trusted, and whether every file of
the version directory is still what they signed.

A version may carry ``model.sig`` beside its files: an OpenSSF model-signing bundle (a DSSE
envelope over an in-toto statement listing every file's digest), made with the
``model-signing`` library (sigstore/model-transparency) or ``lockgate models sign``. The
``ProvenanceGate`` verifies it with that library at registration, validation, approval and
every load and reload, over the whole version directory:

* the signature must come from a signer in the trust policy (``provenance.trusted_signers``
  in the server config, plus signers added with ``lockgate trust add``, which are persisted
  and audited before they count);
* the signed manifest must list exactly the files present: one added, removed or changed
  refuses the version, and so does a manifest that leaves any file out (the only unsigned file
  is ``model.sig`` itself);
* ``provenance.require_signature`` (``never``, ``third_party`` or ``always``) says which versions
  must be signed at all.

A refusal raises ``ArtifactSignatureError`` (FAILED_PRECONDITION), is audited as
``artifact.signature_invalid`` with the reason, and counts in
``lockgate_artifact_verify_failures_total{model,version,reason}``. The repository refuses only
that version; the others keep serving.

Hashing is the cost of verification, so it happens once: the signed manifest's SHA-256 of
``model.onnx`` (the usual ``files``/``sha256`` serialization) is the digest the registry's
artifact check compares with the registration, instead of hashing the artifact a second time.

The library is the optional extra ``lockgate[provenance]``. Without it, a policy that asks for
signatures fails at startup (``ConfigError``), and a version that carries ``model.sig`` anyway
is refused (``verifier_unavailable``): a signature that cannot be checked is not a pass.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import json
import logging
import re
import tempfile
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from lockgate.config import ProvenanceSettings, TrustedSignerSettings
from lockgate.control.audit import Action, AuditTrail, model_subject
from lockgate.control.card import UNSIGNED, ModelCard, canonical_license
from lockgate.control.store import RecordKind, Store, utc_now_iso
from lockgate.control.validation import sha256_file
from lockgate.errors import (
    AlreadyExists,
    ArtifactSignatureError,
    ConfigError,
    FailedPrecondition,
    InvalidArgument,
    LockgateError,
    NotFound,
)

if TYPE_CHECKING:
    from lockgate.telemetry.metrics import Sample

log = logging.getLogger("lockgate.provenance")

SIGNATURE_FILENAME = "model.sig"
ARTIFACT_NAME = "model.onnx"
INSTALL_HINT = "install the provenance extra: pip install 'lockgate[provenance]'"
# model-signing leaves these out of a manifest by default; lockgate verifies the whole
# directory, so any of them present (other than the signature) is a file nobody signed.
_UNSIGNED_BY_DEFAULT = (".git", ".gitattributes", ".github", ".gitignore")
_HASH_MISMATCH = re.compile(r"Hash mismatch for '([^']*)'")

SignerKind = Literal["key", "certificate", "sigstore"]
Stage = Literal["register", "validate", "approve", "load", "verify"]


class Reason(StrEnum):
    """Why a version's provenance was refused: the ``reason`` label and audit field."""

    UNSIGNED = "unsigned"
    MANIFEST_MISMATCH = "manifest_mismatch"
    UNTRUSTED_SIGNER = "untrusted_signer"
    INVALID_SIGNATURE = "invalid_signature"
    MALFORMED_SIGNATURE = "malformed_signature"
    VERIFIER_UNAVAILABLE = "verifier_unavailable"


def library_available() -> bool:
    try:
        import model_signing.verifying  # noqa: F401
    except ImportError:
        return False
    return True


def _require_library(what: str) -> None:
    try:
        import model_signing.verifying  # noqa: F401
    except ImportError as exc:
        raise ConfigError(f"{what} needs the model-signing library, which is not installed ({exc}); {INSTALL_HINT}") from exc


# ---------------------------------------------------------------------- trusted signers
def public_key_fingerprint(pem: str) -> str:
    """SHA-256 (hex) of the key's PEM SubjectPublicKeyInfo: the ``hint`` model-signing writes
    into key-signed bundles, so a bundle names its key without trying every trusted one."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    try:
        key = serialization.load_pem_public_key(pem.encode("ascii"))
    except (ValueError, TypeError, UnicodeEncodeError) as exc:
        raise InvalidArgument(f"not a PEM public key: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name not in ("secp256r1", "secp384r1", "secp521r1"):
        raise InvalidArgument("model-signing verifies elliptic-curve keys only: use a P-256, P-384 or P-521 public key")
    raw = key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(raw).hexdigest()


def _certificate_subject(pem: str) -> str:
    from cryptography import x509

    try:
        return x509.load_pem_x509_certificate(pem.encode("ascii")).subject.rfc4514_string()
    except (ValueError, UnicodeEncodeError) as exc:
        raise InvalidArgument(f"not a PEM certificate: {exc}") from None


@dataclass(frozen=True, slots=True)
class TrustedSigner:
    """A signer whose bundles lockgate accepts: a name, a vendor and one trust anchor."""

    name: str
    vendor: str
    kind: SignerKind
    public_key_pem: str = ""
    certificate_chain_pem: tuple[str, ...] = ()
    sigstore_identity: str = ""
    sigstore_issuer: str = ""
    sigstore_trust_config: str = ""
    origin: Literal["config", "store"] = "config"
    added_by: str = ""
    added_at: str = ""
    fingerprint: str = ""  # key signers: public_key_fingerprint(public_key_pem)

    @property
    def identity(self) -> str:
        """What the signature proves, in one phrase (shown on cards and in the audit trail)."""
        if self.kind == "key":
            return f"key sha256:{self.fingerprint}"
        if self.kind == "certificate":
            return "certificate chain " + "; ".join(_certificate_subject(c) for c in self.certificate_chain_pem[:1])
        return f"sigstore {self.sigstore_identity} ({self.sigstore_issuer})"

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["certificate_chain_pem"] = list(self.certificate_chain_pem)
        data["identity"] = self.identity
        return data

    @classmethod
    def build(
        cls,
        name: str,
        vendor: str,
        *,
        public_key_pem: str = "",
        certificate_chain_pem: Sequence[str] = (),
        sigstore_identity: str = "",
        sigstore_issuer: str = "",
        sigstore_trust_config: str = "",
        origin: Literal["config", "store"] = "store",
        added_by: str = "",
        added_at: str = "",
    ) -> "TrustedSigner":
        """Check the anchor (a key that parses, certificates that parse) and derive the kind."""
        name, vendor = name.strip(), vendor.strip()
        if not name or not vendor:
            raise InvalidArgument("a trusted signer needs a name and a vendor")
        anchors = [bool(public_key_pem.strip()), bool(certificate_chain_pem), bool(sigstore_identity or sigstore_issuer)]
        if sum(anchors) != 1:
            raise InvalidArgument(f"trusted signer {name!r}: give exactly one of a public key, a certificate chain, "
                                  "or a Sigstore identity and issuer")
        if anchors[0]:
            return cls(name, vendor, "key", public_key_pem=public_key_pem.strip() + "\n", origin=origin,
                       added_by=added_by, added_at=added_at, fingerprint=public_key_fingerprint(public_key_pem))
        if anchors[1]:
            chain = tuple(c.strip() + "\n" for c in certificate_chain_pem)
            for pem in chain:
                _certificate_subject(pem)
            return cls(name, vendor, "certificate", certificate_chain_pem=chain, origin=origin,
                       added_by=added_by, added_at=added_at)
        if not (sigstore_identity and sigstore_issuer):
            raise InvalidArgument(f"trusted signer {name!r}: Sigstore needs both an identity and an OIDC issuer")
        return cls(name, vendor, "sigstore", sigstore_identity=sigstore_identity, sigstore_issuer=sigstore_issuer,
                   sigstore_trust_config=sigstore_trust_config, origin=origin, added_by=added_by, added_at=added_at)

    @classmethod
    def from_settings(cls, settings: TrustedSignerSettings) -> "TrustedSigner":
        try:
            pem = settings.public_key_pem or (settings.public_key.read_text(encoding="ascii") if settings.public_key else "")
            chain = [Path(p).read_text(encoding="ascii") for p in settings.certificate_chain]
        except OSError as exc:
            raise ConfigError(f"provenance.trusted_signers[{settings.name!r}]: cannot read {exc.filename}: {exc.strerror}") from None
        try:
            return cls.build(
                settings.name, settings.vendor, public_key_pem=pem, certificate_chain_pem=chain,
                sigstore_identity=settings.sigstore_identity or "", sigstore_issuer=settings.sigstore_issuer or "",
                sigstore_trust_config=str(settings.sigstore_trust_config or ""), origin="config",
            )
        except InvalidArgument as exc:
            raise ConfigError(f"provenance.trusted_signers[{settings.name!r}]: {exc.message}") from None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "TrustedSigner":
        return cls.build(
            str(data["name"]), str(data["vendor"]), public_key_pem=str(data.get("public_key_pem") or ""),
            certificate_chain_pem=list(data.get("certificate_chain_pem") or ()),
            sigstore_identity=str(data.get("sigstore_identity") or ""), sigstore_issuer=str(data.get("sigstore_issuer") or ""),
            sigstore_trust_config=str(data.get("sigstore_trust_config") or ""), origin="store",
            added_by=str(data.get("added_by") or ""), added_at=str(data.get("added_at") or ""),
        )


# ---------------------------------------------------------------------- verification
@dataclass(frozen=True, slots=True)
class Provenance:
    """The outcome of one successful verification of a version directory."""

    signed: bool
    verified_at: str
    signer: str = ""  # trusted signer's name
    vendor: str = ""
    identity: str = ""  # "key sha256:...", "certificate chain CN=...", "sigstore ..."
    kind: str = ""
    manifest_digest: str = ""  # "sha256:<hex>": the in-toto subject digest over every file digest
    files: tuple[str, ...] = ()
    hash_type: str = ""
    # SHA-256 of model.onnx taken from the verified manifest (None: not in it as a sha256 file digest).
    artifact_sha256: str | None = field(default=None, compare=False)

    def artifact_digest(self, artifact: Path) -> str:
        """SHA-256 of ``artifact``: from the verified manifest when it lists it that way (the
        bytes were just hashed for the signature), else hashed now."""
        if self.artifact_sha256 is not None and Path(artifact).name == ARTIFACT_NAME:
            return self.artifact_sha256
        return sha256_file(artifact)

    @property
    def card_signer(self) -> str:
        """The card's ``signer``: 'unsigned', or name (vendor), identity."""
        return f"{self.signer} ({self.vendor}), {self.identity}" if self.signed else UNSIGNED

    @property
    def summary(self) -> str:
        if not self.signed:
            return UNSIGNED
        return f"signed by {self.card_signer}; manifest {self.manifest_digest} over {len(self.files)} file(s)"

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("artifact_sha256")
        data["files"] = list(self.files)
        data["summary"] = self.summary
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> "Provenance | None":
        if not data:
            return None
        known = {k: data[k] for k in ("signed", "verified_at", "signer", "vendor", "identity", "kind",
                                      "manifest_digest", "hash_type") if k in data}
        return cls(**known, files=tuple(data.get("files") or ()))


def _refusal(reason: Reason, message: str) -> ArtifactSignatureError:
    return ArtifactSignatureError(message, cause=reason.value)


def _listed_files(version_dir: Path) -> set[str]:
    return {p.relative_to(version_dir).as_posix() for p in version_dir.rglob("*") if p.is_file()} - {SIGNATURE_FILENAME}


def _read_bundle(raw: bytes) -> tuple[dict[str, Any], dict[str, Any]]:
    """(bundle, in-toto statement) from model.sig bytes; MALFORMED_SIGNATURE when unreadable."""
    try:
        bundle = json.loads(raw)
        statement = json.loads(base64.b64decode(bundle["dsseEnvelope"]["payload"], validate=True))
        if not isinstance(statement, dict) or not isinstance(bundle.get("verificationMaterial"), dict):
            raise ValueError("not a model-signing bundle")
        if not isinstance(statement["predicate"]["resources"], list) or not statement["subject"][0]["digest"]["sha256"]:
            raise ValueError("the statement lists no resources or no subject digest")
    except (ValueError, KeyError, IndexError, TypeError, binascii.Error) as exc:
        raise _refusal(Reason.MALFORMED_SIGNATURE, f"{SIGNATURE_FILENAME} is not a model-signing bundle ({type(exc).__name__}: {exc})") from None
    return bundle, statement


def _candidates(material: Mapping[str, Any], signers: Sequence[TrustedSigner]) -> tuple[list[TrustedSigner], str]:
    """Trusted signers that may have made this bundle, and how the bundle names its signer."""
    if "publicKey" in material:
        hint = (material.get("publicKey") or {}).get("hint") or ""
        keys = [s for s in signers if s.kind == "key"]
        if hint:
            return [s for s in keys if s.fingerprint == hint], f"key sha256:{hint}"
        return keys, "a public key (no key hint in the bundle)"
    if material.get("tlogEntries"):
        return [s for s in signers if s.kind == "sigstore"], "a Sigstore certificate"
    if "x509CertificateChain" in material:
        return [s for s in signers if s.kind == "certificate"], "a signing certificate"
    return [s for s in signers if s.kind == "sigstore"], "a Sigstore certificate"


def _verifier_config(signer: TrustedSigner, scratch: Path) -> Any:
    from model_signing import verifying

    config = verifying.Config()
    if signer.kind == "key":
        key = scratch / "signer.pub"
        key.write_text(signer.public_key_pem, encoding="ascii")
        return config.use_elliptic_key_verifier(public_key=key)
    if signer.kind == "certificate":
        paths = []
        for i, pem in enumerate(signer.certificate_chain_pem):
            paths.append(scratch / f"ca{i}.pem")
            paths[-1].write_text(pem, encoding="ascii")
        return config.use_certificate_verifier(certificate_chain=paths)
    return config.use_sigstore_verifier(
        identity=signer.sigstore_identity, oidc_issuer=signer.sigstore_issuer,
        trust_config=Path(signer.sigstore_trust_config) if signer.sigstore_trust_config else None,
    )


def _mismatch_message(version_dir: Path, statement: Mapping[str, Any], library_message: str) -> str:
    signed = {str(r.get("name")) for r in statement["predicate"]["resources"]}
    present = _listed_files(version_dir)
    parts = []
    changed = sorted(set(_HASH_MISMATCH.findall(library_message)))
    if changed:
        parts.append("changed: " + ", ".join(changed))
    if present - signed:
        parts.append("added: " + ", ".join(sorted(present - signed)))
    if signed - present:
        parts.append("removed: " + ", ".join(sorted(signed - present)))
    return "files differ from the signed manifest (" + ("; ".join(parts) or library_message) + ")"


def verify_directory(version_dir: Path, signers: Sequence[TrustedSigner]) -> Provenance:
    """Verify ``version_dir/model.sig`` over the whole directory against ``signers``.

    Returns ``Provenance(signed=False)`` when there is no ``model.sig`` (the policy decides
    whether that is allowed); raises ``ArtifactSignatureError`` for every other failure.
    """
    version_dir = Path(version_dir)
    now = utc_now_iso()
    signature = version_dir / SIGNATURE_FILENAME
    try:
        raw = signature.read_bytes()
    except FileNotFoundError:
        return Provenance(signed=False, verified_at=now)
    except OSError as exc:
        raise _refusal(Reason.MALFORMED_SIGNATURE, f"{signature} is unreadable: {exc.strerror or exc}") from None
    if not library_available():
        raise _refusal(Reason.VERIFIER_UNAVAILABLE,
                       f"{signature} cannot be verified: the model-signing library is not installed; {INSTALL_HINT}")
    bundle, statement = _read_bundle(raw)
    serialization = statement["predicate"].get("serialization") or {}
    left_out = {str(p) for p in serialization.get("ignore_paths") or ()} - {SIGNATURE_FILENAME, *_UNSIGNED_BY_DEFAULT}
    if left_out:
        raise _refusal(Reason.MANIFEST_MISMATCH, f"the signature leaves {', '.join(sorted(left_out))} out of its manifest; "
                       "lockgate verifies the whole version directory (only model.sig may be unsigned)")
    unsigned = sorted(name for name in _UNSIGNED_BY_DEFAULT if (version_dir / name).exists())
    if unsigned:
        raise _refusal(Reason.MANIFEST_MISMATCH, f"files differ from the signed manifest (added: {', '.join(unsigned)})")
    candidates, named = _candidates(bundle["verificationMaterial"], signers)
    if not candidates:
        trusted = ", ".join(s.name for s in signers) or "none configured"
        raise _refusal(Reason.UNTRUSTED_SIGNER, f"signed by {named}, which is not a trusted signer (trusted: {trusted})")
    from cryptography.exceptions import InvalidSignature

    failures: list[str] = []
    with tempfile.TemporaryDirectory(prefix="lockgate-verify-") as scratch_dir:
        scratch = Path(scratch_dir)
        copy = scratch / SIGNATURE_FILENAME  # verify exactly the bytes parsed above
        copy.write_bytes(raw)
        for signer in candidates:
            try:
                _verifier_config(signer, scratch).verify(version_dir, copy)
            except InvalidSignature:
                failures.append(f"{signer.name}: the signature does not verify with its key")
                continue
            except ValueError as exc:
                text = str(exc)
                if text.startswith("Signature mismatch"):
                    raise _refusal(Reason.MANIFEST_MISMATCH, _mismatch_message(version_dir, statement, text)) from None
                if text.startswith("Key mismatch"):
                    failures.append(f"{signer.name}: key mismatch")
                    continue
                failures.append(f"{signer.name}: {text}")
                continue
            except Exception as exc:  # certificate chain (OpenSSL), Sigstore policy, bundle parsing
                failures.append(f"{signer.name}: {type(exc).__name__}: {exc}")
                continue
            return _provenance(signer, statement, now)
    if bundle["verificationMaterial"].get("publicKey", {}).get("hint"):
        raise _refusal(Reason.INVALID_SIGNATURE, f"invalid signature: {'; '.join(failures)}")
    raise _refusal(Reason.UNTRUSTED_SIGNER, f"signed by {named}, which no trusted signer verifies ({'; '.join(failures)})")


def _provenance(signer: TrustedSigner, statement: Mapping[str, Any], now: str) -> Provenance:
    serialization = statement["predicate"].get("serialization") or {}
    hash_type = str(serialization.get("hash_type", ""))
    resources = statement["predicate"]["resources"]
    artifact = None
    if serialization.get("method") == "files":
        artifact = next((str(r["digest"]) for r in resources
                         if r.get("name") == ARTIFACT_NAME and r.get("algorithm") == "sha256"), None)
    return Provenance(
        signed=True, verified_at=now, signer=signer.name, vendor=signer.vendor, identity=signer.identity,
        kind=signer.kind, manifest_digest="sha256:" + str(statement["subject"][0]["digest"]["sha256"]),
        files=tuple(sorted(str(r.get("name")) for r in resources)), hash_type=hash_type, artifact_sha256=artifact,
    )


def sign_directory(version_dir: Path, private_key: Path, *, password: str | None = None) -> Path:
    """Sign ``version_dir`` with an EC private key (offline): writes and returns ``model.sig``.

    Every file is in the manifest except ``model.sig`` (and git metadata, which a version
    directory should not have: verification refuses it).
    """
    _require_library("signing a model")
    from model_signing import hashing, signing

    version_dir = Path(version_dir)
    if not version_dir.is_dir():
        raise NotFound(f"{version_dir} is not a directory")
    target = version_dir / SIGNATURE_FILENAME
    hashing_config = hashing.Config().set_ignored_paths(paths=[SIGNATURE_FILENAME])
    try:
        signing.Config().use_elliptic_key_signer(private_key=private_key, password=password).set_hashing_config(
            hashing_config).sign(version_dir, target)
    except (ValueError, TypeError) as exc:
        raise InvalidArgument(f"cannot sign with {private_key}: {exc}") from None
    return target


# ---------------------------------------------------------------------- the gate
class ProvenanceGate:
    """The trust policy applied to versions, with its trust set, audit entries and counters.

    One per control plane; the registry calls it at register/validate/approve/card, the
    repository (through the control plane) at every load.
    """

    SYSTEM_ACTOR = "system:lockgate"

    def __init__(self, store: Store, audit: AuditTrail | None = None, settings: ProvenanceSettings | None = None) -> None:
        self.store = store
        self.audit = audit or AuditTrail(store)
        self.settings = settings or ProvenanceSettings()
        self._config_signers, self.allowed_licenses = self.check_settings(self.settings)
        self._store_signers: list[TrustedSigner] = []
        self._lock = threading.Lock()
        self._failures: dict[tuple[str, str, str], int] = {}

    @staticmethod
    def check_settings(settings: ProvenanceSettings) -> tuple[list[TrustedSigner], list[str]]:
        """(trusted signers, canonical allowed licences) of ``settings``; ``ConfigError`` when the
        policy cannot work: signatures asked for without the library, unreadable keys, unknown
        SPDX ids, duplicate signer names. Called before serving starts."""
        if settings.enabled:
            _require_library(f"provenance.require_signature={settings.require_signature!r} "
                             f"with {len(settings.trusted_signers)} trusted signer(s)")
        signers = [TrustedSigner.from_settings(s) for s in settings.trusted_signers]
        names = [s.name for s in signers]
        if len(set(names)) != len(names):
            raise ConfigError(f"provenance.trusted_signers: duplicate names in {names}")
        allowed = []
        for text in settings.allowed_licenses:
            try:
                allowed.append(canonical_license(text))
            except ValueError as exc:
                raise ConfigError(f"provenance.allowed_licenses: {exc}") from None
        return signers, allowed

    # -- trust set ------------------------------------------------------------------------
    def trusted_signers(self) -> list[TrustedSigner]:
        """Config signers, then the store's (replayed from its audited add/remove records).

        The store is read every time (verification is rare next to its cost); while it is
        unreachable the last set read is used, and a warning says so.
        """
        try:
            records = self.store.list_records(kind=RecordKind.TRUST)
        except LockgateError as exc:
            log.warning("trusted signers: store unavailable, using the last known set: %s", exc)
            return [*self._config_signers, *self._store_signers]
        current: dict[str, TrustedSigner] = {}
        for record in records:
            body = record.body
            if body.get("op") == "add":
                try:
                    current[str(body["signer"]["name"])] = TrustedSigner.from_dict(body["signer"])
                except (InvalidArgument, KeyError, TypeError) as exc:
                    log.error("trust record %s is unusable and ignored: %s", record.id, exc)
            elif body.get("op") == "remove":
                current.pop(str(body.get("name")), None)
        self._store_signers = list(current.values())
        return [*self._config_signers, *self._store_signers]

    def add_signer(self, name: str, vendor: str, actor: str, *, reason: str = "", **anchor: Any) -> TrustedSigner:
        """Persist and audit a new trusted signer; it counts from the next verification on.

        ``anchor``: ``public_key_pem``, ``certificate_chain_pem`` or ``sigstore_identity`` +
        ``sigstore_issuer`` (as ``TrustedSigner.build``).
        """
        _require_library("trusting a signer")
        signer = TrustedSigner.build(name, vendor, origin="store", **anchor)
        if any(s.name == signer.name for s in self.trusted_signers()):
            raise AlreadyExists(f"a trusted signer named {signer.name!r} exists; remove it first to replace it")
        stored = replace(signer, added_by=actor, added_at=utc_now_iso())
        body = stored.to_dict()
        self.store.add_record(RecordKind.TRUST, "", "", actor, {"op": "add", "signer": body, "reason": reason})
        self.audit.append(actor, Action.TRUST_ADD, f"trust/{stored.name}",
                          {"name": stored.name, "vendor": stored.vendor, "kind": stored.kind,
                           "identity": stored.identity, "reason": reason})
        return stored

    def remove_signer(self, name: str, actor: str, *, reason: str = "") -> TrustedSigner:
        """Persist and audit a removal; versions it signed are refused from their next load/approval."""
        found = next((s for s in self.trusted_signers() if s.name == name), None)
        if found is None:
            raise NotFound(f"no trusted signer named {name!r}")
        if found.origin == "config":
            raise FailedPrecondition(f"trusted signer {name!r} comes from the server config (provenance.trusted_signers); "
                                     "remove it there and restart")
        self.store.add_record(RecordKind.TRUST, "", "", actor, {"op": "remove", "name": name, "reason": reason})
        self.audit.append(actor, Action.TRUST_REMOVE, f"trust/{name}",
                          {"name": name, "vendor": found.vendor, "identity": found.identity, "reason": reason})
        return found

    # -- verification ----------------------------------------------------------------------
    def signature_required(self, card: ModelCard | None, *, card_known: bool = True) -> str | None:
        """Why this version must be signed, or None when the policy lets it go unsigned."""
        policy = self.settings.require_signature
        if policy == "always":
            return "provenance.require_signature is 'always'"
        if policy == "third_party" and not card_known:
            return "its card cannot be read to tell whether it is third-party, and provenance.require_signature is 'third_party'"
        if policy == "third_party" and card is not None and card.third_party:
            return "its card says third_party and provenance.require_signature is 'third_party'"
        return None

    def verify(
        self,
        model: str,
        version: str,
        version_dir: Path,
        *,
        stage: Stage,
        actor: str = SYSTEM_ACTOR,
        card: ModelCard | None = None,
        card_known: bool = True,
        enforce: bool = True,
    ) -> Provenance:
        """Verify one version directory; a refusal is audited, counted and raised.

        ``enforce``: also refuse an unsigned version the policy requires to be signed (the
        approval collects that with its other rules instead).
        """
        label = f"model {model!r} version {version!r}"
        try:
            provenance = verify_directory(version_dir, self.trusted_signers())
            if not provenance.signed and enforce:
                required = self.signature_required(card, card_known=card_known)
                if required:
                    raise _refusal(Reason.UNSIGNED, f"no signature ({SIGNATURE_FILENAME}) and {required}")
        except ArtifactSignatureError as exc:
            self._record_failure(model, version, version_dir, stage, actor, exc)
            raise ArtifactSignatureError(
                f"refusing {label} ({stage}): {exc.message}", cause=exc.cause) from None
        return provenance

    def _record_failure(self, model: str, version: str, version_dir: Path, stage: str, actor: str,
                        exc: ArtifactSignatureError) -> None:
        with self._lock:
            key = (model, version, exc.cause)
            self._failures[key] = self._failures.get(key, 0) + 1
        log.error("model %s version %s: signature check failed at %s (%s): %s", model, version, stage, exc.cause, exc.message)
        try:
            self.audit.append(actor, Action.ARTIFACT_SIGNATURE_INVALID, model_subject(model, version),
                              {"stage": stage, "reason": exc.cause, "detail": exc.message, "path": str(version_dir)})
        except LockgateError:  # the refusal stands even when it cannot be recorded; the log has it
            log.exception("model %s version %s: signature refusal could not be audited", model, version)

    # -- approval and cards -----------------------------------------------------------------
    def check_approval(
        self, model: str, version: str, version_dir: Path, card: ModelCard, *, actor: str,
    ) -> tuple[Provenance, ModelCard, list[str]]:
        """(provenance, the card filled in from it, every policy problem) for an approval.

        A signature that does not hold raises (audited) as everywhere; the policy's other
        rules are collected so one refusal names all of them. A missing required signature
        is audited as a refusal too.
        """
        provenance = self.verify(model, version, version_dir, stage="approve", actor=actor, card=None, enforce=False)
        filled = self.fill_card(card, provenance)
        problems = self.approval_problems(provenance, filled)
        required = self.signature_required(filled)
        if required and not provenance.signed:
            self._record_failure(model, version, version_dir, "approve", actor,
                                 _refusal(Reason.UNSIGNED, f"no signature ({SIGNATURE_FILENAME}) and {required}"))
        return provenance, filled, problems

    def approval_problems(self, provenance: Provenance, card: ModelCard) -> list[str]:
        """Every way ``card`` + ``provenance`` fall short of the policy (empty: approvable)."""
        problems: list[str] = []
        required = self.signature_required(card)
        if required and not provenance.signed:
            problems.append(f"no signature ({SIGNATURE_FILENAME}) and {required}")
        allowed = self.allowed_licenses
        if not card.license:
            if allowed:
                problems.append(f"the model card has no license; provenance.allowed_licenses requires one of {', '.join(allowed)}")
            elif card.third_party:
                problems.append("the model card of a third-party model needs a license (SPDX id)")
        elif allowed and card.license not in allowed:
            problems.append(f"license {card.license!r} is not in provenance.allowed_licenses ({', '.join(allowed)})")
        if card.third_party:
            if not card.vendor.strip():
                problems.append("the model card of a third-party model needs its vendor")
            assessment = card.vendor_assessment
            if assessment is None:
                problems.append("a third-party model needs a vendor_assessment (reference and date) on its card")
            else:
                today = dt.datetime.now(dt.timezone.utc).date()
                if assessment.date > today:
                    problems.append(f"vendor_assessment date {assessment.date} is in the future")
                max_age = self.settings.assessment_max_age_days
                if max_age is not None and (today - assessment.date).days > max_age:
                    problems.append(f"vendor_assessment {assessment.reference!r} of {assessment.date} is older than "
                                    f"provenance.assessment_max_age_days ({max_age})")
        return problems

    @staticmethod
    def fill_card(card: ModelCard, provenance: Provenance | None) -> ModelCard:
        """Write ``signer`` and ``manifest_digest`` from the verification; refuse other values by hand."""
        signer = provenance.card_signer if provenance is not None else UNSIGNED
        digest = provenance.manifest_digest if provenance is not None else ""
        for name, given, actual in (("signer", card.signer, signer), ("manifest_digest", card.manifest_digest, digest)):
            if given and given != actual:
                raise InvalidArgument(f"model card field {name} is filled in by lockgate from {SIGNATURE_FILENAME} "
                                      f"({actual or 'none'}); the card says {given!r}: leave it out")
        return card.model_copy(update={"signer": signer, "manifest_digest": digest})

    # -- metrics -----------------------------------------------------------------------------
    def metric_samples(self) -> Iterator["Sample"]:
        from lockgate.telemetry.metrics import Sample

        with self._lock:
            items = list(self._failures.items())
        for (model, version, reason), count in items:
            yield Sample("lockgate_artifact_verify_failures", {"model": model, "version": version, "reason": reason}, count)


__all__ = [
    "ARTIFACT_NAME", "Provenance", "ProvenanceGate", "Reason", "SIGNATURE_FILENAME", "TrustedSigner",
    "library_available", "public_key_fingerprint", "sign_directory", "verify_directory",
]
