"""Student steps per second of the adversarial-generator methods (zskt, dfad, dfq), as their loops run them.

One timed unit is one round of the method's game, built from the step functions its ``distill`` calls
(methods/zskt.py, methods/dfad.py, methods/dfq.py) with the models, optimisers and memory format
``distill`` sets up: g_steps generator steps and kd_steps student steps (ZSKT: plus the round's one
teacher forward on the kept batch). The reported rate is student steps per second (kd_steps / round
time), the unit of the harness's step caps; generated images per second follow from the batch size.

Cases: lenet5_bn -> lenet5_half (1x32x32) with each method's ``mnist`` preset (the paper's MNIST setting,
the quick grid's ``paper`` track), and resnet34 -> resnet18 (3x32x32) with the ``cifar10`` preset.

Run:  python -m pytest benchmarks/test_adversarial_speed.py --benchmark-enable
The project's addopts has ``--benchmark-disable``: then each case runs a single round at batch <= 32 and
generator width <= 32 as a plain test (about a second).

Environment:
  DFKD_BENCH_DEVICE         cpu | cuda (default: cuda when available, else cpu)
  DFKD_BENCH_RESNET         1: run the resnet cases on CPU too (slow on 2 cores; on CUDA they always run)
  DFKD_BENCH_ROUNDS         timed rounds per case (default 5 on CPU, 20 on CUDA), after one warm-up round
  DFKD_BENCH_AMP            1: bf16 autocast where the device computes bf16 natively (else the case is skipped)
  DFKD_BENCH_CHANNELS_LAST  0: train in the default memory format instead of the config's channels_last
"""
from __future__ import annotations

import contextlib
import os

import pytest
import torch

from bench.method import CountingTeacher, get_method, native_bf16
from bench.models import create_model
from bench.training import make_optimizer
from benchmarks.settings import AMP, DEVICE, ON_CUDA, RESNET, env_int
from methods import dfad, dfq, zskt
from methods.attention import LayerOutputs, attention_layers
from methods.bn_stats import BNStatistics
from methods.generator import DAFLGenerator, ZSKTGenerator

ROUNDS = env_int("DFKD_BENCH_ROUNDS", 20 if ON_CUDA else 5)
CHANNELS_LAST = os.environ.get("DFKD_BENCH_CHANNELS_LAST") != "0"
_resnet = pytest.mark.skipif(not RESNET, reason="set DFKD_BENCH_RESNET=1 (slow on CPU) or use CUDA")

CASES = [
    # method, preset, teacher, student, channels
    pytest.param(m, p, "lenet5_bn", "lenet5_half", 1, id=f"{m}-{p}-lenet5_bn")
    for m in ("zskt", "dfad", "dfq") for p in ("mnist",)
] + [
    pytest.param(m, "cifar10", "resnet34", "resnet18", 3, id=f"{m}-cifar10-resnet34", marks=_resnet)
    for m in ("zskt", "dfad", "dfq")
]


def _sync() -> None:
    if ON_CUDA:
        torch.cuda.synchronize(DEVICE)


def _zskt_round(cfg, generator, teacher, student, autocast, z, out):
    opt_g = torch.optim.Adam(generator.parameters(), lr=cfg.lr_G)
    opt_s = torch.optim.Adam(student.parameters(), lr=cfg.lr)
    layers = attention_layers(teacher.module, cfg.at_layers)
    t_layers, s_layers = LayerOutputs(teacher.module, layers), LayerOutputs(student, layers)
    common = dict(temperature=cfg.temperature, reduction=cfg.kl_reduction, grad_clip=cfg.grad_clip, autocast=autocast)

    def round_() -> None:  # ZSKT.distill: g_steps on one z, the round's batch, kd_steps on it
        zz = z()
        for _ in range(cfg.g_steps):
            out["loss_g"] = zskt.generator_step(generator, teacher, student, opt_g, zz, **common)
        x, t_logits, t_maps = zskt.pseudo_batch(generator, teacher, zz, t_layers, autocast)
        for _ in range(cfg.kd_steps):
            out.update(zskt.student_step(student, opt_s, x, t_logits, t_maps, s_layers, at_beta=cfg.at_beta, **common))
    return round_


def _dfad_round(cfg, generator, teacher, student, autocast, z, out):
    opt_g = torch.optim.Adam(generator.parameters(), lr=cfg.lr_G)
    opt_s = make_optimizer(student.parameters(), cfg)

    def round_() -> None:  # DFAD.distill: kd_steps student steps, then g_steps, each on a fresh z
        for _ in range(cfg.kd_steps):
            out["loss_s"] = dfad.student_step(generator, teacher, student, opt_s, z(), autocast=autocast)[0]
        for _ in range(cfg.g_steps):
            out["loss_g"] = dfad.generator_step(generator, teacher, student, opt_g, z(), autocast=autocast)
    return round_


