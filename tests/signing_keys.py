"""Test helpers for provenance: EC keys made here with ``cryptography`` and signatures made with
the ``model-signing`` library's own key signer (nothing fetched from the network)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from model_signing import hashing, signing


@dataclass(frozen=True)
class KeyPair:
    private: Path
    public: Path

    @property
    def public_pem(self) -> str:
        return self.public.read_text()


def make_key(directory: Path, name: str) -> KeyPair:
    """A fresh ECDSA P-256 key pair as PEM files ``name.pem`` / ``name.pub``."""
    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    private = directory / f"{name}.pem"
    public = directory / f"{name}.pub"
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                     serialization.PublicFormat.SubjectPublicKeyInfo))
    return KeyPair(private, public)


def sign_version(version_dir: Path, key: KeyPair, *, ignore: tuple[str, ...] = ()) -> Path:
    """Sign a version directory exactly as the model-signing CLI would (model.sig left out)."""
    target = version_dir / "model.sig"
    config = hashing.Config().set_ignored_paths(paths=["model.sig", *ignore])
    signing.Config().use_elliptic_key_signer(private_key=key.private).set_hashing_config(config).sign(version_dir, target)
    return target


def flip_byte(path: Path, offset: int | None = None) -> None:
    """Change one byte of a file in place (the middle one unless told)."""
    data = bytearray(path.read_bytes())
    at = len(data) // 2 if offset is None else offset
    data[at] ^= 0x01
    path.write_bytes(bytes(data))
