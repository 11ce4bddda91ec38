"""DeepInversion (``deepinversion``): pixels optimised to match the teacher's BatchNorm statistics, KD on them.

Yin, Molchanov, Li, Alvarez, Mallya, Hoiem, Jha, Kautz, "Dreaming to Distill: Data-free Knowledge
Transfer via DeepInversion", CVPR 2020 (arXiv 1912.08795); official code NVlabs/DeepInversion
(``cifar10/deepinversion_cifar10.py``, which synthesises images but has no KD loop).

Synthesis of one batch: images x ~ N(0, 1) in the teacher's normalised input space, labels y fixed
(``labels="cycle"``: the official ``[0..9] * 25 + [0..5]``, i.e. ``i mod K``; ``"random"``: DataFree's
sorted uniform draws), ``g_steps`` Adam steps on

    L = oh * CE(T(v), y) + bn * L_BN + tv * TV(x) + l2 * ||x|| + cig_scale * (1 - JS(S(v), T(v)))

with v = jitter(x) (one random roll of up to ``jitter`` px per step for the whole batch) and, where
flips are on, a random horizontal flip of the whole batch; L_BN from forward hooks on the teacher's BN
inputs (methods/bn_stats.py); TV over four neighbour directions (methods/image_priors.py
``total_variation_4``: the official L2 form or DataFree's L1 form); the lowest-loss iterate is kept
(as both official codes do, here without a host sync). ``cig_scale > 0`` is Adaptive DeepInversion
(its own method, ``adi``, methods/adi.py).

Student: the KD loop shared by the inversion methods (methods/pool_kd.py): one batch synthesised into
a growing pool every ``kd_steps`` student steps, KD at temperature T on pool samples.

Presets:
- ``cifar10`` follows the paper's CIFAR-10 parameters from the official README ("parameters from the
  paper": batch 256, r_feature 10, lr 0.05, 2000 iterations, var_scale 2.5e-5 with the L2 TV, l2 0,
  jitter 2, no flip, fixed labels, Adam (0.9, 0.999), no pixel clipping). The official code has no KD
  loop: the student side is DataFree's (SGD 0.1 cosine, 200 epochs x 400 steps, one batch per epoch,
  T 20). Deviation: none in the synthesis; the KD protocol is DataFree's, not the paper's.
- ``cifar10_datafree`` follows DataFree's ``scripts/deepinv/deepinv_cifar10_wrn402_wrn161.sh``:
  1000 iterations, lr 0.1, Adam (0.5, 0.99), bn 10, oh 1, tv 1e-3 (L1 form), jitter 1/8 of the side
  (4 px) + flip, random sorted labels, pixels clipped to the valid range after every step. Note:
  that script also passes ``--adv 1`` (a JS competition term with the student, i.e. ADI); this preset
  leaves it at 0 (plain DeepInversion); ``adi``'s ``cifar10_datafree`` preset keeps it.
- ``mnist`` (the grey 32-px sets: Fashion-MNIST, MNIST, digits): the paper has no MNIST setting, so the
  grey sets run its CIFAR-10 values (the ``cifar10`` preset); tuned values come from ``bench tune``
  (docs/tuning.md, the ``tuned`` track).

Deviations: images are synthesised in the normalised space of the harness's dataset (as both codes);
TV and L2 are computed on x, not on the jittered view (they differ only at the wrap-around border);
the L2 prior is the mean per-image norm (the official ImageNet code's form; both presets use l2 = 0).
Needs a teacher with BatchNorm (``lenet5_bn`` on the grey datasets).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Literal

import torch
import torch.nn.functional as F

from bench.config import ConfigError
from bench.method import register
from bench.search_space import Choice, Float, Int
from methods.bn_stats import BNStatistics, require_batchnorm
from methods.image_priors import (clamp_to_bounds, l2_prior, pixel_bounds, random_flip, random_jitter,
                                  total_variation_4)
from methods.losses import adi_competition_loss
from methods.pool_kd import InversionMethod, PoolKDConfig, Synthesis, best_so_far, frozen_student

STATS = ("loss_bn", "loss_oh", "loss_tv", "loss_adv", "loss_g")


@dataclass
class DeepInversionConfig(PoolKDConfig):
    # ---- synthesis (official NVlabs CIFAR-10 "paper parameters", README command)
    synth_batch: int = 256  # --bs 256
    g_steps: int = 2000  # --iters_mi 2000 Adam steps per batch
    lr_g: float = 0.05  # --di_lr 0.05
    beta1: float = 0.9  # Adam betas: official (0.9, 0.999) (torch defaults); DataFree (0.5, 0.99)
    beta2: float = 0.999
    bn: float = 10.0  # --r_feature_weight 10
    oh: float = 1.0  # cross-entropy weight (official: 1)
    tv: float = 2.5e-5  # --di_var_scale 2.5e-5
    tv_norm: Literal["l2", "l1"] = "l2"  # official: sum of L2 norms; DataFree: sum of mean |diff|
    l2: float = 0.0  # --di_l2_scale 0
    jitter: int = 2  # official lim_0 = lim_1 = 2 px
    flip: Literal["auto", "on", "off"] = "off"  # official CIFAR: no flip; auto: if the dataset's augmentation flips
    labels: Literal["cycle", "random"] = "cycle"  # official [0..9]*25+[0..5]; DataFree random (sorted)
    clip: bool = False  # clamp pixels to the valid range after each step (DataFree: yes; official: no)
    cig_scale: float = 0.0  # ADI competition weight (0: plain DeepInversion)
    adv_temperature: float = 3.0  # ADI's JS temperature (official T = 3.0)

    def validate(self) -> None:
        super().validate()
        for name in ("g_steps", "lr_g", "adv_temperature"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)!r}")
        for name in ("bn", "oh", "tv", "l2", "jitter", "cig_scale"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"{name} must be in [0, 1), got {getattr(self, name)!r}")


# DataFree's synthesis settings (scripts/deepinv/deepinv_cifar10_wrn402_wrn161.sh, datafree_kd.py: tv=0.001,
# l2=0; synthesis/deepinversion.py: Adam betas (0.5, 0.99), jitter 1/8 of the side + flip, clip_images)
DATAFREE_SYNTHESIS = dict(g_steps=1000, lr_g=0.1, beta1=0.5, beta2=0.99, bn=10.0, oh=1.0, tv=1e-3, tv_norm="l1",
                          l2=0.0, jitter=4, flip="on", labels="random", clip=True)
PRESETS = {
    "cifar10": dict(),  # the Config defaults: the paper's synthesis, DataFree's KD protocol
    "cifar10_datafree": dict(DATAFREE_SYNTHESIS),
    "mnist": dict(),  # no MNIST setting in the paper: its CIFAR-10 values (the nearest dataset; = cifar10)
}
PRESET_FOR_DATASET = {"mnist": "mnist", "fashion_mnist": "mnist", "digits": "mnist", "mnist_5k": "mnist",
                      "mnist_t10k": "mnist", "cifar10": "cifar10", "cifar100": "cifar10", "svhn": "cifar10"}


def class_targets(n: int, num_classes: int, kind: str, device) -> torch.Tensor:
    """The labels a batch is synthesised for: ``i mod K`` (official) or uniform draws sorted (DataFree)."""
    if kind == "cycle":
        return torch.arange(n, device=device) % num_classes
    return torch.randint(num_classes, (n,)).sort().values.to(device)


def invert_batch(teacher, bn_stats: BNStatistics, targets: torch.Tensor, input_shape: tuple[int, int, int],
                 cfg: DeepInversionConfig, *, flip: bool, student=None, bounds=None,
                 generator: torch.Generator | None = None, autocast: Callable = contextlib.nullcontext,
                 ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Optimise one batch of pixels for ``targets`` (``cfg.g_steps`` Adam steps); no host sync.

    ``student`` (in eval mode, parameters frozen by the caller) enables ADI's competition term when
    ``cfg.cig_scale > 0``. ``bounds`` (from ``pixel_bounds``) clamps pixels after each step when ``cfg.clip``.
    Returns ``(best images, the teacher's logits on them as seen at that step, last-step statistics)``."""
    device = targets.device
    x = torch.randn((targets.shape[0], *input_shape), generator=generator).to(device).requires_grad_(True)
    opt = torch.optim.Adam([x], lr=cfg.lr_g, betas=(cfg.beta1, cfg.beta2))
    best_x = x.detach().clone()
    best_logits = None
    best_loss = torch.full((), float("inf"), device=device)
    zero = torch.zeros((), device=device)
    for _ in range(cfg.g_steps):
        view = random_jitter(x, cfg.jitter, generator)
        if flip:
            view = random_flip(view, generator)
        with autocast():
            t_logits = teacher(view)
            s_logits = student(view) if (student is not None and cfg.cig_scale > 0) else None
        t_logits = t_logits.float()
        loss_bn = bn_stats.loss()
        loss_oh = F.cross_entropy(t_logits, targets)
        loss_tv = total_variation_4(x, cfg.tv_norm)
        loss_adv = zero if s_logits is None else adi_competition_loss(s_logits.float(), t_logits, cfg.adv_temperature)
        loss = cfg.oh * loss_oh + cfg.bn * loss_bn + cfg.tv * loss_tv + cfg.cig_scale * loss_adv
        if cfg.l2:
            loss = loss + cfg.l2 * l2_prior(x, squared=False)
        if best_logits is None:
            best_logits = torch.zeros_like(t_logits)
        best_loss = best_so_far(loss, best_loss, (x, best_x), (t_logits, best_logits))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if cfg.clip and bounds is not None:
            clamp_to_bounds(x.data, *bounds)
    stats = {"loss_bn": loss_bn.detach(), "loss_oh": loss_oh.detach(), "loss_tv": loss_tv.detach(),
             "loss_adv": loss_adv.detach(), "loss_g": loss.detach()}
    return best_x, best_logits, stats


