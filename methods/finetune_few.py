"""Fine-tuning on the few labelled samples (``finetune_few``): FSKD's conventional-recovery baseline.

FSKD (Li et al., CVPR 2020, arXiv 1812.01839) claims recovery "to the level of conventional
fine-tuning" from n unlabelled samples; this baseline fine-tunes the student with cross-entropy on
the *same* n samples (``ctx.few_samples(n, labels=True)``), with labels. The paper's fine-tuning
hyperparameters are not fixed here (unverified): SGD lr 0.01, momentum 0.9, wd 5e-4, batch 64, 100
epochs over the n samples is the harness choice, exposed as config fields. The epochs are scaled by
the grid's budget like every method's iterations. Works for any student (a student not derived from
the teacher is then trained from scratch on n labelled samples).

``freeze_bn`` (default True): the student stays in eval mode while training, so BatchNorm keeps the
running statistics it inherited from the teacher instead of re-estimating them from n samples
(harness choice; no effect on BN-free students such as LeNet-5).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from bench.config import ConfigError
from bench.method import DataAccess, Method, TeacherAccess, register
from bench.training import TrainConfig, fit_schedule, train


@dataclass
class FewSampleTrainConfig(TrainConfig):
    """SGD on the n few samples; ``epochs`` are passes over those n samples."""

    n_samples: int = 500  # FSKD Sec. 4: 500 training images (1% of CIFAR-10)
    optimizer: Literal["sgd", "adam"] = "sgd"  # harness choice (the paper's fine-tuning setting is unverified)
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 64
    epochs: int = 100
    freeze_bn: bool = True  # keep BN running statistics (student in eval mode while training)
    augment: bool = False  # the dataset's training augmentation on the few samples (FSKD: none)

    def validate(self) -> None:
        super().validate()
        if self.n_samples < 1:
            raise ConfigError(f"n_samples must be >= 1, got {self.n_samples!r}")


def train_on_few(student, step, cfg: FewSampleTrainConfig, ctx, name: str, queries_per_step: float | None = None) -> None:
    """Run ``step`` for the budget-scaled epochs over the n samples; BN frozen if asked."""
    plan = fit_schedule(ctx, cfg, max(cfg.n_samples, cfg.batch_size), queries_per_step)  # an epoch: one pass over the n samples
    student.train(not cfg.freeze_bn)
    train(student.parameters(), step, cfg, plan, ctx=ctx, name=name, log_every=50)
    student.eval()


@register("finetune_few")
class FinetuneFew(Method):
    data_access = DataAccess.FEW
    teacher_access = TeacherAccess.NONE
    Config = FewSampleTrainConfig
    few_labels = True  # fine-tuning reads the labels of its n samples

    def distill(self, teacher, student, ctx):
        cfg = self.config
        images, labels = ctx.few_samples(cfg.n_samples, labels=True)
        stream = ctx.batches(images, labels, cfg.batch_size, augment_images=cfg.augment)

        def step(it: int) -> dict[str, torch.Tensor]:
            x, yb = next(stream)
            with ctx.autocast():
                loss = F.cross_entropy(student(x).float(), yb)
            return {"loss": loss}

        train_on_few(student, step, cfg, ctx, "finetune_few")
        return student
