"""The one mapping from lockgate's error hierarchy to HTTP statuses.

Each canonical status maps as google.rpc's ``code.proto`` documents it (INVALID_ARGUMENT 400,
UNAUTHENTICATED 401, PERMISSION_DENIED 403, NOT_FOUND 404, RESOURCE_EXHAUSTED 429,
UNAVAILABLE 503, DEADLINE_EXCEEDED 504, ...). The body is ``{"error": "..."}`` with
``errors.caller_message``: the text a gRPC caller gets for the same failure.
"""

from __future__ import annotations

from lockgate.errors import caller_message, status_code
from lockgate.protocol.rest import dumps

HTTP_STATUS: dict[str, int] = {
    "OK": 200, "CANCELLED": 499, "UNKNOWN": 500, "INVALID_ARGUMENT": 400, "DEADLINE_EXCEEDED": 504,
    "NOT_FOUND": 404, "ALREADY_EXISTS": 409, "PERMISSION_DENIED": 403, "RESOURCE_EXHAUSTED": 429,
    "FAILED_PRECONDITION": 400, "ABORTED": 409, "OUT_OF_RANGE": 400, "UNIMPLEMENTED": 501,
    "INTERNAL": 500, "UNAVAILABLE": 503, "DATA_LOSS": 500, "UNAUTHENTICATED": 401,
}


def http_status(exc: BaseException) -> int:
    return HTTP_STATUS.get(status_code(exc), 500)


def error_body(exc: BaseException) -> bytes:
    return dumps({"error": caller_message(exc)})
