"""ONNX Runtime sessions: provider choice, IO binding on CUDA, warm-up, signature discovery.

One ``OrtRuntime`` wraps one session for one model version. The provider choice is explicit
and logged: CUDA when it was asked for and onnxruntime-gpu sees a device, the CPU otherwise,
with the reason for any fallback, so an operator never has to guess where a model runs.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import onnxruntime as ort

from lockgate.config import RuntimeConfig
from lockgate.protocol import datatypes
from lockgate.protocol.codec import Signature, TensorSpec
from lockgate.serving.cuda_staging import PinnedStaging

log = logging.getLogger("lockgate.runtime")

_GRAPH_LEVEL = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}

# Models whose batch-1 warm-up run is faster than this run on the event loop: handing them
# to a thread costs more (wake-up + GIL hand-off) than the inference itself.
INLINE_THRESHOLD_S = 300e-6


@dataclass(frozen=True, slots=True)
class ProviderChoice:
    requested: tuple[str, ...]
    active: tuple[str, ...]
    device: str  # "cuda:<id>" or "cpu"
    fallback_reason: str | None


def choose_providers(config: RuntimeConfig) -> tuple[list[Any], str | None]:
    """Provider list for InferenceSession, and why CUDA was skipped if it was requested."""
    available = set(ort.get_available_providers())
    providers: list[Any] = []
    reason = None
    for name in config.providers:
        if name == "cuda":
            if "CUDAExecutionProvider" in available:
                providers.append(("CUDAExecutionProvider", {"device_id": config.device_id}))
            else:
                reason = (
                    "CUDA was requested but this onnxruntime build has no CUDAExecutionProvider "
                    f"(available: {', '.join(sorted(available))}); install lockgate[gpu] for onnxruntime-gpu"
                )
        elif name == "cpu":
            providers.append("CPUExecutionProvider")
    if not providers:
        providers.append("CPUExecutionProvider")
    return providers, reason


def _dim(value: Any) -> int:
    return value if isinstance(value, int) and value >= 0 else -1


class OrtRuntime:
    """One onnxruntime session for one model version."""

    def __init__(self, model_path: Path, config: RuntimeConfig, *, label: str) -> None:
        self.config = config
        self.label = label
        options = ort.SessionOptions()
        options.intra_op_num_threads = config.intra_op_threads
        options.inter_op_num_threads = config.inter_op_threads
        options.graph_optimization_level = _GRAPH_LEVEL[config.graph_optimization]
        options.log_severity_level = 3
        providers, reason = choose_providers(config)
        self.session = ort.InferenceSession(str(model_path), sess_options=options, providers=providers)
        active = tuple(self.session.get_providers())
        if "cuda" in config.providers and "CUDAExecutionProvider" not in active and reason is None:
            reason = "CUDAExecutionProvider failed to initialise (no usable GPU or CUDA libraries); using the CPU"
        on_cuda = "CUDAExecutionProvider" in active
        self.provider = ProviderChoice(
            requested=tuple(config.providers),
            active=active,
            device=f"cuda:{config.device_id}" if on_cuda else "cpu",
            fallback_reason=reason,
        )
        if reason:
            # Only news when someone asked for a GPU: the config named CUDA, or the installed
            # onnxruntime is the GPU build. The default [cuda, cpu] on a CPU-only build is the
            # ordinary way to run on a laptop or a CPU pod.
            explicit = "providers" in config.model_fields_set or "CUDAExecutionProvider" in ort.get_available_providers()
            if explicit:
                log.warning("%s: provider fallback to CPU: %s", label, reason)
            else:
                log.info("%s: running on the CPU (this onnxruntime build has no GPU provider)", label)
        log.info("%s: execution providers %s on %s", label, ", ".join(active), self.provider.device)
        self._use_io_binding = on_cuda and config.io_binding
        self.staging: PinnedStaging | None = None
        if self._use_io_binding and config.pinned_memory:
            self.staging, why = PinnedStaging.create()
            if self.staging is None:
                log.warning("%s: inputs copied from pageable memory, no pinned host buffers: %s", label, why)
            else:
                log.info("%s: inputs staged through pinned host buffers", label)
        # The compiled session behind InferenceSession: its Python wrapper re-checks the feed's
        # names on every call (~3 µs), which the codec has already done against the signature.
        # CPU only: on CUDA the wrapper's run-time provider fallback is worth keeping.
        self._compiled = None if on_cuda else getattr(self.session, "_sess", None)
        self._input_names = [i.name for i in self.session.get_inputs()]
        self._output_names = [o.name for o in self.session.get_outputs()]
        self.inline = False

    @property
    def on_cuda(self) -> bool:
        return self.provider.device.startswith("cuda")

    def signature(self, max_batch_size: int | None) -> Signature:
        """Signature from the graph. A free leading dim on every input means batchable."""

        def spec(node: Any) -> TensorSpec:
            dt = datatypes.BY_ORT.get(node.type)
            if dt is None:
                raise ValueError(f"{self.label}: tensor '{node.name}' has unsupported type {node.type}")
            return TensorSpec(node.name, dt, tuple(_dim(d) for d in node.shape))

        inputs = tuple(spec(n) for n in self.session.get_inputs())
        outputs = tuple(spec(n) for n in self.session.get_outputs())
        batchable = bool(inputs) and all(s.shape and s.shape[0] == -1 for s in inputs)
        if max_batch_size is None:
            max_batch_size = 64 if batchable else 0
        elif max_batch_size > 0 and not batchable:
            raise ValueError(
                f"{self.label}: max_batch_size {max_batch_size} needs a variable leading (batch) "
                "dimension on every input, but the graph has fixed ones"
            )
        return Signature(inputs, outputs, max_batch_size)

    def run(self, inputs: Mapping[str, np.ndarray], output_names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        names = list(output_names) if output_names else self._output_names
        if self._use_io_binding:
            return self._run_io_binding(inputs, names)
        feeds = inputs if type(inputs) is dict else dict(inputs)
        if self._compiled is not None:
            results = self._compiled.run(names, feeds, None)
        else:
            results = self.session.run(names, feeds)
        return dict(zip(names, results))

    def _run_io_binding(self, inputs: Mapping[str, np.ndarray], names: list[str]) -> dict[str, np.ndarray]:
        """CUDA path: inputs copied once to the device, outputs left on it until the final copy.

        Outputs are bound to CUDA memory and copied back in one call; this avoids the per-run
        allocator round trips of ``session.run`` and keeps host<->device copies explicit.
        """
        binding = self.session.io_binding()
        device_id = self.config.device_id
        staging = self.staging
        for name, arr in inputs.items():
            if arr.dtype == object:
                binding.bind_cpu_input(name, arr)
            elif staging is not None:
                # Host memory the driver knows is page-locked: one DMA, no bounce buffer.
                view = staging.stage(name, arr)
                binding.bind_input(name, "cpu", 0, view.dtype.type, list(view.shape), view.ctypes.data)
            else:
                value = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(arr), "cuda", device_id)
                binding.bind_ortvalue_input(name, value)
        for name in names:
            binding.bind_output(name, "cuda", device_id)
        self.session.run_with_iobinding(binding)
        return dict(zip(names, binding.copy_outputs_to_cpu()))

    def close(self) -> None:
        """Free the pinned buffers; only once no batch can run on this session again."""
        if self.staging is not None:
            self.staging.close()
            self.staging = None

    def warm_up(self, signature: Signature) -> float:
        """Run the model a few times on zeros (batch 1); return the median run time in seconds.

        Also decides inline vs threaded execution when ``execution: auto``.
        """
        feeds: dict[str, np.ndarray] = {}
        for spec in signature.inputs:
            shape = tuple(1 if d < 0 else d for d in spec.shape)
            if spec.datatype.name == "BYTES":
                arr = np.full(shape, b"", dtype=object)
            else:
                arr = np.zeros(shape, dtype=spec.datatype.numpy)
            feeds[spec.name] = arr
        for _ in range(self.config.warmup_runs):
            self.run(feeds)  # first runs allocate and pick kernels: not representative
        timings = []
        for _ in range(10):
            start = time.perf_counter()
            self.run(feeds)
            timings.append(time.perf_counter() - start)
        median = float(np.median(timings))
        mode = self.config.execution
        self.inline = mode == "inline" or (mode == "auto" and median < INLINE_THRESHOLD_S and not self.on_cuda)
        log.info(
            "%s: warm-up median %.1f µs over %d runs; executing %s",
            self.label, median * 1e6, len(timings), "inline on the event loop" if self.inline else "on worker threads",
        )
        return median
