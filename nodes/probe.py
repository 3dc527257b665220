"""What this machine has: cores, memory and GPUs (psutil, NVML). Without NVML or a GPU the
probe degrades to "no GPUs" and says so once."""

from __future__ import annotations

import logging
import socket

import psutil

from evo.events.schema import GpuInfo, GpuSample

log = logging.getLogger("evo.node")
_nvml_state: dict[str, object] = {}


def _nvml():
    """The pynvml module once initialised, or None (logged once)."""
    if "mod" in _nvml_state:
        return _nvml_state["mod"]
    try:
        import pynvml

        pynvml.nvmlInit()
        _nvml_state["mod"] = pynvml
    except Exception as exc:  # noqa: BLE001 - no driver, no library, no GPU: all the same here
        log.info("no NVIDIA GPUs visible (%s); this node offers CPU only", exc)
        _nvml_state["mod"] = None
    return _nvml_state["mod"]


def probe_gpus() -> list[GpuInfo]:
    nv = _nvml()
    if nv is None:
        return []
    out = []
    for i in range(nv.nvmlDeviceGetCount()):
        h = nv.nvmlDeviceGetHandleByIndex(i)
        name = nv.nvmlDeviceGetName(h)
        uuid = nv.nvmlDeviceGetUUID(h)
        mem = nv.nvmlDeviceGetMemoryInfo(h)
        out.append(GpuInfo(index=i, name=name.decode() if isinstance(name, bytes) else name,
                           vram_gb=round(mem.total / 2**30, 2),
                           uuid=uuid.decode() if isinstance(uuid, bytes) else uuid))
    return out


def probe() -> dict:
    return {"hostname": socket.gethostname(), "cpus": float(psutil.cpu_count() or 1),
            "mem_gb": round(psutil.virtual_memory().total / 2**30, 2), "gpus": probe_gpus()}


def sample() -> tuple[dict, list[GpuSample]]:
    """CPU and memory use in percent, and each GPU's utilization and VRAM."""
    util = {"cpu": psutil.cpu_percent(interval=None), "mem": psutil.virtual_memory().percent}
    gpus = []
    nv = _nvml()
    if nv is not None:
        for i in range(nv.nvmlDeviceGetCount()):
            h = nv.nvmlDeviceGetHandleByIndex(i)
            mem = nv.nvmlDeviceGetMemoryInfo(h)
            gpus.append(GpuSample(index=i, util=float(nv.nvmlDeviceGetUtilizationRates(h).gpu),
                                  vram_used_gb=round(mem.used / 2**30, 3),
                                  vram_total_gb=round(mem.total / 2**30, 3)))
    return util, gpus
