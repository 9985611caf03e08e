"""``lockgate.admin.v1.AdminService`` over REST: ``POST /admin/v1/{Method}`` with the request
message as JSON, answered with the response message as JSON.

Each call runs the gRPC servicer's own method in process (``AdminService.call``) with the
``Authorization: Bearer`` header, so tokens, roles, four-eyes rules and audit are exactly the
admin API's. Failures are ``{"error": "..."}`` with the HTTP status of their code.
"""

from __future__ import annotations

from google.protobuf import json_format

from lockgate.errors import InvalidArgument, LockgateError, NotFound
from lockgate.transport import model_info
from lockgate.transport.grpc.admin import METHODS, AdminService
from lockgate.transport.http.messages import HttpRequest, HttpResponse, error_response, json_response

PREFIX = "/admin/v1/"


class RestAdmin:
    def __init__(self, service: AdminService) -> None:
        self.service = service

    async def handle(self, request: HttpRequest) -> HttpResponse | None:
        if not request.path.startswith(PREFIX):
            return None
        method = request.path[len(PREFIX):].strip("/")
        try:
            if method not in METHODS:
                raise NotFound(f"the admin API has no method {method!r}; methods: {', '.join(sorted(METHODS))}")
            if request.method != "POST":
                response = error_response(InvalidArgument(f"{request.path} takes POST, not {request.method}"))
                response.status = 405
                response.headers.append(("allow", "POST"))
                return response
            message = METHODS[method][0]()
            if request.body.strip():
                try:
                    json_format.Parse(request.body, message)
                except json_format.ParseError as exc:
                    raise InvalidArgument(f"the body is not a valid {message.DESCRIPTOR.name}: {exc}") from None
            result = await self.service.call(method, message, request.headers.get("authorization"))
            return json_response(model_info.to_json(result))
        except LockgateError as exc:
            return error_response(exc)
