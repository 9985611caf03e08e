"""``inference.GRPCInferenceService`` over grpc.aio: a thin adapter from gRPC to the pipeline.

It converts the transport's deadline and metadata into a ``RequestContext``, calls the
pipeline, and maps ``LockgateError`` to its precise status (with google.rpc details when the
error carries them). Nothing else lives here, so the data plane stays transport-agnostic.
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
from lockgate.errors import InferenceFailed, LockgateError
from lockgate.pipeline import InferencePipeline, RequestContext
from lockgate.transport import model_info
from lockgate.transport.grpc.call_metadata import text_metadata
from lockgate.transport.grpc.status import abort
from lockgate.serving.repository import ModelRepository

log = logging.getLogger("lockgate.grpc")

# Bounded look-ahead per stream: how many messages of one stream may be in flight at once.
STREAM_WINDOW = 256


def _context(context: grpc.aio.ServicerContext) -> RequestContext:
    remaining = context.time_remaining()
    deadline = time.monotonic() + remaining if remaining is not None else None
    return RequestContext(deadline=deadline, metadata_source=lambda: text_metadata(context))


def _stream_message() -> tuple[Any, Any]:
    """A stream reply and the ModelInferResponse inside it, filled in place (no copy)."""
    outer = pb.ModelStreamInferResponse()
    return outer, outer.infer_response


class InferenceService(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, repository: ModelRepository, pipeline: InferencePipeline, *, ready: asyncio.Event) -> None:
        self.repository = repository
        self.pipeline = pipeline
        self._ready = ready

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
            await self.repository.load(request.model_name)
        except LockgateError as exc:
            return await abort(context, exc)
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(self, request: Any, context: Any) -> Any:
        try:
            await self.repository.unload(request.model_name)
        except LockgateError as exc:
            return await abort(context, exc)
        return pb.RepositoryModelUnloadResponse()

    # -- inference -------------------------------------------------------------------
    async def ModelInfer(self, request: Any, context: Any) -> Any:
        try:
            return await self.pipeline.infer(request, pb.ModelInferResponse, _context(context))
        except LockgateError as exc:
            return await abort(context, exc)
        except Exception as exc:  # a bug of ours: INTERNAL with the cause, never a bare UNKNOWN
            log.exception("ModelInfer failed for model %r", request.model_name)
            return await abort(context, InferenceFailed(f"internal error in lockgate: {type(exc).__name__}: {exc}"))

    async def _stream_one(self, request: Any, ctx: RequestContext) -> Any:
        # one context per message: each gets its own trace
        ctx = RequestContext(deadline=ctx.deadline, metadata=ctx.metadata, method="ModelStreamInfer")
        try:
            return await self.pipeline.infer(request, pb.ModelInferResponse, ctx, _stream_message)
        except LockgateError as exc:
            return pb.ModelStreamInferResponse(
                error_message=exc.message,
                infer_response=pb.ModelInferResponse(model_name=request.model_name, model_version=request.model_version, id=request.id),
            )
        except Exception as exc:  # never let one message kill the stream
            log.exception("stream message failed")
            return pb.ModelStreamInferResponse(error_message=f"internal error: {exc}")

    async def ModelStreamInfer(self, request_iterator: AsyncIterator[Any], context: Any) -> AsyncIterator[Any]:
        """Messages are processed concurrently (so they batch together) and answered in order.

        A failed message yields a response with ``error_message`` and the stream stays open.
        """
        ctx = _context(context)
        in_flight: asyncio.Queue = asyncio.Queue(maxsize=STREAM_WINDOW)
        loop = asyncio.get_running_loop()

        async def read() -> None:
            try:
                async for request in request_iterator:
                    await in_flight.put(loop.create_task(self._stream_one(request, ctx)))
            finally:
                await in_flight.put(None)

        reader = loop.create_task(read())
        try:
            while True:
                task = await in_flight.get()
                if task is None:
                    break
                yield await task
            await reader
        finally:
            reader.cancel()
