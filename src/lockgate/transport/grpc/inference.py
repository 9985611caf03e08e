"""``inference.GRPCInferenceService`` over grpc.aio: a thin adapter from gRPC to the pipeline.

It converts the transport's deadline and metadata into a ``RequestContext``, calls the
pipeline, and maps ``LockgateError`` to its precise status (with google.rpc details when the
error carries them). Nothing else lives here, so the data plane stays transport-agnostic.

Bytes that are not a valid message never reach a handler as an exception: grpc.aio would
answer UNKNOWN with a traceback per message, and in a stream end the whole stream. Each
method's deserializer hands the handler an ``Undecodable`` instead, answered INVALID_ARGUMENT
(a stream answers that message's ``error_message`` and goes on). Such events, calls that
ended before their status could be sent, and internal errors are counted by cause
(``lockgate_grpc_events_total``) and logged at most once per cause per interval.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Any, AsyncIterator

import grpc

from lockgate._proto import inference_pb2 as pb
from lockgate._proto import inference_pb2_grpc as pb_grpc
from lockgate.control.actor import acting_as, repository_actor
from lockgate.control.auth import Authenticator
from lockgate.errors import InferenceFailed, InvalidArgument, LockgateError
from lockgate.pipeline import InferencePipeline, RequestContext
from lockgate.serving.repository import ModelRepository
from lockgate.telemetry.logs import CauseLog
from lockgate.transport import model_info
from lockgate.transport.drain import DrainGate, shutting_down
from lockgate.transport.grpc.call_metadata import authorization, text_metadata
from lockgate.transport.grpc.status import abort, message_of

log = logging.getLogger("lockgate.grpc")

# Bounded look-ahead per stream: how many messages of one stream may be in flight at once.
STREAM_WINDOW = 256


SERVICE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
# Longest model name / request id echoed back in a stream's error reply.
_ECHO_CHARS = 1024


class Undecodable:
    """What a method's deserializer returns for bytes that are not its request message."""

    __slots__ = ("type_name", "size", "reason")

    def __init__(self, type_name: str, size: int, reason: str) -> None:
        self.type_name = type_name
        self.size = size
        self.reason = reason

    def error(self) -> InvalidArgument:
        return InvalidArgument(f"the request is not a valid {self.type_name} ({self.size} bytes): {self.reason[:200]}")


def safe_deserializer(message_type: Any) -> Any:
    """``message_type.FromString`` that returns an ``Undecodable`` instead of raising."""
    parse = message_type.FromString
    type_name = message_type.DESCRIPTOR.full_name

    def deserialize(data: bytes) -> Any:
        try:
            return parse(data)
        except Exception as exc:  # DecodeError, or whatever else protobuf raises on hostile bytes
            reason = str(exc).rpartition(": ")[2] or type(exc).__name__
            return Undecodable(type_name, len(data), reason)

    return deserialize


def _context(context: grpc.aio.ServicerContext) -> RequestContext:
    remaining = context.time_remaining()
    deadline = time.monotonic() + remaining if remaining is not None else None
    return RequestContext(deadline=deadline, metadata_source=lambda: text_metadata(context))


def _stream_message() -> tuple[Any, Any]:
    """A stream reply and the ModelInferResponse inside it, filled in place (no copy)."""
    outer = pb.ModelStreamInferResponse()
    return outer, outer.infer_response


