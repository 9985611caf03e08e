"""The Open Inference Protocol's REST binding (KServe v2, with Triton's extensions).

``GET /v2``, ``/v2/health/live``, ``/v2/health/ready``; ``/v2/models/{m}[/versions/{v}]`` with
``/ready``, ``/config`` and ``/stats``; ``POST .../infer``; Triton's ``POST /v2/repository/index``
and ``/v2/repository/models/{m}/load|unload``.

A thin adapter, like the gRPC servicer: an infer body becomes the ``ModelInferRequest`` a gRPC
client would send (``protocol.rest``) and goes down the same ``InferencePipeline``, so routing,
governance, audit, statistics and telemetry are the ones of gRPC. Metadata, config and
statistics are the gRPC messages in JSON (``transport.model_info``). ``traceparent`` and the
``x-lockgate-routing-key`` header reach the pipeline as gRPC metadata would; request parameter
``timeout`` (µs, as in Triton) is the request's deadline.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Awaitable, Callable

from lockgate._proto import inference_pb2 as pb
from lockgate.control.actor import acting_as, repository_actor
from lockgate.control.auth import Authenticator
from lockgate.errors import InferenceFailed, InvalidArgument, LockgateError, NotFound
from lockgate.pipeline import InferencePipeline, RequestContext
from lockgate.protocol import rest
from lockgate.serving.repository import ModelRepository
from lockgate.telemetry.logs import CauseLog
from lockgate.telemetry.tracing import HTTP_INFER
from lockgate.transport import model_info
from lockgate.transport.http.messages import HttpRequest, HttpResponse, error_response, json_response

log = logging.getLogger("lockgate.http")

OCTET_STREAM = "application/octet-stream"
Handler = Callable[[HttpRequest], Awaitable[HttpResponse]]


def _deadline(request: Any) -> float | None:
    """Triton's ``timeout`` request parameter (µs) as a monotonic deadline."""
    param = request.parameters.get("timeout") if request.parameters else None
    if param is None:
        return None
    which = param.WhichOneof("parameter_choice")
    value = getattr(param, which) if which else None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise InvalidArgument("request parameter 'timeout' must be a positive number of microseconds")
    return time.monotonic() + value / 1e6


