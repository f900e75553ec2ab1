"""Whether torch can see a CUDA (or ROCm) device, answered without importing torch where no GPU
runtime can be there: a config turned away over budget is priced before the ~1.5 s import."""
from __future__ import annotations

import os
import sys

# What a GPU runtime opens on Linux: NVIDIA's control device (Jetson's integrated GPU has its own),
# WSL2's GPU paravirtualisation, ROCm's KFD.
GPU_DEVICE_FILES = ("/dev/nvidiactl", "/dev/nvhost-ctrl-gpu", "/dev/dxg", "/dev/kfd")


def gpu_runtime_visible() -> bool:
    """False only on Linux without any GPU device file, where torch.cuda.is_available() is False too."""
    return sys.platform != "linux" or any(os.path.exists(p) for p in GPU_DEVICE_FILES)


def cuda_available() -> bool:
    """torch.cuda.is_available(), importing torch only where a GPU runtime is visible."""
    if not gpu_runtime_visible():
        return False
    import torch

    return torch.cuda.is_available()


def cpu_has_bf16_units() -> bool:
    """AVX512-BF16 or AMX, as torch.cpu reports them, read from /proc/cpuinfo's flags on Linux so
    that choosing the attention for a config (and pricing it) does not import torch."""
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("flags"):
                    return bool({"avx512_bf16", "amx_tile"} & set(line.split(":", 1)[1].split()))
    import torch  # no x86 flags line (ARM's cpuinfo lists "Features"), or not Linux

    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
