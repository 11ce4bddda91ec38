"""DFAD: Data-Free Adversarial Distillation (``dfad``).

Fang, Song, Shen, Wang, Chen, Song, "Data-Free Adversarial Distillation", arXiv 1912.11006 (2019); the
step follows the official code (VainF/Data-Free-Adversarial-Distillation, DFAD_mnist.py, DFAD_cifar.py,
network/gan.py). The generator and the student play a min-max game on the L1 distance between the
teacher's and the student's logits (the paper's model discrepancy):

  kd_steps = 5 student steps, each on a fresh z:  x = G(z) (no gradient), L_S = mean |S(x) - T(x)|
  then 1 generator step on a fresh z:             L_G = -mean |S(G(z)) - T(G(z))|
(the mean is over batch and classes, ``F.l1_loss``). The student uses SGD (momentum 0.9), the
generator Adam; the generator is DAFL's (Tanh + affine-free output BatchNorm, ``GeneratorA``) with
torch's default BatchNorm eps. An "epoch" is 50 generator iterations (250 student steps); the
official code evaluates the test set every epoch and reports the best: ``tracks_best`` with
``eval_every`` = 250 student steps. Teacher queries per student step: batch * (kd_steps + 1) / kd_steps.

Presets: ``mnist`` = DFAD_mnist.py's defaults (LeNet-5 -> LeNet-5-half: batch 512, nz 100, 40 epochs,
SGD lr 0.01, wd 1e-4, no schedule: run_mnist.sh passes no --scheduler); ``cifar10``/``cifar100`` =
DFAD_cifar.py with the README's ``--scheduler`` (ResNet-34 -> ResNet-18: batch 256, nz 256, 500 epochs,
SGD lr 0.1, wd 5e-4, lr x0.1 at epochs 100 and 200 for student and generator). Tuned values come from
``bench tune`` (docs/tuning.md). The harness loop runs one student update per step; the generator step
follows every kd_steps-th student step, as in the official loop.
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
from methods.adversarial import class_entropy, logit_l1, make_scheduler, optimizer_step, sample_std, save_samples
from methods.generator import DAFLGenerator

# ---------------------------------------------------------------------------------------------
# the losses and steps (plain functions; the distill loop and the speed benchmark run the steps)


def student_loss(s_logits: torch.Tensor, t_logits: torch.Tensor) -> torch.Tensor:
    """L_S = mean |S(x) - T(x)| over batch and classes, the teacher's logits detached."""
    return logit_l1(s_logits, t_logits.detach())


def generator_loss(s_logits: torch.Tensor, t_logits: torch.Tensor) -> torch.Tensor:
    """L_G = -mean |S(x) - T(x)|: the generator maximises the discrepancy (gradient through both models)."""
    return -logit_l1(s_logits, t_logits)


