"""Students pruned by an evolutionary search: ``pruned:evo:<ratio>[:synthetic][:<error>][:<setting>=<int>]``.

"Towards Evolutionary Compression", Wang, Xu, Xu, Xu, Tao, KDD 2018 (arXiv 1707.08005): every individual of
a population is a binary mask over the teacher's convolution filters, evolved by genetic operations; the
fittest individual is the compact network. Only the abstract could be read; the mechanics follow the same
group's released co-evolution code (huawei-noah/Efficient-Computing, Pruning/GAN-Pruning, for CycleGAN
generators, ICCV 2019, arXiv 1907.10804), as METHODS.md records. Every setting is a field of
:class:`EvoSettings`, named there as the paper's, the released code's, or the harness's choice.

- Genome: one bit per output channel of every prunable group (every Conv2d and hidden Linear, with the
  layers coupled to it, as torch-pruning's dependency graph groups them; never the classifier), segments in
  the model's layer order. Each segment keeps exactly the channel count ``pruned:l1:<ratio>`` keeps
  (torch-pruning's local rule: ``C - int(C * (1 - ratio))`` removed), so the evolved student has the L1
  student's architecture: exactly the requested filters removed, the same params and MACs (harness choice:
  the released code lets the count float and rewards pruning in the fitness).
- Initial population: random masks with those counts (released code: random masks); ``init="l1"`` makes one
  individual the L1-norm mask (not the default: the random start already beats L1, see below).
- Generation (released code): the best individual is copied unchanged (elitism); the rest are filled one
  event at a time, with probability 0.2 a roulette-selected copy, 0.7 a crossover of two roulette-selected
  parents (one random contiguous segment [i, j) of the genome swapped; both children kept while there is
  room), 0.1 a mutation of a roulette-selected parent (one random contiguous segment flipped). Crossover and
  mutation are followed by a repair that restores each segment's count, turning random surplus bits off or
  random missing bits on (harness choice, needed by the fixed counts). Roulette: textbook fitness-proportional
  sampling (the released code's "roulette" takes the fittest individual above a random probability threshold).
- Fitness (the released code's form, its frozen judge being the teacher): ``a / (error + eps) + lambda *
  (fraction of the teacher's MACs removed)`` on n images, without any training. With the counts fixed the
  MACs term is the same for every individual: it adds a constant that only flattens roulette probabilities,
  so lambda defaults to 0 (the released code: 500 / sum of MSEs + 0.001 * pruned filters). The error
  (:data:`ERRORS`, spec option ``pruned:evo:<ratio>:<error>``) defaults to ``prob_mse``, the MSE between the
  masked and the full teacher's softmax outputs (harness choice). METHODS.md's analogue, the MSE of the raw
  logits (``logit_mse``), mostly measures the logit *scale*, which pruning shrinks (Fashion-MNIST LeNet-5 at
  50%: mean |logit| 1.6 for the L1 student against 5.6 for the teacher): over 32 random masks and the L1
  mask its rank correlation with validation accuracy was 0.56, against 0.86 for ``prob_mse`` and 0.97 for
  top-1 ``disagreement``; evolved with it, the student before recovery reached 31.9% validation accuracy
  against L1's 49.4, ``prob_mse`` 59.7 and ``disagreement`` 60.5 (seed 0).
- Images: ``pruned:evo:<ratio>``: n = 500 real training images (FSKD's sample count; harness choice), a seeded
  draw from :attr:`StudentContext.real_images` (charged to ``SearchCost.real_samples``, so the cell's
  ``real_samples_used`` and data access say so). ``pruned:evo:<ratio>:synthetic``: data-free, n images
  inverted from the teacher (Gaussian start in the normalised input space, Adam on the cross-entropy to
  balanced target classes plus a small total-variation prior, pixels kept in range; harness choice).
- A mask is evaluated by zeroing the masked channels at every consumer's input (forward pre-hooks on a
  copy of the teacher) for many individuals at once (the images repeated per individual in one batch):
  exactly the pruned network's function, checked at the end against the physically pruned student.
  The released code's faults are avoided: the pruned filters are physically removed (torch-pruning), and
  every segment of the genome evolves (its masks did not advance past the first layer).

The search is reproducible from :attr:`StudentContext.seed` (one CPU ``torch.Generator``), cached like the
other pruned students (this module's source is part of the cache key), and its cost (seconds, teacher
queries: every image through the teacher or a masked copy, real samples) is the lineage's ``SearchCost``;
the fitness per generation is written to ``search.json`` in the student's cache folder.
"""
from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import nn

