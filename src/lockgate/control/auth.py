"""Bearer-token authentication and role-based authorisation for the admin API.

Only SHA-256 hashes of tokens are kept in memory or on disk: a token given in
plain text in a file or ``LOCKGATE_TOKENS`` is hashed at load and dropped.
Lookups hash the presented token and compare it with *every* known hash
using ``hmac.compare_digest``, so timing reveals neither which entry matched
nor how much of it. Error messages never contain the presented token.

Token file (YAML or JSON), either at top level or under ``tokens:``::

    tokens:
      alice: {role: admin, token_sha256: "9f86d08..."}
      ci-bot: {role: operator, token: "lgt_..."}   # hashed at load

Environment: ``LOCKGATE_TOKENS="alice:admin:lgt_...,bob:viewer:lgt_..."``.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import yaml

from lockgate.errors import InvalidArgument, PermissionDenied, Unauthenticated

TOKENS_ENV = "LOCKGATE_TOKENS"
TOKEN_PREFIX = "lgt_"
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


class Role(StrEnum):
    VIEWER = "viewer"
    OPERATOR = "operator"
    APPROVER = "approver"
    ANALYST = "analyst"
    ADMIN = "admin"


class Permission(StrEnum):
    READ = "read"  # list/show models, policies, audit log/verify/export
    TRAFFIC = "traffic"  # set weights, shadow, canary start/promote/abort
    APPROVE = "approve"  # approve a validated version (and attach its card)
    REGISTER = "register"  # register a new version
    VALIDATE = "validate"  # run the automatic validation
    RETIRE = "retire"  # retire a version
    LOAD = "load"  # load/unload versions in the running server
    ADMIN = "admin"  # anything else administrative (tokens, config)
    EXPLAIN = "explain"  # feature attributions beside predictions (they can leak model internals)


# The explicit permission matrix. Roles are not a strict hierarchy: an
# approver may approve but not move traffic, so approving and shipping a
# model are separate hands unless someone is admin.
PERMISSIONS: Mapping[Role, frozenset[Permission]] = {
    Role.VIEWER: frozenset({Permission.READ}),
    Role.OPERATOR: frozenset({Permission.READ, Permission.TRAFFIC}),
    Role.APPROVER: frozenset({Permission.READ, Permission.APPROVE}),
    Role.ANALYST: frozenset({Permission.READ, Permission.EXPLAIN}),
    Role.ADMIN: frozenset(Permission),
}


def hash_token(token: str) -> str:
    """Hex SHA-256 of a token, the only form that is stored."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


@dataclass(frozen=True, slots=True)
class IssuedToken:
    """A freshly generated token: show ``token`` once, store ``sha256``."""

    token: str
    sha256: str


