"""DFQ: data-free adversarial knowledge distillation with BatchNorm statistics (``dfq``).

Choi, Choi, El-Khamy, Lee, "Data-Free Network Quantization With Adversarial Knowledge Distillation",
CVPR Workshops 2020 (arXiv 2005.04136), as the field's benchmark re-implements it for distillation
(zju-vipa/DataFree, ``--method dfq``: datafree_kd.py, datafree/synthesis/generative.py,
scripts/dfq/*.sh). Not the weight-equalisation "DFQ" of Nagel et al. The authors' code is not public;
the settings are DataFree's. The generator plays against the student like DFAD/ZSKT, constrained by the
teacher to produce images that look like its training data:

  L_G = bn * L_BN + oh * CE(T(x), argmax T(x)) + adv * (-KL(T(x) || S(x))) + balance * sum_k pbar_k ln pbar_k
  (bn, oh, adv, balance) = (1, 1, 1, 20)

with L_BN the teacher's BatchNorm-statistics loss (methods/bn_stats.py) and pbar the batch-mean
prediction. One round = g_steps = 1 generator step (Adam lr 1e-3, betas (0.5, 0.999); the student in
eval mode during it, as DataFree does), then kd_steps = 10 student steps, each on a fresh z:
L_S = T^2 KL(softmax(T(x)/T) || softmax(S(x)/T)) at T = 1, SGD (momentum 0.9, wd 1e-4), cosine over the
run. An "epoch" is 400 student steps at batch 256; 200 epochs; DataFree evaluates every epoch and reports
the best (``tracks_best``, ``eval_every`` = 400). Teacher queries per student step:
batch * (kd_steps + g_steps) / kd_steps. Needs a teacher with BatchNorm (e.g. ``lenet5_bn``).

Deviations and choices:
- Temperature: DataFree's scripts pass ``--T 20`` for the WRN pair, but its generator-based methods replace
  the KD criterion by ``KLDiv()`` at T = 1, so its published DFQ numbers used T = 1. We use T = 1 (the
  ``temperature`` field); the adversarial KL is at T = 1 as in DataFree.
- The generator is DAFL's (Tanh + affine-free output BatchNorm, width 128, BN eps 1e-5) rather than
  DataFree's ``LargeGenerator`` (256-128-64 channels, Sigmoid output + dataset normaliser); the student's
  batches come from it in train mode (batch statistics), where DataFree samples in eval mode.
- The student is the generator's adversary (Fast-Datafree passes the teacher there, zeroing the term).
- The schedule is a per-step cosine (DataFree steps its cosine once per epoch: the same curve, stepped).
- Presets: ``cifar10`` = scripts/dfq/dfq_cifar10_wrn402_wrn161.sh (lr 0.1); ``cifar100`` =
  scripts/dfq/dfq_cifar10_res34_res18.sh, which runs CIFAR-100 ResNet-34 -> ResNet-18 (lr 0.05);
  ``mnist`` = the CIFAR-10 settings with nz 256 (harness choice: DataFree has no MNIST run); tuned
  values come from ``bench tune`` (docs/tuning.md).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Literal

import torch

from bench.config import ConfigError
from bench.method import DataAccess, Method, TeacherAccess, register
from bench.training import TrainConfig, make_optimizer
from bench.search_space import Choice, Float, Int
from methods.adversarial import (class_balance_loss, class_entropy, logit_kl, make_scheduler, optimizer_step,
                                 sample_std, save_samples)
from methods.bn_stats import BNStatistics
from methods.dafl import one_hot_loss
from methods.generator import DAFLGenerator
from methods.losses import kd_loss

# ---------------------------------------------------------------------------------------------
# the losses and steps (plain functions; the distill loop and the speed benchmark run the steps)


def generator_loss(s_logits: torch.Tensor, t_logits: torch.Tensor, bn_loss: torch.Tensor, *, bn: float, oh: float,
                   adv: float, balance: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """L_G = bn * L_BN + oh * L_oh + adv * (-KL(T || S)) + balance * sum pbar ln pbar; returns (L_G, parts)."""
    l_oh = one_hot_loss(t_logits)
    l_adv = -logit_kl(s_logits, t_logits, 1.0)
    l_balance = class_balance_loss(t_logits)
    loss = bn * bn_loss + oh * l_oh + adv * l_adv + balance * l_balance
    return loss, {"loss_bn": bn_loss, "loss_oh": l_oh, "loss_adv": l_adv, "loss_balance": l_balance}


def student_loss(s_logits: torch.Tensor, t_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """L_S = T^2 KL(softmax(t/T) || softmax(s/T)), batchmean, the teacher's logits detached."""
    return kd_loss(s_logits, t_logits.detach(), temperature)


