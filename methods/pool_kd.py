"""KD on a growing pool of synthesised images, interleaved with synthesis: DataFree's loop, shared.

The model-inversion methods (``deepinversion``, ``adi``, ``cmi``, ``fast_dfkd``, ``zskd``) differ in how
they synthesise a batch; they share how the student learns from it (zju-vipa/DataFree ``datafree_kd.py``):
every ``kd_steps`` student steps one batch of ``synth_batch`` images is synthesised into an
:class:`~methods.image_pool.ImagePool`; each student step draws ``batch_size`` images from the pool
(with the dataset's augmentation), queries the teacher on them and takes one optimiser step on
``T^2 * KL(softmax(z_t/T) || softmax(z_s/T))`` (``methods.losses.kd_loss``). The student's optimiser
follows DataFree (SGD, momentum 0.9, weight decay 1e-4, cosine) unless a method's preset says otherwise.
Deviation: KD batches are drawn uniformly with replacement from the pool (DataFree reshuffles a data
loader over the pool after every synthesis).

One student update per ``ctx.steps`` step, so compute caps, anytime curves and in-cell checkpoints work:
the pool, the optimiser, the scheduler, the last batch's teacher classes and the synthesis statistics
are tracked, and synthesis happens at the same steps after a resume. A compute cap may stop the method
inside a synthesis (a teacher query past the cap raises): ``samples.png`` is written in a ``finally``
block from tracked state, without querying the teacher.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from bench.config import ConfigError
from bench.method import DataAccess, Method, TeacherAccess
from bench.training import TrainConfig
from methods.generator import save_image_grid
from methods.image_pool import ImagePool
from methods.losses import kd_loss

Batch = tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]


class Synthesis:
    """One method's synthesis of a batch, set up once per run (hooks, generators, banks: its tracked state).

    Calling it returns ``(normalised images (B, C, H, W), the teacher's logits on them (B, K), named 0-dim
    statistics tensors)`` without synchronising with the device. ``stat_names`` are the statistics' keys,
    ``queries`` the teacher queries one batch costs; :meth:`close` removes hooks."""

    stat_names: tuple[str, ...] = ()
    queries: int = 0

    def __call__(self) -> Batch:
        raise NotImplementedError

    def close(self) -> None:
        pass


@dataclass
class PoolKDConfig(TrainConfig):
    """The student side shared by the inversion methods (DataFree's defaults); synthesis fields are per method.

    A nominal run is ``epochs x iters_per_epoch`` student steps (DataFree: 200 x 400), scaled by the grid's
    budget fraction; one batch is synthesised every ``kd_steps`` of them (DataFree: 400, i.e. one per epoch).
    """

    optimizer: Literal["sgd", "adam"] = "sgd"  # DataFree datafree_kd.py: SGD, momentum 0.9
    lr: float = 0.1  # DataFree scripts: --lr 0.1
    weight_decay: float = 1e-4  # DataFree: --wd default 1e-4
    batch_size: int = 256  # KD batch drawn from the pool (DataFree scripts: --batch_size 256)
    epochs: int = 200  # DataFree scripts: --epochs 200
    iters_per_epoch: int = 400  # DataFree: --ep_steps 400 student steps per epoch
    lr_schedule: Literal["cosine", "constant"] = "cosine"  # DataFree: CosineAnnealingLR over the run
    lr_min: float = 0.0  # cosine floor (Fast-DFKD: eta_min 2e-4)
    temperature: float = 20.0  # KD temperature (DataFree's deepinv and cmi scripts: --T 20)
    kd_steps: int = 400  # student steps per synthesised batch (DataFree: --kd_steps 400)
    synth_batch: int = 256  # images per synthesised batch (DataFree: synthesis batch = --batch_size 256)
    pool_capacity: int = 0  # images kept in the pool (0: all, as DataFree); oldest replaced beyond it
    # teacher, student and generators in channels_last while the method runs (the teacher's layout is restored
    # after). Faster on CPU too (oneDNN), measured at batch 128, 1 thread, on a loaded 2-core machine: KD step
    # 71 -> 62 ms, DeepInversion step 129 -> 104 ms, Fast-DFKD batch (width 8, 5 steps) 2.4 -> 1.25 s.
    channels_last: bool = True
    samples: int = 64  # images of the last synthesised batch saved to samples.png (0: none)
    log_every: int = 50  # training-curve points (each one syncs with the device)

    def validate(self) -> None:
        super().validate()
        if self.milestones:
            raise ConfigError(f"milestones {self.milestones} are not used here: the student's lr follows "
                              f"lr_schedule (cosine or constant)")
        for name in ("iters_per_epoch", "kd_steps", "synth_batch", "log_every", "temperature"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)!r}")
        for name in ("lr_min", "pool_capacity", "samples"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if self.lr_min > self.lr:
            raise ConfigError(f"lr_min {self.lr_min} must not exceed lr {self.lr}")


def plan(ctx, cfg: PoolKDConfig, synth_queries: float) -> int:
    """Student steps of the run: the nominal ``epochs x iters_per_epoch`` scaled by the budget fraction, cut
    to the cell's caps given the teacher queries per step (KD batch + the synthesis amortised over kd_steps)."""
    nominal = ctx.scaled(cfg.epochs * cfg.iters_per_epoch)
    return ctx.plan_steps(nominal, queries_per_step=cfg.batch_size + synth_queries / cfg.kd_steps)


def make_student_optimiser(student: nn.Module, cfg: PoolKDConfig, total: int):
    params = student.parameters()
    if cfg.optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.lr_schedule == "cosine":
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, total), eta_min=cfg.lr_min)
    else:
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    return opt, sched


