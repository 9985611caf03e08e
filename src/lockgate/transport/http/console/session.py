"""Console sessions: a signed, expiring cookie naming the principal, and CSRF tokens bound to it.

The token a person signs in with is checked once (``Authenticator.authenticate``) and never
stored, logged or put in a URL: the session cookie carries only the principal's name, role,
expiry and a random session id, signed with HMAC-SHA256 under the server's session key
(``console_session_key``; ``--workers`` siblings share one, so a session works on any of
them). The cookie is HttpOnly and SameSite=Strict (Secure with TLS). Every state-changing form
carries a CSRF token derived from the session id under the same key, checked in constant
time; the sign-in form has its own double-submit token, since it has no session yet.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass

from lockgate.control.auth import Principal, Role

COOKIE = "lockgate_session"
LOGIN_COOKIE = "lockgate_login"
SESSION_TTL_S = 8 * 3600


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass(frozen=True, slots=True)
class Session:
    principal: Principal
    session_id: str
    expires: float


class SessionSigner:
    def __init__(self, key: bytes, *, secure: bool, ttl_s: float = SESSION_TTL_S) -> None:
        if len(key) < 16:
            raise ValueError("the console session key must be at least 16 bytes")
        self._key = key
        self._secure = secure
        self.ttl_s = ttl_s

    def _mac(self, purpose: str, payload: str) -> str:
        return _b64(hmac.new(self._key, f"{purpose}:{payload}".encode(), hashlib.sha256).digest())

    # -- the session cookie ---------------------------------------------------------------
    def issue(self, principal: Principal, now: float | None = None) -> tuple[Session, str]:
        """A new session and its ``Set-Cookie`` value."""
        expires = (now or time.time()) + self.ttl_s
        session = Session(principal, secrets.token_urlsafe(18), expires)
        payload = _b64(json.dumps({"sub": principal.name, "role": principal.role.value, "sid": session.session_id,
                                   "exp": int(expires)}, separators=(",", ":")).encode())
        value = f"{payload}.{self._mac('session', payload)}"
        return session, self._cookie(COOKIE, value, int(self.ttl_s))

    def read(self, cookie_header: str | None, now: float | None = None) -> Session | None:
        """The session a request's cookies carry, if its signature holds and it has not expired."""
        value = cookies(cookie_header).get(COOKIE)
        if not value or "." not in value:
            return None
        payload, mac = value.rsplit(".", 1)
        if not hmac.compare_digest(mac, self._mac("session", payload)):
            return None
        try:
            data = json.loads(_unb64(payload))
            principal = Principal(str(data["sub"]), Role(data["role"]))
            expires = float(data["exp"])
            session_id = str(data["sid"])
        except (ValueError, KeyError, TypeError):
            return None
        if expires <= (now or time.time()):
            return None
        return Session(principal, session_id, expires)

    def clear(self) -> str:
        return self._cookie(COOKIE, "", 0)

    # -- CSRF -----------------------------------------------------------------------------
    def csrf_token(self, session: Session) -> str:
        return self._mac("csrf", session.session_id)

    def check_csrf(self, session: Session, presented: str | None) -> bool:
        return bool(presented) and hmac.compare_digest(presented or "", self.csrf_token(session))

    def login_token(self) -> tuple[str, str]:
        """A double-submit token for the sign-in form: (form value, ``Set-Cookie``)."""
        nonce = secrets.token_urlsafe(18)
        return nonce, self._cookie(LOGIN_COOKIE, f"{nonce}.{self._mac('login', nonce)}", 600)

    def check_login(self, cookie_header: str | None, presented: str | None) -> bool:
        value = cookies(cookie_header).get(LOGIN_COOKIE, "")
        nonce, _, mac = value.partition(".")
        return (bool(nonce) and bool(presented) and hmac.compare_digest(mac, self._mac("login", nonce))
                and hmac.compare_digest(nonce, presented or ""))

    def _cookie(self, name: str, value: str, max_age: int) -> str:
        secure = "; Secure" if self._secure else ""
        return f"{name}={value}; Path=/console; Max-Age={max_age}; HttpOnly; SameSite=Strict{secure}"


def cookies(header: str | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for part in (header or "").replace(",", ";").split(";"):
        name, sep, value = part.strip().partition("=")
        if sep:
            out[name] = value
    return out