from bench.lineage import SearchCost, StudentContext
from bench.pruning import CRITERIA, Criterion, PruningError, _classifier, _out_channels, prune_channels
from bench.transforms import to_float


@dataclass(frozen=True)
class EvoSettings:
    population: int = 32  # released GAN-Pruning code (search.py)
    generations: int = 50  # released GAN-Pruning code
    p_selection: float = 0.2  # released code: probabilities of the three events filling a generation
    p_crossover: float = 0.7
    p_mutation: float = 0.1
    n_images: int = 500  # fitness images (harness choice: FSKD's 500 samples)
    fitness: str = "prob_mse"  # the error in a / (error + eps): a key of ERRORS (see the module docstring)
    init: str = "random"  # initial population: "random", or "l1" (one individual is the L1-norm mask)
    fitness_scale: float = 1.0  # a (released code: 500; the scale does not change roulette probabilities)
    eps: float = 1e-8  # keeps the fitness finite for a mask that reproduces the teacher exactly
    flops_weight: float = 0.0  # lambda on the fraction of MACs removed: constant with fixed counts (see above)
    eval_images: int = 4096  # images (individuals x fitness images) per masked forward: memory only
    synth_steps: int = 200  # synthetic option: Adam steps inverting the teacher (harness choice)
    synth_lr: float = 0.1
    synth_tv: float = 0.05  # weight of the mean squared neighbour difference (smoothness prior)

    def validate(self) -> None:
        for name, least in (("population", 2), ("generations", 0), ("n_images", 1), ("eval_images", 1)):
            if getattr(self, name) < least:
                raise ValueError(f"evolutionary search: {name} must be >= {least}, got {getattr(self, name)}")
        if self.fitness not in ERRORS or self.init not in ("random", "l1"):
            raise ValueError(f"evolutionary search: fitness {self.fitness!r} (valid: {', '.join(ERRORS)}), init {self.init!r} "
                             f"(valid: random, l1)")
        total = self.p_selection + self.p_crossover + self.p_mutation
        if min(self.p_selection, self.p_crossover, self.p_mutation) < 0 or abs(total - 1) > 1e-9:
            raise ValueError(f"evolutionary search: the event probabilities must be >= 0 and sum to 1, got "
                             f"{self.p_selection}, {self.p_crossover}, {self.p_mutation}")


SETTINGS = EvoSettings()
_CONSUMERS = (tp.prune_conv_in_channels, tp.prune_linear_in_channels)


@dataclass(frozen=True)
class Segment:
    """One prunable group: its root layer, channel count, how many channels it keeps, and where its channels
    enter the next layers (``taps``: consumer layer name, consumer input indices, matching root indices)."""

    name: str
    channels: int
    keep: int
    offset: int
    taps: tuple[tuple[str, torch.Tensor, torch.Tensor], ...]


def segments(teacher: nn.Module, ratio: float, example: torch.Tensor) -> list[Segment]:
    """The genome's layout for ``teacher`` at ``ratio``: one segment per prunable group, in layer order."""
    model = copy.deepcopy(teacher).eval().requires_grad_(True)
    names = {m: n for n, m in model.named_modules()}
    order = {n: i for i, n in enumerate(names.values())}
    found = []
    with torch.enable_grad():
        graph = tp.DependencyGraph().build_dependency(model, example_inputs=example)
        for group in graph.get_all_groups(ignored_layers=[_classifier(model, example)],
                                          root_module_types=(nn.Conv2d, nn.Linear)):
            root = group[0].dep.target.module
            taps = []
            for i, (dep, idxs) in enumerate(group):
                if dep.pruning_fn in _CONSUMERS and isinstance(dep.target.module, (nn.Conv2d, nn.Linear)):
                    taps.append((names[dep.target.module], torch.tensor([int(j) for j in idxs]),
                                 torch.tensor([int(j) for j in group[i].root_idxs])))
            channels = _out_channels(root)
            found.append((names[root], channels, channels - int(channels * (1 - ratio)), tuple(taps)))
    found.sort(key=lambda f: order[f[0]])
    out, offset = [], 0
    for name, channels, removed, taps in found:
        if not taps:
            raise PruningError(f"pruned:evo: the channels of {name!r} reach no Conv2d/Linear input; the masked "
                               f"evaluation cannot remove them")
        out.append(Segment(name, channels, channels - removed, offset, taps))
        offset += channels
    if not any(s.keep < s.channels for s in out):
        raise PruningError(f"pruned:evo:{ratio}: the ratio removes no channel of {type(teacher).__name__}")
    return out


