"""DAFL: Data-Free Learning of student networks (``dafl``).

Chen, Wang, Xu, Yang, Liu, Shi, Xu, Xu, Tian, "DAFL: Data-Free Learning of Student Networks",
ICCV 2019 (arXiv 1904.01186); the step follows the official code (huawei-noah/Data-Efficient-Model-
Compression, DAFL-train.py). The teacher is a fixed discriminator: a generator (methods/generator.py)
learns images on which the teacher is confident (one-hot), strongly activated (activation) and
class-balanced (information entropy); the student is distilled on the same generated batch.

Per iteration: one z batch, one x = G(z), ONE teacher forward (penultimate feature and logits),
  L_G = oh * CE(T(x), argmax T(x)) + a * (-mean |f_T(x)|) + ie * sum_k pbar_k log10 pbar_k
  L_S = KL(softmax(T(x)) || softmax(S(x))) at T=1, summed over classes / batch, on x.detach() and
        the detached teacher output;
one backward of L_G + L_S (the official code's ``loss += loss_kd``), both optimisers step.
One "epoch" is 120 iterations; the grid's budget scales the iteration count and the milestones.
The official code evaluates the student on the test set every epoch and reports the best epoch:
``tracks_best`` with ``eval_every`` iterations; the method itself sees only validation accuracy there,
and the harness records the best test accuracy as the paper's protocol (the final accuracy stays the
headline).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, Literal

import torch
import torch.nn.functional as F

from bench.config import ConfigError
from bench.method import DataAccess, Method, TeacherAccess, register
from bench.training import TrainConfig, fit_schedule, make_optimizer
from bench.search_space import Choice, Float
from methods.generator import DAFLGenerator, save_image_grid
from methods.losses import kd_loss

# ---------------------------------------------------------------------------------------------
# the losses (plain functions: reusable, and tested against hand-computed values)


def one_hot_loss(t_logits: torch.Tensor) -> torch.Tensor:
    """L_oh = CE(T(x), argmax T(x)): the teacher should be confident on generated images."""
    return F.cross_entropy(t_logits, t_logits.argmax(dim=1))


def activation_loss(t_features: torch.Tensor) -> torch.Tensor:
    """L_a = -mean |f_T(x)| over batch and features (the official code's ``-features_T.abs().mean()``)."""
    return -t_features.abs().mean()


def information_entropy_loss(t_logits: torch.Tensor) -> torch.Tensor:
    """L_ie = sum_k pbar_k log10 pbar_k, pbar = batch mean of softmax(T(x)); minimum -log10 K.

    log pbar is computed as logsumexp of the log-softmax (minus log B): the same value as the official
    ``(p * torch.log10(p)).sum()``, without its NaN when a class's mean probability underflows to 0.
    """
    log_p = F.log_softmax(t_logits, dim=1)
    log_pbar = torch.logsumexp(log_p, dim=0) - math.log(t_logits.shape[0])
    return (log_pbar.exp() * log_pbar).sum() / math.log(10.0)


def student_loss(s_logits: torch.Tensor, t_logits: torch.Tensor) -> torch.Tensor:
    """L_S = KL(softmax(t) || softmax(s)) at temperature 1, summed over classes / batch (``kdloss``)."""
    return kd_loss(s_logits, t_logits.detach(), 1.0)


def dafl_step(generator, teacher, student, opt_g: torch.optim.Optimizer, opt_s: torch.optim.Optimizer,
              z: torch.Tensor, *, oh: float, a: float, ie: float, autocast: Callable = contextlib.nullcontext,
              ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """One DAFL iteration as in the official code; :meth:`DAFL.distill` and the speed benchmark run it.

    x = G(z); ONE teacher forward (``teacher.features_and_logits``); the student on ``x.detach()``;
    one backward of ``L_G + L_S`` (G gets only L_G's gradient, S only L_S's); both optimisers step.
    No host synchronisation. Returns ``(x, teacher logits (float32), losses)`` with ``losses`` the
    tensors ``loss_oh, loss_a, loss_ie, loss_g, loss_s`` (the training curve's names).
    """
    with autocast():
        x = generator(z)
        t_features, t_logits = teacher.features_and_logits(x)  # the one teacher forward
        s_logits = student(x.detach())
    t_logits = t_logits.float()
    l_oh = one_hot_loss(t_logits)
    l_a = activation_loss(t_features.float())
    l_ie = information_entropy_loss(t_logits)
    loss_g = oh * l_oh + a * l_a + ie * l_ie
    loss_s = student_loss(s_logits.float(), t_logits)
    opt_g.zero_grad(set_to_none=True)
    opt_s.zero_grad(set_to_none=True)
    (loss_g + loss_s).backward()  # the official code's ``loss += loss_kd; loss.backward()``
    opt_g.step()
    opt_s.step()
    return x, t_logits, {"loss_oh": l_oh, "loss_a": l_a, "loss_ie": l_ie, "loss_g": loss_g, "loss_s": loss_s}


# ---------------------------------------------------------------------------------------------
# config and presets

# METHODS.md DAFL table = the official code's commands for paper Table 1 (MNIST) and Table 3
# (CIFAR-10/100): loss weights, batch, epochs x 120 iterations, optimisers.
PRESETS = {
    "mnist": dict(oh=1.0, a=0.1, ie=5.0, batch_size=512, epochs=200, lr_G=0.2, optimizer="adam", lr=2e-3,
                  latent_dim=100),
    "cifar10": dict(oh=0.05, a=0.01, ie=5.0, batch_size=1024, epochs=2000, lr_G=0.02, optimizer="sgd", lr=0.1,
                    momentum=0.9, weight_decay=5e-4, milestones=[800, 1600], lr_decay=0.1, latent_dim=1000),
    "cifar100": dict(oh=0.5, a=0.1, ie=20.0, batch_size=1024, epochs=2000, lr_G=0.02, optimizer="sgd", lr=0.1,
                     momentum=0.9, weight_decay=5e-4, milestones=[800, 1600], lr_decay=0.1, latent_dim=1000),
}
# Grey 28/32-px datasets use the MNIST setting (Fashion-MNIST is not in the paper: harness choice).
PRESET_FOR_DATASET = {"mnist": "mnist", "fashion_mnist": "mnist", "digits": "mnist", "mnist_5k": "mnist",
                      "mnist_t10k": "mnist", "cifar10": "cifar10", "svhn": "cifar10", "cifar100": "cifar100"}


@dataclass
class DAFLConfig(TrainConfig):
    """Student optimiser/schedule fields come from TrainConfig (optimizer, lr, momentum, ...)."""

    # paper Table 1 / official MNIST command (the defaults; CIFAR presets above)
    optimizer: Literal["sgd", "adam"] = "adam"  # student optimiser
    lr: float = 2e-3  # student lr
    batch_size: int = 512  # generated images per iteration
    epochs: int = 200  # paper "epochs" of iters_per_epoch iterations; scaled by the grid's budget
    iters_per_epoch: int = 120  # official code: ``for i in range(120)``
    lr_G: float = 0.2  # generator Adam lr (constant; only the student's lr follows milestones)
    latent_dim: int = 100  # 100 for 28/32-px grey datasets, 1000 for CIFAR
    oh: float = 1.0  # weight of the one-hot loss
    a: float = 0.1  # weight of the activation loss
    ie: float = 5.0  # weight of the information-entropy loss
    # cheaper settings (not the paper's), recorded in the row's method_params when overridden
    gen_width: int = 128  # generator channels (paper 128; the second block has gen_width // 2)
    # protocol and engineering
    eval_every: int = 120  # evaluation every N iterations (official: every epoch; the paper's best-on-test); 0 = none
    log_every: int = 50  # training-curve points (each one syncs with the device)
    samples: int = 64  # generated images saved to samples.png (0: none)
    # generator and student in channels_last while training (the student is returned contiguous). Faster
    # on CPU too (oneDNN): x1.3 at width 64 / batch 128, x2.3 at width 128 / batch 128, fp32, 2 cores.
    channels_last: bool = True
    compile: bool = False  # torch.compile the generator and the student

    def validate(self) -> None:
        super().validate()
        for name in ("lr_G", "latent_dim", "log_every"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)!r}")
        if self.gen_width < 2 or self.gen_width % 2:
            raise ConfigError(f"gen_width must be an even integer >= 2, got {self.gen_width}")
        for name in ("oh", "a", "ie", "eval_every", "samples"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)!r}")


