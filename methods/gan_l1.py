"""L1-norm filter pruning of both CycleGAN generators (``gan_l1``): the conventional-pruning baseline.

Shu et al., "Co-Evolutionary Compression for Unpaired Image Translation", ICCV 2019 (arXiv 1907.10804)
compare co-evolution with conventional filter pruning (Li et al., "Pruning Filters for Efficient ConvNets",
ICLR 2017): per filter group the filters of largest L1 norm are kept, at the same per-generator ratio as
co-evolution, and the pruned pair gets the same fine-tuning (bench.translation.task.finetune).
"""
from __future__ import annotations

from dataclasses import dataclass

from bench.translation.prune import l1_masks, prune, segments
from bench.translation.task import Compressed, TranslationMethod, finetune, register_translation


@dataclass
class FinetuneConfig:
    # official finetune.py: 201 epochs at batch 8, lr constant 100 epochs then decayed; counted in steps here
    finetune_steps: int = 2000  # harness choice (docs/translation.md)
    finetune_batch_size: int = 8  # official finetune.py (batchSize 8)

    def validate(self) -> None:
        if self.finetune_steps < 0 or self.finetune_batch_size < 1:
            raise ValueError(f"finetune_steps must be >= 0 and finetune_batch_size >= 1, got "
                             f"{self.finetune_steps}, {self.finetune_batch_size}")


@register_translation("gan_l1")
class GanL1(TranslationMethod):
    Config = FinetuneConfig

    def compress(self, teacher, ctx):
        segs = segments(teacher.g_ab, ctx.ratio)
        g_ab = prune(teacher.g_ab, l1_masks(teacher.g_ab, segs), segs)
        g_ba = prune(teacher.g_ba, l1_masks(teacher.g_ba, segs), segs)
        model, seconds = finetune(teacher, g_ab, g_ba, ctx, self.config.finetune_steps, self.config.finetune_batch_size)
        return Compressed(model.g_ab, model.g_ba, finetune_steps=self.config.finetune_steps, finetune_seconds=seconds)
