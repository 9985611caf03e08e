"""GPU memory and utilisation (Triton's nv_gpu_* families) through NVML, when there is one.

``pynvml`` (PyPI ``nvidia-ml-py``) is optional: without it, without a driver, or without a
GPU, ``GpuCollector.create()`` returns None and no GPU family is exposed: no error.
"""

from __future__ import annotations

import logging
from typing import Any, Iterator

from prometheus_client.core import GaugeMetricFamily, Metric

log = logging.getLogger("lockgate.telemetry.gpu")


class GpuCollector:
    def __init__(self, nvml: Any, handles: list[tuple[str, Any]]) -> None:
        self._nvml = nvml
        self._handles = handles

    @classmethod
    def create(cls) -> "GpuCollector | None":
        try:
            import pynvml  # type: ignore[import-not-found]
        except ImportError:
            return None
        try:
            pynvml.nvmlInit()
            handles = []
            for i in range(pynvml.nvmlDeviceGetCount()):
                handle = pynvml.nvmlDeviceGetHandleByIndex(i)
                uuid = pynvml.nvmlDeviceGetUUID(handle)
                handles.append((uuid.decode() if isinstance(uuid, bytes) else str(uuid), handle))
        except Exception as exc:  # noqa: BLE001 -- NVMLError: no driver / no device
            log.info("no GPU metrics: %s", exc)
            return None
        return cls(pynvml, handles) if handles else None

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        util = GaugeMetricFamily("lockgate_gpu_utilization", "GPU utilisation, 0.0-1.0 (nv_gpu_utilization)", labels=["gpu_uuid"])
        total = GaugeMetricFamily("lockgate_gpu_memory_total_bytes", "GPU total memory (nv_gpu_memory_total_bytes)", labels=["gpu_uuid"])
        used = GaugeMetricFamily("lockgate_gpu_memory_used_bytes", "GPU used memory (nv_gpu_memory_used_bytes)", labels=["gpu_uuid"])
        for uuid, handle in self._handles:
            try:
                rates = self._nvml.nvmlDeviceGetUtilizationRates(handle)
                memory = self._nvml.nvmlDeviceGetMemoryInfo(handle)
            except Exception as exc:  # noqa: BLE001 -- a GPU fell off the bus: skip it, keep scraping
                log.warning("GPU %s: %s", uuid, exc)
                continue
            util.add_metric([uuid], rates.gpu / 100.0)
            total.add_metric([uuid], float(memory.total))
            used.add_metric([uuid], float(memory.used))
        yield from (util, total, used)
