"""Image priors and input transforms for synthesising images by model inversion.

Plain functions on batches ``(N, C, H, W)`` of *normalised* images (the model's input space), shared
by the methods that optimise pixels against a frozen teacher: Dream Distillation (``dream``) now, a
DeepInversion later (Yin et al., CVPR 2020, whose regularisers these are: total variation, an L2
penalty, random jitter and flips applied to the whole batch before the teacher sees it).

Random draws come from a CPU ``torch.Generator`` and are read on the host, so none of these
functions synchronises with an accelerator.
"""
from __future__ import annotations

from typing import Sequence

import torch


def total_variation(x: torch.Tensor, power: float = 1.0) -> torch.Tensor:
    """Mean ``|x[i+1, j] - x[i, j]|^p + |x[i, j+1] - x[i, j]|^p`` over the batch, channels and pixels.

    ``power=1`` is anisotropic TV (DeepInversion's ``l1`` variant up to its normalisation), ``power=2``
    the squared-difference smoothness prior of feature visualisation. Differences between
    neighbouring pixels only; a mean, so its scale does not depend on the image size.
    """
    if x.dim() != 4:
        raise ValueError(f"total_variation expects (N, C, H, W), got shape {tuple(x.shape)}")
    dh = (x[:, :, 1:, :] - x[:, :, :-1, :]).abs()
    dw = (x[:, :, :, 1:] - x[:, :, :, :-1]).abs()
    if power != 1.0:
        dh, dw = dh.pow(power), dw.pow(power)
    return dh.mean() + dw.mean()


def l2_prior(x: torch.Tensor, squared: bool = True) -> torch.Tensor:
    """Pull pixels toward 0, the dataset mean colour in normalised space.

    ``squared=True``: mean of ``x^2`` over every element. ``squared=False``: mean over the batch of
    each image's Euclidean norm (DeepInversion's ``torch.norm(x.view(N, -1), dim=1).mean()``).
    """
    if squared:
        return x.pow(2).mean()
    return x.flatten(1).norm(dim=1).mean()


def random_jitter(x: torch.Tensor, max_shift: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Roll the whole batch by one random ``(dy, dx)`` in ``[-max_shift, max_shift]`` (wrapping around).

    DeepInversion's jitter: the same shift for every image of the batch, drawn per step, so the
    synthesised pixels must work at every offset (a translation-invariance prior). ``max_shift=0``
    returns ``x``.
    """
    if max_shift < 0:
        raise ValueError(f"max_shift must be >= 0, got {max_shift!r}")
    if max_shift == 0:
        return x
    dy, dx = torch.randint(-max_shift, max_shift + 1, (2,), generator=generator).tolist()
    return torch.roll(x, shifts=(dy, dx), dims=(2, 3)) if (dy or dx) else x


def random_flip(x: torch.Tensor, generator: torch.Generator | None = None, p: float = 0.5) -> torch.Tensor:
    """Flip the whole batch horizontally with probability ``p`` (DeepInversion's per-step flip)."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"flip probability must be in [0, 1], got {p!r}")
    if p > 0 and torch.rand((), generator=generator).item() < p:  # a CPU draw: no device sync
        return x.flip(3)
    return x


def pixel_bounds(mean: Sequence[float], std: Sequence[float], device: torch.device | str | None = None,
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel ``(low, high)`` of valid normalised pixels: ``(0 - mean) / std`` and ``(1 - mean) / std``.

    Shaped ``(1, C, 1, 1)`` for broadcasting; ``torch.maximum(torch.minimum(x, high), low)`` (or
    :func:`clamp_to_bounds`) keeps a synthesised image displayable.
    """
    m = torch.tensor(list(mean), dtype=torch.float32, device=device).view(1, -1, 1, 1)
    s = torch.tensor(list(std), dtype=torch.float32, device=device).view(1, -1, 1, 1)
    return (0.0 - m) / s, (1.0 - m) / s


@torch.no_grad()
def clamp_to_bounds(x: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """Clamp ``x`` in place to per-channel ``[low, high]`` (from :func:`pixel_bounds`); returns ``x``."""
    return x.copy_(torch.maximum(torch.minimum(x, high), low))


def denormalise(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Normalised images -> pixels in ``[0, 1]`` (clipped), for saving or showing."""
    m = torch.tensor(list(mean), dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(list(std), dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x * s + m).clamp(0.0, 1.0)
