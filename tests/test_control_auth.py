"""Bearer tokens with roles: wrong/missing tokens are Unauthenticated, wrong roles
PermissionDenied, and plain tokens are never kept."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from lockgate.control.auth import (
    PERMISSIONS,
    Authenticator,
    Permission,
    Principal,
    Role,
    generate_token,
    hash_token,
    tokens_file_entry,
)
from lockgate.errors import InvalidArgument, PermissionDenied, Unauthenticated

ADMIN = generate_token()
VIEWER = generate_token()
OPERATOR_PLAIN = "operator-secret-token-123"


@pytest.fixture()
def auth(tmp_path: Path) -> Authenticator:
    tokens = tmp_path / "tokens.yaml"
    tokens.write_text(
        yaml.safe_dump(
            {
                "tokens": {
                    **tokens_file_entry("root", "admin", ADMIN),
                    **tokens_file_entry("reader", Role.VIEWER, VIEWER),
                    "ci": {"role": "operator", "token": OPERATOR_PLAIN},
                }
            }
        )
    )
    return Authenticator.load(tokens, env={"LOCKGATE_TOKENS": "carol:approver:carol:with:colons"})


def test_valid_tokens_map_to_principals(auth: Authenticator) -> None:
    assert auth.authenticate(f"Bearer {ADMIN.token}") == Principal("root", Role.ADMIN)
    assert auth.authenticate(f"bearer  {VIEWER.token} ") == Principal("reader", Role.VIEWER)
    assert auth.authenticate(f"Bearer {OPERATOR_PLAIN}") == Principal("ci", Role.OPERATOR)
    assert auth.authenticate("Bearer carol:with:colons") == Principal("carol", Role.APPROVER)
    assert sorted(auth.names) == ["carol", "ci", "reader", "root"]


@pytest.mark.parametrize("header", [None, "", "   ", "Bearer", "Bearer ", "Basic abc", "token-without-scheme"])
def test_missing_or_malformed_token_unauthenticated(auth: Authenticator, header: str | None) -> None:
    with pytest.raises(Unauthenticated) as info:
        auth.check(header, Permission.READ)
    assert info.value.code == "UNAUTHENTICATED"


def test_wrong_token_unauthenticated_and_not_echoed(auth: Authenticator) -> None:
    wrong = ADMIN.token + "x"
    with pytest.raises(Unauthenticated) as info:
        auth.check(f"Bearer {wrong}", Permission.READ)
    assert wrong not in str(info.value) and ADMIN.token not in str(info.value)
    with pytest.raises(Unauthenticated):
        auth.authenticate(f"Bearer {ADMIN.sha256}")  # the hash itself is not a credential


def test_wrong_role_permission_denied(auth: Authenticator) -> None:
    with pytest.raises(PermissionDenied) as info:
        auth.check(f"Bearer {VIEWER.token}", Permission.TRAFFIC)
    assert info.value.code == "PERMISSION_DENIED"
    assert "reader" in str(info.value) and VIEWER.token not in str(info.value)
    with pytest.raises(PermissionDenied):
        auth.check(f"Bearer {OPERATOR_PLAIN}", Permission.APPROVE)
    with pytest.raises(PermissionDenied):
        auth.check("Bearer carol:with:colons", Permission.TRAFFIC)
    with pytest.raises(PermissionDenied):
        auth.check("Bearer carol:with:colons", Permission.REGISTER)
    assert auth.check("Bearer carol:with:colons", Permission.APPROVE).name == "carol"
    assert auth.check(f"Bearer {OPERATOR_PLAIN}", Permission.TRAFFIC).name == "ci"
    for permission in Permission:
        assert auth.check(f"Bearer {ADMIN.token}", permission).role is Role.ADMIN


def test_permission_matrix_is_explicit() -> None:
    assert PERMISSIONS[Role.VIEWER] == {Permission.READ}
    assert PERMISSIONS[Role.OPERATOR] == {Permission.READ, Permission.TRAFFIC}
    assert PERMISSIONS[Role.APPROVER] == {Permission.READ, Permission.APPROVE}
    assert PERMISSIONS[Role.ADMIN] == set(Permission)


def test_plain_tokens_never_stored(auth: Authenticator) -> None:
    dumped = repr(auth._entries) + repr(vars(auth))
    for plain in (ADMIN.token, VIEWER.token, OPERATOR_PLAIN, "carol:with:colons"):
        assert plain not in dumped
    assert hash_token(OPERATOR_PLAIN) in dumped
    entry = tokens_file_entry("x", "viewer", ADMIN)
    assert ADMIN.token not in json.dumps(entry) and entry["x"]["token_sha256"] == ADMIN.sha256


def test_generated_tokens_unique_and_hashed() -> None:
    a, b = generate_token(), generate_token()
    assert a.token != b.token and a.token.startswith("lgt_") and len(a.token) > 40
    assert a.sha256 == hash_token(a.token) and len(a.sha256) == 64


def test_json_file_and_bad_config(tmp_path: Path) -> None:
    good = tmp_path / "t.json"
    good.write_text(json.dumps({"ops": {"role": "operator", "token_sha256": VIEWER.sha256.upper()}}))
    assert Authenticator.load(good, env={}).authenticate(f"Bearer {VIEWER.token}").role is Role.OPERATOR
    bad_role = tmp_path / "bad.yaml"
    bad_role.write_text("x: {role: superuser, token_sha256: " + "a" * 64 + "}\n")
    with pytest.raises(InvalidArgument, match="unknown role"):
        Authenticator.load(bad_role, env={})
    with pytest.raises(InvalidArgument, match="64 hex"):
        Authenticator.load(_write(tmp_path, "y: {role: admin, token_sha256: abc}\n"), env={})
    with pytest.raises(InvalidArgument, match="name:role:token"):
        Authenticator.load(None, env={"LOCKGATE_TOKENS": "justaname"})
    with pytest.raises(InvalidArgument, match="twice"):
        Authenticator.load(None, env={"LOCKGATE_TOKENS": "a:admin:t1,a:viewer:t2"})


def test_no_tokens_configured_refuses_everyone() -> None:
    auth = Authenticator.load(None, env={})
    assert len(auth) == 0
    with pytest.raises(Unauthenticated, match="no tokens"):
        auth.authenticate("Bearer anything")


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "tokens-extra.yaml"
    path.write_text(text)
    return path
