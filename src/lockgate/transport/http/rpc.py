"""The unary RPCs of a gRPC service over REST: ``POST {prefix}{Method}`` with the request
message as JSON (protobuf's JSON mapping), answered with the response as JSON.

The admin API (``transport.http.admin``) and the feedback API (``transport.http.feedback``)
share it: each call runs the servicer's own method in process with the ``Authorization``
header, so authentication, permissions and audit are those of the gRPC API. Failures are
``{"error": "..."}`` with the HTTP status of their code.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from google.protobuf import json_format

from lockgate.errors import InvalidArgument, LockgateError, NotFound
from lockgate.transport import model_info
from lockgate.transport.http.messages import HttpRequest, HttpResponse, error_response, json_response

#: ``call(method, request message, authorization header)`` -> response message
CallFn = Callable[[str, Any, str | None], Awaitable[Any]]


class RestRpc:
    def __init__(self, api: str, prefix: str, requests: Mapping[str, type], call: CallFn,
                 render: Callable[[str, Any], object] | None = None) -> None:
        """``requests``: method name -> its request message class; ``render(method,
        response)`` -> the JSON body (default: the message in Triton's REST JSON)."""
        self.api = api
        self.prefix = prefix
        self.requests = dict(requests)
        self.call = call
        self.render = render or (lambda method, message: model_info.to_json(message))

    async def handle(self, request: HttpRequest) -> HttpResponse | None:
        if not request.path.startswith(self.prefix):
            return None
        method = request.path[len(self.prefix):].strip("/")
        try:
            if method not in self.requests:
                raise NotFound(f"the {self.api} has no REST method {method!r}; methods: {', '.join(sorted(self.requests))}")
            if request.method != "POST":
                response = error_response(InvalidArgument(f"{request.path} takes POST, not {request.method}"))
                response.status = 405
                response.headers.append(("allow", "POST"))
                return response
            message = self.requests[method]()
            if request.body.strip():
                try:
                    json_format.Parse(request.body, message)
                except json_format.ParseError as exc:
                    raise InvalidArgument(f"the body is not a valid {message.DESCRIPTOR.name}: {exc}") from None
            result = await self.call(method, message, request.headers.get("authorization"))
            return json_response(self.render(method, result))
        except LockgateError as exc:
            return error_response(exc)
