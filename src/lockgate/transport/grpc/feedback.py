"""``lockgate.feedback.v1.FeedbackService``: ground-truth labels over gRPC.

A thin adapter: it checks the bearer token (``feedback`` permission, when tokens are
configured), turns ``Label`` messages into ``outcomes.feedback.LabelIn`` values, and runs
the transport-agnostic ingest (``OutcomeService.feedback``) in a worker thread, so the store
writes never stall inference on the event loop. ``FeedbackService.call`` runs the unary
methods for the REST binding (``transport.http.feedback``) with the same permission checks. A stream's messages are joined in batches of
``STREAM_BATCH`` labels; one summary answers the call, and the call is audited once, as counts.
Errors map through ``transport.grpc.status`` like every other servicer.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import TYPE_CHECKING, Any, AsyncIterator

import grpc

from lockgate._proto.lockgate import feedback_pb2 as pb
from lockgate._proto.lockgate import feedback_pb2_grpc as pb_grpc
from lockgate.control.auth import Permission
from lockgate.errors import InvalidArgument, LockgateError, NotFound, Unavailable
from lockgate.outcomes.feedback import FeedbackCounts, LabelIn
from lockgate.transport.drain import DrainGate, shutting_down
from lockgate.transport.grpc.call_metadata import authorization as _authorization
from lockgate.transport.grpc.inference import Undecodable, safe_deserializer
from lockgate.transport.grpc.status import abort

if TYPE_CHECKING:
    from lockgate.control.auth import Authenticator
    from lockgate.outcomes.service import OutcomeService

log = logging.getLogger("lockgate.feedback")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["FeedbackService"].full_name
STREAM_BATCH = 8192
ANONYMOUS = "anonymous"


def labels_from(messages: Any) -> list[LabelIn]:
    """``Label`` protos -> ``LabelIn`` (the value's oneof names its kind)."""
    out: list[LabelIn] = []
    append = out.append
    for m in messages:
        kind = m.WhichOneof("value")
        event = m.event_time
        when = event.seconds + event.nanos / 1e9 if (event.seconds or event.nanos) else None
        append(LabelIn(m.request_id, m.row, kind, getattr(m, kind) if kind else None, when))
    return out


def summary_of(counts: FeedbackCounts) -> Any:
    response = pb.FeedbackSummary(
        received=counts.received, accepted=counts.accepted, duplicate=counts.duplicate, unknown=counts.unknown,
        expired=counts.expired, rejected=counts.rejected,
    )
    for reason, n in counts.reasons.items():
        response.rejected_by_reason[reason] = n
    for r in counts.rejections:
        response.rejections.add(index=r["index"], request_id=r["request_id"], row=r["row"], reason=r["reason"],
                                message=r["message"])
    return response


#: The unary feedback RPCs by name, with their request message classes (the REST binding's table).
METHODS: dict[str, Any] = {
    method.name: getattr(pb, method.input_type.name)
    for method in pb.DESCRIPTOR.services_by_name["FeedbackService"].methods
    if not method.client_streaming
}


class FeedbackService(pb_grpc.FeedbackServiceServicer):
    """The servicer; ``call`` runs a unary method in process for another transport (REST)
    with the caller's ``authorization`` value, so its permission and audit are the same."""

    def __init__(self, outcomes: "OutcomeService", auth: "Authenticator", gate: DrainGate | None = None) -> None:
        self.outcomes = outcomes
        self.auth = auth
        self.gate = gate or DrainGate()  # the inference port's: labels in flight finish on SIGTERM

    def _principal(self, authorization: str | None, permission: Permission) -> str:
        """The caller's name (``Unauthenticated`` / ``PermissionDenied`` raised); without
        configured tokens, anonymous."""
        if len(self.auth) == 0:
            return ANONYMOUS
        return self.auth.check(authorization, permission).name

    async def call(self, method: str, request: Any, authorization: str | None = None) -> Any:
        """Run unary RPC ``method`` as the holder of ``authorization``; failures raise their
        ``LockgateError``."""
        if method == "SendFeedback":
            return await self.send(request, authorization, via="rest.SendFeedback")
        if method == "GetOutcomes":
            return await self.get_outcomes(request, authorization)
        raise NotFound(f"the feedback API has no unary method {method!r}; methods: {', '.join(sorted(METHODS))}")

    async def send(self, request: Any, authorization: str | None, via: str = "grpc.SendFeedback") -> Any:
        actor = self._principal(authorization, Permission.FEEDBACK)
        labels = labels_from(request.labels)
        counts = await asyncio.to_thread(self.outcomes.feedback.ingest, request.model, labels,
                                         skip_invalid=request.skip_invalid)
        await self._audit(actor, request.model, counts, via)
        return summary_of(counts)

    async def get_outcomes(self, request: Any, authorization: str | None) -> Any:
        self._principal(authorization, Permission.READ)
        report = await asyncio.to_thread(self.outcomes.report, request.model, request.version or None,
                                         request.since or None)
        return pb.OutcomesResponse(report_json=json.dumps(report, default=str, allow_nan=False))

    async def _unary(self, run: Any, request: Any, context: Any) -> Any:
        """A unary call admitted by the drain gate; undecodable bytes are INVALID_ARGUMENT."""
        gate = self.gate
        if gate.draining and not gate.admit():
            return await abort(context, shutting_down())
        gate.in_flight += 1
        try:
            if request.__class__ is Undecodable:
                raise request.error()
            return await run(request, _authorization(context))
        except LockgateError as exc:
            return await abort(context, exc)
        finally:
            gate.in_flight -= 1

    async def SendFeedback(self, request: Any, context: Any) -> Any:
        return await self._unary(self.send, request, context)

    async def GetOutcomes(self, request: Any, context: Any) -> Any:
        return await self._unary(self.get_outcomes, request, context)

    async def StreamFeedback(self, request_iterator: AsyncIterator[Any], context: Any) -> Any:
        """On SIGTERM the stream stops reading once the drain refuses new work, ingests what it
        read, and ends UNAVAILABLE with those counts (resending is safe: labels are idempotent)."""
        gate = self.gate
        if gate.draining and not gate.admit():
            return await abort(context, shutting_down())
        gate.in_flight += 1
        stop = asyncio.Event()
        gate.register_stream(stop.set)
        try:
            return await self._stream(request_iterator, context, stop)
        finally:
            gate.unregister_stream(stop.set)
            gate.in_flight -= 1

    async def _stream(self, request_iterator: AsyncIterator[Any], context: Any, stop: asyncio.Event) -> Any:
        try:
            actor = self._principal(_authorization(context), Permission.FEEDBACK)
        except LockgateError as exc:
            return await abort(context, exc)
        ingest = self.outcomes.feedback
        total = FeedbackCounts()
        model = ""
        skip = False
        pending: list[LabelIn] = []
        messages = 0

        async def flush() -> None:
            nonlocal pending
            if pending:
                batch, pending = pending, []
                counts = await asyncio.to_thread(ingest.ingest, model, batch, skip_invalid=skip,
                                                 offset=total.received, before=total)
                total.add(counts)

        try:
            async for message in _until(request_iterator, stop):
                if message.__class__ is Undecodable:
                    raise InvalidArgument(f"stream message {messages}: {message.error().message}")
                if message.model and model and message.model != model:
                    raise InvalidArgument(f"stream message {messages} names model '{message.model}', but the stream "
                                          f"is for '{model}' (one model per stream)")
                if not model:
                    if not message.model:
                        raise InvalidArgument(f"stream message {messages}: model is required in the first message")
                    model = message.model
                    skip = message.skip_invalid
                    self.outcomes.spec_for(model)  # fail fast: unknown model, no outcomes section
                messages += 1
                pending.extend(labels_from(message.labels))
                if len(pending) >= STREAM_BATCH:
                    await flush()
            await flush()
            if stop.is_set():
                raise Unavailable(f"{shutting_down().message}; this stream's {total.received} labels so far were "
                                  f"ingested (accepted {total.accepted}, duplicate {total.duplicate}), the rest not read")
        except LockgateError as exc:
            if model and total.received:
                await self._audit(actor, model, total, "grpc.StreamFeedback", error=exc.message)
            return await abort(context, exc)
        if model:
            await self._audit(actor, model, total, "grpc.StreamFeedback")
        return summary_of(total)

    async def _audit(self, actor: str, model: str, counts: FeedbackCounts, via: str, error: str | None = None) -> None:
        try:
            await asyncio.to_thread(self.outcomes.feedback.audit, actor, model, counts, via, error)
        except LockgateError:
            log.exception("feedback for model %s could not be audited", model)


async def _until(messages: AsyncIterator[Any], stop: asyncio.Event) -> AsyncIterator[Any]:
    """``messages`` until the stream ends or ``stop`` is set (a read waiting then is cancelled)."""
    iterator = messages.__aiter__()
    stopped = asyncio.ensure_future(stop.wait())
    try:
        while not stop.is_set():
            step = asyncio.ensure_future(iterator.__anext__())
            await asyncio.wait((step, stopped), return_when=asyncio.FIRST_COMPLETED)
            if not step.done():
                step.cancel()
                return
            try:
                yield step.result()
            except StopAsyncIteration:
                return
    finally:
        stopped.cancel()


def add_feedback_service(server: Any, service: FeedbackService) -> str:
    """Register the servicer with deserializers that never raise (``inference.safe_deserializer``:
    undecodable bytes are INVALID_ARGUMENT, not grpc's UNKNOWN); returns its name for reflection."""
    handlers = {}
    for method in pb.DESCRIPTOR.services_by_name["FeedbackService"].methods:
        deserialize = safe_deserializer(getattr(pb, method.input_type.name))
        serialize = getattr(pb, method.output_type.name).SerializeToString
        make = grpc.stream_unary_rpc_method_handler if method.client_streaming else grpc.unary_unary_rpc_method_handler
        handlers[method.name] = make(getattr(service, method.name), deserialize, serialize)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    return SERVICE_NAME
