"""The uncompressed CycleGAN (``gan_uncompressed``): the translation task's reference, the "teacher" row.

CycleGAN, Zhu, Park, Isola, Efros, ICCV 2017, as trained by the harness (bench.translation.cyclegan); the
row Shu et al. (ICCV 2019, arXiv 1907.10804) compare their compressed generators with.
"""
from __future__ import annotations

from dataclasses import dataclass

from bench.translation.task import Compressed, TranslationMethod, register_translation


@dataclass
class UncompressedConfig:
    pass


@register_translation("gan_uncompressed")
class GanUncompressed(TranslationMethod):
    Config = UncompressedConfig
    compresses = False

    def compress(self, teacher, ctx):
        return Compressed(teacher.g_ab, teacher.g_ba)
