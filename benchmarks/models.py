"""Benchmark models, built in code with the ``onnx`` package (no downloads).

Models, chosen to stress opposite ends of the data plane:

* ``mlp`` -- FP32 MLP 32 -> 256 -> 4. Compute is ~10 us per row, so a batch-1 request is
  dominated by transport + framework cost: this is the model the gateway-vs-thin-vs-MLServer
  ratios are measured on.
* ``wide_mlp`` -- FP32 MLP 256 -> 2048 -> 2048 -> 10 (~4.7 M MACs per row). Compute dominates,
  and GEMM efficiency grows with batch size, so it shows whether dynamic batching recovers
  the throughput that batch-1 clients would otherwise leave on the table. Too light, though:
  batched it runs ~4,000 rows/s, above the gRPC transport ceiling, so it is kept for reference.
* ``heavy_mlp`` -- FP32 MLP 1024 -> 5 x 4096 -> 10 (~71 M MACs per row): batching pays ~15x,
  but on this 2-core machine the gRPC transport (~0.75 ms of CPU per request) is a third of its
  compute (~2.2 ms per row), which caps lockgate at ~0.79 of in-process ORT whatever the batcher
  does. Reported, with that bound.
* ``xl_mlp`` -- FP32 MLP 1024 -> 5 x 8192 -> 10 (~277 M MACs, ~1.1 GB of weights, ~8 ms per row
  batched, ~80 ms at batch 1): compute-heavy enough that transport is < 10% of the work, so the
  batching goal measures batching.

Weights are random with a fixed seed so every server and the in-process reference run the
exact same graph, and results can be compared bit for bit.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import yaml
from onnx import TensorProto, helper, numpy_helper

from lockgate.demo import IR_VERSION, OPSET  # IR 9: loads in every onnxruntime >= 1.17 (and MLServer's)


@dataclass(frozen=True)
class ModelSpec:
    """Everything a server or load generator needs to know about one benchmark model."""

    name: str
    layers: tuple[int, ...]  # feature widths, input first, output last
    input_name: str = "INPUT__0"
    output_name: str = "OUTPUT__0"
    seed: int = 0
    # Repository config.yaml content (lockgate schema): dynamic batching + thread counts.
    config: dict = field(default_factory=dict)

    @property
    def input_dim(self) -> int:
        return self.layers[0]

    @property
    def row_shape(self) -> tuple[int, ...]:
        """Shape of one request row (the batch dimension excluded)."""
        return (self.layers[0],)

    @property
    def output_dim(self) -> int:
        return self.layers[-1]

    @property
    def intra_op_threads(self) -> int:
        return int(self.config.get("runtime", {}).get("intra_op_threads", 1))

    @property
    def inter_op_threads(self) -> int:
        return int(self.config.get("runtime", {}).get("inter_op_threads", 1))


def _batching_config(
    intra_op_threads: int, max_queue_delay_us: int, preferred_batch_sizes: tuple[int, ...], instances: int = 1
) -> dict:
    return {
        "max_batch_size": max(preferred_batch_sizes),
        "dynamic_batching": {
            "max_queue_delay_us": max_queue_delay_us,
            "preferred_batch_sizes": list(preferred_batch_sizes),
            "max_queue_size": 4096,
        },
        "runtime": {"intra_op_threads": intra_op_threads, "inter_op_threads": 1, "instances": instances},
    }


MLP = ModelSpec(
    name="mlp",
    layers=(32, 256, 4),
    seed=0,
    config=_batching_config(intra_op_threads=1, max_queue_delay_us=200, preferred_batch_sizes=(8, 16, 32, 64)),
)

# Two intra-op threads: the in-process reference gets the same setting, so the comparison is
# about batching and serving overhead, not thread counts. GEMM throughput on this model keeps
# growing up to batch ~128 on a 2-core CPU, hence the larger batches and longer queue delay.
WIDE_MLP = ModelSpec(
    name="wide_mlp",
    layers=(256, 2048, 2048, 10),
    seed=1,
    config=_batching_config(intra_op_threads=2, max_queue_delay_us=2000, preferred_batch_sizes=(32, 64, 128)),
)

# A compute-heavy model. wide_mlp (~0.26 ms/row when batched) was so light that the gRPC
# transport (~1,300 batch-1 req/s here) capped the served rate far below in-process ORT. This
# one is ~71 M MACs per row over ~290 MB of weights: at batch 1 every run streams all weights
# (~30-40 ms/row, memory bound); batched, the weights are reused across rows (~15x more rows/s,
# a few hundred). Still too light for the goal on 2 cores: per-thread CPU under load (512 in
# flight) was ~2.4 ms of ORT per row against ~0.55 ms on the event loop, ~0.12 ms in grpc's
# threads and ~0.07-0.1 ms of governance per request, plus h2load's share, which bounds lockgate
# at ~0.79 of in-process ORT. (A small CNN on 3x64x64 images was tried: ~6 ms/image at batch 1
# but no gain from batching on this CPU, so it cannot show batching.) One intra-op thread per
# instance; the in-process reference is swept at 1 and 2 threads and the best taken.
HEAVY_MLP = ModelSpec(
    name="heavy_mlp",
    layers=(1024, 4096, 4096, 4096, 4096, 4096, 10),
    seed=3,
    config=_batching_config(intra_op_threads=1, max_queue_delay_us=50000, preferred_batch_sizes=(128,), instances=2),
)

# The model of the batching goal: ~8 ms of compute per row batched, so the ~0.75 ms of transport
# CPU per batch-1 request (h2load included) is under a tenth of the work on these 2 cores. Two
# single-threaded instances at batch 128 (measured, same conditions, one 20 s run each at 256 in
# flight: 2 x 1 thread batch 128 ~218 rows/s, 2 x 1 batch 64 ~205, 1 x 2 threads batch 64 ~170).
XL_MLP = ModelSpec(
    name="xl_mlp",
    layers=(1024, 8192, 8192, 8192, 8192, 8192, 10),
    seed=4,
    config=_batching_config(intra_op_threads=1, max_queue_delay_us=100000, preferred_batch_sizes=(128,), instances=2),
)

MODELS: dict[str, ModelSpec] = {MLP.name: MLP, WIDE_MLP.name: WIDE_MLP, HEAVY_MLP.name: HEAVY_MLP, XL_MLP.name: XL_MLP}


def build_model(spec: ModelSpec) -> onnx.ModelProto:
    """Gemm(+Relu) chain with a symbolic batch dimension; Relu between layers, none at the end."""
    rng = np.random.default_rng(spec.seed)
    nodes: list[onnx.NodeProto] = []
    initializers: list[onnx.TensorProto] = []
    current = spec.input_name
    n_layers = len(spec.layers) - 1
    for i, (fan_in, fan_out) in enumerate(zip(spec.layers[:-1], spec.layers[1:])):
        # He-style scaling keeps activations in a sane range through the deep wide model.
        # float32 draws: xl_mlp has ~277 M weights, and float64 draws + a cast took ~20 s more
        w = rng.standard_normal((fan_in, fan_out), dtype=np.float32)
        w *= np.float32(np.sqrt(2.0 / fan_in))
        b = rng.standard_normal(fan_out, dtype=np.float32) * np.float32(0.01)
        initializers += [numpy_helper.from_array(w, f"W{i}"), numpy_helper.from_array(b, f"B{i}")]
        last = i == n_layers - 1
        gemm_out = spec.output_name if last else f"H{i}"
        nodes.append(helper.make_node("Gemm", [current, f"W{i}", f"B{i}"], [gemm_out], name=f"gemm{i}"))
        if not last:
            nodes.append(helper.make_node("Relu", [gemm_out], [f"R{i}"], name=f"relu{i}"))
            current = f"R{i}"
    graph = helper.make_graph(
        nodes,
        spec.name,
        [helper.make_tensor_value_info(spec.input_name, TensorProto.FLOAT, ["batch", spec.input_dim])],
        [helper.make_tensor_value_info(spec.output_name, TensorProto.FLOAT, ["batch", spec.output_dim])],
        initializer=initializers,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="lockgate-benchmarks"
    )
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    return model


def sample_input(spec: ModelSpec, batch: int = 1, seed: int = 42) -> np.ndarray:
    """The fixed request payload every load generator sends (deterministic, so checkable)."""
    return np.random.default_rng(seed).standard_normal((batch, *spec.row_shape)).astype(np.float32)


def write_model(spec: ModelSpec, path: Path) -> Path:
    """Write ``spec`` as a plain .onnx file (used by the thin server and MLServer)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(build_model(spec), str(path))
    return path


