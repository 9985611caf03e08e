"""The audit key: HMAC-SHA256 keys that authenticate audit entries and checkpoints.

Why a key at all: a plain hash chain can be recomputed by anyone who can write the
database, so it proves nothing against the person it should hold to account. With every
entry MAC'd under a key kept **outside** the state directory (``audit_key_file``), a
database writer without the key can neither rewrite an entry, re-chain the entries after
it, nor append a forged one; the signed checkpoints (``checkpoint.py``) catch truncation.

Why HMAC and not a signature: the gateway is the only writer and the verifier (the
server, or an operator's ``lockgate audit verify``) holds the same key, so a symmetric MAC
gives the guarantee at ~1 µs per entry with the standard library. What it does not give:
whoever holds the key can forge, so it belongs in a secret store or a root-owned file
outside ``state_dir``, never beside the database.

Key file: one line of 64+ hex digits (32+ random bytes), as ``lockgate audit keygen``
writes it (mode 0600). A key is named by its ``key_id`` (an HMAC of a fixed label, so the
id reveals nothing about the key); every entry records the id of the key that MAC'd it, so
a rotated-out key can still verify the entries it wrote (``audit_previous_key_files``).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import stat
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from lockgate.errors import FailedPrecondition, InvalidArgument

log = logging.getLogger("lockgate.audit")

MIN_KEY_BYTES = 32
_KEY_ID_LABEL = b"lockgate.audit.key-id/v1"


@dataclass(frozen=True, slots=True)
class AuditKey:
    """One HMAC-SHA256 key. ``secret`` never appears in ``repr`` or a log line."""

    secret: bytes = field(repr=False)
    key_id: str = ""
    path: str = ""

    def __post_init__(self) -> None:
        if len(self.secret) < MIN_KEY_BYTES:
            raise InvalidArgument(f"audit key {self.path or ''} is {len(self.secret)} bytes; at least {MIN_KEY_BYTES} are needed")
        if not self.key_id:
            object.__setattr__(self, "key_id", hmac.new(self.secret, _KEY_ID_LABEL, hashlib.sha256).hexdigest()[:16])

    def mac(self, payload: bytes) -> str:
        """HMAC-SHA256 of ``payload``, hex."""
        return hmac.new(self.secret, payload, hashlib.sha256).hexdigest()

    def check(self, payload: bytes, mac: str) -> bool:
        """Constant-time comparison of ``mac`` with the MAC of ``payload``."""
        return hmac.compare_digest(self.mac(payload), mac)

    @classmethod
    def load(cls, path: str | Path) -> AuditKey:
        """Read a key file (hex text). A file others can read is logged: they could forge."""
        target = Path(path)
        try:
            text = target.read_text(encoding="ascii").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise FailedPrecondition(f"cannot read the audit key file {target}: {exc}") from exc
        try:
            secret = bytes.fromhex(text)
        except ValueError:
            raise FailedPrecondition(
                f"audit key file {target} does not hold a hex key (create one with `lockgate audit keygen --out {target}`)"
            ) from None
        try:
            mode = target.stat().st_mode
            if mode & (stat.S_IRWXG | stat.S_IRWXO):
                log.warning("audit key file %s is readable by other users (mode %o): anyone who can read it can "
                            "forge audit entries; chmod 600 it", target, stat.S_IMODE(mode))
        except OSError:
            pass
        try:
            return cls(secret, path=str(target))
        except InvalidArgument as exc:
            raise FailedPrecondition(exc.message) from None

    @staticmethod
    def generate(path: str | Path) -> AuditKey:
        """Write a new random key to ``path`` (mode 0600, never overwriting) and return it."""
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        secret = secrets.token_bytes(MIN_KEY_BYTES)
        try:
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            raise FailedPrecondition(f"{target} already exists; refusing to overwrite an audit key") from None
        try:
            os.write(fd, (secret.hex() + "\n").encode("ascii"))
            os.fsync(fd)
        finally:
            os.close(fd)
        return AuditKey(secret, path=str(target))


@dataclass(frozen=True, slots=True)
class AuditKeyring:
    """The signing key and every key whose entries may still be verified."""

    current: AuditKey
    previous: tuple[AuditKey, ...] = ()

    @property
    def by_id(self) -> Mapping[str, AuditKey]:
        return {key.key_id: key for key in (*self.previous, self.current)}

    def get(self, key_id: str) -> AuditKey | None:
        if key_id == self.current.key_id:
            return self.current
        for key in self.previous:
            if key.key_id == key_id:
                return key
        return None

    @classmethod
    def load(cls, key_file: str | Path, previous: Iterable[str | Path] = ()) -> AuditKeyring:
        return cls(AuditKey.load(key_file), tuple(AuditKey.load(p) for p in previous))


def outside(path: Path, directory: Path) -> bool:
    """True when ``path`` does not lie inside ``directory`` (both resolved)."""
    try:
        path.resolve().relative_to(directory.resolve())
    except ValueError:
        return True
    return False
