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


def make_ca_and_leaf(directory: Path, name: str) -> tuple[Path, Path, Path]:
    """(CA certificate, leaf certificate, leaf private key) PEM files for certificate signing."""
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    directory.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=5)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{name} root CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now).not_valid_after(now + dt.timedelta(days=30))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                                       encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    leaf = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{name} release signing")]))
            .issuer_name(ca_name).public_key(leaf_key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(now + dt.timedelta(days=30))
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .sign(ca_key, hashes.SHA256()))
    paths = (directory / f"{name}-ca.pem", directory / f"{name}-leaf.pem", directory / f"{name}-leaf.key")
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(leaf_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                serialization.NoEncryption()))
    return paths


def sign_version_with_certificate(version_dir: Path, leaf: Path, leaf_key: Path, ca: Path) -> Path:
    target = version_dir / "model.sig"
    config = hashing.Config().set_ignored_paths(paths=["model.sig"])
    signing.Config().use_certificate_signer(private_key=leaf_key, signing_certificate=leaf, certificate_chain=[ca]) \
        .set_hashing_config(config).sign(version_dir, target)
    return target
