"""Who a change is made for, when it passes through code that takes no actor argument.

A model load or unload started by a caller (Triton's ``RepositoryModelLoad``/``Unload``) runs
through the repository, which knows nothing of principals, and is audited by the control
plane's repository listener. The servicer wraps the call in ``acting_as(principal.name)``; the
listener reads ``current_actor()``, which is the system's own name for work nobody asked for
(the loads at start-up). A context variable follows the call's task and every thread it hands
work to (``asyncio.to_thread`` copies the context), and never leaks into another call.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

SYSTEM_ACTOR = "system:lockgate"

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
