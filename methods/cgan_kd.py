"""Conditional-adversarial KD (``cgan_kd``): a discriminator learns the distillation loss on the logits.

Xu, Hsu, Huang, "Training Shallow and Thin Networks for Acceleration via Knowledge Distillation with
Conditional Adversarial Networks", arXiv 1709.00513 (also "Learning Loss for Knowledge Distillation with
Conditional Adversarial Networks", BMVC 2018). A small discriminator D learns to tell the teacher's logits
from the student's, conditioned on the class; the student is trained to fool it, plus an L1 term pulling
its logits to the teacher's and a CE term on the labels. FULL data access: the labelled training set.

Only the abstract could be read; every setting below is the harness's labelled default (METHODS.md,
"Feature embedding, conditional-adversarial KD, evolutionary pruning"):
- D: an MLP on the logits, ``in -> 256 -> 256 -> 1`` with LeakyReLU 0.2 and no BatchNorm
  (:class:`LogitDiscriminator`). Conditioning (``conditioning``): ``label_concat`` (input ``[z, one_hot(y)]``,
  K + K), ``aux_classifier`` (ACGAN style: input ``z`` (K), a second head predicts the class; its CE on the
  teacher's and the student's logits is added to D's loss, and on the student's logits to the student's
  loss), ``none`` (input ``z`` only).
- Losses: D: ``BCE(D(z_t|y), 1) + BCE(D(z_s.detach()|y), 0)``; student: ``adv_weight * BCE(D(z_s|y), 1) +
  l1_weight * mean|z_s - z_t| + ce_weight * CE(z_s, y)`` (the L1 term is the elementwise mean over batch and
  classes), weights 1 / 1 / 1. One D step (Adam, lr 2e-4, betas (0.5, 0.999): the DCGAN setting) before every
  student step, on the same batch. The student's optimiser and schedule are the ``kd`` method's presets.

The discriminator exists only during training: it is not a submodule of the student, so it never counts in
the student's params, MACs or latency. It and its optimiser are tracked for in-cell checkpoints.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from bench.config import ConfigError
from bench.method import DataAccess, Method, TeacherAccess, register
from bench.training import TrainConfig, fit_schedule, train
from methods.kd import PRESET_FOR_DATASET, PRESETS
from methods.losses import teacher_scores

CONDITIONINGS = ("label_concat", "aux_classifier", "none")


class LogitDiscriminator(nn.Module):
    """MLP on logits: ``in -> hidden -> hidden -> 1`` (LeakyReLU 0.2, no BN); with ``aux_classifier`` also
    ``hidden -> num_classes`` class logits from the same trunk."""

    def __init__(self, num_classes: int, conditioning: str = "label_concat", hidden: int = 256, slope: float = 0.2):
        super().__init__()
        if conditioning not in CONDITIONINGS:
            raise ConfigError(f"conditioning {conditioning!r} is not one of {', '.join(CONDITIONINGS)}")
        self.num_classes, self.conditioning = num_classes, conditioning
        width = 2 * num_classes if conditioning == "label_concat" else num_classes
        self.trunk = nn.Sequential(nn.Linear(width, hidden), nn.LeakyReLU(slope),
                                   nn.Linear(hidden, hidden), nn.LeakyReLU(slope))
        self.adv = nn.Linear(hidden, 1)
        self.aux = nn.Linear(hidden, num_classes) if conditioning == "aux_classifier" else None

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(real/fake score logit (B,), class logits (B, K) or None)."""
        x = logits.float()
        if self.conditioning == "label_concat":
            x = torch.cat([x, F.one_hot(labels, self.num_classes).to(x.dtype)], dim=1)
        h = self.trunk(x)
        return self.adv(h).squeeze(1), (self.aux(h) if self.aux is not None else None)


def discriminator_loss(disc: LogitDiscriminator, teacher_logits: torch.Tensor, student_logits: torch.Tensor,
                       labels: torch.Tensor) -> torch.Tensor:
    """``BCE(D(z_t|y), 1) + BCE(D(z_s|y), 0)`` (+ the auxiliary class CE on both with ``aux_classifier``).
    Pass ``student_logits.detach()`` for D's update."""
    real, real_cls = disc(teacher_logits, labels)
    fake, fake_cls = disc(student_logits, labels)
    loss = F.binary_cross_entropy_with_logits(real, torch.ones_like(real)) + \
        F.binary_cross_entropy_with_logits(fake, torch.zeros_like(fake))
    if real_cls is not None:
        loss = loss + F.cross_entropy(real_cls, labels) + F.cross_entropy(fake_cls, labels)
    return loss