def student_step(generator, teacher, student, opt_s, z: torch.Tensor, *,
                 autocast: Callable = contextlib.nullcontext) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One student update on x = G(z) (generated without gradient); returns (loss, x, teacher logits)."""
    with autocast():
        with torch.no_grad():
            x = generator(z)
            t_logits = teacher(x)
        s_logits = student(x)
    loss = student_loss(s_logits.float(), t_logits.float())
    optimizer_step(opt_s, loss, student.parameters())
    return loss, x, t_logits


def generator_step(generator, teacher, student, opt_g, z: torch.Tensor, *,
                   autocast: Callable = contextlib.nullcontext) -> torch.Tensor:
    """One generator update on x = G(z), through teacher and student."""
    with autocast():
        x = generator(z)
        t_logits = teacher(x)
        s_logits = student(x)
    loss = generator_loss(s_logits.float(), t_logits.float())
    optimizer_step(opt_g, loss, generator.parameters())
    return loss


# ---------------------------------------------------------------------------------------------
# config and presets

PRESETS = {
    # DFAD_mnist.py defaults, run as run_mnist.sh does (no --scheduler): LeNet-5 -> LeNet-5-half
    "mnist": dict(batch_size=512, latent_dim=100, epochs=40, iters_per_epoch=50, optimizer="sgd", lr=0.01,
                  momentum=0.9, weight_decay=1e-4, lr_G=1e-3, milestones=[]),
    # DFAD_cifar.py defaults + README's --scheduler (MultiStepLR [100, 200], x0.1, student and generator)
    "cifar10": dict(batch_size=256, latent_dim=256, epochs=500, iters_per_epoch=50, optimizer="sgd", lr=0.1,
                    momentum=0.9, weight_decay=5e-4, lr_G=1e-3, milestones=[100, 200], lr_decay=0.1),
    "cifar100": dict(batch_size=256, latent_dim=256, epochs=500, iters_per_epoch=50, optimizer="sgd", lr=0.1,
                     momentum=0.9, weight_decay=5e-4, lr_G=1e-3, milestones=[100, 200], lr_decay=0.1),
}
PRESET_FOR_DATASET = {"mnist": "mnist", "fashion_mnist": "mnist", "digits": "mnist", "mnist_5k": "mnist",
                      "mnist_t10k": "mnist", "cifar10": "cifar10", "svhn": "cifar10", "cifar100": "cifar100"}


@dataclass
class DFADConfig(TrainConfig):
    """Student optimiser and schedule from TrainConfig; an "epoch" is ``iters_per_epoch`` generator iterations."""

    # DFAD_mnist.py (the defaults; CIFAR presets above)
    optimizer: Literal["sgd", "adam"] = "sgd"
    lr: float = 0.01  # lr_S
    momentum: float = 0.9
    weight_decay: float = 1e-4
    batch_size: int = 512
    epochs: int = 40  # scaled by the grid's budget
    iters_per_epoch: int = 50  # epoch_itrs: generator iterations per epoch (each after kd_steps student steps)
    # milestones (TrainConfig, default none): epochs at which both lrs *= lr_decay (DFAD_cifar --scheduler: [100, 200])
    kd_steps: int = 5  # student steps per generator step (``for k in range(5)``)
    g_steps: int = 1  # generator steps after them
    lr_G: float = 1e-3  # generator Adam (default betas)
    latent_dim: int = 100  # nz: 100 (MNIST), 256 (CIFAR)
    gen_width: int = 128  # ngf * 2 = 128 (paper); the second conv block has gen_width // 2
    gen_bn_eps: float = 1e-5  # GeneratorA's BatchNorm eps (torch default; DAFL's is 0.8)
    # protocol and engineering
    eval_every: int = 250  # student steps between the paper's test evaluations (one epoch); 0 = none
    log_every: int = 50
    samples: int = 64  # generated images saved to samples.png (0: none)
    channels_last: bool = True  # generator and student in channels_last while training

    def validate(self) -> None:
        super().validate()
        for name in ("kd_steps", "g_steps", "lr_G", "latent_dim", "gen_bn_eps", "log_every"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)!r}")
        if self.gen_width < 2 or self.gen_width % 2:
            raise ConfigError(f"gen_width must be an even integer >= 2, got {self.gen_width}")
        for name in ("eval_every", "samples"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)!r}")


@register("dfad")
class DFAD(Method):
    """DFAD (Fang et al. 2019): generator and student in a min-max game on the L1 logit distance."""

    data_access = DataAccess.NONE
    teacher_access = TeacherAccess.GRADIENTS
    Config = DFADConfig
    # the equal-tuning search space (bench tune; docs/tuning.md): the fields the paper says matter, in ranges
    # around the paper's values for mnist, which must lie inside (bench.search_space.check_space, at registration)
    search_space = {
        "lr": Float(1e-3, 0.3, log=True),
        "lr_G": Float(1e-4, 1e-2, log=True),
        "batch_size": Choice(64, 128, 256, 512),
        "gen_width": Choice(16, 32, 64, 128),
        "kd_steps": Int(1, 10),
    }
    presets = PRESETS
    preset_for_dataset = PRESET_FOR_DATASET
    tracks_best = True  # the official code keeps the best test-set epoch

    def distill(self, teacher, student, ctx):
        cfg, info, device = self.config, ctx.info, ctx.device
        b = cfg.batch_size
        per_epoch = cfg.iters_per_epoch * cfg.kd_steps  # student steps per epoch
        nominal = ctx.scaled(cfg.epochs * cfg.iters_per_epoch) * cfg.kd_steps
        total = ctx.plan_steps(nominal, queries_per_step=b * (cfg.kd_steps + cfg.g_steps) / cfg.kd_steps)
        scale = total / (cfg.epochs * per_epoch)  # budget fraction and caps squeeze the milestones with the run
        milestones = [max(1, round(m * per_epoch * scale)) for m in cfg.milestones]  # in student steps
        milestones_g = [max(1, round(m * cfg.iters_per_epoch * scale)) for m in cfg.milestones]  # in rounds

        generator = DAFLGenerator(cfg.latent_dim, info.image_size, info.channels, cfg.gen_width,
                                  bn_eps=cfg.gen_bn_eps).to(device)
        if cfg.channels_last:
            generator = generator.to(memory_format=torch.channels_last)
            student = student.to(memory_format=torch.channels_last)
        opt_g = torch.optim.Adam(generator.parameters(), lr=cfg.lr_G)
        opt_s = make_optimizer(student.parameters(), cfg)
        sched_g = make_scheduler(opt_g, "multistep", total, milestones_g, cfg.lr_decay)
        sched_s = make_scheduler(opt_s, "multistep", total, milestones, cfg.lr_decay)
        ctx.track(generator=generator, opt_g=opt_g, opt_s=opt_s, sched_g=sched_g, sched_s=sched_s)

        student.train()
        x = t_logits = loss_g = None
        for step in ctx.steps(total, "dfad", log_every=cfg.log_every):
            z = torch.randn(b, cfg.latent_dim, device=device)
            loss_s, x, t_logits = student_step(generator, teacher, student, opt_s, z, autocast=ctx.autocast)
            if step % cfg.kd_steps == 0:  # the generator's turn after kd_steps student steps
                for _ in range(cfg.g_steps):
                    z = torch.randn(b, cfg.latent_dim, device=device)
                    loss_g = generator_step(generator, teacher, student, opt_g, z, autocast=ctx.autocast)
                sched_g.step()  # per round: the official code steps both schedulers per epoch of rounds
            sched_s.step()
            losses = {"loss_s": loss_s} if loss_g is None else {"loss_s": loss_s, "loss_g": loss_g}
            ctx.log(step, **losses, sample_std=sample_std(x), t_entropy=class_entropy(t_logits),
                    lr_s=sched_s.get_last_lr()[0])
            if cfg.eval_every and step % cfg.eval_every == 0:
                ctx.evaluate(student, step)  # validation accuracy; the harness records best-on-test

        if x is not None:
            save_samples(ctx, x, t_logits, cfg.samples, "DFAD")
        return student.to(memory_format=torch.contiguous_format)