# ---------------------------------------------------------------------------------------------
# genetic operators (population: a bool tensor, individuals x genome bits)


def repair(population: torch.Tensor, segs: list[Segment], gen: torch.Generator) -> torch.Tensor:
    """Each segment of each individual keeps exactly ``keep`` bits: surplus set bits are cleared and missing
    ones set at random (rows already right are unchanged)."""
    out = population.clone()
    for s in segs:
        bits = out[:, s.offset:s.offset + s.channels]
        score = bits.float() + 0.5 * torch.rand(bits.shape, generator=gen)  # set bits first, random order within
        top = score.topk(s.keep, dim=1).indices
        out[:, s.offset:s.offset + s.channels] = torch.zeros_like(bits).scatter_(1, top, True)
    return out


def random_population(size: int, segs: list[Segment], gen: torch.Generator) -> torch.Tensor:
    length = segs[-1].offset + segs[-1].channels
    return repair(torch.zeros(size, length, dtype=torch.bool), segs, gen)


def _span(length: int, gen: torch.Generator) -> tuple[int, int]:
    i, j = sorted(torch.randint(0, length + 1, (2,), generator=gen).tolist())
    return i, j


def crossover(a: torch.Tensor, b: torch.Tensor, segs: list[Segment], gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Swap one random contiguous segment [i, j) of two genomes, then repair the counts."""
    i, j = _span(a.numel(), gen)
    c, d = a.clone(), b.clone()
    c[i:j], d[i:j] = b[i:j], a[i:j]
    fixed = repair(torch.stack([c, d]), segs, gen)
    return fixed[0], fixed[1]


def mutate(a: torch.Tensor, segs: list[Segment], gen: torch.Generator) -> torch.Tensor:
    """Flip one random contiguous segment [i, j) of a genome, then repair the counts."""
    i, j = _span(a.numel(), gen)
    c = a.clone()
    c[i:j] = ~c[i:j]
    return repair(c[None], segs, gen)[0]


def roulette(fitness: torch.Tensor, gen: torch.Generator) -> int:
    """An index drawn with probability proportional to its (positive) fitness."""
    return int(torch.multinomial(fitness.double().clamp_min(0) + 1e-300, 1, generator=gen))


def next_generation(population: torch.Tensor, fitness: torch.Tensor, segs: list[Segment], settings: EvoSettings,
                    gen: torch.Generator) -> torch.Tensor:
    """The elite (row 0, unchanged) followed by selected copies, crossovers and mutations."""
    size = population.shape[0]
    children = [population[int(fitness.argmax())].clone()]
    while len(children) < size:
        event = float(torch.rand((), generator=gen))
        if event < settings.p_selection:
            children.append(population[roulette(fitness, gen)].clone())
        elif event < settings.p_selection + settings.p_crossover:
            c, d = crossover(population[roulette(fitness, gen)], population[roulette(fitness, gen)], segs, gen)
            children.extend([c, d][: size - len(children)])
        else:
            children.append(mutate(population[roulette(fitness, gen)], segs, gen))
    return torch.stack(children)


# ---------------------------------------------------------------------------------------------
# fitness: many masked teachers in one batched forward

# per-image error of masked logits z (individuals, images, classes) against the teacher's (images, classes)
ERRORS = {
    # the released code's form on the teacher's raw outputs: mean squared logit difference
    "logit_mse": lambda z, ref: (z - ref).square().mean(2),
    # the same on the output probabilities (insensitive to the shrinking logit scale of a pruned network)
    "prob_mse": lambda z, ref: (z.softmax(2) - ref.softmax(1)).square().mean(2),
    # top-1 disagreement with the teacher's prediction (no label is read)
    "disagreement": lambda z, ref: (z.argmax(2) != ref.argmax(1)).double(),
}


class MaskedTeacher:
    """A copy of the teacher whose consumer layers see the masked channels as zeros; one forward evaluates
    several individuals (the images are repeated once per individual). Counts every image it is given."""

    def __init__(self, teacher: nn.Module, segs: list[Segment]):
        # channels_last: 2.3x faster batched LeNet-5 forwards on one CPU core (measured)
        self.model = copy.deepcopy(teacher).eval().requires_grad_(False).to(memory_format=torch.channels_last)
        self.segs = segs
        self.queries = 0
        self._masks: dict[str, torch.Tensor] = {}
        self._individuals = 1
        consumers = sorted({name for s in segs for name, _, _ in s.taps})
        self._handles = [self.model.get_submodule(n).register_forward_pre_hook(self._hook(n)) for n in consumers]

    def _hook(self, name: str):
        def hook(module, args):
            mask = self._masks.get(name)
            if mask is None:
                return None
            x = args[0]
            p = self._individuals
            shaped = x.reshape(p, x.shape[0] // p, *x.shape[1:])
            m = mask.reshape(p, 1, mask.shape[1], *([1] * (x.dim() - 2))).to(x.dtype)
            return (shaped * m).reshape(x.shape),
        return hook

    def _set(self, population: torch.Tensor) -> None:
        device = next(self.model.parameters()).device
        self._individuals = population.shape[0]
        self._masks = {}
        for s in self.segs:
            for name, idxs, root_idxs in s.taps:
                layer = self.model.get_submodule(name)
                width = layer.in_channels if isinstance(layer, nn.Conv2d) else layer.in_features
                mask = self._masks.setdefault(name, torch.ones(population.shape[0], width, device=device))
                mask[:, idxs.to(device)] *= population[:, s.offset + root_idxs].to(device).float()

    @torch.no_grad()
    def logits(self, population: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """(individuals, images, classes) logits of the masked teachers on ``x``."""
        self._set(population)
        try:
            batch = x.repeat(population.shape[0], *([1] * (x.dim() - 1)))
            out = self.model(batch.contiguous(memory_format=torch.channels_last) if batch.dim() == 4 else batch)
        finally:
            self._masks = {}
        self.queries += population.shape[0] * x.shape[0]
        return out.reshape(population.shape[0], x.shape[0], -1)

    @torch.no_grad()
    def errors(self, population: torch.Tensor, x: torch.Tensor, reference: torch.Tensor, fitness: str,
               eval_images: int) -> torch.Tensor:
        """Every individual's error against ``reference`` (the teacher's logits on ``x``), per :data:`ERRORS`."""
        error = ERRORS[fitness]
        per_chunk_imgs = min(x.shape[0], eval_images)
        per_chunk_ind = max(1, eval_images // per_chunk_imgs)
        total = torch.zeros(population.shape[0], dtype=torch.float64, device=x.device)
        for p0 in range(0, population.shape[0], per_chunk_ind):
            pop = population[p0:p0 + per_chunk_ind]
            for i0 in range(0, x.shape[0], per_chunk_imgs):
                z = self.logits(pop, x[i0:i0 + per_chunk_imgs])
                total[p0:p0 + pop.shape[0]] += error(z, reference[i0:i0 + per_chunk_imgs]).double().sum(1)
        return (total / reference.shape[0]).cpu()

    def close(self) -> None:
        for h in self._handles:
            h.remove()


def removed_macs_fraction(teacher: nn.Module, segs: list[Segment], example: torch.Tensor) -> float:
    """Fraction of the teacher's MACs removed by any mask with the segments' counts (the same for all)."""
    from bench.metrics import count_flops  # lazy: metrics is not needed to build the genome

    shape = tuple(example.shape[1:])
    remove = {s.name: list(range(s.channels - s.keep)) for s in segs}
    pruned, _, _ = prune_channels(teacher, remove, example, "pruned:evo (MACs)")
    return 1.0 - count_flops(pruned, shape)[1] / count_flops(teacher, shape)[1]


# ---------------------------------------------------------------------------------------------
# fitness images


def invert_teacher(teacher: nn.Module, info, n: int, settings: EvoSettings, gen: torch.Generator,
                   device: torch.device) -> torch.Tensor:
    """n images synthesised from the teacher alone: Gaussian start in the normalised input space, Adam on
    ``CE(T(x), y) + synth_tv * TV(x)`` for balanced target classes y, pixels clamped to the valid range."""
    mean = torch.tensor(info.mean, device=device).view(1, -1, 1, 1)
    std = torch.tensor(info.std, device=device).view(1, -1, 1, 1)
    low, high = (0 - mean) / std, (1 - mean) / std
    x = torch.randn((n, info.channels, info.image_size, info.image_size), generator=gen).to(device)
    x = torch.max(torch.min(x, high), low).requires_grad_(True)
    y = (torch.arange(n) % info.num_classes).to(device)
    model = copy.deepcopy(teacher).eval().requires_grad_(False)
    opt = torch.optim.Adam([x], lr=settings.synth_lr)
    for _ in range(settings.synth_steps):
        tv = (x[:, :, 1:] - x[:, :, :-1]).square().mean() + (x[:, :, :, 1:] - x[:, :, :, :-1]).square().mean()
        loss = F.cross_entropy(model(x), y) + settings.synth_tv * tv
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            x.copy_(torch.max(torch.min(x, high), low))
    return x.detach()


# ---------------------------------------------------------------------------------------------
# the search


def l1_individual(teacher: nn.Module, segs: list[Segment]) -> torch.Tensor:
    """The mask ``pruned:l1`` would keep: per segment, the root layer's filters of largest L1 norm."""
    bits = []
    for s in segs:
        norms = teacher.get_submodule(s.name).weight.detach().flatten(1).abs().sum(1).cpu()
        keep = torch.zeros(s.channels, dtype=torch.bool)
        keep[norms.topk(s.keep).indices] = True
        bits.append(keep)
    return torch.cat(bits)


