"""The HTTP port as one ASGI application: KServe v2 REST, the admin API and the console.

It reads the body (refusing more than ``max_body_bytes`` before reading it, and inflating a
gzip/deflate ``Content-Encoding`` only up to the same bound), hands an ``HttpRequest`` to each
part in turn, and writes the ``HttpResponse`` back. No framework sits in between: on the infer
path this is all the HTTP work there is besides the server's own parsing.

On SIGTERM the process's ``DrainGate`` decides, as it does for gRPC calls: a request that
arrives on an open connection within the admission window is served; one after it is answered
503 ("shutting down; not run"). While draining every response says ``Connection: close``, so
clients take their next request elsewhere, and the process stops only when no request is in
flight (``transport.drain``).
"""

from __future__ import annotations

import logging
import zlib
from typing import Awaitable, Callable, Sequence

from lockgate.errors import InvalidArgument, NotFound, ResourceExhausted
from lockgate.telemetry.logs import CauseLog
from lockgate.transport.drain import DrainGate, shutting_down
from lockgate.transport.http.messages import HttpRequest, HttpResponse, error_response

log = logging.getLogger("lockgate.http")

Part = Callable[[HttpRequest], Awaitable[HttpResponse | None]]


class BodyTooLarge(ResourceExhausted):
    reason = "body_too_large"


class HttpApp:
    def __init__(self, parts: Sequence[Part], *, max_body_bytes: int, gate: DrainGate | None = None,
                 events: CauseLog | None = None) -> None:
        self.parts = tuple(parts)
        self.max_body_bytes = max_body_bytes
        self.gate = gate or DrainGate()
        self.events = events or CauseLog(log)  # internal, refused_draining

    async def __call__(self, scope: dict, receive: Callable[[], Awaitable[dict]], send: Callable[[dict], Awaitable[None]]) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            await self._lifespan(receive, send)
            return
        if kind != "http":
            return
        gate = self.gate
        if gate.draining and not gate.admit():
            self.events.record("refused_draining", "HTTP %s %s refused: shutting down", scope.get("method"),
                               scope.get("path", "")[:200], level=logging.INFO)
            await self._send(send, error_response(shutting_down()), closing=True)
            return
        gate.in_flight += 1
        try:
            response = await self._respond(scope, receive)
            await self._send(send, response, closing=gate.draining)
        finally:
            gate.in_flight -= 1

    async def _respond(self, scope: dict, receive: Callable[[], Awaitable[dict]]) -> HttpResponse:
        headers: dict[str, str] = {}
        for key, value in scope["headers"]:
            name = key.decode("latin-1")
            text = value.decode("latin-1")
            headers[name] = f"{headers[name]}, {text}" if name in headers else text
        try:
            body = await self._read_body(headers, receive)
            request = HttpRequest(scope["method"], scope["path"], headers, body, scope.get("query_string", b"").decode("latin-1"))
            response = None
            for part in self.parts:
                response = await part(request)
                if response is not None:
                    break
            if response is None:
                response = error_response(NotFound(f"no such endpoint: {scope['path']}"))
        except BodyTooLarge as exc:
            response = error_response(exc)
            response.status = 413
        except InvalidArgument as exc:
            response = error_response(exc)
        except Exception as exc:  # a bug of ours: answered, logged (once a while), and the server goes on
            self.events.record("internal", "HTTP %s %s failed with an internal error", scope.get("method"),
                               scope.get("path", "")[:200], exc_info=exc, level=logging.ERROR)
            response = error_response(exc)
        return response

    @staticmethod
    async def _send(send: Callable[[dict], Awaitable[None]], response: HttpResponse, *, closing: bool) -> None:
        out_headers = [(b"content-type", response.content_type.encode("latin-1")),
                       (b"content-length", str(len(response.body)).encode("latin-1"))]
        out_headers.extend((k.encode("latin-1"), v.encode("latin-1")) for k, v in response.headers)
        if closing:  # draining: the client's next request goes to another replica
            out_headers.append((b"connection", b"close"))
        await send({"type": "http.response.start", "status": response.status, "headers": out_headers})
        await send({"type": "http.response.body", "body": response.body})

    async def _read_body(self, headers: dict[str, str], receive: Callable[[], Awaitable[dict]]) -> bytes:
        limit = self.max_body_bytes
        declared = headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise BodyTooLarge(f"the request body of {declared} bytes exceeds the limit of {limit} bytes")
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise InvalidArgument("the client went away before sending the whole body")
            chunk = message.get("body", b"")
            if chunk:
                size += len(chunk)
                if size > limit:
                    raise BodyTooLarge(f"the request body exceeds the limit of {limit} bytes")
                chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        encoding = headers.get("content-encoding")
        if encoding and encoding != "identity":
            body = self._inflate(body, encoding)
        return body

    def _inflate(self, body: bytes, encoding: str) -> bytes:
        """gzip or deflate (zlib) bodies, as tritonclient sends them; bounded like a plain body."""
        if encoding == "gzip":
            decoder = zlib.decompressobj(16 + zlib.MAX_WBITS)
        elif encoding == "deflate":
            decoder = zlib.decompressobj()
        else:
            raise InvalidArgument(f"Content-Encoding {encoding!r} is not supported (gzip, deflate)")
        try:
            out = decoder.decompress(body, self.max_body_bytes + 1)
        except zlib.error as exc:
            raise InvalidArgument(f"the {encoding} body cannot be decompressed: {exc}") from None
        if len(out) > self.max_body_bytes or decoder.unconsumed_tail:
            raise BodyTooLarge(f"the decompressed request body exceeds the limit of {self.max_body_bytes} bytes")
        return out

    @staticmethod
    async def _lifespan(receive: Callable[[], Awaitable[dict]], send: Callable[[dict], Awaitable[None]]) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return


__all__ = ["HttpApp", "Part"]
