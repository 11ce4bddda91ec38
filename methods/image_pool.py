"""An image pool on the device: synthesised batches go in, distillation samples batches from it.

The DataFree split between synthesising images and distilling on them (Fang et al.'s DataFree and
Fast-Datafree keep every synthesised batch in a pool and train the student on random batches of it,
with the dataset's augmentation). Here the pool lives on the device as one tensor of *normalised*
images (no PNG round trip), grows batch by batch up to an optional capacity (then the oldest images
are replaced), and is checkpointed with the cell (``state_dict``).
"""
from __future__ import annotations

import torch

from bench.transforms import augment


class ImagePool:
    def __init__(self, capacity: int | None = None, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu"):
        if capacity is not None and capacity < 1:
            raise ValueError(f"capacity must be >= 1 or None, got {capacity}")
        self.capacity = capacity
        self.dtype = dtype
        self.device = torch.device(device)
        self.images: torch.Tensor | None = None
        self.next = 0  # where the next image goes once the pool is full (ring buffer)

    def __len__(self) -> int:
        return 0 if self.images is None else self.images.shape[0]

    def add(self, images: torch.Tensor) -> None:
        """Add a batch of normalised images (N, C, H, W); detached and stored in the pool's dtype.

        Below capacity the pool grows; beyond it the oldest images are replaced (a ring buffer whose
        oldest entry is at ``next``)."""
        images = images.detach().to(device=self.device, dtype=self.dtype)
        images = images.contiguous(memory_format=torch.contiguous_format)
        if self.images is None:
            self.images = images[:0].clone()
        if self.capacity is None or len(self) + images.shape[0] <= self.capacity:
            self.images = torch.cat([self.images, images])
            return
        room = self.capacity - len(self)
        if room > 0:
            self.images = torch.cat([self.images, images[:room]])
            images = images[room:]
        images = images[-self.capacity:]  # a batch larger than the pool: only its newest images stay
        idx = (torch.arange(images.shape[0], device=self.images.device) + self.next) % self.capacity
        self.images[idx] = images
        self.next = int((self.next + images.shape[0]) % self.capacity)

    def sample(self, n: int, generator: torch.Generator, augmentation: str = "none") -> torch.Tensor:
        """``n`` images drawn uniformly with replacement (float32), with the dataset's ``augmentation``."""
        if self.images is None:
            raise RuntimeError("the image pool is empty: synthesise a batch before sampling from it")
        idx = torch.randint(len(self), (n,), generator=generator).to(self.images.device)
        return augment(self.images[idx].float(), augmentation, generator)

    def latest(self, n: int) -> torch.Tensor:
        """The ``n`` most recently added images, oldest first (for showing the last synthesised batch)."""
        if self.images is None:
            raise RuntimeError("the image pool is empty")
        n = min(n, len(self))
        if self.capacity is None or len(self) < self.capacity:
            return self.images[len(self) - n:]
        idx = (torch.arange(-n, 0, device=self.images.device) + self.next) % self.capacity
        return self.images[idx]

    def state_dict(self) -> dict:
        return {"images": None if self.images is None else self.images.cpu(), "next": self.next}

    def load_state_dict(self, state: dict) -> None:
        images = state["images"]
        self.images = None if images is None else images.to(self.device)
        self.next = int(state["next"])
