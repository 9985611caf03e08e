"""The one mapping from lockgate's error hierarchy to gRPC statuses.

Every servicer answers a failure through ``status_for``/``abort``, so a ``LockgateError`` has
exactly one gRPC status, and anything that is not one is INTERNAL; the message is
``errors.caller_message``, the same text every transport sends.
"""

from __future__ import annotations

from typing import Any

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, status_pb2
from grpc_status import rpc_status

from lockgate.errors import caller_message as message_of
from lockgate.errors import status_code


def grpc_code(exc: BaseException) -> grpc.StatusCode:
    """The gRPC status code of one failure: the error's own, INTERNAL for anything else."""
    return getattr(grpc.StatusCode, status_code(exc), grpc.StatusCode.INTERNAL)


def status_for(exc: BaseException) -> Any:
    """A grpc.Status for abort_with_status, with google.rpc details when the error has some."""
    code = grpc_code(exc)
    status = status_pb2.Status(code=getattr(code_pb2, code.name), message=message_of(exc))
    details = getattr(exc, "details", None)
    if details is not None:
        detail = any_pb2.Any()
        detail.Pack(details)
        status.details.append(detail)
    return rpc_status.to_status(status)


async def abort(context: grpc.aio.ServicerContext, exc: BaseException) -> None:
    await context.abort_with_status(status_for(exc))
