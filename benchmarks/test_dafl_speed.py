"""DAFL iterations per second: generator + ONE teacher forward + student, as methods/dafl.py runs them.

Each case times :func:`methods.dafl.dafl_step` (the exact function ``DAFL.distill`` calls) with the
models, optimisers and memory format ``distill`` sets up, on the preset's config with the case's
batch size and generator width. Cases (issue 3):

  lenet5 -> lenet5_half, 1x32x32, batch 512, generator width 128   (paper MNIST setting)
  lenet5 -> lenet5_half, 1x32x32, batch 256, generator width 32    (a cheaper setting)
  lenet5 -> lenet5_half, 1x32x32, batch 128, generator width 64    (bench/grids/quick.yaml's dafl entry)
  resnet34 -> resnet18,  3x32x32, batch 256, generator width 128   (CIFAR pair; latent 1000)

Run:  python -m pytest benchmarks/test_dafl_speed.py --benchmark-enable
The project's addopts has ``--benchmark-disable``: then each case runs a single step at batch <= 64 as a
plain test (seconds).

Environment:
  DFKD_BENCH_DEVICE   cpu | cuda (default: cuda when available, else cpu)
  DFKD_BENCH_RESNET   1: run the resnet case on CPU too (a step takes tens of seconds on 2 cores;
                      on CUDA it always runs)
  DFKD_BENCH_ROUNDS   timed rounds per case (default 5 on CPU, 20 on CUDA); each round is
                      DFKD_BENCH_STEPS steps (default 1 on CPU, 10 on CUDA), after one warm-up round
  DFKD_BENCH_AMP      1: bf16 autocast, where the device computes bf16 natively (what a grid's ``amp: true``
                      does: CUDA, or a CPU with AVX512-BF16/AMX); elsewhere the case is skipped
"""
from __future__ import annotations

import contextlib

import pytest
import torch

from bench.method import CountingTeacher, get_method, native_bf16
from bench.models import create_model
from bench.training import make_optimizer
from benchmarks.settings import AMP, DEVICE, ON_CUDA, RESNET, env_int
from methods.dafl import dafl_step
from methods.generator import DAFLGenerator

ROUNDS = env_int("DFKD_BENCH_ROUNDS", 20 if ON_CUDA else 5)
STEPS = env_int("DFKD_BENCH_STEPS", 10 if ON_CUDA else 1)

CASES = [
    # id, teacher, student, dataset whose preset is used, channels, batch, generator width
    pytest.param("lenet5", "lenet5_half", "mnist", 1, 512, 128, id="lenet5-b512-w128"),
    pytest.param("lenet5", "lenet5_half", "mnist", 1, 256, 32, id="lenet5-b256-w32"),
    pytest.param("lenet5", "lenet5_half", "mnist", 1, 128, 64, id="lenet5-b128-w64"),
    pytest.param("resnet34", "resnet18", "cifar10", 3, 256, 128, id="resnet34-resnet18-b256-w128",
                 marks=pytest.mark.skipif(not RESNET, reason="set DFKD_BENCH_RESNET=1 (slow on CPU) or use CUDA")),
]


def _sync() -> None:
    if ON_CUDA:
        torch.cuda.synchronize(DEVICE)


@pytest.mark.parametrize("teacher_arch, student_arch, dataset, channels, batch_size, width", CASES)
def test_dafl_iterations_per_second(benchmark, capsys, teacher_arch, student_arch, dataset, channels, batch_size,
                                    width):
    if AMP and not native_bf16(DEVICE):
        pytest.skip(f"DFKD_BENCH_AMP=1 but {DEVICE} has no native bf16 (a grid's amp would do nothing here)")
    if benchmark.disabled:  # a plain test run: one step at a small batch checks the code path in seconds
        batch_size = min(batch_size, 64)
    dafl = get_method("dafl")
    _, cfg = dafl.resolve_config(dataset, overrides={"batch_size": batch_size, "gen_width": width})
    torch.manual_seed(0)
    # Set up as DAFL.distill does (random weights: the speed does not depend on them).
    teacher = CountingTeacher(create_model(teacher_arch, 10, channels, 32).to(DEVICE))
    student = create_model(student_arch, 10, channels, 32).to(DEVICE).train()
    generator = DAFLGenerator(cfg.latent_dim, 32, channels, cfg.gen_width).to(DEVICE)
    if cfg.channels_last:
        generator = generator.to(memory_format=torch.channels_last)
        student = student.to(memory_format=torch.channels_last)
    opt_g = torch.optim.Adam(generator.parameters(), lr=cfg.lr_G)
    opt_s = make_optimizer(student.parameters(), cfg)
    autocast = (lambda: torch.autocast(DEVICE.type, dtype=torch.bfloat16)) if AMP else contextlib.nullcontext
    last = {}

    def steps(n: int) -> None:
        for _ in range(n):
            z = torch.randn(cfg.batch_size, cfg.latent_dim, device=DEVICE)
            _, _, last["losses"] = dafl_step(generator, teacher, student, opt_g, opt_s, z, oh=cfg.oh, a=cfg.a,
                                             ie=cfg.ie, autocast=autocast)
        _sync()

    if benchmark.disabled:
        benchmark(steps, 1)  # a plain test: one step
        assert teacher.queries == batch_size  # one teacher forward per step
    else:
        benchmark.pedantic(steps, args=(STEPS,), rounds=ROUNDS, warmup_rounds=1, iterations=1)
        mean, median = benchmark.stats.stats.mean, benchmark.stats.stats.median
        it_s = STEPS / median
        benchmark.extra_info.update(iterations_per_s=round(it_s, 3), steps_per_round=STEPS, batch_size=batch_size,
                                    gen_width=width, device=str(DEVICE), amp=AMP, threads=torch.get_num_threads())
        with capsys.disabled():
            print(f"\nDAFL {teacher_arch} -> {student_arch}, batch {batch_size}, generator width {width}, "
                  f"{DEVICE}{' bf16' if AMP else ''}, {torch.get_num_threads()} threads: "
                  f"{it_s:.3g} it/s (median of {ROUNDS} rounds x {STEPS} steps; mean {STEPS / mean:.3g} it/s), "
                  f"{it_s * batch_size:.0f} generated images/s")
        assert teacher.queries == (ROUNDS + 1) * STEPS * batch_size
    assert all(torch.isfinite(v).all() for v in last["losses"].values())
