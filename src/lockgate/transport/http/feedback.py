"""``lockgate.feedback.v1.FeedbackService`` over REST: ``POST /feedback/v1/SendFeedback`` and
``POST /feedback/v1/GetOutcomes`` with the request message as JSON (protobuf's JSON mapping:
``{"model": "m", "labels": [{"request_id": "r1", "row": 0, "class_name": "approve"}]}``).

Each call runs the gRPC servicer's own method in process (``FeedbackService.call``) with the
``Authorization: Bearer`` header, so the ``feedback`` permission, the counts and the audit
entry per call are exactly the gRPC API's. ``SendFeedback`` answers the ``FeedbackSummary``
as JSON; ``GetOutcomes`` the report document itself. Failures are ``{"error": "..."}`` with
the HTTP status of their code (a malformed label: 400, naming the label and field).
"""

from __future__ import annotations

import json

from google.protobuf import json_format

from lockgate.errors import InvalidArgument, LockgateError, NotFound
from lockgate.transport import model_info
from lockgate.transport.grpc.feedback import METHODS, FeedbackService
from lockgate.transport.http.messages import HttpRequest, HttpResponse, error_response, json_response

PREFIX = "/feedback/v1/"


class RestFeedback:
    def __init__(self, service: FeedbackService) -> None:
        self.service = service

    async def handle(self, request: HttpRequest) -> HttpResponse | None:
        if not request.path.startswith(PREFIX):
            return None
        method = request.path[len(PREFIX):].strip("/")
        try:
            if method not in METHODS:
                raise NotFound(f"the feedback API has no REST method {method!r}; methods: {', '.join(sorted(METHODS))}")
            if request.method != "POST":
                response = error_response(InvalidArgument(f"{request.path} takes POST, not {request.method}"))
                response.status = 405
                response.headers.append(("allow", "POST"))
                return response
            message = METHODS[method]()
            if request.body.strip():
                try:
                    json_format.Parse(request.body, message)
                except json_format.ParseError as exc:
                    raise InvalidArgument(f"the body is not a valid {message.DESCRIPTOR.name}: {exc}") from None
            result = await self.service.call(method, message, request.headers.get("authorization"))
            if method == "GetOutcomes":
                return json_response(json.loads(result.report_json))
            return json_response(model_info.to_json(result))
        except LockgateError as exc:
            return error_response(exc)
