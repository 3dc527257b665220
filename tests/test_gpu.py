"""The GPU path: NVML probe, utilization samples, device assignment. Runs where a GPU is."""

from __future__ import annotations

import sys
import threading
import time

import pytest

from evo.nodes.probe import probe_gpus, sample

GPUS = probe_gpus()
pytestmark = pytest.mark.skipif(not GPUS, reason="no NVIDIA GPU visible through NVML")


def test_probe_reports_each_gpu_with_its_vram():
    for g in GPUS:
        assert g.name and g.vram_gb > 1 and g.uuid
    util, samples = sample()
    assert [s.index for s in samples] == [g.index for g in GPUS]
    assert all(0 <= s.util <= 100 and 0 < s.vram_total_gb for s in samples)


def test_a_gpu_job_sees_exactly_its_device(tbroker, tmp_path):
    from evo.nodes.daemon import NodeDaemon

    b = tbroker()
    node = NodeDaemon(b.address, name="gpu-node", labels=["gpu"], slots=2, heartbeat_s=0.5,
                      work=tmp_path / "work")
    assert [g.index for g in node.join_cmd.gpus] == [g.index for g in GPUS]
    t = threading.Thread(target=node.run, daemon=True)
    t.start()
    code = ("import os, json\n"
            "out = {'cvd': os.environ['CUDA_VISIBLE_DEVICES']}\n"
            "try:\n import torch; out['torch_count'] = torch.cuda.device_count()\n"
            "except ImportError: pass\n"
            "print(json.dumps(out))\n")
    try:
        with b.client() as c:
            gpu_job = c.submit([sys.executable, "-c", code], gpus=1, model_type="XGBoost")
            cpu_job = c.submit([sys.executable, "-c", code], model_type="GLM")
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                evs = list(c.read_all(1))
                if sum(type(e).__name__ == "JobCompleted" for e in evs) == 2:
                    break
                time.sleep(0.1)
            else:
                pytest.fail(f"jobs did not complete: {[type(e).__name__ for e in evs]}")
            utils = [e for e in evs if type(e).__name__ == "UtilizationSampled"]
    finally:
        node.stop(drain=False)
        t.join(15)
    import json

    def out(job):
        return json.loads((tmp_path / "work" / "jobs" / job / "attempt-1" / "stdout.log").read_text())

    g, cpu = out(gpu_job), out(cpu_job)
    assert g["cvd"] == GPUS[0].uuid and cpu["cvd"] == ""  # given by UUID
    if "torch_count" in g:
        assert g["torch_count"] == 1 and cpu["torch_count"] == 0
    assert utils and len(utils[0].gpus) == len(GPUS)
    print("GPU PATH OK", GPUS, g, cpu, utils[0].gpus)
