"""Co-evolution of the two CycleGAN generators' filter masks (Shu et al., ICCV 2019, arXiv 1907.10804).

Each generator's filters are a binary individual; the A->B and B->A generators are two populations evolved
together. The mechanics follow the official code (huawei-noah/Efficient-Computing, Pruning/GAN-Pruning,
search.py and GA.py), whose genetic operators are the ones :mod:`bench.evolution` already implements
(elitism, then selection / crossover / mutation events with probabilities 0.2 / 0.7 / 0.1, roulette,
one-segment crossover and mutation); they are imported from there, not copied.

- Fitness of an A->B individual p (search.py ``caculate_fitness``), on ``n_images`` validation images x of A:
  ``fitness_scale / sum_x [ MSE(D_B(G_AB^p(x)), D_B(G_AB(x))) + lambda_cycle * L1(G_BA^best(G_AB^p(x)), x) ]
  + prune_weight * (filters removed)``, with the original (frozen) discriminator D_B and generator G_AB, and
  G_BA^best the other population's current best individual; B->A symmetrically. In the first generation
  (``caculate_fitness_for_first_time``) there is no best partner yet and the cycle term is left out.
- Order per generation (search.py): the A->B population is renewed and scored against the B->A best, its
  new best is taken, then the B->A population is renewed and scored against that new A->B best. Every
  individual is scored again each generation (its partner changed), the elite included.
- Fixed filter counts (harness choice, as ``pruned:evo``): every segment keeps exactly the count
  L1-norm pruning keeps at the ratio (the random initial masks and each crossover/mutation are repaired to
  it by :func:`bench.evolution.repair`), so co-evolution and L1 are compared at equal compression. The
  official code lets the count float (random 0/1 initial masks) and rewards pruning through the
  ``prune_weight`` term, which is a constant here.
- A mask is scored by pruning the generator physically (:func:`bench.translation.prune.prune`), which is
  exact. Queries: every image through a generator or a discriminator during the search is counted.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from bench.evolution import Segment, next_generation, random_population
from bench.translation.cyclegan import Discriminator, Generator
from bench.translation.prune import prune, segments


@dataclass
class CoevolutionSettings:
    population: int = 32  # official search.py
    generations: int = 50  # official search.py (max_generation)
    p_selection: float = 0.2  # official search.py (s1, s2, s3)
    p_crossover: float = 0.7
    p_mutation: float = 0.1
    fitness_scale: float = 500.0  # official search.py: 500 / loss
    lambda_cycle: float = 10.0  # official search.py (lamda_loss_cycle), the CycleGAN paper's lambda
    prune_weight: float = 0.001  # official search.py (lambda_prune) x filters removed: constant at fixed counts
    n_images: int = 32  # fitness images per domain (official: its whole validation split; harness choice)

    def validate(self) -> None:
        for name, least in (("population", 2), ("generations", 0), ("n_images", 1)):
            if getattr(self, name) < least:
                raise ValueError(f"co-evolution: {name} must be >= {least}, got {getattr(self, name)}")
        total = self.p_selection + self.p_crossover + self.p_mutation
        if min(self.p_selection, self.p_crossover, self.p_mutation) < 0 or abs(total - 1) > 1e-9:
            raise ValueError(f"co-evolution: the event probabilities must be >= 0 and sum to 1, got "
                             f"{self.p_selection}, {self.p_crossover}, {self.p_mutation}")


class Judge:
    """Scores masks of one generator (``g``, direction X->Y) against the frozen discriminator of Y and the
    partner generator (Y->X) for cycle consistency, on fixed images ``x`` of X. Counts its queries."""

    def __init__(self, g: Generator, d: Discriminator, x: torch.Tensor, segs: list[Segment],
                 settings: CoevolutionSettings):
        self.g, self.d, self.x, self.segs, self.settings = g.eval(), d.eval(), x, segs, settings
        self.queries = {"generator": 0, "discriminator": 0}
        with torch.no_grad():
            self.reference = d(g(x))  # the original discriminator's judgement of the original generator
        self._count(generator=x.shape[0], discriminator=x.shape[0])

    def _count(self, generator: int = 0, discriminator: int = 0) -> None:
        self.queries["generator"] += generator
        self.queries["discriminator"] += discriminator

    @torch.no_grad()
    def losses(self, population: torch.Tensor, partner: Generator | None) -> torch.Tensor:
        """Each individual's summed loss over the images (the denominator of its fitness)."""
        out = []
        for mask in population:
            fake = prune(self.g, mask, self.segs).eval()(self.x)
            judged = self.d(fake)
            loss = F.mse_loss(judged, self.reference, reduction="none").flatten(1).mean(1)
            self._count(generator=self.x.shape[0], discriminator=self.x.shape[0])
            if partner is not None:
                back = partner(fake)
                loss = loss + self.settings.lambda_cycle * (back - self.x).abs().flatten(1).mean(1)
                self._count(generator=self.x.shape[0])
            out.append(loss.sum().double())
        return torch.stack(out)

    def fitness(self, population: torch.Tensor, partner: Generator | None) -> torch.Tensor:
        removed = sum(s.channels - s.keep for s in self.segs)
        return self.settings.fitness_scale / self.losses(population, partner).clamp_min(1e-12) + \
            self.settings.prune_weight * removed