def student_adversarial_loss(disc: LogitDiscriminator, student_logits: torch.Tensor,
                             labels: torch.Tensor) -> torch.Tensor:
    """``BCE(D(z_s|y), 1)``: the student wants its logits taken for the teacher's (+ the auxiliary class CE)."""
    fake, fake_cls = disc(student_logits, labels)
    loss = F.binary_cross_entropy_with_logits(fake, torch.ones_like(fake))
    if fake_cls is not None:
        loss = loss + F.cross_entropy(fake_cls, labels)
    return loss


@dataclass
class CGANKDConfig(TrainConfig):
    conditioning: str = "label_concat"  # label_concat | aux_classifier | none (harness default: label_concat)
    disc_hidden: int = 256  # D's hidden width (harness default)
    disc_lr: float = 2e-4  # Adam for D (DCGAN setting; harness default)
    disc_beta1: float = 0.5
    disc_beta2: float = 0.999
    adv_weight: float = 1.0  # weight of the student's adversarial term (harness default)
    l1_weight: float = 1.0  # weight of mean |z_s - z_t| (harness default)
    ce_weight: float = 1.0  # weight of CE(z_s, y) (harness default)

    def validate(self) -> None:
        super().validate()
        if self.conditioning not in CONDITIONINGS:
            raise ConfigError(f"conditioning {self.conditioning!r} is not one of {', '.join(CONDITIONINGS)}")
        if self.disc_hidden < 1 or self.disc_lr <= 0:
            raise ConfigError(f"disc_hidden must be >= 1 and disc_lr > 0, got {self.disc_hidden!r}, {self.disc_lr!r}")
        for name in ("disc_beta1", "disc_beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"{name} must lie in [0, 1), got {getattr(self, name)!r}")
        for name in ("adv_weight", "l1_weight", "ce_weight"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)!r}")


@register("cgan_kd")
class CGANKD(Method):
    data_access = DataAccess.FULL
    teacher_access = TeacherAccess.OUTPUTS
    Config = CGANKDConfig
    presets = PRESETS
    preset_for_dataset = PRESET_FOR_DATASET

    def distill(self, teacher, student, ctx):
        cfg = self.config
        disc = LogitDiscriminator(ctx.num_classes, cfg.conditioning, cfg.disc_hidden).to(ctx.device)
        disc_opt = torch.optim.Adam(disc.parameters(), lr=cfg.disc_lr, betas=(cfg.disc_beta1, cfg.disc_beta2))
        ctx.track(discriminator=disc, discriminator_optimizer=disc_opt)
        plan = fit_schedule(ctx, cfg, ctx.info.train_size, queries_per_step=cfg.batch_size)
        batches = ctx.train_batches(cfg.batch_size)

        def step(it: int) -> dict[str, torch.Tensor]:
            x, y = next(batches)
            with ctx.autocast():
                with torch.no_grad():
                    t_logits = teacher_scores(teacher, x).float()
                s_logits = student(x).float()
            # one D step on this batch, then the student's losses against the updated D
            d_loss = discriminator_loss(disc, t_logits, s_logits.detach(), y)
            disc_opt.zero_grad(set_to_none=True)
            d_loss.backward()
            disc_opt.step()
            disc.requires_grad_(False)  # the student's backward needs no gradient for D's weights
            adv = student_adversarial_loss(disc, s_logits, y)
            disc.requires_grad_(True)
            l1 = F.l1_loss(s_logits, t_logits)
            ce = F.cross_entropy(s_logits, y)
            loss = cfg.adv_weight * adv + cfg.l1_weight * l1 + cfg.ce_weight * ce
            return {"loss": loss, "adv": adv.detach(), "l1": l1.detach(), "ce": ce.detach(), "loss_d": d_loss.detach()}

        student.train()
        train(student.parameters(), step, cfg, plan, ctx=ctx, name="cgan_kd")
        return student