def generate_token(nbytes: int = 32) -> IssuedToken:
    """A random bearer token (``lgt_`` + URL-safe base64) and its hash."""
    token = TOKEN_PREFIX + secrets.token_urlsafe(nbytes)
    return IssuedToken(token=token, sha256=hash_token(token))


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated caller; ``name`` is the actor recorded in the audit trail."""

    name: str
    role: Role

    def can(self, permission: Permission) -> bool:
        return permission in PERMISSIONS[self.role]


@dataclass(frozen=True, slots=True)
class TokenEntry:
    name: str
    role: Role
    token_sha256: str


def _parse_role(name: str, role: Any) -> Role:
    try:
        return Role(str(role).strip().lower())
    except ValueError:
        allowed = ", ".join(r.value for r in Role)
        raise InvalidArgument(f"token {name!r}: unknown role {role!r} (use one of {allowed})") from None


def _entry(name: str, spec: Mapping[str, Any]) -> TokenEntry:
    role = _parse_role(name, spec.get("role"))
    digest = spec.get("token_sha256")
    plain = spec.get("token")
    if digest is not None:
        digest = str(digest).strip().lower()
        if not _HEX64.match(digest):
            raise InvalidArgument(f"token {name!r}: token_sha256 must be 64 hex characters")
    elif plain:
        digest = hash_token(str(plain))
    else:
        raise InvalidArgument(f"token {name!r}: needs 'token_sha256' (or 'token')")
    return TokenEntry(name=name, role=role, token_sha256=digest)


def parse_tokens_file(path: str | Path) -> list[TokenEntry]:
    """Read a YAML/JSON token file (JSON is valid YAML)."""
    text = Path(path).read_text(encoding="utf-8")
    data = json.loads(text) if str(path).endswith(".json") else yaml.safe_load(text)
    if isinstance(data, Mapping) and "tokens" in data:
        data = data["tokens"]
    if not isinstance(data, Mapping):
        raise InvalidArgument(f"{path}: expected a mapping of name -> {{role, token_sha256}}")
    entries: list[TokenEntry] = []
    for name, spec in data.items():
        if not isinstance(spec, Mapping):
            raise InvalidArgument(f"{path}: token {name!r} must be a mapping")
        entries.append(_entry(str(name), spec))
    return entries


def parse_tokens_env(value: str) -> list[TokenEntry]:
    """Parse ``name:role:token,...``; the token part may itself contain ':'."""
    entries: list[TokenEntry] = []
    for index, item in enumerate(part.strip() for part in value.split(",")):
        if not item:
            continue
        pieces = item.split(":", 2)
        if len(pieces) != 3 or not pieces[0] or not pieces[2]:
            raise InvalidArgument(f"{TOKENS_ENV} entry {index + 1} must look like name:role:token")
        name, role, token = pieces
        entries.append(TokenEntry(name=name, role=_parse_role(name, role), token_sha256=hash_token(token)))
    return entries


class Authenticator:
    """Maps an ``authorization`` metadata value to a ``Principal`` and checks permissions."""

    def __init__(self, entries: Iterable[TokenEntry]) -> None:
        self._entries: tuple[TokenEntry, ...] = tuple(entries)
        seen: set[str] = set()
        for entry in self._entries:
            if entry.name in seen:
                raise InvalidArgument(f"token name {entry.name!r} is defined twice")
            seen.add(entry.name)

    @classmethod
    def load(
        cls, tokens_file: str | Path | None = None, env: Mapping[str, str] | None = None
    ) -> Authenticator:
        """Tokens from ``tokens_file`` (if given) plus ``LOCKGATE_TOKENS`` (from ``env``, default os.environ)."""
        environ = os.environ if env is None else env
        entries: list[TokenEntry] = []
        if tokens_file is not None:
            entries.extend(parse_tokens_file(tokens_file))
        if environ.get(TOKENS_ENV):
            entries.extend(parse_tokens_env(environ[TOKENS_ENV]))
        return cls(entries)

    @property
    def names(self) -> list[str]:
        return [e.name for e in self._entries]

    def __len__(self) -> int:
        return len(self._entries)

    def authenticate(self, authorization: str | None) -> Principal:
        """Parse ``Bearer <token>`` and find its principal, else ``Unauthenticated``."""
        if authorization is None or not authorization.strip():
            raise Unauthenticated("missing bearer token (authorization metadata)")
        scheme, _, token = authorization.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise Unauthenticated("authorization must be 'Bearer <token>'")
        if not self._entries:
            raise Unauthenticated("no tokens are configured on this server")
        presented = hash_token(token).encode("ascii")
        match: TokenEntry | None = None
        for entry in self._entries:  # no early exit: constant work whichever entry matches
            if hmac.compare_digest(presented, entry.token_sha256.encode("ascii")):
                match = entry
        if match is None:
            raise Unauthenticated("invalid bearer token")
        return Principal(name=match.name, role=match.role)

    @staticmethod
    def authorize(principal: Principal, permission: Permission) -> None:
        if not principal.can(permission):
            raise PermissionDenied(
                f"{principal.name!r} has role {principal.role.value}, which lacks "
                f"the {permission.value!r} permission"
            )

    def check(self, authorization: str | None, permission: Permission) -> Principal:
        """``authenticate`` then ``authorize``: the one call the admin service makes."""
        principal = self.authenticate(authorization)
        self.authorize(principal, permission)
        return principal


def tokens_file_entry(name: str, role: Role | str, issued: IssuedToken) -> dict[str, dict[str, str]]:
    """The token-file snippet for ``lockgate tokens create`` to print or merge (no plain token)."""
    return {name: {"role": _parse_role(name, role).value, "token_sha256": issued.sha256}}
