"""The HTTP port: uvicorn (httptools parser) serving ``HttpApp`` on the process's own event loop.

uvicorn was chosen by measurement against granian (its embedded server, ASGI and RSGI) on this
application: see ``benchmarks/README.md`` ("HTTP server A/B"). It runs inside the gateway's
loop (uvloop) beside grpc.aio, so both transports share one pipeline, one repository and one
set of statistics per process. The listening socket is bound here with SO_REUSEPORT, so
``--workers N`` processes share the HTTP port as they share the gRPC port. uvicorn's own signal
handlers are not installed: the gateway drains both servers on SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from typing import Any, Iterator

import uvicorn

from lockgate.config import TLSSettings

log = logging.getLogger("lockgate.http")


class _EmbeddedServer(uvicorn.Server):
    """A uvicorn server that leaves signals to its host process."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket with SO_REUSEPORT (shared by ``--workers`` siblings)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.setblocking(False)
    return sock


class HttpServer:
    def __init__(self, app: Any, *, host: str, port: int, tls: TLSSettings | None, drain_timeout_s: float) -> None:
        self._app = app
        self._host = host
        self._port = port
        self._tls = tls
        self._drain_timeout_s = drain_timeout_s
        self._server: _EmbeddedServer | None = None
        self._task: asyncio.Task | None = None
        self.port = 0

    async def start(self) -> int:
        sock = bind(self._host, self._port)
        self.port = sock.getsockname()[1]
        tls = self._tls
        options: dict[str, Any] = {}
        if tls is not None:
            options.update(ssl_certfile=str(tls.cert_file), ssl_keyfile=str(tls.key_file))
            if tls.client_ca_file is not None:
                options.update(ssl_ca_certs=str(tls.client_ca_file), ssl_cert_reqs=ssl.CERT_REQUIRED)
        config = uvicorn.Config(
            self._app, http="httptools", loop="none", lifespan="off", log_config=None, access_log=False,
            server_header=False, date_header=False, timeout_graceful_shutdown=max(1, int(self._drain_timeout_s)),
            backlog=2048, **options,
        )
        self._server = _EmbeddedServer(config)
        self._task = asyncio.get_running_loop().create_task(self._server.serve(sockets=[sock]))
        while not self._server.started:
            if self._task.done():
                self._task.result()  # raises what stopped it
                raise RuntimeError("the HTTP server stopped while starting")
            await asyncio.sleep(0.01)
        log.info("HTTP (KServe v2 REST, admin API, console) on %s://%s:%d", "https" if tls else "http",
                 self._host, self.port)
        return self.port

    async def stop(self) -> None:
        """Refuse new connections, let requests in flight finish (bounded), close idle ones."""
        if self._server is None or self._task is None:
            return
        self._server.should_exit = True
        try:
            await asyncio.wait_for(asyncio.shield(self._task), self._drain_timeout_s + 5)
        except asyncio.TimeoutError:
            self._server.force_exit = True
            await asyncio.gather(self._task, return_exceptions=True)