def generator_step(generator, teacher, student, bn_stats: BNStatistics, opt_g, z: torch.Tensor, *, bn: float,
                   oh: float, adv: float, balance: float, autocast: Callable = contextlib.nullcontext,
                   ) -> dict[str, torch.Tensor]:
    """One generator update on x = G(z); the student is in eval mode meanwhile (DataFree's ``synthesize``)."""
    was_training = student.training
    student.eval()
    with autocast():
        x = generator(z)
        t_logits = teacher(x)  # the BN hooks compute L_BN on this forward
        s_logits = student(x)
    student.train(was_training)
    loss, parts = generator_loss(s_logits.float(), t_logits.float(), bn_stats.loss(), bn=bn, oh=oh, adv=adv,
                                 balance=balance)
    optimizer_step(opt_g, loss, generator.parameters())
    return {"loss_g": loss, **parts}


def student_step(generator, teacher, student, opt_s, z: torch.Tensor, *, temperature: float,
                 autocast: Callable = contextlib.nullcontext) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One student update on a fresh x = G(z) (no gradient to G); returns (loss, x, teacher logits)."""
    with autocast():
        with torch.no_grad():
            x = generator(z)
            t_logits = teacher(x)
        s_logits = student(x)
    loss = student_loss(s_logits.float(), t_logits.float(), temperature)
    optimizer_step(opt_s, loss, student.parameters())
    return loss, x, t_logits


# ---------------------------------------------------------------------------------------------
# config and presets

_DATAFREE = dict(batch_size=256, latent_dim=256, epochs=200, iters_per_epoch=400, kd_steps=10, g_steps=1,
                 lr_G=1e-3, optimizer="sgd", momentum=0.9, weight_decay=1e-4, bn=1.0, oh=1.0, adv=1.0,
                 balance=20.0, temperature=1.0)
PRESETS = {
    "cifar10": dict(_DATAFREE, lr=0.1),  # scripts/dfq/dfq_cifar10_wrn402_wrn161.sh (+ datafree_kd.py defaults)
    "cifar100": dict(_DATAFREE, lr=0.05),  # scripts/dfq/dfq_cifar10_res34_res18.sh (runs --dataset cifar100)
    "mnist": dict(_DATAFREE, lr=0.1),  # harness choice: DataFree's CIFAR-10 setting (no MNIST run exists)
}
PRESET_FOR_DATASET = {"mnist": "mnist", "fashion_mnist": "mnist", "digits": "mnist", "mnist_5k": "mnist",
                      "mnist_t10k": "mnist", "cifar10": "cifar10", "svhn": "cifar10", "cifar100": "cifar100"}


@dataclass
class DFQConfig(TrainConfig):
    """Student optimiser from TrainConfig; an "epoch" is ``iters_per_epoch`` student steps (DataFree's ep_steps)."""

    # DataFree's DFQ (scripts/dfq/dfq_cifar10_wrn402_wrn161.sh + datafree_kd.py defaults)
    optimizer: Literal["sgd", "adam"] = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    batch_size: int = 256  # student batch = synthesis batch (synthesis_batch_size defaults to batch_size)
    epochs: int = 200  # scaled by the grid's budget
    iters_per_epoch: int = 400  # ep_steps: student steps per epoch
    kd_steps: int = 10  # student steps per round
    g_steps: int = 1  # generator steps at the start of each round
    lr_G: float = 1e-3  # generator Adam, betas (0.5, 0.999)
    latent_dim: int = 256  # nz
    bn: float = 1.0  # weight of the BN-statistics loss
    oh: float = 1.0  # weight of the one-hot loss
    adv: float = 1.0  # weight of the adversarial term -KL(T || S)
    balance: float = 20.0  # weight of the class-balance term sum pbar ln pbar
    temperature: float = 1.0  # student KD temperature (DataFree's effective value, see the module docstring)
    gen_width: int = 128  # DAFL-generator channels; the second conv block has gen_width // 2
    gen_bn_eps: float = 1e-5
    # protocol and engineering
    eval_every: int = 400  # student steps between DataFree's per-epoch evaluations (best reported); 0 = none
    log_every: int = 50
    samples: int = 64
    channels_last: bool = True

    def validate(self) -> None:
        super().validate()
        for name in ("kd_steps", "g_steps", "lr_G", "latent_dim", "temperature", "gen_bn_eps", "log_every"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)!r}")
        for name in ("bn", "oh", "adv", "balance", "eval_every", "samples"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if self.gen_width < 2 or self.gen_width % 2:
            raise ConfigError(f"gen_width must be an even integer >= 2, got {self.gen_width}")


@register("dfq")
class DFQ(Method):
    """DFQ (Choi et al., CVPRW 2020) as in DataFree: BN statistics + one-hot + adversarial KL + class balance."""

    data_access = DataAccess.NONE
    teacher_access = TeacherAccess.GRADIENTS
    Config = DFQConfig
    # the equal-tuning search space (bench tune; docs/tuning.md): the fields the paper says matter, in ranges
    # around the paper's values for mnist, which must lie inside (bench.search_space.check_space, at registration)
    search_space = {
        "lr": Float(1e-3, 0.3, log=True),
        "lr_G": Float(1e-4, 1e-2, log=True),
        "batch_size": Choice(64, 128, 256),
        "gen_width": Choice(16, 32, 64, 128),
        "kd_steps": Int(1, 10),
        "balance": Float(1.0, 50.0, log=True),
        "bn": Float(0.1, 10.0, log=True),
    }
    presets = PRESETS
    preset_for_dataset = PRESET_FOR_DATASET
    tracks_best = True  # DataFree reports the best epoch

    def distill(self, teacher, student, ctx):
        cfg, info, device = self.config, ctx.info, ctx.device
        bn_stats = BNStatistics(teacher.module, method="dfq")  # refuses a teacher without BatchNorm
        b = cfg.batch_size
        nominal = ctx.scaled(cfg.epochs * cfg.iters_per_epoch)
        total = ctx.plan_steps(nominal, queries_per_step=b * (cfg.kd_steps + cfg.g_steps) / cfg.kd_steps)

        generator = DAFLGenerator(cfg.latent_dim, info.image_size, info.channels, cfg.gen_width,
                                  bn_eps=cfg.gen_bn_eps).to(device)
        if cfg.channels_last:
            generator = generator.to(memory_format=torch.channels_last)
            student = student.to(memory_format=torch.channels_last)
        opt_g = torch.optim.Adam(generator.parameters(), lr=cfg.lr_G, betas=(0.5, 0.999))
        opt_s = make_optimizer(student.parameters(), cfg)
        sched_s = make_scheduler(opt_s, "cosine", total)
        ctx.track(generator=generator, opt_g=opt_g, opt_s=opt_s, sched_s=sched_s)
        weights = dict(bn=cfg.bn, oh=cfg.oh, adv=cfg.adv, balance=cfg.balance)

        student.train()
        x = t_logits = None
        g_losses: dict[str, torch.Tensor] = {}
        try:
            for step in ctx.steps(total, "dfq", log_every=cfg.log_every):
                if (step - 1) % cfg.kd_steps == 0:  # a round starts with the generator's steps
                    for _ in range(cfg.g_steps):
                        z = torch.randn(b, cfg.latent_dim, device=device)
                        g_losses = generator_step(generator, teacher, student, bn_stats, opt_g, z, **weights,
                                                  autocast=ctx.autocast)
                z = torch.randn(b, cfg.latent_dim, device=device)
                loss_s, x, t_logits = student_step(generator, teacher, student, opt_s, z, temperature=cfg.temperature,
                                                   autocast=ctx.autocast)
                sched_s.step()
                ctx.log(step, loss_s=loss_s, **g_losses, sample_std=sample_std(x), t_entropy=class_entropy(t_logits),
                        lr_s=sched_s.get_last_lr()[0])
                if cfg.eval_every and step % cfg.eval_every == 0:
                    ctx.evaluate(student, step)
        finally:
            bn_stats.remove()

        if x is not None:
            save_samples(ctx, x, t_logits, cfg.samples, "DFQ")
        return student.to(memory_format=torch.contiguous_format)
