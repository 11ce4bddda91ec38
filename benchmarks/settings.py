"""Settings the speed benchmarks share, read from the environment (each benchmark's docstring lists its own)."""
from __future__ import annotations

import os

import torch


def env_int(name: str, default: int) -> int:
    """An integer from ``$name``, else ``default``."""
    return int(os.environ.get(name) or default)


DEVICE = torch.device(os.environ.get("DFKD_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu"))
ON_CUDA = DEVICE.type == "cuda"
AMP = os.environ.get("DFKD_BENCH_AMP") == "1"  # bf16 autocast where the device computes bf16 natively
RESNET = ON_CUDA or os.environ.get("DFKD_BENCH_RESNET") == "1"  # the ResNet cases: always on CUDA, opt-in on CPU
