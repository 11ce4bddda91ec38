"""Fast-DFKD (``fast_dfkd``): a meta-learned generator that synthesises each batch in a few steps.

Fang, Mo, Wang, Song, Song, Song, "Up to 100x Faster Data-free Knowledge Distillation", AAAI 2022
(arXiv 2112.06253); official code zju-vipa/Fast-Datafree (``datafree/synthesis/fast_meta.py``,
``scripts/fast_cifar.sh``, ``datafree_kd.py``).

One persistent generator (methods/generator.py ``DataFreeGenerator``, nz 256, width 64). Each
synthesised batch: the generator is cloned; the clone and a fresh z ~ N(0, 1) are optimised for
``g_steps`` Adam steps (betas (0.5, 0.999); lr_g for the clone, lr_z for z) on

    L = bn * L_BN(momentum) + oh * CE(T(a), y) + adv * L_adv

with a = crop (4-px zero padding) + flip (where the dataset flips) of G'(z), normalised; y uniform
random classes; L_BN against ``(1 - bn_mmt) * current + bn_mmt * past`` batch statistics
(``BNStatistics(momentum=bn_mmt)``, advanced by ``update_momentum()`` after every batch); L_adv the
decision-adversarial term (as CMI; off during the warm-up). First-order meta update (``fomaml_grad``):
the gradient of every inner step w.r.t. the clone's parameters is accumulated onto the persistent
generator, which then takes one Adam step (lr ``lr_g * g_steps``, betas (0.5, 0.999)). The lowest-loss
inner iterate goes to the pool. At synthesis number ``reset_l0_at`` (official: epoch 120 after the
warm-up, i.e. 140) the generator's first Linear and first BatchNorm are re-initialised (``reset_l0``).

Schedule: ``warmup`` batches are synthesised first with no KD (a ``ctx.steps`` phase that does not
train the student), then the student loop of methods/pool_kd.py (one batch per ``kd_steps`` steps; SGD
lr 0.2, cosine to 2e-4 over 200 KD epochs of 400 steps, T 20).

Presets: ``cifar10`` = ``scripts/fast_cifar.sh`` "Fast-10" for WRN pairs (g_steps 10, lr_g 2e-3, lr_z
0.01, adv 1.1, bn 10, oh 0.4, bn_mmt 0.9, warm-up 20, 220 epochs, reset_l0), ``cifar10_resnet`` the
ResNet/VGG pairs' oh 0.5 / adv 1.33 (ResNet; VGG uses adv 1.0), ``cifar10_fast2`` and ``cifar10_fast5``
the 2- and 5-step variants (lr_g 5e-3 / 3e-3, lr_z 0.015 / 0.01). ``mnist`` (the grey 32-px sets:
Fashion-MNIST, MNIST, digits): the paper has no MNIST setting, so the grey sets run its CIFAR-10 values
(the ``cifar10`` preset, Fast-10); tuned values come from ``bench tune`` (docs/tuning.md, the ``tuned``
track).

Deviations: budget-scaled runs scale the warm-up (``ctx.scaled(warmup)``) and the reset point with
the same fraction. The official code already switches the adversarial term on in the last warm-up
epoch (``ep >= warmup`` with ``ep`` counted from 1): here it is off for all ``warmup`` warm-up batches.
Needs a teacher with BatchNorm (``lenet5_bn`` on the grey datasets).
"""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from bench.config import ConfigError
from bench.method import register
from bench.search_space import Choice, Float, Int
from methods.bn_stats import BNStatistics, require_batchnorm
from methods.generator import DataFreeGenerator, reinitialise
from methods.image_pool import ImagePool
from methods.image_priors import normalise, random_crop, random_flip_each
from methods.losses import decision_adversarial_loss
from methods.pool_kd import (InversionMethod, PoolKDConfig, Synthesis, add_batch, best_so_far, distill_on_pool,
                             frozen_student, teacher_channels_last)

STATS = ("loss_bn", "loss_oh", "loss_adv", "loss_g")