class RestInference:
    """The KServe v2 endpoints over one repository and pipeline."""

    def __init__(self, repository: ModelRepository, pipeline: InferencePipeline, *, ready: asyncio.Event,
                 auth: Authenticator, events: CauseLog | None = None) -> None:
        self.repository = repository
        self.pipeline = pipeline
        self._ready = ready
        self._auth = auth
        self.events = events or CauseLog(log)  # shared with the HttpApp: internal, ...

    async def handle(self, request: HttpRequest) -> HttpResponse | None:
        """The response for a ``/v2`` path, or None when the path is not one of ours."""
        parts = request.path.strip("/").split("/")
        if not parts or parts[0] != "v2":
            return None
        try:
            return await self._dispatch(request, parts)
        except MethodNotAllowed as exc:
            response = error_response(exc)
            response.status = 405
            response.headers.append(("allow", exc.allowed))
            return response
        except LockgateError as exc:
            return error_response(exc)

    async def _dispatch(self, request: HttpRequest, parts: list[str]) -> HttpResponse:
        method = request.method
        n = len(parts)
        if n >= 3 and parts[1] == "models":
            name = parts[2]
            version = ""
            rest_parts = parts[3:]
            if len(rest_parts) >= 2 and rest_parts[0] == "versions":
                version = rest_parts[1]
                rest_parts = rest_parts[2:]
            action = rest_parts[0] if rest_parts else ""
            if len(rest_parts) > 1:
                raise NotFound(f"no such endpoint: {request.path}")
            if action == "infer":
                _require(method, "POST", request.path)
                return await self.infer(request, name, version)
            _require(method, "GET", request.path)
            if action == "":
                return json_response(model_info.to_json(model_info.metadata(self.repository, name, version)))
            if action == "ready":
                ready = self.repository.is_ready(name, version)
                return HttpResponse(200 if ready else 503, b"" if ready else rest.dumps(
                    {"error": f"model '{name}'{f' version {version}' if version else ''} is not ready"}))
            if action == "config":
                return json_response(model_info.to_json(model_info.config(self.repository, name, version).config))
            if action == "stats":
                return json_response(model_info.to_json(model_info.statistics(self.repository, name, version)))
            raise NotFound(f"no such endpoint: {request.path}")
        if n == 1:
            _require(method, "GET", request.path)
            return json_response(model_info.to_json(model_info.server_metadata()))
        if n == 3 and parts[1] == "health":
            _require(method, "GET", request.path)
            if parts[2] == "live":
                return HttpResponse(200)
            if parts[2] == "ready":
                return HttpResponse(200) if self._ready.is_set() else HttpResponse(503, rest.dumps({"error": "not ready"}))
        if n >= 3 and parts[1] == "repository":
            _require(method, "POST", request.path)
            return await self.repository_call(request, parts[2:])
        raise NotFound(f"no such endpoint: {request.path}")

    # -- infer -----------------------------------------------------------------------
    async def infer(self, http: HttpRequest, name: str, version: str) -> HttpResponse:
        request = pb.ModelInferRequest()
        try:
            header, binary = rest.split_body(http.body, http.headers.get(rest.HEADER_LENGTH))
            all_binary = rest.build_request(header, binary, request, name, version)
        except InvalidArgument as exc:  # the body is no infer request: counted, logged once a while
            self.events.record("undecodable", "undecodable infer body (%d bytes) for model %r: %s; answered 400",
                               len(http.body), name[:200], exc.message[:200], level=logging.INFO)
            raise
        headers = http.headers
        ctx = RequestContext(deadline=_deadline(request), metadata_source=lambda: headers, method=HTTP_INFER)
        try:
            response = await self.pipeline.infer(request, pb.ModelInferResponse, ctx)
        except LockgateError:
            raise
        except Exception as exc:  # a bug of ours: INTERNAL naming the type (never its arguments), as over gRPC
            self.events.record("internal", "infer of model %r failed with an internal error", name[:200],
                               exc_info=exc, level=logging.ERROR)
            raise InferenceFailed(f"internal error in lockgate ({type(exc).__name__}); see the server log") from None
        body, header_length = rest.encode_response(request, response, all_binary,
                                                   self.pipeline.limits.max_output_bytes)
        if header_length is None:
            return HttpResponse(200, body)
        return HttpResponse(200, body, OCTET_STREAM, [("inference-header-content-length", str(header_length))])

    # -- repository ------------------------------------------------------------------
    async def repository_call(self, http: HttpRequest, parts: list[str]) -> HttpResponse:
        body = rest.parse_json(http.body) if http.body.strip() else {}
        if not isinstance(body, dict):
            raise InvalidArgument("the request body must be a JSON object")
        if parts == ["index"]:
            ready_only = bool(body.get("ready", False))
            return json_response([
                {"name": e.name, "version": e.version, "state": e.state, "reason": e.reason}
                for e in self.repository.index() if not ready_only or e.state == "READY"
            ])
        if len(parts) == 3 and parts[0] == "models" and parts[2] in ("load", "unload"):
            action, model = parts[2], parts[1]
            with acting_as(repository_actor(self._auth, http.headers.get("authorization"), action, model)):
                if action == "load":
                    await self.repository.load(model)
                else:
                    await self.repository.unload(model)
            return HttpResponse(200)
        raise NotFound(f"no such endpoint: /v2/repository/{'/'.join(parts)}")


def _require(method: str, wanted: str, path: str) -> None:
    if method != wanted:
        raise MethodNotAllowed(f"{path} takes {wanted}, not {method}", wanted)


class MethodNotAllowed(InvalidArgument):
    """A known path called with the wrong HTTP method (405, with ``Allow``)."""

    reason = "method_not_allowed"

    def __init__(self, message: str, allowed: str) -> None:
        super().__init__(message)
        self.allowed = allowed
