"""The one mapping from lockgate's error hierarchy to gRPC statuses.

Every servicer answers a failure through ``status_for``/``abort``, so a ``LockgateError`` has
exactly one gRPC status, and anything that is not one is INTERNAL; the message is
``errors.caller_message``, the same text every transport sends.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, status_pb2
from grpc_status import rpc_status

from lockgate.errors import caller_message as message_of
from lockgate.errors import status_code

if TYPE_CHECKING:
    from lockgate.telemetry.logs import CauseLog


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


async def abort(context: grpc.aio.ServicerContext, exc: BaseException, events: "CauseLog | None" = None) -> None:
    """End the call with ``exc``'s status, and return (the handler returns None after it).

    grpc.aio's ``abort`` raises ``AbortError``; unwinding it through the handler would put the
    handler's frames (holding the request and the context) in the exception's traceback, which
    grpc keeps on the call state: a reference cycle only a full garbage collection frees, and
    with the server's relaxed GC thresholds (``server.tune_gc``) failed requests piled up
    hundreds of MB. So the raise stops here: grpc still finds the abort it recorded and finishes
    the call when the handler returns.

    A call that already ended -- its deadline passed or its caller went away while it waited
    or ran -- can take no status any more: grpc raises from the send (``ExecuteBatchError``)
    and, unless it has already seen the cancellation, logs a traceback per call. That is
    counted here (cause ``ended_before_reply``) instead.
    """
    try:
        await context.abort_with_status(status_for(exc))
    except grpc.aio.AbortError as aborted:
        aborted.__traceback__ = None
        aborted.__context__ = None
    except grpc.aio.InternalError:
        if events is not None:
            events.record("ended_before_reply", "a call ended before its %s status could be sent: %s",
                          grpc_code(exc).name, message_of(exc)[:200], level=logging.INFO)
