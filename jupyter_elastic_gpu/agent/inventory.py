"""What GPUs this node has: NVML when it is there, a clearly named CPU stand-in otherwise."""

from __future__ import annotations

import os

GiB = 1 << 30


def _nvml_gpus() -> list[dict]:
    try:
        import pynvml
    except ImportError:
        return []
    try:
        pynvml.nvmlInit()
    except Exception:  # no driver, no NVML library: a CPU node
        return []
    gpus = []
    try:
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            mem = pynvml.nvmlDeviceGetMemoryInfo(h)
            try:
                util = pynvml.nvmlDeviceGetUtilizationRates(h).gpu
            except pynvml.NVMLError:
                util = None
            try:
                mig = bool(pynvml.nvmlDeviceGetMigMode(h)[0])
            except pynvml.NVMLError:
                mig = False
            name = pynvml.nvmlDeviceGetName(h)
            uuid = pynvml.nvmlDeviceGetUUID(h)
            gpus.append(
                {
                    "index": i,
                    "uuid": uuid.decode() if isinstance(uuid, bytes) else uuid,
                    "name": name.decode() if isinstance(name, bytes) else name,
                    "memory_total": int(mem.total),
                    "memory_used": int(mem.used),
                    "utilization": util,
                    "mig": mig,
                }
            )
    finally:
        pynvml.nvmlShutdown()
    return gpus


def gpu_inventory(device: str, cpu_memory_gib: float) -> list[dict]:
    if device == "cuda":
        return _nvml_gpus()
    return [
        {
            "index": 0,
            "uuid": f"CPU-{os.uname().nodename}",
            "name": "CPU (no GPU: agent in CPU mode)",
            "memory_total": int(cpu_memory_gib * GiB),
            "memory_used": 0,
            "utilization": None,
            "mig": False,
        }
    ]