class InferenceService(pb_grpc.GRPCInferenceServiceServicer):
    """The servicer. ``authenticator`` (the control plane's) guards the repository RPCs, which
    change what is served: with tokens configured they need the ``load`` permission."""

    def __init__(self, repository: ModelRepository, pipeline: InferencePipeline, *, ready: asyncio.Event,
                 authenticator: Authenticator | None = None, gate: DrainGate | None = None) -> None:
        self.repository = repository
        self.pipeline = pipeline
        self._ready = ready
        self.authenticator = authenticator
        self.gate = gate or DrainGate()
        self.events = CauseLog(log)  # undecodable, ended_before_reply, internal, refused_draining

    def metric_samples(self) -> Any:
        """``lockgate_grpc_events_total{cause}`` at scrape time."""
        from lockgate.telemetry.metrics import Sample

        for cause, count in self.events.counts().items():
            yield Sample("lockgate_grpc_events", {"cause": cause}, count)

    # -- failures outside the pipeline -----------------------------------------------
    async def _refuse_undecodable(self, request: Undecodable, context: Any) -> None:
        self.events.record("undecodable", "undecodable %s (%d bytes) from %s: %s; answered INVALID_ARGUMENT",
                           request.type_name, request.size, context.peer(), request.reason[:200])
        await abort(context, request.error(), self.events)

    def guarded(self, behavior: Any) -> Any:
        """``behavior`` (a unary handler) behind the undecodable-request check."""
        async def handler(request: Any, context: Any) -> Any:
            if request.__class__ is Undecodable:
                return await self._refuse_undecodable(request, context)
            return await behavior(request, context)

        handler.__name__ = getattr(behavior, "__name__", "handler")
        return handler

    def _internal(self, method: str, exc: Exception) -> InferenceFailed:
        """A bug of ours: INTERNAL naming the exception type (never its arguments: they may hold
        request data), with one traceback per interval in the log."""
        self.events.record("internal", "%s failed with an internal error", method, exc_info=exc, level=logging.ERROR)
        return InferenceFailed(f"internal error in lockgate ({type(exc).__name__}); see the server log")

    # -- health & metadata -----------------------------------------------------------
    async def ServerLive(self, request: Any, context: Any) -> Any:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: Any, context: Any) -> Any:
        return pb.ServerReadyResponse(ready=self._ready.is_set())

    async def ModelReady(self, request: Any, context: Any) -> Any:
        return pb.ModelReadyResponse(ready=self.repository.is_ready(request.name, request.version))

    async def ServerMetadata(self, request: Any, context: Any) -> Any:
        # Which worker process answered: lets operators (and the --workers test) see the spread.
        context.set_trailing_metadata((("lockgate-worker-pid", str(os.getpid())),))
        return model_info.server_metadata()

    async def ModelMetadata(self, request: Any, context: Any) -> Any:
        try:
            return model_info.metadata(self.repository, request.name, request.version)
        except LockgateError as exc:
            return await abort(context, exc)

    async def ModelConfig(self, request: Any, context: Any) -> Any:
        try:
            return model_info.config(self.repository, request.name, request.version)
        except LockgateError as exc:
            return await abort(context, exc)

    async def ModelStatistics(self, request: Any, context: Any) -> Any:
        try:
            return model_info.statistics(self.repository, request.name, request.version)
        except LockgateError as exc:
            return await abort(context, exc)

    # -- repository ------------------------------------------------------------------
    async def RepositoryIndex(self, request: Any, context: Any) -> Any:
        response = pb.RepositoryIndexResponse()
        for entry in self.repository.index():
            if request.ready and entry.state != "READY":
                continue
            response.models.add(name=entry.name, version=entry.version, state=entry.state, reason=entry.reason)
        return response

    async def RepositoryModelLoad(self, request: Any, context: Any) -> Any:
        try:
            with acting_as(repository_actor(self.authenticator, authorization(context), "RepositoryModelLoad",
                                            request.model_name)):
                await self.repository.load(request.model_name)
        except LockgateError as exc:
            return await abort(context, exc)
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(self, request: Any, context: Any) -> Any:
        try:
            with acting_as(repository_actor(self.authenticator, authorization(context), "RepositoryModelUnload",
                                            request.model_name)):
                await self.repository.unload(request.model_name)
        except LockgateError as exc:
            return await abort(context, exc)
        return pb.RepositoryModelUnloadResponse()

    # -- inference -------------------------------------------------------------------
    async def ModelInfer(self, request: Any, context: Any) -> Any:
        if request.__class__ is Undecodable:
            return await self._refuse_undecodable(request, context)
        gate = self.gate
        if gate.draining and not gate.admit():
            self.events.record("refused_draining", "ModelInfer refused: shutting down", level=logging.INFO)
            return await abort(context, shutting_down(), self.events)
        gate.in_flight += 1
        try:
            return await self.pipeline.infer(request, pb.ModelInferResponse, _context(context))
        except LockgateError as exc:
            return await abort(context, exc, self.events)
        except Exception as exc:  # a bug of ours: INTERNAL, never a bare UNKNOWN
            return await abort(context, self._internal("ModelInfer", exc), self.events)
        finally:
            gate.in_flight -= 1

    @staticmethod
    def _stream_error(exc: BaseException, request: Any = None) -> Any:
        reply = pb.ModelStreamInferResponse(error_message=message_of(exc))
        if request is not None:
            inner = reply.infer_response
            inner.model_name = request.model_name[:_ECHO_CHARS]
            inner.model_version = request.model_version[:_ECHO_CHARS]
            inner.id = request.id[:_ECHO_CHARS]
        return reply

    async def _stream_one(self, request: Any, ctx: RequestContext) -> Any:
        # one context per message: each gets its own trace
        ctx = RequestContext(deadline=ctx.deadline, metadata=ctx.metadata, method="ModelStreamInfer")
        try:
            return await self.pipeline.infer(request, pb.ModelInferResponse, ctx, _stream_message)
        except LockgateError as exc:
            return self._stream_error(exc, request)
        except Exception as exc:  # never let one message kill the stream
            return self._stream_error(self._internal("ModelStreamInfer", exc), request)

    async def _stream_undecodable(self, request: Undecodable, peer: str) -> Any:
        self.events.record("undecodable", "undecodable %s (%d bytes) in a stream from %s: %s; answered in error_message",
                           request.type_name, request.size, peer, request.reason[:200])
        return self._stream_error(request.error())

    async def _stream_refused(self, request: Any) -> Any:
        self.events.record("refused_draining", "ModelStreamInfer message refused: shutting down", level=logging.INFO)
        return self._stream_error(shutting_down(), None if request.__class__ is Undecodable else request)

    async def ModelStreamInfer(self, request_iterator: AsyncIterator[Any], context: Any) -> AsyncIterator[Any]:
        """Messages are processed concurrently (so they batch together) and answered in order.

        A failed message -- undecodable ones included -- yields a response with
        ``error_message`` and the stream stays open. On SIGTERM the stream answers every message
        it has read and ends with UNAVAILABLE.
        """
        gate = self.gate
        if gate.draining and not gate.admit():
            self.events.record("refused_draining", "ModelStreamInfer refused: shutting down", level=logging.INFO)
            await abort(context, shutting_down(), self.events)
            return
        ctx = _context(context)
        in_flight: asyncio.Queue = asyncio.Queue(maxsize=STREAM_WINDOW)
        loop = asyncio.get_running_loop()
        cut_short = False  # the drain ended the reading: the stream ends UNAVAILABLE

        async def read() -> None:
            nonlocal cut_short
            task = None
            try:
                async for request in request_iterator:
                    if gate.draining and not gate.admit():
                        cut_short = True  # read, so answered: refused, not run
                        task = loop.create_task(self._stream_refused(request))
                        break
                    if request.__class__ is Undecodable:
                        task = loop.create_task(self._stream_undecodable(request, context.peer()))
                    else:
                        task = loop.create_task(self._stream_one(request, ctx))
                    await in_flight.put(task)
                    task = None
            finally:
                if task is not None:  # read, but the drain cut the put short: still answered
                    await in_flight.put(task)
                await in_flight.put(None)

        reader = loop.create_task(read())

        def stop_reading() -> None:  # the drain: answer what was read, read no more
            nonlocal cut_short
            if not reader.done():
                cut_short = True
                reader.cancel()

        gate.in_flight += 1
        gate.register_stream(stop_reading)
        try:
            while True:
                task = await in_flight.get()
                if task is None:
                    break
                yield await task
            await asyncio.gather(reader, return_exceptions=True)
        finally:
            gate.unregister_stream(stop_reading)
            gate.in_flight -= 1
            reader.cancel()
        if cut_short:
            await abort(context, shutting_down(), self.events)


