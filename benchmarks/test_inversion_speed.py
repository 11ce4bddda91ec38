"""Images synthesised per second by each model-inversion method (one synthesised batch, as distill makes it).

Each case builds the method's :class:`~methods.pool_kd.Synthesis` exactly as ``distill`` does (the
preset for the dataset, with the case's batch), on a randomly initialised ``lenet5_bn`` teacher and
``lenet5_half`` student at Fashion-MNIST's shape (1x32x32, its normalisation, no flips), and times one
call: ``synth_batch`` images from ``g_steps`` optimisation steps (ADI, CMI and Fast-DFKD also run the
student). The rate is ``synth_batch / seconds`` for the preset's ``g_steps``; the grid's KD steps are
not included (``methods/pool_kd.py``: they cost one teacher forward and one student step each).

Run:  python -m pytest benchmarks/test_inversion_speed.py --benchmark-enable
The project's addopts has ``--benchmark-disable``: then each case synthesises one batch of 16 images
with 2 steps as a plain test (about a second).

Environment:
  DFKD_BENCH_DEVICE   cpu | cuda (default: cuda when available, else cpu)
  DFKD_BENCH_ROUNDS   timed rounds per case (default 3 on CPU, 10 on CUDA), after one warm-up round
  DFKD_BENCH_BATCH    images per synthesised batch (default: the mnist preset's synth_batch)
"""
from __future__ import annotations

import pytest
import torch

from bench.data import DatasetInfo
from bench.method import CountingTeacher, DataAccess, DistillContext, get_method
from bench.models import create_model
from benchmarks.settings import DEVICE, ON_CUDA, env_int

ROUNDS = env_int("DFKD_BENCH_ROUNDS", 10 if ON_CUDA else 3)
BATCH = env_int("DFKD_BENCH_BATCH", 0)
FASHION = DatasetInfo("fashion_mnist", 10, 1, 32, (0.2860,), (0.3530,), 55000, "none", source="fashion_mnist")


def _sync() -> None:
    if ON_CUDA:
        torch.cuda.synchronize(DEVICE)


@pytest.mark.parametrize("name", ["deepinversion", "adi", "cmi", "fast_dfkd", "zskd"])
def test_images_synthesised_per_second(benchmark, capsys, tmp_path, name):
    cls = get_method(name)
    overrides = {"synth_batch": 16, "g_steps": 2} if benchmark.disabled else ({"synth_batch": BATCH} if BATCH else {})
    _, cfg = cls.resolve_config("fashion_mnist", overrides=overrides)
    method = cls(cfg)
    torch.manual_seed(0)
    teacher = CountingTeacher(create_model("lenet5_bn", 10, 1, 32).to(DEVICE))
    student = create_model("lenet5_half", 10, 1, 32).to(DEVICE).train()
    ctx = DistillContext(info=FASHION, data_access=DataAccess.NONE, device=DEVICE, seed=0, out_dir=tmp_path)
    synthesis = method.synthesis(teacher, student, ctx)
    last = {}

    def one_batch() -> None:
        last["batch"] = synthesis()
        _sync()

    try:
        if benchmark.disabled:  # a plain test: one small batch checks the code path
            benchmark(one_batch)
            rounds = 1
        else:
            benchmark.pedantic(one_batch, rounds=ROUNDS, warmup_rounds=1, iterations=1)
            rounds = ROUNDS + 1
            images_s = cfg.synth_batch / benchmark.stats.stats.median
            benchmark.extra_info.update(images_per_s=round(images_s, 2), synth_batch=cfg.synth_batch,
                                        g_steps=cfg.g_steps, device=str(DEVICE), threads=torch.get_num_threads())
            with capsys.disabled():
                print(f"\n{name}: {images_s:.3g} images/s ({cfg.synth_batch} images x {cfg.g_steps} steps a batch, "
                      f"median of {ROUNDS} batches; {DEVICE}, {torch.get_num_threads()} threads)")
    finally:
        synthesis.close()
    images, logits, stats = last["batch"]
    assert images.shape == (cfg.synth_batch, 1, 32, 32) and logits.shape == (cfg.synth_batch, 10)
    assert torch.isfinite(images).all() and all(torch.isfinite(v).all() for v in stats.values())
    assert teacher.queries == rounds * synthesis.queries  # every synthesis forward is a counted teacher query
