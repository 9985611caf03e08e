"""Exception types of the control plane.

Each carries ``grpc_code``: the name of the gRPC status code the admin API
should answer with, so ``protocol.admin_service`` can map them without this
package importing grpc.
"""

from __future__ import annotations


class ControlError(Exception):
    """Base of every control-plane error; maps to INTERNAL unless refined."""

    grpc_code: str = "INTERNAL"


class StoreError(ControlError):
    """The store could not be opened or used (I/O, schema, unreachable)."""

    grpc_code = "UNAVAILABLE"


class NotFoundError(ControlError):
    """A model version, policy or record that was asked for does not exist."""

    grpc_code = "NOT_FOUND"


class AlreadyExistsError(ControlError):
    """Registering a model version that is already registered."""

    grpc_code = "ALREADY_EXISTS"


class ConflictError(ControlError):
    """A compare-and-set lost a race (state or revision changed underneath)."""

    grpc_code = "ABORTED"


class LifecycleError(ControlError):
    """An illegal lifecycle transition, e.g. registered -> serving."""

    grpc_code = "FAILED_PRECONDITION"


class ApprovalError(ControlError):
    """An approval that breaks a rule: four eyes, empty reason, incomplete card."""

    grpc_code = "FAILED_PRECONDITION"


class ArtifactTamperedError(ControlError):
    """The artifact's SHA-256 differs from the one recorded at registration."""

    grpc_code = "FAILED_PRECONDITION"


class AuthError(ControlError):
    """Base of authentication/authorisation failures."""


class Unauthenticated(AuthError):
    """Missing, malformed or unknown bearer token."""

    grpc_code = "UNAUTHENTICATED"


class PermissionDenied(AuthError):
    """A known principal whose role lacks the permission asked for."""

    grpc_code = "PERMISSION_DENIED"


class InvalidArgumentError(ControlError):
    """A malformed name, version id, model card or signature given by the caller."""

    grpc_code = "INVALID_ARGUMENT"