class DeepInversionSynthesis(Synthesis):
    """DeepInversion's (and ADI's) per-batch synthesis: BN hooks on the teacher, the student for ADI."""

    stat_names = STATS

    def __init__(self, teacher, student, ctx, cfg: DeepInversionConfig, method: str = "deepinversion"):
        self.teacher, self.student, self.ctx, self.cfg = teacher, student, ctx, cfg
        self.bn_stats = BNStatistics(teacher.module, method=method)  # refuses a BN-free teacher
        info = ctx.info
        self.flip = cfg.flip == "on" or (cfg.flip == "auto" and "flip" in info.augment)
        self.bounds = pixel_bounds(info.mean, info.std, ctx.device) if cfg.clip else None
        self.adversarial = cfg.cig_scale > 0
        self.queries = cfg.synth_batch * cfg.g_steps

    def __call__(self):
        cfg, ctx = self.cfg, self.ctx
        targets = class_targets(cfg.synth_batch, ctx.info.num_classes, cfg.labels, ctx.device)
        with frozen_student(self.student, self.adversarial):
            return invert_batch(self.teacher, self.bn_stats, targets, ctx.input_shape, cfg, flip=self.flip,
                                student=self.student if self.adversarial else None, bounds=self.bounds,
                                generator=ctx.generator, autocast=ctx.autocast)

    def close(self) -> None:
        self.bn_stats.remove()


@register("deepinversion")
class DeepInversion(InversionMethod):
    """DeepInversion (Yin et al., CVPR 2020): BN-statistics pixel inversion, KD on a growing image pool."""

    Config = DeepInversionConfig
    # the equal-tuning search space (bench tune; docs/tuning.md): the fields the paper says matter, in ranges
    # around the paper's values for mnist, which must lie inside (bench.search_space.check_space, at registration)
    search_space = {
        "lr": Float(1e-3, 0.3, log=True),
        "lr_g": Float(0.01, 0.5, log=True),
        "g_steps": Int(10, 2000, log=True),
        "kd_steps": Int(10, 1000, log=True),
        "synth_batch": Choice(32, 64, 128, 256),
        "bn": Float(0.1, 30.0, log=True),
        "tv": Float(1e-6, 1e-2, log=True),
    }
    presets = PRESETS
    preset_for_dataset = PRESET_FOR_DATASET
    title = "DeepInversion"

    def synthesis(self, teacher, student, ctx) -> DeepInversionSynthesis:
        require_batchnorm(teacher.module, self.name)
        return DeepInversionSynthesis(teacher, student, ctx, self.config, self.name)
