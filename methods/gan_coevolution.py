"""Co-evolutionary compression of both CycleGAN generators (``gan_coevolution``).

Shu, Wang, Jia, Han, Chen, Xu, Tian, Xu, "Co-Evolutionary Compression for Unpaired Image Translation",
ICCV 2019 (arXiv 1907.10804); official code huawei-noah/Efficient-Computing, Pruning/GAN-Pruning. The two
generators' filter masks are two populations evolved together (bench.translation.coevolution: fitness from
the original discriminator's judgement and cycle consistency through the other population's best), the
fittest pair is pruned physically and fine-tuned exactly as ``gan_l1`` is.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from bench.translation.coevolution import CoevolutionSettings, coevolve
from bench.translation.cyclegan import to_unit
from bench.translation.prune import prune
from bench.translation.task import Compressed, TranslationMethod, finetune, register_translation
from methods.gan_l1 import FinetuneConfig


@dataclass
class CoevolutionConfig(CoevolutionSettings, FinetuneConfig):
    def validate(self) -> None:
        CoevolutionSettings.validate(self)
        FinetuneConfig.validate(self)


@register_translation("gan_coevolution")
class GanCoevolution(TranslationMethod):
    Config = CoevolutionConfig

    def compress(self, teacher, ctx):
        cfg = self.config
        settings = CoevolutionSettings(**{f.name: getattr(cfg, f.name) for f in fields(CoevolutionSettings)})
        gen = torch.Generator().manual_seed(ctx.seed)
        # fitness images: a seeded draw from each domain's validation split (search.py scores on its val split)
        x_a = to_unit(ctx.val_a[torch.randperm(ctx.val_a.shape[0], generator=gen)[:cfg.n_images]])
        x_b = to_unit(ctx.val_b[torch.randperm(ctx.val_b.shape[0], generator=gen)[:cfg.n_images]])
        found = coevolve(teacher.g_ab, teacher.g_ba, teacher.d_a, teacher.d_b, x_a, x_b, ctx.ratio, ctx.seed,
                         settings, gen)
        g_ab = prune(teacher.g_ab, found.mask_ab, found.segments)
        g_ba = prune(teacher.g_ba, found.mask_ba, found.segments)
        model, seconds = finetune(teacher, g_ab, g_ba, ctx, cfg.finetune_steps, cfg.finetune_batch_size)
        return Compressed(model.g_ab, model.g_ba, search_seconds=found.seconds,
                          generator_queries=found.generator_queries,
                          discriminator_queries=found.discriminator_queries, finetune_steps=cfg.finetune_steps,
                          finetune_seconds=seconds, log={"search": found.history})
