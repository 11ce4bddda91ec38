"""Distillation losses shared by several methods."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def teacher_scores(teacher, x: torch.Tensor) -> torch.Tensor:
    """The teacher's logits where its API returns them, else its log-probabilities (logits up to a
    per-image shift, so softmax-based losses such as :func:`kd_loss` are unchanged); detached."""
    return teacher(x) if teacher.returns == "logits" else teacher.log_probs(x)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton et al. 2015: ``T^2 * KL(softmax(z_t/T) || softmax(z_s/T))``.

    KL summed over classes and averaged over the batch; the ``T^2`` keeps the soft-target gradients
    comparable across temperatures. ``teacher_logits`` should be detached by the caller.
    """
    log_p_student = F.log_softmax(student_logits / temperature, dim=1)
    p_teacher = F.softmax(teacher_logits / temperature, dim=1)
    return F.kl_div(log_p_student, p_teacher, reduction="batchmean") * temperature**2


def squared_distances(features: torch.Tensor) -> torch.Tensor:
    """(m, m) squared Euclidean distances between the rows of ``features`` (m, d), differentiable.

    Computed as ``|a|^2 + |b|^2 - 2 a.b`` (clamped at 0): unlike ``torch.cdist`` its gradient is finite
    on the zero diagonal."""
    features = features.flatten(1)
    sq = features.square().sum(1)
    return (sq[:, None] + sq[None, :] - 2.0 * features @ features.t()).clamp_min(0.0)


@torch.no_grad()
def locality_weights(teacher_features: torch.Tensor, k: int = 5, sigma: float = 0.0) -> torch.Tensor:
    """The locality-preserving affinities ``alpha`` (m, m) of a batch of teacher features (no gradient).

    ``D_T`` = squared distances between the teacher features; ``N(i)`` = the ``k`` nearest other samples of
    ``i`` by ``D_T`` (ties broken by index); ``alpha_ij = exp(-D_T[i, j] / sigma)`` where ``j in N(i)`` or
    ``i in N(j)`` (symmetrised the way Locality Preserving Projections builds its graph, He & Niyogi,
    NIPS 2003), else 0; the diagonal is 0. ``sigma <= 0``: the batch mean of the non-zero off-diagonal
    ``D_T`` (the harness's default; Chen et al.'s setting could not be read). ``k`` is capped at m - 1.
    """
    d = squared_distances(teacher_features.detach().float())
    m = d.shape[0]
    if m < 2:
        return torch.zeros_like(d)
    off = ~torch.eye(m, dtype=torch.bool, device=d.device)
    if sigma <= 0:
        positive = d[off & (d > 0)]
        sigma_t = positive.mean() if positive.numel() else torch.ones((), device=d.device)
    else:
        sigma_t = torch.as_tensor(sigma, dtype=d.dtype, device=d.device)
    k = min(int(k), m - 1)
    neighbours = d.masked_fill(~off, float("inf")).topk(k, dim=1, largest=False).indices
    graph = torch.zeros_like(d, dtype=torch.bool).scatter_(1, neighbours, True)
    graph = graph | graph.t()
    return torch.where(graph, torch.exp(-d / sigma_t), torch.zeros_like(d))


def locality_preserving_loss(student_features: torch.Tensor, teacher_features: torch.Tensor, k: int = 5,
                             sigma: float = 0.0, scale_invariant: bool = True) -> torch.Tensor:
    """Chen, Wang, Xu, Xu, Tao, "Learning Student Networks via Feature Embedding" (arXiv 1812.06597, IEEE
    TNNLS 2021): ``L_LP = (1/m) sum_ij alpha_ij ||f_S^i - f_S^j||^2`` with ``alpha`` from the teacher's
    features (:func:`locality_weights`, no gradient), so the student keeps the teacher's neighbourhoods.

    The widths of the two features may differ (only distances within each space are used) and no
    parameter is added. The gradient flows into ``student_features`` only.

    ``scale_invariant`` (the harness's choice): the student's squared distances are divided by their batch
    mean over the pairs i != j (with gradient), so the loss is a ratio, "neighbours close *relative to the
    batch's spread*", as Locality Preserving Projections (He & Niyogi 2003) constrains the embedding's scale
    to rule out the trivial solution. Without it (``False``, the formula as written) the loss is minimised by
    shrinking every feature to 0, and at weight 1 it does that: a LeNet-5-half student on digits stayed at
    chance (10%) because its post-ReLU penultimate features died.
    """
    alpha = locality_weights(teacher_features, k, sigma)
    d_s = squared_distances(student_features.float())
    m = student_features.shape[0]
    if scale_invariant and m > 1:
        d_s = d_s / (d_s.sum() / (m * (m - 1))).clamp_min(1e-12)  # the diagonal is 0
    return (alpha * d_s).sum() / m

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