def write_repository(
    root: Path,
    specs: tuple[ModelSpec, ...] = (MLP, HEAVY_MLP, XL_MLP),
    dynamic_batching: bool = True,
) -> Path:
    """Write a lockgate model repository: ``root/<model>/1/model.onnx`` + ``config.yaml``.

    With ``dynamic_batching=False`` the config keeps the thread settings but omits the
    ``dynamic_batching`` section, so requests run one by one (the A/B for batching).
    """
    root.mkdir(parents=True, exist_ok=True)
    for spec in specs:
        write_model(spec, root / spec.name / "1" / "model.onnx")
        config = dict(spec.config)
        if not dynamic_batching:
            config.pop("dynamic_batching", None)
        (root / spec.name / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory", type=Path, help="model repository to write")
    parser.add_argument("--no-dynamic-batching", action="store_true")
    parser.add_argument("--models", default="mlp,heavy_mlp,xl_mlp", help=f"comma list of {', '.join(MODELS)}")
    args = parser.parse_args()
    specs = tuple(MODELS[name] for name in args.models.split(",") if name)
    root = write_repository(args.directory, specs, dynamic_batching=not args.no_dynamic_batching)
    print(f"wrote model repository {root}: {', '.join(spec.name for spec in specs)}")


if __name__ == "__main__":
    main()
