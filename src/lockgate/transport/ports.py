"""Who owns the serving port: this lockgate and its ``--workers``, never a stranger.

The gRPC and HTTP ports are bound with SO_REUSEPORT so that ``--workers N`` siblings share
them (the kernel spreads connections across them). The same option let a second, unrelated
lockgate bind a port that was already serving, report ready, and take half the traffic. So the
process that owns the ports -- the single server, or the supervisor of the workers -- claims
each of them first:

* a probe socket *without* SO_REUSEPORT binds the address; if anything else holds the port
  (listening, or bound by another lockgate's claim), that fails and startup stops with one
  line naming the port;
* a holder socket with SO_REUSEPORT (but not SO_REUSEADDR, and never listening) then stays
  bound for the life of the process. The workers' listening sockets join it (same user,
  SO_REUSEPORT on both); a stranger's probe conflicts with it, also during a drain, when the
  listeners are already shut.

The metrics ports (``metrics_port + i`` for worker ``i``) are probed the same way, so a taken
one is a one-line startup error too, before any model is loaded.

``stop_listening`` shuts this process's listening sockets on a port (Linux): the kernel then
refuses new connections while the calls on open ones finish (``transport.drain``).
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import sys
from dataclasses import dataclass, field
from typing import Mapping

log = logging.getLogger("lockgate.server")


class PortInUse(RuntimeError):
    """A port lockgate must own is held by another process: a startup error, one line."""


def _addresses(host: str, port: int) -> list[tuple]:
    host = host.strip("[]") or None
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise PortInUse(f"cannot resolve bind address {host!r}: {exc}") from None
    seen, out = set(), []
    for family, kind, proto, _, address in infos:
        if (family, address) not in seen:
            seen.add((family, address))
            out.append((family, kind, proto, address))
    return out


def _probe(what: str, host: str, port: int) -> None:
    """Bind without SO_REUSEPORT, then let go: fails if anyone holds the port."""
    for family, kind, proto, address in _addresses(host, port):
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a previous run's TIME_WAIT is fine
            try:
                probe.bind(address)
            except OSError as exc:
                if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                    raise PortInUse(
                        f"{what} port {port} on {host or '*'} is already in use by another process "
                        f"({exc.strerror}); lockgate shares its port only with its own --workers"
                    ) from None
                raise PortInUse(f"cannot bind {what} port {port} on {host or '*'}: {exc.strerror}") from None


@dataclass
class PortClaim:
    """The holder sockets that keep the serving ports this process's for as long as it lives."""

    ports: dict[str, int] = field(default_factory=dict)
    holders: list[socket.socket] = field(default_factory=list)

    def release(self) -> None:
        for holder in self.holders:
            holder.close()
        self.holders.clear()


def check_free(what: str, host: str, port: int) -> None:
    """Raise ``PortInUse`` if ``port`` is held by anyone (0 is always free)."""
    if port:
        _probe(what, host, port)


def claim(host: str, ports: Mapping[str, int]) -> PortClaim:
    """Claim each of ``ports`` (``{"gRPC": 8001, "HTTP": 8000}``) for this process and its
    workers (see the module docstring). Raises ``PortInUse``, holding nothing.

    A port of 0 (the kernel picks one) needs no claim.
    """
    wanted = {what: port for what, port in ports.items() if port}
    for what, port in wanted.items():
        _probe(what, host, port)
    held = PortClaim(dict(wanted))
    if not hasattr(socket, "SO_REUSEPORT"):
        return held
    for what, port in wanted.items():
        for family, kind, proto, address in _addresses(host, port):
            holder = socket.socket(family, kind, proto)
            holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            try:
                holder.bind(address)
            except OSError as exc:  # lost a race with a stranger between the probe and here
                holder.close()
                held.release()
                raise PortInUse(f"{what} port {port} on {host or '*'} was taken during startup ({exc.strerror})") from None
            held.holders.append(holder)
    return held


def stop_listening(port: int) -> int:
    """Shut every listening TCP socket of this process on ``port``; returns how many.

    grpc offers no way to stop accepting connections short of stopping the server (which
    cancels the calls its core has received but not yet handed over), so the sockets are
    found among the process's descriptors and shut: the kernel refuses new connections, open
    ones carry on. grpc notices on its next accept and logs one "Closing acceptor" line.
    Linux only; elsewhere nothing is shut and new connections get UNAVAILABLE per call.
    """
    if not sys.platform.startswith("linux") or not port:
        return 0
    shut: set[str] = set()
    for entry in os.scandir("/proc/self/fd"):
        try:
            target = os.readlink(entry.path)
        except OSError:
            continue
        if not target.startswith("socket:") or target in shut:
            continue
        try:
            sock = socket.socket(fileno=os.dup(int(entry.name)))
        except OSError:
            continue
        with sock:
            try:
                if (sock.family in (socket.AF_INET, socket.AF_INET6) and sock.type == socket.SOCK_STREAM
                        and sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
                        and sock.getsockname()[1] == port):
                    sock.shutdown(socket.SHUT_RDWR)
                    shut.add(target)
            except OSError:
                continue
    return len(shut)