def evolve(teacher: nn.Module, ratio: float, example: torch.Tensor, images: torch.Tensor, seed: int,
           settings: EvoSettings = SETTINGS, gen: torch.Generator | None = None) -> tuple[list[Segment], torch.Tensor, dict]:
    """Evolve masks on normalised ``images``: ``(segments, best mask, history)``. The history holds the best
    and mean fitness and the best error per generation, and the teacher queries made."""
    settings.validate()
    gen = gen if gen is not None else torch.Generator().manual_seed(seed)
    segs = segments(teacher, ratio, example)
    masked = MaskedTeacher(teacher, segs)
    try:
        with torch.no_grad():
            reference = teacher.eval()(images)
        queries = images.shape[0]
        bonus = settings.flops_weight * removed_macs_fraction(teacher, segs, example) if settings.flops_weight else 0.0

        def evaluate(population: torch.Tensor) -> torch.Tensor:
            return masked.errors(population, images, reference, settings.fitness, settings.eval_images)

        population = random_population(settings.population, segs, gen)
        if settings.init == "l1":
            population[0] = l1_individual(teacher, segs)
        error = evaluate(population)
        fitness = settings.fitness_scale / (error + settings.eps) + bonus
        history = {"best_fitness": [float(fitness.max())], "mean_fitness": [float(fitness.mean())],
                   "best_error": [float(error.min())]}
        for _ in range(settings.generations):
            elite = int(fitness.argmax())
            population = next_generation(population, fitness, segs, settings, gen)
            error = torch.cat([error[elite:elite + 1], evaluate(population[1:])])  # the elite is not re-evaluated
            fitness = settings.fitness_scale / (error + settings.eps) + bonus
            history["best_fitness"].append(float(fitness.max()))
            history["mean_fitness"].append(float(fitness.mean()))
            history["best_error"].append(float(error.min()))
        history["teacher_queries"] = queries + masked.queries
        return segs, population[int(fitness.argmax())], history
    finally:
        masked.close()


