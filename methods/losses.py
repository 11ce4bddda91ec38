"""Distillation losses shared by several methods."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton et al. 2015: ``T^2 * KL(softmax(z_t/T) || softmax(z_s/T))``.

    KL summed over classes and averaged over the batch; the ``T^2`` keeps the soft-target gradients
    comparable across temperatures. ``teacher_logits`` should be detached by the caller.
    """
    log_p_student = F.log_softmax(student_logits / temperature, dim=1)
    p_teacher = F.softmax(teacher_logits / temperature, dim=1)
    return F.kl_div(log_p_student, p_teacher, reduction="batchmean") * temperature**2


def js_divergence(a_logits: torch.Tensor, b_logits: torch.Tensor, temperature: float = 3.0) -> torch.Tensor:
    """Adaptive DeepInversion's Jensen-Shannon divergence of ``softmax(a/T)`` and ``softmax(b/T)``.

    As in NVlabs/DeepInversion (``cifar10/deepinversion_cifar10.py``) and DataFree ``criterions.jsdiv``:
    P, Q and M = (P + Q) / 2 are clamped to [0.01, 0.99] (after M is formed), then
    ``JS = (KL(M || P) + KL(M || Q)) / 2`` with each KL summed over classes and averaged over the batch.
    """
    p = F.softmax(a_logits / temperature, dim=1)
    q = F.softmax(b_logits / temperature, dim=1)
    m = (0.5 * (p + q)).clamp(0.01, 0.99)
    p, q = p.clamp(0.01, 0.99), q.clamp(0.01, 0.99)
    return 0.5 * F.kl_div(p.log(), m, reduction="batchmean") + 0.5 * F.kl_div(q.log(), m, reduction="batchmean")


def adi_competition_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                         temperature: float = 3.0) -> torch.Tensor:
    """ADI's term ``1 - clamp(JS(softmax(z_s/T), softmax(z_t/T)), 0, 1)`` (Yin et al., CVPR 2020, Sec. 3.3).

    Minimising it pushes synthesised images to where the student disagrees with the teacher."""
    return 1.0 - js_divergence(student_logits, teacher_logits, temperature).clamp(0.0, 1.0)


def decision_adversarial_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """CMI / Fast-DFKD's adversarial term: ``-mean_i(mask_i * KL(softmax(t_i) || softmax(s_i)))`` at T = 1.

    ``mask_i`` keeps the samples on which student and teacher predict the same class (DataFree
    ``synthesis/contrastive.py``: "decision adversarial distillation"); the mean runs over the whole
    batch. Minimising it makes images the student still gets wrong in its soft outputs, without
    crossing the teacher's decision boundary for the student's sake."""
    mask = (student_logits.argmax(1) == teacher_logits.argmax(1)).to(student_logits.dtype)
    kl = F.kl_div(F.log_softmax(student_logits, dim=1), F.softmax(teacher_logits, dim=1), reduction="none").sum(1)
    return -(kl * mask).mean()
