"""What a node has: host memory use and, on GPU nodes, its device (NVML, else CuPy).

Readings are cached for ``ttl`` seconds: they are taken on the heartbeat path, which a slow
reading would delay.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from typing import Any

import psutil


@dataclass(frozen=True)
class DeviceReading:
    index: int
    name: str
    total_bytes: int
    free_bytes: int
    utilization: float | None  # fraction busy, when NVML reports it


class ResourceMonitor:
    """Cached readings of host memory and GPU devices (none on a CPU node)."""

    def __init__(self, memory_limit: int | None, ttl: float = 1.0) -> None:
        self.memory_limit = memory_limit or psutil.virtual_memory().total
        self.ttl = ttl
        self._process = psutil.Process()
        self._taken = 0.0
        self._cached: dict[str, Any] = {}
        self._nvml = _nvml()

    def read(self) -> dict[str, Any]:
        now = time.monotonic()
        if now - self._taken >= self.ttl:
            devices = self._devices()
            self._cached = {
                "host_memory_fraction": self._process.memory_info().rss / self.memory_limit,
                "system_memory_fraction": psutil.virtual_memory().percent / 100,
                "gpu_count": len(devices),
                "gpus": [asdict(d) for d in devices],
                "device_memory_fraction": max(
                    (1 - d.free_bytes / d.total_bytes for d in devices if d.total_bytes), default=None
                ),
            }
            self._taken = now
        return self._cached

    def memory_pressure(self) -> float:
        """The highest of host and device memory use, as fractions of their limits."""
        reading = self.read()
        return max(reading["host_memory_fraction"], reading["device_memory_fraction"] or 0.0)

    def _devices(self) -> list[DeviceReading]:
        if self._nvml is not None:
            return self._nvml_devices()
        try:
            import cupy
        except ImportError:
            return []
        devices = []
        try:
            for i in range(min(cupy.cuda.runtime.getDeviceCount(), 1 if _visible() else 64)):
                with cupy.cuda.Device(i):
                    free, total = cupy.cuda.runtime.memGetInfo()
                    name = cupy.cuda.runtime.getDeviceProperties(i)["name"].decode()
                devices.append(DeviceReading(i, name, int(total), int(free), None))
        except Exception:
            return []
        return devices

    def _nvml_devices(self) -> list[DeviceReading]:
        nvml = self._nvml
        devices = []
        for i in _own_device_indices(nvml.nvmlDeviceGetCount()):
            handle = nvml.nvmlDeviceGetHandleByIndex(i)
            memory = nvml.nvmlDeviceGetMemoryInfo(handle)
            name = nvml.nvmlDeviceGetName(handle)
            utilization = nvml.nvmlDeviceGetUtilizationRates(handle).gpu / 100
            devices.append(
                DeviceReading(i, name.decode() if isinstance(name, bytes) else name, memory.total, memory.free, utilization)
            )
        return devices


def _visible() -> list[str]:
    return [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]


def _own_device_indices(count: int) -> list[int]:
    """The device this worker computes on: the first of ``CUDA_VISIBLE_DEVICES`` (dask-cuda
    gives each worker its own device first), or every device when the variable is unset."""
    visible = _visible()
    if not visible:
        return list(range(count))
    first = visible[0].strip()
    return [int(first)] if first.isdigit() and int(first) < count else []


def _nvml():
    """The initialised ``pynvml`` module (from nvidia-ml-py, a dask-cuda dependency), or None."""
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml
    except Exception:
        return None