def _check_equivalent(model: nn.Module, teacher: nn.Module, segs: list[Segment], best: torch.Tensor,
                      images: torch.Tensor, spec: str) -> int:
    """The physically pruned student computes what the masked teacher computed (returns the queries made)."""
    masked = MaskedTeacher(teacher, segs)
    try:
        x = images[:64]
        expected = masked.logits(best[None], x)[0]
        with torch.no_grad():
            got = model.eval()(x)
    finally:
        masked.close()
    scale = expected.abs().max().clamp_min(1.0)
    if not torch.allclose(got, expected, rtol=1e-4, atol=1e-4 * float(scale)):
        raise PruningError(f"{spec}: the pruned student differs from the masked teacher (max |diff| "
                           f"{float((got - expected).abs().max()):.3g}); the masked evaluation is not exact for "
                           f"{type(teacher).__name__}")
    return masked.queries


TUNABLE = ("population", "generations", "n_images", "synth_steps")  # settings a spec may override (integers)


def parse_option(option: str) -> tuple[bool, dict]:
    """The text after the ratio: ``:``-separated parts, each ``synthetic``, an error name (:data:`ERRORS`) or
    ``<setting>=<int>`` for a setting in :data:`TUNABLE`; returns (synthetic, settings overrides).
    ``"synthetic:generations=5"`` -> ``(True, {"generations": 5})``. Bad parts raise ValueError."""
    synthetic, overrides = False, {}
    valid = f"synthetic, {', '.join(ERRORS)}, or <setting>=<int> with setting one of {', '.join(TUNABLE)}"
    for part in option.split(":") if option else []:
        key, eq, value = part.partition("=")
        if part == "synthetic":
            synthetic = True
        elif part in ERRORS:
            overrides["fitness"] = part
        elif eq and key in TUNABLE and value.isdigit():
            overrides[key] = int(value)
        else:
            raise ValueError(f"unknown option {part!r}; each option after the ratio is {valid} "
                             f"(e.g. pruned:evo:0.5:synthetic:generations=10)")
    replace(SETTINGS, **overrides).validate()
    return synthetic, overrides


