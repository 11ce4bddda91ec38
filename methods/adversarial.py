"""Shared pieces of the adversarial-generator methods (``zskt``, ``dfad``, ``dfq``).

In these methods a generator and the student play a min-max game on a disagreement D(T(x), S(x)):
the generator maximises it on x = G(z) (it looks for images where the student is still wrong), the
student minimises it on the generator's images. Each method file defines its losses and its step as plain
functions; this module holds what they share:

- the disagreements: :func:`logit_kl` (ZSKT, DFQ) and :func:`logit_l1` (DFAD);
- :func:`class_balance_loss` (DFQ's balance term, natural log, as in zju-vipa/DataFree);
- :func:`optimizer_step`: one update of one model's parameters (gradients reach only those
  parameters; optional gradient-norm clip), without host synchronisation;
- :func:`make_scheduler`: the learning-rate schedules the papers use, by name;
- :class:`BatchCache`: a batch kept across several student steps (ZSKT), checkpointable with ``ctx.track``;
- :func:`sample_std` and :func:`class_entropy` (collapse indicators: in pixels, in the teacher's classes)
  and :func:`save_samples` (``samples.png``).

Speed (benchmarks/test_adversarial_speed.py, the ``cpu`` presets, lenet5_bn -> lenet5_half, on the shared
2-core AMD EPYC, one thread, student steps per second): channels_last for generator and student against the
default layout: ZSKT 30.5 vs 25.0, DFAD 25.7 vs 18.5, DFQ 14.8 vs 8.6 (x1.2-1.7), so the methods train in
it. bf16 autocast (``ctx.autocast()``: on where a grid sets ``amp: true`` and the CPU has native bf16) gives
another x1.4-1.5 (43.1, 38.7, 21.1), but at equal steps it lost accuracy on Fashion-MNIST (ZSKT 45 vs 53 %,
DFQ 62 vs 66 %, DFAD 34 vs 36 %, one seed), so the proposed grid entries leave it off.
"""
from __future__ import annotations

import math
from typing import Iterable, Literal

import torch
import torch.nn.functional as F

from methods.dafl import information_entropy_loss
from methods.generator import save_image_grid


def logit_kl(s_logits: torch.Tensor, t_logits: torch.Tensor, temperature: float = 1.0,
             reduction: Literal["batchmean", "mean"] = "batchmean") -> torch.Tensor:
    """``T^2 * KL(softmax(t/T) || softmax(s/T))``.

    ``reduction="batchmean"``: summed over classes, averaged over the batch (DataFree's ``kldiv``, Hinton
    KD). ``"mean"``: averaged over batch *and* classes, i.e. batchmean / K (ZSKT's ``F.kl_div`` with the
    old default ``reduction='mean'``). Gradients flow into both arguments: detach ``t_logits`` for a student
    loss, keep it attached for a generator loss.
    """
    log_s = F.log_softmax(s_logits / temperature, dim=1)
    log_t = F.log_softmax(t_logits / temperature, dim=1)
    kl = (log_t.exp() * (log_t - log_s)).sum() * temperature**2
    if reduction == "batchmean":
        return kl / s_logits.shape[0]
    if reduction == "mean":
        return kl / s_logits.numel()
    raise ValueError(f"reduction must be 'batchmean' or 'mean', got {reduction!r}")


def logit_l1(s_logits: torch.Tensor, t_logits: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference of the logits over batch and classes (DFAD's ``F.l1_loss``)."""
    return (s_logits - t_logits).abs().mean()


def class_balance_loss(t_logits: torch.Tensor) -> torch.Tensor:
    """``sum_k pbar_k ln pbar_k``, pbar = batch mean of softmax(T(x)); minimum -ln K (a class-balanced batch).

    DataFree's ``loss_balance`` (natural log; DAFL's information entropy is the same in log10)."""
    return information_entropy_loss(t_logits) * math.log(10.0)


def optimizer_step(optimizer: torch.optim.Optimizer, loss: torch.Tensor, params: Iterable[torch.nn.Parameter],
                   clip: float = 0.0) -> None:
    """Zero, back-propagate ``loss`` into ``params`` only, clip their gradient norm (if ``clip`` > 0), step.

    ``backward(inputs=params)`` leaves the other model's gradients alone (the student's in a generator
    step, the generator's in a student step). ``clip_grad_norm_`` computes on the device: no sync."""
    params = list(params)
    optimizer.zero_grad(set_to_none=True)
    loss.backward(inputs=params)
    if clip > 0:
        torch.nn.utils.clip_grad_norm_(params, clip)
    optimizer.step()


def make_scheduler(optimizer: torch.optim.Optimizer, kind: Literal["constant", "cosine", "multistep"], total: int,
                   milestones: Iterable[int] = (), gamma: float = 0.1) -> torch.optim.lr_scheduler.LRScheduler:
    """``cosine``: from the initial lr to 0 over ``total`` scheduler steps (``CosineAnnealingLR``);
    ``multistep``: x ``gamma`` at each of ``milestones``; ``constant``: the initial lr throughout."""
    if kind == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, total))
    if kind == "multistep":
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, sorted(milestones), gamma=gamma)
    if kind == "constant":
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, [], gamma=1.0)
    raise ValueError(f"unknown schedule {kind!r}; valid: constant, cosine, multistep")


class BatchCache:
    """Tensors reused by several student steps (e.g. ZSKT's pseudo batch and its teacher outputs).

    ``ctx.track(batch=cache)`` checkpoints them, so that a cell resumed in the middle of a round trains on
    the same batch as the uninterrupted run."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.tensors: dict[str, torch.Tensor | list[torch.Tensor]] = {}

    def put(self, **tensors: torch.Tensor | list[torch.Tensor]) -> None:
        self.tensors = dict(tensors)

    def __getitem__(self, name: str):
        return self.tensors[name]

    def __bool__(self) -> bool:
        return bool(self.tensors)

    def state_dict(self) -> dict:
        def cpu(v):
            return [t.detach().cpu() for t in v] if isinstance(v, list) else v.detach().cpu()

        return {"tensors": {k: cpu(v) for k, v in self.tensors.items()}}

    def load_state_dict(self, state: dict) -> None:
        def dev(v):
            return [t.to(self.device) for t in v] if isinstance(v, list) else v.to(self.device)

        self.tensors = {k: dev(v) for k, v in state["tensors"].items()}


def sample_std(x: torch.Tensor) -> torch.Tensor:
    """Per-pixel standard deviation across the batch, averaged over pixels: ~0 when the generator has
    collapsed to one image (the generated images are normalised to ~unit variance per channel otherwise)."""
    return x.detach().float().std(dim=0).mean()


def class_entropy(t_logits: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of the batch-mean teacher prediction: ln K for a class-balanced batch, ~0 when the
    teacher sees one class in every generated image (a generator collapsed onto a class)."""
    return -class_balance_loss(t_logits.detach().float())


def save_samples(ctx, x: torch.Tensor, t_logits: torch.Tensor, n: int, method: str) -> None:
    """The first ``n`` images of the last batch, titled with the teacher's class, as ``samples.png`` in the cell."""
    if n <= 0:
        return
    n = min(n, x.shape[0])
    labels = t_logits[:n].argmax(dim=1).tolist()
    ctx.out_dir.mkdir(parents=True, exist_ok=True)
    save_image_grid(x[:n], ctx.out_dir / "samples.png", ctx.info.mean, ctx.info.std,
                    titles=[f"T: {k}" for k in labels],
                    title=f"{method} samples, last batch ({ctx.info.name}; teacher's class)")