def kd_step(teacher, student: nn.Module, x: torch.Tensor, opt: torch.optim.Optimizer, temperature: float,
            autocast) -> torch.Tensor:
    """One student update on ``x``: teacher logits (no grad), ``kd_loss`` at ``temperature``; returns the loss."""
    with autocast():
        with torch.no_grad():
            t_logits = teacher(x)
        s_logits = student(x)
    loss = kd_loss(s_logits.float(), t_logits.float(), temperature)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.detach()


def distill_on_pool(ctx, teacher, student: nn.Module, cfg: PoolKDConfig, synthesis: Synthesis, *,
                    name: str, pool: ImagePool | None = None, title: str = "") -> nn.Module:
    """Run the interleaved loop: a batch from ``synthesis()`` into the pool every ``kd_steps`` student
    steps (the first at step 1), one KD step per ``ctx.steps`` step. The statistics of the last batch are
    logged on every kept curve point. ``pool``: an existing (tracked) pool, e.g. filled by a warm-up phase."""
    device = ctx.device
    stat_names = synthesis.stat_names
    total = plan(ctx, cfg, synthesis.queries)
    if pool is None:
        pool = ImagePool(cfg.pool_capacity or None, device=device)
        ctx.track(pool=pool)
    opt, sched = make_student_optimiser(student, cfg, total)
    stats = torch.zeros(len(stat_names), device=device)
    classes = torch.full((cfg.synth_batch,), -1, dtype=torch.long, device=device)
    ctx.track(opt_s=opt, sched_s=sched, synth_stats=stats, last_classes=classes)
    if cfg.channels_last:
        student = student.to(memory_format=torch.channels_last)
    student.train()
    try:
        for step in ctx.steps(total, name, log_every=cfg.log_every):
            if (step - 1) % cfg.kd_steps == 0:
                add_batch(pool, synthesis, stats, classes, stat_names)
            x = pool.sample(cfg.batch_size, ctx.generator, ctx.info.augment)
            if cfg.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            loss = kd_step(teacher, student, x, opt, cfg.temperature, ctx.autocast)
            sched.step()
            ctx.log(step, loss_s=loss, lr_s=sched.get_last_lr()[0], pool_size=len(pool),
                    **dict(zip(stat_names, stats.unbind(0))))
    finally:
        save_samples(pool, classes, cfg.samples, ctx, title or name)
    return student.to(memory_format=torch.contiguous_format)


