"""Small builders shared by the tests (real data, real models: only the plumbing is shortened)."""
from __future__ import annotations

from pathlib import Path

import torch

from bench.data import ImageData
from bench.method import DataAccess, DistillContext
from bench.monitor import Budget

CPU = torch.device("cpu")


def make_ctx(data: ImageData, access: DataAccess, out_dir: Path, *, few: int | None = None, few_labels: bool = False,
             budget: float | Budget = 1.0, amp: bool = False, lineage=None, seed: int = 0) -> DistillContext:
    """A context as the Provision stage builds it: the training split for FULL, the first ``few`` training
    images for FEW (labels only with ``few_labels``), nothing for NONE/ALT."""
    train = (data.train_x, data.train_y) if access is DataAccess.FULL else None
    few_data = None
    if access is DataAccess.FEW and few is not None:
        few_data = (data.train_x[:few], data.train_y[:few] if few_labels else None)
    return DistillContext(info=data.info, data_access=access, device=CPU, seed=seed, out_dir=out_dir, budget=budget,
                          amp=amp, train=train, few=few_data, lineage=lineage)


def method_ctx(method, data: ImageData, out_dir: Path, **kw) -> DistillContext:
    """The context the Provision stage gives ``method`` (its declared access, its n_samples, its label reading)."""
    few = method.real_samples_limit(data.info) if method.data_access is DataAccess.FEW else None
    return make_ctx(data, method.data_access, out_dir, few=few, few_labels=method.reads_labels(), **kw)


def run_distill(method, teacher: torch.nn.Module, student: torch.nn.Module, data: ImageData, out_dir: Path, *,
                budget: float | Budget = 1.0, lineage=None, seed: int = 0, checkpoint_every: float = 0.0):
    """One Distill stage exactly as the runner runs it (monitor, caps, anytime curve); returns the Outcome."""
    from bench import provision
    from bench.students import Student

    return provision.distill(method, teacher, Student(student, lineage), data, sealed=provision.seal(data), seed=seed,
                             device=CPU, out_dir=out_dir,
                             budget=budget if isinstance(budget, Budget) else Budget(fraction=budget),
                             amp=False, data_root=None, checkpoint_every=checkpoint_every)
