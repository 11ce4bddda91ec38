"""Shared pieces of the black-box generator methods (``dfme``, ``dfme_hl``): a teacher behind an API.

These methods see the teacher's scores (``outputs``) or its top-1 class (``labels``) and nothing else,
so the generator cannot back-propagate through the teacher:

- :class:`DFMEGenerator`: DFME's ``GeneratorA`` (cake-lab/datafree-model-extraction, network/gan.py):
  DAFL's layout with torch's default BatchNorm eps, the affine-free output BatchNorm *before* the
  Tanh, and the pre-activation image available (``pre_activation=True``) for the zeroth-order estimate;
- :func:`corrected_log_probs`: DFME's logit estimate from an API's scores (``no_logits=1``,
  ``logit_correction='mean'``): log-softmax, centred per image;
- :func:`forward_difference_gradient`: the forward-difference gradient estimate on random unit
  directions (DFME's ``estimate_gradient_objective``), generic over a per-sample loss;
- :func:`milestones_at`: DFME's learning-rate steps, given as fractions of the run;
- :class:`DFMEConfig` and the presets of the official scripts (see :mod:`methods.dfme`), and
  :func:`dfme_game` (generator, optimisers, schedules and the length of the run), which the hard-label
  variant shares.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
import torch.nn.functional as F

from bench.config import ConfigError
from bench.method import MethodConfig
from bench.search_space import Choice, Float, Int
from methods.adversarial import make_scheduler
from methods.generator import DAFLGenerator


class DFMEGenerator(DAFLGenerator):
    """DFME's generator: ``z -> Linear -> BN -> Up -> Conv -> BN -> LReLU -> Up -> Conv -> BN -> LReLU ->
    Conv -> BatchNorm(C, affine=False) [-> Tanh]``; ``width`` is ``ngf * 2`` (the paper's ngf 64: 128).
    ``forward(z, pre_activation=True)`` returns the image before the Tanh, where DFME perturbs it."""

    def __init__(self, latent_dim: int = 256, image_size: int = 32, channels: int = 3, width: int = 128):
        super().__init__(latent_dim, image_size, channels, width, bn_eps=1e-5, tanh=False)  # train mode throughout

    def forward(self, z: torch.Tensor, pre_activation: bool = False) -> torch.Tensor:
        out = super().forward(z)  # ... -> conv3 -> affine-free BatchNorm (tanh=False: no Tanh before it)
        return out if pre_activation else torch.tanh(out)


def corrected_log_probs(log_probs: torch.Tensor) -> torch.Tensor:
    """DFME's stand-in for the teacher's logits from its probabilities: ``log p - mean_k log p`` per image
    (train.py ``no_logits=1``, ``logit_correction='mean'``); equal to the logits minus their mean."""
    return log_probs - log_probs.mean(dim=1, keepdim=True)


@torch.no_grad()
def forward_difference_gradient(per_sample_loss: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, *,
                                directions: int, epsilon: float,
                                activation: Callable[[torch.Tensor], torch.Tensor] = torch.tanh
                                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Zeroth-order estimate of d loss / d x for each sample of ``x`` (N, ...), from forward evaluations only.

    For m = ``directions`` random unit vectors u_j (uniform on the sphere of dimension d = x[0].numel()):
    ``g = d / m * sum_j (f(x + eps u_j) - f(x)) / eps * u_j`` with f = ``per_sample_loss(activation(.))``,
    evaluated on the N * (m + 1) points at once (DFME's ``estimate_gradient_objective`` with
    ``forward_differences=1``). ``per_sample_loss`` maps (P, ...) points to (P,) losses. Returns the
    estimate shaped like ``x`` and the mean loss at the unperturbed points."""
    n, shape = x.shape[0], x.shape[1:]
    dim = x[0].numel()
    u = torch.randn(n, directions, dim, device=x.device)
    u = u / u.norm(dim=2, keepdim=True)
    u = torch.cat([u, torch.zeros(n, 1, dim, device=x.device)], dim=1)  # the last point is x itself
    points = (x.detach().reshape(n, 1, dim) + epsilon * u).reshape(n * (directions + 1), *shape)
    values = per_sample_loss(activation(points)).reshape(n, directions + 1)
    differences = values[:, :directions] - values[:, directions:]
    grad = (dim / epsilon) * (differences.unsqueeze(-1) * u[:, :directions]).mean(dim=1)
    return grad.reshape_as(x), values[:, directions].mean()


def milestones_at(fractions: Iterable[float], total: int) -> list[int]:
    """DFME's ``--steps`` (fractions of the run at which the learning rates are scaled) as step numbers."""
    return sorted({max(1, int(f * total)) for f in fractions})


def l1_disagreement(s_logits: torch.Tensor, t_estimate: torch.Tensor) -> torch.Tensor:
    """Per-sample mean |S(x) - T(x)| over classes (DFME's l1 loss with ``reduction='none'`` then mean)."""
    return (s_logits.float() - t_estimate.float()).abs().mean(dim=1)


def hard_label_loss(s_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the student on the teacher's top-1 classes."""
    return F.cross_entropy(s_logits.float(), labels)


DFME_PRESETS = {
    # run_cifar_dfme.sh: --grad_m 1 --query_budget 20 --lr_G 5e-4 --loss l1 (steps: train.py's default)
    "cifar10": dict(query_budget=20_000_000, lr_G=5e-4, steps=[0.1, 0.3, 0.5]),
    # run_svhn_dfme.sh: --grad_m 1 --query_budget 2 --lr_G 5e-5 --loss l1 --steps 0.5 0.8
    "svhn": dict(query_budget=2_000_000, lr_G=5e-5, steps=[0.5, 0.8]),
    # the SVHN script's settings for the grey 32-px family, generator width 32 and 10M queries (see above)
    "grey32": dict(query_budget=10_000_000, lr_G=5e-5, steps=[0.5, 0.8], gen_width=16),
}
DFME_PRESET_FOR_DATASET = {"cifar10": "cifar10", "cifar100": "cifar10", "svhn": "svhn", "mnist": "grey32",
                      "fashion_mnist": "grey32", "mnist_5k": "grey32", "digits": "grey32"}
# the equal-tuning search space of dfme and dfme_hl (bench tune; docs/tuning.md): the fields the paper says matter,
# in ranges around the official values for the grey sets, which must lie inside (bench.search_space.check_space)
DFME_SPACE = {
    "lr_S": Float(1e-3, 0.3, log=True),
    "lr_G": Float(1e-5, 1e-3, log=True),
    "batch_size": Choice(64, 128, 256),
    "gen_width": Choice(8, 16, 32),
    "d_iter": Int(1, 10),
    "grad_epsilon": Float(1e-4, 1e-2, log=True),
}


@dataclass
class DFMEConfig(MethodConfig):
    # dfme/train.py defaults
    query_budget: int = 20_000_000  # --query_budget (in millions there); scaled by the grid's budget fraction
    batch_size: int = 256
    g_iter: int = 1  # generator steps per round
    d_iter: int = 5  # student steps per round
    lr_S: float = 0.1  # SGD, momentum 0.9
    momentum: float = 0.9
    weight_decay: float = 5e-4
    lr_G: float = 1e-4  # Adam (default betas); the scripts pass 5e-4 (CIFAR-10) or 5e-5 (SVHN)
    latent_dim: int = 256  # nz
    gen_width: int = 128  # ngf * 2 (ngf 64)
    steps: list[float] = field(default_factory=lambda: [0.1, 0.3, 0.5])  # fractions of the run: lr *= scale
    scale: float = 0.3
    grad_m: int = 1  # random directions of the forward-difference estimate
    grad_epsilon: float = 1e-3
    epoch_itrs: int = 50  # rounds per "epoch": the official code tests (and keeps the best) once per epoch
    # engineering
    log_every: int = 50
    samples: int = 64  # generated images saved to samples.png (0: none)
    channels_last: bool = True

    def validate(self) -> None:
        super().validate()
        for name in ("query_budget", "batch_size", "g_iter", "d_iter", "lr_S", "lr_G", "latent_dim", "grad_m",
                     "grad_epsilon", "epoch_itrs", "log_every", "scale"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)!r}")
        if self.gen_width < 2 or self.gen_width % 2:
            raise ConfigError(f"gen_width must be an even integer >= 2, got {self.gen_width}")
        if any(not 0 < f < 1 for f in self.steps):
            raise ConfigError(f"steps must be fractions of the run in (0, 1), got {self.steps}")
        if self.samples < 0:
            raise ConfigError(f"samples must be >= 0, got {self.samples}")

    @property
    def queries_per_round(self) -> int:
        """Teacher queries of one round: ``batch x (g_iter x (grad_m + 1) + d_iter)`` (train.py)."""
        return self.batch_size * (self.g_iter * (self.grad_m + 1) + self.d_iter)


@dataclass
class DFMEGame:
    """The state DFME's round loop trains (see :func:`dfme_game`); ``total`` is the run's student steps."""

    generator: DFMEGenerator
    student: torch.nn.Module
    opt_s: torch.optim.Optimizer
    opt_g: torch.optim.Optimizer
    sched_s: torch.optim.lr_scheduler.LRScheduler
    sched_g: torch.optim.lr_scheduler.LRScheduler
    total: int

    def opens_round(self, step: int, d_iter: int) -> bool:
        """Whether student step ``step`` (1-based) is the first of a round: the generator's turn comes first."""
        return (step - 1) % d_iter == 0


def dfme_game(cfg: DFMEConfig, ctx, student: torch.nn.Module) -> DFMEGame:
    """The run's length in student steps (``query_budget`` scaled by the grid, in rounds of
    ``cfg.queries_per_round`` queries, cut to the cell's caps), DFME's generator, the student's SGD and the
    generator's Adam with the ``steps`` milestones; everything tracked for in-cell checkpoints."""
    info, device = ctx.info, ctx.device
    rounds = max(1, ctx.scaled(cfg.query_budget) // cfg.queries_per_round)
    total = ctx.plan_steps(rounds * cfg.d_iter, queries_per_step=cfg.queries_per_round / cfg.d_iter)
    generator = DFMEGenerator(cfg.latent_dim, info.image_size, info.channels, cfg.gen_width).to(device)
    if cfg.channels_last:
        generator = generator.to(memory_format=torch.channels_last)
        student = student.to(memory_format=torch.channels_last)
    opt_s = torch.optim.SGD(student.parameters(), lr=cfg.lr_S, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    opt_g = torch.optim.Adam(generator.parameters(), lr=cfg.lr_G)
    sched_s = make_scheduler(opt_s, "multistep", total, milestones_at(cfg.steps, total), cfg.scale)
    sched_g = make_scheduler(opt_g, "multistep", total, milestones_at(cfg.steps, -(-total // cfg.d_iter)), cfg.scale)
    ctx.track(generator=generator, opt_g=opt_g, opt_s=opt_s, sched_g=sched_g, sched_s=sched_s)
    return DFMEGame(generator, student, opt_s, opt_g, sched_s, sched_g, total)
