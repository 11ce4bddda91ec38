"""CMI: Contrastive Model Inversion (``cmi``).

Fang, Song, Wang, Shen, Wang, Song, "Contrastive Model Inversion for Data-Free Knowledge Distillation",
IJCAI 2021 (arXiv 2105.08584); official code zju-vipa/DataFree (``datafree/synthesis/contrastive.py``,
``scripts/cmi/cmi_cifar10.sh``).

Per synthesised batch: a generator (methods/generator.py ``DataFreeGenerator``, nz 256, width 64) is
re-initialised (conv/linear N(0, 0.02), BN weight N(1, 0.02)); it and its latent z ~ N(0, 1) are
optimised jointly (Adam, lr_g, betas (0.5, 0.999)) for ``g_steps`` steps on

    L = bn * L_BN + oh * CE(T(g), y) + adv * L_adv + cr * L_cr

with x = G(z) in [0, 1]; g = the global view (random crop of the 4-px zero-padded image, flip where the
dataset flips, normalised), l = the local view (random resized crop, area 0.25..1, flip where the dataset
flips, normalised); y uniform random classes (sorted); L_BN from the teacher's forward on g
(methods/bn_stats.py); L_adv the decision-adversarial term ``-mean(mask * KL(T(g) || S(g)))`` with the
mask keeping samples where student and teacher agree (student in eval mode, frozen);
L_cr the contrastive term: features f(v) = the per-channel means of every teacher BN input on view v
(``BNStatistics(keep_channel_means=True).features()``), projected by an MLP head (dim -> dim -> 256,
L2-normalised; persistent across batches, Adam lr_g); logits = h(f(l)) . h(f(g)).detach()^T / cr_T over
the batch plus ``n_neg`` negatives drawn from a memory bank of past batches' (local, global) features
(``bank_size`` entries); cross entropy against the diagonal (each local view's positive is the global
view of the same image), averaged separately over the current batch and the cached rows and summed.
The lowest-loss iterate's images go to the pool, its features to the bank.

Student: methods/pool_kd.py (KD at T on pool samples, one batch per ``kd_steps`` steps).

Presets: ``cifar10`` = ``scripts/cmi/cmi_cifar10.sh`` (bs 256, g_steps 200, lr_g 1e-3, adv 0.5, bn 1,
oh 1, cr 0.8, cr_T 0.2, T 20, lr 0.1, kd_steps 400, 200 epochs; bank 40,960, 4,096 negatives, head 256
from ``datafree_kd.py``). ``mnist`` (the grey 32-px sets: Fashion-MNIST, MNIST, digits): the paper has
no MNIST setting, so the grey sets run its CIFAR-10 values (the ``cifar10`` preset); tuned values come
from ``bench tune`` (docs/tuning.md, the ``tuned`` track).

Deviations: the official features hook every BN layer except for ResNet-34 teachers, where it hooks
the four residual stages' outputs; here always every BN input. The official memory bank starts as
random noise that is never sampled before the first batch is added: here it starts empty. Views are
computed in pixel space and then normalised, as the official kornia pipeline (zero padding = black).
Needs a teacher with BatchNorm (``lenet5_bn`` on the grey datasets).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from bench.config import ConfigError
from bench.method import register
from bench.search_space import Choice, Float, Int
from methods.bn_stats import BNStatistics, require_batchnorm
from methods.generator import DataFreeGenerator, reinitialise
from methods.image_priors import normalise, random_crop, random_flip_each, random_resized_crop
from methods.losses import decision_adversarial_loss
from methods.pool_kd import InversionMethod, PoolKDConfig, Synthesis, best_so_far, frozen_student

STATS = ("loss_bn", "loss_oh", "loss_adv", "loss_cr", "loss_g")


@dataclass
class CMIConfig(PoolKDConfig):
    # ---- synthesis (DataFree scripts/cmi/cmi_cifar10.sh and datafree_kd.py)
    synth_batch: int = 256  # --batch_size 256 (synthesis batch = KD batch)
    g_steps: int = 200  # --g_steps 200
    lr_g: float = 1e-3  # --lr_g 1e-3 (generator, z and the MLP head)
    latent_dim: int = 256  # nz = 256
    gen_width: int = 64  # ngf = 64
    bn: float = 1.0  # --bn 1.0
    oh: float = 1.0  # --oh 1.0
    adv: float = 0.5  # --adv 0.5
    cr: float = 0.8  # --cr 0.8
    cr_T: float = 0.2  # --cr_T 0.2
    head_dim: int = 256  # datafree_kd.py: head_dim=256
    bank_size: int = 40960  # datafree_kd.py: bank_size=40960 entries
    n_neg: int = 4096  # datafree_kd.py: n_neg=4096 negatives per step
    crop_pad: int = 4  # global view: RandomCrop(padding=4) at 32 px
    local_scale_min: float = 0.25  # local view: RandomResizedCrop(scale=[0.25, 1.0])
    flip: Literal["auto", "on", "off"] = "auto"  # view flips; auto: where the dataset's augmentation flips (CIFAR)

    def validate(self) -> None:
        super().validate()
        for name in ("g_steps", "lr_g", "latent_dim", "gen_width", "cr_T", "head_dim", "bank_size"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)!r}")
        for name in ("bn", "oh", "adv", "cr", "n_neg", "crop_pad"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if not 0 < self.local_scale_min <= 1:
            raise ConfigError(f"local_scale_min must be in (0, 1], got {self.local_scale_min!r}")
        if self.flip not in ("on", "off", "auto"):
            raise ConfigError(f"flip must be one of on, off, auto; got {self.flip!r}")


# no MNIST setting in the paper: the grey sets run its CIFAR-10 values (the nearest dataset)
PRESETS = {"cifar10": dict(), "mnist": dict()}
PRESET_FOR_DATASET = {"mnist": "mnist", "fashion_mnist": "mnist", "digits": "mnist", "mnist_5k": "mnist",
                      "mnist_t10k": "mnist", "cifar10": "cifar10", "cifar100": "cifar10", "svhn": "cifar10"}


class MLPHead(nn.Module):
    """CMI's projection head: Linear(dim, dim) -> ReLU -> Linear(dim, out), L2-normalised rows."""

    def __init__(self, dim: int, out: int):
        super().__init__()
        self.head = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(inplace=True), nn.Linear(dim, out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.head(x), dim=1, p=2)


