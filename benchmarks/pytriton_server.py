"""Triton as a peer, through PyTriton: one ONNX Runtime session behind Triton's HTTP and gRPC
frontends (KServe v2 REST with the binary extension), dynamic batching as lockgate's config.

Run with the peer's own environment (``.venv-pytriton``, ``pip install nvidia-pytriton
onnxruntime``): PyTriton ships the Triton server binary in its wheel. Triton runs as its own
process and calls the Python model in this one, so it always takes two processes.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import onnxruntime as ort
from pytriton.decorators import batch
from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--model-name", required=True)
    parser.add_argument("--input", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--grpc-port", type=int, required=True)
    parser.add_argument("--http-port", type=int, required=True)
    parser.add_argument("--metrics-port", type=int, required=True)
    parser.add_argument("--workspace", type=Path, required=True)
    args = parser.parse_args()

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(args.model), options, providers=["CPUExecutionProvider"])
    width = session.get_inputs()[0].shape[1]
    classes = session.get_outputs()[0].shape[1]

    @batch
    def infer(**inputs: np.ndarray) -> dict[str, np.ndarray]:
        (result,) = session.run([args.output], {args.input: inputs[args.input]})
        return {args.output: result}

    config = TritonConfig(http_address="127.0.0.1", http_port=args.http_port, grpc_address="127.0.0.1",
                          grpc_port=args.grpc_port, metrics_port=args.metrics_port, log_verbose=0)
    with Triton(config=config, workspace=str(args.workspace)) as triton:
        triton.bind(
            model_name=args.model_name,
            infer_func=infer,
            inputs=[Tensor(name=args.input, dtype=np.float32, shape=(width,))],
            outputs=[Tensor(name=args.output, dtype=np.float32, shape=(classes,))],
            config=ModelConfig(max_batch_size=64, batcher=DynamicBatcher(max_queue_delay_microseconds=200)),
            strict=True,
        )
        triton.serve()


if __name__ == "__main__":
    main()
