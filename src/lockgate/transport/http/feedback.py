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
from typing import Any

from lockgate.transport import model_info
from lockgate.transport.grpc.feedback import METHODS, FeedbackService
from lockgate.transport.http.rpc import RestRpc

PREFIX = "/feedback/v1/"


def _render(method: str, message: Any) -> object:
    return json.loads(message.report_json) if method == "GetOutcomes" else model_info.to_json(message)


class RestFeedback(RestRpc):
    def __init__(self, service: FeedbackService) -> None:
        super().__init__("feedback API", PREFIX, METHODS, service.call, _render)
        self.service = service
