"""Hard-label DFME (``dfme_hl``): a black-box teacher that returns only its top-1 class.

The harness's hard-label baseline, not a published method. The published hard-label method ZSDB3KD
(Wang, "Zero-Shot Knowledge Distillation from a Decision-Based Black-Box Model", ICML 2021; code
zwang84/zsdb3kd) does not fit a CPU cell: its get_pseudo_samples.py runs 15 generations x 10 classes x
200 noise images x 40 optimisation steps, each step a boundary-distance search of up to 5,000 queries per
image (``query_limit=5000``), i.e. up to 6 x 10^9 teacher queries before the student trains, against the
10^7 of the black-box study.

This baseline keeps DFME's game (:mod:`methods.dfme`: generator, rounds of ``g_iter`` generator and
``d_iter`` student steps, optimisers and schedules, the grey 32-px settings) and changes what a hard-label
teacher forces it to change:

- the student minimises the cross-entropy on the teacher's top-1 class of each generated image;
- the generator maximises the same cross-entropy, with the teacher's labels held fixed. A label is
  piecewise constant in the image, so this gradient, taken through the student alone, is the exact
  gradient of the game's loss almost everywhere: no zeroth-order estimate and no teacher gradient;
- queries per round: ``batch x (g_iter + d_iter)`` (one label per generated image).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from bench.method import DataAccess, Method, TeacherAccess, register
from methods.adversarial import optimizer_step, sample_std, save_samples
from methods.black_box import (DFME_PRESET_FOR_DATASET, DFME_PRESETS, DFME_SPACE, DFMEConfig, dfme_game,
                               hard_label_loss)


@dataclass
class DFMEHardConfig(DFMEConfig):
    @property
    def queries_per_round(self) -> int:
        """Teacher queries of one round: one label per generated image, ``batch x (g_iter + d_iter)``."""
        return self.batch_size * (self.g_iter + self.d_iter)


def label_histogram_entropy(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Entropy (nats) of the teacher's label histogram on a batch: ln K balanced, 0 when one class."""
    p = torch.bincount(labels, minlength=num_classes).float() / labels.numel()
    return -(p * p.clamp_min(1e-12).log()).sum()


@register("dfme_hl")
class DFMEHardLabel(Method):
    """DFME's game against a teacher that returns only its top-1 class (the harness's hard-label baseline)."""

    data_access = DataAccess.NONE
    teacher_access = TeacherAccess.LABELS
    Config = DFMEHardConfig
    search_space = DFME_SPACE  # the equal-tuning search space (bench tune; docs/tuning.md)
    presets = DFME_PRESETS
    preset_for_dataset = DFME_PRESET_FOR_DATASET

    def distill(self, teacher, student, ctx):
        cfg, info, device = self.config, ctx.info, ctx.device
        game = dfme_game(cfg, ctx, student)
        generator, student, opt_s, opt_g = game.generator, game.student, game.opt_s, game.opt_g

        def batch() -> torch.Tensor:
            return generator(torch.randn(cfg.batch_size, cfg.latent_dim, device=device))

        x = labels = loss_g = None
        for step in ctx.steps(game.total, "dfme_hl", log_every=cfg.log_every):
            if game.opens_round(step, cfg.d_iter):
                with ctx.queries_for("generator"):
                    for _ in range(cfg.g_iter):
                        fake = batch()
                        y = teacher.labels(fake.detach())
                        loss_g = -hard_label_loss(student(fake), y)
                        optimizer_step(opt_g, loss_g, generator.parameters())
                game.sched_g.step()
            with ctx.queries_for("student"):
                with torch.no_grad():
                    x = batch()
                    labels = teacher.labels(x)
                loss_s = hard_label_loss(student(x), labels)
                optimizer_step(opt_s, loss_s, student.parameters())
            game.sched_s.step()
            ctx.log(step, loss_s=loss_s, loss_g=loss_g, sample_std=sample_std(x),
                    t_entropy=label_histogram_entropy(labels, info.num_classes), lr_s=game.sched_s.get_last_lr()[0])

        if x is not None:
            save_samples(ctx, x, torch.nn.functional.one_hot(labels, info.num_classes).float(), cfg.samples, "DFME-HL")
        return student.to(memory_format=torch.contiguous_format)
