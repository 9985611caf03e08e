"""Correctness checks around each load run.

h2load cannot see gRPC statuses, so before measuring a target we send the *exact bytes* h2load
will send through a real gRPC client (raw-bytes channel, no re-serialisation), check the
status and compare the output with in-process onnxruntime. The size of the good response is
what ``benchmarks/h2load.py`` uses to detect error responses hidden behind HTTP 200.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc
import numpy as np
from tritonclient.grpc import service_pb2 as pb

from benchmarks.h2load import STREAM_PATH, UNARY_PATH


class CheckFailed(RuntimeError):
    """The server answered, but not with the right status or numbers."""


@dataclass(frozen=True)
class CheckResult:
    response_bytes: int  # DATA bytes of one good response (all frames), as h2load counts them
    model_version: str


def _compare(response: pb.ModelInferResponse, expected: np.ndarray, who: str) -> None:
    if not response.raw_output_contents:
        raise CheckFailed(f"{who}: response has no raw_output_contents")
    got = np.frombuffer(response.raw_output_contents[0], dtype=np.float32)
    if got.size != expected.size or not np.allclose(got, expected.ravel(), rtol=1e-4, atol=1e-5):
        raise CheckFailed(f"{who}: output {got[:8]} differs from in-process ORT {expected.ravel()[:8]}")


def check_unary(port: int, request: pb.ModelInferRequest, expected: np.ndarray, host: str = "127.0.0.1") -> CheckResult:
    """One ModelInfer with the h2load body bytes; returns the good response's framed size."""
    with grpc.insecure_channel(f"{host}:{port}") as channel:
        call = channel.unary_unary(UNARY_PATH, request_serializer=None, response_deserializer=None)
        try:
            raw: bytes = call(request.SerializeToString(), timeout=10)
        except grpc.RpcError as exc:
            raise CheckFailed(f"ModelInfer on port {port}: {exc.code()} {exc.details()}") from exc
    response = pb.ModelInferResponse.FromString(raw)
    _compare(response, expected, f"ModelInfer on port {port}")
    return CheckResult(response_bytes=5 + len(raw), model_version=response.model_version)


def check_stream(
    port: int,
    request: pb.ModelInferRequest,
    expected: np.ndarray,
    frames: int,
    wrapped: bool,
    host: str = "127.0.0.1",
) -> CheckResult:
    """One ModelStreamInfer carrying ``frames`` copies; every message must come back correct.

    ``wrapped``: responses are ``ModelStreamInferResponse`` (Triton/lockgate/thin) rather than
    bare ``ModelInferResponse`` (MLServer).
    """
    payload = request.SerializeToString()
    with grpc.insecure_channel(f"{host}:{port}") as channel:
        call = channel.stream_stream(STREAM_PATH, request_serializer=None, response_deserializer=None)
        try:
            raws: list[bytes] = list(call(iter([payload] * frames), timeout=30))
        except grpc.RpcError as exc:
            raise CheckFailed(f"ModelStreamInfer on port {port}: {exc.code()} {exc.details()}") from exc
    if len(raws) != frames:
        raise CheckFailed(f"ModelStreamInfer on port {port}: {len(raws)} responses for {frames} requests")
    version = ""
    for raw in raws:
        if wrapped:
            message = pb.ModelStreamInferResponse.FromString(raw)
            if message.error_message:
                raise CheckFailed(f"ModelStreamInfer on port {port}: error_message {message.error_message!r}")
            response = message.infer_response
        else:
            response = pb.ModelInferResponse.FromString(raw)
        _compare(response, expected, f"ModelStreamInfer on port {port}")
        version = response.model_version
    return CheckResult(response_bytes=sum(5 + len(raw) for raw in raws), model_version=version)
