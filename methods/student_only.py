"""The student trained on labels alone (``student_only``): no teacher.

DAFL (Chen et al., ICCV 2019) Tables 1 and 3, row "student trained on labels" (98.65 MNIST LeNet-5-half,
93.92 CIFAR-10 ResNet-18, 76.53 CIFAR-100). Same optimiser presets as ``kd``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from bench.method import DataAccess, Method, TeacherAccess, register
from bench.training import TrainConfig, fit_schedule, train
from bench.search_space import Choice, Float
from methods.kd import PRESET_FOR_DATASET, PRESETS


@dataclass
class StudentOnlyConfig(TrainConfig):
    pass


@register("student_only")
class StudentOnly(Method):
    data_access = DataAccess.FULL
    teacher_access = TeacherAccess.NONE
    Config = StudentOnlyConfig
    # the equal-tuning search space (bench tune; docs/tuning.md): the fields the paper says matter, in ranges
    # around the paper's values for mnist, which must lie inside (bench.search_space.check_space, at registration)
    search_space = {
        "lr": Float(1e-4, 1e-2, log=True),
        "batch_size": Choice(64, 128, 256, 512),
    }
    presets = PRESETS
    preset_for_dataset = PRESET_FOR_DATASET

    def distill(self, teacher, student, ctx):
        cfg = self.config
        plan = fit_schedule(ctx, cfg, ctx.info.train_size)
        batches = ctx.train_batches(cfg.batch_size)

        def step(it: int) -> dict[str, torch.Tensor]:
            x, y = next(batches)
            with ctx.autocast():
                loss = F.cross_entropy(student(x), y)
            return {"loss": loss}

        student.train()
        train(student.parameters(), step, cfg, plan, ctx=ctx, name="student_only")
        return student