def add_batch(pool: ImagePool, synthesise, stats: torch.Tensor, classes: torch.Tensor,
              stat_names: tuple[str, ...]) -> None:
    """One synthesised batch into ``pool``; its teacher classes and statistics into the tracked tensors."""
    images, t_logits, batch_stats = synthesise()
    pool.add(images)
    n = min(classes.shape[0], t_logits.shape[0])
    classes[:n] = t_logits[:n].argmax(1)
    if stat_names:
        stats.copy_(torch.stack([batch_stats[k].detach().float().reshape(()) for k in stat_names]))


def save_samples(pool: ImagePool, classes: torch.Tensor, n: int, ctx, title: str) -> None:
    """The last synthesised batch's first ``n`` images, titled with the teacher's class, to samples.png."""
    if not n or len(pool) == 0:
        return
    k = min(n, classes.shape[0], len(pool))
    batch = pool.latest(classes.shape[0] if len(pool) >= classes.shape[0] else len(pool))[:k]
    labels = classes[:k].tolist()
    ctx.out_dir.mkdir(parents=True, exist_ok=True)
    save_image_grid(batch, ctx.out_dir / "samples.png", ctx.info.mean, ctx.info.std,
                    titles=[f"T: {c}" if c >= 0 else "" for c in labels],
                    title=f"{title}: last synthesised batch ({ctx.info.name}; teacher's class)")


@contextlib.contextmanager
def teacher_channels_last(teacher, active: bool = True):
    """The teacher's weights in channels_last while the method runs, its contiguous layout restored afterwards
    (the teacher object is the harness's, shared by the cells of a run; the values never change)."""
    if not active:
        yield
        return
    teacher.module.to(memory_format=torch.channels_last)
    try:
        yield
    finally:
        teacher.module.to(memory_format=torch.contiguous_format)


@contextlib.contextmanager
def frozen_student(student: nn.Module, active: bool = True):
    """The student in eval mode with frozen parameters while synthesis uses it (the official codes'
    ``student.eval()``; no gradient is accumulated into its parameters); train mode again afterwards."""
    if not active:
        yield
        return
    student.eval().requires_grad_(False)
    try:
        yield
    finally:
        student.train().requires_grad_(True)


def best_so_far(loss: torch.Tensor, best_loss: torch.Tensor, *pairs: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Keep the lowest-loss iterate without a host sync: for each ``(current, best)`` pair, ``best`` is
    overwritten in place by ``current`` where ``loss < best_loss``; returns the updated best loss."""
    better = loss.detach() < best_loss
    for current, best in pairs:
        best.copy_(torch.where(better, current.detach(), best))
    return torch.where(better, loss.detach(), best_loss)


class InversionMethod(Method):
    """Base of the data-free inversion methods that distil on a pool (deepinversion, adi, cmi, fast_dfkd, zskd):
    a subclass builds its :class:`Synthesis` in :meth:`synthesis`; :meth:`distill` runs the shared loop."""

    data_access = DataAccess.NONE
    teacher_access = TeacherAccess.GRADIENTS
    title = ""  # for samples.png

    def synthesis(self, teacher, student: nn.Module, ctx) -> Synthesis:
        raise NotImplementedError

    def distill(self, teacher, student, ctx):
        with teacher_channels_last(teacher, self.config.channels_last):
            synthesis = self.synthesis(teacher, student, ctx)
            try:
                return distill_on_pool(ctx, teacher, student, self.config, synthesis, name=self.name,
                                       title=self.title or self.name)
            finally:
                synthesis.close()
