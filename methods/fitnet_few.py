"""FitNet-style SGD fitting of the block outputs on the few samples (``fitnet_few``).

The SGD counterpart of FSKD's closed-form fit (Li et al., CVPR 2020, arXiv 1812.01839, compares
with FitNet-style fitting on the same few samples; Romero et al., ICLR 2015, "FitNets"): on the same
n unlabelled samples and at the same fit points as ``fskd`` (methods/block_fitting.py), all student
weights are trained by gradient descent to match the teacher's block outputs restricted to the kept
channels. Loss: the sum over blocks of ``MSE(s, t) / mean(t^2)`` (each block's error relative to its
target's energy, so that early and late blocks weigh alike: harness choice). Labels are never read;
the teacher's block outputs are computed once (n teacher queries; with ``augment`` once per step). Optimiser, epochs and BN handling:
the same fields and defaults as ``finetune_few``. Needs a student derived from the teacher.
"""
from __future__ import annotations

import torch

from bench.method import DataAccess, Method, TeacherAccess, register
from methods.block_fitting import capture, fit_points, kept_channels, student_spec, teacher_targets
from methods.finetune_few import FewSampleTrainConfig, train_on_few


@register("fitnet_few")
class FitNetFew(Method):
    data_access = DataAccess.FEW
    teacher_access = TeacherAccess.FEATURES
    Config = FewSampleTrainConfig

    def distill(self, teacher, student, ctx):
        cfg = self.config
        images, _ = ctx.few_samples(cfg.n_samples)  # unlabelled
        student.eval()
        points = fit_points(student, teacher.layer_shapes(), ctx.prepare(images[:1]), kept_channels(ctx),
                            spec=student_spec(student, ctx.lineage))
        targets = {name: torch.cat(parts) for name, parts in
                   teacher_targets(teacher, points, images, ctx.prepare, 250).items()}
        energy = {name: t.square().mean().clamp_min(1e-12) for name, t in targets.items()}
        modules = {p.output: student.get_submodule(p.output) for p in points}
        index = torch.arange(images.shape[0], device=images.device)
        stream = ctx.batches(images, index, cfg.batch_size, prepare=False)

        kept = {p.output: torch.tensor(p.kept, device=images.device) for p in points}

        def step(it: int) -> dict[str, torch.Tensor]:
            xb, idx = next(stream)
            x = ctx.prepare(xb, augment_images=cfg.augment)  # the index picks the cached targets
            with ctx.autocast():
                if cfg.augment:  # targets of the augmented images: one more teacher pass per step
                    with torch.no_grad():
                        t_out = teacher.layer_outputs(x, list(modules), stop_after=points[-1].output)
                    batch_targets = {n: t_out[n].index_select(1, kept[n]).float() for n in modules}
                else:
                    batch_targets = {n: targets[n][idx] for n in modules}
                outs = capture(student, list(modules), x, stop_after=points[-1].output)
                loss = sum(torch.mean((outs[n].float() - batch_targets[n]) ** 2) / energy[n] for n in modules)
            return {"loss": loss}

        train_on_few(student, step, cfg, ctx, "fitnet_few", queries_per_step=cfg.batch_size if cfg.augment else None)
        return student
