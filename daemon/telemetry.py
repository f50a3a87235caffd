"""GPU telemetry for the stats and the metrics: utilisation and memory per GPU, read through NVML.

The design card names GPUtil; it is not used: GPUtil 1.4.0 (2018, its last release) imports
``distutils`` (removed in Python 3.12) and spawns ``nvidia-smi`` for every reading. NVML - the library
``nvidia-smi`` itself reads - is called directly through NVIDIA's own binding ``nvidia-ml-py``
(import name ``pynvml``): one library call per value, no subprocess. CUDA memory *allocated by
PyTorch* is only visible inside the inference processes (``torch.cuda.memory_allocated``); they put it
in their own stats, and the supervisor shows it beside these figures.

Without a GPU (no driver, no device, no ``nvidia-ml-py``) :meth:`GpuTelemetry.read` returns an empty
list and the stats and metrics simply have no GPU fields: a CPU-only host is not an error.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import structlog

log = structlog.get_logger(__name__)


class GpuTelemetry:
    """Reads every NVIDIA GPU of the host through NVML. Thread-safe; never raises."""

    def __init__(self, retry_s: float = 300.0) -> None:
        self._lock = threading.Lock()
        self._nvml: Any = None
        self._ok = False
        self._next_try = 0.0
        self.retry_s = retry_s
        self.reason = "not initialised yet"

    def _init(self) -> bool:
        if self._ok:
            return True
        now = time.monotonic()
        if now < self._next_try:
            return False
        self._next_try = now + self.retry_s
        try:
            import pynvml  # nvidia-ml-py
        except ImportError:
            self.reason = "nvidia-ml-py is not installed"
            return False
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as e:  # no driver / no GPU: the normal case on a CPU host
            self.reason = f"NVML unavailable: {e}"
            log.debug("no GPU telemetry", reason=self.reason)
            return False
        self._nvml = pynvml
        self._ok = True
        self.reason = ""
        return True

    @property
    def available(self) -> bool:
        with self._lock:
            return self._init()

    def read(self, pids: set[int] | None = None) -> list[dict[str, Any]]:
        """One dict per GPU: ``index``, ``name``, ``uuid``, ``utilization_percent``,
        ``memory_utilization_percent``, ``memory_used_bytes``, ``memory_total_bytes`` and, when the
        driver tells, ``temperature_c``, ``power_w`` and ``processes`` (GPU memory of ``pids``).
        Empty without a GPU."""
        with self._lock:
            if not self._init():
                return []
            nv = self._nvml
            try:
                count = nv.nvmlDeviceGetCount()
            except nv.NVMLError as e:
                self.reason = f"NVML: {e}"
                return []
            out = []
            for i in range(count):
                try:
                    out.append(self._device(nv, i, pids))
                except nv.NVMLError as e:  # a GPU fallen off the bus: report it, keep the others
                    out.append({"index": i, "error": str(e)})
            return out

    @staticmethod
    def _device(nv: Any, i: int, pids: set[int] | None) -> dict[str, Any]:  # noqa: ANN401
        h = nv.nvmlDeviceGetHandleByIndex(i)
        name = nv.nvmlDeviceGetName(h)
        uuid = nv.nvmlDeviceGetUUID(h)
        mem = nv.nvmlDeviceGetMemoryInfo(h)
        d: dict[str, Any] = {
            "index": i,
            "name": name.decode() if isinstance(name, bytes) else str(name),
            "uuid": uuid.decode() if isinstance(uuid, bytes) else str(uuid),
            "memory_used_bytes": int(mem.used),
            "memory_total_bytes": int(mem.total),
        }
        try:
            util = nv.nvmlDeviceGetUtilizationRates(h)
            d["utilization_percent"] = int(util.gpu)
            d["memory_utilization_percent"] = int(util.memory)
        except nv.NVMLError:  # e.g. a MIG instance: no utilisation counters
            pass
        try:
            d["temperature_c"] = int(nv.nvmlDeviceGetTemperature(h, nv.NVML_TEMPERATURE_GPU))
        except nv.NVMLError:
            pass
        try:
            d["power_w"] = round(nv.nvmlDeviceGetPowerUsage(h) / 1000.0, 1)
        except nv.NVMLError:
            pass
        if pids:
            try:
                procs = nv.nvmlDeviceGetComputeRunningProcesses(h)
                mine = {int(p.pid): int(p.usedGpuMemory or 0) for p in procs if int(p.pid) in pids}
                if mine:
                    d["processes"] = {str(pid): {"memory_used_bytes": b} for pid, b in sorted(mine.items())}
            except nv.NVMLError:
                pass
        return d

    def close(self) -> None:
        with self._lock:
            if self._ok:
                try:
                    self._nvml.nvmlShutdown()
                except self._nvml.NVMLError:
                    pass
                self._ok = False


def gpu_stats(telemetry: GpuTelemetry, stages: dict[str, dict[str, Any]], pids: set[int] | None = None
              ) -> dict[str, Any] | None:
    """The ``gpu`` block of the daemon's stats: NVML's devices plus the CUDA memory the inference
    stages report (``cuda_memory_allocated_bytes`` in their stats); None when there is nothing."""
    devices = telemetry.read(pids)
    cuda = {name: int(s["cuda_memory_allocated_bytes"]) for name, s in stages.items()
            if isinstance(s.get("cuda_memory_allocated_bytes"), int | float)}
    if not devices and not cuda:
        return None
    out: dict[str, Any] = {}
    if devices:
        out["devices"] = devices
    if cuda:
        out["cuda_memory_allocated_bytes"] = cuda
    return out
