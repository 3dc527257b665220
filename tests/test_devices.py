"""Devices named for real: GPUs and MIG instances by UUID, as NVML reports them.

There is no GPU here, so NVML is a stand-in with the calls the probe makes (pynvml's names and
shapes); the path with a real GPU is tests/test_gpu.py, which runs where one is."""

from __future__ import annotations

import json
import sys
import threading
from types import SimpleNamespace

import pytest

from evo.events.schema import GpuInfo
from evo.nodes import probe
from tests.test_nodes import done, of, wait_for

GiB = 2**30


class FakeNvml:
    """Two GPUs: GPU 0 whole (24 GiB), GPU 1 in MIG mode with two instances and an empty
    slot."""

    NVML_DEVICE_MIG_ENABLE = 1

    def __init__(self) -> None:
        self.gpus = [("NVIDIA RTX A5000", "GPU-aaaa", 24, None),
                     ("NVIDIA A100-SXM4-40GB", "GPU-bbbb", 40,
                      [("NVIDIA A100 MIG 1g.5gb", "MIG-b1", 5), None, ("NVIDIA A100 MIG 3g.20gb", "MIG-b2", 20)])]

    def nvmlDeviceGetCount(self) -> int:  # noqa: N802 - pynvml's names
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, i: int):  # noqa: N802, ANN201
        return ("gpu", i)

    def nvmlDeviceGetName(self, h):  # noqa: N802, ANN001, ANN201
        return self._of(h)[0].encode()

    def nvmlDeviceGetUUID(self, h):  # noqa: N802, ANN001, ANN201
        return self._of(h)[1]

    def nvmlDeviceGetMemoryInfo(self, h):  # noqa: N802, ANN001, ANN201
        total = self._of(h)[2] * GiB
        return SimpleNamespace(total=total, used=total // 4, free=total - total // 4)

    def nvmlDeviceGetMigMode(self, h):  # noqa: N802, ANN001, ANN201
        return (1, 1) if self.gpus[h[1]][3] else (0, 0)

    def nvmlDeviceGetMaxMigDeviceCount(self, h):  # noqa: N802, ANN001, ANN201
        return len(self.gpus[h[1]][3] or [])

    def nvmlDeviceGetMigDeviceHandleByIndex(self, h, j):  # noqa: N802, ANN001, ANN201
        if self.gpus[h[1]][3][j] is None:
            raise RuntimeError("NVML_ERROR_NOT_FOUND")
        return ("mig", h[1], j)

    def nvmlDeviceGetUtilizationRates(self, h):  # noqa: N802, ANN001, ANN201
        return SimpleNamespace(gpu=50, memory=10)

    def _of(self, h):  # noqa: ANN001, ANN202
        if h[0] == "gpu":
            return self.gpus[h[1]]
        return self.gpus[h[1]][3][h[2]]


@pytest.fixture
def nvml(monkeypatch):
    fake = FakeNvml()
    monkeypatch.setitem(probe._nvml_state, "mod", fake)
    return fake


def test_the_probe_lists_whole_gpus_and_mig_instances_by_uuid(nvml):
    gpus = probe.probe_gpus()
    assert [(g.index, g.uuid, g.vram_gb, g.parent) for g in gpus] == [
        (0, "GPU-aaaa", 24.0, ""), (1, "MIG-b1", 5.0, "GPU-bbbb"), (2, "MIG-b2", 20.0, "GPU-bbbb")]
    assert gpus[2].name == "NVIDIA A100 MIG 3g.20gb"


def test_a_job_is_given_its_devices_by_uuid_in_pci_order():
    gpus = {0: GpuInfo(index=0, uuid="GPU-aaaa"), 1: GpuInfo(index=1, uuid="MIG-b1", parent="GPU-bbbb")}
    assert probe.device_env([1], gpus) == {"CUDA_VISIBLE_DEVICES": "MIG-b1",
                                           "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
    assert probe.device_env([0, 1], gpus)["CUDA_VISIBLE_DEVICES"] == "GPU-aaaa,MIG-b1"
    # declared devices with no UUID (`evo node --gpus 2` on a machine without NVML): indices
    assert probe.device_env([1], {1: GpuInfo(index=1)})["CUDA_VISIBLE_DEVICES"] == "1"
    assert probe.device_env([], gpus)["CUDA_VISIBLE_DEVICES"] == ""


def test_an_attempt_records_the_physical_device_it_had(nvml, tbroker, tmp_path):
    from evo.nodes.daemon import NodeDaemon

    b = tbroker()
    node = NodeDaemon(b.address, name="mig-node", slots=2, heartbeat_s=0.5, work=tmp_path / "w")
    assert [g.uuid for g in node.join_cmd.gpus] == ["GPU-aaaa", "MIG-b1", "MIG-b2"]
    t = threading.Thread(target=node.run, daemon=True)
    t.start()
    code = "import os; print(os.environ['CUDA_VISIBLE_DEVICES'], os.environ['CUDA_DEVICE_ORDER'])"
    try:
        with b.client() as c:
            job = c.submit([sys.executable, "-c", code], gpus=1, vram_gb=16)  # only MIG-b2 or GPU 0
            warm = c.submit(callable="tests.jobs:devices", gpus=1, vram_gb=22)  # only GPU 0
            events = wait_for(c, lambda evs: done(job)(evs) and done(warm)(evs))
    finally:
        node.stop(drain=False)
        t.join(15)
    (started,) = of(events, "JobStarted", job)
    (leased,) = of(events, "JobLeased", job)
    uuid = {0: "GPU-aaaa", 2: "MIG-b2"}[leased.devices[0]]
    assert started.env["gpus"][0]["uuid"] == uuid
    out = (tmp_path / "w" / "jobs" / job / "attempt-1" / "stdout.log").read_text().split()
    assert out == [uuid, "PCI_BUS_ID"]
    (completed,) = of(events, "JobCompleted", warm)
    assert json.loads(completed.artifacts["seen"]) == ["GPU-aaaa", "PCI_BUS_ID"]
