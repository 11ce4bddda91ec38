"""Hot-path tensor ops on image batches: normalisation, augmentation, batching.

Everything a training loop does to a batch of images, as batched tensor operations on the batch's
device (no per-sample Python, no torchvision). Kept apart from :mod:`bench.data` (which reads dataset
files) because these functions change the numbers a cell produces: their source is part of every
cell's identity (:mod:`bench.provenance`), while the data itself is covered by its fingerprint.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Iterator

import torch
import torch.nn.functional as F

from bench.data import AUGMENTATIONS, DatasetInfo


@lru_cache(maxsize=64)
def _affine(mean: tuple[float, ...], std: tuple[float, ...], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    m = torch.tensor(mean, dtype=torch.float64)
    s = torch.tensor(std, dtype=torch.float64)
    scale = (1.0 / (255.0 * s)).float().view(1, -1, 1, 1).to(device)
    shift = (-m / s).float().view(1, -1, 1, 1).to(device)
    return scale, shift


def to_float(x_uint8: torch.Tensor, info: DatasetInfo) -> torch.Tensor:
    """uint8 images ``(N, C, H, W)`` -> normalised float32 ``(x / 255 - mean) / std`` on the same device."""
    if x_uint8.dtype != torch.uint8:
        raise ValueError(f"to_float expects uint8 images, got dtype {x_uint8.dtype}")
    if x_uint8.dim() != 4 or x_uint8.shape[1] != info.channels:
        raise ValueError(f"to_float expects (N, {info.channels}, H, W) images for {info.name!r}, "
                         f"got shape {tuple(x_uint8.shape)}")
    scale, shift = _affine(tuple(info.mean), tuple(info.std), x_uint8.device)
    return torch.addcmul(shift, x_uint8.float(), scale)


def _rand(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    gen_device = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=gen_device).to(device)


def augment(x: torch.Tensor, kind: str, generator: torch.Generator | None = None) -> torch.Tensor:
    """Batched training augmentation of images ``(N, C, S, S)`` (uint8 or float), on x's device.

    ``"none"`` returns ``x`` itself. ``"crop_flip"``: random crop of side S from the image padded
    with zeros by ``round(4 * S / 32)`` pixels (4 px at 32 px), then a horizontal flip with
    probability 1/2; one crop offset and one flip per image. Zero padding of normalised input is the
    mean colour. The random numbers come from ``generator`` (on its own device) when given.
    """
    if kind not in AUGMENTATIONS:
        raise ValueError(f"unknown augmentation {kind!r}; valid: {', '.join(AUGMENTATIONS)}")
    if kind == "none":
        return x
    if x.dim() != 4:
        raise ValueError(f"augment expects a batch (N, C, H, W), got shape {tuple(x.shape)}")
    n, _, h, w = x.shape
    pad = max(1, round(4 * max(h, w) / 32))
    padded = F.pad(x, (pad, pad, pad, pad))
    offsets = (_rand((n, 2), generator, x.device) * (2 * pad + 1)).long().clamp_(max=2 * pad)
    rows = offsets[:, 0:1] + torch.arange(h, device=x.device)  # (N, H)
    cols = offsets[:, 1:2] + torch.arange(w, device=x.device)  # (N, W)
    batch = torch.arange(n, device=x.device).view(n, 1, 1)
    cropped = padded[batch, :, rows.view(n, h, 1), cols.view(n, 1, w)].permute(0, 3, 1, 2)  # (N,H,W,C)->(N,C,H,W)
    flip = _rand((n,), generator, x.device) < 0.5
    return torch.where(flip.view(n, 1, 1, 1), cropped.flip(3), cropped).contiguous()


def iterate_batches(x: torch.Tensor, y: torch.Tensor | None, batch_size: int, *, shuffle: bool,
                    generator: torch.Generator | None = None,
                    drop_last: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """One pass over ``(x, y)`` in batches sliced on x's device; ``y=None`` yields ``(xb, None)``.

    With ``shuffle`` the order is a permutation drawn from ``generator`` (on its own device).
    ``drop_last`` drops a final batch smaller than ``batch_size``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
    n = x.shape[0]
    if y is not None and y.shape[0] != n:
        raise ValueError(f"x has {n} samples but y has {y.shape[0]}")
    order: torch.Tensor | None = None
    if shuffle:
        gen_device = generator.device if generator is not None else torch.device("cpu")
        order = torch.randperm(n, generator=generator, device=gen_device).to(x.device)
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        if order is None:
            xb = x[start:start + batch_size]
            yb = y[start:start + batch_size] if y is not None else None
        else:
            idx = order[start:start + batch_size]
            xb = x[idx]
            yb = y[idx.to(y.device)] if y is not None else None
        yield xb, yb


class BatchStream:
    """Endless batches over ``(x, y)``, reshuffled every epoch from ``generator``, with a state dict.

    What ``ctx.train_batches`` and ``ctx.batches`` hand a method: an iterator whose position (the
    epoch's permutation and the offset in it) is saved in in-cell checkpoints, so that a resumed cell
    sees exactly the batches an uninterrupted one would. ``transform(xb)`` (e.g. normalise + augment)
    is applied to each image batch; ``y=None`` yields ``(xb, None)``. Batches are at most ``n`` images;
    with ``drop_last`` every batch is full.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor | None, batch_size: int, *, generator: torch.Generator,
                 shuffle: bool = True, drop_last: bool = True, transform=None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
        if x.shape[0] == 0:
            raise ValueError("BatchStream needs at least one image")
        if y is not None and y.shape[0] != x.shape[0]:
            raise ValueError(f"x has {x.shape[0]} samples but y has {y.shape[0]}")
        self.x, self.y, self.generator = x, y, generator
        self.batch_size = min(batch_size, x.shape[0])
        self.shuffle, self.drop_last, self.transform = shuffle, drop_last, transform
        self.order: torch.Tensor | None = None
        self.position = 0
        self.epoch = 0

    def __iter__(self) -> "BatchStream":
        return self

    def _new_epoch(self) -> None:
        n = self.x.shape[0]
        if self.shuffle:
            gen_device = self.generator.device if self.generator is not None else torch.device("cpu")
            self.order = torch.randperm(n, generator=self.generator, device=gen_device).to(self.x.device)
        else:
            self.order = torch.arange(n, device=self.x.device)
        self.position = 0
        self.epoch += 1

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        n = self.x.shape[0]
        stop = n - n % self.batch_size if self.drop_last else n
        if self.order is None or self.position >= stop:
            self._new_epoch()
        idx = self.order[self.position:self.position + self.batch_size]
        self.position += idx.shape[0]
        xb = self.x[idx]
        if self.transform is not None:
            xb = self.transform(xb)
        return xb, (self.y[idx.to(self.y.device)] if self.y is not None else None)

    def state_dict(self) -> dict:
        return {"order": None if self.order is None else self.order.cpu(), "position": self.position,
                "epoch": self.epoch}

    def load_state_dict(self, state: dict) -> None:
        order = state["order"]
        self.order = None if order is None else order.to(self.x.device)
        self.position, self.epoch = int(state["position"]), int(state["epoch"])