@dataclass
class CoevolutionResult:
    mask_ab: torch.Tensor
    mask_ba: torch.Tensor
    segments: list[Segment]
    history: dict
    seconds: float
    generator_queries: int
    discriminator_queries: int


def coevolve(g_ab: Generator, g_ba: Generator, d_a: Discriminator, d_b: Discriminator, x_a: torch.Tensor,
             x_b: torch.Tensor, ratio: float, seed: int, settings: CoevolutionSettings | None = None,
             gen: torch.Generator | None = None) -> CoevolutionResult:
    """Evolve the masks of both generators at ``ratio`` on images ``x_a``, ``x_b`` (in [-1, 1])."""
    settings = settings or CoevolutionSettings()
    settings.validate()
    started = time.perf_counter()
    gen = gen if gen is not None else torch.Generator().manual_seed(seed)
    segs = segments(g_ab, ratio)
    if segments(g_ba, ratio) != segs:
        raise ValueError("co-evolution: the two generators must have the same widths")
    judge_ab = Judge(g_ab, d_b, x_a, segs, settings)  # A->B judged by D_B, cycled back through a B->A mask
    judge_ba = Judge(g_ba, d_a, x_b, segs, settings)
    pop_ab = random_population(settings.population, segs, gen)
    pop_ba = random_population(settings.population, segs, gen)
    fit_ab = judge_ab.fitness(pop_ab, None)  # first generation: no partner yet (search.py)
    fit_ba = judge_ba.fitness(pop_ba, None)
    best_ab, best_ba = pop_ab[int(fit_ab.argmax())], pop_ba[int(fit_ba.argmax())]
    history = {"best_fitness_ab": [float(fit_ab.max())], "best_fitness_ba": [float(fit_ba.max())],
               "mean_fitness_ab": [float(fit_ab.mean())], "mean_fitness_ba": [float(fit_ba.mean())]}
    for _ in range(settings.generations):
        pop_ab = next_generation(pop_ab, fit_ab, segs, settings, gen)
        fit_ab = judge_ab.fitness(pop_ab, prune(g_ba, best_ba, segs).eval())
        best_ab = pop_ab[int(fit_ab.argmax())]
        pop_ba = next_generation(pop_ba, fit_ba, segs, settings, gen)
        fit_ba = judge_ba.fitness(pop_ba, prune(g_ab, best_ab, segs).eval())
        best_ba = pop_ba[int(fit_ba.argmax())]
        for key, value in (("best_fitness_ab", fit_ab.max()), ("best_fitness_ba", fit_ba.max()),
                           ("mean_fitness_ab", fit_ab.mean()), ("mean_fitness_ba", fit_ba.mean())):
            history[key].append(float(value))
    return CoevolutionResult(best_ab.clone(), best_ba.clone(), segs, history, time.perf_counter() - started,
                             judge_ab.queries["generator"] + judge_ba.queries["generator"],
                             judge_ab.queries["discriminator"] + judge_ba.queries["discriminator"])
