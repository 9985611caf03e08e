"""The transport ceiling: the thinnest grpc.aio Open Inference Protocol server we can write.

One onnxruntime session, ``ModelInfer`` + ``ModelStreamInfer`` (plus the three readiness RPCs
the harness polls), raw FP32 tensors only, no routing, governance, batching or statistics.
Whatever lockgate adds on top is measured against this, with the same number of processes
(``--workers N`` shares the port through SO_REUSEPORT, exactly as lockgate does).

ORT calls run inline on the event loop by default: for a batch-1 MLP the run takes ~10 us,
far less than the ~30-60 us a thread-pool hop (run_in_executor) costs, and measured throughput
at every concurrency level was higher inline (see benchmarks/README.md). ``--mode executor``
keeps the other variant available for compute-heavy models.

The service comes from tritonclient's generated stubs, which register a generic handler only
(no grpc "registered methods"): grpc.aio keeps one pending request for it, as for lockgate's
services (see ``lockgate.transport.server.GenericHandlersOnly``), so both pay the same transport cost.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import multiprocessing as mp
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

_LOG = logging.getLogger("thin_server")
_MAX_MESSAGE = 64 * 1024 * 1024


class InferenceError(Exception):
    """A request the thin server cannot serve; carries the gRPC status to return."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


class ThinModel:
    """One ORT session plus the minimum decode/encode around it (raw or typed FP32)."""

    def __init__(self, name: str, path: Path, intra_op_threads: int, inter_op_threads: int) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        options.inter_op_num_threads = inter_op_threads
        self.name = name
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        inp = self.session.get_inputs()[0]
        out = self.session.get_outputs()[0]
        self.input_name: str = inp.name
        self.output_name: str = out.name
        self.features: int = int(inp.shape[1])
        self.session.run(None, {self.input_name: np.zeros((1, self.features), np.float32)})  # warm-up

    def decode(self, request: pb.ModelInferRequest) -> np.ndarray:
        if request.model_name != self.name:
            raise InferenceError(grpc.StatusCode.NOT_FOUND, f"unknown model '{request.model_name}'")
        if len(request.inputs) != 1:
            raise InferenceError(grpc.StatusCode.INVALID_ARGUMENT, "expected exactly one input")
        tensor = request.inputs[0]
        if tensor.datatype != "FP32":
            raise InferenceError(grpc.StatusCode.INVALID_ARGUMENT, f"input datatype {tensor.datatype}, expected FP32")
        shape = tuple(tensor.shape)
        if request.raw_input_contents:
            array = np.frombuffer(request.raw_input_contents[0], dtype=np.float32)
        else:
            array = np.asarray(tensor.contents.fp32_contents, dtype=np.float32)
        try:
            return array.reshape(shape)
        except ValueError as exc:
            raise InferenceError(grpc.StatusCode.INVALID_ARGUMENT, f"input shape {shape}: {exc}") from exc

    def run(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run([self.output_name], {self.input_name: batch})[0]

    def encode(self, request: pb.ModelInferRequest, result: np.ndarray) -> pb.ModelInferResponse:
        response = pb.ModelInferResponse(model_name=self.name, model_version="1", id=request.id)
        output = response.outputs.add()
        output.name = self.output_name
        output.datatype = "FP32"
        output.shape.extend(result.shape)
        response.raw_output_contents.append(result.tobytes())
        return response


class ThinServicer(pb_grpc.GRPCInferenceServiceServicer):
    """Readiness + inference; every other RPC stays UNIMPLEMENTED on purpose."""

    def __init__(self, model: ThinModel, inline: bool) -> None:
        self.model = model
        self.inline = inline

    async def _infer(self, request: pb.ModelInferRequest) -> pb.ModelInferResponse:
        batch = self.model.decode(request)
        if self.inline:
            result = self.model.run(batch)
        else:
            result = await asyncio.get_running_loop().run_in_executor(None, self.model.run, batch)
        return self.model.encode(request, result)

    async def ServerLive(self, request, context):  # noqa: N802 (gRPC method names)
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):  # noqa: N802
        return pb.ServerReadyResponse(ready=True)

    async def ModelReady(self, request, context):  # noqa: N802
        return pb.ModelReadyResponse(ready=request.name == self.model.name)

    async def ModelInfer(self, request, context):  # noqa: N802
        try:
            return await self._infer(request)
        except InferenceError as exc:
            await context.abort(exc.code, str(exc))

    async def ModelStreamInfer(  # noqa: N802
        self, request_iterator: AsyncIterator[pb.ModelInferRequest], context
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        async for request in request_iterator:
            try:
                yield pb.ModelStreamInferResponse(infer_response=await self._infer(request))
            except InferenceError as exc:
                yield pb.ModelStreamInferResponse(error_message=str(exc))


async def _serve(args: argparse.Namespace, ready: object | None) -> None:
    model = ThinModel(args.model_name, args.model, args.intra_op_threads, args.inter_op_threads)
    server = grpc.aio.server(
        options=[
            ("grpc.so_reuseport", 1),
            ("grpc.max_receive_message_length", _MAX_MESSAGE),
            ("grpc.max_send_message_length", _MAX_MESSAGE),
        ]
    )
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(ThinServicer(model, args.mode == "inline"), server)
    server.add_insecure_port(f"{args.host}:{args.port}")
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    _LOG.info("pid %d serving %s on %s:%d (%s)", os.getpid(), args.model_name, args.host, args.port, args.mode)
    if ready is not None:
        ready.release()  # type: ignore[attr-defined]
    await stop.wait()
    await server.stop(grace=2.0)


def _run_worker(args: argparse.Namespace, ready: object | None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s thin[%(process)d] %(message)s")
    try:
        import uvloop

        uvloop.run(_serve(args, ready))
    except ImportError:
        asyncio.run(_serve(args, ready))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="thin grpc.aio OIP server (transport ceiling)")
    parser.add_argument("--model", type=Path, required=True, help="path to model.onnx")
    parser.add_argument("--model-name", default="mlp")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--mode", choices=("inline", "executor"), default="inline")
    parser.add_argument("--intra-op-threads", type=int, default=1)
    parser.add_argument("--inter-op-threads", type=int, default=1)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.workers <= 1:
        _run_worker(args, None)
        return
    ctx = mp.get_context("spawn")
    ready = ctx.Semaphore(0)
    workers = [ctx.Process(target=_run_worker, args=(args, ready), daemon=True) for _ in range(args.workers)]
    for proc in workers:
        proc.start()
    for _ in workers:
        ready.acquire()
    print(f"thin server: {args.workers} workers ready on {args.host}:{args.port}", file=sys.stderr, flush=True)

    def _forward(signum: int, _frame: object) -> None:
        for proc in workers:
            if proc.is_alive():
                os.kill(proc.pid, signum)  # type: ignore[arg-type]

    signal.signal(signal.SIGTERM, _forward)
    signal.signal(signal.SIGINT, _forward)
    for proc in workers:
        proc.join()


if __name__ == "__main__":
    main()
