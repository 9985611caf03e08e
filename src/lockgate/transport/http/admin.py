"""``lockgate.admin.v1.AdminService`` over REST: ``POST /admin/v1/{Method}`` with the request
message as JSON, answered with the response message as JSON.

Each call runs the gRPC servicer's own method in process (``AdminService.call``) with the
``Authorization: Bearer`` header, so tokens, roles, four-eyes rules and audit are exactly the
admin API's. Failures are ``{"error": "..."}`` with the HTTP status of their code.
"""

from __future__ import annotations

from lockgate.transport.grpc.admin import METHODS, AdminService
from lockgate.transport.http.rpc import RestRpc

PREFIX = "/admin/v1/"


class RestAdmin(RestRpc):
    def __init__(self, service: AdminService) -> None:
        super().__init__("admin API", PREFIX, {name: types[0] for name, types in METHODS.items()}, service.call)
        self.service = service
