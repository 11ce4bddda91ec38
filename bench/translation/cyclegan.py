"""CycleGAN (Zhu, Park, Isola, Efros, ICCV 2017) scaled to 32-px grey digits.

- Generator: the paper's ResNet generator ``c7s1-w, d2w, d4w, R4w x blocks, u2w, uw, c7s1-1`` (reflection
  padding, InstanceNorm without affine parameters, ReLU, tanh output), with the base ``width`` and the
  number of residual ``blocks`` as fields (paper: width 64, 9 blocks at 256 px; scaled here, see
  docs/translation.md). :class:`Generator` takes the five filter counts separately so a pruned generator is
  the same class with fewer filters: ``widths = (c1, d1, trunk, u1, u2)``; the trunk (the second down-sampling
  conv and every residual block's convolutions) shares one count, as the residual sums require and as the
  official GAN-Pruning code masks it (one 4w mask for "3rd conv 1~9 res_block").
- Discriminator: the 70x70 PatchGAN ``C64-C128-C256-C512`` scaled: ``C w-C 2w-C 4w`` (4x4 convs, stride 2
  except the last, LeakyReLU 0.2, InstanceNorm after the first), one output map of patch scores.
- Losses and optimiser (the paper's section 4 / 7.1): least-squares GAN loss, cycle L1 with
  lambda_cycle = 10, identity L1 with weight 0.5 * lambda_cycle, Adam lr 2e-4 betas (0.5, 0.999), the
  discriminators updated from a pool of the 50 previously generated images, the discriminator loss halved,
  lr constant for the first half of training then linearly decayed to zero. The paper counts 200 epochs at
  batch size 1; the harness counts training in steps (``steps``).

Images live in [-1, 1] (``to_unit``), as the paper's normalisation (0.5, 0.5) gives.
"""
from __future__ import annotations

import copy
import itertools
import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


