"""The one error hierarchy of lockgate, shared by the data plane and the control plane.

Every failure a caller can see is a ``LockgateError`` that names its status (``code``, the
canonical gRPC status name) and its failure reason (the ``reason`` label on metrics). Nothing
here imports a transport: ``transport.grpc.status`` maps ``code`` to a gRPC status and
``transport.http`` maps it to an HTTP status, each in exactly one place, so a failure has the
same precise meaning whichever way the request came in.
"""

from __future__ import annotations

from typing import Any

#: The canonical status codes (google.rpc.Code), by name: traces record them as numbers.
CODE_NUMBERS: dict[str, int] = {
    "OK": 0, "CANCELLED": 1, "UNKNOWN": 2, "INVALID_ARGUMENT": 3, "DEADLINE_EXCEEDED": 4,
    "NOT_FOUND": 5, "ALREADY_EXISTS": 6, "PERMISSION_DENIED": 7, "RESOURCE_EXHAUSTED": 8,
    "FAILED_PRECONDITION": 9, "ABORTED": 10, "OUT_OF_RANGE": 11, "UNIMPLEMENTED": 12,
    "INTERNAL": 13, "UNAVAILABLE": 14, "DATA_LOSS": 15, "UNAUTHENTICATED": 16,
}


#: Cap on the text of an error message sent to a caller: the message names the input, row,
#: feature and rule, never an unbounded echo of what the caller sent.
MAX_MESSAGE_CHARS = 1024


class LockgateError(Exception):
    """Base class: a client-visible failure with a status code and a precise message."""

    code: str = "INTERNAL"
    reason: str = "internal"

    def __init__(self, message: str, *, details: Any = None) -> None:
        super().__init__(message)
        self.message = message
        # Optional protobuf message packed into google.rpc.Status details (e.g. BadRequest).
        self.details = details


# -- the status classes ------------------------------------------------------------------
class InvalidArgument(LockgateError):
    code = "INVALID_ARGUMENT"
    reason = "invalid_argument"


class NotFound(LockgateError):
    code = "NOT_FOUND"
    reason = "not_found"


class AlreadyExists(LockgateError):
    code = "ALREADY_EXISTS"
    reason = "already_exists"


class ResourceExhausted(LockgateError):
    code = "RESOURCE_EXHAUSTED"
    reason = "queue_full"


class DeadlineExceeded(LockgateError):
    code = "DEADLINE_EXCEEDED"
    reason = "deadline_exceeded"


class PermissionDenied(LockgateError):
    """A known principal whose role lacks the permission asked for."""

    code = "PERMISSION_DENIED"
    reason = "permission_denied"


class Unauthenticated(LockgateError):
    """Missing, malformed or unknown bearer token."""

    code = "UNAUTHENTICATED"
    reason = "unauthenticated"


class Unavailable(LockgateError):
    code = "UNAVAILABLE"
    reason = "unavailable"


class FailedPrecondition(LockgateError):
    code = "FAILED_PRECONDITION"
    reason = "failed_precondition"


class Aborted(LockgateError):
    code = "ABORTED"
    reason = "aborted"


class InferenceFailed(LockgateError):
    code = "INTERNAL"
    reason = "inference_failed"


# -- control-plane refinements (each keeps its status class) -----------------------------
class StoreError(Unavailable):
    """The store could not be opened or used (I/O, schema, unreachable)."""

    reason = "store_unavailable"


class ConflictError(Aborted):
    """A compare-and-set lost a race (state or revision changed underneath)."""

    reason = "conflict"


class LifecycleError(FailedPrecondition):
    """An illegal lifecycle transition, e.g. registered -> serving."""

    reason = "lifecycle"


class ApprovalError(FailedPrecondition):
    """An approval that breaks a rule: four eyes, empty reason, incomplete card."""

    reason = "approval"


class ArtifactTamperedError(FailedPrecondition):
    """The artifact's SHA-256 differs from the one recorded at registration."""

    reason = "artifact_tampered"


class ArtifactSignatureError(ArtifactTamperedError):
    """The version's ``model.sig`` does not hold: files added, removed or changed since signing,
    a signer outside the trust policy, an invalid or malformed signature, or no signature where
    the policy requires one. ``cause`` is the metric/audit reason (``manifest_mismatch``, ...)."""

    reason = "artifact_signature_invalid"

    def __init__(self, message: str, *, cause: str, details: Any = None) -> None:
        super().__init__(message, details=details)
        self.cause = cause


class ConfigError(InvalidArgument):
    """Server configuration that cannot work (e.g. signatures required, verifier not installed)."""

    reason = "config"


# -- explanations (their own reasons: an explain failure is not a failure of the model) ---
class ExplainQueueFull(ResourceExhausted):
    """The version's explanation queue is full; plain inference is not affected."""

    reason = "explain_queue_full"


class ExplainDeadlineExceeded(DeadlineExceeded):
    """The explanation did not finish within its deadline."""

    reason = "explain_deadline_exceeded"


class ExplainUnavailable(FailedPrecondition):
    """The model cannot be explained as configured (no background, unsupported graph, ...)."""

    reason = "explain_unavailable"


def caller_message(exc: BaseException) -> str:
    """What a caller is told about one failure, on every transport: the error's own message,
    capped in size; for anything that is not a ``LockgateError`` only its type (its arguments
    can carry request data or secrets)."""
    if isinstance(exc, LockgateError):
        text = exc.message
    else:
        text = f"internal error ({type(exc).__name__}); see the server log"
    if len(text) > MAX_MESSAGE_CHARS:
        text = text[: MAX_MESSAGE_CHARS - 15] + "... (truncated)"
    return text


def status_code(exc: BaseException) -> str:
    """The canonical status name of one failure: the error's own, INTERNAL for anything else."""
    return exc.code if isinstance(exc, LockgateError) else "INTERNAL"


_BY_CODE: dict[str, type[LockgateError]] = {}
for _cls in (InvalidArgument, NotFound, AlreadyExists, ResourceExhausted, DeadlineExceeded, PermissionDenied,
             Unauthenticated, Unavailable, FailedPrecondition, Aborted):
    _BY_CODE[_cls.code] = _cls


def error_for_code(code: str, message: str) -> LockgateError:
    """A ``LockgateError`` of the class that names ``code`` (for a status that crossed a
    transport as a name and a message, e.g. an admin call made in process)."""
    cls = _BY_CODE.get(code)
    if cls is None:
        error = LockgateError(message)
        error.code = code if code in CODE_NUMBERS else "INTERNAL"
        return error
    return cls(message)