def add_inference_service(server: Any, servicer: InferenceService) -> None:
    """Register ``servicer``'s RPCs with deserializers that never raise (see ``Undecodable``).

    Built from the service descriptor rather than the generated ``add_..._to_server``, whose
    handlers deserialize with ``FromString`` and let grpc.aio turn a DecodeError into UNKNOWN.
    ModelInfer and ModelStreamInfer check for ``Undecodable`` themselves (no extra frame on the
    request path); every other method is wrapped by ``InferenceService.guarded``.
    """
    handlers = {}
    for method in SERVICE.methods:
        deserialize = safe_deserializer(getattr(pb, method.input_type.name))
        serialize = getattr(pb, method.output_type.name).SerializeToString
        behavior = getattr(servicer, method.name)
        if method.client_streaming and method.server_streaming:
            handlers[method.name] = grpc.stream_stream_rpc_method_handler(behavior, deserialize, serialize)
        elif not method.client_streaming and not method.server_streaming:
            if method.name != "ModelInfer":
                behavior = servicer.guarded(behavior)
            handlers[method.name] = grpc.unary_unary_rpc_method_handler(behavior, deserialize, serialize)
        else:  # the Open Inference Protocol has none; refuse to serve one unchecked
            raise TypeError(f"{SERVICE.full_name}/{method.name}: half-streaming RPCs are not handled")
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE.full_name, handlers),))
