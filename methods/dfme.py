"""DFME: Data-Free Model Extraction (``dfme``): a black-box teacher, only its scores.

Truong, Maini, Walls, Papernot, "Data-Free Model Extraction", CVPR 2021 (arXiv 2011.14779); the step
follows the official code (cake-lab/datafree-model-extraction: dfme/train.py, approximate_gradients.py,
network/gan.py, run_cifar_dfme.sh, run_svhn_dfme.sh). DFAD's min-max game on the L1 distance between
the teacher's and the student's logits, with the teacher behind an API (``teacher_access = outputs``):

- the API returns probabilities; the logits are estimated as ``log p - mean_k log p`` (``no_logits=1``,
  ``logit_correction='mean'``);
- the generator cannot back-propagate through the teacher: its gradient with respect to each generated
  image (before the Tanh) is a forward-difference estimate on ``grad_m`` random unit directions with step
  ``grad_epsilon`` (:func:`methods.black_box.forward_difference_gradient`), back-propagated into the
  generator (``fake.backward(grad)``); the official code scales it by ``1 / (K * N)`` (K classes, N images),
  kept here;
- one round = ``g_iter`` generator steps, then ``d_iter`` student steps on fresh images (SGD with
  momentum, weight decay); both learning rates x ``scale`` at the ``steps`` fractions of the run;
- the budget is in teacher queries: ``batch x (g_iter x (grad_m + 1) + d_iter)`` per round. The row's
  ``teacher_queries_by`` splits them into the generator's estimate and the student's steps.

Presets (the official scripts; the repository has no MNIST script): ``cifar10`` = run_cifar_dfme.sh
(20M queries, lr_G 5e-4, steps 0.1/0.3/0.5), ``svhn`` = run_svhn_dfme.sh (2M queries, lr_G 5e-5, steps
0.5/0.8). ``grey32`` (MNIST, Fashion-MNIST and the other grey 32-px sets): the SVHN script's settings (its
nearest task: digits at 32 px), with two deviations, both chosen by cost and not by accuracy: a
generator of width 32 instead of 128 (per image about as costly as the DFAD/ZSKT/DFQ generators of the
quick grid) and a budget of 10M queries (the black-box study's largest budget).
"""
from __future__ import annotations

import torch

from bench.method import DataAccess, Method, TeacherAccess, register
from methods.adversarial import class_entropy, sample_std, save_samples
from methods.black_box import (DFME_PRESET_FOR_DATASET, DFME_PRESETS, DFME_SPACE, DFMEConfig, corrected_log_probs,
                               dfme_game, forward_difference_gradient, l1_disagreement)

@register("dfme")
class DFME(Method):
    """DFME (Truong et al., CVPR 2021): DFAD's game with zeroth-order generator gradients, scores only."""

    data_access = DataAccess.NONE
    teacher_access = TeacherAccess.OUTPUTS
    Config = DFMEConfig
    search_space = DFME_SPACE  # the equal-tuning search space (bench tune; docs/tuning.md)
    presets = DFME_PRESETS
    preset_for_dataset = DFME_PRESET_FOR_DATASET
    tracks_best = True  # the official code tests every epoch and reports the best

    def distill(self, teacher, student, ctx):
        cfg, info, device = self.config, ctx.info, ctx.device
        game = dfme_game(cfg, ctx, student)
        generator, student, opt_s, opt_g = game.generator, game.student, game.opt_s, game.opt_g

        def disagreement(points: torch.Tensor) -> torch.Tensor:  # -L1 per point: the generator maximises L1
            return -l1_disagreement(student(points), corrected_log_probs(teacher.log_probs(points)))

        x = t_est = loss_g = None
        for step in ctx.steps(game.total, "dfme", log_every=cfg.log_every):
            if game.opens_round(step, cfg.d_iter):
                student.eval()  # as approximate_gradients.py: the student in eval mode for the estimate
                with ctx.queries_for("generator"):
                    for _ in range(cfg.g_iter):
                        fake = generator(torch.randn(cfg.batch_size, cfg.latent_dim, device=device), pre_activation=True)
                        grad, loss_g = forward_difference_gradient(disagreement, fake, directions=cfg.grad_m,
                                                                   epsilon=cfg.grad_epsilon)
                        opt_g.zero_grad(set_to_none=True)
                        fake.backward(grad / (info.num_classes * cfg.batch_size))
                        opt_g.step()
                game.sched_g.step()
                student.train()
            with ctx.queries_for("student"):
                with torch.no_grad():
                    x = generator(torch.randn(cfg.batch_size, cfg.latent_dim, device=device))
                    t_est = corrected_log_probs(teacher.log_probs(x))
                loss_s = l1_disagreement(student(x), t_est).mean()
                opt_s.zero_grad(set_to_none=True)
                loss_s.backward()
                opt_s.step()
            game.sched_s.step()
            ctx.log(step, loss_s=loss_s, loss_g=loss_g, sample_std=sample_std(x), t_entropy=class_entropy(t_est),
                    lr_s=game.sched_s.get_last_lr()[0])
            if step % (cfg.epoch_itrs * cfg.d_iter) == 0:
                ctx.evaluate(student, step)  # validation accuracy; the harness records best-on-test

        if x is not None:
            save_samples(ctx, x, t_est, cfg.samples, "DFME")
        return student.to(memory_format=torch.contiguous_format)
