"""The HTTP request and response as the handlers see them, whatever server carries them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

from lockgate.protocol.rest import dumps
from lockgate.transport.http.status import error_body, http_status

JSON = "application/json"


@dataclass(slots=True)
class HttpRequest:
    method: str
    path: str
    headers: Mapping[str, str]  # lower-case names
    body: bytes = b""
    query: str = ""

    def header(self, name: str) -> str | None:
        return self.headers.get(name)


@dataclass(slots=True)
class HttpResponse:
    status: int = 200
    body: bytes = b""
    content_type: str = JSON
    headers: list[tuple[str, str]] = field(default_factory=list)


def json_response(value: object, status: int = 200) -> HttpResponse:
    return HttpResponse(status, dumps(value))


def error_response(exc: BaseException) -> HttpResponse:
    """``{"error": "..."}`` with the HTTP status of the failure's code (the one mapping)."""
    return HttpResponse(http_status(exc), error_body(exc))
