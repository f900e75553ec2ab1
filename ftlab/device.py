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