def _dfq_round(cfg, generator, teacher, student, autocast, z, out):
    opt_g = torch.optim.Adam(generator.parameters(), lr=cfg.lr_G, betas=(0.5, 0.999))
    opt_s = make_optimizer(student.parameters(), cfg)
    bn_stats = BNStatistics(teacher.module, method="dfq")
    weights = dict(bn=cfg.bn, oh=cfg.oh, adv=cfg.adv, balance=cfg.balance)

    def round_() -> None:  # DFQ.distill: g_steps, then kd_steps student steps, each on a fresh z
        for _ in range(cfg.g_steps):
            out.update(dfq.generator_step(generator, teacher, student, bn_stats, opt_g, z(), **weights,
                                          autocast=autocast))
        for _ in range(cfg.kd_steps):
            out["loss_s"] = dfq.student_step(generator, teacher, student, opt_s, z(), temperature=cfg.temperature,
                                             autocast=autocast)[0]
    return round_


# method: (generator class and its keyword arguments from the config, round builder)
GAMES = {
    "zskt": (lambda cfg: (ZSKTGenerator, {}), _zskt_round),
    "dfad": (lambda cfg: (DAFLGenerator, {"bn_eps": cfg.gen_bn_eps}), _dfad_round),
    "dfq": (lambda cfg: (DAFLGenerator, {"bn_eps": cfg.gen_bn_eps}), _dfq_round),
}


def _round_fn(method: str, cfg, teacher: CountingTeacher, student, channels: int, autocast):
    """One round of ``method``'s game, as its distill loop runs it (schedulers and logging aside)."""
    generator_for, build = GAMES[method]
    cls, kwargs = generator_for(cfg)
    generator = cls(cfg.latent_dim, 32, channels, cfg.gen_width, **kwargs).to(DEVICE)
    if cfg.channels_last and CHANNELS_LAST:
        generator = generator.to(memory_format=torch.channels_last)
        student = student.to(memory_format=torch.channels_last)
    out: dict[str, torch.Tensor] = {}
    z = lambda: torch.randn(cfg.batch_size, cfg.latent_dim, device=DEVICE)  # noqa: E731
    return build(cfg, generator, teacher, student, autocast, z, out), out


def _queries_per_round(method: str, cfg) -> int:
    """ZSKT: one teacher forward per generator step and one for the round's kept batch; DFAD, DFQ: one per step."""
    per_round = {"zskt": cfg.g_steps + 1, "dfad": cfg.kd_steps + cfg.g_steps, "dfq": cfg.kd_steps + cfg.g_steps}
    return per_round[method] * cfg.batch_size


@pytest.mark.parametrize("method, preset, teacher_arch, student_arch, channels", CASES)
def test_adversarial_student_steps_per_second(benchmark, capsys, method, preset, teacher_arch, student_arch, channels):
    if AMP and not native_bf16(DEVICE):
        pytest.skip(f"DFKD_BENCH_AMP=1 but {DEVICE} has no native bf16 (a grid's amp would do nothing here)")
    cls = get_method(method)
    _, cfg = cls.resolve_config("fashion_mnist", preset=preset)
    if benchmark.disabled:  # a plain test run: one round, small batch and generator: the code path in about a second
        _, cfg = cls.resolve_config("fashion_mnist", preset=preset, overrides={"batch_size": min(cfg.batch_size, 32),
                                                                               "gen_width": min(cfg.gen_width, 32)})
    torch.manual_seed(0)
    teacher = CountingTeacher(create_model(teacher_arch, 10, channels, 32).to(DEVICE))
    student = create_model(student_arch, 10, channels, 32).to(DEVICE).train()
    autocast = (lambda: torch.autocast(DEVICE.type, dtype=torch.bfloat16)) if AMP else contextlib.nullcontext
    round_, out = _round_fn(method, cfg, teacher, student, channels, autocast)

    def rounds(n: int) -> None:
        for _ in range(n):
            round_()
        _sync()

    if benchmark.disabled:
        benchmark(rounds, 1)
        assert teacher.queries == _queries_per_round(method, cfg)
    else:
        benchmark.pedantic(rounds, args=(1,), rounds=ROUNDS, warmup_rounds=1, iterations=1)
        median, mean = benchmark.stats.stats.median, benchmark.stats.stats.mean
        steps_s = cfg.kd_steps / median
        benchmark.extra_info.update(student_steps_per_s=round(steps_s, 3), batch_size=cfg.batch_size,
                                    gen_width=cfg.gen_width, kd_steps=cfg.kd_steps, g_steps=cfg.g_steps,
                                    device=str(DEVICE), amp=AMP, channels_last=cfg.channels_last and CHANNELS_LAST,
                                    threads=torch.get_num_threads())
        with capsys.disabled():
            print(f"\n{method} [{preset}] {teacher_arch} -> {student_arch}, batch {cfg.batch_size}, width "
                  f"{cfg.gen_width}, {cfg.g_steps} G : {cfg.kd_steps} S, {DEVICE}{' bf16' if AMP else ''}"
                  f"{'' if CHANNELS_LAST else ' contiguous'}, {torch.get_num_threads()} threads: "
                  f"{steps_s:.3g} student steps/s (median of {ROUNDS} rounds; mean {cfg.kd_steps / mean:.3g}), "
                  f"{steps_s * cfg.batch_size:.0f} student images/s")
        assert teacher.queries == (ROUNDS + 1) * _queries_per_round(method, cfg)
    assert all(torch.isfinite(v).all() for v in out.values())