@register("dafl")
class DAFL(Method):
    """DAFL (Chen et al., ICCV 2019): generator trained against the fixed teacher, student by KD on it."""

    data_access = DataAccess.NONE
    teacher_access = TeacherAccess.GRADIENTS
    Config = DAFLConfig
    # the equal-tuning search space (bench tune; docs/tuning.md): the fields the paper says matter, in ranges
    # around the paper's values for mnist, which must lie inside (bench.search_space.check_space, at registration)
    search_space = {
        "lr": Float(1e-4, 1e-1, log=True),
        "lr_G": Float(1e-3, 1.0, log=True),
        "batch_size": Choice(64, 128, 256, 512),
        "gen_width": Choice(16, 32, 64, 128),
        "oh": Float(0.05, 5.0, log=True),
        "a": Float(0.01, 1.0, log=True),
        "ie": Float(0.5, 20.0, log=True),
    }
    presets = PRESETS
    preset_for_dataset = PRESET_FOR_DATASET
    tracks_best = True  # the official code keeps the best test-set epoch

    def distill(self, teacher, student, ctx):
        cfg, info, device = self.config, ctx.info, ctx.device
        plan = fit_schedule(ctx, cfg, info.train_size, queries_per_step=cfg.batch_size)
        generator = DAFLGenerator(cfg.latent_dim, info.image_size, info.channels, cfg.gen_width).to(device)
        if cfg.channels_last:
            generator = generator.to(memory_format=torch.channels_last)
            student = student.to(memory_format=torch.channels_last)
        opt_g = torch.optim.Adam(generator.parameters(), lr=cfg.lr_G)
        opt_s = make_optimizer(student.parameters(), cfg)
        sched_s = torch.optim.lr_scheduler.MultiStepLR(opt_s, list(plan.milestones), gamma=cfg.lr_decay)
        ctx.track(generator=generator, opt_g=opt_g, opt_s=opt_s, sched_s=sched_s)
        gen_fwd = torch.compile(generator) if cfg.compile else generator
        student_fwd = torch.compile(student) if cfg.compile else student

        student.train()
        x = t_logits = None
        for it in ctx.steps(plan.total, "dafl", log_every=cfg.log_every):
            z = torch.randn(cfg.batch_size, cfg.latent_dim, device=device)
            x, t_logits, losses = dafl_step(gen_fwd, teacher, student_fwd, opt_g, opt_s, z, oh=cfg.oh, a=cfg.a,
                                            ie=cfg.ie, autocast=ctx.autocast)
            sched_s.step()
            # sample_std: per-pixel std across the batch, averaged; ~0 means the generator has collapsed
            # to one image (at a small batch and lr_G 0.2 this happens, and is permanent: Tanh saturates)
            ctx.log(it, **losses, sample_std=x.detach().float().std(dim=0).mean(), lr_s=sched_s.get_last_lr()[0])
            if cfg.eval_every and it % cfg.eval_every == 0:
                ctx.evaluate(student, it)  # validation accuracy; eval mode inside, train mode restored

        if cfg.samples and x is not None:
            n = min(cfg.samples, cfg.batch_size)
            labels = t_logits[:n].argmax(dim=1).tolist()
            ctx.out_dir.mkdir(parents=True, exist_ok=True)
            save_image_grid(x[:n], ctx.out_dir / "samples.png", info.mean, info.std,
                            titles=[f"T: {k}" for k in labels],
                            title=f"DAFL samples, last iteration ({info.name}; teacher's class)")
        return student.to(memory_format=torch.contiguous_format)
