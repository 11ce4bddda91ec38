"""Student specs: an architecture name from the model zoo, or a student derived from the teacher.

A derived student is written ``<kind>:<args>`` (e.g. ``pruned:l1:0.5``) where ``kind`` is registered
with :func:`register_student_kind`. Anything else is a model name for :func:`bench.models.create_model`
(including ``timm:<name>`` and ``torchvision:<name>``).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import torch
from torch import nn

from bench.config import ConfigError
from bench.data import DatasetInfo
from bench.models import create_model, list_models


@dataclass(frozen=True)
class StudentContext:
    """What a derived-student builder may use: the trained teacher and where to cache results."""

    teacher: nn.Module
    teacher_key: str
    info: DatasetInfo
    cache_dir: Path
    device: torch.device


class StudentBuilder(Protocol):
    def __call__(self, args: str, ctx: StudentContext) -> nn.Module: ...


_KINDS: dict[str, StudentBuilder] = {}
_VALIDATORS: dict[str, Callable[[str], None]] = {}


def register_student_kind(kind: str, validate: Callable[[str], None] | None = None):
    """Decorator registering a builder for students written ``<kind>:<args>``."""

    def decorator(fn: StudentBuilder) -> StudentBuilder:
        _KINDS[kind] = fn
        if validate is not None:
            _VALIDATORS[kind] = validate
        return fn

    return decorator


def _split(spec: str) -> tuple[str | None, str]:
    kind, sep, args = spec.partition(":")
    return (kind, args) if sep and kind in _KINDS else (None, spec)


def is_derived(spec: str) -> bool:
    """True for ``<kind>:<args>`` students built from the teacher (cached per teacher)."""
    return _split(spec)[0] is not None


def check_spec(spec: str, where: str = "student") -> None:
    """Raise :class:`ConfigError` unless ``spec`` names a model or a registered derived kind."""
    kind, args = _split(spec)
    if kind is not None:
        validate = _VALIDATORS.get(kind)
        if validate is not None:
            try:
                validate(args)
            except ValueError as exc:
                raise ConfigError(f"{where}: {spec!r}: {exc}") from None
        return
    prefix = spec.split(":", 1)[0] + ":" if ":" in spec else None
    if spec in list_models() or prefix in ("timm:", "torchvision:"):
        return
    derived = [f"{k}:..." for k in sorted(_KINDS)]
    raise ConfigError(f"{where}: unknown student {spec!r}; valid: {', '.join(list_models() + derived)}")


def build_student(spec: str, ctx: StudentContext) -> nn.Module:
    """A fresh student for ``spec`` on ``ctx.device``, in train mode."""
    kind, args = _split(spec)
    if kind is not None:
        model = _KINDS[kind](args, ctx)
    else:
        model = create_model(spec, ctx.info.num_classes, ctx.info.channels, ctx.info.image_size)
    return model.to(ctx.device).train()


def check_compatible(teacher: nn.Module, student: nn.Module, info: DatasetInfo, device: torch.device) -> None:
    """Teacher and student must map this dataset's images to the same number of classes."""
    x = torch.zeros(2, info.channels, info.image_size, info.image_size, device=device)
    was_training = student.training
    student.eval()
    with torch.no_grad():
        t_out, s_out = teacher(x), student(x)
    student.train(was_training)
    if t_out.shape[1] != s_out.shape[1]:
        raise ConfigError(f"the student outputs {s_out.shape[1]} classes but the teacher {t_out.shape[1]} "
                          f"(dataset {info.name!r} has {info.num_classes})")
import bench.pruning  # noqa: E402,F401  (registers the derived student kind "pruned")
