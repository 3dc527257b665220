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


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _mig_devices(nv, h) -> list:  # noqa: ANN001 - pynvml and a handle
    """The MIG instances of a GPU in MIG mode (handles), else []."""
    try:
        current, _ = nv.nvmlDeviceGetMigMode(h)
    except Exception:  # noqa: BLE001 - no MIG on this GPU or driver
        return []
    if current != getattr(nv, "NVML_DEVICE_MIG_ENABLE", 1):
        return []
    out = []
    for j in range(nv.nvmlDeviceGetMaxMigDeviceCount(h)):
        try:
            out.append(nv.nvmlDeviceGetMigDeviceHandleByIndex(h, j))
        except Exception:  # noqa: BLE001 - an empty slot
            continue
    return out


def probe_gpus() -> list[GpuInfo]:
    """Every device a job can be given: each GPU, or each MIG instance of a GPU in MIG mode
    (the GPU itself is then not given whole). Numbered in NVML's order, which is the PCI bus
    order that jobs see (CUDA_DEVICE_ORDER=PCI_BUS_ID); each with its UUID, by which jobs are
    given it."""
    nv = _nvml()
    if nv is None:
        return []
    out: list[GpuInfo] = []
    for i in range(nv.nvmlDeviceGetCount()):
        h = nv.nvmlDeviceGetHandleByIndex(i)
        name, uuid = _text(nv.nvmlDeviceGetName(h)), _text(nv.nvmlDeviceGetUUID(h))
        migs = _mig_devices(nv, h)
        if not migs:
            out.append(GpuInfo(index=len(out), name=name, uuid=uuid,
                               vram_gb=round(nv.nvmlDeviceGetMemoryInfo(h).total / 2**30, 2)))
            continue
        for m in migs:
            try:
                mname = _text(nv.nvmlDeviceGetName(m))
            except Exception:  # noqa: BLE001 - older drivers name only the GPU
                mname = f"{name} MIG"
            out.append(GpuInfo(index=len(out), name=mname, uuid=_text(nv.nvmlDeviceGetUUID(m)),
                               vram_gb=round(nv.nvmlDeviceGetMemoryInfo(m).total / 2**30, 2),
                               parent=uuid))
    return out


def device_env(devices: list[int] | tuple[int, ...], gpus: dict[int, GpuInfo]) -> dict[str, str]:
    """What makes a job see exactly ``devices`` (the node's numbers): their UUIDs in
    CUDA_VISIBLE_DEVICES when the node knows them (a MIG instance has no index), else their
    indices in PCI bus order, NVML's (CUDA's default order is fastest-first, which is not)."""
    known = [gpus[d].uuid for d in devices if d in gpus and gpus[d].uuid]
    ids = known if len(known) == len(devices) else [str(d) for d in devices]
    return {"CUDA_VISIBLE_DEVICES": ",".join(ids), "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}


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
            try:  # a GPU in MIG mode has no utilization to give: its memory only
                h = nv.nvmlDeviceGetHandleByIndex(i)
                mem = nv.nvmlDeviceGetMemoryInfo(h)
                try:
                    busy = float(nv.nvmlDeviceGetUtilizationRates(h).gpu)
                except Exception:  # noqa: BLE001 - NOT_SUPPORTED
                    busy = 0.0
            except Exception:  # noqa: BLE001 - a GPU fallen off the bus: not sampled
                continue
            gpus.append(GpuSample(index=i, util=busy, vram_used_gb=round(mem.used / 2**30, 3),
                                  vram_total_gb=round(mem.total / 2**30, 3)))
    return util, gpus