def _prune_evo(teacher, ratio, example, spec, ctx: StudentContext | None, option):
    settings = SETTINGS  # read at call time (tests shrink it)
    if ctx is None:
        raise PruningError(f"{spec}: the evolutionary search needs a StudentContext (its seed and fitness images)")
    synthetic, overrides = parse_option(option)
    settings = replace(settings, **overrides)
    started = time.perf_counter()
    device = example.device
    gen = torch.Generator().manual_seed(ctx.seed)
    real = 0
    synth_queries = 0
    if synthetic:
        images = invert_teacher(teacher, ctx.info, settings.n_images, settings, gen, device)
        synth_queries = settings.n_images * settings.synth_steps
    else:
        if ctx.real_images is None:
            raise PruningError(f"{spec}: the fitness reads real training images but this context has none; "
                               f"use pruned:evo:{ratio}:synthetic for a data-free search")
        images = to_float(ctx.real_images(settings.n_images).to(device), ctx.info)
        real = int(images.shape[0])
    segs, best, history = evolve(teacher, ratio, example, images, ctx.seed, settings, gen)
    remove = {s.name: [c for c in range(s.channels) if not bool(best[s.offset + c])] for s in segs}
    model, prune_history, kept = prune_channels(teacher, remove, example, spec)
    check_queries = _check_equivalent(model, teacher, segs, best, images, spec)
    cost = SearchCost(seconds=time.perf_counter() - started,
                      teacher_queries=synth_queries + history["teacher_queries"] + check_queries, real_samples=real)
    _write_search_log(ctx, spec, settings, history, cost)
    return model, prune_history, kept, cost


def _write_search_log(ctx: StudentContext, spec: str, settings: EvoSettings, history: dict, cost: SearchCost) -> None:
    from bench.pruning import _atomic_write, cache_folder

    record = {"spec": spec, "settings": asdict(settings), "seed": ctx.seed, "cost": asdict(cost), **history}
    _atomic_write(cache_folder(ctx, spec) / "search.json", lambda p: Path(p).write_text(json.dumps(record, indent=1)))


def _check_option(option: str) -> None:
    parse_option(option)


CRITERIA.register("evo")(Criterion(_prune_evo, check_option=_check_option, module=__name__, seeded=True))
