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