@dataclass
class FastDFKDConfig(PoolKDConfig):
    # ---- student (scripts/fast_cifar.sh, datafree_kd.py)
    lr: float = 0.2  # --lr 0.2
    lr_min: float = 2e-4  # CosineAnnealingLR(T_max=200, eta_min=2e-4)
    epochs: int = 200  # KD epochs after the warm-up (--epochs 220 - --warmup 20)
    # ---- synthesis ("Fast-10", WRN pairs)
    synth_batch: int = 256  # --batch_size 256
    g_steps: int = 10  # --g_steps 10 inner steps
    lr_g: float = 2e-3  # --lr_g 2e-3 (inner); the meta step uses lr_g * g_steps
    lr_z: float = 0.01  # --lr_z 0.01
    latent_dim: int = 256  # nz = 256
    gen_width: int = 64  # ngf = 64
    bn: float = 10.0  # --bn 10.0
    oh: float = 0.4  # --oh 0.4 (WRN; 0.5 for ResNet/VGG)
    adv: float = 1.1  # --adv 1.1 (WRN; 1.33 ResNet-34, 1.0 VGG-11)
    bn_mmt: float = 0.9  # --bn_mmt 0.9
    warmup: int = 20  # --warmup 20 synthesised batches without KD (and without the adversarial term)
    reset_l0_at: int = 140  # --reset_l0 1: re-initialise the first layers at synthesis 120 + warmup (0: never)
    crop_pad: int = 4  # RandomCrop(padding=4) at 32 px
    flip: Literal["auto", "on", "off"] = "auto"  # auto: where the dataset's augmentation flips (CIFAR: on)

    def validate(self) -> None:
        super().validate()
        for name in ("g_steps", "lr_g", "lr_z", "latent_dim", "gen_width"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)!r}")
        for name in ("bn", "oh", "adv", "warmup", "reset_l0_at", "crop_pad"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if not 0.0 <= self.bn_mmt < 1.0:
            raise ConfigError(f"bn_mmt must be in [0, 1), got {self.bn_mmt!r}")
        if self.flip not in ("on", "off", "auto"):
            raise ConfigError(f"flip must be one of on, off, auto; got {self.flip!r}")


PRESETS = {
    "cifar10": dict(),  # Fast-10, WRN pairs
    "cifar10_resnet": dict(oh=0.5, adv=1.33),
    "cifar10_fast2": dict(g_steps=2, lr_g=5e-3, lr_z=0.015),
    "cifar10_fast5": dict(g_steps=5, lr_g=3e-3, lr_z=0.01),
    "mnist": dict(),  # no MNIST setting in the paper: Fast-10's CIFAR-10 values (the nearest dataset; = cifar10)
}
PRESET_FOR_DATASET = {"mnist": "mnist", "fashion_mnist": "mnist", "digits": "mnist", "mnist_5k": "mnist",
                      "mnist_t10k": "mnist", "cifar10": "cifar10", "cifar100": "cifar10", "svhn": "cifar10"}


def meta_synthesise(generator, meta_opt: torch.optim.Optimizer, teacher, bn_stats: BNStatistics, cfg: FastDFKDConfig,
                    augment, targets: torch.Tensor, *, student=None, autocast=contextlib.nullcontext,
                    mean=(0.0,), std=(1.0,)) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """One Fast-DFKD batch: inner steps on a clone of ``generator``, then the first-order meta step on it.

    ``augment(x) -> x'`` (pixels in [0, 1]); ``student`` given: the decision-adversarial term is on. Returns
    ``(best images normalised, the teacher's logits there, last-step statistics)``; no host sync."""
    device = targets.device
    fast = copy.deepcopy(generator)
    z = torch.randn(targets.shape[0], cfg.latent_dim, device=device).requires_grad_(True)
    opt = torch.optim.Adam([{"params": fast.parameters()}, {"params": [z], "lr": cfg.lr_z}], lr=cfg.lr_g,
                           betas=(0.5, 0.999))
    meta_opt.zero_grad(set_to_none=True)
    best_x = best_logits = None
    best_loss = torch.full((), float("inf"), device=device)
    zero = torch.zeros((), device=device)
    for _ in range(cfg.g_steps):
        x = fast(z)
        view = normalise(augment(x), mean, std)
        with autocast():
            t_logits = teacher(view)
            s_logits = student(view) if student is not None else None
        t_logits = t_logits.float()
        loss_bn = bn_stats.loss()
        loss_oh = F.cross_entropy(t_logits, targets)
        loss_adv = decision_adversarial_loss(s_logits.float(), t_logits) if s_logits is not None else zero
        loss = cfg.bn * loss_bn + cfg.oh * loss_oh + cfg.adv * loss_adv
        if best_x is None:
            best_x, best_logits = torch.zeros_like(x), torch.zeros_like(t_logits)
        best_loss = best_so_far(loss, best_loss, (x, best_x), (t_logits, best_logits))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        for p, fast_p in zip(generator.parameters(), fast.parameters()):  # first-order MAML: sum the inner grads
            if fast_p.grad is not None:
                p.grad = fast_p.grad.clone() if p.grad is None else p.grad.add_(fast_p.grad)
        opt.step()
    meta_opt.step()
    bn_stats.update_momentum()
    stats = {"loss_bn": loss_bn.detach(), "loss_oh": loss_oh.detach(), "loss_adv": loss_adv.detach(),
             "loss_g": loss.detach()}
    return normalise(best_x, mean, std), best_logits, stats


class FastDFKDSynthesis(Synthesis):
    """Fast-DFKD's synthesis: the persistent generator, its meta optimiser, the BN momentum (all tracked)."""

    stat_names = STATS

    def __init__(self, teacher, student, ctx, cfg: FastDFKDConfig, method: str = "fast_dfkd"):
        info, device = ctx.info, ctx.device
        self.teacher, self.student, self.ctx, self.cfg = teacher, student, ctx, cfg
        self.bn_stats = BNStatistics(teacher.module, momentum=cfg.bn_mmt, method=method)
        self.flip = cfg.flip == "on" or (cfg.flip == "auto" and "flip" in info.augment)
        self.generator = DataFreeGenerator(cfg.latent_dim, cfg.gen_width, info.image_size, info.channels).to(device)
        if cfg.channels_last:
            self.generator = self.generator.to(memory_format=torch.channels_last)
        self.meta_opt = torch.optim.Adam(self.generator.parameters(), lr=cfg.lr_g * cfg.g_steps, betas=(0.5, 0.999))
        self.count = torch.zeros((), dtype=torch.long)  # batches synthesised so far (on the CPU: read for reset_l0)
        ctx.track(generator=self.generator, meta_opt=self.meta_opt, bn_stats=self.bn_stats, synth_count=self.count)
        self.reset_at = ctx.scaled(cfg.reset_l0_at) if cfg.reset_l0_at else 0
        self.adversarial = True  # off during the warm-up
        self.queries = cfg.synth_batch * cfg.g_steps

    def augment(self, x: torch.Tensor) -> torch.Tensor:
        x = random_crop(x, self.cfg.crop_pad, self.ctx.generator)
        return random_flip_each(x, self.ctx.generator) if self.flip else x

    def __call__(self):
        cfg, ctx = self.cfg, self.ctx
        self.count.add_(1)
        if self.reset_at and int(self.count) == self.reset_at:
            reinitialise(self.generator, first_layers_only=True)
        targets = torch.randint(ctx.info.num_classes, (cfg.synth_batch,)).to(ctx.device)
        use_student = self.adversarial and cfg.adv > 0
        with frozen_student(self.student, use_student):
            return meta_synthesise(self.generator, self.meta_opt, self.teacher, self.bn_stats, cfg, self.augment,
                                   targets, student=self.student if use_student else None, autocast=ctx.autocast,
                                   mean=ctx.info.mean, std=ctx.info.std)

    def close(self) -> None:
        self.bn_stats.remove()


@register("fast_dfkd")
class FastDFKD(InversionMethod):
    """Fast-DFKD (Fang et al., AAAI 2022): meta-learned generator, few inner steps per batch, KD on the pool."""

    Config = FastDFKDConfig
    # the equal-tuning search space (bench tune; docs/tuning.md): the fields the paper says matter, in ranges
    # around the paper's values for mnist, which must lie inside (bench.search_space.check_space, at registration)
    search_space = {
        "lr": Float(1e-3, 0.5, log=True),
        "lr_g": Float(1e-4, 1e-2, log=True),
        "lr_z": Float(1e-3, 0.1, log=True),
        "g_steps": Int(1, 20),
        "kd_steps": Int(10, 1000, log=True),
        "synth_batch": Choice(32, 64, 128, 256),
        "gen_width": Choice(8, 16, 32, 64),
        "bn": Float(1.0, 30.0, log=True),
        "adv": Float(0.1, 2.0),
    }
    presets = PRESETS
    preset_for_dataset = PRESET_FOR_DATASET
    title = "Fast-DFKD"

    def synthesis(self, teacher, student, ctx) -> FastDFKDSynthesis:
        require_batchnorm(teacher.module, self.name)
        return FastDFKDSynthesis(teacher, student, ctx, self.config, self.name)

    def distill(self, teacher, student, ctx):
        with teacher_channels_last(teacher, self.config.channels_last):
            synthesis = self.synthesis(teacher, student, ctx)
            try:
                return self._distill(synthesis, teacher, student, ctx)
            finally:
                synthesis.close()

    def _distill(self, synthesis: FastDFKDSynthesis, teacher, student, ctx):
        cfg = self.config
        pool = ImagePool(cfg.pool_capacity or None, device=ctx.device)
        ctx.track(pool=pool)
        # warm-up: batches into the pool, no KD, no adversarial term (a phase that does not train the student)
        stats = torch.zeros(len(STATS), device=ctx.device)
        classes = torch.full((cfg.synth_batch,), -1, dtype=torch.long, device=ctx.device)
        synthesis.adversarial = False
        for step in ctx.steps(ctx.scaled(cfg.warmup) if cfg.warmup else 0, f"{self.name} warm-up", student=False,
                              log_every=1):
            add_batch(pool, synthesis, stats, classes, STATS)
            ctx.log(step, **dict(zip(STATS, stats.unbind(0))))
        synthesis.adversarial = True
        return distill_on_pool(ctx, teacher, student, cfg, synthesis, name=self.name, pool=pool, title=self.title)
