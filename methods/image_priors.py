"""Image priors and input transforms for synthesising images by model inversion.

Plain functions on batches ``(N, C, H, W)`` of *normalised* images (the model's input space), shared
by the methods that optimise pixels (or a generator) against a frozen teacher: Dream Distillation
(``dream``), DeepInversion/ADI (``deepinversion``, ``adi``; Yin et al., CVPR 2020, whose regularisers
these are: total variation, an L2 penalty, random jitter and flips applied to the whole batch before
the teacher sees it), CMI's global/local views and Fast-DFKD's crop (``cmi``, ``fast_dfkd``: per-image
random crops with padding, random resized crops, per-image flips).

Random draws come from a CPU ``torch.Generator`` and are read on the host, so none of these
functions synchronises with an accelerator.
"""
from __future__ import annotations

import math
from functools import lru_cache
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


def total_variation_4(x: torch.Tensor, norm: str = "l2") -> torch.Tensor:
    """DeepInversion's total variation over four neighbour directions (right, down and both diagonals).

    ``norm="l2"``: the sum over the four difference tensors of each one's L2 norm over the whole batch
    (NVlabs/DeepInversion ``cifar10/deepinversion_cifar10.py``, ``loss_var``; scale grows with the batch
    and image size, hence its small weight 2.5e-5). ``norm="l1"``: the sum over the four of the mean
    absolute difference (zju-vipa/DataFree ``criterions.get_image_prior_losses``, weight 1e-3 there).
    """
    if x.dim() != 4:
        raise ValueError(f"total_variation_4 expects (N, C, H, W), got shape {tuple(x.shape)}")
    diffs = (x[:, :, :, :-1] - x[:, :, :, 1:], x[:, :, :-1, :] - x[:, :, 1:, :],
             x[:, :, 1:, :-1] - x[:, :, :-1, 1:], x[:, :, :-1, :-1] - x[:, :, 1:, 1:])
    if norm == "l2":
        return sum(torch.linalg.vector_norm(d) for d in diffs)
    if norm == "l1":
        return sum(d.abs().mean() for d in diffs)
    raise ValueError(f"unknown total variation norm {norm!r}; valid: l1, l2")


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


def _uniform(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """Uniform [0, 1) numbers drawn on the generator's device (CPU for ``ctx.generator``), moved to ``device``."""
    gen_device = generator.device if generator is not None else torch.device("cpu")
    return torch.rand(shape, generator=generator, device=gen_device).to(device)


def random_flip_each(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Flip each image of the batch horizontally with probability 1/2 (kornia's ``RandomHorizontalFlip``)."""
    flip = _uniform((x.shape[0],), generator, x.device) < 0.5
    return torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)


def random_crop(x: torch.Tensor, pad: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Per-image random crop of the original size from the batch zero-padded by ``pad`` pixels.

    CMI's global view and Fast-DFKD's augmentation (kornia ``RandomCrop(size, padding=4)`` at 32 px).
    Zero padding means black for images in [0, 1] (apply it before normalising, as DataFree does).
    """
    if pad < 0:
        raise ValueError(f"pad must be >= 0, got {pad!r}")
    if pad == 0:
        return x
    n, _, h, w = x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    offsets = (_uniform((n, 2), generator, x.device) * (2 * pad + 1)).long().clamp_(max=2 * pad)
    rows = (offsets[:, 0:1] + torch.arange(h, device=x.device)).view(n, 1, h, 1)
    cols = (offsets[:, 1:2] + torch.arange(w, device=x.device)).view(n, 1, 1, w)
    index = torch.arange(n, device=x.device).view(n, 1, 1, 1)
    channels = torch.arange(x.shape[1], device=x.device).view(1, -1, 1, 1)
    return padded[index, channels, rows, cols]


def random_resized_crop(x: torch.Tensor, scale: tuple[float, float] = (0.25, 1.0),
                        ratio: tuple[float, float] = (3 / 4, 4 / 3),
                        generator: torch.Generator | None = None) -> torch.Tensor:
    """Per-image random crop of area ``scale`` x the image and aspect ``ratio``, resized back (bilinear).

    CMI's local view (kornia ``RandomResizedCrop(size, scale=(0.25, 1))``, default ratio 3/4..4/3):
    area fraction uniform in ``scale``, log-ratio uniform in ``log(ratio)``, the crop's sides capped
    at the image's and its centre uniform where the crop fits; one batched ``grid_sample``.
    """
    if not 0 < scale[0] <= scale[1] <= 1:
        raise ValueError(f"scale must satisfy 0 < low <= high <= 1, got {scale!r}")
    n = x.shape[0]
    u = _uniform((n, 4), generator, x.device)
    area = scale[0] + (scale[1] - scale[0]) * u[:, 0]
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * u[:, 1])
    width = torch.sqrt(area * aspect).clamp(max=1.0)  # fractions of the image side
    height = torch.sqrt(area / aspect).clamp(max=1.0)
    cx = (2 * u[:, 2] - 1) * (1 - width)  # centre in [-1, 1] coordinates, crop inside the image
    cy = (2 * u[:, 3] - 1) * (1 - height)
    theta = torch.zeros(n, 2, 3, device=x.device, dtype=x.dtype)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = width, cx, height, cy
    grid = torch.nn.functional.affine_grid(theta, list(x.shape), align_corners=False)
    return torch.nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


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


@lru_cache(maxsize=32)
def _mean_std(mean: tuple[float, ...], std: tuple[float, ...], device: torch.device, dtype: torch.dtype,
              ) -> tuple[torch.Tensor, torch.Tensor]:
    m = torch.tensor(mean, dtype=dtype, device=device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=dtype, device=device).view(1, -1, 1, 1)
    return m, s


def normalise(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Pixels in ``[0, 1]`` -> the model's normalised input ``(x - mean) / std`` (per channel).

    The mean/std tensors are built once per (dataset, device, dtype): no host-to-device copy per call."""
    m, s = _mean_std(tuple(mean), tuple(std), x.device, x.dtype)
    return (x - m) / s


def denormalise(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Normalised images -> pixels in ``[0, 1]`` (clipped), for saving or showing."""
    m = torch.tensor(list(mean), dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(list(std), dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x * s + m).clamp(0.0, 1.0)
