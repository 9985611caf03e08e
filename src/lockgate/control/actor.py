"""Who a change is made for, when it passes through code that takes no actor argument.

A model load or unload started by a caller (Triton's ``RepositoryModelLoad``/``Unload`` over
gRPC, ``POST /v2/repository/models/{m}/load|unload`` over REST) runs through the repository,
which knows nothing of principals, and is audited by the control plane's repository listener.
Each transport wraps the call in ``acting_as(repository_actor(...))``; the
listener reads ``current_actor()``, which is the system's own name for work nobody asked for
(the loads at start-up). A context variable follows the call's task and every thread it hands
work to (``asyncio.to_thread`` copies the context), and never leaks into another call.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from lockgate.control.auth import Authenticator, Permission
from lockgate.errors import LockgateError

log = logging.getLogger("lockgate.control")

SYSTEM_ACTOR = "system:lockgate"
# The audit trail's actor for a repository change when no tokens are configured (the API is
# then open, as Triton's is): nobody authenticated, so nobody is named.
ANONYMOUS_ACTOR = "anonymous"

_ACTOR: ContextVar[str | None] = ContextVar("lockgate_actor", default=None)


@contextmanager
def acting_as(name: str) -> Iterator[None]:
    """Attribute what runs inside the block to ``name`` (the audit trail's actor)."""
    token = _ACTOR.set(name)
    try:
        yield
    finally:
        _ACTOR.reset(token)


def current_actor() -> str:
    """The principal the current work is done for; ``SYSTEM_ACTOR`` when nobody asked."""
    return _ACTOR.get() or SYSTEM_ACTOR


def repository_actor(auth: Authenticator | None, authorization: str | None, action: str, model: str) -> str:
    """Who asks to load or unload ``model`` (Triton's repository API, over gRPC or REST): the
    token's principal when tokens are configured -- UNAUTHENTICATED without a valid token,
    PERMISSION_DENIED for a role without ``load`` -- else ``ANONYMOUS_ACTOR``."""
    if auth is None or not len(auth):
        actor = ANONYMOUS_ACTOR
    else:
        try:
            actor = auth.check(authorization, Permission.LOAD).name
        except LockgateError as exc:
            log.info("%s of model %r refused: %s", action, model[:200], exc.message)
            raise
    log.info("%s of model %r by %s", action, model[:200], actor)
    return actor
