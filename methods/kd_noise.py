"""KD on Gaussian-noise inputs (``kd_noise``): the data-free floor.

The "KD with random noise" baseline row of DAFL (Chen et al., ICCV 2019, Tables 1 and 3: 88.01 on
MNIST, 14.89 on CIFAR-10). Inputs are N(0, I) in the teacher's normalised input space; the loss is
the soft-target term of Hinton KD (no labels exist). The optimiser and iteration budget follow
DAFL's student settings for the same dataset so that the two differ only in their inputs.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from bench.method import DataAccess, Method, TeacherAccess, register
from bench.training import TrainConfig, fit_schedule, train
from bench.search_space import Choice, Float
from methods.losses import kd_loss, teacher_scores

# DAFL's student optimisers and budgets (METHODS.md, DAFL table): 120 iterations per "epoch".
PRESETS = {
    "mnist": dict(optimizer="adam", lr=2e-3, batch_size=512, epochs=200, iters_per_epoch=120),
    "cifar10": dict(optimizer="sgd", lr=0.1, momentum=0.9, weight_decay=5e-4, batch_size=1024, epochs=2000,
                    iters_per_epoch=120, milestones=[800, 1600]),
    "cifar100": dict(optimizer="sgd", lr=0.1, momentum=0.9, weight_decay=5e-4, batch_size=1024, epochs=2000,
                     iters_per_epoch=120, milestones=[800, 1600]),
}
PRESET_FOR_DATASET = {"mnist": "mnist", "fashion_mnist": "mnist", "mnist_5k": "mnist", "digits": "mnist",
                      "cifar10": "cifar10", "svhn": "cifar10", "cifar100": "cifar100"}


@dataclass
class KDNoiseConfig(TrainConfig):
    temperature: float = 4.0  # not fixed by DAFL (unverified); Hinton KD's common T
    iters_per_epoch: int = 120


@register("kd_noise")
class KDNoise(Method):
    data_access = DataAccess.NONE
    teacher_access = TeacherAccess.OUTPUTS
    Config = KDNoiseConfig
    # the equal-tuning search space (bench tune; docs/tuning.md): the fields the paper says matter, in ranges
    # around the paper's values for mnist, which must lie inside (bench.search_space.check_space, at registration)
    search_space = {
        "lr": Float(1e-4, 1e-1, log=True),
        "batch_size": Choice(64, 128, 256, 512),
        "temperature": Float(1.0, 20.0, log=True),
    }
    presets = PRESETS
    preset_for_dataset = PRESET_FOR_DATASET

    def distill(self, teacher, student, ctx):
        cfg = self.config
        plan = fit_schedule(ctx, cfg, ctx.info.train_size, queries_per_step=cfg.batch_size)

        def step(it: int) -> dict[str, torch.Tensor]:
            x = ctx.noise(cfg.batch_size)
            with ctx.autocast():
                with torch.no_grad():
                    t_logits = teacher_scores(teacher, x)
                loss = kd_loss(student(x).float(), t_logits.float(), cfg.temperature)
            return {"loss": loss}

        student.train()
        train(student.parameters(), step, cfg, plan, ctx=ctx, name="kd_noise")
        return student
