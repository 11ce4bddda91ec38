"""Evolutionary pruning: masked-teacher evaluations per second, as bench/evolution.py runs them.

Times :meth:`bench.evolution.MaskedTeacher.errors` (what every generation of ``pruned:evo`` calls) on a
LeNet-5 (random weights: the speed does not depend on them) for 31 individuals (a generation without its
elite) on 500 images, the default setting: one generation = 15,500 masked LeNet-5 forwards; a whole search
(32 + 50 x 31 individuals) is 51x that.

Run:  python -m pytest benchmarks/test_evolution_speed.py --benchmark-enable
The project's addopts has ``--benchmark-disable``: then it runs once on 4 individuals x 64 images as a plain
test (a second).
"""
from __future__ import annotations

import torch

from bench.evolution import SETTINGS, MaskedTeacher, random_population, segments
from bench.models import create_model


def test_masked_evaluations_per_second(benchmark, capsys):
    individuals, images = (31, SETTINGS.n_images) if not benchmark.disabled else (4, 64)
    torch.manual_seed(0)
    teacher = create_model("lenet5", 10, 1, 32).eval()
    segs = segments(teacher, 0.5, torch.zeros(1, 1, 32, 32))
    population = random_population(individuals, segs, torch.Generator().manual_seed(0))
    x = torch.randn(images, 1, 32, 32)
    with torch.no_grad():
        reference = teacher(x)
    masked = MaskedTeacher(teacher, segs)
    run = lambda: masked.errors(population, x, reference, SETTINGS.fitness, SETTINGS.eval_images)
    if benchmark.disabled:
        errors = benchmark(run)
    else:
        errors = benchmark.pedantic(run, rounds=5, warmup_rounds=1, iterations=1)
        per_s = individuals * images / benchmark.stats.stats.median
        benchmark.extra_info.update(masked_images_per_s=round(per_s), individuals=individuals, images=images)
        with capsys.disabled():
            print(f"\nmasked LeNet-5 evaluations: {per_s:.0f} images/s on {torch.get_num_threads()} thread(s); "
                  f"a default search (32 + 50 x 31 individuals x {images} images) ~ "
                  f"{(32 + 50 * 31) * images / per_s:.0f} s")
    masked.close()
    assert errors.shape == (individuals,) and torch.isfinite(errors).all() and (errors > 0).all()
    assert masked.queries == individuals * images * (1 if benchmark.disabled else 6)
