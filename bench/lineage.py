"""Students derived from the teacher: the registry of derived kinds and the typed record of a derivation.

A derived student is written ``<kind>:<args>`` (``pruned:l1:0.5``, ``pruned:evo:0.5``). Its builder
gets a :class:`StudentContext` (the trained teacher, where to cache, and, for searches that read real
images, a harness-owned supply of them) and returns the model with a :class:`Lineage`: which teacher
channels each layer kept, the pruning history that rebuilds the architecture from the teacher's, and
what the derivation cost. The record travels beside the model (``ctx.lineage`` for methods, the cell's
``student.json`` for ``bench evaluate``); nothing is set as attributes on the module.

This module imports no kind: :mod:`bench.students` imports the built-in kinds (``bench.pruning``,
``bench.evolution``), which register themselves here. No import circle.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import torch
from torch import nn

from bench.data import DatasetInfo
from bench.registry import Registry


@dataclass(frozen=True)
class SearchCost:
    """What building a derived student cost; charged to every cell that uses it (it is cached once)."""

    seconds: float = 0.0
    teacher_queries: int = 0
    real_samples: int = 0  # real training images the derivation read (e.g. an evolutionary search's fitness)


@dataclass(frozen=True)
class Lineage:
    """How a derived student came from its teacher."""

    spec: str  # e.g. "pruned:l1:0.5"
    teacher_key: str
    teacher_arch: str
    # module name -> the teacher output channels the student layer kept, in order (every Conv2d/Linear)
    kept_channels: dict[str, tuple[int, ...]]
    history: tuple = ()  # torch-pruning's pruning history: replayed on the teacher architecture it rebuilds the student
    cost: SearchCost = field(default_factory=SearchCost)

    def to_json(self) -> dict[str, Any]:
        return {"spec": self.spec, "teacher_key": self.teacher_key, "teacher_arch": self.teacher_arch,
                "kept_channels": {k: list(v) for k, v in self.kept_channels.items()},
                "history": [list(h) for h in self.history],
                "cost": {"seconds": self.cost.seconds, "teacher_queries": self.cost.teacher_queries,
                         "real_samples": self.cost.real_samples}}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Lineage":
        return cls(spec=data["spec"], teacher_key=data["teacher_key"], teacher_arch=data["teacher_arch"],
                   kept_channels={k: tuple(v) for k, v in data["kept_channels"].items()},
                   history=tuple(tuple(h) for h in data["history"]), cost=SearchCost(**data.get("cost", {})))


@dataclass(frozen=True)
class StudentContext:
    """What a derived-student builder may use."""

    teacher: nn.Module  # the trained teacher (not modified by builders)
    teacher_key: str
    teacher_arch: str
    info: DatasetInfo
    cache_dir: Path
    device: torch.device
    # n real training images (uint8, from the split methods train on), for searches whose fitness reads
    # real data; every image handed out is charged to the student's SearchCost.real_samples
    real_images: Callable[[int], torch.Tensor] | None = None
    seed: int = 0


class StudentBuilder(Protocol):
    def __call__(self, args: str, ctx: StudentContext) -> tuple[nn.Module, Lineage]: ...


@dataclass(frozen=True)
class StudentKind:
    build: StudentBuilder
    validate: Callable[[str], None] | None = None  # raises ValueError for bad args, before any work
    # args -> the modules whose code builds such a student (part of the identity of the cells that use it)
    code: Callable[[str], tuple[str, ...]] | None = None


STUDENT_KINDS: Registry[StudentKind] = Registry("derived student kind")


def register_student_kind(kind: str, validate: Callable[[str], None] | None = None,
                          code: Callable[[str], tuple[str, ...]] | None = None):
    """Decorator registering a builder for students written ``<kind>:<args>``."""

    def decorator(fn: StudentBuilder) -> StudentBuilder:
        STUDENT_KINDS.register(kind, prefix="<args>")(StudentKind(fn, validate, code))
        return fn

    return decorator