class MemoryBank:
    """A ring buffer of past batches' (local, global) contrastive features, checkpointable."""

    def __init__(self, size: int, dim: int, device):
        self.data = torch.zeros(size, dim, device=device)
        self.filled = 0  # rows holding features
        self.ptr = 0

    def add(self, features: torch.Tensor) -> None:
        n = features.shape[0]
        idx = (torch.arange(n, device=self.data.device) + self.ptr) % self.data.shape[0]
        self.data[idx] = features.detach().to(self.data.dtype)
        self.ptr = (self.ptr + n) % self.data.shape[0]
        self.filled = min(self.data.shape[0], self.filled + n)

    def sample(self, k: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Up to ``k`` distinct stored rows, uniformly at random (no rows: an empty tensor)."""
        idx = torch.randperm(self.filled, generator=generator)[:k].to(self.data.device)
        return self.data[idx]

    def state_dict(self) -> dict:
        return {"data": self.data.cpu(), "filled": self.filled, "ptr": self.ptr}

    def load_state_dict(self, state: dict) -> None:
        self.data = state["data"].to(self.data.device)
        self.filled, self.ptr = int(state["filled"]), int(state["ptr"])


def contrastive_loss(local: torch.Tensor, global_: torch.Tensor, cached: torch.Tensor, head: nn.Module,
                     temperature: float) -> torch.Tensor:
    """CMI's L_cr: ``local``/``global_`` (B, D) features of the two views, ``cached`` (M, 2D) past (local, global).

    Rows: the B current local views then the M cached ones; columns: the matching global views (detached);
    the positive of row i is column i (CE against the diagonal). The mean over the current rows plus the
    mean over the cached rows (the official split, so the cached rows do not dilute the batch's gradient)."""
    b = local.shape[0]
    cached_local, cached_global = cached.chunk(2, dim=1)
    proj = head(torch.cat([local, cached_local, global_, cached_global]))
    proj_local, proj_global = proj.chunk(2, dim=0)
    logits = proj_local @ proj_global.detach().T / temperature
    ce = F.cross_entropy(logits, torch.arange(logits.shape[0], device=logits.device), reduction="none")
    return ce[:b].mean() + ce[b:].mean() if cached.shape[0] else ce.mean()


class CMISynthesis(Synthesis):
    """CMI's per-batch synthesis; the head, its optimiser and the memory bank persist (tracked)."""

    stat_names = STATS

    def __init__(self, teacher, student, ctx, cfg: CMIConfig, method: str = "cmi"):
        info, device = ctx.info, ctx.device
        self.teacher, self.student, self.ctx, self.cfg = teacher, student, ctx, cfg
        self.bn_stats = BNStatistics(teacher.module, method=method, keep_channel_means=True)
        self.flip = cfg.flip == "on" or (cfg.flip == "auto" and "flip" in info.augment)
        self.feature_dim = sum(layer.num_features for layer in self.bn_stats.layers)
        self.generator = DataFreeGenerator(cfg.latent_dim, cfg.gen_width, info.image_size, info.channels).to(device)
        if cfg.channels_last:
            self.generator = self.generator.to(memory_format=torch.channels_last)
        self.head = MLPHead(self.feature_dim, cfg.head_dim).to(device)
        self.opt_head = torch.optim.Adam(self.head.parameters(), lr=cfg.lr_g)
        self.bank = MemoryBank(cfg.bank_size, 2 * self.feature_dim, device)
        ctx.track(head=self.head, opt_head=self.opt_head, bank=self.bank)  # the generator is re-initialised per batch
        self.queries = 2 * cfg.synth_batch * cfg.g_steps  # the global and the local view each step

    def views(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(global, local) normalised views of generator output ``x`` in [0, 1]."""
        cfg, ctx = self.cfg, self.ctx
        g = random_crop(x, cfg.crop_pad, ctx.generator)
        l = random_resized_crop(x, (cfg.local_scale_min, 1.0), generator=ctx.generator)
        if self.flip:
            g, l = random_flip_each(g, ctx.generator), random_flip_each(l, ctx.generator)
        return normalise(g, ctx.info.mean, ctx.info.std), normalise(l, ctx.info.mean, ctx.info.std)

    def __call__(self):
        cfg, ctx, info, device = self.cfg, self.ctx, self.ctx.info, self.ctx.device
        teacher, student, bn_stats, generator = self.teacher, self.student, self.bn_stats, self.generator
        reinitialise(generator)
        z = torch.randn(cfg.synth_batch, cfg.latent_dim, device=device).requires_grad_(True)
        targets = torch.randint(info.num_classes, (cfg.synth_batch,)).sort().values.to(device)
        opt = torch.optim.Adam([{"params": generator.parameters()}, {"params": [z]}], lr=cfg.lr_g, betas=(0.5, 0.999))
        best_x = torch.zeros(cfg.synth_batch, *ctx.input_shape, device=device)
        best_feat = torch.zeros(cfg.synth_batch, 2 * self.feature_dim, device=device)
        best_logits = torch.zeros(cfg.synth_batch, info.num_classes, device=device)
        best_loss = torch.full((), float("inf"), device=device)
        zero = torch.zeros((), device=device)
        with frozen_student(student, cfg.adv > 0):
            for _ in range(cfg.g_steps):
                x = generator(z)
                global_view, local_view = self.views(x)
                with ctx.autocast():
                    t_logits = teacher(global_view)
                t_logits = t_logits.float()
                loss_bn, global_feat = bn_stats.loss(), bn_stats.features().float()  # read before the local forward
                loss_oh = F.cross_entropy(t_logits, targets)
                loss_adv = zero
                if cfg.adv > 0:
                    with ctx.autocast():
                        s_logits = student(global_view)
                    loss_adv = decision_adversarial_loss(s_logits.float(), t_logits)
                with ctx.autocast():
                    teacher(local_view)
                local_feat = bn_stats.features().float()
                loss_cr = contrastive_loss(local_feat, global_feat, self.bank.sample(cfg.n_neg, ctx.generator),
                                           self.head, cfg.cr_T)
                loss = cfg.bn * loss_bn + cfg.oh * loss_oh + cfg.adv * loss_adv + cfg.cr * loss_cr
                best_loss = best_so_far(loss, best_loss, (normalise(x, info.mean, info.std), best_x),
                                        (torch.cat([local_feat, global_feat], dim=1), best_feat),
                                        (t_logits, best_logits))
                opt.zero_grad(set_to_none=True)
                self.opt_head.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                self.opt_head.step()
        self.bank.add(best_feat)
        stats = {"loss_bn": loss_bn.detach(), "loss_oh": loss_oh.detach(), "loss_adv": loss_adv.detach(),
                 "loss_cr": loss_cr.detach(), "loss_g": loss.detach()}
        return best_x, best_logits, stats

    def close(self) -> None:
        self.bn_stats.remove()


@register("cmi")
class CMI(InversionMethod):
    """CMI (Fang et al., IJCAI 2021): per-batch generators with BN, adversarial and contrastive terms."""

    Config = CMIConfig
    # the equal-tuning search space (bench tune; docs/tuning.md): the fields the paper says matter, in ranges
    # around the paper's values for mnist, which must lie inside (bench.search_space.check_space, at registration)
    search_space = {
        "lr": Float(1e-3, 0.3, log=True),
        "lr_g": Float(1e-4, 0.1, log=True),
        "g_steps": Int(10, 500, log=True),
        "kd_steps": Int(10, 1000, log=True),
        "synth_batch": Choice(32, 64, 128, 256),
        "gen_width": Choice(8, 16, 32, 64),
        "adv": Float(0.1, 2.0),
        "cr": Float(0.1, 2.0),
    }
    presets = PRESETS
    preset_for_dataset = PRESET_FOR_DATASET
    title = "CMI"

    def synthesis(self, teacher, student, ctx) -> CMISynthesis:
        require_batchnorm(teacher.module, self.name)
        return CMISynthesis(teacher, student, ctx, self.config, self.name)
