"""Errors that cross the request path, each carrying the gRPC status it maps to.

The data plane raises these; only the protocol layer turns them into gRPC statuses, so the
pipeline stays transport-agnostic and every failure has exactly one, precise status code.
"""

from __future__ import annotations

from typing import Any

import grpc


class LockgateError(Exception):
    """Base class: a client-visible failure with a status code and a precise message."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    reason: str = "internal"

    def __init__(self, message: str, *, details: Any = None) -> None:
        super().__init__(message)
        self.message = message
        # Optional protobuf message packed into google.rpc.Status details (e.g. BadRequest).
        self.details = details


class InvalidArgument(LockgateError):
    code = grpc.StatusCode.INVALID_ARGUMENT
    reason = "invalid_argument"


class NotFound(LockgateError):
    code = grpc.StatusCode.NOT_FOUND
    reason = "not_found"


class ResourceExhausted(LockgateError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = "queue_full"


class DeadlineExceeded(LockgateError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED
    reason = "deadline_exceeded"


class PermissionDenied(LockgateError):
    code = grpc.StatusCode.PERMISSION_DENIED
    reason = "permission_denied"


class Unauthenticated(LockgateError):
    code = grpc.StatusCode.UNAUTHENTICATED
    reason = "unauthenticated"


class Unavailable(LockgateError):
    code = grpc.StatusCode.UNAVAILABLE
    reason = "unavailable"


class FailedPrecondition(LockgateError):
    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = "failed_precondition"


class InferenceFailed(LockgateError):
    code = grpc.StatusCode.INTERNAL
    reason = "inference_failed"
