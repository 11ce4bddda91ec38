"""Few-Sample Knowledge Distillation (``fskd``): 1x1 block fitting in closed form, merged exactly.

Li, Wang, Yang, Jiang, Lin, Zhang, "Few Sample Knowledge Distillation for Efficient Network
Compression", CVPR 2020 (arXiv 1812.01839), as published. The student is compressed from the teacher
(here ``pruned:l1:<ratio>`` / ``pruned:slim:<ratio>`` / ``pruned:evo:<ratio>``, see bench/pruning.py),
so each student block's output channels are a subset of the teacher block's. After every student
*conv* block (conv [+ folded BN], before its nonlinearity) a C'xC' 1x1 conv Q (identity init, no bias)
is fitted in closed form by plain least squares on the N*H*W positions of n unlabelled samples
against the teacher's block output restricted to the kept channels; blocks are fitted from the input
up, each with the earlier Q's in place (block-coordinate descent, ``passes`` sweeps), and each Q is
merged exactly into its conv, so the returned student has exactly the pruned architecture (same
params, same FLOPs). Which convs are blocks (LeNet-5: conv1..conv3; VGG: every conv; ResNets: every
conv of the residual branches, before the addition): methods/block_fitting.py.

The n samples are a seeded draw from the training split that reads no label (the harness's
Provision stage); labels are never read. The least squares carry only a numerical-conditioning ridge
(``ridge`` = 1e-8 of the mean diagonal of X^T X; the paper states none): it matters only for a
constant-zero channel. The teacher is queried once per sample: its block outputs are kept on the
device (``cache_teacher``); with ``cache_teacher=False`` it is re-run for every block instead
(``n_samples x blocks x passes`` queries, less memory).

``fskd_plus`` (methods/fskd_plus.py) is the harness's variant with Q's on the hidden Linear layers and
the classifier and a regularising ridge.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from bench.config import ConfigError
from bench.method import DataAccess, Method, MethodConfig, TeacherAccess, register
from methods.block_fitting import (NormalEquations, batches, capture, fit_points, kept_channels, merge_q, rows,
                                   student_spec, teacher_targets)


@dataclass
class FSKDConfig(MethodConfig):
    n_samples: int = 500  # FSKD Sec. 4: 500 unlabelled CIFAR-10 training images (1%), no augmentation
    passes: int = 1  # sweeps of block-coordinate descent over all blocks (the paper's BCD; 1 = one sweep)
    # Relative ridge lam = ridge * trace(X^T X) / C. The paper's least squares are plain: 1e-8 only keeps
    # the system solvable when a channel is constant zero (a dead filter) and changes nothing else.
    ridge: float = 1e-8
    fit_linear: bool = False  # the paper places Q after conv blocks only
    fit_classifier: bool = False  # the paper fits no Q on the classifier's output (the logits)
    batch_size: int = 100  # streaming batch (memory only: the sums, hence Q, do not depend on it)
    cache_teacher: bool = True  # one teacher pass, block outputs kept; False: re-run the teacher per block

    def validate(self) -> None:
        super().validate()
        for name in ("n_samples", "passes", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if self.ridge < 0:
            raise ConfigError(f"ridge must be >= 0, got {self.ridge!r}")


@register("fskd")
class FSKD(Method):
    """FSKD as published (Li et al., CVPR 2020): 1x1 Q's after conv blocks, plain least squares, merged."""

    data_access = DataAccess.FEW
    teacher_access = TeacherAccess.FEATURES
    Config = FSKDConfig

    def distill(self, teacher, student, ctx):
        cfg = self.config
        images, _ = ctx.few_samples(cfg.n_samples)  # unlabelled
        student.eval()  # BN uses its running statistics: the block output is the BN-folded conv
        points = fit_points(student, teacher.layer_shapes(), ctx.prepare(images[:1]), kept_channels(ctx),
                            spec=student_spec(student, ctx.lineage), fit_linear=cfg.fit_linear,
                            fit_classifier=cfg.fit_classifier)
        targets = teacher_targets(teacher, points, images, ctx.prepare, cfg.batch_size) if cfg.cache_teacher else None
        started = time.perf_counter()
        for step in ctx.steps(cfg.passes * len(points), "fskd blocks", log_every=1):  # one block fit per step
            point = points[(step - 1) % len(points)]
            kept = torch.tensor(point.kept, device=images.device)
            eq = NormalEquations(len(point.kept), len(point.kept), images.device)
            yty = torch.zeros((), dtype=torch.float64, device=images.device)
            for b, xb in enumerate(batches(images, cfg.batch_size)):
                x = ctx.prepare(xb)
                with torch.no_grad():
                    s_out = capture(student, [point.output], x, stop_after=point.output)[point.output]
                    if targets is not None:
                        t_out = targets[point.output][b]
                    else:
                        t_out = teacher.layer_outputs(x, [point.output], stop_after=point.output)[point.output]
                        t_out = t_out.index_select(1, kept)
                eq.add(s_out, t_out)
                yty += rows(t_out).to(torch.float64).square().sum()
            q = eq.solve(cfg.ridge)
            merge_q(student, point, q)
            # Fit quality from the normal equations: ||X Q^T - Y||^2 = tr(Q A Q^T) - 2 tr(Q B) + ||Y||^2.
            q64 = q.to(torch.float64)
            before = (torch.diagonal(eq.xtx).sum() - 2 * torch.diagonal(eq.xty).sum() + yty) / yty
            after = ((q64 @ eq.xtx * q64).sum() - 2 * (q64 * eq.xty.t()).sum() + yty) / yty
            ctx.log(step, rel_err_before=before, rel_err_after=after, seconds=time.perf_counter() - started)
        return student
