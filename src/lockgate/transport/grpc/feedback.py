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
from lockgate.errors import InvalidArgument, LockgateError, NotFound
from lockgate.outcomes.feedback import FeedbackCounts, LabelIn
from lockgate.transport.grpc.call_metadata import call_metadata
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


def _authorization(context: Any) -> str | None:
    for key, value in call_metadata(context):
        if key.lower() == "authorization":
            return value if isinstance(value, str) else value.decode("latin-1")
    return None


class FeedbackService(pb_grpc.FeedbackServiceServicer):
    """The servicer; ``call`` runs a unary method in process for another transport (REST)
    with the caller's ``authorization`` value, so its permission and audit are the same."""

    def __init__(self, outcomes: "OutcomeService", auth: "Authenticator") -> None:
        self.outcomes = outcomes
        self.auth = auth

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

    async def SendFeedback(self, request: Any, context: Any) -> Any:
        try:
            return await self.send(request, _authorization(context))
        except LockgateError as exc:
            return await abort(context, exc)

    async def GetOutcomes(self, request: Any, context: Any) -> Any:
        try:
            return await self.get_outcomes(request, _authorization(context))
        except LockgateError as exc:
            return await abort(context, exc)

    async def StreamFeedback(self, request_iterator: AsyncIterator[Any], context: Any) -> Any:
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
            async for message in request_iterator:
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


def add_feedback_service(server: Any, service: FeedbackService) -> str:
    pb_grpc.add_FeedbackServiceServicer_to_server(service, server)
    return SERVICE_NAME
