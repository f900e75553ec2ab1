"""What every benchmark needs: the repository importable, ftlab's config composed as
`python -m ftlab <overrides>` would compose it, and positional arguments with defaults.
(`python bench/<name>.py` puts bench/ first on sys.path, so `from common import ...` works.)"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def compose_config(*overrides: str):
    from hydra import compose, initialize_config_dir

    import ftlab.config  # noqa: F401  (registers the structured-config schema)
    from ftlab.pipeline import quiet_third_party_output

    quiet_third_party_output()  # the notices `python -m ftlab` hides, e.g. bitsandbytes' missing hub kernel

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def arg(position: int, default, cast=str):
    """sys.argv[position] as `cast`, or `default` when it is not given."""
    return cast(sys.argv[position]) if len(sys.argv) > position else default


def matmul_flops(dtype, m: int, k: int, n: int, reps: int) -> float:
    """FLOP/s of an (m x k) by (k x n) matmul in `dtype`, on all of torch's threads, after one warm-up."""
    import time

    import torch

    a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
    torch.mm(a, b)  # warm up
    start = time.perf_counter()
    for _ in range(reps):
        torch.mm(a, b)
    return 2 * m * k * n * reps / (time.perf_counter() - start)
