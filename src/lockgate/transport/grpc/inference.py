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
from typing import Any, AsyncIterator, Callable

import grpc

import lockgate
from lockgate._proto import inference_pb2 as pb
from lockgate._proto import inference_pb2_grpc as pb_grpc
from lockgate.errors import InferenceFailed, LockgateError
from lockgate.pipeline import InferencePipeline, RequestContext
from lockgate.transport.grpc.call_metadata import text_metadata
from lockgate.transport.grpc.status import abort
from lockgate.serving.repository import LoadedModel, ModelRepository, ModelVersion

log = logging.getLogger("lockgate.grpc")

PLATFORM = "onnxruntime_onnx"
EXTENSIONS = ["model_repository", "statistics", "health", "reflection", "lockgate_governance"]
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


def _duration(d: Any, target: Any) -> None:
    target.count = d.count
    target.ns = d.ns


class InferenceService(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, repository: ModelRepository, pipeline: InferencePipeline, *, ready: asyncio.Event,
                 model_ready: Callable[[str, str], bool] | None = None) -> None:
        self.repository = repository
        self.pipeline = pipeline
        self._ready = ready
        # (model, version) -> ready: loaded *and* allowed to take live traffic (the gateway's
        # approval gate); without one, loaded is ready.
        self._model_ready = model_ready or repository.is_ready

    # -- health & metadata -----------------------------------------------------------
    async def ServerLive(self, request: Any, context: Any) -> Any:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: Any, context: Any) -> Any:
        return pb.ServerReadyResponse(ready=self._ready.is_set())

    async def ModelReady(self, request: Any, context: Any) -> Any:
        return pb.ModelReadyResponse(ready=self._model_ready(request.name, request.version))

    async def ServerMetadata(self, request: Any, context: Any) -> Any:
        # Which worker process answered: lets operators (and the --workers test) see the spread.
        context.set_trailing_metadata((("lockgate-worker-pid", str(os.getpid())),))
        return pb.ServerMetadataResponse(name="lockgate", version=lockgate.__version__, extensions=EXTENSIONS)

    def _model_and_version(self, name: str, version: str) -> tuple[LoadedModel, ModelVersion]:
        model = self.repository.get(name)
        return model, model.get(version)

    async def ModelMetadata(self, request: Any, context: Any) -> Any:
        try:
            model, mv = self._model_and_version(request.name, request.version)
        except LockgateError as exc:
            return await abort(context, exc)
        response = pb.ModelMetadataResponse(
            name=model.name, platform=PLATFORM, versions=sorted(model.versions, key=int)
        )
        for spec in mv.signature.inputs:
            response.inputs.add(name=spec.name, datatype=spec.datatype.name, shape=spec.shape)
        for spec in mv.signature.outputs:
            response.outputs.add(name=spec.name, datatype=spec.datatype.name, shape=spec.shape)
        return response

    async def ModelConfig(self, request: Any, context: Any) -> Any:
        try:
            model, mv = self._model_and_version(request.name, request.version)
        except LockgateError as exc:
            return await abort(context, exc)
        sig = mv.signature
        cfg = pb.ModelConfig(
            name=model.name,
            platform=PLATFORM,
            backend="onnxruntime",
            max_batch_size=sig.max_batch_size,
            default_model_filename="model.onnx",
        )
        policy = model.config.version_policy
        if policy.policy == "all":
            cfg.version_policy.all.SetInParent()
        elif policy.policy == "specific":
            cfg.version_policy.specific.versions.extend(policy.versions)
        else:
            cfg.version_policy.latest.num_versions = policy.latest
        skip = 1 if sig.max_batch_size > 0 else 0  # Triton's dims exclude the batch dimension
        for spec in sig.inputs:
            cfg.input.add(name=spec.name, data_type=spec.datatype.triton_enum, dims=spec.shape[skip:])
        for spec in sig.outputs:
            cfg.output.add(name=spec.name, data_type=spec.datatype.triton_enum, dims=spec.shape[skip:])
        batching = model.config.dynamic_batching
        if batching is not None and sig.max_batch_size > 0:
            cfg.dynamic_batching.preferred_batch_size.extend(batching.preferred_batch_sizes)
            cfg.dynamic_batching.max_queue_delay_microseconds = batching.max_queue_delay_us
            cfg.dynamic_batching.default_queue_policy.max_queue_size = batching.max_queue_size
        provider = mv.runtime.provider
        group = cfg.instance_group.add(name=f"{model.name}_0", count=model.config.runtime.instances)
        if mv.runtime.on_cuda:
            group.kind = pb.ModelInstanceGroup.KIND_GPU
            group.gpus.append(model.config.runtime.device_id)
            acc = cfg.optimization.execution_accelerators.gpu_execution_accelerator.add(name="cuda")
            acc.parameters["io_binding"] = str(model.config.runtime.io_binding).lower()
            cfg.optimization.input_pinned_memory.enable = mv.runtime.staging is not None
        else:
            group.kind = pb.ModelInstanceGroup.KIND_CPU
            cfg.optimization.execution_accelerators.cpu_execution_accelerator.add(name="cpu")
        cfg.parameters["execution_providers"].string_value = ",".join(provider.active)
        cfg.parameters["device"].string_value = provider.device
        cfg.parameters["execution"].string_value = "inline" if mv.runtime.inline else "thread"
        if provider.fallback_reason:
            cfg.parameters["provider_fallback"].string_value = provider.fallback_reason
        cfg.parameters["sha256"].string_value = mv.sha256
        for key, value in model.config.parameters.items():
            cfg.parameters[key].string_value = value
        return pb.ModelConfigResponse(config=cfg)

    async def ModelStatistics(self, request: Any, context: Any) -> Any:
        response = pb.ModelStatisticsResponse()
        try:
            if request.name:
                model = self.repository.get(request.name)
                selected = [(model, model.get(request.version))] if request.version else [(model, v) for v in model.versions.values()]
            else:
                selected = [(m, v) for m in self.repository.models().values() for v in m.versions.values()]
        except LockgateError as exc:
            return await abort(context, exc)
        for model, mv in selected:
            s = mv.stats
            out = response.model_stats.add(
                name=model.name, version=mv.version, last_inference=s.last_inference_ms,
                inference_count=s.inference_count, execution_count=s.execution_count,
            )
            st = out.inference_stats
            for src, dst in ((s.success, st.success), (s.fail, st.fail), (s.queue, st.queue),
                             (s.compute_input, st.compute_input), (s.compute_infer, st.compute_infer),
                             (s.compute_output, st.compute_output)):
                _duration(src, dst)
            for size in sorted(s.batch_stats):
                b = s.batch_stats[size]
                bs = out.batch_stats.add(batch_size=size)
                _duration(b.compute_input, bs.compute_input)
                _duration(b.compute_infer, bs.compute_infer)
                _duration(b.compute_output, bs.compute_output)
        return response

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