def to_unit(x_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 images in [0, 255] -> float in [-1, 1]."""
    return x_uint8.float() / 127.5 - 1.0


def base_widths(width: int) -> tuple[int, int, int, int, int]:
    """The filter counts (c1, d1, trunk, u1, u2) of the uncompressed generator of base ``width``."""
    return (width, 2 * width, 4 * width, 2 * width, width)


class ResBlock(nn.Module):
    def __init__(self, channels: int, inner: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, inner, 3)
        self.conv2 = nn.Conv2d(inner, channels, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(F.instance_norm(self.conv1(F.pad(x, (1, 1, 1, 1), mode="reflect"))))
        return x + F.instance_norm(self.conv2(F.pad(y, (1, 1, 1, 1), mode="reflect")))


class Generator(nn.Module):
    """The ResNet generator with filter counts ``widths = (c1, d1, trunk, u1, u2)`` and ``blocks`` residual blocks."""

    def __init__(self, widths: tuple[int, int, int, int, int], blocks: int, channels: int = 1):
        super().__init__()
        c1, d1, trunk, u1, u2 = (int(w) for w in widths)
        if min(c1, d1, trunk, u1, u2) < 1 or blocks < 0:
            raise ValueError(f"generator: every width must be >= 1 and blocks >= 0, got widths {widths}, blocks {blocks}")
        self.widths, self.blocks, self.channels = (c1, d1, trunk, u1, u2), blocks, channels
        self.c1 = nn.Conv2d(channels, c1, 7)
        self.d1 = nn.Conv2d(c1, d1, 3, stride=2, padding=1)
        self.d2 = nn.Conv2d(d1, trunk, 3, stride=2, padding=1)
        self.res = nn.ModuleList(ResBlock(trunk, trunk) for _ in range(blocks))
        self.u1 = nn.ConvTranspose2d(trunk, u1, 3, stride=2, padding=1, output_padding=1)
        self.u2 = nn.ConvTranspose2d(u1, u2, 3, stride=2, padding=1, output_padding=1)
        self.out = nn.Conv2d(u2, channels, 7)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(F.instance_norm(self.c1(F.pad(x, (3, 3, 3, 3), mode="reflect"))))
        x = F.relu(F.instance_norm(self.d1(x)))
        x = F.relu(F.instance_norm(self.d2(x)))
        for block in self.res:
            x = block(x)
        x = F.relu(F.instance_norm(self.u1(x)))
        x = F.relu(F.instance_norm(self.u2(x)))
        return torch.tanh(self.out(F.pad(x, (3, 3, 3, 3), mode="reflect")))


class Discriminator(nn.Module):
    """PatchGAN scaled to 32 px: C w (no norm) - C 2w - C 4w (stride 1) - 1-channel patch map."""

    def __init__(self, width: int, channels: int = 1):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(channels, width, 4, 2, 1), nn.LeakyReLU(0.2),
            nn.Conv2d(width, 2 * width, 4, 2, 1), nn.InstanceNorm2d(2 * width), nn.LeakyReLU(0.2),
            nn.Conv2d(2 * width, 4 * width, 4, 1, 1), nn.InstanceNorm2d(4 * width), nn.LeakyReLU(0.2),
            nn.Conv2d(4 * width, 1, 4, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@dataclass
class CycleGANConfig:
    """The CycleGAN paper's training settings (section 4 and appendix 7.1), steps in place of epochs."""

    width: int = 16  # base filters (paper: 64 at 256 px; scaled for 32-px digits, harness choice)
    blocks: int = 3  # residual blocks (paper: 9 at 256 px, 6 at 128 px; scaled, harness choice)
    disc_width: int = 16  # PatchGAN base filters (paper: 64; scaled, harness choice)
    steps: int = 8000  # generator updates (paper: 200 epochs of about 1,000 images at batch 1; harness choice)
    batch_size: int = 1  # paper: 1
    lr: float = 2e-4  # paper
    beta1: float = 0.5  # paper
    beta2: float = 0.999  # paper
    lambda_cycle: float = 10.0  # paper
    identity: float = 0.5  # identity weight as a fraction of lambda_cycle (paper: 0.5)
    pool_size: int = 50  # paper: a history of the 50 latest generated images
    decay_from: float = 0.5  # fraction of the steps after which lr decays linearly to 0 (paper: 100 of 200 epochs)

    def validate(self) -> None:
        for name in ("width", "disc_width", "steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"cyclegan: {name} must be >= 1, got {getattr(self, name)}")
        if self.blocks < 0 or self.pool_size < 0 or not 0 <= self.decay_from <= 1 or self.lr <= 0:
            raise ValueError(f"cyclegan: blocks and pool_size must be >= 0, decay_from in [0, 1], lr > 0; got "
                             f"blocks={self.blocks}, pool_size={self.pool_size}, decay_from={self.decay_from}, lr={self.lr}")


class ImagePool:
    """The paper's history of generated images (Shrivastava et al. 2017): until full, every image is stored
    and returned; then with probability 1/2 an image is swapped with a random stored one."""

    def __init__(self, size: int, rng: random.Random):
        self.size, self.rng, self.images = size, rng, []

    def query(self, images: torch.Tensor) -> torch.Tensor:
        if self.size == 0:
            return images
        out = []
        for image in images.detach():
            if len(self.images) < self.size:
                self.images.append(image)
                out.append(image)
            elif self.rng.random() < 0.5:
                i = self.rng.randrange(self.size)
                out.append(self.images[i])
                self.images[i] = image
            else:
                out.append(image)
        return torch.stack(out)


@dataclass
class CycleGAN:
    """The two generators (A->B, B->A) and the two discriminators (judging A, judging B)."""

    g_ab: Generator
    g_ba: Generator
    d_a: Discriminator
    d_b: Discriminator

    def generators(self) -> tuple[Generator, Generator]:
        return self.g_ab, self.g_ba

    def state_dict(self) -> dict[str, dict[str, torch.Tensor]]:
        return {k: getattr(self, k).state_dict() for k in ("g_ab", "g_ba", "d_a", "d_b")}


def build(config: CycleGANConfig, channels: int = 1) -> CycleGAN:
    widths = base_widths(config.width)
    return CycleGAN(Generator(widths, config.blocks, channels), Generator(widths, config.blocks, channels),
                    Discriminator(config.disc_width, channels), Discriminator(config.disc_width, channels))


def init_weights(model: nn.Module, gen: torch.Generator) -> None:
    """The paper's initialisation: weights from N(0, 0.02), biases zero."""
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            with torch.no_grad():
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * 0.02)
                m.bias.zero_()


def _lsgan(pred: torch.Tensor, real: bool) -> torch.Tensor:
    return F.mse_loss(pred, torch.full_like(pred, 1.0 if real else 0.0))


def generator_losses(model: CycleGAN, a: torch.Tensor, b: torch.Tensor, config: CycleGANConfig) -> dict[str, torch.Tensor]:
    """The generators' objective on one batch: LSGAN + lambda * cycle L1 + identity L1 (and the fakes)."""
    fake_b, fake_a = model.g_ab(a), model.g_ba(b)
    cycle = F.l1_loss(model.g_ba(fake_b), a) + F.l1_loss(model.g_ab(fake_a), b)
    gan = _lsgan(model.d_b(fake_b), True) + _lsgan(model.d_a(fake_a), True)
    losses = {"gan": gan, "cycle": cycle, "fake_a": fake_a, "fake_b": fake_b}
    loss = gan + config.lambda_cycle * cycle
    if config.identity > 0:
        idt = F.l1_loss(model.g_ab(b), b) + F.l1_loss(model.g_ba(a), a)
        loss = loss + config.identity * config.lambda_cycle * idt
        losses["identity"] = idt
    losses["loss"] = loss
    return losses


def train(model: CycleGAN, a_images: torch.Tensor, b_images: torch.Tensor, config: CycleGANConfig, seed: int,
          steps: int | None = None, log=None) -> list[dict[str, float]]:
    """Train (or fine-tune) ``model`` in place on unpaired uint8 images of the two domains; returns the
    losses every 50 steps. Batches are drawn independently from each domain (unpaired), seeded."""
    config.validate()
    steps = config.steps if steps is None else steps
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    a_all, b_all = to_unit(a_images), to_unit(b_images)
    opt_g = torch.optim.Adam(itertools.chain(model.g_ab.parameters(), model.g_ba.parameters()), lr=config.lr,
                             betas=(config.beta1, config.beta2))
    opt_d = torch.optim.Adam(itertools.chain(model.d_a.parameters(), model.d_b.parameters()), lr=config.lr,
                             betas=(config.beta1, config.beta2))
    keep = int(steps * config.decay_from)
    decay = lambda s: 1.0 if s < keep else max(0.0, 1.0 - (s - keep) / max(1, steps - keep))  # noqa: E731
    schedulers = [torch.optim.lr_scheduler.LambdaLR(o, decay) for o in (opt_g, opt_d)]
    pool_a, pool_b = ImagePool(config.pool_size, rng), ImagePool(config.pool_size, rng)
    for m in (model.g_ab, model.g_ba, model.d_a, model.d_b):
        m.train()
    history = []
    for step in range(steps):
        a = a_all[torch.randint(0, a_all.shape[0], (config.batch_size,), generator=gen)]
        b = b_all[torch.randint(0, b_all.shape[0], (config.batch_size,), generator=gen)]
        for d in (model.d_a, model.d_b):
            d.requires_grad_(False)
        losses = generator_losses(model, a, b, config)
        opt_g.zero_grad(set_to_none=True)
        losses["loss"].backward()
        opt_g.step()
        for d in (model.d_a, model.d_b):
            d.requires_grad_(True)
        fake_a, fake_b = pool_a.query(losses["fake_a"]), pool_b.query(losses["fake_b"])
        loss_d = 0.5 * (_lsgan(model.d_a(a), True) + _lsgan(model.d_a(fake_a), False)) + \
            0.5 * (_lsgan(model.d_b(b), True) + _lsgan(model.d_b(fake_b), False))
        opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        opt_d.step()
        for s in schedulers:
            s.step()
        if step % 50 == 0 or step == steps - 1:
            record = {"step": step, **{k: float(losses[k].detach()) for k in ("loss", "cycle", "gan")},
                      "loss_d": float(loss_d.detach())}
            history.append(record)
            if log is not None:
                log(record)
    for m in (model.g_ab, model.g_ba, model.d_a, model.d_b):
        m.eval()
    return history


def copy_model(model: CycleGAN) -> CycleGAN:
    return CycleGAN(*(copy.deepcopy(m) for m in (model.g_ab, model.g_ba, model.d_a, model.d_b)))
